//! `rsdn-lab`, also run as `rsdn lab`: a simulated multi-node cluster on this machine built from
//! network namespaces, and its stand-in API server. It drives the `rsdn` and `rsdn-cni` binaries
//! next to it.

mod cluster;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use rsdn::logging::LogFormat;

/// A simulated multi-node cluster on this machine, built from network namespaces: the real
/// `rsdn node` daemons and `rsdn-cni` (the binaries next to this one), never touching the root
/// namespace.
#[derive(Parser)]
#[command(name = "rsdn-lab", version)]
struct Cli {
    /// Log format of the API server.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
pub enum LabCommand {
    /// Create (or grow) the lab: N nodes running `rsdn node`, M pods per node. Idempotent.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 2)]
        pods_per_node: u32,
        /// Feed the daemons through an API server (`rsdn-lab apiserver` on the outside host,
        /// serving the cluster directory) instead of reading the directory. Kept for the
        /// lab's lifetime.
        #[arg(long)]
        api: bool,
    },
    /// The lab's stand-in Kubernetes API server: serves the Nodes, Services and
    /// EndpointSlices of a directory over HTTP (list, watch, bookmarks, 410 Gone), following
    /// its changes. SIGUSR1 cuts every watch connection; SIGUSR2 expires the history so every
    /// watcher must relist.
    Apiserver {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: std::net::SocketAddr,
        /// Seconds between bookmarks on watches that ask for them.
        #[arg(long, default_value_t = 5.0)]
        bookmark_seconds: f64,
        /// Serve HTTPS and require a bearer token, writing ca.crt, token and namespace into
        /// this directory as kubelet does for a pod's service account.
        #[arg(long)]
        service_account_dir: Option<PathBuf>,
    },
    /// Nodes and pods with their namespaces, addresses, daemon health and log files.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a lab namespace: nodeN, nodeN-podM, ext, underlay (or a full name).
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// All-pairs connectivity between lab pods (ping and TCP); non-zero exit on any failure.
    Matrix,
    /// Stop every daemon and remove every namespace and file of the lab.
    Down,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let LabCommand::Apiserver {
        dir,
        listen,
        bookmark_seconds,
        service_account_dir,
    } = cli.command
    {
        // A long-running service: it logs like the daemon.
        rsdn::logging::init(cli.log_format);
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(rsdn_lab::apiserver::run_dir(
                &dir,
                listen,
                Duration::from_secs_f64(bookmark_seconds.max(0.01)),
                service_account_dir.as_deref(),
            ));
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("rsdn lab needs root: it creates network namespaces (the root namespace is never touched)");
    }
    match cli.command {
        LabCommand::Up {
            nodes,
            pods_per_node,
            api,
        } => cluster::up(nodes, pods_per_node, api),
        LabCommand::Apiserver { .. } => unreachable!("handled above"),
        LabCommand::Status { json } => cluster::status(json),
        LabCommand::Exec { name, command } => cluster::exec(&name, &command),
        LabCommand::Matrix => cluster::matrix(),
        LabCommand::Down => cluster::down(),
    }
}
