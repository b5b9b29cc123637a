//! Chain names, computed exactly as kube-proxy computes them: the first 16 characters of the
//! base32 (standard alphabet) SHA-256 of the Service port name and the lower-case protocol (and
//! for KUBE-SEP-, the endpoint's `ip:port`). The same Service gets the same chains in both.

use crate::model::service::{Endpoint, ServicePortName};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";

/// Prefixes of the per-Service and per-endpoint chains: stale ones are deleted.
pub const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

use crate::netfilter::ruleset::hash16;

fn port_proto_hash(spn: &ServicePortName) -> String {
    hash16(&[&spn.to_string(), spn.protocol.as_str()])
}

/// The chains of one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChains {
    /// KUBE-SVC-: all usable endpoints ("Cluster" policy).
    pub cluster: String,
    /// KUBE-SVL-: this node's endpoints ("Local" policy).
    pub local: String,
    /// KUBE-EXT-: traffic to NodePorts, external IPs and load-balancer IPs.
    pub external: String,
    /// KUBE-FW-: loadBalancerSourceRanges.
    pub firewall: String,
}

impl ServiceChains {
    pub fn of(spn: &ServicePortName) -> ServiceChains {
        let h = port_proto_hash(spn);
        ServiceChains {
            cluster: format!("KUBE-SVC-{h}"),
            local: format!("KUBE-SVL-{h}"),
            external: format!("KUBE-EXT-{h}"),
            firewall: format!("KUBE-FW-{h}"),
        }
    }
}

/// KUBE-SEP-: one endpoint of one Service port.
pub fn endpoint_chain(spn: &ServicePortName, ep: &Endpoint) -> String {
    endpoint_chain_of(&format!("{spn}{}", spn.protocol.as_str()), &ep.to_string())
}

/// `endpoint_chain` from the port's name and protocol (`namespace/name:porttcp`) and the
/// endpoint's `ip:port`, for a caller that has both at hand.
pub fn endpoint_chain_of(port_proto: &str, endpoint: &str) -> String {
    format!("KUBE-SEP-{}", hash16(&[port_proto, endpoint]))
}
