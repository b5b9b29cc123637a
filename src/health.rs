//! Health of the daemon as the probes and operators see it: `/healthz` is 200 while the overlay
//! and proxy loops keep succeeding, `/readyz` is 200 once the node network is programmed.
//! Every answer has a body that says what is (not) fine.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A proxy change not in the kernel after this long makes the daemon unhealthy (kube-proxy's
/// healthz allows two sync periods of 30 s).
pub const PROXY_STALE: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct State {
    source_ready: bool,
    overlay_ok: Option<Instant>,
    overlay_error: Option<String>,
    /// Why nothing is programmed yet (no Node object, no podCIDR).
    waiting: Option<String>,
    network_ready: bool,
    /// The oldest change the proxy has seen but not yet written.
    proxy_pending_since: Option<Instant>,
    proxy_error: Option<String>,
    /// Chains found drifted and not yet rewritten: since when, how many.
    iptables_drift: Option<(Instant, usize)>,
}

/// Shared by the loops (which report) and the HTTP server (which asks).
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// The overlay loop passes every resync; a last success older than this is stale.
    overlay_stale: Duration,
    state: Mutex<State>,
}

/// What a probe gets: the status code's meaning and a body of one line per fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub ok: bool,
    pub body: String,
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

    /// An overlay pass finished: `waiting` says why nothing was programmed, `ready` whether
    /// the node network (and the conflist) is in place.
    pub fn overlay_passed(&self, waiting: Option<String>, ready: bool) {
        self.with(|s| {
            s.overlay_ok = Some(Instant::now());
            s.overlay_error = None;
            s.waiting = waiting;
            s.network_ready |= ready;
        });
    }

    pub fn overlay_failed(&self, error: String) {
        self.with(|s| s.overlay_error = Some(error));
    }

    /// The proxy saw a change it has not yet written.
    pub fn proxy_pending(&self) {
        self.with(|s| {
            s.proxy_pending_since.get_or_insert_with(Instant::now);
        });
    }

    pub fn proxy_synced(&self) {
        self.with(|s| {
            s.proxy_pending_since = None;
            s.proxy_error = None;
        });
    }

    /// The netfilter engine's state after a round: drift found and not yet rewritten.
    pub fn netfilter_status(&self, status: crate::netfilter::engine::Status) {
        self.with(|s| s.iptables_drift = status.drift);
    }

    pub fn proxy_failed(&self, error: String) {
        self.with(|s| {
            s.proxy_pending_since.get_or_insert_with(Instant::now);
            s.proxy_error = Some(error);
        });
    }

    /// `/healthz`: the loops are alive and keeping the kernel in line with the cluster.
    pub fn healthz(&self, now: Instant) -> Answer {
        self.with(|s| {
            let mut stale = Vec::new();
            let mut fine = Vec::new();
            if !s.source_ready {
                stale.push(format!(
                    "cluster source: initial lists not received after {}s",
                    now.duration_since(self.started).as_secs()
                ));
            }
            match s.overlay_ok {
                Some(t) if now.duration_since(t) <= self.overlay_stale => fine.push(format!(
                    "overlay: last successful pass {:.1}s ago",
                    now.duration_since(t).as_secs_f64()
                )),
                Some(t) => stale.push(format!(
                    "overlay: last successful pass {}s ago (limit {}s){}",
                    now.duration_since(t).as_secs(),
                    self.overlay_stale.as_secs(),
                    s.overlay_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
                None if s.source_ready => stale.push(format!(
                    "overlay: no successful pass yet{}",
                    s.overlay_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
                None => {}
            }
            match s.proxy_pending_since {
                Some(t) if now.duration_since(t) > PROXY_STALE => stale.push(format!(
                    "proxy: a change has waited {}s for iptables (limit {}s){}",
                    now.duration_since(t).as_secs(),
                    PROXY_STALE.as_secs(),
                    s.proxy_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
                Some(t) => fine.push(format!(
                    "proxy: sync pending for {:.1}s",
                    now.duration_since(t).as_secs_f64()
                )),
                None => fine.push("proxy: rules up to date".into()),
            }
            if let Some(w) = &s.waiting {
                fine.push(format!("note: {w}"));
            }
            answer(stale, fine)
        })
    }

    /// `/readyz`: the initial lists are in and the node network is programmed.
    pub fn readyz(&self) -> Answer {
        self.with(|s| {
            let mut not = Vec::new();
            if !s.source_ready {
                not.push("cluster source: waiting for the initial lists".to_string());
            }
            if !s.network_ready {
                not.push(match &s.waiting {
                    Some(w) => format!("node network: {w}"),
                    None => "node network: not programmed yet".into(),
                });
            }
            answer(
                not,
                vec!["ready: node network programmed, CNI config written".into()],
            )
        })
    }
}

fn answer(bad: Vec<String>, good: Vec<String>) -> Answer {
    let ok = bad.is_empty();
    let lines = if ok { good } else { bad };
    Answer {
        ok,
        body: lines.join("\n") + "\n",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_until_the_source_is_ready_then_while_stale() {
        let h = Health::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let a = h.healthz(t0);
        assert!(!a.ok && a.body.contains("initial lists"), "{a:?}");
        assert!(!h.readyz().ok);
        h.source_ready();
        assert!(h
            .healthz(Instant::now())
            .body
            .contains("no successful pass"));
        h.overlay_passed(Some("waiting for Node/a".into()), false);
        let a = h.healthz(Instant::now());
        assert!(a.ok && a.body.contains("waiting for Node/a"), "{a:?}");
        let r = h.readyz();
        assert!(!r.ok && r.body.contains("waiting for Node/a"), "{r:?}");
        h.overlay_passed(None, true);
        assert!(h.readyz().ok);

        // The overlay stops passing: stale after 30 s, with the last error.
        h.overlay_failed("netlink: EPERM".into());
        let later = Instant::now() + Duration::from_secs(31);
        let a = h.healthz(later);
        assert!(!a.ok && a.body.contains("netlink: EPERM"), "{a:?}");
        // Readiness does not flap back once the network was programmed.
        assert!(h.readyz().ok);
    }

    #[test]
    fn a_pending_proxy_change_is_stale_after_a_minute() {
        // A long resync keeps the overlay fresh throughout: only the proxy goes stale.
        let h = Health::new(Duration::from_secs(100));
        h.source_ready();
        h.overlay_passed(None, true);
        h.proxy_failed("iptables-restore: line 7 failed".into());
        let a = h.healthz(Instant::now() + Duration::from_secs(2));
        assert!(a.ok && a.body.contains("sync pending"), "{a:?}");
        let late = Instant::now() + PROXY_STALE + Duration::from_secs(1);
        let a = h.healthz(late);
        assert!(!a.ok && a.body.contains("line 7 failed"), "{a:?}");
        h.proxy_synced();
        assert!(h.healthz(Instant::now()).ok);
    }
}
