//! Watches rtnetlink events so drift (someone deleting vxlan0, a route, a neighbour or an FDB
//! entry) is repaired in milliseconds instead of at the next resync. Events only wake the
//! reconcile loop; what to repair is always decided by a full diff.
//!
//! Every entry the daemon adds also comes back here as a notification (15000 of them when 5000
//! nodes appear), so messages are sorted by their header type alone; only RTM_NEWLINK, which is
//! rare, is parsed to see whether it concerns one of our devices.

use std::sync::Arc;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use tokio::sync::Notify;
use tracing::warn;

use rsdn_cni::names::VETH_PREFIX;

use super::{BRIDGE, VXLAN};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_DELADDR: u16 = 21;
const RTM_DELROUTE: u16 = 25;
const RTM_DELNEIGH: u16 = 29;
/// RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_ROUTE.
const GROUPS: [u32; 4] = [1, 3, 5, 7];
const HEADER_LEN: usize = 16;

/// Whether a datagram of notifications may mean our state drifted: any deletion of a link,
/// address, route or neighbour (cheap to check by diff), or a change to tun0, vxlan0 or a pod's
/// host veth (taken off tun0 by hand, say).
pub fn wakes(datagram: &[u8]) -> bool {
    let mut off = 0;
    while off + HEADER_LEN <= datagram.len() {
        let len = u32::from_ne_bytes(datagram[off..off + 4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(datagram[off + 4..off + 6].try_into().expect("2 bytes"));
        if len < HEADER_LEN || off + len > datagram.len() {
            return true; // malformed: let a full pass decide
        }
        match kind {
            RTM_DELLINK | RTM_DELADDR | RTM_DELROUTE | RTM_DELNEIGH => return true,
            RTM_NEWLINK if concerns_our_devices(&datagram[off..off + len]) => return true,
            _ => {}
        }
        off += (len + 3) & !3;
    }
    false
}

fn concerns_our_devices(message: &[u8]) -> bool {
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
        Ok(NetlinkMessage {
            payload: NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)),
            ..
        }) => l
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(n) if n == VXLAN || n == BRIDGE || n.starts_with(VETH_PREFIX))),
        _ => true,
    }
}

/// Subscribes and pokes `wake` on every relevant event, forever. When the kernel drops events
/// (ENOBUFS: our socket overran) it pokes too, since a full pass covers whatever they were.
pub async fn run(wake: Arc<Notify>) {
    let subscribe = || -> std::io::Result<TokioSocket> {
        let mut sock = TokioSocket::new(NETLINK_ROUTE)?;
        sock.socket_mut().bind(&SocketAddr::new(0, 0))?;
        for g in GROUPS {
            sock.socket_mut().add_membership(g)?;
        }
        Ok(sock)
    };
    let sock = match subscribe() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot monitor netlink events; drift is repaired at resync only");
            return;
        }
    };
    loop {
        match sock.recv_from_full().await {
            Ok((datagram, _)) => {
                if wakes(&datagram) {
                    wake.notify_one();
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => wake.notify_one(),
            Err(e) => {
                warn!(error = %e, "netlink event stream failed; drift is repaired at resync only");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::link::LinkMessage;
    use netlink_packet_route::route::RouteMessage;

    fn bytes(msg: RouteNetlinkMessage) -> Vec<u8> {
        let mut m =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn link(name: &str) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.attributes.push(LinkAttribute::IfName(name.into()));
        l
    }

    #[test]
    fn additions_do_not_wake_deletions_do() {
        assert!(!wakes(&bytes(RouteNetlinkMessage::NewRoute(
            RouteMessage::default()
        ))));
        assert!(wakes(&bytes(RouteNetlinkMessage::DelRoute(
            RouteMessage::default()
        ))));
        assert!(wakes(&bytes(RouteNetlinkMessage::DelLink(link("eth7")))));
    }

    #[test]
    fn link_changes_wake_only_for_our_devices_and_pod_veths() {
        assert!(wakes(&bytes(RouteNetlinkMessage::NewLink(link("vxlan0")))));
        assert!(wakes(&bytes(RouteNetlinkMessage::NewLink(link("tun0")))));
        assert!(wakes(&bytes(RouteNetlinkMessage::NewLink(link(
            "rsdn0123456789a"
        )))));
        assert!(!wakes(&bytes(RouteNetlinkMessage::NewLink(link("eth7")))));
    }

    #[test]
    fn any_relevant_message_in_a_batch_wakes_and_garbage_wakes() {
        let mut batch = bytes(RouteNetlinkMessage::NewRoute(RouteMessage::default()));
        batch.extend(bytes(RouteNetlinkMessage::DelLink(link("x"))));
        assert!(wakes(&batch));
        assert!(wakes(&[0xff; 20]));
        assert!(!wakes(&[]));
    }
}
