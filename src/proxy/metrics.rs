//! Proxy metrics, under kube-proxy's names where the meaning is the same, so existing
//! dashboards and alerts keep working.

use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::render::{RenderStats, Ruleset};
use super::sync::SyncReport;

type Labels = Vec<(&'static str, &'static str)>;

/// Handles to the proxy's metrics; clones share the same values.
#[derive(Clone)]
pub struct ProxyMetrics {
    sync: Histogram,
    full: Histogram,
    partial: Histogram,
    restore_failures: Counter,
    partial_restore_failures: Counter,
    rules: Family<Labels, Gauge>,
    rules_last_sync: Family<Labels, Gauge>,
    last_sync: Gauge<f64, AtomicU64>,
    no_local: Family<Labels, Gauge>,
}

fn seconds() -> Histogram {
    // 1 ms to ~16 s, as kube-proxy's sync histograms.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> ProxyMetrics {
        let m = ProxyMetrics {
            sync: seconds(),
            full: seconds(),
            partial: seconds(),
            restore_failures: Counter::default(),
            partial_restore_failures: Counter::default(),
            rules: Family::default(),
            rules_last_sync: Family::default(),
            last_sync: Gauge::default(),
            no_local: Family::default(),
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
            "Total number of iptables rules owned by rsdn's proxy",
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
        registry.register(
            format!("{k}_no_local_endpoints"),
            "Number of services with a Local traffic policy and no local endpoints",
            m.no_local.clone(),
        );
        m
    }

    /// A standalone set (tests, `rsdn proxy render`).
    pub fn unregistered() -> ProxyMetrics {
        ProxyMetrics::register(&mut Registry::default())
    }

    pub fn synced(&self, r: &SyncReport, ruleset: &Ruleset, stats: &RenderStats, at: SystemTime) {
        let took = (r.compute + r.restore + r.checks).as_secs_f64();
        self.sync.observe(took);
        if r.full {
            self.full.observe(took);
        } else {
            self.partial.observe(took);
        }
        for (table, n) in [
            ("filter", ruleset.filter.rules()),
            ("nat", ruleset.nat_rules()),
        ] {
            self.rules
                .get_or_create(&vec![("table", table)])
                .set(n as i64);
        }
        self.rules_last_sync
            .get_or_create(&vec![("table", "all")])
            .set(r.lines as i64);
        let now = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_sync.set(now);
        self.no_local
            .get_or_create(&vec![("traffic_policy", "internal")])
            .set(stats.no_local_endpoints_internal as i64);
        self.no_local
            .get_or_create(&vec![("traffic_policy", "external")])
            .set(stats.no_local_endpoints_external as i64);
    }

    pub fn restore_failed(&self, full: bool) {
        self.restore_failures.inc();
        if !full {
            self.partial_restore_failures.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kube_proxy() {
        let mut reg = Registry::default();
        let m = ProxyMetrics::register(&mut reg);
        let report = SyncReport {
            full: true,
            lines: 12,
            ..Default::default()
        };
        m.synced(
            &report,
            &Ruleset::default(),
            &RenderStats::default(),
            SystemTime::UNIX_EPOCH,
        );
        m.restore_failed(false);
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
            "kubeproxy_sync_proxy_rules_no_local_endpoints{traffic_policy=\"internal\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
