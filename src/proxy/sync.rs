//! The proxy's sync loop state: what was last written to the kernel, when the next full sync is
//! due, and what failed. A sync renders the whole ruleset (cheap), writes only what changed
//! since the last successful sync (or everything, on a full sync), and after a failure keeps the
//! old rules (iptables-restore commits each table as one transaction and stops at the first
//! refused one; nat, where nearly every rule is, goes first), backs off, and makes the next
//! sync full.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use super::iptables::{Iptables, IptablesError, Saved};
use super::metrics::ProxyMetrics;
use crate::model::service::{Endpoint, Protocol, ServicePort, ServicePortName, Services};
use super::render::{jumps, payload, render_cached, ProxyScope, RenderCache, Ruleset};

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a jump from a built-in chain is probed to notice a flush by someone else (a probe
/// runs the iptables tool, which reads the table: not every resync on a large table).
const FLUSH_PROBE_EVERY: Duration = Duration::from_secs(30);

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub full: bool,
    /// Rendering the ruleset and the payload.
    pub compute: Duration,
    /// iptables-restore itself.
    pub restore: Duration,
    /// Full syncs only: listing the existing chains and checking the jumps (iptables-save and
    /// one iptables -C per jump).
    pub checks: Duration,
    /// Payload lines written; 0: nothing had changed and nothing was run.
    pub lines: usize,
    pub jumps_added: Vec<String>,
    /// Jumps that iptables-save did not show verbatim and were probed with iptables -C.
    pub jumps_probed: usize,
    pub conntrack_flows_cleared: usize,
}

pub struct Proxier {
    ipt: Iptables,
    scope: ProxyScope,
    full_every: Duration,
    /// What the kernel holds, as far as we know; None: write everything next time.
    applied: Option<Ruleset>,
    /// The Services of the last successful sync (kept across failures: the UDP flows of
    /// endpoints removed since then must still be cleared).
    synced_services: Option<Services>,
    last_full: Option<Instant>,
    last_probe: Option<Instant>,
    cache: RenderCache,
    failures: u32,
    retry_at: Option<Instant>,
    pub metrics: ProxyMetrics,
}

impl Proxier {
    pub fn new(
        ipt: Iptables,
        scope: ProxyScope,
        full_every: Duration,
        metrics: ProxyMetrics,
    ) -> Proxier {
        Proxier {
            ipt,
            scope,
            full_every,
            applied: None,
            synced_services: None,
            last_full: None,
            last_probe: None,
            cache: RenderCache::default(),
            failures: 0,
            retry_at: None,
            metrics,
        }
    }

    /// The node IP or name changed: everything is re-rendered and written in full.
    pub fn set_scope(&mut self, scope: ProxyScope) {
        if scope != self.scope {
            self.scope = scope;
            self.applied = None;
        }
    }

    /// While backing off after a failure: when the next attempt may run.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether the next sync must be full: never synced, the period is over, or (probed now and
    /// then) our jump from POSTROUTING is gone, which means someone flushed the tables.
    pub fn full_due(&mut self) -> bool {
        if self.applied.is_none()
            || self
                .last_full
                .is_none_or(|t| t.elapsed() >= self.full_every)
        {
            return true;
        }
        if self
            .last_probe
            .is_some_and(|t| t.elapsed() < FLUSH_PROBE_EVERY)
        {
            return false;
        }
        self.last_probe = Some(Instant::now());
        let flushed = jumps(&self.scope)
            .iter()
            .filter(|j| j.chain == "POSTROUTING")
            .any(|j| !self.ipt.jump_exists(j));
        if flushed {
            warn!("a jump into rsdn's chains is gone (tables flushed?); full sync");
        }
        flushed
    }

    /// Whether `services` differ from what was last written.
    pub fn changed(&self, services: &Services) -> bool {
        self.applied.is_none() || self.synced_services.as_ref() != Some(services)
    }

    /// Brings the kernel to the ruleset of `services`. Blocking (runs iptables tools).
    pub fn sync(
        &mut self,
        services: &Services,
        force_full: bool,
    ) -> Result<SyncReport, IptablesError> {
        let full = force_full || self.applied.is_none();
        let mut report = SyncReport {
            full,
            ..Default::default()
        };
        // A full sync also deletes stale chains, which needs to know what exists (kernel time).
        let listed = Instant::now();
        let saved = if full {
            match self.ipt.save(&["filter", "nat"]) {
                Ok(saved) => saved,
                Err(e) => {
                    self.fail(full);
                    return Err(e);
                }
            }
        } else {
            Saved::default()
        };
        let listing = listed.elapsed();
        let started = Instant::now();
        let (ruleset, stats) = render_cached(&self.scope, services, &mut self.cache);
        let before = if full { None } else { self.applied.as_ref() };
        let text = payload(before, &ruleset, &saved.chains);
        report.compute = started.elapsed();
        report.lines = text.lines().count();
        let restore_started = Instant::now();
        let result = if text.is_empty() {
            Ok(())
        } else {
            self.ipt.restore(&text)
        };
        if let Err(e) = result {
            self.fail(full);
            return Err(e);
        }
        report.restore = restore_started.elapsed();
        let checks_started = Instant::now();
        if full {
            match self.ipt.ensure_jumps(&jumps(&self.scope), &saved) {
                Ok((added, probed)) => {
                    report.jumps_added = added;
                    report.jumps_probed = probed;
                }
                Err(e) => {
                    self.fail(full);
                    return Err(e);
                }
            }
        }
        report.checks = checks_started.elapsed() + listing;
        if let Some(old) = &self.synced_services {
            report.conntrack_flows_cleared = clear_stale_udp(old, services);
        }
        self.metrics
            .synced(&report, &ruleset, &stats, SystemTime::now());
        self.applied = Some(ruleset);
        self.synced_services = Some(services.clone());
        self.failures = 0;
        self.retry_at = None;
        if full {
            self.last_full = Some(Instant::now());
        }
        Ok(report)
    }

    fn fail(&mut self, full: bool) {
        self.metrics.restore_failed(full);
        // The old rules are still in place, but what the kernel holds is no longer known for
        // sure: the next sync writes everything.
        self.applied = None;
        let delay = BACKOFF_FIRST
            .saturating_mul(1 << self.failures.min(5))
            .min(BACKOFF_MAX);
        self.failures += 1;
        self.retry_at = Some(Instant::now() + delay);
        warn!(
            retry_in_ms = delay.as_millis() as u64,
            "iptables sync failed; keeping the previous rules"
        );
    }
}

/// The addresses a Service port is reached at, for conntrack matching.
fn service_ips(p: &ServicePort) -> Vec<Ipv4Addr> {
    let mut ips = vec![p.cluster_ip];
    ips.extend(&p.external_ips);
    ips.extend(&p.load_balancer_ips);
    ips
}

/// UDP has no connection to end: a client keeps sending to a dead endpoint as long as its
/// conntrack entry lives. For every UDP Service port whose endpoint went away, delete the flows
/// DNATed to it, as kube-proxy does. Returns how many flows were deleted.
fn clear_stale_udp(old: &Services, new: &Services) -> usize {
    let mut deleted = 0;
    for (spn, port) in old
        .ports
        .iter()
        .filter(|(s, _)| s.protocol == Protocol::Udp)
    {
        let still = new.ports.contains_key(spn);
        if still && old.endpoints.get(spn) == new.endpoints.get(spn) {
            continue;
        }
        let before = usable(old.endpoints.get(spn));
        let after: BTreeSet<Ipv4Addr> = if still {
            usable(new.endpoints.get(spn))
        } else {
            BTreeSet::new()
        };
        for gone in before.difference(&after) {
            for ip in service_ips(port) {
                deleted += conntrack_delete(
                    spn,
                    &[
                        "--orig-dst",
                        &ip.to_string(),
                        "--dst-nat",
                        &gone.to_string(),
                    ],
                );
            }
            if let Some(np) = port.node_port {
                deleted += conntrack_delete(
                    spn,
                    &[
                        "--orig-port-dst",
                        &np.to_string(),
                        "--dst-nat",
                        &gone.to_string(),
                    ],
                );
            }
        }
    }
    deleted
}

fn usable(eps: Option<&Vec<Endpoint>>) -> BTreeSet<Ipv4Addr> {
    eps.into_iter()
        .flatten()
        .filter(|e| e.ready || (e.serving && e.terminating))
        .map(|e| e.ip)
        .collect()
}

/// `conntrack -D -p udp ...`; returns the number of flows deleted (the tool reports it on
/// stderr, and exits 1 when there were none).
fn conntrack_delete(spn: &ServicePortName, filter: &[&str]) -> usize {
    let out = Command::new("conntrack")
        .args(["-D", "-p", "udp"])
        .args(filter)
        .output();
    match out {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr);
            let n = text
                .split_whitespace()
                .zip(text.split_whitespace().skip(1))
                .find(|(_, w)| *w == "flow")
                .and_then(|(n, _)| n.parse().ok())
                .unwrap_or(0);
            if n > 0 {
                info!(service = %spn, flows = n, filter = %filter.join(" "), "cleared stale UDP conntrack entries");
            } else {
                debug!(service = %spn, filter = %filter.join(" "), "no stale UDP conntrack entries");
            }
            n
        }
        Err(e) => {
            warn!(error = %e, "cannot run conntrack; stale UDP flows stay until they time out");
            0
        }
    }
}
