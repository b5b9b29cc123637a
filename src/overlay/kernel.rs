//! The overlay's kernel side, through rtnetlink: makes tun0 and vxlan0 what the spec says (in
//! place where the kernel allows, recreated where it does not), reads the per-node entries rsdn
//! owns, and applies actions. Ownership is by construction: entries on vxlan0 with a VTEP MAC
//! (FDB) or a cluster-network address (neighbours), and routes with protocol ROUTE_PROTOCOL.
//! Anything else, on any device, is left alone.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rsdn_cni::netlink::{Link, Netlink};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVxlan, RouteMessageBuilder,
};
use tracing::{info, warn};

use super::ports::PortRepair;
use super::{batch, Action, Entries, RouteTarget, VtepMac, BRIDGE, ROUTE_PROTOCOL, VXLAN};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0} exists but is not a {1} device; rsdn will not take it over")]
    Foreign(String, &'static str),
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Entry { what: String, errno: i32 },
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Netlink { what, source }
}

/// What tun0 and vxlan0 must look like on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Gateway address with the node subnet's prefix, e.g. 10.128.0.1/23.
    pub gateway: Ipv4Net,
    /// This node's VTEP address (its subnet's network address), held by vxlan0 as a /32 as
    /// flannel does: traffic masqueraded out of vxlan0 (Services whose endpoint is on another
    /// node) then leaves with an address the other node routes back through the overlay.
    pub vtep: Ipv4Addr,
    pub mtu: u32,
    pub vni: u32,
    pub port: u16,
    pub local_ip: Ipv4Addr,
}

impl DeviceSpec {
    /// The bridge's MAC is pinned (0a:58 + gateway): a Linux bridge otherwise takes the lowest
    /// port MAC, which changes as pods come and go and makes every pod re-ARP its gateway.
    pub fn bridge_mac(&self) -> VtepMac {
        VtepMac::of(self.gateway.addr())
    }

    pub fn vxlan_mac(&self) -> VtepMac {
        VtepMac::of(self.local_ip)
    }
}

/// Interface indices of the two devices once they are right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Devices {
    pub bridge: u32,
    pub vxlan: u32,
}

/// Whether an existing vxlan0 has the settings that cannot be changed in place.
fn vxlan_matches(l: &Link, spec: &DeviceSpec) -> bool {
    let Some(InfoData::Vxlan(v)) = &l.data else {
        return false;
    };
    [
        InfoVxlan::Id(spec.vni),
        InfoVxlan::Local(spec.local_ip),
        InfoVxlan::Port(spec.port),
        InfoVxlan::Learning(false),
    ]
    .iter()
    .all(|want| v.contains(want))
}

/// What the overlay needs from the kernel: the seam between the reconciler's policy and
/// rtnetlink. `Kernel` is the real one; `overlay::fake::FakeKernel` holds the state in memory.
#[allow(async_fn_in_trait)]
pub trait OverlayKernel {
    /// Forwarding and bridged traffic through iptables on; returns what it changed.
    async fn sysctls(&self) -> Result<Vec<String>, KernelError>;
    async fn mtu_of_address(&self, ip: Ipv4Addr) -> Result<Option<u32>, KernelError>;
    async fn ensure_devices(
        &self,
        spec: &DeviceSpec,
    ) -> Result<(Devices, Vec<String>), KernelError>;
    async fn vxlan_index(&self) -> Result<Option<u32>, KernelError>;
    async fn observe(&self, vxlan: u32, cluster_network: Ipv4Net) -> Result<Entries, KernelError>;
    async fn apply(&self, vxlan: u32, actions: &[Action]) -> Vec<(Action, KernelError)>;
    async fn links(&self) -> Result<Vec<Link>, KernelError>;
    async fn repair_port(&self, bridge: u32, r: &PortRepair) -> Result<(), KernelError>;
}

impl OverlayKernel for Kernel {
    async fn sysctls(&self) -> Result<Vec<String>, KernelError> {
        assert_sysctls()
    }
    async fn mtu_of_address(&self, ip: Ipv4Addr) -> Result<Option<u32>, KernelError> {
        Kernel::mtu_of_address(self, ip).await
    }
    async fn ensure_devices(
        &self,
        spec: &DeviceSpec,
    ) -> Result<(Devices, Vec<String>), KernelError> {
        Kernel::ensure_devices(self, spec).await
    }
    async fn vxlan_index(&self) -> Result<Option<u32>, KernelError> {
        Kernel::vxlan_index(self).await
    }
    async fn observe(&self, vxlan: u32, cluster_network: Ipv4Net) -> Result<Entries, KernelError> {
        Kernel::observe(self, vxlan, cluster_network).await
    }
    async fn apply(&self, vxlan: u32, actions: &[Action]) -> Vec<(Action, KernelError)> {
        Kernel::apply(self, vxlan, actions).await
    }
    async fn links(&self) -> Result<Vec<Link>, KernelError> {
        Kernel::links(self).await
    }
    async fn repair_port(&self, bridge: u32, r: &PortRepair) -> Result<(), KernelError> {
        Kernel::repair_port(self, bridge, r).await
    }
}

/// An rtnetlink connection to the namespace the daemon runs in.
#[derive(Clone)]
pub struct Kernel {
    nl: Arc<Netlink>,
}

impl Kernel {
    /// Must be called inside a tokio runtime.
    pub fn connect() -> Result<Kernel, KernelError> {
        Ok(Kernel {
            nl: Arc::new(Netlink::connect().map_err(KernelError::Connect)?),
        })
    }

    fn handle(&self) -> &Handle {
        self.nl.handle()
    }

    async fn link(&self, name: &str) -> Result<Option<Link>, KernelError> {
        self.nl
            .link(name)
            .await
            .map_err(nl(format!("cannot look up {name}")))
    }

    /// Creates a link and returns it as the kernel now holds it.
    async fn create(&self, msg: LinkMessage, name: &str) -> Result<Link, KernelError> {
        self.handle()
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl(format!("cannot create {name}")))?;
        self.link(name)
            .await?
            .ok_or_else(|| KernelError::Setup(format!("{name} vanished right after creation")))
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, KernelError> {
        self.nl.links().await.map_err(nl("cannot list links"))
    }

    /// Puts one pod veth right: on the bridge and up with the MTU in one request, then hairpin
    /// mode (a bridge port setting, so only once it is a port).
    pub async fn repair_port(&self, bridge: u32, r: &PortRepair) -> Result<(), KernelError> {
        if r.attach || r.mtu.is_some() {
            let mut msg = LinkMessageBuilder::<LinkUnspec>::new().index(r.index);
            if r.attach {
                msg = msg.controller(bridge).up();
            }
            if let Some(mtu) = r.mtu {
                msg = msg.mtu(mtu);
            }
            self.handle()
                .link()
                .change(msg.build())
                .execute()
                .await
                .map_err(nl(format!("cannot attach {} to {BRIDGE}", r.veth)))?;
        }
        if r.hairpin {
            self.nl
                .set_hairpin(r.index)
                .await
                .map_err(nl(format!("cannot turn hairpin on for {}", r.veth)))?;
        }
        Ok(())
    }

    /// The index of vxlan0, if it exists.
    pub async fn vxlan_index(&self) -> Result<Option<u32>, KernelError> {
        Ok(self.link(VXLAN).await?.map(|l| l.index))
    }

    /// Makes tun0 and vxlan0 match `spec`; returns their indices and a line per change made.
    pub async fn ensure_devices(
        &self,
        spec: &DeviceSpec,
    ) -> Result<(Devices, Vec<String>), KernelError> {
        let mut changes = Vec::new();
        let bridge = self.ensure_bridge(spec, &mut changes).await?;
        let vxlan = self.ensure_vxlan(spec, &mut changes).await?;
        Ok((Devices { bridge, vxlan }, changes))
    }

    async fn ensure_bridge(
        &self,
        spec: &DeviceSpec,
        changes: &mut Vec<String>,
    ) -> Result<u32, KernelError> {
        let mac = spec.bridge_mac().0.to_vec();
        let link = match self.link(BRIDGE).await? {
            Some(l) if l.kind != Some(InfoKind::Bridge) => {
                return Err(KernelError::Foreign(BRIDGE.into(), "bridge"))
            }
            Some(l) => l,
            None => {
                let msg = LinkBridge::new(BRIDGE)
                    .mtu(spec.mtu)
                    .address(mac.clone())
                    .up()
                    .build();
                let link = self.create(msg, BRIDGE).await?;
                changes.push(format!("created bridge {BRIDGE}"));
                link
            }
        };
        self.fix_link(&link, BRIDGE, spec.mtu, &mac, changes)
            .await?;
        // tun0 is ours: exactly the gateway address, nothing else.
        self.only_address(link.index, BRIDGE, spec.gateway, changes)
            .await?;
        Ok(link.index)
    }

    async fn ensure_vxlan(
        &self,
        spec: &DeviceSpec,
        changes: &mut Vec<String>,
    ) -> Result<u32, KernelError> {
        let mac = spec.vxlan_mac().0.to_vec();
        let existing = match self.link(VXLAN).await? {
            Some(l) if l.kind != Some(InfoKind::Vxlan) => {
                return Err(KernelError::Foreign(VXLAN.into(), "vxlan"))
            }
            // VNI, port and local address cannot be changed in place: recreate. The diff that
            // follows puts every entry back.
            Some(l) if !vxlan_matches(&l, spec) => {
                self.handle()
                    .link()
                    .del(l.index)
                    .execute()
                    .await
                    .map_err(nl(format!("cannot delete {VXLAN}")))?;
                changes.push(format!("deleted {VXLAN} with outdated settings"));
                None
            }
            other => other,
        };
        let link = match existing {
            Some(l) => l,
            None => {
                let msg = LinkVxlan::new(VXLAN, spec.vni)
                    .local(spec.local_ip)
                    .port(spec.port)
                    .learning(false)
                    .mtu(spec.mtu)
                    .address(mac.clone())
                    .up()
                    .build();
                let link = self.create(msg, VXLAN).await?;
                changes.push(format!(
                    "created {VXLAN} (vni {}, dstport {}, local {}, nolearning)",
                    spec.vni, spec.port, spec.local_ip
                ));
                link
            }
        };
        self.fix_link(&link, VXLAN, spec.mtu, &mac, changes).await?;
        let vtep = Ipv4Net::new(spec.vtep, 32).expect("/32");
        self.only_address(link.index, VXLAN, vtep, changes).await?;
        Ok(link.index)
    }

    /// Makes `want` the only IPv4 address of a device of ours.
    async fn only_address(
        &self,
        index: u32,
        name: &str,
        want: Ipv4Net,
        changes: &mut Vec<String>,
    ) -> Result<(), KernelError> {
        let addrs = self.ipv4_address_messages(index).await?;
        if !addrs.iter().any(|(a, _)| *a == want) {
            self.handle()
                .address()
                .add(index, IpAddr::V4(want.addr()), want.prefix_len())
                .replace()
                .execute()
                .await
                .map_err(nl(format!("cannot add {want} to {name}")))?;
            changes.push(format!("address {want} on {name}"));
        }
        for (a, msg) in addrs {
            if a != want {
                self.handle()
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(nl(format!("cannot remove {a} from {name}")))?;
                changes.push(format!("removed stale address {a} from {name}"));
            }
        }
        Ok(())
    }

    /// MTU, MAC and up, changed in place in one request when any differs.
    async fn fix_link(
        &self,
        l: &Link,
        name: &str,
        mtu: u32,
        mac: &[u8],
        changes: &mut Vec<String>,
    ) -> Result<(), KernelError> {
        if l.mtu == mtu && l.mac == mac && l.up {
            return Ok(());
        }
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(l.index)
            .mtu(mtu)
            .address(mac.to_vec())
            .up()
            .build();
        self.handle()
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(nl(format!("cannot set {name} up")))?;
        changes.push(format!(
            "{name}: mtu {mtu}, mac {}, up",
            rsdn_cni::names::format_mac(mac)
        ));
        Ok(())
    }

    async fn ipv4_address_messages(
        &self,
        index: u32,
    ) -> Result<Vec<(Ipv4Net, netlink_packet_route::address::AddressMessage)>, KernelError> {
        let msgs: Vec<_> = self
            .handle()
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("cannot list addresses"))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })?;
                Some((Ipv4Net::new(ip, m.header.prefix_len).ok()?, m))
            })
            .collect())
    }

    /// The MTU of the interface holding `ip` (the underlay), if any holds it.
    pub async fn mtu_of_address(&self, ip: Ipv4Addr) -> Result<Option<u32>, KernelError> {
        let Some(index) = self
            .addresses()
            .await?
            .iter()
            .find(|(_, net)| net.addr() == ip)
            .map(|(index, _)| *index)
        else {
            return Ok(None);
        };
        let mut s = self.handle().link().get().match_index(index).execute();
        let link = s
            .try_next()
            .await
            .map_err(nl("cannot look up the underlay link"))?;
        Ok(link.map(|m| Link::from_message(&m).mtu))
    }

    /// The entries rsdn owns, as the kernel holds them now.
    pub async fn observe(
        &self,
        vxlan: u32,
        cluster_network: Ipv4Net,
    ) -> Result<Entries, KernelError> {
        let mut e = Entries::default();
        let fdb: Vec<NeighbourMessage> = self
            .handle()
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(nl("cannot dump the FDB"))?;
        for m in fdb.iter().filter(|m| m.header.ifindex == vxlan) {
            let mac = lladdr(m).and_then(|b| VtepMac::from_bytes(&b));
            // For AF_BRIDGE the library cannot tell the address family and leaves NDA_DST raw.
            let dst = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                }
                _ => None,
            });
            if let (Some(mac), Some(dst)) = (mac, dst) {
                e.fdb.insert((mac, dst));
            }
        }
        let neigh: Vec<NeighbourMessage> = self
            .handle()
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(nl("cannot dump neighbours"))?;
        for m in neigh
            .iter()
            .filter(|m| m.header.ifindex == vxlan && m.header.state == NeighbourState::Permanent)
        {
            let ip = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            if let (Some(ip), Some(mac)) = (ip, lladdr(m)) {
                if cluster_network.contains(&ip) {
                    // A permanent neighbour of ours with a foreign MAC still counts: the diff
                    // replaces it.
                    let mac = VtepMac::from_bytes(&mac).unwrap_or(VtepMac([0; 6]));
                    e.neigh.insert(ip, mac);
                }
            }
        }
        for (dst, target) in self.owned_routes(vxlan).await? {
            e.routes.insert(dst, target);
        }
        Ok(e)
    }

    async fn route_messages(&self) -> Result<Vec<RouteMessage>, KernelError> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        self.handle()
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(nl("cannot dump routes"))
    }

    /// Every IPv4 route of the main table, ours or not: what `rsdn trace` and `rsdn doctor`
    /// look a destination up in.
    pub async fn routes(&self) -> Result<Vec<KernelRoute>, KernelError> {
        Ok(self
            .route_messages()
            .await?
            .iter()
            .filter(|m| m.header.table == 254 || table_attr(m) == Some(254))
            .filter_map(kernel_route)
            .collect())
    }

    /// Every IPv4 address of the namespace, with its interface index.
    pub async fn addresses(&self) -> Result<Vec<(u32, Ipv4Net)>, KernelError> {
        let msgs: Vec<_> = self
            .handle()
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("cannot list addresses"))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })?;
                Some((m.header.index, Ipv4Net::new(ip, m.header.prefix_len).ok()?))
            })
            .collect())
    }

    /// Routes with our protocol; a route of ours on another device reads as a wrong target.
    async fn owned_routes(&self, vxlan: u32) -> Result<Vec<(Ipv4Net, RouteTarget)>, KernelError> {
        let none = Ipv4Addr::UNSPECIFIED;
        Ok(self
            .route_messages()
            .await?
            .iter()
            .filter(|m| m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL))
            .filter_map(kernel_route)
            .map(|r| {
                let via = if r.oif == Some(vxlan) {
                    r.via.unwrap_or(none)
                } else {
                    none
                };
                let src = r.src.unwrap_or(none);
                (r.dst, RouteTarget { via, src })
            })
            .collect())
    }

    /// Removes what the overlay owns (`rsdn cleanup`): every IPv4 route with protocol
    /// ROUTE_PROTOCOL, in any table and on any device, then vxlan0 (its FDB and neighbour
    /// entries go with it) and tun0 (its ports, the pods' veths, stay: detached, not deleted).
    /// A device of one of those names that is not of the kind rsdn makes is not ours: kept.
    /// Keeps going after a failure; "already gone" is success.
    pub async fn teardown(&self) -> Teardown {
        let mut out = Teardown::default();
        let links = match self.links().await {
            Ok(l) => l,
            Err(e) => {
                out.errors.push(e.to_string());
                return out;
            }
        };
        let name_of = |index: u32| {
            links
                .iter()
                .find(|l| l.index == index)
                .map_or(format!("#{index}"), |l| l.name.clone())
        };
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes: Result<Vec<RouteMessage>, _> = self
            .handle()
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await;
        match routes {
            Err(e) => out.errors.push(format!("cannot dump routes: {e}")),
            Ok(routes) => {
                let ours = routes.into_iter().filter(|m| {
                    m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                        && m.header.address_family == AddressFamily::Inet
                });
                for m in ours {
                    let what = describe_route(&m, name_of);
                    match self.handle().route().del(m).execute().await {
                        Ok(()) => out.removed.push(what),
                        Err(e) if gone(&e) => {}
                        Err(e) => out.errors.push(format!("cannot delete {what}: {e}")),
                    }
                }
            }
        }
        for (name, kind) in [(VXLAN, InfoKind::Vxlan), (BRIDGE, InfoKind::Bridge)] {
            let Some(link) = links.iter().find(|l| l.name == name) else {
                continue;
            };
            if link.kind.as_ref() != Some(&kind) {
                out.kept.push(format!(
                    "link {name}: a {} device, not the {kind} rsdn makes",
                    link.kind
                        .as_ref()
                        .map_or("plain".to_string(), |k| k.to_string())
                ));
                continue;
            }
            let ports = links
                .iter()
                .filter(|l| l.master == Some(link.index))
                .count();
            let what = match ports {
                0 => format!("link {name}"),
                n => format!(
                    "link {name} ({n} port(s), the pods' veths, detached and left in place)"
                ),
            };
            match self.nl.delete_link(link.index).await {
                Ok(()) => out.removed.push(what),
                Err(e) => out.errors.push(format!("cannot delete {name}: {e}")),
            }
        }
        out
    }

    /// Applies actions phase by phase (route deletions; neighbour and FDB deletions; FDB and
    /// neighbour additions; route additions), each phase in large netlink datagrams (see
    /// `batch`). Returns the failures; "already gone" on deletion is success.
    pub async fn apply(&self, vxlan: u32, actions: &[Action]) -> Vec<(Action, KernelError)> {
        // Routes go first and come last: traffic follows a route only, so a route never points
        // at a path that is half gone or half built. Neighbours and FDB entries carry nothing
        // on their own and share a phase.
        let phase = |a: &Action| match a {
            Action::DelRoute(_) => 0,
            Action::DelNeigh(_) | Action::DelFdb(..) => 1,
            Action::SetFdb(..) | Action::SetNeigh(..) => 2,
            Action::SetRoute(..) => 3,
        };
        let mut failures = Vec::new();
        for p in 0..4 {
            let batch: Vec<Action> = actions.iter().copied().filter(|a| phase(a) == p).collect();
            if batch.is_empty() {
                continue;
            }
            let started = std::time::Instant::now();
            let requests = batch.iter().map(|a| request(vxlan, *a)).collect();
            let sent = tokio::task::spawn_blocking(move || batch::send_all(requests))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match sent {
                Ok(refused) => {
                    for (i, errno) in refused {
                        let already_gone = !is_set(&batch[i])
                            && matches!(errno, libc::ENOENT | libc::ESRCH | libc::ENODEV);
                        if !already_gone {
                            let what = batch[i].to_string();
                            failures.push((batch[i], KernelError::Entry { what, errno }));
                        }
                    }
                }
                // The whole phase is in doubt: report every action; the next pass re-diffs.
                Err(e) => failures.extend(
                    batch
                        .iter()
                        .map(|a| (*a, KernelError::Setup(format!("{a}: {e}")))),
                ),
            }
            tracing::debug!(
                phase = p,
                requests = batch.len(),
                took_us = started.elapsed().as_micros() as u64,
                "apply phase"
            );
        }
        failures
    }
}

/// What `Kernel::teardown` did: a line per thing removed, per thing of our name kept, per
/// failure.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Teardown {
    pub removed: Vec<String>,
    pub kept: Vec<String>,
    pub errors: Vec<String>,
}

/// Whether a deletion failed because the thing is gone already.
fn gone(e: &rtnetlink::Error) -> bool {
    matches!(
        rsdn_cni::netlink::errno(e),
        Some(libc::ENOENT | libc::ESRCH | libc::ENODEV)
    )
}

/// `route 10.128.2.0/23 via 10.128.2.0 dev vxlan0 table 254 proto 212`, as `ip route` says it.
fn describe_route(m: &RouteMessage, name_of: impl Fn(u32) -> String) -> String {
    let mut dst = format!("0.0.0.0/{}", m.header.destination_prefix_length);
    let (mut via, mut dev, mut table) = (None, None, u32::from(m.header.table));
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                dst = format!("{d}/{}", m.header.destination_prefix_length)
            }
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
            RouteAttribute::Oif(i) => dev = Some(name_of(*i)),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let mut out = format!("route {dst}");
    if let Some(v) = via {
        out += &format!(" via {v}");
    }
    if let Some(d) = dev {
        out += &format!(" dev {d}");
    }
    out + &format!(" table {table} proto {ROUTE_PROTOCOL}")
}

fn is_set(a: &Action) -> bool {
    matches!(
        a,
        Action::SetFdb(..) | Action::SetNeigh(..) | Action::SetRoute(..)
    )
}

/// The netlink request for one action (vxlan0 is `vxlan`).
fn request(vxlan: u32, action: Action) -> batch::Request {
    let neigh = |family, ip: Ipv4Addr, mac: Option<VtepMac>, flags| {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        m.header.ifindex = vxlan;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = flags;
        if let Some(mac) = mac {
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        }
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        m
    };
    let route = |dst: Ipv4Net| {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
    };
    let (message, create) = match action {
        // FDB: AF_BRIDGE neighbours of vxlan0 handled by the device itself (NTF_SELF).
        Action::SetFdb(mac, dst) => (
            RouteNetlinkMessage::NewNeighbour(neigh(
                AddressFamily::Bridge,
                dst,
                Some(mac),
                NeighbourFlags::Own,
            )),
            true,
        ),
        Action::DelFdb(mac, dst) => (
            RouteNetlinkMessage::DelNeighbour(neigh(
                AddressFamily::Bridge,
                dst,
                Some(mac),
                NeighbourFlags::Own,
            )),
            false,
        ),
        Action::SetNeigh(ip, mac) => (
            RouteNetlinkMessage::NewNeighbour(neigh(
                AddressFamily::Inet,
                ip,
                Some(mac),
                NeighbourFlags::empty(),
            )),
            true,
        ),
        Action::DelNeigh(ip) => (
            RouteNetlinkMessage::DelNeighbour(neigh(
                AddressFamily::Inet,
                ip,
                None,
                NeighbourFlags::empty(),
            )),
            false,
        ),
        Action::SetRoute(dst, t) => (
            RouteNetlinkMessage::NewRoute(
                route(dst)
                    .gateway(t.via)
                    .output_interface(vxlan)
                    .pref_source(t.src)
                    .onlink()
                    .build(),
            ),
            true,
        ),
        Action::DelRoute(dst) => (RouteNetlinkMessage::DelRoute(route(dst).build()), false),
    };
    batch::Request { message, create }
}

/// A route of the main table, as `Kernel::routes` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: Ipv4Net,
    pub via: Option<Ipv4Addr>,
    pub src: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub protocol: u8,
}

/// An IPv4 route message as data.
fn kernel_route(m: &RouteMessage) -> Option<KernelRoute> {
    if m.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut r = KernelRoute {
        dst: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, m.header.destination_prefix_length).ok()?,
        via: None,
        src: None,
        oif: None,
        protocol: u8::from(m.header.protocol),
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                r.dst = Ipv4Net::new(*d, m.header.destination_prefix_length).ok()?
            }
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.via = Some(*g),
            RouteAttribute::PrefSource(RouteAddress::Inet(s)) => r.src = Some(*s),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            _ => {}
        }
    }
    Some(r)
}

fn table_attr(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Table(t) => Some(*t),
        _ => None,
    })
}

fn lladdr(m: &NeighbourMessage) -> Option<Vec<u8>> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => Some(b.clone()),
        _ => None,
    })
}

/// Sysctls the datapath needs in this namespace: forwarding, and bridged traffic through
/// iptables (same-node Service replies must pass conntrack). Returns the ones it had to change.
/// The bridge sysctls only exist once br_netfilter is loaded, which no netlink request does for
/// us (unlike vxlan, which the kernel loads on demand): load it with modprobe when they are
/// missing (needs CAP_SYS_MODULE and the host's /lib/modules; in the DaemonSet the privileged
/// init container has both).
pub fn assert_sysctls() -> Result<Vec<String>, KernelError> {
    if !Path::new("/proc/sys/net/bridge").exists() {
        match std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .output()
        {
            Ok(o) if o.status.success() => info!(module = "br_netfilter", "loaded"),
            Ok(o) => warn!(
                module = "br_netfilter",
                error = %String::from_utf8_lossy(&o.stderr).trim(),
                "modprobe failed"
            ),
            Err(e) => warn!(module = "br_netfilter", error = %e, "cannot run modprobe"),
        }
    }
    let mut changed = Vec::new();
    for (path, why) in [
        (
            "/proc/sys/net/ipv4/ip_forward",
            "route between pods, nodes and the overlay",
        ),
        (
            "/proc/sys/net/bridge/bridge-nf-call-iptables",
            "conntrack for same-node Service replies",
        ),
    ] {
        let current = std::fs::read_to_string(path).map_err(|e| {
            KernelError::Setup(format!(
                "cannot read {path} ({why}): {e}; is br_netfilter loaded?"
            ))
        })?;
        if current.trim() != "1" {
            std::fs::write(path, "1")
                .map_err(|e| KernelError::Setup(format!("cannot set {path}: {e}")))?;
            info!(sysctl = path, "set to 1");
            changed.push(path.to_string());
        }
    }
    Ok(changed)
}
