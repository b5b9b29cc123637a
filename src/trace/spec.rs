//! The two ends of a trace as the operator names them, and what they are in the model:
//! `NS/NAME` (a pod), `NS/NAME:PORT` (a Service port, by name or number), `node:NAME[:PORT]`
//! (a node itself, or a NodePort on it), `IP[:PORT][/PROTO]` (whatever has that address: a pod,
//! a node, a Service's cluster, external or load-balancer IP, or a host outside the cluster).

use std::net::Ipv4Addr;

use crate::model::{ClusterModel, ClusterNode, Pod, ServicePort, ServicePortName};

/// An end as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Pod {
        namespace: String,
        name: String,
    },
    Service {
        namespace: String,
        name: String,
        port: String,
    },
    Node {
        name: String,
        port: Option<u16>,
    },
    Address {
        ip: Ipv4Addr,
        port: Option<u16>,
    },
}

/// An end with its protocol (`.../udp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub spec: Spec,
    pub proto: Option<String>,
}

pub fn parse(text: &str) -> Result<End, String> {
    let (body, proto) = match text.rsplit_once('/') {
        Some((b, p)) if ["tcp", "udp", "sctp", "icmp"].contains(&p.to_lowercase().as_str()) => {
            (b, Some(p.to_lowercase()))
        }
        _ => (text, None),
    };
    let bad = || {
        format!(
            "{text:?}: expected NS/POD, NS/SERVICE:PORT, node:NAME[:PORT], or IP[:PORT][/tcp|udp|sctp]"
        )
    };
    let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
    let spec = if let Some(rest) = body.strip_prefix("node:") {
        match rest.split_once(':') {
            Some((name, p)) => Spec::Node {
                name: name.into(),
                port: Some(port(p)?),
            },
            None => Spec::Node {
                name: rest.into(),
                port: None,
            },
        }
    } else if let Some((ns, rest)) = body.split_once('/') {
        if ns.is_empty() || rest.is_empty() {
            return Err(bad());
        }
        match rest.split_once(':') {
            Some((name, p)) if !p.is_empty() => Spec::Service {
                namespace: ns.into(),
                name: name.into(),
                port: p.into(),
            },
            Some(_) => return Err(bad()),
            None => Spec::Pod {
                namespace: ns.into(),
                name: rest.into(),
            },
        }
    } else {
        let (ip, p) = match body.split_once(':') {
            Some((ip, p)) => (ip, Some(port(p)?)),
            None => (body, None),
        };
        Spec::Address {
            ip: ip.parse().map_err(|_| bad())?,
            port: p,
        }
    };
    Ok(End { spec, proto })
}

/// What an end is.
#[derive(Debug, Clone, PartialEq)]
pub enum Place {
    Pod(Pod),
    /// A node itself (host network).
    Node(ClusterNode),
    /// A Service port at one of its addresses: `kind` says which ("cluster IP", "external
    /// IP", "loadbalancer IP").
    Service {
        spn: ServicePortName,
        svc: ServicePort,
        kind: &'static str,
    },
    NodePort {
        node: ClusterNode,
        spn: ServicePortName,
        svc: ServicePort,
    },
    Outside,
}

/// An end resolved against the model: what it is, its address, port and protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub place: Place,
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
    pub proto: Option<String>,
    /// How the trace names it.
    pub label: String,
}

fn pod_by_ip(model: &ClusterModel, ip: Ipv4Addr) -> Option<&Pod> {
    model.pods.values().find(|p| p.ip == ip).map(|p| &**p)
}

/// Resolves an end; `dst` for a destination (Services and NodePorts are destinations only).
pub fn resolve(end: &End, model: &ClusterModel, dst: bool) -> Result<Resolved, String> {
    let proto = end.proto.clone();
    let r = match &end.spec {
        Spec::Pod { namespace, name } => {
            let pod = model
                .pods
                .get(&(namespace.clone(), name.clone()))
                .ok_or_else(|| format!("no pod {namespace}/{name} with an address in the model"))?;
            Resolved {
                place: Place::Pod((**pod).clone()),
                ip: pod.ip,
                port: None,
                proto,
                label: format!("pod {namespace}/{name} ({})", pod.ip),
            }
        }
        Spec::Service {
            namespace,
            name,
            port,
        } => {
            let (spn, svc) = model
                .services
                .ports
                .iter()
                .find(|(spn, svc)| {
                    spn.namespace == *namespace
                        && spn.name == *name
                        && (spn.port == *port || svc.port.to_string() == *port)
                        && proto.as_deref().is_none_or(|p| p == spn.protocol.as_str())
                })
                .ok_or_else(|| format!("no Service port {namespace}/{name}:{port} in the model"))?;
            Resolved {
                place: Place::Service {
                    spn: spn.clone(),
                    svc: svc.clone(),
                    kind: "cluster IP",
                },
                ip: svc.cluster_ip,
                port: Some(svc.port),
                proto: Some(spn.protocol.as_str().into()),
                label: format!(
                    "Service {spn} ({}:{}/{})",
                    svc.cluster_ip,
                    svc.port,
                    spn.protocol.as_str()
                ),
            }
        }
        Spec::Node { name, port } => {
            let node = model
                .nodes
                .get(name)
                .ok_or_else(|| format!("no node {name} in the model"))?;
            by_address(model, node.ip, *port, proto, dst)?
        }
        Spec::Address { ip, port } => by_address(model, *ip, *port, proto, dst)?,
    };
    if !dst && matches!(r.place, Place::Service { .. } | Place::NodePort { .. }) {
        return Err(format!("{} cannot be a source", r.label));
    }
    Ok(r)
}

fn by_address(
    model: &ClusterModel,
    ip: Ipv4Addr,
    port: Option<u16>,
    proto: Option<String>,
    dst: bool,
) -> Result<Resolved, String> {
    let want = proto.clone().unwrap_or_else(|| "tcp".into());
    let resolved = |place, label| Resolved {
        place,
        ip,
        port,
        proto: proto.clone(),
        label,
    };
    if let Some(pod) = pod_by_ip(model, ip) {
        return Ok(resolved(
            Place::Pod(pod.clone()),
            format!("pod {}/{} ({ip})", pod.namespace, pod.name),
        ));
    }
    if let Some(node) = model.nodes.values().find(|n| n.ip == ip) {
        if let (true, Some(p)) = (dst, port) {
            if let Some((spn, svc)) = model
                .services
                .ports
                .iter()
                .find(|(spn, svc)| svc.node_port == Some(p) && spn.protocol.as_str() == want)
            {
                return Ok(Resolved {
                    place: Place::NodePort {
                        node: node.clone(),
                        spn: spn.clone(),
                        svc: svc.clone(),
                    },
                    ip,
                    port,
                    proto: Some(want.clone()),
                    label: format!("NodePort {p} of {spn} on {} ({ip}:{p}/{want})", node.name),
                });
            }
        }
        return Ok(resolved(
            Place::Node(node.clone()),
            format!("node {} ({ip})", node.name),
        ));
    }
    if dst {
        for (spn, svc) in &model.services.ports {
            if spn.protocol.as_str() != want || port.is_some_and(|p| p != svc.port) {
                continue;
            }
            let kind = if svc.cluster_ip == ip {
                "cluster IP"
            } else if svc.external_ips.contains(&ip) {
                "external IP"
            } else if svc.load_balancer_ips.contains(&ip) {
                "loadbalancer IP"
            } else {
                continue;
            };
            return Ok(Resolved {
                place: Place::Service {
                    spn: spn.clone(),
                    svc: svc.clone(),
                    kind,
                },
                ip,
                port: Some(svc.port),
                proto: Some(want),
                label: format!(
                    "Service {spn} {kind} ({ip}:{}/{})",
                    svc.port,
                    spn.protocol.as_str()
                ),
            });
        }
    }
    Ok(resolved(
        Place::Outside,
        format!("{ip} (outside the cluster)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses() {
        let p = |s| parse(s).unwrap();
        assert_eq!(
            p("x/a").spec,
            Spec::Pod {
                namespace: "x".into(),
                name: "a".into()
            }
        );
        assert_eq!(
            p("e2e/web:http").spec,
            Spec::Service {
                namespace: "e2e".into(),
                name: "web".into(),
                port: "http".into()
            }
        );
        assert_eq!(
            p("node:node2:30080/udp"),
            End {
                spec: Spec::Node {
                    name: "node2".into(),
                    port: Some(30080)
                },
                proto: Some("udp".into())
            }
        );
        assert_eq!(
            p("10.128.2.5:80/tcp"),
            End {
                spec: Spec::Address {
                    ip: "10.128.2.5".parse().unwrap(),
                    port: Some(80)
                },
                proto: Some("tcp".into())
            }
        );
        assert_eq!(
            p("203.0.113.7").spec,
            Spec::Address {
                ip: "203.0.113.7".parse().unwrap(),
                port: None
            }
        );
        for bad in [
            "x/",
            "/a",
            "x/a:",
            "10.0.0.300",
            "10.0.0.1:http",
            "node:n:x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
