//! Metrics of the engine's syncs, under kube-proxy's names, types, labels and buckets where the
//! meaning is the same (a sync of the rules that implement Services is what kube-proxy
//! measures), so existing dashboards and alerts keep working; and rsdn's own for drift.
//!
//! kube-proxy labels most of its metrics with the IP family of the proxier that reports them
//! (`ip_family="IPv4"` here: rsdn is IPv4 only). `src/proxy/testdata/kube-proxy-metrics.txt`
//! lists kube-proxy's metrics as its source declares them; a test in `daemon` keeps every
//! `kubeproxy_` metric rsdn exports to that list.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::ruleset::{Ruleset, TableName};

type Labels = Vec<(&'static str, &'static str)>;

/// The `ip_family` label kube-proxy puts on the metrics of one proxier.
pub const IP_FAMILY: (&str, &str) = ("ip_family", "IPv4");

/// Where kube-proxy's per-family metrics go: every one registered there carries `IP_FAMILY`.
pub fn per_family(registry: &mut Registry) -> &mut Registry {
    registry.sub_registry_with_label((Cow::Borrowed(IP_FAMILY.0), Cow::Borrowed(IP_FAMILY.1)))
}

/// Seconds since the epoch, as Prometheus timestamps are.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Follows a rule's packet counter in the kernel, which starts again from 0 when the rule's
/// chain is rewritten: what it grew by since the last read.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleCount {
    seen: u64,
}

impl RuleCount {
    pub fn grew(&mut self, now: u64) -> u64 {
        let grew = if now >= self.seen {
            now - self.seen
        } else {
            now
        };
        self.seen = now;
        grew
    }
}

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
    last_queued: Gauge<f64, AtomicU64>,
    drift: Family<Labels, Counter>,
    jump_repairs: Counter,
    verify: Family<Labels, Histogram>,
}

fn seconds() -> Histogram {
    // 1 ms to ~16 s: kube-proxy's ExponentialBuckets(0.001, 2, 15).
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// What one successful sync did, as far as the metrics go.
#[derive(Debug, Clone, Copy)]
pub struct Synced<'a> {
    pub full: bool,
    pub took: Duration,
    /// Rules written per table (a table left out wrote none).
    pub written: &'a BTreeMap<TableName, usize>,
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
            last_queued: Gauge::default(),
            drift: Family::default(),
            jump_repairs: Counter::default(),
            verify: Family::new_with_constructor(seconds),
        };
        let k = "kubeproxy_sync_proxy_rules";
        let f = per_family(registry);
        f.register(
            format!("{k}_duration_seconds"),
            "SyncProxyRules latency in seconds",
            m.sync.clone(),
        );
        f.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.full.clone(),
        );
        f.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.partial.clone(),
        );
        // Counters: the text encoding appends `_total`, giving kube-proxy's names.
        f.register(
            format!("{k}_iptables_restore_failures"),
            "Cumulative proxy iptables restore failures",
            m.restore_failures.clone(),
        );
        f.register(
            format!("{k}_iptables_partial_restore_failures"),
            "Cumulative proxy iptables partial restore failures",
            m.partial_restore_failures.clone(),
        );
        // A gauge whose name ends in `_total`, as kube-proxy names it.
        f.register(
            format!("{k}_iptables_total"),
            "Total number of iptables rules owned by rsdn",
            m.rules.clone(),
        );
        f.register(
            format!("{k}_iptables_last"),
            "Number of iptables rules written by rsdn in last sync",
            m.rules_last_sync.clone(),
        );
        f.register(
            format!("{k}_last_timestamp_seconds"),
            "The last time proxy rules were successfully synced",
            m.last_sync.clone(),
        );
        f.register(
            format!("{k}_last_queued_timestamp_seconds"),
            "The last time a sync of proxy rules was queued",
            m.last_queued.clone(),
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

    /// A change (a new model, drift found) calls for a sync.
    pub fn queued(&self, at: SystemTime) {
        self.last_queued.set(unix_seconds(at));
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
            let table = vec![("table", t.as_str())];
            self.rules
                .get_or_create(&table)
                .set(s.ruleset.rules(t) as i64);
            self.rules_last_sync
                .get_or_create(&table)
                .set(s.written.get(&t).copied().unwrap_or(0) as i64);
        }
        self.last_sync.set(unix_seconds(s.at));
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
            written: &BTreeMap::from([(TableName::Nat, 12)]),
            ruleset: &Ruleset::default(),
            at: SystemTime::UNIX_EPOCH,
        });
        m.queued(SystemTime::UNIX_EPOCH + Duration::from_secs(7));
        m.restore_failed(false);
        m.drift(TableName::Filter, 2);
        m.jumps_repaired();
        m.verified(TableName::Nat, Duration::from_millis(2));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 0",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 0",
            "kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"nat\"} 12",
            "kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"filter\"} 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 0.0",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"} 7.0",
            "rsdn_iptables_drift_chains_total{table=\"filter\"} 2",
            "rsdn_iptables_jump_repairs_total 1",
            "rsdn_iptables_verify_duration_seconds_count{table=\"nat\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
