//! Removing what rsdn wrote into one backend's tables (`rsdn cleanup`), by the ownership the
//! engine itself uses: a chain is ours if a producer's `owner()` says so (the engine deletes
//! stale chains by the same test), a rule of a built-in chain is ours if it is one of the
//! producers' declared jumps (`jumps::removal`). Everything else stays: other chains, other
//! rules of the built-in chains. A chain of ours that a rule not of ours still jumps to (a
//! foreign chain using KUBE-MARK-MASQ, a jump added by hand) stays too, with what it holds
//! and what it jumps to: deleting it would fail, and emptying it would change what the other
//! rule does.
//!
//! Computed as data from `iptables-save` (`plan`), applied in one `iptables-restore` per
//! backend (`apply`): a table is one transaction, so no packet sees it half cleaned.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::jumps::{self, Jump};
use super::payload::Owns;
use super::ruleset::{target, TableName};
use super::save::Saved;
use super::tools::{Iptables, IptablesError};

/// What to remove from one backend's tables, and what of ours stays.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The restore payload (empty: nothing of ours is there).
    pub payload: String,
    /// Rules of built-in chains deleted, as listed (`-A PREROUTING ... -j KUBE-SERVICES`).
    pub jumps: Vec<(TableName, String)>,
    pub chains: Vec<(TableName, String)>,
    /// Chains of ours left in place, and why.
    pub kept: Vec<(TableName, String, String)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }
}

/// The plan for the tables `saved` (each table's `iptables-save`).
pub fn plan(saved: &[(TableName, Saved)], owned: Owns, ours: &[Jump]) -> Plan {
    let mut out = Plan::default();
    let jumps::Removal {
        lines: jump_lines,
        removed,
    } = jumps::removal(ours, jumps::listing_from(saved));
    out.jumps = removed;
    for (table, s) in saved {
        let table = *table;
        let builtin = |c: &str| table.builtin().contains(&c);
        let mine = |c: &str| !builtin(c) && owned(table, c);
        // Chains of ours a rule not of ours jumps to, then what those jump to.
        let mut kept: BTreeMap<String, String> = BTreeMap::new();
        for (chain, rules) in &s.chains {
            if mine(chain) {
                continue;
            }
            for rule in rules {
                let ours_jump =
                    builtin(chain) && out.jumps.iter().any(|(t, r)| *t == table && r == rule);
                match target(rule) {
                    Some(to) if mine(to) && !ours_jump => {
                        kept.entry(to.to_string())
                            .or_insert_with(|| format!("a rule of {chain} jumps to it: {rule}"));
                    }
                    _ => {}
                }
            }
        }
        let mut todo: Vec<String> = kept.keys().cloned().collect();
        while let Some(chain) = todo.pop() {
            for rule in s.rules(&chain).unwrap_or_default() {
                if let Some(to) = target(rule).filter(|t| mine(t) && !kept.contains_key(*t)) {
                    kept.insert(to.to_string(), format!("{chain}, which stays, jumps to it"));
                    todo.push(to.to_string());
                }
            }
        }
        let gone: BTreeSet<&str> = s
            .chains
            .keys()
            .copied()
            .filter(|c| mine(c) && !kept.contains_key(*c))
            .collect();
        let jumps = jump_lines.get(&table);
        if !gone.is_empty() || jumps.is_some() {
            let _ = writeln!(out.payload, "*{table}");
            out.payload.push_str(jumps.map_or("", String::as_str));
            // Declaring a chain empties it: then no chain of ours refers to another.
            for c in &gone {
                let _ = writeln!(out.payload, ":{c} - [0:0]");
            }
            for c in &gone {
                let _ = writeln!(out.payload, "-X {c}");
            }
            out.payload.push_str("COMMIT\n");
        }
        out.chains
            .extend(gone.iter().map(|c| (table, c.to_string())));
        out.kept
            .extend(kept.into_iter().map(|(c, why)| (table, c, why)));
    }
    out
}

/// Removes what `plan` says from the tables `saved` (as read from `ipt`): one restore.
pub fn apply(
    ipt: &impl Iptables,
    saved: &[(TableName, Saved)],
    owned: Owns,
    ours: &[Jump],
) -> Result<Plan, IptablesError> {
    let plan = plan(saved, owned, ours);
    if !plan.is_empty() {
        ipt.restore(&plan.payload)?;
    }
    Ok(plan)
}

/// The tables of `ipt`, as `iptables-save -t TABLE` prints them.
pub fn save_all(
    ipt: &impl Iptables,
    tables: &[TableName],
) -> Result<Vec<(TableName, String)>, IptablesError> {
    tables.iter().map(|t| Ok((*t, ipt.save(*t)?))).collect()
}

/// The chain kube-proxy (iptables or ipvs mode) keeps in each table it writes, to notice a
/// flush; rsdn never creates it.
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";

/// Whether kube-proxy runs, or ran, in these tables: its `KUBE-*` chains and jumps are then
/// indistinguishable from the Service proxy's.
pub fn kube_proxy_canary(saved: &[(TableName, Saved)]) -> bool {
    saved
        .iter()
        .any(|(_, s)| s.chains.contains_key(KUBE_PROXY_CANARY))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::fake::FakeIptables;
    use crate::netfilter::jumps::Position;

    fn ours(_: TableName, c: &str) -> bool {
        c.starts_with("RSDN-") || c == "KUBE-SERVICES" || c == "KUBE-MARK-MASQ"
    }

    fn jumps() -> Vec<Jump> {
        [
            (
                TableName::Nat,
                "PREROUTING",
                "kubernetes service portals",
                "KUBE-SERVICES",
                Position::First,
            ),
            (
                TableName::Filter,
                "FORWARD",
                "rsdn pod traffic",
                "RSDN-FORWARD",
                Position::Last,
            ),
        ]
        .into_iter()
        .map(|(t, chain, comment, to, at)| Jump::new(t, chain, "", comment, to, at))
        .collect()
    }

    const NAT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
        :KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:RSDN-MASQUERADE - [0:0]\n\
        :FOREIGN - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n\
        -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
        -A PREROUTING -j FOREIGN\n\
        -A KUBE-SERVICES -d 172.30.0.1/32 -j KUBE-MARK-MASQ\n\
        -A FOREIGN -s 10.0.0.0/8 -j ACCEPT\nCOMMIT\n";
    const FILTER: &str = "*filter\n:FORWARD ACCEPT [0:0]\n:RSDN-FORWARD - [0:0]\n\
        :KUBE-FIREWALL - [0:0]\n\
        -A FORWARD -s 10.1.0.0/16 -j DROP\n\
        -A FORWARD -m comment --comment \"rsdn pod traffic\" -j RSDN-FORWARD\n\
        -A RSDN-FORWARD -s 10.128.0.0/14 -j ACCEPT\nCOMMIT\n";

    #[test]
    fn ours_go_in_one_transaction_per_table_and_the_rest_stays() {
        let saved = [
            (TableName::Nat, Saved::parse(NAT)),
            (TableName::Filter, Saved::parse(FILTER)),
        ];
        let p = plan(&saved, &ours, &jumps());
        assert_eq!(
            p.payload,
            "*nat\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             :KUBE-MARK-MASQ - [0:0]\n:KUBE-SERVICES - [0:0]\n:RSDN-MASQUERADE - [0:0]\n\
             -X KUBE-MARK-MASQ\n-X KUBE-SERVICES\n-X RSDN-MASQUERADE\nCOMMIT\n\
             *filter\n\
             -D FORWARD -m comment --comment \"rsdn pod traffic\" -j RSDN-FORWARD\n\
             :RSDN-FORWARD - [0:0]\n-X RSDN-FORWARD\nCOMMIT\n"
        );
        assert_eq!((p.jumps.len(), p.chains.len()), (2, 4));
        assert!(p.kept.is_empty());
        // Nothing of ours: nothing to do.
        let clean = [(TableName::Nat, Saved::parse("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j FOREIGN\n:FOREIGN - [0:0]\nCOMMIT\n"))];
        assert!(plan(&clean, &ours, &jumps()).is_empty());
    }

    #[test]
    fn a_chain_of_ours_a_foreign_rule_jumps_to_stays_with_what_it_jumps_to() {
        let nat = NAT.replace(
            "-A FOREIGN -s 10.0.0.0/8 -j ACCEPT\n",
            "-A FOREIGN -s 10.0.0.0/8 -j KUBE-SERVICES\n",
        );
        let saved = [(TableName::Nat, Saved::parse(&nat))];
        let p = plan(&saved, &ours, &jumps());
        let kept: Vec<&str> = p.kept.iter().map(|(_, c, _)| c.as_str()).collect();
        assert_eq!(kept, ["KUBE-MARK-MASQ", "KUBE-SERVICES"]);
        assert!(
            p.kept[1].2.contains("a rule of FOREIGN jumps to it"),
            "{:?}",
            p.kept
        );
        assert_eq!(p.chains, [(TableName::Nat, "RSDN-MASQUERADE".to_string())]);
        // Our jump goes all the same; a jump of ours added by hand (no comment) is foreign.
        assert_eq!(p.jumps.len(), 1);
        let by_hand = NAT.replace(
            "-A PREROUTING -j FOREIGN\n",
            "-A PREROUTING -j FOREIGN\n-A PREROUTING -j RSDN-MASQUERADE\n",
        );
        let p = plan(&[(TableName::Nat, Saved::parse(&by_hand))], &ours, &jumps());
        assert!(p.kept.iter().any(|(_, c, _)| c == "RSDN-MASQUERADE"));
    }

    /// Against the in-memory iptables, which refuses what the tools refuse (a referenced or
    /// non-empty chain deleted): applied, then nothing of ours is left, and again changes
    /// nothing.
    #[test]
    fn applied_twice_the_second_time_does_nothing() {
        let f = FakeIptables::new();
        // What the tools save is restore input too.
        f.restore(&format!("{NAT}{FILTER}")).unwrap();
        let tables = [TableName::Nat, TableName::Filter];
        let clean = || {
            let texts = save_all(&f, &tables).unwrap();
            let saved: Vec<(TableName, Saved)> =
                texts.iter().map(|(t, s)| (*t, Saved::parse(s))).collect();
            apply(&f, &saved, &ours, &jumps()).unwrap()
        };
        let first = clean();
        assert_eq!((first.jumps.len(), first.chains.len()), (2, 4));
        for (t, c) in [
            (TableName::Nat, "FOREIGN"),
            (TableName::Nat, "KUBE-KUBELET-CANARY"),
            (TableName::Filter, "KUBE-FIREWALL"),
        ] {
            assert!(f.rules(t, c).is_some(), "{c} kept");
        }
        assert_eq!(
            f.rules(TableName::Nat, "PREROUTING").unwrap(),
            ["-j FOREIGN"]
        );
        assert_eq!(
            f.rules(TableName::Filter, "FORWARD").unwrap(),
            ["-s 10.1.0.0/16 -j DROP"]
        );
        let restores = f.restores().len();
        let second = clean();
        assert!(second.is_empty() && second.kept.is_empty());
        assert_eq!(f.restores().len(), restores, "nothing run the second time");
    }

    #[test]
    fn kube_proxys_canary_is_seen_in_any_table() {
        let with = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n";
        assert!(kube_proxy_canary(&[
            (TableName::Nat, Saved::parse(NAT)),
            (TableName::Filter, Saved::parse(with)),
        ]));
        assert!(!kube_proxy_canary(&[(TableName::Nat, Saved::parse(NAT))]));
    }
}
