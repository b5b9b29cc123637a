//! rsdn's `kube` cluster source against the lab's stand-in API server (`rsdn_lab::apiserver`),
//! over real HTTP on the loopback of a fresh network namespace: the same objects (Nodes,
//! Services, EndpointSlices, Pods, Namespaces, NetworkPolicies) give the same model as the
//! `dir` source; changes, bookmarks, a dropped connection, a 410 Gone and paged lists are
//! handled the way kube-rs's watcher handles them against a real API server. And what the
//! daemon writes back: its Node's NetworkUnavailable condition, once per readiness, retried
//! until it goes through.

use std::sync::Arc;
use std::time::Duration;

use rsdn::model::{ClusterModel, ModelScope};
use rsdn_lab::apiserver::{ApiServer, Kind};
use rsdn_testkit::{need_root, Netns};
use serde_json::{json, Value};
use tokio::sync::watch;

fn scope() -> ModelScope {
    ModelScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        local_node: "n1".into(),
        programmed: Default::default(),
    }
}

fn node(name: &str, ip: &str, cidr: Option<&str>, created: &str) -> Value {
    let mut n = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "creationTimestamp": created},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
    if let Some(c) = cidr {
        n["spec"] = json!({"podCIDR": c, "podCIDRs": [c]});
    }
    n
}

/// A Pod: `ip` None for one not given an address yet, `phase` Succeeded or Failed for one that
/// finished. Every pod carries the fields the source drops (annotations, managedFields, env,
/// volumes, container statuses), as the API server serves them.
fn pod(ns: &str, name: &str, node: &str, labels: Value, ip: Option<&str>, phase: &str) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
            "annotations": {"prometheus.io/scrape": "true"},
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}}}}]},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.example/app:1",
            "env": [{"name": "LOG_LEVEL", "value": "info"}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}]},
        "status": {"phase": phase,
            "containerStatuses": [{"name": "c", "image": "registry.example/app:1", "imageID": "",
                "ready": true, "restartCount": 0}]}});
    if let Some(ip) = ip {
        p["status"]["podIP"] = json!(ip);
        p["status"]["podIPs"] = json!([{ "ip": ip }]);
    }
    p
}

fn host_network_pod(name: &str, node: &str, ip: &str) -> Value {
    let mut p = pod(
        "kube-system",
        name,
        node,
        json!({"app": "agent"}),
        Some(ip),
        "Running",
    );
    p["spec"]["hostNetwork"] = json!(true);
    p
}

fn namespace(name: &str, labels: Value) -> Value {
    let mut labels = labels;
    labels["kubernetes.io/metadata.name"] = json!(name);
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels,
            "annotations": {"owner": "team@example.com"}},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// Pods, Namespaces and NetworkPolicies of every shape the model treats differently.
fn policy_objects() -> Vec<Value> {
    vec![
        namespace("shop", json!({"team": "payments"})),
        namespace("db", json!({"team": "data"})),
        namespace("kube-system", json!({})),
        pod(
            "shop",
            "web-1",
            "n1",
            json!({"app": "web"}),
            Some("10.128.0.5"),
            "Running",
        ),
        pod(
            "shop",
            "web-2",
            "n2",
            json!({"app": "web"}),
            Some("10.128.2.5"),
            "Running",
        ),
        pod(
            "db",
            "pg-0",
            "n2",
            json!({"app": "pg"}),
            Some("10.128.2.9"),
            "Running",
        ),
        pod("db", "pg-1", "n2", json!({"app": "pg"}), None, "Pending"),
        pod(
            "shop",
            "job-1",
            "n1",
            json!({"app": "job"}),
            Some("10.128.0.30"),
            "Succeeded",
        ),
        pod(
            "shop",
            "job-2",
            "n1",
            json!({"app": "job"}),
            Some("10.128.0.31"),
            "Failed",
        ),
        host_network_pod("agent-n1", "n1", "192.168.1.11"),
        policy("db", "deny-all", json!({"podSelector": {}})),
        policy(
            "db",
            "pg-from-shop",
            json!({"podSelector": {"matchLabels": {"app": "pg"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "payments"}},
                                   "podSelector": {"matchLabels": {"app": "web"}}}],
                         "ports": [{"port": 5432}]}]}),
        ),
        policy(
            "shop",
            "web-egress",
            json!({"podSelector": {"matchExpressions": [
                {"key": "app", "operator": "In", "values": ["web", "api"]}]},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.128.0.0/14", "except": ["10.128.4.0/23"]}}],
                        "ports": [{"port": "http"}, {"protocol": "UDP", "port": 53}]}]}),
        ),
        // An invalid peer: left out, the policy kept and recorded as skipped.
        policy(
            "shop",
            "bad-peer",
            json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "not-a-cidr"}},
                                  {"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
        ),
    ]
}

/// Runs `f` with a server and a kube source feeding a model channel, inside a fresh netns
/// (the HTTP traffic stays on that namespace's loopback).
/// The daemon asked the server for nothing but lists and watches of the resources in
/// `WATCHED` and patches of those in `PATCHED`, which tests/manifests.rs checks the
/// ClusterRole against: so the ClusterRole covers everything the daemon uses.
fn asked_exactly_what_rbac_grants(server: &ApiServer) {
    let r = server.requests();
    assert!(r.refused.is_empty(), "asked for more: {:?}", r.refused);
    let mut asked = std::collections::BTreeSet::new();
    for (verb, kinds) in [("list", &r.lists), ("watch", &r.watches)] {
        for kind in kinds.keys() {
            let (group, resource) = kind.resource();
            asked.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    for p in &r.patches {
        let (group, resource, verb) = p.rbac;
        asked.insert((group.to_string(), resource.to_string(), verb.to_string()));
    }
    let watched: std::collections::BTreeSet<_> = rsdn::source::kube::WATCHED
        .iter()
        .chain(rsdn::node_status::PATCHED)
        .flat_map(|(g, res, verbs)| {
            verbs
                .iter()
                .map(|v| (g.to_string(), res.to_string(), v.to_string()))
        })
        .collect();
    // (A short test may end before every watch has started.)
    assert!(
        asked.is_subset(&watched),
        "asked {asked:?}, WATCHED and PATCHED {watched:?}"
    );
}

/// Runs `f` on a runtime of the calling thread (a namespace's thread).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A kube source for `kubeconfig`, feeding the returned model channel.
async fn start_source(kubeconfig: &std::path::Path) -> watch::Receiver<Arc<ClusterModel>> {
    let client = rsdn::source::kube::client(Some(kubeconfig)).await.unwrap();
    let (tx, rx) = watch::channel(Arc::new(ClusterModel::default()));
    tokio::spawn(rsdn::source::kube::run(
        client,
        scope(),
        tx,
        Duration::from_secs(300),
    ));
    rx
}

fn with_source<F, Fut>(page_note: &str, f: F)
where
    F: FnOnce(Arc<ApiServer>, watch::Receiver<Arc<ClusterModel>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let ns = Netns::new(page_note);
    ns.ip(&["link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    ns.on_thread(move || {
        block_on(async move {
            let server = ApiServer::new(Duration::from_millis(100));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(Arc::clone(&server).serve(listener));
            std::fs::write(&kubeconfig, rsdn_lab::apiserver::kubeconfig(&url)).unwrap();
            let rx = start_source(&kubeconfig).await;
            f(Arc::clone(&server), rx).await;
            asked_exactly_what_rbac_grants(&server);
        });
    });
}

/// Waits (up to 10 s) for a model that satisfies `want`.
async fn model_where(
    rx: &mut watch::Receiver<Arc<ClusterModel>>,
    what: &str,
    want: impl Fn(&ClusterModel) -> bool,
) -> Arc<ClusterModel> {
    let found = match tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|m| want(m))).await
    {
        Ok(Ok(m)) => Some(Arc::clone(&m)),
        _ => None,
    };
    found.unwrap_or_else(|| {
        let m = rx.borrow();
        let names: Vec<&String> = m.nodes.keys().take(10).collect();
        panic!(
            "no model with {what} within 10 s; last has {} nodes ({names:?}...), {} Service ports",
            m.nodes.len(),
            m.services.ports.len()
        )
    })
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 10 s: {what}");
}

#[test]
fn the_same_objects_give_the_same_model_as_the_dir_source() {
    need_root!();
    // Service shapes of the golden test, and nodes the model accepts and refuses.
    let mut yaml = include_str!("../../src/proxy/testdata/cluster.yaml").to_string();
    let nodes = [
        node(
            "n1",
            "192.168.1.11",
            Some("10.128.0.0/23"),
            "2025-01-01T00:00:00Z",
        ),
        node(
            "n2",
            "192.168.1.12",
            Some("10.128.2.0/23"),
            "2025-01-02T00:00:00Z",
        ),
        node(
            "n3",
            "192.168.1.13",
            Some("10.128.2.0/24"),
            "2025-01-03T00:00:00Z",
        ),
        node("n4", "192.168.1.14", None, "2025-01-04T00:00:00Z"),
        node(
            "n5",
            "192.168.1.15",
            Some("10.200.0.0/23"),
            "2025-01-05T00:00:00Z",
        ),
    ];
    // A slice the EndpointSlice controller wrote, with the time of the change behind it.
    let triggered = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "svc1-def", "namespace": "ns1",
            "labels": {"kubernetes.io/service-name": "svc1"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2025-03-01T10:00:00.25Z"}},
        "addressType": "IPv4", "ports": [{"name": "p80", "port": 8080}],
        "endpoints": [{"addresses": ["10.128.2.9"], "nodeName": "n2"}]});
    // The local node is going away: tainted by the cluster autoscaler and being deleted.
    let mut nodes = nodes;
    nodes[0]["spec"]["taints"] = json!([
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]);
    nodes[0]["metadata"]["deletionTimestamp"] = json!("2025-06-01T12:00:00Z");
    for n in nodes.into_iter().chain([triggered]).chain(policy_objects()) {
        yaml.push_str("---\n");
        yaml.push_str(&serde_json::to_string(&n).unwrap());
        yaml.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), &yaml).unwrap();
    let from_dir = rsdn::source::dir::read_cluster_dir(dir.path(), &scope()).unwrap();
    assert_eq!(from_dir.nodes.len(), 2, "{:?}", from_dir.skipped);
    assert!(from_dir.services.ports.len() >= 7);
    assert_eq!(from_dir.services.change_triggers.len(), 1);
    let leaving = from_dir.local_lifecycle.as_ref().and_then(|l| l.leaving());
    assert!(leaving.is_some_and(|why| why.contains("being deleted")));
    assert_eq!(from_dir.skipped.len(), 4, "{:?}", from_dir.skipped);
    // Of the pods, those with an address of the pod network that run (or will).
    let pods: Vec<&str> = from_dir.pods.keys().map(|(_, n)| n.as_str()).collect();
    assert_eq!(pods, ["pg-0", "web-1", "web-2"]);
    assert_eq!((from_dir.namespaces.len(), from_dir.policies.len()), (3, 4));

    let docs = rsdn::source::dir::read_documents(&yaml).unwrap();
    with_source("kubeeq", move |server, mut rx| async move {
        assert!(server.sync_objects(docs).is_empty());
        let from_api = model_where(&mut rx, "the nodes", |m| !m.nodes.is_empty()).await;
        assert_eq!(from_api.nodes, from_dir.nodes);
        assert_eq!(from_api.local_lifecycle, from_dir.local_lifecycle);
        assert_eq!(from_api.services, from_dir.services);
        assert_eq!(from_api.pods, from_dir.pods);
        assert_eq!(from_api.namespaces, from_dir.namespaces);
        assert_eq!(from_api.policies, from_dir.policies);
        let mut a = from_api.skipped.clone();
        let mut d = from_dir.skipped.clone();
        a.sort_by(|x, y| x.object.cmp(&y.object));
        d.sort_by(|x, y| x.object.cmp(&y.object));
        assert_eq!(a, d);
        // The finished and hostNetwork pods never came: the API server left them out.
        let r = server.requests();
        assert_eq!(
            r.field_selectors[&Kind::Pod],
            rsdn::source::kube::POD_FIELD_SELECTOR
        );
    });
}

/// One of `policy_objects()`, changed by `change`.
fn changed(name: &str, change: impl FnOnce(&mut Value)) -> Value {
    let mut o = policy_objects()
        .into_iter()
        .find(|o| o["metadata"]["name"] == name)
        .unwrap();
    change(&mut o);
    o
}

/// Pods, Namespaces and NetworkPolicies that change reach the model: a pod relabelled, a pod
/// that finishes (the API server's watch reports it deleted: it no longer matches the field
/// selector), a namespace relabelled, a policy deleted, a pod that gets its address.
#[test]
fn pod_namespace_and_policy_changes_reach_the_model() {
    need_root!();
    with_source("kubepods", |server, mut rx| async move {
        assert!(server.sync_objects(policy_objects()).is_empty());
        let key = |ns: &str, n: &str| (ns.to_string(), n.to_string());
        let label = |m: &ClusterModel, ns: &str, pod: &str| {
            let p = m.pods.get(&key(ns, pod));
            p.and_then(|p| p.labels.get("app").cloned())
        };
        model_where(&mut rx, "the pods and policies", |m| {
            m.pods.len() == 3 && m.policies.len() == 4 && m.namespaces.len() == 3
        })
        .await;

        let relabelled = changed("web-1", |p| p["metadata"]["labels"]["app"] = json!("api"));
        server.apply(relabelled).unwrap();
        model_where(&mut rx, "web-1 relabelled", |m| {
            label(m, "shop", "web-1").as_deref() == Some("api")
        })
        .await;

        server.delete(&(Kind::NetworkPolicy, "db".into(), "deny-all".into()));
        let m = model_where(&mut rx, "deny-all gone", |m| m.policies.len() == 3).await;
        assert!(!m.policies.contains_key(&key("db", "deny-all")));

        // web-2 finishes: a modification on the API server, a deletion for the daemon.
        let watches = server.requests().watches[&Kind::Pod];
        let done = changed("web-2", |p| p["status"]["phase"] = json!("Succeeded"));
        server.apply(done).unwrap();
        model_where(&mut rx, "web-2 gone", |m| {
            label(m, "shop", "web-2").is_none()
        })
        .await;
        assert_eq!(
            server.requests().watches[&Kind::Pod],
            watches,
            "over the open watch, not by a relist"
        );

        // pg-1 gets its address; the db namespace a new label.
        let started = changed("pg-1", |p| {
            p["status"]["phase"] = json!("Running");
            p["status"]["podIP"] = json!("10.128.2.10");
            p["status"]["podIPs"] = json!([{"ip": "10.128.2.10"}]);
        });
        server.apply(started).unwrap();
        let relabelled = changed("db", |n| {
            n["metadata"]["labels"]["team"] = json!("payments")
        });
        server.apply(relabelled).unwrap();
        let m = model_where(&mut rx, "pg-1 and db's label", |m| {
            let team = m.namespaces["db"].labels.get("team");
            label(m, "db", "pg-1").is_some() && team.map(String::as_str) == Some("payments")
        })
        .await;
        assert_eq!(m.pods[&key("db", "pg-1")].ip.to_string(), "10.128.2.10");
        let pods: Vec<&str> = m.pods.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(pods, ["pg-0", "pg-1", "web-1"]);
    });
}

#[test]
fn changes_bookmarks_a_dropped_connection_and_410_gone() {
    need_root!();
    with_source("kubewatch", |server, mut rx| async move {
        let a = node(
            "n1",
            "192.168.1.11",
            Some("10.128.0.0/23"),
            "2025-01-01T00:00:00Z",
        );
        let b = node(
            "n2",
            "192.168.1.12",
            Some("10.128.2.0/23"),
            "2025-01-02T00:00:00Z",
        );
        server.apply(a).unwrap();
        server.apply(b.clone()).unwrap();
        model_where(&mut rx, "2 nodes", |m| m.nodes.len() == 2).await;
        assert_eq!(server.requests().lists[&Kind::Node], 1);

        // Added and modified.
        let c = node(
            "n3",
            "192.168.1.13",
            Some("10.128.4.0/23"),
            "2025-01-03T00:00:00Z",
        );
        server.apply(c.clone()).unwrap();
        model_where(&mut rx, "n3", |m| m.nodes.contains_key("n3")).await;
        let mut c2 = c.clone();
        c2["status"]["addresses"][0]["address"] = json!("192.168.1.99");
        server.apply(c2).unwrap();
        model_where(&mut rx, "n3 moved", |m| {
            m.nodes
                .get("n3")
                .is_some_and(|n| n.ip.to_string() == "192.168.1.99")
        })
        .await;

        // Bookmarks: only Services change; the Node watch learns the new version from a
        // bookmark, and after a dropped connection resumes from it, without a relist.
        let svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "172.30.0.10", "ports": [{"port": 80}]}});
        server.apply(svc).unwrap();
        let rv = server.resource_version();
        model_where(&mut rx, "the Service", |m| !m.services.ports.is_empty()).await;
        let before = server.requests();
        until("a bookmark after the change", || {
            server.requests().bookmarks_sent >= before.bookmarks_sent + 6
        })
        .await;
        server.drop_watches();
        until("the Node watch resumed", || {
            server.requests().watches[&Kind::Node] > before.watches[&Kind::Node]
        })
        .await;
        let after = server.requests();
        assert_eq!(after.lists, before.lists, "a dropped watch must not relist");
        assert!(
            after.last_watch_from[&Kind::Node] >= rv,
            "the Node watch resumed from {} although a bookmark said {rv}",
            after.last_watch_from[&Kind::Node]
        );
        // Changes made after the drop arrive over the resumed watch.
        server.delete(&(Kind::Node, String::new(), "n3".into()));
        model_where(&mut rx, "n3 gone", |m| !m.nodes.contains_key("n3")).await;

        // 410 Gone: every watcher relists, and the model follows what changed meanwhile.
        server.expire();
        server.delete(&(Kind::Node, String::new(), "n2".into()));
        model_where(&mut rx, "n2 gone", |m| !m.nodes.contains_key("n2")).await;
        // (every kind the daemon lists: the server serves more than it watches)
        until("a relist of every kind", || {
            let r = server.requests();
            after.lists.keys().all(|k| r.lists[k] > after.lists[k])
        })
        .await;
        assert!(server.requests().gone_sent >= 3);
        server.apply(b).unwrap();
        model_where(&mut rx, "n2 back", |m| m.nodes.contains_key("n2")).await;
    });
}

/// A newcomer whose podCIDR overlaps a node of the published model is left out, however old
/// its creationTimestamp says it is: the subnet's traffic already goes to the established node.
#[test]
fn a_new_node_does_not_take_over_a_published_subnet() {
    need_root!();
    with_source("kubeclaim", |server, mut rx| async move {
        for (name, ip, created) in [
            ("n1", "192.168.1.11", "2025-01-01T00:00:00Z"),
            ("node2", "192.168.1.12", "2025-01-02T00:00:00Z"),
        ] {
            let cidr = if name == "n1" {
                "10.128.0.0/23"
            } else {
                "10.128.2.0/23"
            };
            server.apply(node(name, ip, Some(cidr), created)).unwrap();
        }
        model_where(&mut rx, "node2", |m| m.nodes.contains_key("node2")).await;
        let newcomer = node(
            "zzz-new",
            "192.168.1.99",
            Some("10.128.2.0/23"),
            "2020-01-01T00:00:00Z",
        );
        server.apply(newcomer).unwrap();
        let m = model_where(&mut rx, "the conflict", |m| m.conflicts().count() == 1).await;
        assert_eq!(m.nodes.keys().collect::<Vec<_>>(), ["n1", "node2"]);
        let lost = m.conflicts().next().unwrap();
        assert_eq!(
            (lost.object.as_str(), lost.conflicts_with.as_deref()),
            ("Node/zzz-new", Some("node2"))
        );
    });
}

#[test]
fn large_lists_are_paged() {
    need_root!();
    with_source("kubepage", |server, mut rx| async move {
        let nodes: Vec<Value> = (0..1200u32)
            .map(|i| {
                let ip = format!("192.168.{}.{}", 10 + i / 200, 1 + i % 200);
                // /25s: 1200 of them fit in the /14 cluster network.
                let cidr = format!(
                    "10.{}.{}.{}/25",
                    128 + i / 512,
                    (i % 512) / 2,
                    128 * (i % 2)
                );
                node(&format!("n{i}"), &ip, Some(&cidr), "2025-01-01T00:00:00Z")
            })
            .collect();
        assert!(server.sync_objects(nodes).is_empty());
        let m = model_where(&mut rx, "1200 nodes", |m| m.nodes.len() == 1200).await;
        assert!(
            m.skipped.is_empty(),
            "{:?}",
            &m.skipped[..3.min(m.skipped.len())]
        );
        // kube-rs asks for pages of 500: three requests for one list.
        assert_eq!(server.requests().lists[&Kind::Node], 3);
    });
}

/// What a pod's service account gives the daemon in a cluster: HTTPS with the cluster's CA and
/// a bearer token. The client trusts the CA it is given and sends the token; without the token
/// the server answers 401 and the request is recorded as refused.
#[test]
fn https_with_a_ca_and_a_bearer_token() {
    need_root!();
    let ns = Netns::new("kubetls");
    ns.ip(&["link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let sa = dir.path().join("serviceaccount");
    let (base, ca) = (dir.path().to_path_buf(), sa.join("ca.crt"));
    let kubeconfig = move |name: &str, url: &str, token: Option<&str>| {
        let user = match token {
            Some(t) => format!("{{token: {t}}}"),
            None => "{}".to_string(),
        };
        let path = base.join(name);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{url}\", certificate-authority: {}}}\n\
                 users:\n- name: u\n  user: {user}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
                ca.display()
            ),
        )
        .unwrap();
        path
    };
    ns.on_thread(move || {
        block_on(async move {
            let server = ApiServer::new(Duration::from_millis(100));
            let (tls, token) =
                rsdn_lab::apiserver::service_account(&sa, "127.0.0.1".parse().unwrap()).unwrap();
            server.require_token(token.clone());
            assert_eq!(std::fs::read_to_string(sa.join("token")).unwrap(), token);
            server
                .apply(node(
                    "n1",
                    "192.168.1.11",
                    Some("10.128.0.0/23"),
                    "2025-01-01T00:00:00Z",
                ))
                .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("https://{}", listener.local_addr().unwrap());
            tokio::spawn(Arc::clone(&server).serve_tls(listener, Some(tls)));

            let mut rx = start_source(&kubeconfig("good", &url, Some(&token))).await;
            model_where(&mut rx, "n1 over HTTPS", |m| m.nodes.contains_key("n1")).await;
            asked_exactly_what_rbac_grants(&server);

            let anonymous = kubeconfig("anonymous", &url, None);
            let client = rsdn::source::kube::client(Some(&anonymous)).await.unwrap();
            let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
            let err = nodes.list(&Default::default()).await.unwrap_err();
            assert!(
                err.to_string().contains("401") || err.to_string().contains("Unauthorized"),
                "{err}"
            );
            let refused = server.requests().refused;
            assert!(
                refused.iter().any(|r| r.contains("no valid bearer token")),
                "{refused:?}"
            );
        });
    });
}

/// A stand-in API server on the loopback of the calling thread's namespace; the kubeconfig
/// for it is written to `kubeconfig`.
async fn serve_plain(kubeconfig: &std::path::Path) -> Arc<ApiServer> {
    let server = ApiServer::new(Duration::from_millis(100));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(Arc::clone(&server).serve(listener));
    std::fs::write(kubeconfig, rsdn_lab::apiserver::kubeconfig(&url)).unwrap();
    server
}

fn condition<'a>(node: &'a Value, kind: &str) -> &'a Value {
    node["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

/// The real daemon (`rsdn::daemon::run`, kube source) in a node namespace: once its node
/// network is programmed (the conflist written) it patches its Node's status, once, with the
/// condition flannel and Calico write under their names (NetworkUnavailable=False, RsdnIsUp),
/// merged beside the kubelet's conditions; passes after that patch nothing. A restarted daemon
/// becomes ready again and patches once more.
#[test]
fn the_daemon_clears_network_unavailable_once_per_readiness() {
    need_root!();
    let ns = Netns::new("kubecond");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.ip(&["addr", "add", "192.168.1.11/24", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["link", "set", "peer0", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    ns.on_thread(move || {
        block_on(async move {
            let kubeconfig = root.join("kubeconfig");
            let server = serve_plain(&kubeconfig).await;
            let mut n1 = node(
                "n1",
                "192.168.1.11",
                Some("10.128.0.0/23"),
                "2025-01-01T00:00:00Z",
            );
            // As a cloud's node controller leaves a new Node, beside the kubelet's condition.
            n1["status"]["conditions"] = json!([
                {"type": "Ready", "status": "True", "reason": "KubeletReady"},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}]);
            server.apply(n1).unwrap();
            let key = (Kind::Node, String::new(), "n1".to_string());
            for run in 1..=2 {
                let mut config = rsdn::config::NodeConfig::for_test("n1");
                config.source = rsdn::config::SourceConfig::Kube(Some(kubeconfig.clone()));
                config.cni_conf_dir = root.join("net.d");
                config.cni_data_dir = Some(root.join("ipam"));
                config.cni_bin_dir = root.join("bin");
                config.resync_seconds = 1;
                let conflist = config.cni_conf_path();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let daemon = rsdn::daemon::run(config, async {
                    let _ = stopped.await;
                });
                let checks = async {
                    until("the conflist and a patch of the Node's status", || {
                        conflist.exists() && server.requests().patches.len() >= run
                    })
                    .await;
                    // Passes every second after that: none patches again.
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    assert_eq!(server.requests().patches.len(), run, "run {run}");
                    stop.send(()).unwrap();
                };
                let (ran, ()) = tokio::join!(daemon, checks);
                ran.unwrap();
            }
            let r = server.requests();
            for p in &r.patches {
                assert_eq!(
                    (p.node.as_str(), p.code, p.field_manager.as_str()),
                    ("n1", 200, "rsdn")
                );
                assert_eq!(p.content_type, "application/strategic-merge-patch+json");
                let sent = &p.body["status"]["conditions"];
                assert_eq!(sent.as_array().unwrap().len(), 1, "{sent}");
                assert_eq!(sent[0]["type"], "NetworkUnavailable");
                assert_eq!(sent[0]["status"], "False");
                assert_eq!(sent[0]["reason"], rsdn::node_status::REASON);
                assert!(sent[0]["lastTransitionTime"].is_string(), "{sent}");
            }
            // Served back: ours set, the kubelet's kept.
            let n1 = server.object(&key).unwrap();
            let ours = condition(&n1, "NetworkUnavailable");
            assert_eq!(
                (&ours["status"], &ours["reason"]),
                (&json!("False"), &json!("RsdnIsUp"))
            );
            assert_eq!(condition(&n1, "Ready")["reason"], "KubeletReady");
            asked_exactly_what_rbac_grants(&server);
        });
    });
}

/// The patch is retried with backoff until it goes through (here: until the Node exists),
/// and then never again.
#[test]
fn the_condition_is_retried_until_the_api_server_takes_it() {
    need_root!();
    let ns = Netns::new("kuberetry");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    ns.on_thread(move || {
        block_on(async move {
            let server = serve_plain(&kubeconfig).await;
            let client = rsdn::source::kube::client(Some(&kubeconfig)).await.unwrap();
            let (ready, ready_rx) = watch::channel(false);
            let backoff = rsdn::node_status::Backoff {
                first: Duration::from_millis(20),
                max: Duration::from_millis(80),
            };
            let task = tokio::spawn(rsdn::node_status::run(
                client,
                "n9".into(),
                ready_rx,
                backoff,
            ));
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(server.requests().patches.is_empty(), "before readiness");
            ready.send(true).unwrap();
            until("two refused attempts", || {
                server.requests().patches.len() >= 2
            })
            .await;
            assert!(server.requests().patches.iter().all(|p| p.code == 404));
            server
                .apply(node(
                    "n9",
                    "192.168.1.19",
                    Some("10.128.18.0/23"),
                    "2025-01-09T00:00:00Z",
                ))
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("done once it went through")
                .unwrap();
            let r = server.requests();
            let codes: Vec<u16> = r.patches.iter().map(|p| p.code).collect();
            assert_eq!(codes.iter().filter(|c| **c == 200).count(), 1, "{codes:?}");
            assert_eq!(codes.last(), Some(&200), "{codes:?}");
            let n9 = server
                .object(&(Kind::Node, String::new(), "n9".into()))
                .unwrap();
            assert_eq!(condition(&n9, "NetworkUnavailable")["status"], "False");
            asked_exactly_what_rbac_grants(&server);
        });
    });
}
