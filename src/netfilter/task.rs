//! The engine's task: on every new model (and when the engine has something due: a full sync,
//! a retry, a read back, a repair) the producers render, the engine syncs, the producers hear
//! of it. Rendering and iptables run on the blocking pool: a restore can take seconds on a
//! large table and must hold up nothing else.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::engine::{CheckReport, Engine, SyncReport};
use super::producer::{combine, Producer};
use super::tools::{Iptables, IptablesError};
use crate::health::{Health, Loop};
use crate::model::ClusterModel;

/// What one round did.
#[derive(Default)]
struct Round {
    check: Option<CheckReport>,
    sync: Option<Result<SyncReport, IptablesError>>,
}

/// Runs until the model channel closes. Nothing is written before the local node is in the
/// model (its address is part of the rules).
pub async fn run<I: Iptables>(
    mut engine: Engine<I>,
    mut producers: Vec<Box<dyn Producer>>,
    mut models: watch::Receiver<Arc<ClusterModel>>,
    local_node: String,
    resync: Duration,
    health: Arc<Health>,
) {
    let mut synced: Option<Arc<ClusterModel>> = None;
    // The model last seen: a new one queues a sync (kube-proxy's last queued timestamp).
    let mut seen: Option<Arc<ClusterModel>> = None;
    loop {
        health.alive(Loop::Iptables, Instant::now());
        let model = Arc::clone(&models.borrow_and_update());
        if !seen.as_ref().is_some_and(|m| Arc::ptr_eq(m, &model)) {
            engine.metrics().queued(SystemTime::now());
            seen = Some(Arc::clone(&model));
        }
        let mut next = tokio::time::Instant::now() + resync;
        if model.nodes.contains_key(&local_node) {
            let now = Instant::now();
            let changed = !synced.as_ref().is_some_and(|m| Arc::ptr_eq(m, &model))
                || producers.iter_mut().any(|p| p.stale());
            let backing_off = engine.retry_at().is_some_and(|t| t > now);
            let check = engine.next_check().is_some_and(|t| t <= now);
            if check || (!backing_off && (changed || engine.pending(now))) {
                let h = health.clone();
                let m = Arc::clone(&model);
                // A restore may take minutes on a huge table: busy, not stuck.
                health.busy(Loop::Iptables, now);
                let joined = tokio::task::spawn_blocking(move || {
                    let mut round = Round::default();
                    // Rules were missing and are back (producers hear of it after the sync).
                    let mut repaired = false;
                    if check {
                        let c = engine.check(now);
                        if !c.jumps_fixed.is_empty() {
                            repaired = true;
                            h.iptables_repaired(
                                "jumps",
                                format!(
                                    "jumps put back in {} (a flush?)",
                                    c.jumps_fixed.join(", ")
                                ),
                                now,
                            );
                        }
                        round.check = Some(c);
                        let packets = |t, c: &str| engine.iptables().packets(t, c).ok().flatten();
                        for p in producers.iter_mut() {
                            p.counters(&packets);
                        }
                    }
                    if !backing_off && (changed || engine.pending(now)) {
                        h.iptables_pending(now);
                        let desired = combine(&mut producers, &m);
                        let r = engine.sync(desired, now);
                        match &r {
                            Ok(r) => {
                                for p in producers.iter_mut() {
                                    p.synced(&m, r);
                                }
                                if r.repaired > 0 {
                                    repaired = true;
                                    h.iptables_repaired(
                                        "chains",
                                        format!("{} drifted chain(s) rewritten", r.repaired),
                                        Instant::now(),
                                    );
                                }
                                h.iptables_synced();
                            }
                            Err(e) => h.iptables_failed(e.to_string(), Instant::now()),
                        }
                        round.sync = Some(r);
                    }
                    if repaired {
                        for p in producers.iter_mut() {
                            p.repaired(&m);
                        }
                    }
                    h.iptables_drift(engine.status().drift);
                    (engine, producers, round)
                })
                .await;
                let round;
                (engine, producers, round) = match joined {
                    Ok(x) => x,
                    Err(e) => {
                        error!(error = %e, "the iptables sync task panicked; stopping it");
                        let why = format!("the sync panicked: {e}");
                        health.stopped(Loop::Iptables, why, Instant::now());
                        return;
                    }
                };
                health.alive(Loop::Iptables, Instant::now());
                if let Some(Ok(_)) = &round.sync {
                    synced = Some(Arc::clone(&model));
                }
                report(&round);
            }
            let now = Instant::now();
            let mut due = |t: Option<Instant>| {
                if let Some(t) = t {
                    let at = tokio::time::Instant::now() + t.saturating_duration_since(now);
                    next = next.min(at);
                }
            };
            due(engine.retry_at());
            due(engine.next_check());
            if engine.pending(now) && engine.retry_at().is_none() {
                due(Some(now));
            }
        }
        tokio::select! {
            r = models.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Milliseconds to two decimals, for the log: a partial sync takes a few of them, and whole
/// (truncated) milliseconds would misstate it by up to one each.
fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn report(round: &Round) {
    if let Some(c) = &round.check {
        for e in &c.errors {
            warn!(error = %e, "reading iptables back failed");
        }
    }
    match &round.sync {
        Some(Ok(r)) if r.lines > 0 || !r.jumps_fixed.is_empty() => info!(
            full = r.full,
            lines = r.lines,
            transactions = r.transactions,
            deleted = r.deleted,
            repaired = r.repaired,
            compute_ms = ms(r.compute),
            render_ms = ms(r.render),
            restore_ms = ms(r.restore),
            checks_ms = ms(r.checks),
            jumps_fixed = r.jumps_fixed.len(),
            "iptables synced"
        ),
        Some(Err(e)) => error!(error = %e, "iptables sync failed"),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::netfilter::engine::Settings;
    use crate::netfilter::fake::FakeIptables;
    use crate::netfilter::jumps::{Jump, Position};
    use crate::netfilter::metrics::EngineMetrics;
    use crate::netfilter::producer::Owner;
    use crate::netfilter::ruleset::{Ruleset, TableName};

    /// One chain and its jump; counts what it hears.
    struct Counting {
        synced: Arc<AtomicUsize>,
        repaired: Arc<AtomicUsize>,
    }

    impl Producer for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }

        fn render(&mut self, _model: &Arc<ClusterModel>) -> Ruleset {
            let mut r = Ruleset::default();
            r.tables
                .nat
                .add("TEST-CHAIN", format_args!("-s 10.0.0.1/32 -j RETURN"));
            r
        }

        fn jumps(&self) -> Vec<Jump> {
            vec![Jump::new(
                TableName::Nat,
                "PREROUTING",
                "",
                "test",
                "TEST-CHAIN",
                Position::First,
            )]
        }

        fn owner(&self) -> Owner {
            |_, c| c.starts_with("TEST-")
        }

        fn synced(&mut self, _model: &Arc<ClusterModel>, _report: &SyncReport) {
            self.synced.fetch_add(1, Ordering::SeqCst);
        }

        fn repaired(&mut self, _model: &Arc<ClusterModel>) {
            self.repaired.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Until `done` holds, for at most 5 s.
    async fn until(done: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn producers_hear_when_missing_rules_were_put_back() {
        let f = FakeIptables::new();
        let settings = Settings {
            probe_every: Duration::from_millis(20),
            verify_every: Duration::from_millis(20),
            ..Settings::default()
        };
        let engine = Engine::new(f.clone(), settings, EngineMetrics::unregistered());
        let (synced, repaired) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let producers: Vec<Box<dyn Producer>> = vec![Box::new(Counting {
            synced: synced.clone(),
            repaired: repaired.clone(),
        })];
        let mut b = crate::model::ModelBuilder::default();
        crate::source::dir::add_documents(
            &mut b,
            "node.yaml",
            "kind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.128.0.0/23}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.11}]}\n",
        );
        let model = b.finish(&crate::model::ModelScope {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            local_node: "n1".into(),
            programmed: Default::default(),
        });
        let (_tx, rx) = watch::channel(Arc::new(model));
        let health = Arc::new(Health::new(Duration::from_secs(5)));
        let task = tokio::spawn(run(
            engine,
            producers,
            rx,
            "n1".into(),
            Duration::from_millis(20),
            health,
        ));
        assert!(
            until(|| synced.load(Ordering::SeqCst) == 1).await,
            "no first sync"
        );
        // Let a few probes pass: nothing is missing, nobody hears of a repair.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(repaired.load(Ordering::SeqCst), 0);
        // A jump deleted by hand: put back by the probe, and the producers hear of it.
        f.tamper(TableName::Nat, |t| t.get_mut("PREROUTING").unwrap().clear());
        assert!(
            until(|| repaired.load(Ordering::SeqCst) >= 1).await,
            "not heard"
        );
        // The chain flushed: rewritten by a sync, and heard of again.
        let before = repaired.load(Ordering::SeqCst);
        f.tamper(TableName::Nat, |t| t.get_mut("TEST-CHAIN").unwrap().clear());
        assert!(
            until(|| repaired.load(Ordering::SeqCst) > before).await,
            "the rewritten chain not heard of"
        );
        assert_eq!(
            f.rules(TableName::Nat, "TEST-CHAIN").unwrap(),
            ["-s 10.0.0.1/32 -j RETURN"]
        );
        task.abort();
    }
}
