//! `rsdn node`, the composition root: it builds the parts from the configuration and starts
//! them. The cluster source publishes models; the overlay's reconcile loop
//! (`overlay::reconcile`), the netfilter engine's task with its producers (the Service proxy,
//! egress masquerade) and the health check node ports follow the models; `/healthz` (on the
//! health server) and `/metrics` (on the metrics server) report on all of them; with the API
//! server as the source, the Node's NetworkUnavailable condition is cleared once the node
//! network is programmed (`node_status`). Stopping leaves the datapath in place.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{watch, Notify};
use tracing::info;

use crate::config::{IptablesBackend, NodeConfig, SourceConfig};
use crate::egress::Egress;
use crate::health::Health;
use crate::model::{ClusterModel, ModelScope};
use crate::netfilter::backend::{self, Backend};
use crate::netfilter::engine::{Engine, Settings};
use crate::netfilter::metrics::EngineMetrics;
use crate::netfilter::producer::Producer;
use crate::netfilter::tools::Tools;
use crate::overlay::kernel::Kernel;
use crate::overlay::metrics::OverlayMetrics;
use crate::overlay::reconcile::{self, programmed_claims, Reconciler};
use crate::policy::metrics::PolicyMetrics;
use crate::policy::NetworkPolicies;
use crate::proxy::metrics::ProxyMetrics;
use crate::proxy::{conntrack, healthcheck, Proxy, ProxySettings};

/// A burst of writes to the cluster directory is read once it has been quiet this long; short,
/// because a new node's entries wait for it.
const SOURCE_QUIET: Duration = Duration::from_millis(20);
/// Period of the kube source's rebuild of the model from scratch out of its stores.
const KUBE_RECONCILE: Duration = Duration::from_secs(300);

/// How the model is built for this node (the kernel's subnet claims are added at start).
pub fn model_scope(config: &NodeConfig) -> ModelScope {
    ModelScope {
        cluster_network: config.cluster_network,
        local_node: config.node_name.clone(),
        programmed: Default::default(),
    }
}

/// The producers of iptables rules for this configuration, in the order their jumps stand:
/// NetworkPolicy (it must judge a packet before the proxy's forwarding rules accept it), the
/// Service proxy (unless kube-proxy does it), then egress masquerade.
pub fn producers(
    config: &NodeConfig,
    registry: &mut prometheus_client::registry::Registry,
) -> Vec<Box<dyn Producer>> {
    let mut out: Vec<Box<dyn Producer>> = vec![Box::new(NetworkPolicies::new(
        config.node_name.clone(),
        PolicyMetrics::register(registry),
    ))];
    if config.proxy {
        let settings = ProxySettings {
            cluster_network: config.cluster_network,
            service_network: config.service_network,
            masquerade_bit: config.masquerade_bit,
            node_name: config.node_name.clone(),
            node_ip: config.node_ip,
            node_port_addresses: config.node_port_addresses.clone(),
        };
        out.push(Box::new(Proxy::new(
            settings,
            Box::new(conntrack::Netlink),
            ProxyMetrics::register(registry),
        )));
    }
    out.push(Box::new(Egress {
        cluster_network: config.cluster_network,
        service_network: config.service_network,
    }));
    out
}

/// Every metric the daemon exports, in one registry, and the parts that report to it.
pub struct Instruments {
    pub registry: prometheus_client::registry::Registry,
    pub engine: EngineMetrics,
    pub overlay: OverlayMetrics,
    /// The health server's answers.
    pub probes: crate::http::ProbeMetrics,
    /// The producers of iptables rules (`producers`), with their metrics registered.
    pub producers: Vec<Box<dyn Producer>>,
}

pub fn instruments(config: &NodeConfig) -> Instruments {
    let mut registry = prometheus_client::registry::Registry::default();
    crate::build_info::register(&mut registry);
    let engine = EngineMetrics::register(&mut registry);
    let overlay = OverlayMetrics::register(&mut registry);
    let probes = crate::http::ProbeMetrics::register(&mut registry);
    let producers = producers(config, &mut registry);
    Instruments {
        registry,
        engine,
        overlay,
        probes,
        producers,
    }
}

/// The configured iptables backend, or the one the node uses (detected as kube-proxy does).
pub fn backend(config: &NodeConfig) -> (Backend, String) {
    match config.iptables_backend {
        IptablesBackend::Auto => backend::detect(),
        IptablesBackend::Nft => (Backend::Nft, "configured".into()),
        IptablesBackend::Legacy => (Backend::Legacy, "configured".into()),
    }
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    info!(
        version = crate::build_info::VERSION,
        revision = crate::build_info::REVISION,
        build_date = crate::build_info::BUILD_DATE,
        node = %config.node_name,
        source = %config.source,
        "rsdn node starting"
    );
    let resync = Duration::from_secs(config.resync_seconds);
    let health = Arc::new(Health::new(resync));
    let Instruments {
        registry,
        engine: engine_metrics,
        overlay: overlay_metrics,
        probes,
        producers,
    } = instruments(&config);
    if let Some(addr) = config.healthz_bind_address {
        crate::http::serve_health(addr, health.clone(), probes)
            .await
            .with_context(|| format!("cannot serve /healthz on {addr}"))?;
    }
    if let Some(addr) = config.metrics_bind_address {
        crate::http::serve_metrics(addr, Arc::new(registry))
            .await
            .with_context(|| format!("cannot serve /metrics on {addr}"))?;
    }
    let kernel = Kernel::connect()?;
    let mut scope = model_scope(&config);
    scope.programmed = programmed_claims(&kernel, config.cluster_network).await;
    // The model is shared, not copied, by every reader and every pass.
    let (model_tx, mut model_rx) = watch::channel(Arc::new(ClusterModel::default()));
    // True once the node network is programmed (the reconcile loop sets it).
    let (ready_tx, ready_rx) = watch::channel(false);
    match &config.source {
        SourceConfig::Dir(dir) => {
            info!("the dir source has no API server: the Node's NetworkUnavailable condition is not written");
            tokio::spawn(crate::source::dir::run(
                dir.clone(),
                scope,
                model_tx,
                SOURCE_QUIET,
                resync,
            ));
        }
        SourceConfig::Kube(kubeconfig) => {
            let client = crate::source::kube::client(kubeconfig.as_deref())
                .await
                .context("cannot configure the Kubernetes client")?;
            tokio::spawn(crate::node_status::run(
                client.clone(),
                config.node_name.clone(),
                ready_rx,
                Default::default(),
            ));
            tokio::spawn(crate::source::kube::run(
                client,
                scope,
                model_tx,
                KUBE_RECONCILE,
            ));
        }
    }
    tokio::pin!(shutdown);
    // Nothing is programmed from a partial view: an empty model would delete every remote
    // node's entries and every Service rule of a restarted daemon.
    tokio::select! {
        r = model_rx.changed() => if r.is_err() { anyhow::bail!("the cluster source stopped before its first read") },
        _ = &mut shutdown => {
            info!("shutting down before the first read of the cluster; nothing was changed");
            return Ok(());
        }
    }
    health.source_ready();

    let (backend, why) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || backend(&config)
    })
    .await
    .unwrap_or((Backend::Nft, "detection failed".into()));
    info!(backend = backend.name(), reason = %why, proxy = config.proxy, "iptables backend");
    let settings = Settings {
        full_every: Duration::from_secs(config.proxy_full_sync_seconds),
        ..Settings::default()
    };
    let engine = Engine::new(Tools { backend }, settings, engine_metrics);
    tokio::spawn(crate::netfilter::task::run(
        engine,
        producers,
        model_rx.clone(),
        config.node_name.clone(),
        resync,
        health.clone(),
    ));
    // The health check node ports are ours only where we are the proxy; with --proxy=false
    // kube-proxy serves them.
    if config.proxy {
        tokio::spawn(healthcheck::run(
            model_rx.clone(),
            config.node_name.clone(),
            health.clone(),
            resync,
        ));
    }

    let wake = Arc::new(Notify::new());
    tokio::spawn(crate::overlay::monitor::run(wake.clone()));
    let reconciler = Reconciler::new(config, kernel);
    let reports = reconcile::Reports {
        health,
        metrics: overlay_metrics,
        ready: ready_tx,
    };
    reconcile::run(reconciler, model_rx, wake, resync, reports, &mut shutdown).await;
    info!("shutting down; the datapath stays in place");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::SystemTime;

    use super::*;
    use crate::model::testing;
    use crate::netfilter::engine::SyncReport;
    use crate::netfilter::metrics::Synced;
    use crate::netfilter::ruleset::Ruleset;

    /// A metric as kube-proxy declares it, or as rsdn's exposition shows it.
    #[derive(Debug, Clone, PartialEq)]
    struct Shape {
        kind: String,
        labels: BTreeSet<String>,
        buckets: Vec<f64>,
    }

    /// `exponential(start,factor,count)`, or `merge(linear(start,width,count),...)` with
    /// component-base's leading 0.
    fn buckets(spec: &str) -> Vec<f64> {
        let args = |s: &str| -> Vec<f64> { s.split(',').map(|a| a.parse().unwrap()).collect() };
        if spec == "-" {
            vec![]
        } else if let Some(a) = spec.strip_prefix("exponential(") {
            let a = args(a.trim_end_matches(')'));
            (0..a[2] as i32).map(|i| a[0] * a[1].powi(i)).collect()
        } else if let Some(m) = spec.strip_prefix("merge(") {
            let mut out = vec![0.0];
            for l in m.trim_end_matches(')').split("),") {
                let a = args(l.trim_start_matches("linear(").trim_end_matches(')'));
                out.extend((0..a[2] as usize).map(|i| a[0] + a[1] * i as f64));
            }
            out
        } else {
            panic!("unknown bucket layout {spec}")
        }
    }

    /// src/proxy/testdata/kube-proxy-metrics.txt: name -> (shape, whether rsdn exports it).
    fn kube_proxy() -> BTreeMap<String, (Shape, bool)> {
        include_str!("proxy/testdata/kube-proxy-metrics.txt")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let c: Vec<&str> = l.split(" | ").map(str::trim).collect();
                assert_eq!(c.len(), 5, "{l}");
                let labels = match c[2] {
                    "-" => BTreeSet::new(),
                    ls => ls.split(',').map(String::from).collect(),
                };
                let shape = Shape {
                    kind: c[1].into(),
                    labels,
                    buckets: buckets(c[3]),
                };
                (c[0].to_string(), (shape, c[4] == "yes"))
            })
            .collect()
    }

    /// The label names and values of a sample line, `name{a="x",b="y"} value`.
    fn labels(sample: &str) -> Vec<(String, String)> {
        let Some(open) = sample.find('{') else {
            return vec![];
        };
        let mut out = Vec::new();
        let mut rest = &sample[open + 1..];
        while let Some(eq) = rest.find("=\"") {
            let name = rest[..eq].trim_start_matches(',').to_string();
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let mut end = 0;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = eq + 2 + i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            out.push((name, value));
            rest = &rest[end..];
            if rest.starts_with('}') {
                break;
            }
        }
        out
    }

    /// What the exposition shows of each family, under the name kube-proxy's text format
    /// gives it (a counter's samples end in `_total`), with how many samples it has.
    fn exposed(text: &str) -> BTreeMap<String, (Shape, usize)> {
        let mut out: BTreeMap<String, (Shape, usize)> = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (family, kind) = t.split_once(' ').unwrap();
                let name = match kind {
                    "counter" => format!("{family}_total"),
                    _ => family.to_string(),
                };
                let shape = Shape {
                    kind: kind.into(),
                    labels: BTreeSet::new(),
                    buckets: vec![],
                };
                out.insert(name.clone(), (shape, 0));
                current = Some(name);
            } else if !line.starts_with('#') {
                let (shape, samples) = out.get_mut(current.as_ref().unwrap()).unwrap();
                *samples += 1;
                for (name, value) in labels(line) {
                    if name == "le" {
                        if value != "+Inf" && line.contains("_bucket{") {
                            let le: f64 = value.parse().unwrap();
                            if !shape.buckets.contains(&le) {
                                shape.buckets.push(le);
                            }
                        }
                    } else {
                        shape.labels.insert(name);
                    }
                }
            }
        }
        out
    }

    /// Every metric the daemon registers, each with a sample or more.
    fn exposition() -> String {
        let config = NodeConfig::for_test("a");
        let Instruments {
            registry,
            engine,
            probes,
            mut producers,
            ..
        } = instruments(&config);
        let health = crate::health::Health::new(Duration::from_secs(5));
        for path in ["/healthz", "/livez"] {
            crate::http::health_route(path, &health, &probes);
        }
        let model = Arc::new(testing::model(&testing::three()));
        for p in producers.iter_mut() {
            p.render(&model);
            p.synced(&model, &SyncReport::default());
        }
        engine.synced(Synced {
            full: false,
            took: Duration::from_millis(3),
            written: &Default::default(),
            ruleset: &Ruleset::default(),
            at: SystemTime::now(),
        });
        engine.restore_failed(false);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn kube_proxy_named_metrics_are_kube_proxys_own() {
        let known = kube_proxy();
        assert_eq!(known.len(), 23, "the fixture lists kube-proxy's 23 metrics");
        let text = exposition();
        let ours: BTreeMap<String, (Shape, usize)> = exposed(&text)
            .into_iter()
            .filter(|(name, _)| name.starts_with("kubeproxy_"))
            .collect();
        for (name, (shape, samples)) in &ours {
            let Some((theirs, _)) = known.get(name) else {
                panic!("{name} is not one of kube-proxy's metrics");
            };
            assert!(*samples > 0, "{name} has no sample to check labels on");
            assert_eq!(shape.kind, theirs.kind, "{name}: type");
            assert_eq!(shape.labels, theirs.labels, "{name}: labels");
            assert_eq!(shape.buckets.len(), theirs.buckets.len(), "{name}: buckets");
            for (a, b) in shape.buckets.iter().zip(&theirs.buckets) {
                assert!(
                    (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                    "{name}: bucket {a} vs {b}"
                );
            }
        }
        let exported: BTreeSet<&String> = ours.keys().collect();
        let promised: BTreeSet<&String> = known
            .iter()
            .filter(|(_, (_, yes))| *yes)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            exported, promised,
            "exported vs marked `yes` in the fixture"
        );
        // Nothing of rsdn's own borrows the prefix, and every family is rsdn's or kube-proxy's.
        for name in exposed(&text).keys() {
            assert!(
                name.starts_with("kubeproxy_") || name.starts_with("rsdn_"),
                "{name}"
            );
        }
    }
}
