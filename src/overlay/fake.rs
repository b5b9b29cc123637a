//! An in-memory kernel for tests of the reconciler's policy (when to program what, what a
//! refused request or a deleted device leads to), without root and without touching any
//! namespace. Shared between the test (which looks and does damage) and the reconciler.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use rsdn_cni::netlink::Link;

use super::kernel::{DeviceSpec, Devices, KernelError, OverlayKernel};
use super::ports::PortRepair;
use super::{Action, Entries, BRIDGE, VXLAN};

#[derive(Debug, Default)]
pub struct State {
    /// Addresses of the node and the MTU of the interface holding each.
    pub underlay: Vec<(Ipv4Addr, u32)>,
    pub bridge: Option<(u32, DeviceSpec)>,
    pub vxlan: Option<(u32, DeviceSpec)>,
    pub entries: Entries,
    /// Links other than the two devices (pod veths).
    pub links: Vec<Link>,
    /// Actions the kernel refuses.
    pub refuse: BTreeSet<String>,
    pub next_index: u32,
    pub sysctl_calls: usize,
}

#[derive(Debug, Clone, Default)]
pub struct FakeKernel {
    pub state: Arc<Mutex<State>>,
}

impl FakeKernel {
    /// A node whose underlay address is `ip` on an interface of MTU 1500.
    pub fn new(ip: &str) -> FakeKernel {
        let k = FakeKernel::default();
        k.with(|s| {
            s.underlay
                .push((ip.parse().expect("an IPv4 address"), 1500));
            s.next_index = 10;
        });
        k
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// `ip link del tun0`: its ports are released, still up.
    pub fn delete_bridge(&self) {
        self.with(|s| {
            if let Some((index, _)) = s.bridge.take() {
                for l in s.links.iter_mut().filter(|l| l.master == Some(index)) {
                    l.master = None;
                    l.hairpin = None;
                }
            }
        });
    }

    /// A pod's host veth on tun0, as the plugin leaves it.
    pub fn add_pod_veth(&self, name: &str, mtu: u32) {
        self.with(|s| {
            s.next_index += 1;
            let master = s.bridge.as_ref().map(|(i, _)| *i);
            s.links.push(Link {
                index: s.next_index,
                name: name.into(),
                mac: vec![],
                mtu,
                master,
                kind: None,
                data: None,
                up: true,
                hairpin: master.map(|_| true),
            });
        });
    }
}

impl OverlayKernel for FakeKernel {
    async fn sysctls(&self) -> Result<Vec<String>, KernelError> {
        self.with(|s| s.sysctl_calls += 1);
        Ok(vec![])
    }

    async fn mtu_of_address(&self, ip: Ipv4Addr) -> Result<Option<u32>, KernelError> {
        Ok(self.with(|s| s.underlay.iter().find(|(a, _)| *a == ip).map(|(_, m)| *m)))
    }

    async fn ensure_devices(
        &self,
        spec: &DeviceSpec,
    ) -> Result<(Devices, Vec<String>), KernelError> {
        Ok(self.with(|s| {
            let mut changes = Vec::new();
            let index = |s: &mut State| {
                s.next_index += 1;
                s.next_index
            };
            match &mut s.bridge {
                Some((_, have)) if have == spec => {}
                Some((_, have)) => {
                    *have = spec.clone();
                    changes.push(format!("{BRIDGE} updated"));
                }
                None => {
                    let i = index(s);
                    s.bridge = Some((i, spec.clone()));
                    changes.push(format!("created bridge {BRIDGE}"));
                }
            }
            let same = |a: &DeviceSpec| {
                (a.vni, a.port, a.local_ip) == (spec.vni, spec.port, spec.local_ip)
            };
            match &mut s.vxlan {
                Some((_, have)) if have == spec => {}
                Some((_, have)) if same(have) => {
                    *have = spec.clone();
                    changes.push(format!("{VXLAN} updated"));
                }
                _ => {
                    // A new device: the kernel holds none of the old one's entries.
                    let i = index(s);
                    s.vxlan = Some((i, spec.clone()));
                    s.entries = Entries::default();
                    changes.push(format!("created {VXLAN}"));
                }
            }
            let devices = Devices {
                bridge: s.bridge.as_ref().expect("just made").0,
                vxlan: s.vxlan.as_ref().expect("just made").0,
            };
            (devices, changes)
        }))
    }

    async fn vxlan_index(&self) -> Result<Option<u32>, KernelError> {
        Ok(self.with(|s| s.vxlan.as_ref().map(|(i, _)| *i)))
    }

    async fn observe(&self, _vxlan: u32, _net: Ipv4Net) -> Result<Entries, KernelError> {
        Ok(self.with(|s| s.entries.clone()))
    }

    async fn apply(&self, _vxlan: u32, actions: &[Action]) -> Vec<(Action, KernelError)> {
        self.with(|s| {
            let mut failures = Vec::new();
            for a in actions {
                if s.refuse.contains(&a.to_string()) {
                    failures.push((
                        *a,
                        KernelError::Entry {
                            what: a.to_string(),
                            errno: libc::EINVAL,
                        },
                    ));
                    continue;
                }
                let e = &mut s.entries;
                match *a {
                    Action::SetFdb(mac, dst) => {
                        e.fdb.insert((mac, dst));
                    }
                    Action::DelFdb(mac, dst) => {
                        e.fdb.remove(&(mac, dst));
                    }
                    Action::SetNeigh(ip, mac) => {
                        e.neigh.insert(ip, mac);
                    }
                    Action::DelNeigh(ip) => {
                        e.neigh.remove(&ip);
                    }
                    Action::SetRoute(dst, t) => {
                        e.routes.insert(dst, t);
                    }
                    Action::DelRoute(dst) => {
                        e.routes.remove(&dst);
                    }
                }
            }
            failures
        })
    }

    async fn links(&self) -> Result<Vec<Link>, KernelError> {
        Ok(self.with(|s| s.links.clone()))
    }

    async fn repair_port(&self, bridge: u32, r: &PortRepair) -> Result<(), KernelError> {
        self.with(|s| {
            let l = s
                .links
                .iter_mut()
                .find(|l| l.index == r.index)
                .ok_or_else(|| KernelError::Setup(format!("no link {}", r.veth)))?;
            if r.attach {
                l.master = Some(bridge);
                l.up = true;
            }
            if let Some(mtu) = r.mtu {
                l.mtu = mtu;
            }
            if r.hairpin {
                l.hairpin = Some(true);
            }
            Ok(())
        })
    }
}
