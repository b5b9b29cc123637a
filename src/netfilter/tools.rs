//! The seam between the engine and the kernel: reading a table, applying a restore payload,
//! listing one chain. `Tools` runs a backend's iptables tools; `fake::FakeIptables` holds the
//! tables in memory for tests of the engine's policies.

use std::io::Write;
use std::process::{Command, Stdio};

use super::backend::Backend;
use super::ruleset::TableName;
use super::save::failed_line;

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
}

impl IptablesError {
    /// For a failed restore that named its line: the table that line belongs to. Tables
    /// before it in the payload were committed (each table is one transaction, and the tool
    /// stops at the first one the kernel refuses); it and the ones after were not.
    pub fn failed_table(&self, payload: &str) -> Option<TableName> {
        let IptablesError::Restore {
            line: Some((n, _)), ..
        } = self
        else {
            return None;
        };
        payload
            .lines()
            .take(*n)
            .filter_map(|l| l.strip_prefix('*'))
            .last()
            .and_then(TableName::parse)
    }
}

/// What the engine needs from iptables. Blocking: the real tools are processes.
pub trait Iptables: Send + 'static {
    fn backend(&self) -> Backend;
    /// `iptables-save -t TABLE`.
    fn save(&self, table: TableName) -> Result<String, IptablesError>;
    /// `iptables-restore --noflush`: each table in `payload` is one transaction.
    fn restore(&self, payload: &str) -> Result<(), IptablesError>;
    /// `iptables -t TABLE -S CHAIN` (None: no such chain). Cheap on a large table for a short
    /// chain: how the engine probes the built-in chains for a flush.
    fn list(&self, table: TableName, chain: &str) -> Result<Option<String>, IptablesError>;
    /// `ipset save`: every set of the namespace (ipsets are shared by both backends).
    fn ipset_save(&self) -> Result<String, IptablesError>;
    /// `ipset restore`: runs the commands in order, stopping at the first that fails.
    fn ipset_restore(&self, payload: &str) -> Result<(), IptablesError>;
    /// The packet counters of a chain's rules, in order (None: no such chain).
    fn packets(&self, table: TableName, chain: &str) -> Result<Option<Vec<u64>>, IptablesError>;
}

/// The iptables tools of one backend.
#[derive(Debug, Clone, Copy)]
pub struct Tools {
    pub backend: Backend,
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

impl Tools {
    /// The `iptables` crate's handle on the backend's tool, for single-chain requests.
    fn handle(&self) -> iptables::IPTables {
        iptables::IPTables {
            cmd: match self.backend {
                Backend::Nft => "iptables-nft",
                Backend::Legacy => "iptables-legacy",
            },
            has_check: true,
            has_wait: true,
            // `-S` prints numbers anyway, and refuses `-n`.
            is_numeric: false,
        }
    }
}

impl Iptables for Tools {
    fn backend(&self) -> Backend {
        self.backend
    }

    fn save(&self, table: TableName) -> Result<String, IptablesError> {
        let tool = self.backend.tool("-save");
        let (ok, text, stderr) = run(&tool, &["-t", table.as_str()], None)?;
        if !ok {
            return Err(IptablesError::Save { tool, stderr });
        }
        Ok(text)
    }

    fn restore(&self, payload: &str) -> Result<(), IptablesError> {
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

    fn list(&self, table: TableName, chain: &str) -> Result<Option<String>, IptablesError> {
        let ipt = self.handle();
        let lines = ipt
            .list(table.as_str(), chain)
            .map_err(|e| IptablesError::Save {
                tool: format!("{} -t {table} -S {chain}", ipt.cmd),
                stderr: e.to_string(),
            })?;
        // Every existing chain lists at least its `-P` (built-in) or `-N` line; the tool
        // prints nothing on stdout for a chain that does not exist.
        if lines.iter().all(|l| l.trim().is_empty()) {
            return Ok(None);
        }
        Ok(Some(lines.join("\n") + "\n"))
    }

    fn ipset_save(&self) -> Result<String, IptablesError> {
        let (ok, text, stderr) = run("ipset", &["save"], None)?;
        if !ok {
            return Err(IptablesError::Save {
                tool: "ipset save".into(),
                stderr,
            });
        }
        Ok(text)
    }

    fn ipset_restore(&self, payload: &str) -> Result<(), IptablesError> {
        let (ok, _, stderr) = run("ipset", &["restore"], Some(payload))?;
        if ok {
            return Ok(());
        }
        let line = failed_line(&stderr).and_then(|n| {
            payload
                .lines()
                .nth(n.checked_sub(1)?)
                .map(|l| (n, l.to_string()))
        });
        Err(IptablesError::Restore {
            tool: "ipset restore".into(),
            stderr,
            line,
        })
    }

    fn packets(&self, table: TableName, chain: &str) -> Result<Option<Vec<u64>>, IptablesError> {
        let tool = self.backend.tool("");
        let (ok, text, stderr) = run(
            &tool,
            &[
                "-w",
                "5",
                "-t",
                table.as_str(),
                "-L",
                chain,
                "-v",
                "-x",
                "-n",
            ],
            None,
        )?;
        if !ok {
            if stderr.contains("No chain") || stderr.contains("does not exist") {
                return Ok(None);
            }
            return Err(IptablesError::Save { tool, stderr });
        }
        // Two header lines, then "pkts bytes target ..." per rule.
        Ok(Some(
            text.lines()
                .skip(2)
                .filter_map(|l| l.split_whitespace().next()?.parse().ok())
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_line_names_its_table() {
        let payload =
            "*nat\n:A - [0:0]\n-A A -j RETURN\nCOMMIT\n*filter\n:B - [0:0]\n-A B -j NOPE\nCOMMIT\n";
        let e = |n: usize| IptablesError::Restore {
            tool: "t".into(),
            stderr: String::new(),
            line: Some((n, String::new())),
        };
        assert_eq!(e(3).failed_table(payload), Some(TableName::Nat));
        assert_eq!(e(7).failed_table(payload), Some(TableName::Filter));
        let unknown = IptablesError::Restore {
            tool: "t".into(),
            stderr: String::new(),
            line: None,
        };
        assert_eq!(unknown.failed_table(payload), None);
    }
}
