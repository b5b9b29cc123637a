//! What `lab up` checks before it reports the lab up: every pod is attached (its host veth is
//! an up port of tun0 on its node, its eth0 has its address) and reachable (it pings its
//! gateway, and one attached pod on every other node). A failure names every broken pod and
//! what is wrong with it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::cluster::node_index;
use crate::lab::Lab;
use crate::netns::{self, ip_json};
use crate::objects::PodRecord;
use crate::probe::{self, Kind, Probe};
use crate::workloads::load_pods;

/// Each ping of the check gets this long (echo requests are repeated meanwhile).
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What is wrong with the pod's attachment, if anything.
fn attachment_problems(lab: &Lab, p: &PodRecord) -> Vec<String> {
    let mut out = Vec::new();
    let node_ns = node_index(&p.node).map(|i| lab.node(i));
    match node_ns.filter(|n| netns::exists(n)) {
        None => out.push(format!("its node {} is gone", p.node)),
        Some(node_ns) => match ip_json(&["-n", &node_ns, "link", "show", "dev", &p.host_veth]) {
            Err(_) => out.push(format!(
                "host veth {} is missing on {}",
                p.host_veth, p.node
            )),
            Ok(links) => {
                let link = &links[0];
                match link["master"].as_str() {
                    Some("tun0") => {}
                    Some(other) => out.push(format!(
                        "host veth {} is not a port of tun0 (it is a port of {other})",
                        p.host_veth
                    )),
                    None => out.push(format!(
                        "host veth {} is not a port of tun0 (detached)",
                        p.host_veth
                    )),
                }
                let up = link["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == "UP"));
                if !up {
                    out.push(format!("host veth {} is down", p.host_veth));
                }
            }
        },
    }
    if !netns::exists(&p.netns) {
        out.push(format!("its network namespace {} is gone", p.netns));
        return out;
    }
    match ip_json(&["-n", &p.netns, "-4", "addr", "show", "dev", "eth0"]) {
        Err(_) => out.push("it has no eth0".into()),
        Ok(v) => {
            let addrs: Vec<&str> = v
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|l| l["addr_info"].as_array().into_iter().flatten())
                .filter_map(|a| a["local"].as_str())
                .collect();
            if !addrs.contains(&p.ip.to_string().as_str()) {
                out.push(format!(
                    "its eth0 does not have its address {} (it has: {})",
                    p.ip,
                    if addrs.is_empty() {
                        "none".into()
                    } else {
                        addrs.join(", ")
                    }
                ));
            }
        }
    }
    out
}

/// Checks every pod of the lab; the error names each broken pod.
pub fn verify(lab: &Lab) -> Result<()> {
    let pods = load_pods(lab);
    let mut problems: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, p) in pods.iter().enumerate() {
        let found = attachment_problems(lab, p);
        if !found.is_empty() {
            problems.insert(i, found);
        }
    }
    // Targets: the first well attached pod of each node.
    let mut target_of_node: BTreeMap<&str, &PodRecord> = BTreeMap::new();
    for (i, p) in pods.iter().enumerate() {
        if !problems.contains_key(&i) {
            target_of_node.entry(p.node.as_str()).or_insert(p);
        }
    }
    let mut probes = Vec::new();
    let mut about = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        if problems.contains_key(&i) {
            continue;
        }
        probes.push(Probe {
            from: p.netns.clone(),
            to: p.gateway,
            kind: Kind::Ping,
        });
        about.push((i, format!("its gateway {}", p.gateway)));
        for (node, t) in &target_of_node {
            if *node != p.node {
                probes.push(Probe {
                    from: p.netns.clone(),
                    to: t.ip,
                    kind: Kind::Ping,
                });
                about.push((i, format!("{} on {node} ({})", t.pod_ref(), t.ip)));
            }
        }
    }
    for ((i, what), o) in about.into_iter().zip(probe::run(&probes, PING_TIMEOUT)) {
        if !o.connected {
            problems.entry(i).or_default().push(format!(
                "cannot ping {what}: {}",
                o.error.unwrap_or_default()
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = problems
        .iter()
        .map(|(i, found)| {
            let p = &pods[*i];
            format!(
                "pod {} (network namespace {}, {}): {}",
                p.pod_ref(),
                p.netns,
                p.node,
                found.join("; ")
            )
        })
        .collect();
    bail!(
        "lab {}: {} of {} pod(s) not attached or not reachable:\n  {}",
        lab.name(),
        lines.len(),
        pods.len(),
        lines.join("\n  ")
    )
}
