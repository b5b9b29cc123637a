//! Kernel tier: the real plugin binary against real bridges, veths and namespaces. Every test
//! builds its own namespaces and removes them; nothing touches the root namespace.

use std::collections::HashSet;

use rsdn_testkit::*;
use serde_json::{json, Value};

#[test]
fn add_wires_address_mac_mtu_route_and_hairpin() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let pod = Netns::new("pod");
    let res = node.cni("ADD", "c1", Some(&pod.path()), "eth0", &node.conf("1.1.0"));
    let v = res.ok().json();

    assert_eq!(v["cniVersion"], "1.1.0");
    let ip = v["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.128.0.") && ip.ends_with("/23"), "{ip}");
    assert_eq!(v["ips"][0]["gateway"], "10.128.0.1");
    let iface = &v["interfaces"][v["ips"][0]["interface"].as_u64().unwrap() as usize];
    assert_eq!(iface["name"], "eth0");
    assert_eq!(iface["sandbox"], pod.path().to_str().unwrap());
    assert_eq!(iface["mtu"], 1450);
    assert_eq!(
        v["routes"][0],
        json!({"dst": "0.0.0.0/0", "gw": "10.128.0.1"})
    );

    // What the kernel holds, read back with iproute2.
    let addr = ip.split('/').next().unwrap();
    let o: Vec<u8> = addr.split('.').map(|x| x.parse().unwrap()).collect();
    let mac = format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    assert_eq!(iface["mac"], mac.as_str());
    let link = pod.ip(&["-d", "addr", "show", "eth0"]);
    assert!(link.contains(&format!("link/ether {mac}")), "{link}");
    assert!(
        link.contains("mtu 1450") && link.contains("state UP"),
        "{link}"
    );
    assert!(link.contains(&format!("inet {ip}")), "{link}");
    assert!(pod
        .ip(&["route"])
        .contains("default via 10.128.0.1 dev eth0"));

    let host_veth = v["interfaces"][1]["name"].as_str().unwrap();
    let port = node.ns.ip(&["-d", "link", "show", host_veth]);
    assert!(
        port.contains("master tun0") && port.contains("hairpin on") && port.contains("mtu 1450"),
        "{port}"
    );
    assert_eq!(node.allocated(), vec![addr.to_string()]);
    let record = std::fs::read_to_string(node.store().join(addr)).unwrap();
    assert_eq!(record, "c1\r\neth0");
}

#[test]
fn results_follow_the_requested_version() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    for (i, version) in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let pod = Netns::new("pod");
        let v = node
            .cni(
                "ADD",
                &format!("v{i}"),
                Some(&pod.path()),
                "eth0",
                &node.conf(version),
            )
            .ok()
            .json();
        assert_eq!(v["cniVersion"], *version);
        assert_eq!(
            v["ips"][0].get("version").is_some(),
            version.starts_with("0."),
            "{v}"
        );
        assert_eq!(
            v["interfaces"][2].get("mtu").is_some(),
            *version == "1.1.0",
            "{v}"
        );
    }
}

#[test]
fn two_pods_reach_each_other_and_the_gateway() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let (p1, p2) = (Netns::new("pod"), Netns::new("pod"));
    let ip_of = |v: &Value| {
        v["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string()
    };
    let a = ip_of(
        &node
            .cni("ADD", "a", Some(&p1.path()), "eth0", &node.conf("1.0.0"))
            .ok()
            .json(),
    );
    let b = ip_of(
        &node
            .cni("ADD", "b", Some(&p2.path()), "eth0", &node.conf("1.0.0"))
            .ok()
            .json(),
    );
    assert_ne!(a, b);
    assert!(p1.ping(&b), "pod a cannot reach pod b");
    assert!(p2.ping(&a), "pod b cannot reach pod a");
    assert!(p1.ping("10.128.0.1"), "pod a cannot reach the gateway");
    assert!(node.ns.ping(&b), "the node cannot reach pod b");
}

#[test]
fn check_passes_and_then_names_each_drift() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let pod = Netns::new("pod");
    let prev = node
        .cni("ADD", "c1", Some(&pod.path()), "eth0", &node.conf("1.0.0"))
        .ok()
        .json();
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = prev.clone();
    node.cni("CHECK", "c1", Some(&pod.path()), "eth0", &conf)
        .ok();

    pod.ip(&["link", "set", "eth0", "mtu", "1400"]);
    let e = node
        .cni("CHECK", "c1", Some(&pod.path()), "eth0", &conf)
        .err(101);
    assert!(e["msg"].as_str().unwrap().contains("MTU 1400"), "{e}");
    pod.ip(&["link", "set", "eth0", "mtu", "1450"]);

    pod.ip(&["route", "del", "default"]);
    let e = node
        .cni("CHECK", "c1", Some(&pod.path()), "eth0", &conf)
        .err(101);
    assert!(e["msg"].as_str().unwrap().contains("default route"), "{e}");
    pod.ip(&["route", "add", "default", "via", "10.128.0.1"]);
    node.cni("CHECK", "c1", Some(&pod.path()), "eth0", &conf)
        .ok();

    let host_veth = prev["interfaces"][1]["name"].as_str().unwrap();
    node.ns.ip(&["link", "set", host_veth, "nomaster"]);
    let e = node
        .cni("CHECK", "c1", Some(&pod.path()), "eth0", &conf)
        .err(101);
    assert!(
        e["msg"].as_str().unwrap().contains("not a port of bridge"),
        "{e}"
    );

    let addr = prev["ips"][0]["address"].as_str().unwrap();
    pod.ip(&["addr", "del", addr, "dev", "eth0"]);
    let e = node
        .cni("CHECK", "c1", Some(&pod.path()), "eth0", &conf)
        .err(101);
    assert!(
        e["details"].as_str().unwrap().contains("lacks address"),
        "{e}"
    );

    pod.ip(&["link", "del", "eth0"]);
    let e = node
        .cni("CHECK", "c1", Some(&pod.path()), "eth0", &conf)
        .err(101);
    assert!(e["msg"].as_str().unwrap().contains("missing"), "{e}");

    // CHECK did not exist before 0.4.0.
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.3.1");
    node.cni("CHECK", "c1", Some(&pod.path()), "eth0", &old)
        .err(1);
}

#[test]
fn del_is_idempotent_and_succeeds_when_the_namespace_is_gone() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let pod = Netns::new("pod");
    let conf = node.conf("1.0.0");
    let v = node
        .cni("ADD", "c1", Some(&pod.path()), "eth0", &conf)
        .ok()
        .json();
    let host_veth = v["interfaces"][1]["name"].as_str().unwrap().to_string();
    assert_eq!(node.allocated().len(), 1);

    node.cni("DEL", "c1", Some(&pod.path()), "eth0", &conf).ok();
    assert!(node.allocated().is_empty());
    // When DEL returns the pod is cut off; the kernel then destroys the pair in the background.
    let ports = node.ns.ip(&["link", "show", "master", "tun0"]);
    assert!(
        ports.trim().is_empty(),
        "still a bridge port after DEL: {ports}"
    );
    assert!(
        !pod.ping("10.128.0.1"),
        "pod still reaches the gateway after DEL"
    );
    let gone = |ns: &Netns, name: &str| !ns.run(&["ip", "link", "show", name]).0;
    assert!(
        eventually(5, || gone(&node.ns, &host_veth)),
        "host veth never destroyed"
    );
    assert!(
        eventually(5, || gone(&pod, "eth0")),
        "pod interface never destroyed"
    );
    node.cni("DEL", "c1", Some(&pod.path()), "eth0", &conf).ok();

    // The pod namespace disappears before DEL (the runtime already tore the sandbox down).
    let pod2 = Netns::new("pod");
    let path2 = pod2.path();
    node.cni("ADD", "c2", Some(&path2), "eth0", &conf).ok();
    drop(pod2);
    node.cni("DEL", "c2", Some(&path2), "eth0", &conf).ok();
    node.cni("DEL", "c2", None, "eth0", &conf).ok();
    assert!(
        node.allocated().is_empty(),
        "address of a vanished pod not released"
    );
}

#[test]
fn gc_releases_everything_not_valid() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("pod")).collect();
    let conf = node.conf("1.1.0");
    let mut veths = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let v = node
            .cni("ADD", &format!("g{i}"), Some(&p.path()), "eth0", &conf)
            .ok()
            .json();
        veths.push(v["interfaces"][1]["name"].as_str().unwrap().to_string());
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    node.cni("GC", "", None, "", &gc).ok();
    assert_eq!(node.allocated().len(), 1);
    let record = std::fs::read_to_string(node.store().join(&node.allocated()[0])).unwrap();
    assert_eq!(record, "g1\r\neth0");
    // The forgotten pods' host veths are gone too; the valid one stays.
    assert!(!node.ns.run(&["ip", "link", "show", &veths[0]]).0);
    assert!(node.ns.run(&["ip", "link", "show", &veths[1]]).0);
    assert!(!node.ns.run(&["ip", "link", "show", &veths[2]]).0);

    // GC without the list is refused rather than releasing everything.
    node.cni("GC", "", None, "", &conf).err(7);
    assert_eq!(node.allocated().len(), 1);
}

#[test]
fn no_bridge_means_network_not_ready() {
    need_root!();
    let node = Node::without_bridge("10.128.0.0/23");
    let pod = Netns::new("pod");
    let e = node
        .cni("ADD", "c1", Some(&pod.path()), "eth0", &node.conf("1.1.0"))
        .err(11);
    assert!(
        e["msg"].as_str().unwrap().contains("network not ready"),
        "{e}"
    );
    assert!(
        node.allocated().is_empty(),
        "a failed ADD must not hold an address"
    );
    node.cni("STATUS", "", None, "", &node.conf("1.1.0"))
        .err(50);

    node.ns.ip(&["link", "add", "tun0", "type", "bridge"]);
    node.cni("STATUS", "", None, "", &node.conf("1.1.0"))
        .err(50); // still down
    node.ns.ip(&["link", "set", "tun0", "up"]);
    let ok = node.cni("STATUS", "", None, "", &node.conf("1.1.0"));
    ok.ok();
    assert!(
        ok.stdout.is_empty(),
        "STATUS prints nothing on success: {}",
        ok.stdout
    );
}

#[test]
fn full_subnet_fails_cleanly() {
    need_root!();
    let node = Node::new("10.99.0.0/29"); // 5 usable addresses besides the gateway
    let pods: Vec<Netns> = (0..6).map(|_| Netns::new("pod")).collect();
    for (i, p) in pods.iter().take(5).enumerate() {
        node.cni(
            "ADD",
            &format!("f{i}"),
            Some(&p.path()),
            "eth0",
            &node.conf("1.0.0"),
        )
        .ok();
    }
    let e = node
        .cni(
            "ADD",
            "f5",
            Some(&pods[5].path()),
            "eth0",
            &node.conf("1.0.0"),
        )
        .err(100);
    assert!(
        e["msg"].as_str().unwrap().contains("no free address"),
        "{e}"
    );
    assert!(
        !pods[5].run(&["ip", "link", "show", "eth0"]).0,
        "failed ADD left an interface"
    );
    assert_eq!(node.allocated().len(), 5);
}

#[test]
fn sixty_four_concurrent_adds_get_distinct_addresses_and_dels_free_them() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let pods: Vec<Netns> = (0..64).map(|_| Netns::new("pod")).collect();
    let conf = node.conf("1.0.0");
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || {
                    let v = node
                        .cni("ADD", &format!("k{i}"), Some(&p.path()), "eth0", conf)
                        .ok()
                        .json();
                    v["ips"][0]["address"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: HashSet<&String> = ips.iter().collect();
    assert_eq!(
        distinct.len(),
        64,
        "duplicate addresses handed out: {ips:?}"
    );
    assert_eq!(node.allocated().len(), 64);
    let ports = node.ns.ip(&["link", "show", "master", "tun0"]);
    assert_eq!(ports.lines().filter(|l| l.contains(" rsdn")).count(), 64);

    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let (node, conf) = (&node, &conf);
            s.spawn(move || {
                node.cni("DEL", &format!("k{i}"), Some(&p.path()), "eth0", conf)
                    .ok()
                    .code
            });
        }
    });
    assert!(node.allocated().is_empty(), "left: {:?}", node.allocated());
    assert!(node
        .ns
        .ip(&["link", "show", "master", "tun0"])
        .trim()
        .is_empty());
    let left = || node.ns.ip(&["link", "show"]);
    assert!(
        eventually(10, || !left().contains(" rsdn")),
        "veths left behind: {}",
        left()
    );
}

#[test]
fn re_add_right_after_del_survives_the_background_reaper() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let pod = Netns::new("pod");
    let conf = node.conf("1.0.0");
    let first = node
        .cni("ADD", "c1", Some(&pod.path()), "eth0", &conf)
        .ok()
        .json();
    node.cni("DEL", "c1", Some(&pod.path()), "eth0", &conf).ok();
    // Same attachment again at once: the old pair may still be on its way out.
    let second = node
        .cni("ADD", "c1", Some(&pod.path()), "eth0", &conf)
        .ok()
        .json();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let veth = second["interfaces"][1]["name"].as_str().unwrap();
    assert_eq!(
        veth,
        first["interfaces"][1]["name"].as_str().unwrap(),
        "names are derived"
    );
    let port = node.ns.ip(&["link", "show", veth]);
    assert!(
        port.contains("master tun0") && port.contains("state UP"),
        "the reaper hit the new veth: {port}"
    );
    assert!(pod.ping("10.128.0.1"), "re-added pod has no network");
    let mut check = conf.clone();
    check["prevResult"] = second;
    node.cni("CHECK", "c1", Some(&pod.path()), "eth0", &check)
        .ok();
}

#[test]
fn del_releases_the_prev_result_address_only_for_its_holder() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let (p1, p2) = (Netns::new("pod"), Netns::new("pod"));
    let conf = node.conf("1.0.0");
    node.cni("ADD", "a", Some(&p1.path()), "eth0", &conf).ok();
    let b = node
        .cni("ADD", "b", Some(&p2.path()), "eth0", &conf)
        .ok()
        .json();
    // A prevResult naming b's address must not release it on a's behalf: a's is found by scan.
    let mut wrong = conf.clone();
    wrong["prevResult"] = b.clone();
    node.cni("DEL", "a", Some(&p1.path()), "eth0", &wrong).ok();
    let b_ip = b["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(node.allocated(), vec![b_ip]);
    let mut right = conf.clone();
    right["prevResult"] = b;
    node.cni("DEL", "b", Some(&p2.path()), "eth0", &right).ok();
    assert!(node.allocated().is_empty());
}

#[test]
fn add_into_a_namespace_that_does_not_exist_is_code_3() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let e = node
        .cni(
            "ADD",
            "c1",
            Some(std::path::Path::new("/run/netns/does-not-exist")),
            "eth0",
            &node.conf("1.0.0"),
        )
        .err(3);
    assert!(e["msg"].as_str().unwrap().contains("does-not-exist"), "{e}");
    assert!(node.allocated().is_empty());
}

/// Links of ours (host veths) in the node namespace, bridged or not.
fn host_veths(node: &Node) -> Vec<String> {
    node.ns
        .ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("rsdn"))
        .collect()
}

#[test]
fn a_regular_file_as_the_namespace_is_code_4_before_anything_is_touched() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    let e = node
        .cni("ADD", "c1", Some(file.path()), "eth0", &node.conf("1.0.0"))
        .err(4);
    let msg = e["msg"].as_str().unwrap();
    assert!(msg.contains("CNI_NETNS") && msg.contains(path), "{e}");
    assert!(
        e["details"].as_str().unwrap().contains("a regular file"),
        "{e}"
    );
    // Refused before the IPAM store was even opened, and before any netlink request.
    assert!(
        !node.store().exists(),
        "the IPAM store was touched: {:?}",
        std::fs::read_dir(node.store()).map(|d| d.count())
    );
    assert!(host_veths(&node).is_empty(), "{:?}", host_veths(&node));

    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = json!({"cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": path}],
        "ips": [{"address": "10.128.0.5/23", "interface": 0}]});
    node.cni("CHECK", "c1", Some(file.path()), "eth0", &conf)
        .err(4);
}

#[test]
fn del_with_a_regular_file_as_the_namespace_frees_the_node_side() {
    need_root!();
    let node = Node::new("10.128.0.0/23");
    let pod = Netns::new("pod");
    let conf = node.conf("1.0.0");
    node.cni("ADD", "c1", Some(&pod.path()), "eth0", &conf).ok();
    assert_eq!(node.allocated().len(), 1);
    // What an unmounted (or unpropagated) bind mount leaves at the path: an empty file.
    let file = tempfile::NamedTempFile::new().unwrap();
    node.cni("DEL", "c1", Some(file.path()), "eth0", &conf).ok();
    assert!(node.allocated().is_empty(), "{:?}", node.allocated());
    assert!(
        eventually(5, || host_veths(&node).is_empty()),
        "{:?}",
        host_veths(&node)
    );
    // Deleting the host end took the pod end with it.
    assert!(eventually(5, || !pod
        .run(&["ip", "link", "show", "eth0"])
        .0));
    node.cni("DEL", "c1", Some(file.path()), "eth0", &conf).ok();
}
