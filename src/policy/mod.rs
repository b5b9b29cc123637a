//! NetworkPolicy, as a producer of the netfilter engine: `select` evaluates selectors against
//! the model's pods and namespaces, `render` turns the policies selecting this node's pods into
//! filter chains and ipsets, `metrics` counts what they deny.

pub mod metrics;
pub mod render;
pub mod select;

use std::sync::Arc;

use crate::model::ClusterModel;
use crate::netfilter::engine::SyncReport;
use crate::netfilter::jumps::{Jump, Position};
use crate::netfilter::producer::{Owner, Producer};
use crate::netfilter::ruleset::{Ruleset, TableName};
use metrics::PolicyMetrics;
use render::*;

/// The NetworkPolicy producer of one node.
pub struct NetworkPolicies {
    node: String,
    metrics: PolicyMetrics,
    /// What one render keeps for the next: set members, pods' and policies' chains.
    cache: render::Cache,
    /// The last render, to tell whether a sync carried policy changes.
    last: Option<Ruleset>,
    changed: bool,
}

impl NetworkPolicies {
    pub fn new(node: String, metrics: PolicyMetrics) -> NetworkPolicies {
        NetworkPolicies {
            node,
            metrics,
            cache: render::Cache::default(),
            last: None,
            changed: false,
        }
    }
}

/// Whether a chain is NetworkPolicy's.
pub fn owns(table: TableName, chain: &str) -> bool {
    table == TableName::Filter
        && ([
            RSDN_POLICY,
            RSDN_INGRESS,
            RSDN_EGRESS,
            DENY_INGRESS,
            DENY_EGRESS,
        ]
        .contains(&chain)
            || PER_POD
                .iter()
                .chain(&PER_POLICY)
                .any(|p| chain.starts_with(p)))
}

impl Producer for NetworkPolicies {
    fn name(&self) -> &'static str {
        PRODUCER
    }

    fn render(&mut self, model: &Arc<ClusterModel>) -> Ruleset {
        let started = std::time::Instant::now();
        let (r, stats) = render_cached(model, &self.node, &mut self.cache);
        self.metrics.rendered(&stats, started.elapsed());
        self.changed = self.last.as_ref() != Some(&r);
        self.last = Some(r.clone());
        r
    }

    /// First in FORWARD, before the proxy's KUBE-FORWARD accepts packets for their masquerade
    /// mark; only new connections (replies of allowed ones pass).
    fn jumps(&self) -> Vec<Jump> {
        vec![Jump::new(
            TableName::Filter,
            "FORWARD",
            "-m conntrack --ctstate NEW ",
            "rsdn network policy",
            RSDN_POLICY,
            Position::First,
        )]
    }

    fn owner(&self) -> Owner {
        owns
    }

    fn synced(&mut self, _model: &Arc<ClusterModel>, report: &SyncReport) {
        if std::mem::take(&mut self.changed) {
            self.metrics
                .synced(report.full, report.compute + report.restore + report.checks);
        }
    }

    fn counters(&mut self, packets: &dyn Fn(TableName, &str) -> Option<Vec<u64>>) {
        let sum = |chain| packets(TableName::Filter, chain).map(|c| c.iter().sum());
        self.metrics.denied(sum(DENY_INGRESS), sum(DENY_EGRESS));
    }
}
