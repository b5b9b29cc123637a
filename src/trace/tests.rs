//! The trace's paths for each kind of flow, from the model of `testdata/cluster.yaml` (three
//! nodes as the lab has them), and drift against a kernel view with an entry missing.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::compare::compare;
use super::path::{Path, Status, Tracer, Verdict};
use super::spec::{parse, resolve};
use super::view::{model_view, NodeView};
use crate::config::NodeConfig;
use crate::model::{ClusterModel, ModelBuilder};

fn model() -> Arc<ClusterModel> {
    let mut b = ModelBuilder::default();
    crate::source::dir::add_documents(
        &mut b,
        "cluster.yaml",
        include_str!("testdata/cluster.yaml"),
    );
    let m = b.finish(&crate::daemon::model_scope(&NodeConfig::for_test("node1")));
    assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    Arc::new(m)
}

fn views(model: &Arc<ClusterModel>) -> BTreeMap<String, NodeView> {
    let config = NodeConfig::for_test("node1");
    model
        .nodes
        .values()
        .map(|n| (n.name.clone(), model_view(&config, model, n)))
        .collect()
}

fn trace_with(
    views: &BTreeMap<String, NodeView>,
    model: &ClusterModel,
    src: &str,
    dst: &str,
) -> Vec<Path> {
    let get = |n: &str| views.get(n);
    let t = Tracer {
        model,
        views: &get,
        via: None,
    };
    let src = resolve(&parse(src).unwrap(), model, false).unwrap();
    let dst = resolve(&parse(dst).unwrap(), model, true).unwrap();
    t.trace(&src, &dst, 40000).unwrap().1
}

fn trace(src: &str, dst: &str) -> Vec<Path> {
    let m = model();
    trace_with(&views(&m), &m, src, dst)
}

/// "node stage" for every hop.
fn stages(p: &Path) -> Vec<String> {
    p.hops
        .iter()
        .map(|h| format!("{} {}", h.node.as_deref().unwrap_or("-"), h.stage))
        .collect()
}

/// (table, chain, target) of every rule matched on a node.
fn rules_on(p: &Path, node: &str) -> Vec<String> {
    p.hops
        .iter()
        .filter(|h| h.node.as_deref() == Some(node))
        .flat_map(|h| {
            h.rules
                .iter()
                .map(|r| format!("{} {} {}", r.table, r.chain, r.target))
        })
        .collect()
}

#[test]
fn pod_to_pod_across_nodes_walks_the_overlay_and_keeps_its_source() {
    let paths = trace("x/a", "10.128.2.2:8080");
    assert_eq!(paths.len(), 1);
    let p = &paths[0];
    assert_eq!(
        stages(p),
        [
            "node1 source",
            "node1 tun0",
            "node1 nat PREROUTING",
            "node1 route",
            "node1 filter FORWARD",
            "node1 nat POSTROUTING",
            "node1 vxlan0",
            "node2 nat PREROUTING",
            "node2 route",
            "node2 filter FORWARD",
            "node2 nat POSTROUTING",
            "node2 deliver"
        ]
    );
    assert_eq!(
        (p.verdict, p.seen_source.as_deref()),
        (Verdict::Delivered, Some("10.128.0.2:40000"))
    );
    let vx = &p.hops[6];
    assert_eq!(
        vx.lines[..2],
        [
            "neigh 10.128.2.0 lladdr 0a:58:c0:a8:4d:0c nud permanent",
            "fdb 0a:58:c0:a8:4d:0c dst 192.168.77.12 self permanent"
        ]
    );
    assert_eq!(
        p.hops[3].lines,
        ["10.128.2.0/23 via 10.128.2.0 dev vxlan0 onlink src 10.128.0.1 proto 212"]
    );
    assert_eq!(
        rules_on(p, "node1")[7..],
        [
            "filter RSDN-FORWARD ACCEPT",
            "nat POSTROUTING KUBE-POSTROUTING",
            "nat KUBE-POSTROUTING RETURN",
            "nat POSTROUTING RSDN-MASQUERADE",
            "nat RSDN-MASQUERADE RETURN"
        ]
    );
}

#[test]
fn pod_to_pod_on_one_node_is_bridged() {
    let p = &trace("x/a", "10.128.0.3:8080")[0];
    assert_eq!(
        stages(p),
        [
            "node1 source",
            "node1 tun0",
            "node1 nat PREROUTING",
            "node1 filter FORWARD",
            "node1 nat POSTROUTING",
            "node1 deliver"
        ]
    );
    assert!(
        p.hops[1].summary.contains("bridges"),
        "{}",
        p.hops[1].summary
    );
}

#[test]
fn a_cluster_ip_forks_into_its_endpoints() {
    let paths = trace("x/a", "x/web:http");
    let ends: Vec<(f64, Option<&str>)> = paths
        .iter()
        .map(|p| (p.probability, p.endpoint.as_deref()))
        .collect();
    assert_eq!(
        ends,
        [
            (0.5, Some("10.128.0.3:8080")),
            (0.5, Some("10.128.2.2:8080"))
        ]
    );
    for p in &paths {
        assert_eq!(p.seen_source.as_deref(), Some("10.128.0.2:40000"));
        let nat: Vec<&str> = p.hops[2..4]
            .iter()
            .flat_map(|h| h.rules.iter().map(|r| r.target.as_str()))
            .collect();
        assert_eq!(nat[0], "KUBE-SERVICES");
        assert!(
            nat[1].starts_with("KUBE-SVC-") && nat[2].starts_with("KUBE-SEP-") && nat[3] == "DNAT",
            "{nat:?}"
        );
    }
    assert_eq!(paths[1].hops.last().unwrap().node.as_deref(), Some("node2"));
}

#[test]
fn a_nodeport_with_the_cluster_policy_is_masqueraded_to_the_vtep() {
    let paths = trace("192.168.77.250", "node:node3:30080");
    assert_eq!(paths.len(), 2);
    for p in &paths {
        assert_eq!(p.hops[1].node.as_deref(), Some("node3"));
        assert_eq!(
            p.seen_source.as_deref(),
            Some("10.128.4.0:(a random port)"),
            "{}",
            p.outcome()
        );
        assert!(p.hops.iter().any(|h| h
            .summary
            .contains("masqueraded by KUBE-POSTROUTING to 10.128.4.0")));
    }
}

#[test]
fn a_nodeport_with_the_local_policy_keeps_the_client_or_drops() {
    let p = &trace("192.168.77.250", "node:node2:30081")[0];
    assert_eq!(
        (p.verdict, p.seen_source.as_deref()),
        (Verdict::Delivered, Some("192.168.77.250:40000"))
    );
    assert!(p.hops[1]
        .lines
        .iter()
        .any(|l| l.starts_with("externalTrafficPolicy: Local")));
    let p = &trace("192.168.77.250", "192.168.77.13:30081")[0];
    assert_eq!(p.verdict, Verdict::Dropped, "{}", p.outcome());
    assert_eq!(
        p.reason.as_deref(),
        Some("x/local:http has no local endpoints")
    );
    assert_eq!(p.hops.last().unwrap().stage, "filter INPUT");
}

#[test]
fn a_pod_reaching_outside_is_masqueraded_to_its_node() {
    let p = &trace("x/b", "192.168.77.250:9000")[0];
    assert_eq!(
        p.seen_source.as_deref(),
        Some("192.168.77.12:(a random port)")
    );
    assert!(p.hops.iter().any(|h| h.stage == "underlay"));
    assert!(p.to.contains("outside the cluster"));
}

/// Whether the last filter FORWARD hop of a path has a line containing `text`.
fn forward_says(p: &Path, text: &str) -> bool {
    let hop = p.hops.iter().rfind(|h| h.stage == "filter FORWARD");
    hop.is_some_and(|h| h.lines.iter().any(|l| l.contains(text)))
}

#[test]
fn a_policy_names_what_allows_and_what_denies() {
    let p = &trace("x/a", "10.128.2.3:80")[0];
    assert_eq!(p.verdict, Verdict::Dropped);
    assert!(forward_says(
        p,
        "locked/d is isolated for ingress by locked/only-c; nothing allows this"
    ));
    assert_eq!(
        p.reason.as_deref(),
        Some("no NetworkPolicy allows this ingress")
    );
    let p = &trace("x/c", "10.128.2.3:80")[0];
    assert_eq!(p.verdict, Verdict::Delivered);
    assert!(forward_says(p, "allowed by locked/only-c ingress rule 0"));
}

#[test]
fn a_hairpin_is_masqueraded_to_the_gateway() {
    let paths = trace("x/a", "x/self:http");
    assert_eq!(paths.len(), 1);
    let p = &paths[0];
    assert_eq!(p.seen_source.as_deref(), Some("10.128.0.1:(a random port)"));
    assert!(p.hops.last().unwrap().summary.contains("hairpin"));
    assert!(p.hops.iter().any(|h| h
        .lines
        .iter()
        .any(|l| l.starts_with("sessionAffinity: ClientIP (10800 s)"))));
}

/// The model's paths of pod x/a to pod x/b, compared with those of a kernel view of node1
/// that `edit` changed.
fn against_kernel(edit: impl FnOnce(&mut NodeView)) -> Vec<Path> {
    let m = model();
    let model_views = views(&m);
    let mut paths = trace_with(&model_views, &m, "x/a", "10.128.2.2:8080");
    let mut kernel = model_views.clone();
    edit(kernel.get_mut("node1").unwrap());
    let theirs = trace_with(&kernel, &m, "x/a", "10.128.2.2:8080");
    assert!(compare(&mut paths, &theirs, "node1").is_empty());
    paths
}

#[test]
fn a_kernel_without_the_route_or_the_fdb_entry_is_drift() {
    // node2's route deleted by hand.
    let paths = against_kernel(|v| v.routes.retain(|r| r.dst.to_string() != "10.128.2.0/23"));
    let route = &paths[0].hops[3];
    assert_eq!(route.status, Status::Drift);
    assert_eq!(
        route.drift[0].model[1],
        "10.128.2.0/23 via 10.128.2.0 dev vxlan0 onlink src 10.128.0.1 proto 212"
    );
    assert!(
        route.drift[0].kernel[0].contains("none of rsdn's"),
        "{:?}",
        route.drift
    );
    assert_eq!(paths[0].hops[0].status, Status::Checked);
    // Its FDB entry instead.
    let paths = against_kernel(|v| v.overlay.fdb.clear());
    let vx = &paths[0].hops[6];
    assert_eq!(vx.status, Status::Drift);
    assert!(
        vx.drift[0].kernel[0].starts_with("no FDB entry for 0a:58:c0:a8:4d:0c"),
        "{:?}",
        vx.drift
    );
    assert!(paths[0]
        .kernel
        .as_deref()
        .unwrap()
        .starts_with("lost on node1"));
    // Hops of other nodes are predicted.
    assert_eq!(paths[0].hops[8].status, Status::Predicted);
}
