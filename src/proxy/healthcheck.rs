//! Service health check node ports, as kube-proxy serves them: for every LoadBalancer Service
//! with `externalTrafficPolicy: Local`, an HTTP server on `spec.healthCheckNodePort` that tells
//! the cloud load balancer whether this node has a ready endpoint of the Service (200) or not
//! (503), with kube-proxy's JSON body. Without it, a load balancer keeps sending traffic to nodes
//! that drop it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{error, info};

use crate::health::Health;
use crate::http::Limits;
use crate::model::service::Services;
use crate::model::ClusterModel;

/// A Service by namespace and name: health checks are per Service, not per port.
pub type ServiceName = (String, String);

/// What one Service's health check answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub port: u16,
    /// Ready endpoints on this node, counted once per address over all the Service's ports.
    pub local_endpoints: usize,
}

/// The health checks this node serves, from the Services and their endpoints.
pub fn wanted(services: &Services, node: &str) -> BTreeMap<ServiceName, Wanted> {
    let mut found: BTreeMap<ServiceName, (u16, BTreeSet<Ipv4Addr>)> = BTreeMap::new();
    for (spn, svc) in &services.ports {
        let Some(port) = svc.health_check_node_port else {
            continue;
        };
        let ready_here = services
            .endpoints
            .get(spn)
            .into_iter()
            .flatten()
            .filter(|e| e.ready && e.node.as_deref() == Some(node))
            .map(|e| e.ip);
        let entry = found
            .entry((spn.namespace.clone(), spn.name.clone()))
            .or_insert((port, BTreeSet::new()));
        entry.0 = port;
        entry.1.extend(ready_here);
    }
    found
        .into_iter()
        .map(|(key, (port, local))| {
            let local_endpoints = local.len();
            (
                key,
                Wanted {
                    port,
                    local_endpoints,
                },
            )
        })
        .collect()
}

/// kube-proxy's answer: 200 when the node has local endpoints and the proxy is healthy.
pub fn answer(
    name: &ServiceName,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (StatusCode, String) {
    let status = if local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": name.0, "name": name.1},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    (status, format!("{body:#}\n"))
}

struct Server {
    port: u16,
    local_endpoints: Arc<AtomicUsize>,
    task: AbortHandle,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The open health check servers. `sync` opens the new ones, closes the ones no longer
/// wanted (or moved to another port), updates the counts of the others; a port that cannot be
/// bound is logged and tried again on the next sync, as kube-proxy does.
pub struct HealthCheckServers {
    health: Arc<Health>,
    servers: HashMap<ServiceName, Server>,
    /// Ports that could not be bound, logged once until they can be.
    unbound: HashMap<ServiceName, u16>,
}

/// Serves the health checks of every new model's Services until the models stop; a port that
/// could not be bound is tried again every `retry`.
pub async fn run(
    mut models: watch::Receiver<Arc<ClusterModel>>,
    node: String,
    health: Arc<Health>,
    retry: Duration,
) {
    let mut servers = HealthCheckServers::new(health);
    loop {
        let model = Arc::clone(&models.borrow_and_update());
        servers.sync(&wanted(&model.services, &node)).await;
        tokio::select! {
            r = models.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

impl HealthCheckServers {
    pub fn new(health: Arc<Health>) -> HealthCheckServers {
        HealthCheckServers {
            health,
            servers: HashMap::new(),
            unbound: HashMap::new(),
        }
    }

    pub async fn sync(&mut self, wanted: &BTreeMap<ServiceName, Wanted>) {
        self.unbound.retain(|name, _| wanted.contains_key(name));
        self.servers.retain(|name, server| {
            let keep = wanted.get(name).is_some_and(|w| w.port == server.port);
            if !keep {
                info!(service = %format!("{}/{}", name.0, name.1), port = server.port, "closing health check node port");
            }
            keep
        });
        for (name, w) in wanted {
            if let Some(server) = self.servers.get(name) {
                server
                    .local_endpoints
                    .store(w.local_endpoints, Ordering::Relaxed);
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, w.port));
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    if self.unbound.insert(name.clone(), w.port) != Some(w.port) {
                        error!(service = %format!("{}/{}", name.0, name.1), port = w.port, error = %e, "cannot open health check node port; retrying on every sync");
                    }
                    continue;
                }
            };
            self.unbound.remove(name);
            info!(service = %format!("{}/{}", name.0, name.1), port = w.port, local_endpoints = w.local_endpoints, "serving health check node port");
            let local_endpoints = Arc::new(AtomicUsize::new(w.local_endpoints));
            let (key, count, health) = (name.clone(), local_endpoints.clone(), self.health.clone());
            // Any path, as kube-proxy answers.
            let task = crate::http::spawn_server(listener, Limits::default(), move |_path| {
                // As kube-proxy's: the proxy's health, not the node's (a node going away still
                // tells load balancers where the endpoints are; its /healthz drains it).
                let healthy = health.proxy_healthy(Instant::now());
                let (status, body) = answer(&key, count.load(Ordering::Relaxed), healthy);
                let mut r = crate::http::reply(status, "application/json", body);
                r.headers_mut().insert(
                    "x-content-type-options",
                    hyper::header::HeaderValue::from_static("nosniff"),
                );
                r
            })
            .abort_handle();
            self.servers.insert(
                name.clone(),
                Server {
                    port: w.port,
                    local_endpoints,
                    task,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::service::{Endpoint, Protocol, ServicePort, ServicePortName};

    fn port(name: &str, hc: Option<u16>) -> (ServicePortName, ServicePort) {
        (
            ServicePortName {
                namespace: "ns".into(),
                name: "web".into(),
                port: name.into(),
                protocol: Protocol::Tcp,
            },
            ServicePort {
                node_port: Some(30080),
                external_local: hc.is_some(),
                health_check_node_port: hc,
                ..ServicePort::cluster_ip(Ipv4Addr::new(172, 30, 0, 1), 80)
            },
        )
    }

    fn ep(ip: [u8; 4], port: u16, node: &str, ready: bool) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            port,
            node: Some(node.into()),
            ready,
            serving: ready,
            terminating: false,
            zone: None,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    #[test]
    fn local_ready_endpoints_are_counted_once_per_address() {
        let mut s = Services::default();
        let (http, p) = port("http", Some(32000));
        s.ports.insert(http.clone(), p);
        let (admin, p) = port("admin", Some(32000));
        s.ports.insert(admin.clone(), p);
        s.endpoints.insert(
            http,
            vec![
                ep([10, 128, 0, 5], 8080, "n1", true),
                ep([10, 128, 0, 6], 8080, "n1", false),
                ep([10, 128, 2, 5], 8080, "n2", true),
            ],
        );
        // The same pod on the admin port, and another local pod.
        s.endpoints.insert(
            admin,
            vec![
                ep([10, 128, 0, 5], 9090, "n1", true),
                ep([10, 128, 0, 7], 9090, "n1", true),
            ],
        );
        let key = ("ns".to_string(), "web".to_string());
        let n1 = wanted(&s, "n1");
        assert_eq!(
            n1[&key],
            Wanted {
                port: 32000,
                local_endpoints: 2
            }
        );
        assert_eq!(wanted(&s, "n2")[&key].local_endpoints, 1);
        assert_eq!(wanted(&s, "n3")[&key].local_endpoints, 0);
    }

    #[test]
    fn services_without_a_health_check_port_are_not_served() {
        let mut s = Services::default();
        let (spn, p) = port("http", None);
        s.ports.insert(spn.clone(), p);
        s.endpoints
            .insert(spn, vec![ep([10, 128, 0, 5], 8080, "n1", true)]);
        assert!(wanted(&s, "n1").is_empty());
    }

    #[test]
    fn the_answer_is_kube_proxys() {
        let name = ("shop".to_string(), "web".to_string());
        let (status, body) = answer(&name, 2, true);
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert_eq!(answer(&name, 0, true).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer(&name, 3, false).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
