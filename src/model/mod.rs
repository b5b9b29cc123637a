//! The cluster as rsdn sees it, as plain data at the bottom of the crate (it imports nothing of
//! rsdn's): nodes with their underlay address and pod subnet (`node`), the Service ports with
//! their endpoints (`service`), built from Kubernetes objects. Every cluster source (a directory
//! of YAML, the API server) produces this model; invalid objects are skipped with a reason and
//! counted, never fatal.

pub mod namespace;
pub mod node;
pub mod pod;
pub mod policy;
pub mod service;

pub use namespace::{namespace_from_k8s, Namespace};
pub use node::{node_from_k8s, ClusterNode, NodeLifecycle, NodeSubnet};
pub use pod::{pod_from_k8s, Pod};
pub use policy::{policy_from_k8s, Policy};
pub use service::{Endpoint, EndpointsBuilder, Protocol, ServicePort, ServicePortName, Services};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Node, Pod as K8sPod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use self::service as svc;

/// An object left out of the model, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Where it came from: "Node/name", or a file for unparsable input.
    pub object: String,
    pub reason: String,
    /// For a Node left out because its podCIDR overlaps another node's: that node.
    pub conflicts_with: Option<String>,
}

/// One consistent view of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterModel {
    pub nodes: BTreeMap<String, ClusterNode>,
    pub services: Services,
    /// Pods with an address of the pod network, by (namespace, name).
    pub pods: BTreeMap<(String, String), Arc<Pod>>,
    pub namespaces: BTreeMap<String, Namespace>,
    /// NetworkPolicies by (namespace, name).
    pub policies: BTreeMap<(String, String), Arc<Policy>>,
    /// The local Node's deletion and taints (None: no Node object of that name), whether or not
    /// the node is valid for the overlay.
    pub local_lifecycle: Option<NodeLifecycle>,
    pub skipped: Vec<Skipped>,
}

impl ClusterModel {
    /// The Nodes left out because their podCIDR overlaps another node's.
    pub fn conflicts(&self) -> impl Iterator<Item = &Skipped> {
        self.skipped.iter().filter(|s| s.conflicts_with.is_some())
    }
}

/// What the model builder needs to know about the local configuration.
#[derive(Debug, Clone)]
pub struct ModelScope {
    pub cluster_network: Ipv4Net,
    /// The local node always wins a subnet conflict: its pods already use that subnet.
    pub local_node: String,
    /// The subnet claims (pod subnet -> node IP) the kernel held when the daemon started, read
    /// from vxlan0's routes, neighbours and FDB: established claims for the first model, when
    /// there is no previous one (see `ModelBuilder::finish_after`).
    pub programmed: BTreeMap<Ipv4Net, Ipv4Addr>,
}

/// Where a node's subnet claim ranks in an overlap: the first wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Standing {
    /// The local node: its pods already use the subnet.
    Local,
    /// Traffic for the subnet already flows to this node (see `ModelBuilder::finish_after`).
    Established,
    New,
}

/// Collects objects from a source, then validates them together (overlaps need all of them).
#[derive(Debug, Default, Clone)]
pub struct ModelBuilder {
    candidates: Vec<(Option<String>, ClusterNode)>,
    /// Every Node's lifecycle by name (the local one is kept), valid or not.
    lifecycles: Vec<(String, NodeLifecycle)>,
    services: Vec<(ServicePortName, ServicePort)>,
    endpoints: EndpointsBuilder,
    pods: Vec<Arc<Pod>>,
    namespaces: Vec<Namespace>,
    policies: Vec<Arc<Policy>>,
    skipped: Vec<Skipped>,
}

impl ModelBuilder {
    /// Adds everything another builder collected (a source caches one builder per file).
    pub fn absorb(&mut self, other: &ModelBuilder) {
        self.candidates.extend(other.candidates.iter().cloned());
        self.lifecycles.extend(other.lifecycles.iter().cloned());
        self.services.extend(other.services.iter().cloned());
        self.endpoints.absorb(&other.endpoints);
        self.pods.extend(other.pods.iter().cloned());
        self.namespaces.extend(other.namespaces.iter().cloned());
        self.policies.extend(other.policies.iter().cloned());
        self.skipped.extend(other.skipped.iter().cloned());
    }

    /// A Pod with an address of the pod network (others are not NetworkPolicy's business).
    pub fn add_pod(&mut self, pod: &K8sPod) {
        match pod_from_k8s(pod) {
            Ok(Some(p)) => self.pods.push(Arc::new(p)),
            Ok(None) => {}
            Err(reason) => self.skip(object_name("Pod", &pod.metadata), reason),
        }
    }

    pub fn add_namespace(&mut self, ns: &K8sNamespace) {
        match namespace_from_k8s(ns) {
            Ok(n) => self.namespaces.push(n),
            Err(reason) => self.skip(
                format!("Namespace/{}", ns.metadata.name.as_deref().unwrap_or("")),
                reason,
            ),
        }
    }

    /// A NetworkPolicy: kept unless the pods it selects cannot be known; its invalid parts are
    /// left out (failing closed) and recorded as a skip of the policy.
    pub fn add_policy(&mut self, np: &NetworkPolicy) {
        let object = object_name("NetworkPolicy", &np.metadata);
        match policy_from_k8s(np) {
            Ok(p) => {
                if !p.problems.is_empty() {
                    let reason = p.problems.join("; ");
                    self.skip(object, reason);
                }
                self.policies.push(Arc::new(p));
            }
            Err(reason) => self.skip(object, reason),
        }
    }

    pub fn skip(&mut self, object: impl Into<String>, reason: impl Into<String>) {
        self.skipped.push(Skipped {
            object: object.into(),
            reason: reason.into(),
            conflicts_with: None,
        });
    }

    pub fn add_node(&mut self, node: &Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        self.lifecycles
            .push((name.clone(), NodeLifecycle::from_k8s(node)));
        match node_from_k8s(node) {
            Ok(n) => {
                let created = node
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string());
                self.candidates.push((created, n));
            }
            Err(reason) => self.skip(format!("Node/{name}"), reason),
        }
    }

    /// A Service: all its ports, or (invalid) none of them.
    pub fn add_service(&mut self, service: &Service) {
        let object = object_name("Service", &service.metadata);
        match svc::service_ports(service) {
            Ok(ports) => self.services.extend(ports),
            Err(reason) => self.skip(object, reason),
        }
    }

    /// An EndpointSlice: its valid endpoints, the invalid ones recorded as a partial skip of
    /// the slice; none of them when the slice names no Service.
    pub fn add_endpoint_slice(&mut self, slice: &EndpointSlice) {
        let object = object_name("EndpointSlice", &slice.metadata);
        match svc::slice_endpoints(slice) {
            Ok(Some(read)) => {
                let key = (
                    slice.metadata.namespace.clone().unwrap_or_default(),
                    slice.metadata.name.clone().unwrap_or_default(),
                );
                self.endpoints.add(key, read.endpoints, read.trigger);
                if let Some(reason) = read.dropped {
                    self.skip(object, reason);
                }
            }
            Ok(None) => {}
            Err(reason) => self.skip(object, reason),
        }
    }

    /// Applies the checks that need the whole set: inside the cluster network, unique names,
    /// no overlapping subnets. For a source's first model: the kernel's claims in the scope
    /// are the established ones.
    pub fn finish(self, scope: &ModelScope) -> ClusterModel {
        self.finish_after(scope, None)
    }

    /// `finish`, for a source that published `previous` last (`None` before its first model).
    /// Of overlapping subnets, the local node's wins (its pods use it), then an established
    /// claim (a node of `previous` with the same subnet; before the first model, a claim the
    /// kernel holds, `scope.programmed`), then the oldest `creationTimestamp` (present before
    /// missing), then the first name. A newcomer, however old it looks, never takes over a
    /// subnet whose traffic already flows to another node.
    pub fn finish_after(self, scope: &ModelScope, previous: Option<&ClusterModel>) -> ClusterModel {
        let standing = |n: &ClusterNode| {
            let established = match previous {
                Some(p) => p.nodes.get(&n.name).is_some_and(|o| o.subnet == n.subnet),
                None => scope.programmed.get(&n.subnet.0) == Some(&n.ip),
            };
            if n.name == scope.local_node {
                Standing::Local
            } else if established {
                Standing::Established
            } else {
                Standing::New
            }
        };
        let mut candidates: Vec<(Standing, Option<String>, ClusterNode)> = self
            .candidates
            .into_iter()
            .map(|(created, node)| (standing(&node), created, node))
            .collect();
        candidates.sort_by(|(sa, ta, a), (sb, tb, b)| {
            (sa, ta.is_none(), ta, &a.name).cmp(&(sb, tb.is_none(), tb, &b.name))
        });
        let mut model = ClusterModel {
            nodes: BTreeMap::new(),
            services: Services::default(),
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            policies: BTreeMap::new(),
            local_lifecycle: self
                .lifecycles
                .into_iter()
                .find(|(name, _)| *name == scope.local_node)
                .map(|(_, l)| l),
            skipped: self.skipped,
        };
        for p in self.pods {
            let key = (p.namespace.clone(), p.name.clone());
            if model.pods.insert(key, p).is_some() {
                model.skipped.push(Skipped {
                    object: "Pod".into(),
                    reason: "duplicate pod name".into(),
                    conflicts_with: None,
                });
            }
        }
        for n in self.namespaces {
            model.namespaces.insert(n.name.clone(), n);
        }
        for p in self.policies {
            model
                .policies
                .insert((p.namespace.clone(), p.name.clone()), p);
        }
        (model.services.endpoints, model.services.change_triggers) =
            self.endpoints.finish(&scope.local_node);
        for (spn, port) in self.services {
            if model.services.ports.contains_key(&spn) {
                model.skipped.push(Skipped {
                    object: format!("Service/{}/{}", spn.namespace, spn.name),
                    reason: format!("duplicate Service port {spn} ({})", spn.protocol.as_str()),
                    conflicts_with: None,
                });
                continue;
            }
            model.services.ports.insert(spn, port);
        }
        // Accepted subnets by first address -> (last address, node, its standing): an overlap
        // is found with the one before and the ones starting inside, in O(log n).
        let mut taken: BTreeMap<u32, (u32, String, Standing)> = BTreeMap::new();
        for (standing, _, node) in candidates {
            let object = format!("Node/{}", node.name);
            if !scope.cluster_network.contains(&node.subnet.0) {
                model.skipped.push(Skipped {
                    object,
                    reason: format!(
                        "podCIDR {} is outside the cluster network {}",
                        node.subnet, scope.cluster_network
                    ),
                    conflicts_with: None,
                });
                continue;
            }
            if model.nodes.contains_key(&node.name) {
                model.skipped.push(Skipped {
                    object,
                    reason: "duplicate node name".into(),
                    conflicts_with: None,
                });
                continue;
            }
            let (first, last) = (
                u32::from(node.subnet.0.network()),
                u32::from(node.subnet.0.broadcast()),
            );
            let before = taken
                .range(..=first)
                .next_back()
                .filter(|(_, (end, _, _))| *end >= first);
            let inside = taken.range(first..=last).next();
            if let Some((_, (_, other, why))) = before.or(inside) {
                let other = &model.nodes[other];
                let (s, o, n) = (node.subnet, other.subnet, &other.name);
                model.skipped.push(Skipped {
                    object,
                    reason: match why {
                        Standing::Local => {
                            format!("podCIDR {s} overlaps {o} of node {n}, the local node")
                        }
                        Standing::Established => format!(
                            "podCIDR {s} overlaps {o}, an established claim of node {n} \
                             (a newcomer never takes over a subnet in use)"
                        ),
                        Standing::New => format!("podCIDR {s} overlaps {o} of node {n}"),
                    },
                    conflicts_with: Some(n.clone()),
                });
                continue;
            }
            taken.insert(first, (last, node.name.clone(), standing));
            model.nodes.insert(node.name.clone(), node);
        }
        model
    }
}

/// "Kind/namespace/name" for logs.
fn object_name(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> String {
    format!(
        "{kind}/{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

/// Shorthands for tests, here and in the kernel tiers.
pub mod testing {
    use super::*;

    /// A node from text; panics on text that does not parse.
    pub fn node(name: &str, ip: &str, subnet: &str) -> ClusterNode {
        ClusterNode {
            name: name.into(),
            ip: ip.parse().expect("an IPv4 address"),
            subnet: NodeSubnet(subnet.parse().expect("an IPv4 CIDR")),
            zone: None,
        }
    }

    /// A model of just these nodes.
    pub fn model(nodes: &[ClusterNode]) -> ClusterModel {
        ClusterModel {
            nodes: nodes.iter().map(|n| (n.name.clone(), n.clone())).collect(),
            ..Default::default()
        }
    }

    /// Three nodes a, b, c: 192.168.1.11-13, 10.128.0.0/23, 10.128.2.0/23, 10.128.4.0/23.
    pub fn three() -> Vec<ClusterNode> {
        vec![
            node("a", "192.168.1.11", "10.128.0.0/23"),
            node("b", "192.168.1.12", "10.128.2.0/23"),
            node("c", "192.168.1.13", "10.128.4.0/23"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn node(name: &str, cidr: Option<&str>, ip: Option<&str>, created: Option<&str>) -> Node {
        let mut v =
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
        if let Some(c) = cidr {
            v["spec"] = serde_json::json!({"podCIDR": c});
        }
        if let Some(ip) = ip {
            v["status"] = serde_json::json!({"addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]});
        }
        if let Some(t) = created {
            v["metadata"]["creationTimestamp"] = serde_json::json!(t);
        }
        serde_json::from_value(v).unwrap()
    }

    fn scope() -> ModelScope {
        ModelScope {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            local_node: "a".into(),
            programmed: Default::default(),
        }
    }

    #[test]
    fn a_nodes_zone_is_its_zone_label() {
        let mut n = node("a", Some("10.128.2.0/23"), Some("192.168.1.12"), None);
        assert_eq!(node_from_k8s(&n).unwrap().zone, None);
        for (value, want) in [("zone-a", Some("zone-a")), ("", None)] {
            n.metadata.labels = Some([(node::ZONE_LABEL.to_string(), value.to_string())].into());
            assert_eq!(node_from_k8s(&n).unwrap().zone.as_deref(), want);
        }
    }

    #[test]
    fn valid_node_becomes_a_cluster_node() {
        let n = node_from_k8s(&node(
            "a",
            Some("10.128.2.0/23"),
            Some("192.168.1.12"),
            None,
        ))
        .unwrap();
        assert_eq!(n.ip.to_string(), "192.168.1.12");
        assert_eq!(n.subnet.to_string(), "10.128.2.0/23");
        assert_eq!(n.subnet.gateway().to_string(), "10.128.2.1");
        assert_eq!(n.subnet.vtep_ip().to_string(), "10.128.2.0");
    }

    /// `n` with taints of these keys, and a deletionTimestamp if `deleting`.
    fn leaving(mut n: Node, taints: &[&str], deleting: bool) -> Node {
        let mut v = serde_json::to_value(&n).unwrap();
        v["spec"]["taints"] = taints
            .iter()
            .map(|k| serde_json::json!({"key": k, "effect": "NoSchedule"}))
            .collect();
        if deleting {
            v["metadata"]["deletionTimestamp"] = serde_json::json!("2025-06-01T12:00:00Z");
        }
        n = serde_json::from_value(v).unwrap();
        n
    }

    #[test]
    fn the_local_nodes_lifecycle_reaches_the_model_valid_or_not() {
        let build = |nodes: &[Node]| {
            let mut b = ModelBuilder::default();
            for n in nodes {
                b.add_node(n);
            }
            b.finish(&scope())
        };
        let a = node("a", Some("10.128.0.0/23"), Some("192.168.1.11"), None);
        let b = node("b", Some("10.128.2.0/23"), Some("192.168.1.12"), None);
        let m = build(&[a.clone(), b.clone()]);
        assert_eq!(m.local_lifecycle, Some(NodeLifecycle::default()));
        assert_eq!(m.local_lifecycle.unwrap().leaving(), None);
        // Cordoned by the autoscaler; a remote node's taints stay out of the model.
        let tainted = leaving(
            a.clone(),
            &[
                "node.kubernetes.io/unschedulable",
                node::TO_BE_DELETED_TAINT,
            ],
            false,
        );
        let m = build(&[tainted, leaving(b.clone(), &["x"], true)]);
        let l = m.local_lifecycle.unwrap();
        assert_eq!(
            l.taints,
            [
                "node.kubernetes.io/unschedulable",
                "ToBeDeletedByClusterAutoscaler"
            ]
        );
        assert_eq!(
            l.leaving().as_deref(),
            Some("the Node is tainted ToBeDeletedByClusterAutoscaler")
        );
        // Being deleted, and invalid for the overlay (no podCIDR): still known.
        let gone = leaving(node("a", None, Some("192.168.1.11"), None), &[], true);
        let m = build(&[gone, b.clone()]);
        assert!(!m.nodes.contains_key("a"));
        assert_eq!(
            m.local_lifecycle.unwrap().leaving().as_deref(),
            Some("the Node is being deleted (deletionTimestamp 2025-06-01T12:00:00Z)")
        );
        // Other taints leave the node eligible; no Node object at all: nothing known.
        let m = build(&[leaving(a, &["node.kubernetes.io/unschedulable"], false)]);
        assert_eq!(m.local_lifecycle.unwrap().leaving(), None);
        assert_eq!(build(&[b]).local_lifecycle, None);
    }

    #[test]
    fn each_invalid_node_has_a_reason() {
        let cases = [
            (node("a", None, Some("192.168.1.1"), None), "no podCIDR"),
            (
                node("a", Some("fd00::/64"), Some("192.168.1.1"), None),
                "no IPv4 podCIDR",
            ),
            (
                node("a", Some("10.128.2.1/23"), Some("192.168.1.1"), None),
                "host bits",
            ),
            (
                node("a", Some("10.128.2.0/31"), Some("192.168.1.1"), None),
                "too small",
            ),
            (node("a", Some("10.128.2.0/23"), None, None), "InternalIP"),
            (
                node("", Some("10.128.2.0/23"), Some("192.168.1.1"), None),
                "metadata.name",
            ),
        ];
        for (n, word) in cases {
            let e = node_from_k8s(&n).unwrap_err();
            assert!(e.contains(word), "{e} should mention {word}");
        }
    }

    #[test]
    fn pod_cidrs_list_wins_and_first_ipv4_is_taken() {
        let mut n = node("a", Some("10.128.2.0/23"), Some("192.168.1.1"), None);
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["fd00::/64".into(), "10.128.4.0/23".into()]);
        assert_eq!(
            node_from_k8s(&n).unwrap().subnet.to_string(),
            "10.128.4.0/23"
        );
    }

    #[test]
    fn finish_skips_outside_duplicate_and_overlapping() {
        let mut b = ModelBuilder::default();
        b.add_node(&node(
            "c",
            Some("10.128.4.0/23"),
            Some("192.168.1.3"),
            Some("2024-01-01T00:00:00Z"),
        ));
        b.add_node(&node(
            "d",
            Some("10.128.4.0/24"),
            Some("192.168.1.4"),
            Some("2025-01-01T00:00:00Z"),
        ));
        b.add_node(&node("e", Some("10.200.0.0/23"), Some("192.168.1.5"), None));
        b.add_node(&node(
            "b",
            Some("10.128.0.0/22"),
            Some("192.168.1.2"),
            Some("2020-01-01T00:00:00Z"),
        ));
        b.add_node(&node(
            "a",
            Some("10.128.2.0/23"),
            Some("192.168.1.1"),
            Some("2026-01-01T00:00:00Z"),
        ));
        b.skip("file bad.yaml", "not YAML");
        let m = b.finish(&scope());
        // a is local: it keeps 10.128.2.0/23 although b (older) claims 10.128.0.0/22 over it.
        assert_eq!(m.nodes.keys().collect::<Vec<_>>(), ["a", "c"]);
        let reasons: BTreeMap<_, _> = m
            .skipped
            .iter()
            .map(|s| (s.object.as_str(), s.reason.as_str()))
            .collect();
        assert!(
            reasons["Node/b"].contains("overlaps 10.128.2.0/23 of node a"),
            "{reasons:?}"
        );
        assert!(
            reasons["Node/d"].contains("overlaps 10.128.4.0/23 of node c"),
            "{reasons:?}"
        );
        assert!(
            reasons["Node/e"].contains("outside the cluster network"),
            "{reasons:?}"
        );
        assert_eq!(reasons["file bad.yaml"], "not YAML");
    }

    #[test]
    fn overlap_is_found_before_inside_and_around() {
        let mut b = ModelBuilder::default();
        for (name, cidr) in [
            ("a", "10.128.4.0/23"),
            ("x1", "10.128.5.0/24"),
            ("x2", "10.128.0.0/21"),
            ("x3", "10.128.3.128/25"),
            ("ok", "10.128.6.0/23"),
            ("ok2", "10.128.2.0/24"),
        ] {
            b.add_node(&node(name, Some(cidr), Some("192.168.1.1"), None));
        }
        let m = b.finish(&scope());
        assert_eq!(m.nodes.keys().collect::<Vec<_>>(), ["a", "ok", "ok2", "x3"]);
        let skipped: Vec<&str> = m.skipped.iter().map(|s| s.object.as_str()).collect();
        assert_eq!(skipped, ["Node/x1", "Node/x2"]);
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_saphyr::from_str(&format!(
            "metadata: {{name: web-abc, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\n{yaml}"
        ))
        .unwrap()
    }

    /// The endpoints of `ns/web:port` and the skipped entries of a model of `slices`.
    fn endpoints_of(slices: &[EndpointSlice], port: &str) -> (Vec<String>, Vec<Skipped>) {
        let mut b = ModelBuilder::default();
        for s in slices {
            b.add_endpoint_slice(s);
        }
        let m = b.finish(&scope());
        let spn = ServicePortName {
            namespace: "ns".into(),
            name: "web".into(),
            port: port.into(),
            protocol: svc::Protocol::Tcp,
        };
        let eps = m.services.endpoints.get(&spn).into_iter().flatten();
        (eps.map(|e| e.to_string()).collect(), m.skipped)
    }

    #[test]
    fn bad_addresses_drop_their_endpoints_not_the_slice() {
        let s = slice(
            "ports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [\"fd00::1\"]}\n- {addresses: [999.1.1.1]}\n- {addresses: [10.128.0.10]}\n",
        );
        let (eps, skipped) = endpoints_of(&[s], "http");
        assert_eq!(eps, ["10.128.0.10:8080"]);
        assert_eq!(
            skipped,
            [Skipped {
                object: "EndpointSlice/ns/web-abc".into(),
                reason: r#"2 of 3 endpoints dropped: address "fd00::1" is not IPv4; address "999.1.1.1" is not IPv4"#.into(),
                conflicts_with: None,
            }]
        );
    }

    #[test]
    fn a_bad_port_drops_that_port_not_the_slice() {
        let s = slice(
            "ports: [{name: http, port: 8080}, {name: big, port: 70000}, {name: icmp, port: 7, protocol: ICMP}]\nendpoints:\n- {addresses: [10.128.0.10]}\n- {addresses: [bad]}\n",
        );
        let (eps, skipped) = endpoints_of(&[s], "http");
        assert_eq!(eps, ["10.128.0.10:8080"]);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(
            skipped[0].reason,
            r#"1 of 2 endpoints dropped: address "bad" is not IPv4; 2 of 3 ports dropped: port 70000 is out of range; port "icmp": unknown protocol "ICMP""#
        );
    }

    #[test]
    fn a_slice_without_its_service_is_skipped_whole() {
        let mut s = slice("ports: [{port: 80}]\nendpoints:\n- {addresses: [10.128.0.10]}\n");
        s.metadata.labels = None;
        let (eps, skipped) = endpoints_of(&[s], "");
        assert!(eps.is_empty());
        assert!(skipped[0].reason.contains("service-name"), "{skipped:?}");
    }

    /// Who holds what after a build: accepted node names, and skipped Node -> winner.
    fn outcome(m: &ClusterModel) -> (Vec<&str>, Vec<(&str, &str)>) {
        let conflicts = m
            .conflicts()
            .map(|s| (s.object.as_str(), s.conflicts_with.as_deref().unwrap_or("")))
            .collect();
        (m.nodes.keys().map(String::as_str).collect(), conflicts)
    }

    fn build(
        nodes: &[Node],
        previous: Option<&ClusterModel>,
        kernel: &[(&str, &str)],
    ) -> ClusterModel {
        let mut b = ModelBuilder::default();
        for n in nodes {
            b.add_node(n);
        }
        let mut scope = scope();
        scope.programmed = kernel
            .iter()
            .map(|(subnet, ip)| (subnet.parse().unwrap(), ip.parse().unwrap()))
            .collect();
        b.finish_after(&scope, previous)
    }

    /// The local node and two remote nodes without creationTimestamps, as the lab and many
    /// hand-written directories have them; what the kernel holds for the remote ones.
    fn established() -> (Vec<Node>, [(&'static str, &'static str); 2]) {
        let nodes = vec![
            node("a", Some("10.128.0.0/23"), Some("192.168.1.11"), None),
            node("node2", Some("10.128.2.0/23"), Some("192.168.1.12"), None),
            node("node3", Some("10.128.4.0/23"), Some("192.168.1.13"), None),
        ];
        let kernel = [
            ("10.128.2.0/23", "192.168.1.12"),
            ("10.128.4.0/23", "192.168.1.13"),
        ];
        (nodes, kernel)
    }

    #[test]
    fn a_newcomer_never_displaces_an_established_claim() {
        let (nodes, kernel) = established();
        let before = build(&nodes, None, &[]);
        assert_eq!(outcome(&before), (vec!["a", "node2", "node3"], vec![]));
        let newcomers = [
            // node2's podCIDR, with a timestamp (present sorted before missing).
            (
                node(
                    "zzz-new",
                    Some("10.128.2.0/23"),
                    Some("192.168.1.99"),
                    Some("2020-01-01T00:00:00Z"),
                ),
                "node2",
            ),
            // A /22 over node3's /23.
            (
                node(
                    "big",
                    Some("10.128.4.0/22"),
                    Some("192.168.1.98"),
                    Some("2020-01-01T00:00:00Z"),
                ),
                "node3",
            ),
            // No timestamp either, and "node10" < "node2".
            (
                node("node10", Some("10.128.2.0/23"), Some("192.168.1.97"), None),
                "node2",
            ),
        ];
        for (newcomer, holder) in newcomers {
            let name = newcomer.metadata.name.clone().unwrap();
            let mut all = nodes.clone();
            all.push(newcomer);
            // Established by the previous model, or (a restarted daemon) by the kernel.
            for (how, m) in [
                ("previous model", build(&all, Some(&before), &[])),
                ("kernel claims", build(&all, None, &kernel)),
            ] {
                let object = format!("Node/{name}");
                assert_eq!(
                    outcome(&m),
                    (vec!["a", "node2", "node3"], vec![(object.as_str(), holder)]),
                    "{name}, established by the {how}"
                );
                let reason = &m.conflicts().next().unwrap().reason;
                assert!(
                    reason.contains(&format!("established claim of node {holder}")),
                    "{reason}"
                );
            }
        }
    }

    #[test]
    fn the_local_node_still_wins_over_an_established_claim() {
        let (mut nodes, kernel) = established();
        let before = build(&nodes, None, &[]);
        nodes[0] = node("a", Some("10.128.2.0/23"), Some("192.168.1.11"), None);
        for m in [
            build(&nodes, Some(&before), &[]),
            build(&nodes, None, &kernel),
        ] {
            assert_eq!(outcome(&m), (vec!["a", "node3"], vec![("Node/node2", "a")]));
        }
    }

    #[test]
    fn a_node_that_leaves_frees_its_subnet_for_the_next_claimant() {
        let (nodes, kernel) = established();
        let before = build(&nodes, None, &kernel);
        let zzz = node("zzz-new", Some("10.128.2.0/23"), Some("192.168.1.99"), None);
        let without_node2 = [nodes[0].clone(), nodes[2].clone(), zzz];
        let after = build(&without_node2, Some(&before), &kernel);
        assert_eq!(outcome(&after), (vec!["a", "node3", "zzz-new"], vec![]));
        // node2 comes back: zzz-new holds the subnet now. The kernel's claims of the daemon's
        // start count only until the first model; afterwards the previous model says.
        let mut all = without_node2.to_vec();
        all.push(nodes[1].clone());
        let back = build(&all, Some(&after), &kernel);
        assert_eq!(
            outcome(&back),
            (
                vec!["a", "node3", "zzz-new"],
                vec![("Node/node2", "zzz-new")]
            )
        );
    }

    #[test]
    fn between_newcomers_the_oldest_then_the_name_wins() {
        let (nodes, _) = established();
        let before = build(&nodes, None, &[]);
        let mut all = nodes.clone();
        all.extend([
            node(
                "young",
                Some("10.128.8.0/23"),
                Some("192.168.1.8"),
                Some("2026-01-01T00:00:00Z"),
            ),
            node(
                "old",
                Some("10.128.8.0/23"),
                Some("192.168.1.9"),
                Some("2021-01-01T00:00:00Z"),
            ),
            node("x2", Some("10.128.10.0/23"), Some("192.168.1.10"), None),
            node("x1", Some("10.128.10.0/23"), Some("192.168.1.14"), None),
        ]);
        // A kernel claim by another node IP than the candidate's establishes nothing.
        let stale = [("10.128.10.0/23", "192.168.1.200")];
        for m in [build(&all, Some(&before), &[]), build(&all, None, &stale)] {
            let (kept, lost) = outcome(&m);
            assert_eq!(kept, ["a", "node2", "node3", "old", "x1"]);
            assert_eq!(lost, [("Node/young", "old"), ("Node/x2", "x1")]);
            let reason = &m.conflicts().next().unwrap().reason;
            assert_eq!(
                reason,
                "podCIDR 10.128.8.0/23 overlaps 10.128.8.0/23 of node old"
            );
        }
    }

    #[test]
    fn oldest_claim_wins_between_remote_nodes() {
        let mut b = ModelBuilder::default();
        b.add_node(&node(
            "young",
            Some("10.128.8.0/23"),
            Some("192.168.1.8"),
            Some("2026-01-01T00:00:00Z"),
        ));
        b.add_node(&node(
            "old",
            Some("10.128.8.0/23"),
            Some("192.168.1.9"),
            Some("2021-01-01T00:00:00Z"),
        ));
        let m = b.finish(&scope());
        assert!(m.nodes.contains_key("old") && !m.nodes.contains_key("young"));
    }
}
