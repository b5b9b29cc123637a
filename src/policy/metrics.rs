//! NetworkPolicy's metrics: how long its part of a sync took, how many pods it isolates, and
//! how many packets it denied (the counters of the two DROP rules every denial goes through).

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::render::Stats;
use crate::netfilter::metrics::RuleCount;

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Clone)]
pub struct PolicyMetrics {
    render: Histogram,
    sync: Family<Labels, Histogram>,
    policies: Gauge,
    isolated: Family<Labels, Gauge>,
    sets: Gauge,
    denied: Family<Labels, Counter>,
    /// The DROP rules' counters, per direction: the metric grows by the difference (a
    /// rewritten chain starts again from 0).
    seen: [RuleCount; 2],
}

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl PolicyMetrics {
    pub fn register(registry: &mut Registry) -> PolicyMetrics {
        let m = PolicyMetrics {
            render: seconds(),
            sync: Family::new_with_constructor(seconds),
            policies: Gauge::default(),
            isolated: Family::default(),
            sets: Gauge::default(),
            denied: Family::default(),
            seen: [RuleCount::default(); 2],
        };
        let r = registry.sub_registry_with_prefix("rsdn_network_policy");
        r.register(
            "render_duration_seconds",
            "Computing NetworkPolicy's chains and sets from the model",
            m.render.clone(),
        );
        r.register(
            "sync_duration_seconds",
            "Syncs that carried NetworkPolicy changes, full or partial, from render to kernel",
            m.sync.clone(),
        );
        r.register(
            "policies",
            "NetworkPolicies in the model",
            m.policies.clone(),
        );
        r.register(
            "isolated_pods",
            "Pods of this node isolated by some policy, per direction",
            m.isolated.clone(),
        );
        r.register(
            "ipsets",
            "ipsets NetworkPolicy uses on this node",
            m.sets.clone(),
        );
        r.register(
            "denied_packets",
            "Packets NetworkPolicy dropped on this node, per direction",
            m.denied.clone(),
        );
        m
    }

    pub fn unregistered() -> PolicyMetrics {
        PolicyMetrics::register(&mut Registry::default())
    }

    pub fn rendered(&self, s: &Stats, took: Duration) {
        self.render.observe(took.as_secs_f64());
        self.policies.set(s.policies as i64);
        self.sets.set(s.sets as i64);
        self.isolated
            .get_or_create(&vec![("direction", "ingress")])
            .set(s.isolated_ingress as i64);
        self.isolated
            .get_or_create(&vec![("direction", "egress")])
            .set(s.isolated_egress as i64);
    }

    pub fn synced(&self, full: bool, took: Duration) {
        let kind = if full { "full" } else { "partial" };
        self.sync
            .get_or_create(&vec![("sync", kind)])
            .observe(took.as_secs_f64());
    }

    /// The DROP rules' packet counters now (None: not read).
    pub fn denied(&mut self, ingress: Option<u64>, egress: Option<u64>) {
        for (i, (now, dir)) in [(ingress, "ingress"), (egress, "egress")]
            .into_iter()
            .enumerate()
        {
            let Some(now) = now else { continue };
            let grew = self.seen[i].grew(now);
            self.denied
                .get_or_create(&vec![("direction", dir)])
                .inc_by(grew);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_packets_grow_by_the_counters_difference_across_a_reset() {
        let mut reg = Registry::default();
        let mut m = PolicyMetrics::register(&mut reg);
        m.denied(Some(5), Some(0));
        m.denied(Some(8), None);
        m.denied(Some(2), Some(1)); // the chain was rewritten: its counter starts again
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("rsdn_network_policy_denied_packets_total{direction=\"ingress\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("rsdn_network_policy_denied_packets_total{direction=\"egress\"} 1"),
            "{text}"
        );
    }
}
