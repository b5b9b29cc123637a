//! Kernel tier for the overlay: the real reconciler, on a dedicated thread inside a fresh
//! network namespace, against the real kernel. State is checked with iproute2.

use rsdn::config::NodeConfig;
use rsdn::model::testing::{model, three};
use rsdn::model::{ClusterModel, NodeSubnet};
use rsdn::overlay::kernel::Kernel;
use rsdn::overlay::reconcile::{Pass, Reconciler};
use rsdn_testkit::{need_root, Netns};

/// A node namespace with an underlay interface holding the node IP (MTU 1500).
fn node_ns() -> (Netns, tempfile::TempDir) {
    let ns = Netns::new("ovl");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.ip(&["addr", "add", "192.168.1.11/24", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["link", "set", "peer0", "up"]);
    (ns, tempfile::tempdir().unwrap())
}

/// vxlan0, up, as an earlier run (or a test) might have left it.
fn add_vxlan0(ns: &Netns, vni: &str) {
    let cmd =
        format!("link add vxlan0 type vxlan id {vni} dstport 4789 local 192.168.1.11 nolearning");
    ns.ip(&cmd.split(' ').collect::<Vec<_>>());
    ns.ip(&["link", "set", "vxlan0", "up"]);
}

fn config(dir: &tempfile::TempDir) -> NodeConfig {
    let mut c = NodeConfig::for_test("a");
    c.vni = 7;
    c.cni_conf_dir = dir.path().join("net.d");
    c
}

/// Runs `f` with a kernel connection inside `ns`, on a thread of its own (setns is per thread).
fn in_ns<T, F>(ns: &Netns, f: impl FnOnce(Kernel) -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    ns.on_thread(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { f(Kernel::connect().unwrap()).await })
    })
}

/// Runs reconcile passes over `models` inside `ns`, one after the other.
fn passes(ns: &Netns, cfg: NodeConfig, models: Vec<ClusterModel>) -> Vec<Pass> {
    in_ns(ns, |kernel| async move {
        let mut r = Reconciler::new(cfg, kernel);
        let mut out = Vec::new();
        for m in models {
            out.push(r.reconcile(&m).await.unwrap());
        }
        out
    })
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

/// The three entry kinds on vxlan0, normalised.
fn overlay_state(ns: &Netns) -> (Vec<String>, Vec<String>, Vec<String>) {
    let fdb = ns.run(&["bridge", "fdb", "show", "dev", "vxlan0"]).1;
    let fdb: Vec<String> = lines(&fdb)
        .into_iter()
        .filter(|l| l.contains(" dst "))
        .collect();
    let neigh = lines(&ns.ip(&["neigh", "show", "dev", "vxlan0", "nud", "permanent"]));
    let routes = lines(&ns.ip(&["route", "show", "proto", "212"]));
    (fdb, neigh, routes)
}

#[test]
fn from_empty_programs_devices_entries_and_conflist_then_changes_nothing() {
    need_root!();
    let (ns, dir) = node_ns();
    let cfg = config(&dir);
    let conf_path = cfg.cni_conf_path();
    let p = passes(&ns, cfg, vec![model(&three()), model(&three())]);

    assert!(p[0].conflist_written && p[0].failures.is_empty());
    assert_eq!(p[0].applied.len(), 6);
    assert!(
        p[1].applied.is_empty() && p[1].device_changes.is_empty() && !p[1].conflist_written,
        "second pass changed things: {:?}",
        p[1].applied
    );

    let tun0 = ns.ip(&["-d", "addr", "show", "tun0"]);
    assert!(
        tun0.contains("inet 10.128.0.1/23")
            && tun0.contains("mtu 1450")
            && tun0.contains("0a:58:0a:80:00:01"),
        "{tun0}"
    );
    let vx = ns.ip(&["-d", "link", "show", "vxlan0"]);
    assert!(
        vx.contains("vxlan id 7")
            && vx.contains("local 192.168.1.11")
            && vx.contains("dstport 4789"),
        "{vx}"
    );
    assert!(
        vx.contains("nolearning") && vx.contains("mtu 1450") && vx.contains("0a:58:c0:a8:01:0b"),
        "{vx}"
    );
    // The VTEP address, flannel-style, so masqueraded traffic comes back through the overlay.
    let vx_addr = ns.ip(&["-4", "-o", "addr", "show", "vxlan0"]);
    assert!(
        vx_addr.contains("inet 10.128.0.0/32") && vx_addr.lines().count() == 1,
        "{vx_addr}"
    );

    let (fdb, neigh, routes) = overlay_state(&ns);
    assert_eq!(
        fdb,
        [
            "0a:58:c0:a8:01:0c dst 192.168.1.12 self permanent",
            "0a:58:c0:a8:01:0d dst 192.168.1.13 self permanent"
        ]
    );
    assert_eq!(
        neigh,
        [
            "10.128.2.0 lladdr 0a:58:c0:a8:01:0c PERMANENT",
            "10.128.4.0 lladdr 0a:58:c0:a8:01:0d PERMANENT"
        ]
    );
    assert_eq!(
        routes,
        [
            "10.128.2.0/23 via 10.128.2.0 dev vxlan0 src 10.128.0.1 onlink",
            "10.128.4.0/23 via 10.128.4.0 dev vxlan0 src 10.128.0.1 onlink"
        ]
    );
    assert_eq!(
        ns.run(&["cat", "/proc/sys/net/ipv4/ip_forward"]).1.trim(),
        "1"
    );
    assert_eq!(
        ns.run(&["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"])
            .1
            .trim(),
        "1"
    );

    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf_path).unwrap()).unwrap();
    assert_eq!(list["plugins"][0]["subnet"], "10.128.0.0/23");
    assert_eq!(list["plugins"][0]["mtu"], 1450);
}

/// What a restarted daemon reads back before its cluster source starts: the remote nodes'
/// subnet claims, which no newcomer may take over; nothing while vxlan0 does not exist.
#[test]
fn the_kernel_tells_a_restarted_daemon_its_subnet_claims() {
    need_root!();
    let (ns, dir) = node_ns();
    let net = config(&dir).cluster_network;
    let before = in_ns(&ns, move |k| async move {
        rsdn::overlay::reconcile::programmed_claims(&k, net).await
    });
    assert!(before.is_empty(), "{before:?}");
    passes(&ns, config(&dir), vec![model(&three())]);
    let after = in_ns(&ns, move |k| async move {
        rsdn::overlay::reconcile::programmed_claims(&k, net).await
    });
    let want: std::collections::BTreeMap<_, _> =
        three()[1..].iter().map(|n| (n.subnet.0, n.ip)).collect();
    assert_eq!(after, want);
}

#[test]
fn waits_without_programming_anything_until_the_local_node_is_known() {
    need_root!();
    let (ns, dir) = node_ns();
    let cfg = config(&dir);
    let conf_path = cfg.cni_conf_path();
    let others = three()[1..].to_vec();
    let p = passes(&ns, cfg, vec![model(&others)]);
    assert!(p[0].waiting.as_deref().unwrap().contains("Node/a"));
    assert!(
        !ns.run(&["ip", "link", "show", "vxlan0"]).0,
        "vxlan0 created before the node was known"
    );
    assert!(
        !conf_path.exists(),
        "conflist written before the network was programmed"
    );
}

#[test]
fn from_partial_and_stale_state_converges_exactly() {
    need_root!();
    let (ns, dir) = node_ns();
    // An earlier run left: vxlan0 with another VNI, an entry set for a node that is gone (d),
    // b's route only, and a wrong MAC for c's VTEP neighbour.
    add_vxlan0(&ns, "99");
    let p = passes(&ns, config(&dir), vec![model(&three())]);
    assert!(
        p[0].device_changes.iter().any(|c| c.contains("outdated")),
        "{:?}",
        p[0].device_changes
    );
    ns.ip(&[
        "route",
        "add",
        "10.128.6.0/23",
        "via",
        "10.128.6.0",
        "dev",
        "vxlan0",
        "onlink",
        "proto",
        "212",
    ]);
    ns.ip(&[
        "neigh",
        "replace",
        "10.128.6.0",
        "lladdr",
        "0a:58:c0:a8:01:0e",
        "dev",
        "vxlan0",
        "nud",
        "permanent",
    ]);
    ns.run(&[
        "bridge",
        "fdb",
        "append",
        "0a:58:c0:a8:01:0e",
        "dev",
        "vxlan0",
        "dst",
        "192.168.1.14",
        "self",
        "permanent",
    ]);
    ns.ip(&[
        "neigh",
        "replace",
        "10.128.4.0",
        "lladdr",
        "0a:58:01:02:03:04",
        "dev",
        "vxlan0",
        "nud",
        "permanent",
    ]);
    ns.ip(&["route", "del", "10.128.4.0/23"]);
    let p = passes(&ns, config(&dir), vec![model(&three()), model(&three())]);
    assert_eq!(p[0].applied.len(), 5, "{:?}", p[0].applied);
    assert!(p[1].applied.is_empty());
    let (fdb, neigh, routes) = overlay_state(&ns);
    assert_eq!(fdb.len(), 2, "{fdb:?}");
    assert_eq!(
        neigh,
        [
            "10.128.2.0 lladdr 0a:58:c0:a8:01:0c PERMANENT",
            "10.128.4.0 lladdr 0a:58:c0:a8:01:0d PERMANENT"
        ]
    );
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(!routes.iter().any(|r| r.contains("10.128.6.0")));
}

#[test]
fn foreign_entries_are_left_alone() {
    need_root!();
    let (ns, dir) = node_ns();
    passes(&ns, config(&dir), vec![model(&three())]);
    // Someone else's state, on our devices and elsewhere.
    ns.ip(&[
        "route",
        "add",
        "10.200.0.0/16",
        "via",
        "192.168.1.1",
        "dev",
        "eth0",
        "proto",
        "static",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.128.8.0/23",
        "dev",
        "vxlan0",
        "proto",
        "static",
    ]);
    ns.ip(&[
        "neigh",
        "add",
        "192.168.1.77",
        "lladdr",
        "02:00:00:00:00:77",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    ns.ip(&[
        "neigh",
        "add",
        "172.16.0.1",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "vxlan0",
        "nud",
        "permanent",
    ]);
    let added = ns.run(&[
        "bridge",
        "fdb",
        "append",
        "00:00:00:00:00:00",
        "dev",
        "vxlan0",
        "dst",
        "192.168.1.99",
        "self",
        "permanent",
    ]);
    assert!(added.0, "{}", added.1);
    ns.ip(&["addr", "add", "192.168.2.1/24", "dev", "eth0"]);
    let before = (
        ns.ip(&["route"]),
        ns.ip(&["neigh"]),
        ns.run(&["bridge", "fdb", "show"]).1,
        ns.ip(&["addr"]),
    );

    let p = passes(&ns, config(&dir), vec![model(&three())]);
    assert!(p[0].applied.is_empty(), "touched: {:?}", p[0].applied);
    let after = (
        ns.ip(&["route"]),
        ns.ip(&["neigh"]),
        ns.run(&["bridge", "fdb", "show"]).1,
        ns.ip(&["addr"]),
    );
    assert_eq!(lines(&before.0), lines(&after.0));
    // Configured neighbours only: the kernel may meanwhile start resolving 192.168.1.99 (the
    // foreign flood entry's destination) on its own, an INCOMPLETE entry nobody configured.
    let configured = |s: &str| -> Vec<String> {
        lines(s)
            .into_iter()
            .filter(|l| l.ends_with("PERMANENT"))
            .collect()
    };
    assert_eq!(configured(&before.1), configured(&after.1));
    assert_eq!(lines(&before.2).len(), lines(&after.2).len());
    assert_eq!(lines(&before.3), lines(&after.3));

    // Removing every remote node removes only what is ours.
    let alone = model(&three()[..1]);
    passes(&ns, config(&dir), vec![alone]);
    let routes = ns.ip(&["route"]);
    assert!(
        routes.contains("10.200.0.0/16")
            && routes.contains("10.128.8.0/23 dev vxlan0 proto static"),
        "{routes}"
    );
    assert!(!routes.contains("10.128.2.0/23"), "{routes}");
    assert!(ns.ip(&["neigh"]).contains("172.16.0.1"));
    let fdb = ns.run(&["bridge", "fdb", "show", "dev", "vxlan0"]).1;
    assert!(fdb.contains("00:00:00:00:00:00 dst 192.168.1.99"), "{fdb}");
}

#[test]
fn node_ip_and_subnet_changes_replace_the_old_entries() {
    need_root!();
    let (ns, dir) = node_ns();
    let mut changed = three();
    changed[1].ip = "192.168.1.22".parse().unwrap();
    changed[2].subnet = NodeSubnet("10.128.10.0/23".parse().unwrap());
    passes(&ns, config(&dir), vec![model(&three()), model(&changed)]);
    let (fdb, neigh, routes) = overlay_state(&ns);
    assert_eq!(
        fdb,
        [
            "0a:58:c0:a8:01:0d dst 192.168.1.13 self permanent",
            "0a:58:c0:a8:01:16 dst 192.168.1.22 self permanent"
        ]
    );
    assert_eq!(
        neigh,
        [
            "10.128.10.0 lladdr 0a:58:c0:a8:01:0d PERMANENT",
            "10.128.2.0 lladdr 0a:58:c0:a8:01:16 PERMANENT"
        ]
    );
    assert_eq!(
        routes,
        [
            "10.128.10.0/23 via 10.128.10.0 dev vxlan0 src 10.128.0.1 onlink",
            "10.128.2.0/23 via 10.128.2.0 dev vxlan0 src 10.128.0.1 onlink"
        ]
    );
}

#[test]
fn sysctls_change_only_in_the_test_namespace() {
    need_root!();
    let root_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let (ns, dir) = node_ns();
    passes(&ns, config(&dir), vec![model(&three())]);
    assert_eq!(
        ns.run(&["cat", "/proc/sys/net/ipv4/ip_forward"]).1.trim(),
        "1"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        root_forward
    );
}

/// Batched apply across several datagrams: the one request the kernel refuses (a route whose
/// source address is not local), in the middle of the second chunk, is the one reported, with
/// its errno; every other entry is in the kernel; deleting what is already gone is success.
#[test]
fn batched_apply_reports_exactly_the_refused_requests() {
    use rsdn::overlay::{Action, RouteTarget, VtepMac};
    need_root!();
    let (ns, _dir) = node_ns();
    add_vxlan0(&ns, "7");
    ns.ip(&["link", "add", "tun0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.128.0.1/23", "dev", "tun0"]);
    ns.ip(&["link", "set", "tun0", "up"]);

    let local_src = "10.128.0.1".parse().unwrap();
    let mut actions = vec![
        Action::DelRoute("10.200.0.0/24".parse().unwrap()),
        Action::DelNeigh("10.200.0.0".parse().unwrap()),
        Action::DelFdb(
            VtepMac::of("192.168.9.9".parse().unwrap()),
            "192.168.9.9".parse().unwrap(),
        ),
    ];
    let bad = 3 + 200;
    for i in 0..300u32 {
        let subnet: ipnet::Ipv4Net = format!("10.{}.{}.0/24", 129 + i / 256, i % 256)
            .parse()
            .unwrap();
        let src = if 3 + i as usize == bad {
            "10.99.0.1".parse().unwrap()
        } else {
            local_src
        };
        actions.push(Action::SetRoute(
            subnet,
            RouteTarget {
                via: subnet.network(),
                src,
            },
        ));
    }
    let failures = in_ns(&ns, |k| async move {
        let vxlan = k.vxlan_index().await.unwrap().unwrap();
        let failures = k.apply(vxlan, &actions).await;
        failures
            .into_iter()
            .map(|(a, e)| (a, e.to_string()))
            .collect::<Vec<_>>()
    });
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(
        failures[0].0.to_string(),
        "route replace 10.129.200.0/24 via 10.129.200.0 dev vxlan0 onlink src 10.99.0.1"
    );
    assert!(
        failures[0].1.contains("Invalid argument"),
        "errno named: {}",
        failures[0].1
    );
    let routes = lines(&ns.ip(&["route", "show", "proto", "212"]));
    assert_eq!(routes.len(), 299);
    assert!(!routes.iter().any(|r| r.starts_with("10.129.200.0/24")));
    assert!(routes
        .contains(&"10.129.43.0/24 via 10.129.43.0 dev vxlan0 src 10.128.0.1 onlink".to_string()));
}

/// `bridge -d link show dev NAME` says "hairpin on".
fn master_and_hairpin(ns: &Netns, veth: &str) -> (String, bool) {
    let link = ns.ip(&["-d", "link", "show", veth]);
    let master = link
        .split_whitespace()
        .skip_while(|w| *w != "master")
        .nth(1)
        .unwrap_or("-")
        .to_string();
    (master, link.contains("hairpin on"))
}

#[test]
fn a_recreated_tun0_gets_the_pods_back() {
    need_root!();
    let (ns, dir) = node_ns();
    let mut cfg = config(&dir);
    cfg.cni_data_dir = Some(dir.path().join("ipam"));
    let store = dir.path().join("ipam").join("rsdn");
    std::fs::create_dir_all(&store).unwrap();
    let nodes = three();
    // First pass: tun0 exists; then three "pods" as the plugin leaves them: a record in the
    // IPAM store and a host veth on tun0 with hairpin on. The third is being deleted (the
    // plugin's DEL took it off the bridge and down and has not released its address yet).
    passes(&ns, cfg.clone(), vec![model(&nodes)]);
    let mut veths = Vec::new();
    for (i, id) in ["pod-a", "pod-b", "pod-c"].iter().enumerate() {
        let veth = rsdn_cni::names::host_veth_name(id, "eth0");
        std::fs::write(
            store.join(format!("10.128.0.{}", i + 2)),
            format!("{id}\r\neth0"),
        )
        .unwrap();
        let peer = format!("p{i}");
        ns.ip(&[
            "link", "add", &veth, "mtu", "1450", "type", "veth", "peer", "name", &peer,
        ]);
        ns.ip(&["link", "set", &veth, "master", "tun0", "up"]);
        ns.ip(&[
            "link",
            "set",
            &veth,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ]);
        veths.push(veth);
    }
    ns.ip(&["link", "set", &veths[2], "nomaster", "down"]);

    ns.ip(&["link", "del", "tun0"]);
    for v in &veths[..2] {
        assert_eq!(
            master_and_hairpin(&ns, v).0,
            "-",
            "deleting tun0 detached {v}"
        );
    }
    let p = passes(&ns, cfg.clone(), vec![model(&nodes), model(&nodes)]);
    assert!(
        p[0].device_changes
            .iter()
            .any(|c| c.contains("created bridge")),
        "{:?}",
        p[0].device_changes
    );
    assert_eq!(p[0].pod_ports, 3);
    assert_eq!(p[0].port_repairs.len(), 2, "{:?}", p[0].port_repairs);
    assert!(p[0].port_failures.is_empty(), "{:?}", p[0].port_failures);
    for v in &veths[..2] {
        assert_eq!(
            master_and_hairpin(&ns, v),
            ("tun0".to_string(), true),
            "{v}"
        );
    }
    assert_eq!(
        master_and_hairpin(&ns, &veths[2]).0,
        "-",
        "a veth being deleted stays off"
    );
    assert!(p[1].port_repairs.is_empty(), "second pass: nothing to do");

    // A port detached by hand, and one whose hairpin mode was turned off.
    ns.ip(&["link", "set", &veths[0], "nomaster"]);
    ns.ip(&[
        "link",
        "set",
        &veths[1],
        "type",
        "bridge_slave",
        "hairpin",
        "off",
    ]);
    let p = passes(&ns, cfg, vec![model(&nodes)]);
    assert_eq!(p[0].port_repairs.len(), 2, "{:?}", p[0].port_repairs);
    for v in &veths[..2] {
        assert_eq!(
            master_and_hairpin(&ns, v),
            ("tun0".to_string(), true),
            "{v}"
        );
    }
}
