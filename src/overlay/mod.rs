//! The VXLAN overlay: what the kernel of a node must hold so its pods reach every other node's
//! pods, as plain data. For every remote node: one FDB entry on vxlan0 (VTEP MAC -> node IP),
//! one permanent neighbour (VTEP IP -> VTEP MAC) and one onlink route (pod subnet via VTEP IP).
//! `desired` computes it, `diff` compares it with what the kernel holds, `kernel` observes and
//! applies. Nothing here is flushed: only the difference is written.

pub mod batch;
pub mod fake;
pub mod kernel;
pub mod metrics;
pub mod monitor;
pub mod ports;
pub mod reconcile;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rsdn_cni::names::{format_mac, mac_from_ipv4};

use crate::model::ClusterNode;

/// The gateway bridge pods attach to (OpenShift SDN's name for its gateway port).
pub const BRIDGE: &str = rsdn_cni::config::DEFAULT_BRIDGE;
/// The kernel VXLAN device.
pub const VXLAN: &str = "vxlan0";
/// Route protocol of every route rsdn owns (`ip route show proto 212`). Names it in
/// /etc/iproute2/rt_protos.d/rsdn.conf as "212 rsdn" if you like.
pub const ROUTE_PROTOCOL: u8 = 212;

/// The MAC of a node's VTEP: `0a:58:` + its underlay IPv4 (the OpenShift convention). Derived,
/// so it survives reboots and needs no annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VtepMac(pub [u8; 6]);

impl VtepMac {
    pub fn of(node_ip: Ipv4Addr) -> VtepMac {
        VtepMac(mac_from_ipv4(node_ip))
    }

    /// Ours by construction: locally administered 0a:58 prefix.
    pub fn from_bytes(b: &[u8]) -> Option<VtepMac> {
        let mac: [u8; 6] = b.try_into().ok()?;
        (mac[0] == 0x0a && mac[1] == 0x58).then_some(VtepMac(mac))
    }
}

impl fmt::Display for VtepMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_mac(&self.0))
    }
}

/// Where a remote pod subnet is routed: via the remote VTEP IP, onlink on vxlan0, with the
/// local gateway as source so node-to-pod traffic comes back through the overlay too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteTarget {
    pub via: Ipv4Addr,
    pub src: Ipv4Addr,
}

/// The per-remote-node entries of a node's kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    /// (VTEP MAC, underlay destination): vxlan0 FDB entries, `self permanent`.
    pub fdb: BTreeSet<(VtepMac, Ipv4Addr)>,
    /// VTEP IP -> VTEP MAC: permanent neighbours on vxlan0.
    pub neigh: BTreeMap<Ipv4Addr, VtepMac>,
    /// Remote pod subnet -> route target, protocol ROUTE_PROTOCOL.
    pub routes: BTreeMap<Ipv4Net, RouteTarget>,
}

impl Entries {
    /// The pod subnet claims these entries carry, pod subnet -> node IP: a route whose VTEP IP
    /// has a neighbour whose MAC has an FDB destination. What a restarted daemon finds of the
    /// model it programmed before.
    pub fn claims(&self) -> BTreeMap<Ipv4Net, Ipv4Addr> {
        let node_ip = |mac: VtepMac| {
            self.fdb
                .range((mac, Ipv4Addr::UNSPECIFIED)..)
                .next()
                .filter(|(m, _)| *m == mac)
                .map(|(_, ip)| *ip)
        };
        self.routes
            .iter()
            .filter_map(|(subnet, target)| {
                let mac = self.neigh.get(&target.via)?;
                Some((*subnet, node_ip(*mac)?))
            })
            .collect()
    }
}

/// The desired entries for `local` given every other node.
pub fn desired<'a>(
    local: &ClusterNode,
    remotes: impl IntoIterator<Item = &'a ClusterNode>,
) -> Entries {
    let mut e = Entries::default();
    let src = local.subnet.gateway();
    for r in remotes {
        if r.name == local.name {
            continue;
        }
        let mac = VtepMac::of(r.ip);
        let vtep_ip = r.subnet.vtep_ip();
        e.fdb.insert((mac, r.ip));
        e.neigh.insert(vtep_ip, mac);
        e.routes
            .insert(r.subnet.0, RouteTarget { via: vtep_ip, src });
    }
    e
}

/// One kernel change. `Set*` have replace semantics: applying one twice changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    DelRoute(Ipv4Net),
    DelNeigh(Ipv4Addr),
    DelFdb(VtepMac, Ipv4Addr),
    SetFdb(VtepMac, Ipv4Addr),
    SetNeigh(Ipv4Addr, VtepMac),
    SetRoute(Ipv4Net, RouteTarget),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::DelRoute(d) => write!(f, "route del {d} dev {VXLAN}"),
            Action::DelNeigh(ip) => write!(f, "neigh del {ip} dev {VXLAN}"),
            Action::DelFdb(mac, dst) => write!(f, "fdb del {mac} dev {VXLAN} dst {dst}"),
            Action::SetFdb(mac, dst) => {
                write!(f, "fdb replace {mac} dev {VXLAN} dst {dst} self permanent")
            }
            Action::SetNeigh(ip, mac) => write!(
                f,
                "neigh replace {ip} lladdr {mac} dev {VXLAN} nud permanent"
            ),
            Action::SetRoute(d, t) => write!(
                f,
                "route replace {d} via {} dev {VXLAN} onlink src {}",
                t.via, t.src
            ),
        }
    }
}

/// The changes that turn `observed` into `desired`, in a safe order: removals first (route,
/// then neighbour and FDB: a route never points at a half-gone path), then additions the other
/// way round (FDB and neighbour, then route: a route appears only once its path is complete).
/// `kernel::Kernel::apply` keeps this order between phases.
pub fn diff(desired: &Entries, observed: &Entries) -> Vec<Action> {
    let mut out = Vec::new();
    for d in observed.routes.keys() {
        if !desired.routes.contains_key(d) {
            out.push(Action::DelRoute(*d));
        }
    }
    for ip in observed.neigh.keys() {
        if !desired.neigh.contains_key(ip) {
            out.push(Action::DelNeigh(*ip));
        }
    }
    for (mac, dst) in observed.fdb.difference(&desired.fdb) {
        out.push(Action::DelFdb(*mac, *dst));
    }
    for (mac, dst) in desired.fdb.difference(&observed.fdb) {
        out.push(Action::SetFdb(*mac, *dst));
    }
    for (ip, mac) in &desired.neigh {
        if observed.neigh.get(ip) != Some(mac) {
            out.push(Action::SetNeigh(*ip, *mac));
        }
    }
    for (d, t) in &desired.routes {
        if observed.routes.get(d) != Some(t) {
            out.push(Action::SetRoute(*d, *t));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::node;
    use crate::model::NodeSubnet;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn claims_are_complete_route_neighbour_fdb_chains() {
        let nodes = [
            node("a", "192.168.1.11", "10.128.0.0/23"),
            node("b", "192.168.1.12", "10.128.2.0/23"),
            node("c", "192.168.1.13", "10.128.4.0/23"),
            node("d", "192.168.1.14", "10.128.6.0/24"),
        ];
        let mut e = desired(&nodes[0], &nodes);
        let all: BTreeMap<Ipv4Net, Ipv4Addr> =
            nodes[1..].iter().map(|n| (n.subnet.0, n.ip)).collect();
        assert_eq!(e.claims(), all);
        // c without its FDB entry, d without its neighbour: traffic for them goes nowhere, so
        // they claim nothing.
        e.fdb
            .remove(&(VtepMac::of(ip("192.168.1.13")), ip("192.168.1.13")));
        e.neigh.remove(&ip("10.128.6.0"));
        assert_eq!(
            e.claims(),
            BTreeMap::from([(net("10.128.2.0/23"), ip("192.168.1.12"))])
        );
        assert_eq!(Entries::default().claims(), BTreeMap::new());
    }

    fn cluster() -> Vec<ClusterNode> {
        vec![
            node("a", "192.168.1.11", "10.128.0.0/23"),
            node("b", "192.168.1.12", "10.128.2.0/23"),
            node("c", "192.168.1.13", "10.128.4.0/23"),
        ]
    }

    #[test]
    fn desired_has_one_of_each_entry_per_remote_node() {
        let nodes = cluster();
        let e = desired(&nodes[0], &nodes);
        let mac_b = VtepMac::of(ip("192.168.1.12"));
        assert_eq!(mac_b.to_string(), "0a:58:c0:a8:01:0c");
        assert_eq!(e.fdb.len(), 2);
        assert!(e.fdb.contains(&(mac_b, ip("192.168.1.12"))));
        assert_eq!(e.neigh[&ip("10.128.2.0")], mac_b);
        assert_eq!(
            e.routes[&net("10.128.2.0/23")],
            RouteTarget {
                via: ip("10.128.2.0"),
                src: ip("10.128.0.1")
            }
        );
        assert!(
            !e.routes.contains_key(&net("10.128.0.0/23")),
            "no route to the local subnet"
        );
    }

    #[test]
    fn diff_from_empty_adds_everything_in_order() {
        let nodes = cluster();
        let want = desired(&nodes[0], &nodes);
        let actions = diff(&want, &Entries::default());
        assert_eq!(actions.len(), 6);
        let kinds: Vec<&str> = actions
            .iter()
            .map(|a| match a {
                Action::SetFdb(..) => "fdb",
                Action::SetNeigh(..) => "neigh",
                Action::SetRoute(..) => "route",
                _ => "del",
            })
            .collect();
        assert_eq!(kinds, ["fdb", "fdb", "neigh", "neigh", "route", "route"]);
    }

    #[test]
    fn no_op_when_the_kernel_matches() {
        let nodes = cluster();
        let want = desired(&nodes[0], &nodes);
        assert!(diff(&want, &want.clone()).is_empty());
    }

    #[test]
    fn removed_node_loses_all_three_entries_route_first() {
        let nodes = cluster();
        let before = desired(&nodes[0], &nodes);
        let after = desired(&nodes[0], &nodes[..2]);
        let mac_c = VtepMac::of(ip("192.168.1.13"));
        assert_eq!(
            diff(&after, &before),
            vec![
                Action::DelRoute(net("10.128.4.0/23")),
                Action::DelNeigh(ip("10.128.4.0")),
                Action::DelFdb(mac_c, ip("192.168.1.13"))
            ]
        );
    }

    #[test]
    fn node_ip_change_replaces_fdb_and_neighbour_mac_but_keeps_the_route() {
        let mut nodes = cluster();
        let before = desired(&nodes[0], &nodes);
        nodes[1].ip = ip("192.168.1.99");
        let after = desired(&nodes[0], &nodes);
        let (old, new) = (
            VtepMac::of(ip("192.168.1.12")),
            VtepMac::of(ip("192.168.1.99")),
        );
        assert_eq!(
            diff(&after, &before),
            vec![
                Action::DelFdb(old, ip("192.168.1.12")),
                Action::SetFdb(new, ip("192.168.1.99")),
                Action::SetNeigh(ip("10.128.2.0"), new),
            ]
        );
    }

    #[test]
    fn subnet_change_moves_route_and_neighbour() {
        let mut nodes = cluster();
        let before = desired(&nodes[0], &nodes);
        nodes[1].subnet = NodeSubnet(net("10.128.8.0/23"));
        let after = desired(&nodes[0], &nodes);
        let mac_b = VtepMac::of(ip("192.168.1.12"));
        assert_eq!(
            diff(&after, &before),
            vec![
                Action::DelRoute(net("10.128.2.0/23")),
                Action::DelNeigh(ip("10.128.2.0")),
                Action::SetNeigh(ip("10.128.8.0"), mac_b),
                Action::SetRoute(
                    net("10.128.8.0/23"),
                    RouteTarget {
                        via: ip("10.128.8.0"),
                        src: ip("10.128.0.1")
                    }
                ),
            ]
        );
    }

    #[test]
    fn wrong_mac_or_route_in_the_kernel_is_replaced() {
        let nodes = cluster();
        let want = desired(&nodes[0], &nodes);
        let mut seen = want.clone();
        let bogus = VtepMac([0x0a, 0x58, 1, 2, 3, 4]);
        seen.neigh.insert(ip("10.128.2.0"), bogus);
        seen.fdb.insert((bogus, ip("192.168.1.200")));
        seen.routes.insert(
            net("10.128.4.0/23"),
            RouteTarget {
                via: ip("10.128.4.9"),
                src: ip("10.128.0.1"),
            },
        );
        let actions = diff(&want, &seen);
        assert_eq!(
            actions,
            vec![
                Action::DelFdb(bogus, ip("192.168.1.200")),
                Action::SetNeigh(ip("10.128.2.0"), VtepMac::of(ip("192.168.1.12"))),
                Action::SetRoute(net("10.128.4.0/23"), want.routes[&net("10.128.4.0/23")]),
            ]
        );
    }

    #[test]
    fn local_node_in_remotes_is_ignored() {
        let nodes = cluster();
        assert_eq!(desired(&nodes[1], &nodes).routes.len(), 2);
        assert!(desired(&nodes[0], &nodes[..1]).fdb.is_empty());
    }

    #[test]
    fn vtep_mac_ownership() {
        assert!(VtepMac::from_bytes(&[0x0a, 0x58, 1, 2, 3, 4]).is_some());
        assert!(VtepMac::from_bytes(&[0, 0, 0, 0, 0, 0]).is_none());
        assert!(VtepMac::from_bytes(&[0x0a, 0x58, 1]).is_none());
    }
}
