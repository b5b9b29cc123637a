//! An in-memory iptables for tests of the engine's policies (what is written when, what a
//! failure leaves behind, how drift is found), without root and without the tools. It applies
//! restore payloads with the real tools' semantics that matter here: one transaction per
//! table, `--noflush`, `:CHAIN` creates or flushes, deleting a missing or referenced chain or
//! rule fails the table, a jump to a missing chain fails. `save` spells addresses the way the
//! real tools do (`-d 10.0.0.1` comes back as `-d 10.0.0.1/32`), so the engine cannot get away
//! with comparing its own text to the kernel's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use super::backend::Backend;
use super::ruleset::{target, TableName};
use super::sets::{IpSet, SetKind};
use super::tools::{Iptables, IptablesError};

type Chains = BTreeMap<String, Vec<String>>;

#[derive(Debug, Default)]
struct State {
    tables: BTreeMap<TableName, Chains>,
    /// Every payload restored, refused ones included.
    restores: Vec<String>,
    saves: usize,
    lists: usize,
    /// A payload line containing this is refused.
    refuse: Option<String>,
    sets: BTreeMap<String, IpSet>,
    /// Packet counters set by tests, per (table, chain).
    counters: BTreeMap<(TableName, String), Vec<u64>>,
}

/// Shared by the test (which looks and does damage) and the engine (which owns a clone).
#[derive(Debug, Clone, Default)]
pub struct FakeIptables {
    state: Arc<Mutex<State>>,
}

fn builtin(table: TableName) -> Chains {
    table
        .builtin()
        .iter()
        .map(|c| (c.to_string(), Vec::new()))
        .collect()
}

fn is_builtin(table: TableName, chain: &str) -> bool {
    table.builtin().contains(&chain)
}

/// Targets that are not chains.
fn is_extension(target: &str) -> bool {
    !target.contains('-') && target.chars().all(|c| c.is_ascii_uppercase())
}

/// `-d 10.0.0.1` -> `-d 10.0.0.1/32`, as iptables-save prints a host address.
fn canonical(rule: &str) -> String {
    let words: Vec<&str> = rule.split(' ').collect();
    let mut out = Vec::with_capacity(words.len());
    for (i, w) in words.iter().enumerate() {
        let after_addr_flag = i > 0 && matches!(words[i - 1], "-d" | "-s");
        if after_addr_flag && !w.contains('/') && w.parse::<std::net::Ipv4Addr>().is_ok() {
            out.push(format!("{w}/32"));
        } else {
            out.push(w.to_string());
        }
    }
    out.join(" ")
}

impl FakeIptables {
    pub fn new() -> FakeIptables {
        FakeIptables::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Refuse every payload with a line containing `pattern` (None: accept again).
    pub fn refuse(&self, pattern: Option<&str>) {
        self.with(|s| s.refuse = pattern.map(str::to_string));
    }

    /// The payloads restored so far (refused ones included).
    pub fn restores(&self) -> Vec<String> {
        self.with(|s| s.restores.clone())
    }

    /// How many times a table was saved and a chain listed.
    pub fn reads(&self) -> (usize, usize) {
        self.with(|s| (s.saves, s.lists))
    }

    /// The rules of a chain as restore input spelled them (None: no such chain).
    pub fn rules(&self, table: TableName, chain: &str) -> Option<Vec<String>> {
        self.with(|s| s.tables.get(&table)?.get(chain).cloned())
    }

    /// The sets as the kernel holds them.
    pub fn sets(&self) -> BTreeMap<String, IpSet> {
        self.with(|s| s.sets.clone())
    }

    /// Damage by hand: `f` gets the sets.
    pub fn tamper_sets(&self, f: impl FnOnce(&mut BTreeMap<String, IpSet>)) {
        self.with(|s| f(&mut s.sets));
    }

    /// Sets a chain's packet counters, as traffic would.
    pub fn count(&self, table: TableName, chain: &str, packets: Vec<u64>) {
        self.with(|s| {
            s.counters.insert((table, chain.to_string()), packets);
        });
    }

    fn apply_sets(state: &mut State, payload: &str) -> Result<(), (usize, String)> {
        for (i, line) in payload.lines().enumerate() {
            let fail = |why: &str| Err((i + 1, format!("{why}: {line}")));
            if state.refuse.as_deref().is_some_and(|p| line.contains(p)) {
                return fail("refused");
            }
            let w: Vec<&str> = line.split(' ').collect();
            let sets = &mut state.sets;
            match w.as_slice() {
                ["create", name, kind, ..] => {
                    let kind = match *kind {
                        "hash:net" => SetKind::HashNet,
                        "hash:ip,port" => SetKind::HashIpPort,
                        _ => SetKind::HashIp,
                    };
                    match sets.get(*name) {
                        Some(s) if s.kind != kind => return fail("set exists with another type"),
                        Some(_) if !line.ends_with("-exist") => return fail("set exists"),
                        Some(_) => {}
                        None => {
                            sets.insert(name.to_string(), IpSet::new(kind));
                        }
                    }
                }
                ["flush", name] => match sets.get_mut(*name) {
                    Some(s) => s.members.clear(),
                    None => return fail("no such set"),
                },
                ["add", name, member @ ..] => match sets.get_mut(*name) {
                    Some(s) => {
                        // One element per network: the kernel keeps one of `net` and
                        // `net nomatch`, the one added last.
                        let element = member[0];
                        s.members.remove(element);
                        s.members.remove(&format!("{element} nomatch"));
                        s.members.insert(member.join(" "));
                    }
                    None => return fail("no such set"),
                },
                ["swap", a, b] => {
                    let (Some(x), Some(y)) = (sets.remove(*a), sets.remove(*b)) else {
                        return fail("no such set");
                    };
                    sets.insert(a.to_string(), y);
                    sets.insert(b.to_string(), x);
                }
                ["destroy", name] => {
                    let used = state
                        .tables
                        .values()
                        .flat_map(|t| t.values().flatten())
                        .any(|r| r.contains(&format!("--match-set {name} ")));
                    if used {
                        return fail("set in use");
                    }
                    if state.sets.remove(*name).is_none() {
                        return fail("no such set");
                    }
                }
                _ => return fail("cannot parse"),
            }
        }
        Ok(())
    }

    /// Damage by hand: `f` gets the table's chains.
    pub fn tamper(&self, table: TableName, f: impl FnOnce(&mut BTreeMap<String, Vec<String>>)) {
        self.with(|s| f(s.tables.entry(table).or_insert_with(|| builtin(table))));
    }

    fn apply(state: &mut State, payload: &str) -> Result<(), (usize, String)> {
        let mut current: Option<(TableName, Chains)> = None;
        for (i, line) in payload.lines().enumerate() {
            let n = i + 1;
            let fail = |why: &str| Err((n, format!("{why}: {line}")));
            if state.refuse.as_deref().is_some_and(|p| line.contains(p)) {
                return fail("refused");
            }
            if let Some(name) = line.strip_prefix('*') {
                let Some(t) = TableName::parse(name) else {
                    return fail("unknown table");
                };
                let chains = state.tables.get(&t).cloned().unwrap_or_else(|| builtin(t));
                current = Some((t, chains));
                continue;
            }
            if line == "COMMIT" {
                let Some((t, chains)) = current.take() else {
                    return fail("COMMIT outside a table");
                };
                state.tables.insert(t, chains);
                continue;
            }
            let Some((t, chains)) = current.as_mut() else {
                return fail("outside a table");
            };
            let t = *t;
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                [decl, ..] if decl.starts_with(':') => {
                    let name = &decl[1..];
                    if !is_builtin(t, name) {
                        chains.insert(name.to_string(), Vec::new());
                    }
                }
                ["-A", chain, ..] | ["-I", chain, ..] | ["-D", chain, ..] => {
                    let skip = if words[0] == "-I" { 3 } else { 2 };
                    let rule = words.get(skip..).unwrap_or_default().join(" ");
                    if let Some(to) = target(&rule) {
                        if !is_extension(to) && !chains.contains_key(to) {
                            return fail("no chain/target by that name");
                        }
                    }
                    if let Some(at) = rule.find("--match-set ") {
                        let set = rule[at + 12..].split(' ').next().unwrap_or_default();
                        if !state.sets.contains_key(set) {
                            return fail("set does not exist");
                        }
                    }
                    let Some(rules) = chains.get_mut(*chain) else {
                        return fail("no chain by that name");
                    };
                    let rule = canonical(&rule);
                    match words[0] {
                        "-A" => rules.push(rule),
                        "-I" => {
                            let at: usize = words[2].parse().unwrap_or(1);
                            rules.insert((at - 1).min(rules.len()), rule);
                        }
                        _ => match rules.iter().position(|r| *r == rule) {
                            Some(p) => {
                                rules.remove(p);
                            }
                            None => return fail("bad rule (does a matching rule exist?)"),
                        },
                    }
                }
                ["-X", chain] => {
                    match chains.get(*chain) {
                        None => return fail("no chain by that name"),
                        Some(r) if !r.is_empty() => return fail("directory not empty"),
                        _ => {}
                    }
                    let referenced = chains.values().flatten().any(|r| target(r) == Some(*chain));
                    if referenced {
                        return fail("too many links");
                    }
                    chains.remove(*chain);
                }
                _ => return fail("cannot parse"),
            }
        }
        if current.is_some() {
            return Err((payload.lines().count(), "no COMMIT".into()));
        }
        Ok(())
    }
}

impl Iptables for FakeIptables {
    fn backend(&self) -> Backend {
        Backend::Nft
    }

    fn save(&self, table: TableName) -> Result<String, IptablesError> {
        self.with(|s| {
            s.saves += 1;
            let mut out = format!("# Generated by the fake\n*{table}\n");
            let chains = s
                .tables
                .get(&table)
                .cloned()
                .unwrap_or_else(|| builtin(table));
            for name in chains.keys() {
                let policy = if is_builtin(table, name) {
                    "ACCEPT"
                } else {
                    "-"
                };
                let _ = writeln!(out, ":{name} {policy} [0:0]");
            }
            for (name, rules) in &chains {
                for r in rules {
                    let _ = writeln!(out, "-A {name} {r}");
                }
            }
            out.push_str("COMMIT\n");
            Ok(out)
        })
    }

    fn restore(&self, payload: &str) -> Result<(), IptablesError> {
        self.with(|s| {
            s.restores.push(payload.to_string());
            // Each table is its own transaction: a refused table leaves it and the ones after
            // it as they were, the ones before it committed.
            FakeIptables::apply(s, payload).map_err(|(n, why)| IptablesError::Restore {
                tool: "fake-restore".into(),
                stderr: why,
                line: payload.lines().nth(n - 1).map(|l| (n, l.to_string())),
            })
        })
    }

    fn ipset_save(&self) -> Result<String, IptablesError> {
        self.with(|s| {
            let mut out = String::new();
            for (name, set) in &s.sets {
                let _ = writeln!(
                    out,
                    "create {name} {} family inet hashsize 1024 maxelem 1048576",
                    set.kind.as_str()
                );
                for m in &set.members {
                    let _ = writeln!(out, "add {name} {m}");
                }
            }
            Ok(out)
        })
    }

    fn ipset_restore(&self, payload: &str) -> Result<(), IptablesError> {
        self.with(|s| {
            s.restores.push(payload.to_string());
            FakeIptables::apply_sets(s, payload).map_err(|(n, why)| IptablesError::Restore {
                tool: "fake-ipset".into(),
                stderr: why,
                line: payload.lines().nth(n - 1).map(|l| (n, l.to_string())),
            })
        })
    }

    fn packets(&self, table: TableName, chain: &str) -> Result<Option<Vec<u64>>, IptablesError> {
        self.with(|s| {
            let n = s
                .tables
                .get(&table)
                .and_then(|t| t.get(chain))
                .map(Vec::len);
            Ok(n.map(|n| {
                let mut c = s
                    .counters
                    .get(&(table, chain.to_string()))
                    .cloned()
                    .unwrap_or_default();
                c.resize(n, 0);
                c
            }))
        })
    }

    fn list(&self, table: TableName, chain: &str) -> Result<Option<String>, IptablesError> {
        self.with(|s| {
            s.lists += 1;
            let chains = s
                .tables
                .get(&table)
                .cloned()
                .unwrap_or_else(|| builtin(table));
            let Some(rules) = chains.get(chain) else {
                return Ok(None);
            };
            let mut out = if is_builtin(table, chain) {
                format!("-P {chain} ACCEPT\n")
            } else {
                format!("-N {chain}\n")
            };
            for r in rules {
                let _ = writeln!(out, "-A {chain} {r}");
            }
            Ok(Some(out))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_commit_one_by_one_and_refuse_what_the_tools_refuse() {
        let f = FakeIptables::new();
        f.restore("*nat\n:A - [0:0]\n-A A -d 10.0.0.1 -j RETURN\n-A PREROUTING -j A\nCOMMIT\n")
            .unwrap();
        assert_eq!(
            f.rules(TableName::Nat, "A").unwrap(),
            ["-d 10.0.0.1/32 -j RETURN"]
        );
        // The referenced chain cannot go; the nat table stays as it was.
        let e = f.restore("*nat\n:A - [0:0]\n-X A\nCOMMIT\n").unwrap_err();
        assert_eq!(
            e.failed_table("*nat\n:A - [0:0]\n-X A\nCOMMIT\n"),
            Some(TableName::Nat)
        );
        assert_eq!(f.rules(TableName::Nat, "A").unwrap().len(), 1);
        // nat commits, filter is refused.
        f.refuse(Some("NOPE"));
        let p = "*nat\n:B - [0:0]\nCOMMIT\n*filter\n:C - [0:0]\n-A C -j NOPE\nCOMMIT\n";
        assert!(f.restore(p).is_err());
        assert!(f.rules(TableName::Nat, "B").is_some());
        assert!(f.rules(TableName::Filter, "C").is_none());
        let save = f.save(TableName::Nat).unwrap();
        assert!(
            save.contains(":PREROUTING ACCEPT [0:0]\n") && save.contains("-A PREROUTING -j A\n"),
            "{save}"
        );
        assert!(f.list(TableName::Nat, "NONE").unwrap().is_none());
        assert_eq!(f.list(TableName::Nat, "B").unwrap().unwrap(), "-N B\n");
    }
}
