//! Entering a network namespace on the current thread, and coming back.
//!
//! `setns` moves only the calling thread. Callers keep namespace work on one dedicated thread
//! (the plugin is single-threaded; the daemon uses a thread per namespace), and sockets opened
//! while inside stay bound to that namespace after the guard returns the thread home.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// The calling thread's current network namespace.
pub fn current() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

/// Moves the calling thread into `ns` until the guard is dropped.
pub struct NetnsGuard {
    home: File,
}

impl NetnsGuard {
    pub fn enter(ns: &File) -> io::Result<NetnsGuard> {
        let home = current()?;
        setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(NetnsGuard { home })
    }

    pub fn enter_path(path: &Path) -> io::Result<NetnsGuard> {
        NetnsGuard::enter(&File::open(path)?)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.home, CloneFlags::CLONE_NEWNET) {
            // Carrying on in the wrong namespace would program the wrong kernel state.
            eprintln!("fatal: cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}
