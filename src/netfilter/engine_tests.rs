//! The engine's policies against the in-memory iptables: no root, no tools.

use super::*;
use crate::netfilter::fake::FakeIptables;
use crate::netfilter::jumps::Position;
use crate::netfilter::ruleset::Tables;

fn engine(f: &FakeIptables) -> Engine<FakeIptables> {
    Engine::new(
        f.clone(),
        Settings::default(),
        EngineMetrics::unregistered(),
    )
}

/// A small ruleset in the proxy's shape: a dispatch chain in nat with two Services (groups of
/// their own chains), a filter chain, and jumps into both.
fn desired(endpoints: &[&str]) -> Desired {
    let mut r = Ruleset::default();
    r.tables.nat.chain("KUBE-SERVICES");
    r.tables
        .filter
        .add("RSDN-FORWARD", format_args!("-s 10.128.0.0/14 -j ACCEPT"));
    for (i, ep) in endpoints.iter().enumerate() {
        let svc = format!("KUBE-SVC-{i}");
        let sep = format!("KUBE-SEP-{i}");
        r.tables
            .nat
            .add("KUBE-SERVICES", format_args!("-d 172.30.0.{i} -j {svc}"));
        let mut g = Tables::default();
        g.nat.add(&svc, format_args!("-j {sep}"));
        g.nat
            .add(&sep, format_args!("-p tcp -j DNAT --to-destination {ep}"));
        r.groups.insert(("proxy", format!("svc{i}")), Arc::new(g));
    }
    Desired {
        ruleset: r,
        jumps: vec![
            Jump::new(
                TableName::Nat,
                "PREROUTING",
                "",
                "services",
                "KUBE-SERVICES",
                Position::First,
            ),
            Jump::new(
                TableName::Filter,
                "FORWARD",
                "",
                "pods",
                "RSDN-FORWARD",
                Position::Last,
            ),
        ],
        owned: Arc::new(|_, c: &str| c.starts_with("KUBE-SVC-") || c.starts_with("KUBE-SEP-")),
        rendered_in: Duration::ZERO,
    }
}

/// `desired` whose groups are the very Arcs of `base` where the rules are the same: what a
/// producer's render cache hands back.
fn cached(base: &Desired, endpoints: &[&str]) -> Desired {
    let mut d = desired(endpoints);
    for (k, g) in d.ruleset.groups.iter_mut() {
        if let Some(old) = base.ruleset.groups.get(k) {
            if old == g {
                *g = old.clone();
            }
        }
    }
    d
}

#[test]
fn first_sync_is_full_then_partial_writes_only_changed_chains() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    let t0 = Instant::now();
    let d1 = desired(&["10.128.0.5:80", "10.128.2.5:80"]);
    let r = e.sync(d1.clone(), t0).unwrap();
    assert!(r.full);
    assert_eq!(r.jumps_fixed, ["nat/PREROUTING", "filter/FORWARD"]);
    assert_eq!(
        f.rules(TableName::Nat, "PREROUTING").unwrap(),
        ["-m comment --comment \"services\" -j KUBE-SERVICES"]
    );
    // One endpoint moves: only its endpoint chain is written.
    let d2 = cached(&d1, &["10.128.0.5:80", "10.128.4.5:80"]);
    let r = e.sync(d2.clone(), t0 + Duration::from_secs(1)).unwrap();
    assert!(!r.full);
    let last = f.restores().last().unwrap().clone();
    assert_eq!(
        last,
        "*nat\n:KUBE-SEP-1 - [0:0]\n-A KUBE-SEP-1 -p tcp -j DNAT --to-destination 10.128.4.5:80\nCOMMIT\n"
    );
    // Nothing changed: nothing is run.
    let n = f.restores().len();
    let r = e
        .sync(
            cached(&d2, &["10.128.0.5:80", "10.128.4.5:80"]),
            t0 + Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!((r.lines, f.restores().len()), (0, n));
    // The full period is over: everything again.
    let r = e.sync(d2, t0 + Duration::from_secs(3601)).unwrap();
    assert!(r.full && r.jumps_fixed.is_empty(), "{r:?}");
}

#[test]
fn reading_back_is_scheduled_by_the_first_sync() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    assert_eq!(e.next_check(), None, "nothing to read back before a sync");
    let t0 = Instant::now();
    e.sync(desired(&["10.128.0.5:80"]), t0).unwrap();
    assert_eq!(e.next_check(), Some(t0 + Duration::from_secs(5)));
    let r = e.check(t0 + Duration::from_secs(5));
    assert!(r.probed && r.verified.is_empty(), "{r:?}");
    assert_eq!(e.next_check(), Some(t0 + Duration::from_secs(10)));
    let r = e.check(t0 + Duration::from_secs(10));
    assert_eq!(r.verified, [TableName::Nat, TableName::Filter]);
}

#[test]
fn backoff_doubles_up_to_its_limit_and_resets_on_success() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    let t0 = Instant::now();
    e.sync(desired(&["10.128.0.5:80"]), t0).unwrap();
    f.refuse(Some("10.9.9.9"));
    let mut delays = Vec::new();
    for _ in 0..7 {
        assert!(e.sync(desired(&["10.9.9.9:80"]), t0).is_err());
        delays.push(e.retry_at().unwrap().duration_since(t0).as_secs());
    }
    assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
    assert_eq!(e.status().failures, 7);
    f.refuse(None);
    e.sync(desired(&["10.9.9.9:80"]), t0).unwrap();
    assert_eq!((e.retry_at(), e.status().failures), (None, 0));
    f.refuse(Some("10.8.8.8"));
    assert!(e.sync(desired(&["10.8.8.8:80"]), t0).is_err());
    assert_eq!(
        e.retry_at().unwrap().duration_since(t0).as_secs(),
        1,
        "reset"
    );
}

#[test]
fn a_failed_restore_keeps_the_previous_ruleset_as_base_and_the_next_sync_is_full() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    let t0 = Instant::now();
    let d1 = desired(&["10.128.0.5:80", "10.128.2.5:80"]);
    e.sync(d1.clone(), t0).unwrap();
    // A sync that drops Service 1 and adds a refused one fails: nothing of it is in place.
    f.refuse(Some("10.9.9.9"));
    let d2 = cached(&d1, &["10.128.0.5:80"]);
    let mut d2b = d2.clone();
    d2b.ruleset
        .tables
        .nat
        .add("KUBE-SERVICES", format_args!("-d 10.9.9.9 -j RETURN"));
    assert!(e.sync(d2b, t0).is_err());
    assert_eq!(
        e.applied(),
        Some(&d1.ruleset),
        "the base stays what succeeded"
    );
    assert!(e.full_due(t0), "the next sync is full");
    assert!(
        f.rules(TableName::Nat, "KUBE-SEP-1").is_some(),
        "nothing of it applied"
    );
    f.refuse(None);
    let r = e.sync(d2, t0 + Duration::from_secs(1)).unwrap();
    assert!(r.full);
    // Service 1's chains were in the base and are gone from the new ruleset: deleted.
    assert!(f.rules(TableName::Nat, "KUBE-SEP-1").is_none());
    assert!(f.rules(TableName::Nat, "KUBE-SVC-1").is_none());
    assert_eq!(r.deleted, 2);
}

#[test]
fn a_full_sync_deletes_stale_chains_of_ours_and_leaves_foreign_ones() {
    let f = FakeIptables::new();
    f.restore("*nat\n:KUBE-SEP-OLD - [0:0]\n:KUBE-SVC-OLD - [0:0]\n-A KUBE-SVC-OLD -j KUBE-SEP-OLD\n:FOREIGN - [0:0]\n-A FOREIGN -j RETURN\n-A PREROUTING -j FOREIGN\nCOMMIT\n").unwrap();
    let mut e = engine(&f);
    let r = e.sync(desired(&["10.128.0.5:80"]), Instant::now()).unwrap();
    assert_eq!(r.deleted, 2);
    assert!(f.rules(TableName::Nat, "KUBE-SVC-OLD").is_none());
    assert_eq!(f.rules(TableName::Nat, "FOREIGN").unwrap(), ["-j RETURN"]);
    assert!(f
        .rules(TableName::Nat, "PREROUTING")
        .unwrap()
        .contains(&"-j FOREIGN".to_string()));
}

#[test]
fn chains_another_owner_references_are_left_alone_when_they_are_not_ours() {
    // kube-proxy runs (rsdn's proxy is off): its Service chains are not rsdn's to delete.
    let f = FakeIptables::new();
    f.restore("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-KP - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-KP\nCOMMIT\n").unwrap();
    let mut e = engine(&f);
    let mut d = desired(&[]);
    d.ruleset.tables.nat.chains.clear();
    d.jumps.retain(|j| j.table == TableName::Filter);
    d.owned = Arc::new(|_, _: &str| false);
    e.sync(d, Instant::now()).unwrap();
    assert_eq!(
        f.rules(TableName::Nat, "KUBE-SERVICES").unwrap(),
        ["-j KUBE-SVC-KP"]
    );
}

#[test]
fn the_probe_puts_a_removed_jump_back_in_order_without_a_sync() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    let t0 = Instant::now();
    let mut d = desired(&["10.128.0.5:80"]);
    d.jumps.push(Jump::new(
        TableName::Nat,
        "PREROUTING",
        "",
        "policy first",
        "KUBE-SERVICES",
        Position::First,
    ));
    d.jumps.swap(0, 2);
    e.sync(d, t0).unwrap();
    assert_eq!(
        f.rules(TableName::Nat, "PREROUTING").unwrap(),
        [
            "-m comment --comment \"policy first\" -j KUBE-SERVICES",
            "-m comment --comment \"services\" -j KUBE-SERVICES"
        ]
    );
    // Someone deletes the first jump and inserts a rule of their own at the top.
    f.tamper(TableName::Nat, |t| {
        let pre = t.get_mut("PREROUTING").unwrap();
        pre.remove(0);
        pre.insert(0, "-j ACCEPT".into());
    });
    let r = e.check(t0 + Duration::from_secs(5));
    assert!(r.probed);
    assert_eq!(r.jumps_fixed, ["nat/PREROUTING"]);
    assert_eq!(
        f.rules(TableName::Nat, "PREROUTING").unwrap(),
        [
            "-m comment --comment \"policy first\" -j KUBE-SERVICES",
            "-m comment --comment \"services\" -j KUBE-SERVICES",
            "-j ACCEPT"
        ]
    );
    // The probe is not run again before its period.
    let (_, lists) = f.reads();
    assert!(!e.check(t0 + Duration::from_secs(6)).probed);
    assert_eq!(f.reads().1, lists);
    assert!(e.check(t0 + Duration::from_secs(11)).probed);
}

#[test]
fn a_flushed_table_is_found_by_the_probe_and_rewritten_by_a_partial_sync() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    let t0 = Instant::now();
    let d = desired(&["10.128.0.5:80"]);
    e.sync(d.clone(), t0).unwrap();
    e.check(t0); // learns the kernel's spelling
                 // `iptables -F` in filter: every chain of the table emptied, built-in ones included.
    f.tamper(TableName::Filter, |t| t.values_mut().for_each(Vec::clear));
    let r = e.check(t0 + Duration::from_secs(5));
    assert_eq!(r.jumps_fixed, ["filter/FORWARD"]);
    assert!(
        r.verified.contains(&TableName::Filter),
        "verified at once: {r:?}"
    );
    assert_eq!(r.drift.len(), 1, "{:?}", r.drift);
    assert!(e.pending(t0 + Duration::from_secs(5)));
    assert!(e.status().drift.is_some());
    let s = e
        .sync(cached(&d, &["10.128.0.5:80"]), t0 + Duration::from_secs(5))
        .unwrap();
    assert!(!s.full && s.repaired == 1, "{s:?}");
    assert_eq!(
        f.rules(TableName::Filter, "RSDN-FORWARD").unwrap(),
        ["-s 10.128.0.0/14 -j ACCEPT"]
    );
    assert_eq!(e.status().drift, None);
}

#[test]
fn a_deleted_endpoint_chain_and_its_jump_are_rewritten_after_the_next_read_back() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    let t0 = Instant::now();
    let d = desired(&["10.128.0.5:80", "10.128.2.5:80"]);
    e.sync(d.clone(), t0).unwrap();
    assert!(e.check(t0).drift.is_empty());
    f.tamper(TableName::Nat, |t| {
        t.get_mut("KUBE-SVC-1").unwrap().clear();
        t.remove("KUBE-SEP-1");
    });
    // Not yet due: the tables are read back every verify period at the soonest.
    assert!(e.check(t0 + Duration::from_secs(5)).drift.is_empty());
    let r = e.check(t0 + Duration::from_secs(10));
    let mut found: Vec<String> = r.drift.iter().map(|d| d.chain.clone()).collect();
    found.sort();
    assert_eq!(found, ["KUBE-SEP-1", "KUBE-SVC-1"]);
    let s = e
        .sync(
            cached(&d, &["10.128.0.5:80", "10.128.2.5:80"]),
            t0 + Duration::from_secs(10),
        )
        .unwrap();
    assert!(!s.full);
    assert_eq!(
        f.restores().last().unwrap(),
        "*nat\n:KUBE-SEP-1 - [0:0]\n:KUBE-SVC-1 - [0:0]\n-A KUBE-SEP-1 -p tcp -j DNAT --to-destination 10.128.2.5:80\n-A KUBE-SVC-1 -j KUBE-SEP-1\nCOMMIT\n"
    );
    assert!(e.check(t0 + Duration::from_secs(20)).drift.is_empty());
}

#[test]
fn a_deleted_chain_that_also_leaves_the_ruleset_is_not_deleted_twice() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    let t0 = Instant::now();
    let d = desired(&["10.128.0.5:80", "10.128.2.5:80"]);
    e.sync(d.clone(), t0).unwrap();
    f.tamper(TableName::Nat, |t| {
        t.get_mut("KUBE-SVC-1").unwrap().clear();
        t.remove("KUBE-SEP-1");
    });
    assert_eq!(e.check(t0 + Duration::from_secs(10)).drift.len(), 2);
    // Meanwhile Service 1 is deleted: its chains go, the missing one is not -X'ed.
    let s = e.sync(cached(&d, &["10.128.0.5:80"]), t0).unwrap();
    assert!(!s.full, "{s:?}");
    assert!(f.rules(TableName::Nat, "KUBE-SVC-1").is_none());
}

/// A filter chain matching a set of pods, and the set.
fn with_set(members: &[&str]) -> Desired {
    use crate::netfilter::sets::{IpSet, SetKind};
    let mut d = desired(&["10.128.0.5:80"]);
    let mut set = IpSet::new(SetKind::HashIp);
    set.members.extend(members.iter().map(|m| m.to_string()));
    d.ruleset.sets.insert("RSDN-P-WEB".into(), Arc::new(set));
    d.ruleset.tables.filter.add(
        "RSDN-NI-X",
        format_args!("-m set --match-set RSDN-P-WEB src -j MARK --or-mark 0x20000"),
    );
    d
}

#[test]
fn sets_are_written_before_the_rules_using_them_and_destroyed_after() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    let t0 = Instant::now();
    // The fake refuses a rule whose set does not exist yet: the order matters.
    let r = e.sync(with_set(&["10.128.0.5"]), t0).unwrap();
    assert_eq!(r.sets, 1);
    assert_eq!(f.sets()["RSDN-P-WEB"].members.len(), 1);
    // A member joins: only the set is written, swapped in.
    let r = e.sync(with_set(&["10.128.0.5", "10.128.2.5"]), t0).unwrap();
    assert!(!r.full && r.sets == 1, "{r:?}");
    let last = f.restores().last().unwrap().clone();
    assert!(
        last.contains("swap RSDN-P-WEB-t RSDN-P-WEB") && !last.contains("*filter"),
        "{last}"
    );
    assert!(
        !f.sets().contains_key("RSDN-P-WEB-t"),
        "the temporary set is gone"
    );
    // The policy goes: its rule first, then its set.
    e.sync(desired(&["10.128.0.5:80"]), t0).unwrap();
    assert!(f.rules(TableName::Filter, "RSDN-NI-X").is_none());
    assert!(f.sets().is_empty(), "{:?}", f.sets());
}

#[test]
fn a_tampered_set_is_rewritten_and_a_stale_set_of_ours_destroyed_on_a_full_sync() {
    let f = FakeIptables::new();
    f.ipset_restore(
        "create RSDN-P-STALE hash:ip family inet\ncreate FOREIGN hash:ip family inet\n",
    )
    .unwrap();
    let mut e = engine(&f);
    let t0 = Instant::now();
    e.sync(with_set(&["10.128.0.5"]), t0).unwrap();
    let kept: Vec<String> = f.sets().into_keys().collect();
    assert_eq!(kept, ["FOREIGN", "RSDN-P-WEB"]);
    f.tamper_sets(|s| {
        s.get_mut("RSDN-P-WEB").unwrap().members.clear();
    });
    let c = e.check(t0 + Duration::from_secs(10));
    assert!(
        c.drift.iter().any(|d| d.chain == "ipset RSDN-P-WEB"),
        "{c:?}"
    );
    let r = e
        .sync(with_set(&["10.128.0.5"]), t0 + Duration::from_secs(10))
        .unwrap();
    assert_eq!((r.full, r.repaired), (false, 1));
    assert_eq!(f.sets()["RSDN-P-WEB"].members.len(), 1);
}

#[test]
fn a_gone_chain_that_a_foreign_rule_jumps_to_is_emptied_and_blocks_nothing() {
    let f = FakeIptables::new();
    let mut e = engine(&f);
    let t0 = Instant::now();
    e.sync(desired(&["10.128.0.5:80", "10.128.2.5:80"]), t0)
        .unwrap();
    // Another program's chain jumps to Service 1's chain.
    f.tamper(TableName::Nat, |t| {
        t.insert("OTHER".into(), vec!["-s 192.0.2.1 -j KUBE-SVC-1".into()]);
    });
    // Service 1 goes and Service 0 moves: the partial sync cannot delete KUBE-SVC-1 and
    // fails; the full sync that follows writes everything, empties KUBE-SVC-1 and keeps it.
    let d = desired(&["10.128.0.9:80"]);
    assert!(e.sync(d.clone(), t0 + Duration::from_secs(1)).is_err());
    let r = e.sync(d.clone(), e.retry_at().unwrap()).unwrap();
    assert!(r.full);
    assert_eq!(f.rules(TableName::Nat, "KUBE-SVC-1"), Some(vec![]));
    assert_eq!(f.rules(TableName::Nat, "KUBE-SEP-1"), None, "deleted");
    assert_eq!(
        f.rules(TableName::Nat, "KUBE-SEP-0").unwrap(),
        ["-p tcp -j DNAT --to-destination 10.128.0.9:80"]
    );
    assert_eq!(e.status().failures, 0);
    // Later full syncs keep succeeding; once the foreign rule is gone, the chain goes.
    let t1 = t0 + Duration::from_secs(7200);
    assert!(e.sync(d.clone(), t1).unwrap().full);
    assert!(f.rules(TableName::Nat, "KUBE-SVC-1").is_some());
    f.tamper(TableName::Nat, |t| {
        t.remove("OTHER");
    });
    assert!(e.sync(d, t1 + Duration::from_secs(7200)).unwrap().full);
    assert_eq!(f.rules(TableName::Nat, "KUBE-SVC-1"), None);
}
