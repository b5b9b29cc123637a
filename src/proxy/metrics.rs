//! The proxy's own metrics, under kube-proxy's names, types and labels (the sync metrics are
//! the engine's): Services with a Local policy and no local endpoint, the Service and endpoint
//! changes the proxy has seen and not yet written, and the network programming latency.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{linear_buckets, Histogram};
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

/// The trigger times of the EndpointSlice changes that reached the kernel with `new` when it
/// held `old` before (None: nothing yet): a slice's trigger time counts once, when it first
/// appears, if its Service is one the proxy programs and it is later than `since` (the
/// daemon's start; kube-proxy's tracker start: the changes before it are not this daemon's to
/// measure).
pub fn programmed(old: Option<&Services>, new: &Services, since: SystemTime) -> Vec<SystemTime> {
    let mut proxied: Option<BTreeSet<(&str, &str)>> = None;
    let mut out = Vec::new();
    for (key, t) in &new.change_triggers {
        if t.at <= since || old.and_then(|o| o.change_triggers.get(key)) == Some(t) {
            continue;
        }
        // Headless Services (no port in the model) have slices too, and no rules.
        let proxied = proxied.get_or_insert_with(|| {
            new.ports
                .keys()
                .map(|k| (k.namespace.as_str(), k.name.as_str()))
                .collect()
        });
        if proxied.contains(&(key.0.as_str(), t.service.as_str())) {
            out.push(t.at);
        }
    }
    out
}

/// kube-proxy's buckets for network programming: MergeBuckets(LinearBuckets(0.25, 0.25, 2),
/// LinearBuckets(1, 1, 59), LinearBuckets(60, 5, 12), LinearBuckets(120, 30, 7)), with the 0
/// bucket component-base's MergeBuckets starts with.
fn programming_buckets() -> Vec<f64> {
    std::iter::once(0.0)
        .chain(linear_buckets(0.25, 0.25, 2))
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
        .collect()
}

/// Handles to the proxy's metrics; clones share the same values.
#[derive(Clone)]
pub struct ProxyMetrics {
    no_local: Family<Labels, Gauge>,
    programming: Histogram,
    invalid_dropped: Counter,
    service_changes: Counter,
    service_changes_pending: Gauge,
    endpoint_changes: Counter,
    endpoint_changes_pending: Gauge,
}

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> ProxyMetrics {
        let m = ProxyMetrics {
            no_local: Family::default(),
            programming: Histogram::new(programming_buckets()),
            invalid_dropped: Counter::default(),
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
        registry.register(
            "kubeproxy_iptables_ct_state_invalid_dropped_packets",
            "packets dropped by iptables to work around conntrack problems",
            m.invalid_dropped.clone(),
        );
        let f = per_family(registry);
        // A gauge whose name ends in `_total`, as kube-proxy names it.
        f.register(
            format!("{k}_no_local_endpoints_total"),
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local.clone(),
        );
        f.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.programming.clone(),
        );
        m
    }

    /// The kernel holds, since `now`, changes triggered at `triggers` (see `programmed`). The
    /// trigger times come from the controller's clock: a node clock behind it gives 0.
    pub fn programmed(&self, triggers: &[SystemTime], now: SystemTime) {
        for t in triggers {
            let took = now.duration_since(*t).unwrap_or_default();
            self.programming.observe(took.as_secs_f64());
        }
    }

    /// A standalone set (tests, tools).
    pub fn unregistered() -> ProxyMetrics {
        ProxyMetrics::register(&mut Registry::default())
    }

    /// KUBE-FORWARD's DROP of conntrack-INVALID packets dropped `n` more.
    pub fn invalid_dropped(&self, n: u64) {
        self.invalid_dropped.inc_by(n);
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
    use std::time::Duration;

    use crate::model::service::{ChangeTrigger, Endpoint, Protocol, ServicePort};

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
        ServicePort::cluster_ip(std::net::Ipv4Addr::new(172, 30, 0, 1), n)
    }

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            ip: [10, 128, 0, last].into(),
            port: 8080,
            node: None,
            ready: true,
            serving: true,
            terminating: false,
            zone: None,
            zone_hints: vec![],
            node_hints: vec![],
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

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// Services web (with a port) and headless (slices, no port), with trigger times.
    fn triggered(slices: &[(&str, &str, u64)]) -> Services {
        let mut s = Services::default();
        s.ports.insert(spn("web", "http"), port(80));
        for (slice, service, t) in slices {
            s.change_triggers.insert(
                ("ns".into(), slice.to_string()),
                ChangeTrigger {
                    service: service.to_string(),
                    at: at(*t),
                },
            );
        }
        s
    }

    #[test]
    fn each_change_is_programmed_once_after_the_start() {
        let start = at(1000);
        // At start, a slice changed before the daemon ran and one changed since.
        let first = triggered(&[("web-a", "web", 990), ("web-b", "web", 1005)]);
        assert_eq!(programmed(None, &first, start), [at(1005)]);
        // The same model again (a resync, a full sync): nothing new.
        assert_eq!(programmed(Some(&first), &first, start), []);
        // web-a changes, web-c appears, a headless Service's slice changes: two changes of
        // web, in slice order.
        let second = triggered(&[
            ("web-a", "web", 1010),
            ("web-b", "web", 1005),
            ("web-c", "web", 1011),
            ("dns-x", "headless", 1012),
        ]);
        assert_eq!(
            programmed(Some(&first), &second, start),
            [at(1010), at(1011)]
        );
        // A sync failed in between: the next successful one, from the model the kernel held,
        // still has them, once.
        let third = triggered(&[
            ("web-a", "web", 1020),
            ("web-b", "web", 1005),
            ("web-c", "web", 1011),
        ]);
        assert_eq!(
            programmed(Some(&first), &third, start),
            [at(1020), at(1011)]
        );
    }

    #[test]
    fn latency_lands_in_kube_proxys_buckets() {
        let b = programming_buckets();
        assert_eq!(b.len(), 81);
        assert_eq!(&b[..5], [0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(b[61..63], [59.0, 60.0]);
        assert_eq!(
            b[73..],
            [115.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0]
        );

        let mut reg = Registry::default();
        let m = ProxyMetrics::register(&mut reg);
        let now = at(2000);
        // 0.4 s, 3 s, 3.0001 s, and a trigger time ahead of the node's clock (skew): 0.
        m.programmed(
            &[
                now - Duration::from_millis(400),
                at(1997),
                now - Duration::from_micros(3_000_100),
                at(2001),
            ],
            now,
        );
        let t = text(&reg);
        let family = "kubeproxy_network_programming_duration_seconds";
        for want in [
            format!("{family}_count{{ip_family=\"IPv4\"}} 4"),
            format!("{family}_bucket{{ip_family=\"IPv4\",le=\"0.0\"}} 1"),
            format!("{family}_bucket{{ip_family=\"IPv4\",le=\"0.5\"}} 2"),
            format!("{family}_bucket{{ip_family=\"IPv4\",le=\"3.0\"}} 3"),
            format!("{family}_bucket{{ip_family=\"IPv4\",le=\"4.0\"}} 4"),
        ] {
            assert!(t.contains(&want), "{want} missing in\n{t}");
        }
    }
}
