//! NetworkPolicy as chains and sets in the filter table, for the pods of one node: ingress is
//! enforced on the destination's node, egress on the source's.
//!
//! ```text
//! FORWARD -m conntrack --ctstate NEW -j RSDN-POLICY          (replies are never judged)
//! RSDN-POLICY   -m set --match-set RSDN-ISOLATED-INGRESS dst -j RSDN-INGRESS
//!               -m set --match-set RSDN-ISOLATED-EGRESS src  -j RSDN-EGRESS
//! RSDN-INGRESS  -d <pod> -j RSDN-PI-<pod>                      (one per isolated local pod)
//! RSDN-PI-<pod> -j MARK --set-xmark 0x0/0x20000
//!               -j RSDN-NI-<policy>; -m mark --mark 0x20000/0x20000 -j RETURN   (per policy)
//!               -j RSDN-DENY-INGRESS                           (nothing allowed it: DROP)
//! RSDN-NI-<policy>  <peer set> <ports> -j MARK --or-mark 0x20000   (per peer and port of a rule)
//! ```
//! A pod no policy selects costs one set lookup per direction. Peers are ipsets (pods: hash:ip;
//! ipBlocks: hash:net with `nomatch` for `except`; named ports: hash:ip,port), named by what
//! they stand for, so that a pod coming, going or being relabelled changes set members and not
//! chains, and policies with the same peer share its set.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use super::select::{self, named, Membership};
use crate::model::pod::NamedPort;
use crate::model::policy::{Peer, Policy, PortMatch, PortSpec, Rule};
use crate::model::service::Protocol;
use crate::model::{ClusterModel, Pod};
use crate::netfilter::ruleset::{hash16, Quoted, Ruleset, Table, Tables};
use crate::netfilter::sets::{IpSet, SetKind};

pub const PRODUCER: &str = "policy";
pub const RSDN_POLICY: &str = "RSDN-POLICY";
pub const RSDN_INGRESS: &str = "RSDN-INGRESS";
pub const RSDN_EGRESS: &str = "RSDN-EGRESS";
/// Where denied packets go: one DROP rule per direction, whose counters say how many.
pub const DENY_INGRESS: &str = "RSDN-DENY-INGRESS";
pub const DENY_EGRESS: &str = "RSDN-DENY-EGRESS";
pub const ISOLATED_INGRESS: &str = "RSDN-ISOLATED-INGRESS";
pub const ISOLATED_EGRESS: &str = "RSDN-ISOLATED-EGRESS";
/// The packet mark bit a policy sets when it allows a packet (`config::POLICY_MARK_BIT`; cleared
/// before each pod's turn; kube-proxy uses bits 14 and 15, OpenShift SDN's masquerade bit 0).
pub const MARK: &str = "0x20000";

/// Prefixes of the chains named per pod and per policy.
pub const PER_POD: [&str; 2] = ["RSDN-PI-", "RSDN-PE-"];
pub const PER_POLICY: [&str; 2] = ["RSDN-NI-", "RSDN-NE-"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// Which end of a packet a peer is at.
    fn peer_end(self) -> &'static str {
        match self {
            Direction::Ingress => "src",
            Direction::Egress => "dst",
        }
    }

    /// Which end of a packet the policy's own pod is at.
    fn own_end(self) -> &'static str {
        match self {
            Direction::Ingress => "dst",
            Direction::Egress => "src",
        }
    }

    fn rules(self, p: &Policy) -> Option<&Vec<Rule>> {
        match self {
            Direction::Ingress => p.ingress.as_ref(),
            Direction::Egress => p.egress.as_ref(),
        }
    }

    fn pod_chain(self, pod: &Pod) -> String {
        let prefix = match self {
            Direction::Ingress => PER_POD[0],
            Direction::Egress => PER_POD[1],
        };
        format!("{prefix}{}", hash16(&[&pod.namespace, "/", &pod.name]))
    }

    fn policy_chain(self, p: &Policy) -> String {
        let prefix = match self {
            Direction::Ingress => PER_POLICY[0],
            Direction::Egress => PER_POLICY[1],
        };
        format!("{prefix}{}", hash16(&[&p.namespace, "/", &p.name]))
    }
}

/// What the metrics report about a render.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub policies: usize,
    pub isolated_ingress: usize,
    pub isolated_egress: usize,
    pub sets: usize,
}

/// A comment that fits iptables' 256 bytes.
fn comment(text: &str) -> Quoted<String> {
    // Names and labels from a hand-written directory are not validated by an API server: a
    // quote or backslash in them would end the comment and break the whole restore.
    let clean: String = text
        .chars()
        .map(|c| {
            if matches!(c, '"' | '\\') || c.is_control() {
                '?'
            } else {
                c
            }
        })
        .collect();
    let mut end = clean.len().min(200);
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    Quoted(clean[..end].to_string())
}

/// Where a set's members come from.
#[derive(Debug)]
enum SetSource {
    /// Made with the chain: an ipBlock's networks, or the (pod, port) pairs of this node's pods
    /// for an ingress named port.
    Made(Arc<IpSet>),
    /// The member cache's, over every pod.
    Pods(Membership),
}

/// The sets a policy's chain matches, by name (the same members under the same name: policies
/// with the same peer share its set), and where their members come from.
type SetRefs = Vec<(String, SetSource)>;

/// Names a set and notes where its members come from; returns the name.
fn set_ref(
    refs: &mut SetRefs,
    prefix: &str,
    key: &str,
    source: impl FnOnce() -> SetSource,
) -> String {
    let name = format!("{prefix}{}", hash16(&[key]));
    if !refs.iter().any(|(n, _)| *n == name) {
        refs.push((name.clone(), source()));
    }
    name
}

/// The set matching a peer's addresses.
fn peer_set(peer: &Peer, refs: &mut SetRefs) -> String {
    match peer {
        Peer::Pods { .. } => set_ref(refs, "RSDN-P-", &format!("{peer:?}"), || {
            SetSource::Pods(Membership::Peer(peer.clone()))
        }),
        Peer::Block { cidr, except } => set_ref(refs, "RSDN-B-", &format!("{peer:?}"), || {
            let mut s = IpSet::new(SetKind::HashNet);
            s.add_net(*cidr, false);
            for e in except {
                s.add_net(*e, true);
            }
            SetSource::Made(Arc::new(s))
        }),
    }
}

fn port_match(m: &PortMatch) -> String {
    let proto = m.protocol.as_str();
    match &m.port {
        PortSpec::Any => format!("-p {proto}"),
        PortSpec::Range(a, b) if a == b => format!("-p {proto} -m {proto} --dport {a}"),
        PortSpec::Range(a, b) => format!("-p {proto} -m {proto} --dport {a}:{b}"),
        PortSpec::Named(_) => unreachable!("named ports are matched by set"),
    }
}

fn port_desc(m: &PortMatch) -> String {
    let proto = m.protocol.as_str().to_uppercase();
    match &m.port {
        PortSpec::Any => proto,
        PortSpec::Range(a, b) if a == b => format!("{proto} {a}"),
        PortSpec::Range(a, b) => format!("{proto} {a}-{b}"),
        PortSpec::Named(n) => format!("{proto} {n}"),
    }
}

fn member(ip: std::net::Ipv4Addr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", protocol.as_str())
}

/// The policies selecting a pod for one direction, in order.
type Selecting<'a> = Vec<(&'a (String, String), &'a Arc<Policy>)>;

/// What one render keeps for the next: the sets' members, and each isolated pod's chains, so
/// that a render after a change elsewhere (a remote pod relabelled) reuses them, unchanged
/// `Arc`s the engine's diff passes over at once.
#[derive(Debug, Default)]
pub struct Cache {
    members: select::Cache,
    /// Per direction (ingress, egress), by pod key.
    pod_chains: [std::collections::HashMap<(String, String), PodChain>; 2],
    /// Per direction, by policy key.
    policy_chains: [std::collections::HashMap<(String, String), PolicyChain>; 2],
    renders: u64,
}

/// A policy's chain for one direction and the sets it matches, with what they were made from.
#[derive(Debug)]
struct PolicyChain {
    policy: Arc<Policy>,
    /// When an ingress rule names a port: the policy's pods on this node, with their ports (the
    /// numbers the names stand for are in its sets). Empty otherwise.
    local: Vec<(std::net::Ipv4Addr, Vec<NamedPort>)>,
    tables: Arc<Tables>,
    sets: Arc<SetRefs>,
    used: u64,
}

/// A pod's chain for one direction, and the policies it was made from (all that it depends
/// on, with the pod's name).
#[derive(Debug)]
struct PodChain {
    policies: Vec<(String, String)>,
    name: String,
    tables: Arc<Tables>,
    /// The render that used it last (the others are dropped after each render).
    used: u64,
}

impl Cache {
    /// The chain of a policy for `dir` and the sets it matches, from the cache when the policy
    /// is the same (and, for an ingress named port, its local pods' ports are).
    fn policy_chain(
        &mut self,
        dir: Direction,
        key: &(String, String),
        policy: &Arc<Policy>,
        local: &[&Pod],
    ) -> (Arc<Tables>, Arc<SetRefs>) {
        let names_ports = dir == Direction::Ingress
            && dir
                .rules(policy)
                .into_iter()
                .flatten()
                .any(|r| select::has_named(&r.ports));
        let local_ports: Vec<(std::net::Ipv4Addr, Vec<NamedPort>)> = if names_ports {
            local.iter().map(|p| (p.ip, p.ports.clone())).collect()
        } else {
            Vec::new()
        };
        let chains = &mut self.policy_chains[dir as usize];
        if let Some(c) = chains.get_mut(key) {
            if c.policy == *policy && c.local == local_ports {
                c.used = self.renders;
                return (Arc::clone(&c.tables), Arc::clone(&c.sets));
            }
        }
        let (filter, refs) = policy_chain(policy, dir, local);
        let tables = Arc::new(Tables {
            filter,
            ..Default::default()
        });
        let sets = Arc::new(refs);
        chains.insert(
            key.clone(),
            PolicyChain {
                policy: Arc::clone(policy),
                local: local_ports,
                tables: Arc::clone(&tables),
                sets: Arc::clone(&sets),
                used: self.renders,
            },
        );
        (tables, sets)
    }

    /// The chain of a pod for `dir`, from the cache when the same policies select it.
    fn pod_chain(
        &mut self,
        dir: Direction,
        key: &(String, String),
        pod: &Pod,
        policies: &Selecting,
        deny: &str,
    ) -> (String, Arc<Tables>) {
        let chains = &mut self.pod_chains[dir as usize];
        if let Some(c) = chains.get_mut(key) {
            if c.policies.iter().eq(policies.iter().map(|(k, _)| *k)) {
                c.used = self.renders;
                return (c.name.clone(), Arc::clone(&c.tables));
            }
        }
        let name = dir.pod_chain(pod);
        let mut own = Tables::default();
        let mut c = own.filter.open(&name);
        c.add(format_args!("-j MARK --set-xmark 0x0/{MARK}"));
        for (_, p) in policies.iter() {
            c.add(format_args!(
                "{} -j {}",
                comment(&format!("{}/{}", p.namespace, p.name)),
                dir.policy_chain(p)
            ));
            c.add(format_args!("-m mark --mark {MARK}/{MARK} -j RETURN"));
        }
        c.add(format_args!(
            "{} -j {deny}",
            comment(&format!(
                "{}/{}: no NetworkPolicy allows this {}",
                pod.namespace,
                pod.name,
                dir.name()
            ))
        ));
        let tables = Arc::new(own);
        chains.insert(
            key.clone(),
            PodChain {
                policies: policies.iter().map(|(k, _)| (*k).clone()).collect(),
                name: name.clone(),
                tables: Arc::clone(&tables),
                used: self.renders,
            },
        );
        (name, tables)
    }
}

/// One policy's chain for one direction: a MARK rule per (peer, port) of every rule; and the
/// sets it matches. `local` are the policy's pods on this node.
fn policy_chain(policy: &Policy, dir: Direction, local: &[&Pod]) -> (Table, SetRefs) {
    let mut t = Table::default();
    let mut refs = SetRefs::new();
    let chain = dir.policy_chain(policy);
    t.chain(&chain);
    let who = format!("{}/{}", policy.namespace, policy.name);
    let end = dir.peer_end();
    for rule in dir.rules(policy).into_iter().flatten() {
        let what = format!("{who} {} rule {}", dir.name(), rule.index);
        let numbered: Vec<&PortMatch> = rule
            .ports
            .iter()
            .filter(|p| !matches!(p.port, PortSpec::Named(_)))
            .collect();
        // Peers (None is everyone), as sets: needed unless every port is an egress named port,
        // whose set holds the peers already.
        let peer_sets_needed = rule.ports.is_empty()
            || !numbered.is_empty()
            || (dir == Direction::Ingress && numbered.len() < rule.ports.len());
        let peers: Vec<(String, Option<String>)> = match &rule.peers {
            None => vec![("anyone".into(), None)],
            Some(list) if peer_sets_needed => list
                .iter()
                .map(|p| {
                    let s = peer_set(p, &mut refs);
                    (p.to_string(), Some(format!("-m set --match-set {s} {end}")))
                })
                .collect(),
            Some(list) => list.iter().map(|p| (p.to_string(), None)).collect(),
        };
        let mut out = t.open(&chain);
        if rule.ports.is_empty() || !numbered.is_empty() {
            let ports: Vec<(String, Option<String>)> = if rule.ports.is_empty() {
                vec![("every port".into(), None)]
            } else {
                numbered
                    .iter()
                    .map(|m| (port_desc(m), Some(port_match(m))))
                    .collect()
            };
            for (pd, pm) in &peers {
                for (qd, qm) in &ports {
                    let mut args = format!("{}", comment(&format!("{what}: {pd}, {qd}")));
                    for m in [pm, qm].into_iter().flatten() {
                        let _ = write!(args, " {m}");
                    }
                    out.add(format_args!("{args} -j MARK --or-mark {MARK}"));
                }
            }
        }
        for m in rule
            .ports
            .iter()
            .filter(|p| matches!(p.port, PortSpec::Named(_)))
        {
            let PortSpec::Named(name) = &m.port else {
                continue;
            };
            match dir {
                // The selected pod's own number for the name: a set of (pod, port) of the
                // policy's local pods, matched on the destination, with each peer.
                Direction::Ingress => {
                    let key = format!("{who} in {name} {}", m.protocol.as_str());
                    let s = set_ref(&mut refs, "RSDN-N-", &key, || {
                        let mut s = IpSet::new(SetKind::HashIpPort);
                        for (ip, proto, port) in named(local.iter().copied(), name, m.protocol) {
                            s.members.insert(member(ip, proto, port));
                        }
                        SetSource::Made(Arc::new(s))
                    });
                    for (pd, pm) in &peers {
                        let mut args =
                            format!("{}", comment(&format!("{what}: {pd}, {}", port_desc(m))));
                        if let Some(pm) = pm {
                            let _ = write!(args, " {pm}");
                        }
                        out.add(format_args!(
                            "{args} -m set --match-set {s} dst,dst -j MARK --or-mark {MARK}"
                        ));
                    }
                }
                // The peer's number for the name: one set of (peer pod, port) for the rule's
                // peers together.
                Direction::Egress => {
                    let key = format!("{:?} {name} {}", rule.peers, m.protocol.as_str());
                    let s = set_ref(&mut refs, "RSDN-N-", &key, || {
                        SetSource::Pods(Membership::Named {
                            peers: rule.peers.clone(),
                            name: name.clone(),
                            protocol: m.protocol,
                        })
                    });
                    let peers_desc = peers
                        .iter()
                        .map(|(d, _)| d.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ");
                    out.add(format_args!(
                        "{} -m set --match-set {s} dst,dst -j MARK --or-mark {MARK}",
                        comment(&format!("{what}: {peers_desc}, {}", port_desc(m)))
                    ));
                }
            }
        }
    }
    (t, refs)
}

/// Every chain and set NetworkPolicy needs on `node`.
pub fn render(model: &Arc<ClusterModel>, node: &str) -> (Ruleset, Stats) {
    render_cached(model, node, &mut Cache::default())
}

/// `render`, with what `cache` kept from the previous render (set members, pods' and
/// policies' chains): a render after a small change costs about that change.
pub fn render_cached(model: &Arc<ClusterModel>, node: &str, cache: &mut Cache) -> (Ruleset, Stats) {
    cache.members.update(model);
    cache.renders += 1;
    let mut r = Ruleset::default();
    let mut stats = Stats {
        policies: model.policies.len(),
        ..Default::default()
    };
    // The policies that select each local pod, per direction, and each policy's local pods.
    let mut isolated: BTreeMap<(Direction, &(String, String)), Selecting> = BTreeMap::new();
    let mut local_of: BTreeMap<&(String, String), Vec<&Pod>> = BTreeMap::new();
    // This node's pods by namespace: a policy selects among its namespace's.
    type Keyed<'a> = Vec<(&'a (String, String), &'a Pod)>;
    let mut local_pods: BTreeMap<&str, Keyed> = BTreeMap::new();
    for (key, pod) in model.pods.iter().filter(|(_, p)| p.node == node) {
        local_pods.entry(&key.0).or_default().push((key, pod));
    }
    for (pkey, policy) in &model.policies {
        let candidates = local_pods.get(policy.namespace.as_str());
        for (key, pod) in candidates
            .into_iter()
            .flatten()
            .filter(|(_, p)| policy.pod_selector.matches(&p.labels))
        {
            local_of.entry(pkey).or_default().push(pod);
            for dir in [Direction::Ingress, Direction::Egress] {
                if dir.rules(policy).is_some() {
                    isolated.entry((dir, key)).or_default().push((pkey, policy));
                }
            }
        }
    }
    r.tables.filter.chain(RSDN_POLICY);
    for (dir, chain, deny, set_name) in [
        (
            Direction::Ingress,
            RSDN_INGRESS,
            DENY_INGRESS,
            ISOLATED_INGRESS,
        ),
        (Direction::Egress, RSDN_EGRESS, DENY_EGRESS, ISOLATED_EGRESS),
    ] {
        r.tables.filter.add(
            deny,
            format_args!(
                "{} -j DROP",
                comment(&format!("no NetworkPolicy allows this {}", dir.name()))
            ),
        );
        let pods: Vec<(&(String, String), &Pod, &Selecting)> = isolated
            .iter()
            .filter(|((d, _), _)| *d == dir)
            .map(|((_, key), policies)| (*key, &*model.pods[*key], policies))
            .collect();
        match dir {
            Direction::Ingress => stats.isolated_ingress = pods.len(),
            Direction::Egress => stats.isolated_egress = pods.len(),
        }
        if pods.is_empty() {
            continue;
        }
        let mut members = IpSet::new(SetKind::HashIp);
        r.tables.filter.chain(chain);
        for (key, pod, policies) in &pods {
            members.members.insert(pod.ip.to_string());
            let end = if dir == Direction::Ingress {
                "-d"
            } else {
                "-s"
            };
            let (pod_chain, own) = cache.pod_chain(dir, key, pod, policies, deny);
            r.tables.filter.add(
                chain,
                format_args!(
                    "{} {end} {} -j {pod_chain}",
                    comment(&format!("{}/{}", pod.namespace, pod.name)),
                    pod.ip
                ),
            );
            r.groups.insert(
                (
                    PRODUCER,
                    format!("{} {}/{}", dir.name(), pod.namespace, pod.name),
                ),
                own,
            );
        }
        r.tables.filter.add(
            RSDN_POLICY,
            format_args!(
                "{} -m set --match-set {set_name} {} -j {chain}",
                comment(&format!("pods isolated for {}", dir.name())),
                dir.own_end()
            ),
        );
        r.sets.insert(set_name.to_string(), Arc::new(members));
    }
    // One chain per policy and direction that selects local pods.
    let mut done: BTreeSet<(Direction, &(String, String))> = BTreeSet::new();
    for ((dir, _), policies) in &isolated {
        for (pkey, p) in policies {
            if !done.insert((*dir, pkey)) {
                continue;
            }
            let local = local_of.get(pkey).cloned().unwrap_or_default();
            let (own, refs) = cache.policy_chain(*dir, pkey, p, &local);
            for (name, source) in refs.iter() {
                if !r.sets.contains_key(name) {
                    let set = match source {
                        SetSource::Made(s) => Arc::clone(s),
                        SetSource::Pods(m) => cache.members.set(model, m),
                    };
                    r.sets.insert(name.clone(), set);
                }
            }
            r.groups.insert(
                (
                    PRODUCER,
                    format!("policy {} {}/{}", dir.name(), p.namespace, p.name),
                ),
                own,
            );
        }
    }
    stats.sets = r.sets.len();
    let now = cache.renders;
    for chains in &mut cache.pod_chains {
        chains.retain(|_, c| c.used == now);
    }
    for chains in &mut cache.policy_chains {
        chains.retain(|_, c| c.used == now);
    }
    (r, stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelBuilder, ModelScope};
    use crate::netfilter::payload::{payload, Context, Scope};

    fn model(yaml: &str) -> ClusterModel {
        let mut b = ModelBuilder::default();
        crate::source::dir::add_documents(&mut b, "test.yaml", yaml);
        let m = b.finish(&ModelScope {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            local_node: "n1".into(),
            programmed: Default::default(),
        });
        assert!(m.skipped.is_empty(), "{:?}", m.skipped);
        m
    }

    /// The chains as restore input, then each set with its members.
    fn text(r: &Ruleset) -> String {
        let mut out = payload(None, r, Scope::Full, Context::default()).text;
        for (name, set) in &r.sets {
            let _ = writeln!(out, "set {name} {}", set.kind.as_str());
            for m in &set.members {
                let _ = writeln!(out, "  {m}");
            }
        }
        out
    }

    #[test]
    fn what_a_render_keeps_gives_what_a_fresh_render_gives() {
        let base = include_str!("testdata/cluster.yaml");
        // A peer member relabelled out and in, a pod added and removed, a namespace relabelled.
        let steps = [
            base.to_string(),
            base.replace("name: b, namespace: y, labels: {pod: b}", "name: b, namespace: y, labels: {pod: z}"),
            base.replace("metadata: {name: y, labels: {team: red}}", "metadata: {name: y, labels: {team: blue}}"),
            base.replace("name: b, namespace: x, labels: {pod: b}", "name: b, namespace: x, labels: {pod: q}"),
            format!("{base}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: c, namespace: y, labels: {{pod: c}}}}\nspec: {{nodeName: n2, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: 10.128.2.30}}\n"),
            base.replace("podIP: 10.128.2.20", "podIP: 10.128.2.21"),
            base.to_string(),
            // A local pod leaves two policies' selection (its chains change), a policy is
            // renamed, then both come back: kept chains must follow.
            base.replace("name: a, namespace: x, labels: {pod: a}", "name: a, namespace: x, labels: {pod: z}"),
            base.replace("metadata: {name: allow-a, namespace: x}", "metadata: {name: allow-q, namespace: x}"),
            base.to_string(),
            // A policy changed under its name; a local pod's named port moves to another number.
            base.replace("    ports: [{port: 80}]", "    ports: [{port: 8080}]"),
            base.replace("containerPort: 81, protocol: UDP", "containerPort: 82, protocol: UDP"),
            base.to_string(),
            // y/c gets y/b's address while y/b, terminating, still has it; then y/b goes.
            format!("{base}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: c, namespace: y, labels: {{pod: c}}}}\nspec: {{nodeName: n2, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: 10.128.2.20}}\n"),
            format!("{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: c, namespace: y, labels: {{pod: c}}}}\nspec: {{nodeName: n2, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: 10.128.2.20}}\n", base.replace("podIP: 10.128.2.20", "podIP: 10.128.2.99").replace("name: b, namespace: y", "name: gone, namespace: y")),
        ];
        let mut cache = Cache::default();
        for (i, yaml) in steps.iter().enumerate() {
            let m = Arc::new(model(yaml));
            let (kept, _) = render_cached(&m, "n1", &mut cache);
            let (fresh, _) = render(&m, "n1");
            assert_eq!(text(&kept), text(&fresh), "step {i}");
        }
    }

    /// Renders `yaml` for n1 and compares it with `want`, line by line (what it got is
    /// written to /tmp/policy-NAME.golden for review).
    fn golden(name: &str, yaml: &str, want: &str) -> Stats {
        let (r, stats) = render(&Arc::new(model(yaml)), "n1");
        let got = text(&r);
        if got != want {
            std::fs::write(format!("/tmp/policy-{name}.golden"), &got).unwrap();
            for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
                assert_eq!(g, w, "{name}: line {}", i + 1);
            }
            assert_eq!(got.lines().count(), want.lines().count(), "{got}");
            assert_eq!(got, want, "{name}: line endings");
        }
        stats
    }

    #[test]
    fn the_chains_and_sets_match_the_golden_file() {
        let stats = golden(
            "cluster",
            include_str!("testdata/cluster.yaml"),
            include_str!("testdata/cluster.golden"),
        );
        assert_eq!(
            (
                stats.isolated_ingress,
                stats.isolated_egress,
                stats.policies
            ),
            (2, 1, 3)
        );
    }

    /// The forms of the API one by one (wide.yaml says which policy shows which): an empty
    /// rule, AND and OR of peers, named and SCTP ports, DNS without a peer, a range to a block
    /// with holes, both directions with nothing allowed, a policy of another node's pod, a
    /// finished pod, egress to the peers' named port.
    #[test]
    fn a_wider_set_matches_its_golden_file() {
        let stats = golden(
            "wide",
            include_str!("testdata/wide.yaml"),
            include_str!("testdata/wide.golden"),
        );
        assert_eq!(
            (
                stats.isolated_ingress,
                stats.isolated_egress,
                stats.policies
            ),
            (3, 3, 6)
        );
    }
}
