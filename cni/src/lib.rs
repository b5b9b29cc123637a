//! rsdn-cni: the CNI plugin of rsdn. It wires a pod into the node bridge (`tun0`) with a veth
//! pair, gives it an address from the node subnet through a host-local compatible store, and
//! a default route via the bridge. The node daemon owns the bridge; this plugin owns pod veths
//! and IPAM files.

pub mod config;
pub mod error;
pub mod ipam;
pub mod names;
pub mod netlink;
pub mod netns;
pub mod plugin;
pub mod result;
pub mod version;

use std::io::Read;

use config::{Command, Env, NetConf};
use error::{CniError, Code};

/// What one invocation prints and how it exits.
pub struct Outcome {
    pub stdout: Option<String>,
    pub exit_code: i32,
}

/// The whole plugin behind `main`: environment through `get`, config from `stdin`.
pub fn invoke(get: impl Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Outcome {
    let mut raw = Vec::new();
    let env = Env::from_lookup(get);
    let read = stdin.read_to_end(&mut raw);
    let reply_version = reply_version(&raw);
    let result = (|| {
        let env = env?;
        read.map_err(|e| {
            CniError::new(Code::Io, "cannot read the network configuration from stdin")
                .with_details(e)
        })?;
        if env.command == Command::Version {
            // VERSION must answer whatever version the caller speaks.
            return Ok(Some(version::version_info()));
        }
        let conf = NetConf::parse(&raw)?;
        init_logging(&conf);
        plugin::run(&env, &conf).inspect_err(|e| {
            tracing::error!(command = ?env.command, container = %env.container_id, code = e.code.as_u32(), "{e}")
        })
    })();
    match result {
        Ok(stdout) => Outcome {
            stdout,
            exit_code: 0,
        },
        Err(e) => Outcome {
            stdout: Some(e.to_json(&reply_version)),
            exit_code: 1,
        },
    }
}

/// Errors are written in the version the caller asked for when we speak it, else our newest.
fn reply_version(raw: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| version::CURRENT.to_string())
}

/// Logs go to `logFile` when configured, to stderr otherwise; never to stdout.
fn init_logging(conf: &NetConf) {
    let level = conf
        .log_level
        .as_deref()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false);
    let file = conf.log_file.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    // A second init (tests call invoke repeatedly) is harmless: the first subscriber stays.
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}
