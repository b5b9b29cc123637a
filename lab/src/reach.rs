//! Connectivity between the lab's pods: `lab probe` (one probe), `lab reach` (the truth tables
//! of the upstream NetworkPolicy tests: every chosen pod to every chosen pod, per port and
//! protocol, all probes at once) and `lab matrix` (every pair of pods by ping, TCP and UDP,
//! against servers it starts for the purpose).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cluster::{node_index, node_ip, require_up, resolve, EXTERNAL_IP};
use crate::lab::Lab;
use crate::objects::{PodRecord, PodRef, Protocol, DEFAULT_NAMESPACE};
use crate::probe::{self, Kind, Outcome, Probe};
use crate::serve;
use crate::table::{self, Table};
use crate::workloads::{find_pod, load_pods};

/// The port the matrix's own servers listen on (TCP and UDP) in every pod.
const MATRIX_PORT: u16 = 5001;

/// How a pod is named in tables: `node1-pod2` for the pods of `lab up`, `x/a` for the others.
fn short_name(p: &PodRecord) -> String {
    if p.pod_namespace == DEFAULT_NAMESPACE {
        p.name.clone()
    } else {
        p.pod_ref().to_string()
    }
}

/// A probe's source: a pod (`NS/NAME` or a `lab up` pod's name) or any namespace of the lab
/// (`node1`, `ext`). Returns (label, network namespace).
fn source(lab: &Lab, s: &str) -> Result<(String, String)> {
    if let Some(p) = pod_by_name(lab, s) {
        return Ok((s.into(), p.netns));
    }
    Ok((s.into(), resolve(lab, s)?))
}

/// A probe's destination: an IPv4 address, a pod, a node (its underlay address) or `ext`.
fn destination(lab: &Lab, s: &str) -> Result<(String, Ipv4Addr)> {
    if let Ok(ip) = s.parse() {
        return Ok((s.into(), ip));
    }
    if let Some(p) = pod_by_name(lab, s) {
        return Ok((s.into(), p.ip));
    }
    if let Some(i) = node_index(s) {
        return Ok((s.into(), node_ip(i)));
    }
    if matches!(s, "ext" | "external") {
        return Ok((s.into(), EXTERNAL_IP.parse().expect("an address")));
    }
    bail!("{s:?} is neither an IPv4 address, a pod (NS/NAME), a node (nodeN) nor ext")
}

fn pod_by_name(lab: &Lab, s: &str) -> Option<PodRecord> {
    let pod: PodRef = s
        .parse()
        .or_else(|_| PodRef::new(DEFAULT_NAMESPACE, s))
        .ok()?;
    find_pod(lab, &pod).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeProtocol {
    Tcp,
    Udp,
    /// ICMP echo (no port)
    Ping,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProbeReport<'a> {
    from: &'a str,
    to: &'a str,
    to_ip: Ipv4Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    protocol: String,
    #[serde(flatten)]
    outcome: &'a Outcome,
}

fn kind_parts(kind: Kind) -> (Option<u16>, String) {
    match kind {
        Kind::Ping => (None, "ICMP".into()),
        Kind::Port(p, proto) => (Some(p), proto.to_string()),
    }
}

/// `lab probe`: exit status 0 when connected, 1 when not.
pub fn probe_one(
    lab: &Lab,
    from: &str,
    to: &str,
    protocol: ProbeProtocol,
    port: Option<u16>,
    timeout: Duration,
    json: bool,
) -> Result<bool> {
    require_up(lab)?;
    let (from_label, netns) = source(lab, from)?;
    let (to_label, ip) = destination(lab, to)?;
    let kind = match (protocol, port) {
        (ProbeProtocol::Ping, _) => Kind::Ping,
        (_, None) => bail!("--port is needed for TCP and UDP"),
        (ProbeProtocol::Tcp, Some(p)) => Kind::Port(p, Protocol::Tcp),
        (ProbeProtocol::Udp, Some(p)) => Kind::Port(p, Protocol::Udp),
    };
    let probes = [Probe {
        from: netns,
        to: ip,
        kind,
    }];
    let o = probe::run(&probes, timeout).remove(0);
    if json {
        let (port, protocol) = kind_parts(kind);
        let r = ProbeReport {
            from: &from_label,
            to: &to_label,
            to_ip: ip,
            port,
            protocol,
            outcome: &o,
        };
        println!("{}", serde_json::to_string(&r)?);
    } else if o.connected {
        let answer = o
            .answer
            .as_deref()
            .map(|a| format!(", answer {a:?}"))
            .unwrap_or_default();
        println!(
            "{from_label} -> {to_label} ({ip}) {kind}: connected in {} ms{answer}",
            o.millis
        );
    } else {
        println!(
            "{from_label} -> {to_label} ({ip}) {kind}: not connected ({}, after {} ms)",
            o.error.as_deref().unwrap_or("?"),
            o.millis
        );
    }
    Ok(o.connected)
}

pub struct ReachArgs {
    pub namespaces: Vec<String>,
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub ports: Vec<u16>,
    pub protocols: Vec<Protocol>,
    pub timeout: Duration,
    pub json: bool,
    pub expect: Option<PathBuf>,
}

/// Pods chosen by `NS/NAME` or `NS` (all its pods); each selector must match.
fn select(pods: &[PodRecord], selectors: &[String]) -> Result<Vec<PodRecord>> {
    let mut out: Vec<PodRecord> = Vec::new();
    for s in selectors {
        let matched: Vec<&PodRecord> = if s.contains('/') {
            let pod: PodRef = s.parse().map_err(anyhow::Error::msg)?;
            pods.iter().filter(|p| p.pod_ref() == pod).collect()
        } else {
            pods.iter().filter(|p| p.pod_namespace == *s).collect()
        };
        if matched.is_empty() {
            bail!("no pod matches {s:?}");
        }
        out.extend(matched.into_iter().cloned());
    }
    out.sort_by_key(PodRecord::pod_ref);
    out.dedup_by_key(|p| p.pod_ref());
    Ok(out)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReachReport<'a> {
    probes: Vec<ProbeReport<'a>>,
    connected: usize,
    blocked: usize,
    elapsed_millis: u64,
    timeout_millis: u64,
}

/// `lab reach`: prints the truth tables (or JSON). With an expectation, fails on any
/// difference and names each differing cell.
pub fn reach(lab: &Lab, a: &ReachArgs) -> Result<()> {
    require_up(lab)?;
    let all = load_pods(lab);
    let chosen = if a.namespaces.is_empty() {
        let mut v = all.clone();
        v.sort_by_key(PodRecord::pod_ref);
        v
    } else {
        select(&all, &a.namespaces)?
    };
    let from = if a.from.is_empty() {
        chosen.clone()
    } else {
        select(&all, &a.from)?
    };
    let to = if a.to.is_empty() {
        chosen.clone()
    } else {
        select(&all, &a.to)?
    };
    if from.is_empty() || to.is_empty() {
        bail!("no pods to probe (rsdn lab pod add)");
    }
    let expected = match &a.expect {
        Some(path) => Some(
            table::parse(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        ),
        None => None,
    };
    let mut kinds = Vec::new();
    for &port in &a.ports {
        for &proto in &a.protocols {
            kinds.push(Kind::Port(port, proto));
        }
    }
    let mut probes = Vec::new();
    let mut pairs = Vec::new();
    for &kind in &kinds {
        for f in &from {
            for t in &to {
                probes.push(Probe {
                    from: f.netns.clone(),
                    to: t.ip,
                    kind,
                });
                pairs.push((f.pod_ref().to_string(), t.pod_ref().to_string(), t.ip));
            }
        }
    }
    let start = Instant::now();
    let outcomes = probe::run(&probes, a.timeout);
    let elapsed = start.elapsed();
    let connected = outcomes.iter().filter(|o| o.connected).count();
    let rows: Vec<String> = from.iter().map(|p| p.pod_ref().to_string()).collect();
    let cols: Vec<String> = to.iter().map(|p| p.pod_ref().to_string()).collect();
    let per_table = rows.len() * cols.len();
    let tables: Vec<Table> = kinds
        .iter()
        .enumerate()
        .map(|(k, kind)| Table {
            title: kind.to_string(),
            rows: rows.clone(),
            cols: cols.clone(),
            cells: (0..rows.len())
                .map(|r| {
                    (0..cols.len())
                        .map(|c| outcomes[k * per_table + r * cols.len() + c].connected)
                        .collect()
                })
                .collect(),
        })
        .collect();
    let summary = format!(
        "{} probes ({} x {} pods, {}) in {:.2} s: {connected} connected, {} blocked (timeout {:?})",
        probes.len(),
        rows.len(),
        cols.len(),
        kinds
            .iter()
            .map(Kind::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        elapsed.as_secs_f64(),
        probes.len() - connected,
        a.timeout
    );
    if a.json {
        let report = ReachReport {
            probes: pairs
                .iter()
                .zip(&probes)
                .zip(&outcomes)
                .map(|(((f, t, ip), p), o)| {
                    let (port, protocol) = kind_parts(p.kind);
                    ProbeReport {
                        from: f,
                        to: t,
                        to_ip: *ip,
                        port,
                        protocol,
                        outcome: o,
                    }
                })
                .collect(),
            connected,
            blocked: probes.len() - connected,
            elapsed_millis: elapsed.as_millis() as u64,
            timeout_millis: a.timeout.as_millis() as u64,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let text: Vec<String> = tables.iter().map(Table::to_string).collect();
        print!("{}", text.join("\n"));
    }
    eprintln!("{summary}");
    if let (Some(expected), Some(path)) = (expected, &a.expect) {
        let mismatches = table::compare(&expected, &tables)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if !mismatches.is_empty() {
            for m in &mismatches {
                eprintln!("MISMATCH {m}");
            }
            bail!(
                "{} of {} cells differ from {}",
                mismatches.len(),
                probes.len(),
                path.display()
            );
        }
        eprintln!("as expected ({})", path.display());
    }
    Ok(())
}

/// `lab matrix`: servers on port 5001 (TCP and UDP) in every pod for its duration, then every
/// ordered pair of pods by ping, TCP and UDP, all at once. Names each broken pair and what
/// failed; an error if any did.
pub fn matrix(lab: &Lab, timeout: Duration) -> Result<()> {
    require_up(lab)?;
    let pods = load_pods(lab);
    if pods.len() < 2 {
        bail!("the matrix needs at least two pods (rsdn lab up)");
    }
    let start = Instant::now();
    let log = lab.state_dir().join("matrix.log");
    let mut spawned = Vec::new();
    for p in &pods {
        let ports = [(MATRIX_PORT, Protocol::Tcp), (MATRIX_PORT, Protocol::Udp)];
        match serve::spawn(&p.netns, &p.answer(), &ports, &log) {
            Ok(c) => spawned.push((format!("{} (see {})", p.pod_ref(), log.display()), c)),
            Err(e) => {
                for (_, mut c) in spawned {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e);
            }
        }
    }
    let mut servers = serve::wait_ready(spawned, serve::START_TIMEOUT)?;
    let mut probes = Vec::new();
    for f in &pods {
        for t in pods.iter().filter(|t| t.pod_ref() != f.pod_ref()) {
            for kind in [
                Kind::Ping,
                Kind::Port(MATRIX_PORT, Protocol::Tcp),
                Kind::Port(MATRIX_PORT, Protocol::Udp),
            ] {
                probes.push(Probe {
                    from: f.netns.clone(),
                    to: t.ip,
                    kind,
                });
            }
        }
    }
    let outcomes = probe::run(&probes, timeout);
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    let elapsed = start.elapsed();
    // Failures per ordered pair, in the order of the probes.
    let names: Vec<String> = pods.iter().map(short_name).collect();
    let n = pods.len();
    let pair_index = |f: usize, t: usize| f * (n - 1) + if t > f { t - 1 } else { t };
    let failures = |f: usize, t: usize| -> Vec<(Kind, &Outcome)> {
        let base = pair_index(f, t) * 3;
        (base..base + 3)
            .filter(|i| !outcomes[*i].connected)
            .map(|i| (probes[i].kind, &outcomes[i]))
            .collect()
    };
    print!(
        "{}",
        table::grid("from \\ to", &names, &names, |f, t| {
            if f == t {
                return "-".into();
            }
            let failed = failures(f, t);
            if failed.is_empty() {
                "ok".into()
            } else {
                failed
                    .iter()
                    .map(|(k, _)| match k {
                        Kind::Ping => "ping",
                        Kind::Port(_, Protocol::Tcp) => "tcp",
                        Kind::Port(_, Protocol::Udp) => "udp",
                    })
                    .collect::<Vec<_>>()
                    .join("+")
            }
        })
    );
    let mut broken = Vec::new();
    for f in 0..n {
        for t in (0..n).filter(|t| *t != f) {
            let failed = failures(f, t);
            if !failed.is_empty() {
                let what: Vec<String> = failed
                    .iter()
                    .map(|(k, o)| {
                        let name = match k {
                            Kind::Ping => "ping".to_string(),
                            Kind::Port(_, proto) => proto.to_string(),
                        };
                        format!("{name} ({})", o.error.as_deref().unwrap_or("?"))
                    })
                    .collect();
                broken.push(format!(
                    "BROKEN {} -> {} ({}): {}",
                    names[f],
                    names[t],
                    pods[t].ip,
                    what.join(", ")
                ));
            }
        }
    }
    for b in &broken {
        println!("{b}");
    }
    let pairs = n * (n - 1);
    println!(
        "{} of {pairs} pairs reach each other (ping, TCP and UDP) in {:.1} s",
        pairs - broken.len(),
        elapsed.as_secs_f64()
    );
    if !broken.is_empty() {
        bail!("{} pairs failed", broken.len());
    }
    Ok(())
}
