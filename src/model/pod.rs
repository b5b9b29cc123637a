//! Pods as NetworkPolicy needs them: where they are (node, address), what they are (namespace,
//! labels) and the ports they name. Pods without an address of the pod network are not in the
//! model: hostNetwork pods (never selected by a policy), pods not yet given an address, and
//! pods that finished (Succeeded, Failed: their address may already be someone else's).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Pod as K8sPod;

use super::service::Protocol;

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    /// `spec.nodeName` (empty while unscheduled).
    pub node: String,
    pub ports: Vec<NamedPort>,
}

impl Pod {
    /// The number a port name stands for on this pod, for a protocol.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// The pod, or None when it has no address of the pod network; an error for an object that
/// cannot be a pod (no name).
pub fn pod_from_k8s(pod: &K8sPod) -> Result<Option<Pod>, String> {
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("no metadata.name")?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Ok(None);
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let ips = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|i| i.ip.clone()).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .or_else(|| status.and_then(|s| s.pod_ip.clone()).map(|i| vec![i]))
        .unwrap_or_default();
    let Some(ip) = ips.iter().find_map(|i| i.parse::<Ipv4Addr>().ok()) else {
        return Ok(None);
    };
    let mut ports = Vec::new();
    for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for p in c.ports.iter().flatten() {
            let Some(port_name) = p.name.clone().filter(|n| !n.is_empty()) else {
                continue;
            };
            let (Ok(protocol), Ok(port)) = (
                Protocol::parse(p.protocol.as_deref()),
                u16::try_from(p.container_port),
            ) else {
                continue;
            };
            ports.push(NamedPort {
                name: port_name,
                protocol,
                port,
            });
        }
    }
    ports.sort();
    Ok(Some(Pod {
        namespace,
        name,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ip,
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ports,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> K8sPod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn a_running_pod_with_named_ports() {
        let p = pod_from_k8s(&pod(
            "metadata: {name: a, namespace: x, labels: {app: web}}\nspec:\n  nodeName: n1\n  containers:\n  - name: c\n    ports: [{name: serve-80-tcp, containerPort: 80}, {name: serve-80-udp, containerPort: 80, protocol: UDP}, {containerPort: 9}]\nstatus: {phase: Running, podIP: 10.128.0.5, podIPs: [{ip: 'fd00::5'}, {ip: 10.128.0.5}]}\n",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            (p.ip.to_string(), p.node.as_str()),
            ("10.128.0.5".into(), "n1")
        );
        assert_eq!(p.named_port("serve-80-udp", Protocol::Udp), Some(80));
        assert_eq!(p.named_port("serve-80-udp", Protocol::Tcp), None);
        assert_eq!(p.ports.len(), 2, "an unnamed port names nothing");
    }

    #[test]
    fn host_network_unaddressed_and_finished_pods_are_left_out() {
        for yaml in [
            "metadata: {name: a}\nspec: {hostNetwork: true, containers: []}\nstatus: {podIP: 10.0.0.1}\n",
            "metadata: {name: a}\nspec: {containers: []}\nstatus: {phase: Pending}\n",
            "metadata: {name: a}\nspec: {containers: []}\nstatus: {phase: Succeeded, podIP: 10.128.0.5}\n",
            "metadata: {name: a}\nspec: {containers: []}\nstatus: {podIP: 'fd00::1'}\n",
        ] {
            assert_eq!(pod_from_k8s(&pod(yaml)).unwrap(), None, "{yaml}");
        }
        assert!(pod_from_k8s(&pod("metadata: {}\nspec: {containers: []}\n")).is_err());
    }
}
