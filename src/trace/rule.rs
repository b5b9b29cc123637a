//! One iptables rule as data: the match options and targets rsdn writes, in rsdn's spelling
//! (`rsdn proxy render`) and in the tools' (`iptables-save`, `xtables-monitor`), parsed so that
//! a rule can be evaluated against a packet (`Rule::eval`) and compared with another spelling
//! of itself (`Rule::key`). Options rsdn never writes are kept as `Cond::Unknown`: such a rule
//! is assumed not to match, and the trace says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::netfilter::sets::{IpSet, SetKind};

/// A match condition, without its negation.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    Src(Ipv4Net),
    Dst(Ipv4Net),
    /// Lower case: tcp, udp, sctp, icmp.
    Proto(String),
    DPort(u16, u16),
    SPort(u16, u16),
    InIface(String),
    OutIface(String),
    /// `-m addrtype --dst-type LOCAL` (dst true) or `--src-type`.
    AddrType {
        dst: bool,
        kind: String,
    },
    /// `-m statistic --mode random --probability P`.
    Statistic(f64),
    /// `-m recent --name N --rcheck --seconds S` (check: Some(S)), or `--set` (check: None).
    Recent {
        name: String,
        check: Option<u32>,
    },
    Mark {
        value: u32,
        mask: u32,
    },
    /// `-m set --match-set NAME src|dst[,dst]`: true for src.
    Set {
        name: String,
        dirs: Vec<bool>,
    },
    CtState(Vec<String>),
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub neg: bool,
    pub cond: Cond,
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// No target: counts and goes on (a comment-only rule).
    None,
    Jump(String),
    Goto(String),
    Return,
    Accept,
    Drop,
    Reject,
    /// `-j DNAT --to-destination IP[:PORT]`.
    Dnat(Ipv4Addr, Option<u16>),
    Masquerade,
    Snat(String),
    /// `-j MARK`, in the kernel's one form: mark = (mark & !mask) ^ value.
    Mark {
        value: u32,
        mask: u32,
    },
    Other(String),
}

impl Target {
    /// The word after `-j`, as xtables-monitor names a verdict.
    pub fn word(&self) -> String {
        match self {
            Target::None => String::new(),
            Target::Jump(c) | Target::Goto(c) => c.clone(),
            Target::Return => "RETURN".into(),
            Target::Accept => "ACCEPT".into(),
            Target::Drop => "DROP".into(),
            Target::Reject => "REJECT".into(),
            Target::Dnat(..) => "DNAT".into(),
            Target::Masquerade => "MASQUERADE".into(),
            Target::Snat(_) => "SNAT".into(),
            Target::Mark { .. } => "MARK".into(),
            Target::Other(w) => w.clone(),
        }
    }
}

/// A parsed rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub chain: String,
    /// The line as given (`-A CHAIN ...`).
    pub text: String,
    pub matches: Vec<Match>,
    pub comment: Option<String>,
    pub target: Target,
}

/// Splits a rule line into words: double quotes group (iptables-save quotes comments with
/// spaces), a backslash escapes a quote inside them.
pub fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn cidr(s: &str) -> Option<Ipv4Net> {
    if s.contains('/') {
        s.parse::<Ipv4Net>().ok().map(|n| n.trunc())
    } else {
        s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from)
    }
}

fn number(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `V/M` or `V` (mask all ones).
fn value_mask(s: &str) -> Option<(u32, u32)> {
    match s.split_once('/') {
        Some((v, m)) => Some((number(v)?, number(m)?)),
        None => Some((number(s)?, u32::MAX)),
    }
}

fn port_range(s: &str) -> Option<(u16, u16)> {
    match s.split_once(':') {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => {
            let p = s.parse().ok()?;
            Some((p, p))
        }
    }
}

impl Rule {
    /// Parses `-A CHAIN options...` (a leading `-4 -t TABLE`, as xtables-monitor prints rules,
    /// is skipped). Never fails: what it does not know becomes `Cond::Unknown`.
    pub fn parse(line: &str) -> Rule {
        let w = words(line);
        let mut i = 0;
        let mut chain = String::new();
        let mut matches = Vec::new();
        let mut comment = None;
        let mut target = Target::None;
        let mut neg = false;
        // The recent module's options come in any order; gathered, then one condition.
        let mut recent: Option<(String, Option<u32>, bool)> = None;
        let arg = |i: &mut usize| -> String {
            *i += 1;
            w.get(*i).cloned().unwrap_or_default()
        };
        while i < w.len() {
            let tok = w[i].as_str();
            let mut cond = None;
            match tok {
                "!" => {
                    neg = true;
                    i += 1;
                    continue;
                }
                "-4" => {}
                "-t" => {
                    arg(&mut i);
                }
                "-A" | "--append" => chain = arg(&mut i),
                "-s" | "--source" => cond = cidr(&arg(&mut i)).map(Cond::Src),
                "-d" | "--destination" => cond = cidr(&arg(&mut i)).map(Cond::Dst),
                "-p" | "--protocol" => cond = Some(Cond::Proto(arg(&mut i).to_lowercase())),
                "-i" | "--in-interface" => cond = Some(Cond::InIface(arg(&mut i))),
                "-o" | "--out-interface" => cond = Some(Cond::OutIface(arg(&mut i))),
                "-m" | "--match" => {
                    arg(&mut i);
                }
                "--dport" | "--destination-port" => {
                    cond = port_range(&arg(&mut i)).map(|(a, b)| Cond::DPort(a, b))
                }
                "--sport" | "--source-port" => {
                    cond = port_range(&arg(&mut i)).map(|(a, b)| Cond::SPort(a, b))
                }
                "--dst-type" | "--src-type" => {
                    cond = Some(Cond::AddrType {
                        dst: tok == "--dst-type",
                        kind: arg(&mut i),
                    })
                }
                "--mode" => {
                    arg(&mut i);
                }
                "--probability" => cond = arg(&mut i).parse().ok().map(Cond::Statistic),
                "--comment" => comment = Some(arg(&mut i)),
                "--mark" => {
                    cond = value_mask(&arg(&mut i)).map(|(value, mask)| Cond::Mark { value, mask })
                }
                "--match-set" => {
                    let name = arg(&mut i);
                    let dirs = arg(&mut i).split(',').map(|d| d == "src").collect();
                    cond = Some(Cond::Set { name, dirs });
                }
                "--ctstate" | "--state" => {
                    cond = Some(Cond::CtState(
                        arg(&mut i).split(',').map(str::to_string).collect(),
                    ))
                }
                "--name" => recent.get_or_insert_with(Default::default).0 = arg(&mut i),
                "--rcheck" | "--update" => {
                    recent.get_or_insert_with(Default::default).2 = true;
                }
                "--seconds" => {
                    recent.get_or_insert_with(Default::default).1 = arg(&mut i).parse().ok()
                }
                "--set" => {
                    recent.get_or_insert_with(Default::default);
                }
                "--reap" | "--rsource" | "--rdest" => {}
                "--mask" => {
                    arg(&mut i);
                }
                "-j" | "--jump" | "-g" | "--goto" => {
                    let word = arg(&mut i);
                    let (t, used) = parse_target(&word, &w[i + 1..], tok.starts_with("-g"));
                    target = t;
                    i += used;
                }
                _ => {
                    let mut text = tok.to_string();
                    while let Some(next) = w.get(i + 1).filter(|n| !n.starts_with('-')) {
                        text.push(' ');
                        text.push_str(next);
                        i += 1;
                    }
                    cond = Some(Cond::Unknown(text));
                }
            }
            if let Some(cond) = cond {
                matches.push(Match { neg, cond });
            }
            neg = false;
            i += 1;
        }
        if let Some((name, seconds, check)) = recent {
            matches.push(Match {
                neg: false,
                cond: Cond::Recent {
                    name,
                    check: if check {
                        Some(seconds.unwrap_or(0))
                    } else {
                        None
                    },
                },
            });
        }
        Rule {
            chain,
            text: line.to_string(),
            matches,
            comment,
            target,
        }
    }

    /// The rule in one canonical spelling: equal for two spellings of the same rule (rsdn's
    /// and iptables-save's), different when any match, the comment or the target differs.
    pub fn key(&self) -> String {
        let mut conds: Vec<String> = self
            .matches
            .iter()
            .map(|m| {
                let c = match &m.cond {
                    Cond::Statistic(p) => format!("Statistic({p:.6})"),
                    other => format!("{other:?}"),
                };
                format!("{}{c}", if m.neg { "!" } else { "" })
            })
            .collect();
        conds.sort();
        let mut out = format!("{} [{}]", self.chain, conds.join(" "));
        if let Some(c) = &self.comment {
            let _ = write!(out, " {c:?}");
        }
        let _ = write!(out, " -> {:?}", self.target);
        out
    }
}

/// A target and its options; returns how many option words it used.
fn parse_target(word: &str, rest: &[String], goto: bool) -> (Target, usize) {
    let opt = |name: &str| -> Option<&str> {
        rest.iter()
            .position(|w| w == name)
            .and_then(|i| rest.get(i + 1))
            .map(String::as_str)
    };
    // Target options: `--flag` or `--option VALUE`, up to the next match option.
    let mut used = 0;
    while let Some(w) = rest.get(used).filter(|w| w.starts_with("--")) {
        used += 1;
        if TARGET_OPTIONS_WITH_VALUE.contains(&w.as_str()) {
            used += 1;
        }
    }
    let t = match word {
        _ if goto => Target::Goto(word.to_string()),
        "RETURN" => Target::Return,
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "REJECT" => Target::Reject,
        "MASQUERADE" => Target::Masquerade,
        "DNAT" => {
            let to = opt("--to-destination").unwrap_or("");
            let (ip, port) = match to.rsplit_once(':') {
                Some((ip, port)) => (ip, port.parse().ok()),
                None => (to, None),
            };
            match ip.parse() {
                Ok(ip) => Target::Dnat(ip, port),
                Err(_) => Target::Other(format!("DNAT {to}")),
            }
        }
        "SNAT" => Target::Snat(opt("--to-source").unwrap_or("").to_string()),
        "MARK" => {
            let get = |n: &str| opt(n).and_then(number);
            if let Some((value, mask)) = opt("--set-xmark").and_then(value_mask) {
                Target::Mark { value, mask }
            } else if let Some((value, mask)) = opt("--set-mark").and_then(value_mask) {
                Target::Mark { value, mask }
            } else if let Some(v) = get("--or-mark") {
                Target::Mark { value: v, mask: v }
            } else if let Some(v) = get("--xor-mark") {
                Target::Mark { value: v, mask: 0 }
            } else if let Some(v) = get("--and-mark") {
                Target::Mark { value: 0, mask: !v }
            } else {
                Target::Other("MARK".into())
            }
        }
        w if w
            .chars()
            .all(|c| c.is_ascii_uppercase() || c == '-' || c.is_ascii_digit())
            && is_chain_name(w) =>
        {
            Target::Jump(w.to_string())
        }
        w => Target::Other(w.to_string()),
    };
    (t, used)
}

const TARGET_OPTIONS_WITH_VALUE: [&str; 12] = [
    "--to-destination",
    "--to-source",
    "--to-ports",
    "--set-xmark",
    "--set-mark",
    "--or-mark",
    "--xor-mark",
    "--and-mark",
    "--reject-with",
    "--log-prefix",
    "--log-level",
    "--nflog-group",
];

/// Target extensions are upper case too (LOG, TRACE): a chain is anything else upper case.
fn is_chain_name(w: &str) -> bool {
    !matches!(
        w,
        "LOG" | "TRACE" | "NFLOG" | "CT" | "NOTRACK" | "CONNMARK" | "TCPMSS" | "REDIRECT"
    )
}

/// What a packet is, for matching.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// tcp, udp, sctp or icmp.
    pub proto: String,
    pub sport: u16,
    pub dport: u16,
    pub mark: u32,
    /// Interfaces where known (None: any name matches nothing).
    pub in_iface: Option<String>,
    pub out_iface: Option<String>,
}

/// What a rule's matches say about a packet.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Yes,
    No,
    /// Matches with this probability (the statistic match).
    Chance(f64),
}

/// What matching needs besides the packet: the node's local addresses (addrtype LOCAL), its
/// ipsets, and its recent lists where they can be read (None: unknown, taken as empty).
pub struct Env<'a> {
    pub local: &'a dyn Fn(Ipv4Addr) -> bool,
    pub sets: &'a BTreeMap<String, IpSet>,
    pub recent: &'a dyn Fn(&str, Ipv4Addr) -> Option<bool>,
}

/// Whether an ipset holds what a packet's ends are: hash:ip and hash:net by the first end's
/// address (the most specific hash:net entry wins, `nomatch` excludes), hash:ip,port by the
/// first end's address and the second end's protocol and port.
pub fn set_contains(set: &IpSet, ip: Ipv4Addr, port: Option<(&str, u16)>) -> bool {
    match set.kind {
        SetKind::HashIp => set.members.contains(&ip.to_string()),
        SetKind::HashIpPort => {
            port.is_some_and(|(proto, p)| set.members.contains(&format!("{ip},{proto}:{p}")))
        }
        SetKind::HashNet => {
            let best = set
                .members
                .iter()
                .filter_map(|m| {
                    let (net, nomatch) = match m.strip_suffix(" nomatch") {
                        Some(n) => (n, true),
                        None => (m.as_str(), false),
                    };
                    let net = cidr(net)?;
                    net.contains(&ip).then_some((net.prefix_len(), nomatch))
                })
                .max_by_key(|(len, _)| *len);
            best.is_some_and(|(_, nomatch)| !nomatch)
        }
    }
}

impl Rule {
    /// Evaluates the matches against a packet in state NEW (the first packet of a connection).
    /// `notes` gets a line for every guess (an unknown option, a recent list not read).
    pub fn eval(&self, p: &Packet, env: &Env, notes: &mut Vec<String>) -> Verdict {
        let mut chance = None;
        for m in &self.matches {
            let ok = match &m.cond {
                Cond::Src(n) => n.contains(&p.src),
                Cond::Dst(n) => n.contains(&p.dst),
                Cond::Proto(x) => *x == p.proto || x == "all",
                Cond::DPort(a, b) => has_ports(p) && (*a..=*b).contains(&p.dport),
                Cond::SPort(a, b) => has_ports(p) && (*a..=*b).contains(&p.sport),
                Cond::InIface(i) => p.in_iface.as_deref().is_some_and(|x| iface(i, x)),
                Cond::OutIface(i) => p.out_iface.as_deref().is_some_and(|x| iface(i, x)),
                Cond::AddrType { dst, kind } => {
                    let ip = if *dst { p.dst } else { p.src };
                    kind == "LOCAL" && (env.local)(ip)
                }
                Cond::Statistic(prob) => {
                    if m.neg {
                        chance = Some(1.0 - prob);
                    } else {
                        chance = Some(*prob);
                    }
                    continue;
                }
                Cond::Recent { name, check } => match check {
                    None => true,
                    Some(_) => match (env.recent)(name, p.src) {
                        Some(hit) => hit,
                        None => {
                            notes.push(format!(
                                "recent list {name} not read: taken as empty (a first connection)"
                            ));
                            false
                        }
                    },
                },
                Cond::Mark { value, mask } => p.mark & mask == *value,
                Cond::Set { name, dirs } => match env.sets.get(name) {
                    Some(set) => {
                        let end = |src: bool| if src { p.src } else { p.dst };
                        let port = |src: bool| if src { p.sport } else { p.dport };
                        let first = dirs.first().copied().unwrap_or(false);
                        let second = dirs.get(1).map(|d| (p.proto.as_str(), port(*d)));
                        set_contains(set, end(first), second.filter(|_| has_ports(p)))
                    }
                    None => {
                        notes.push(format!("ipset {name} does not exist"));
                        false
                    }
                },
                Cond::CtState(states) => states.iter().any(|s| s == "NEW"),
                Cond::Unknown(o) => {
                    notes.push(format!(
                        "{}: option {o:?} is not evaluated; taken as not matching",
                        self.chain
                    ));
                    return Verdict::No;
                }
            };
            if ok == m.neg {
                return Verdict::No;
            }
        }
        match chance {
            Some(p) => Verdict::Chance(p),
            None => Verdict::Yes,
        }
    }
}

fn has_ports(p: &Packet) -> bool {
    matches!(p.proto.as_str(), "tcp" | "udp" | "sctp")
}

/// An interface match: `eth+` is a prefix.
fn iface(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with<'a>(
        sets: &'a BTreeMap<String, IpSet>,
        local: &'a dyn Fn(Ipv4Addr) -> bool,
    ) -> Env<'a> {
        Env {
            local,
            sets,
            recent: &|_, _| None,
        }
    }

    fn packet(src: &str, dst: &str, dport: u16) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: "tcp".into(),
            sport: 40000,
            dport,
            mark: 0,
            in_iface: Some("tun0".into()),
            out_iface: None,
        }
    }

    #[test]
    fn rsdns_spelling_and_the_kernels_have_one_key() {
        let pairs = [
            (
                r#"-A KUBE-SERVICES -m comment --comment "e2e/web:http cluster IP" -m tcp -p tcp -d 172.30.0.10 --dport 80 -j KUBE-SVC-X"#,
                r#"-A KUBE-SERVICES -d 172.30.0.10/32 -p tcp -m comment --comment "e2e/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-X"#,
            ),
            (
                "-A KUBE-MARK-MASQ -j MARK --or-mark 0x1",
                "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x1/0x1",
            ),
            (
                "-A KUBE-POSTROUTING -j MARK --xor-mark 0x1",
                "-A KUBE-POSTROUTING -j MARK --set-xmark 0x1/0x0",
            ),
            (
                r#"-A KUBE-SVC-X -m comment --comment "a -> b" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-A"#,
                r#"-A KUBE-SVC-X -m comment --comment "a -> b" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-A"#,
            ),
            (
                "-A KUBE-SVC-X -m recent --name KUBE-SEP-A --rcheck --seconds 300 --reap -j KUBE-SEP-A",
                "-A KUBE-SVC-X -m recent --rcheck --seconds 300 --reap --name KUBE-SEP-A --mask 255.255.255.255 --rsource -j KUBE-SEP-A",
            ),
            (
                "-A KUBE-SEP-A -m comment --comment ns/s:p -m tcp -p tcp -j DNAT --to-destination 10.128.0.5:8080",
                "-A KUBE-SEP-A -p tcp -m comment --comment ns/s:p -m tcp -j DNAT --to-destination 10.128.0.5:8080",
            ),
            (
                "-A X -m set --match-set RSDN-P-A src -p tcp -m tcp --dport 80 -j MARK --or-mark 0x20000",
                "-A X -p tcp -m set --match-set RSDN-P-A src -m tcp --dport 80 -j MARK --set-xmark 0x20000/0x20000",
            ),
            (
                "-A KUBE-POSTROUTING -m mark ! --mark 0x1/0x1 -j RETURN",
                "-A KUBE-POSTROUTING -m mark ! --mark 0x1/0x1 -j RETURN",
            ),
        ];
        for (ours, kernel) in pairs {
            assert_eq!(Rule::parse(ours).key(), Rule::parse(kernel).key(), "{ours}");
        }
        let a = Rule::parse("-A X -s 10.0.0.1 -j KUBE-MARK-MASQ");
        let b = Rule::parse("-A X -s 10.0.0.2/32 -j KUBE-MARK-MASQ");
        assert_ne!(a.key(), b.key());
        assert_eq!(
            Rule::parse(
                "-A KUBE-SEP-A -j DNAT --to-destination 10.0.0.1:80 -m comment --comment x"
            )
            .target,
            Target::Dnat("10.0.0.1".parse().unwrap(), Some(80))
        );
    }

    #[test]
    fn matches_are_evaluated_as_the_kernel_does() {
        let sets = BTreeMap::from([(
            "RSDN-B-X".to_string(),
            IpSet {
                kind: SetKind::HashNet,
                members: ["10.0.0.0/8", "10.128.0.0/14 nomatch"]
                    .map(String::from)
                    .into(),
            },
        )]);
        let local = |ip: Ipv4Addr| ip == Ipv4Addr::new(192, 168, 77, 11);
        let env = env_with(&sets, &local);
        let mut notes = vec![];
        let p = packet("10.128.0.2", "172.30.0.10", 80);
        let eval =
            |r: &str, p: &Packet, notes: &mut Vec<String>| Rule::parse(r).eval(p, &env, notes);
        assert_eq!(
            eval(
                "-A A -m tcp -p tcp -d 172.30.0.10 --dport 80 -j B",
                &p,
                &mut notes
            ),
            Verdict::Yes
        );
        assert_eq!(
            eval("-A A ! -s 10.128.0.0/14 -j B", &p, &mut notes),
            Verdict::No
        );
        assert_eq!(eval("-A A -p udp -j B", &p, &mut notes), Verdict::No);
        assert_eq!(
            eval(
                "-A A -m statistic --mode random --probability 0.25 -j B",
                &p,
                &mut notes
            ),
            Verdict::Chance(0.25)
        );
        assert_eq!(
            eval(
                "-A A -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j B",
                &p,
                &mut notes
            ),
            Verdict::No
        );
        let to_node = packet("192.168.77.250", "192.168.77.11", 30080);
        assert_eq!(
            eval(
                "-A A -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j B",
                &to_node,
                &mut notes
            ),
            Verdict::Yes
        );
        let mut marked = p.clone();
        marked.mark = 0x1;
        assert_eq!(
            eval("-A A -m mark ! --mark 0x1/0x1 -j RETURN", &p, &mut notes),
            Verdict::Yes
        );
        assert_eq!(
            eval(
                "-A A -m mark ! --mark 0x1/0x1 -j RETURN",
                &marked,
                &mut notes
            ),
            Verdict::No
        );
        // ipBlock 10.0.0.0/8 except 10.128.0.0/14.
        let outside = packet("10.1.2.3", "10.128.0.5", 80);
        assert_eq!(
            eval(
                "-A A -m set --match-set RSDN-B-X src -j M",
                &outside,
                &mut notes
            ),
            Verdict::Yes
        );
        assert_eq!(
            eval("-A A -m set --match-set RSDN-B-X src -j M", &p, &mut notes),
            Verdict::No
        );
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            eval("-A A -m set --match-set NOPE src -j M", &p, &mut notes),
            Verdict::No
        );
        assert_eq!(
            eval("-A A -m physdev --physdev-in veth0 -j M", &p, &mut notes),
            Verdict::No
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(
            eval("-A A -m conntrack --ctstate NEW -j M", &p, &mut notes),
            Verdict::Yes
        );
        assert_eq!(
            eval(
                "-A A -m conntrack --ctstate RELATED,ESTABLISHED -j M",
                &p,
                &mut notes
            ),
            Verdict::No
        );
    }

    #[test]
    fn named_ports_match_by_address_protocol_and_port() {
        let set = IpSet {
            kind: SetKind::HashIpPort,
            members: ["10.128.0.10,tcp:80".to_string()].into(),
        };
        let ip = "10.128.0.10".parse().unwrap();
        assert!(set_contains(&set, ip, Some(("tcp", 80))));
        assert!(!set_contains(&set, ip, Some(("udp", 80))));
        assert!(!set_contains(&set, ip, None));
    }

    #[test]
    fn words_keep_quoted_comments_whole() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a b \"c\"" -j Y"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a b \"c\"",
                "-j",
                "Y"
            ]
        );
        assert_eq!(words(r#"--comment """#), ["--comment", ""]);
    }
}
