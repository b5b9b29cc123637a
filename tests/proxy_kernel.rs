//! Kernel tier for the netfilter engine with its producers (the Service proxy, egress
//! masquerade): the real iptables tools, with each backend, inside a fresh network namespace
//! (the tools inherit the namespace of the thread that runs them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rsdn::egress::Egress;
use rsdn::model::{ClusterModel, ModelBuilder, ModelScope};
use rsdn::netfilter::backend::Backend;
use rsdn::netfilter::engine::{CheckReport, Engine, Settings, SyncReport};
use rsdn::netfilter::metrics::EngineMetrics;
use rsdn::netfilter::producer::{combine, Producer};
use rsdn::netfilter::tools::{Iptables, Tools};
use rsdn::proxy::conntrack::Fake;
use rsdn::proxy::metrics::ProxyMetrics;
use rsdn::proxy::{Proxy, ProxySettings};
use rsdn_testkit::{need_root, Netns};

const CLUSTER: &str = include_str!("../src/proxy/testdata/cluster.yaml");
const BACKENDS: [Backend; 2] = [Backend::Nft, Backend::Legacy];
/// Longer than a full-sync period: a step this far on is a full sync.
const LATER: Duration = Duration::from_secs(7200);

fn model(yaml: &str) -> Arc<ClusterModel> {
    let mut b = ModelBuilder::default();
    rsdn::source::dir::add_documents(&mut b, "test.yaml", yaml);
    Arc::new(b.finish(&ModelScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        local_node: "n1".into(),
        programmed: Default::default(),
    }))
}

/// The daemon's producers for node n1: the proxy (unless `proxy` is false) and egress.
fn producers(proxy: bool) -> Vec<Box<dyn Producer>> {
    let (cn, sn) = (
        "10.128.0.0/14".parse().unwrap(),
        "172.30.0.0/16".parse().unwrap(),
    );
    let mut out: Vec<Box<dyn Producer>> = Vec::new();
    if proxy {
        out.push(Box::new(Proxy::new(
            ProxySettings {
                cluster_network: cn,
                service_network: sn,
                masquerade_bit: 0,
                node_name: "n1".into(),
                node_ip: Some("192.168.77.11".parse().unwrap()),
                node_port_addresses: rsdn::config::NodePortAddresses::All,
            },
            Box::new(Fake::default()),
            ProxyMetrics::unregistered(),
        )));
    }
    out.push(Box::new(Egress {
        cluster_network: cn,
        service_network: sn,
    }));
    out
}

fn engine(backend: Backend) -> Engine<Tools> {
    Engine::new(
        Tools { backend },
        Settings::default(),
        EngineMetrics::unregistered(),
    )
}

/// Full syncs of each model in turn by an engine with `settings`, on nf_tables: each sync's
/// report and the rules after it.
fn staged_syncs(
    ns: &Netns,
    settings: Settings,
    models: Vec<Arc<ClusterModel>>,
) -> Vec<(SyncReport, String)> {
    ns.on_thread(move || {
        let backend = Backend::Nft;
        let mut e = Engine::new(Tools { backend }, settings, EngineMetrics::unregistered());
        let mut p = producers(true);
        let mut now = Instant::now();
        models
            .into_iter()
            .map(|m| {
                now += LATER;
                let r = e.sync(combine(&mut p, &m), now).unwrap();
                let out = std::process::Command::new("iptables-nft-save")
                    .output()
                    .unwrap();
                (r, normalize(&String::from_utf8_lossy(&out.stdout)))
            })
            .collect()
    })
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

/// Syncs each model in turn (`true`: far enough on in time that the sync is full).
fn syncs(ns: &Netns, backend: Backend, steps: Vec<(Arc<ClusterModel>, bool)>) -> Vec<SyncReport> {
    ns.on_thread(move || {
        let (mut e, mut p) = (engine(backend), producers(true));
        let mut now = Instant::now();
        steps
            .into_iter()
            .map(|(m, full)| {
                if full {
                    now += LATER;
                }
                e.sync(combine(&mut p, &m), now).unwrap()
            })
            .collect()
    })
}

#[test]
fn full_sync_applies_cleanly_and_twice_changes_nothing() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("px");
        let m = model(CLUSTER);
        let reports = syncs(&ns, backend, vec![(m.clone(), true)]);
        assert!(reports[0].lines > 100, "{backend:?}: {:?}", reports[0]);
        // Every built-in chain with a jump: nat PREROUTING, OUTPUT, POSTROUTING; filter INPUT,
        // FORWARD, OUTPUT.
        assert_eq!(
            reports[0].jumps_fixed.len(),
            6,
            "{backend:?}: {:?}",
            reports[0]
        );
        let first = save(&ns, backend);
        for want in [
            "-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A POSTROUTING -m comment --comment \"rsdn egress masquerade\" -j RSDN-MASQUERADE",
            "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x1/0x1",
        ] {
            assert!(first.lines().any(|l| l.ends_with(want)), "{backend:?}: no {want} in\n{first}");
        }
        // kube-proxy's order at the top of FORWARD, rsdn's own rule appended.
        let forward: Vec<&str> = first
            .lines()
            .filter(|l| l.starts_with("filter -A FORWARD"))
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(
            forward,
            [
                "KUBE-PROXY-FIREWALL",
                "KUBE-FORWARD",
                "KUBE-SERVICES",
                "KUBE-EXTERNAL-SERVICES",
                "RSDN-FORWARD"
            ],
            "{backend:?}"
        );
        // A second full sync and a partial one with nothing changed leave the kernel as it was.
        let again = syncs(&ns, backend, vec![(m.clone(), true), (m, false)]);
        assert!(
            again[0].jumps_fixed.is_empty(),
            "{backend:?}: jumps touched again"
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
        let before = model(CLUSTER);
        let after =
            model(&CLUSTER.replace("10.128.2.5], nodeName: n2", "10.128.2.99], nodeName: n2"));
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
        syncs(&ns, backend, vec![(model(CLUSTER), true)]);
        let before = save(&ns, backend);
        // Valid changes first, then a line the kernel refuses: none of it may land.
        let broken = "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j RETURN\n-A KUBE-SERVICES -m nosuchmatch -j RETURN\nCOMMIT\n";
        let err = ns.on_thread(move || Tools { backend }.restore(broken).unwrap_err().to_string());
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
        syncs(&ns, backend, vec![(model(CLUSTER), true)]);
        let now = save(&ns, backend);
        assert!(!now.contains("STALESTALE"), "{backend:?}: stale chain kept");
        assert!(
            now.lines().any(|l| l == "nat :DOCKER"),
            "{backend:?}: foreign chain removed"
        );
    }
}

/// A full sync on nf_tables is staged in small transactions (iptables-nft-restore's cost
/// grows with the square of the chains one transaction names). Staged three names at a time,
/// through a first sync, a change and the removal of every Service, the kernel ends each time
/// where one transaction per table (`staged_names: 0`) leaves it, and foreign chains and rules
/// stay.
#[test]
fn a_staged_full_sync_ends_where_one_transaction_does_and_keeps_foreign_rules() {
    need_root!();
    let foreign: [&[&str]; 4] = [
        &["-t", "nat", "-N", "DOCKER"],
        &["-t", "nat", "-A", "DOCKER", "-j", "RETURN"],
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-s",
            "192.0.2.1/32",
            "-j",
            "DOCKER",
        ],
        &[
            "-t",
            "filter",
            "-A",
            "FORWARD",
            "-s",
            "192.0.2.1/32",
            "-j",
            "ACCEPT",
        ],
    ];
    let models = || {
        vec![
            model(CLUSTER),
            model(&CLUSTER.replace("10.128.2.5], nodeName: n2", "10.128.2.99], nodeName: n2")),
            model(""),
        ]
    };
    let run = |names: usize| {
        let ns = Netns::new("st");
        for f in foreign {
            let (ok, out) = ns.run(&[&["iptables-nft"], f].concat());
            assert!(ok, "{out}");
        }
        let settings = Settings {
            staged_names: names,
            ..Settings::default()
        };
        staged_syncs(&ns, settings, models())
    };
    let (small, one) = (run(3), run(0));
    for (step, ((rs, ss), (ro, so))) in small.iter().zip(&one).enumerate() {
        assert_eq!(ss, so, "step {step}");
        // One transaction per table (nat, filter) unstaged; many for three names each.
        assert!(ro.transactions <= 2, "step {step}: {ro:?}");
        assert!(rs.transactions > 10, "step {step}: {rs:?}");
        for want in [
            "nat -A DOCKER -j RETURN",
            "nat -A PREROUTING -s 192.0.2.1/32 -j DOCKER",
            "filter -A FORWARD -s 192.0.2.1/32 -j ACCEPT",
        ] {
            assert!(
                ss.lines().any(|l| l == want),
                "step {step}: no {want} in\n{ss}"
            );
        }
    }
    assert!(small[0].1.contains("KUBE-SVC-"), "{}", small[0].1);
    assert!(!small[2].1.contains("KUBE-SVC-"), "{}", small[2].1);
}

/// With `--proxy=false` kube-proxy owns the KUBE-* chains: rsdn writes only its egress rules
/// and leaves kube-proxy's Service chains alone, even where they look stale to it.
#[test]
fn without_the_proxy_only_egress_rules_are_written_and_kube_proxys_chains_stay() {
    need_root!();
    let ns = Netns::new("px");
    for args in [
        &["-t", "nat", "-N", "KUBE-SERVICES"][..],
        &["-t", "nat", "-N", "KUBE-SVC-KUBEPROXYKUBEPROX"],
        &[
            "-t",
            "nat",
            "-A",
            "KUBE-SERVICES",
            "-j",
            "KUBE-SVC-KUBEPROXYKUBEPROX",
        ],
        &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
    ] {
        let mut cmd = vec!["iptables-nft"];
        cmd.extend_from_slice(args);
        let (ok, out) = ns.run(&cmd);
        assert!(ok, "{out}");
    }
    let before = save(&ns, Backend::Nft);
    ns.on_thread(|| {
        let (mut e, mut p) = (engine(Backend::Nft), producers(false));
        e.sync(combine(&mut p, &model(CLUSTER)), Instant::now())
            .unwrap();
    });
    let now = save(&ns, Backend::Nft);
    let kube: Vec<&str> = now.lines().filter(|l| l.contains("KUBE-")).collect();
    let kube_before: Vec<&str> = before.lines().filter(|l| l.contains("KUBE-")).collect();
    assert_eq!(kube, kube_before, "{now}");
    assert!(now.contains("-A RSDN-MASQUERADE -m comment --comment \"pod traffic leaving the cluster network\" -j MASQUERADE --random-fully"), "{now}");
}

/// ns1/svc1:p80's chain, and CLUSTER without svc1 (its first two documents).
const SVC1: &str = "KUBE-SVC-XPGD46QRK7WJZT7O";

fn without_svc1() -> String {
    CLUSTER
        .split("\n---\n")
        .skip(2)
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// A restore the kernel refuses (here: a partial sync deleting the chain of a Service that is
/// gone, which a foreign rule still jumps to) names the line, counts the failure, leaves the
/// table as it was (a partial sync is one transaction per table), backs off, and the next sync
/// is full and succeeds (once the obstacle is gone; when it stays:
/// `a_gone_chain_another_rule_jumps_to_is_emptied_and_the_rest_applied`).
#[test]
fn a_failed_sync_keeps_the_rules_backs_off_and_retries_in_full() {
    need_root!();
    let (svc, without) = (SVC1, without_svc1());
    for backend in BACKENDS {
        let ns = Netns::new("px");
        let tool = format!("iptables-{}", backend.name());
        let ns_name = ns.name.clone();
        let without = without.clone();
        let (before, err, retry_set, full_due, metrics, after_failure, retried) =
            ns.on_thread(move || {
                let mut reg = prometheus_client::registry::Registry::default();
                let mut e = Engine::new(
                    Tools { backend },
                    Settings::default(),
                    EngineMetrics::register(&mut reg),
                );
                let mut p = producers(true);
                let t0 = Instant::now();
                e.sync(combine(&mut p, &model(CLUSTER)), t0).unwrap();
                let jump = [
                    "-t",
                    "nat",
                    "-I",
                    "PREROUTING",
                    "-s",
                    "192.0.2.1/32",
                    "-j",
                    svc,
                ];
                let run = |args: &[&str]| {
                    let out = std::process::Command::new(&tool)
                        .args(args)
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{ns_name} {args:?}: {out:?}");
                };
                run(&jump);
                let save = || {
                    std::process::Command::new(format!("iptables-{}-save", backend.name()))
                        .output()
                        .unwrap()
                };
                let before = save();
                let m = model(&without);
                let t1 = t0 + Duration::from_secs(1);
                let err = e.sync(combine(&mut p, &m), t1).unwrap_err().to_string();
                let (retry_set, full_due) = (e.retry_at().is_some(), e.full_due(t1));
                let mut metrics = String::new();
                prometheus_client::encoding::text::encode(&mut metrics, &reg).unwrap();
                let after_failure = save();
                // The obstacle goes; the retry is full and succeeds.
                let mut del = jump.to_vec();
                del[2] = "-D";
                run(&del);
                let retried = e
                    .sync(combine(&mut p, &m), t1 + Duration::from_secs(1))
                    .unwrap();
                (
                    before,
                    err,
                    retry_set,
                    full_due,
                    metrics,
                    after_failure,
                    retried,
                )
            });
        assert!(err.contains(&format!("-X {svc}")), "{backend:?}: {err}");
        assert!(
            retry_set && full_due,
            "{backend:?}: no backoff or no full retry"
        );
        assert!(
            metrics.contains(
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1"
            ),
            "{metrics}"
        );
        assert_eq!(
            normalize(&String::from_utf8_lossy(&after_failure.stdout)),
            normalize(&String::from_utf8_lossy(&before.stdout)),
            "{backend:?}: what a failed sync left"
        );
        assert!(
            retried.full,
            "{backend:?}: the retry after a failure is full"
        );
        let done = save(&ns, backend);
        assert!(
            !done.contains(svc) && !done.contains("172.30.0.41"),
            "{backend:?}: {done}"
        );
    }
}

/// Runs `damage` (iptables commands) in the namespace, then engine checks and syncs as the
/// daemon's task would, a read back period apart; returns what each check found.
fn damaged_and_repaired(
    ns: &Netns,
    backend: Backend,
    damage: Vec<Vec<String>>,
) -> Vec<CheckReport> {
    let name = ns.name.clone();
    ns.on_thread(move || {
        let (mut e, mut p) = (engine(backend), producers(true));
        let m = model(CLUSTER);
        let t0 = Instant::now();
        e.sync(combine(&mut p, &m), t0).unwrap();
        // The first read back learns how the kernel spells what was written.
        let first = e.check(t0 + Duration::from_secs(10));
        assert_eq!(first.verified.len(), 2, "{name}: {first:?}");
        assert!(
            first.probed && first.jumps_fixed.is_empty() && first.errors.is_empty(),
            "{name} {backend:?}: an untouched kernel needs no repair: {first:?}"
        );
        assert!(
            first.drift.is_empty(),
            "{name} {backend:?}: the kernel's own spelling read as drift: {:?}",
            first.drift
        );
        for cmd in damage {
            let out = std::process::Command::new(&cmd[0])
                .args(&cmd[1..])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut found = vec![first];
        for step in 2..=3 {
            let now = t0 + Duration::from_secs(10 * step);
            let c = e.check(now);
            if e.pending(now) {
                let r = e.sync(combine(&mut p, &m), now).unwrap();
                assert!(!r.full, "{backend:?}: a repair is a partial sync: {r:?}");
            }
            found.push(c);
        }
        found
    })
}

#[test]
fn a_deleted_endpoint_chain_and_its_jump_are_found_and_rewritten() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("px");
        syncs(&ns, backend, vec![(model(CLUSTER), true)]);
        let before = save(&ns, backend);
        // ns1/svc1:p80 has two endpoints; take one away by hand, as the hostile operator did.
        let sep = "KUBE-SEP-YXZ5DWH6NZJYLJBS";
        let line = before
            .lines()
            .find(|l| {
                l.starts_with("nat -A KUBE-SVC-XPGD46QRK7WJZT7O")
                    && l.ends_with(&format!("-j {sep}"))
            })
            .unwrap_or_else(|| panic!("{backend:?}: no jump to {sep} in\n{before}"))
            .trim_start_matches("nat -A ")
            .to_string();
        let tool = format!("iptables-{}", backend.name());
        let mut delete: Vec<String> = vec![tool.clone(), "-t".into(), "nat".into(), "-D".into()];
        delete.extend(shell_words(&line));
        let found = damaged_and_repaired(
            &ns,
            backend,
            vec![
                delete,
                vec![
                    tool.clone(),
                    "-t".into(),
                    "nat".into(),
                    "-F".into(),
                    sep.into(),
                ],
                vec![tool, "-t".into(), "nat".into(), "-X".into(), sep.into()],
            ],
        );
        let mut drifted: Vec<&str> = found[1].drift.iter().map(|d| d.chain.as_str()).collect();
        drifted.sort();
        assert_eq!(drifted, [sep, "KUBE-SVC-XPGD46QRK7WJZT7O"], "{backend:?}");
        assert!(
            found[2].drift.is_empty(),
            "{backend:?}: {:?}",
            found[2].drift
        );
        assert_eq!(save(&ns, backend), before, "{backend:?}: not repaired");
    }
}

#[test]
fn a_flushed_filter_table_is_found_by_the_probe_and_restored() {
    need_root!();
    for backend in BACKENDS {
        let ns = Netns::new("px");
        syncs(&ns, backend, vec![(model(CLUSTER), true)]);
        let before = save(&ns, backend);
        let tool = format!("iptables-{}", backend.name());
        let found = damaged_and_repaired(
            &ns,
            backend,
            vec![vec![tool, "-t".into(), "filter".into(), "-F".into()]],
        );
        assert!(
            !found[1].jumps_fixed.is_empty(),
            "{backend:?}: {:?}",
            found[1]
        );
        assert!(!found[1].drift.is_empty(), "{backend:?}: {:?}", found[1]);
        assert_eq!(save(&ns, backend), before, "{backend:?}: not restored");
    }
}

/// Splits a rule as iptables-save prints it into words, keeping quoted comments whole.
fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// `conntrack -I` of a UDP flow from 10.128.4.2:`sport` to `dst:dport`, answered by `by:bport`.
fn insert_udp_flow(ns: &Netns, sport: u16, dst: &str, dport: u16, by: &str, bport: u16) {
    let (sport, dport, bport) = (sport.to_string(), dport.to_string(), bport.to_string());
    let (ok, out) = ns.run(&[
        "conntrack",
        "-I",
        "-p",
        "udp",
        "-s",
        "10.128.4.2",
        "-d",
        dst,
        "--sport",
        &sport,
        "--dport",
        &dport,
        "-r",
        by,
        "-q",
        "10.128.4.2",
        "--reply-port-src",
        &bport,
        "--reply-port-dst",
        &sport,
        "-t",
        "120",
    ]);
    assert!(ok, "{out}");
}

/// The conntrack reconciler against the kernel's table (ctnetlink), in a namespace of its
/// own: flows inserted with the conntrack tool, the stale ones deleted, the others kept.
#[test]
fn the_conntrack_reconciler_deletes_stale_udp_flows_through_netlink() {
    need_root!();
    use rsdn::proxy::conntrack::{reconcile, Conntrack, Netlink};
    let ns = Netns::new("ct");
    let m = model(
        "apiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: ns}\nspec:\n  type: NodePort\n  clusterIP: 172.30.0.10\n  ports: [{name: dns, port: 53, protocol: UDP, nodePort: 30053}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: dns-1, namespace: ns, labels: {kubernetes.io/service-name: dns}}\naddressType: IPv4\nports: [{name: dns, port: 5353, protocol: UDP}]\nendpoints:\n- {addresses: [10.128.0.5]}\n",
    );
    insert_udp_flow(&ns, 40001, "172.30.0.10", 53, "10.128.0.5", 5353); // live
    insert_udp_flow(&ns, 40002, "172.30.0.10", 53, "10.128.9.9", 5353); // a gone endpoint
    insert_udp_flow(&ns, 40003, "172.30.0.10", 53, "172.30.0.10", 53); // never DNATed
    insert_udp_flow(&ns, 40004, "192.168.77.11", 30053, "10.128.9.9", 5353); // NodePort, gone
    insert_udp_flow(&ns, 40005, "192.168.77.12", 30053, "192.168.77.12", 30053); // another host
    insert_udp_flow(&ns, 40006, "203.0.113.7", 53, "203.0.113.7", 53); // not a Service
    let (ok, out) = ns.run(&[
        "conntrack",
        "-I",
        "-p",
        "tcp",
        "-s",
        "10.128.4.2",
        "-d",
        "172.30.0.10",
        "--sport",
        "40007",
        "--dport",
        "53",
        "--state",
        "ESTABLISHED",
        "-t",
        "120",
    ]);
    assert!(ok, "{out}");
    let node_ips = ["192.168.77.11".parse().unwrap()].into();
    let (listed, deleted, again, left) = ns.on_thread(move || {
        let listed = Netlink.list_udp().unwrap();
        let deleted = reconcile(&Netlink, &m.services, &node_ips);
        let again = reconcile(&Netlink, &m.services, &node_ips);
        (listed, deleted, again, Netlink.list_udp().unwrap())
    });
    assert_eq!(listed.len(), 6, "the TCP flow is not listed: {listed:?}");
    assert_eq!((deleted, again), (3, 0));
    let mut kept: Vec<u16> = left.iter().map(|f| f.orig.sport).collect();
    kept.sort();
    assert_eq!(kept, [40001, 40005, 40006]);
    let (_, tcp) = ns.run(&["conntrack", "-L", "-p", "tcp"]);
    assert!(tcp.contains("sport=40007"), "{tcp}");
    // Deleting a flow that is already gone is no error.
    let gone = listed.into_iter().find(|f| f.orig.sport == 40002).unwrap();
    assert_eq!(ns.on_thread(move || Netlink.delete(&[gone]).unwrap()), 0);
}

/// A chain of ours that another program's rule jumps to, when its Service goes: the partial
/// sync's delete is refused (and the whole table's transaction with it); the full sync that
/// follows the failure empties the chain, keeps it, and applies everything else.
#[test]
fn a_gone_chain_another_rule_jumps_to_is_emptied_and_the_rest_applied() {
    need_root!();
    let (svc, without) = (SVC1, without_svc1());
    for backend in BACKENDS {
        let ns = Netns::new("px");
        let tool = format!("iptables-{}", backend.name());
        let without = without.clone();
        let (refused, full) = ns.on_thread(move || {
            let (mut e, mut p) = (engine(backend), producers(true));
            let t0 = Instant::now();
            e.sync(combine(&mut p, &model(CLUSTER)), t0).unwrap();
            for args in [
                vec!["-t", "nat", "-N", "OTHER"],
                vec!["-t", "nat", "-A", "OTHER", "-s", "192.0.2.1/32", "-j", svc],
            ] {
                let out = std::process::Command::new(&tool)
                    .args(&args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{args:?}: {out:?}");
            }
            let m = model(&without);
            let refused = e.sync(combine(&mut p, &m), t0 + Duration::from_secs(1));
            let full = e.sync(combine(&mut p, &m), e.retry_at().unwrap());
            (refused.is_err(), full)
        });
        assert!(
            refused,
            "{backend:?}: the partial sync's delete was not refused"
        );
        let full = full.unwrap_or_else(|e| panic!("{backend:?}: the full sync failed: {e}"));
        assert!(full.full, "{backend:?}: {full:?}");
        let after = save(&ns, backend);
        let lines: Vec<&str> = after.lines().collect();
        assert!(
            lines.contains(&format!("nat :{svc}").as_str()),
            "{backend:?}: {after}"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with(&format!("nat -A {svc} "))),
            "{backend:?}: {svc} not emptied:\n{after}"
        );
        assert!(
            !after.contains("172.30.0.41") && after.contains("172.30.0.42"),
            "{backend:?}: svc1 still in KUBE-SERVICES, or svc2 gone:\n{after}"
        );
        assert!(
            lines.contains(&format!("nat -A OTHER -s 192.0.2.1/32 -j {svc}").as_str()),
            "{backend:?}: {after}"
        );
    }
}
