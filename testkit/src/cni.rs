//! The CNI plugin as a runtime runs it: a node namespace with the bridge the daemon would
//! create and a private IPAM directory, and the real `rsdn-cni` binary called with the CNI
//! environment and the config on stdin.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::netns::{in_netns, Netns};

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

/// The plugin binary of this build, next to the test binary's directory: tests run from
/// target/<profile>/deps/, and Cargo puts rsdn-cni in target/<profile>/ for the cni crate's
/// integration tests and for any workspace build.
pub fn plugin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("rsdn-cni");
    assert!(
        p.exists(),
        "{} is missing: build it (cargo build -p rsdn-cni)",
        p.display()
    );
    p
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

/// Runs `cmd` with `stdin` written to it, and collects what it printed.
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
