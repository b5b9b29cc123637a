//! `rsdn cleanup`, as `kube-proxy --cleanup`: removes everything rsdn owns on a node and
//! nothing else, for an uninstall or a move to another network plugin. In the reverse order of
//! creation: the conflist (no new pod is wired into a network that is going away), then in
//! each iptables backend present the chains of rsdn's producers and their jumps from the
//! built-in chains (`netfilter::cleanup`, by the producers' own `owner()` and `jumps()`, so
//! the daemon and its cleanup agree on what is ours), then the `RSDN-` ipsets, then the
//! overlay: routes with protocol 212, vxlan0, tun0 (`overlay::kernel::Kernel::teardown`).
//!
//! Pods' interfaces, the plugin's IPAM records and everything foreign stay. The Service
//! proxy's `KUBE-*` chains are named as kube-proxy names its own: where kube-proxy runs or ran
//! (its `KUBE-PROXY-CANARY` chain is in the backend) or the configuration says `proxy: false`,
//! they are left to kube-proxy (`kube-proxy --cleanup` removes them). Teardown keeps going
//! after a failure and reports it; a second run finds nothing and succeeds.

use std::path::Path;

use crate::config::NodeConfig;
use crate::netfilter::backend::Backend;
use crate::netfilter::cleanup::{self as nf, KUBE_PROXY_CANARY};
use crate::netfilter::jumps::Jump;
use crate::netfilter::producer::{Owner, Producer};
use crate::netfilter::ruleset::TableName;
use crate::netfilter::save::Saved;
use crate::netfilter::sets;
use crate::netfilter::tools::{Iptables, IptablesError, Tools};

/// Both backends: a node may hold rules of each (a switch of the distribution's default).
pub const BACKENDS: [Backend; 2] = [Backend::Nft, Backend::Legacy];

/// What a cleanup did, a line each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub removed: Vec<String>,
    /// Things of ours (or of our names) left in place, and why.
    pub kept: Vec<String>,
    /// What was not looked at, and why (a tool that is not installed).
    pub skipped: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    /// The report as printed: a line per item, then a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (tag, lines) in [
            ("removed", &self.removed),
            ("kept", &self.kept),
            ("skipped", &self.skipped),
            ("error", &self.errors),
        ] {
            for l in lines {
                out += &format!("{tag}: {l}\n");
            }
        }
        out + &match (self.removed.len(), self.errors.len()) {
            (0, 0) => "nothing of rsdn's to remove on this node\n".to_string(),
            (n, 0) => format!("removed {n} item(s) of rsdn's\n"),
            (n, e) => format!("removed {n} item(s) of rsdn's; {e} error(s)\n"),
        }
    }
}

/// Cleans the node (the calling thread's network namespace) of what `config`'s daemon would
/// own, in every backend of `backends` present.
pub async fn run(config: &NodeConfig, backends: &[Backend]) -> Report {
    let mut r = Report::default();
    conflist(&config.cni_conf_path(), &mut r);
    // Every producer, the proxy included: whether its chains are ours is decided per backend.
    let mut registry = prometheus_client::registry::Registry::default();
    let all = NodeConfig {
        proxy: true,
        ..config.clone()
    };
    let producers = crate::daemon::producers(&all, &mut registry);
    for backend in backends {
        netfilter(*backend, &producers, config.proxy, &mut r);
    }
    ipsets(&mut r);
    match crate::overlay::kernel::Kernel::connect() {
        Ok(kernel) => {
            let t = kernel.teardown().await;
            r.removed.extend(t.removed);
            r.kept.extend(t.kept);
            r.errors.extend(t.errors);
        }
        Err(e) => r.errors.push(e.to_string()),
    }
    r
}

/// The conflist, if it is ours (network `rsdn`, first plugin `rsdn-cni`), and the temporary
/// file an interrupted write may have left.
fn conflist(path: &Path, r: &mut Report) {
    let ours = |v: &serde_json::Value| {
        v["name"] == crate::cniconf::NETWORK_NAME
            && v["plugins"][0]["type"] == rsdn_cni::config::PLUGIN_TYPE
    };
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => r
            .errors
            .push(format!("cannot read {}: {e}", path.display())),
        Ok(text) if !serde_json::from_str(&text).is_ok_and(|v| ours(&v)) => r.kept.push(format!(
            "file {}: not the conflist rsdn writes (network {}, plugin {})",
            path.display(),
            crate::cniconf::NETWORK_NAME,
            rsdn_cni::config::PLUGIN_TYPE
        )),
        Ok(_) => match std::fs::remove_file(path) {
            Ok(()) => r.removed.push(format!("file {}", path.display())),
            Err(e) => r
                .errors
                .push(format!("cannot remove {}: {e}", path.display())),
        },
    }
    let tmp = crate::cniconf::temporary_path(path);
    if std::fs::remove_file(&tmp).is_ok() {
        r.removed.push(format!("file {}", tmp.display()));
    }
}

/// The tables of `backend` there are to look at: for legacy only those the kernel has
/// instantiated in this namespace (reading one would instantiate it, and iptables-nft would
/// warn about legacy tables from then on).
fn tables(backend: Backend) -> Vec<TableName> {
    if backend == Backend::Legacy {
        // The calling thread's namespace (/proc/net is the process's).
        if let Ok(names) = std::fs::read_to_string("/proc/thread-self/net/ip_tables_names") {
            return TableName::ALL
                .into_iter()
                .filter(|t| names.lines().any(|l| l.trim() == t.as_str()))
                .collect();
        }
    }
    TableName::ALL.to_vec()
}

fn not_installed(e: &IptablesError) -> bool {
    matches!(e, IptablesError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Our chains and jumps in one backend's tables.
fn netfilter(backend: Backend, producers: &[Box<dyn Producer>], proxy: bool, r: &mut Report) {
    let ipt = Tools { backend };
    let tool = backend.tool("");
    let tables = tables(backend);
    if tables.is_empty() {
        r.skipped.push(format!("{tool}: no table in use"));
        return;
    }
    let texts = match nf::save_all(&ipt, &tables) {
        Ok(t) => t,
        Err(e) if not_installed(&e) => {
            r.skipped.push(format!("{tool}: not installed"));
            return;
        }
        Err(e) => {
            r.errors.push(e.to_string());
            return;
        }
    };
    let saved: Vec<(TableName, Saved)> = texts.iter().map(|(t, s)| (*t, Saved::parse(s))).collect();
    let keep_proxy = if !proxy {
        Some("the configuration says proxy: false (kube-proxy is the proxy)".to_string())
    } else if nf::kube_proxy_canary(&saved) {
        Some(format!(
            "kube-proxy's {KUBE_PROXY_CANARY} chain is here: kube-proxy runs or ran in this \
             backend, and its chains are named as the proxy's (kube-proxy --cleanup removes them)"
        ))
    } else {
        None
    };
    let mine: Vec<&dyn Producer> = producers
        .iter()
        .map(|p| &**p)
        .filter(|p| keep_proxy.is_none() || p.name() != crate::proxy::render::PRODUCER)
        .collect();
    if let Some(why) = &keep_proxy {
        let there = saved
            .iter()
            .any(|(t, s)| s.chains.keys().any(|c| crate::proxy::render::owns(*t, c)));
        if there {
            r.kept
                .push(format!("{tool}: the KUBE-* chains and their jumps: {why}"));
        }
    }
    let owners: Vec<Owner> = mine.iter().map(|p| p.owner()).collect();
    let owned = |t: TableName, c: &str| owners.iter().any(|own| own(t, c));
    let jumps: Vec<Jump> = mine.iter().flat_map(|p| p.jumps()).collect();
    match nf::apply(&ipt, &saved, &owned, &jumps) {
        Ok(plan) => {
            for (t, rule) in &plan.jumps {
                r.removed.push(format!("{tool} -t {t}: rule {rule}"));
            }
            for t in TableName::ALL {
                let chains: Vec<&str> = plan
                    .chains
                    .iter()
                    .filter(|(ct, _)| *ct == t)
                    .map(|(_, c)| c.as_str())
                    .collect();
                if !chains.is_empty() {
                    r.removed.push(format!(
                        "{tool} -t {t}: {} chain(s) {}",
                        chains.len(),
                        sample(&chains)
                    ));
                }
            }
            for (t, chain, why) in plan.kept {
                r.kept.push(format!("{tool} -t {t}: chain {chain}: {why}"));
            }
        }
        Err(e) => r.errors.push(e.to_string()),
    }
}

/// Names, the first 20 of them: a node with 10000 Services has 40000 chains.
fn sample(names: &[&str]) -> String {
    const SHOWN: usize = 20;
    let mut out = names[..names.len().min(SHOWN)].join(" ");
    if names.len() > SHOWN {
        out += &format!(" and {} more", names.len() - SHOWN);
    }
    out
}

/// Our ipsets (named `RSDN-`), after the rules that used them; shared by both backends.
fn ipsets(r: &mut Report) {
    let ipt = Tools {
        backend: Backend::Nft,
    };
    let names = match ipt.ipset_save() {
        Ok(text) => sets::parse_save(&text).into_keys(),
        Err(e) if not_installed(&e) => {
            r.skipped.push("ipset: not installed".into());
            return;
        }
        Err(e) => {
            r.errors.push(e.to_string());
            return;
        }
    };
    for name in names.filter(|n| n.starts_with(sets::PREFIX)) {
        match ipt.ipset_restore(&format!("destroy {name}\n")) {
            Ok(()) => r.removed.push(format!("ipset {name}")),
            // A rule not of ours still matches on it.
            Err(e) if e.to_string().contains("in use") => r
                .kept
                .push(format!("ipset {name}: in use by a rule not of rsdn's")),
            Err(e) => r.errors.push(e.to_string()),
        }
    }
}
