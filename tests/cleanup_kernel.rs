//! Kernel tier for `rsdn cleanup`: in a fresh network namespace holding foreign state (chains
//! and rules in both tables, rules in the built-in chains, a kubelet-like KUBE-FIREWALL, an
//! ipset, routes, links, another conflist), the daemon's parts program the node (overlay,
//! conflist, the proxy's, NetworkPolicy's and egress chains and sets), a pod's veth joins
//! tun0, then cleanup runs twice. After the first run the namespace is exactly as before rsdn
//! came, but for the pod's veth, which stays; the second finds nothing. On each iptables
//! backend, with the other backend left as it was (legacy tables not instantiated).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rsdn::cleanup::Report;
use rsdn::config::NodeConfig;
use rsdn::model::{ClusterModel, ModelBuilder, ModelScope};
use rsdn::netfilter::backend::Backend;
use rsdn::netfilter::engine::{Engine, Settings};
use rsdn::netfilter::metrics::EngineMetrics;
use rsdn::netfilter::producer::combine;
use rsdn::netfilter::tools::Tools;
use rsdn::overlay::kernel::Kernel;
use rsdn::overlay::reconcile::Reconciler;
use rsdn_testkit::{need_root, Netns};

const BACKENDS: [Backend; 2] = [Backend::Nft, Backend::Legacy];

/// Node n1 (this one) and two peers.
fn nodes() -> String {
    [("n1", 11, 0), ("n2", 12, 2), ("n3", 13, 4)]
        .map(|(name, ip, subnet)| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n\
                 spec: {{podCIDR: 10.128.{subnet}.0/23}}\n\
                 status: {{addresses: [{{type: InternalIP, address: 192.168.1.{ip}}}]}}\n"
            )
        })
        .join("---\n")
}

/// Nodes, Services (the proxy's golden cluster) and policies (NetworkPolicy's) for node n1.
fn model() -> Arc<ClusterModel> {
    let mut b = ModelBuilder::default();
    let nodes = nodes();
    for (file, yaml) in [
        ("nodes.yaml", nodes.as_str()),
        (
            "services.yaml",
            include_str!("../src/proxy/testdata/cluster.yaml"),
        ),
        (
            "policies.yaml",
            include_str!("../src/policy/testdata/cluster.yaml"),
        ),
    ] {
        rsdn::source::dir::add_documents(&mut b, file, yaml);
    }
    let m = b.finish(&ModelScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        local_node: "n1".into(),
        programmed: Default::default(),
    });
    assert_eq!(m.nodes.len(), 3, "{:?}", m.skipped);
    assert!(!m.services.ports.is_empty() && !m.policies.is_empty());
    Arc::new(m)
}

fn config(dir: &Path, backend: Backend) -> NodeConfig {
    let mut c = NodeConfig::for_test("n1");
    c.cni_conf_dir = dir.join("net.d");
    c.cni_data_dir = Some(dir.join("ipam"));
    c.iptables_backend = match backend {
        Backend::Nft => rsdn::config::IptablesBackend::Nft,
        Backend::Legacy => rsdn::config::IptablesBackend::Legacy,
    };
    c
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A node namespace with its underlay and foreign state of every kind cleanup looks at.
fn node_with_foreign_state(backend: Backend, dir: &Path) -> Netns {
    let ns = Netns::new("clean");
    for cmd in [
        "link add eth0 type veth peer name peer0",
        "addr add 192.168.1.11/24 dev eth0",
        "link set eth0 up",
        "link set peer0 up",
        "link add fa type veth peer name fb",
        "link add br-foreign type bridge",
        "link set fa master br-foreign",
        "route add 10.99.0.0/16 via 192.168.1.1 proto static",
        "route add 10.98.0.0/16 dev eth0 proto 213",
    ] {
        ns.ip(&cmd.split(' ').collect::<Vec<_>>());
    }
    let rules = "*nat\n:FOREIGN-NAT - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n\
        -A PREROUTING -j FOREIGN-NAT\n-A FOREIGN-NAT -s 10.9.0.0/16 -j RETURN\n\
        -A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE\nCOMMIT\n\
        *filter\n:FOREIGN-FILTER - [0:0]\n:KUBE-FIREWALL - [0:0]\n\
        -A INPUT -j KUBE-FIREWALL\n-A INPUT -j FOREIGN-FILTER\n\
        -A FORWARD -s 10.1.0.0/16 -j DROP\n-A FOREIGN-FILTER -s 10.9.0.0/16 -j ACCEPT\n\
        -A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP\nCOMMIT\n";
    let restore = format!("iptables-{}-restore", backend.name());
    let (ok, out) = run_with_stdin(&ns, &[&restore, "--noflush"], rules);
    assert!(ok, "{out}");
    for cmd in [
        "ipset create FOREIGN-SET hash:ip",
        "ipset add FOREIGN-SET 10.9.0.1",
    ] {
        let (ok, out) = ns.run(&cmd.split(' ').collect::<Vec<_>>());
        assert!(ok, "{out}");
    }
    std::fs::create_dir_all(dir.join("net.d")).unwrap();
    std::fs::write(
        dir.join("net.d/20-other.conflist"),
        r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    ns
}

fn run_with_stdin(ns: &Netns, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let f = std::fs::File::open(ns.path()).unwrap();
    let mut cmd = std::process::Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    rsdn_testkit::in_netns(&mut cmd, &f);
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Everything cleanup may touch, normalised (no counters, no timestamps): both backends'
/// tables, the ipsets, the routes of every table, the links, the conflist directory, and
/// which legacy tables the kernel has instantiated.
fn state(ns: &Netns, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for b in BACKENDS {
        let (_, instantiated) = ns.run(&["cat", "/proc/net/ip_tables_names"]);
        let tables: Vec<&str> = match b {
            Backend::Nft => vec!["nat", "filter"],
            Backend::Legacy => instantiated.split_whitespace().collect(),
        };
        for t in tables {
            let (ok, save) = ns.run(&[&format!("iptables-{}-save", b.name()), "-t", t]);
            assert!(ok, "{save}");
            // Without the built-in chains' counters: the kernel's own packets (an IGMP report
            // when a link comes up) pass OUTPUT whenever they like.
            let uncounted = |l: &str| match l.starts_with(':') {
                true => l.split(" [").next().unwrap_or(l).to_string(),
                false => l.to_string(),
            };
            out.extend(
                save.lines()
                    .filter(|l| !l.starts_with('#') && !l.contains("Warning"))
                    .map(|l| format!("{} {}", b.name(), uncounted(l))),
            );
        }
    }
    let (_, instantiated) = ns.run(&["cat", "/proc/net/ip_tables_names"]);
    let mut legacy: Vec<&str> = instantiated.split_whitespace().collect();
    legacy.sort();
    out.push(format!("legacy tables: {legacy:?}"));
    let (_, sets) = ns.run(&["ipset", "list", "-n"]);
    let mut sets: Vec<&str> = sets.lines().collect();
    sets.sort();
    out.push(format!("ipsets: {sets:?}"));
    let mut routes: Vec<String> = ns
        .ip(&["-4", "route", "show", "table", "all"])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    routes.sort();
    out.extend(routes.into_iter().map(|r| format!("route {r}")));
    out.extend(links(ns).into_iter().map(|l| format!("link {l}")));
    let mut files: Vec<String> = std::fs::read_dir(dir.join("net.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    out.push(format!("net.d: {files:?}"));
    out
}

/// Link names with their master, sorted.
fn links(ns: &Netns) -> Vec<String> {
    let mut links: Vec<String> = ns
        .ip(&["-o", "link", "show"])
        .lines()
        .map(|l| {
            let name = l.split(": ").nth(1).unwrap_or_default();
            let name = name.split('@').next().unwrap_or_default();
            let master = l.split(" master ").nth(1).and_then(|m| m.split(' ').next());
            format!("{name} master {}", master.unwrap_or("-"))
        })
        .collect();
    links.sort();
    links
}

/// Programs node n1 with the daemon's parts (overlay and conflist, then every producer's
/// chains and sets through the engine), as `rsdn node` would.
fn program(ns: &Netns, config: NodeConfig, backend: Backend) {
    ns.on_thread(move || {
        block_on(async move {
            let m = model();
            let mut r = Reconciler::new(config.clone(), Kernel::connect().unwrap());
            let pass = r.reconcile(&m).await.unwrap();
            assert!(pass.clean() && r.ready(), "{:?}", pass.failure_summary());
            let mut registry = prometheus_client::registry::Registry::default();
            let mut producers = rsdn::daemon::producers(&config, &mut registry);
            let mut e = Engine::new(
                Tools { backend },
                Settings::default(),
                EngineMetrics::unregistered(),
            );
            let report = e.sync(combine(&mut producers, &m), Instant::now()).unwrap();
            assert!(report.sets > 0, "{report:?}");
        })
    });
}

fn cleanup(ns: &Netns, config: NodeConfig) -> Report {
    ns.on_thread(move || block_on(rsdn::cleanup::run(&config, &rsdn::cleanup::BACKENDS)))
}

#[test]
fn cleanup_removes_all_of_rsdns_and_nothing_else_on_both_backends_and_twice_is_a_no_op() {
    need_root!();
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let ns = node_with_foreign_state(backend, dir.path());
        let before = state(&ns, dir.path());
        let config = config(dir.path(), backend);
        program(&ns, config.clone(), backend);
        // A pod's veth on tun0, as rsdn-cni leaves it.
        ns.ip(&[
            "link", "add", "vpod0", "type", "veth", "peer", "name", "vpod0p",
        ]);
        ns.ip(&["link", "set", "vpod0", "master", "tun0"]);
        let programmed = state(&ns, dir.path()).join("\n");
        for ours in [
            ":KUBE-SERVICES",
            ":RSDN-POLICY",
            ":RSDN-MASQUERADE",
            "-j KUBE-SERVICES",
            "RSDN-ISOLATED-INGRESS",
            "proto 212",
            "link vxlan0",
            "link vpod0 master tun0",
            "10-rsdn.conflist",
        ] {
            assert!(
                programmed.contains(ours),
                "{backend:?}: no {ours} in\n{programmed}"
            );
        }

        let first = cleanup(&ns, config.clone());
        assert!(
            first.errors.is_empty() && first.kept.is_empty(),
            "{backend:?}:\n{}",
            first.render()
        );
        for what in [
            "file ",
            "-t nat: rule -A PREROUTING",
            "-t filter: rule -A FORWARD",
            "chain(s) ",
            "ipset RSDN-",
            "route 10.128.2.0/23 via 10.128.2.0 dev vxlan0",
            "link vxlan0",
            "link tun0 (1 port(s)",
        ] {
            assert!(
                first.removed.iter().any(|l| l.contains(what)),
                "{backend:?}: nothing like {what:?} removed:\n{}",
                first.render()
            );
        }
        // As before rsdn came, but for the pod's veth pair, which stays (off tun0).
        let mut after = state(&ns, dir.path());
        assert!(
            after.contains(&"link vpod0 master -".to_string()),
            "{after:?}"
        );
        after.retain(|l| !l.starts_with("link vpod0"));
        assert_eq!(after, before, "{backend:?}");

        let second = cleanup(&ns, config.clone());
        assert_eq!(
            (second.removed.len(), second.kept.len(), second.errors.len()),
            (0, 0, 0),
            "{backend:?}:\n{}",
            second.render()
        );
        assert!(second
            .render()
            .ends_with("nothing of rsdn's to remove on this node\n"));
        let mut again = state(&ns, dir.path());
        again.retain(|l| !l.starts_with("link vpod0"));
        assert_eq!(
            again, before,
            "{backend:?}: the second run changed something"
        );
    }
}

/// Where kube-proxy runs or ran (its canary chain), or with `proxy: false`, the KUBE-* chains
/// and their jumps are kube-proxy's: they stay, and the report says why; rsdn's own chains go.
#[test]
fn kube_proxys_chains_stay_where_it_runs_or_with_proxy_false() {
    need_root!();
    let backend = Backend::Nft;
    for case in ["canary", "proxy=false"] {
        let dir = tempfile::tempdir().unwrap();
        let ns = node_with_foreign_state(backend, dir.path());
        let mut config = config(dir.path(), backend);
        program(&ns, config.clone(), backend);
        match case {
            "canary" => {
                let payload = "*nat\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n\
                    *filter\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n";
                let (ok, out) =
                    run_with_stdin(&ns, &["iptables-nft-restore", "--noflush"], payload);
                assert!(ok, "{out}");
            }
            _ => config.proxy = false,
        }
        let r = cleanup(&ns, config.clone());
        assert!(r.errors.is_empty(), "{case}:\n{}", r.render());
        let why = if case == "canary" {
            "KUBE-PROXY-CANARY"
        } else {
            "proxy: false"
        };
        assert!(
            r.kept
                .iter()
                .any(|k| k.contains("KUBE-* chains") && k.contains(why)),
            "{case}:\n{}",
            r.render()
        );
        let (_, nat) = ns.run(&["iptables-nft-save", "-t", "nat"]);
        let (_, filter) = ns.run(&["iptables-nft-save", "-t", "filter"]);
        assert!(
            nat.contains(":KUBE-SERVICES")
                && nat.contains("-j KUBE-SERVICES")
                && nat.contains(":KUBE-SVC-"),
            "{case}:\n{nat}"
        );
        assert!(filter.contains("-j KUBE-FORWARD"), "{case}:\n{filter}");
        for gone in [":RSDN-MASQUERADE", "-j RSDN-MASQUERADE"] {
            assert!(!nat.contains(gone), "{case}: {gone} left\n{nat}");
        }
        for gone in [":RSDN-POLICY", "-j RSDN-POLICY", ":RSDN-FORWARD"] {
            assert!(!filter.contains(gone), "{case}: {gone} left\n{filter}");
        }
        // Run again: the same chains stay, nothing else to do.
        let again = cleanup(&ns, config);
        assert!(
            again.removed.is_empty() && again.errors.is_empty(),
            "{}",
            again.render()
        );
    }
}
