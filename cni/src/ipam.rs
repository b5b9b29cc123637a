//! Host-local compatible address store: one file per allocated IPv4 address under
//! `<dataDir>/<network>/`, holding `<container id>\r\n<ifname>`, a `last_reserved_ip.0` file for
//! round-robin allocation, and an flock on `<dir>/lock` around every read-modify-write. Files
//! written by the reference host-local plugin are read (and released) the same way.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::config::{Attachment, PodNetwork};
use crate::error::{io_error, CniError, Code, Result};

/// host-local's separator between container id and ifname in an allocation file.
const LINE_BREAK: &str = "\r\n";
/// host-local names the round-robin cursor per range set; we have one range set.
const LAST_RESERVED: &str = "last_reserved_ip.0";
const LOCK: &str = "lock";

/// Who holds an address. Files from host-local before 0.8 hold only the container id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub container_id: String,
    pub ifname: Option<String>,
}

impl Owner {
    fn parse(content: &str) -> Owner {
        match content.trim().split_once(LINE_BREAK) {
            Some((id, ifname)) => Owner {
                container_id: id.trim().to_string(),
                ifname: Some(ifname.trim().to_string()),
            },
            None => Owner {
                container_id: content.trim().to_string(),
                ifname: None,
            },
        }
    }

    /// An id-only (legacy) record matches every interface of its container.
    fn matches(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname.as_deref().is_none_or(|i| i == ifname)
    }
}

/// One allocated address and its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub owner: Owner,
}

/// The addresses a node subnet can hand out: every host address except the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    first: u32,
    last: u32,
    gateway: u32,
}

impl Pool {
    pub fn new(net: &PodNetwork) -> Pool {
        Pool {
            first: u32::from(net.subnet.network()) + 1,
            last: u32::from(net.subnet.broadcast()) - 1,
            gateway: u32::from(net.gateway),
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        (self.first..=self.last).contains(&ip) && ip != self.gateway
    }

    /// How many addresses the pool can hand out.
    pub fn capacity(&self) -> u32 {
        self.last - self.first + 1 - u32::from((self.first..=self.last).contains(&self.gateway))
    }

    /// Every address of the pool once, starting right after `last` (round-robin), or at the
    /// start of the pool when `last` is unknown or outside it.
    fn candidates_after(&self, last: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let size = self.last - self.first + 1;
        let start = match last.map(u32::from) {
            Some(l) if (self.first..=self.last).contains(&l) => l - self.first + 1,
            _ => 0,
        };
        (0..size)
            .map(move |i| self.first + (start + i) % size)
            .filter(move |ip| *ip != self.gateway)
            .map(Ipv4Addr::from)
    }
}

/// The store of one network, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Creates the directory if needed and takes the exclusive lock, waiting for other
    /// plugin invocations on this node to finish with it.
    pub fn open(dir: &Path) -> Result<Store> {
        fs::create_dir_all(dir).map_err(|e| {
            io_error(
                format_args!("cannot create IPAM directory {}", dir.display()),
                e,
            )
        })?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_error(format_args!("cannot open {}", lock_path.display()), e))?;
        // SAFETY: flock on a descriptor we own; it is released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_error(
                format_args!("cannot lock {}", lock_path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn path_of(&self, ip: Ipv4Addr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    /// The allocated addresses: names of the files that are IPv4 addresses, one directory
    /// read, no file contents.
    fn allocated_ips(&self) -> Result<Vec<Ipv4Addr>> {
        let list_error = |e| io_error(format_args!("cannot list {}", self.dir.display()), e);
        let mut ips = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(list_error)? {
            if let Some(ip) = entry
                .map_err(list_error)?
                .file_name()
                .to_str()
                .and_then(|n| n.parse().ok())
            {
                ips.push(ip);
            }
        }
        ips.sort();
        Ok(ips)
    }

    /// Every allocation in the store, with its holder.
    pub fn allocations(&self) -> Result<Vec<Allocation>> {
        self.allocated_ips()?
            .into_iter()
            .map(|ip| {
                // We hold the lock, so a file listed a moment ago is still there: a read error
                // is a real I/O problem.
                let path = self.path_of(ip);
                let content = fs::read_to_string(&path)
                    .map_err(|e| io_error(format_args!("cannot read {}", path.display()), e))?;
                Ok(Allocation {
                    ip,
                    owner: Owner::parse(&content),
                })
            })
            .collect()
    }

    /// The address held by this attachment, if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>> {
        Ok(self
            .allocations()?
            .into_iter()
            .find(|a| a.owner.matches(container_id, ifname))
            .map(|a| a.ip))
    }

    /// Allocates the next free address after the last reserved one. Costs one directory read
    /// whatever the number of pods: the spec forbids a second ADD of the same attachment
    /// without a DEL, so holders are not looked up here (host-local reads every file).
    pub fn allocate(&self, pool: &Pool, container_id: &str, ifname: &str) -> Result<Ipv4Addr> {
        let used: HashSet<Ipv4Addr> = self.allocated_ips()?.into_iter().collect();
        let last = fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let ip = pool
            .candidates_after(last)
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| {
                CniError::new(
                    Code::AddressesExhausted,
                    format!(
                        "no free address left in the node subnet: all {} addresses are allocated",
                        pool.capacity()
                    ),
                )
                .with_details(format!("allocations are files in {}", self.dir.display()))
            })?;
        let path = self.path_of(ip);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error(format_args!("cannot create {}", path.display()), e))?;
        if let Err(e) = f.write_all(format!("{container_id}{LINE_BREAK}{ifname}").as_bytes()) {
            let _ = fs::remove_file(&path);
            return Err(io_error(format_args!("cannot write {}", path.display()), e));
        }
        fs::write(self.dir.join(LAST_RESERVED), ip.to_string())
            .map_err(|e| io_error(format_args!("cannot write {LAST_RESERVED}"), e))?;
        Ok(ip)
    }

    /// Releases `ip` if this attachment holds it; says whether it did. The fast path of DEL
    /// (the runtime passes the address in prevResult) and of ADD's rollback.
    pub fn release_ip(&self, ip: Ipv4Addr, container_id: &str, ifname: &str) -> Result<bool> {
        let path = self.path_of(ip);
        let content = match fs::read_to_string(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error(format_args!("cannot read {}", path.display()), e)),
        };
        if !Owner::parse(&content).matches(container_id, ifname) {
            return Ok(false);
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(format_args!("cannot release {ip}"), e)),
        }
    }

    /// Releases every address of this attachment; releasing nothing is not an error.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<Ipv4Addr>> {
        self.release_where(|owner| owner.matches(container_id, ifname))
    }

    /// GC: releases every address whose holder is not among `valid`.
    pub fn release_all_but(&self, valid: &[Attachment]) -> Result<Vec<Ipv4Addr>> {
        self.release_where(|owner| {
            !valid
                .iter()
                .any(|v| owner.matches(&v.container_id, &v.ifname))
        })
    }

    fn release_where(&self, doomed: impl Fn(&Owner) -> bool) -> Result<Vec<Ipv4Addr>> {
        let mut released = Vec::new();
        for a in self.allocations()? {
            if doomed(&a.owner) {
                match fs::remove_file(self.path_of(a.ip)) {
                    Ok(()) => released.push(a.ip),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(format_args!("cannot release {}", a.ip), e)),
                }
            }
        }
        Ok(released)
    }
}

/// The allocations in `dir` as they are now, read without taking the lock and without
/// creating anything: for readers outside the plugin (the node daemon, which mounts the store
/// read-only, re-attaches the pods' veths from it). A file removed while it is read is simply
/// not listed; a missing directory holds nothing.
pub fn read_allocations(dir: &Path) -> std::io::Result<Vec<Allocation>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(ip) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        match fs::read_to_string(entry.path()) {
            Ok(content) => out.push(Allocation {
                ip,
                owner: Owner::parse(&content),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by_key(|a| a.ip);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetConf;

    fn network(subnet: &str) -> PodNetwork {
        NetConf {
            cni_version: "1.0.0".into(),
            name: "t".into(),
            subnet: Some(subnet.parse().unwrap()),
            ..Default::default()
        }
        .pod_network()
        .unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn pool_skips_network_gateway_and_broadcast() {
        let pool = Pool::new(&network("10.0.0.0/29"));
        let all: Vec<_> = pool.candidates_after(None).collect();
        assert_eq!(
            all,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"].map(ip)
        );
        assert_eq!(pool.capacity(), 5);
        assert!(
            !pool.contains(ip("10.0.0.0"))
                && !pool.contains(ip("10.0.0.1"))
                && !pool.contains(ip("10.0.0.7"))
        );
        let after: Vec<_> = pool.candidates_after(Some(ip("10.0.0.5"))).collect();
        assert_eq!(
            after,
            ["10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"].map(ip)
        );
        // A cursor outside the pool (a changed subnet) starts over.
        assert_eq!(
            pool.candidates_after(Some(ip("192.168.0.1"))).next(),
            Some(ip("10.0.0.2"))
        );
    }

    #[test]
    fn allocation_is_round_robin_and_files_are_host_local_format() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(&network("10.0.0.0/29"));
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.allocate(&pool, "c1", "eth0").unwrap(), ip("10.0.0.2"));
        assert_eq!(store.allocate(&pool, "c2", "eth0").unwrap(), ip("10.0.0.3"));
        assert_eq!(
            fs::read_to_string(dir.path().join("10.0.0.2")).unwrap(),
            "c1\r\neth0"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join(LAST_RESERVED)).unwrap(),
            "10.0.0.3"
        );
        // Releasing .2 does not make it the next choice: round-robin continues after .3.
        assert_eq!(store.release("c1", "eth0").unwrap(), vec![ip("10.0.0.2")]);
        assert_eq!(store.allocate(&pool, "c3", "eth0").unwrap(), ip("10.0.0.4"));
    }

    #[test]
    fn release_ip_frees_only_the_holders_address() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(&network("10.0.0.0/29"));
        let store = Store::open(dir.path()).unwrap();
        let a = store.allocate(&pool, "c1", "eth0").unwrap();
        let b = store.allocate(&pool, "c1", "net1").unwrap();
        assert_ne!(a, b);
        assert_eq!(store.find("c1", "net1").unwrap(), Some(b));
        assert!(
            !store.release_ip(a, "c2", "eth0").unwrap(),
            "not the holder"
        );
        assert!(
            !store.release_ip(a, "c1", "net1").unwrap(),
            "other interface"
        );
        assert!(
            !store
                .release_ip("10.0.0.6".parse().unwrap(), "c1", "eth0")
                .unwrap(),
            "not allocated"
        );
        assert!(store.release_ip(a, "c1", "eth0").unwrap());
        assert_eq!(store.find("c1", "eth0").unwrap(), None);
        assert_eq!(store.find("c1", "net1").unwrap(), Some(b));
    }

    #[test]
    fn full_pool_is_a_clear_error_and_release_frees_room() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(&network("10.0.0.0/29"));
        let store = Store::open(dir.path()).unwrap();
        for i in 0..5 {
            store.allocate(&pool, &format!("c{i}"), "eth0").unwrap();
        }
        let e = store.allocate(&pool, "c9", "eth0").unwrap_err();
        assert_eq!(e.code, Code::AddressesExhausted);
        assert!(e.msg.contains("all 5 addresses"), "{}", e.msg);
        store.release("c3", "eth0").unwrap();
        assert_eq!(store.allocate(&pool, "c9", "eth0").unwrap(), ip("10.0.0.5"));
    }

    #[test]
    fn release_is_idempotent_and_legacy_files_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("10.0.0.9"), "oldcontainer\n").unwrap();
        fs::write(dir.path().join("not-an-ip"), "ignored").unwrap();
        assert!(store.release("nobody", "eth0").unwrap().is_empty());
        assert_eq!(
            store.release("oldcontainer", "eth0").unwrap(),
            vec![ip("10.0.0.9")]
        );
        assert!(store.release("oldcontainer", "eth0").unwrap().is_empty());
        assert!(dir.path().join("not-an-ip").exists());
    }

    #[test]
    fn allocations_are_read_without_the_lock_or_creating_anything() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("not-yet");
        assert!(read_allocations(&missing).unwrap().is_empty());
        assert!(!missing.exists(), "a reader creates nothing");
        let pool = Pool::new(&network("10.128.0.0/29"));
        let store = Store::open(d.path()).unwrap();
        store.allocate(&pool, "c1", "eth0").unwrap();
        store.allocate(&pool, "c2", "net1").unwrap();
        // Read while the plugin holds the lock.
        let got = read_allocations(d.path()).unwrap();
        drop(store);
        let owners: Vec<_> = got
            .iter()
            .map(|a| {
                (
                    a.ip.to_string(),
                    a.owner.container_id.as_str(),
                    a.owner.ifname.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            owners,
            [
                ("10.128.0.2".to_string(), "c1", Some("eth0")),
                ("10.128.0.3".to_string(), "c2", Some("net1"))
            ]
        );
    }

    #[test]
    fn gc_keeps_exactly_the_valid_attachments() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(&network("10.0.0.0/24"));
        let store = Store::open(dir.path()).unwrap();
        for (id, ifname) in [("a", "eth0"), ("a", "net1"), ("b", "eth0"), ("c", "eth0")] {
            store.allocate(&pool, id, ifname).unwrap();
        }
        let valid = vec![
            Attachment {
                container_id: "a".into(),
                ifname: "eth0".into(),
            },
            Attachment {
                container_id: "c".into(),
                ifname: "eth0".into(),
            },
        ];
        let released = store.release_all_but(&valid).unwrap();
        assert_eq!(released.len(), 2);
        let left: Vec<_> = store
            .allocations()
            .unwrap()
            .into_iter()
            .map(|a| a.owner.container_id + "/" + &a.owner.ifname.unwrap())
            .collect();
        assert_eq!(left, ["a/eth0", "c/eth0"]);
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(&network("10.0.0.0/24"));
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let dir = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    (0..8)
                        .map(|i| {
                            Store::open(&dir)
                                .unwrap()
                                .allocate(&pool, &format!("c{t}-{i}"), "eth0")
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Ipv4Addr> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!((all.len(), distinct.len()), (128, 128));
    }
}
