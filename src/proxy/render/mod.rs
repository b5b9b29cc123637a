//! The Service proxy's ruleset as data: a pure function of (scope, Service ports, endpoints)
//! that yields every chain the proxy owns in the nat and filter tables, in the shape
//! kube-proxy's iptables mode builds (same chain names, comments, matches and order).
//!
//! Each Service port is rendered on its own (`port`, in stages: `capture` of its addresses,
//! `external` traffic and the load-balancer `firewall`, its `endpoints`, chosen by `select`
//! as kube-proxy chooses them) into rules for the
//! shared chains (KUBE-SERVICES, ...) and a group of chains it owns alone (KUBE-SVC/SVL/EXT/
//! FW/SEP). A port whose inputs did not change is not rendered again (`RenderCache`), and its
//! group keeps the same `Arc`, which is how the engine's diff skips it unread.

mod capture;
mod endpoints;
mod external;
mod port;
mod select;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::names::*;
use crate::model::service::{Endpoint, ServicePort, ServicePortName, Services};
use crate::netfilter::jumps::{Jump, Position};
use crate::netfilter::ruleset::{Quoted, Ruleset, TableName, Tables};

/// The key of the proxy's groups in a ruleset.
pub const PRODUCER: &str = "proxy";

/// What the ruleset depends on besides the Services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyScope {
    pub cluster_network: Ipv4Net,
    pub service_network: Ipv4Net,
    /// The packet mark bit that KUBE-MARK-MASQ sets (OpenShift SDN: bit 0).
    pub masquerade_bit: u8,
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    /// Where NodePorts answer.
    pub node_ports: NodePorts,
    /// This node's zone (`topology.kubernetes.io/zone`), for topology-aware routing.
    pub zone: Option<String>,
}

/// The destinations KUBE-SERVICES sends to KUBE-NODEPORTS (kube-proxy's nodePortAddresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePorts {
    /// Every local address but 127.0.0.0/8 (`-m addrtype --dst-type LOCAL`).
    Local,
    /// These addresses (`-d` each).
    Addresses(Vec<Ipv4Addr>),
}

impl ProxyScope {
    pub fn mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }
}

/// What one Service port contributes: rules in the shared chains (KUBE-SERVICES, ...) and the
/// nat chains it owns alone (its KUBE-SVC/SVL/EXT/FW/SEP chains).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRules {
    /// Rules for the shared chains (merged in order of ports).
    pub shared: Tables,
    pub own: Arc<Tables>,
    pub no_local_internal: bool,
    pub no_local_external: bool,
}

/// Rendered ports by their inputs: an unchanged port is not rendered again.
#[derive(Debug, Default)]
pub struct RenderCache {
    scope: Option<ProxyScope>,
    ports: HashMap<ServicePortName, Cached>,
}

#[derive(Debug)]
struct Cached {
    port: ServicePort,
    endpoints: Vec<Endpoint>,
    /// The group key, formatted once.
    key: String,
    rules: Arc<PortRules>,
}

/// Counters the metrics report alongside a ruleset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderStats {
    pub no_local_endpoints_internal: usize,
    pub no_local_endpoints_external: usize,
}

/// KUBE-FORWARD's rule that drops what conntrack finds INVALID (kube-proxy's, whose packets
/// `kubeproxy_iptables_ct_state_invalid_dropped_packets_total` counts).
pub const INVALID_DROP: &str = "-m conntrack --ctstate INVALID -j DROP";

/// The jumps from the built-in chains into the proxy's, in the order they stand at the top of
/// each built-in chain (kube-proxy's order).
pub fn jumps() -> Vec<Jump> {
    let j = |table, chain, matches: &str, comment: &str, target: &str| {
        Jump::new(table, chain, matches, comment, target, Position::First)
    };
    let (filter, nat) = (TableName::Filter, TableName::Nat);
    let new = "-m conntrack --ctstate NEW ";
    let ext = "kubernetes externally-visible service portals";
    let fw = "kubernetes load balancer firewall";
    let portals = "kubernetes service portals";
    vec![
        j(filter, "INPUT", new, fw, KUBE_PROXY_FIREWALL),
        j(
            filter,
            "INPUT",
            "",
            "kubernetes health check service ports",
            KUBE_NODEPORTS,
        ),
        j(filter, "INPUT", new, ext, KUBE_EXTERNAL_SERVICES),
        j(filter, "FORWARD", new, fw, KUBE_PROXY_FIREWALL),
        j(
            filter,
            "FORWARD",
            "",
            "kubernetes forwarding rules",
            KUBE_FORWARD,
        ),
        j(filter, "FORWARD", new, portals, KUBE_SERVICES),
        j(filter, "FORWARD", new, ext, KUBE_EXTERNAL_SERVICES),
        j(filter, "OUTPUT", new, fw, KUBE_PROXY_FIREWALL),
        j(filter, "OUTPUT", new, portals, KUBE_SERVICES),
        j(nat, "PREROUTING", "", portals, KUBE_SERVICES),
        j(nat, "OUTPUT", "", portals, KUBE_SERVICES),
        j(
            nat,
            "POSTROUTING",
            "",
            "kubernetes postrouting rules",
            KUBE_POSTROUTING,
        ),
    ]
}

/// Whether a chain is the proxy's: its shared chains, and every per-Service and per-endpoint
/// chain (stale ones found in the kernel are deleted).
pub fn owns(_table: TableName, chain: &str) -> bool {
    is_service_chain(chain) || SHARED_FILTER.contains(&chain) || SHARED_NAT.contains(&chain)
}

/// The top-level chains, declared on every sync; every Service port adds rules to them.
const SHARED_FILTER: [&str; 5] = [
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
];
const SHARED_NAT: [&str; 4] = [
    KUBE_SERVICES,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_MARK_MASQ,
];

/// Computes every chain the proxy owns, for this node.
pub fn render(scope: &ProxyScope, services: &Services) -> (Ruleset, RenderStats) {
    render_cached(scope, services, &mut RenderCache::default())
}

/// `render`, re-using the ports of `cache` whose inputs did not change.
pub fn render_cached(
    scope: &ProxyScope,
    services: &Services,
    cache: &mut RenderCache,
) -> (Ruleset, RenderStats) {
    if cache.scope.as_ref() != Some(scope) {
        cache.ports.clear();
        cache.scope = Some(scope.clone());
    }
    let mut r = Ruleset::default();
    let mut stats = RenderStats::default();
    let mark = scope.mark();
    for chain in SHARED_FILTER {
        r.tables.filter.chain(chain);
    }
    for chain in SHARED_NAT {
        r.tables.nat.chain(chain);
    }
    let nat = &mut r.tables.nat;
    nat.add(
        KUBE_POSTROUTING,
        format_args!("-m mark ! --mark {mark}/{mark} -j RETURN"),
    );
    // Clear the bit so a packet that traverses the stack again is not masqueraded twice.
    nat.add(KUBE_POSTROUTING, format_args!("-j MARK --xor-mark {mark}"));
    nat.add(
        KUBE_POSTROUTING,
        format_args!(
            "{} -j MASQUERADE --random-fully",
            Quoted("kubernetes service traffic requiring SNAT")
        ),
    );
    nat.add(KUBE_MARK_MASQ, format_args!("-j MARK --or-mark {mark}"));

    let empty = vec![];
    for (spn, svc) in &services.ports {
        let eps = services.endpoints.get(spn).unwrap_or(&empty);
        let fresh =
            matches!(cache.ports.get(spn), Some(c) if c.port == *svc && c.endpoints == *eps);
        if !fresh {
            let rules = Arc::new(port::render(scope, spn, svc, eps));
            cache.ports.insert(
                spn.clone(),
                Cached {
                    port: svc.clone(),
                    endpoints: eps.clone(),
                    key: spn.to_string(),
                    rules,
                },
            );
        }
        let cached = &cache.ports[spn];
        let port = &cached.rules;
        r.tables.filter.append(&port.shared.filter);
        r.tables.nat.append(&port.shared.nat);
        stats.no_local_endpoints_internal += usize::from(port.no_local_internal);
        stats.no_local_endpoints_external += usize::from(port.no_local_external);
        r.groups
            .insert((PRODUCER, cached.key.clone()), port.own.clone());
    }
    cache
        .ports
        .retain(|spn, _| services.ports.contains_key(spn));

    let last =
        Quoted("kubernetes service nodeports; NOTE: this must be the last rule in this chain");
    match &scope.node_ports {
        NodePorts::Local => r.tables.nat.add(
            KUBE_SERVICES,
            format_args!(
                "{last} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j {KUBE_NODEPORTS}"
            ),
        ),
        NodePorts::Addresses(ips) => {
            for ip in ips {
                r.tables.nat.add(
                    KUBE_SERVICES,
                    format_args!("{last} -d {ip} -j {KUBE_NODEPORTS}"),
                );
            }
        }
    }
    let filter = &mut r.tables.filter;
    // Without nf_conntrack_tcp_be_liberal, out-of-window packets would otherwise reach pods
    // un-NATed and get reset (kubernetes#74839).
    filter.add(KUBE_FORWARD, format_args!("{INVALID_DROP}"));
    filter.add(
        KUBE_FORWARD,
        format_args!(
            "{} -m mark --mark {mark}/{mark} -j ACCEPT",
            Quoted("kubernetes forwarding rules")
        ),
    );
    filter.add(
        KUBE_FORWARD,
        format_args!(
            "{} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            Quoted("kubernetes forwarding conntrack rule")
        ),
    );
    (r, stats)
}

/// Whether a nat chain is shared by every Service port (the others a port owns alone).
fn is_shared(chain: &str) -> bool {
    SHARED_NAT.contains(&chain)
}

/// `-m <proto> -p <proto> -d <ip> --dport <port>`.
struct Dst<'a> {
    proto: &'a str,
    ip: Ipv4Addr,
    port: u16,
}

impl fmt::Display for Dst<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Dst { proto, ip, port } = self;
        write!(f, "-m {proto} -p {proto} -d {ip} --dport {port}")
    }
}

/// Splits a port's rendered nat chains into the shared ones and its own.
fn split(
    nat: crate::netfilter::ruleset::Table,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    nat.chains.into_iter().partition(|(c, _)| is_shared(c))
}

#[cfg(test)]
mod tests;
