//! The kernel side of the proxy: which iptables backend this node uses, one
//! `iptables-restore --noflush` transaction per sync, the chains that exist, and the jumps from
//! the built-in chains (single-rule checks through the `iptables` crate).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};

use super::render::Jump;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    fn tool(self, suffix: &str) -> String {
        format!("iptables-{}{suffix}", self.name())
    }

    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "nft" | "nf_tables" => Some(Backend::Nft),
            "legacy" => Some(Backend::Legacy),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed{}: {stderr}", line.as_ref().map(|(n, l)| format!(" at line {n} ({l})")).unwrap_or_default())]
    Restore {
        tool: String,
        stderr: String,
        /// The payload line the tool named, when it named one.
        line: Option<(usize, String)>,
    },
    #[error("{tool} failed: {stderr}")]
    Save { tool: String, stderr: String },
    #[error("cannot ensure the jump {table}/{chain} {rule}: {message}")]
    Jump {
        table: String,
        chain: String,
        rule: String,
        message: String,
    },
}

fn run(
    tool: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<(bool, String, String), IptablesError> {
    let spawn = |source| IptablesError::Spawn {
        tool: tool.to_string(),
        source,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

/// Everything a backend's save shows (all tables), or None when the tool is missing. Legacy
/// tables the kernel has not instantiated in this namespace are not read: reading them would
/// create them, and iptables-nft would warn about "legacy tables present" from then on.
fn save_all(backend: Backend) -> Option<String> {
    if backend == Backend::Legacy
        && std::fs::read_to_string("/proc/net/ip_tables_names").is_ok_and(|t| t.trim().is_empty())
    {
        return Some(String::new());
    }
    let (ok, out, _) = run(&backend.tool("-save"), &[], None).ok()?;
    ok.then_some(out)
}

/// Which backend the node's other users (kubelet, the runtime, the distribution) already use,
/// the way kube-proxy's iptables-wrapper decides: the kubelet's hint chain, else the backend
/// holding more rules; nft when both are empty (today's distributions default to it).
pub fn detect() -> (Backend, String) {
    let saves = [Backend::Nft, Backend::Legacy].map(|b| (b, save_all(b)));
    for (backend, save) in &saves {
        let hint = save.as_deref().is_some_and(|s| {
            s.lines().any(|l| {
                l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY")
            })
        });
        if hint {
            return (
                *backend,
                "the kubelet's hint chain is in this backend".into(),
            );
        }
    }
    let rules = |i: usize| {
        saves[i]
            .1
            .as_deref()
            .map(|s| s.lines().filter(|l| l.starts_with("-A ")).count())
    };
    match (rules(0), rules(1)) {
        (None, None) => (Backend::Nft, "no iptables tools found; assuming nft".into()),
        (None, Some(_)) => (Backend::Legacy, "only the legacy tools work here".into()),
        (Some(nft), Some(legacy)) if legacy > nft => (
            Backend::Legacy,
            format!("legacy holds {legacy} rules, nft {nft}"),
        ),
        (Some(nft), legacy) => (
            Backend::Nft,
            format!("nft holds {nft} rules, legacy {}", legacy.unwrap_or(0)),
        ),
    }
}

/// The iptables tools of one backend.
#[derive(Debug, Clone, Copy)]
pub struct Iptables {
    pub backend: Backend,
}

impl Iptables {
    /// Applies `payload`: each table in it is one transaction (all of it or none of it), and
    /// the tool stops at the first table the kernel refuses.
    pub fn restore(&self, payload: &str) -> Result<(), IptablesError> {
        let tool = self.backend.tool("-restore");
        let (ok, _, stderr) = run(&tool, &["--noflush", "--wait=5"], Some(payload))?;
        if ok {
            return Ok(());
        }
        let line = failed_line(&stderr).and_then(|n| {
            payload
                .lines()
                .nth(n.checked_sub(1)?)
                .map(|l| (n, l.to_string()))
        });
        Err(IptablesError::Restore { tool, stderr, line })
    }

    /// What the tables hold now: their chains (to delete stale ones on a full sync) and the
    /// rules of the built-in chains (to see the jumps without one iptables -C each).
    pub fn save(&self, tables: &[&'static str]) -> Result<Saved, IptablesError> {
        let tool = self.backend.tool("-save");
        let mut out = Saved::default();
        for table in tables {
            let (ok, text, stderr) = run(&tool, &["-t", table], None)?;
            if !ok {
                return Err(IptablesError::Save { tool, stderr });
            }
            out.chains.insert(*table, chain_names(&text));
            out.builtin_rules.extend(
                text.lines()
                    .filter(|l| BUILTIN.iter().any(|c| l.starts_with(&format!("-A {c} "))))
                    .map(|l| format!("{table} {l}")),
            );
        }
        Ok(out)
    }

    fn crate_handle(&self) -> iptables::IPTables {
        iptables::IPTables {
            cmd: match self.backend {
                Backend::Nft => "iptables-nft",
                Backend::Legacy => "iptables-legacy",
            },
            has_check: true,
            has_wait: true,
            is_numeric: false,
        }
    }

    /// Makes sure each jump exists (inserted first or appended as it asks); returns the ones it
    /// had to add and how many it had to probe with iptables -C. A jump `saved` shows verbatim
    /// is there; one whose built-in chain has no rule jumping to its target is missing; only
    /// the others (a rule to the target in another spelling) are probed. The missing ones are
    /// added in one restore transaction, in order (each `-I ... 1` lands first, as kube-proxy's
    /// successive inserts do).
    pub fn ensure_jumps(
        &self,
        jumps: &[Jump],
        saved: &Saved,
    ) -> Result<(Vec<String>, usize), IptablesError> {
        let ipt = self.crate_handle();
        let mut missing: Vec<&Jump> = Vec::new();
        let mut probed = 0;
        for j in jumps {
            if saved
                .builtin_rules
                .contains(&format!("{} -A {} {}", j.table, j.chain, j.rule))
            {
                continue;
            }
            let target = j.rule.rsplit(" -j ").next().unwrap_or_default();
            let prefix = format!("{} -A {} ", j.table, j.chain);
            let maybe = saved
                .builtin_rules
                .iter()
                .any(|l| l.starts_with(&prefix) && l.ends_with(&format!("-j {target}")));
            if maybe {
                probed += 1;
                let there =
                    ipt.exists(j.table, j.chain, &j.rule)
                        .map_err(|e| IptablesError::Jump {
                            table: j.table.into(),
                            chain: j.chain.into(),
                            rule: j.rule.clone(),
                            message: e.to_string(),
                        })?;
                if there {
                    continue;
                }
            }
            missing.push(j);
        }
        if missing.is_empty() {
            return Ok((vec![], probed));
        }
        let mut text = String::new();
        let mut added = Vec::new();
        for table in ["filter", "nat"] {
            let lines: Vec<String> = missing
                .iter()
                .filter(|j| j.table == table)
                .map(|j| {
                    let op = if j.first {
                        format!("-I {} 1", j.chain)
                    } else {
                        format!("-A {}", j.chain)
                    };
                    added.push(format!("-t {table} {op} {}", j.rule));
                    format!("{op} {}", j.rule)
                })
                .collect();
            if !lines.is_empty() {
                text.push_str(&format!("*{table}\n{}\nCOMMIT\n", lines.join("\n")));
            }
        }
        self.restore(&text)?;
        Ok((added, probed))
    }

    /// Whether a jump is in place: a cheap probe for "someone flushed our rules".
    pub fn jump_exists(&self, j: &Jump) -> bool {
        self.crate_handle()
            .exists(j.table, j.chain, &j.rule)
            .unwrap_or(false)
    }
}

/// The built-in chains of the filter and nat tables, where our jumps live.
const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// The state of some tables, read with iptables-save.
#[derive(Debug, Default)]
pub struct Saved {
    pub chains: BTreeMap<&'static str, BTreeSet<String>>,
    /// "<table> -A <built-in chain> <rule>", as iptables-save prints them.
    pub builtin_rules: HashSet<String>,
}

/// Chain names declared in an iptables-save table dump.
pub fn chain_names(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The line number iptables-restore names in its error ("Error occurred at line: 7", or
/// "line 7 failed" from older versions).
pub fn failed_line(stderr: &str) -> Option<usize> {
    stderr.match_indices("line").find_map(|(at, _)| {
        let rest = stderr[at + 4..].trim_start_matches([':', ' ']);
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_errors_name_their_line() {
        assert_eq!(failed_line("iptables-restore: line 7 failed"), Some(7));
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): Couldn't load match `nope'\n\nError occurred at line: 12\nTry `iptables-restore -h'"),
            Some(12)
        );
        assert_eq!(failed_line("a multiline message\nno number"), None);
    }

    #[test]
    fn chains_are_read_from_a_save() {
        let save = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-X - [0:0]\n-A PREROUTING -j KUBE-SVC-X\nCOMMIT\n";
        assert_eq!(
            chain_names(save).into_iter().collect::<Vec<_>>(),
            ["KUBE-SVC-X", "PREROUTING"]
        );
    }
}
