//! ipsets as data, and the `ipset restore` input that moves the kernel from one collection of
//! sets to another. A changed set is filled as a temporary set and swapped in (atomic for
//! every packet: a lookup sees the old members or the new ones); a new set is created and
//! filled before any rule refers to it; a set no rule needs any more is destroyed after the
//! rules stopped referring to it (`destroy` of a set in use fails).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::sync::Arc;

use ipnet::Ipv4Net;

/// Every set of rsdn's is named with this prefix: a full sync destroys stale ones.
pub const PREFIX: &str = "RSDN-";

/// The set types rsdn uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// Addresses (pods).
    HashIp,
    /// Networks, with `nomatch` entries for exceptions (ipBlocks).
    HashNet,
    /// Address and protocol:port (pods by a named port).
    HashIpPort,
}

impl SetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SetKind::HashIp => "hash:ip",
            SetKind::HashNet => "hash:net",
            SetKind::HashIpPort => "hash:ip,port",
        }
    }
}

/// Room for large clusters (the default is 65536 members).
pub const MAX_ELEMENTS: u32 = 1 << 20;

/// One set: its type and members, each spelled as `ipset save` prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpSet {
    pub kind: SetKind,
    pub members: BTreeSet<String>,
}

impl IpSet {
    pub fn new(kind: SetKind) -> IpSet {
        IpSet {
            kind,
            members: BTreeSet::new(),
        }
    }

    /// A network member, as ipset prints it (a /32 as the bare address). ipset has no /0: the
    /// whole address space is two /1s. A network is one element, matching or `nomatch`: a
    /// `nomatch` entry wins over a matching one for the same network (an except equal to the
    /// half of a /0), as the kernel keeps only one of them.
    pub fn add_net(&mut self, net: Ipv4Net, nomatch: bool) {
        let nets: Vec<String> = if net.prefix_len() == 0 {
            vec!["0.0.0.0/1".into(), "128.0.0.0/1".into()]
        } else if net.prefix_len() == 32 {
            vec![net.addr().to_string()]
        } else {
            vec![net.trunc().to_string()]
        };
        for n in nets {
            let excluded = format!("{n} nomatch");
            if nomatch {
                self.members.remove(&n);
                self.members.insert(excluded);
            } else if !self.members.contains(&excluded) {
                self.members.insert(n);
            }
        }
    }
}

/// `create` line of a set.
struct Create<'a>(&'a str, SetKind);

impl fmt::Display for Create<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "create {} {} family inet maxelem {MAX_ELEMENTS} -exist",
            self.0,
            self.1.as_str()
        )
    }
}

/// The temporary name a set is filled under before it is swapped in (sets are named with at
/// most 31 characters; rsdn's are shorter than 28).
pub fn temporary(name: &str) -> String {
    format!("{name}-t")
}

/// What a sets payload does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SetsPayload {
    /// Before the iptables payload: creations and changes.
    pub before: String,
    /// After it: destructions.
    pub after: String,
    pub written: BTreeSet<String>,
    pub destroyed: BTreeSet<String>,
}

/// The payloads that turn `old` (None: unknown, write everything) into `new`. `kernel`: the
/// sets the kernel holds where known, for destroying stale sets of ours (`owned`) and for not
/// destroying sets that are not there.
pub fn payload(
    old: Option<&BTreeMap<String, Arc<IpSet>>>,
    new: &BTreeMap<String, Arc<IpSet>>,
    dirty: &BTreeSet<String>,
    kernel: Option<&BTreeSet<String>>,
    owned: &dyn Fn(&str) -> bool,
) -> SetsPayload {
    let mut out = SetsPayload::default();
    for (name, set) in new {
        let same = old
            .and_then(|o| o.get(name))
            .is_some_and(|was| Arc::ptr_eq(was, set) || **was == **set);
        if same && !dirty.contains(name) {
            continue;
        }
        let tmp = temporary(name);
        let b = &mut out.before;
        let _ = writeln!(b, "{}", Create(name, set.kind));
        let _ = writeln!(b, "{}", Create(&tmp, set.kind));
        let _ = writeln!(b, "flush {tmp}");
        for m in &set.members {
            let _ = writeln!(b, "add {tmp} {m}");
        }
        let _ = writeln!(b, "swap {tmp} {name}");
        let _ = writeln!(b, "destroy {tmp}");
        out.written.insert(name.clone());
    }
    let mut gone: BTreeSet<&str> = old
        .into_iter()
        .flatten()
        .map(|(n, _)| n.as_str())
        .filter(|n| !new.contains_key(*n))
        .collect();
    if let Some(kernel) = kernel {
        // A temporary left by a crash is filled and destroyed with its set: not stale.
        gone.extend(
            kernel
                .iter()
                .map(String::as_str)
                .filter(|n| owned(n) && !new.contains_key(*n))
                .filter(|n| {
                    n.strip_suffix("-t")
                        .is_none_or(|base| !new.contains_key(base))
                }),
        );
        gone.retain(|n| kernel.contains(*n));
    }
    for name in gone {
        let _ = writeln!(out.after, "destroy {name}");
        out.destroyed.insert(name.to_string());
    }
    out
}

/// The sets in an `ipset save` output, by name.
pub fn parse_save(text: &str) -> BTreeMap<String, IpSet> {
    let mut out: BTreeMap<String, IpSet> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.splitn(3, ' ');
        match (w.next(), w.next(), w.next()) {
            (Some("create"), Some(name), Some(rest)) => {
                let kind = match rest.split(' ').next() {
                    Some("hash:net") => SetKind::HashNet,
                    Some("hash:ip,port") => SetKind::HashIpPort,
                    _ => SetKind::HashIp,
                };
                out.insert(name.to_string(), IpSet::new(kind));
            }
            (Some("add"), Some(name), Some(member)) => {
                if let Some(s) = out.get_mut(name) {
                    s.members.insert(member.to_string());
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(kind: SetKind, members: &[&str]) -> Arc<IpSet> {
        Arc::new(IpSet {
            kind,
            members: members.iter().map(|m| m.to_string()).collect(),
        })
    }

    #[test]
    fn changed_sets_are_swapped_in_and_gone_ones_destroyed_after_the_rules() {
        let old = BTreeMap::from([
            ("RSDN-A".to_string(), set(SetKind::HashIp, &["10.0.0.1"])),
            ("RSDN-B".to_string(), set(SetKind::HashIp, &["10.0.0.2"])),
            ("RSDN-GONE".to_string(), set(SetKind::HashIp, &[])),
        ]);
        let mut new = old.clone();
        new.remove("RSDN-GONE");
        new.insert(
            "RSDN-B".into(),
            set(SetKind::HashIp, &["10.0.0.2", "10.0.0.3"]),
        );
        let p = payload(Some(&old), &new, &BTreeSet::new(), None, &|_| true);
        assert_eq!(
            p.before,
            "create RSDN-B hash:ip family inet maxelem 1048576 -exist\n\
             create RSDN-B-t hash:ip family inet maxelem 1048576 -exist\nflush RSDN-B-t\n\
             add RSDN-B-t 10.0.0.2\nadd RSDN-B-t 10.0.0.3\nswap RSDN-B-t RSDN-B\ndestroy RSDN-B-t\n"
        );
        assert_eq!(p.after, "destroy RSDN-GONE\n");
        // Nothing changed: nothing to do; a dirty set is written again.
        let p = payload(Some(&new), &new, &BTreeSet::new(), None, &|_| true);
        assert!(p.before.is_empty() && p.after.is_empty());
        let dirty = BTreeSet::from(["RSDN-A".to_string()]);
        assert_eq!(
            payload(Some(&new), &new, &dirty, None, &|_| true).written,
            dirty
        );
    }

    #[test]
    fn a_full_write_destroys_stale_sets_of_ours_that_exist_only() {
        let new = BTreeMap::from([("RSDN-A".to_string(), set(SetKind::HashIp, &[]))]);
        let kernel: BTreeSet<String> = ["RSDN-A", "RSDN-A-t", "RSDN-STALE", "FOREIGN"]
            .map(String::from)
            .into();
        let p = payload(None, &new, &BTreeSet::new(), Some(&kernel), &|n| {
            n.starts_with("RSDN-")
        });
        assert_eq!(p.after, "destroy RSDN-STALE\n");
        assert!(p.written.contains("RSDN-A"));
    }

    #[test]
    fn members_are_spelled_as_ipset_prints_them() {
        let mut s = IpSet::new(SetKind::HashNet);
        s.add_net("10.1.1.1/32".parse().unwrap(), false);
        s.add_net("10.128.0.0/14".parse().unwrap(), true);
        s.add_net("0.0.0.0/0".parse().unwrap(), false);
        assert_eq!(
            s.members.iter().cloned().collect::<Vec<_>>(),
            [
                "0.0.0.0/1",
                "10.1.1.1",
                "10.128.0.0/14 nomatch",
                "128.0.0.0/1"
            ]
        );
        // 0.0.0.0/0 except 0.0.0.0/1: one element per network, the exception wins.
        s.add_net("0.0.0.0/1".parse().unwrap(), true);
        s.add_net("0.0.0.0/0".parse().unwrap(), false);
        assert!(s.members.contains("0.0.0.0/1 nomatch") && !s.members.contains("0.0.0.0/1"));
        let saved = "create RSDN-A hash:net family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x1\nadd RSDN-A 10.1.1.1\nadd RSDN-A 10.128.0.0/14 nomatch\ncreate RSDN-B hash:ip,port family inet\nadd RSDN-B 10.1.1.1,tcp:80\n";
        let sets = parse_save(saved);
        assert_eq!(sets["RSDN-A"].kind, SetKind::HashNet);
        assert_eq!(sets["RSDN-A"].members.len(), 2);
        assert!(sets["RSDN-B"].members.contains("10.1.1.1,tcp:80"));
    }
}
