//! ICMP echo to many addresses at once, over one raw socket (CAP_NET_RAW, which the DaemonSet's
//! container has): each address is asked twice within the timeout, and the first reply counts.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request.
pub fn echo(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"rsdn doctor");
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// The (id, seq) of an echo reply in a raw IPv4 packet, and its source.
pub fn parse_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let src = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(ihl..)?;
    if icmp.len() < 8 || icmp[0] != 0 {
        return None;
    }
    Some((
        src,
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

/// Pings every target; returns the round trip of those that answered within `timeout`.
pub fn ping_all(
    targets: &[Ipv4Addr],
    timeout: Duration,
) -> io::Result<BTreeMap<Ipv4Addr, Duration>> {
    // SAFETY: a new raw socket, owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is valid and ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = (std::process::id() & 0xffff) as u16;
    let start = Instant::now();
    let mut sent: BTreeMap<u16, (Ipv4Addr, Instant)> = BTreeMap::new();
    let mut answered = BTreeMap::new();
    let send = |seq: u16, ip: Ipv4Addr| {
        let pkt = echo(id, seq);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: pkt and addr outlive the call; the length is addr's.
        unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
    };
    let mut round = 0u16;
    let mut next_round = start;
    let mut buf = [0u8; 1500];
    while start.elapsed() < timeout && answered.len() < targets.len() {
        if Instant::now() >= next_round && round < 2 {
            for (i, ip) in targets.iter().enumerate() {
                if !answered.contains_key(ip) {
                    let seq = round * 1000 + i as u16;
                    send(seq, *ip);
                    sent.insert(seq, (*ip, Instant::now()));
                }
            }
            round += 1;
            next_round = start + timeout / 2;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        unsafe { libc::poll(&mut pfd, 1, 20) };
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            if let Some((src, rid, seq)) = parse_reply(&buf[..n as usize]) {
                if let Some((ip, at)) = sent.get(&seq).filter(|_| rid == id) {
                    if *ip == src {
                        answered.entry(*ip).or_insert_with(|| at.elapsed());
                    }
                }
            }
        }
    }
    Ok(answered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum_and_replies_parse() {
        let e = echo(0x1234, 7);
        assert_eq!(checksum(&e), 0);
        let mut reply = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 128, 2, 0, 10, 128, 0, 1,
        ];
        let mut icmp = e.clone();
        icmp[0] = 0;
        reply.extend(icmp);
        assert_eq!(
            parse_reply(&reply),
            Some(("10.128.2.0".parse().unwrap(), 0x1234, 7))
        );
        assert_eq!(parse_reply(&reply[..22]), None);
    }
}
