//! Drift: whether the kernel still holds what the engine last wrote. The tools print rules in
//! their own spelling (`-d 10.0.0.1/32`, matches reordered, marks spelled out), so our text
//! cannot be compared with theirs. Instead, the first time a chain is read back after being
//! written it is checked for shape (same number of rules, same targets in the same order) and
//! the kernel's text becomes its baseline (a hash); from then on any change to the kernel's
//! text is drift. Writing a chain again forgets its baseline.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use super::ruleset::{target, Ruleset, TableName};
use super::save::Saved;

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftKind {
    Missing,
    /// Not the rules written: counts of rules (ours, the kernel's) or a target differs.
    Rules {
        want: usize,
        have: usize,
    },
    /// The kernel's text changed since it was last seen right.
    Changed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub table: TableName,
    pub chain: String,
    pub kind: DriftKind,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            DriftKind::Missing => write!(f, "{}/{}: missing", self.table, self.chain),
            DriftKind::Rules { want, have } => write!(
                f,
                "{}/{}: {have} rules where {want} were written (or other targets)",
                self.table, self.chain
            ),
            DriftKind::Changed => write!(f, "{}/{}: rules changed", self.table, self.chain),
        }
    }
}

/// The kernel's text of each chain, once seen right, as a hash.
#[derive(Debug, Default)]
pub struct Baseline {
    seen: HashMap<(TableName, String), u64>,
}

impl Baseline {
    /// A chain was written: its kernel text is to be learnt again.
    pub fn forget(&mut self, table: TableName, chain: &str) {
        self.seen.remove(&(table, chain.to_string()));
    }

    pub fn clear(&mut self, table: TableName) {
        self.seen.retain(|(t, _), _| *t != table);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

fn hash(lines: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    lines.hash(&mut h);
    h.finish()
}

/// Whether the kernel's rules have the shape of ours: as many, with the same targets in order.
fn same_shape(ours: &str, kernel: &[&str]) -> bool {
    let mut n = 0;
    for (mine, theirs) in ours.lines().zip(kernel) {
        if target(mine) != target(theirs) {
            return false;
        }
        n += 1;
    }
    n == kernel.len() && ours.lines().count() == n
}

/// Compares the chains `applied` holds for `table` with what the kernel holds (`saved`),
/// learning baselines for chains seen for the first time. Returns the drifted chains.
pub fn verify(
    table: TableName,
    applied: &Ruleset,
    saved: &Saved,
    baseline: &mut Baseline,
) -> Vec<Drift> {
    let mut drift = Vec::new();
    for (name, ours) in applied.chains(table) {
        let Some(kernel) = saved.rules(name) else {
            drift.push(Drift {
                table,
                chain: name.clone(),
                kind: DriftKind::Missing,
            });
            continue;
        };
        let h = hash(kernel);
        let key = (table, name.clone());
        match baseline.seen.get(&key) {
            Some(seen) if *seen == h => {}
            Some(_) => {
                baseline.seen.remove(&key);
                drift.push(Drift {
                    table,
                    chain: name.clone(),
                    kind: DriftKind::Changed,
                });
            }
            None if same_shape(ours, kernel) => {
                baseline.seen.insert(key, h);
            }
            None => drift.push(Drift {
                table,
                chain: name.clone(),
                kind: DriftKind::Rules {
                    want: ours.lines().count(),
                    have: kernel.len(),
                },
            }),
        }
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied() -> Ruleset {
        let mut r = Ruleset::default();
        r.tables.nat.add(
            "KUBE-SVC-A",
            format_args!("-m comment --comment x -j KUBE-SEP-1"),
        );
        r.tables
            .nat
            .add("KUBE-SVC-A", format_args!("-j KUBE-SEP-2"));
        r.tables.nat.add(
            "KUBE-SEP-1",
            format_args!("-p tcp -j DNAT --to-destination 10.0.0.1:80"),
        );
        r.tables.nat.add(
            "KUBE-SEP-2",
            format_args!("-p tcp -j DNAT --to-destination 10.0.0.2:80"),
        );
        r
    }

    const KERNEL: &str = "*nat\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-1 - [0:0]\n:KUBE-SEP-2 - [0:0]\n\
        -A KUBE-SVC-A -m comment --comment x -j KUBE-SEP-1\n-A KUBE-SVC-A -j KUBE-SEP-2\n\
        -A KUBE-SEP-1 -p tcp -m tcp -j DNAT --to-destination 10.0.0.1:80\n\
        -A KUBE-SEP-2 -p tcp -m tcp -j DNAT --to-destination 10.0.0.2:80\nCOMMIT\n";

    #[test]
    fn the_kernels_spelling_is_learnt_then_any_change_is_drift() {
        let mut b = Baseline::default();
        let r = applied();
        assert!(verify(TableName::Nat, &r, &Saved::parse(KERNEL), &mut b).is_empty());
        assert_eq!(b.len(), 3);
        assert!(verify(TableName::Nat, &r, &Saved::parse(KERNEL), &mut b).is_empty());
        // Someone edits an endpoint's DNAT in place: same shape, other text.
        let edited = KERNEL.replace("10.0.0.2:80", "10.9.9.9:80");
        let d = verify(TableName::Nat, &r, &Saved::parse(&edited), &mut b);
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].chain.as_str(), &d[0].kind),
            ("KUBE-SEP-2", &DriftKind::Changed)
        );
    }

    #[test]
    fn a_deleted_endpoint_chain_and_its_jump_are_drift_from_the_first_look() {
        let mut b = Baseline::default();
        let damaged = KERNEL
            .replace(":KUBE-SEP-2 - [0:0]\n", "")
            .replace("-A KUBE-SVC-A -j KUBE-SEP-2\n", "")
            .replace(
                "-A KUBE-SEP-2 -p tcp -m tcp -j DNAT --to-destination 10.0.0.2:80\n",
                "",
            );
        let mut d: Vec<String> =
            verify(TableName::Nat, &applied(), &Saved::parse(&damaged), &mut b)
                .iter()
                .map(ToString::to_string)
                .collect();
        d.sort();
        assert_eq!(
            d,
            [
                "nat/KUBE-SEP-2: missing",
                "nat/KUBE-SVC-A: 1 rules where 2 were written (or other targets)"
            ]
        );
    }
}
