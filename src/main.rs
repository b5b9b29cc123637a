//! `rsdn`: the node daemon and the operator's tools (subcommands grow with the issues).

use std::net::Ipv4Addr;

use anyhow::{bail, Result};
use clap::Parser;
use ipnet::Ipv4Net;
use rsdn::cniconf::{conflist, ConflistOptions};

/// rsdn: a VXLAN + iptables Kubernetes network plugin in the style of OpenShift SDN.
#[derive(Parser)]
#[command(version, about)]
enum Cli {
    /// Print the CNI conflist for a node subnet, as the node daemon writes it.
    CniConfig {
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
        /// Chain the portmap plugin after rsdn-cni (hostPort support).
        #[arg(long)]
        portmap: bool,
        /// CNI spec version of the list.
        #[arg(long, default_value = "1.0.0")]
        cni_version: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse() {
        Cli::CniConfig {
            subnet,
            gateway,
            mtu,
            bridge,
            portmap,
            cni_version,
        } => {
            if subnet != subnet.trunc() {
                bail!(
                    "--subnet {subnet} has host bits set; did you mean {}?",
                    subnet.trunc()
                );
            }
            let gateway = gateway.unwrap_or_else(|| rsdn_cni::config::first_host(subnet));
            let opts = ConflistOptions {
                portmap,
                cni_version: Some(cni_version),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&conflist(subnet, gateway, mtu, &bridge, &opts))?
            );
        }
    }
    Ok(())
}
