//! NetworkPolicy (networking.k8s.io/v1) as data, with the API's meaning made explicit: the
//! directions a policy isolates (policyTypes and its defaulting), its rules (a missing or empty
//! peer list means everyone, a missing or empty port list means every port), label selectors
//! with matchLabels and matchExpressions.
//!
//! Invalid parts fail closed: a policy is only dropped whole when the pods it selects cannot be
//! known (its podSelector is invalid). Otherwise an invalid peer or port is left out of its
//! rule, and a rule left with no valid peer (or port) where it had some is left out entirely
//! (an empty list would mean "all"): the selected pods stay isolated in the policy's
//! directions, and what it allows is never more than what it allows as written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::Ipv4Net;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy as K8sPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::service::Protocol;

/// A label selector's requirement on one key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector: every requirement must hold. `matchLabels` are `In` with one value. The
/// empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector(pub BTreeSet<Requirement>);

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, v) => labels.get(k).is_some_and(|l| v.contains(l)),
            Requirement::NotIn(k, v) => labels.get(k).is_none_or(|l| !v.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn parse(s: &K8sSelector) -> Result<Selector, String> {
        let mut out = BTreeSet::new();
        for (k, v) in s.match_labels.iter().flatten() {
            label_key(k)?;
            label_value(v)?;
            out.insert(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for e in s.match_expressions.iter().flatten() {
            label_key(&e.key)?;
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            for v in &values {
                label_value(v)?;
            }
            let r = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {} {}: needs values",
                        e.key, e.operator
                    ))
                }
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {} {}: takes no values",
                        e.key, e.operator
                    ))
                }
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => {
                    return Err(format!(
                        "matchExpressions {}: unknown operator {other:?}",
                        e.key
                    ))
                }
            };
            out.insert(r);
        }
        Ok(Selector(out))
    }
}

/// A label key as the API admits it: an optional DNS-subdomain prefix and `/`, then a name of
/// at most 63 characters of letters, digits, `-`, `_` and `.`.
fn label_key(k: &str) -> Result<(), String> {
    let name = k.rsplit('/').next().unwrap_or(k);
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && k.matches('/').count() <= 1;
    if ok {
        Ok(())
    } else {
        Err(format!("{k:?} is not a valid label key"))
    }
}

/// A label value as the API admits it: empty, or at most 63 characters of letters, digits,
/// `-`, `_` and `.`, beginning and ending with a letter or digit.
fn label_value(v: &str) -> Result<(), String> {
    let ok = v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!("{v:?} is not a valid label value"))
    }
}

/// kubectl's spelling: `app=web,tier in (a,b),!legacy` (`{}` for the empty selector).
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| match r {
                Requirement::In(k, v) if v.len() == 1 => {
                    format!("{k}={}", v.iter().next().expect("one value"))
                }
                Requirement::In(k, v) => {
                    format!(
                        "{k} in ({})",
                        v.iter().cloned().collect::<Vec<_>>().join(",")
                    )
                }
                Requirement::NotIn(k, v) => format!(
                    "{k} notin ({})",
                    v.iter().cloned().collect::<Vec<_>>().join(",")
                ),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Which namespaces a pod peer's pods come from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Namespaces {
    /// The policy's own (a peer without namespaceSelector).
    Named(String),
    Matching(Selector),
}

/// Where traffic may come from (ingress) or go to (egress).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Pods {
        namespaces: Namespaces,
        pods: Selector,
    },
    Block {
        cidr: Ipv4Net,
        except: Vec<Ipv4Net>,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pods {
                namespaces: Namespaces::Named(ns),
                pods,
            } => write!(f, "pods {pods} in {ns}"),
            Peer::Pods {
                namespaces: Namespaces::Matching(ns),
                pods,
            } => write!(f, "pods {pods} in namespaces {ns}"),
            Peer::Block { cidr, except } if except.is_empty() => write!(f, "{cidr}"),
            Peer::Block { cidr, except } => write!(
                f,
                "{cidr} except {}",
                except
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// A port (or range, or name) of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSpec {
    /// Every port of the protocol.
    Any,
    /// `port` to `endPort` inclusive (the same for a single port).
    Range(u16, u16),
    /// A container port's name, resolved against the pod at that end.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: PortSpec,
}

/// One rule: traffic from (ingress) or to (egress) any of the peers, on any of the ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its position in the policy as written (rules left out as invalid leave gaps), so that
    /// the rules' comments and the log speak of the same rule.
    pub index: usize,
    /// None: every peer (the list is missing or empty).
    pub peers: Option<Vec<Peer>>,
    /// Empty: every port and protocol.
    pub ports: Vec<PortMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// Some: the policy isolates its pods for ingress, allowing what these rules say.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    /// What was left out as invalid (the rest still applies; see the module's doc).
    pub problems: Vec<String>,
}

fn peer(p: &NetworkPolicyPeer, namespace: &str) -> Result<Option<Peer>, String> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err("ipBlock cannot be combined with selectors".into());
        }
        // IPv6 blocks are valid, and match no IPv4 traffic.
        if b.cidr.contains(':') {
            return Ok(None);
        }
        let cidr: Ipv4Net = b
            .cidr
            .parse()
            .map_err(|_| format!("ipBlock cidr {:?} is not a CIDR", b.cidr))?;
        let mut except = Vec::new();
        for e in b.except.iter().flatten() {
            let net: Ipv4Net = e
                .parse()
                .map_err(|_| format!("ipBlock except {e:?} is not an IPv4 CIDR"))?;
            if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
                return Err(format!(
                    "ipBlock except {e} is not strictly inside {}",
                    b.cidr
                ));
            }
            except.push(net.trunc());
        }
        except.sort();
        except.dedup();
        return Ok(Some(Peer::Block {
            cidr: cidr.trunc(),
            except,
        }));
    }
    let pods = match &p.pod_selector {
        Some(s) => Selector::parse(s).map_err(|e| format!("podSelector: {e}"))?,
        None => Selector::default(),
    };
    let namespaces = match &p.namespace_selector {
        Some(s) => {
            Namespaces::Matching(Selector::parse(s).map_err(|e| format!("namespaceSelector: {e}"))?)
        }
        None if p.pod_selector.is_some() => Namespaces::Named(namespace.to_string()),
        None => return Err("a peer needs podSelector, namespaceSelector or ipBlock".into()),
    };
    Ok(Some(Peer::Pods { namespaces, pods }))
}

fn port(p: &NetworkPolicyPort) -> Result<PortMatch, String> {
    let protocol = Protocol::parse(p.protocol.as_deref())?;
    let number = |n: i32, what: &str| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("{what} {n} is out of range"))
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortSpec::Any,
        (None, Some(_)) => return Err("endPort without port".into()),
        (Some(IntOrString::Int(n)), end) => {
            let from = number(*n, "port")?;
            let to = match end {
                Some(e) => number(e, "endPort")?,
                None => from,
            };
            if to < from {
                return Err(format!("endPort {to} is below port {from}"));
            }
            PortSpec::Range(from, to)
        }
        (Some(IntOrString::String(name)), None) => {
            if name.is_empty() || name.len() > 15 {
                return Err(format!("port name {name:?} is not a valid port name"));
            }
            PortSpec::Named(name.clone())
        }
        (Some(IntOrString::String(_)), Some(_)) => return Err("endPort with a named port".into()),
    };
    Ok(PortMatch { protocol, port })
}

/// One rule of a direction, or None when it is left out whole (see the module's doc).
fn rule(
    index: usize,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    namespace: &str,
    what: &str,
    problems: &mut Vec<String>,
) -> Option<Rule> {
    let mut valid_peers = Vec::new();
    let mut had_peers = false;
    let mut bad_peers = false;
    for (i, p) in peers.into_iter().flatten().enumerate() {
        had_peers = true;
        match peer(p, namespace) {
            Ok(Some(p)) => valid_peers.push(p),
            Ok(None) => {}
            Err(e) => {
                bad_peers = true;
                problems.push(format!("{what} peer {i} left out: {e}"));
            }
        }
    }
    let mut valid_ports = Vec::new();
    let mut bad_ports = false;
    for (i, p) in ports.into_iter().flatten().enumerate() {
        match port(p) {
            Ok(p) => valid_ports.push(p),
            Err(e) => {
                bad_ports = true;
                problems.push(format!("{what} port {i} left out: {e}"));
            }
        }
    }
    if (bad_peers && valid_peers.is_empty()) || (bad_ports && valid_ports.is_empty()) {
        problems.push(format!("{what} left out: nothing valid remains of it"));
        return None;
    }
    valid_peers.sort();
    valid_peers.dedup();
    valid_ports.sort();
    valid_ports.dedup();
    Some(Rule {
        index,
        // An IPv6-only peer list matches no IPv4 peer: keep it as an empty list that allows
        // nobody, not as "everyone".
        peers: if had_peers { Some(valid_peers) } else { None },
        ports: valid_ports,
    })
}

type Parts<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// The rules of one direction (ingress and egress rules differ only in the peers' field name).
fn rules<'a, R>(
    list: Option<&'a Vec<R>>,
    dir: &str,
    namespace: &str,
    problems: &mut Vec<String>,
    parts: impl Fn(&'a R) -> Parts<'a>,
) -> Vec<Rule> {
    list.into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, r)| {
            let (peers, ports) = parts(r);
            rule(
                i,
                peers,
                ports,
                namespace,
                &format!("{dir} rule {i}"),
                problems,
            )
        })
        .collect()
}

/// The policy, or why it cannot be used at all.
pub fn policy_from_k8s(np: &K8sPolicy) -> Result<Policy, String> {
    let name = np
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("no metadata.name")?;
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = np.spec.as_ref().ok_or("no spec")?;
    let pod_selector = match &spec.pod_selector {
        Some(s) => Selector::parse(s)
            .map_err(|e| format!("podSelector: {e}; the pods it selects are unknown"))?,
        None => Selector::default(),
    };
    let mut problems = Vec::new();
    // The API's defaulting: Ingress always, Egress when there are egress rules.
    let (mut ingress, mut egress) = match spec.policy_types.as_deref() {
        None | Some([]) => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        Some(types) => {
            let mut t = (false, false);
            for ty in types {
                match ty.as_str() {
                    "Ingress" => t.0 = true,
                    "Egress" => t.1 = true,
                    other => {
                        problems.push(format!(
                            "unknown policyType {other:?}: both directions isolated"
                        ));
                        t = (true, true);
                    }
                }
            }
            t
        }
    };
    let broken_types = !problems.is_empty();
    let (ingress_rules, egress_rules) = if broken_types {
        (Vec::new(), Vec::new())
    } else {
        (
            rules(
                spec.ingress.as_ref(),
                "ingress",
                &namespace,
                &mut problems,
                |r| (r.from.as_ref(), r.ports.as_ref()),
            ),
            rules(
                spec.egress.as_ref(),
                "egress",
                &namespace,
                &mut problems,
                |r| (r.to.as_ref(), r.ports.as_ref()),
            ),
        )
    };
    if broken_types {
        (ingress, egress) = (true, true);
    }
    Ok(Policy {
        namespace,
        name,
        pod_selector,
        ingress: ingress.then_some(ingress_rules),
        egress: egress.then_some(egress_rules),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: &str) -> Result<Policy, String> {
        let np: K8sPolicy = serde_saphyr::from_str(&format!(
            "metadata: {{name: p, namespace: x}}\nspec:\n{spec}"
        ))
        .unwrap();
        policy_from_k8s(&np)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let s = |yaml: &str| Selector::parse(&serde_saphyr::from_str(yaml).unwrap()).unwrap();
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        assert!(s("{}").matches(&web) && s("{}").matches(&BTreeMap::new()));
        assert!(
            s("matchLabels: {app: web}").matches(&web)
                && !s("matchLabels: {app: web}").matches(&db)
        );
        let in_ = s("matchExpressions: [{key: app, operator: In, values: [web, api]}]");
        assert!(in_.matches(&web) && !in_.matches(&db) && !in_.matches(&BTreeMap::new()));
        let notin = s("matchExpressions: [{key: app, operator: NotIn, values: [web]}]");
        assert!(!notin.matches(&web) && notin.matches(&db) && notin.matches(&BTreeMap::new()));
        let exists = s("matchExpressions: [{key: tier, operator: Exists}]");
        assert!(exists.matches(&web) && !exists.matches(&db));
        let absent = s("matchExpressions: [{key: tier, operator: DoesNotExist}]");
        assert!(!absent.matches(&web) && absent.matches(&db));
        let both = s("matchLabels: {app: web}\nmatchExpressions: [{key: tier, operator: In, values: [back]}]");
        assert!(!both.matches(&web), "every requirement must hold");
        assert_eq!(
            s("matchLabels: {app: web}\nmatchExpressions: [{key: tier, operator: NotIn, values: [a, b]}, {key: x, operator: DoesNotExist}]").to_string(),
            "app=web,tier notin (a,b),!x"
        );
        for bad in [
            "matchExpressions: [{key: app, operator: In}]",
            "matchExpressions: [{key: app, operator: Exists, values: [a]}]",
            "matchExpressions: [{key: app, operator: Near, values: [a]}]",
            "matchLabels: {'a b': c}",
            "matchLabels: {a: 'b\"c'}",
            "matchExpressions: [{key: app, operator: In, values: ['-x']}]",
        ] {
            let sel: K8sSelector = serde_saphyr::from_str(bad).unwrap();
            assert!(Selector::parse(&sel).is_err(), "{bad}");
        }
    }

    #[test]
    fn policy_types_default_as_the_api_does() {
        let p = policy("  podSelector: {}\n").unwrap();
        assert_eq!(
            (p.ingress.clone(), p.egress.clone()),
            (Some(vec![]), None),
            "deny all ingress"
        );
        let p = policy("  podSelector: {}\n  egress: [{}]\n").unwrap();
        assert!(p.ingress == Some(vec![]) && p.egress.as_ref().is_some_and(|e| e.len() == 1));
        let p = policy("  podSelector: {}\n  egress: []\n").unwrap();
        assert!(
            p.egress.is_none(),
            "an empty egress list does not make an egress policy"
        );
        let p = policy("  podSelector: {}\n  policyTypes: [Egress]\n").unwrap();
        assert_eq!(
            (p.ingress.clone(), p.egress.clone()),
            (None, Some(vec![])),
            "deny all egress"
        );
    }

    #[test]
    fn peers_and_ports_read_as_the_api_defines_them() {
        let p = policy(
            "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - {}\n  - from: []\n  - from:\n    - podSelector: {matchLabels: {app: b}}\n    - namespaceSelector: {matchLabels: {ns: y}}\n    - podSelector: {matchLabels: {app: c}}\n      namespaceSelector: {}\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.128.0.0/14]}\n    ports:\n    - {port: 80}\n    - {port: serve-81-udp, protocol: UDP}\n    - {protocol: SCTP, port: 8000, endPort: 8100}\n    - {protocol: UDP}\n",
        )
        .unwrap();
        let rules = p.ingress.unwrap();
        assert_eq!(
            rules[0],
            Rule {
                index: 0,
                peers: None,
                ports: vec![]
            },
            "{{}}: everyone, every port"
        );
        assert_eq!(
            rules[1],
            Rule {
                index: 1,
                peers: None,
                ports: vec![]
            },
            "from: []: everyone"
        );
        let peers: Vec<String> = rules[2]
            .peers
            .as_ref()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            peers,
            [
                "pods app=b in x",
                "pods app=c in namespaces {}",
                "pods {} in namespaces ns=y",
                "10.0.0.0/8 except 10.128.0.0/14"
            ]
        );
        let ports: Vec<String> = rules[2]
            .ports
            .iter()
            .map(|p| format!("{:?} {:?}", p.protocol, p.port))
            .collect();
        assert_eq!(
            ports,
            [
                "Tcp Range(80, 80)",
                "Udp Any",
                "Udp Named(\"serve-81-udp\")",
                "Sctp Range(8000, 8100)"
            ]
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);
    }

    #[test]
    fn invalid_parts_fail_closed() {
        // A bad peer next to a good one: the good one stays, the bad one is left out.
        let p = policy("  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.300/8}\n    - podSelector: {matchLabels: {app: b}}\n").unwrap();
        let r = &p.ingress.as_ref().unwrap()[0];
        assert_eq!(r.peers.as_ref().unwrap().len(), 1);
        assert!(
            p.problems[0].contains("ingress rule 0 peer 0 left out"),
            "{:?}",
            p.problems
        );
        // Nothing valid left of a peer list or a port list: the rule goes (empty would mean all).
        let p = policy("  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: nonsense}}]\n  - ports: [{protocol: ICMP}]\n  - from: [{podSelector: {}}]\n").unwrap();
        assert_eq!(p.ingress.as_ref().unwrap().len(), 1, "{:?}", p.ingress);
        assert_eq!(
            p.ingress.as_ref().unwrap()[0].peers.as_ref().unwrap().len(),
            1
        );
        assert_eq!(
            p.ingress.as_ref().unwrap()[0].index,
            2,
            "the rule as written is rule 2"
        );
        // An except that does not parse would open traffic if dropped: the peer goes.
        let p = policy("  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [bogus]}}]\n").unwrap();
        assert_eq!(
            p.egress,
            Some(vec![]),
            "isolated for egress, nothing allowed"
        );
        // An unknown policy type: both directions isolated, nothing allowed.
        let p = policy("  podSelector: {}\n  policyTypes: [Sideways]\n  ingress: [{}]\n").unwrap();
        assert_eq!(
            (p.ingress.clone(), p.egress.clone()),
            (Some(vec![]), Some(vec![]))
        );
        // A podSelector that does not parse: the selected pods are unknown, the policy unusable.
        assert!(policy("  podSelector: {matchExpressions: [{key: a, operator: In}]}\n").is_err());
        // IPv6 blocks match no IPv4 traffic, and are not an error.
        let p =
            policy("  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 'fd00::/8'}}]\n")
                .unwrap();
        assert_eq!(
            p.ingress.as_ref().unwrap()[0].peers,
            Some(vec![]),
            "allows nobody"
        );
        assert!(p.problems.is_empty());
        // Ports: endPort without port, below port, with a name.
        for bad in [
            "{endPort: 90}",
            "{port: 90, endPort: 80}",
            "{port: web, endPort: 90}",
            "{port: 70000}",
        ] {
            let p = policy(&format!(
                "  podSelector: {{}}\n  ingress:\n  - ports: [{bad}]\n"
            ))
            .unwrap();
            assert_eq!(p.ingress, Some(vec![]), "{bad}");
        }
    }
}
