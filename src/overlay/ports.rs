//! The pods' side of tun0: every local pod's host veth is a port of tun0, up, with hairpin mode
//! on and the pod MTU. The plugin creates the veths that way and owns them; the daemon repairs
//! the attachment when it is lost. Deleting a bridge releases its ports for good, so a tun0
//! that was deleted and re-created has no pods on it until they are attached again.
//!
//! Which veths are pods' comes from the plugin's own records: each IPAM allocation holds the
//! (container id, ifname) of its attachment, and the host veth's name derives from those.

use std::fmt;
use std::net::Ipv4Addr;

use rsdn_cni::ipam::Allocation;
use rsdn_cni::names::host_veth_name;
use rsdn_cni::netlink::Link;

use super::BRIDGE;

/// A pod attachment of this node, as the IPAM store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPort {
    /// The host end of the pod's veth.
    pub veth: String,
    pub ip: Ipv4Addr,
    pub container_id: String,
}

/// The pod attachments the store records. An id-only record (written by host-local before
/// 0.8) names no interface: the runtime's default `eth0` is assumed.
pub fn pod_ports(allocations: &[Allocation]) -> Vec<PodPort> {
    allocations
        .iter()
        .map(|a| PodPort {
            veth: host_veth_name(
                &a.owner.container_id,
                a.owner.ifname.as_deref().unwrap_or("eth0"),
            ),
            ip: a.ip,
            container_id: a.owner.container_id.clone(),
        })
        .collect()
}

/// What must change on one pod veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRepair {
    pub veth: String,
    pub index: u32,
    pub ip: Ipv4Addr,
    /// Not a port of tun0: enslave it (and bring it up with the MTU).
    pub attach: bool,
    /// The MTU to set, when it differs.
    pub mtu: Option<u32>,
    /// Hairpin mode is off (or the port is new): turn it on.
    pub hairpin: bool,
}

impl fmt::Display for PortRepair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.attach {
            parts.push(format!("master {BRIDGE}"));
        }
        if let Some(mtu) = self.mtu {
            parts.push(format!("mtu {mtu}"));
        }
        if self.attach {
            parts.push("up".into());
        }
        if !parts.is_empty() {
            write!(f, "link set {} {}", self.veth, parts.join(" "))?;
        }
        if self.hairpin {
            if !parts.is_empty() {
                f.write_str("; ")?;
            }
            write!(f, "bridge link set dev {} hairpin on", self.veth)?;
        }
        Ok(())
    }
}

/// What the pod veths need, given the links of the node namespace. A veth that does not exist
/// is not ours to create (the pod is gone; the plugin's GC releases its record). A veth that is
/// detached and down is being torn down by the plugin's DEL (which takes it off the bridge and
/// down before it releases the address): it is left alone.
pub fn repairs(ports: &[PodPort], links: &[Link], bridge: u32, mtu: u32) -> Vec<PortRepair> {
    let by_name: std::collections::HashMap<&str, &Link> =
        links.iter().map(|l| (l.name.as_str(), l)).collect();
    let mut out = Vec::new();
    for p in ports {
        let Some(l) = by_name.get(p.veth.as_str()) else {
            continue;
        };
        let attached = l.master == Some(bridge);
        if !attached && !l.up {
            continue;
        }
        let r = PortRepair {
            veth: p.veth.clone(),
            index: l.index,
            ip: p.ip,
            attach: !attached,
            mtu: (l.mtu != mtu).then_some(mtu),
            hairpin: !attached || l.hairpin != Some(true),
        };
        if r.attach || r.mtu.is_some() || r.hairpin {
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsdn_cni::ipam::Owner;

    fn alloc(ip: &str, id: &str, ifname: Option<&str>) -> Allocation {
        Allocation {
            ip: ip.parse().unwrap(),
            owner: Owner {
                container_id: id.into(),
                ifname: ifname.map(Into::into),
            },
        }
    }

    fn link(name: &str, index: u32, master: Option<u32>, up: bool, mtu: u32) -> Link {
        Link {
            index,
            name: name.into(),
            mac: vec![],
            mtu,
            master,
            kind: None,
            data: None,
            up,
            hairpin: master.map(|_| true),
        }
    }

    #[test]
    fn records_name_the_host_veths() {
        let ports = pod_ports(&[
            alloc("10.128.0.2", "c1", Some("eth0")),
            alloc("10.128.0.3", "c2", None),
        ]);
        assert_eq!(ports[0].veth, host_veth_name("c1", "eth0"));
        assert_eq!(ports[1].veth, host_veth_name("c2", "eth0"));
    }

    #[test]
    fn each_kind_of_damage_has_its_repair() {
        let ports = pod_ports(&[
            alloc("10.128.0.2", "ok", Some("eth0")),
            alloc("10.128.0.3", "detached", Some("eth0")),
            alloc("10.128.0.4", "mtu", Some("eth0")),
            alloc("10.128.0.5", "hairpin", Some("eth0")),
            alloc("10.128.0.6", "deleting", Some("eth0")),
            alloc("10.128.0.7", "gone", Some("eth0")),
            alloc("10.128.0.8", "other-bridge", Some("eth0")),
        ]);
        let v = |id: &str| host_veth_name(id, "eth0");
        let mut no_hairpin = link(&v("hairpin"), 5, Some(1), true, 1450);
        no_hairpin.hairpin = Some(false);
        let links = vec![
            link(BRIDGE, 1, None, true, 1450),
            link(&v("ok"), 2, Some(1), true, 1450),
            link(&v("detached"), 3, None, true, 1450),
            link(&v("mtu"), 4, Some(1), true, 1500),
            no_hairpin,
            link(&v("deleting"), 6, None, false, 1450),
            link(&v("other-bridge"), 8, Some(99), true, 1450),
        ];
        let got: Vec<String> = repairs(&ports, &links, 1, 1450)
            .iter()
            .map(|r| r.to_string().replace(&r.veth, &format!("<{}>", r.ip)))
            .collect();
        assert_eq!(
            got,
            [
                "link set <10.128.0.3> master tun0 up; bridge link set dev <10.128.0.3> hairpin on",
                "link set <10.128.0.4> mtu 1450",
                "bridge link set dev <10.128.0.5> hairpin on",
                "link set <10.128.0.8> master tun0 up; bridge link set dev <10.128.0.8> hairpin on",
            ]
        );
    }

    #[test]
    fn a_recreated_bridge_gets_every_pod_back() {
        // tun0 deleted and re-created: new index, every veth detached but still up.
        let ports = pod_ports(&[
            alloc("10.128.0.2", "a", Some("eth0")),
            alloc("10.128.0.3", "b", Some("eth0")),
        ]);
        let links = vec![
            link(&host_veth_name("a", "eth0"), 2, None, true, 1450),
            link(&host_veth_name("b", "eth0"), 3, None, true, 1450),
        ];
        let r = repairs(&ports, &links, 42, 1450);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|r| r.attach && r.hairpin && r.mtu.is_none()));
        assert!(
            repairs(&ports, &[], 42, 1450).is_empty(),
            "no veth, nothing to do"
        );
    }
}
