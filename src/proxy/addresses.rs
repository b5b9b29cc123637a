//! The addresses of this host, which NodePorts answer on: read from the kernel on every sync,
//! as kube-proxy does (`pkg/proxy/util/nodeport_addresses.go`), behind a seam so that renders
//! and the conntrack policy are tested with addresses of their own.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use tracing::warn;

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

/// A fixed set, for tests.
impl LocalAddresses for Vec<Ipv4Addr> {
    fn ipv4(&self) -> BTreeSet<Ipv4Addr> {
        self.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_has_its_loopback_address() {
        assert!(Interfaces.ipv4().contains(&Ipv4Addr::LOCALHOST));
    }
}
