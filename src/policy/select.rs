//! Which pods a policy selects, and which pods a peer stands for: selectors evaluated against
//! the model's pods and namespaces.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::model::namespace::NAME_LABEL;
use crate::model::policy::{Namespaces, Peer, Policy, PortSpec};
use crate::model::service::Protocol;
use crate::model::{ClusterModel, Pod};

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
        .map(|(_, p)| p)
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
