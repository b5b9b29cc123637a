//! Stage 4 of a Service port: its endpoints. Which endpoints serve which traffic (kube-proxy's
//! selection), the Service chains' jumps to them with kube-proxy's probabilities and affinity,
//! and one KUBE-SEP- chain per reachable endpoint with its DNAT.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::OnceLock;

use super::port::Port;
use crate::model::service::{Endpoint, ServicePort};
use crate::netfilter::ruleset::{Plain, Quoted, Table};
use crate::proxy::names::*;

/// kube-proxy's endpoint selection (topology hints aside): ready endpoints; when none is ready
/// anywhere, the serving-and-terminating ones, so connections drain instead of failing.
/// Endpoints are named by their index in the port's endpoints, which are unique and sorted by
/// `ip:port` text (the model's order): ascending indices are kube-proxy's order.
pub(super) struct Categorized {
    pub cluster: Vec<usize>,
    pub local: Vec<usize>,
    /// Endpoints some chain may jump to: each gets a KUBE-SEP- chain.
    pub reachable: Vec<usize>,
    pub any: bool,
}

pub(super) fn categorize(eps: &[Endpoint], svc: &ServicePort, node: &str) -> Categorized {
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

impl Port<'_> {
    pub(super) fn endpoints(&mut self) {
        let (name, proto) = (self.name.as_str(), self.proto);
        let cluster_ip = self.dst(self.svc.cluster_ip);
        let nat = &mut self.out.nat;
        // Internal traffic: masquerade what does not come from a pod (a node, or a host
        // routing the service network to us), since the endpoint may be on another node.
        if self.has_internal {
            nat.add(
                &self.internal_chain,
                format_args!(
                    "{} {cluster_ip} ! -s {} -j {KUBE_MARK_MASQ}",
                    Quoted(format_args!("{name} cluster IP")),
                    self.scope.cluster_network
                ),
            );
        }
        // Each reachable endpoint's `ip:port` and chain name, computed once, by its index.
        let mut texts = vec![None; self.eps.len()];
        let hash_prefix = format!("{name}{proto}");
        for &i in &self.c.reachable {
            let addr = self.eps[i].to_string();
            let chain = endpoint_chain_of(&hash_prefix, &addr);
            texts[i] = Some(EndpointText { addr, chain });
        }
        let jumps = EndpointJumps {
            name,
            affinity: self.svc.affinity_seconds,
            texts: &texts,
        };
        if !self.c.cluster.is_empty() && self.svc.uses_cluster_endpoints() {
            jumps.write(&self.chains.cluster, &self.c.cluster, nat);
        }
        if !self.c.local.is_empty() && self.svc.uses_local_endpoints() {
            jumps.write(&self.chains.local, &self.c.local, nat);
        }
        let plain = Plain(name);
        for &i in &self.c.reachable {
            let ep = jumps.text(i);
            let (sep, addr) = (&ep.chain, &ep.addr);
            let mut out = nat.open(sep);
            out.add(format_args!("{plain} -s {} -j {KUBE_MARK_MASQ}", ep.ip()));
            if self.svc.affinity_seconds.is_some() {
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
