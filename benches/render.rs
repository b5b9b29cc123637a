//! The proxy's compute step alone (no kernel): render + full payload for N Services with 10
//! endpoints each, shaped like `hack/bench-proxy.sh`'s cluster. Prints the first render of the
//! process (what a daemon's first full sync pays) and the best of several later ones.
//!   cargo bench --bench render [-- N...]
use std::net::Ipv4Addr;
use std::time::Instant;

use rsdn::model::service::{Endpoint, Protocol, ServicePort, ServicePortName, Services};
use rsdn::netfilter::payload::{payload, Context, Scope};
use rsdn::proxy::render::{render_cached, ProxyScope, RenderCache};

fn services(n: usize) -> Services {
    let mut s = Services::default();
    for i in 0..n {
        let (hi, lo) = ((i / 250) as u8, (i % 250 + 1) as u8);
        let spn = ServicePortName {
            namespace: "bench".into(),
            name: format!("s{i}"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        s.ports.insert(
            spn.clone(),
            ServicePort::cluster_ip(Ipv4Addr::new(172, 30, hi, lo), 80),
        );
        let eps = (0..10)
            .map(|e| Endpoint {
                ip: Ipv4Addr::new(10, 129 + e, hi, lo),
                port: 8080,
                node: Some("n2".into()),
                ready: true,
                serving: true,
                terminating: false,
                zone: None,
                zone_hints: vec![],
                node_hints: vec![],
            })
            .collect();
        s.endpoints.insert(spn, eps);
    }
    s
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1000, 10000]
    } else {
        sizes
    };
    let scope = ProxyScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        service_network: "172.30.0.0/16".parse().unwrap(),
        masquerade_bit: 0,
        node_name: "n1".into(),
        node_ip: Ipv4Addr::new(100, 64, 0, 1),
        node_ports: rsdn::proxy::render::NodePorts::Local,
        zone: None,
    };
    println!(
        "{:>6} {:>8} {:>9} {:>9}",
        "N", "lines", "first_ms", "best_ms"
    );
    for n in sizes {
        let svcs = services(n);
        let mut times = vec![];
        let mut lines = 0;
        for _ in 0..5 {
            let started = Instant::now();
            let (ruleset, _) = render_cached(&scope, &svcs, &mut RenderCache::default());
            let text = payload(None, &ruleset, Scope::Full, Context::default()).text;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            lines = text.lines().count();
        }
        let best = times[1..].iter().cloned().fold(f64::MAX, f64::min);
        println!("{n:>6} {lines:>8} {:>9.1} {best:>9.1}", times[0]);
    }
}
