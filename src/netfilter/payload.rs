//! The iptables-restore input that moves the kernel from one ruleset to another. Chains whose
//! rules are unchanged are left out; chains that are gone are flushed and deleted. A table
//! with nothing to change is left out entirely; an empty payload means nothing to do.

use std::collections::{BTreeMap, BTreeSet, HashSet};
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
}

/// A payload and what it does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Payload {
    pub text: String,
    /// Chains written, per table (for a partial payload; a full one writes every chain).
    pub written: ChainSet,
    pub deleted: ChainSet,
    /// Rules (`-A` lines) written, per table: kube-proxy's `sync_proxy_rules_iptables_last`.
    pub rules: BTreeMap<TableName, usize>,
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
        changed.sort_unstable_by(|a, b| a.0.cmp(b.0));
        changed.dedup_by(|a, b| a.0 == b.0);
        write_table(&mut out.text, table, &changed, &gone);
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
        out.deleted
            .insert(table, gone.iter().map(|n| n.to_string()).collect());
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

fn write_table(
    out: &mut String,
    table: TableName,
    changed: &[(&String, &String)],
    gone: &BTreeSet<&str>,
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
    for name in gone {
        let _ = writeln!(out, "-X {name}");
    }
    out.push_str("COMMIT\n");
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
}
