//! Probes: does traffic from one network namespace to an address get through? TCP (the
//! handshake completes), UDP (an answer comes back; an ICMP port unreachable ends it at once)
//! and ping (an ICMP echo reply comes back). Many run at once, each bounded by one timeout.
//!
//! Each probe's socket is made on a thread that entered its source namespace (a socket stays in
//! the namespace it was made in), then every probe runs on one current-thread runtime: no
//! process per probe, and N probes take about one timeout, not N.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpSocket;
use tokio::time::{timeout_at, Instant};

use crate::netns;
use crate::objects::Protocol;

/// UDP datagrams and echo requests are sent again this often until an answer or the timeout.
const RESEND: Duration = Duration::from_millis(200);
/// After a TCP connection is made, how long its answer is waited for at least.
const ANSWER_GRACE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Ping,
    Port(u16, Protocol),
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Ping => f.write_str("ping"),
            Kind::Port(p, proto) => write!(f, "{p}/{proto}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Probe {
    /// The source network namespace.
    pub from: String,
    pub to: Ipv4Addr,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub connected: bool,
    /// What the server said (the lab's servers answer `<namespace>/<pod> <client address>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Why not connected: `timeout`, `refused`, `no answer`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub millis: u64,
}

enum Socket {
    Tcp(TcpSocket),
    Udp(UdpSocket),
    Icmp(OwnedFd),
}

fn open(kind: Kind) -> io::Result<Socket> {
    match kind {
        Kind::Port(_, Protocol::Tcp) => TcpSocket::new_v4().map(Socket::Tcp),
        Kind::Port(_, Protocol::Udp) => {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_nonblocking(true)?;
            Ok(Socket::Udp(s))
        }
        Kind::Ping => {
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_ICMP,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a new, valid descriptor nobody else owns.
            Ok(Socket::Icmp(unsafe { OwnedFd::from_raw_fd(fd) }))
        }
    }
}

/// Lets this process hold a socket per probe: the soft limit on open files up to the hard one.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs every probe at once; each gets `timeout`. Outcomes in the order of `probes`.
pub fn run(probes: &[Probe], timeout: Duration) -> Vec<Outcome> {
    raise_open_files_limit();
    let mut by_source: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in probes.iter().enumerate() {
        by_source.entry(p.from.as_str()).or_default().push(i);
    }
    let mut sockets: Vec<Option<Result<Socket, String>>> = probes.iter().map(|_| None).collect();
    let threads: Vec<_> = by_source
        .into_iter()
        .map(|(ns, idx)| {
            let kinds: Vec<(usize, Kind)> = idx.iter().map(|&i| (i, probes[i].kind)).collect();
            let handle = netns::on_thread(ns, move || {
                kinds
                    .into_iter()
                    .map(|(i, k)| (i, open(k).map_err(|e| e.to_string())))
                    .collect::<Vec<_>>()
            });
            (idx, handle)
        })
        .collect();
    for (idx, handle) in threads {
        match handle.join() {
            Ok(Ok(made)) => {
                for (i, s) in made {
                    sockets[i] = Some(s);
                }
            }
            Ok(Err(e)) => {
                for i in idx {
                    sockets[i] = Some(Err(format!("{e:#}")));
                }
            }
            Err(_) => {
                for i in idx {
                    sockets[i] = Some(Err("socket thread panicked".into()));
                }
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    rt.block_on(async {
        let start = Instant::now();
        let deadline = start + timeout;
        let all = sockets
            .into_iter()
            .zip(probes)
            .enumerate()
            .map(|(i, (s, p))| async move {
                let r = match s.expect("every probe has a socket or an error") {
                    Err(e) => Err(e),
                    Ok(Socket::Tcp(s)) => tcp(s, SocketAddrV4::new(p.to, port(p)), deadline).await,
                    Ok(Socket::Udp(s)) => udp(s, SocketAddrV4::new(p.to, port(p)), deadline).await,
                    Ok(Socket::Icmp(fd)) => ping(fd, p.to, i as u16, deadline).await,
                };
                let millis = start.elapsed().as_millis() as u64;
                match r {
                    Ok(answer) => Outcome {
                        connected: true,
                        answer,
                        error: None,
                        millis,
                    },
                    Err(e) => Outcome {
                        connected: false,
                        answer: None,
                        error: Some(e),
                        millis,
                    },
                }
            });
        futures::future::join_all(all).await
    })
}

fn port(p: &Probe) -> u16 {
    match p.kind {
        Kind::Port(port, _) => port,
        Kind::Ping => 0,
    }
}

/// A short word for why a connection failed.
fn why(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::EHOSTUNREACH) => "host unreachable".into(),
        Some(libc::ENETUNREACH) => "network unreachable".into(),
        // What a local firewall's DROP or REJECT of our own output looks like.
        Some(libc::EPERM) => "not permitted (a firewall rule in the source namespace?)".into(),
        _ => e.to_string(),
    }
}

fn text(buf: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(buf).trim().to_string();
    (!s.is_empty()).then_some(s)
}

async fn tcp(
    sock: TcpSocket,
    to: SocketAddrV4,
    deadline: Instant,
) -> Result<Option<String>, String> {
    let stream = match timeout_at(deadline, sock.connect(to.into())).await {
        Err(_) => return Err("timeout".into()),
        Ok(Err(e)) => return Err(why(&e)),
        Ok(Ok(s)) => s,
    };
    // Connected: that is the verdict. The answer says who served, if it comes in time.
    let mut buf = [0u8; 256];
    let mut len = 0;
    let until = deadline.max(Instant::now() + ANSWER_GRACE);
    while len < buf.len() && !buf[..len].contains(&b'\n') {
        if timeout_at(until, stream.readable()).await.is_err() {
            break;
        }
        match stream.try_read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        }
    }
    Ok(text(&buf[..len]))
}

async fn udp(
    sock: UdpSocket,
    to: SocketAddrV4,
    deadline: Instant,
) -> Result<Option<String>, String> {
    let sock = tokio::net::UdpSocket::from_std(sock).map_err(|e| e.to_string())?;
    sock.connect(to).await.map_err(|e| why(&e))?;
    let mut buf = [0u8; 512];
    loop {
        if let Err(e) = sock.send(b"rsdn-lab probe\n").await {
            return Err(why(&e));
        }
        let until = deadline.min(Instant::now() + RESEND);
        match timeout_at(until, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => return Ok(text(&buf[..n])),
            Ok(Err(e)) => return Err(why(&e)),
            Err(_) if Instant::now() >= deadline => return Err("no answer".into()),
            Err(_) => {}
        }
    }
}

async fn ping(
    fd: OwnedFd,
    to: Ipv4Addr,
    id: u16,
    deadline: Instant,
) -> Result<Option<String>, String> {
    // A connected raw socket gets only packets from `to`.
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect(2) with a valid sockaddr_in and its size.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(why(&io::Error::last_os_error()));
    }
    // SAFETY: an OwnedFd is a valid, open descriptor that stays the same until it is dropped
    // with the AsyncFd.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    for seq in 1u16.. {
        let request = icmp::echo_request(id, seq);
        // SAFETY: send(2) of a live buffer on a valid fd.
        let sent = unsafe {
            libc::send(
                fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(why(&e));
            }
        }
        let until = deadline.min(Instant::now() + RESEND);
        loop {
            let Ok(ready) = timeout_at(until, fd.readable()).await else {
                break;
            };
            let mut guard = ready.map_err(|e| e.to_string())?;
            // SAFETY: recv(2) into a live buffer of the given size.
            let got = guard.try_io(|fd| {
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match got {
                Ok(Ok(n)) if icmp::echo_reply_id(&buf[..n]) == Some(id) => return Ok(None),
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => return Err(why(&e)),
            }
        }
        if Instant::now() >= deadline {
            return Err("no reply".into());
        }
    }
    Err("no reply".into())
}

/// ICMP echo, as data.
pub mod icmp {
    /// The Internet checksum (RFC 1071).
    pub fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An echo request (type 8) with `id`, `seq` and an 8-byte payload.
    pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
        let mut p = [0u8; 16];
        p[0] = 8;
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6..8].copy_from_slice(&seq.to_be_bytes());
        p[8..].copy_from_slice(b"rsdn-lab");
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// The id of an echo reply (type 0), from an IPv4 packet as a raw socket receives it.
    pub fn echo_reply_id(packet: &[u8]) -> Option<u16> {
        let ihl = usize::from(packet.first()? & 0x0f) * 4;
        if packet.first()? >> 4 != 4 || ihl < 20 {
            return None;
        }
        let m = packet.get(ihl..ihl + 8)?;
        (m[0] == 0 && m[1] == 0).then(|| u16::from_be_bytes([m[4], m[5]]))
    }
}

#[cfg(test)]
mod tests {
    use super::icmp::*;

    #[test]
    fn echo_request_checksums_to_zero() {
        let p = echo_request(0x1234, 7);
        assert_eq!(p[0], 8);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        // RFC 1071's example.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        assert_eq!(checksum(&[0xff]), !0xff00u16);
    }

    fn ipv4(ihl_words: u8, icmp: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; usize::from(ihl_words) * 4];
        p[0] = 0x40 | ihl_words;
        p.extend_from_slice(icmp);
        p
    }

    #[test]
    fn echo_replies_are_recognised_after_any_header_length() {
        let mut reply = echo_request(42, 1);
        reply[0] = 0;
        assert_eq!(echo_reply_id(&ipv4(5, &reply)), Some(42));
        assert_eq!(echo_reply_id(&ipv4(6, &reply)), Some(42));
        // The request itself (seen on loopback), an unreachable, truncated or non-IPv4 packets.
        assert_eq!(echo_reply_id(&ipv4(5, &echo_request(42, 1))), None);
        let mut unreachable = reply;
        unreachable[0] = 3;
        assert_eq!(echo_reply_id(&ipv4(5, &unreachable)), None);
        assert_eq!(echo_reply_id(&ipv4(5, &reply[..6])), None);
        let mut v6 = ipv4(5, &reply);
        v6[0] = 0x65;
        assert_eq!(echo_reply_id(&v6), None);
        assert_eq!(echo_reply_id(&[]), None);
    }
}
