//! The few rtnetlink operations the plugin needs, on one connection per namespace. The node
//! daemon builds on the same link lookups and error handling.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::netns::NetnsGuard;

pub type NlResult<T> = Result<T, rtnetlink::Error>;

/// The errno of a kernel NACK, if that is what the error is.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// A link as the plugin cares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub master: Option<u32>,
    pub kind: Option<InfoKind>,
    /// Kind-specific settings (the VXLAN id, port, ... for a vxlan link).
    pub data: Option<InfoData>,
    pub up: bool,
    /// For a bridge port: whether hairpin mode is on (None: not a bridge port, or not said).
    pub hairpin: Option<bool>,
}

impl Link {
    pub fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            master: None,
            kind: None,
            data: None,
            up: m.header.flags.contains(LinkFlags::Up),
            hairpin: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) => link.mac = a.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::Controller(i) => link.master = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k.clone()),
                            LinkInfo::Data(d) => link.data = Some(d.clone()),
                            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                                link.hairpin = port.iter().find_map(|p| match p {
                                    InfoBridgePort::HairpinMode(on) => Some(*on),
                                    _ => None,
                                });
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// What the pod end of a new veth pair looks like.
pub struct PodEnd<'a> {
    pub netns: &'a File,
    pub ifname: &'a str,
    pub mac: [u8; 6],
}

/// An rtnetlink connection bound to one network namespace.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A connection in the calling thread's namespace; must run inside a tokio runtime.
    pub fn connect() -> io::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The underlying handle, for requests this module does not wrap.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// A connection whose socket lives in `ns` (the thread returns home right after).
    pub fn connect_in(ns: &File) -> io::Result<Netlink> {
        let _guard = NetnsGuard::enter(ns)?;
        Netlink::connect()
    }

    pub async fn link(&self, name: &str) -> NlResult<Option<Link>> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn links(&self) -> NlResult<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Creates the pair in one request: the host end up, with `mtu`, enslaved to `bridge`; the
    /// pod end created directly inside the pod namespace with its final name, MAC and MTU. The
    /// pod end cannot be brought up here: the kernel configures the peer before linking the two
    /// ends, and `veth_open` refuses (ENOTCONN) an end without a peer.
    pub async fn create_veth(
        &self,
        host: &str,
        mtu: u32,
        bridge: u32,
        pod: &PodEnd<'_>,
    ) -> NlResult<()> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(pod.ifname)
            .address(pod.mac.to_vec())
            .mtu(mtu)
            .setns_by_fd(pod.netns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(host)
            .mtu(mtu)
            .controller(bridge)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle.link().add(msg).execute().await
    }

    pub async fn set_up(&self, index: u32) -> NlResult<()> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .up()
            .build();
        self.handle.link().change(msg).execute().await
    }

    /// Takes a link off its bridge and down in one request: from here on nothing flows through
    /// it. (Detach happens before the flags change inside the kernel's do_setlink.)
    pub async fn disconnect(&self, index: u32) -> NlResult<()> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .nocontroller()
            .down()
            .build();
        self.handle.link().change(msg).execute().await
    }

    /// `ip link set NAME type bridge_slave hairpin on`.
    pub async fn set_hairpin(&self, index: u32) -> NlResult<()> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .set_port_kind(InfoPortKind::Bridge)
            .set_port_data(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                true,
            )]))
            .build();
        self.handle.link().set_port(msg).execute().await
    }

    /// Deletes a link; one that is already gone is success.
    pub async fn delete_link(&self, index: u32) -> NlResult<()> {
        match self.handle.link().del(index).execute().await {
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            r => r,
        }
    }

    pub async fn add_address(&self, index: u32, addr: Ipv4Net) -> NlResult<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .execute()
            .await
    }

    pub async fn addresses(&self, index: u32) -> NlResult<Vec<Ipv4Net>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => {
                        Ipv4Net::new(*ip, m.header.prefix_len).ok()
                    }
                    _ => None,
                })
            })
            .collect())
    }

    pub async fn add_route(&self, dst: Ipv4Net, gw: Ipv4Addr, oif: u32) -> NlResult<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .gateway(gw)
            .output_interface(oif)
            .build();
        self.handle.route().add(msg).execute().await
    }

    /// IPv4 routes of the main table as (destination, gateway, output interface).
    pub async fn routes(&self) -> NlResult<Vec<(Ipv4Net, Option<Ipv4Addr>, Option<u32>)>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.address_family == AddressFamily::Inet)
            .filter_map(|m| {
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let (mut gw, mut oif) = (None, None);
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                Some((
                    Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
                    gw,
                    oif,
                ))
            })
            .collect())
    }
}
