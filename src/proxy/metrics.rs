//! The proxy's own metrics, under kube-proxy's names, types and labels (the sync metrics are
//! the engine's): Services with a Local policy and no local endpoint, and the Service and
//! endpoint changes the proxy has seen and not yet written.

use std::collections::{BTreeMap, BTreeSet};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::render::RenderStats;
use crate::model::{ServicePortName, Services};
use crate::netfilter::metrics::per_family;

type Labels = Vec<(&'static str, &'static str)>;

/// How many Services changed from one model to the next: their ports (the Service object),
/// and their endpoints (their EndpointSlices).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: usize,
    pub endpoints: usize,
}

impl Changes {
    /// From `old` (None: nothing yet) to `new`. kube-proxy counts watch events; the model is a
    /// snapshot, so a Service counts once per model it changed in, however many events the
    /// burst behind that model held.
    pub fn between(old: Option<&Services>, new: &Services) -> Changes {
        Changes {
            services: changed(old.map(|o| &o.ports), &new.ports),
            endpoints: changed(old.map(|o| &o.endpoints), &new.endpoints),
        }
    }
}

/// The Services (namespace/name) with an entry added, changed or removed.
fn changed<V: PartialEq>(
    old: Option<&BTreeMap<ServicePortName, V>>,
    new: &BTreeMap<ServicePortName, V>,
) -> usize {
    fn name(k: &ServicePortName) -> (&str, &str) {
        (k.namespace.as_str(), k.name.as_str())
    }
    let empty = BTreeMap::new();
    let old = old.unwrap_or(&empty);
    let mut services: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            services.insert(name(k));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            services.insert(name(k));
        }
    }
    services.len()
}

/// Handles to the proxy's metrics; clones share the same values.
#[derive(Clone)]
pub struct ProxyMetrics {
    no_local: Family<Labels, Gauge>,
    service_changes: Counter,
    service_changes_pending: Gauge,
    endpoint_changes: Counter,
    endpoint_changes_pending: Gauge,
}

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> ProxyMetrics {
        let m = ProxyMetrics {
            no_local: Family::default(),
            service_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            endpoint_changes: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
        };
        let k = "kubeproxy_sync_proxy_rules";
        // Counters: the text encoding appends `_total`, giving kube-proxy's names.
        registry.register(
            format!("{k}_service_changes"),
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        registry.register(
            format!("{k}_service_changes_pending"),
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        registry.register(
            format!("{k}_endpoint_changes"),
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes.clone(),
        );
        registry.register(
            format!("{k}_endpoint_changes_pending"),
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        // A gauge whose name ends in `_total`, as kube-proxy names it.
        per_family(registry).register(
            format!("{k}_no_local_endpoints_total"),
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local.clone(),
        );
        m
    }

    /// A standalone set (tests, tools).
    pub fn unregistered() -> ProxyMetrics {
        ProxyMetrics::register(&mut Registry::default())
    }

    /// Changes seen and not yet in the kernel.
    pub fn pending(&self, c: Changes) {
        self.service_changes_pending.set(c.services as i64);
        self.endpoint_changes_pending.set(c.endpoints as i64);
    }

    /// The kernel holds the rules of a render that carried changes `c`.
    pub fn synced(&self, stats: &RenderStats, c: Changes) {
        self.service_changes.inc_by(c.services as u64);
        self.endpoint_changes.inc_by(c.endpoints as u64);
        self.pending(Changes::default());
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
    use crate::model::service::{Endpoint, Protocol, ServicePort};

    fn text(reg: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, reg).unwrap();
        text
    }

    #[test]
    fn names_follow_kube_proxy() {
        let mut reg = Registry::default();
        let m = ProxyMetrics::register(&mut reg);
        m.pending(Changes {
            services: 3,
            endpoints: 1,
        });
        let t = text(&reg);
        assert!(
            t.contains("kubeproxy_sync_proxy_rules_service_changes_pending 3\n"),
            "{t}"
        );
        m.synced(
            &RenderStats {
                no_local_endpoints_internal: 2,
                no_local_endpoints_external: 0,
            },
            Changes {
                services: 3,
                endpoints: 2,
            },
        );
        let t = text(&reg);
        for want in [
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 2",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 0",
            "kubeproxy_sync_proxy_rules_service_changes_total 3",
            "kubeproxy_sync_proxy_rules_service_changes_pending 0",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
        ] {
            assert!(t.contains(want), "{want} missing in\n{t}");
        }
    }

    fn spn(name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: "ns".into(),
            name: name.into(),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    fn port(n: u16) -> ServicePort {
        crate::model::testing::service_port("172.30.0.1", n)
    }

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            ip: [10, 128, 0, last].into(),
            port: 8080,
            node: None,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    #[test]
    fn changes_count_services_not_ports_or_endpoints() {
        let mut a = Services::default();
        for (name, p) in [("web", "http"), ("web", "https"), ("db", "")] {
            a.ports.insert(spn(name, p), port(80));
            a.endpoints.insert(spn(name, p), vec![ep(5)]);
        }
        // Everything is new at first: 2 Services, both with endpoints.
        let changes = |services, endpoints| Changes {
            services,
            endpoints,
        };
        assert_eq!(Changes::between(None, &a), changes(2, 2));
        assert_eq!(Changes::between(Some(&a), &a), Changes::default());
        // Both ports of web change their endpoints, db loses its Service: one endpoint change
        // (web's) and one Service change (db's).
        let mut b = a.clone();
        for p in ["http", "https"] {
            b.endpoints.insert(spn("web", p), vec![ep(5), ep(6)]);
        }
        b.ports.remove(&spn("db", ""));
        assert_eq!(Changes::between(Some(&a), &b), changes(1, 1));
        // A Service port added, and the endpoints of db gone.
        let mut c = b.clone();
        c.ports.insert(spn("web", "admin"), port(9090));
        c.endpoints.remove(&spn("db", ""));
        assert_eq!(Changes::between(Some(&b), &c), changes(1, 1));
    }
}
