//! The iptables-restore input that moves the kernel from one ruleset to another. Chains whose
//! rules are unchanged are left out; chains that are gone are flushed and deleted (only
//! flushed where a rule we do not write jumps to them: `Context::pinned`). A table
//! with nothing to change is left out entirely; an empty payload means nothing to do.
//!
//! A table is one transaction (`*table` ... `COMMIT`), except in a full payload staged for
//! nf_tables ([`Transactions::Staged`]): there iptables-nft-restore `--noflush` keeps the
//! names of the chains a transaction touches in a sorted linked list, one walk of it per
//! command, so that one transaction of n chains costs O(n²): 280 s for the first sync of
//! 10,000 Services. Transactions that each touch a few hundred names cost what a restore
//! without `--noflush` does, and the staging keeps what a packet sees consistent: chains no
//! packet reaches yet, and the chains of each unit, are written first, leaves before what
//! jumps to them; the top-level chains the kernel holds (KUBE-SERVICES, KUBE-POSTROUTING,
//! ...) are rewritten together in one transaction after them, the switch-over; the chains
//! that are gone are flushed and deleted after it, when nothing jumps to them any more.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use super::ruleset::{Ruleset, TableName};

/// How much to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every chain of the ruleset, whatever was there before.
    Full,
    /// Only what differs from what the kernel holds (`before`), and the chains found drifted.
    Partial,
}

/// Chain names per table.
pub type ChainSet = BTreeMap<TableName, BTreeSet<String>>;

/// Says which chains are ours by their name.
pub type Owns<'a> = &'a dyn Fn(TableName, &str) -> bool;

/// How a full payload is cut into transactions (a partial one is always one per table).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Transactions {
    /// One per table: iptables-legacy, whose every transaction rewrites its whole table.
    #[default]
    PerTable,
    /// For iptables-nft: chains written ahead in transactions that each name at most `names`
    /// chains (the chains written and the chains they jump to), then the switch-over, then
    /// the chains that are gone (see the module's documentation). Needs `Context::kernel`.
    Staged { names: usize },
}

/// What goes into a payload besides the two rulesets.
#[derive(Default, Clone, Copy)]
pub struct Context<'a> {
    /// Chains found drifted in the kernel: written even where the ruleset did not change.
    pub dirty: Option<&'a ChainSet>,
    /// Chains known to be missing from the kernel (found so by a read back): never deleted.
    pub absent: Option<&'a ChainSet>,
    /// Chains the kernel holds, where known (a full sync reads them): chains of ours the
    /// ruleset lacks are deleted (`owned` says which are ours), and a chain is only deleted if
    /// it is there (deleting a missing chain fails the whole table).
    pub kernel: Option<&'a ChainSet>,
    pub owned: Option<Owns<'a>>,
    /// Chains a rule that stays in the kernel jumps to (a rule of another program's chain or
    /// of a built-in chain, found by a full sync's read): one of them that is gone is emptied
    /// but not deleted, since deleting a chain something jumps to fails the whole table.
    pub pinned: Option<&'a ChainSet>,
    /// For a full payload.
    pub transactions: Transactions,
}

/// A payload and what it does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Payload {
    pub text: String,
    /// Chains written, per table (for a partial payload; a full one writes every chain).
    pub written: ChainSet,
    pub deleted: ChainSet,
    /// Chains that are gone but pinned (`Context::pinned`): emptied, kept.
    pub kept: ChainSet,
    /// Rules (`-A` lines) written, per table: kube-proxy's `sync_proxy_rules_iptables_last`.
    pub rules: BTreeMap<TableName, usize>,
    /// Transactions (`COMMIT`s).
    pub transactions: usize,
}

impl Payload {
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    pub fn lines(&self) -> usize {
        self.text.lines().count()
    }
}

/// The payload that turns `before` (what the kernel holds; None: unknown) into `after`.
pub fn payload(before: Option<&Ruleset>, after: &Ruleset, scope: Scope, cx: Context) -> Payload {
    let mut out = Payload::default();
    for table in TableName::ALL {
        let full = scope == Scope::Full || before.is_none();
        let mut changed: Vec<(&String, &String)> = Vec::new();
        let mut gone: BTreeSet<&str> = BTreeSet::new();
        if full {
            changed.extend(after.chains(table));
        } else if let Some(b) = before {
            changes(b, after, table, &mut changed, &mut gone);
        }
        if let Some(b) = before {
            if full {
                // Chains of the last ruleset that this one lacks.
                gone.extend(b.chains(table).map(|(n, _)| n.as_str()));
            }
        }
        if let (Some(kernel), Some(owned)) = (cx.kernel.and_then(|k| k.get(&table)), cx.owned) {
            gone.extend(
                kernel
                    .iter()
                    .map(String::as_str)
                    .filter(|c| owned(table, c)),
            );
        }
        let dirty = cx
            .dirty
            .and_then(|d| d.get(&table))
            .filter(|d| !d.is_empty());
        // The names of the new ruleset, when something must be checked against them: a chain
        // is gone only if the new ruleset has it nowhere (it may have moved to another group).
        if !gone.is_empty() || dirty.is_some() {
            let names = after.chain_names(table);
            gone.retain(|c| !names.contains(c));
            if let Some(dirty) = dirty {
                if !full {
                    changed.extend(after.chains(table).filter(|(n, _)| dirty.contains(*n)));
                }
            }
        }
        if let Some(kernel) = cx.kernel.and_then(|k| k.get(&table)) {
            gone.retain(|c| kernel.contains(*c));
        }
        if let Some(absent) = cx.absent.and_then(|a| a.get(&table)) {
            gone.retain(|c| !absent.contains(*c));
        }
        if changed.is_empty() && gone.is_empty() {
            continue;
        }
        let pinned: BTreeSet<&str> = match cx.pinned.and_then(|p| p.get(&table)) {
            Some(p) => gone.iter().copied().filter(|c| p.contains(*c)).collect(),
            None => BTreeSet::new(),
        };
        changed.sort_unstable_by(|a, b| a.0.cmp(b.0));
        changed.dedup_by(|a, b| a.0 == b.0);
        match (cx.transactions, cx.kernel.and_then(|k| k.get(&table))) {
            (Transactions::Staged { names }, Some(kernel)) if full => {
                let top = &after.tables.get(table).chains;
                let staged = Staging {
                    table,
                    names: names.max(1),
                    ahead: &|c: &str| !top.contains_key(c) || !kernel.contains(c),
                };
                out.transactions += staged.write(&mut out.text, &changed, &gone, &pinned);
            }
            _ => {
                write_table(&mut out.text, table, &changed, &gone, &pinned);
                out.transactions += 1;
            }
        }
        // A chain's text is one `-A` line per rule.
        let rules = changed
            .iter()
            .map(|(_, r)| r.bytes().filter(|b| *b == b'\n').count())
            .sum();
        out.rules.insert(table, rules);
        if !full {
            out.written
                .insert(table, changed.iter().map(|(n, _)| (*n).clone()).collect());
        }
        out.deleted.insert(
            table,
            gone.difference(&pinned).map(|n| n.to_string()).collect(),
        );
        if !pinned.is_empty() {
            out.kept
                .insert(table, pinned.iter().map(|n| n.to_string()).collect());
        }
    }
    out
}

/// The chains of `table` that differ between the two rulesets, and the ones `after` lacks.
fn changes<'a>(
    before: &'a Ruleset,
    after: &'a Ruleset,
    table: TableName,
    changed: &mut Vec<(&'a String, &'a String)>,
    gone: &mut BTreeSet<&'a str>,
) {
    let (old, new) = (before.tables.get(table), after.tables.get(table));
    changed.extend(
        new.chains
            .iter()
            .filter(|(name, rules)| old.chains.get(*name) != Some(*rules)),
    );
    gone.extend(
        old.chains
            .keys()
            .filter(|c| !new.chains.contains_key(*c))
            .map(String::as_str),
    );
    for (key, group) in &after.groups {
        let Some(was) = before.groups.get(key) else {
            changed.extend(group.get(table).chains.iter());
            continue;
        };
        // A group rendered again from the same input is the same Arc: skipped unread.
        if Arc::ptr_eq(was, group) || was.get(table) == group.get(table) {
            continue;
        }
        let (o, n) = (was.get(table), group.get(table));
        changed.extend(
            n.chains
                .iter()
                .filter(|(name, rules)| o.chains.get(*name) != Some(*rules)),
        );
        gone.extend(
            o.chains
                .keys()
                .filter(|c| !n.chains.contains_key(*c))
                .map(String::as_str),
        );
    }
    for (key, group) in &before.groups {
        if !after.groups.contains_key(key) {
            gone.extend(group.get(table).chains.keys().map(String::as_str));
        }
    }
}

/// One transaction: `changed` written, `gone` emptied and deleted (`pinned` ones only emptied).
fn write_table(
    out: &mut String,
    table: TableName,
    changed: &[(&String, &String)],
    gone: &BTreeSet<&str>,
    pinned: &BTreeSet<&str>,
) {
    // One allocation for what follows: a full payload runs to tens of megabytes.
    let size: usize = changed
        .iter()
        .map(|(n, rules)| n.len() + 10 + rules.len())
        .sum::<usize>()
        + gone.iter().map(|n| 2 * n.len() + 14).sum::<usize>();
    out.reserve(size + 32);
    let _ = writeln!(out, "*{table}");
    for (name, _) in changed {
        let _ = writeln!(out, ":{name} - [0:0]");
    }
    for name in gone {
        let _ = writeln!(out, ":{name} - [0:0]");
    }
    for (_, rules) in changed {
        out.push_str(rules);
    }
    for name in gone.difference(pinned) {
        let _ = writeln!(out, "-X {name}");
    }
    out.push_str("COMMIT\n");
}

/// A full payload of one table, cut into transactions.
struct Staging<'a> {
    table: TableName,
    /// Most chain names one transaction touches.
    names: usize,
    /// Chains written ahead of the switch-over: no packet reaches them yet, or they belong to
    /// one unit (a Service port's chains, a pod's).
    ahead: &'a dyn Fn(&str) -> bool,
}

impl Staging<'_> {
    /// Writes the transactions; returns how many.
    fn write(
        &self,
        out: &mut String,
        changed: &[(&String, &String)],
        gone: &BTreeSet<&str>,
        pinned: &BTreeSet<&str>,
    ) -> usize {
        let (ahead, last): (Vec<_>, Vec<_>) =
            changed.iter().copied().partition(|(n, _)| (self.ahead)(n));
        let all: HashSet<&str> = changed.iter().map(|(n, _)| n.as_str()).collect();
        // The chains each one jumps to.
        let jumps: BTreeMap<&str, BTreeSet<&str>> = changed
            .iter()
            .map(|(n, rules)| {
                let to = rules
                    .lines()
                    .filter_map(jump_target)
                    .filter(|t| all.contains(t) && *t != n.as_str())
                    .collect();
                (n.as_str(), to)
            })
            .collect();
        let ahead_names: HashSet<&str> = ahead.iter().map(|(n, _)| n.as_str()).collect();
        let depth = depths(&ahead_names, &jumps);
        let mut ahead = ahead;
        ahead.sort_by(|a, b| (depth[a.0.as_str()], a.0).cmp(&(depth[b.0.as_str()], b.0)));
        let cut = chunks(
            ahead
                .iter()
                .map(|(n, _)| std::iter::once(n.as_str()).chain(jumps[n.as_str()].iter().copied())),
            self.names,
        );
        let mut count = cut.len();
        let mut rest = &ahead[..];
        for size in cut {
            let (tx, more) = rest.split_at(size);
            write_table(out, self.table, tx, &BTreeSet::new(), &BTreeSet::new());
            rest = more;
        }
        if !last.is_empty() {
            write_table(out, self.table, &last, &BTreeSet::new(), &BTreeSet::new());
            count += 1;
        }
        // Nothing of ours jumps to the chains that are gone any more: emptied first, all of
        // them (one may jump to another), then deleted (but the pinned ones).
        let deleted: Vec<&str> = gone.difference(pinned).copied().collect();
        let gone: Vec<&str> = gone.iter().copied().collect();
        for tx in gone.chunks(self.names) {
            let _ = writeln!(out, "*{}", self.table);
            for name in tx {
                let _ = writeln!(out, ":{name} - [0:0]");
            }
            out.push_str("COMMIT\n");
        }
        for tx in deleted.chunks(self.names) {
            let _ = writeln!(out, "*{}", self.table);
            for name in tx {
                let _ = writeln!(out, "-X {name}");
            }
            out.push_str("COMMIT\n");
        }
        count + gone.len().div_ceil(self.names) + deleted.len().div_ceil(self.names)
    }
}

/// The chain a rule jumps or goes to, if any: the word after the last ` -j ` or ` -g ` (a
/// comment, which comes before, cannot fool it).
fn jump_target(rule: &str) -> Option<&str> {
    let at = rule.rfind(" -j ").max(rule.rfind(" -g "))?;
    rule[at + 4..].split(' ').next()
}

/// How far each chain of `these` is from a leaf, following jumps within `these`: 0 for a
/// chain that jumps to none of them.
fn depths<'a>(
    these: &HashSet<&'a str>,
    jumps: &BTreeMap<&'a str, BTreeSet<&'a str>>,
) -> HashMap<&'a str, usize> {
    let mut depth: HashMap<&str, usize> = HashMap::with_capacity(these.len());
    for &start in these {
        // Depth first, without recursion; a chain on the stack counts as a leaf, should the
        // rules ever hold a loop (the kernel refuses them).
        let mut stack = vec![(start, false)];
        let mut open: HashSet<&str> = HashSet::new();
        while let Some((c, children_done)) = stack.pop() {
            if depth.contains_key(c) {
                continue;
            }
            let below = jumps[c].iter().copied().filter(|t| these.contains(t));
            if children_done {
                let d = below.map(|t| depth.get(t).map_or(0, |d| d + 1)).max();
                depth.insert(c, d.unwrap_or(0));
                open.remove(c);
            } else {
                open.insert(c);
                stack.push((c, true));
                stack.extend(
                    below
                        .filter(|t| !depth.contains_key(t) && !open.contains(t))
                        .map(|t| (t, false)),
                );
            }
        }
    }
    depth
}

/// Cuts a sequence of chains, each with the names it touches, into transactions that touch
/// at most `limit` names (a chain that alone touches more gets a transaction of its own):
/// the number of chains in each.
fn chunks<'a, I, N>(chains: I, limit: usize) -> Vec<usize>
where
    I: Iterator<Item = N>,
    N: Iterator<Item = &'a str>,
{
    let mut out = Vec::new();
    let mut names: HashSet<&str> = HashSet::new();
    let mut count = 0;
    for touched in chains {
        let touched: Vec<&str> = touched.collect();
        let new = touched.iter().filter(|n| !names.contains(*n)).count();
        if count > 0 && names.len() + new > limit {
            out.push(count);
            names.clear();
            count = 0;
        }
        names.extend(touched);
        count += 1;
    }
    if count > 0 {
        out.push(count);
    }
    out
}

/// A set of chain names per table, from names.
pub fn chain_set<'a>(entries: impl IntoIterator<Item = (TableName, &'a str)>) -> ChainSet {
    let mut out = ChainSet::new();
    for (t, n) in entries {
        out.entry(t).or_default().insert(n.to_string());
    }
    out
}

/// Names of chains, for a quick membership test.
pub fn names(set: &ChainSet, table: TableName) -> HashSet<&str> {
    set.get(&table)
        .map(|s| s.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::ruleset::Tables;

    fn ruleset(top: &[(&str, &str)], groups: &[(&str, &[(&str, &str)])]) -> Ruleset {
        let mut r = Ruleset::default();
        for (chain, rule) in top {
            r.tables.nat.add(chain, format_args!("{rule}"));
        }
        for (key, chains) in groups {
            let mut t = Tables::default();
            for (chain, rule) in *chains {
                t.nat.add(chain, format_args!("{rule}"));
            }
            r.groups.insert(("p", key.to_string()), Arc::new(t));
        }
        r
    }

    #[test]
    fn partial_writes_only_what_changed_and_deletes_what_is_gone() {
        let before = ruleset(
            &[("TOP", "-j A"), ("OLD", "-j RETURN")],
            &[
                ("a", &[("A", "-j RETURN")]),
                ("b", &[("B", "-j RETURN"), ("B2", "-j RETURN")]),
            ],
        );
        let mut after = ruleset(
            &[("TOP", "-j A")],
            &[
                ("a", &[("A", "-j RETURN")]),
                ("b", &[("B", "-j DROP")]),
                ("c", &[("C", "-j RETURN")]),
            ],
        );
        // The unchanged group keeps its Arc, as a render cache hands it back.
        after
            .groups
            .insert(("p", "a".into()), before.groups[&("p", "a".into())].clone());
        let p = payload(Some(&before), &after, Scope::Partial, Context::default());
        assert_eq!(
            p.text,
            "*nat\n:B - [0:0]\n:C - [0:0]\n:B2 - [0:0]\n:OLD - [0:0]\n-A B -j DROP\n-A C -j RETURN\n-X B2\n-X OLD\nCOMMIT\n"
        );
        assert_eq!(p.written[&TableName::Nat].len(), 2);
        // Rules written, as kube-proxy counts them: `-A` lines, not declarations or deletions.
        assert_eq!(p.rules, BTreeMap::from([(TableName::Nat, 2)]));
        assert!(payload(Some(&after), &after, Scope::Partial, Context::default()).is_empty());
    }

    #[test]
    fn dirty_chains_are_rewritten_and_moved_chains_are_not_deleted() {
        let before = ruleset(&[("MOVED", "-j RETURN")], &[("a", &[("A", "-j RETURN")])]);
        let after = ruleset(
            &[],
            &[
                ("a", &[("A", "-j RETURN")]),
                ("m", &[("MOVED", "-j RETURN")]),
            ],
        );
        let p = payload(Some(&before), &after, Scope::Partial, Context::default());
        assert_eq!(p.text, "*nat\n:MOVED - [0:0]\n-A MOVED -j RETURN\nCOMMIT\n");
        let dirty = chain_set([(TableName::Nat, "A")]);
        let cx = Context {
            dirty: Some(&dirty),
            ..Default::default()
        };
        let p = payload(Some(&after), &after, Scope::Partial, cx);
        assert_eq!(p.text, "*nat\n:A - [0:0]\n-A A -j RETURN\nCOMMIT\n");
    }

    #[test]
    fn full_writes_everything_and_deletes_only_stale_chains_that_exist() {
        let before = ruleset(&[("GONE", "-j RETURN"), ("ALSO-GONE", "-j RETURN")], &[]);
        let after = ruleset(&[("KEEP", "-j RETURN")], &[]);
        // The kernel has GONE, a stale chain of ours (KUBE-SVC-OLD) and a foreign one; not
        // ALSO-GONE (someone deleted it already).
        let kernel = chain_set([
            (TableName::Nat, "GONE"),
            (TableName::Nat, "KUBE-SVC-OLD"),
            (TableName::Nat, "FOREIGN"),
            (TableName::Nat, "KEEP"),
        ]);
        let owned = |_: TableName, c: &str| c.starts_with("KUBE-SVC-");
        let cx = Context {
            kernel: Some(&kernel),
            owned: Some(&owned),
            ..Default::default()
        };
        let p = payload(Some(&before), &after, Scope::Full, cx);
        assert_eq!(
            p.text,
            "*nat\n:KEEP - [0:0]\n:GONE - [0:0]\n:KUBE-SVC-OLD - [0:0]\n-A KEEP -j RETURN\n-X GONE\n-X KUBE-SVC-OLD\nCOMMIT\n"
        );
        // Without knowing the last ruleset (a fresh start), only what the kernel shows.
        let p = payload(None, &after, Scope::Partial, cx);
        assert!(
            p.text.contains("-X KUBE-SVC-OLD") && !p.text.contains("-X GONE"),
            "{}",
            p.text
        );
    }

    /// A Service-like ruleset: TOP jumps to a unit's SVC chain, which jumps to its SEP chains,
    /// which jump to ZMARK (named so that no alphabetical order is the order of the jumps) (top-level).
    fn services(units: &[(&str, usize)]) -> Ruleset {
        let mut r = Ruleset::default();
        r.tables
            .nat
            .add("ZMARK", format_args!("-j MARK --or-mark 0x1"));
        r.tables.nat.add("POST", format_args!("-j RETURN"));
        for (u, eps) in units {
            r.tables.nat.add(
                "TOP",
                format_args!("-m comment --comment \"to -j {u}\" -j SVC-{u}"),
            );
            let mut t = Tables::default();
            for e in 0..*eps {
                t.nat
                    .add(&format!("SVC-{u}"), format_args!("-j XEP-{u}-{e}"));
                t.nat.add(
                    &format!("XEP-{u}-{e}"),
                    format_args!("-s 10.0.0.{e} -j ZMARK"),
                );
                t.nat.add(
                    &format!("XEP-{u}-{e}"),
                    format_args!("-j DNAT --to-destination 10.0.0.{e}"),
                );
            }
            r.groups.insert(("p", u.to_string()), Arc::new(t));
        }
        r
    }

    fn staged(
        before: Option<&Ruleset>,
        after: &Ruleset,
        kernel: &ChainSet,
        names: usize,
    ) -> Payload {
        let owned = |_: TableName, c: &str| c.starts_with("SVC-") || c.starts_with("XEP-");
        let cx = Context {
            kernel: Some(kernel),
            owned: Some(&owned),
            transactions: Transactions::Staged { names },
            ..Default::default()
        };
        payload(before, after, Scope::Full, cx)
    }

    /// The transactions of a payload: (declared, deleted) chain names of each.
    fn transactions(text: &str) -> Vec<(Vec<&str>, Vec<&str>)> {
        text.split("COMMIT\n")
            .filter(|t| !t.is_empty())
            .map(|t| {
                let declared = t
                    .lines()
                    .filter_map(|l| l.strip_prefix(':')?.split(' ').next())
                    .collect();
                let deleted = t.lines().filter_map(|l| l.strip_prefix("-X ")).collect();
                (declared, deleted)
            })
            .collect()
    }

    fn kernel_after(restores: &[&str]) -> BTreeMap<String, Vec<String>> {
        let f = crate::netfilter::fake::FakeIptables::new();
        for r in restores {
            crate::netfilter::tools::Iptables::restore(&f, r).unwrap();
        }
        let save = crate::netfilter::tools::Iptables::save(&f, TableName::Nat).unwrap();
        crate::netfilter::save::Saved::parse(&save)
            .chains
            .into_iter()
            .map(|(c, rules)| (c.to_string(), rules.iter().map(|r| r.to_string()).collect()))
            .collect()
    }

    #[test]
    fn a_staged_first_sync_writes_leaves_first_in_small_transactions() {
        let r = services(&[("a", 3), ("b", 2), ("c", 4)]);
        let kernel = chain_set([(TableName::Nat, "FOREIGN")]);
        let p = staged(None, &r, &kernel, 5);
        let txs = transactions(&p.text);
        assert!(txs.len() > 3, "{}", p.text);
        assert_eq!(p.transactions, txs.len());
        let mut written: Vec<&str> = Vec::new();
        for (declared, _) in &txs {
            // Every chain a transaction's rules jump to exists before or is declared in it.
            let tx_text = p
                .text
                .split("COMMIT\n")
                .find(|t| {
                    declared
                        .first()
                        .is_some_and(|d| t.contains(&format!(":{d} ")))
                })
                .unwrap();
            let chains = r.chain_names(TableName::Nat);
            for to in tx_text
                .lines()
                .filter_map(jump_target)
                .filter(|t| chains.contains(t))
            {
                assert!(
                    written.contains(&to) || declared.contains(&to),
                    "{to} not there yet in\n{tx_text}"
                );
            }
            // At most 5 names per transaction (a chain that alone touches more: on its own).
            let mut names: BTreeSet<&str> = declared.iter().copied().collect();
            names.extend(
                tx_text
                    .lines()
                    .filter_map(jump_target)
                    .filter(|t| r.chain_names(TableName::Nat).contains(t)),
            );
            assert!(names.len() <= 5 || declared.len() == 1, "{names:?}");
            written.extend(declared.iter().copied());
        }
        // Nothing the kernel held: everything is written ahead, TOP (which jumps to the most) last.
        assert_eq!(txs.last().unwrap().0, ["TOP"]);
        assert_eq!(written.len(), r.chain_names(TableName::Nat).len());
        // The same kernel as one transaction would give.
        let one = payload(None, &r, Scope::Full, Context::default()).text;
        assert_eq!(kernel_after(&[&p.text]), kernel_after(&[&one]));
        assert_eq!(
            p.rules,
            payload(None, &r, Scope::Full, Context::default()).rules
        );
    }

    #[test]
    fn a_staged_full_sync_switches_top_level_chains_together_then_deletes_what_is_gone() {
        let before = services(&[("a", 3), ("b", 2), ("c", 4)]);
        let after = services(&[("a", 2), ("d", 1)]);
        let first = payload(None, &before, Scope::Full, Context::default()).text;
        let kernel: ChainSet = [(
            TableName::Nat,
            kernel_after(&[&first]).into_keys().collect(),
        )]
        .into();
        let p = staged(Some(&before), &after, &kernel, 4);
        let txs = transactions(&p.text);
        // The top-level chains the kernel holds, rewritten in one transaction after the units'.
        let switch = txs.iter().position(|(d, _)| d.contains(&"TOP")).unwrap();
        assert_eq!(txs[switch].0, ["POST", "TOP", "ZMARK"]);
        assert!(txs[..switch].iter().all(|(d, x)| x.is_empty()
            && !d.is_empty()
            && d.iter()
                .all(|c| c.starts_with("SVC-") || c.starts_with("XEP-"))));
        // Then the gone chains emptied (b's and c's, and a's third endpoint), then deleted.
        let gone: Vec<&str> = txs[switch + 1..]
            .iter()
            .flat_map(|(d, _)| d.clone())
            .collect();
        let deleted: Vec<&str> = txs[switch + 1..]
            .iter()
            .flat_map(|(_, x)| x.clone())
            .collect();
        // XEP-a-2; SVC-b and its 2 SEPs; SVC-c and its 4.
        assert_eq!(gone.len(), 1 + 3 + 5, "{}", p.text);
        assert_eq!(deleted.len(), gone.len());
        assert_eq!(p.transactions, txs.len());
        let last_flush = txs
            .iter()
            .rposition(|(d, _)| d.iter().any(|c| gone.contains(c)))
            .unwrap();
        let first_delete = txs.iter().position(|(_, x)| !x.is_empty()).unwrap();
        assert!(last_flush < first_delete);
        // The fake refuses a jump to a missing chain and the deletion of a chain something
        // jumps to: the staged payload passes, and ends where one transaction does.
        let one = payload(
            Some(&before),
            &after,
            Scope::Full,
            Context {
                kernel: Some(&kernel),
                ..Default::default()
            },
        )
        .text;
        assert_eq!(
            kernel_after(&[&first, &p.text]),
            kernel_after(&[&first, &one])
        );
    }

    #[test]
    fn staging_is_for_full_payloads_with_a_known_kernel() {
        let before = services(&[("a", 3)]);
        let after = services(&[("a", 2)]);
        let kernel = chain_set([(TableName::Nat, "TOP")]);
        let cx = Context {
            kernel: Some(&kernel),
            transactions: Transactions::Staged { names: 1 },
            ..Default::default()
        };
        let partial = payload(Some(&before), &after, Scope::Partial, cx);
        assert_eq!(
            (partial.text.matches("COMMIT").count(), partial.transactions),
            (1, 1)
        );
        let unknown = Context { kernel: None, ..cx };
        assert_eq!(
            payload(None, &after, Scope::Full, unknown)
                .text
                .matches("COMMIT")
                .count(),
            1
        );
    }

    #[test]
    fn the_jump_target_is_the_last_jump_of_the_rule() {
        assert_eq!(
            jump_target("-A X -m comment --comment \"to -j Y\" -j Z"),
            Some("Z")
        );
        assert_eq!(jump_target("-A X -g Y"), Some("Y"));
        assert_eq!(
            jump_target("-A X -j DNAT --to-destination 1.2.3.4"),
            Some("DNAT")
        );
        assert_eq!(jump_target("-A X -s 1.2.3.4"), None);
    }
}
