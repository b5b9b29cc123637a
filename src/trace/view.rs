//! What the trace knows of one node, as one shape whether it comes from the model (the rules
//! the daemon's producers render for that node, the overlay entries `overlay::desired` computes,
//! the routes and addresses the design gives it) or from the node's kernel (`live`). The path
//! is computed from views; computing it twice, from the model's view and the kernel's, and
//! comparing is how drift is found.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::walk::Chains;
use crate::config::NodeConfig;
use crate::model::{ClusterModel, ClusterNode};
use crate::netfilter::engine::Owned;
use crate::netfilter::sets::IpSet;
use crate::overlay::{self, Entries, BRIDGE, ROUTE_PROTOCOL, VXLAN};

/// The name the model gives the interface of the node's own routes (its real name is the
/// kernel's business: eth0, ens3, bond0 ...).
pub const UNDERLAY: &str = "underlay";

/// A route as the trace shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub dev: String,
    pub via: Option<Ipv4Addr>,
    pub src: Option<Ipv4Addr>,
    pub proto: Option<u8>,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dst.prefix_len() == 0 {
            f.write_str("default")?;
        } else {
            write!(f, "{}", self.dst)?;
        }
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        write!(f, " dev {}", self.dev)?;
        if self.dev == VXLAN && self.via.is_some() {
            f.write_str(" onlink")?;
        }
        if let Some(src) = self.src {
            write!(f, " src {src}")?;
        }
        if let Some(p) = self.proto.filter(|p| *p == ROUTE_PROTOCOL) {
            write!(f, " proto {p}")?;
        }
        Ok(())
    }
}

/// A pod's host veth as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortState {
    pub veth: String,
    /// None: no such link.
    pub link: Option<PortLink>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortLink {
    pub on_bridge: bool,
    pub up: bool,
    pub hairpin: bool,
    pub mtu: u32,
}

/// vxlan0's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
}

/// One node, as the model says or as its kernel holds it.
#[derive(Clone)]
pub struct NodeView {
    pub node: ClusterNode,
    /// Read from the kernel (live), not computed from the model.
    pub kernel: bool,
    pub chains: Chains,
    pub sets: BTreeMap<String, IpSet>,
    /// Which chains are rsdn's: hits elsewhere are foreign rules, not drift.
    pub owned: Owned,
    /// The node's own addresses (addrtype LOCAL).
    pub local: Vec<Ipv4Net>,
    pub routes: Vec<Route>,
    pub overlay: Entries,
    pub vxlan: Option<Vxlan>,
    /// The first address of each interface: where MASQUERADE takes its source from.
    pub addrs: BTreeMap<String, Ipv4Addr>,
    /// The recent lists of ClientIP affinity, where read: list -> client addresses.
    pub recent: Option<BTreeMap<String, BTreeSet<Ipv4Addr>>>,
    /// Pod veths by pod address, where read.
    pub ports: Option<BTreeMap<Ipv4Addr, PortState>>,
    /// The pods' MTU where known (tun0's, or the configuration's).
    pub mtu: Option<u32>,
}

impl NodeView {
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        self.local.iter().any(|n| n.contains(&ip))
    }

    /// The route the kernel would take: longest prefix first.
    pub fn route(&self, dst: Ipv4Addr) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.dst.contains(&dst))
            .max_by_key(|r| r.dst.prefix_len())
    }

    /// The address MASQUERADE gives a packet leaving by `dev`.
    pub fn masquerade_source(&self, dev: &str) -> Option<Ipv4Addr> {
        self.addrs.get(dev).copied()
    }
}

/// The configuration `node` runs with: this node's, with another node's name (and its address
/// from the model).
pub fn config_for(config: &NodeConfig, node: &str) -> NodeConfig {
    let mut c = config.clone();
    if node != config.node_name {
        c.node_name = node.to_string();
        c.node_ip = None;
    }
    c
}

/// The model's view of `node`: the rules and sets the daemon's producers render for it, the
/// overlay entries it should hold, and the addresses and routes the design gives it.
pub fn model_view(config: &NodeConfig, model: &Arc<ClusterModel>, node: &ClusterNode) -> NodeView {
    let c = config_for(config, &node.name);
    let mut registry = prometheus_client::registry::Registry::default();
    let mut producers = crate::daemon::producers(&c, &mut registry);
    let desired = crate::netfilter::producer::combine(&mut producers, model);
    let gateway = node.subnet.gateway();
    let vtep = node.subnet.vtep_ip();
    let mut routes = vec![
        Route {
            dst: node.subnet.0,
            dev: BRIDGE.into(),
            via: None,
            src: Some(gateway),
            proto: None,
        },
        Route {
            dst: Ipv4Net::default(),
            dev: UNDERLAY.into(),
            via: None,
            src: None,
            proto: None,
        },
    ];
    let overlay = overlay::desired(node, model.nodes.values());
    for (dst, t) in &overlay.routes {
        routes.push(Route {
            dst: *dst,
            dev: VXLAN.into(),
            via: Some(t.via),
            src: Some(t.src),
            proto: Some(ROUTE_PROTOCOL),
        });
    }
    let host = |ip| Ipv4Net::new(ip, 32).expect("/32");
    NodeView {
        node: node.clone(),
        kernel: false,
        chains: Chains::from_ruleset(&desired.ruleset, &desired.jumps),
        sets: desired
            .ruleset
            .sets
            .iter()
            .map(|(n, s)| (n.clone(), (**s).clone()))
            .collect(),
        owned: desired.owned,
        local: vec![
            host(c.node_ip.unwrap_or(node.ip)),
            host(gateway),
            host(vtep),
            "127.0.0.0/8".parse().expect("loopback"),
        ],
        routes,
        overlay,
        vxlan: Some(Vxlan {
            vni: c.vni,
            port: c.vxlan_port,
            local: c.node_ip.unwrap_or(node.ip),
        }),
        addrs: BTreeMap::from([
            (BRIDGE.to_string(), gateway),
            (VXLAN.to_string(), vtep),
            (UNDERLAY.to_string(), c.node_ip.unwrap_or(node.ip)),
        ]),
        recent: None,
        ports: None,
        mtu: c.mtu,
    }
}
