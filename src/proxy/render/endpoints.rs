//! Stage 4 of a Service port: its endpoints. The Service chains' jumps to them (affinity, then
//! random load balancing) and one KUBE-SEP- chain per reachable endpoint with its DNAT.

use super::port::Port;
use super::select::Probability;
use crate::netfilter::ruleset::{Plain, Quoted, Table};
use crate::proxy::names::*;

impl Port<'_> {
    pub(super) fn endpoints(&mut self) {
        let (name, proto) = (self.name.as_str(), self.proto);
        let cluster_ip = self.dst(self.svc.cluster_ip);
        let nat = &mut self.out.nat;
        // Internal traffic: masquerade what does not come from a pod (a node, or a host
        // routing the service network to us), since the endpoint may be on another node.
        if self.has_internal {
            nat.add(
                &self.internal_chain,
                format_args!(
                    "{} {cluster_ip} ! -s {} -j {KUBE_MARK_MASQ}",
                    Quoted(format_args!("{name} cluster IP")),
                    self.scope.cluster_network
                ),
            );
        }
        // Each reachable endpoint's `ip:port` and chain name, computed once, by its index.
        let mut texts = vec![None; self.eps.len()];
        let hash_prefix = format!("{name}{proto}");
        for &i in &self.c.reachable {
            let addr = self.eps[i].to_string();
            let chain = endpoint_chain_of(&hash_prefix, &addr);
            texts[i] = Some(EndpointText { addr, chain });
        }
        let jumps = EndpointJumps {
            name,
            affinity: self.svc.affinity_seconds,
            texts: &texts,
        };
        if !self.c.cluster.is_empty() && self.svc.uses_cluster_endpoints() {
            jumps.write(&self.chains.cluster, &self.c.cluster, nat);
        }
        if !self.c.local.is_empty() && self.svc.uses_local_endpoints() {
            jumps.write(&self.chains.local, &self.c.local, nat);
        }
        let plain = Plain(name);
        for &i in &self.c.reachable {
            let ep = jumps.text(i);
            let (sep, addr) = (&ep.chain, &ep.addr);
            let mut out = nat.open(sep);
            out.add(format_args!("{plain} -s {} -j {KUBE_MARK_MASQ}", ep.ip()));
            if self.svc.affinity_seconds.is_some() {
                out.add(format_args!(
                    "{plain} -m recent --name {sep} --set -m {proto} -p {proto} -j DNAT --to-destination {addr}"
                ));
            } else {
                out.add(format_args!(
                    "{plain} -m {proto} -p {proto} -j DNAT --to-destination {addr}"
                ));
            }
        }
    }
}

/// A reachable endpoint's `ip:port` and KUBE-SEP- chain.
#[derive(Clone)]
struct EndpointText {
    addr: String,
    chain: String,
}

impl EndpointText {
    fn ip(&self) -> &str {
        self.addr.rsplit_once(':').map_or(&self.addr, |(ip, _)| ip)
    }
}

/// A Service chain's jumps to its endpoints: affinity first, then random load balancing with
/// kube-proxy's probabilities (1/n, 1/(n-1), ..., the last one unconditional).
struct EndpointJumps<'a> {
    name: &'a str,
    affinity: Option<u32>,
    /// By index in the port's endpoints; set for every reachable one.
    texts: &'a [Option<EndpointText>],
}

impl EndpointJumps<'_> {
    fn text(&self, i: usize) -> &EndpointText {
        self.texts[i]
            .as_ref()
            .expect("every reachable endpoint has its text")
    }

    fn write(&self, chain: &str, eps: &[usize], nat: &mut Table) {
        let mut out = nat.open(chain);
        let name = self.name;
        if let Some(seconds) = self.affinity {
            for &i in eps {
                let EndpointText { addr, chain: sep } = self.text(i);
                out.add(format_args!(
                    "{} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}",
                    Quoted(format_args!("{name} -> {addr}"))
                ));
            }
        }
        let n = eps.len();
        for (k, &i) in eps.iter().enumerate() {
            let EndpointText { addr, chain: sep } = self.text(i);
            let comment = Quoted(format_args!("{name} -> {addr}"));
            if k + 1 < n {
                out.add(format_args!(
                    "{comment} -m statistic --mode random --probability {} -j {sep}",
                    Probability(n - k)
                ));
            } else {
                out.add(format_args!("{comment} -j {sep}"));
            }
        }
    }
}
