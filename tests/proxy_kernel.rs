//! Kernel tier for the proxy: the real Proxier and iptables tools, with each backend, inside a
//! fresh network namespace (the tools inherit the namespace of the thread that runs them).

use std::time::Duration;

use rsdn::model::{ModelBuilder, ModelScope};
use rsdn::proxy::iptables::{Backend, Iptables};
use rsdn::proxy::metrics::ProxyMetrics;
use rsdn::model::service::Services;
use rsdn::proxy::render::ProxyScope;
use rsdn::proxy::sync::{Proxier, SyncReport};
use rsdn_testkit::{need_root, Netns};

const CLUSTER: &str = include_str!("../src/proxy/testdata/cluster.yaml");
const BACKENDS: [Backend; 2] = [Backend::Nft, Backend::Legacy];

fn services(yaml: &str) -> Services {
    let mut b = ModelBuilder::default();
    rsdn::source::dir::add_documents(&mut b, "test.yaml", yaml);
    b.finish(&ModelScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        local_node: "n1".into(),
        programmed: Default::default(),
    })
    .services
}

fn scope() -> ProxyScope {
    ProxyScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        service_network: "172.30.0.0/16".parse().unwrap(),
        masquerade_bit: 0,
        node_name: "n1".into(),
        node_ip: "192.168.77.11".parse().unwrap(),
        proxy: true,
    }
}

/// The rules as the kernel holds them, without comments or counters.
fn save(ns: &Netns, backend: Backend) -> String {
    let tool = format!("iptables-{}-save", backend.name());
    let (ok, out) = ns.run(&[&tool]);
    assert!(ok, "{out}");
    normalize(&out)
}

/// Rules and chains per table, without comments, counters, policies and empty tables (reading
/// a legacy table instantiates it empty: that is no change of rules).
fn normalize(save: &str) -> String {
    let mut out = Vec::new();
    let mut table = "";
    for l in save.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t;
        } else if l.starts_with("-A ") {
            out.push(format!("{table} {l}"));
        } else if let Some(chain) = l.strip_prefix(':') {
            let name = chain.split(' ').next().unwrap_or_default();
            if !chain.contains(" ACCEPT ") && !chain.contains(" DROP ") {
                out.push(format!("{table} :{name}"));
            }
        }
    }
    out.join("\n")
}

fn proxier(backend: Backend) -> Proxier {
    Proxier::new(
        Iptables { backend },
        scope(),
        Duration::from_secs(3600),
        ProxyMetrics::unregistered(),
    )
}

/// Syncs each list of services in turn (None: force a full sync of the previous one).
fn syncs(ns: &Netns, backend: Backend, steps: Vec<(Services, bool)>) -> Vec<SyncReport> {
    ns.on_thread(move || {
        let mut p = proxier(backend);
        steps
            .into_iter()
            .map(|(s, full)| p.sync(&s, full).unwrap())
            .collect()
    })
}

#[test]
fn full_sync_applies_cleanly_and_twice_changes_nothing() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("px");
        let s = services(CLUSTER);
        let reports = syncs(&ns, backend, vec![(s.clone(), true)]);
        assert!(reports[0].lines > 100, "{backend:?}: {:?}", reports[0]);
        assert_eq!(reports[0].jumps_added.len(), 14, "{backend:?}");
        let first = save(&ns, backend);
        for want in [
            "-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A POSTROUTING -m comment --comment \"rsdn egress masquerade\" -j RSDN-MASQUERADE",
            "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x1/0x1",
        ] {
            assert!(first.lines().any(|l| l.ends_with(want)), "{backend:?}: no {want} in\n{first}");
        }
        // A second full sync and a partial one with nothing changed leave the kernel as it was.
        let again = syncs(&ns, backend, vec![(s.clone(), true), (s, false)]);
        assert_eq!(
            again[0].jumps_added.len(),
            0,
            "{backend:?}: jumps duplicated"
        );
        assert_eq!(
            again[1].lines, 0,
            "{backend:?}: nothing changed, nothing written"
        );
        assert_eq!(save(&ns, backend), first, "{backend:?}");
    }
}

#[test]
fn a_partial_sync_changes_only_the_service_that_changed() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("px");
        let before = services(CLUSTER);
        let after =
            services(&CLUSTER.replace("10.128.2.5], nodeName: n2", "10.128.2.99], nodeName: n2"));
        let r = syncs(&ns, backend, vec![(before, true), (after, false)]);
        assert!(!r[1].full);
        // KUBE-SVC of svc1 (3 rules), the new KUBE-SEP (2), declarations, deletion, COMMIT.
        assert!(r[1].lines < 15, "{backend:?}: {:?}", r[1]);
        let now = save(&ns, backend);
        assert!(
            now.contains("--to-destination 10.128.2.99:8080"),
            "{backend:?}"
        );
        assert!(
            !now.contains("10.128.2.5:8080"),
            "{backend:?}: old endpoint left"
        );
        assert!(
            !now.contains("KUBE-SEP-YXZ5DWH6NZJYLJBS"),
            "{backend:?}: old chain left"
        );
    }
}

#[test]
fn a_broken_payload_leaves_the_previous_rules_in_place() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("px");
        syncs(&ns, backend, vec![(services(CLUSTER), true)]);
        let before = save(&ns, backend);
        // Valid changes first, then a line the kernel refuses: none of it may land.
        let broken = "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j RETURN\n-A KUBE-SERVICES -m nosuchmatch -j RETURN\nCOMMIT\n";
        let err = ns.on_thread(move || {
            Iptables { backend }
                .restore(broken)
                .unwrap_err()
                .to_string()
        });
        assert!(
            err.contains("line 4 (-A KUBE-SERVICES -m nosuchmatch -j RETURN)"),
            "{backend:?}: {err}"
        );
        assert_eq!(
            save(&ns, backend),
            before,
            "{backend:?}: a failed restore changed the rules"
        );
    }
}

#[test]
fn full_sync_deletes_stale_service_chains_and_leaves_foreign_ones() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("px");
        let tool = format!("iptables-{}", backend.name());
        for chain in [
            "KUBE-SVC-STALESTALESTALE1",
            "KUBE-SEP-STALESTALESTALE2",
            "DOCKER",
        ] {
            let (ok, out) = ns.run(&[&tool, "-t", "nat", "-N", chain]);
            assert!(ok, "{out}");
        }
        syncs(&ns, backend, vec![(services(CLUSTER), true)]);
        let now = save(&ns, backend);
        assert!(!now.contains("STALESTALE"), "{backend:?}: stale chain kept");
        assert!(
            now.lines().any(|l| l == "nat :DOCKER"),
            "{backend:?}: foreign chain removed"
        );
    }
}

#[test]
fn without_the_proxy_only_egress_rules_are_written() {
    need_root!();
    let ns = Netns::new("px");
    ns.on_thread(|| {
        let mut s = scope();
        s.proxy = false;
        let mut p = Proxier::new(
            Iptables {
                backend: Backend::Nft,
            },
            s,
            Duration::from_secs(3600),
            ProxyMetrics::unregistered(),
        );
        p.sync(&services(CLUSTER), true).unwrap();
    });
    let now = save(&ns, Backend::Nft);
    assert!(!now.contains("KUBE-"), "{now}");
    assert!(now.contains("-A RSDN-MASQUERADE -m comment --comment \"pod traffic leaving the cluster network\" -j MASQUERADE --random-fully"), "{now}");
}

/// A restore the kernel refuses (here: deleting a stale chain that a foreign rule still jumps
/// to) keeps the previous rules, names the line, counts the failure, backs off, and the next
/// sync is full and succeeds once the obstacle is gone.
#[test]
fn a_failed_sync_keeps_the_rules_backs_off_and_retries_in_full() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("px");
        let tool = format!("iptables-{}", backend.name());
        for args in [
            &["-t", "nat", "-N", "KUBE-SVC-STALESTALESTALE1"][..],
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-j",
                "KUBE-SVC-STALESTALESTALE1",
            ][..],
        ] {
            let mut cmd = vec![tool.as_str()];
            cmd.extend_from_slice(args);
            let (ok, out) = ns.run(&cmd);
            assert!(ok, "{out}");
        }
        let before = save(&ns, backend);
        let s = services(CLUSTER);
        let ns_name = ns.name.clone();
        let (err, retry_set, full_due, metrics, after_failure, retried) = ns.on_thread(move || {
            let mut reg = prometheus_client::registry::Registry::default();
            let m = ProxyMetrics::register(&mut reg);
            let mut p = Proxier::new(Iptables { backend }, scope(), Duration::from_secs(3600), m);
            let err = p.sync(&s, true).unwrap_err().to_string();
            let (retry_set, full_due) = (p.retry_at().is_some(), p.full_due());
            let mut metrics = String::new();
            prometheus_client::encoding::text::encode(&mut metrics, &reg).unwrap();
            let after_failure =
                std::process::Command::new(format!("iptables-{}-save", backend.name()))
                    .output()
                    .unwrap();
            // The obstacle goes; the retry is full and succeeds.
            let del = std::process::Command::new(format!("iptables-{}", backend.name()))
                .args([
                    "-t",
                    "nat",
                    "-D",
                    "PREROUTING",
                    "-j",
                    "KUBE-SVC-STALESTALESTALE1",
                ])
                .status()
                .unwrap();
            assert!(del.success(), "{ns_name}");
            let full = p.full_due();
            let retried = p.sync(&s, full).unwrap();
            (err, retry_set, full_due, metrics, after_failure, retried)
        });
        assert!(
            err.contains("-X KUBE-SVC-STALESTALESTALE1"),
            "{backend:?}: {err}"
        );
        assert!(
            retry_set && full_due,
            "{backend:?}: no backoff or no full retry"
        );
        assert!(
            metrics.contains("kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1"),
            "{metrics}"
        );
        let after_failure = normalize(&String::from_utf8_lossy(&after_failure.stdout));
        assert_eq!(
            after_failure, before,
            "{backend:?}: a failed sync changed the rules"
        );
        assert!(
            retried.full,
            "{backend:?}: the retry after a failure is full"
        );
        assert!(!save(&ns, backend).contains("STALESTALE"), "{backend:?}");
    }
}
