//! Applies many overlay entries with few syscalls. rtnetlink handles every message of a
//! datagram synchronously inside `sendmsg`, in order, so a chunk of requests sent without
//! NLM_F_ACK is fully processed when `send` returns; the kernel answers only the requests that
//! failed (an NLMSG_ERROR carrying the request's sequence number). One syscall per chunk instead
//! of a send and a receive per entry: at 5000 nodes that is 15000 entries.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Requests per datagram. Bounded so that even a chunk whose every request fails fits its error
/// replies (one small skb each, NETLINK_CAP_ACK) in the receive buffer.
const CHUNK: usize = 128;
const NLMSG_ERROR: u16 = 2;

/// A request and whether it creates (replace semantics) or deletes.
pub struct Request {
    pub message: RouteNetlinkMessage,
    pub create: bool,
}

/// Sends `requests` in chunks; returns (index into `requests`, errno) for each one the kernel
/// refused. Runs blocking: call it from a blocking thread.
pub fn send_all(requests: Vec<Request>) -> io::Result<Vec<(usize, i32)>> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.set_cap_ack(true)?;
    sock.set_rx_buf_sz(4 * 1024 * 1024)?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut failures = Vec::new();
    let mut buf = Vec::with_capacity(CHUNK * 128);
    let total = requests.len();
    let mut requests = requests.into_iter().enumerate().peekable();
    while requests.peek().is_some() {
        buf.clear();
        for (i, req) in requests.by_ref().take(CHUNK) {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST
                | if req.create {
                    NLM_F_CREATE | NLM_F_REPLACE
                } else {
                    0
                };
            header.sequence_number = i as u32 + 1;
            let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(req.message));
            msg.finalize();
            let start = buf.len();
            buf.resize(start + msg.buffer_len(), 0);
            msg.serialize(&mut buf[start..]);
            // Messages in one datagram start on 4-byte boundaries.
            buf.resize(buf.len().next_multiple_of(4), 0);
        }
        sock.send(&buf, 0)?;
        drain_errors(&sock, total, &mut failures)?;
    }
    Ok(failures)
}

/// Reads every error reply already queued (the chunk is processed when `send` returns).
fn drain_errors(sock: &Socket, total: usize, failures: &mut Vec<(usize, i32)>) -> io::Result<()> {
    let mut rbuf = vec![0u8; 64 * 1024];
    loop {
        let n = match sock.recv(&mut &mut rbuf[..], libc::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        for (seq, errno) in error_replies(&rbuf[..n]) {
            if errno != 0 && (1..=total as u32).contains(&seq) {
                failures.push((seq as usize - 1, errno));
            }
        }
    }
}

/// (sequence number, errno) of every NLMSG_ERROR in a datagram.
pub fn error_replies(datagram: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= datagram.len() {
        let len = u32::from_ne_bytes(datagram[off..off + 4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(datagram[off + 4..off + 6].try_into().expect("2 bytes"));
        if len < 16 || off + len > datagram.len() {
            break;
        }
        // NLMSG_ERROR payload: i32 error, then the request's header (len, type, flags, seq, pid).
        if kind == NLMSG_ERROR && len >= 16 + 4 + 16 {
            let errno =
                -i32::from_ne_bytes(datagram[off + 16..off + 20].try_into().expect("4 bytes"));
            let seq = u32::from_ne_bytes(datagram[off + 28..off + 32].try_into().expect("4 bytes"));
            out.push((seq, errno));
        }
        off += len.next_multiple_of(4);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_message(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(36u32.to_ne_bytes());
        m.extend(NLMSG_ERROR.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend((-errno).to_ne_bytes());
        m.extend(32u32.to_ne_bytes()); // the request's header
        m.extend(24u16.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m
    }

    #[test]
    fn error_replies_are_read_by_sequence_number() {
        let mut d = error_message(7, libc::EEXIST);
        d.extend(error_message(9, libc::ENOENT));
        assert_eq!(
            error_replies(&d),
            vec![(7, libc::EEXIST), (9, libc::ENOENT)]
        );
        assert!(error_replies(&d[..20]).is_empty(), "truncated");
        assert!(error_replies(&[]).is_empty());
    }
}
