//! Health of the daemon as the probes and operators see it. `/livez` tells whether the
//! process is alive: its loops keep coming round (none is stuck, none has ended), whatever the
//! datapath's state; a failure there is one a restart cures. `/healthz` tells whether the
//! datapath is being kept right: the loops are alive, the cluster source delivered, the
//! overlay passes run and go through, the iptables rules are in the kernel (changes and
//! repairs of drift included), and no repair keeps failing. `/readyz` tells whether the node
//! network was programmed (the CNI config written). All answer JSON: a check per part, each
//! with what it found, including what was repaired lately (a pod put back on tun0, a flushed
//! table restored, chains rewritten) and conflicts between Nodes, so an operator sees damage
//! that was healed too. docs/operations.md says why liveness and health differ.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// A change (or a repair) not in the kernel after this long makes the daemon unhealthy
/// (kube-proxy's healthz allows two sync periods of 30 s). The same bound applies to overlay
/// passes that keep failing.
pub const STALE: Duration = Duration::from_secs(60);

/// A sync of iptables that runs longer than this is taken as hung (`/livez` fails). A full
/// sync of a 10000-Service cluster on nf_tables takes minutes (docs/benchmarks.md: 280 s),
/// so the bound is far above that.
pub const BUSY_LIMIT: Duration = Duration::from_secs(15 * 60);

/// The daemon's long-running parts whose life `/livez` follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Loop {
    /// The cluster source: followed only once it stops (its watches retry by themselves).
    Source,
    /// The overlay's reconcile loop: comes round every resync at the latest.
    Overlay,
    /// The netfilter engine's task: comes round every resync at the latest, and is busy while
    /// a sync runs.
    Iptables,
}

impl Loop {
    fn name(self) -> &'static str {
        match self {
            Loop::Source => "source",
            Loop::Overlay => "overlay",
            Loop::Iptables => "iptables",
        }
    }
}

/// What a loop last said of itself.
#[derive(Debug, Clone)]
struct Beat {
    /// It came round (or finished a busy step).
    last: Instant,
    /// In a step that may take long (an iptables sync), since then.
    busy_since: Option<Instant>,
    /// It ended, and why: only a restart brings it back.
    stopped: Option<String>,
}

/// A repair, as reported: when, and what.
#[derive(Debug, Clone)]
struct Repair {
    at: Instant,
    what: String,
}

#[derive(Debug, Default)]
struct State {
    source_ready: bool,
    /// Last overlay pass that ran to its end (whether or not the kernel refused something).
    overlay_done: Option<Instant>,
    /// Since when overlay passes fail (an error, or requests the kernel refused), and why.
    overlay_failing: Option<(Instant, String)>,
    /// Why nothing is programmed yet (no Node object, no podCIDR).
    waiting: Option<String>,
    network_ready: bool,
    pod_ports: usize,
    pods_repaired: Option<Repair>,
    /// The oldest change the proxy has seen but not yet written.
    iptables_pending: Option<Instant>,
    iptables_error: Option<String>,
    /// Chains found drifted and not yet rewritten: since when, how many.
    iptables_drift: Option<(Instant, usize)>,
    /// The last repair of each kind (jumps put back, chains rewritten).
    iptables_repaired: std::collections::BTreeMap<&'static str, Repair>,
    conflicts: Vec<String>,
    /// Standing remarks on the node's setup, by subject (`setup_note`).
    setup_notes: std::collections::BTreeMap<&'static str, String>,
    loops: BTreeMap<Loop, Beat>,
    /// Why the node takes no new connections (being deleted, tainted for deletion).
    leaving: Option<String>,
}

/// What an overlay pass reports.
#[derive(Debug, Clone, Default)]
pub struct OverlayPass {
    pub waiting: Option<String>,
    /// The node network (and the conflist) is in place.
    pub ready: bool,
    /// Requests the kernel refused, as one line (None: all went through).
    pub failed: Option<String>,
    pub pod_ports: usize,
    /// Pod veths put back on tun0 (or whose hairpin mode or MTU was put right) by this pass.
    pub pods_repaired: usize,
}

/// Shared by the loops (which report) and the HTTP server (which asks).
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// The loops come round every resync; a last pass (or heartbeat) older than this is stale.
    overlay_stale: Duration,
    state: Mutex<State>,
}

/// One part's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// The last repair of this part, if any: how long ago, and what.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<String>,
}

/// What a probe gets: the status code's meaning and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub ok: bool,
    pub checks: Vec<Check>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Answer {
    pub fn body(&self) -> String {
        serde_json::to_string_pretty(self).expect("an answer serializes") + "\n"
    }
}

fn ago(now: Instant, t: Instant) -> String {
    format!("{:.1}s ago", now.saturating_duration_since(t).as_secs_f64())
}

fn repaired(now: Instant, r: &Option<Repair>) -> Option<String> {
    r.as_ref()
        .map(|r| format!("{}: {}", ago(now, r.at), r.what))
}

impl Health {
    pub fn new(resync: Duration) -> Health {
        Health {
            started: Instant::now(),
            overlay_stale: (resync * 3).max(Duration::from_secs(30)),
            state: Mutex::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn source_ready(&self) {
        self.with(|s| s.source_ready = true);
    }

    /// What loop `l` said last, updated by `f` (a loop is followed from its first word).
    fn beat(&self, l: Loop, now: Instant, f: impl FnOnce(&mut Beat)) {
        self.with(|s| {
            f(s.loops.entry(l).or_insert(Beat {
                last: now,
                busy_since: None,
                stopped: None,
            }))
        });
    }

    /// Loop `l` came round (or finished its busy step): it is alive.
    pub fn alive(&self, l: Loop, now: Instant) {
        self.beat(l, now, |b| {
            b.last = now;
            b.busy_since = None;
        });
    }

    /// Loop `l` enters a step that may take long (up to `BUSY_LIMIT`).
    pub fn busy(&self, l: Loop, now: Instant) {
        self.beat(l, now, |b| b.busy_since = Some(now));
    }

    /// Loop `l` ended for good.
    pub fn stopped(&self, l: Loop, why: String, now: Instant) {
        self.beat(l, now, |b| b.stopped = Some(why));
    }

    /// The loops' check: each alive, coming round in time, not stuck in a step.
    fn loops(&self, s: &State, now: Instant) -> Check {
        let since = |t: Instant| now.saturating_duration_since(t);
        let mut ok = true;
        let mut found = Vec::new();
        for (l, b) in &s.loops {
            let (alive, what) = match (&b.stopped, b.busy_since) {
                (Some(why), _) => (false, format!("stopped: {why}")),
                (None, Some(t)) => (
                    since(t) <= BUSY_LIMIT,
                    format!(
                        "busy for {:.1}s (limit {}s)",
                        since(t).as_secs_f64(),
                        BUSY_LIMIT.as_secs()
                    ),
                ),
                (None, None) => (
                    since(b.last) <= self.overlay_stale,
                    format!(
                        "came round {} (limit {}s)",
                        ago(now, b.last),
                        self.overlay_stale.as_secs()
                    ),
                ),
            };
            ok &= alive;
            found.push(format!("{}: {what}", l.name()));
        }
        Check {
            name: "loops",
            ok,
            detail: if found.is_empty() {
                "none started yet".into()
            } else {
                found.join("; ")
            },
            repaired: None,
        }
    }

    /// `/livez`: the process is alive and its loops are not stuck. Nothing about the datapath:
    /// a repair that keeps failing is `/healthz`'s business, and a restart would not cure it.
    pub fn livez(&self, now: Instant) -> Answer {
        self.with(|s| {
            let loops = self.loops(s, now);
            Answer {
                ok: loops.ok,
                checks: vec![loops],
                notes: vec![],
            }
        })
    }

    /// The local node is going away (why) or not (None), from its Node object. Returns
    /// whether that changed.
    pub fn node_leaving(&self, why: Option<String>) -> bool {
        self.with(|s| std::mem::replace(&mut s.leaving, why.clone()) != why)
    }

    /// Nodes left out because their podCIDR overlaps another's (one line each).
    pub fn conflicts(&self, conflicts: Vec<String>) {
        self.with(|s| s.conflicts = conflicts);
    }

    /// An overlay pass ran to its end.
    pub fn overlay_passed(&self, p: OverlayPass, now: Instant) {
        self.with(|s| {
            s.overlay_done = Some(now);
            s.waiting = p.waiting;
            s.network_ready |= p.ready;
            s.pod_ports = p.pod_ports;
            match p.failed {
                Some(why) => {
                    let since = s.overlay_failing.as_ref().map_or(now, |(t, _)| *t);
                    s.overlay_failing = Some((since, why));
                }
                None => s.overlay_failing = None,
            }
            if p.pods_repaired > 0 {
                s.pods_repaired = Some(Repair {
                    at: now,
                    what: format!("{} pod veth(s) put back on tun0", p.pods_repaired),
                });
            }
        });
    }

    /// An overlay pass failed before its end.
    pub fn overlay_failed(&self, error: String, now: Instant) {
        self.with(|s| {
            let since = s.overlay_failing.as_ref().map_or(now, |(t, _)| *t);
            s.overlay_failing = Some((since, error));
        });
    }

    /// The engine saw a change (or drift) it has not yet written.
    pub fn iptables_pending(&self, now: Instant) {
        self.with(|s| {
            s.iptables_pending.get_or_insert(now);
        });
    }

    pub fn iptables_synced(&self) {
        self.with(|s| {
            s.iptables_pending = None;
            s.iptables_error = None;
        });
    }

    pub fn iptables_failed(&self, error: String, now: Instant) {
        self.with(|s| {
            s.iptables_pending.get_or_insert(now);
            s.iptables_error = Some(error);
        });
    }

    /// Drift found and not yet rewritten (None: none), after a round of the engine.
    pub fn iptables_drift(&self, drift: Option<(Instant, usize)>) {
        self.with(|s| {
            s.iptables_drift = drift;
            if let Some((since, _)) = drift {
                // Drift is a change the kernel does not hold yet.
                let pending = s.iptables_pending.get_or_insert(since);
                *pending = (*pending).min(since);
            }
        });
    }

    /// Something of the rules was put back: `kind` keeps the last repair of each kind (jumps
    /// after a flush, drifted chains) in view.
    pub fn iptables_repaired(&self, kind: &'static str, what: String, now: Instant) {
        self.with(|s| {
            s.iptables_repaired.insert(kind, Repair { at: now, what });
        });
    }

    /// A standing remark on the node's setup about `subject` (None withdraws it), shown in
    /// `/healthz`'s notes without failing it: a restart would not cure it (a CNI plugin the
    /// conflist chains is not installed, for one).
    pub fn setup_note(&self, subject: &'static str, note: Option<String>) {
        self.with(|s| match note {
            Some(n) => s.setup_notes.insert(subject, n),
            None => s.setup_notes.remove(subject),
        });
    }

    /// `/healthz`: the daemon keeps the kernel in line with the cluster (`datapath`), and the
    /// node is not going away: a node being deleted, or tainted for deletion by the cluster
    /// autoscaler, answers 503 so that load balancers send it no new connections, as
    /// kube-proxy's does (KEP-3836).
    pub fn healthz(&self, now: Instant) -> Answer {
        self.with(|s| {
            let mut checks = self.datapath(s, now);
            checks.push(Check {
                name: "eligible",
                ok: s.leaving.is_none(),
                detail: match &s.leaving {
                    None => "the node takes new connections".into(),
                    Some(why) => {
                        format!("{why}: load balancers are told to stop sending new connections")
                    }
                },
                repaired: None,
            });
            Answer {
                ok: checks.iter().all(|c| c.ok),
                checks,
                notes: s
                    .waiting
                    .iter()
                    .chain(s.setup_notes.values())
                    .cloned()
                    .collect(),
            }
        })
    }

    /// The proxy's health without the node's state: what kube-proxy's health check node ports
    /// report as `serviceProxyHealthy` (its `IsHealthy`, which ignores the node).
    pub fn proxy_healthy(&self, now: Instant) -> bool {
        self.with(|s| self.datapath(s, now).iter().all(|c| c.ok))
    }

    /// The checks of `/healthz` but the node's: the loops are alive and keep the kernel in
    /// line with the cluster; a repair that keeps failing for `STALE` is unhealthy.
    fn datapath(&self, s: &State, now: Instant) -> Vec<Check> {
        let mut checks = vec![self.loops(s, now)];
        checks.push(Check {
            name: "source",
            ok: s.source_ready,
            detail: if s.source_ready {
                "initial state received".into()
            } else {
                format!(
                    "initial lists not received after {}s",
                    now.saturating_duration_since(self.started).as_secs()
                )
            },
            repaired: None,
        });
        let (ok, detail) = match (s.overlay_done, &s.overlay_failing) {
            (_, Some((since, why))) if now.saturating_duration_since(*since) > STALE => (
                false,
                format!(
                    "passes failing for {}s (limit {}s): {why}",
                    now.saturating_duration_since(*since).as_secs(),
                    STALE.as_secs()
                ),
            ),
            (Some(t), _) if now.saturating_duration_since(t) > self.overlay_stale => (
                false,
                format!(
                    "last pass {} (limit {}s){}",
                    ago(now, t),
                    self.overlay_stale.as_secs(),
                    s.overlay_failing
                        .as_ref()
                        .map(|(_, e)| format!(": {e}"))
                        .unwrap_or_default()
                ),
            ),
            (Some(t), Some((since, why))) => (
                true,
                format!(
                    "last pass {}; failing for {}s, retrying: {why}",
                    ago(now, t),
                    now.saturating_duration_since(*since).as_secs()
                ),
            ),
            (Some(t), None) => (
                true,
                format!("last pass {}, all of it applied", ago(now, t)),
            ),
            (None, failing) => (
                !s.source_ready,
                format!(
                    "no pass yet{}",
                    failing
                        .as_ref()
                        .map(|(_, e)| format!(": {e}"))
                        .unwrap_or_default()
                ),
            ),
        };
        checks.push(Check {
            name: "overlay",
            ok,
            detail,
            repaired: None,
        });
        checks.push(Check {
            name: "pods",
            ok: true,
            detail: format!("{} pod veth(s) on tun0", s.pod_ports),
            repaired: repaired(now, &s.pods_repaired),
        });
        let drift = s
            .iptables_drift
            .map(|(t, n)| format!("; {n} drifted chain(s) found {} to rewrite", ago(now, t)))
            .unwrap_or_default();
        let error = s
            .iptables_error
            .as_ref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let (ok, detail) = match s.iptables_pending {
            Some(t) if now.saturating_duration_since(t) > STALE => (
                false,
                format!(
                    "a change has waited {}s for iptables (limit {}s){drift}{error}",
                    now.saturating_duration_since(t).as_secs(),
                    STALE.as_secs()
                ),
            ),
            Some(t) => (
                true,
                format!(
                    "sync pending for {:.1}s{drift}{error}",
                    now.saturating_duration_since(t).as_secs_f64()
                ),
            ),
            None => (true, format!("rules up to date{drift}")),
        };
        checks.push(Check {
            name: "iptables",
            ok,
            detail,
            repaired: (!s.iptables_repaired.is_empty()).then(|| {
                s.iptables_repaired
                    .values()
                    .map(|r| format!("{}: {}", ago(now, r.at), r.what))
                    .collect::<Vec<_>>()
                    .join("; ")
            }),
        });
        checks.push(Check {
            name: "nodes",
            ok: true,
            detail: if s.conflicts.is_empty() {
                "no podCIDR conflicts".into()
            } else {
                format!(
                    "{} Node(s) left out for podCIDR conflicts: {}",
                    s.conflicts.len(),
                    s.conflicts.join("; ")
                )
            },
            repaired: None,
        });
        checks
    }

    /// `/readyz`: the initial lists are in and the node network is programmed.
    pub fn readyz(&self) -> Answer {
        self.with(|s| {
            let network = Check {
                name: "network",
                ok: s.network_ready,
                detail: match (&s.waiting, s.network_ready) {
                    (_, true) => "node network programmed, CNI config written".into(),
                    (Some(w), false) => w.clone(),
                    (None, false) => "not programmed yet".into(),
                },
                repaired: None,
            };
            let source = Check {
                name: "source",
                ok: s.source_ready,
                detail: if s.source_ready {
                    "initial state received".into()
                } else {
                    "waiting for the initial lists".into()
                },
                repaired: None,
            };
            Answer {
                ok: network.ok && source.ok,
                checks: vec![source, network],
                notes: vec![],
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<'a>(a: &'a Answer, name: &str) -> &'a Check {
        a.checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn unhealthy_until_the_source_is_ready_then_while_stale() {
        let h = Health::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let a = h.healthz(t0);
        assert!(
            !a.ok && check(&a, "source").detail.contains("initial lists"),
            "{a:?}"
        );
        assert!(!h.readyz().ok);
        h.source_ready();
        let a = h.healthz(t0);
        assert!(
            !a.ok && check(&a, "overlay").detail.contains("no pass"),
            "{a:?}"
        );
        let waiting = OverlayPass {
            waiting: Some("waiting for Node/a".into()),
            ..Default::default()
        };
        h.overlay_passed(waiting, t0);
        let a = h.healthz(t0);
        assert!(a.ok && a.notes == ["waiting for Node/a"], "{a:?}");
        let r = h.readyz();
        assert!(!r.ok && r.body().contains("waiting for Node/a"), "{r:?}");
        h.overlay_passed(
            OverlayPass {
                ready: true,
                ..Default::default()
            },
            t0,
        );
        assert!(h.readyz().ok);
        // The overlay stops passing: stale after 30 s, with the last error.
        h.overlay_failed("netlink: EPERM".into(), t0);
        let a = h.healthz(t0 + Duration::from_secs(31));
        assert!(
            !a.ok && check(&a, "overlay").detail.contains("netlink: EPERM"),
            "{a:?}"
        );
        // Readiness does not flap back once the network was programmed.
        assert!(h.readyz().ok);
    }

    #[test]
    fn an_overlay_repair_that_keeps_failing_is_unhealthy() {
        // Passes keep running (fresh), but the kernel keeps refusing a request.
        let h = Health::new(Duration::from_secs(5));
        h.source_ready();
        let t0 = Instant::now();
        let failing = |t| {
            h.overlay_passed(
                OverlayPass {
                    failed: Some("route replace 10.128.4.0/23 ...: EINVAL".into()),
                    ..Default::default()
                },
                t,
            )
        };
        failing(t0);
        failing(t0 + Duration::from_secs(30));
        let a = h.healthz(t0 + Duration::from_secs(30));
        assert!(
            a.ok && check(&a, "overlay").detail.contains("retrying"),
            "{a:?}"
        );
        failing(t0 + Duration::from_secs(61));
        let a = h.healthz(t0 + Duration::from_secs(61));
        assert!(
            !a.ok && check(&a, "overlay").detail.contains("EINVAL"),
            "{a:?}"
        );
        // It goes through: healthy again at once.
        h.overlay_passed(OverlayPass::default(), t0 + Duration::from_secs(62));
        assert!(h.healthz(t0 + Duration::from_secs(62)).ok);
    }

    #[test]
    fn repairs_show_and_drift_not_rewritten_in_time_is_unhealthy() {
        let h = Health::new(Duration::from_secs(100));
        h.source_ready();
        let t0 = Instant::now();
        h.overlay_passed(
            OverlayPass {
                pod_ports: 4,
                pods_repaired: 4,
                ..Default::default()
            },
            t0,
        );
        h.iptables_repaired("jumps", "jumps put back in filter/FORWARD".into(), t0);
        h.iptables_repaired("chains", "2 drifted chain(s) rewritten".into(), t0);
        let a = h.healthz(t0 + Duration::from_secs(2));
        assert!(a.ok);
        assert_eq!(
            check(&a, "pods").repaired.as_deref(),
            Some("2.0s ago: 4 pod veth(s) put back on tun0")
        );
        assert!(
            a.body().contains("jumps put back in filter/FORWARD"),
            "{}",
            a.body()
        );
        // Drift found and its rewrite keeps failing.
        h.iptables_drift(Some((t0, 2)));
        h.iptables_failed(
            "iptables-restore: line 7 failed".into(),
            t0 + Duration::from_secs(1),
        );
        let a = h.healthz(t0 + Duration::from_secs(10));
        assert!(
            a.ok && check(&a, "iptables").detail.contains("2 drifted chain(s)"),
            "{a:?}"
        );
        let a = h.healthz(t0 + STALE + Duration::from_secs(1));
        assert!(
            !a.ok && check(&a, "iptables").detail.contains("line 7 failed"),
            "{a:?}"
        );
        h.iptables_drift(None);
        h.iptables_synced();
        assert!(h.healthz(t0 + STALE + Duration::from_secs(2)).ok);
    }

    #[test]
    fn conflicts_show_without_making_the_node_unhealthy() {
        let h = Health::new(Duration::from_secs(5));
        h.source_ready();
        h.overlay_passed(OverlayPass::default(), Instant::now());
        h.conflicts(vec![
            "Node/zzz-new: podCIDR 10.128.2.0/23 overlaps node2's".into()
        ]);
        let a = h.healthz(Instant::now());
        assert!(a.ok);
        assert!(check(&a, "nodes").detail.contains("Node/zzz-new"), "{a:?}");
    }

    #[test]
    fn a_datapath_fault_is_unhealthy_but_alive() {
        let h = Health::new(Duration::from_secs(5));
        let t0 = Instant::now();
        // Waiting for the API server: not healthy, but a restart would not help.
        assert!(!h.healthz(t0).ok);
        assert!(h.livez(t0).ok, "{:?}", h.livez(t0));
        h.source_ready();
        let t = |s| t0 + Duration::from_secs(s);
        // Both loops come round every second; the kernel refuses an overlay request and
        // every restore, for minutes.
        for sec in 0..=120 {
            h.alive(Loop::Overlay, t(sec));
            h.alive(Loop::Iptables, t(sec));
            h.overlay_passed(
                OverlayPass {
                    failed: Some("route replace ...: EINVAL".into()),
                    ..Default::default()
                },
                t(sec),
            );
            h.iptables_failed("iptables-restore: line 3 failed".into(), t(sec));
        }
        let (healthz, livez) = (h.healthz(t(120)), h.livez(t(120)));
        assert!(!healthz.ok, "{healthz:?}");
        assert!(livez.ok, "{livez:?}");
        assert_eq!(
            check(&livez, "loops").detail,
            "overlay: came round 0.0s ago (limit 30s); iptables: came round 0.0s ago (limit 30s)"
        );
    }

    #[test]
    fn a_loop_that_stops_coming_round_or_ends_is_dead() {
        let h = Health::new(Duration::from_secs(5));
        h.source_ready();
        let t0 = Instant::now();
        let t = |s| t0 + Duration::from_secs(s);
        h.alive(Loop::Overlay, t0);
        h.alive(Loop::Iptables, t0);
        assert!(h.livez(t(30)).ok);
        // The overlay loop hangs (a netlink request never answered): 3 resyncs, at least 30 s.
        h.alive(Loop::Iptables, t(31));
        let a = h.livez(t(31));
        assert!(
            !a.ok
                && check(&a, "loops")
                    .detail
                    .contains("overlay: came round 31.0s ago"),
            "{a:?}"
        );
        assert!(!h.healthz(t(31)).ok, "what is not alive is not healthy");
        h.alive(Loop::Overlay, t(32));
        assert!(h.livez(t(32)).ok);
        // The iptables task panics: dead at once.
        h.stopped(Loop::Iptables, "the sync panicked".into(), t(33));
        let a = h.livez(t(33));
        assert!(
            !a.ok
                && check(&a, "loops")
                    .detail
                    .contains("iptables: stopped: the sync panicked"),
            "{a:?}"
        );
    }

    #[test]
    fn a_long_sync_is_busy_not_stuck_until_the_limit() {
        let h = Health::new(Duration::from_secs(5));
        let t0 = Instant::now();
        h.alive(Loop::Iptables, t0);
        // A first full sync of a huge table on nf_tables: minutes.
        h.busy(Loop::Iptables, t0);
        assert!(h.livez(t0 + Duration::from_secs(300)).ok);
        let a = h.livez(t0 + BUSY_LIMIT + Duration::from_secs(1));
        assert!(
            !a.ok
                && check(&a, "loops")
                    .detail
                    .contains("iptables: busy for 901.0s"),
            "{a:?}"
        );
        // It returns: alive again.
        h.alive(Loop::Iptables, t0 + BUSY_LIMIT + Duration::from_secs(2));
        assert!(h.livez(t0 + BUSY_LIMIT + Duration::from_secs(2)).ok);
    }

    #[test]
    fn a_stopped_source_is_dead() {
        let h = Health::new(Duration::from_secs(5));
        let t0 = Instant::now();
        h.stopped(
            Loop::Source,
            "the cluster source stopped publishing".into(),
            t0,
        );
        let a = h.livez(t0);
        assert!(
            !a.ok && check(&a, "loops").detail.contains("source: stopped"),
            "{a:?}"
        );
    }

    #[test]
    fn a_node_going_away_fails_healthz_only() {
        let h = Health::new(Duration::from_secs(5));
        h.source_ready();
        let t0 = Instant::now();
        h.alive(Loop::Overlay, t0);
        h.overlay_passed(OverlayPass::default(), t0);
        assert!(h.healthz(t0).ok);
        let why = "the Node is tainted ToBeDeletedByClusterAutoscaler";
        assert!(h.node_leaving(Some(why.into())), "a change");
        assert!(!h.node_leaving(Some(why.into())), "no change");
        let a = h.healthz(t0);
        assert!(!a.ok, "{a:?}");
        assert_eq!(
            check(&a, "eligible").detail,
            format!("{why}: load balancers are told to stop sending new connections")
        );
        // Alive, and the proxy itself healthy: the health check node ports (kube-proxy's
        // serviceProxyHealthy) and the livenessProbe are not the node's business.
        assert!(h.livez(t0).ok);
        assert!(h.proxy_healthy(t0));
        assert!(h.node_leaving(None));
        assert!(h.healthz(t0).ok);
    }
}
