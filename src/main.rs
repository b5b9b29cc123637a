//! `rsdn`: the node daemon and the operator's tools.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use rsdn::cniconf::{conflist, ConflistOptions};
use rsdn::config::{NodeConfig, NodeOptions};
use rsdn::logging::LogFormat;

/// rsdn: a VXLAN + iptables Kubernetes network plugin in the style of OpenShift SDN.
#[derive(Parser)]
#[command(version = rsdn::build_info::LONG, about)]
struct Cli {
    /// Log format of long-running commands.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon: program tun0, vxlan0 and one FDB, neighbour and route entry per
    /// remote node, then write the CNI config. Keeps them right until stopped; stopping leaves
    /// the datapath in place.
    Node(NodeArgs),
    /// Inspect the VXLAN tunnels of this node.
    Tunnel {
        #[command(subcommand)]
        command: TunnelCommand,
    },
    /// Print the CNI conflist for a node subnet, as the node daemon writes it.
    CniConfig(CniConfigArgs),
    /// Copy the rsdn-cni plugin into the CNI binary directory (the DaemonSet's init
    /// container): atomically, by temp file and rename, and only when it differs.
    InstallCni(InstallCniArgs),
    /// Remove everything rsdn owns on this node, and nothing else (as kube-proxy --cleanup):
    /// the conflist, rsdn's iptables chains and their jumps in both backends, the RSDN- ipsets,
    /// the routes with protocol 212, vxlan0 and tun0. Pods' interfaces stay. The Service
    /// proxy's KUBE-* chains stay where kube-proxy runs or ran (its KUBE-PROXY-CANARY chain)
    /// or with --proxy=false. Stop the daemon first. Prints what it removed; a second run
    /// finds nothing. Exit status 1 if anything could not be removed.
    Cleanup(NodeArgs),
    /// The Service proxy's iptables rules.
    Proxy {
        #[command(subcommand)]
        command: ProxyCommand,
    },
    /// Explain a packet's path from SRC to DST, hop by hop: routes, tun0, the nat and filter
    /// rules it matches (Service endpoints with their probabilities, NetworkPolicy verdicts,
    /// masquerade), the overlay's entries, down to the destination pod's veth. On a node it
    /// reads the node's kernel and flags where it differs from the model (exit status 1; 2
    /// when it cannot trace).
    Trace(TraceArgs),
    /// Check this node for what breaks pod networking (sysctls, rp_filter, MTUs, the VXLAN
    /// port to every peer, the VXLAN checksum-offload bug, the iptables backend and its lock,
    /// the CNI directory, kube-proxy, conntrack), each result with a one-line fix. Exit
    /// status 1 when a check fails, 2 when it cannot check.
    Doctor(DoctorArgs),
    /// A simulated multi-node cluster on this machine, built from network namespaces
    /// (`rsdn lab --help`). A development tool kept out of this binary: runs `rsdn-lab`, from
    /// next to this binary or from PATH (cargo build -p rsdn-lab).
    #[command(disable_help_flag = true)]
    Lab {
        /// What rsdn-lab is given, unchanged.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
}

#[derive(Subcommand)]
enum TunnelCommand {
    /// One line per remote node: pod subnet, node IP, VTEP MAC, and whether its FDB,
    /// neighbour and route entries are all in the kernel.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum ProxyCommand {
    /// Print the iptables-restore payload a full sync would apply for this configuration,
    /// cluster directory and node (the Service proxy's, NetworkPolicy's and egress rules),
    /// without touching the kernel. The jumps from the built-in chains, which are ensured one
    /// by one, follow as comments.
    Render {
        #[command(flatten)]
        node: NodeArgs,
        /// Print the `ipset restore` input of the sets the rules use instead.
        #[arg(long)]
        ipset: bool,
    },
}

#[derive(Args)]
struct TraceArgs {
    /// Where the packet comes from: NS/POD, node:NAME (the node itself), or IP (a host
    /// outside the cluster, or whatever has that address).
    src: String,
    /// Where it goes: NS/SERVICE:PORT (a Service port, by name or number),
    /// IP:PORT[/tcp|udp|sctp] (a pod, a node, a Service's IP, an outside host), or
    /// node:NAME:NODEPORT.
    dst: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Predict from the model only, without reading this node's kernel.
    #[arg(long)]
    offline: bool,
    /// The node the network routes an external or load-balancer IP to.
    #[arg(long)]
    via: Option<String>,
    /// The client's source port.
    #[arg(long, default_value_t = 40000)]
    sport: u16,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Args)]
struct DoctorArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Judge the VXLAN checksum check as on this kernel release (what-if: "would this node
    /// break on 5.4?").
    #[arg(long)]
    assume_kernel: Option<String>,
    /// Seconds each peer has to answer the probes.
    #[arg(long, default_value_t = 1.0)]
    timeout: f64,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Args)]
struct InstallCniArgs {
    /// The plugin binary to install [default: rsdn-cni next to this rsdn binary].
    #[arg(long)]
    source: Option<PathBuf>,
    /// The CNI binary directory, as mounted from the host.
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// Also prepare the host for the daemon: load br_netfilter and set net.ipv4.ip_forward and
    /// net.bridge.bridge-nf-call-iptables to 1 (what needs privileges, done once, so the
    /// long-running daemon container needs only NET_ADMIN and NET_RAW).
    #[arg(long)]
    prepare_host: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Every option can also be set in the --config file (camelCase names, e.g. vxlanPort); the
/// command line wins.
#[derive(Args)]
struct NodeArgs {
    /// YAML configuration file (in a cluster: the rsdn ConfigMap).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    options: NodeOptions,
}

impl NodeArgs {
    fn into_config(self) -> Result<NodeConfig> {
        let file = match &self.config {
            Some(p) => NodeOptions::load(p)?,
            None => NodeOptions::default(),
        };
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok());
        Ok(NodeConfig::resolve(file.overlay(self.options), hostname)?)
    }
}

#[derive(Args)]
struct CniConfigArgs {
    /// The node's pod subnet (its spec.podCIDR), e.g. 10.128.0.0/23.
    #[arg(long)]
    subnet: Ipv4Net,
    /// The gateway address on the bridge; default: the first address of the subnet.
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// Pod interface MTU (underlay MTU minus 50 for VXLAN).
    #[arg(long, default_value_t = rsdn_cni::config::DEFAULT_MTU)]
    mtu: u32,
    /// The node bridge the pods join.
    #[arg(long, default_value = rsdn_cni::config::DEFAULT_BRIDGE)]
    bridge: String,
    /// Chain the portmap plugin after rsdn-cni (hostPort support), as the node daemon does
    /// by default; --portmap=false for our plugin alone.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", require_equals = true)]
    portmap: bool,
    /// CNI spec version of the list.
    #[arg(long, default_value = "1.0.0")]
    cni_version: String,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Node(args) => {
            // Configuration errors end the process at once, naming the field.
            let config = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("rsdn node: {e:#}");
                    std::process::exit(2);
                }
            };
            rsdn::logging::init(cli.log_format);
            runtime()?.block_on(rsdn::daemon::run(config, shutdown_signal()))
        }
        Command::Tunnel {
            command: TunnelCommand::List { output },
        } => {
            let entries = runtime()?.block_on(async {
                let kernel = rsdn::overlay::kernel::Kernel::connect()?;
                let Some(vxlan) = kernel.vxlan_index().await? else {
                    bail!(
                        "there is no {} here: rsdn node has not programmed this node",
                        rsdn::overlay::VXLAN
                    );
                };
                Ok(kernel
                    .observe(vxlan, "0.0.0.0/0".parse().expect("any"))
                    .await?)
            })?;
            let rows = rsdn::tunnel::rows(&entries);
            match output {
                Output::Table => print!("{}", rsdn::tunnel::render_table(&rows)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            }
            Ok(())
        }
        Command::CniConfig(a) => {
            if a.subnet != a.subnet.trunc() {
                bail!(
                    "--subnet {} has host bits set; did you mean {}?",
                    a.subnet,
                    a.subnet.trunc()
                );
            }
            let gateway = a
                .gateway
                .unwrap_or_else(|| rsdn_cni::config::first_host(a.subnet));
            let opts = ConflistOptions {
                portmap: a.portmap,
                cni_version: Some(a.cni_version),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&conflist(
                    a.subnet, gateway, a.mtu, &a.bridge, &opts
                ))?
            );
            Ok(())
        }
        Command::InstallCni(a) => {
            let source = match a.source {
                Some(s) => s,
                None => rsdn::install::default_source()?,
            };
            match rsdn::install::install(&source, &a.bin_dir)? {
                rsdn::install::Outcome::Installed(p) => {
                    println!("installed {} from {}", p.display(), source.display())
                }
                rsdn::install::Outcome::Unchanged(p) => {
                    println!("{} is already this version; left alone", p.display())
                }
            }
            if a.prepare_host {
                for path in rsdn::overlay::kernel::assert_sysctls()? {
                    println!("set {path} to 1");
                }
            }
            Ok(())
        }
        Command::Proxy {
            command: ProxyCommand::Render { node, ipset },
        } => {
            let config = node.into_config()?;
            print!("{}", proxy_render(&config, ipset)?);
            Ok(())
        }
        Command::Cleanup(args) => {
            let config = args.into_config()?;
            let report = runtime()?.block_on(rsdn::cleanup::run(&config, &rsdn::cleanup::BACKENDS));
            print!("{}", report.render());
            if !report.errors.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Trace(a) => {
            let request = rsdn::trace::Request {
                src: a.src,
                dst: a.dst,
                offline: a.offline,
                via: a.via,
                sport: a.sport,
            };
            let trace = or_exit(
                "rsdn trace",
                a.node
                    .into_config()
                    .and_then(|c| rsdn::trace::run(&c, &request)),
            );
            match a.output {
                Output::Table => print!("{}", rsdn::trace::text::render(&trace)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&trace)?),
            }
            std::process::exit(i32::from(trace.drift));
        }
        Command::Doctor(a) => {
            let options = rsdn::doctor::Options {
                assume_kernel: a.assume_kernel,
                timeout: std::time::Duration::from_secs_f64(a.timeout.clamp(0.05, 30.0)),
            };
            let report = or_exit(
                "rsdn doctor",
                a.node
                    .into_config()
                    .and_then(|c| rsdn::doctor::run(&c, &options)),
            );
            match a.output {
                Output::Table => print!("{}", rsdn::doctor::render(&report)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            std::process::exit(i32::from(!report.ok));
        }
        Command::Lab { args } => lab(cli.log_format, args),
    }
}

/// The value, or the error on one line and exit status 2 (1 is a command's own verdict).
fn or_exit<T>(command: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("{command}: {e:#}");
        std::process::exit(2)
    })
}

/// `rsdn proxy render`: the full payload a first sync of this node would write for the
/// cluster directory, with the skipped objects and the jumps as comments. Built by the same
/// producers, from the same scopes, as the daemon's.
fn proxy_render(config: &NodeConfig, ipset: bool) -> Result<String> {
    use rsdn::netfilter::payload::{payload, Context, Scope};
    use std::fmt::Write as _;
    let rsdn::config::SourceConfig::Dir(dir) = &config.source else {
        bail!("rsdn proxy render reads a cluster directory: set --cluster-dir");
    };
    let model = rsdn::source::dir::read_cluster_dir(dir, &rsdn::daemon::model_scope(config))
        .with_context(|| format!("cannot read {}", dir.display()))?;
    if config.node_ip.is_none() && !model.nodes.contains_key(&config.node_name) {
        bail!(
            "Node/{} is not in {} and --node-ip is not set",
            config.node_name,
            dir.display()
        );
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let mut producers = rsdn::daemon::producers(config, &mut registry);
    let desired =
        rsdn::netfilter::producer::combine(&mut producers, &std::sync::Arc::new(model.clone()));
    if ipset {
        let sets = rsdn::netfilter::sets::payload(
            None,
            &desired.ruleset.sets,
            &Default::default(),
            None,
            &|_| false,
        );
        return Ok(sets.before);
    }
    let mut out = String::new();
    for s in &model.skipped {
        let _ = writeln!(out, "# skipped {}: {}", s.object, s.reason);
    }
    out.push_str(&payload(None, &desired.ruleset, Scope::Full, Context::default()).text);
    out.push_str(
        "# jumps from the built-in chains (kept in this order at the top, or appended):\n",
    );
    for j in &desired.jumps {
        let _ = writeln!(out, "# {}", j.command());
    }
    Ok(out)
}

/// `rsdn lab ARGS...` is `rsdn-lab ARGS...`, exec'd in place (same pid, its exit status). The
/// lab and its stand-in API server (HTTPS, certificates) are development tools, built apart so
/// that the binary the DaemonSet image ships carries neither.
fn lab(log_format: LogFormat, args: Vec<OsString>) -> Result<()> {
    const LAB: &str = "rsdn-lab";
    let beside = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(LAB))
        .filter(|p| p.exists());
    let program = beside.unwrap_or_else(|| PathBuf::from(LAB)); // else found on PATH by exec
    let mut cmd = std::process::Command::new(&program);
    // The name its help and usage lines show: what the user typed.
    cmd.arg0("rsdn lab");
    if let LogFormat::Json = log_format {
        cmd.arg("--log-format=json");
    }
    let err = cmd.args(args).exec();
    if err.kind() == std::io::ErrorKind::NotFound {
        bail!("rsdn lab is a development tool: build it with cargo build -p rsdn-lab (no {LAB} next to this rsdn nor on PATH)");
    }
    Err(err).with_context(|| format!("cannot run {}", program.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_args(args: &[&str]) -> NodeArgs {
        let cli = Cli::try_parse_from([&["rsdn", "node"], args].concat()).unwrap();
        let Command::Node(a) = cli.command else {
            unreachable!()
        };
        a
    }

    /// Every subcommand's arguments are well formed (clap checks this only when a
    /// debug build parses that subcommand: a name used twice panicked `rsdn doctor`).
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn version_names_the_commit_and_the_build_date() {
        use clap::CommandFactory;
        let v = Cli::command().render_version();
        assert_eq!(v, format!("rsdn {}\n", rsdn::build_info::LONG));
        assert!(v.contains(rsdn::build_info::REVISION) && v.contains(" built "));
    }

    /// `rsdn cni-config` chains portmap as the daemon does by default; `--portmap` still parses.
    #[test]
    fn cni_config_chains_portmap_unless_told_not_to() {
        let portmap = |args: &[&str]| {
            let base = ["rsdn", "cni-config", "--subnet", "10.128.0.0/23"];
            let cli = Cli::try_parse_from(base.iter().chain(args)).unwrap();
            let Command::CniConfig(a) = cli.command else {
                unreachable!()
            };
            a.portmap
        };
        assert!(portmap(&[]) && portmap(&["--portmap"]) && portmap(&["--portmap=true"]));
        assert!(!portmap(&["--portmap=false"]));
        assert_eq!(
            rsdn::config::NodeOptions::defaults().portmap,
            Some(true),
            "the daemon's default"
        );
    }

    /// The flags of the DaemonSet and the hack/ scripts, as they were before NodeOptions.
    #[test]
    fn the_command_line_is_unchanged() {
        let a = node_args(&[
            "--config",
            "/etc/rsdn/config.yaml",
            "--node-name",
            "n1",
            "--node-ip",
            "192.168.1.11",
            "--cluster-network",
            "10.128.0.0/14",
            "--cluster-dir",
            "/c",
            "--cni-conf-dir",
            "/n",
            "--iptables-backend",
            "nf_tables",
            "--resync-seconds",
            "3600",
            "--proxy=false",
        ]);
        assert_eq!(a.config, Some(PathBuf::from("/etc/rsdn/config.yaml")));
        let o = a.options;
        assert_eq!(o.node_name.as_deref(), Some("n1"));
        assert_eq!(o.node_ip, Some(Ipv4Addr::new(192, 168, 1, 11)));
        assert_eq!(o.cluster_dir, Some(PathBuf::from("/c")));
        assert_eq!(o.iptables_backend, Some(rsdn::config::IptablesBackend::Nft));
        assert_eq!((o.resync_seconds, o.proxy), (Some(3600), Some(false)));
        assert_eq!(o.vxlan_port, None);
        assert!(Cli::try_parse_from(["rsdn", "node", "--iptables-backend", "ebtables"]).is_err());
        // rsdn proxy render takes the same options.
        let cli = Cli::try_parse_from(["rsdn", "proxy", "render", "--cluster-dir", "/c"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Proxy {
                command: ProxyCommand::Render {
                    node: NodeArgs { config: None, .. },
                    ipset: false
                }
            }
        ));
    }
}
