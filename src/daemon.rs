//! `rsdn node`, the composition root: it builds the parts from the configuration and starts
//! them. The cluster source publishes models; the overlay's reconcile loop
//! (`overlay::reconcile`), the netfilter engine's task with its producers (the Service proxy,
//! egress masquerade) and the health check node ports follow the models; `/healthz` and
//! `/metrics` report on all of them. Stopping leaves the datapath in place.

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
    info!(node = %config.node_name, source = %config.source, "rsdn node starting");
    let resync = Duration::from_secs(config.resync_seconds);
    let health = Arc::new(Health::new(resync));
    let mut registry = prometheus_client::registry::Registry::default();
    let engine_metrics = EngineMetrics::register(&mut registry);
    let overlay_metrics = OverlayMetrics::register(&mut registry);
    let producers = producers(&config, &mut registry);
    if let Some(addr) = config.healthz_bind_address {
        crate::http::serve(addr, health.clone(), Arc::new(registry))
            .await
            .with_context(|| format!("cannot serve /healthz on {addr}"))?;
    }
    let kernel = Kernel::connect()?;
    let mut scope = model_scope(&config);
    scope.programmed = programmed_claims(&kernel, config.cluster_network).await;
    // The model is shared, not copied, by every reader and every pass.
    let (model_tx, mut model_rx) = watch::channel(Arc::new(ClusterModel::default()));
    match &config.source {
        SourceConfig::Dir(dir) => {
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
    reconcile::run(
        reconciler,
        model_rx,
        wake,
        resync,
        health,
        overlay_metrics,
        &mut shutdown,
    )
    .await;
    info!("shutting down; the datapath stays in place");
    Ok(())
}
