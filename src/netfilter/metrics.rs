//! Metrics of the engine's syncs, under kube-proxy's names where the meaning is the same (a
//! sync of the rules that implement Services is what kube-proxy measures), so existing
//! dashboards and alerts keep working; and rsdn's own for drift.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::ruleset::{Ruleset, TableName};

type Labels = Vec<(&'static str, &'static str)>;

/// Handles to the engine's metrics; clones share the same values.
#[derive(Clone)]
pub struct EngineMetrics {
    sync: Histogram,
    full: Histogram,
    partial: Histogram,
    restore_failures: Counter,
    partial_restore_failures: Counter,
    rules: Family<Labels, Gauge>,
    rules_last_sync: Family<Labels, Gauge>,
    last_sync: Gauge<f64, AtomicU64>,
    drift: Family<Labels, Counter>,
    jump_repairs: Counter,
    verify: Family<Labels, Histogram>,
}

fn seconds() -> Histogram {
    // 1 ms to ~16 s, as kube-proxy's sync histograms.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// What one successful sync did, as far as the metrics go.
#[derive(Debug, Clone, Copy)]
pub struct Synced<'a> {
    pub full: bool,
    pub took: Duration,
    pub lines: usize,
    pub ruleset: &'a Ruleset,
    pub at: SystemTime,
}

impl EngineMetrics {
    pub fn register(registry: &mut Registry) -> EngineMetrics {
        let m = EngineMetrics {
            sync: seconds(),
            full: seconds(),
            partial: seconds(),
            restore_failures: Counter::default(),
            partial_restore_failures: Counter::default(),
            rules: Family::default(),
            rules_last_sync: Family::default(),
            last_sync: Gauge::default(),
            drift: Family::default(),
            jump_repairs: Counter::default(),
            verify: Family::new_with_constructor(seconds),
        };
        let k = "kubeproxy_sync_proxy_rules";
        registry.register(
            format!("{k}_duration_seconds"),
            "SyncProxyRules latency in seconds",
            m.sync.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.full.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.partial.clone(),
        );
        registry.register(
            format!("{k}_iptables_restore_failures"),
            "Cumulative proxy iptables restore failures",
            m.restore_failures.clone(),
        );
        registry.register(
            format!("{k}_iptables_partial_restore_failures"),
            "Cumulative proxy iptables partial restore failures",
            m.partial_restore_failures.clone(),
        );
        registry.register(
            format!("{k}_iptables"),
            "Total number of iptables rules owned by rsdn",
            m.rules.clone(),
        );
        registry.register(
            format!("{k}_iptables_last"),
            "Number of iptables rules written by the last sync",
            m.rules_last_sync.clone(),
        );
        registry.register(
            format!("{k}_last_timestamp_seconds"),
            "The last time proxy rules were successfully synced",
            m.last_sync.clone(),
        );
        let r = registry.sub_registry_with_prefix("rsdn");
        r.register(
            "iptables_drift_chains",
            "Chains of rsdn's found changed, emptied or deleted in the kernel by someone else, and rewritten",
            m.drift.clone(),
        );
        r.register(
            "iptables_jump_repairs",
            "Times the jumps from the built-in chains into rsdn's were found missing or out of order and put back",
            m.jump_repairs.clone(),
        );
        r.register(
            "iptables_verify_duration_seconds",
            "Duration of reading a table back and comparing it with what was written",
            m.verify.clone(),
        );
        m
    }

    /// A standalone set (tests, tools).
    pub fn unregistered() -> EngineMetrics {
        EngineMetrics::register(&mut Registry::default())
    }

    pub fn synced(&self, s: Synced) {
        let took = s.took.as_secs_f64();
        self.sync.observe(took);
        if s.full {
            self.full.observe(took);
        } else {
            self.partial.observe(took);
        }
        for t in TableName::ALL {
            self.rules
                .get_or_create(&vec![("table", t.as_str())])
                .set(s.ruleset.rules(t) as i64);
        }
        self.rules_last_sync
            .get_or_create(&vec![("table", "all")])
            .set(s.lines as i64);
        let now =
            s.at.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
        self.last_sync.set(now);
    }

    pub fn restore_failed(&self, full: bool) {
        self.restore_failures.inc();
        if !full {
            self.partial_restore_failures.inc();
        }
    }

    pub fn drift(&self, table: TableName, chains: usize) {
        self.drift
            .get_or_create(&vec![("table", table.as_str())])
            .inc_by(chains as u64);
    }

    /// ipsets found changed by someone else.
    pub fn drift_sets(&self, sets: usize) {
        self.drift
            .get_or_create(&vec![("table", "ipset")])
            .inc_by(sets as u64);
    }

    pub fn jumps_repaired(&self) {
        self.jump_repairs.inc();
    }

    pub fn verified(&self, table: TableName, took: Duration) {
        self.verify
            .get_or_create(&vec![("table", table.as_str())])
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kube_proxy() {
        let mut reg = Registry::default();
        let m = EngineMetrics::register(&mut reg);
        m.synced(Synced {
            full: true,
            took: Duration::from_millis(3),
            lines: 12,
            ruleset: &Ruleset::default(),
            at: SystemTime::UNIX_EPOCH,
        });
        m.restore_failed(false);
        m.drift(TableName::Filter, 2);
        m.jumps_repaired();
        m.verified(TableName::Nat, Duration::from_millis(2));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1",
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total 1",
            "kubeproxy_sync_proxy_rules_iptables{table=\"nat\"} 0",
            "kubeproxy_sync_proxy_rules_iptables_last{table=\"all\"} 12",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds 0.0",
            "rsdn_iptables_drift_chains_total{table=\"filter\"} 2",
            "rsdn_iptables_jump_repairs_total 1",
            "rsdn_iptables_verify_duration_seconds_count{table=\"nat\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
