//! A packet's path through the cluster, hop by hop, computed from node views (`view`): the
//! source pod's side, tun0, nat PREROUTING (or OUTPUT), the routing decision, filter FORWARD
//! (or INPUT, OUTPUT) with its NetworkPolicy verdict, nat POSTROUTING with the masquerade
//! decision, the overlay's neighbour and FDB entries, and on the next node the same again down
//! to the pod's veth. A walk that forks (a Service's endpoints) forks the path.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Serialize;

use super::rule::{Env, Packet};
use super::spec::{Place, Resolved};
use super::view::{NodeView, UNDERLAY};
use super::walk::{walk, End, Hit, Outcome};
use crate::model::{ClusterModel, Pod, ServicePort, ServicePortName};
use crate::netfilter::ruleset::TableName;
use crate::overlay::{BRIDGE, VXLAN};
use crate::policy::render::{DENY_EGRESS, DENY_INGRESS, RSDN_EGRESS, RSDN_INGRESS};

/// Whether a hop was checked against the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Computed from the model only (another node, or no kernel read).
    Predicted,
    /// The kernel agrees with the model.
    Checked,
    /// The kernel differs from the model.
    Drift,
}

/// Where the kernel differs from the model at a hop.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drift {
    pub what: String,
    pub model: Vec<String>,
    pub kernel: Vec<String>,
}

/// One hop of a path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hop {
    /// The node it happens on (None: outside any node, or inside the pod).
    pub node: Option<String>,
    /// source, tun0, nat PREROUTING, route, filter FORWARD, nat POSTROUTING, vxlan0, deliver...
    pub stage: String,
    pub summary: String,
    /// The rules the packet matched, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Hit>,
    /// Routes, entries, decisions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
    pub status: Status,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<Drift>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// What must be the same in the model and the kernel for the hop to agree.
    #[serde(skip)]
    pub facts: Vec<String>,
}

impl Hop {
    fn new(node: Option<&str>, stage: &str, summary: String) -> Hop {
        Hop {
            node: node.map(str::to_string),
            stage: stage.into(),
            summary,
            rules: vec![],
            lines: vec![],
            status: Status::Predicted,
            drift: vec![],
            notes: vec![],
            facts: vec![],
        }
    }

    fn line(mut self, l: impl Into<String>) -> Hop {
        let l = l.into();
        self.facts.push(l.clone());
        self.lines.push(l);
        self
    }
}

/// How a path ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Delivered,
    Dropped,
    Rejected,
    /// No route, no neighbour, no FDB entry, nobody at the address.
    Lost,
}

/// One way the packet can go, with its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Path {
    pub probability: f64,
    /// The endpoint a Service's DNAT chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub hops: Vec<Hop>,
    pub verdict: Verdict,
    /// Where it ends up (or where it stops).
    pub to: String,
    /// The source address and port the destination sees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the kernel does instead, where it differs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Pairs the model's and the kernel's paths: the endpoint chain entered.
    #[serde(skip)]
    pub key: String,
}

impl Path {
    /// "delivered to X, which sees the source Y" / "dropped on node1: why".
    pub fn outcome(&self) -> String {
        let what = match self.verdict {
            Verdict::Delivered => format!(
                "delivered to {}{}",
                self.to,
                self.seen_source
                    .as_ref()
                    .map(|s| format!(", which sees the source {s}"))
                    .unwrap_or_default()
            ),
            Verdict::Dropped => format!("dropped on {}", self.to),
            Verdict::Rejected => format!("rejected on {}", self.to),
            Verdict::Lost => format!("lost on {}", self.to),
        };
        match &self.reason {
            Some(r) => format!("{what}: {r}"),
            None => what,
        }
    }
}

/// How a packet comes to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// From a pod, to the gateway (routed).
    Pod,
    /// From a pod to a pod of the same bridge: bridged, seen by iptables through br_netfilter.
    Bridged,
    /// From a process of the node itself.
    Local,
    Underlay,
    Vxlan,
}

/// Gives the view of a node by name.
pub type Views<'a> = dyn Fn(&str) -> Option<&'a NodeView> + 'a;

pub struct Tracer<'a> {
    pub model: &'a ClusterModel,
    pub views: &'a Views<'a>,
    /// The entry node of traffic from outside to an address that is no node's (an external
    /// or load-balancer IP): where the network routes it.
    pub via: Option<String>,
}

/// The state a path carries from stage to stage.
#[derive(Clone)]
struct Going {
    hops: Vec<Hop>,
    probability: f64,
    key: String,
    endpoint: Option<String>,
    /// The rule that marked the packet for masquerade, where one did.
    marked_by: Option<String>,
    /// The packet's first source: a pod that gets its own packet back is a hairpin.
    origin: Ipv4Addr,
}

impl Going {
    fn end(
        self,
        verdict: Verdict,
        to: String,
        seen: Option<String>,
        reason: Option<String>,
    ) -> Path {
        Path {
            probability: self.probability,
            endpoint: self.endpoint,
            hops: self.hops,
            verdict,
            to,
            seen_source: seen,
            reason,
            kernel: None,
            key: self.key,
        }
    }
}

fn walk_on(view: &NodeView, table: TableName, chain: &str, p: Packet) -> Vec<Outcome> {
    let local = |ip| view.is_local(ip);
    let recent = |name: &str, ip| {
        view.recent
            .as_ref()
            .map(|r| r.get(name).is_some_and(|s| s.contains(&ip)))
    };
    let env = Env {
        local: &local,
        sets: &view.sets,
        recent: &recent,
    };
    walk(&view.chains, table, chain, p, &env)
}

/// Whether a hit is one of rsdn's rules (in a chain of rsdn's, or a jump into one).
fn ours(view: &NodeView, h: &Hit) -> bool {
    let Some(table) = TableName::parse(&h.table) else {
        return false;
    };
    (view.owned)(table, &h.chain) || (view.owned)(table, &h.target)
}

/// A hop of matched rules: the facts are rsdn's rules and the ending; foreign rules are noted.
fn rules_hop(view: &NodeView, stage: &str, summary: String, hits: &[Hit], end: &str) -> Hop {
    let mut hop = Hop::new(Some(&view.node.name), stage, summary);
    for h in hits {
        if ours(view, h) {
            hop.facts.push(h.key.clone());
        } else {
            hop.notes.push(format!(
                "also matches a rule that is not rsdn's: {}",
                h.rule
            ));
        }
    }
    hop.facts.push(end.to_string());
    hop.rules = hits.to_vec();
    hop
}

fn end_word(e: &End) -> String {
    match e {
        End::Policy(p) => format!("policy {p}"),
        End::Accept => "ACCEPT".into(),
        End::Drop => "DROP".into(),
        End::Reject => "REJECT".into(),
        End::Dnat(ip, Some(port)) => format!("DNAT {ip}:{port}"),
        End::Dnat(ip, None) => format!("DNAT {ip}"),
        End::Masquerade => "MASQUERADE".into(),
        End::Snat(to) => format!("SNAT {to}"),
        End::Loop => "a loop of jumps".into(),
    }
}

/// "accepted by RSDN-FORWARD", "DROP by RSDN-DENY-INGRESS", "accepted" (the policy).
fn filter_summary(o: &Outcome) -> String {
    let verdict = if o.end.passes() {
        "accepted".to_string()
    } else {
        end_word(&o.end)
    };
    let by = o
        .hits
        .last()
        .filter(|h| !o.end.passes() || h.target == "ACCEPT")
        .map(|h| format!(" by {}", h.chain))
        .unwrap_or_default();
    format!("{verdict}{by}")
}

fn addr(ip: Ipv4Addr, p: &Packet) -> String {
    if matches!(p.proto.as_str(), "tcp" | "udp" | "sctp") {
        format!("{ip}:{}", p.dport)
    } else {
        ip.to_string()
    }
}

fn source(p: &Packet) -> String {
    if matches!(p.proto.as_str(), "tcp" | "udp" | "sctp") && p.sport == 0 {
        format!("{}:(a random port)", p.src)
    } else if matches!(p.proto.as_str(), "tcp" | "udp" | "sctp") {
        format!("{}:{}", p.src, p.sport)
    } else {
        p.src.to_string()
    }
}

impl Tracer<'_> {
    fn view(&self, node: &str) -> Result<&NodeView, String> {
        (self.views)(node).ok_or_else(|| format!("node {node} is not in the model"))
    }

    fn pod_at(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.model.pods.values().find(|p| p.ip == ip).map(|p| &**p)
    }

    /// The Service a destination is, for the notes on affinity and traffic policies.
    fn service<'b>(&self, dst: &'b Resolved) -> Option<(&'b ServicePortName, &'b ServicePort)> {
        match &dst.place {
            Place::Service { spn, svc, .. } | Place::NodePort { spn, svc, .. } => Some((spn, svc)),
            _ => None,
        }
    }

    /// Whether a destination is a Service's external side (NodePort, external or LB IP).
    fn external(dst: &Resolved) -> bool {
        matches!(
            &dst.place,
            Place::NodePort { .. }
                | Place::Service {
                    kind: "external IP" | "loadbalancer IP",
                    ..
                }
        )
    }

    /// Every way a packet from `src` to `dst` can go.
    /// Also returns the packet as it leaves its source.
    pub fn trace(
        &self,
        src: &Resolved,
        dst: &Resolved,
        sport: u16,
    ) -> Result<(Packet, Vec<Path>), String> {
        let proto = dst
            .proto
            .clone()
            .or_else(|| src.proto.clone())
            .unwrap_or_else(|| "tcp".into());
        // Without a port and a protocol: a ping.
        let proto = match (dst.port, dst.proto.as_deref().or(src.proto.as_deref())) {
            (None, None) => "icmp".to_string(),
            _ => proto,
        };
        let dport = match (dst.port, proto.as_str()) {
            (Some(p), _) => p,
            (None, "icmp") => 0,
            (None, _) => {
                return Err(format!(
                    "{} needs a port for {proto} (IP:PORT, node:NAME:PORT)",
                    dst.label
                ))
            }
        };
        let mut p = Packet {
            src: src.ip,
            dst: dst.ip,
            proto,
            sport: if dport == 0 { 0 } else { sport },
            dport,
            mark: 0,
            in_iface: None,
            out_iface: None,
        };
        let going = Going {
            hops: vec![],
            probability: 1.0,
            key: String::new(),
            endpoint: None,
            marked_by: None,
            origin: src.ip,
        };
        let (view, arrival, going) = match &src.place {
            Place::Pod(pod) => {
                let view = self.view(&pod.node)?;
                let gw = view.node.subnet.gateway();
                let mut g = going;
                let mut hop = Hop::new(
                    Some(&pod.node),
                    "source",
                    format!(
                        "pod {}/{} {}: eth0 {}/{}, default via {gw} (tun0){}",
                        pod.namespace,
                        pod.name,
                        pod.ip,
                        pod.ip,
                        view.node.subnet.0.prefix_len(),
                        view.mtu.map(|m| format!(", mtu {m}")).unwrap_or_default()
                    ),
                );
                veth(view, pod.ip, &mut hop);
                g.hops.push(hop);
                let bridged = view.node.subnet.0.contains(&p.dst) && !view.is_local(p.dst);
                let arrival = if bridged {
                    g.hops.push(Hop::new(
                        Some(&pod.node),
                        BRIDGE,
                        format!(
                            "{} is in the pod's subnet: the pod ARPs it and tun0 bridges the frame; br_netfilter passes it through iptables",
                            p.dst
                        ),
                    ));
                    Arrival::Bridged
                } else {
                    g.hops.push(Hop::new(
                        Some(&pod.node),
                        BRIDGE,
                        format!(
                            "to the gateway {gw} (tun0, MAC {}): up into {}'s IP stack",
                            crate::overlay::VtepMac::of(gw),
                            pod.node
                        ),
                    ));
                    Arrival::Pod
                };
                (view, arrival, g)
            }
            Place::Node(node) => {
                let view = self.view(&node.name)?;
                // A local process's source address comes from the route to the destination.
                let route = view.route(p.dst);
                p.src = route
                    .and_then(|r| r.src)
                    .or_else(|| route.and_then(|r| view.masquerade_source(&r.dev)))
                    .unwrap_or(node.ip);
                let mut g = going;
                g.hops.push(Hop::new(
                    Some(&node.name),
                    "source",
                    format!(
                        "a process of {} itself (host network), from {}",
                        node.name, p.src
                    ),
                ));
                (view, Arrival::Local, g)
            }
            Place::Outside => {
                let entry = match &dst.place {
                    Place::Node(n) | Place::NodePort { node: n, .. } => n.name.clone(),
                    Place::Pod(pod) => {
                        return Err(format!(
                        "{} is outside the cluster and has no route to the pod network (pod {}/{})",
                        src.ip, pod.namespace, pod.name
                    ))
                    }
                    _ => self.via.clone().ok_or_else(|| {
                        format!(
                            "which node does the network route {} to? Name it with --via NODE",
                            dst.ip
                        )
                    })?,
                };
                let view = self.view(&entry)?;
                let mut g = going;
                g.hops.push(Hop::new(
                    None,
                    "source",
                    format!(
                        "{} (outside the cluster) sends to {}: the network delivers it to {}",
                        src.ip,
                        addr(p.dst, &p),
                        entry
                    ),
                ));
                (view, Arrival::Underlay, g)
            }
            Place::Service { .. } | Place::NodePort { .. } => {
                return Err(format!("{} cannot be a source", src.label))
            }
        };
        let first = p.clone();
        Ok((first, self.stage(view, p, arrival, going, dst, 0)?))
    }

    /// Everything that happens on one node, and after.
    fn stage(
        &self,
        view: &NodeView,
        mut p: Packet,
        arrival: Arrival,
        going: Going,
        dst: &Resolved,
        depth: usize,
    ) -> Result<Vec<Path>, String> {
        let node = view.node.name.clone();
        if depth > 3 {
            return Ok(vec![going.end(
                Verdict::Lost,
                node,
                None,
                Some("the path visits too many nodes (a loop?)".into()),
            )]);
        }
        let (nat_chain, in_iface) = match arrival {
            Arrival::Local => ("OUTPUT", None),
            Arrival::Pod | Arrival::Bridged => ("PREROUTING", Some(BRIDGE.to_string())),
            Arrival::Underlay => ("PREROUTING", Some(self.underlay_dev(view))),
            Arrival::Vxlan => ("PREROUTING", Some(VXLAN.to_string())),
        };
        p.in_iface = in_iface;
        let original_dst = p.dst;
        let outcomes = walk_on(view, TableName::Nat, nat_chain, p.clone());
        let stage_name = format!("nat {nat_chain}");
        let common = common_prefix(&outcomes);
        let mut paths = Vec::new();
        for o in &outcomes {
            let mut g = going.clone();
            g.probability *= o.probability;
            if g.key.is_empty() {
                g.key = branch_key(&o.hits, &o.end);
            }
            if let Some(m) = o.hits.iter().find(|h| h.target == "KUBE-MARK-MASQ") {
                g.marked_by = Some(m.rule.clone());
            }
            let dnat = matches!(o.end, End::Dnat(..));
            if let End::Dnat(ip, _) = o.end {
                g.endpoint = Some(addr(ip, &o.packet));
            }
            let service = self.service(dst);
            let summary = self.nat_summary(o, service);
            if outcomes.len() > 1 {
                let head = &o.hits[..common];
                let mut hop = rules_hop(
                    view,
                    &stage_name,
                    format!(
                        "{}: {} ways, by a random choice of endpoint",
                        service.map_or("a Service".to_string(), |(spn, _)| spn.to_string()),
                        outcomes.len()
                    ),
                    head,
                    "fork",
                );
                if let Some((_, svc)) = service {
                    hop.lines
                        .extend(policy_notes(svc, &view.node.name, Self::external(dst)));
                }
                g.hops.push(hop);
                g.hops.push(rules_hop(
                    view,
                    &stage_name,
                    summary,
                    &o.hits[common..],
                    &end_word(&o.end),
                ));
            } else {
                let mut hop = rules_hop(view, &stage_name, summary, &o.hits, &end_word(&o.end));
                if let Some((_, svc)) = service.filter(|_| dnat || depth == 0) {
                    hop.lines
                        .extend(policy_notes(svc, &view.node.name, Self::external(dst)));
                }
                g.hops.push(hop);
            }
            let last = g.hops.last_mut().expect("just pushed");
            last.notes.extend(o.notes.iter().cloned());
            if let Some((_, svc)) = service.filter(|(_, s)| s.affinity_seconds.is_some()) {
                last.lines
                    .push(affinity_note(view, svc, &o.packet, &o.hits));
            }
            if o.packet.mark != p.mark {
                last.lines.push(format!(
                    "mark {:#x}: marked for masquerade by {}",
                    o.packet.mark,
                    g.marked_by.as_deref().unwrap_or("a MARK rule")
                ));
            }
            if !o.end.passes() {
                let verdict = if o.end == End::Reject {
                    Verdict::Rejected
                } else {
                    Verdict::Dropped
                };
                paths.push(g.end(verdict, node.clone(), None, Some(end_word(&o.end))));
                continue;
            }
            let bridged = arrival == Arrival::Bridged && o.packet.dst == original_dst;
            paths.extend(self.route(view, o.packet.clone(), arrival, bridged, g, dst, depth)?);
        }
        Ok(paths)
    }

    fn underlay_dev(&self, view: &NodeView) -> String {
        view.addrs
            .iter()
            .find(|(_, ip)| **ip == view.node.ip)
            .map_or(UNDERLAY.to_string(), |(dev, _)| dev.clone())
    }

    fn nat_summary(
        &self,
        o: &Outcome,
        service: Option<(&ServicePortName, &ServicePort)>,
    ) -> String {
        match &o.end {
            End::Dnat(ip, _) => {
                let who = self
                    .pod_at(*ip)
                    .map(|p| format!(" (pod {}/{})", p.namespace, p.name))
                    .unwrap_or_default();
                format!("DNAT to {}{who}", addr(*ip, &o.packet))
            }
            _ if service.is_some() => {
                "no DNAT: no rule of this node sends the Service's traffic to an endpoint".into()
            }
            _ => "no Service rule matches: the destination stays".into(),
        }
    }

    /// Routing, then filter, then POSTROUTING, then the next place.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        view: &NodeView,
        mut p: Packet,
        arrival: Arrival,
        bridged: bool,
        mut g: Going,
        dst: &Resolved,
        depth: usize,
    ) -> Result<Vec<Path>, String> {
        let node = view.node.name.clone();
        let n = Some(node.as_str());
        // Where it goes.
        let out_dev = if bridged {
            BRIDGE.to_string()
        } else if view.is_local(p.dst) {
            let mut hop = Hop::new(
                n,
                "route",
                format!("{} is {node}'s own address: INPUT", p.dst),
            );
            hop.facts.push("local".into());
            g.hops.push(hop);
            return Ok(self.input(view, p, g));
        } else {
            match view.route(p.dst) {
                None => {
                    let mut hop = Hop::new(n, "route", format!("no route to {}", p.dst));
                    hop.facts.push("no route".into());
                    g.hops.push(hop);
                    return Ok(vec![g.end(
                        Verdict::Lost,
                        node,
                        None,
                        Some(format!("no route to {}", p.dst)),
                    )]);
                }
                Some(r) => {
                    let class = match r.dev.as_str() {
                        BRIDGE => format!("{BRIDGE} {}", r.dst),
                        VXLAN => format!("{r}"),
                        _ => "the node's own routes".to_string(),
                    };
                    let what = match r.dev.as_str() {
                        BRIDGE => format!("{} is on {BRIDGE}, {node}'s pod subnet", p.dst),
                        VXLAN => format!("{} is routed over the overlay", p.dst),
                        _ => format!("{} takes the node's own routes (none of rsdn's)", p.dst),
                    };
                    let mut hop = Hop::new(n, "route", what);
                    hop.lines.push(r.to_string());
                    if r.dev != VXLAN {
                        if let Some(other) = self
                            .model
                            .nodes
                            .values()
                            .find(|o| o.name != node && o.subnet.0.contains(&p.dst))
                        {
                            hop.lines.push(format!(
                                "there is no route of rsdn's for {}, {}'s pod subnet",
                                other.subnet, other.name
                            ));
                        }
                    }
                    hop.facts.push(class);
                    g.hops.push(hop);
                    r.dev.clone()
                }
            }
        };
        p.out_iface = Some(out_dev.clone());
        // filter FORWARD (or OUTPUT): NetworkPolicy, the proxy's filter rules, RSDN-FORWARD.
        let chain = if arrival == Arrival::Local {
            "OUTPUT"
        } else {
            "FORWARD"
        };
        let mut paths = Vec::new();
        for o in walk_on(view, TableName::Filter, chain, p.clone()) {
            let mut g = g.clone();
            let mut hop = rules_hop(
                view,
                &format!("filter {chain}"),
                filter_summary(&o),
                &o.hits,
                &end_word(&o.end),
            );
            hop.lines.extend(self.policy_lines(view, &p, &o.hits));
            hop.notes.extend(o.notes.iter().cloned());
            g.hops.push(hop);
            if !o.end.passes() {
                let reason = o
                    .hits
                    .iter()
                    .rev()
                    .find_map(|h| h.comment.clone())
                    .unwrap_or_else(|| end_word(&o.end));
                let verdict = if o.end == End::Reject {
                    Verdict::Rejected
                } else {
                    Verdict::Dropped
                };
                paths.push(g.end(verdict, node.clone(), None, Some(reason)));
                continue;
            }
            paths.extend(self.postrouting(view, o.packet, &out_dev, g, dst, depth)?);
        }
        Ok(paths)
    }

    /// A packet for the node itself: filter INPUT.
    fn input(&self, view: &NodeView, mut p: Packet, g: Going) -> Vec<Path> {
        p.out_iface = None;
        let node = view.node.name.clone();
        walk_on(view, TableName::Filter, "INPUT", p)
            .into_iter()
            .map(|o| {
                let mut g = g.clone();
                let passes = o.end.passes();
                let mut hop = rules_hop(
                    view,
                    "filter INPUT",
                    filter_summary(&o),
                    &o.hits,
                    &end_word(&o.end),
                );
                hop.notes.extend(o.notes.iter().cloned());
                g.hops.push(hop);
                if passes {
                    let seen = source(&o.packet);
                    g.end(
                        Verdict::Delivered,
                        format!("{node} itself ({})", addr(o.packet.dst, &o.packet)),
                        Some(seen),
                        None,
                    )
                } else {
                    let reason = o.hits.iter().rev().find_map(|h| h.comment.clone());
                    let v = if o.end == End::Reject {
                        Verdict::Rejected
                    } else {
                        Verdict::Dropped
                    };
                    g.end(v, node.clone(), None, reason.or(Some(end_word(&o.end))))
                }
            })
            .collect()
    }

    /// nat POSTROUTING: the masquerade decision; then delivery, the overlay or the underlay.
    fn postrouting(
        &self,
        view: &NodeView,
        p: Packet,
        out_dev: &str,
        g: Going,
        dst: &Resolved,
        depth: usize,
    ) -> Result<Vec<Path>, String> {
        let mut paths = Vec::new();
        for o in walk_on(view, TableName::Nat, "POSTROUTING", p.clone()) {
            let mut g = g.clone();
            let mut q = o.packet.clone();
            let summary = match &o.end {
                End::Masquerade => {
                    let to = view.masquerade_source(out_dev);
                    if let Some(to) = to {
                        q.src = to;
                    }
                    // --random-fully: the port is chosen at random (0 stands for it).
                    q.sport = 0;
                    let by = o.hits.last().map(|h| h.chain.clone()).unwrap_or_default();
                    format!(
                        "masqueraded by {by} to {} ({out_dev}'s address; a random source port)",
                        to.map_or("?".into(), |t| t.to_string())
                    )
                }
                End::Snat(to) => format!("SNAT to {to}"),
                _ => format!("not masqueraded: the source stays {}", p.src),
            };
            let mut hop = rules_hop(view, "nat POSTROUTING", summary, &o.hits, &end_word(&o.end));
            if p.mark & 0xffff != 0 {
                hop.lines.push(format!(
                    "the packet carries mark {:#x}{}",
                    p.mark,
                    g.marked_by
                        .as_ref()
                        .map(|r| format!(", set by {r}"))
                        .unwrap_or_default()
                ));
            }
            hop.notes.extend(o.notes.iter().cloned());
            g.hops.push(hop);
            q.mark = o.packet.mark;
            paths.extend(self.leave(view, q, out_dev, g, dst, depth)?);
        }
        Ok(paths)
    }

    fn leave(
        &self,
        view: &NodeView,
        p: Packet,
        out_dev: &str,
        mut g: Going,
        dst: &Resolved,
        depth: usize,
    ) -> Result<Vec<Path>, String> {
        let node = view.node.name.clone();
        let n = Some(node.as_str());
        match out_dev {
            BRIDGE => Ok(vec![self.deliver(view, p, g)]),
            VXLAN => {
                let route = view.route(p.dst).cloned();
                let via = route.as_ref().and_then(|r| r.via);
                let mac = via.and_then(|v| view.overlay.neigh.get(&v).copied());
                let fdb = mac.and_then(|m| view.overlay.fdb.iter().find(|(x, _)| *x == m).copied());
                let mut hop = Hop::new(n, VXLAN, String::new());
                let lost = |mut g: Going, mut hop: Hop, why: String| {
                    hop.summary = why.clone();
                    g.hops.push(hop);
                    Ok(vec![g.end(Verdict::Lost, node.clone(), None, Some(why))])
                };
                let Some(via) = via else {
                    return lost(g, hop, "a route over vxlan0 without a next hop".into());
                };
                let Some(mac) = mac else {
                    hop.facts.push(format!("no neigh {via}"));
                    return lost(
                        g,
                        hop,
                        format!(
                            "no permanent neighbour for the VTEP {via} on vxlan0: its ARP goes nowhere (nolearning, no flooding)"
                        ),
                    );
                };
                hop = hop.line(format!("neigh {via} lladdr {mac} nud permanent"));
                let Some((_, remote_ip)) = fdb else {
                    hop.facts.push(format!("no fdb {mac}"));
                    return lost(
                        g,
                        hop,
                        format!("no FDB entry for {mac} on vxlan0: the frame is dropped (no default destination)"),
                    );
                };
                hop = hop.line(format!("fdb {mac} dst {remote_ip} self permanent"));
                let Some(remote) = self.model.nodes.values().find(|n| n.ip == remote_ip) else {
                    return lost(
                        g,
                        hop,
                        format!("the FDB entry sends it to {remote_ip}, which is no node"),
                    );
                };
                if let Some(v) = &view.vxlan {
                    hop = hop.line(format!(
                        "VXLAN VNI {}: UDP {} -> {}:{} (underlay), inner {} -> {}",
                        v.vni, v.local, remote_ip, v.port, p.src, p.dst
                    ));
                }
                hop.summary = format!("to {} ({remote_ip}) through the overlay", remote.name);
                if p.mark != 0 {
                    hop.notes.push(format!(
                        "the outer packet carries mark {:#x} (a mark left set would masquerade it too)",
                        p.mark
                    ));
                }
                g.hops.push(hop);
                let next = self.view(&remote.name)?;
                let mut q = p;
                q.mark = 0;
                q.out_iface = None;
                self.stage(next, q, Arrival::Vxlan, g, dst, depth + 1)
            }
            _ => {
                let route = view.route(p.dst).map(|r| r.to_string()).unwrap_or_default();
                let mut hop = Hop::new(
                    n,
                    "underlay",
                    format!("leaves {node} by its own routes ({route})"),
                );
                hop.facts.push("underlay".into());
                g.hops.push(hop);
                let to = match &dst.place {
                    Place::Outside => format!("{} (outside the cluster)", addr(p.dst, &p)),
                    _ => format!("{} (off the node, by its routes)", addr(p.dst, &p)),
                };
                let seen = source(&p);
                Ok(vec![g.end(Verdict::Delivered, to, Some(seen), None)])
            }
        }
    }

    /// Out of tun0 into the pod's veth.
    fn deliver(&self, view: &NodeView, p: Packet, mut g: Going) -> Path {
        let node = view.node.name.clone();
        let Some(pod) = self.pod_at(p.dst).filter(|pod| pod.node == node) else {
            let why = format!(
                "no pod of the model has {} on {node}: ARP on tun0 gets no answer",
                p.dst
            );
            g.hops.push(Hop::new(Some(&node), "deliver", why.clone()));
            return g.end(Verdict::Lost, node, None, Some(why));
        };
        let seen = source(&p);
        let hairpin = g.origin == pod.ip;
        let mut hop = Hop::new(
            Some(&node),
            "deliver",
            format!(
                "tun0 -> the veth of pod {}/{} -> eth0 {}: it sees {seen} -> {}{}",
                pod.namespace,
                pod.name,
                pod.ip,
                addr(p.dst, &p),
                if hairpin {
                    " (back out of the port it came in: hairpin mode)"
                } else {
                    ""
                }
            ),
        );
        veth(view, pod.ip, &mut hop);
        g.hops.push(hop);
        g.end(
            Verdict::Delivered,
            format!("pod {}/{} ({})", pod.namespace, pod.name, addr(p.dst, &p)),
            Some(seen),
            None,
        )
    }

    /// The NetworkPolicy verdict of a filter walk: each direction judged on this node.
    fn policy_lines(&self, view: &NodeView, p: &Packet, hits: &[Hit]) -> Vec<String> {
        let mut out = Vec::new();
        let node = &view.node.name;
        for (dir, pod, dispatch, deny) in [
            ("egress", self.pod_at(p.src), RSDN_EGRESS, DENY_EGRESS),
            ("ingress", self.pod_at(p.dst), RSDN_INGRESS, DENY_INGRESS),
        ] {
            let Some(pod) = pod.filter(|pod| pod.node == *node) else {
                continue;
            };
            let name = format!("{}/{}", pod.namespace, pod.name);
            let Some(pod_chain) = hits
                .iter()
                .find(|h| h.chain == dispatch)
                .map(|h| h.target.clone())
            else {
                out.push(format!(
                    "NetworkPolicy: {name} is not isolated for {dir} (no policy selects it): allowed"
                ));
                continue;
            };
            let policies: Vec<String> = view
                .chains
                .rules(TableName::Filter, &pod_chain)
                .unwrap_or_default()
                .iter()
                .filter(|r| r.target.word().starts_with("RSDN-N"))
                .filter_map(|r| r.comment.clone())
                .collect();
            let allowed: Vec<String> = hits
                .iter()
                .filter(|h| h.chain.starts_with("RSDN-N") && h.target == "MARK")
                .filter_map(|h| h.comment.clone())
                .collect();
            let denied = hits.iter().any(|h| h.target == deny);
            let isolated = format!(
                "NetworkPolicy: {name} is isolated for {dir} by {}",
                policies.join(", ")
            );
            if denied {
                out.push(format!(
                    "{isolated}; nothing allows this: dropped by {deny}"
                ));
            } else if allowed.is_empty() {
                out.push(format!("{isolated}; allowed"));
            } else {
                out.push(format!("{isolated}; allowed by {}", allowed.join("; ")));
            }
        }
        out
    }
}

/// The host veth of the pod at `ip`, where the view read it.
fn veth(view: &NodeView, ip: Ipv4Addr, hop: &mut Hop) {
    let Some(ports) = &view.ports else {
        hop.facts.push("veth attached".into());
        return;
    };
    let fact = match ports.get(&ip) {
        None => {
            hop.lines
                .push(format!("no IPAM record of rsdn-cni has {ip} on this node"));
            "veth unknown".to_string()
        }
        Some(s) => match &s.link {
            None => {
                hop.lines.push(format!("host veth {}: missing", s.veth));
                "veth missing".into()
            }
            Some(l) => {
                let mut bad = vec![];
                if !l.on_bridge {
                    bad.push("not a port of tun0");
                }
                if !l.up {
                    bad.push("down");
                }
                if !l.hairpin {
                    bad.push("hairpin off");
                }
                hop.lines.push(format!(
                    "host veth {}: {}, mtu {}",
                    s.veth,
                    if bad.is_empty() {
                        "a port of tun0, up, hairpin on".to_string()
                    } else {
                        bad.join(", ")
                    },
                    l.mtu
                ));
                if bad.is_empty() {
                    "veth attached".into()
                } else {
                    format!("veth {}", bad.join(", "))
                }
            }
        },
    };
    hop.facts.push(fact);
}

/// The traffic policy of a Service port that applies to this traffic (external: to a NodePort,
/// an external or load-balancer IP), as it applies on `node`.
fn policy_notes(svc: &ServicePort, node: &str, external: bool) -> Vec<String> {
    let mut out = vec![];
    if !external {
        if svc.internal_local {
            out.push(format!(
                "internalTrafficPolicy: Local: only {node}'s endpoints serve traffic to the cluster IP"
            ));
        }
    } else if svc.external_local && svc.externally_accessible() {
        out.push(format!(
            "externalTrafficPolicy: Local: external traffic goes to {node}'s endpoints only (KUBE-SVL-), unmasqueraded, so the client's address is kept"
        ));
    } else if svc.externally_accessible() {
        out.push(
            "externalTrafficPolicy: Cluster: external traffic goes to any endpoint, masqueraded (KUBE-EXT- marks it)"
                .into(),
        );
    }
    out
}

fn affinity_note(view: &NodeView, svc: &ServicePort, p: &Packet, hits: &[Hit]) -> String {
    let seconds = svc.affinity_seconds.unwrap_or_default();
    let sticky = hits.iter().find(|h| h.rule.contains("--rcheck"));
    match (&view.recent, sticky) {
        (_, Some(h)) => format!(
            "sessionAffinity: ClientIP ({seconds} s): {} is in the recent list of {}: it sticks to that endpoint",
            p.src, h.target
        ),
        (Some(_), None) => format!(
            "sessionAffinity: ClientIP ({seconds} s): {} is in no endpoint's recent list: a random endpoint, remembered for later connections",
            p.src
        ),
        (None, None) => format!(
            "sessionAffinity: ClientIP ({seconds} s): a first connection picks at random; later ones from {} stick to the endpoint picked (the recent lists are read on the node only)",
            p.src
        ),
    }
}

/// How many hits all outcomes share from the start.
fn common_prefix(outcomes: &[Outcome]) -> usize {
    let Some(first) = outcomes.first() else {
        return 0;
    };
    (0..first.hits.len())
        .take_while(|&i| {
            outcomes
                .iter()
                .all(|o| o.hits.get(i).is_some_and(|h| h.key == first.hits[i].key))
        })
        .count()
}

/// What pairs a model's outcome with the kernel's: the endpoint chain entered, else the end.
fn branch_key(hits: &[Hit], end: &End) -> String {
    hits.iter()
        .rev()
        .find(|h| h.target.starts_with("KUBE-SEP-"))
        .map(|h| h.target.clone())
        .unwrap_or_else(|| end_word(end))
}

/// The model's paths by key, to pair with the kernel's.
pub fn by_key(paths: &[Path]) -> BTreeMap<&str, &Path> {
    paths.iter().map(|p| (p.key.as_str(), p)).collect()
}
