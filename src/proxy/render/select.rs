//! Endpoint selection as kube-proxy does it: which endpoints serve cluster-wide and local
//! traffic, which are reachable at all, and the probabilities that spread connections evenly.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::OnceLock;

use crate::model::service::{Endpoint, ServicePort};

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

/// 1/n with ten decimals, as kube-proxy writes the statistic match's probability. The common
/// ones are formatted once per process: float formatting was a visible part of large renders.
pub(super) struct Probability(pub usize);

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
