//! The doctor's decisions, as pure functions of what was read: each turns facts about the node
//! into a finding with a one-line fix. Reading the facts is `gather`'s business.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;

use super::{Finding, Status};
use crate::config::IptablesBackend;
use crate::netfilter::backend::Backend;

fn finding(check: &str, status: Status, detail: String, fix: Option<String>) -> Finding {
    Finding {
        check: check.into(),
        status,
        detail,
        fix,
    }
}

/// A sysctl that must be 1. `value`: the file's content (None: the file does not exist).
pub fn sysctl_on(check: &str, name: &str, value: Option<&str>, missing: &str) -> Finding {
    match value.map(str::trim) {
        Some("1") => finding(check, Status::Ok, format!("{name} = 1"), None),
        Some(v) => finding(
            check,
            Status::Fail,
            format!("{name} = {v}"),
            Some(format!(
                "sysctl -w {name}=1 (rsdn node sets it on every pass: is it running here?)"
            )),
        ),
        None => finding(
            check,
            Status::Fail,
            format!("{name} does not exist: {missing}"),
            Some(format!("modprobe br_netfilter && sysctl -w {name}=1")),
        ),
    }
}

/// The kernel's rp_filter for an interface: the larger of `all` and the interface's own.
pub fn effective_rp_filter(conf: &BTreeMap<String, u8>, iface: &str) -> u8 {
    let all = conf.get("all").copied().unwrap_or(0);
    all.max(conf.get(iface).copied().unwrap_or(0))
}

/// A route for reverse-path purposes: its destination and device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDev {
    pub dst: Ipv4Net,
    pub dev: String,
}

fn lookup(routes: &[RouteDev], ip: Ipv4Addr) -> Option<&RouteDev> {
    routes
        .iter()
        .filter(|r| r.dst.contains(&ip))
        .max_by_key(|r| r.dst.prefix_len())
}

/// Packets rsdn's paths bring in on one interface, from these sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrivals {
    pub iface: String,
    /// (source network, what it is).
    pub sources: Vec<(Ipv4Net, String)>,
}

/// Strict rp_filter (1) drops a packet whose source is routed out of another interface than
/// the one it came in on; loose (2) only needs some route back. For every interface the paths
/// use and every source that arrives there, every part of the source network must route back
/// out of that interface.
pub fn rp_filter(
    conf: &BTreeMap<String, u8>,
    arrivals: &[Arrivals],
    routes: &[RouteDev],
) -> Finding {
    let mut problems = Vec::new();
    let mut modes = Vec::new();
    for a in arrivals {
        let mode = effective_rp_filter(conf, &a.iface);
        modes.push(format!(
            "{} {}",
            a.iface,
            match mode {
                0 => "off",
                1 => "strict",
                _ => "loose",
            }
        ));
        for (net, what) in &a.sources {
            // The network's ends, and the start of every more specific route inside it.
            let mut probes = vec![net.network(), net.broadcast()];
            probes.extend(
                routes
                    .iter()
                    .filter(|r| {
                        r.dst.prefix_len() > net.prefix_len() && net.contains(&r.dst.network())
                    })
                    .map(|r| r.dst.network()),
            );
            for ip in probes {
                let back = lookup(routes, ip);
                let bad = match (mode, back) {
                    (0, _) => false,
                    (1, Some(r)) => r.dev != a.iface,
                    (_, None) => true,
                    _ => false,
                };
                if bad {
                    problems.push(format!(
                        "{what} ({ip}) arriving on {} is dropped: its route back is {}",
                        a.iface,
                        back.map_or("missing".to_string(), |r| format!(
                            "{} dev {}",
                            r.dst, r.dev
                        ))
                    ));
                    break;
                }
            }
        }
    }
    if problems.is_empty() {
        return finding(
            "rp-filter",
            Status::Ok,
            format!("rp_filter: {}", modes.join(", ")),
            None,
        );
    }
    finding(
        "rp-filter",
        Status::Fail,
        problems.join("; "),
        Some(
            "remove the route that sends those sources elsewhere, or make rp_filter loose: sysctl -w net.ipv4.conf.all.rp_filter=2 (and the interface's own)"
                .into(),
        ),
    )
}

/// The MTUs of the path, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mtus {
    /// (name, MTU) of the interface carrying the node IP.
    pub underlay: Option<(String, u32)>,
    pub vxlan: Option<u32>,
    pub bridge: Option<u32>,
    /// `mtu` of the configuration, if set.
    pub configured: Option<u32>,
    /// The MTU the conflist gives pods.
    pub conflist: Option<u32>,
    /// Pod veths on tun0.
    pub veths: Vec<(String, u32)>,
}

/// All of the overlay's MTUs must be the pod MTU (the configuration's, else the underlay's
/// minus the 50 bytes of VXLAN), and that must fit the underlay.
pub fn mtu(m: &Mtus, overhead: u32) -> Finding {
    let check = "mtu";
    let Some(want) = m
        .configured
        .or(m.underlay.as_ref().map(|(_, u)| u.saturating_sub(overhead)))
    else {
        return finding(
            check,
            Status::Skip,
            "the underlay interface (holding the node IP) was not found".into(),
            None,
        );
    };
    let mut bad = Vec::new();
    if let Some((name, u)) = &m.underlay {
        if want + overhead > *u {
            bad.push(format!(
                "pods get {want}, which with {overhead} bytes of VXLAN exceeds {name}'s {u}"
            ));
        }
    }
    for (what, v) in [
        ("vxlan0", m.vxlan),
        ("tun0", m.bridge),
        ("the conflist's mtu", m.conflist),
    ] {
        match v {
            Some(v) if v != want => bad.push(format!("{what} is {v}")),
            None if what != "the conflist's mtu" => bad.push(format!("{what} does not exist")),
            _ => {}
        }
    }
    let odd: Vec<String> = m
        .veths
        .iter()
        .filter(|(_, v)| *v != want)
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    if !odd.is_empty() {
        bad.push(format!("pod veths: {}", odd.join(", ")));
    }
    let underlay = m
        .underlay
        .as_ref()
        .map(|(n, u)| format!("underlay {n} {u}, "))
        .unwrap_or_default();
    if bad.is_empty() {
        return finding(
            check,
            Status::Ok,
            format!(
                "{underlay}vxlan0, tun0, conflist and {} pod veth(s): {want}",
                m.veths.len()
            ),
            None,
        );
    }
    finding(
        check,
        Status::Fail,
        format!("want {want} ({underlay}minus {overhead}): {}", bad.join("; ")),
        Some(format!(
            "let rsdn node put vxlan0, tun0 and the veths right (it does on every pass), or set mtu in its configuration to the path MTU minus {overhead}; pods created before keep their MTU until restarted"
        )),
    )
}

/// `6.18.44-fc` -> (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// What the 63-second delay check needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offload {
    pub kernel: String,
    /// tx checksum offload on vxlan0 (None: unknown).
    pub vxlan_tx: Option<bool>,
    /// (name, driver, tx checksum) of the underlay.
    pub underlay: Option<(String, String, Option<bool>)>,
    /// The rule that masquerades VXLAN packets leaving this node, if any does (with the mark
    /// a masqueraded Service packet leaves KUBE-POSTROUTING with).
    pub outer_masquerade: Option<String>,
}

/// kubernetes/kubernetes#88986: on kernels before 5.7, a VXLAN packet that is masqueraded
/// (its inner packet's masquerade mark left set, or a rule matching UDP to the VXLAN port)
/// gets a wrong UDP checksum when vxlan0 offloads it; the receiver drops it and a connection
/// waits for SYN retries: 1+2+4+8+16+32 = 63 s.
pub fn checksum(o: &Offload) -> Finding {
    let check = "vxlan-checksum";
    let affected = kernel_version(&o.kernel).is_some_and(|v| v < (5, 7));
    let tx = match o.vxlan_tx {
        Some(true) => "on",
        Some(false) => "off",
        None => "unknown",
    };
    let under = o
        .underlay
        .as_ref()
        .map(|(n, d, t)| {
            format!(
                ", underlay {n} (driver {d}) tx-checksumming {}",
                match t {
                    Some(true) => "on",
                    Some(false) => "off",
                    None => "unknown",
                }
            )
        })
        .unwrap_or_default();
    let facts = format!(
        "kernel {}{}, vxlan0 tx-checksumming {tx}{under}",
        o.kernel,
        if affected {
            " (before 5.7: has the bug)"
        } else {
            ""
        }
    );
    let fix_tx =
        "ethtool -K vxlan0 tx-checksum-ip-generic off (on every node; persist it with a udev rule)";
    match (&o.outer_masquerade, affected, o.vxlan_tx) {
        (Some(rule), true, Some(true) | None) => finding(
            check,
            Status::Fail,
            format!("{facts}; VXLAN packets are masqueraded by {rule}: the 63-second Service delay (kubernetes#88986)"),
            Some(format!("{fix_tx}; and stop masquerading VXLAN packets (clear the mark before MASQUERADE, as KUBE-POSTROUTING's --xor-mark does)")),
        ),
        (Some(rule), true, Some(false)) => finding(
            check,
            Status::Warn,
            format!("{facts}; VXLAN packets are masqueraded by {rule}, worked around by the offload being off"),
            Some("stop masquerading VXLAN packets (clear the mark before MASQUERADE)".into()),
        ),
        (Some(rule), false, _) => finding(
            check,
            Status::Warn,
            format!("{facts}; VXLAN packets are masqueraded by {rule}: harmless on this kernel, but it scatters the overlay's source ports and breaks with tx checksum offload on kernels before 5.7"),
            Some("stop masquerading VXLAN packets (clear the mark before MASQUERADE, as KUBE-POSTROUTING's --xor-mark does)".into()),
        ),
        (None, true, Some(true)) => finding(
            check,
            Status::Warn,
            format!("{facts}; nothing masquerades VXLAN packets now, but this kernel breaks their checksums if something does"),
            Some(fix_tx.into()),
        ),
        _ => finding(
            check,
            Status::Ok,
            format!("{facts}; VXLAN packets are not masqueraded"),
            None,
        ),
    }
}

/// Where chains of interest are, per backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backends {
    /// The kubelet's hint chain (KUBE-IPTABLES-HINT or KUBE-KUBELET-CANARY) is in it.
    pub hint: Vec<Backend>,
    /// rsdn's chains (RSDN-*) are in it.
    pub ours: Vec<Backend>,
}

pub fn backend(b: &Backends, configured: IptablesBackend) -> Finding {
    let check = "iptables-backend";
    let names = |v: &[Backend]| v.iter().map(|b| b.name()).collect::<Vec<_>>().join(" and ");
    if b.ours.len() > 1 {
        return finding(
            check,
            Status::Fail,
            format!("rsdn's chains are in both {}", names(&b.ours)),
            Some("the backend changed under a running node: restart rsdn node, then delete the RSDN-*/KUBE-* chains of the other backend (or reboot the node)".into()),
        );
    }
    let Some(ours) = b.ours.first() else {
        return finding(
            check,
            Status::Warn,
            format!("no rsdn chains in either backend (iptablesBackend: {configured}): is rsdn node running?"),
            None,
        );
    };
    match b.hint.as_slice() {
        [] => finding(
            check,
            Status::Warn,
            format!("rsdn uses {}; the kubelet's hint chain (KUBE-IPTABLES-HINT in mangle) is in neither backend, so it cannot be compared", ours.name()),
            None,
        ),
        [h] if h == ours => finding(
            check,
            Status::Ok,
            format!("rsdn and the kubelet both use {}", ours.name()),
            None,
        ),
        hints => finding(
            check,
            Status::Fail,
            format!(
                "rsdn uses {} but the kubelet's hint chain is in {}: the node's rules are split between two backends",
                ours.name(),
                names(hints)
            ),
            Some(format!(
                "set iptablesBackend: {} (or auto) in rsdn's configuration and restart it",
                hints[0].name()
            )),
        ),
    }
}

/// The runtime uses the first file of the CNI configuration directory by name (`.conf`,
/// `.conflist`, `.json`, as libcni sorts them).
pub fn conflist_first(dir: &str, files: &[String], ours: &str) -> Finding {
    let check = "cni-conflist";
    let mut configs: Vec<&String> = files
        .iter()
        .filter(|f| {
            [".conf", ".conflist", ".json"]
                .iter()
                .any(|x| f.ends_with(x))
        })
        .collect();
    configs.sort();
    match configs.first() {
        None => finding(
            check,
            Status::Fail,
            format!("{dir} holds no CNI configuration: rsdn node writes {ours} once the node's network is programmed"),
            Some("see rsdn node's log and /readyz for what it waits for".into()),
        ),
        Some(f) if *f == ours => finding(
            check,
            Status::Ok,
            format!("{ours} is the first of {} file(s) in {dir}", configs.len()),
            None,
        ),
        Some(f) if configs.iter().any(|c| *c == ours) => finding(
            check,
            Status::Fail,
            format!("{f} sorts before {ours} in {dir}: the runtime uses it, not rsdn"),
            Some(format!("remove {dir}/{f} (another network plugin's), or name rsdn's file to sort first (cniConfFile)")),
        ),
        Some(f) => finding(
            check,
            Status::Fail,
            format!("{ours} is not in {dir}; the runtime uses {f}"),
            Some("see rsdn node's log and /readyz for what it waits for".into()),
        ),
    }
}

/// What betrays kube-proxy on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeProxy {
    /// "mangle/KUBE-PROXY-CANARY (nft)" ...
    pub canaries: Vec<String>,
    /// Jumps to KUBE-SERVICES in nat PREROUTING (ours is one).
    pub service_jumps: usize,
    /// KUBE-SVC- chains in a backend rsdn does not use.
    pub foreign_services: Vec<String>,
}

pub fn kube_proxy(k: &KubeProxy, proxy: bool) -> Finding {
    let check = "kube-proxy";
    let mut signs = k.canaries.clone();
    if k.service_jumps > 1 {
        signs.push(format!(
            "{} jumps to KUBE-SERVICES in nat PREROUTING",
            k.service_jumps
        ));
    }
    signs.extend(k.foreign_services.iter().cloned());
    match (proxy, signs.is_empty()) {
        (true, true) => finding(check, Status::Ok, "no sign of kube-proxy; rsdn is the Service proxy".into(), None),
        (true, false) => finding(
            check,
            Status::Fail,
            format!("kube-proxy programs Services here too: {}", signs.join(", ")),
            Some("delete kube-proxy (kubectl -n kube-system delete daemonset kube-proxy) and its rules (kube-proxy --cleanup), or set proxy: false in rsdn's configuration".into()),
        ),
        (false, false) => finding(check, Status::Ok, format!("proxy: false and kube-proxy runs: {}", signs.join(", ")), None),
        (false, true) => finding(
            check,
            Status::Warn,
            "proxy: false, but there is no sign of kube-proxy: nothing proxies Services".into(),
            Some("run kube-proxy, or set proxy: true in rsdn's configuration".into()),
        ),
    }
}

/// Every plugin the conflist chains must be in the CNI binary directory.
pub fn plugins(
    conflist: Option<&str>,
    types: &[String],
    missing: &[String],
    bin_dir: &str,
) -> Finding {
    let check = "cni-plugins";
    let Some(path) = conflist else {
        return finding(
            check,
            Status::Skip,
            "no conflist of rsdn's to read".into(),
            None,
        );
    };
    if missing.is_empty() {
        return finding(
            check,
            Status::Ok,
            format!("{} in {bin_dir} (chained by {path})", types.join(", ")),
            None,
        );
    }
    let portmap = missing.iter().any(|m| m == "portmap");
    finding(
        check,
        Status::Fail,
        format!(
            "{path} chains {} but {bin_dir} lacks {}: pod sandboxes fail to start",
            types.join(", "),
            missing.join(", ")
        ),
        Some(if portmap {
            format!("install the reference CNI plugins into {bin_dir} (Debian: containernetworking-plugins; or github.com/containernetworking/plugins releases)")
        } else {
            format!("copy the missing plugin into {bin_dir} (rsdn-cni: rsdn install-cni --bin-dir {bin_dir})")
        }),
    )
}

/// The conntrack table: nf_conntrack_count against nf_conntrack_max.
pub fn conntrack(count: Option<u64>, max: Option<u64>) -> Finding {
    let check = "conntrack";
    let (Some(count), Some(max)) = (count, max) else {
        return finding(
            check,
            Status::Skip,
            "nf_conntrack is not loaded here".into(),
            None,
        );
    };
    let used = if max == 0 {
        0.0
    } else {
        count as f64 / max as f64
    };
    let detail = format!("{count} of {max} entries ({:.0}%)", used * 100.0);
    let fix = Some(format!(
        "raise it: sysctl -w net.netfilter.nf_conntrack_max={} (a table full drops new connections: 'nf_conntrack: table full' in dmesg); conntrack -L shows who holds them",
        max.saturating_mul(2)
    ));
    if used >= 0.9 {
        finding(check, Status::Fail, format!("{detail}: nearly full"), fix)
    } else if used >= 0.75 {
        finding(check, Status::Warn, format!("{detail}: filling up"), fix)
    } else {
        finding(check, Status::Ok, detail, None)
    }
}

/// One peer's probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub ip: Ipv4Addr,
    pub vtep: Ipv4Addr,
    /// The VTEP's echo reply through the overlay.
    pub overlay: Option<Duration>,
    /// The node IP's echo reply on the underlay.
    pub underlay: Option<Duration>,
}

pub fn peers(list: &[Peer], port: u16) -> Finding {
    let check = "vxlan-peers";
    if list.is_empty() {
        return finding(check, Status::Ok, "no other node to probe".into(), None);
    }
    let ms = |d: &Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    let mut bad = Vec::new();
    for p in list.iter().filter(|p| p.overlay.is_none()) {
        bad.push(match &p.underlay {
            Some(d) => format!(
                "{} ({}): its VTEP {} does not answer over VXLAN, though {} answers on the underlay ({}): UDP {port} is blocked between the nodes, or the overlay entries are missing",
                p.node, p.ip, p.vtep, p.ip, ms(d)
            ),
            None => format!(
                "{} ({}): neither its VTEP {} over VXLAN nor its node IP answers (down, or ICMP filtered)",
                p.node, p.ip, p.vtep
            ),
        });
    }
    if bad.is_empty() {
        let rtts: Vec<String> = list
            .iter()
            .map(|p| {
                format!(
                    "{} {}",
                    p.node,
                    p.overlay.as_ref().map(ms).unwrap_or_default()
                )
            })
            .collect();
        return finding(
            check,
            Status::Ok,
            format!(
                "every peer's VTEP answers over VXLAN (UDP {port}): {}",
                rtts.join(", ")
            ),
            None,
        );
    }
    finding(
        check,
        Status::Fail,
        bad.join("; "),
        Some(format!(
            "open UDP {port} between the node IPs (firewall, security group) and compare rsdn tunnel list on both nodes"
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_are_read_as_the_files_say() {
        let f = sysctl_on("x", "net.ipv4.ip_forward", Some("1\n"), "");
        assert_eq!(f.status, Status::Ok);
        let f = sysctl_on("x", "net.ipv4.ip_forward", Some("0\n"), "");
        assert_eq!(
            (f.status, f.detail.as_str()),
            (Status::Fail, "net.ipv4.ip_forward = 0")
        );
        assert!(f.fix.unwrap().contains("sysctl -w net.ipv4.ip_forward=1"));
        let f = sysctl_on(
            "x",
            "net.bridge.bridge-nf-call-iptables",
            None,
            "br_netfilter is not loaded",
        );
        assert!(f.fix.unwrap().contains("modprobe br_netfilter"));
    }

    fn routes(list: &[(&str, &str)]) -> Vec<RouteDev> {
        list.iter()
            .map(|(d, dev)| RouteDev {
                dst: d.parse().unwrap(),
                dev: dev.to_string(),
            })
            .collect()
    }

    #[test]
    fn strict_rp_filter_fails_only_where_a_source_routes_elsewhere() {
        let arrivals = [Arrivals {
            iface: "vxlan0".into(),
            sources: vec![("10.128.2.0/23".parse().unwrap(), "node2's pods".into())],
        }];
        let good = routes(&[("0.0.0.0/0", "eth0"), ("10.128.2.0/23", "vxlan0")]);
        let mut conf = BTreeMap::from([("all".to_string(), 1u8)]);
        assert_eq!(rp_filter(&conf, &arrivals, &good).status, Status::Ok);
        // A /32 inside the subnet out of eth0: found by its own probe.
        let bad = routes(&[
            ("0.0.0.0/0", "eth0"),
            ("10.128.2.0/23", "vxlan0"),
            ("10.128.3.7/32", "eth0"),
        ]);
        let f = rp_filter(&conf, &arrivals, &bad);
        assert_eq!(f.status, Status::Fail, "{}", f.detail);
        assert!(f.detail.contains("10.128.3.7"), "{}", f.detail);
        // Loose or off: fine.
        conf.insert("all".into(), 2);
        assert_eq!(rp_filter(&conf, &arrivals, &bad).status, Status::Ok);
        conf.insert("all".into(), 0);
        conf.insert("vxlan0".into(), 1);
        assert_eq!(effective_rp_filter(&conf, "vxlan0"), 1);
        assert_eq!(rp_filter(&conf, &arrivals, &bad).status, Status::Fail);
    }

    #[test]
    fn mtus_must_all_be_the_pod_mtu() {
        let mut m = Mtus {
            underlay: Some(("eth0".into(), 1500)),
            vxlan: Some(1450),
            bridge: Some(1450),
            configured: None,
            conflist: Some(1450),
            veths: vec![("rsdna".into(), 1450)],
        };
        assert_eq!(mtu(&m, 50).status, Status::Ok);
        m.veths.push(("rsdnb".into(), 1500));
        m.vxlan = Some(1400);
        let f = mtu(&m, 50);
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.detail.contains("vxlan0 is 1400") && f.detail.contains("rsdnb 1500"),
            "{}",
            f.detail
        );
        // A configured MTU too large for the underlay.
        let m = Mtus {
            underlay: Some(("eth0".into(), 1460)),
            vxlan: Some(1450),
            bridge: Some(1450),
            configured: Some(1450),
            ..Default::default()
        };
        assert!(mtu(&m, 50).detail.contains("exceeds eth0's 1460"));
        assert_eq!(mtu(&Mtus::default(), 50).status, Status::Skip);
    }

    #[test]
    fn the_checksum_decision_table() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("4.18.0-305.el8.x86_64"), Some((4, 18)));
        let case = |kernel: &str, tx, masq: bool| {
            checksum(&Offload {
                kernel: kernel.into(),
                vxlan_tx: tx,
                underlay: Some(("eth0".into(), "vmxnet3".into(), Some(true))),
                outer_masquerade: masq
                    .then(|| "-A POSTROUTING -p udp --dport 4789 -j MASQUERADE".into()),
            })
            .status
        };
        assert_eq!(case("5.4.0", Some(true), true), Status::Fail);
        assert_eq!(case("5.4.0", None, true), Status::Fail);
        assert_eq!(case("5.4.0", Some(false), true), Status::Warn);
        assert_eq!(case("5.4.0", Some(true), false), Status::Warn);
        assert_eq!(case("5.4.0", Some(false), false), Status::Ok);
        assert_eq!(case("5.7.0", Some(true), true), Status::Warn);
        assert_eq!(case("6.18.44", Some(true), false), Status::Ok);
    }

    #[test]
    fn backends_conflists_kube_proxy_plugins_conntrack_and_peers() {
        let b = Backends {
            hint: vec![Backend::Legacy],
            ours: vec![Backend::Nft],
        };
        assert_eq!(backend(&b, IptablesBackend::Auto).status, Status::Fail);
        let b = Backends {
            hint: vec![Backend::Nft],
            ours: vec![Backend::Nft],
        };
        assert_eq!(backend(&b, IptablesBackend::Auto).status, Status::Ok);
        let files = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ours = "10-rsdn.conflist";
        assert_eq!(
            conflist_first("/d", &files(&[ours, "99-x.conf"]), ours).status,
            Status::Ok
        );
        let f = conflist_first("/d", &files(&[ours, "05-x.conflist", "00-notes.txt"]), ours);
        assert!(
            f.detail.starts_with("05-x.conflist sorts before"),
            "{}",
            f.detail
        );
        assert_eq!(conflist_first("/d", &files(&[]), ours).status, Status::Fail);
        let k = KubeProxy {
            canaries: vec!["mangle/KUBE-PROXY-CANARY (nft)".into()],
            ..Default::default()
        };
        assert_eq!(kube_proxy(&k, true).status, Status::Fail);
        assert_eq!(kube_proxy(&k, false).status, Status::Ok);
        assert_eq!(
            kube_proxy(&KubeProxy::default(), false).status,
            Status::Warn
        );
        let types = files(&["rsdn-cni", "portmap"]);
        let f = plugins(
            Some("/n/10-rsdn.conflist"),
            &types,
            &files(&["portmap"]),
            "/opt/cni/bin",
        );
        assert!(f.fix.unwrap().contains("containernetworking-plugins"));
        assert_eq!(conntrack(Some(10), Some(100)).status, Status::Ok);
        assert_eq!(conntrack(Some(80), Some(100)).status, Status::Warn);
        assert_eq!(conntrack(Some(95), Some(100)).status, Status::Fail);
        let p = |overlay: bool, underlay: bool| Peer {
            node: "node2".into(),
            ip: "192.168.77.12".parse().unwrap(),
            vtep: "10.128.2.0".parse().unwrap(),
            overlay: overlay.then(|| Duration::from_micros(300)),
            underlay: underlay.then(|| Duration::from_micros(200)),
        };
        assert_eq!(peers(&[p(true, true)], 4789).status, Status::Ok);
        let f = peers(&[p(false, true)], 4789);
        assert!(f.detail.contains("UDP 4789 is blocked"), "{}", f.detail);
    }
}
