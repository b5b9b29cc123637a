//! Jumps from the built-in chains into ours, declared as one table. They are not part of the
//! restore payload (that would mean owning the built-in chains, which the node's other users
//! share); the engine makes sure each is there, once, and that ours stand in the declared order.
//!
//! Order matters between producers: NetworkPolicy must judge a packet before KUBE-FORWARD
//! accepts it for carrying the masquerade mark, for example. A built-in chain's `First` jumps
//! are kept at its top in the order declared; its `Last` jumps are appended (rsdn's permissive
//! forward rule must not pre-empt kube-proxy's REJECT and DROP rules).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::ruleset::{Quoted, TableName};
use super::save::Saved;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    First,
    Last,
}

/// A jump from a built-in chain into one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub table: TableName,
    pub chain: &'static str,
    /// The rule as restore input (after `-A CHAIN`).
    pub rule: String,
    pub position: Position,
    /// What identifies the rule in a listing, however the tool spells its matches.
    target: String,
    comment: String,
}

impl Jump {
    /// `-A <chain> <matches> -m comment --comment "<comment>" -j <target>`.
    pub fn new(
        table: TableName,
        chain: &'static str,
        matches: &str,
        comment: &str,
        target: &str,
        position: Position,
    ) -> Jump {
        Jump {
            table,
            chain,
            rule: format!("{matches}{} -j {target}", Quoted(comment)),
            position,
            target: target.to_string(),
            comment: comment.to_string(),
        }
    }

    /// Whether a listed rule (`-A CHAIN ...`, as iptables-save prints it) is this jump.
    pub fn is(&self, listed: &str) -> bool {
        super::ruleset::target(listed) == Some(self.target.as_str())
            && listed.contains(&self.comment)
    }

    /// `-t nat -I PREROUTING 1 ...`, as an operator would type it.
    pub fn command(&self) -> String {
        let op = match self.position {
            Position::First => format!("-I {} 1", self.chain),
            Position::Last => format!("-A {}", self.chain),
        };
        format!("-t {} {op} {}", self.table, self.rule)
    }
}

/// The built-in chains the jumps use, per table, in a stable order.
pub fn chains(jumps: &[Jump]) -> Vec<(TableName, &'static str)> {
    let mut out: Vec<(TableName, &'static str)> =
        jumps.iter().map(|j| (j.table, j.chain)).collect();
    out.sort();
    out.dedup();
    out
}

/// What it takes to put the jumps of one built-in chain right, given its listed rules: restore
/// lines for that chain's table (empty: they are right). When anything is off (a jump missing,
/// doubled, or ours out of order) every jump of ours in the chain is deleted and inserted again
/// in order, in one transaction: no packet sees the chain half fixed.
pub fn repair(jumps: &[&Jump], listed: &[&str]) -> String {
    let firsts: Vec<&&Jump> = jumps
        .iter()
        .filter(|j| j.position == Position::First)
        .collect();
    let lasts: Vec<&&Jump> = jumps
        .iter()
        .filter(|j| j.position == Position::Last)
        .collect();
    // Which of our jumps each listed rule is.
    let found: Vec<(usize, &str)> = listed
        .iter()
        .filter_map(|l| jumps.iter().position(|j| j.is(l)).map(|i| (i, *l)))
        .collect();
    let each_once = (0..jumps.len()).all(|i| found.iter().filter(|(f, _)| *f == i).count() == 1);
    let first_order: Vec<usize> = found
        .iter()
        .map(|(i, _)| *i)
        .filter(|i| jumps[*i].position == Position::First)
        .collect();
    let declared: Vec<usize> = (0..jumps.len())
        .filter(|i| jumps[*i].position == Position::First)
        .collect();
    // Ours first means before anything else: a rule someone put above them (kube-proxy's
    // KUBE-FORWARD after a flush, say) could accept a packet before policy judged it.
    let on_top = listed
        .iter()
        .take(declared.len())
        .enumerate()
        .all(|(k, l)| jumps[declared[k]].is(l));
    if each_once && first_order == declared && on_top {
        return String::new();
    }
    let mut out = String::new();
    for (_, line) in &found {
        let spec = line.strip_prefix("-A ").unwrap_or(line);
        let _ = writeln!(out, "-D {spec}");
    }
    for j in firsts.iter().rev() {
        let _ = writeln!(out, "-I {} 1 {}", j.chain, j.rule);
    }
    for j in lasts {
        let _ = writeln!(out, "-A {} {}", j.chain, j.rule);
    }
    out
}

/// The restore payload that puts every jump right, from each built-in chain's listing
/// (`listing(table, chain)`; None: unknown, left alone). Also returns one line per chain fixed.
pub fn repair_all(
    jumps: &[Jump],
    mut listing: impl FnMut(TableName, &str) -> Option<Vec<String>>,
) -> (String, Vec<String>) {
    let mut payload = String::new();
    let mut fixed = Vec::new();
    for table in TableName::ALL {
        let mut lines = String::new();
        for (t, chain) in chains(jumps) {
            if t != table {
                continue;
            }
            let Some(listed) = listing(t, chain) else {
                continue;
            };
            let listed: Vec<&str> = listed.iter().map(String::as_str).collect();
            let mine: Vec<&Jump> = jumps
                .iter()
                .filter(|j| j.table == t && j.chain == chain)
                .collect();
            let fix = repair(&mine, &listed);
            if !fix.is_empty() {
                fixed.push(format!("{t}/{chain}"));
                lines.push_str(&fix);
            }
        }
        if !lines.is_empty() {
            let _ = write!(payload, "*{table}\n{lines}COMMIT\n");
        }
    }
    (payload, fixed)
}

/// The removal of every jump of ours from the built-in chains (`rsdn cleanup`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Restore lines per table, each deleting one listed rule.
    pub lines: BTreeMap<TableName, String>,
    /// The rules deleted, as (table, listed rule).
    pub removed: Vec<(TableName, String)>,
}

/// What it takes to remove every jump of ours from the built-in chains, from their listings
/// (`listing(table, chain)`; None: unknown, left alone): a listed rule that is one of `jumps`
/// goes, however many times it stands there. Other rules of the built-in chains are not ours
/// and stay.
pub fn removal(
    jumps: &[Jump],
    mut listing: impl FnMut(TableName, &str) -> Option<Vec<String>>,
) -> Removal {
    let mut out = Removal::default();
    for (t, chain) in chains(jumps) {
        for line in listing(t, chain).into_iter().flatten() {
            if jumps
                .iter()
                .any(|j| j.table == t && j.chain == chain && j.is(&line))
            {
                let spec = line.strip_prefix("-A ").unwrap_or(&line);
                let _ = writeln!(out.lines.entry(t).or_default(), "-D {spec}");
                out.removed.push((t, line));
            }
        }
    }
    out
}

/// The listing of every built-in chain the jumps use, out of saved tables.
pub fn listing_from<'a>(
    saved: &'a [(TableName, Saved<'a>)],
) -> impl FnMut(TableName, &str) -> Option<Vec<String>> + 'a {
    move |table, chain| {
        let s = &saved.iter().find(|(t, _)| *t == table)?.1;
        Some(s.rules(chain)?.iter().map(|l| l.to_string()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(chain: &'static str, target: &str, position: Position) -> Jump {
        Jump::new(
            TableName::Filter,
            chain,
            "",
            &format!("to {target}"),
            target,
            position,
        )
    }

    fn listed(jumps: &[&Jump]) -> Vec<String> {
        jumps
            .iter()
            .map(|j| format!("-A {} {}", j.chain, j.rule))
            .collect()
    }

    #[test]
    fn a_foreign_rule_above_our_first_jumps_puts_them_back_on_top() {
        let (a, b) = (
            j("FORWARD", "A", Position::First),
            j("FORWARD", "B", Position::First),
        );
        let mut l = vec!["-A FORWARD -j KUBE-FORWARD".to_string()];
        l.extend(listed(&[&a, &b]));
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        let fix = repair(&[&a, &b], &l);
        assert!(fix.ends_with("-I FORWARD 1 -m comment --comment \"to B\" -j B\n-I FORWARD 1 -m comment --comment \"to A\" -j A\n"), "{fix}");
        assert!(
            !fix.contains("KUBE-FORWARD"),
            "a foreign rule is never touched: {fix}"
        );
    }

    #[test]
    fn jumps_in_place_need_nothing_whatever_else_is_around() {
        let (a, b, z) = (
            j("FORWARD", "A", Position::First),
            j("FORWARD", "B", Position::First),
            j("FORWARD", "Z", Position::Last),
        );
        let mut l = listed(&[&a, &b]);
        l.push("-A FORWARD -j FOREIGN-TOP".to_string());
        l.push("-A FORWARD -j FOREIGN".into());
        l.extend(listed(&[&z]));
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        assert_eq!(repair(&[&a, &b, &z], &l), "");
    }

    #[test]
    fn a_missing_jump_puts_all_of_ours_back_in_order() {
        let (a, b, z) = (
            j("FORWARD", "A", Position::First),
            j("FORWARD", "B", Position::First),
            j("FORWARD", "Z", Position::Last),
        );
        let l = listed(&[&b, &z]);
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        assert_eq!(
            repair(&[&a, &b, &z], &l),
            "-D FORWARD -m comment --comment \"to B\" -j B\n\
             -D FORWARD -m comment --comment \"to Z\" -j Z\n\
             -I FORWARD 1 -m comment --comment \"to B\" -j B\n\
             -I FORWARD 1 -m comment --comment \"to A\" -j A\n\
             -A FORWARD -m comment --comment \"to Z\" -j Z\n"
        );
    }

    #[test]
    fn out_of_order_and_doubled_jumps_are_repaired() {
        let (a, b) = (
            j("FORWARD", "A", Position::First),
            j("FORWARD", "B", Position::First),
        );
        let swapped = listed(&[&b, &a]);
        let swapped: Vec<&str> = swapped.iter().map(String::as_str).collect();
        assert!(repair(&[&a, &b], &swapped).contains("-I FORWARD 1"));
        let doubled = listed(&[&a, &a, &b]);
        let doubled: Vec<&str> = doubled.iter().map(String::as_str).collect();
        assert_eq!(repair(&[&a, &b], &doubled).matches("-D FORWARD").count(), 3);
    }

    #[test]
    fn a_jump_is_known_by_target_and_comment_however_spelled() {
        let k = Jump::new(
            TableName::Filter,
            "FORWARD",
            "-m conntrack --ctstate NEW ",
            "kubernetes service portals",
            "KUBE-SERVICES",
            Position::First,
        );
        assert!(k.is("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"));
        assert!(k.is("-A FORWARD -m comment --comment \"kubernetes service portals\" -m conntrack --ctstate NEW -j KUBE-SERVICES"));
        assert!(!k.is("-A FORWARD -m comment --comment \"kubernetes service portals\" -j KUBE-EXTERNAL-SERVICES"));
        assert_eq!(
            k.command(),
            "-t filter -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        );
    }
}
