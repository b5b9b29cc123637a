//! Entering a network namespace on the current thread, and coming back.
//!
//! `setns` moves only the calling thread. Callers keep namespace work on one dedicated thread
//! (the plugin is single-threaded; the daemon uses a thread per namespace), and sockets opened
//! while inside stay bound to that namespace after the guard returns the thread home.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// Why a path given as a network namespace cannot be used as one.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The path exists but is something else; says what ("a regular file").
    #[error("{0}, not a network namespace")]
    NotNetns(String),
}

/// Opens the network namespace at `path` (`/proc/PID/ns/net`, or a bind mount of one such as
/// `/run/netns/NAME`) after making sure that is what it is. The path is first opened `O_PATH`,
/// which opens nothing for real: a FIFO named by mistake would block a reading open, and a
/// device could act on it.
pub fn open(path: &Path) -> Result<File, OpenError> {
    let probe = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)?;
    if fstatfs(&probe).map_err(io::Error::from)?.filesystem_type() != NSFS_MAGIC {
        let what = describe(&probe.metadata()?.file_type());
        return Err(OpenError::NotNetns(what.to_string()));
    }
    // The very inode just checked, opened for real: setns refuses O_PATH descriptors.
    let ns = File::open(format!("/proc/self/fd/{}", probe.as_raw_fd()))?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor's namespace.
    let kind = unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_NSTYPE) };
    // Kernels before 4.11 do not know the ioctl (ENOTTY); setns will then be the judge.
    if kind >= 0 && kind != libc::CLONE_NEWNET {
        return Err(OpenError::NotNetns(format!(
            "a {} namespace",
            kind_name(kind)
        )));
    }
    Ok(ns)
}

fn describe(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a file of another kind"
    }
}

fn kind_name(kind: libc::c_int) -> &'static str {
    match kind {
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWUTS => "uts",
        libc::CLONE_NEWIPC => "ipc",
        libc::CLONE_NEWUSER => "user",
        libc::CLONE_NEWPID => "pid",
        libc::CLONE_NEWCGROUP => "cgroup",
        libc::CLONE_NEWTIME => "time",
        _ => "non-network",
    }
}

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
