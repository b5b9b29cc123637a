//! The daemon's HTTP listeners (`rsdn::http::spawn_server`, behind :10256, :10249 and the
//! health check node ports) under hostile clients, on 127.0.0.1 port 0 in this process (no
//! privileges): a flood of idle connections holds at most the cap of the server's descriptors
//! and does not keep a probe from being answered; idle keep-alive connections, request heads sent too slowly
//! and connections kept busy for too long are all closed by the server.
//!
//! The server's descriptors are told from the test's own client sockets by their local port.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockname, SockaddrIn};
use rsdn::health::Health;
use rsdn::http::{health_route, spawn_server, Limits, ProbeMetrics, MAX_CONNECTIONS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Connections above the cap the server may hold for a moment: evicted ones whose task has
/// not been dropped yet.
const SLACK: usize = 8;

/// Sockets of this process whose local port is `port`: the server's listener and connections.
fn server_fds(port: u16) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| {
            // Anything but an IPv4 socket (or a descriptor closed meanwhile) fails: not counted.
            getsockname::<SockaddrIn>(fd).is_ok_and(|a| a.port() == port)
        })
        .count()
}

/// The flood holds a thousand client sockets in this process as well: lift a low soft limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on this process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(8192).max(lim.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// The daemon's own endpoint with these limits; returns its port, its health and its task.
async fn daemon_endpoint(limits: Limits) -> (u16, Arc<Health>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let health = Arc::new(Health::new(Duration::from_secs(5)));
    let (h, probes) = (health.clone(), ProbeMetrics::default());
    let task = spawn_server(listener, limits, move |path| {
        health_route(path, &h, &probes)
    });
    (port, health, task)
}

fn limits(header_timeout_ms: u64, max_lifetime_ms: u64) -> Limits {
    Limits {
        max_connections: MAX_CONNECTIONS,
        header_timeout: Duration::from_millis(header_timeout_ms),
        max_lifetime: Duration::from_millis(max_lifetime_ms),
    }
}

/// Sends one HTTP/1.1 request (keep-alive) and reads its response: the status code, or None if
/// the connection failed or closed first.
async fn request(s: &mut TcpStream, path: &str) -> Option<u16> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..end].lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")?
                .trim()
                .parse()
                .ok()
        })?;
        if buf.len() >= end + 4 + length {
            return text.get(9..12)?.parse().ok();
        }
    }
}

/// A fresh connection's answer to `GET path`, or None within 2 s.
async fn probe(port: u16, path: &str) -> Option<u16> {
    let ask = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        request(&mut s, path).await
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

/// How long until the server closes `s` (EOF or reset), reading whatever comes; None if it is
/// still open after `within`.
async fn closed_after(s: &mut (impl AsyncRead + Unpin), within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let wait = async {
        let mut chunk = [0u8; 1024];
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .ok()
        .map(|()| start.elapsed())
}

/// The daemon runs its servers on a current-thread runtime; several threads race the slots.
#[tokio::test]
async fn a_flood_of_idle_connections_holds_at_most_the_cap_and_probes_still_answer() {
    flood_then_probe().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_on_a_multi_thread_runtime() {
    flood_then_probe().await;
}

async fn flood_then_probe() {
    raise_fd_limit();
    let (port, health, _task) = daemon_endpoint(limits(3000, 60_000)).await;
    assert_eq!(server_fds(port), 1, "the listener");
    let bound = MAX_CONNECTIONS + 1 + SLACK;

    let mut flood = Vec::new();
    let mut most = 0;
    for i in 0..1000 {
        flood.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            most = most.max(server_fds(port));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = server_fds(port);
    assert!(
        most <= bound && held <= bound,
        "the server held {held} sockets (at most {most} during the flood) for 1000 idle \
         connections; the cap is {MAX_CONNECTIONS}"
    );
    // On a slow machine the flood's first connections may have reached the idle timeout
    // already: top the cap up, so the probes below meet a full one.
    for _ in 0..3 {
        let held = server_fds(port);
        for _ in held..=MAX_CONNECTIONS {
            flood.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = server_fds(port);
    assert!(
        (MAX_CONNECTIONS + 1..=bound).contains(&held),
        "the cap should be full: {held}"
    );

    // With the cap full of idle connections, probes are still answered, and correctly.
    assert_eq!(probe(port, "/healthz").await, Some(503), "not healthy yet");
    health.source_ready();
    health.overlay_passed(
        rsdn::health::OverlayPass {
            ready: true,
            ..Default::default()
        },
        std::time::Instant::now(),
    );
    health.iptables_synced();
    assert_eq!(probe(port, "/healthz").await, Some(200));
    assert_eq!(probe(port, "/readyz").await, Some(200));

    // The flood's connections that were still held go at the idle timeout, every one.
    let mut last = flood.pop().unwrap();
    assert!(closed_after(&mut last, Duration::from_secs(5))
        .await
        .is_some());
    let all_closed = async {
        for s in &mut flood {
            closed_after(s, Duration::from_secs(5)).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(6), all_closed)
        .await
        .expect("flood connections still open after the idle timeout");
    assert_eq!(server_fds(port), 1, "only the listener is left");
    assert_eq!(probe(port, "/healthz").await, Some(200));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let (port, _health, _task) = daemon_endpoint(limits(1000, 60_000)).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // Keep-alive works: the same connection answers again while the client keeps talking.
    for _ in 0..3 {
        assert_eq!(request(&mut s, "/healthz").await, Some(503));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let quiet = closed_after(&mut s, Duration::from_secs(4))
        .await
        .expect("idle keep-alive connection never closed");
    // 600 ms of the 1 s were already spent idle before the wait began; generous for a busy
    // machine.
    assert!(
        quiet < Duration::from_millis(2000),
        "closed only after {quiet:?}"
    );
    assert_eq!(server_fds(port), 1);
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_is_dropped_after_the_header_timeout() {
    let (port, _health, _task) = daemon_endpoint(limits(1000, 60_000)).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    // Slowloris: a header byte every 100 ms never completes the head, and must not keep the
    // connection alive.
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        while wr.write_all(b"X").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let closed = closed_after(&mut rd, Duration::from_secs(4)).await;
    trickle.abort();
    let took = start.elapsed();
    assert!(closed.is_some(), "half-sent head still held after {took:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "closed after {took:?}, the header timeout is 1 s"
    );
    assert_eq!(server_fds(port), 1);
}

#[tokio::test]
async fn a_busy_connection_is_closed_at_its_lifetime_between_requests() {
    let (port, _health, _task) = daemon_endpoint(limits(1000, 1500)).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let start = Instant::now();
    let mut answered = 0;
    // A request every 100 ms: never idle, yet not held past its lifetime.
    while start.elapsed() < Duration::from_secs(4) {
        match request(&mut s, "/healthz").await {
            Some(code) => {
                assert_eq!(code, 503);
                answered += 1;
            }
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(3000),
        "closed after {took:?} and {answered} answers; the lifetime is 1.5 s"
    );
    assert!(answered >= 10, "{answered}");
}

#[tokio::test]
async fn closing_the_server_closes_its_kept_alive_connections() {
    let (port, _health, task) = daemon_endpoint(limits(5000, 60_000)).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(request(&mut s, "/healthz").await, Some(503));
    // What HealthCheckServers does when a Service goes or moves to another port.
    task.abort();
    let took = closed_after(&mut s, Duration::from_secs(2)).await;
    assert!(
        took.is_some(),
        "a kept-alive connection outlived its server"
    );
    assert_eq!(server_fds(port), 0);
}
