//! The engine's policy: when to write what, and what to do when the kernel refuses or drifts.
//!
//! - A sync writes one `iptables-restore --noflush` payload. It is full (every chain, stale
//!   chains found in the kernel deleted, the jumps from the built-in chains checked) at the
//!   first sync, every `full_every`, and after a failure; otherwise partial: only the chains
//!   that changed since the last successful sync, and those found drifted.
//! - On nf_tables a full sync is staged: several transactions in the one iptables-restore
//!   run, each naming at most `staged_names` chains, because iptables-nft's cost per
//!   transaction grows with commands × chain names (`payload` has the why). New chains are
//!   written leaves first, then the top-level chains switch over together, then what is gone
//!   is deleted. Each chain is written whole, and after the chains it jumps to: a packet
//!   meets a chain's old rules or its new ones, never a jump to nothing. If a staged sync
//!   fails partway, the transactions before the failure stay applied (chains written ahead,
//!   unreferenced or complete; after the switch-over, gone chains emptied but not deleted);
//!   the next, full, sync writes over them.
//! - A failed sync keeps the last ruleset that succeeded as the base of the next diff, backs
//!   off (1 s doubling to 30 s) and makes the next sync full.
//! - A chain of ours that is gone but that another program's rule (or a stale rule in a
//!   built-in chain) jumps to cannot be deleted: iptables would refuse the whole table. A full
//!   sync finds such rules in what it read and empties the chain instead, with a warning; a
//!   full sync after the rule is gone deletes it. (A partial sync does not read the tables: its
//!   delete fails, and the full sync that follows a failure 1 s later does the rest.)
//! - `check` reads the kernel back: a cheap probe of the built-in chains' jumps (a flush of a
//!   table empties them first) and, less often, a whole table compared chain by chain with what
//!   was written (see `verify`). Jumps are put back at once; drifted chains are rewritten by the
//!   next (partial) sync. Both run on periods that grow with their cost, so that at most
//!   `budget` of one CPU goes to reading back, whatever the size of the tables.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::backend::Backend;
use super::jumps::{self, Jump};
use super::metrics::{EngineMetrics, Synced};
use super::payload::{self, ChainSet, Context, Scope, Transactions};
use super::ruleset::{Ruleset, TableName};
use super::save::Saved;
use super::sets;
use super::tools::{Iptables, IptablesError};
use super::verify::{verify, Baseline, Drift, DriftKind};

/// The chains that rules a sync leaves in place jump to, per table: the rules of the chains
/// that are neither in the ruleset (written whole) nor ours by name (deleted when stale):
/// built-in chains and other programs' chains. A chain of ours one of them jumps to cannot be
/// deleted (iptables refuses, and the whole table's transaction with it); it is emptied.
fn pinned(saved: &[(TableName, Saved)], ruleset: &Ruleset, owned: payload::Owns) -> ChainSet {
    saved
        .iter()
        .map(|(t, s)| {
            let names = ruleset.chain_names(*t);
            let targets = s
                .chains
                .iter()
                .filter(|(c, _)| !names.contains(*c) && !owned(*t, c))
                .flat_map(|(_, rules)| rules.iter().filter_map(|r| super::ruleset::target(r)))
                .map(str::to_string)
                .collect();
            (*t, targets)
        })
        .collect()
}

pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const STAGED_NAMES: usize = 500;

/// Which chains are ours by their name, so that stale ones found in the kernel are deleted.
pub type Owned = Arc<dyn Fn(TableName, &str) -> bool + Send + Sync>;

/// What the producers want the kernel to hold.
#[derive(Clone)]
pub struct Desired {
    pub ruleset: Ruleset,
    pub jumps: Vec<Jump>,
    pub owned: Owned,
    /// How long the producers took to render it (part of a sync's compute time).
    pub rendered_in: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Period of full syncs (kube-proxy's default: an hour).
    pub full_every: Duration,
    /// Shortest period of the probe of the built-in chains' jumps.
    pub probe_every: Duration,
    /// Shortest period of reading a whole table back.
    pub verify_every: Duration,
    /// Share of one CPU the reading back may use (0.01: a table that takes 1.5 s to read is
    /// read every 150 s).
    pub budget: f64,
    /// A full sync on nf_tables is staged in transactions that each name at most this many
    /// chains (`payload::Transactions::Staged`; docs/benchmarks.md has the measurements); 0:
    /// not staged, one transaction per table.
    pub staged_names: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            full_every: Duration::from_secs(3600),
            probe_every: Duration::from_secs(5),
            verify_every: Duration::from_secs(10),
            budget: 0.01,
            staged_names: STAGED_NAMES,
        }
    }
}

/// What one sync did.
#[derive(Debug, Default, Clone)]
pub struct SyncReport {
    pub full: bool,
    /// Computing: the producers' render (`render`) and the payload.
    pub compute: Duration,
    /// The producers' render alone.
    pub render: Duration,
    /// iptables-restore itself.
    pub restore: Duration,
    /// Full syncs: reading the tables and putting the jumps right.
    pub checks: Duration,
    /// Payload lines written; 0: nothing had changed and nothing was run.
    pub lines: usize,
    /// iptables transactions the payload took (more than one per table: a staged full sync).
    pub transactions: usize,
    pub jumps_fixed: Vec<String>,
    /// Chains deleted (stale, or gone from the ruleset).
    pub deleted: usize,
    /// Chains (and sets) rewritten because they had drifted.
    pub repaired: usize,
    /// ipsets written.
    pub sets: usize,
}

/// What a check found and did.
#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    pub probed: bool,
    pub verified: Vec<TableName>,
    pub drift: Vec<Drift>,
    /// Built-in chains whose jumps were put back.
    pub jumps_fixed: Vec<String>,
    pub errors: Vec<String>,
}

/// What health needs to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Drift found and not yet rewritten: since when, how many chains.
    pub drift: Option<(Instant, usize)>,
    /// Consecutive failed syncs.
    pub failures: u32,
}

pub struct Engine<I: Iptables> {
    ipt: I,
    settings: Settings,
    /// What the kernel holds as far as we know: the last ruleset written successfully.
    applied: Option<Ruleset>,
    jumps: Vec<Jump>,
    owned: Option<Owned>,
    /// Chains found drifted (written by the next sync) and, of those, the ones missing.
    dirty: ChainSet,
    missing: ChainSet,
    /// Sets found drifted (rewritten by the next sync).
    dirty_sets: BTreeSet<String>,
    full_reason: Option<&'static str>,
    last_full: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
    baseline: Baseline,
    next_probe: Option<Instant>,
    next_verify: BTreeMap<TableName, Instant>,
    drift_since: Option<Instant>,
    metrics: EngineMetrics,
}

impl<I: Iptables> Engine<I> {
    pub fn new(ipt: I, settings: Settings, metrics: EngineMetrics) -> Engine<I> {
        Engine {
            ipt,
            settings,
            applied: None,
            jumps: Vec::new(),
            owned: None,
            dirty: ChainSet::new(),
            missing: ChainSet::new(),
            dirty_sets: BTreeSet::new(),
            full_reason: None,
            last_full: None,
            failures: 0,
            retry_at: None,
            baseline: Baseline::default(),
            next_probe: None,
            next_verify: BTreeMap::new(),
            drift_since: None,
            metrics,
        }
    }

    pub fn iptables(&self) -> &I {
        &self.ipt
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// The last ruleset written successfully.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// While backing off after a failure: when the next attempt may run.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether the next sync will be full.
    pub fn full_due(&self, now: Instant) -> bool {
        self.applied.is_none()
            || self.full_reason.is_some()
            || self
                .last_full
                .is_none_or(|t| now.duration_since(t) >= self.settings.full_every)
    }

    /// Whether a sync is due even if nothing the producers render changed.
    pub fn pending(&self, now: Instant) -> bool {
        self.full_due(now)
            || self.dirty.values().any(|d| !d.is_empty())
            || !self.dirty_sets.is_empty()
    }

    /// When `check` next has something to do (None: never synced yet).
    pub fn next_check(&self) -> Option<Instant> {
        self.applied.as_ref()?;
        let verify = self.next_verify.values().min().copied();
        match (self.next_probe, verify) {
            (Some(p), Some(v)) => Some(p.min(v)),
            (p, v) => p.or(v),
        }
    }

    pub fn status(&self) -> Status {
        Status {
            drift: self.drift_since.map(|t| {
                (
                    t,
                    self.dirty.values().map(|d| d.len()).sum::<usize>() + self.dirty_sets.len(),
                )
            }),
            failures: self.failures,
        }
    }

    /// Writes `desired` to the kernel: all of it or what changed (see the module's policy).
    pub fn sync(&mut self, desired: Desired, now: Instant) -> Result<SyncReport, IptablesError> {
        let full = self.full_due(now);
        let mut report = SyncReport {
            full,
            ..Default::default()
        };
        self.jumps = desired.jumps.clone();
        self.owned = Some(desired.owned.clone());
        // A full sync reads what the tables hold: stale chains of ours are deleted, and the
        // jumps are checked against the built-in chains.
        let listed = Instant::now();
        let mut saves = Vec::new();
        if full {
            for t in TableName::ALL {
                match self.ipt.save(t) {
                    Ok(text) => saves.push((t, text)),
                    Err(e) => return Err(self.fail(full, e, now)),
                }
            }
        }
        // The sets too, when any producer has sets or the kernel may hold stale ones of ours.
        let kernel_sets: Option<BTreeSet<String>> = if full {
            match self.ipt.ipset_save() {
                Ok(text) => Some(sets::parse_save(&text).into_keys().collect()),
                Err(e) if desired.ruleset.sets.is_empty() => {
                    // No set needed: a missing ipset tool is no reason to fail.
                    tracing::debug!(error = %e, "cannot list ipsets");
                    None
                }
                Err(e) => return Err(self.fail(full, e, now)),
            }
        } else {
            None
        };
        let saved: Vec<(TableName, Saved)> =
            saves.iter().map(|(t, s)| (*t, Saved::parse(s))).collect();
        let kernel: ChainSet = saved
            .iter()
            .map(|(t, s)| (*t, s.chains.keys().map(|c| c.to_string()).collect()))
            .collect();
        let listing = listed.elapsed();

        let started = Instant::now();
        let owned = desired.owned.clone();
        let pinned = pinned(&saved, &desired.ruleset, &*owned);
        let cx = Context {
            dirty: Some(&self.dirty),
            absent: Some(&self.missing),
            kernel: full.then_some(&kernel),
            owned: full.then_some(&*owned as payload::Owns),
            pinned: full.then_some(&pinned),
            // iptables-legacy rewrites a whole table per transaction: one is cheapest there.
            transactions: match self.ipt.backend() {
                Backend::Nft if self.settings.staged_names > 0 => Transactions::Staged {
                    names: self.settings.staged_names,
                },
                _ => Transactions::PerTable,
            },
        };
        let scope = if full { Scope::Full } else { Scope::Partial };
        let p = payload::payload(self.applied.as_ref(), &desired.ruleset, scope, cx);
        let sp = sets::payload(
            if full {
                None
            } else {
                self.applied.as_ref().map(|a| &a.sets)
            },
            &desired.ruleset.sets,
            &self.dirty_sets,
            kernel_sets.as_ref(),
            &|n| n.starts_with(sets::PREFIX),
        );
        report.render = desired.rendered_in;
        report.compute = desired.rendered_in + started.elapsed();
        report.lines = p.lines() + sp.before.lines().count() + sp.after.lines().count();
        report.transactions = p.transactions;
        report.deleted = p.deleted.values().map(|d| d.len()).sum::<usize>() + sp.destroyed.len();
        report.repaired =
            self.dirty.values().map(|d| d.len()).sum::<usize>() + self.dirty_sets.len();

        let restore_started = Instant::now();
        // Sets first (the rules refer to them), rules, then the sets no rule needs any more.
        if !sp.before.is_empty() {
            if let Err(e) = self.ipt.ipset_restore(&sp.before) {
                return Err(self.fail(full, e, now));
            }
        }
        if !p.is_empty() {
            if let Err(e) = self.ipt.restore(&p.text) {
                return Err(self.fail(full, e, now));
            }
        }
        if !sp.after.is_empty() {
            // A set some foreign rule still uses cannot go: that is the other rule's owner's
            // business, and no reason to fail the sync (a full sync tries again).
            if let Err(e) = self.ipt.ipset_restore(&sp.after) {
                warn!(error = %e, "a stale ipset of rsdn's could not be destroyed");
            }
        }
        report.sets = sp.written.len();
        report.restore = restore_started.elapsed();

        let checks_started = Instant::now();
        if full {
            let (fix, fixed) = jumps::repair_all(&desired.jumps, jumps::listing_from(&saved));
            if !fix.is_empty() {
                if let Err(e) = self.ipt.restore(&fix) {
                    return Err(self.fail(full, e, now));
                }
            }
            report.jumps_fixed = fixed;
        }
        report.checks = checks_started.elapsed() + listing;

        // What was written is learnt again on the next read back.
        for t in TableName::ALL {
            if full {
                self.baseline.clear(t);
            } else {
                for c in p
                    .written
                    .get(&t)
                    .into_iter()
                    .chain(p.deleted.get(&t))
                    .flatten()
                {
                    self.baseline.forget(t, c);
                }
            }
        }
        self.metrics.synced(Synced {
            full,
            took: report.compute + report.restore + report.checks,
            written: &p.rules,
            ruleset: &desired.ruleset,
            at: SystemTime::now(),
        });
        if report.repaired > 0 {
            info!(
                chains = report.repaired,
                "drifted iptables chains rewritten"
            );
        }
        for (t, chains) in &p.kept {
            warn!(
                table = %t,
                chains = ?chains,
                "chains of rsdn's that are gone were emptied but not deleted: a rule rsdn does \
                 not own jumps to them (see iptables-save); a full sync deletes them once it is gone"
            );
        }
        self.applied = Some(desired.ruleset);
        self.dirty.clear();
        self.dirty_sets.clear();
        self.missing.clear();
        self.drift_since = None;
        self.full_reason = None;
        self.failures = 0;
        self.retry_at = None;
        if full {
            self.last_full = Some(now);
        }
        // Reading back starts a period after the first sync.
        self.next_probe
            .get_or_insert(now + self.settings.probe_every);
        for t in TableName::ALL {
            self.next_verify
                .entry(t)
                .or_insert(now + self.settings.verify_every);
        }
        Ok(report)
    }

    fn fail(&mut self, full: bool, e: IptablesError, now: Instant) -> IptablesError {
        self.metrics.restore_failed(full);
        // The last ruleset that succeeded stays the base of the next diff; the next sync is
        // full, which reads the tables first, so a table that did commit is written over
        // rather than guessed at.
        self.full_reason = Some("a sync failed");
        let delay = BACKOFF_FIRST
            .saturating_mul(1 << self.failures.min(5))
            .min(BACKOFF_MAX);
        self.failures += 1;
        self.retry_at = Some(now + delay);
        warn!(
            retry_in_ms = delay.as_millis() as u64,
            failures = self.failures,
            "iptables sync failed; keeping the previous rules"
        );
        e
    }

    /// The next period of a read back that took `took`: at least `min`, long enough that
    /// reading back stays within the budget.
    fn period(&self, min: Duration, took: Duration) -> Duration {
        min.max(took.div_f64(self.settings.budget.max(1e-6)))
    }

    /// Reads the kernel back where it is due: the jumps (put back at once when missing) and
    /// whole tables (drifted chains are rewritten by the next sync: see `pending`).
    pub fn check(&mut self, now: Instant) -> CheckReport {
        let mut r = CheckReport::default();
        if self.applied.is_none() {
            return r;
        }
        if self.next_probe.is_none_or(|t| now >= t) {
            let started = Instant::now();
            r.probed = true;
            let ipt = &self.ipt;
            let mut errors = Vec::new();
            let (fix, fixed) = jumps::repair_all(&self.jumps, |t, c| match ipt.list(t, c) {
                Ok(Some(text)) => Some(
                    text.lines()
                        .filter(|l| l.starts_with("-A "))
                        .map(str::to_string)
                        .collect(),
                ),
                // A built-in chain always exists: a listing without it tells nothing.
                Ok(None) => {
                    errors.push(format!("listing {t}/{c} showed no chain"));
                    None
                }
                Err(e) => {
                    errors.push(e.to_string());
                    None
                }
            });
            r.errors.extend(errors);
            if !fixed.is_empty() {
                self.put_back_jumps(&fix, &fixed, &mut r);
                // A flush of a table empties our chains too: read them back now.
                for f in &fixed {
                    if let Some(t) = f.split('/').next().and_then(TableName::parse) {
                        self.next_verify.insert(t, now);
                    }
                }
            }
            self.next_probe = Some(now + self.period(self.settings.probe_every, started.elapsed()));
        }
        for t in TableName::ALL {
            if self.next_verify.get(&t).is_some_and(|due| now < *due) {
                continue;
            }
            let started = Instant::now();
            let text = match self.ipt.save(t) {
                Ok(text) => text,
                Err(e) => {
                    r.errors.push(e.to_string());
                    self.next_verify.insert(t, now + self.settings.verify_every);
                    continue;
                }
            };
            let saved = Saved::parse(&text);
            let applied = self.applied.as_ref().expect("checked above");
            let drift = verify(t, applied, &saved, &mut self.baseline);
            let mine: Vec<Jump> = self
                .jumps
                .iter()
                .filter(|j| j.table == t)
                .cloned()
                .collect();
            let pair = [(t, saved)];
            let (fix, fixed) = jumps::repair_all(&mine, jumps::listing_from(&pair));
            if !fixed.is_empty() {
                self.put_back_jumps(&fix, &fixed, &mut r);
            }
            if !drift.is_empty() {
                warn!(
                    table = %t,
                    chains = drift.len(),
                    first = %drift[0],
                    "iptables chains of rsdn changed by someone else; rewriting them"
                );
                self.metrics.drift(t, drift.len());
                // Drift queues a sync as a change of the cluster does.
                self.metrics.queued(SystemTime::now());
                for d in &drift {
                    self.dirty.entry(t).or_default().insert(d.chain.clone());
                    if d.kind == DriftKind::Missing {
                        self.missing.entry(t).or_default().insert(d.chain.clone());
                    }
                }
                self.drift_since.get_or_insert(now);
                r.drift.extend(drift);
            }
            if t == TableName::Filter {
                self.verify_sets(now, &mut r);
            }
            let took = started.elapsed();
            self.metrics.verified(t, took);
            r.verified.push(t);
            self.next_verify
                .insert(t, now + self.period(self.settings.verify_every, took));
        }
        r
    }

    /// Compares the sets of the last sync with the kernel's, as part of reading back filter
    /// (the table whose rules use them).
    fn verify_sets(&mut self, now: Instant, r: &mut CheckReport) {
        let Some(applied) = self.applied.as_ref().filter(|a| !a.sets.is_empty()) else {
            return;
        };
        let kernel = match self.ipt.ipset_save() {
            Ok(text) => sets::parse_save(&text),
            Err(e) => {
                r.errors.push(e.to_string());
                return;
            }
        };
        let drifted: Vec<String> = applied
            .sets
            .iter()
            .filter(|(name, set)| kernel.get(*name).is_none_or(|k| k != &***set))
            .map(|(name, _)| name.clone())
            .collect();
        if drifted.is_empty() {
            return;
        }
        warn!(sets = drifted.len(), first = %drifted[0], "ipsets of rsdn changed by someone else; rewriting them");
        self.metrics.drift_sets(drifted.len());
        self.metrics.queued(SystemTime::now());
        self.drift_since.get_or_insert(now);
        for name in drifted {
            r.drift.push(Drift {
                table: TableName::Filter,
                chain: format!("ipset {name}"),
                kind: DriftKind::Changed,
            });
            self.dirty_sets.insert(name);
        }
    }

    fn put_back_jumps(&mut self, fix: &str, fixed: &[String], r: &mut CheckReport) {
        warn!(chains = %fixed.join(", "), "jumps into rsdn's chains missing or out of order (a flush?); putting them back");
        match self.ipt.restore(fix) {
            Ok(()) => {
                self.metrics.jumps_repaired();
                r.jumps_fixed.extend(fixed.iter().cloned());
            }
            Err(e) => {
                r.errors.push(e.to_string());
                // The next sync is full: it puts the jumps back with everything else.
                self.full_reason = Some("the jumps could not be put back");
            }
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
