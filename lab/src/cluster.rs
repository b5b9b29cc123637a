//! `rsdn lab` (the `rsdn-lab` binary): a simulated cluster on this machine, made only of network
//! namespaces. With the lab named `L` (`RSDN_LAB`, default `rsdn-lab`):
//!
//! ```text
//!   L-underlay: bridge br0 ─┬─ L-node1 eth0 192.168.77.11  (rsdn node, tun0, vxlan0)
//!                           ├─ L-node2 eth0 192.168.77.12     └─ L-node1-pod1, L-pod.x.a ...
//!                           ├─ ...
//!                           └─ L-ext   eth0 192.168.77.250 (a host outside the cluster)
//! ```
//! Each node runs the real `rsdn node` (the `rsdn` binary next to `rsdn-lab`) with a `dir`
//! source the lab writes (a Node object per node, a Pod per pod, a Namespace per namespace
//! under /run/L/cluster), and pods are attached with the real `rsdn-cni`, called as a runtime
//! calls it, with the conflist the daemon wrote. The root namespace is never touched; the
//! addresses are the same in every lab, each lab having its own underlay.
//! Everything the lab makes is a namespace it owns (`Lab::owns`), a process in one of them or
//! named in its state directory, or a file under /run/L, so `down` cleans up after a crash
//! half-way and never touches another lab.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::lab::Lab;
use crate::netns::{self, alive, ip};
use crate::objects::{format_labels, Labels, PodRecord};
use crate::{check, serve, workloads};

pub const EXTERNAL_IP: &str = "192.168.77.250";
/// Port of the stand-in API server on the outside host (`lab up --api`).
const API_PORT: u16 = 6443;

pub fn node_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, 10 + i as u8)
}
fn node_subnet(i: u32) -> String {
    format!("10.128.{}.0/23", 2 * (i - 1))
}
/// `node3` -> 3.
pub fn node_index(name: &str) -> Option<u32> {
    name.strip_prefix("node")?.parse().ok().filter(|i| *i > 0)
}

#[derive(Debug, Serialize)]
struct NodeStatus {
    name: String,
    namespace: String,
    ip: Ipv4Addr,
    subnet: String,
    daemon_pid: Option<i32>,
    daemon_running: bool,
    network_ready: bool,
    tunnels_complete: String,
    log: PathBuf,
}

/// A pod as `lab status` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus<'a> {
    #[serde(flatten)]
    record: &'a PodRecord,
    /// `<namespace>/<name>`, what `lab pod ...`, `lab probe` and `lab reach` take.
    pod: String,
    serving: bool,
}

#[derive(Debug, Serialize)]
struct NamespaceStatus {
    name: String,
    labels: Labels,
}

/// This binary, for the processes it starts (API server, servers in pods).
pub fn lab_exe() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the rsdn-lab binary")
}

/// A binary of the same build, next to this one (target/debug, or target/dist after
/// `hack/build.sh --lab`): rsdn-lab always drives the rsdn and rsdn-cni it was built with.
fn beside_me(name: &str, how_to_build: &str) -> Result<PathBuf> {
    let p = lab_exe()?.with_file_name(name);
    if !p.exists() {
        bail!("{} not found; {how_to_build}", p.display());
    }
    Ok(p)
}

/// The `rsdn` the nodes run.
fn rsdn_exe() -> Result<PathBuf> {
    beside_me("rsdn", "build it with rsdn-lab (cargo build --workspace)")
}

fn cni_exe() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RSDN_CNI") {
        return Ok(PathBuf::from(p));
    }
    beside_me(
        rsdn::install::PLUGIN,
        "build it (cargo build --workspace, hack/build.sh --lab) or set RSDN_CNI",
    )
}

fn daemon_pid(lab: &Lab, i: u32) -> Option<i32> {
    std::fs::read_to_string(lab.node_dir(i).join("rsdn.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn node_count(lab: &Lab) -> u32 {
    (1..).take_while(|i| netns::exists(&lab.node(*i))).count() as u32
}

/// The lab must be up for this command.
pub fn require_up(lab: &Lab) -> Result<u32> {
    let n = node_count(lab);
    if n == 0 || !lab.state_dir_is_ours() {
        bail!(
            "lab {} is not up (rsdn lab up; the lab is named by {})",
            lab.name(),
            crate::lab::ENV
        );
    }
    Ok(n)
}

pub fn up(lab: &Lab, nodes: u32, pods_per_node: u32, api: bool) -> Result<()> {
    if nodes == 0 || nodes > 100 {
        bail!("--nodes must be 1..=100");
    }
    // The binaries the nodes run, found before anything is created.
    rsdn_exe()?;
    cni_exe()?;
    lab.claim_state_dir()?;
    let _lock = workloads::lock(lab)?;
    std::fs::create_dir_all(lab.cluster_dir())?;
    if api {
        std::fs::write(
            lab.kubeconfig(),
            rsdn_lab::apiserver::kubeconfig(&format!("http://{EXTERNAL_IP}:{API_PORT}")),
        )?;
    }
    let underlay = lab.underlay();
    if netns::ensure(&underlay)? {
        ip(&["-n", &underlay, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &underlay, "link", "set", "br0", "up"])?;
    }
    if netns::ensure(&lab.external())? {
        attach_to_underlay(lab, &lab.external(), "ext", &format!("{EXTERNAL_IP}/24"))?;
    }
    if lab.kubeconfig().exists() {
        start_apiserver(lab)?;
    }
    workloads::ensure_default_namespace(lab)?;
    for i in 1..=nodes {
        let ns = lab.node(i);
        if netns::ensure(&ns)? {
            attach_to_underlay(lab, &ns, &format!("n{i}"), &format!("{}/24", node_ip(i)))?;
            // Like a real node, a default route (the outside host plays the upstream router):
            // traffic to a Service without endpoints must reach the FORWARD chain's REJECT.
            ip(&["-n", &ns, "route", "add", "default", "via", EXTERNAL_IP])?;
        }
        write_node_object(lab, i)?;
        start_daemon(lab, i)?;
    }
    for i in 1..=nodes {
        wait_ready(lab, i, Duration::from_secs(30))?;
        for j in 1..=pods_per_node {
            workloads::ensure_node_pod(lab, i, j)?;
        }
    }
    workloads::write_all_objects(lab)?;
    wait_converged(lab, node_count(lab), Duration::from_secs(30))?;
    check::verify(lab)?;
    status(lab, false)
}

/// A host on the lab's underlay: a veth into br0 with `addr`.
fn attach_to_underlay(lab: &Lab, ns: &str, port: &str, addr: &str) -> Result<()> {
    let underlay = lab.underlay();
    ip(&[
        "-n", &underlay, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", &underlay, "link", "set", port, "master", "br0", "up"])?;
    ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])
}

/// Waits until every node holds a complete tunnel to every other node.
fn wait_converged(lab: &Lab, nodes: u32, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let want = format!("{0}/{0}", nodes - 1);
    loop {
        let behind: Vec<String> = (1..=nodes)
            .filter_map(|i| {
                let t = tunnels(lab, i);
                (t != want).then(|| format!("node{i} has {t}"))
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "the overlay did not converge within {timeout:?} (want {want} complete tunnels: {}); see rsdn lab status and the daemon logs",
                behind.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_node_object(lab: &Lab, i: u32) -> Result<()> {
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node{i}\nspec:\n  podCIDR: {subnet}\n  podCIDRs: [{subnet}]\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n  - type: Hostname\n    address: node{i}\n",
        subnet = node_subnet(i),
        ip = node_ip(i)
    );
    rsdn::cniconf::write_atomically(&lab.cluster_dir().join(format!("node{i}.yaml")), &yaml)?;
    Ok(())
}

fn start_daemon(lab: &Lab, i: u32) -> Result<()> {
    if daemon_pid(lab, i).is_some_and(alive) {
        return Ok(());
    }
    let dir = lab.node_dir(i);
    std::fs::create_dir_all(&dir)?;
    install_cni(lab, i)?;
    let source = if lab.kubeconfig().exists() {
        format!("kubeconfig: {}", lab.kubeconfig().display())
    } else {
        format!("clusterDir: {}", lab.cluster_dir().display())
    };
    // The lab wires pods with the conflist's first plugin only (`lab pod`), never with portmap.
    let mut config = format!(
        "nodeName: node{i}\n{source}\ncniConfDir: {dir}/net.d\ncniDataDir: {dir}/ipam\n\
         cniBinDir: {bin}\nportmap: false\nresyncSeconds: 5\n",
        dir = dir.display(),
        bin = node_cni_bin(lab, i).display()
    );
    // A test's own options for this node (nodePortAddresses, ...), kept across restarts.
    if let Ok(extra) = std::fs::read_to_string(dir.join("config.extra.yaml")) {
        config.push_str(&extra);
    }
    std::fs::write(dir.join("config.yaml"), config)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("rsdn.log"))?;
    let mut cmd = netns::command(&lab.node(i), rsdn_exe()?)?;
    cmd.arg("node")
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let child = cmd.spawn().context("cannot start rsdn node")?;
    std::fs::write(dir.join("rsdn.pid"), child.id().to_string())?;
    Ok(())
}

/// The DaemonSet's init step, run the same way: `rsdn install-cni --prepare-host` in the node's
/// namespace copies the plugin into the node's CNI binary directory, which pods are then
/// attached with, and sets the node's sysctls. Its output goes to install-cni.log.
fn install_cni(lab: &Lab, i: u32) -> Result<()> {
    let log_path = lab.node_dir(i).join("install-cni.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let status = netns::command(&lab.node(i), rsdn_exe()?)?
        .arg("install-cni")
        .arg("--source")
        .arg(cni_exe()?)
        .arg("--bin-dir")
        .arg(node_cni_bin(lab, i))
        .arg("--prepare-host")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("cannot run rsdn install-cni")?;
    if !status.success() {
        bail!(
            "rsdn install-cni failed for node{i}: see {}",
            log_path.display()
        );
    }
    Ok(())
}

/// The node's CNI binary directory (its /opt/cni/bin).
pub fn node_cni_bin(lab: &Lab, i: u32) -> PathBuf {
    lab.node_dir(i).join("bin")
}

fn apiserver_pid_file(lab: &Lab) -> PathBuf {
    lab.state_dir().join("apiserver.pid")
}

/// The stand-in API server runs on the outside host, serving the cluster directory.
fn start_apiserver(lab: &Lab) -> Result<()> {
    if netns::running_pid(&apiserver_pid_file(lab)).is_some() {
        return Ok(());
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.state_dir().join("apiserver.log"))?;
    let mut cmd = netns::command(&lab.external(), lab_exe()?)?;
    cmd.args(["apiserver", "--bookmark-seconds", "1", "--listen"])
        .arg(format!("{EXTERNAL_IP}:{API_PORT}"))
        .arg("--dir")
        .arg(lab.cluster_dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let child = cmd.spawn().context("cannot start rsdn-lab apiserver")?;
    std::fs::write(apiserver_pid_file(lab), child.id().to_string())?;
    Ok(())
}

pub fn conflist_path(lab: &Lab, i: u32) -> PathBuf {
    lab.node_dir(i)
        .join("net.d")
        .join(rsdn::config::DEFAULT_CNI_CONF_FILE)
}

fn wait_ready(lab: &Lab, i: u32, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let log = lab.node_dir(i).join("rsdn.log");
    while !conflist_path(lab, i).exists() {
        if start.elapsed() > timeout {
            bail!(
                "node{i}: rsdn node did not write its CNI config within {timeout:?}; see {}",
                log.display()
            );
        }
        if !daemon_pid(lab, i).is_some_and(alive) {
            bail!("node{i}: rsdn node exited; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn tunnels(lab: &Lab, i: u32) -> String {
    let Ok(mut cmd) = netns::command(&lab.node(i), rsdn_exe().unwrap_or_default()) else {
        return "-".into();
    };
    let Ok(out) = cmd.args(["tunnel", "list", "-o", "json"]).output() else {
        return "-".into();
    };
    let Ok(rows) = serde_json::from_slice::<Vec<rsdn::tunnel::TunnelRow>>(&out.stdout) else {
        return "-".into();
    };
    format!(
        "{}/{}",
        rows.iter().filter(|r| r.complete()).count(),
        rows.len()
    )
}

pub fn status(lab: &Lab, json: bool) -> Result<()> {
    let n = require_up(lab)?;
    let nodes: Vec<NodeStatus> = (1..=n)
        .map(|i| {
            let pid = daemon_pid(lab, i);
            NodeStatus {
                name: format!("node{i}"),
                namespace: lab.node(i),
                ip: node_ip(i),
                subnet: node_subnet(i),
                daemon_pid: pid,
                daemon_running: pid.is_some_and(alive),
                network_ready: conflist_path(lab, i).exists(),
                tunnels_complete: tunnels(lab, i),
                log: lab.node_dir(i).join("rsdn.log"),
            }
        })
        .collect();
    let records = workloads::load_pods(lab);
    let pods: Vec<PodStatus> = records
        .iter()
        .map(|r| PodStatus {
            record: r,
            pod: r.pod_ref().to_string(),
            serving: serve::running(lab, r).is_some(),
        })
        .collect();
    let namespaces: Vec<NamespaceStatus> = workloads::load_namespaces(lab)
        .into_iter()
        .map(|ns| NamespaceStatus {
            labels: ns.object_labels(),
            name: ns.name,
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "lab": lab.name(),
                "stateDir": lab.state_dir(),
                "nodes": nodes,
                "pods": pods,
                "namespaces": namespaces,
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<8} {:<22} {:<15} {:<15} {:<16} {:<7} {:<8} LOG",
        "NODE", "NAMESPACE", "NODE IP", "POD SUBNET", "DAEMON", "READY", "TUNNELS"
    );
    for s in &nodes {
        let daemon = match (s.daemon_pid, s.daemon_running) {
            (Some(p), true) => format!("running ({p})"),
            (Some(p), false) => format!("DEAD ({p})"),
            (None, _) => "not started".into(),
        };
        println!(
            "{:<8} {:<22} {:<15} {:<15} {:<16} {:<7} {:<8} {}",
            s.name,
            s.namespace,
            s.ip,
            s.subnet,
            daemon,
            if s.network_ready { "yes" } else { "no" },
            s.tunnels_complete,
            s.log.display()
        );
    }
    println!();
    let rows: Vec<String> = pods.iter().map(|p| p.pod.clone()).collect();
    let cols: Vec<String> = ["NODE", "IP", "NETNS", "SERVING", "LABELS"]
        .map(String::from)
        .to_vec();
    print!(
        "{}",
        crate::table::grid("POD", &rows, &cols, |r, c| {
            let p = &pods[r];
            match c {
                0 => p.record.node.clone(),
                1 => p.record.ip.to_string(),
                2 => p.record.netns.clone(),
                3 => serving_column(p),
                _ => format_labels(&p.record.labels),
            }
        })
    );
    println!();
    let rows: Vec<String> = namespaces.iter().map(|n| n.name.clone()).collect();
    print!(
        "{}",
        crate::table::grid("NAMESPACE", &rows, &["LABELS".into()], |r, _| {
            format_labels(&namespaces[r].labels)
        })
    );
    println!();
    println!(
        "lab {}: state in {}; outside host {} ({EXTERNAL_IP}); underlay {} (bridge br0, 192.168.77.0/24)",
        lab.name(),
        lab.state_dir().display(),
        lab.external(),
        lab.underlay()
    );
    Ok(())
}

fn serving_column(p: &PodStatus) -> String {
    if p.record.ports.is_empty() {
        return "-".into();
    }
    let ports: Vec<String> = p
        .record
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.container_port, p.protocol))
        .collect();
    if p.serving {
        ports.join(",")
    } else {
        "no".into()
    }
}

/// Resolves a lab name to its namespace: nodeN, nodeN-podM, NS/POD, ext, underlay, or a full
/// namespace name of this lab.
pub fn resolve(lab: &Lab, name: &str) -> Result<String> {
    if let Ok(pod) = name.parse() {
        return Ok(workloads::find_pod(lab, &pod)?.netns);
    }
    let ns = match name {
        "ext" | "external" => lab.external(),
        "underlay" => lab.underlay(),
        n if lab.owns(n) => n.into(),
        n => format!("{}-{n}", lab.name()),
    };
    if !netns::exists(&ns) {
        bail!("lab {} has no namespace {ns}", lab.name());
    }
    Ok(ns)
}

pub fn exec(lab: &Lab, name: &str, command: &[String]) -> Result<()> {
    let ns = resolve(lab, name)?;
    let status = netns::command(&ns, &command[0])?
        .args(&command[1..])
        .status()
        .with_context(|| format!("cannot run {}", command[0]))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// Every process of this lab: `rsdn node` daemons and API servers whose arguments name a path
/// in the state directory (also with their pid files gone, after a crash), and whatever runs
/// in one of the lab's namespaces (pod servers, the tests' own servers).
fn lab_processes(lab: &Lab, owned: &[String]) -> Vec<i32> {
    let mut pids: Vec<i32> = (1..=100).filter_map(|i| daemon_pid(lab, i)).collect();
    pids.extend(netns::running_pid(&apiserver_pid_file(lab)));
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let args: Vec<&str> = cmdline.split('\0').collect();
            // `rsdn node --config <state>/nodeN/config.yaml`, and `rsdn-lab apiserver --dir
            // <state>/cluster` however it was started (also as `rsdn lab apiserver`).
            let ours = args
                .windows(2)
                .any(|w| matches!(w[0], "--config" | "--dir") && lab.is_state_path(w[1]))
                && (args.contains(&"node") || args.contains(&"apiserver"));
            if ours {
                pids.push(pid);
            }
        }
    }
    let inodes: HashSet<u64> = owned.iter().filter_map(|n| netns::inode(n)).collect();
    pids.extend(netns::processes_in(&inodes));
    let me = std::process::id() as i32;
    pids.retain(|p| *p != me && alive(*p));
    pids.sort();
    pids.dedup();
    pids
}

pub fn down(lab: &Lab) -> Result<()> {
    let owned: Vec<String> = netns::list().into_iter().filter(|n| lab.owns(n)).collect();
    let pids = lab_processes(lab, &owned);
    netns::terminate(&pids, Duration::from_secs(5));
    // Teardown keeps going past errors and reports them at the end.
    let mut errors = Vec::new();
    let mut removed = 0;
    for name in &owned {
        match netns::delete(name) {
            Ok(()) => removed += 1,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let dir = lab.state_dir();
    if lab.state_dir_is_ours() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("cannot remove {}: {e}", dir.display()));
        }
    } else if dir.exists() {
        errors.push(format!(
            "{} is not lab {}'s state directory: left alone",
            dir.display(),
            lab.name()
        ));
    }
    println!(
        "lab {} down: stopped {} process(es), removed {removed} namespace(s)",
        lab.name(),
        pids.len()
    );
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(())
}
