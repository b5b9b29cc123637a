//! Which pods a policy selects, and which pods a peer stands for: selectors evaluated against
//! the model's pods and namespaces.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::model::namespace::NAME_LABEL;
use crate::model::policy::{Namespaces, Peer, Policy, PortSpec};
use crate::model::service::Protocol;
use crate::model::{ClusterModel, Pod};
use crate::netfilter::sets::{IpSet, SetKind};
use std::sync::Arc;

/// A namespace's labels; a namespace the model has no object for has its name label only (as
/// the API server gives every namespace).
fn namespace_labels<'a>(
    model: &'a ClusterModel,
    name: &str,
    fallback: &'a mut BTreeMap<String, String>,
) -> &'a BTreeMap<String, String> {
    match model.namespaces.get(name) {
        Some(ns) => &ns.labels,
        None => {
            fallback.clear();
            fallback.insert(NAME_LABEL.into(), name.into());
            fallback
        }
    }
}

/// The pods a policy selects, on every node.
pub fn selected<'a>(model: &'a ClusterModel, policy: &'a Policy) -> impl Iterator<Item = &'a Pod> {
    model
        .pods
        .range((policy.namespace.clone(), String::new())..)
        .take_while(move |((ns, _), _)| *ns == policy.namespace)
        .map(|(_, p)| &**p)
        .filter(move |p| policy.pod_selector.matches(&p.labels))
}

/// Whether a pod is one of a peer's.
pub fn peer_has(model: &ClusterModel, peer: &Peer, pod: &Pod) -> bool {
    match peer {
        Peer::Pods { namespaces, pods } => {
            let in_namespace = match namespaces {
                Namespaces::Named(ns) => pod.namespace == *ns,
                Namespaces::Matching(sel) => {
                    let mut fallback = BTreeMap::new();
                    sel.matches(namespace_labels(model, &pod.namespace, &mut fallback))
                }
            };
            in_namespace && pods.matches(&pod.labels)
        }
        Peer::Block { cidr, except } => {
            cidr.contains(&pod.ip) && !except.iter().any(|e| e.contains(&pod.ip))
        }
    }
}

/// The addresses of a pod peer's pods.
pub fn peer_pods(model: &ClusterModel, peer: &Peer) -> Vec<Ipv4Addr> {
    model
        .pods
        .values()
        .filter(|p| peer_has(model, peer, p))
        .map(|p| p.ip)
        .collect()
}

/// `(address, protocol, port)` of every pod among `pods` that names `name` for `protocol`.
pub fn named<'a>(
    pods: impl Iterator<Item = &'a Pod>,
    name: &str,
    protocol: Protocol,
) -> Vec<(Ipv4Addr, Protocol, u16)> {
    pods.filter_map(|p| p.named_port(name, protocol).map(|n| (p.ip, protocol, n)))
        .collect()
}

/// Whether a rule's ports name a port.
pub fn has_named(ports: &[crate::model::policy::PortMatch]) -> bool {
    ports.iter().any(|p| matches!(p.port, PortSpec::Named(_)))
}

/// How a set's members follow from the pods.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Membership {
    /// The addresses of a pod peer's pods.
    Peer(Peer),
    /// `address,protocol:port` of the pods of any of the peers (None: every pod) that name
    /// the port.
    Named {
        peers: Option<Vec<Peer>>,
        name: String,
        protocol: Protocol,
    },
}

impl Membership {
    fn kind(&self) -> SetKind {
        match self {
            Membership::Peer(_) => SetKind::HashIp,
            Membership::Named { .. } => SetKind::HashIpPort,
        }
    }

    /// What one pod contributes.
    fn of(&self, model: &ClusterModel, pod: &Pod) -> Option<String> {
        match self {
            Membership::Peer(peer) => peer_has(model, peer, pod).then(|| pod.ip.to_string()),
            Membership::Named {
                peers,
                name,
                protocol,
            } => {
                let in_peers = peers
                    .as_ref()
                    .is_none_or(|list| list.iter().any(|p| peer_has(model, p, pod)));
                let port = pod.named_port(name, *protocol).filter(|_| in_peers)?;
                Some(format!("{},{}:{port}", pod.ip, protocol.as_str()))
            }
        }
    }
}

/// Set members computed from the cluster's pods, kept from one render to the next and brought
/// up to date for the pods that changed only: a pod relabelled among thousands costs a look at
/// that pod for each set, not a look at every pod.
#[derive(Debug, Default)]
pub struct Cache {
    /// The pods and namespaces the members were computed from.
    seen: Option<std::sync::Arc<ClusterModel>>,
    /// Each set's members, with how many pods contribute each (two pods may share an
    /// address for a while: one terminating, the other new).
    sets: std::collections::HashMap<Membership, Members>,
    /// Used by the current render (the others are dropped after it).
    used: std::collections::HashSet<Membership>,
}

/// A set's members and how many pods contribute each.
#[derive(Debug, Default)]
struct Members {
    count: BTreeMap<String, usize>,
    /// The set of the members, made when asked for and kept until they change (an unchanged
    /// set is the same `Arc` from one render to the next).
    set: Option<Arc<IpSet>>,
}

impl Members {
    fn add(&mut self, m: String) {
        let n = self.count.entry(m).or_default();
        *n += 1;
        if *n == 1 {
            self.set = None;
        }
    }

    fn remove(&mut self, m: &str) {
        if let Some(n) = self.count.get_mut(m) {
            *n -= 1;
            if *n == 0 {
                self.count.remove(m);
                self.set = None;
            }
        }
    }
}

impl Cache {
    /// Brings the members up to date with `model` (call once per render, before `members`).
    pub fn update(&mut self, model: &std::sync::Arc<ClusterModel>) {
        let keep: std::collections::HashSet<Membership> = std::mem::take(&mut self.used);
        self.sets.retain(|m, _| keep.contains(m));
        let Some(seen) = self.seen.replace(std::sync::Arc::clone(model)) else {
            return;
        };
        if seen.namespaces != model.namespaces {
            // Namespace labels decide namespaceSelector peers: start again.
            self.sets.clear();
            return;
        }
        // Even when most pods changed, this costs no more than computing every set afresh.
        let changed = changed_pods(&seen, model);
        for (membership, members) in self.sets.iter_mut() {
            for key in &changed {
                if let Some(old) = seen.pods.get(key).and_then(|p| membership.of(&seen, p)) {
                    members.remove(&old);
                }
                if let Some(new) = model.pods.get(key).and_then(|p| membership.of(model, p)) {
                    members.add(new);
                }
            }
        }
    }

    /// A set of a membership's members, from the cache or computed over every pod.
    pub fn set(&mut self, model: &ClusterModel, membership: &Membership) -> Arc<IpSet> {
        if !self.used.contains(membership) {
            self.used.insert(membership.clone());
        }
        let members = match self.sets.get_mut(membership) {
            Some(m) => m,
            None => {
                let mut members = Members::default();
                for p in model.pods.values().filter_map(|p| membership.of(model, p)) {
                    members.add(p);
                }
                self.sets.entry(membership.clone()).or_insert(members)
            }
        };
        let kind = membership.kind();
        Arc::clone(members.set.get_or_insert_with(|| {
            Arc::new(IpSet {
                kind,
                members: members.count.keys().cloned().collect(),
            })
        }))
    }
}

/// The keys of pods added, removed or changed between two models (both maps are sorted: one
/// walk over both).
fn changed_pods(a: &ClusterModel, b: &ClusterModel) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let (mut x, mut y) = (a.pods.iter().peekable(), b.pods.iter().peekable());
    loop {
        match (x.peek(), y.peek()) {
            (None, None) => return out,
            (Some((k, _)), None) => {
                out.push((*k).clone());
                x.next();
            }
            (None, Some((k, _))) => {
                out.push((*k).clone());
                y.next();
            }
            // The same pod (one `Arc`) is under the same key: no need to compare the keys.
            (Some((_, pa)), Some((_, pb))) if Arc::ptr_eq(pa, pb) => {
                x.next();
                y.next();
            }
            (Some((ka, pa)), Some((kb, pb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push((*ka).clone());
                    x.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((*kb).clone());
                    y.next();
                }
                std::cmp::Ordering::Equal => {
                    if pa != pb {
                        out.push((*ka).clone());
                    }
                    x.next();
                    y.next();
                }
            },
        }
    }
}
