//! The addresses of this host, which NodePorts answer on: read from the kernel on every sync,
//! as kube-proxy does (`pkg/proxy/util/nodeport_addresses.go`), behind a seam so that renders
//! and the conntrack policy are tested with addresses of their own.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use tracing::warn;

use super::render::NodePorts;
use crate::config::NodePortAddresses;

/// The IPv4 addresses of the host's interfaces (in the calling thread's network namespace).
pub trait LocalAddresses: Send {
    fn ipv4(&self) -> BTreeSet<Ipv4Addr>;
}

/// The kernel's, through getifaddrs(3).
pub struct Interfaces;

impl LocalAddresses for Interfaces {
    fn ipv4(&self) -> BTreeSet<Ipv4Addr> {
        match nix::ifaddrs::getifaddrs() {
            Ok(addrs) => addrs
                .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot list the host's addresses");
                BTreeSet::new()
            }
        }
    }
}

/// A set the test changes as it goes.
impl LocalAddresses for std::sync::Arc<std::sync::Mutex<Vec<Ipv4Addr>>> {
    fn ipv4(&self) -> BTreeSet<Ipv4Addr> {
        let ips = self.lock().unwrap_or_else(|p| p.into_inner());
        ips.iter().copied().collect()
    }
}

/// Where NodePorts answer, from the configuration, the node IP and the host's addresses, as
/// kube-proxy's `NodePortAddresses.GetNodeIPs`: every local address, or the local addresses
/// inside the CIDRs (`primary`: the node IP's /32), sorted. Loopback addresses never answer
/// (kube-proxy with `--iptables-localhost-nodeports=false`: localhost NodePorts need
/// route_localnet, which rsdn does not set); the second value lists those left out.
pub fn node_ports(
    config: &NodePortAddresses,
    node_ip: Ipv4Addr,
    local: &BTreeSet<Ipv4Addr>,
) -> (NodePorts, Vec<Ipv4Addr>) {
    let inside = |ip: &Ipv4Addr| match config {
        NodePortAddresses::All => true,
        NodePortAddresses::Primary => *ip == node_ip,
        NodePortAddresses::Cidrs(cidrs) => cidrs.iter().any(|c| c.contains(ip)),
    };
    if *config == NodePortAddresses::All {
        return (NodePorts::Local, vec![]);
    }
    let (loopback, ips): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = local
        .iter()
        .filter(|ip| inside(ip))
        .partition(|ip| ip.is_loopback());
    (NodePorts::Addresses(ips), loopback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ports_are_the_local_addresses_inside_the_cidrs_without_loopback() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let local: BTreeSet<Ipv4Addr> =
            ["127.0.0.1", "192.168.77.11", "192.168.77.111", "10.128.0.1"]
                .iter()
                .map(|s| ip(s))
                .collect();
        let node = ip("192.168.77.11");
        let cidrs =
            |c: &[&str]| NodePortAddresses::Cidrs(c.iter().map(|c| c.parse().unwrap()).collect());
        assert_eq!(
            node_ports(&NodePortAddresses::All, node, &local),
            (NodePorts::Local, vec![])
        );
        assert_eq!(
            node_ports(&NodePortAddresses::Primary, node, &local),
            (NodePorts::Addresses(vec![node]), vec![])
        );
        assert_eq!(
            node_ports(&cidrs(&["192.168.77.0/24", "127.0.0.0/8"]), node, &local),
            (
                NodePorts::Addresses(vec![node, ip("192.168.77.111")]),
                vec![ip("127.0.0.1")]
            )
        );
        // A CIDR that holds no address of the host: NodePorts answer nowhere (as kube-proxy).
        assert_eq!(
            node_ports(&cidrs(&["203.0.113.0/24"]), node, &local),
            (NodePorts::Addresses(vec![]), vec![])
        );
        // The primary address must be the host's own.
        assert_eq!(
            node_ports(&NodePortAddresses::Primary, ip("192.168.77.99"), &local),
            (NodePorts::Addresses(vec![]), vec![])
        );
    }

    #[test]
    fn the_host_has_its_loopback_address() {
        assert!(Interfaces.ipv4().contains(&Ipv4Addr::LOCALHOST));
    }
}
