//! Test fixtures shared by the rsdn crates: throw-away network namespaces, a node with the
//! bridge the daemon would create, and the real `rsdn-cni` binary called inside the node
//! namespace exactly as a runtime calls it.
//!
//! Only a dev-dependency. It depends on no rsdn crate, since they all dev-depend on it.

mod cni;
mod netns;

use std::process::Command;

pub use cni::{invoke_in, plugin, run_with_stdin, Invocation, Node};
pub use netns::{in_netns, Netns};

/// Kernel tests need root. On a laptop they skip with a reason; in CI (`CI` set) a skip would
/// hide a broken tier, so they fail instead.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root, and CI must run it");
    }
    eprintln!("SKIP {test}: needs root (network namespaces)");
    false
}

/// Returns from the calling test unless it may run as root (see [`root_or_skip`]).
#[macro_export]
macro_rules! need_root {
    () => {
        if !$crate::root_or_skip(module_path!()) {
            return;
        }
    };
}

/// Polls `cond` every 10 ms for up to `secs` seconds.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Runs a command, which must succeed; returns its stdout.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}
