//! The kernel's view of the node the trace runs on: the iptables tables and ipsets as the
//! netfilter engine reads them back (`iptables-save`, `ipset save`, with the backend the daemon
//! chooses), the overlay's entries as `overlay::kernel::observe` reads them, every route and
//! address, vxlan0's settings, the recent lists of ClientIP affinity and the pods' veths.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::Context;
use ipnet::Ipv4Net;
use netlink_packet_route::link::{InfoData, InfoVxlan};
use rsdn_cni::netlink::Link;

use super::view::{NodeView, PortLink, PortState, Route, Vxlan};
use super::walk::Chains;
use crate::config::NodeConfig;
use crate::netfilter::ruleset::TableName;
use crate::netfilter::sets::{parse_save, IpSet};
use crate::netfilter::tools::{Iptables, Tools};
use crate::overlay::kernel::Kernel;
use crate::overlay::{ports, BRIDGE, VXLAN};

/// A link's name by index (`ifN` for one that is gone).
pub fn link_name(links: &[Link], index: u32) -> String {
    links
        .iter()
        .find(|l| l.index == index)
        .map_or_else(|| format!("if{index}"), |l| l.name.clone())
}

/// The kernel's iptables tables and ipsets, read as the engine reads them back.
pub fn netfilter(config: &NodeConfig) -> anyhow::Result<(Chains, BTreeMap<String, IpSet>)> {
    let (backend, _) = crate::daemon::backend(config);
    let tools = Tools { backend };
    let mut chains = Chains::default();
    for table in TableName::ALL {
        let text = tools
            .save(table)
            .with_context(|| format!("cannot read the {table} table"))?;
        chains.add_save(table, &text);
    }
    // No ipset tool, or no sets: policy rules then match nothing, as in the kernel.
    let sets = tools
        .ipset_save()
        .map(|t| parse_save(&t))
        .unwrap_or_default();
    Ok((chains, sets))
}

/// Client addresses per recent list (`/proc/net/xt_recent/NAME`: `src=10.128.0.2 ttl: ...`).
pub fn parse_recent(text: &str) -> BTreeSet<Ipv4Addr> {
    text.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_prefix("src=")?
                .parse()
                .ok()
        })
        .collect()
}

fn recent_lists() -> BTreeMap<String, BTreeSet<Ipv4Addr>> {
    let Ok(dir) = std::fs::read_dir("/proc/net/xt_recent") else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                parse_recent(&text),
            ))
        })
        .collect()
}

/// The kernel's view of this node, with the model's view for what the kernel does not say
/// (which chains are rsdn's). Must run in a tokio runtime.
pub async fn kernel_view(
    config: &NodeConfig,
    model: &NodeView,
    kernel: &Kernel,
) -> anyhow::Result<NodeView> {
    let (chains, sets) = netfilter(config)?;
    let links = kernel.links().await?;
    let name_of = |i: u32| link_name(&links, i);
    let addresses = kernel.addresses().await?;
    let mut addrs = BTreeMap::new();
    for (i, net) in &addresses {
        addrs.entry(name_of(*i)).or_insert(net.addr());
    }
    let mut local: Vec<Ipv4Net> = addresses
        .iter()
        .map(|(_, n)| Ipv4Net::new(n.addr(), 32).expect("/32"))
        .collect();
    local.push("127.0.0.0/8".parse().expect("loopback"));
    let routes = kernel
        .routes()
        .await?
        .into_iter()
        .map(|r| Route {
            dst: r.dst,
            dev: r.oif.map(name_of).unwrap_or_default(),
            via: r.via,
            src: r.src,
            proto: Some(r.protocol),
        })
        .collect();
    let vxlan_link = links.iter().find(|l| l.name == VXLAN);
    let overlay = match vxlan_link {
        Some(l) => kernel.observe(l.index, config.cluster_network).await?,
        None => Default::default(),
    };
    let vxlan = vxlan_link.and_then(|l| match &l.data {
        Some(InfoData::Vxlan(v)) => {
            let mut out = Vxlan {
                vni: 0,
                port: 0,
                local: Ipv4Addr::UNSPECIFIED,
            };
            for i in v {
                match i {
                    InfoVxlan::Id(id) => out.vni = *id,
                    InfoVxlan::Port(p) => out.port = *p,
                    InfoVxlan::Local(ip) => out.local = *ip,
                    _ => {}
                }
            }
            Some(out)
        }
        _ => None,
    });
    let bridge = links.iter().find(|l| l.name == BRIDGE);
    let ports = rsdn_cni::ipam::read_allocations(&config.ipam_dir())
        .map(|a| {
            ports::pod_ports(&a)
                .into_iter()
                .map(|p| {
                    let link = links.iter().find(|l| l.name == p.veth).map(|l| PortLink {
                        on_bridge: bridge.is_some_and(|b| l.master == Some(b.index)),
                        up: l.up,
                        hairpin: l.hairpin == Some(true),
                        mtu: l.mtu,
                    });
                    (p.ip, PortState { veth: p.veth, link })
                })
                .collect()
        })
        .ok();
    Ok(NodeView {
        node: model.node.clone(),
        kernel: true,
        chains,
        sets,
        owned: model.owned.clone(),
        local,
        routes,
        overlay,
        vxlan,
        addrs,
        recent: Some(recent_lists()),
        ports,
        mtu: bridge.map(|b| b.mtu),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_lists_name_their_clients() {
        let text = "src=10.128.0.2 ttl: 64 last_seen: 4295 oldest_pkt: 1 4295\nsrc=10.128.4.3 ttl: 63 last_seen: 4296 oldest_pkt: 2 4290, 4296\n";
        let got: Vec<String> = parse_recent(text).iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["10.128.0.2", "10.128.4.3"]);
    }
}
