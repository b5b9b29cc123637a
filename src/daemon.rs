//! `rsdn node`: one reconcile loop. It wakes on a new cluster model, on netlink events that may
//! mean drift, and on a periodic resync; each pass makes the devices right, diffs the overlay
//! entries against the kernel, applies only the difference, and (once the network is
//! programmed) writes the CNI conflist. Stopping it leaves the datapath in place.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::Ipv4Net;
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::cniconf::{conflist, ConflistOptions};
use crate::config::{IptablesBackend, NodeConfig, SourceConfig, VXLAN_OVERHEAD};
use crate::health::Health;
use crate::model::{ClusterModel, ClusterNode, ModelScope};
use crate::overlay::kernel::{assert_sysctls, DeviceSpec, Kernel, KernelError};
use crate::overlay::metrics::{OverlayMetrics, PassFigures};
use crate::overlay::ports::{self, PortRepair};
use crate::overlay::{self, Action, BRIDGE};
use crate::proxy::healthcheck::{self, HealthCheckServers};
use crate::proxy::iptables::{self, Backend, Iptables};
use crate::proxy::metrics::ProxyMetrics;
use crate::proxy::render::ProxyScope;
use crate::proxy::sync::Proxier;

/// How long netlink events are collected before a reconcile runs (a burst is one pass).
const EVENT_DEBOUNCE: Duration = Duration::from_millis(50);
/// A burst of writes to the cluster directory is read once it has been quiet this long; short,
/// because a new node's entries wait for it.
const SOURCE_QUIET: Duration = Duration::from_millis(20);
/// Period of the kube source's rebuild of the model from scratch out of its stores.
const KUBE_RECONCILE: Duration = Duration::from_secs(300);
/// Retry delay after a failed pass.
const RETRY: Duration = Duration::from_secs(1);

/// What a reconcile pass did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Set while the local node is unknown or has no subnet: nothing is programmed.
    pub waiting: Option<String>,
    pub device_changes: Vec<String>,
    pub applied: Vec<Action>,
    pub failures: Vec<(Action, KernelError)>,
    pub remote_nodes: usize,
    pub conflist_written: bool,
    /// Pod attachments the plugin's records list.
    pub pod_ports: usize,
    pub port_repairs: Vec<PortRepair>,
    pub port_failures: Vec<(PortRepair, KernelError)>,
}

impl Pass {
    /// Everything it tried, it did.
    pub fn clean(&self) -> bool {
        self.failures.is_empty() && self.port_failures.is_empty()
    }
}

/// The daemon's state between passes.
pub struct Reconciler {
    config: NodeConfig,
    kernel: Kernel,
    underlay_mtu: Option<(Ipv4Addr, u32)>,
    conflist: Option<String>,
}

impl Reconciler {
    pub fn new(config: NodeConfig, kernel: Kernel) -> Reconciler {
        Reconciler {
            config,
            kernel,
            underlay_mtu: None,
            conflist: None,
        }
    }

    /// Pod MTU: configured, or the underlay interface's MTU minus the VXLAN overhead.
    async fn mtu(&mut self, node_ip: Ipv4Addr) -> Result<u32, KernelError> {
        if let Some(mtu) = self.config.mtu {
            return Ok(mtu);
        }
        if let Some((ip, mtu)) = self.underlay_mtu {
            if ip == node_ip {
                return Ok(mtu - VXLAN_OVERHEAD);
            }
        }
        let mtu = self.kernel.mtu_of_address(node_ip).await?.ok_or_else(|| {
            KernelError::Setup(format!(
                "node IP {node_ip} is on no interface here, so the MTU cannot be derived; set mtu"
            ))
        })?;
        self.underlay_mtu = Some((node_ip, mtu));
        Ok(mtu - VXLAN_OVERHEAD)
    }

    /// One pass over `model`.
    pub async fn reconcile(&mut self, model: &ClusterModel) -> Result<Pass, KernelError> {
        let mut pass = Pass::default();
        let Some(found) = model.nodes.get(&self.config.node_name) else {
            let object = format!("Node/{}", self.config.node_name);
            pass.waiting = Some(match model.skipped.iter().find(|s| s.object == object) {
                Some(s) => format!("waiting: {object} is not usable yet: {}", s.reason),
                None => format!(
                    "waiting for {object} with a podCIDR and an InternalIP in the cluster source"
                ),
            });
            return Ok(pass);
        };
        let local = ClusterNode {
            ip: self.config.node_ip.unwrap_or(found.ip),
            ..found.clone()
        };
        let mtu = self.mtu(local.ip).await?;
        let gateway = Ipv4Net::new(local.subnet.gateway(), local.subnet.0.prefix_len())
            .expect("prefix of a subnet");
        let spec = DeviceSpec {
            gateway,
            vtep: local.subnet.vtep_ip(),
            mtu,
            vni: self.config.vni,
            port: self.config.vxlan_port,
            local_ip: local.ip,
        };

        assert_sysctls()?;
        let (devices, changes) = self.kernel.ensure_devices(&spec).await?;
        pass.device_changes = changes;

        let want = overlay::desired(&local, model.nodes.values());
        pass.remote_nodes = want.routes.len();
        let have = self
            .kernel
            .observe(devices.vxlan, self.config.cluster_network)
            .await?;
        let actions = overlay::diff(&want, &have);
        pass.failures = self.kernel.apply(devices.vxlan, &actions).await;
        pass.applied = actions
            .into_iter()
            .filter(|a| !pass.failures.iter().any(|(f, _)| f == a))
            .collect();

        self.repair_ports(devices.bridge, mtu, &mut pass).await?;

        // The kubelet calls the plugin only once the conflist exists: write it when the node
        // network is programmed, never before.
        if pass.failures.is_empty() {
            pass.conflist_written = self.write_conflist(&local, gateway.addr(), mtu)?;
        }
        Ok(pass)
    }

    /// Puts every local pod's veth back on tun0 where it is not (tun0 re-created, a port
    /// detached by hand), with hairpin mode and the MTU.
    async fn repair_ports(
        &mut self,
        bridge: u32,
        mtu: u32,
        pass: &mut Pass,
    ) -> Result<(), KernelError> {
        let dir = self.config.ipam_dir();
        let allocations = rsdn_cni::ipam::read_allocations(&dir).map_err(|e| {
            KernelError::Setup(format!(
                "cannot read the pods' IPAM records in {}: {e}",
                dir.display()
            ))
        })?;
        let ports = ports::pod_ports(&allocations);
        pass.pod_ports = ports.len();
        if ports.is_empty() {
            return Ok(());
        }
        let links = self.kernel.links().await?;
        for r in ports::repairs(&ports, &links, bridge, mtu) {
            match self.kernel.repair_port(bridge, &r).await {
                Ok(()) => pass.port_repairs.push(r),
                Err(e) => pass.port_failures.push((r, e)),
            }
        }
        Ok(())
    }

    fn write_conflist(
        &mut self,
        local: &ClusterNode,
        gateway: Ipv4Addr,
        mtu: u32,
    ) -> Result<bool, KernelError> {
        let mut list = conflist(
            local.subnet.0,
            gateway,
            mtu,
            BRIDGE,
            &ConflistOptions::default(),
        );
        if let Some(dir) = &self.config.cni_data_dir {
            list["plugins"][0]["dataDir"] = serde_json::json!(dir);
        }
        let text = serde_json::to_string_pretty(&list).expect("JSON serializes") + "\n";
        let path = self.config.cni_conf_path();
        // A restarted daemon finds its own file and leaves it be.
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            self.conflist = Some(text);
            return Ok(false);
        }
        write_atomically(&path, &text)
            .map_err(|e| KernelError::Setup(format!("cannot write {}: {e}", path.display())))?;
        self.conflist = Some(text);
        Ok(true)
    }
}

/// Temp file in the same directory, then rename: a reader sees the old file or the new one.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("rsdn")
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
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
    let proxy_metrics = ProxyMetrics::register(&mut registry);
    let overlay_metrics = OverlayMetrics::register(&mut registry);
    if let Some(addr) = config.healthz_bind_address {
        crate::http::serve(addr, health.clone(), Arc::new(registry))
            .await
            .with_context(|| format!("cannot serve /healthz on {addr}"))?;
    }
    let kernel = Kernel::connect()?;
    let scope = ModelScope {
        cluster_network: config.cluster_network,
        local_node: config.node_name.clone(),
        programmed: programmed_claims(&kernel, config.cluster_network).await,
    };
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
    let wake = Arc::new(Notify::new());
    tokio::spawn(overlay::monitor::run(wake.clone()));
    tokio::spawn(proxy_loop(
        config.clone(),
        model_rx.clone(),
        proxy_metrics,
        health.clone(),
    ));

    let mut reconciler = Reconciler::new(config, kernel);
    let mut last_waiting: Option<String> = None;
    // The model of the last clean pass: changes made on the same model repair drift.
    let mut programmed: Option<Arc<ClusterModel>> = None;
    loop {
        let model = Arc::clone(&model_rx.borrow_and_update());
        if !programmed.as_ref().is_some_and(|p| Arc::ptr_eq(p, &model)) {
            overlay_metrics.model(&model);
        }
        let started = Instant::now();
        let next = match reconciler.reconcile(&model).await {
            Ok(pass) => {
                let took = started.elapsed();
                report(&pass, &model, took, &mut last_waiting);
                let drift = programmed.as_ref().is_some_and(|p| Arc::ptr_eq(p, &model));
                overlay_metrics.passed(PassFigures {
                    seconds: took.as_secs_f64(),
                    remote_nodes: pass.remote_nodes,
                    changes: pass.applied.len() + pass.device_changes.len(),
                    drift,
                    kernel_errors: pass.failures.len() + pass.port_failures.len(),
                    pod_ports: pass.pod_ports,
                    port_repairs: pass.port_repairs.len(),
                });
                let clean = pass.clean();
                health.overlay_passed(
                    pass.waiting.clone(),
                    clean && pass.waiting.is_none() && reconciler.conflist.is_some(),
                );
                programmed = (clean && pass.waiting.is_none()).then(|| Arc::clone(&model));
                tokio::time::Instant::now() + if clean { resync } else { RETRY }
            }
            Err(e) => {
                error!(error = %e, "reconcile failed; retrying");
                overlay_metrics.pass_failed();
                health.overlay_failed(e.to_string());
                programmed = None;
                tokio::time::Instant::now() + RETRY
            }
        };
        tokio::select! {
            r = model_rx.changed() => if r.is_err() { warn!("cluster source stopped"); },
            _ = wake.notified() => tokio::time::sleep(EVENT_DEBOUNCE).await,
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut shutdown => {
                info!("shutting down; the datapath stays in place");
                return Ok(());
            }
        }
    }
}

/// The subnet claims (pod subnet -> node IP) the kernel holds from an earlier run; none when
/// vxlan0 does not exist yet. Read before the cluster source starts: a restarted daemon has no
/// previous model, and a newcomer must not take over a subnet whose traffic already flows.
pub async fn programmed_claims(
    kernel: &Kernel,
    cluster_network: Ipv4Net,
) -> BTreeMap<Ipv4Net, Ipv4Addr> {
    let observed = match kernel.vxlan_index().await {
        Ok(Some(vxlan)) => kernel
            .observe(vxlan, cluster_network)
            .await
            .map(|e| e.claims()),
        Ok(None) => Ok(BTreeMap::new()),
        Err(e) => Err(e),
    };
    match observed {
        Ok(claims) => {
            info!(claims = claims.len(), "subnet claims found in the kernel");
            claims
        }
        Err(e) => {
            warn!(error = %e, "cannot read the overlay entries of an earlier run; subnet claims count as established from the first model on");
            BTreeMap::new()
        }
    }
}

/// The Service proxy and egress masquerade, on their own task: an iptables-restore can take
/// seconds on a large table and must not hold up the overlay. Syncs when the Services change,
/// in full when due, and retries with backoff after a failure.
async fn proxy_loop(
    config: NodeConfig,
    mut models: watch::Receiver<Arc<ClusterModel>>,
    metrics: ProxyMetrics,
    health: Arc<Health>,
) {
    let configured = match config.iptables_backend {
        IptablesBackend::Auto => None,
        IptablesBackend::Nft => Some(Backend::Nft),
        IptablesBackend::Legacy => Some(Backend::Legacy),
    };
    let (backend, why) = match configured {
        Some(b) => (b, "configured".to_string()),
        None => tokio::task::spawn_blocking(iptables::detect)
            .await
            .unwrap_or((Backend::Nft, "detection failed".into())),
    };
    info!(backend = backend.name(), reason = %why, proxy = config.proxy, "iptables backend");
    let ipt = Iptables { backend };
    let resync = Duration::from_secs(config.resync_seconds);
    let full_every = Duration::from_secs(config.proxy_full_sync_seconds);
    let mut proxier: Option<Proxier> = None;
    let mut health_checks = HealthCheckServers::new(health.clone());
    loop {
        let model = Arc::clone(&models.borrow_and_update());
        let mut next = tokio::time::Instant::now() + resync;
        if let Some(local) = model.nodes.get(&config.node_name) {
            let scope = ProxyScope {
                cluster_network: config.cluster_network,
                service_network: config.service_network,
                masquerade_bit: config.masquerade_bit,
                node_name: config.node_name.clone(),
                node_ip: config.node_ip.unwrap_or(local.ip),
                proxy: config.proxy,
            };
            let mut p = proxier
                .take()
                .unwrap_or_else(|| Proxier::new(ipt, scope.clone(), full_every, metrics.clone()));
            p.set_scope(scope);
            let for_sync = Arc::clone(&model);
            let health = health.clone();
            let (p, outcome) = tokio::task::spawn_blocking(move || {
                let services = &for_sync.services;
                if p.retry_at().is_some_and(|t| t > Instant::now()) {
                    return (p, None);
                }
                let full = p.full_due();
                if !full && !p.changed(services) {
                    return (p, None);
                }
                health.proxy_pending();
                let r = p.sync(services, full);
                match &r {
                    Ok(_) => health.proxy_synced(),
                    Err(e) => health.proxy_failed(e.to_string()),
                }
                (p, Some(r))
            })
            .await
            .expect("proxy sync does not panic");
            match outcome {
                Some(Ok(r)) if r.lines > 0 || !r.jumps_added.is_empty() => info!(
                    full = r.full,
                    lines = r.lines,
                    compute_ms = r.compute.as_millis() as u64,
                    restore_ms = r.restore.as_millis() as u64,
                    checks_ms = r.checks.as_millis() as u64,
                    jumps_added = r.jumps_added.len(),
                    udp_flows_cleared = r.conntrack_flows_cleared,
                    "iptables synced"
                ),
                Some(Err(e)) => error!(error = %e, "iptables sync failed"),
                _ => {}
            }
            if let Some(t) = p.retry_at() {
                next = next.min(tokio::time::Instant::from_std(t));
            }
            proxier = Some(p);
            // The health check node ports are ours only where we are the proxy; with
            // --proxy=false kube-proxy serves them.
            if config.proxy {
                health_checks
                    .sync(&healthcheck::wanted(&model.services, &config.node_name))
                    .await;
            }
        }
        tokio::select! {
            r = models.changed() => if r.is_err() { return; },
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// One log line per change applied; nothing for a pass that changed nothing.
fn report(pass: &Pass, model: &ClusterModel, took: Duration, last_waiting: &mut Option<String>) {
    if pass.waiting != *last_waiting {
        if let Some(w) = &pass.waiting {
            warn!("{w}");
        }
        *last_waiting = pass.waiting.clone();
    }
    let names: BTreeMap<Ipv4Addr, &str> = model
        .nodes
        .values()
        .map(|n| (n.subnet.vtep_ip(), n.name.as_str()))
        .collect();
    let node_of = |a: &Action| -> &str {
        let ip = match a {
            Action::SetNeigh(ip, _) | Action::DelNeigh(ip) => Some(*ip),
            Action::SetRoute(d, _) | Action::DelRoute(d) => Some(d.network()),
            Action::SetFdb(..) | Action::DelFdb(..) => None,
        };
        ip.and_then(|ip| names.get(&ip).copied()).unwrap_or("-")
    };
    for c in &pass.device_changes {
        info!(change = %c, "device");
    }
    for a in &pass.applied {
        info!(node = node_of(a), "{a}");
    }
    for (a, e) in &pass.failures {
        error!(node = node_of(a), error = %e, "failed: {a}");
    }
    for r in &pass.port_repairs {
        warn!(pod_ip = %r.ip, veth = %r.veth, "pod port repaired: {r}");
    }
    for (r, e) in &pass.port_failures {
        error!(pod_ip = %r.ip, veth = %r.veth, error = %e, "pod port repair failed: {r}");
    }
    if pass.conflist_written {
        info!("CNI configuration written; the node network is ready");
    }
    if !pass.applied.is_empty() || !pass.device_changes.is_empty() || !pass.port_repairs.is_empty()
    {
        info!(
            remote_nodes = pass.remote_nodes,
            changes = pass.applied.len(),
            pod_ports_repaired = pass.port_repairs.len(),
            took_ms = took.as_millis() as u64,
            "overlay reconciled"
        );
    }
}
