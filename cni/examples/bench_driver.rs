//! Benchmark driver for hack/bench-cni.sh: times ADD then DEL of N pods for two plugin
//! configurations, sequentially and with a fixed number of concurrent callers, spawning the
//! plugins exactly as a runtime does (fork+exec, config on stdin, CNI_* in the environment,
//! inside the node namespace). Prints p50 / p99 per operation and the ratio of medians.
//!
//! usage: bench_driver NODE_NETNS POD_NETNS_PREFIX N PARALLEL NAME=PLUGIN_BIN:CONF_FILE:CNI_PATH ...

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Plugin {
    name: String,
    bin: String,
    conf: Vec<u8>,
    cni_path: String,
}

fn call(p: &Plugin, node: &File, command: &str, pod_ns: &str, id: &str) -> Duration {
    let mut cmd = Command::new(&p.bin);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", pod_ns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &p.cni_path)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let fd = node.as_raw_fd();
    // SAFETY: only setns (async-signal-safe) runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn plugin");
    child.stdin.take().unwrap().write_all(&p.conf).unwrap();
    let out = child.wait_with_output().unwrap();
    let took = start.elapsed();
    if !out.status.success() {
        panic!(
            "{} {command} {id} failed: {}{}",
            p.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    took
}

/// Runs `command` for pods 0..n with `parallel` callers; returns each call's duration.
fn run(
    p: &Plugin,
    node: &File,
    prefix: &str,
    n: usize,
    parallel: usize,
    command: &str,
) -> Vec<Duration> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                s.spawn(|| {
                    let mut times = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= n {
                            break times;
                        }
                        let ns = format!("/run/netns/{prefix}{i}");
                        times.push(call(p, node, command, &ns, &format!("bench{i}")));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let idx = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx].as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!(
            "usage: {} NODE_NETNS POD_PREFIX N PARALLEL NAME=BIN:CONF:CNI_PATH...",
            args[0]
        );
        std::process::exit(2);
    }
    let node = File::open(&args[1]).expect("node netns");
    let prefix = &args[2];
    let n: usize = args[3].parse().expect("N");
    let parallel: usize = args[4].parse().expect("PARALLEL");
    let plugins: Vec<Plugin> = args[5..]
        .iter()
        .map(|spec| {
            let (name, rest) = spec.split_once('=').expect("NAME=BIN:CONF:CNI_PATH");
            let parts: Vec<&str> = rest.splitn(3, ':').collect();
            Plugin {
                name: name.to_string(),
                bin: parts[0].to_string(),
                conf: std::fs::read(parts[1]).expect("conf file"),
                cni_path: parts[2].to_string(),
            }
        })
        .collect();

    println!("{n} pods, {parallel} concurrent caller(s); milliseconds per operation (wall time of the plugin process)");
    println!(
        "{:<22} {:<4} {:>9} {:>9} {:>12}",
        "plugin", "op", "p50", "p99", "total (s)"
    );
    let mut medians = Vec::new();
    for p in &plugins {
        // One warm-up pod so page cache and binary loading do not land on the first sample.
        run(p, &node, prefix, 1, 1, "ADD");
        run(p, &node, prefix, 1, 1, "DEL");
        for op in ["ADD", "DEL"] {
            let start = Instant::now();
            let mut times = run(p, &node, prefix, n, parallel, op);
            let total = start.elapsed().as_secs_f64();
            times.sort();
            let (p50, p99) = (percentile(&times, 0.50), percentile(&times, 0.99));
            println!(
                "{:<22} {:<4} {:>9.2} {:>9.2} {:>12.2}",
                p.name, op, p50, p99, total
            );
            medians.push((p.name.clone(), op, p50));
        }
    }
    if plugins.len() == 2 {
        for op in ["ADD", "DEL"] {
            let m: Vec<f64> = medians
                .iter()
                .filter(|(_, o, _)| *o == op)
                .map(|(_, _, v)| *v)
                .collect();
            println!(
                "ratio {op} p50 {} / {}: {:.3}",
                plugins[0].name,
                plugins[1].name,
                m[0] / m[1]
            );
        }
    }
}
