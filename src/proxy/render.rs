//! The ruleset as data: a pure function of (configuration, node, Service ports, endpoints) that
//! yields every chain rsdn owns in the nat and filter tables with its rules, in the shape
//! kube-proxy's iptables mode builds (same chain names, comments, matches and order), plus our
//! own egress masquerade and forward chains. `payload` turns two rulesets into the
//! iptables-restore input that moves the kernel from one to the other.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

use ipnet::Ipv4Net;

use crate::model::service::{Endpoint, ServicePort, ServicePortName, Services};
use super::names::*;

/// What the ruleset depends on besides the Services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyScope {
    pub cluster_network: Ipv4Net,
    pub service_network: Ipv4Net,
    /// The packet mark bit that KUBE-MARK-MASQ sets (OpenShift SDN: bit 0).
    pub masquerade_bit: u8,
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    /// false: no KUBE-* chains at all (kube-proxy runs); egress masquerade stays.
    pub proxy: bool,
}

impl ProxyScope {
    pub fn mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }
}

/// One table: chain -> its rules as restore input (`-A CHAIN ...\n` lines, in order). One
/// string per chain, not one per rule: a 10000-Service ruleset has 430000 rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub chains: BTreeMap<String, String>,
}

impl Table {
    fn chain(&mut self, name: &str) -> &mut String {
        // Most calls find the chain: look it up without allocating its name.
        if !self.chains.contains_key(name) {
            self.chains.insert(name.to_string(), String::new());
        }
        self.chains.get_mut(name).expect("just inserted")
    }

    /// Appends `-A chain <args>`, formatted straight into the chain's text: a large ruleset
    /// has hundreds of thousands of rules, and a temporary string per rule showed in profiles.
    fn add(&mut self, chain: &str, args: fmt::Arguments) {
        self.open(chain).add(args);
    }

    /// A chain to append several rules to, looked up once.
    fn open<'a>(&'a mut self, chain: &'a str) -> Chain<'a> {
        Chain {
            name: chain,
            body: self.chain(chain),
        }
    }

    pub fn rules(&self) -> usize {
        self.chains.values().map(|c| c.lines().count()).sum()
    }

    /// The rules of a chain, one line each.
    pub fn lines(&self, chain: &str) -> Vec<&str> {
        self.chains
            .get(chain)
            .map(|c| c.lines().collect())
            .unwrap_or_default()
    }
}

/// One chain of a `Table`, open for appending.
struct Chain<'a> {
    name: &'a str,
    body: &'a mut String,
}

impl Chain<'_> {
    /// Appends `-A chain <args>`.
    fn add(&mut self, args: fmt::Arguments) {
        let _ = writeln!(self.body, "-A {} {args}", self.name);
    }
}

/// What one Service port contributes: rules in the shared chains (KUBE-SERVICES, ...) and the
/// nat chains it owns alone (its KUBE-SVC/SVL/EXT/FW/SEP chains). Kept per port so that a sync
/// re-renders and rewrites only the ports whose Service or endpoints changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRules {
    /// Rules for the shared chains, as a ruleset of its own (merged in order of ports).
    pub shared: Ruleset,
    pub own: Table,
    pub no_local_internal: bool,
    pub no_local_external: bool,
}

/// Everything rsdn owns in iptables: the shared chains per table, and each Service port's own
/// nat chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub filter: Table,
    pub nat: Table,
    pub ports: BTreeMap<ServicePortName, Arc<PortRules>>,
}

impl Ruleset {
    /// A nat chain, shared or owned by a port.
    pub fn nat_chain(&self, name: &str) -> Option<&String> {
        self.nat
            .chains
            .get(name)
            .or_else(|| self.ports.values().find_map(|p| p.own.chains.get(name)))
    }

    pub fn nat_rules(&self) -> usize {
        self.nat.rules() + self.ports.values().map(|p| p.own.rules()).sum::<usize>()
    }
}

/// Rendered ports by their inputs: an unchanged port is not rendered again, and keeps the same
/// `Arc`, which is how the payload sees it unchanged without comparing its rules.
#[derive(Debug, Default)]
pub struct RenderCache {
    scope: Option<ProxyScope>,
    ports: HashMap<ServicePortName, (ServicePort, Vec<Endpoint>, Arc<PortRules>)>,
}

/// A jump from a built-in chain into ours: not part of the restore payload (that would mean
/// owning the built-in chain); ensured one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub chain: &'static str,
    pub rule: String,
    /// Inserted first (kube-proxy's jumps) or appended (our permissive forward rules, which
    /// must not pre-empt kube-proxy's REJECT and DROP rules).
    pub first: bool,
}

/// `-m comment --comment "<text>"`, for a phrase: quoted, as iptables-save prints a comment
/// with spaces.
struct Quoted<T>(T);

impl<T: fmt::Display> fmt::Display for Quoted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-m comment --comment \"{}\"", self.0)
    }
}

/// `-m comment --comment <text>`, for a Service port name (`namespace/name:port`), which the
/// model admits only without spaces or quotes.
struct Plain<T>(T);

impl<T: fmt::Display> fmt::Display for Plain<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-m comment --comment {}", self.0)
    }
}

pub fn jumps(scope: &ProxyScope) -> Vec<Jump> {
    let j = |table, chain, extra: &str, text: &str, target: &str, first| Jump {
        table,
        chain,
        rule: format!("{extra}{} -j {target}", Quoted(text)),
        first,
    };
    let new = "-m conntrack --ctstate NEW ";
    let mut out = vec![];
    if scope.proxy {
        let ext = "kubernetes externally-visible service portals";
        let fw = "kubernetes load balancer firewall";
        out.extend([
            j("filter", "INPUT", new, ext, KUBE_EXTERNAL_SERVICES, true),
            j("filter", "FORWARD", new, ext, KUBE_EXTERNAL_SERVICES, true),
            j(
                "filter",
                "INPUT",
                "",
                "kubernetes health check service ports",
                KUBE_NODEPORTS,
                true,
            ),
            j(
                "filter",
                "FORWARD",
                new,
                "kubernetes service portals",
                KUBE_SERVICES,
                true,
            ),
            j(
                "filter",
                "OUTPUT",
                new,
                "kubernetes service portals",
                KUBE_SERVICES,
                true,
            ),
            j(
                "filter",
                "FORWARD",
                "",
                "kubernetes forwarding rules",
                KUBE_FORWARD,
                true,
            ),
            j("filter", "INPUT", new, fw, KUBE_PROXY_FIREWALL, true),
            j("filter", "OUTPUT", new, fw, KUBE_PROXY_FIREWALL, true),
            j("filter", "FORWARD", new, fw, KUBE_PROXY_FIREWALL, true),
            j(
                "nat",
                "OUTPUT",
                "",
                "kubernetes service portals",
                KUBE_SERVICES,
                true,
            ),
            j(
                "nat",
                "PREROUTING",
                "",
                "kubernetes service portals",
                KUBE_SERVICES,
                true,
            ),
            j(
                "nat",
                "POSTROUTING",
                "",
                "kubernetes postrouting rules",
                KUBE_POSTROUTING,
                true,
            ),
        ]);
    }
    out.extend([
        j(
            "nat",
            "POSTROUTING",
            "",
            "rsdn egress masquerade",
            RSDN_MASQUERADE,
            false,
        ),
        j(
            "filter",
            "FORWARD",
            "",
            "rsdn pod traffic",
            RSDN_FORWARD,
            false,
        ),
    ]);
    out
}

/// kube-proxy's endpoint selection (topology hints aside): ready endpoints; when none is ready
/// anywhere, the serving-and-terminating ones, so connections drain instead of failing.
/// Endpoints are named by their index in the port's endpoints, which are unique and sorted by
/// `ip:port` text (the model's order): ascending indices are kube-proxy's order.
struct Categorized {
    cluster: Vec<usize>,
    local: Vec<usize>,
    /// Endpoints some chain may jump to: each gets a KUBE-SEP- chain.
    reachable: Vec<usize>,
    any: bool,
}

fn categorize(eps: &[Endpoint], svc: &ServicePort, node: &str) -> Categorized {
    let local = |e: &Endpoint| e.node.as_deref() == Some(node);
    let draining = |e: &Endpoint| e.serving && e.terminating;
    let select = |keep: &dyn Fn(&Endpoint) -> bool| -> Vec<usize> {
        (0..eps.len()).filter(|&i| keep(&eps[i])).collect()
    };
    let mut c = Categorized {
        cluster: vec![],
        local: vec![],
        reachable: vec![],
        any: false,
    };
    if svc.uses_cluster_endpoints() {
        c.cluster = select(&|e| e.ready);
        if c.cluster.is_empty() {
            c.cluster = select(&draining);
        }
        c.any = !c.cluster.is_empty();
    }
    if !svc.uses_local_endpoints() {
        c.reachable = c.cluster.clone();
        return c;
    }
    c.any |= eps.iter().any(|e| e.ready || draining(e));
    let local_ready = select(&|e| local(e) && e.ready);
    let local_fallback = local_ready.is_empty();
    c.local = if local_fallback {
        select(&|e| local(e) && draining(e))
    } else {
        local_ready
    };
    if !svc.uses_cluster_endpoints() {
        c.reachable = c.local.clone();
    } else if !local_fallback {
        c.reachable = c.cluster.clone();
    } else {
        let both: BTreeSet<usize> = c.cluster.iter().chain(&c.local).copied().collect();
        c.reachable = both.into_iter().collect();
    }
    c
}

/// Counters the metrics report alongside a ruleset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderStats {
    pub no_local_endpoints_internal: usize,
    pub no_local_endpoints_external: usize,
}

/// Computes every chain rsdn owns, for this node.
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
    egress(scope, &mut r);
    if !scope.proxy {
        cache.ports.clear();
        return (r, stats);
    }
    let mark = scope.mark();
    for chain in SHARED_FILTER {
        r.filter.chain(chain);
    }
    for chain in SHARED_NAT {
        r.nat.chain(chain);
    }
    r.nat.add(
        KUBE_POSTROUTING,
        format_args!("-m mark ! --mark {mark}/{mark} -j RETURN"),
    );
    // Clear the bit so a packet that traverses the stack again is not masqueraded twice.
    r.nat
        .add(KUBE_POSTROUTING, format_args!("-j MARK --xor-mark {mark}"));
    r.nat.add(
        KUBE_POSTROUTING,
        format_args!(
            "{} -j MASQUERADE --random-fully",
            Quoted("kubernetes service traffic requiring SNAT")
        ),
    );
    r.nat
        .add(KUBE_MARK_MASQ, format_args!("-j MARK --or-mark {mark}"));

    let empty = vec![];
    for (spn, svc) in &services.ports {
        let eps = services.endpoints.get(spn).unwrap_or(&empty);
        let port = match cache.ports.get(spn) {
            Some((s, e, rules)) if s == svc && e == eps => rules.clone(),
            _ => {
                let rules = Arc::new(service_port(scope, spn, svc, eps));
                cache
                    .ports
                    .insert(spn.clone(), (svc.clone(), eps.clone(), rules.clone()));
                rules
            }
        };
        for (shared, mine) in [
            (&mut r.filter, &port.shared.filter),
            (&mut r.nat, &port.shared.nat),
        ] {
            for (chain, rules) in &mine.chains {
                shared.chain(chain).push_str(rules);
            }
        }
        stats.no_local_endpoints_internal += usize::from(port.no_local_internal);
        stats.no_local_endpoints_external += usize::from(port.no_local_external);
        r.ports.insert(spn.clone(), port);
    }
    cache
        .ports
        .retain(|spn, _| services.ports.contains_key(spn));

    r.nat.add(
        KUBE_SERVICES,
        format_args!(
            "{} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j {KUBE_NODEPORTS}",
            Quoted("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
        ),
    );
    // Without nf_conntrack_tcp_be_liberal, out-of-window packets would otherwise reach pods
    // un-NATed and get reset (kubernetes#74839).
    r.filter.add(
        KUBE_FORWARD,
        format_args!("-m conntrack --ctstate INVALID -j DROP"),
    );
    r.filter.add(
        KUBE_FORWARD,
        format_args!(
            "{} -m mark --mark {mark}/{mark} -j ACCEPT",
            Quoted("kubernetes forwarding rules")
        ),
    );
    r.filter.add(
        KUBE_FORWARD,
        format_args!(
            "{} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            Quoted("kubernetes forwarding conntrack rule")
        ),
    );
    (r, stats)
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

/// Whether a nat chain is shared by every Service port (the others a port owns alone).
fn is_shared(chain: &str) -> bool {
    SHARED_NAT.contains(&chain)
}

/// Pod traffic leaving the cluster and service networks leaves with the node's address;
/// pod-to-pod traffic across nodes keeps its source. Pod traffic is forwarded even where the
/// FORWARD policy is DROP.
fn egress(scope: &ProxyScope, r: &mut Ruleset) {
    let (cn, sn) = (scope.cluster_network, scope.service_network);
    r.nat
        .add(RSDN_MASQUERADE, format_args!("! -s {cn} -j RETURN"));
    r.nat.add(
        RSDN_MASQUERADE,
        format_args!(
            "-d {cn} {} -j RETURN",
            Quoted("pod to pod keeps its address")
        ),
    );
    r.nat
        .add(RSDN_MASQUERADE, format_args!("-d {sn} -j RETURN"));
    r.nat.add(
        RSDN_MASQUERADE,
        format_args!(
            "{} -j MASQUERADE --random-fully",
            Quoted("pod traffic leaving the cluster network")
        ),
    );
    r.filter
        .add(RSDN_FORWARD, format_args!("-s {cn} -j ACCEPT"));
    r.filter
        .add(RSDN_FORWARD, format_args!("-d {cn} -j ACCEPT"));
}

fn service_port(
    scope: &ProxyScope,
    spn: &ServicePortName,
    svc: &ServicePort,
    eps: &[Endpoint],
) -> PortRules {
    let mut r = Ruleset::default();
    let mut stats = RenderStats::default();
    service_port_into(scope, spn, svc, eps, &mut r, &mut stats);
    let (shared, own): (BTreeMap<_, _>, BTreeMap<_, _>) =
        r.nat.chains.into_iter().partition(|(c, _)| is_shared(c));
    PortRules {
        shared: Ruleset {
            filter: r.filter,
            nat: Table { chains: shared },
            ports: BTreeMap::new(),
        },
        own: Table { chains: own },
        no_local_internal: stats.no_local_endpoints_internal > 0,
        no_local_external: stats.no_local_endpoints_external > 0,
    }
}

fn service_port_into(
    scope: &ProxyScope,
    spn: &ServicePortName,
    svc: &ServicePort,
    eps: &[Endpoint],
    r: &mut Ruleset,
    stats: &mut RenderStats,
) {
    let name = spn.to_string();
    let proto = spn.protocol.as_str();
    let chains = ServiceChains::of(spn);
    let c = categorize(eps, svc, &scope.node_name);
    let uses_cluster_chain = !c.cluster.is_empty() && svc.uses_cluster_endpoints();
    let uses_local_chain = !c.local.is_empty() && svc.uses_local_endpoints();

    let (internal_chain, has_internal) = if svc.internal_local {
        (&chains.local, c.any && !c.local.is_empty())
    } else {
        (&chains.cluster, c.any)
    };
    let (external_policy_chain, has_external) = if svc.external_local {
        (&chains.local, c.any && !c.local.is_empty())
    } else {
        (&chains.cluster, c.any)
    };
    let uses_external_chain = c.any && svc.externally_accessible();
    let uses_fw_chain =
        c.any && !svc.load_balancer_ips.is_empty() && !svc.load_balancer_source_ranges.is_empty();
    let lb_chain = if uses_fw_chain {
        &chains.firewall
    } else {
        &chains.external
    };

    // Where a Service has no usable endpoint here, the filter table answers for it.
    let (filter_target, filter_reason) = if !c.any {
        ("REJECT", "has no endpoints")
    } else {
        ("DROP", "has no local endpoints")
    };
    let filtered = Quoted(format_args!("{name} {filter_reason}"));
    if c.any && !has_internal {
        stats.no_local_endpoints_internal += 1;
    }
    if c.any && !has_external {
        stats.no_local_endpoints_external += 1;
    }

    let dst = |ip| Dst {
        proto,
        ip,
        port: svc.port,
    };
    let cluster_ip = dst(svc.cluster_ip);

    // Capture the cluster IP.
    if has_internal {
        r.nat.add(
            KUBE_SERVICES,
            format_args!(
                "{} {cluster_ip} -j {internal_chain}",
                Quoted(format_args!("{name} cluster IP"))
            ),
        );
    } else {
        r.filter.add(
            KUBE_SERVICES,
            format_args!("{filtered} {cluster_ip} -j {filter_target}"),
        );
    }
    // External IPs.
    for ip in &svc.external_ips {
        if c.any {
            r.nat.add(
                KUBE_SERVICES,
                format_args!(
                    "{} {} -j {}",
                    Quoted(format_args!("{name} external IP")),
                    dst(*ip),
                    chains.external
                ),
            );
        }
        if !has_external {
            r.filter.add(
                KUBE_EXTERNAL_SERVICES,
                format_args!("{filtered} {} -j {filter_target}", dst(*ip)),
            );
        }
    }
    // Load-balancer IPs.
    for ip in &svc.load_balancer_ips {
        if c.any {
            r.nat.add(
                KUBE_SERVICES,
                format_args!(
                    "{} {} -j {lb_chain}",
                    Quoted(format_args!("{name} loadbalancer IP")),
                    dst(*ip)
                ),
            );
        }
        if uses_fw_chain {
            r.filter.add(
                KUBE_PROXY_FIREWALL,
                format_args!(
                    "{} {} -j DROP",
                    Quoted(format_args!(
                        "{name} traffic not accepted by {}",
                        chains.firewall
                    )),
                    dst(*ip)
                ),
            );
        }
    }
    if !has_external {
        for ip in &svc.load_balancer_ips {
            r.filter.add(
                KUBE_EXTERNAL_SERVICES,
                format_args!("{filtered} {} -j {filter_target}", dst(*ip)),
            );
        }
    }
    // NodePorts.
    if let Some(np) = svc.node_port {
        if c.any {
            r.nat.add(
                KUBE_NODEPORTS,
                format_args!(
                    "{} -m {proto} -p {proto} --dport {np} -j {}",
                    Plain(&name),
                    chains.external
                ),
            );
        }
        if !has_external {
            r.filter.add(
                KUBE_EXTERNAL_SERVICES,
                format_args!(
                    "{filtered} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j {filter_target}"
                ),
            );
        }
    }

    // The health check node port is let in whether or not there are local endpoints: the
    // answer (503) is what tells a load balancer to skip this node.
    if let Some(hc) = svc.health_check_node_port {
        r.filter.add(
            KUBE_NODEPORTS,
            format_args!(
                "{} -m tcp -p tcp --dport {hc} -j ACCEPT",
                Quoted(format_args!("{name} health check node port"))
            ),
        );
    }

    // Internal traffic: masquerade what does not come from a pod (a node, or a host routing
    // the service network to us), since the endpoint may be on another node.
    if has_internal {
        r.nat.add(
            internal_chain,
            format_args!(
                "{} {cluster_ip} ! -s {} -j {KUBE_MARK_MASQ}",
                Quoted(format_args!("{name} cluster IP")),
                scope.cluster_network
            ),
        );
    }
    // External traffic.
    if uses_external_chain {
        let ext = &chains.external;
        r.nat.chain(ext);
        if !svc.external_local {
            r.nat.add(
                ext,
                format_args!(
                    "{} -j {KUBE_MARK_MASQ}",
                    Quoted(format_args!(
                        "masquerade traffic for {name} external destinations"
                    ))
                ),
            );
        } else {
            // Pods and the node itself reach an external address of a Local Service as if
            // from outside and back in: Cluster policy, masqueraded for the node.
            r.nat.add(
                ext,
                format_args!(
                    "{} -s {} -j {}",
                    Quoted(format_args!("pod traffic for {name} external destinations")),
                    scope.cluster_network,
                    chains.cluster
                ),
            );
            r.nat.add(
                ext,
                format_args!(
                    "{} -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}",
                    Quoted(format_args!(
                        "masquerade LOCAL traffic for {name} external destinations"
                    ))
                ),
            );
            r.nat.add(
                ext,
                format_args!(
                    "{} -m addrtype --src-type LOCAL -j {}",
                    Quoted(format_args!(
                        "route LOCAL traffic for {name} external destinations"
                    )),
                    chains.cluster
                ),
            );
        }
        if has_external {
            r.nat.add(ext, format_args!("-j {external_policy_chain}"));
        }
    }
    // Source ranges of load-balancer IPs.
    if uses_fw_chain {
        let fw = &chains.firewall;
        r.nat.chain(fw);
        let lb = Quoted(format_args!("{name} loadbalancer IP"));
        let mut from_node = false;
        for range in &svc.load_balancer_source_ranges {
            r.nat
                .add(fw, format_args!("{lb} -s {range} -j {}", chains.external));
            from_node |= range.contains(&scope.node_ip);
        }
        // A VIP often sits on the node itself; the node's own requests then come from it.
        if from_node {
            for ip in &svc.load_balancer_ips {
                r.nat
                    .add(fw, format_args!("{lb} -s {ip} -j {}", chains.external));
            }
        }
        r.nat.add(
            fw,
            format_args!(
                "{}",
                Quoted(format_args!(
                    "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
                ))
            ),
        );
    }
    // Each reachable endpoint's `ip:port` and chain name, computed once, by its index in `eps`.
    let mut texts = vec![None; eps.len()];
    let hash_prefix = format!("{name}{proto}");
    for &i in &c.reachable {
        let addr = eps[i].to_string();
        let chain = endpoint_chain_of(&hash_prefix, &addr);
        texts[i] = Some(EndpointText { addr, chain });
    }
    let jumps = EndpointJumps {
        name: &name,
        affinity: svc.affinity_seconds,
        texts: &texts,
    };
    if uses_cluster_chain {
        jumps.write(&chains.cluster, &c.cluster, &mut r.nat);
    }
    if uses_local_chain {
        jumps.write(&chains.local, &c.local, &mut r.nat);
    }
    let plain = Plain(&name);
    for &i in &c.reachable {
        let ep = jumps.text(i);
        let (sep, addr) = (&ep.chain, &ep.addr);
        let mut out = r.nat.open(sep);
        out.add(format_args!("{plain} -s {} -j {KUBE_MARK_MASQ}", ep.ip()));
        if svc.affinity_seconds.is_some() {
            out.add(format_args!(
                "{plain} -m recent --name {sep} --set -m {proto} -p {proto} -j DNAT --to-destination {addr}"
            ));
        } else {
            out.add(format_args!(
                "{plain} -m {proto} -p {proto} -j DNAT --to-destination {addr}"
            ));
        }
    }
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

/// A reachable endpoint's `ip:port` and KUBE-SEP- chain.
#[derive(Clone)]
struct EndpointText {
    addr: String,
    chain: String,
}

impl EndpointText {
    fn ip(&self) -> &str {
        self.addr.rsplit_once(':').map_or(&self.addr, |(ip, _)| ip)
    }
}

/// A Service chain's jumps to its endpoints: affinity first, then random load balancing with
/// kube-proxy's probabilities (1/n, 1/(n-1), ..., the last one unconditional).
struct EndpointJumps<'a> {
    name: &'a str,
    affinity: Option<u32>,
    /// By index in the port's endpoints; set for every reachable one.
    texts: &'a [Option<EndpointText>],
}

impl EndpointJumps<'_> {
    fn text(&self, i: usize) -> &EndpointText {
        self.texts[i]
            .as_ref()
            .expect("every reachable endpoint has its text")
    }

    fn write(&self, chain: &str, eps: &[usize], nat: &mut Table) {
        let mut out = nat.open(chain);
        let name = self.name;
        if let Some(seconds) = self.affinity {
            for &i in eps {
                let EndpointText { addr, chain: sep } = self.text(i);
                out.add(format_args!(
                    "{} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}",
                    Quoted(format_args!("{name} -> {addr}"))
                ));
            }
        }
        let n = eps.len();
        for (k, &i) in eps.iter().enumerate() {
            let EndpointText { addr, chain: sep } = self.text(i);
            let comment = Quoted(format_args!("{name} -> {addr}"));
            if k + 1 < n {
                out.add(format_args!(
                    "{comment} -m statistic --mode random --probability {} -j {sep}",
                    Probability(n - k)
                ));
            } else {
                out.add(format_args!("{comment} -j {sep}"));
            }
        }
    }
}

/// 1/n with ten decimals, as kube-proxy writes the statistic match's probability. The common
/// ones are formatted once per process: float formatting was a visible part of large renders.
struct Probability(usize);

impl fmt::Display for Probability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        static COMMON: OnceLock<Vec<String>> = OnceLock::new();
        let common = COMMON.get_or_init(|| {
            (0..=256)
                .map(|n| format!("{:.10}", 1.0 / n as f64))
                .collect()
        });
        match common.get(self.0) {
            Some(text) => f.write_str(text),
            None => write!(f, "{:.10}", 1.0 / self.0 as f64),
        }
    }
}

/// The iptables-restore input that turns `before` (what the kernel holds; `None`: unknown,
/// write everything) into `after`, nat table first. Chains whose rules are unchanged are left
/// out; chains that are gone are flushed and deleted (`existing` adds stale chains found in the
/// kernel). A table with nothing to change is left out entirely; an empty string means nothing
/// to do.
pub fn payload(
    before: Option<&Ruleset>,
    after: &Ruleset,
    existing: &BTreeMap<&'static str, BTreeSet<String>>,
) -> String {
    let mut out = String::new();
    // iptables-restore commits table by table. nat goes first: it holds nearly every rule, so
    // a payload the kernel refuses there changes nothing at all.
    for (table, old, new) in [
        ("nat", before.map(|b| &b.nat), &after.nat),
        ("filter", before.map(|b| &b.filter), &after.filter),
    ] {
        let mut changed: Vec<(&String, &String)> = new
            .chains
            .iter()
            .filter(|(name, rules)| old.and_then(|o| o.chains.get(*name)) != Some(*rules))
            .collect();
        let mut gone: BTreeSet<&String> = old
            .map(|o| {
                o.chains
                    .keys()
                    .filter(|c| !new.chains.contains_key(*c))
                    .collect()
            })
            .unwrap_or_default();
        if table == "nat" {
            port_changes(before, after, &mut changed, &mut gone);
        }
        // Service chains in the kernel that the ruleset lacks. The set of the ruleset's chain
        // names is built only when the kernel has service chains at all (not on a fresh node).
        if let Some(existing) = existing.get(table) {
            let mut found = existing.iter().filter(|c| is_service_chain(c)).peekable();
            if found.peek().is_some() {
                let ours = after.chain_names(table);
                gone.extend(found.filter(|c| !ours.contains(c.as_str())));
            }
        }
        if changed.is_empty() && gone.is_empty() {
            continue;
        }
        changed.sort_unstable_by(|a, b| a.0.cmp(b.0));
        // One allocation for what follows: a full payload runs to tens of megabytes.
        let size: usize = changed
            .iter()
            .map(|(n, rules)| n.len() + 10 + rules.len())
            .sum::<usize>()
            + gone.iter().map(|n| 2 * n.len() + 14).sum::<usize>();
        out.reserve(size + 32);
        let _ = writeln!(out, "*{table}");
        for (name, _) in &changed {
            let _ = writeln!(out, ":{name} - [0:0]");
        }
        for name in &gone {
            let _ = writeln!(out, ":{name} - [0:0]");
        }
        for (_, rules) in &changed {
            out.push_str(rules);
        }
        for name in &gone {
            let _ = writeln!(out, "-X {name}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The own chains of ports that are new, changed or gone. A port whose rules are the same
/// `Arc` as before (the render cache kept it) is skipped without looking at its rules.
fn port_changes<'a>(
    before: Option<&'a Ruleset>,
    after: &'a Ruleset,
    changed: &mut Vec<(&'a String, &'a String)>,
    gone: &mut BTreeSet<&'a String>,
) {
    for (spn, port) in &after.ports {
        let Some(old) = before.and_then(|b| b.ports.get(spn)) else {
            changed.extend(port.own.chains.iter());
            continue;
        };
        if Arc::ptr_eq(old, port) || old.own == port.own {
            continue;
        }
        changed.extend(
            port.own
                .chains
                .iter()
                .filter(|(name, rules)| old.own.chains.get(*name) != Some(*rules)),
        );
        gone.extend(
            old.own
                .chains
                .keys()
                .filter(|c| !port.own.chains.contains_key(*c)),
        );
    }
    if let Some(b) = before {
        for (spn, port) in &b.ports {
            if !after.ports.contains_key(spn) {
                gone.extend(port.own.chains.keys());
            }
        }
    }
}

impl Ruleset {
    /// Every chain of `table` in this ruleset (per-port chains are nat chains).
    fn chain_names(&self, table: &str) -> HashSet<&str> {
        match table {
            "filter" => self.filter.chains.keys().map(String::as_str).collect(),
            _ => self
                .nat
                .chains
                .keys()
                .chain(self.ports.values().flat_map(|p| p.own.chains.keys()))
                .map(String::as_str)
                .collect(),
        }
    }
}

/// `rsdn proxy render`: the full payload for a configuration and its cluster directory, and
/// the jumps as comments. Skipped objects are listed as comments too.
pub fn render_config(config: &crate::config::NodeConfig) -> Result<String, String> {
    let scope = crate::model::ModelScope {
        cluster_network: config.cluster_network,
        local_node: config.node_name.clone(),
        programmed: Default::default(),
    };
    let crate::config::SourceConfig::Dir(dir) = &config.source else {
        return Err("rsdn proxy render reads a cluster directory: set --cluster-dir".into());
    };
    let model = crate::source::dir::read_cluster_dir(dir, &scope)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let node_ip = config
        .node_ip
        .or_else(|| model.nodes.get(&config.node_name).map(|n| n.ip))
        .ok_or_else(|| {
            format!(
                "Node/{} is not in {} and --node-ip is not set",
                config.node_name,
                dir.display()
            )
        })?;
    let scope = ProxyScope {
        cluster_network: config.cluster_network,
        service_network: config.service_network,
        masquerade_bit: config.masquerade_bit,
        node_name: config.node_name.clone(),
        node_ip,
        proxy: config.proxy,
    };
    let (ruleset, _) = render(&scope, &model.services);
    let mut out = String::new();
    for s in &model.skipped {
        let _ = writeln!(out, "# skipped {}: {}", s.object, s.reason);
    }
    out.push_str(&payload(None, &ruleset, &BTreeMap::new()));
    out.push_str("# jumps from the built-in chains (ensured with iptables -C / -I / -A):\n");
    for j in jumps(&scope) {
        let op = if j.first { "-I" } else { "-A" };
        let _ = writeln!(out, "# -t {} {op} {} {}", j.table, j.chain, j.rule);
    }
    Ok(out)
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
