//! The ruleset as data: a pure function of (configuration, node, Service ports, endpoints) that
//! yields every chain rsdn owns in the nat and filter tables with its rules, in the shape
//! kube-proxy's iptables mode builds (same chain names, comments, matches and order), plus our
//! own egress masquerade and forward chains. `payload` turns two rulesets into the
//! iptables-restore input that moves the kernel from one to the other.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::model::{Endpoint, ServicePort, ServicePortName, Services};
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

    /// Appends `-A chain <args>`.
    fn add(&mut self, chain: &str, args: impl AsRef<str>) {
        let body = self.chain(chain);
        for part in ["-A ", chain, " ", args.as_ref(), "\n"] {
            body.push_str(part);
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

/// `-m comment --comment ...`, quoted when it has spaces.
fn comment(text: &str) -> String {
    if text.contains(' ') {
        format!("-m comment --comment \"{text}\"")
    } else {
        format!("-m comment --comment {text}")
    }
}

pub fn jumps(scope: &ProxyScope) -> Vec<Jump> {
    let j = |table, chain, extra: &str, text: &str, target: &str, first| Jump {
        table,
        chain,
        rule: format!("{extra}{} -j {target}", comment(text)),
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
struct Categorized<'a> {
    cluster: Vec<&'a Endpoint>,
    local: Vec<&'a Endpoint>,
    /// Endpoints some chain may jump to: each gets a KUBE-SEP- chain.
    reachable: Vec<&'a Endpoint>,
    any: bool,
}

fn categorize<'a>(eps: &'a [Endpoint], svc: &ServicePort, node: &str) -> Categorized<'a> {
    let local = |e: &Endpoint| e.node.as_deref() == Some(node);
    let draining = |e: &Endpoint| e.serving && e.terminating;
    let mut c = Categorized {
        cluster: vec![],
        local: vec![],
        reachable: vec![],
        any: false,
    };
    if svc.uses_cluster_endpoints() {
        c.cluster = eps.iter().filter(|e| e.ready).collect();
        if c.cluster.is_empty() {
            c.cluster = eps.iter().filter(|e| draining(e)).collect();
        }
        c.any = !c.cluster.is_empty();
    }
    if !svc.uses_local_endpoints() {
        c.reachable = c.cluster.clone();
        return c;
    }
    c.any |= eps.iter().any(|e| e.ready || draining(e));
    let local_ready: Vec<_> = eps.iter().filter(|e| local(e) && e.ready).collect();
    let local_fallback = local_ready.is_empty();
    c.local = if local_fallback {
        eps.iter().filter(|e| local(e) && draining(e)).collect()
    } else {
        local_ready
    };
    if !svc.uses_cluster_endpoints() {
        c.reachable = c.local.clone();
    } else if !local_fallback {
        c.reachable = c.cluster.clone();
    } else {
        let mut seen = BTreeSet::new();
        c.reachable = c
            .cluster
            .iter()
            .chain(c.local.iter())
            .filter(|e| seen.insert(e.to_string()))
            .copied()
            .collect();
        c.reachable.sort_by_key(|e| e.to_string());
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
        format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
    );
    // Clear the bit so a packet that traverses the stack again is not masqueraded twice.
    r.nat
        .add(KUBE_POSTROUTING, format!("-j MARK --xor-mark {mark}"));
    r.nat.add(
        KUBE_POSTROUTING,
        format!(
            "{} -j MASQUERADE --random-fully",
            comment("kubernetes service traffic requiring SNAT")
        ),
    );
    r.nat
        .add(KUBE_MARK_MASQ, format!("-j MARK --or-mark {mark}"));

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
        format!(
            "{} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j {KUBE_NODEPORTS}",
            comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
        ),
    );
    // Without nf_conntrack_tcp_be_liberal, out-of-window packets would otherwise reach pods
    // un-NATed and get reset (kubernetes#74839).
    r.filter
        .add(KUBE_FORWARD, "-m conntrack --ctstate INVALID -j DROP");
    r.filter.add(
        KUBE_FORWARD,
        format!(
            "{} -m mark --mark {mark}/{mark} -j ACCEPT",
            comment("kubernetes forwarding rules")
        ),
    );
    r.filter.add(
        KUBE_FORWARD,
        format!(
            "{} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            comment("kubernetes forwarding conntrack rule")
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
    r.nat.add(RSDN_MASQUERADE, format!("! -s {cn} -j RETURN"));
    r.nat.add(
        RSDN_MASQUERADE,
        format!(
            "-d {cn} {} -j RETURN",
            comment("pod to pod keeps its address")
        ),
    );
    r.nat.add(RSDN_MASQUERADE, format!("-d {sn} -j RETURN"));
    r.nat.add(
        RSDN_MASQUERADE,
        format!(
            "{} -j MASQUERADE --random-fully",
            comment("pod traffic leaving the cluster network")
        ),
    );
    r.filter.add(RSDN_FORWARD, format!("-s {cn} -j ACCEPT"));
    r.filter.add(RSDN_FORWARD, format!("-d {cn} -j ACCEPT"));
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

    let no_endpoints = format!("{name} has no endpoints");
    let no_local = format!("{name} has no local endpoints");
    let (internal_filter, external_filter) = if !c.any {
        (("REJECT", &no_endpoints), ("REJECT", &no_endpoints))
    } else {
        (("DROP", &no_local), ("DROP", &no_local))
    };
    if c.any && !has_internal {
        stats.no_local_endpoints_internal += 1;
    }
    if c.any && !has_external {
        stats.no_local_endpoints_external += 1;
    }

    let dst = |ip: Ipv4Addr, port: u16| format!("-m {proto} -p {proto} -d {ip} --dport {port}");
    let cluster_ip = dst(svc.cluster_ip, svc.port);

    // Capture the cluster IP.
    if has_internal {
        r.nat.add(
            KUBE_SERVICES,
            format!(
                "{} {cluster_ip} -j {internal_chain}",
                comment(&format!("{name} cluster IP"))
            ),
        );
    } else {
        let (target, text) = internal_filter;
        r.filter.add(
            KUBE_SERVICES,
            format!("{} {cluster_ip} -j {target}", comment(text)),
        );
    }
    // External IPs.
    for ip in &svc.external_ips {
        if c.any {
            r.nat.add(
                KUBE_SERVICES,
                format!(
                    "{} {} -j {}",
                    comment(&format!("{name} external IP")),
                    dst(*ip, svc.port),
                    chains.external
                ),
            );
        }
        if !has_external {
            let (target, text) = external_filter;
            r.filter.add(
                KUBE_EXTERNAL_SERVICES,
                format!("{} {} -j {target}", comment(text), dst(*ip, svc.port)),
            );
        }
    }
    // Load-balancer IPs.
    for ip in &svc.load_balancer_ips {
        if c.any {
            r.nat.add(
                KUBE_SERVICES,
                format!(
                    "{} {} -j {lb_chain}",
                    comment(&format!("{name} loadbalancer IP")),
                    dst(*ip, svc.port)
                ),
            );
        }
        if uses_fw_chain {
            r.filter.add(
                KUBE_PROXY_FIREWALL,
                format!(
                    "{} {} -j DROP",
                    comment(&format!(
                        "{name} traffic not accepted by {}",
                        chains.firewall
                    )),
                    dst(*ip, svc.port)
                ),
            );
        }
    }
    if !has_external {
        let (target, text) = external_filter;
        for ip in &svc.load_balancer_ips {
            r.filter.add(
                KUBE_EXTERNAL_SERVICES,
                format!("{} {} -j {target}", comment(text), dst(*ip, svc.port)),
            );
        }
    }
    // NodePorts.
    if let Some(np) = svc.node_port {
        if c.any {
            r.nat.add(
                KUBE_NODEPORTS,
                format!(
                    "{} -m {proto} -p {proto} --dport {np} -j {}",
                    comment(&name),
                    chains.external
                ),
            );
        }
        if !has_external {
            let (target, text) = external_filter;
            r.filter.add(
                KUBE_EXTERNAL_SERVICES,
                format!(
                    "{} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j {target}",
                    comment(text)
                ),
            );
        }
    }

    // Internal traffic: masquerade what does not come from a pod (a node, or a host routing
    // the service network to us), since the endpoint may be on another node.
    if has_internal {
        r.nat.add(
            internal_chain,
            format!(
                "{} {cluster_ip} ! -s {} -j {KUBE_MARK_MASQ}",
                comment(&format!("{name} cluster IP")),
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
                format!(
                    "{} -j {KUBE_MARK_MASQ}",
                    comment(&format!(
                        "masquerade traffic for {name} external destinations"
                    ))
                ),
            );
        } else {
            // Pods and the node itself reach an external address of a Local Service as if
            // from outside and back in: Cluster policy, masqueraded for the node.
            r.nat.add(
                ext,
                format!(
                    "{} -s {} -j {}",
                    comment(&format!("pod traffic for {name} external destinations")),
                    scope.cluster_network,
                    chains.cluster
                ),
            );
            r.nat.add(
                ext,
                format!(
                    "{} -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}",
                    comment(&format!(
                        "masquerade LOCAL traffic for {name} external destinations"
                    ))
                ),
            );
            r.nat.add(
                ext,
                format!(
                    "{} -m addrtype --src-type LOCAL -j {}",
                    comment(&format!(
                        "route LOCAL traffic for {name} external destinations"
                    )),
                    chains.cluster
                ),
            );
        }
        if has_external {
            r.nat.add(ext, format!("-j {external_policy_chain}"));
        }
    }
    // Source ranges of load-balancer IPs.
    if uses_fw_chain {
        let fw = &chains.firewall;
        r.nat.chain(fw);
        let lb = comment(&format!("{name} loadbalancer IP"));
        let mut from_node = false;
        for range in &svc.load_balancer_source_ranges {
            r.nat
                .add(fw, format!("{lb} -s {range} -j {}", chains.external));
            from_node |= range.contains(&scope.node_ip);
        }
        // A VIP often sits on the node itself; the node's own requests then come from it.
        if from_node {
            for ip in &svc.load_balancer_ips {
                r.nat
                    .add(fw, format!("{lb} -s {ip} -j {}", chains.external));
            }
        }
        r.nat.add(
            fw,
            comment(&format!(
                "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
            )),
        );
    }
    // Each endpoint's text and chain name, computed once (hashing and formatting addresses
    // were a tenth of a large render).
    let texts: HashMap<(Ipv4Addr, u16), (String, String)> = c
        .reachable
        .iter()
        .map(|ep| ((ep.ip, ep.port), (ep.to_string(), endpoint_chain(spn, ep))))
        .collect();
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
    let plain = comment(&name);
    for ep in &c.reachable {
        let (text, sep) = &texts[&(ep.ip, ep.port)];
        r.nat
            .add(sep, format!("{plain} -s {} -j {KUBE_MARK_MASQ}", ep.ip));
        let recent = match svc.affinity_seconds {
            Some(_) => format!(" -m recent --name {sep} --set"),
            None => String::new(),
        };
        r.nat.add(
            sep,
            format!("{plain}{recent} -m {proto} -p {proto} -j DNAT --to-destination {text}"),
        );
    }
}

/// A Service chain's jumps to its endpoints: affinity first, then random load balancing with
/// kube-proxy's probabilities (1/n, 1/(n-1), ..., the last one unconditional).
struct EndpointJumps<'a> {
    name: &'a str,
    affinity: Option<u32>,
    /// Endpoint -> ("ip:port", KUBE-SEP- chain).
    texts: &'a HashMap<(Ipv4Addr, u16), (String, String)>,
}

impl EndpointJumps<'_> {
    fn write(&self, chain: &str, eps: &[&Endpoint], nat: &mut Table) {
        nat.chain(chain);
        let name = self.name;
        if let Some(seconds) = self.affinity {
            for ep in eps {
                let (text, sep) = &self.texts[&(ep.ip, ep.port)];
                nat.add(
                    chain,
                    format!(
                        "{} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}",
                        comment(&format!("{name} -> {text}"))
                    ),
                );
            }
        }
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let (text, sep) = &self.texts[&(ep.ip, ep.port)];
            let stat = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            nat.add(
                chain,
                format!("{}{stat} -j {sep}", comment(&format!("{name} -> {text}"))),
            );
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
        if let Some(stale) = existing.get(table) {
            let ours = after.chain_names(table);
            gone.extend(
                stale
                    .iter()
                    .filter(|c| is_service_chain(c) && !ours.contains(c.as_str())),
            );
        }
        if changed.is_empty() && gone.is_empty() {
            continue;
        }
        changed.sort_by(|a, b| a.0.cmp(b.0));
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
