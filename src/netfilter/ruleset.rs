//! Rulesets as data: the chains rsdn owns, per table, with their rules as iptables-restore
//! input. Producers (the Service proxy, egress masquerade, NetworkPolicy) build them; the engine
//! diffs and applies them.
//!
//! A ruleset has top-level chains per table (few chains, possibly long ones: KUBE-SERVICES) and
//! groups: chains that belong to one unit (a Service port, a pod) and are rendered, cached and
//! compared as a unit. A group's chains live in an `Arc`: a producer that renders an unchanged
//! unit again hands back the same `Arc`, and the diff sees it unchanged without comparing text.

use std::collections::{BTreeMap, HashSet};
use std::fmt::{self, Write as _};
use std::sync::Arc;

/// The tables rsdn writes, in the order a payload writes them: nat first (it holds nearly
/// every rule, so a payload the kernel refuses there changes nothing at all), then filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableName {
    Nat,
    Filter,
}

impl TableName {
    pub const ALL: [TableName; 2] = [TableName::Nat, TableName::Filter];

    pub fn as_str(self) -> &'static str {
        match self {
            TableName::Nat => "nat",
            TableName::Filter => "filter",
        }
    }

    pub fn parse(s: &str) -> Option<TableName> {
        TableName::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The built-in chains of the table.
    pub fn builtin(self) -> &'static [&'static str] {
        match self {
            TableName::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
            TableName::Filter => &["INPUT", "FORWARD", "OUTPUT"],
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The chains of one table: name -> its rules as restore input (`-A CHAIN ...\n` lines, in
/// order). One string per chain, not one per rule: a 10000-Service ruleset has 430000 rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub chains: BTreeMap<String, String>,
}

impl Table {
    /// The chain `name`, declared (empty) if it is new.
    pub fn chain(&mut self, name: &str) -> &mut String {
        // Most calls find the chain: look it up without allocating its name.
        if !self.chains.contains_key(name) {
            self.chains.insert(name.to_string(), String::new());
        }
        self.chains.get_mut(name).expect("just inserted")
    }

    /// Appends `-A chain <args>`, formatted straight into the chain's text: a large ruleset
    /// has hundreds of thousands of rules, and a temporary string per rule showed in profiles.
    pub fn add(&mut self, chain: &str, args: fmt::Arguments) {
        self.open(chain).add(args);
    }

    /// A chain to append several rules to, looked up once.
    pub fn open<'a>(&'a mut self, chain: &'a str) -> Chain<'a> {
        Chain {
            name: chain,
            body: self.chain(chain),
        }
    }

    pub fn rules(&self) -> usize {
        self.chains.values().map(|c| c.lines().count()).sum()
    }

    /// The rules of a chain, one line each.
    pub fn lines(&self, chain: &str) -> Vec<&str> {
        self.chains
            .get(chain)
            .map(|c| c.lines().collect())
            .unwrap_or_default()
    }

    /// Moves every chain of `other` in; a chain both have gets `other`'s rules appended.
    pub fn append(&mut self, other: &Table) {
        for (name, rules) in &other.chains {
            self.chain(name).push_str(rules);
        }
    }
}

/// One chain of a `Table`, open for appending.
pub struct Chain<'a> {
    name: &'a str,
    body: &'a mut String,
}

impl Chain<'_> {
    /// Appends `-A chain <args>`.
    pub fn add(&mut self, args: fmt::Arguments) {
        let _ = writeln!(self.body, "-A {} {args}", self.name);
    }
}

/// Both tables' chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub nat: Table,
    pub filter: Table,
}

impl Tables {
    pub fn get(&self, t: TableName) -> &Table {
        match t {
            TableName::Nat => &self.nat,
            TableName::Filter => &self.filter,
        }
    }

    pub fn get_mut(&mut self, t: TableName) -> &mut Table {
        match t {
            TableName::Nat => &mut self.nat,
            TableName::Filter => &mut self.filter,
        }
    }

    pub fn rules(&self) -> usize {
        self.nat.rules() + self.filter.rules()
    }
}

/// Who renders a group, and which unit it is (a Service port's name, a pod's name): group keys
/// of different producers never collide.
pub type GroupKey = (&'static str, String);

/// Everything some producer owns: top-level chains per table, and groups of chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub tables: Tables,
    pub groups: BTreeMap<GroupKey, Arc<Tables>>,
    /// ipsets the rules match against, by name.
    pub sets: BTreeMap<String, Arc<super::sets::IpSet>>,
}

/// Two producers claimed the same chain or group: a programming error, reported rather than
/// written (the second claim is dropped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is rendered by two producers; the second one's is dropped")]
pub struct Clash {
    pub what: String,
}

impl Ruleset {
    /// Adds another producer's ruleset. Chains and groups must not overlap.
    pub fn absorb(&mut self, other: Ruleset) -> Result<(), Clash> {
        let mut clash = None;
        for t in TableName::ALL {
            let mine = self.tables.get_mut(t);
            for (name, rules) in other.tables.get(t).chains.iter() {
                if mine.chains.contains_key(name) {
                    clash.get_or_insert_with(|| Clash {
                        what: format!("chain {t}/{name}"),
                    });
                    continue;
                }
                mine.chains.insert(name.clone(), rules.clone());
            }
        }
        for (key, group) in other.groups {
            if self.groups.contains_key(&key) {
                clash.get_or_insert_with(|| Clash {
                    what: format!("group {}/{}", key.0, key.1),
                });
                continue;
            }
            self.groups.insert(key, group);
        }
        for (name, set) in other.sets {
            if self.sets.contains_key(&name) {
                clash.get_or_insert_with(|| Clash {
                    what: format!("ipset {name}"),
                });
                continue;
            }
            self.sets.insert(name, set);
        }
        clash.map_or(Ok(()), Err)
    }

    /// A chain of `table`, top-level or in a group.
    pub fn chain(&self, table: TableName, name: &str) -> Option<&String> {
        self.tables.get(table).chains.get(name).or_else(|| {
            self.groups
                .values()
                .find_map(|g| g.get(table).chains.get(name))
        })
    }

    /// Rules of `table`, top-level and in groups.
    pub fn rules(&self, table: TableName) -> usize {
        self.tables.get(table).rules()
            + self
                .groups
                .values()
                .map(|g| g.get(table).rules())
                .sum::<usize>()
    }

    /// Every chain of `table` with its rules, top-level first.
    pub fn chains(&self, table: TableName) -> impl Iterator<Item = (&String, &String)> {
        self.tables.get(table).chains.iter().chain(
            self.groups
                .values()
                .flat_map(move |g| g.get(table).chains.iter()),
        )
    }

    /// The names of every chain of `table`.
    pub fn chain_names(&self, table: TableName) -> HashSet<&str> {
        self.chains(table).map(|(n, _)| n.as_str()).collect()
    }
}

/// `-m comment --comment "<text>"`, for a phrase: quoted, as iptables-save prints a comment
/// with spaces.
pub struct Quoted<T>(pub T);

impl<T: fmt::Display> fmt::Display for Quoted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-m comment --comment \"{}\"", self.0)
    }
}

/// `-m comment --comment <text>`, for a name without spaces or quotes (a Service port's
/// `namespace/name:port`, which the model admits only in that form).
pub struct Plain<T>(pub T);

impl<T: fmt::Display> fmt::Display for Plain<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-m comment --comment {}", self.0)
    }
}

/// The first 16 base32 characters of the SHA-256 of the parts, concatenated: those are the
/// encoding of the first 10 bytes (base32 turns each 5 bytes into 8 characters). kube-proxy
/// names its chains so; rsdn names its own chains and sets the same way.
pub fn hash16(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut sha = Sha256::new();
    for part in parts {
        sha.update(part.as_bytes());
    }
    data_encoding::BASE32.encode(&sha.finalize()[..10])
}

/// The target of a rule as restore input or iptables-save prints it: the word after the last
/// `-j`/`-g` (None: a rule without a target, such as a comment-only rule).
pub fn target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    let mut found = None;
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            found = words.next();
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_appended_per_chain_and_counted() {
        let mut t = Table::default();
        t.add("A", format_args!("-j B"));
        let mut c = t.open("A");
        c.add(format_args!("{} -j RETURN", Quoted("a phrase")));
        t.add("B", format_args!("{} -j ACCEPT", Plain("ns/svc:p")));
        assert_eq!(
            t.lines("A"),
            [
                "-A A -j B",
                "-A A -m comment --comment \"a phrase\" -j RETURN"
            ]
        );
        assert_eq!(t.rules(), 3);
        assert_eq!(
            target("-A A -m comment --comment \"x -j y\" -j RETURN"),
            Some("RETURN")
        );
        assert_eq!(target("-A KUBE-FW-X -m comment --comment x"), None);
    }

    #[test]
    fn producers_are_combined_and_clashes_reported() {
        let mut a = Ruleset::default();
        a.tables.nat.add("KUBE-SERVICES", format_args!("-j RETURN"));
        let mut g = Tables::default();
        g.nat.add("KUBE-SVC-X", format_args!("-j KUBE-SEP-Y"));
        a.groups.insert(("proxy", "ns/a".into()), Arc::new(g));
        let mut b = Ruleset::default();
        b.tables
            .filter
            .add("RSDN-FORWARD", format_args!("-j ACCEPT"));
        a.absorb(b).unwrap();
        assert_eq!(a.rules(TableName::Nat), 2);
        assert_eq!(a.rules(TableName::Filter), 1);
        assert!(a.chain(TableName::Nat, "KUBE-SVC-X").is_some());
        let mut c = Ruleset::default();
        c.tables.nat.add("KUBE-SERVICES", format_args!("-j ACCEPT"));
        let e = a.absorb(c).unwrap_err();
        assert!(e.what.contains("nat/KUBE-SERVICES"), "{e}");
        assert_eq!(
            a.tables.nat.lines("KUBE-SERVICES"),
            ["-A KUBE-SERVICES -j RETURN"]
        );
    }
}
