//! Endpoint selection as kube-proxy does it: which endpoints serve cluster-wide and local
//! traffic, which are reachable at all, and the probabilities that spread connections evenly.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::OnceLock;

use crate::model::service::{Endpoint, ServicePort, TrafficDistribution};

/// kube-proxy's endpoint selection (`pkg/proxy/topology.go`): ready endpoints, narrowed by
/// topology hints where they apply (`topology`); when none is ready anywhere, the
/// serving-and-terminating ones (topology aside), so connections drain instead of failing.
/// Endpoints are named by their index in the port's endpoints, which are unique and sorted by
/// `ip:port` text (the model's order): ascending indices are kube-proxy's order.
pub(super) struct Categorized {
    pub cluster: Vec<usize>,
    pub local: Vec<usize>,
    /// Endpoints some chain may jump to: each gets a KUBE-SEP- chain.
    pub reachable: Vec<usize>,
    pub any: bool,
}

/// Where this node is: its name and zone (`topology.kubernetes.io/zone`).
pub(super) struct Place<'a> {
    pub node: &'a str,
    pub zone: Option<&'a str>,
}

pub(super) fn categorize(eps: &[Endpoint], svc: &ServicePort, here: &Place) -> Categorized {
    let local = |e: &Endpoint| e.node.as_deref() == Some(here.node);
    let draining = |e: &Endpoint| e.serving && e.terminating;
    let select = |keep: &dyn Fn(&Endpoint) -> bool| -> Vec<usize> {
        (0..eps.len()).filter(|&i| keep(&eps[i])).collect()
    };
    let mut c = Categorized {
        cluster: vec![],
        local: vec![],
        reachable: vec![],
        any: false,
    };
    let mut narrowed = false;
    if svc.uses_cluster_endpoints() {
        let hints = Hints::of(svc, eps);
        let topology = topology(eps, &hints, here);
        narrowed = topology != Topology::Any;
        c.cluster = select(&|e| e.ready && topology.admits(e, &hints));
        if c.cluster.is_empty() {
            c.cluster = select(&draining);
        }
        c.any = !c.cluster.is_empty();
    }
    if !svc.uses_local_endpoints() {
        c.reachable = c.cluster.clone();
        return c;
    }
    c.any |= eps.iter().any(|e| e.ready || draining(e));
    let local_ready = select(&|e| local(e) && e.ready);
    let local_fallback = local_ready.is_empty();
    c.local = if local_fallback {
        select(&|e| local(e) && draining(e))
    } else {
        local_ready
    };
    if !svc.uses_cluster_endpoints() {
        c.reachable = c.local.clone();
    } else if !local_fallback && !narrowed {
        c.reachable = c.cluster.clone();
    } else {
        // Topology may have left local endpoints out of the cluster set, and draining local
        // ones are not in it: the chains together reach both.
        let both: BTreeSet<usize> = c.cluster.iter().chain(&c.local).copied().collect();
        c.reachable = both.into_iter().collect();
    }
    c
}

/// Which hints cluster-wide traffic follows: kube-proxy's `topologyModeFromHints`.
#[derive(Debug, PartialEq, Eq)]
enum Topology<'a> {
    /// No hints apply: every ready endpoint.
    Any,
    /// The ready endpoints hinted for this zone.
    Zone(&'a str),
    /// The ready endpoints hinted for this node.
    Node(&'a str),
}

/// Same-node hints when every ready endpoint has node hints and one is for this node, else
/// same-zone hints when every ready endpoint has zone hints and one is for this zone, else
/// none.
fn topology<'a>(eps: &[Endpoint], hints: &Hints, here: &Place<'a>) -> Topology<'a> {
    let (mut all_node, mut for_node, mut all_zone, mut for_zone) = (true, false, true, false);
    for e in eps.iter().filter(|e| e.ready) {
        let nodes = hints.nodes(e);
        all_node &= !nodes.is_empty();
        for_node |= nodes.contains(&here.node);
        let zones = hints.zones(e);
        all_zone &= !zones.is_empty();
        for_zone |= here.zone.is_some_and(|z| zones.contains(&z));
    }
    if all_node && for_node {
        Topology::Node(here.node)
    } else if all_zone && for_zone {
        Topology::Zone(here.zone.unwrap_or_default())
    } else {
        Topology::Any
    }
}

impl Topology<'_> {
    fn admits(&self, e: &Endpoint, hints: &Hints) -> bool {
        match self {
            Topology::Any => true,
            Topology::Zone(z) => hints.zones(e).contains(z),
            Topology::Node(n) => hints.nodes(e).contains(n),
        }
    }
}

/// The hints of a port's endpoints: as the slices give them, or made here (`Some`) when its
/// Service asks for a traffic distribution and none of its endpoints carries a hint, so no
/// EndpointSlice controller wrote them (the `dir` source, a cluster without one). They are then
/// what the controller writes (`endpointslice/trafficdist`): each ready endpoint hinted for
/// its own zone, and with `PreferSameNode` for its own node too.
struct Hints(Option<TrafficDistribution>);

impl Hints {
    fn of(svc: &ServicePort, eps: &[Endpoint]) -> Hints {
        let hinted = |e: &Endpoint| !e.zone_hints.is_empty() || !e.node_hints.is_empty();
        Hints(svc.traffic_distribution.filter(|_| !eps.iter().any(hinted)))
    }

    fn zones<'e>(&self, e: &'e Endpoint) -> Vec<&'e str> {
        match self.0 {
            None => e.zone_hints.iter().map(String::as_str).collect(),
            Some(_) => e.zone.as_deref().filter(|_| e.ready).into_iter().collect(),
        }
    }

    fn nodes<'e>(&self, e: &'e Endpoint) -> Vec<&'e str> {
        match self.0 {
            None => e.node_hints.iter().map(String::as_str).collect(),
            Some(TrafficDistribution::PreferSameNode) => {
                e.node.as_deref().filter(|_| e.ready).into_iter().collect()
            }
            Some(TrafficDistribution::PreferSameZone) => vec![],
        }
    }
}

/// 1/n with ten decimals, as kube-proxy writes the statistic match's probability. The common
/// ones are formatted once per process: float formatting was a visible part of large renders.
pub(super) struct Probability(pub usize);

impl fmt::Display for Probability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        static COMMON: OnceLock<Vec<String>> = OnceLock::new();
        let common = COMMON.get_or_init(|| {
            (0..=256)
                .map(|n| format!("{:.10}", 1.0 / n as f64))
                .collect()
        });
        match common.get(self.0) {
            Some(text) => f.write_str(text),
            None => write!(f, "{:.10}", 1.0 / self.0 as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::service::TrafficDistribution::{PreferSameNode, PreferSameZone};

    /// "node/zone/hints/ready": hints "a,b" for zones, "@n1" for a node; "-" for none.
    fn ep(spec: &str) -> Endpoint {
        let f: Vec<&str> = spec.split('/').collect();
        let hints: Vec<&str> = f[2].split(',').filter(|h| *h != "-").collect();
        let ready = f[3] == "ready";
        Endpoint {
            ip: std::net::Ipv4Addr::new(10, 128, 0, 1),
            port: 80,
            node: Some(f[0].into()),
            ready,
            serving: ready || f[3] == "draining",
            terminating: !ready,
            zone: (f[1] != "-").then(|| f[1].into()),
            zone_hints: hints
                .iter()
                .filter(|h| !h.starts_with('@'))
                .map(|h| h.to_string())
                .collect(),
            node_hints: hints
                .iter()
                .filter_map(|h| h.strip_prefix('@'))
                .map(String::from)
                .collect(),
        }
    }

    fn svc(td: Option<TrafficDistribution>, internal_local: bool) -> ServicePort {
        ServicePort {
            internal_local,
            traffic_distribution: td,
            ..ServicePort::cluster_ip(std::net::Ipv4Addr::new(172, 30, 0, 1), 80)
        }
    }

    /// The cluster and reachable endpoints (indices) for node n1 in `zone`.
    fn pick(eps: &[&str], svc: &ServicePort, zone: Option<&str>) -> (Vec<usize>, Vec<usize>) {
        let eps: Vec<Endpoint> = eps.iter().map(|s| ep(s)).collect();
        let c = categorize(&eps, svc, &Place { node: "n1", zone });
        (c.cluster, c.reachable)
    }

    #[test]
    fn zone_hints_apply_when_every_ready_endpoint_has_one_and_one_is_for_this_zone() {
        let plain = svc(None, false);
        let a = Some("a");
        let hinted = ["n2/a/a/ready", "n3/b/b/ready", "n4/a/a/ready"];
        assert_eq!(
            pick(&hinted, &plain, a).0,
            [0, 2],
            "hints are followed without trafficDistribution"
        );
        assert_eq!(pick(&hinted, &plain, Some("b")).0, [1]);
        // kube-proxy's fallbacks: every ready endpoint.
        let cases: [(&[&str], Option<&str>, &str); 4] = [
            (
                &["n2/a/a/ready", "n3/b/-/ready"],
                a,
                "an endpoint without hints",
            ),
            (
                &["n2/b/b/ready", "n3/b/b/ready"],
                a,
                "no endpoint for this zone",
            ),
            (&hinted[..2], None, "this node has no zone label"),
            (
                &["n2/a/a/ready", "n3/b/b/ready"],
                Some("c"),
                "a zone without endpoints",
            ),
        ];
        for (eps, zone, why) in cases {
            assert_eq!(pick(eps, &plain, zone).0, [0, 1], "{why}");
        }
        // Endpoints that are not ready do not count, with or without hints.
        assert_eq!(pick(&["n2/a/a/ready", "n3/b/-/no"], &plain, a).0, [0]);
        // With no ready endpoint, the draining ones, topology aside.
        assert_eq!(
            pick(&["n2/b/b/draining", "n3/a/a/draining"], &plain, a).0,
            [0, 1]
        );
    }

    #[test]
    fn node_hints_come_first_and_local_endpoints_stay_reachable() {
        let plain = svc(None, false);
        let eps = ["n1/a/a,@n1/ready", "n2/a/a,@n2/ready", "n3/b/b,@n3/ready"];
        assert_eq!(pick(&eps, &plain, Some("a")).0, [0]);
        // No endpoint on this node: the zone's.
        let eps = ["n2/a/a,@n2/ready", "n5/a/a,@n5/ready", "n3/b/b,@n3/ready"];
        assert_eq!(pick(&eps, &plain, Some("a")).0, [0, 1]);
        // internalTrafficPolicy Local with a Cluster external path (a NodePort) uses both
        // sets: a local endpoint outside the zone's hints is still reachable.
        let mut np = svc(None, true);
        np.node_port = Some(30080);
        let eps = ["n1/b/b/ready", "n2/a/a/ready"];
        assert_eq!(pick(&eps, &np, Some("a")), (vec![1], vec![0, 1]));
    }

    #[test]
    fn a_traffic_distribution_without_hints_is_hinted_as_the_controller_would() {
        let close = svc(Some(PreferSameZone), false);
        let a = Some("a");
        assert_eq!(pick(&["n2/a/-/ready", "n3/b/-/ready"], &close, a).0, [0]);
        // An endpoint without a zone gets no hint: no topology.
        assert_eq!(pick(&["n2/a/-/ready", "n3/-/-/ready"], &close, a).0, [0, 1]);
        // Hints written by a controller win over the ones made here.
        assert_eq!(pick(&["n2/a/b/ready", "n3/b/a/ready"], &close, a).0, [1]);
        let same_node = svc(Some(PreferSameNode), false);
        let eps = ["n1/a/-/ready", "n2/a/-/ready", "n3/b/-/ready"];
        assert_eq!(pick(&eps, &same_node, a).0, [0]);
        assert_eq!(
            pick(&eps[1..], &same_node, a).0,
            [0],
            "no local one: the zone's"
        );
    }
}
