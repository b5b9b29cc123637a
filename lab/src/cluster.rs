//! `rsdn lab` (the `rsdn-lab` binary): a simulated cluster on this machine, made only of network
//! namespaces.
//!
//! ```text
//!   rsdn-lab-underlay: bridge br0 ─┬─ rsdn-lab-node1 eth0 192.168.77.11  (rsdn node, tun0, vxlan0)
//!                                  ├─ rsdn-lab-node2 eth0 192.168.77.12     └─ rsdn-lab-node1-pod1 ...
//!                                  ├─ ...
//!                                  └─ rsdn-lab-ext   eth0 192.168.77.250 (a host outside the cluster)
//! ```
//! Each node runs the real `rsdn node` (the `rsdn` binary next to `rsdn-lab`) with a `dir`
//! source the lab writes (one Node object per node under /run/rsdn-lab/cluster), and pods are
//! attached with the real `rsdn-cni`, called as a runtime calls it, with the conflist the
//! daemon wrote. The root namespace is never touched.
//! Everything the lab makes is named `rsdn-lab-*` or lives under /run/rsdn-lab, so `down` can
//! clean up after a crash half-way.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const STATE_DIR: &str = "/run/rsdn-lab";
pub const PREFIX: &str = "rsdn-lab-";
const UNDERLAY: &str = "rsdn-lab-underlay";
const EXTERNAL: &str = "rsdn-lab-ext";
const EXTERNAL_IP: &str = "192.168.77.250";
/// Port of the stand-in API server on the outside host (`lab up --api`).
const API_PORT: u16 = 6443;
/// Port the matrix's TCP listeners use inside pods.
const MATRIX_PORT: u16 = 5001;

/// One node of the lab, by number (1-based).
fn node_ns(i: u32) -> String {
    format!("{PREFIX}node{i}")
}
fn pod_ns(i: u32, j: u32) -> String {
    format!("{PREFIX}node{i}-pod{j}")
}
fn node_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, 10 + i as u8)
}
fn node_subnet(i: u32) -> String {
    format!("10.128.{}.0/23", 2 * (i - 1))
}
fn node_dir(i: u32) -> PathBuf {
    Path::new(STATE_DIR).join(format!("node{i}"))
}
fn cluster_dir() -> PathBuf {
    Path::new(STATE_DIR).join("cluster")
}

/// What `lab status` reports about a pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ip: Ipv4Addr,
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

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn ensure_netns(name: &str) -> Result<bool> {
    if netns_exists(name) {
        return Ok(false);
    }
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(true)
}

/// A command that will run inside the namespace `ns`.
fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let file = File::open(Path::new("/run/netns").join(ns))
        .with_context(|| format!("no namespace {ns}"))?;
    let mut cmd = Command::new(program);
    // SAFETY: only setns (async-signal-safe) between fork and exec; the fd outlives the spawn
    // because the closure owns the File.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A host on the underlay: a veth into br0 with `addr`.
fn attach_to_underlay(ns: &str, port: &str, addr: &str) -> Result<()> {
    ip(&[
        "-n", UNDERLAY, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", UNDERLAY, "link", "set", port, "master", "br0", "up"])?;
    ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])
}

/// This binary, for the API server it starts.
fn lab_exe() -> Result<PathBuf> {
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

fn daemon_pid(i: u32) -> Option<i32> {
    std::fs::read_to_string(node_dir(i).join("rsdn.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Running, and not a zombie: a daemon whose parent (an earlier `lab up`) is gone may linger
/// unreaped, and kill(pid, 0) succeeds on zombies.
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}

fn node_count() -> u32 {
    (1..).take_while(|i| netns_exists(&node_ns(*i))).count() as u32
}

pub fn up(nodes: u32, pods_per_node: u32, api: bool) -> Result<()> {
    if nodes == 0 || nodes > 100 {
        bail!("--nodes must be 1..=100");
    }
    // The binaries the nodes run, found before anything is created.
    rsdn_exe()?;
    cni_exe()?;
    std::fs::create_dir_all(cluster_dir())?;
    if api {
        std::fs::write(
            kubeconfig_path(),
            rsdn_lab::apiserver::kubeconfig(&format!("http://{EXTERNAL_IP}:{API_PORT}")),
        )?;
    }
    if ensure_netns(UNDERLAY)? {
        ip(&["-n", UNDERLAY, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", UNDERLAY, "link", "set", "br0", "up"])?;
    }
    if ensure_netns(EXTERNAL)? {
        attach_to_underlay(EXTERNAL, "ext", &format!("{EXTERNAL_IP}/24"))?;
    }
    if kubeconfig_path().exists() {
        start_apiserver()?;
    }
    for i in 1..=nodes {
        let ns = node_ns(i);
        if ensure_netns(&ns)? {
            attach_to_underlay(&ns, &format!("n{i}"), &format!("{}/24", node_ip(i)))?;
            // Like a real node, a default route (the outside host plays the upstream router):
            // traffic to a Service without endpoints must reach the FORWARD chain's REJECT.
            ip(&["-n", &ns, "route", "add", "default", "via", EXTERNAL_IP])?;
        }
        write_node_object(i)?;
        start_daemon(i)?;
    }
    for i in 1..=nodes {
        wait_ready(i, Duration::from_secs(30))?;
        for j in 1..=pods_per_node {
            attach_pod(i, j)?;
        }
    }
    wait_converged(node_count(), Duration::from_secs(30))?;
    status(false)
}

/// Waits until every node holds a complete tunnel to every other node.
fn wait_converged(nodes: u32, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let want = format!("{0}/{0}", nodes - 1);
    while (1..=nodes).any(|i| tunnels(i) != want) {
        if start.elapsed() > timeout {
            bail!("the overlay did not converge within {timeout:?}; see rsdn lab status and the daemon logs");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn write_node_object(i: u32) -> Result<()> {
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node{i}\nspec:\n  podCIDR: {subnet}\n  podCIDRs: [{subnet}]\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n  - type: Hostname\n    address: node{i}\n",
        subnet = node_subnet(i),
        ip = node_ip(i)
    );
    rsdn::cniconf::write_atomically(&cluster_dir().join(format!("node{i}.yaml")), &yaml)?;
    Ok(())
}

fn start_daemon(i: u32) -> Result<()> {
    if daemon_pid(i).is_some_and(alive) {
        return Ok(());
    }
    let dir = node_dir(i);
    std::fs::create_dir_all(&dir)?;
    install_cni(i)?;
    let source = if kubeconfig_path().exists() {
        format!("kubeconfig: {}", kubeconfig_path().display())
    } else {
        format!("clusterDir: {}", cluster_dir().display())
    };
    let config = format!(
        "nodeName: node{i}\n{source}\ncniConfDir: {dir}/net.d\ncniDataDir: {dir}/ipam\nresyncSeconds: 5\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("config.yaml"), config)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("rsdn.log"))?;
    let mut cmd = in_ns(&node_ns(i), rsdn_exe()?)?;
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
fn install_cni(i: u32) -> Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node_dir(i).join("install-cni.log"))?;
    let status = in_ns(&node_ns(i), rsdn_exe()?)?
        .arg("install-cni")
        .arg("--source")
        .arg(cni_exe()?)
        .arg("--bin-dir")
        .arg(node_cni_bin(i))
        .arg("--prepare-host")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("cannot run rsdn install-cni")?;
    if !status.success() {
        bail!(
            "rsdn install-cni failed for node{i}: see {}",
            node_dir(i).join("install-cni.log").display()
        );
    }
    Ok(())
}

/// The node's CNI binary directory (its /opt/cni/bin).
fn node_cni_bin(i: u32) -> PathBuf {
    node_dir(i).join("bin")
}

/// Present while the lab runs with an API server (`lab up --api`).
fn kubeconfig_path() -> PathBuf {
    Path::new(STATE_DIR).join("kubeconfig")
}

/// The stand-in API server runs on the outside host, serving the cluster directory.
fn start_apiserver() -> Result<()> {
    let pid_file = Path::new(STATE_DIR).join("apiserver.pid");
    let running = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .is_some_and(alive);
    if running {
        return Ok(());
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(STATE_DIR).join("apiserver.log"))?;
    let mut cmd = in_ns(EXTERNAL, lab_exe()?)?;
    cmd.args(["apiserver", "--bookmark-seconds", "1", "--listen"])
        .arg(format!("{EXTERNAL_IP}:{API_PORT}"))
        .arg("--dir")
        .arg(cluster_dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let child = cmd.spawn().context("cannot start rsdn-lab apiserver")?;
    std::fs::write(pid_file, child.id().to_string())?;
    Ok(())
}

fn conflist_path(i: u32) -> PathBuf {
    node_dir(i)
        .join("net.d")
        .join(rsdn::config::DEFAULT_CNI_CONF_FILE)
}

fn wait_ready(i: u32, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !conflist_path(i).exists() {
        if start.elapsed() > timeout {
            bail!(
                "node{i}: rsdn node did not write its CNI config within {timeout:?}; see {}",
                node_dir(i).join("rsdn.log").display()
            );
        }
        if !daemon_pid(i).is_some_and(alive) {
            bail!(
                "node{i}: rsdn node exited; see {}",
                node_dir(i).join("rsdn.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The plugin config a runtime would pass for the first plugin of the node's conflist.
fn plugin_conf(i: u32) -> Result<serde_json::Value> {
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conflist_path(i))?)?;
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    Ok(conf)
}

fn pod_record_path(i: u32, j: u32) -> PathBuf {
    node_dir(i).join("pods").join(format!("pod{j}.json"))
}

fn attach_pod(i: u32, j: u32) -> Result<()> {
    let ns = pod_ns(i, j);
    if pod_record_path(i, j).exists() && netns_exists(&ns) {
        return Ok(());
    }
    ensure_netns(&ns)?;
    let conf = plugin_conf(i)?;
    let mut cmd = in_ns(&node_ns(i), node_cni_bin(i).join(rsdn::install::PLUGIN))?;
    cmd.env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("lab-node{i}-pod{j}"))
        .env("CNI_NETNS", Path::new("/run/netns").join(&ns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("cannot run rsdn-cni")?;
    std::io::Write::write_all(
        &mut child.stdin.take().expect("piped"),
        conf.to_string().as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "rsdn-cni ADD for {ns} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let addr = result["ips"][0]["address"]
        .as_str()
        .context("no address in the result")?;
    let record = PodRecord {
        name: format!("node{i}-pod{j}"),
        namespace: ns,
        node: format!("node{i}"),
        ip: addr.split('/').next().unwrap_or_default().parse()?,
    };
    std::fs::create_dir_all(node_dir(i).join("pods"))?;
    std::fs::write(pod_record_path(i, j), serde_json::to_string(&record)?)?;
    Ok(())
}

/// Every pod the lab attached, node by node.
pub fn pods() -> Vec<PodRecord> {
    let mut out = Vec::new();
    for i in 1..=node_count() {
        let Ok(entries) = std::fs::read_dir(node_dir(i).join("pods")) else {
            continue;
        };
        let mut recs: Vec<PodRecord> = entries
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect();
        recs.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(recs);
    }
    out
}

fn tunnels(i: u32) -> String {
    let Ok(mut cmd) = in_ns(&node_ns(i), rsdn_exe().unwrap_or_default()) else {
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

pub fn status(json: bool) -> Result<()> {
    let n = node_count();
    if n == 0 {
        bail!("no lab is up (rsdn lab up)");
    }
    let nodes: Vec<NodeStatus> = (1..=n)
        .map(|i| {
            let pid = daemon_pid(i);
            NodeStatus {
                name: format!("node{i}"),
                namespace: node_ns(i),
                ip: node_ip(i),
                subnet: node_subnet(i),
                daemon_pid: pid,
                daemon_running: pid.is_some_and(alive),
                network_ready: conflist_path(i).exists(),
                tunnels_complete: tunnels(i),
                log: node_dir(i).join("rsdn.log"),
            }
        })
        .collect();
    let pods = pods();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "nodes": nodes, "pods": pods }))?
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
    println!("{:<14} {:<28} {:<8} IP", "POD", "NAMESPACE", "NODE");
    for p in &pods {
        println!("{:<14} {:<28} {:<8} {}", p.name, p.namespace, p.node, p.ip);
    }
    println!();
    println!("outside host: {EXTERNAL} ({EXTERNAL_IP}); underlay: {UNDERLAY} (bridge br0, 192.168.77.0/24)");
    Ok(())
}

/// Resolves a short lab name to its namespace.
fn resolve(name: &str) -> String {
    match name {
        "ext" | "external" => EXTERNAL.into(),
        "underlay" => UNDERLAY.into(),
        n if n.starts_with(PREFIX) => n.into(),
        n => format!("{PREFIX}{n}"),
    }
}

pub fn exec(name: &str, command: &[String]) -> Result<()> {
    let ns = resolve(name);
    let status = in_ns(&ns, &command[0])?
        .args(&command[1..])
        .status()
        .with_context(|| format!("cannot run {}", command[0]))?;
    std::process::exit(status.code().unwrap_or(1));
}

pub fn matrix() -> Result<()> {
    let pods = pods();
    if pods.len() < 2 {
        bail!("the matrix needs at least two pods (rsdn lab up)");
    }
    // A TCP listener in every pod, for the duration of the matrix.
    let mut listeners = Vec::new();
    for p in &pods {
        let child = in_ns(&p.namespace, "nc")?
            .args(["-l", "-k", "-p", &MATRIX_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nc (install netcat-openbsd)")?;
        listeners.push(child);
    }
    std::thread::sleep(Duration::from_millis(300));
    let probe = |from: &PodRecord, args: &[String]| -> bool {
        in_ns(&from.namespace, &args[0])
            .and_then(|mut c| {
                Ok(c.args(&args[1..])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?)
            })
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let (mut ok, mut failed) = (0, 0);
    print!("{:<14}", "from \\ to");
    for p in &pods {
        print!(" {:<13}", p.name);
    }
    println!();
    for from in &pods {
        print!("{:<14}", from.name);
        for to in &pods {
            if from.name == to.name {
                print!(" {:<13}", "-");
                continue;
            }
            let ping = probe(
                from,
                &["ping".into(), "-c1".into(), "-W2".into(), to.ip.to_string()],
            );
            let tcp = probe(
                from,
                &[
                    "nc".into(),
                    "-z".into(),
                    "-w".into(),
                    "2".into(),
                    to.ip.to_string(),
                    MATRIX_PORT.to_string(),
                ],
            );
            let cell = match (ping, tcp) {
                (true, true) => "ok",
                (false, true) => "PING-FAIL",
                (true, false) => "TCP-FAIL",
                (false, false) => "FAIL",
            };
            if ping && tcp {
                ok += 1;
            } else {
                failed += 1;
            }
            print!(" {cell:<13}");
        }
        println!();
    }
    for mut l in listeners {
        let _ = l.kill();
        let _ = l.wait();
    }
    println!(
        "{ok} of {} pairs reach each other (ping and TCP)",
        ok + failed
    );
    if failed > 0 {
        bail!("{failed} pairs failed");
    }
    Ok(())
}

pub fn down() -> Result<()> {
    // Daemons: from pid files, and any `rsdn node` whose config lives under the lab directory
    // (pid files may be gone after a crash).
    let mut pids: Vec<i32> = (1..=100).filter_map(daemon_pid).collect();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let args: Vec<&str> = cmdline.split('\0').collect();
            // `rsdn node --config ...`, and `rsdn-lab apiserver` however it was started
            // (directly, or as `rsdn lab apiserver`, which execs rsdn-lab).
            let ours =
                args.windows(2).any(|w| w == ["node", "--config"]) || args.contains(&"apiserver");
            if ours && cmdline.contains(STATE_DIR) {
                pids.push(pid);
            }
        }
    }
    pids.sort();
    pids.dedup();
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(PREFIX) {
                ip(&["netns", "del", &name])?;
                removed += 1;
            }
        }
    }
    let _ = std::fs::remove_dir_all(STATE_DIR);
    println!(
        "lab down: stopped {} daemon(s), removed {removed} namespace(s)",
        pids.len()
    );
    Ok(())
}
