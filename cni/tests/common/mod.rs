//! Test fixtures: throw-away network namespaces, a node with a bridge, and a way to call the
//! real `rsdn-cni` binary inside the node namespace exactly as a runtime does.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{json, Value};

/// Kernel tests need root. On a laptop they skip with a reason; in CI (`CI` set) a skip would
/// hide a broken tier, so they fail instead.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root, and CI must run it");
    }
    eprintln!("SKIP {test}: needs root (network namespaces)");
    false
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        let name = format!(
            "rt{}-{}-{role}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs a command inside the namespace; returns (success, stdout+stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let ns = File::open(self.path()).unwrap();
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        in_netns(&mut cmd, &ns);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    pub fn ping(&self, ip: &str) -> bool {
        self.run(&["ping", "-c1", "-W2", ip]).0
    }
}

impl Netns {
    /// Runs `f` on a thread of its own inside this namespace (setns changes only the calling
    /// thread, and processes it starts inherit it).
    pub fn on_thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let _guard = rsdn_cni::netns::NetnsGuard::enter_path(&path).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Makes `cmd` run inside the namespace `ns` (setns in the child before exec).
pub fn in_netns(cmd: &mut Command, ns: &File) {
    let fd = ns.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the child only calls it before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Polls `cond` every 10 ms for up to `secs` seconds.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A node namespace with the bridge the daemon would create, and a private IPAM directory.
pub struct Node {
    pub ns: Netns,
    pub ipam: tempfile::TempDir,
    pub subnet: String,
}

impl Node {
    /// A node whose `tun0` holds the first address of `subnet` (e.g. "10.128.0.0/23").
    pub fn new(subnet: &str) -> Node {
        let ns = Netns::new("node");
        let net: ipnet::Ipv4Net = subnet.parse().unwrap();
        let gw = format!(
            "{}/{}",
            std::net::Ipv4Addr::from(u32::from(net.network()) + 1),
            net.prefix_len()
        );
        ns.ip(&["link", "add", "tun0", "type", "bridge"]);
        ns.ip(&["addr", "add", &gw, "dev", "tun0"]);
        ns.ip(&["link", "set", "tun0", "up"]);
        Node {
            ns,
            ipam: tempfile::tempdir().unwrap(),
            subnet: subnet.to_string(),
        }
    }

    /// A node without any bridge (the daemon has not run yet).
    pub fn without_bridge(subnet: &str) -> Node {
        Node {
            ns: Netns::new("node"),
            ipam: tempfile::tempdir().unwrap(),
            subnet: subnet.to_string(),
        }
    }

    pub fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "rsdn",
            "type": "rsdn-cni",
            "subnet": self.subnet,
            "dataDir": self.ipam.path(),
        })
    }

    pub fn store(&self) -> PathBuf {
        self.ipam.path().join("rsdn")
    }

    /// Files in the IPAM store that are allocations.
    pub fn allocated(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.store())
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.retain(|n| n.parse::<std::net::Ipv4Addr>().is_ok());
        v.sort();
        v
    }

    pub fn cni(
        &self,
        command: &str,
        id: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &Value,
    ) -> Invocation {
        invoke_in(Some(&self.ns), command, id, netns, ifname, conf)
    }
}

/// What one plugin run printed.
#[derive(Debug)]
pub struct Invocation {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Invocation {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "plugin failed: {} {}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts a CNI error with this code, and returns the error object.
    pub fn err(&self, code: u64) -> Value {
        assert_ne!(self.code, 0, "expected failure, got {}", self.stdout);
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v
    }
}

/// The plugin binary: Cargo's path when this is a test of the cni crate, else the workspace
/// build next to the test binary (target/<profile>/rsdn-cni).
pub fn plugin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_rsdn-cni") {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .and_then(Path::parent)
                .unwrap()
                .join("rsdn-cni")
        }
    }
}

/// Runs the plugin with the CNI environment, in `node`'s namespace when given.
pub fn invoke_in(
    node: Option<&Netns>,
    command: &str,
    id: &str,
    netns: Option<&Path>,
    ifname: &str,
    conf: &Value,
) -> Invocation {
    let mut cmd = Command::new(plugin());
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", ns);
    }
    let ns_file;
    if let Some(node) = node {
        ns_file = File::open(node.path()).unwrap();
        in_netns(&mut cmd, &ns_file);
    }
    run_with_stdin(cmd, conf.to_string().as_bytes())
}

pub fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Invocation {
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Invocation {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}
