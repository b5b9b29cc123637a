//! `rsdn doctor`: checks a node for what breaks pod networking, each result with a one-line fix.
//! `checks` decides (pure, unit-tested); this module reads the node (sysctls, links, routes,
//! iptables of both backends, the CNI directories, conntrack) and probes its peers
//! (`probe`: ICMP echo to each peer's VTEP through the overlay and to its node IP). The
//! 63-second check walks the kernel's own nat rules with the trace's matcher.

pub mod checks;
pub mod ethtool;
pub mod probe;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::config::{NodeConfig, VXLAN_OVERHEAD};
use crate::model::{ClusterModel, ClusterNode};
use crate::netfilter::backend::{save_all, Backend};
use crate::netfilter::ruleset::TableName;
use crate::overlay::kernel::Kernel;
use crate::overlay::{BRIDGE, VXLAN};
use crate::trace::live::link_name;
use crate::trace::rule::{Env, Packet};
use crate::trace::walk::{walk, End};
use checks::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Could not be checked here.
    Skip,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub node: String,
    /// No check failed.
    pub ok: bool,
    pub findings: Vec<Finding>,
}

/// What `rsdn doctor` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// Judge the checksum check as on this kernel release (what-if).
    pub assume_kernel: Option<String>,
    /// How long peers have to answer.
    pub timeout: Duration,
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_u64(path: &str) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

fn uname_release() -> String {
    // SAFETY: utsname is plain old data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: the kernel NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// What the node holds, read once.
struct Node {
    me: Option<ClusterNode>,
    peers: Vec<ClusterNode>,
    links: Vec<rsdn_cni::netlink::Link>,
    addrs: Vec<(u32, Ipv4Net)>,
    routes: Vec<RouteDev>,
}

impl Node {
    fn link(&self, name: &str) -> Option<&rsdn_cni::netlink::Link> {
        self.links.iter().find(|l| l.name == name)
    }

    /// The interface holding the node IP.
    fn underlay(&self, ip: Option<Ipv4Addr>) -> Option<String> {
        let ip = ip?;
        self.addrs
            .iter()
            .find(|(_, n)| n.addr() == ip)
            .map(|(i, _)| link_name(&self.links, *i))
    }
}

/// Runs every check on this node.
pub fn run(config: &NodeConfig, opts: &Options) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let (node, notes) = rt.block_on(gather(config))?;
    let mut f = Vec::new();
    let node_ip = config.node_ip.or(node.me.as_ref().map(|n| n.ip));
    f.push(sysctl_on(
        "forwarding",
        "net.ipv4.ip_forward",
        read("/proc/sys/net/ipv4/ip_forward").as_deref(),
        "",
    ));
    f.push(sysctl_on(
        "bridge-netfilter",
        "net.bridge.bridge-nf-call-iptables",
        read("/proc/sys/net/bridge/bridge-nf-call-iptables").as_deref(),
        "br_netfilter is not loaded",
    ));
    f.push(rp(&node, node_ip));
    f.push(mtus(config, &node, node_ip));
    f.push(peers_check(config, &node, opts.timeout));
    f.push(offload(config, &node, node_ip, opts.assume_kernel.clone()));
    let saves = [Backend::Nft, Backend::Legacy].map(|b| (b, save_all(b).unwrap_or_default()));
    f.push(backend_check(config, &saves));
    f.push(xtables_lock());
    let dir = config.cni_conf_dir.display().to_string();
    let files: Vec<String> = std::fs::read_dir(&config.cni_conf_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    f.push(conflist_first(&dir, &files, &config.cni_conf_file));
    f.push(kube_proxy_check(config, &saves));
    f.push(plugins_check(config, &config.cni_bin_dir));
    f.push(conntrack(
        read_u64("/proc/sys/net/netfilter/nf_conntrack_count"),
        read_u64("/proc/sys/net/netfilter/nf_conntrack_max"),
    ));
    for n in notes {
        f.push(Finding {
            check: "model".into(),
            status: Status::Warn,
            detail: n,
            fix: None,
        });
    }
    Ok(Report {
        node: config.node_name.clone(),
        ok: f.iter().all(|x| x.status != Status::Fail),
        findings: f,
    })
}

async fn gather(config: &NodeConfig) -> anyhow::Result<(Node, Vec<String>)> {
    let kernel = Kernel::connect()?;
    let mut notes = Vec::new();
    let mut scope = crate::daemon::model_scope(config);
    scope.programmed =
        crate::overlay::reconcile::programmed_claims(&kernel, config.cluster_network).await;
    let model = match tokio::time::timeout(
        Duration::from_secs(30),
        crate::trace::load_model(config, scope),
    )
    .await
    {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            notes.push(format!(
                "cannot read the cluster ({e:#}): peers are taken from this node's overlay entries"
            ));
            ClusterModel::default()
        }
        Err(_) => {
            notes.push("the cluster source did not answer within 30 s: peers are taken from this node's overlay entries".into());
            ClusterModel::default()
        }
    };
    let links = kernel.links().await?;
    let addrs = kernel.addresses().await?;
    let routes = kernel
        .routes()
        .await?
        .into_iter()
        .map(|r| RouteDev {
            dst: r.dst,
            dev: r.oif.map(|i| link_name(&links, i)).unwrap_or_default(),
        })
        .collect();
    let me = model.nodes.get(&config.node_name).cloned();
    let mut peers: Vec<ClusterNode> = model
        .nodes
        .values()
        .filter(|n| n.name != config.node_name)
        .cloned()
        .collect();
    if model.nodes.is_empty() {
        if let Some(vx) = kernel.vxlan_index().await? {
            let entries = kernel.observe(vx, config.cluster_network).await?;
            for (subnet, ip) in entries.claims() {
                peers.push(ClusterNode {
                    name: ip.to_string(),
                    ip,
                    subnet: crate::model::NodeSubnet(subnet),
                    zone: None,
                });
            }
        }
    }
    Ok((
        Node {
            me,
            peers,
            links,
            addrs,
            routes,
        },
        notes,
    ))
}

fn rp(node: &Node, node_ip: Option<Ipv4Addr>) -> Finding {
    let mut conf = BTreeMap::new();
    let underlay = node.underlay(node_ip);
    for iface in ["all", BRIDGE, VXLAN]
        .into_iter()
        .map(str::to_string)
        .chain(underlay.clone())
    {
        if let Some(v) = read(format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter")) {
            conf.insert(iface, v.trim().parse().unwrap_or(0));
        }
    }
    let mut arrivals = vec![Arrivals {
        iface: VXLAN.into(),
        sources: node
            .peers
            .iter()
            .map(|p| (p.subnet.0, format!("{}'s pods", p.name)))
            .collect(),
    }];
    if let Some(me) = &node.me {
        arrivals.push(Arrivals {
            iface: BRIDGE.into(),
            sources: vec![(me.subnet.0, "this node's pods".into())],
        });
    }
    if let Some(u) = underlay {
        arrivals.push(Arrivals {
            iface: u,
            sources: node
                .peers
                .iter()
                .map(|p| (Ipv4Net::from(p.ip), format!("{}'s VXLAN packets", p.name)))
                .collect(),
        });
    }
    rp_filter(&conf, &arrivals, &node.routes)
}

fn mtus(config: &NodeConfig, node: &Node, node_ip: Option<Ipv4Addr>) -> Finding {
    let bridge = node.link(BRIDGE);
    let conflist = read(config.cni_conf_path())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["plugins"][0]["mtu"].as_u64())
        .map(|m| m as u32);
    let m = Mtus {
        underlay: node
            .underlay(node_ip)
            .and_then(|u| node.link(&u).map(|l| (u, l.mtu))),
        vxlan: node.link(VXLAN).map(|l| l.mtu),
        bridge: bridge.map(|l| l.mtu),
        configured: config.mtu,
        conflist,
        veths: node
            .links
            .iter()
            .filter(|l| bridge.is_some_and(|b| l.master == Some(b.index)))
            .map(|l| (l.name.clone(), l.mtu))
            .collect(),
    };
    mtu(&m, VXLAN_OVERHEAD)
}

fn peers_check(config: &NodeConfig, node: &Node, timeout: Duration) -> Finding {
    let mut targets: Vec<Ipv4Addr> = node.peers.iter().map(|p| p.subnet.vtep_ip()).collect();
    targets.extend(node.peers.iter().map(|p| p.ip));
    let answered = match probe::ping_all(&targets, timeout) {
        Ok(a) => a,
        Err(e) => {
            return Finding {
                check: "vxlan-peers".into(),
                status: Status::Skip,
                detail: format!("cannot send ICMP echo (needs CAP_NET_RAW): {e}"),
                fix: None,
            }
        }
    };
    let list: Vec<Peer> = node
        .peers
        .iter()
        .map(|p| Peer {
            node: p.name.clone(),
            ip: p.ip,
            vtep: p.subnet.vtep_ip(),
            overlay: answered.get(&p.subnet.vtep_ip()).copied(),
            underlay: answered.get(&p.ip).copied(),
        })
        .collect();
    peers(&list, config.vxlan_port)
}

fn offload(
    config: &NodeConfig,
    node: &Node,
    node_ip: Option<Ipv4Addr>,
    assume: Option<String>,
) -> Finding {
    let underlay = node.underlay(node_ip);
    let kernel = assume.unwrap_or_else(uname_release);
    let outer_masquerade = outer_masquerade(config, node, node_ip, underlay.as_deref());
    checksum(&Offload {
        kernel,
        vxlan_tx: ethtool::tx_checksum(VXLAN).ok(),
        underlay: underlay.map(|u| {
            let driver = ethtool::driver(&u).unwrap_or_else(|_| "unknown".into());
            let tx = ethtool::tx_checksum(&u).ok();
            (u, driver, tx)
        }),
        outer_masquerade,
    })
}

/// Whether the kernel's nat rules masquerade the VXLAN packet that carries a Service packet
/// marked for masquerade: first the inner packet's POSTROUTING (which should clear the mark),
/// then the outer packet's, with the mark the inner one left.
fn outer_masquerade(
    config: &NodeConfig,
    node: &Node,
    node_ip: Option<Ipv4Addr>,
    underlay: Option<&str>,
) -> Option<String> {
    let (chains, sets) = crate::trace::live::netfilter(config).ok()?;
    let local = |ip: Ipv4Addr| node.addrs.iter().any(|(_, n)| n.addr() == ip);
    let env = Env {
        local: &local,
        sets: &sets,
        recent: &|_, _| Some(false),
    };
    let peer = node.peers.first();
    let inner = Packet {
        src: "203.0.113.1".parse().expect("an address"),
        dst: peer.map_or("10.128.2.2".parse().expect("an address"), |p| {
            p.subnet.gateway()
        }),
        proto: "tcp".into(),
        sport: 40000,
        dport: 80,
        mark: 1 << config.masquerade_bit,
        in_iface: underlay.map(str::to_string),
        out_iface: Some(VXLAN.into()),
    };
    let mark = walk(&chains, TableName::Nat, "POSTROUTING", inner, &env)
        .first()
        .map_or(0, |o| o.packet.mark);
    let outer = Packet {
        src: node_ip?,
        dst: peer.map_or("192.0.2.1".parse().expect("an address"), |p| p.ip),
        proto: "udp".into(),
        sport: 40000,
        dport: config.vxlan_port,
        mark,
        in_iface: None,
        out_iface: underlay.map(str::to_string),
    };
    walk(&chains, TableName::Nat, "POSTROUTING", outer, &env)
        .into_iter()
        .find(|o| matches!(o.end, End::Masquerade | End::Snat(_)))
        .and_then(|o| o.hits.last().map(|h| h.rule.clone()))
}

fn has_chain(save: &str, chain: &str) -> bool {
    save.lines().any(|l| {
        l.strip_prefix(':')
            .and_then(|d| d.split_whitespace().next())
            .is_some_and(|n| n == chain)
    })
}

fn backend_check(config: &NodeConfig, saves: &[(Backend, String); 2]) -> Finding {
    let b = Backends {
        hint: saves
            .iter()
            .filter(|(_, s)| {
                has_chain(s, "KUBE-IPTABLES-HINT") || has_chain(s, "KUBE-KUBELET-CANARY")
            })
            .map(|(b, _)| *b)
            .collect(),
        ours: saves
            .iter()
            .filter(|(_, s)| has_chain(s, crate::egress::RSDN_FORWARD))
            .map(|(b, _)| *b)
            .collect(),
    };
    backend(&b, config.iptables_backend)
}

fn kube_proxy_check(config: &NodeConfig, saves: &[(Backend, String); 2]) -> Finding {
    let mut k = KubeProxy::default();
    let ours: Vec<Backend> = saves
        .iter()
        .filter(|(_, s)| has_chain(s, crate::egress::RSDN_FORWARD))
        .map(|(b, _)| *b)
        .collect();
    for (b, save) in saves {
        let mut table = "";
        for line in save.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t;
            }
            if line.starts_with(":KUBE-PROXY-CANARY ") {
                k.canaries
                    .push(format!("{table}/KUBE-PROXY-CANARY ({})", b.name()));
            }
            if ours.contains(b)
                && table == "nat"
                && line.starts_with("-A PREROUTING ")
                && line.ends_with("-j KUBE-SERVICES")
            {
                k.service_jumps += 1;
            }
        }
        if !ours.contains(b) && has_kube_services(save) {
            k.foreign_services.push(format!(
                "KUBE-SVC- chains in {} (rsdn uses the other)",
                b.name()
            ));
        }
    }
    kube_proxy(&k, config.proxy)
}

fn has_kube_services(save: &str) -> bool {
    save.lines().any(|l| l.starts_with(":KUBE-SVC-"))
}

fn plugins_check(config: &NodeConfig, bin_dir: &Path) -> Finding {
    let path = config.cni_conf_path();
    let types: Vec<String> = read(&path)
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| {
            v["plugins"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["type"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if types.is_empty() {
        return plugins(None, &[], &[], "");
    }
    if !bin_dir.is_dir() {
        return Finding {
            check: "cni-plugins".into(),
            status: Status::Skip,
            detail: format!(
                "{} is not visible here: name the host's CNI binary directory with --cni-bin-dir",
                bin_dir.display()
            ),
            fix: None,
        };
    }
    let missing: Vec<String> = types
        .iter()
        .filter(|t| !bin_dir.join(t).is_file())
        .cloned()
        .collect();
    plugins(
        Some(&path.display().to_string()),
        &types,
        &missing,
        &bin_dir.display().to_string(),
    )
}

/// The lock iptables-legacy takes (`XTABLES_LOCKFILE`, else /run/xtables.lock): free, or held
/// only briefly. A holder that keeps it stalls every legacy iptables command, rsdn's too.
fn xtables_lock() -> Finding {
    let check = "xtables-lock";
    let path = std::env::var("XTABLES_LOCKFILE").unwrap_or_else(|_| "/run/xtables.lock".into());
    let Ok(file) = std::fs::File::open(&path) else {
        return Finding {
            check: check.into(),
            status: Status::Ok,
            detail: format!("{path} does not exist: nobody holds it"),
            fix: None,
        };
    };
    let start = Instant::now();
    loop {
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            // SAFETY: as above.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            return Finding {
                check: check.into(),
                status: Status::Ok,
                detail: format!("{path} is free"),
                fix: None,
            };
        }
        if start.elapsed() > Duration::from_secs(2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let holder = lock_holder(&file);
    Finding {
        check: check.into(),
        status: Status::Fail,
        detail: format!(
            "{path} has been held for 2 s{}: iptables-legacy commands (rsdn's, kubelet's) wait for it",
            holder
                .as_ref()
                .map(|(pid, cmd)| format!(" by pid {pid} ({cmd})"))
                .unwrap_or_default()
        ),
        fix: Some(match holder {
            Some((pid, _)) => format!("find out why pid {pid} keeps the lock; stop it if it hangs (kill {pid})"),
            None => "find the process holding it: grep the lock's inode in /proc/locks".into(),
        }),
    }
}

/// Who holds a flock on `file`, from /proc/locks (`1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...`).
fn lock_holder(file: &std::fs::File) -> Option<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let ino = file.metadata().ok()?.ino();
    let locks = read("/proc/locks")?;
    let pid: u32 = locks.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let inode = w.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
        (inode == ino && w.get(1) == Some(&"FLOCK")).then(|| w.get(4)?.parse().ok())?
    })?;
    let cmd = read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.replace('\0', " ").trim().to_string())
        .unwrap_or_default();
    Some((pid, cmd))
}

pub fn render(r: &Report) -> String {
    let mut out = format!("rsdn doctor: node {}\n", r.node);
    for f in &r.findings {
        let tag = match f.status {
            Status::Ok => "ok",
            Status::Skip => "skip",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(out, "{tag:<5} {:<17} {}", f.check, f.detail);
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "{:<23} fix: {fix}", "");
        }
    }
    let failed = r
        .findings
        .iter()
        .filter(|f| f.status == Status::Fail)
        .count();
    let warned = r
        .findings
        .iter()
        .filter(|f| f.status == Status::Warn)
        .count();
    let _ = writeln!(
        out,
        "{} checks: {failed} failed, {warned} warned",
        r.findings.len()
    );
    out
}
