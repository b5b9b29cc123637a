//! UDP has no connection to end: a client keeps sending to a dead endpoint as long as its
//! conntrack entry lives, and a client that sent before a Service had endpoints keeps bypassing
//! the DNAT (only a flow's first packet goes through nat). So, as kube-proxy does since its
//! conntrack reconciler (kubernetes#126130, `pkg/proxy/conntrack/cleanup.go`), after every sync
//! the UDP flows of the kernel are compared with the Services: a flow whose original
//! destination is a UDP Service port's address (cluster IP, external IP, load-balancer IP, each
//! with the port) or its NodePort, and whose reply source (where it was DNATed to, or the
//! Service address itself when it was not DNATed) is not a serving endpoint of that Service
//! port, is deleted. Only what the flows were judged by is remembered from one sync to the
//! next (`Reconciler`: a sync that changes none of it lists nothing); a restart, a failed list
//! or delete, and every full sync start again from the kernel's table.
//!
//! `stale` is the policy, a pure function; `Conntrack` is the seam to the kernel: `Netlink`
//! (ctnetlink through a netlink socket of the current network namespace) and `Fake` (in
//! memory) for tests.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use netlink_packet_core::{
    DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as CtProtocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use tracing::{debug, info, warn};

use crate::model::service::{Protocol, Services};

/// One direction of a flow: `src:sport -> dst:dport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

/// A UDP conntrack entry: its original and reply tuples (the reply's source is where the flow
/// was DNATed to), and its conntrack zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub orig: Tuple4,
    pub reply: Tuple4,
    pub zone: u16,
}

impl std::fmt::Display for Flow {
    /// As `conntrack -L` prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (o, r) = (self.orig, self.reply);
        write!(
            f,
            "udp src={} dst={} sport={} dport={} src={} dst={} sport={} dport={}",
            o.src, o.dst, o.sport, o.dport, r.src, r.dst, r.sport, r.dport
        )?;
        if self.zone != 0 {
            write!(f, " zone={}", self.zone)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("conntrack dump: {0}")]
    Dump(String),
    #[error("{failed} of the stale entries could not be deleted ({deleted} were)")]
    Undeleted { deleted: usize, failed: usize },
}

/// The kernel's conntrack table, as far as the proxy needs it.
pub trait Conntrack: Send {
    /// Every IPv4 UDP flow.
    fn list_udp(&self) -> Result<Vec<Flow>, ConntrackError>;
    /// Deletes `flows`; returns how many it deleted. A flow that is already gone is no error;
    /// one that cannot be deleted is logged, the others still are, and the result is
    /// `Undeleted`.
    fn delete(&self, flows: &[Flow]) -> Result<usize, ConntrackError>;
}

/// What flows are judged by: every UDP Service port's serving endpoint addresses, by its
/// addresses and its NodePort. Changes to a Service must not break flows that still go to a
/// serving endpoint, so traffic policies, topology and terminating do not count (as in
/// kube-proxy).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UdpServices {
    serving: Vec<HashSet<Ipv4Addr>>,
    by_addr: HashMap<(Ipv4Addr, u16), usize>,
    by_node_port: HashMap<u16, usize>,
}

impl UdpServices {
    pub fn of(services: &Services) -> UdpServices {
        let mut v = UdpServices::default();
        for (spn, port) in &services.ports {
            if spn.protocol != Protocol::Udp {
                continue;
            }
            let i = v.serving.len();
            v.serving.push(
                services
                    .endpoints
                    .get(spn)
                    .into_iter()
                    .flatten()
                    .filter(|e| e.serving)
                    .map(|e| e.ip)
                    .collect(),
            );
            let ips = std::iter::once(&port.cluster_ip)
                .chain(&port.external_ips)
                .chain(&port.load_balancer_ips);
            for ip in ips {
                v.by_addr.insert((*ip, port.port), i);
            }
            if let Some(np) = port.node_port {
                v.by_node_port.insert(np, i);
            }
        }
        v
    }

    /// The flows of `flows` that are stale. `node_port_ips` are the addresses the node answers
    /// NodePorts on: a flow to a NodePort on another address is not ours (kube-proxy matches
    /// the port alone; a host's own UDP service on another address would lose its flows).
    pub fn stale(&self, node_port_ips: &HashSet<Ipv4Addr>, flows: &[Flow]) -> Vec<Flow> {
        flows
            .iter()
            .filter(|f| {
                let (dst, dport, by) = (f.orig.dst, f.orig.dport, f.reply.src);
                let to_addr = self.by_addr.get(&(dst, dport));
                let to_node_port = self
                    .by_node_port
                    .get(&dport)
                    .filter(|_| node_port_ips.contains(&dst));
                [to_addr, to_node_port]
                    .into_iter()
                    .flatten()
                    .any(|&i| !self.serving[i].contains(&by))
            })
            .copied()
            .collect()
    }
}

/// The flows of `flows` that are stale for `services` (see `UdpServices`).
pub fn stale(services: &Services, node_port_ips: &HashSet<Ipv4Addr>, flows: &[Flow]) -> Vec<Flow> {
    UdpServices::of(services).stale(node_port_ips, flows)
}

/// Lists the UDP flows, deletes the stale ones; returns how many it deleted. Errors are
/// logged: the next sync tries again.
pub fn reconcile(
    ct: &dyn Conntrack,
    services: &Services,
    node_port_ips: &HashSet<Ipv4Addr>,
) -> usize {
    clear(ct, &UdpServices::of(services), node_port_ips).unwrap_or(0)
}

/// `reconcile`, after each sync, skipped when nothing it judges by changed since it last
/// succeeded. A dump walks the whole conntrack hash table (every network namespace's buckets:
/// 10 ms on an idle node), and most syncs (a pod or policy change) touch no UDP Service. While
/// the kernel holds the rules, a flow can only turn stale through a change of the UDP
/// Services, their serving endpoints or the NodePort addresses: flows made since the last run
/// went through rules that DNAT to serving endpoints. Rules put back after they went missing
/// (a flush: flows in the gap were not DNATed) and full syncs run it regardless.
#[derive(Debug, Default)]
pub struct Reconciler {
    done: Option<(UdpServices, HashSet<Ipv4Addr>)>,
}

impl Reconciler {
    /// Returns how many flows it deleted, or None when it was skipped. `always`: after a full
    /// sync, or after rules that had gone missing were put back (flows that went through the
    /// gap were not DNATed: stale, though the view did not change).
    pub fn after_sync(
        &mut self,
        ct: &dyn Conntrack,
        services: &Services,
        node_port_ips: HashSet<Ipv4Addr>,
        always: bool,
    ) -> Option<usize> {
        let view = UdpServices::of(services);
        if !always && matches!(&self.done, Some((v, ips)) if *v == view && *ips == node_port_ips) {
            return None;
        }
        let r = clear(ct, &view, &node_port_ips);
        self.done = r.map(|_| (view, node_port_ips));
        Some(r.unwrap_or(0))
    }
}

/// Lists, judges and deletes; None when listing or deleting failed (logged).
fn clear(
    ct: &dyn Conntrack,
    view: &UdpServices,
    node_port_ips: &HashSet<Ipv4Addr>,
) -> Option<usize> {
    let start = Instant::now();
    let flows = match ct.list_udp() {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "cannot list conntrack entries; stale UDP flows stay until the next sync");
            return None;
        }
    };
    let stale = view.stale(node_port_ips, &flows);
    if stale.is_empty() {
        debug!(
            flows = flows.len(),
            took_ms = start.elapsed().as_millis() as u64,
            "no stale UDP conntrack entries"
        );
        return Some(0);
    }
    for f in &stale {
        debug!(flow = %f, "deleting stale UDP conntrack entry");
    }
    match ct.delete(&stale) {
        Ok(n) => {
            info!(
                deleted = n,
                flows = flows.len(),
                took_ms = start.elapsed().as_millis() as u64,
                "cleared stale UDP conntrack entries"
            );
            Some(n)
        }
        Err(e) => {
            warn!(error = %e, "cannot delete stale UDP conntrack entries; the next sync tries again");
            None
        }
    }
}

/// ctnetlink through a netlink socket, in the network namespace of the calling thread.
pub struct Netlink;

const CTA_ZONE: u16 = 18;
const ENOENT: i32 = 2;

impl Netlink {
    fn socket() -> Result<Socket, ConntrackError> {
        let mut s = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Socket)?;
        s.bind_auto().map_err(ConntrackError::Socket)?;
        s.connect(&SocketAddr::new(0, 0))
            .map_err(ConntrackError::Socket)?;
        Ok(s)
    }

    fn send(
        socket: &Socket,
        flags: u16,
        seq: u32,
        message: ConntrackMessage,
    ) -> Result<(), ConntrackError> {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                message,
            )),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        socket.send(&buf, 0).map_err(ConntrackError::Socket)?;
        Ok(())
    }

    /// The messages of the next datagram.
    fn receive(socket: &Socket) -> Result<Vec<NetlinkMessage<NetfilterMessage>>, ConntrackError> {
        let (buf, _) = socket.recv_from_full().map_err(ConntrackError::Socket)?;
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let m = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..])
                .map_err(|e| ConntrackError::Dump(e.to_string()))?;
            let len = m.header.length as usize;
            out.push(m);
            if len == 0 {
                break;
            }
            at += (len + 3) & !3;
        }
        Ok(out)
    }
}

impl Conntrack for Netlink {
    fn list_udp(&self) -> Result<Vec<Flow>, ConntrackError> {
        let socket = Self::socket()?;
        Self::send(
            &socket,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            ConntrackMessage::Get(vec![]),
        )?;
        let mut flows = Vec::new();
        loop {
            for m in Self::receive(&socket)? {
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(flows),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(ConntrackError::Dump(e.to_io().to_string()))
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                        ..
                    }) => flows.extend(flow_of(&attrs)),
                    _ => {}
                }
            }
        }
    }

    fn delete(&self, flows: &[Flow]) -> Result<usize, ConntrackError> {
        let socket = Self::socket()?;
        let (mut deleted, mut failed) = (0, 0);
        for (seq, f) in (1u32..).zip(flows) {
            let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple(f.orig))];
            if f.zone != 0 {
                attrs.push(ConntrackAttribute::Other(DefaultNla::new(
                    CTA_ZONE,
                    f.zone.to_be_bytes().to_vec(),
                )));
            }
            Self::send(
                &socket,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                ConntrackMessage::Delete(attrs),
            )?;
            let acked = Self::receive(&socket)?
                .into_iter()
                .find_map(|m| match m.payload {
                    NetlinkPayload::Error(e) => Some(e),
                    _ => None,
                });
            match acked.and_then(|e| e.code) {
                None => deleted += 1,
                Some(code) if -code.get() == ENOENT => {}
                Some(code) => {
                    let e = std::io::Error::from_raw_os_error(-code.get());
                    warn!(flow = %f, error = %e, "cannot delete a conntrack entry");
                    failed += 1;
                }
            }
        }
        match failed {
            0 => Ok(deleted),
            _ => Err(ConntrackError::Undeleted { deleted, failed }),
        }
    }
}

/// The nested attributes of a UDP tuple.
fn tuple(t: Tuple4) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(IpAddr::V4(t.src)),
            IPTuple::DestinationAddress(IpAddr::V4(t.dst)),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(CtProtocol::Udp),
            ProtoTuple::SourcePort(t.sport),
            ProtoTuple::DestinationPort(t.dport),
        ]),
    ]
}

/// A UDP flow from a dumped entry; None for any other protocol or family.
fn flow_of(attrs: &[ConntrackAttribute]) -> Option<Flow> {
    let (mut orig, mut reply, mut zone) = (None, None, 0);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = tuple_of(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple_of(t),
            ConntrackAttribute::Other(nla) if nla.kind() == CTA_ZONE && nla.value_len() == 2 => {
                let mut b = [0u8; 2];
                nla.emit_value(&mut b);
                zone = u16::from_be_bytes(b);
            }
            _ => {}
        }
    }
    Some(Flow {
        orig: orig?,
        reply: reply?,
        zone,
    })
}

fn tuple_of(t: &[Tuple]) -> Option<Tuple4> {
    let (mut src, mut dst, mut sport, mut dport, mut udp) = (None, None, None, None, false);
    for part in t {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(IpAddr::V4(a)) => src = Some(*a),
                        IPTuple::DestinationAddress(IpAddr::V4(a)) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(p) => udp = *p == CtProtocol::Udp,
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    udp.then_some(())?;
    Some(Tuple4 {
        src: src?,
        dst: dst?,
        sport: sport?,
        dport: dport?,
    })
}

/// A conntrack table in memory: `delete` removes flows from it and records them.
#[derive(Debug, Clone, Default)]
pub struct Fake {
    pub flows: Arc<Mutex<BTreeSet<Flow>>>,
    pub deleted: Arc<Mutex<Vec<Flow>>>,
    /// How many times the flows were listed.
    pub lists: Arc<Mutex<usize>>,
    /// Flows that cannot be deleted.
    pub undeletable: Arc<Mutex<BTreeSet<Flow>>>,
}

impl Conntrack for Fake {
    fn list_udp(&self) -> Result<Vec<Flow>, ConntrackError> {
        *self.lists.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        Ok(flows.iter().copied().collect())
    }

    fn delete(&self, flows: &[Flow]) -> Result<usize, ConntrackError> {
        let mut table = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        let mut deleted = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
        let undeletable = self.undeletable.lock().unwrap_or_else(|p| p.into_inner());
        let (mut n, mut failed) = (0, 0);
        for f in flows {
            if undeletable.contains(f) {
                failed += 1;
            } else if table.remove(f) {
                deleted.push(*f);
                n += 1;
            }
        }
        match failed {
            0 => Ok(n),
            _ => Err(ConntrackError::Undeleted { deleted: n, failed }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::service::{Endpoint, ServicePort, ServicePortName};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// ns/dns:53 UDP at 172.30.0.10:53, external IP 192.168.77.200, LB IP 192.168.77.201,
    /// NodePort 30053, with these endpoints (ip, serving); and a TCP port with the same
    /// addresses.
    fn services(eps: &[(&str, bool)]) -> Services {
        let mut s = Services::default();
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            let spn = ServicePortName {
                namespace: "ns".into(),
                name: "dns".into(),
                port: protocol.as_str().into(),
                protocol,
            };
            s.ports.insert(
                spn.clone(),
                ServicePort {
                    node_port: (protocol == Protocol::Udp).then_some(30053),
                    external_ips: vec![ip("192.168.77.200")],
                    load_balancer_ips: vec![ip("192.168.77.201")],
                    ..ServicePort::cluster_ip(ip("172.30.0.10"), 53)
                },
            );
            s.endpoints.insert(
                spn,
                eps.iter()
                    .map(|(e, serving)| Endpoint {
                        ip: ip(e),
                        port: 5353,
                        node: None,
                        ready: *serving,
                        serving: *serving,
                        terminating: false,
                        zone: None,
                        zone_hints: vec![],
                        node_hints: vec![],
                    })
                    .collect(),
            );
        }
        s
    }

    /// A flow from 10.128.4.2:40053 to `dst:dport`, answered by `by:5353` (by = dst: not
    /// DNATed, same port).
    fn flow(dst: &str, dport: u16, by: &str) -> Flow {
        let not_nat = dst == by;
        Flow {
            orig: Tuple4 {
                src: ip("10.128.4.2"),
                dst: ip(dst),
                sport: 40053,
                dport,
            },
            reply: Tuple4 {
                src: ip(by),
                dst: ip("10.128.4.2"),
                sport: if not_nat { dport } else { 5353 },
                dport: 40053,
            },
            zone: 0,
        }
    }

    fn node_ips() -> HashSet<Ipv4Addr> {
        [ip("192.168.77.11"), ip("127.0.0.1")].into()
    }

    #[test]
    fn flows_to_a_service_address_not_dnated_to_a_serving_endpoint_are_stale() {
        let s = services(&[("10.128.0.5", true), ("10.128.2.5", false)]);
        let flows = [
            // Kept: to a serving endpoint, by every address of the Service port.
            flow("172.30.0.10", 53, "10.128.0.5"),
            flow("192.168.77.200", 53, "10.128.0.5"),
            flow("192.168.77.201", 53, "10.128.0.5"),
            flow("192.168.77.11", 30053, "10.128.0.5"),
            // Stale: to an endpoint that is gone or not serving.
            flow("172.30.0.10", 53, "10.128.9.9"),
            flow("192.168.77.200", 53, "10.128.2.5"),
            flow("192.168.77.201", 53, "10.128.9.9"),
            flow("192.168.77.11", 30053, "10.128.9.9"),
            // Stale: never DNATed (sent before the Service had endpoints).
            flow("172.30.0.10", 53, "172.30.0.10"),
            flow("192.168.77.11", 30053, "192.168.77.11"),
            // Not the Service's: another port, another address, a NodePort of another host.
            flow("172.30.0.10", 54, "172.30.0.10"),
            flow("172.30.0.11", 53, "172.30.0.11"),
            flow("192.168.77.12", 30053, "192.168.77.12"),
        ];
        let got = stale(&s, &node_ips(), &flows);
        assert_eq!(got, flows[4..10].to_vec());
    }

    #[test]
    fn a_service_without_serving_endpoints_loses_every_flow_and_tcp_is_left_alone() {
        // N -> 0: flows DNATed to the last endpoint would otherwise go on to it (kube-proxy
        // after kubernetes#139628).
        let s = services(&[("10.128.2.5", false)]);
        let flows = [
            flow("172.30.0.10", 53, "10.128.2.5"),
            flow("192.168.77.11", 30053, "10.128.2.5"),
        ];
        assert_eq!(stale(&s, &node_ips(), &flows), flows.to_vec());
        // Only UDP Service ports count: the TCP port has no NodePort and the same cluster IP,
        // but a UDP flow to 172.30.0.10:53 is judged by the UDP port's endpoints alone.
        let s = services(&[("10.128.0.5", true)]);
        assert!(stale(&s, &node_ips(), &[flow("172.30.0.10", 53, "10.128.0.5")]).is_empty());
    }

    #[test]
    fn reconcile_deletes_the_stale_flows_and_again_finds_nothing() {
        let ct = Fake::default();
        let (live, dead) = (
            flow("172.30.0.10", 53, "10.128.0.5"),
            flow("172.30.0.10", 53, "10.128.9.9"),
        );
        ct.flows.lock().unwrap().extend([live, dead]);
        let s = services(&[("10.128.0.5", true)]);
        assert_eq!(reconcile(&ct, &s, &node_ips()), 1);
        assert_eq!(*ct.deleted.lock().unwrap(), [dead]);
        assert_eq!(reconcile(&ct, &s, &node_ips()), 0);
        assert_eq!(ct.list_udp().unwrap(), [live]);
    }

    /// A conntrack table that cannot be listed.
    struct Unlistable;

    impl Conntrack for Unlistable {
        fn list_udp(&self) -> Result<Vec<Flow>, ConntrackError> {
            Err(ConntrackError::Dump("test".into()))
        }

        fn delete(&self, _: &[Flow]) -> Result<usize, ConntrackError> {
            unreachable!()
        }
    }

    #[test]
    fn the_reconciler_lists_flows_again_only_when_what_judges_them_changed() {
        let ct = Fake::default();
        let lists = || *ct.lists.lock().unwrap();
        let mut r = Reconciler::default();
        let dead = flow("172.30.0.10", 53, "10.128.9.9");
        ct.flows.lock().unwrap().insert(dead);
        let s = services(&[("10.128.0.5", true)]);
        assert_eq!(r.after_sync(&ct, &s, node_ips(), false), Some(1));
        // A sync that changed no UDP Service: nothing can have turned stale.
        assert_eq!(r.after_sync(&ct, &s, node_ips(), false), None);
        assert_eq!(lists(), 1);
        // Each of these lists again: the endpoint stops serving, a NodePort address comes,
        // a full sync.
        ct.flows
            .lock()
            .unwrap()
            .insert(flow("172.30.0.10", 53, "10.128.0.5"));
        let gone = services(&[("10.128.0.5", false)]);
        assert_eq!(r.after_sync(&ct, &gone, node_ips(), false), Some(1));
        let mut more = node_ips();
        more.insert(ip("192.168.77.12"));
        assert_eq!(r.after_sync(&ct, &gone, more.clone(), false), Some(0));
        assert_eq!(r.after_sync(&ct, &gone, more.clone(), true), Some(0));
        assert_eq!(lists(), 4);
        // A failed list is not remembered as done: the next sync lists.
        let mut r = Reconciler::default();
        assert_eq!(r.after_sync(&Unlistable, &s, node_ips(), false), Some(0));
        assert_eq!(r.after_sync(&ct, &s, node_ips(), false), Some(0));
        assert_eq!(lists(), 5);
        // Nor is a flow that could not be deleted: the next sync lists and tries again.
        let stuck = flow("172.30.0.10", 53, "10.128.7.7");
        ct.flows.lock().unwrap().insert(stuck);
        ct.undeletable.lock().unwrap().insert(stuck);
        assert_eq!(r.after_sync(&ct, &s, node_ips(), true), Some(0));
        ct.undeletable.lock().unwrap().clear();
        assert_eq!(r.after_sync(&ct, &s, node_ips(), false), Some(1));
        assert_eq!(lists(), 7);
        assert_eq!(r.after_sync(&ct, &s, node_ips(), false), None);
    }

    #[test]
    fn flows_print_as_conntrack_lists_them() {
        let mut f = flow("172.30.0.10", 53, "10.128.0.5");
        assert_eq!(
            f.to_string(),
            "udp src=10.128.4.2 dst=172.30.0.10 sport=40053 dport=53 src=10.128.0.5 dst=10.128.4.2 sport=5353 dport=40053"
        );
        f.zone = 7;
        assert!(f.to_string().ends_with(" zone=7"));
    }

    #[test]
    fn dumped_attributes_make_a_flow_and_a_delete_names_its_original_tuple() {
        let f = flow("172.30.0.10", 53, "10.128.0.5");
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tuple(f.orig)),
            ConntrackAttribute::CtaTupleReply(tuple(f.reply)),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, vec![0, 3])),
        ];
        assert_eq!(flow_of(&attrs), Some(Flow { zone: 3, ..f }));
        // TCP entries are not flows of ours.
        let mut tcp = tuple(f.orig);
        tcp[1] = Tuple::Proto(vec![ProtoTuple::Protocol(CtProtocol::Tcp)]);
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tcp),
            ConntrackAttribute::CtaTupleReply(tuple(f.reply)),
        ];
        assert_eq!(flow_of(&attrs), None);
    }
}
