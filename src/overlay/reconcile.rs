//! The overlay's reconcile loop: it wakes on a new cluster model, on netlink events that may
//! mean drift, and on a periodic resync; each pass makes the devices right, diffs the overlay
//! entries against the kernel, applies only the difference, puts the pods' veths back on tun0
//! where they fell off, and (once the network is programmed) writes the CNI conflist.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use super::kernel::{DeviceSpec, KernelError, OverlayKernel};
use super::metrics::{OverlayMetrics, PassFigures};
use super::ports::{self, PortRepair};
use super::{Action, BRIDGE};
use crate::cniconf::{conflist, ConflistOptions};
use crate::config::{NodeConfig, VXLAN_OVERHEAD};
use crate::health::{Health, Loop, OverlayPass};
use crate::model::{ClusterModel, ClusterNode};
use crate::overlay;

/// How long netlink events are collected before a reconcile runs (a burst is one pass).
const EVENT_DEBOUNCE: Duration = Duration::from_millis(50);
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
    /// Plugins the conflist chains whose binaries are not in the CNI binary directory (None:
    /// not looked for, the conflist was not written).
    pub missing_plugins: Option<Vec<PathBuf>>,
}

impl Pass {
    /// Everything it tried, it did.
    pub fn clean(&self) -> bool {
        self.failures.is_empty() && self.port_failures.is_empty()
    }

    /// What the kernel refused, in one line (None: nothing).
    pub fn failure_summary(&self) -> Option<String> {
        let mut all: Vec<String> = self
            .failures
            .iter()
            .map(|(a, e)| format!("{a}: {e}"))
            .chain(self.port_failures.iter().map(|(r, e)| format!("{r}: {e}")))
            .collect();
        let n = all.len();
        all.truncate(3);
        (n > 0).then(|| {
            let more = if n > 3 {
                format!(" (and {} more)", n - 3)
            } else {
                String::new()
            };
            format!("{n} request(s) refused: {}{more}", all.join("; "))
        })
    }
}

/// The daemon's state between passes.
pub struct Reconciler<K: OverlayKernel> {
    config: NodeConfig,
    kernel: K,
    underlay_mtu: Option<(Ipv4Addr, u32)>,
    conflist: Option<String>,
}

impl<K: OverlayKernel> Reconciler<K> {
    pub fn new(config: NodeConfig, kernel: K) -> Reconciler<K> {
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

        self.kernel.sysctls().await?;
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
            pass.conflist_written = self.write_conflist(&local, gateway.addr(), mtu, &mut pass)?;
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
        pass: &mut Pass,
    ) -> Result<bool, KernelError> {
        let opts = ConflistOptions {
            portmap: self.config.portmap,
            cni_version: None,
        };
        let mut list = conflist(local.subnet.0, gateway, mtu, BRIDGE, &opts);
        if let Some(dir) = &self.config.cni_data_dir {
            list["plugins"][0]["dataDir"] = serde_json::json!(dir);
        }
        pass.missing_plugins = Some(crate::cniconf::missing_plugins(
            &list,
            &self.config.cni_bin_dir,
        ));
        let text = serde_json::to_string_pretty(&list).expect("JSON serializes") + "\n";
        let path = self.config.cni_conf_path();
        let written = crate::cniconf::write_if_changed(&path, &text)
            .map_err(|e| KernelError::Setup(format!("cannot write {}: {e}", path.display())))?;
        self.conflist = Some(text);
        Ok(written)
    }

    /// Whether the conflist is in place (the node network was programmed once).
    pub fn ready(&self) -> bool {
        self.conflist.is_some()
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }
}

/// What the loop reports to: health, the metrics, and (`ready`, set true once) whoever waits
/// for the node network to be programmed: the Node's condition (`node_status`).
pub struct Reports {
    pub health: Arc<Health>,
    pub metrics: OverlayMetrics,
    pub ready: watch::Sender<bool>,
}

/// Runs reconcile passes until `shutdown` resolves: on every new model, on netlink events
/// (`wake`), every `resync`, and a second after a failed pass. The datapath stays when it ends.
pub async fn run<K: OverlayKernel>(
    mut reconciler: Reconciler<K>,
    mut model_rx: watch::Receiver<Arc<ClusterModel>>,
    wake: Arc<Notify>,
    resync: Duration,
    reports: Reports,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let Reports {
        health,
        metrics: overlay_metrics,
        ready,
    } = reports;
    tokio::pin!(shutdown);
    let mut last_waiting: Option<String> = None;
    let mut missing_plugins: Vec<PathBuf> = Vec::new();
    // The model of the last clean pass: changes made on the same model repair drift.
    let mut programmed: Option<Arc<ClusterModel>> = None;
    // The source's channel closed: the last model stays, passes go on repairing drift, and
    // /livez asks for a restart that brings the source back.
    let mut source_gone = false;
    loop {
        health.alive(Loop::Overlay, Instant::now());
        let model = Arc::clone(&model_rx.borrow_and_update());
        if !programmed.as_ref().is_some_and(|p| Arc::ptr_eq(p, &model)) {
            overlay_metrics.model(&model);
            health.conflicts(
                model
                    .conflicts()
                    .map(|s| format!("{}: {}", s.object, s.reason))
                    .collect(),
            );
            let leaving = model.local_lifecycle.as_ref().and_then(|l| l.leaving());
            if health.node_leaving(leaving.clone()) {
                match leaving {
                    Some(why) => warn!(reason = %why, "the node is going away: /healthz answers 503 so that load balancers send it no new connections"),
                    None => info!("the node takes new connections again: /healthz no longer answers 503 for it"),
                }
            }
        }
        let started = Instant::now();
        let next = match reconciler.reconcile(&model).await {
            Ok(pass) => {
                let took = started.elapsed();
                report(&pass, &model, took, &mut last_waiting);
                if let Some(now) = &pass.missing_plugins {
                    report_missing_plugins(&mut missing_plugins, now, &health);
                }
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
                let network_ready = clean && pass.waiting.is_none() && reconciler.ready();
                if network_ready {
                    ready.send_if_modified(|r| !std::mem::replace(r, true));
                }
                health.overlay_passed(
                    OverlayPass {
                        waiting: pass.waiting.clone(),
                        ready: network_ready,
                        failed: pass.failure_summary(),
                        pod_ports: pass.pod_ports,
                        pods_repaired: pass.port_repairs.len(),
                    },
                    Instant::now(),
                );
                programmed = (clean && pass.waiting.is_none()).then(|| Arc::clone(&model));
                tokio::time::Instant::now() + if clean { resync } else { RETRY }
            }
            Err(e) => {
                error!(error = %e, "reconcile failed; retrying");
                overlay_metrics.pass_failed();
                health.overlay_failed(e.to_string(), Instant::now());
                programmed = None;
                tokio::time::Instant::now() + RETRY
            }
        };
        tokio::select! {
            r = model_rx.changed(), if !source_gone => if r.is_err() {
                error!("the cluster source stopped; the last model stays programmed");
                health.stopped(Loop::Source, "the cluster source stopped publishing".into(), Instant::now());
                source_gone = true;
            },
            _ = wake.notified() => tokio::time::sleep(EVENT_DEBOUNCE).await,
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut shutdown => {
                info!("shutting down; the datapath stays in place");
                return;
            }
        }
    }
}

/// The subnet claims (pod subnet -> node IP) the kernel holds from an earlier run; none when
/// vxlan0 does not exist yet. Read before the cluster source starts: a restarted daemon has no
/// previous model, and a newcomer must not take over a subnet whose traffic already flows.
pub async fn programmed_claims(
    kernel: &impl OverlayKernel,
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

/// Says once, in the log and in /healthz's notes, that the conflist chains a plugin whose
/// binary is missing (and once that it arrived). Not a failure of the daemon: a restart would
/// not install it. Returns whether it said anything.
fn report_missing_plugins(last: &mut Vec<PathBuf>, now: &[PathBuf], health: &Health) -> bool {
    if last == now {
        return false;
    }
    if now.is_empty() {
        info!("the CNI plugins the conflist chains are all installed now");
        health.setup_note("cni plugins", None);
    } else {
        let paths: Vec<String> = now.iter().map(|p| p.display().to_string()).collect();
        let note = format!(
            "the conflist chains plugins missing from the CNI binary directory: {}; the runtime \
             fails every pod's network setup until they are installed (the CNI reference \
             plugins), or set portmap: false",
            paths.join(", ")
        );
        warn!(missing = %paths.join(", "), "{note}");
        health.setup_note("cni plugins", Some(note));
    }
    *last = now.to_vec();
    true
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{model, three};
    use crate::overlay::fake::FakeKernel;

    fn setup() -> (Reconciler<FakeKernel>, FakeKernel, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::for_test("a");
        config.cni_conf_dir = dir.path().join("net.d");
        config.cni_data_dir = Some(dir.path().join("ipam"));
        config.cni_bin_dir = dir.path().join("bin");
        let k = FakeKernel::new("192.168.1.11");
        (Reconciler::new(config, k.clone()), k, dir)
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn nothing_is_programmed_while_the_local_node_has_no_pod_cidr() {
        let (mut r, k, dir) = setup();
        let mut m = model(&three()[1..]);
        m.skipped.push(crate::model::Skipped {
            object: "Node/a".into(),
            reason: "no podCIDR yet".into(),
            conflicts_with: None,
        });
        let pass = run(r.reconcile(&m)).unwrap();
        assert_eq!(
            pass.waiting.as_deref(),
            Some("waiting: Node/a is not usable yet: no podCIDR yet")
        );
        assert!(k.with(|s| s.bridge.is_none() && s.vxlan.is_none() && s.sysctl_calls == 0));
        assert!(!dir.path().join("net.d").exists() && !r.ready());
        // The podCIDR arrives: everything at once, conflist last.
        let pass = run(r.reconcile(&model(&three()))).unwrap();
        assert!(pass.waiting.is_none() && pass.clean() && pass.conflist_written);
        assert_eq!((pass.remote_nodes, pass.applied.len()), (2, 6));
        assert!(r.ready());
    }

    #[test]
    fn an_unchanged_kernel_is_left_alone_and_drift_is_repaired() {
        let (mut r, k, _dir) = setup();
        let m = model(&three());
        run(r.reconcile(&m)).unwrap();
        let again = run(r.reconcile(&m)).unwrap();
        assert!(
            again.applied.is_empty() && again.device_changes.is_empty() && !again.conflist_written
        );
        k.with(|s| s.entries.routes.clear());
        let repaired = run(r.reconcile(&m)).unwrap();
        assert_eq!(repaired.applied.len(), 2, "{:?}", repaired.applied);
        assert!(repaired
            .applied
            .iter()
            .all(|a| matches!(a, Action::SetRoute(..))));
    }

    #[test]
    fn a_refused_entry_keeps_the_conflist_unwritten_until_it_goes_through() {
        let (mut r, k, dir) = setup();
        let m = model(&three());
        let refused = "route replace 10.128.4.0/23 via 10.128.4.0 dev vxlan0 onlink src 10.128.0.1";
        k.with(|s| s.refuse.insert(refused.into()));
        let pass = run(r.reconcile(&m)).unwrap();
        assert_eq!(pass.failures.len(), 1);
        assert_eq!(pass.failures[0].0.to_string(), refused);
        assert!(!pass.clean() && !r.ready());
        assert!(!dir.path().join("net.d").exists());
        k.with(|s| s.refuse.clear());
        let pass = run(r.reconcile(&m)).unwrap();
        assert!(pass.clean() && pass.conflist_written && r.ready());
        assert_eq!(pass.applied.len(), 1);
    }

    #[test]
    fn the_conflist_chains_portmap_and_a_missing_binary_is_said_once() {
        let (mut r, _k, dir) = setup();
        let m = model(&three());
        let pass = run(r.reconcile(&m)).unwrap();
        let list: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("net.d/10-rsdn.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(list["plugins"][1]["type"], "portmap");
        assert_eq!(list["plugins"][1]["capabilities"]["portMappings"], true);
        let missing = pass.missing_plugins.unwrap();
        assert_eq!(missing, [dir.path().join("bin/portmap")]);

        let health = Health::new(Duration::from_secs(5));
        let mut last = Vec::new();
        assert!(report_missing_plugins(&mut last, &missing, &health));
        assert!(
            !report_missing_plugins(&mut last, &missing, &health),
            "once"
        );
        let notes = health.healthz(Instant::now()).notes;
        assert!(
            notes.len() == 1 && notes[0].contains("bin/portmap"),
            "{notes:?}"
        );
        // Installed: said once, and the note goes.
        assert!(report_missing_plugins(&mut last, &[], &health));
        assert!(health.healthz(Instant::now()).notes.is_empty());

        // portmap: false, a conflist of our plugin alone.
        let (mut r, _k, dir) = setup();
        r.config.portmap = false;
        let pass = run(r.reconcile(&m)).unwrap();
        let text = std::fs::read_to_string(dir.path().join("net.d/10-rsdn.conflist")).unwrap();
        assert!(!text.contains("portmap"), "{text}");
        assert_eq!(pass.missing_plugins, Some(vec![]));
    }

    #[test]
    fn a_recreated_bridge_gets_its_pods_back_and_a_vanished_pod_is_left_alone() {
        let (mut r, k, dir) = setup();
        let m = model(&three());
        run(r.reconcile(&m)).unwrap();
        let store = dir.path().join("ipam").join("rsdn");
        std::fs::create_dir_all(&store).unwrap();
        for (ip, id) in [
            ("10.128.0.2", "p1"),
            ("10.128.0.3", "p2"),
            ("10.128.0.4", "gone"),
        ] {
            std::fs::write(store.join(ip), format!("{id}\r\neth0")).unwrap();
        }
        for id in ["p1", "p2"] {
            k.add_pod_veth(&rsdn_cni::names::host_veth_name(id, "eth0"), 1450);
        }
        assert!(run(r.reconcile(&m)).unwrap().port_repairs.is_empty());
        k.delete_bridge();
        let pass = run(r.reconcile(&m)).unwrap();
        assert_eq!(pass.device_changes, ["created bridge tun0"]);
        assert_eq!((pass.pod_ports, pass.port_repairs.len()), (3, 2));
        let bridge = k.with(|s| s.bridge.as_ref().unwrap().0);
        assert!(k.with(|s| s
            .links
            .iter()
            .all(|l| l.master == Some(bridge) && l.hairpin == Some(true))));
        assert!(pass.clean());
    }
}
