//! Named network namespaces (/run/netns), as the lab uses them: made and removed with `ip`,
//! commands and threads run inside them, and the processes that live in them. `setns` changes
//! only the calling thread, so namespace work runs in a forked child before exec or on a
//! thread of its own, never on a thread that does anything else.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Runs `ip ARGS`, with its error output in the error.
pub fn ip(args: &[&str]) -> Result<()> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// `ip -j ARGS`, parsed.
pub fn ip_json(args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let out = ip_output(&all)?;
    if out.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out).with_context(|| format!("ip {}: not JSON", all.join(" ")))
}

/// Makes the namespace (loopback up) unless it exists; true when it was made.
pub fn ensure(name: &str) -> Result<bool> {
    if exists(name) {
        return Ok(false);
    }
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(true)
}

/// Removes the namespace; one that is already gone is fine.
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// Every named namespace.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A command that will run inside the namespace `ns`.
pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let file = File::open(path(ns)).with_context(|| format!("no namespace {ns}"))?;
    let mut cmd = Command::new(program);
    // SAFETY: only setns (async-signal-safe) between fork and exec; the fd outlives the spawn
    // because the closure owns the File.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs `f` on a new thread that has entered the namespace `ns` (and ends with `f`). Sockets
/// `f` makes stay in `ns` wherever they are used afterwards.
pub fn on_thread<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let p = path(ns);
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let file = File::open(&p).with_context(|| format!("no namespace {ns}"))?;
        // SAFETY: setns on this thread only; the fd is valid for the call.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("cannot enter {ns}"));
        }
        Ok(f())
    })
}

/// The namespace's identity (its nsfs inode), as /proc/PID/ns/net shows it.
pub fn inode(name: &str) -> Option<u64> {
    std::fs::metadata(path(name)).ok().map(|m| m.ino())
}

/// Every process (but this one) whose network namespace is one of `inodes`.
pub fn processes_in(inodes: &HashSet<u64>) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid: i32 = p.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(p.path().join("ns/net")).ok()?;
            // "net:[4026532281]"
            let ino: u64 = link
                .to_str()?
                .strip_prefix("net:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            (pid != me && inodes.contains(&ino)).then_some(pid)
        })
        .collect()
}

/// Running, and not a zombie: a process whose parent is gone may linger unreaped, and
/// kill(pid, 0) succeeds on zombies.
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}

/// SIGTERM to `pids`, then SIGKILL to those still running after `grace`.
pub fn terminate(pids: &[i32], grace: std::time::Duration) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while pids.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
}

/// A pid from a pid file, if the process still runs.
pub fn running_pid(pid_file: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| alive(*p))
}
