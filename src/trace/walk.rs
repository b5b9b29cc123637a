//! A packet's walk through iptables chains, as the kernel walks it: rule by rule, into jumped
//! chains and back on RETURN or at their end, until a terminating target or the built-in
//! chain's policy. A statistic match forks the walk (one outcome per way it can go, each with
//! its probability), so a Service's walk yields one outcome per endpoint.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde::Serialize;

use super::rule::{Env, Packet, Rule, Target, Verdict};
use crate::netfilter::jumps::{Jump, Position};
use crate::netfilter::ruleset::{Ruleset, TableName};

/// The chains of the nat and filter tables as parsed rules: the model's (a rendered ruleset
/// with its jumps as the built-in chains) or the kernel's (iptables-save).
#[derive(Debug, Clone, Default)]
pub struct Chains {
    rules: HashMap<(TableName, String), Vec<Rule>>,
    policies: HashMap<(TableName, String), String>,
}

impl Chains {
    /// The model's chains: every chain of the ruleset, and the built-in chains holding exactly
    /// the jumps (first ones in their order, then the appended ones).
    pub fn from_ruleset(ruleset: &Ruleset, jumps: &[Jump]) -> Chains {
        let mut c = Chains::default();
        for table in TableName::ALL {
            for (name, text) in ruleset.chains(table) {
                c.rules.insert(
                    (table, name.clone()),
                    text.lines().map(Rule::parse).collect(),
                );
            }
            for builtin in table.builtin() {
                let mine = |pos| {
                    jumps
                        .iter()
                        .filter(move |j| {
                            j.table == table && j.chain == *builtin && j.position == pos
                        })
                        .map(|j| Rule::parse(&format!("-A {} {}", j.chain, j.rule)))
                };
                let rules = mine(Position::First).chain(mine(Position::Last)).collect();
                c.rules.insert((table, builtin.to_string()), rules);
            }
        }
        c
    }

    /// Adds one table of `iptables-save` output (chains, their rules and policies).
    pub fn add_save(&mut self, table: TableName, text: &str) {
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                let mut w = decl.split_whitespace();
                if let (Some(name), Some(policy)) = (w.next(), w.next()) {
                    self.rules.entry((table, name.to_string())).or_default();
                    if policy != "-" {
                        self.policies
                            .insert((table, name.to_string()), policy.to_string());
                    }
                }
            } else if line.starts_with("-A ") {
                let r = Rule::parse(line);
                self.rules
                    .entry((table, r.chain.clone()))
                    .or_default()
                    .push(r);
            }
        }
    }

    pub fn rules(&self, table: TableName, chain: &str) -> Option<&[Rule]> {
        self.rules
            .get(&(table, chain.to_string()))
            .map(Vec::as_slice)
    }

    fn policy(&self, table: TableName, chain: &str) -> String {
        self.policies
            .get(&(table, chain.to_string()))
            .cloned()
            .unwrap_or_else(|| "ACCEPT".into())
    }
}

/// A rule a packet matched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub table: String,
    pub chain: String,
    /// The rule's line (rsdn's spelling for the model, the kernel's for the kernel).
    pub rule: String,
    /// The verdict word: a chain, RETURN, ACCEPT, DNAT, MARK, ...
    pub target: String,
    /// The kernel's line of the same rule, where the kernel was read and agrees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Why it was taken: "random, probability 0.5000" for a statistic match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip)]
    pub key: String,
    #[serde(skip)]
    pub comment: Option<String>,
}

/// How a walk ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// The built-in chain's policy (ACCEPT, or DROP).
    Policy(String),
    Accept,
    Drop,
    Reject,
    Dnat(Ipv4Addr, Option<u16>),
    Masquerade,
    Snat(String),
    /// Jumps nested too deep (a loop).
    Loop,
}

impl End {
    /// Whether the packet goes on.
    pub fn passes(&self) -> bool {
        match self {
            End::Policy(p) => p == "ACCEPT",
            End::Drop | End::Reject | End::Loop => false,
            _ => true,
        }
    }
}

/// One way a walk can go.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub probability: f64,
    pub hits: Vec<Hit>,
    pub end: End,
    /// The packet afterwards (mark set, destination after DNAT).
    pub packet: Packet,
    pub notes: Vec<String>,
}

#[derive(Clone)]
struct State {
    probability: f64,
    hits: Vec<Hit>,
    packet: Packet,
    notes: Vec<String>,
}

enum Flow {
    Returned,
    Done(End),
}

struct Walker<'a> {
    chains: &'a Chains,
    table: TableName,
    env: &'a Env<'a>,
}

const MAX_DEPTH: usize = 32;

/// Every way `packet` can walk from the built-in `chain` of `table`.
pub fn walk(
    chains: &Chains,
    table: TableName,
    chain: &str,
    packet: Packet,
    env: &Env,
) -> Vec<Outcome> {
    let w = Walker { chains, table, env };
    let start = State {
        probability: 1.0,
        hits: vec![],
        packet,
        notes: vec![],
    };
    w.run(chain, 0, start, 0)
        .into_iter()
        .map(|(s, flow)| Outcome {
            probability: s.probability,
            hits: s.hits,
            end: match flow {
                Flow::Done(e) => e,
                Flow::Returned => End::Policy(chains.policy(table, chain)),
            },
            packet: s.packet,
            notes: s.notes,
        })
        .collect()
}

impl Walker<'_> {
    fn builtin(&self, chain: &str) -> bool {
        self.table.builtin().contains(&chain)
    }

    fn run(&self, chain: &str, from: usize, mut st: State, depth: usize) -> Vec<(State, Flow)> {
        if depth > MAX_DEPTH {
            return vec![(st, Flow::Done(End::Loop))];
        }
        let Some(rules) = self.chains.rules(self.table, chain) else {
            st.notes
                .push(format!("{}/{chain} does not exist", self.table));
            return vec![(st, Flow::Returned)];
        };
        for (i, rule) in rules.iter().enumerate().skip(from) {
            match rule.eval(&st.packet, self.env, &mut st.notes) {
                Verdict::No => {}
                Verdict::Yes => return self.apply(chain, i, rule, st, None, depth),
                Verdict::Chance(p) => {
                    let mut taken = st.clone();
                    taken.probability *= p;
                    let mut other = st;
                    other.probability *= 1.0 - p;
                    let note = format!("random, probability {p:.4}");
                    let mut out = if p > 0.0 {
                        self.apply(chain, i, rule, taken, Some(note), depth)
                    } else {
                        vec![]
                    };
                    if p < 1.0 {
                        out.extend(self.run(chain, i + 1, other, depth));
                    }
                    return out;
                }
            }
        }
        let flow = if self.builtin(chain) {
            Flow::Done(End::Policy(self.chains.policy(self.table, chain)))
        } else {
            Flow::Returned
        };
        vec![(st, flow)]
    }

    fn apply(
        &self,
        chain: &str,
        i: usize,
        rule: &Rule,
        mut st: State,
        note: Option<String>,
        depth: usize,
    ) -> Vec<(State, Flow)> {
        st.hits.push(Hit {
            table: self.table.to_string(),
            chain: chain.to_string(),
            rule: rule.text.clone(),
            target: rule.target.word(),
            kernel: None,
            note,
            key: rule.key(),
            comment: rule.comment.clone(),
        });
        let done = |st, end| vec![(st, Flow::Done(end))];
        match &rule.target {
            Target::None => self.run(chain, i + 1, st, depth),
            Target::Other(word) => {
                st.notes
                    .push(format!("{chain}: target {word} taken as not terminating"));
                self.run(chain, i + 1, st, depth)
            }
            Target::Mark { value, mask } => {
                st.packet.mark = (st.packet.mark & !mask) ^ value;
                self.run(chain, i + 1, st, depth)
            }
            Target::Jump(next) => {
                let mut out = Vec::new();
                for (s, flow) in self.run(next, 0, st, depth + 1) {
                    match flow {
                        Flow::Returned => out.extend(self.run(chain, i + 1, s, depth)),
                        done => out.push((s, done)),
                    }
                }
                out
            }
            // A goto's RETURN goes back to this chain's caller.
            Target::Goto(next) => self.run(next, 0, st, depth + 1),
            Target::Return if self.builtin(chain) => {
                let policy = self.chains.policy(self.table, chain);
                done(st, End::Policy(policy))
            }
            Target::Return => vec![(st, Flow::Returned)],
            Target::Accept => done(st, End::Accept),
            Target::Drop => done(st, End::Drop),
            Target::Reject => done(st, End::Reject),
            Target::Masquerade => done(st, End::Masquerade),
            Target::Snat(to) => {
                let to = to.clone();
                done(st, End::Snat(to))
            }
            Target::Dnat(ip, port) => {
                st.packet.dst = *ip;
                if let Some(p) = port {
                    st.packet.dport = *p;
                }
                done(st, End::Dnat(*ip, *port))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const NAT: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-X - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-SEP-B - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 172.30.0.10/32 -p tcp -m comment --comment "e2e/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-X
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x1/0x1
-A KUBE-SVC-X -d 172.30.0.10/32 -p tcp -m tcp --dport 80 ! -s 10.128.0.0/14 -j KUBE-MARK-MASQ
-A KUBE-SVC-X -m comment --comment "e2e/web:http -> 10.128.0.3:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-A
-A KUBE-SVC-X -m comment --comment "e2e/web:http -> 10.128.2.2:8080" -j KUBE-SEP-B
-A KUBE-SEP-A -s 10.128.0.3/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination 10.128.0.3:8080
-A KUBE-SEP-B -s 10.128.2.2/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-B -p tcp -m tcp -j DNAT --to-destination 10.128.2.2:8080
COMMIT
"#;

    fn packet(src: &str) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            dst: "172.30.0.10".parse().unwrap(),
            proto: "tcp".into(),
            sport: 40000,
            dport: 80,
            mark: 0,
            in_iface: Some("tun0".into()),
            out_iface: None,
        }
    }

    /// Walks `p` from `chain` of `table` with no local addresses, sets or recent lists.
    fn bare(c: &Chains, table: TableName, chain: &str, p: Packet) -> Vec<Outcome> {
        let sets = BTreeMap::new();
        let env = Env {
            local: &|_| false,
            sets: &sets,
            recent: &|_, _| None,
        };
        walk(c, table, chain, p, &env)
    }

    fn nat() -> Chains {
        let mut c = Chains::default();
        c.add_save(TableName::Nat, NAT);
        c
    }

    fn run(src: &str) -> Vec<Outcome> {
        bare(&nat(), TableName::Nat, "PREROUTING", packet(src))
    }

    #[test]
    fn a_service_forks_into_its_endpoints_with_their_probabilities() {
        let out = run("10.128.0.2");
        assert_eq!(out.len(), 2);
        let ends: Vec<(f64, &End)> = out.iter().map(|o| (o.probability, &o.end)).collect();
        assert_eq!(
            ends,
            [
                (0.5, &End::Dnat("10.128.0.3".parse().unwrap(), Some(8080))),
                (0.5, &End::Dnat("10.128.2.2".parse().unwrap(), Some(8080)))
            ]
        );
        let chains: Vec<&str> = out[1].hits.iter().map(|h| h.chain.as_str()).collect();
        assert_eq!(
            chains,
            ["PREROUTING", "KUBE-SERVICES", "KUBE-SVC-X", "KUBE-SEP-B"]
        );
        assert_eq!(out[1].packet.dport, 8080);
        assert_eq!(
            out[0].hits[2].note.as_deref(),
            Some("random, probability 0.5000")
        );
    }

    #[test]
    fn marks_are_set_in_jumped_chains_and_hairpins_are_marked() {
        // A host-network client outside the cluster network is marked for masquerade.
        let out = run("192.168.77.11");
        assert!(out.iter().all(|o| o.packet.mark == 1));
        // The endpoint itself (hairpin): only its own branch is marked.
        let out = run("10.128.0.3");
        assert_eq!(out[0].packet.mark, 1);
        assert_eq!(out[1].packet.mark, 0);
        // Nothing for another destination: the policy.
        let mut p = packet("10.128.0.2");
        p.dst = "10.128.2.2".parse().unwrap();
        let out = bare(&nat(), TableName::Nat, "PREROUTING", p);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].end, End::Policy("ACCEPT".into()));
        assert_eq!(out[0].hits.len(), 1);
    }

    #[test]
    fn the_models_builtin_chains_are_its_jumps_in_order() {
        let mut r = Ruleset::default();
        r.tables
            .filter
            .add("RSDN-FORWARD", format_args!("-s 10.128.0.0/14 -j ACCEPT"));
        r.tables.filter.add(
            "RSDN-POLICY",
            format_args!("-m set --match-set S dst -j DROP"),
        );
        let j = |target: &str, position| {
            Jump::new(TableName::Filter, "FORWARD", "", target, target, position)
        };
        let jumps = [
            j("RSDN-FORWARD", Position::Last),
            j("RSDN-POLICY", Position::First),
        ];
        let c = Chains::from_ruleset(&r, &jumps);
        let forward: Vec<String> = c
            .rules(TableName::Filter, "FORWARD")
            .unwrap()
            .iter()
            .map(|r| r.target.word())
            .collect();
        assert_eq!(forward, ["RSDN-POLICY", "RSDN-FORWARD"]);
        let mut p = packet("10.128.0.2");
        p.out_iface = Some("vxlan0".into());
        let out = bare(&c, TableName::Filter, "FORWARD", p);
        assert_eq!(out[0].end, End::Accept);
        assert_eq!(
            out[0].notes,
            ["filter: ipset S does not exist".replace("filter: ", "")]
        );
    }
}
