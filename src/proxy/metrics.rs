//! The proxy's own metrics, under kube-proxy's names (the sync metrics are the engine's).

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::render::RenderStats;

type Labels = Vec<(&'static str, &'static str)>;

/// Handles to the proxy's metrics; clones share the same values.
#[derive(Clone)]
pub struct ProxyMetrics {
    no_local: Family<Labels, Gauge>,
}

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> ProxyMetrics {
        let m = ProxyMetrics {
            no_local: Family::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints",
            "Number of services with a Local traffic policy and no local endpoints",
            m.no_local.clone(),
        );
        m
    }

    /// A standalone set (tests, tools).
    pub fn unregistered() -> ProxyMetrics {
        ProxyMetrics::register(&mut Registry::default())
    }

    pub fn synced(&self, stats: &RenderStats) {
        self.no_local
            .get_or_create(&vec![("traffic_policy", "internal")])
            .set(stats.no_local_endpoints_internal as i64);
        self.no_local
            .get_or_create(&vec![("traffic_policy", "external")])
            .set(stats.no_local_endpoints_external as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kube_proxy() {
        let mut reg = Registry::default();
        let m = ProxyMetrics::register(&mut reg);
        m.synced(&RenderStats {
            no_local_endpoints_internal: 2,
            no_local_endpoints_external: 0,
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for want in [
            "kubeproxy_sync_proxy_rules_no_local_endpoints{traffic_policy=\"internal\"} 2",
            "kubeproxy_sync_proxy_rules_no_local_endpoints{traffic_policy=\"external\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
