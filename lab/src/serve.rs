//! The lab's servers: an `rsdn-lab serve-inner` process inside a pod's network namespace that
//! listens on TCP and UDP ports and answers every connection and every datagram with one line,
//! `<namespace>/<pod> <client address>`, so a probe learns who served it and which source
//! address reached the pod. `lab serve` keeps one running per pod (its pid file in the pods
//! directory); the matrix starts its own for the time it runs. `lab down` and pod deletion end
//! them.

use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::Lab;
use crate::netns;
use crate::objects::{PodRecord, Protocol};

/// How long a server may take to listen on all its ports.
pub const START_TIMEOUT: Duration = Duration::from_secs(3);
/// A client that sent data is given this long to finish before its connection is closed (so
/// closing never resets a connection whose data was not read, losing the answer).
const DRAIN: Duration = Duration::from_secs(1);

/// `rsdn-lab serve-inner`: serves until killed. Writes `ready` on stdout once every port is
/// bound (so the starter knows), then nothing more there.
pub fn run_inner(answer: &str, tcp: &[u16], udp: &[u16]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut listeners = Vec::new();
        for &p in tcp {
            let l = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, p))
                .await
                .with_context(|| format!("cannot listen on TCP port {p}"))?;
            listeners.push(l);
        }
        let mut sockets = Vec::new();
        for &p in udp {
            let s = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p))
                .await
                .with_context(|| format!("cannot bind UDP port {p}"))?;
            sockets.push(s);
        }
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "ready")?;
            out.flush()?;
        }
        let answer: Arc<str> = answer.into();
        let mut tasks = Vec::new();
        for l in listeners {
            let answer = Arc::clone(&answer);
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, peer)) = l.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    tokio::spawn(answer_tcp(stream, line(&answer, peer)));
                }
            }));
        }
        for s in sockets {
            let answer = Arc::clone(&answer);
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                loop {
                    let Ok((_, peer)) = s.recv_from(&mut buf).await else {
                        continue;
                    };
                    let _ = s.send_to(line(&answer, peer).as_bytes(), peer).await;
                }
            }));
        }
        futures::future::join_all(tasks).await;
        Ok(())
    })
}

fn line(answer: &str, peer: SocketAddr) -> String {
    format!("{answer} {}\n", peer.ip())
}

async fn answer_tcp(stream: tokio::net::TcpStream, text: String) {
    let mut rest = text.as_bytes();
    while !rest.is_empty() {
        if stream.writable().await.is_err() {
            return;
        }
        match stream.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
    // SAFETY: shutdown(2) on the stream's valid fd: no more data from us.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
    let deadline = tokio::time::Instant::now() + DRAIN;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Ok(Ok(())) => match stream.try_read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            },
            _ => return,
        }
    }
}

/// Starts a server in `netns` answering `answer` on `ports`; it has not necessarily bound its
/// ports yet (`wait_ready`). Its error output goes to `log`.
pub fn spawn(netns: &str, answer: &str, ports: &[(u16, Protocol)], log: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = netns::command(netns, crate::cluster::lab_exe()?)?;
    cmd.arg("serve-inner").arg("--answer").arg(answer);
    for (port, proto) in ports {
        cmd.arg(format!("--{}", proto.lower()))
            .arg(port.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0);
    cmd.spawn()
        .with_context(|| format!("cannot start a server in {netns}"))
}

/// Waits until every server said `ready`, at most `timeout` in all. On failure, names the
/// servers that did not (with `what` of each) and kills every one of them.
pub fn wait_ready(mut servers: Vec<(String, Child)>, timeout: Duration) -> Result<Vec<Child>> {
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, (_, child)) in servers.iter_mut().enumerate() {
        let out = child.stdout.take().expect("spawned with a piped stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut l = String::new();
            let ok = std::io::BufReader::new(out).read_line(&mut l).is_ok() && l.trim() == "ready";
            let _ = tx.send((i, ok));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut ready = vec![false; servers.len()];
    while ready.iter().any(|r| !r) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, ok)) => {
                if !ok {
                    break;
                }
                ready[i] = true;
            }
            Err(_) => break,
        }
    }
    if ready.iter().all(|r| *r) {
        return Ok(servers.into_iter().map(|(_, c)| c).collect());
    }
    let failed: Vec<String> = servers
        .iter()
        .zip(&ready)
        .filter(|(_, r)| !**r)
        .map(|((what, _), _)| what.clone())
        .collect();
    for (_, mut c) in servers {
        let _ = c.kill();
        let _ = c.wait();
    }
    bail!(
        "server(s) not listening within {timeout:?}: {}",
        failed.join("; ")
    )
}

fn pid_file(lab: &Lab, pod: &PodRecord) -> PathBuf {
    lab.pods_dir()
        .join(format!("{}.serve.pid", pod.pod_ref().file_stem()))
}

pub fn log_file(lab: &Lab, pod: &PodRecord) -> PathBuf {
    lab.pods_dir()
        .join(format!("{}.serve.log", pod.pod_ref().file_stem()))
}

/// The pid of the pod's server, if it runs.
pub fn running(lab: &Lab, pod: &PodRecord) -> Option<i32> {
    netns::running_pid(&pid_file(lab, pod))
}

/// Starts the pod's server on its declared ports unless it runs. Idempotent.
pub fn start(lab: &Lab, pod: &PodRecord) -> Result<i32> {
    if let Some(pid) = running(lab, pod) {
        return Ok(pid);
    }
    if pod.ports.is_empty() {
        bail!(
            "{} declares no ports to serve (lab pod add ... --port)",
            pod.pod_ref()
        );
    }
    let ports: Vec<(u16, Protocol)> = pod
        .ports
        .iter()
        .map(|p| (p.container_port, p.protocol))
        .collect();
    let log = log_file(lab, pod);
    let child = spawn(&pod.netns, &pod.answer(), &ports, &log)?;
    let what = format!("{} (see {})", pod.pod_ref(), log.display());
    let mut started = wait_ready(vec![(what, child)], START_TIMEOUT)?;
    let pid = started.pop().expect("one server").id() as i32;
    std::fs::write(pid_file(lab, pod), pid.to_string())?;
    Ok(pid)
}

/// Stops the pod's server, if it runs.
pub fn stop(lab: &Lab, pod: &PodRecord) {
    if let Some(pid) = running(lab, pod) {
        netns::terminate(&[pid], Duration::from_secs(2));
    }
    let _ = std::fs::remove_file(pid_file(lab, pod));
}
