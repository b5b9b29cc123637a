//! Nodes: a node's name, underlay address, pod subnet and zone, read from a Node object.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;

/// A node's pod subnet (`spec.podCIDR`): the node's gateway and the VTEP address derive from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeSubnet(pub Ipv4Net);

impl NodeSubnet {
    /// The bridge address on the node: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        rsdn_cni::config::first_host(self.0)
    }

    /// The VTEP address of the node: the subnet's network address (the flannel convention).
    /// It is never handed to a pod, and it names the node in neighbour and route entries.
    pub fn vtep_ip(&self) -> Ipv4Addr {
        self.0.network()
    }
}

impl std::fmt::Display for NodeSubnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The cluster autoscaler's taint on a node it is about to delete (kube-proxy's
/// `ToBeDeletedTaint`).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What a Node object says of the node's life: kept for the local node, whose `/healthz` tells
/// load balancers to stop sending it new connections while it goes away (kube-proxy's node
/// eligibility, KEP-3836).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeLifecycle {
    /// `metadata.deletionTimestamp`, as the API gives it: the Node is being deleted.
    pub deletion_timestamp: Option<String>,
    /// The keys of `spec.taints`, in order.
    pub taints: Vec<String>,
}

impl NodeLifecycle {
    pub fn from_k8s(node: &Node) -> NodeLifecycle {
        NodeLifecycle {
            deletion_timestamp: node
                .metadata
                .deletion_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            taints: node
                .spec
                .iter()
                .flat_map(|s| s.taints.iter().flatten())
                .map(|t| t.key.clone())
                .collect(),
        }
    }

    /// Why load balancers should send the node no new connections, as kube-proxy decides it:
    /// the Node is being deleted, or the cluster autoscaler tainted it for deletion. None: the
    /// node is eligible.
    pub fn leaving(&self) -> Option<String> {
        if let Some(t) = &self.deletion_timestamp {
            return Some(format!("the Node is being deleted (deletionTimestamp {t})"));
        }
        self.taints
            .iter()
            .any(|k| k == TO_BE_DELETED_TAINT)
            .then(|| format!("the Node is tainted {TO_BE_DELETED_TAINT}"))
    }
}

/// A node of the cluster, valid for the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    /// The underlay address VXLAN packets for this node go to (its InternalIP).
    pub ip: Ipv4Addr,
    pub subnet: NodeSubnet,
    /// Its `topology.kubernetes.io/zone` label, where set and not empty (the Service proxy's
    /// topology-aware routing reads the local node's).
    pub zone: Option<String>,
}

/// The label that names a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Validates one Node object on its own: a name, an IPv4 pod CIDR, an IPv4 InternalIP.
pub fn node_from_k8s(node: &Node) -> Result<ClusterNode, String> {
    let name = node
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("no metadata.name")?;
    let spec = node.spec.as_ref();
    // podCIDRs lists one CIDR per family; podCIDR is the first. We take the first IPv4 one.
    let cidrs: Vec<&String> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .map(|v| v.iter().collect())
        .filter(|v: &Vec<&String>| !v.is_empty())
        .or_else(|| spec.and_then(|s| s.pod_cidr.as_ref()).map(|c| vec![c]))
        .ok_or("no podCIDR yet (the controller-manager has not allocated one)")?;
    let subnet = cidrs
        .iter()
        .find_map(|c| c.parse::<Ipv4Net>().ok())
        .ok_or_else(|| format!("no IPv4 podCIDR in {cidrs:?}"))?;
    if subnet != subnet.trunc() {
        return Err(format!("podCIDR {subnet} has host bits set"));
    }
    if subnet.prefix_len() > 30 {
        return Err(format!(
            "podCIDR {subnet} is too small for a gateway and pods"
        ));
    }
    let ip = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .and_then(|addrs| {
            addrs
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        })
        .ok_or("no IPv4 InternalIP in status.addresses")?;
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned();
    Ok(ClusterNode {
        name,
        ip,
        subnet: NodeSubnet(subnet),
        zone,
    })
}
