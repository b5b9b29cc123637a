//! The CNI commands. Each takes the validated environment and config and returns what goes to
//! stdout (or a CniError that does).

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use netlink_packet_route::link::InfoKind;
use tracing::{debug, info, warn};

use crate::config::{Command, Env, NetConf, PodNetwork};
use crate::error::{CniError, Code, Result};
use crate::ipam::{Pool, Store};
use crate::names::{format_mac, host_veth_name, mac_from_ipv4, VETH_PREFIX};
use crate::netlink::{errno, Link, Netlink, PodEnd};
use crate::netns::{self, OpenError};
use crate::result::{CniResult, Interface, IpConfig, Route};
use crate::version::{self, Version};

/// Runs one command to completion; `Ok(Some(json))` is printed on stdout.
pub fn run(env: &Env, conf: &NetConf) -> Result<Option<String>> {
    let version = conf.version()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::new(Code::Io, "cannot start the runtime").with_details(e))?;
    let mut reap_link = None;
    let out = rt.block_on(async {
        match env.command {
            Command::Add => add(env, conf, version).await.map(Some),
            Command::Del => del(env, conf).await.map(|link| {
                reap_link = link;
                None
            }),
            Command::Check => {
                version.require("CHECK", Version::V0_4_0)?;
                check(env, conf).await.map(|()| None)
            }
            Command::Status => {
                version.require("STATUS", Version::V1_1_0)?;
                status(conf).await.map(|()| None)
            }
            Command::Gc => {
                version.require("GC", Version::V1_1_0)?;
                gc(conf).await.map(|()| None)
            }
            Command::Version => Ok(Some(version::version_info())),
        }
    });
    if let Some(index) = reap_link {
        // Outside block_on: the child must not inherit a "runtime entered" state.
        if let Err(e) = spawn_reaper(index) {
            warn!(index, error = %e, "cannot fork the reaper; deleting the veth inline");
            if reap(index) != 0 {
                warn!(index, "inline veth delete failed; GC will remove it");
            }
        }
    }
    out
}

fn kernel_error(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> CniError {
    move |e| CniError::new(Code::Kernel, what.to_string()).with_details(e)
}

fn connect_error(e: io::Error) -> CniError {
    CniError::new(Code::Kernel, "cannot open a netlink socket").with_details(e)
}

/// Opens the pod's namespace before anything else is touched. A missing one is the spec's
/// "container unknown" (code 3); a path that is something else (a file, a namespace of another
/// kind) is an invalid CNI_NETNS (code 4), which would otherwise surface only as a kernel error
/// from the veth creation, after an address was taken.
fn open_netns(path: &Path) -> Result<File> {
    netns::open(path).map_err(|e| match e {
        OpenError::NotNetns(_) => CniError::new(
            Code::InvalidEnv,
            format!("CNI_NETNS {} is not a network namespace", path.display()),
        )
        .with_details(e),
        OpenError::Io(e) => {
            let code = if e.kind() == io::ErrorKind::NotFound {
                Code::UnknownContainer
            } else {
                Code::Io
            };
            CniError::new(
                code,
                format!("cannot open network namespace {}", path.display()),
            )
            .with_details(e)
        }
    })
}

/// The node bridge, which must exist and be up: the daemon creates it once the node network is
/// programmed, and until then pods would have no way out.
async fn ready_bridge(host: &Netlink, name: &str, code: Code) -> Result<Link> {
    let not_ready = |why: String| {
        CniError::new(code, format!("network not ready: {why}"))
            .with_details("rsdn node creates and owns the bridge; is it running on this node?")
    };
    let bridge = host
        .link(name)
        .await
        .map_err(kernel_error(format_args!("cannot look up bridge {name}")))?
        .ok_or_else(|| not_ready(format!("bridge {name} does not exist")))?;
    if bridge.kind != Some(InfoKind::Bridge) {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("{name} exists but is not a Linux bridge"),
        ));
    }
    if !bridge.up {
        return Err(not_ready(format!("bridge {name} is down")));
    }
    Ok(bridge)
}

async fn add(env: &Env, conf: &NetConf, version: Version) -> Result<String> {
    debug!("ADD start");
    let net = conf.pod_network()?;
    let netns_path = env.netns.as_deref().expect("validated for ADD");
    let netns = open_netns(netns_path)?;
    let host = Netlink::connect().map_err(connect_error)?;
    let bridge = ready_bridge(&host, &net.bridge, Code::TryAgainLater).await?;
    debug!(bridge = %bridge.name, "bridge ready");

    let ip = {
        // The lock is held only while choosing and recording the address.
        let store = Store::open(&conf.store_dir())?;
        store.allocate(&Pool::new(&net), &env.container_id, &env.ifname)?
    };
    let address = Ipv4Net::new(ip, net.subnet.prefix_len()).expect("prefix from a valid subnet");
    let host_veth = host_veth_name(&env.container_id, &env.ifname);
    debug!(%ip, "address allocated");

    match wire(&host, &bridge, &net, &netns, env, &host_veth, address).await {
        Ok(host_link) => {
            info!(container = %env.container_id, ifname = %env.ifname, ip = %address, veth = %host_veth, "pod wired");
            let result = CniResult {
                cni_version: String::new(),
                interfaces: vec![
                    Interface {
                        name: bridge.name.clone(),
                        mac: Some(format_mac(&bridge.mac)),
                        mtu: Some(bridge.mtu),
                        sandbox: None,
                    },
                    Interface {
                        name: host_veth,
                        mac: Some(format_mac(&host_link.mac)),
                        mtu: Some(net.mtu),
                        sandbox: None,
                    },
                    Interface {
                        name: env.ifname.clone(),
                        mac: Some(format_mac(&mac_from_ipv4(ip))),
                        mtu: Some(net.mtu),
                        sandbox: Some(netns_path.display().to_string()),
                    },
                ],
                ips: vec![IpConfig {
                    version: None,
                    address,
                    gateway: Some(net.gateway),
                    interface: Some(2),
                }],
                routes: vec![Route {
                    dst: default_route(),
                    gw: Some(net.gateway),
                }],
                dns: Default::default(),
            };
            Ok(serde_json::to_string(&result.for_version(version)).expect("result serializes"))
        }
        Err(e) => {
            // Undo in reverse order; keep going on errors so nothing leaks that can be freed.
            if let Ok(Some(l)) = host.link(&host_veth).await {
                if let Err(del_err) = host.delete_link(l.index).await {
                    warn!(veth = %host_veth, error = %del_err, "rollback: cannot delete veth");
                }
            }
            if let Err(rel_err) = Store::open(&conf.store_dir())
                .and_then(|s| s.release_ip(ip, &env.container_id, &env.ifname))
            {
                warn!(ip = %ip, error = %rel_err, "rollback: cannot release address");
            }
            Err(e)
        }
    }
}

fn default_route() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("0.0.0.0/0")
}

/// The kernel side of ADD: veth pair, hairpin, address, default route.
async fn wire(
    host: &Netlink,
    bridge: &Link,
    net: &PodNetwork,
    netns: &File,
    env: &Env,
    host_veth: &str,
    address: Ipv4Net,
) -> Result<Link> {
    let pod_end = PodEnd {
        netns,
        ifname: &env.ifname,
        mac: mac_from_ipv4(address.addr()),
    };
    if let Err(e) = host
        .create_veth(host_veth, net.mtu, bridge.index, &pod_end)
        .await
    {
        if errno(&e) != Some(libc::EEXIST) {
            return Err(kernel_error("cannot create the veth pair")(e));
        }
        // A host end left over from an ADD that died half-way has our derived name: remove it
        // and try once more. If the pod side is what exists, the retry says so.
        if let Some(stale) = host
            .link(host_veth)
            .await
            .map_err(kernel_error("cannot look up veth"))?
        {
            host.delete_link(stale.index)
                .await
                .map_err(kernel_error("cannot delete stale veth"))?;
        }
        host.create_veth(host_veth, net.mtu, bridge.index, &pod_end)
            .await
            .map_err(|e| {
                CniError::new(
                    Code::Kernel,
                    format!(
                        "cannot create the veth pair: does {} already exist in the pod?",
                        env.ifname
                    ),
                )
                .with_details(e)
            })?;
    }
    debug!(veth = %host_veth, "veth pair created");
    let host_link = host
        .link(host_veth)
        .await
        .map_err(kernel_error("cannot look up the new veth"))?
        .ok_or_else(|| {
            CniError::new(
                Code::Kernel,
                format!("veth {host_veth} vanished right after creation"),
            )
        })?;
    if net.hairpin {
        host.set_hairpin(host_link.index)
            .await
            .map_err(kernel_error("cannot enable hairpin mode"))?;
    }

    let pod = Netlink::connect_in(netns).map_err(connect_error)?;
    debug!("host side configured, in the pod namespace");
    let pod_link = pod
        .link(&env.ifname)
        .await
        .map_err(kernel_error("cannot look up the pod interface"))?
        .ok_or_else(|| {
            CniError::new(
                Code::Kernel,
                format!("{} did not appear in the pod namespace", env.ifname),
            )
        })?;
    pod.set_up(pod_link.index)
        .await
        .map_err(kernel_error(format_args!("cannot bring {} up", env.ifname)))?;
    pod.add_address(pod_link.index, address)
        .await
        .map_err(kernel_error(format_args!(
            "cannot add {address} to {}",
            env.ifname
        )))?;
    match pod
        .add_route(default_route(), net.gateway, pod_link.index)
        .await
    {
        // A second interface of this network in the same pod: the first one keeps the default.
        Err(e) if errno(&e) == Some(libc::EEXIST) => {
            info!(ifname = %env.ifname, "pod already has a default route; leaving it")
        }
        r => r.map_err(kernel_error(format_args!(
            "cannot add the default route via {}",
            net.gateway
        )))?,
    }
    Ok(host_link)
}

/// Returns the index of a disconnected host veth still to be destroyed (see `spawn_reaper`).
async fn del(env: &Env, conf: &NetConf) -> Result<Option<u32>> {
    let host = Netlink::connect().map_err(connect_error)?;
    let name = host_veth_name(&env.container_id, &env.ifname);
    let mut to_reap = None;
    match host
        .link(&name)
        .await
        .map_err(kernel_error("cannot look up veth"))?
    {
        Some(l) => {
            // Synchronously the pod loses its network: the host end leaves the bridge and goes
            // down. Destroying the pair makes the kernel wait for RCU (10-20 ms), so a detached
            // reaper does that part; nothing can flow in the meantime.
            host.disconnect(l.index)
                .await
                .map_err(kernel_error(format_args!("cannot disconnect {name}")))?;
            to_reap = Some(l.index);
        }
        None => {
            // No host end: the namespace is gone and took the pair with it, or the host end
            // was renamed; in the latter case the pod end is still there to delete.
            if let Some(path) = env.netns.as_deref() {
                match netns::open(path)
                    .and_then(|ns| Netlink::connect_in(&ns).map_err(OpenError::Io))
                {
                    Ok(pod) => {
                        let link = pod
                            .link(&env.ifname)
                            .await
                            .map_err(kernel_error("cannot look up the pod interface"))?;
                        if let Some(l) = link {
                            pod.delete_link(l.index)
                                .await
                                .map_err(kernel_error(format_args!(
                                    "cannot delete {}",
                                    env.ifname
                                )))?;
                        }
                    }
                    // Typically the empty mount point a namespace leaves when its bind mount
                    // is gone (or was never propagated into our mount namespace). Failing would
                    // have the runtime retry this DEL forever and never free the address; the
                    // node side below is all there is left to clean up.
                    Err(OpenError::NotNetns(what)) => {
                        warn!(netns = %path.display(), what = %what, "CNI_NETNS is not a network namespace; cleaning up the node side only")
                    }
                    Err(e) => debug!(netns = %path.display(), error = %e, "namespace already gone"),
                }
            }
        }
    }

    let store = Store::open(&conf.store_dir())?;
    // Runtimes of spec 1.0+ pass the address in prevResult: one file to check instead of all.
    let hinted = conf
        .prev_result
        .as_ref()
        .and_then(|p| CniResult::from_prev(p).ok())
        .and_then(|p| p.ip_of(&env.ifname).map(|ip| ip.address.addr()));
    let released = match hinted {
        Some(ip) if store.release_ip(ip, &env.container_id, &env.ifname)? => vec![ip],
        _ => store.release(&env.container_id, &env.ifname)?,
    };
    info!(container = %env.container_id, ifname = %env.ifname, released = ?released, "pod unwired");
    Ok(to_reap)
}

/// Forks a child that destroys the link and exits, and returns at once: the runtime sees DEL
/// finish while the kernel tears the veth down. The child's stdio points at /dev/null so the
/// runtime's pipes close when the parent exits. A fork of this small single-threaded process
/// costs far less than exec'ing a new one.
fn spawn_reaper(index: u32) -> io::Result<()> {
    use nix::unistd::{fork, ForkResult};
    // SAFETY: the plugin is single-threaded (current-thread runtime, no blocking pool), so the
    // child may run ordinary code. It never returns from here: it leaves through _exit.
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Parent { .. } => Ok(()),
        ForkResult::Child => {
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for fd in 0..3 {
                    // SAFETY: plain dup2 onto the standard descriptors of this process.
                    unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
                }
            }
            // Background cleanup yields the CPU to the runtime's foreground ADDs and DELs.
            // SAFETY: setpriority on this process only.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
            let code = reap(index);
            // SAFETY: ends the child without running the parent's destructors or atexit hooks.
            unsafe { libc::_exit(code) }
        }
    }
}

/// The reaper's whole job: delete one link in the namespace it was started in, by index, so
/// that a veth re-created under the same name by a quick re-ADD is never hit.
fn reap(index: u32) -> i32 {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    else {
        return 1;
    };
    rt.block_on(async {
        match Netlink::connect() {
            Ok(nl) => i32::from(nl.delete_link(index).await.is_err()),
            Err(_) => 1,
        }
    })
}

async fn check(env: &Env, conf: &NetConf) -> Result<()> {
    let net = conf.pod_network()?;
    let netns = open_netns(env.netns.as_deref().expect("validated for CHECK"))?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(Code::InvalidConfig, "CHECK needs prevResult in the config")
    })?;
    let prev = CniResult::from_prev(prev)?;
    let address = prev
        .ip_of(&env.ifname)
        .ok_or_else(|| {
            CniError::new(
                Code::CheckFailed,
                format!("prevResult lists no address for {}", env.ifname),
            )
        })?
        .address;

    let mut problems = Vec::new();
    let pod = Netlink::connect_in(&netns).map_err(connect_error)?;
    match pod
        .link(&env.ifname)
        .await
        .map_err(kernel_error("cannot look up the pod interface"))?
    {
        None => problems.push(format!(
            "interface {} is missing in the pod namespace",
            env.ifname
        )),
        Some(l) => {
            let want_mac = mac_from_ipv4(address.addr());
            if l.mac != want_mac {
                problems.push(format!(
                    "{} has MAC {}, expected {}",
                    env.ifname,
                    format_mac(&l.mac),
                    format_mac(&want_mac)
                ));
            }
            if l.mtu != net.mtu {
                problems.push(format!(
                    "{} has MTU {}, expected {}",
                    env.ifname, l.mtu, net.mtu
                ));
            }
            if !l.up {
                problems.push(format!("{} is down", env.ifname));
            }
            let addrs = pod
                .addresses(l.index)
                .await
                .map_err(kernel_error("cannot list addresses"))?;
            if !addrs.contains(&address) {
                problems.push(format!(
                    "{} lacks address {address} (has {addrs:?})",
                    env.ifname
                ));
            }
            let routes = pod
                .routes()
                .await
                .map_err(kernel_error("cannot list routes"))?;
            // Any interface of this network may carry the default route (see `wire`).
            if !routes
                .iter()
                .any(|(dst, gw, _)| *dst == default_route() && *gw == Some(net.gateway))
            {
                problems.push(format!("the pod has no default route via {}", net.gateway));
            }
        }
    }
    let host = Netlink::connect().map_err(connect_error)?;
    let host_veth = host_veth_name(&env.container_id, &env.ifname);
    let bridge = host
        .link(&net.bridge)
        .await
        .map_err(kernel_error("cannot look up the bridge"))?;
    match host
        .link(&host_veth)
        .await
        .map_err(kernel_error("cannot look up veth"))?
    {
        None => problems.push(format!("host veth {host_veth} is missing")),
        Some(l) if l.master.is_none() || l.master != bridge.as_ref().map(|b| b.index) => problems
            .push(format!(
                "host veth {host_veth} is not a port of bridge {}",
                net.bridge
            )),
        Some(_) => {}
    }
    let store = Store::open(&conf.store_dir())?;
    match store.find(&env.container_id, &env.ifname)? {
        Some(ip) if ip == address.addr() => {}
        other => problems.push(format!(
            "IPAM records {other:?} for this attachment, expected {}",
            address.addr()
        )),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(Code::CheckFailed, problems[0].clone()).with_details(problems.join("; ")))
    }
}

async fn status(conf: &NetConf) -> Result<()> {
    let host = Netlink::connect().map_err(connect_error)?;
    ready_bridge(&host, conf.bridge_name(), Code::NotAvailable).await?;
    Store::open(&conf.store_dir())
        .map_err(|e| CniError::new(Code::NotAvailable, e.msg).with_details(e.details))?;
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<()> {
    let valid = conf.valid_attachments.as_deref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "GC needs \"cni.dev/valid-attachments\" in the config",
        )
    })?;
    let released = Store::open(&conf.store_dir())?.release_all_but(valid)?;
    info!(released = ?released, "GC released addresses");

    // Host veths of attachments the runtime forgot (their namespace still held open somewhere).
    let host = Netlink::connect().map_err(connect_error)?;
    if let Some(bridge) = host
        .link(conf.bridge_name())
        .await
        .map_err(kernel_error("cannot look up the bridge"))?
    {
        let keep: Vec<String> = valid
            .iter()
            .map(|a| host_veth_name(&a.container_id, &a.ifname))
            .collect();
        for l in host
            .links()
            .await
            .map_err(kernel_error("cannot list links"))?
        {
            // Ours by name: on the bridge, or detached by a DEL whose reaper did not finish.
            let ours = l.name.starts_with(VETH_PREFIX)
                && (l.master == Some(bridge.index) || l.master.is_none());
            if ours && !keep.contains(&l.name) {
                host.delete_link(l.index)
                    .await
                    .map_err(kernel_error(format_args!("cannot delete {}", l.name)))?;
                info!(veth = %l.name, "GC deleted stale veth");
            }
        }
    }
    Ok(())
}
