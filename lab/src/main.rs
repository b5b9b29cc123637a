//! `rsdn-lab`, also run as `rsdn lab`: a simulated multi-node cluster on this machine built from
//! network namespaces, and its stand-in API server. It drives the `rsdn` and `rsdn-cni` binaries
//! next to it.

mod check;
mod cluster;
mod lab;
mod netns;
mod objects;
mod probe;
mod reach;
mod serve;
mod table;
mod workloads;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use rsdn::logging::LogFormat;

use crate::lab::Lab;
use crate::objects::{parse_labels, LabelChange, Labels, PodRef, PortSpec, Protocol};

/// A simulated multi-node cluster on this machine, built from network namespaces: the real
/// `rsdn node` daemons and `rsdn-cni` (the binaries next to this one), never touching the root
/// namespace. Several labs run side by side, each with its own name (--lab, RSDN_LAB).
#[derive(Parser)]
#[command(name = "rsdn-lab", version)]
struct Cli {
    /// Log format of the API server.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// The lab to act on. Its network namespaces are named LAB-<role> (LAB-node1,
    /// LAB-node1-pod1, LAB-pod.<ns>.<pod>, LAB-ext, LAB-underlay) and its state is in /run/LAB;
    /// `down` touches nothing of another lab.
    #[arg(long = "lab", global = true, env = lab::ENV, default_value = lab::DEFAULT_NAME,
          value_parser = |s: &str| Lab::new(s))]
    lab: Lab,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Create (or grow) the lab: N nodes running `rsdn node`, M pods per node (Pods
    /// `default/nodeN-podM`, labelled pod=nodeN-podM). Idempotent: restarts dead daemons and
    /// writes the objects again. Ends by checking every pod: its veth is a port of tun0, it has
    /// its address, it pings its gateway and a pod on every other node; fails naming each pod
    /// that does not.
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
    /// The lab's stand-in Kubernetes API server: serves the Nodes, Services, EndpointSlices,
    /// Pods, Namespaces and NetworkPolicies of a directory over HTTP (list, watch, bookmarks,
    /// 410 Gone), following its changes. SIGUSR1 cuts every watch connection; SIGUSR2 expires
    /// the history so every watcher must relist.
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
    /// Nodes, pods and namespaces with their network namespaces, addresses, labels, daemon
    /// health, servers and log files.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a lab namespace: nodeN, nodeN-podM, NS/POD, ext, underlay (or a
    /// full name).
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// All-pairs connectivity between the lab's pods by ping, TCP and UDP (servers on port
    /// 5001 in every pod for the duration). Every probe runs at once with --timeout, so the
    /// matrix finishes within --timeout plus 4 s (servers start within 3 s) however many
    /// pairs are broken. Names each broken pair and what failed; non-zero exit if any.
    Matrix {
        /// Seconds each probe may take.
        #[arg(long, default_value_t = 1.0, value_parser = seconds)]
        timeout: f64,
    },
    /// Pods: add (attached with rsdn-cni, a Pod object in the cluster directory), relabel,
    /// delete.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Namespaces (Namespace objects, always labelled kubernetes.io/metadata.name=NAME).
    #[command(subcommand)]
    Ns(NsCommand),
    /// Run servers in a pod on every port it declares (each on its protocol) that answer every
    /// connection and datagram with "NS/POD CLIENT-ADDRESS". Stopped by --stop, by deleting
    /// the pod and by `lab down`.
    Serve {
        pod: PodRef,
        #[arg(long)]
        stop: bool,
    },
    /// One probe from a pod (or nodeN, ext) to a pod, node, ext or IPv4 address. TCP:
    /// connected when the handshake completes; UDP: when an answer comes back; ping: an echo
    /// reply. Exit status 0 when connected, 1 when not.
    Probe {
        from: String,
        to: String,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, value_enum, default_value_t = reach::ProbeProtocol::Tcp)]
        protocol: reach::ProbeProtocol,
        /// Seconds before giving up.
        #[arg(long, default_value_t = 1.0, value_parser = seconds)]
        timeout: f64,
        #[arg(long)]
        json: bool,
    },
    /// Reachability truth tables, as the upstream NetworkPolicy tests print them: one per
    /// port and protocol, a row per client pod, a column per server pod, "." connected, "X"
    /// not (UDP: connected when an answer came back). Every probe runs at once, so the run
    /// takes about --timeout whatever is blocked (324 probes, 9 x 9 pods x 2 ports x 2
    /// protocols: about 1-2 s). Pods are sorted by NS/NAME.
    Reach {
        /// Pods to probe between: NS (all its pods) or NS/POD, comma-separated [default: every
        /// pod].
        #[arg(short = 'n', long = "pods", value_delimiter = ',')]
        pods: Vec<String>,
        /// Only these clients (same form as --pods).
        #[arg(long, value_delimiter = ',')]
        from: Vec<String>,
        /// Only these servers (same form as --pods).
        #[arg(long, value_delimiter = ',')]
        to: Vec<String>,
        #[arg(long, value_delimiter = ',', required = true)]
        ports: Vec<u16>,
        #[arg(long, value_delimiter = ',', default_value = "tcp,udp")]
        protocols: Vec<Protocol>,
        /// Seconds each probe may take.
        #[arg(long, default_value_t = 1.0, value_parser = seconds)]
        timeout: f64,
        /// Every probe as JSON (from, to, toIp, port, protocol, connected, answer, error,
        /// millis) instead of the tables.
        #[arg(long)]
        json: bool,
        /// Compare with the tables in FILE (the same text; spacing free, # comments): name
        /// every differing cell and exit non-zero on any.
        #[arg(long)]
        expect: Option<PathBuf>,
    },
    /// Stop every process and remove every namespace and file of this lab (and of no other).
    Down,
    /// A server in a pod's namespace (started by `serve` and `matrix`).
    #[command(hide = true)]
    ServeInner {
        #[arg(long)]
        answer: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
    },
}

#[derive(Subcommand)]
enum PodCommand {
    /// Add a pod NS/NAME on a node: a network namespace LAB-pod.NS.NAME attached by the node's
    /// rsdn-cni, and its Pod object (Running, podIP, nodeName, labels, container ports). The
    /// namespace must exist (lab ns add). Idempotent for the same node, labels and ports.
    Add {
        pod: PodRef,
        /// nodeN or N.
        #[arg(long, value_parser = |s: &str| workloads::parse_node(s))]
        node: u32,
        /// k=v,k2=v2
        #[arg(long, default_value = "", value_parser = |s: &str| parse_labels(s))]
        labels: Labels,
        /// A container port: NAME:PORT/PROTO, PORT/PROTO (named serve-PORT-proto) or PORT
        /// (TCP and UDP: serve-PORT-tcp and serve-PORT-udp). Repeatable.
        #[arg(long = "port")]
        ports: Vec<PortArg>,
        /// Also run its servers (as `lab serve`).
        #[arg(long)]
        serve: bool,
    },
    /// Change a pod's labels, kubectl style: KEY=VALUE sets, KEY- removes.
    Label {
        pod: PodRef,
        #[arg(required = true)]
        changes: Vec<LabelChange>,
    },
    /// Delete pods: their servers and processes stopped, CNI DEL, network namespace and Pod
    /// object removed.
    #[command(alias = "delete")]
    Del {
        #[arg(required = true)]
        pods: Vec<PodRef>,
    },
}

#[derive(Subcommand)]
enum NsCommand {
    /// Add a namespace (idempotent for the same labels).
    Add {
        name: String,
        /// k=v,k2=v2
        #[arg(long, default_value = "", value_parser = |s: &str| parse_labels(s))]
        labels: Labels,
    },
    /// Change a namespace's labels, kubectl style: KEY=VALUE sets, KEY- removes.
    Label {
        name: String,
        #[arg(required = true)]
        changes: Vec<LabelChange>,
    },
    /// Delete a namespace and every pod in it.
    #[command(alias = "delete")]
    Del { name: String },
}

/// One `--port` (a port number alone is two ports: TCP and UDP).
#[derive(Debug, Clone)]
struct PortArg(Vec<PortSpec>);

impl FromStr for PortArg {
    type Err = String;
    fn from_str(s: &str) -> Result<PortArg, String> {
        objects::parse_ports(s).map(PortArg)
    }
}

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?}: seconds, more than 0")),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let lab = cli.lab;
    match cli.command {
        LabCommand::Apiserver {
            dir,
            listen,
            bookmark_seconds,
            service_account_dir,
        } => {
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
        LabCommand::ServeInner { answer, tcp, udp } => {
            return serve::run_inner(&answer, &tcp, &udp);
        }
        _ => {}
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("rsdn lab needs root: it creates network namespaces (the root namespace is never touched)");
    }
    match cli.command {
        LabCommand::Up {
            nodes,
            pods_per_node,
            api,
        } => cluster::up(&lab, nodes, pods_per_node, api),
        LabCommand::Apiserver { .. } | LabCommand::ServeInner { .. } => {
            unreachable!("handled above")
        }
        LabCommand::Status { json } => cluster::status(&lab, json),
        LabCommand::Exec { name, command } => cluster::exec(&lab, &name, &command),
        LabCommand::Matrix { timeout } => reach::matrix(&lab, Duration::from_secs_f64(timeout)),
        LabCommand::Pod(PodCommand::Add {
            pod,
            node,
            labels,
            ports,
            serve,
        }) => workloads::pod_add(
            &lab,
            workloads::NewPod {
                pod,
                node,
                labels,
                ports: ports.into_iter().flat_map(|p| p.0).collect(),
                serve,
            },
        ),
        LabCommand::Pod(PodCommand::Label { pod, changes }) => {
            workloads::pod_label(&lab, &pod, &changes)
        }
        LabCommand::Pod(PodCommand::Del { pods }) => workloads::pod_del(&lab, &pods),
        LabCommand::Ns(NsCommand::Add { name, labels }) => workloads::ns_add(&lab, &name, labels),
        LabCommand::Ns(NsCommand::Label { name, changes }) => {
            workloads::ns_label(&lab, &name, &changes)
        }
        LabCommand::Ns(NsCommand::Del { name }) => workloads::ns_del(&lab, &name),
        LabCommand::Serve { pod, stop } => workloads::serve(&lab, &pod, stop),
        LabCommand::Probe {
            from,
            to,
            port,
            protocol,
            timeout,
            json,
        } => {
            let connected = reach::probe_one(
                &lab,
                &from,
                &to,
                protocol,
                port,
                Duration::from_secs_f64(timeout),
                json,
            )?;
            std::process::exit(if connected { 0 } else { 1 });
        }
        LabCommand::Reach {
            pods,
            from,
            to,
            ports,
            protocols,
            timeout,
            json,
            expect,
        } => reach::reach(
            &lab,
            &reach::ReachArgs {
                namespaces: pods,
                from,
                to,
                ports,
                protocols,
                timeout: Duration::from_secs_f64(timeout),
                json,
                expect,
            },
        ),
        LabCommand::Down => cluster::down(&lab),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_lab_name_comes_from_the_flag_or_the_environment_default() {
        let cli = Cli::try_parse_from(["rsdn-lab", "--lab", "hlab", "status"]).unwrap();
        assert_eq!(cli.lab.name(), "hlab");
        assert!(Cli::try_parse_from(["rsdn-lab", "--lab", "Bad.Name", "status"]).is_err());
    }

    #[test]
    fn pod_add_parses_ports_and_labels() {
        let cli = Cli::try_parse_from([
            "rsdn-lab",
            "pod",
            "add",
            "x/a",
            "--node",
            "node2",
            "--labels",
            "pod=a,app=web",
            "--port",
            "80",
            "--port",
            "http:8080/TCP",
            "--serve",
        ])
        .unwrap();
        let LabCommand::Pod(PodCommand::Add {
            pod,
            node,
            labels,
            ports,
            serve,
        }) = cli.command
        else {
            panic!("not pod add");
        };
        assert_eq!(pod.to_string(), "x/a");
        assert_eq!(node, 2);
        assert_eq!(labels.len(), 2);
        let ports: Vec<String> = ports
            .into_iter()
            .flat_map(|p| p.0)
            .map(|p| format!("{}:{}/{}", p.name, p.container_port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [
                "serve-80-tcp:80/TCP",
                "serve-80-udp:80/UDP",
                "http:8080/TCP"
            ]
        );
        assert!(serve);
        for bad in [
            vec!["pod", "add", "a", "--node", "1"],
            vec!["pod", "add", "x/a", "--node", "n1"],
            vec!["pod", "add", "x/a", "--node", "1", "--labels", "a"],
            vec!["pod", "add", "x/a", "--node", "1", "--port", "80/sctp"],
            vec!["pod", "label", "x/a"],
            vec!["pod", "label", "x/a", "k"],
            vec!["reach"],
            vec!["matrix", "--timeout", "0"],
        ] {
            let args = std::iter::once("rsdn-lab").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reach_takes_lists() {
        let cli = Cli::try_parse_from([
            "rsdn-lab",
            "reach",
            "-n",
            "x,y,z",
            "--ports",
            "80,81",
            "--protocols",
            "TCP",
        ])
        .unwrap();
        let LabCommand::Reach {
            pods,
            ports,
            protocols,
            timeout,
            ..
        } = cli.command
        else {
            panic!("not reach");
        };
        assert_eq!(pods, ["x", "y", "z"]);
        assert_eq!(ports, [80, 81]);
        assert_eq!(protocols, [Protocol::Tcp]);
        assert_eq!(timeout, 1.0);
    }
}
