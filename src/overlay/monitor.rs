//! Watches rtnetlink events so drift (someone deleting vxlan0, a route, a neighbour or an FDB
//! entry) is repaired in milliseconds instead of at the next resync. Events only wake the
//! reconcile loop; what to repair is always decided by a full diff.

use std::sync::Arc;

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use tokio::sync::Notify;
use tracing::warn;

use super::{BRIDGE, VXLAN};

/// Whether an event may mean our state drifted. Deletions of links, neighbours and routes
/// anywhere count (cheap to check by diff); changes to our two devices count.
fn relevant(msg: &RouteNetlinkMessage) -> bool {
    match msg {
        RouteNetlinkMessage::DelLink(_)
        | RouteNetlinkMessage::DelNeighbour(_)
        | RouteNetlinkMessage::DelRoute(_) => true,
        RouteNetlinkMessage::NewLink(l) => l
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(n) if n == VXLAN || n == BRIDGE)),
        RouteNetlinkMessage::DelAddress(_) => true,
        _ => false,
    }
}

/// Subscribes and pokes `wake` on every relevant event, forever. If the subscription fails or
/// the kernel drops events (socket overrun), it pokes too: the periodic resync still covers.
pub async fn run(wake: Arc<Notify>) {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Ifaddr,
    ];
    let (conn, _handle, mut messages) = match rtnetlink::new_multicast_connection(&groups) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot monitor netlink events; drift is repaired at resync only");
            return;
        }
    };
    tokio::spawn(conn);
    while let Some((msg, _)) = messages.next().await {
        match msg.payload {
            NetlinkPayload::InnerMessage(m) if relevant(&m) => wake.notify_one(),
            NetlinkPayload::Error(_) | NetlinkPayload::Overrun(_) => wake.notify_one(),
            _ => {}
        }
    }
    warn!("netlink event stream ended; drift is repaired at resync only");
}
