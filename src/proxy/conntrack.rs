//! UDP has no connection to end: a client keeps sending to a dead endpoint as long as its
//! conntrack entry lives. For every UDP Service port whose endpoint went away, the flows DNATed
//! to it are deleted, as kube-proxy does. `Conntrack` is the seam to the kernel (the conntrack
//! tool); `Recorder` stands in for it in tests.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};

use crate::model::service::{Endpoint, Protocol, ServicePort, Services};

/// Deletes UDP flows matching a `conntrack -D` filter; returns how many it deleted.
pub trait Conntrack: Send {
    fn delete_udp(&self, filter: &[String]) -> usize;
}

/// The conntrack tool.
pub struct Tool;

impl Conntrack for Tool {
    fn delete_udp(&self, filter: &[String]) -> usize {
        let out = Command::new("conntrack")
            .args(["-D", "-p", "udp"])
            .args(filter)
            .output();
        match out {
            Ok(o) => {
                // The tool reports the count on stderr, and exits 1 when there were none.
                let text = String::from_utf8_lossy(&o.stderr);
                text.split_whitespace()
                    .zip(text.split_whitespace().skip(1))
                    .find(|(_, w)| *w == "flow")
                    .and_then(|(n, _)| n.parse().ok())
                    .unwrap_or(0)
            }
            Err(e) => {
                warn!(error = %e, "cannot run conntrack; stale UDP flows stay until they time out");
                0
            }
        }
    }
}

/// Records the filters it is asked to delete, and deletes nothing.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    pub calls: Arc<Mutex<Vec<Vec<String>>>>,
}

impl Conntrack for Recorder {
    fn delete_udp(&self, filter: &[String]) -> usize {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(filter.to_vec());
        0
    }
}

/// The addresses a Service port is reached at, for conntrack matching.
fn service_ips(p: &ServicePort) -> Vec<Ipv4Addr> {
    let mut ips = vec![p.cluster_ip];
    ips.extend(&p.external_ips);
    ips.extend(&p.load_balancer_ips);
    ips
}

fn usable(eps: Option<&Vec<Endpoint>>) -> BTreeSet<Ipv4Addr> {
    eps.into_iter()
        .flatten()
        .filter(|e| e.ready || (e.serving && e.terminating))
        .map(|e| e.ip)
        .collect()
}

/// Deletes the UDP flows to endpoints that `old` had and `new` lacks; returns how many.
pub fn clear_stale_udp(ct: &dyn Conntrack, old: &Services, new: &Services) -> usize {
    let mut deleted = 0;
    for (spn, port) in old
        .ports
        .iter()
        .filter(|(s, _)| s.protocol == Protocol::Udp)
    {
        let still = new.ports.contains_key(spn);
        if still && old.endpoints.get(spn) == new.endpoints.get(spn) {
            continue;
        }
        let before = usable(old.endpoints.get(spn));
        let after = if still {
            usable(new.endpoints.get(spn))
        } else {
            BTreeSet::new()
        };
        for gone in before.difference(&after) {
            let mut filters: Vec<Vec<String>> = service_ips(port)
                .iter()
                .map(|ip| vec!["--orig-dst".into(), ip.to_string()])
                .collect();
            if let Some(np) = port.node_port {
                filters.push(vec!["--orig-port-dst".into(), np.to_string()]);
            }
            for mut f in filters {
                f.extend(["--dst-nat".into(), gone.to_string()]);
                let n = ct.delete_udp(&f);
                if n > 0 {
                    info!(service = %spn, flows = n, filter = %f.join(" "), "cleared stale UDP conntrack entries");
                } else {
                    debug!(service = %spn, filter = %f.join(" "), "no stale UDP conntrack entries");
                }
                deleted += n;
            }
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::service::ServicePortName;

    fn services(eps: &[&str], port: Protocol) -> Services {
        let spn = ServicePortName {
            namespace: "ns".into(),
            name: "dns".into(),
            port: "53".into(),
            protocol: port,
        };
        let mut s = Services::default();
        s.ports.insert(
            spn.clone(),
            ServicePort {
                node_port: Some(30053),
                ..crate::model::testing::service_port("172.30.0.10", 53)
            },
        );
        s.endpoints.insert(
            spn,
            eps.iter()
                .map(|ip| Endpoint {
                    ip: ip.parse().unwrap(),
                    port: 53,
                    node: None,
                    ready: true,
                    serving: true,
                    terminating: false,
                })
                .collect(),
        );
        s
    }

    #[test]
    fn flows_to_a_removed_udp_endpoint_are_deleted_by_service_ip_and_node_port() {
        let r = Recorder::default();
        let old = services(&["10.128.0.5", "10.128.2.5"], Protocol::Udp);
        let new = services(&["10.128.0.5"], Protocol::Udp);
        clear_stale_udp(&r, &old, &new);
        let calls = r.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                ["--orig-dst", "172.30.0.10", "--dst-nat", "10.128.2.5"],
                ["--orig-port-dst", "30053", "--dst-nat", "10.128.2.5"],
            ]
        );
        // TCP needs nothing; unchanged endpoints need nothing.
        let r = Recorder::default();
        clear_stale_udp(
            &r,
            &services(&["10.128.0.5", "10.128.2.5"], Protocol::Tcp),
            &services(&["10.128.0.5"], Protocol::Tcp),
        );
        clear_stale_udp(&r, &old, &old);
        assert!(r.calls.lock().unwrap().is_empty());
    }
}
