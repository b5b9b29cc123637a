//! Kernel tier for NetworkPolicy: its chains and ipsets applied by the netfilter engine with
//! the real tools, on each iptables backend, in a fresh network namespace; applied twice
//! changes nothing; a set or chain changed by hand is found and rewritten.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rsdn::model::{ClusterModel, ModelBuilder, ModelScope};
use rsdn::netfilter::backend::Backend;
use rsdn::netfilter::engine::{Engine, Settings, SyncReport};
use rsdn::netfilter::metrics::EngineMetrics;
use rsdn::netfilter::producer::{combine, Producer};
use rsdn::netfilter::tools::Tools;
use rsdn::policy::metrics::PolicyMetrics;
use rsdn::policy::NetworkPolicies;
use rsdn_testkit::{need_root, Netns};

const CLUSTER: &str = include_str!("../src/policy/testdata/cluster.yaml");
const BACKENDS: [Backend; 2] = [Backend::Nft, Backend::Legacy];

fn model(yaml: &str) -> Arc<ClusterModel> {
    let mut b = ModelBuilder::default();
    rsdn::source::dir::add_documents(&mut b, "test.yaml", yaml);
    Arc::new(b.finish(&ModelScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        local_node: "n1".into(),
        programmed: Default::default(),
    }))
}

fn producers() -> Vec<Box<dyn Producer>> {
    vec![Box::new(NetworkPolicies::new(
        "n1".into(),
        PolicyMetrics::unregistered(),
    ))]
}

/// Filter rules of ours and every RSDN set with its members, normalized.
fn state(ns: &Netns, backend: Backend) -> String {
    let (ok, filter) = ns.run(&[&format!("iptables-{}-save", backend.name()), "-t", "filter"]);
    assert!(ok, "{filter}");
    let (ok, sets) = ns.run(&["ipset", "save"]);
    assert!(ok, "{sets}");
    let mut lines: Vec<String> = filter
        .lines()
        .filter(|l| l.starts_with("-A") || l.starts_with(":RSDN"))
        .map(str::to_string)
        .chain(
            sets.lines()
                .filter(|l| l.starts_with("add RSDN") || l.starts_with("create RSDN"))
                .map(|l| l.split(" hashsize").next().unwrap().to_string()),
        )
        .collect();
    lines.sort();
    lines.join("\n")
}

fn run(
    ns: &Netns,
    backend: Backend,
    f: impl FnOnce(&mut Engine<Tools>, &mut Vec<Box<dyn Producer>>) + Send + 'static,
) {
    ns.on_thread(move || {
        let mut e = Engine::new(
            Tools { backend },
            Settings::default(),
            EngineMetrics::unregistered(),
        );
        let mut p = producers();
        f(&mut e, &mut p)
    })
}

#[test]
fn chains_and_sets_apply_on_both_backends_and_twice_changes_nothing() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("pol");
        let reports: Arc<std::sync::Mutex<Vec<SyncReport>>> = Default::default();
        let r2 = reports.clone();
        run(&ns, backend, move |e, p| {
            let m = model(CLUSTER);
            let t0 = Instant::now();
            r2.lock().unwrap().push(e.sync(combine(p, &m), t0).unwrap());
            r2.lock()
                .unwrap()
                .push(e.sync(combine(p, &m), t0 + Duration::from_secs(1)).unwrap());
        });
        let reports = reports.lock().unwrap();
        assert!(
            reports[0].full && reports[0].sets == 7,
            "{backend:?}: {:?}",
            reports[0]
        );
        assert_eq!(
            reports[1].lines, 0,
            "{backend:?}: nothing changed, nothing written"
        );
        let s = state(&ns, backend);
        for want in [
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"rsdn network policy\" -j RSDN-POLICY",
            "-A RSDN-POLICY -m comment --comment \"pods isolated for ingress\" -m set --match-set RSDN-ISOLATED-INGRESS dst -j RSDN-INGRESS",
            "create RSDN-B-CR2JJQY5DBMO4AZI hash:net family inet",
            "add RSDN-B-CR2JJQY5DBMO4AZI 10.128.0.0/14 nomatch",
            "add RSDN-N-XR23PVFMFRG33PWO 10.128.2.10,tcp:8080",
            "add RSDN-ISOLATED-INGRESS 10.128.0.11",
        ] {
            assert!(s.lines().any(|l| l.contains(want)), "{backend:?}: no {want} in\n{s}");
        }
        assert!(
            s.contains("--match-set RSDN-N-V54WZ7PSAHUKIUDE dst,dst"),
            "{backend:?}: named port match\n{s}"
        );
    }
}

#[test]
fn a_set_emptied_and_a_policy_chain_flushed_by_hand_are_rewritten() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("pol");
        let before = Arc::new(std::sync::Mutex::new(String::new()));
        let (b2, name) = (before.clone(), ns.name.clone());
        let tool = format!("iptables-{}", backend.name());
        run(&ns, backend, move |e, p| {
            let m = model(CLUSTER);
            let t0 = Instant::now();
            e.sync(combine(p, &m), t0).unwrap();
            assert!(
                e.check(t0 + Duration::from_secs(10)).drift.is_empty(),
                "{name}: false drift"
            );
            let save = |args: &[&str]| {
                let o = std::process::Command::new(args[0])
                    .args(&args[1..])
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "{args:?}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            };
            *b2.lock().unwrap() = String::from_utf8(
                std::process::Command::new(format!("{tool}-save"))
                    .args(["-t", "filter"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap();
            save(&["ipset", "flush", "RSDN-P-KTBVGWYPXAPPSAXY"]);
            save(&[&tool, "-t", "filter", "-F", "RSDN-NI-AW76UUTUVGDMTWJU"]);
            let c = e.check(t0 + Duration::from_secs(20));
            let mut drifted: Vec<String> = c.drift.iter().map(|d| d.chain.clone()).collect();
            drifted.sort();
            assert_eq!(
                drifted,
                ["RSDN-NI-AW76UUTUVGDMTWJU", "ipset RSDN-P-KTBVGWYPXAPPSAXY"],
                "{name}"
            );
            let r = e
                .sync(combine(p, &m), t0 + Duration::from_secs(20))
                .unwrap();
            assert!(!r.full && r.repaired == 2, "{name}: {r:?}");
            assert!(
                e.check(t0 + Duration::from_secs(30)).drift.is_empty(),
                "{name}"
            );
        });
        let (ok, members) = ns.run(&["ipset", "list", "RSDN-P-KTBVGWYPXAPPSAXY"]);
        assert!(
            ok && members.contains("10.128.2.20"),
            "{backend:?}: {members}"
        );
        let (_, filter) = ns.run(&[&format!("iptables-{}-save", backend.name()), "-t", "filter"]);
        let rules = |t: &str| {
            t.lines()
                .filter(|l| l.starts_with("-A RSDN-NI-AW76"))
                .count()
        };
        assert_eq!(
            rules(&filter),
            rules(&before.lock().unwrap()),
            "{backend:?}"
        );
        assert_eq!(rules(&filter), 2, "{backend:?}");
    }
}
