//! The `kube` cluster source: kube-rs watchers with reflectors on Nodes, Services,
//! EndpointSlices, Pods, Namespaces and NetworkPolicies. The watchers list, then watch from the
//! list's resourceVersion, follow bookmarks, relist after a 410 Gone and reconnect with backoff
//! after errors; the reflector stores hold the current objects. A model is built from the
//! stores once all six initial lists are in, then after every burst of events, and from
//! scratch periodically.
//!
//! Pods and Namespaces are cut down to what the model reads before they enter a store
//! (`super::slim`): every pod of the cluster is watched, and most of a pod is fields rsdn
//! never reads.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::slim::{slim_namespace, SlimPod};
use crate::model::{ClusterModel, ModelBuilder, ModelScope};

/// What the daemon reads from the API server, as (API group, resource, verbs): the RBAC rules
/// in `manifests/` are checked against this list by a test.
pub const WATCHED: &[(&str, &str, &[&str])] = &[
    ("", "nodes", &["list", "watch"]),
    ("", "services", &["list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    ("", "pods", &["list", "watch"]),
    ("", "namespaces", &["list", "watch"]),
    ("networking.k8s.io", "networkpolicies", &["list", "watch"]),
];

/// The pods the model can hold: not hostNetwork (never selected, no address of their own) and
/// not finished (their address may already be another pod's). The model leaves the others out
/// anyway (`model::pod`); asking the API server not to send them saves their memory and their
/// status churn. A pod that finishes leaves the selection: the watch reports it deleted.
/// Both are fields the API server selects Pods on (its `pod.ToSelectableFields`); the lab's
/// stand-in API server refuses any other, as the real one does.
pub const POD_FIELD_SELECTOR: &str =
    "spec.hostNetwork=false,status.phase!=Succeeded,status.phase!=Failed";

/// Events are collected this long before the model is rebuilt: a burst is one model.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// A client for `kubeconfig`, or for the in-cluster service account (then $KUBECONFIG and
/// ~/.kube/config) when there is none.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// One object's contribution to the model, kept while its resourceVersion stays the same.
type Parts = HashMap<(&'static str, String), (String, ModelBuilder)>;

/// The six stores, and the per-object cache of what each object contributes.
struct Stores {
    nodes: Store<Node>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<SlimPod>,
    namespaces: Store<Namespace>,
    policies: Store<NetworkPolicy>,
    parts: Parts,
}

impl Stores {
    /// Builds the model from the stores; only objects whose resourceVersion changed are
    /// converted again. Objects are fed in a fixed order (kind, namespace/name), the order a
    /// directory of one file per object gives, so both sources build the same model.
    /// `previous` is the model published last: its nodes' subnet claims are established.
    fn model(&mut self, scope: &ModelScope, previous: Option<&ClusterModel>) -> ClusterModel {
        let mut c = Collect {
            parts: &mut self.parts,
            seen: Vec::new(),
        };
        c.all(&self.nodes, "Node", ModelBuilder::add_node);
        c.all(&self.services, "Service", ModelBuilder::add_service);
        c.all(
            &self.slices,
            "EndpointSlice",
            ModelBuilder::add_endpoint_slice,
        );
        c.all(&self.pods, "Pod", |b, p| b.add_pod(&p.to_pod()));
        c.all(&self.namespaces, "Namespace", ModelBuilder::add_namespace);
        c.all(&self.policies, "NetworkPolicy", ModelBuilder::add_policy);
        let mut seen = c.seen;
        seen.sort();
        let keep: std::collections::HashSet<&(&str, String)> = seen.iter().collect();
        self.parts.retain(|k, _| keep.contains(k));
        let mut builder = ModelBuilder::default();
        for k in &seen {
            builder.absorb(&self.parts[k].1);
        }
        builder.finish_after(scope, previous)
    }
}

/// The objects seen in one build of the model, and the parts of the objects converted so far.
struct Collect<'a> {
    parts: &'a mut Parts,
    seen: Vec<(&'static str, String)>,
}

impl Collect<'_> {
    /// Notes every object of `store` (as `kind`), converting those whose part is missing or
    /// of another resourceVersion.
    fn all<K: Resource<DynamicType = ()> + Clone>(
        &mut self,
        store: &Store<K>,
        kind: &'static str,
        add: fn(&mut ModelBuilder, &K),
    ) {
        for o in store.state() {
            let k = (kind, key(&*o));
            let rv = o.resource_version().unwrap_or_default();
            let fresh = matches!(self.parts.get(&k), Some((v, _)) if *v == rv && !rv.is_empty());
            if !fresh {
                let mut part = ModelBuilder::default();
                add(&mut part, &o);
                self.parts.insert(k.clone(), (rv, part));
            }
            self.seen.push(k);
        }
    }
}

fn key<K: Resource>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

/// Whether `event` changes nothing the store holds but the resourceVersion: most updates of a
/// pod are to fields `SlimPod` leaves out (conditions, container statuses), and they need not
/// wake the model builder. The store keeps the older, equal object.
fn changes_nothing<K>(event: &watcher::Result<watcher::Event<K>>, store: &Store<K>) -> bool
where
    K: Resource<DynamicType = ()> + Clone + PartialEq + 'static,
{
    let Ok(watcher::Event::Apply(new)) = event else {
        return false;
    };
    let Some(old) = store.get(&ObjectRef::from_obj(new)) else {
        return false;
    };
    let mut old = (*old).clone();
    old.meta_mut().resource_version = new.meta().resource_version.clone();
    old == *new
}

/// How one kind is watched: which objects (`config`), and what of each is kept (`trim`, on
/// top of what the type `K` reads).
struct Watch<K> {
    kind: &'static str,
    config: watcher::Config,
    trim: fn(&mut K),
}

impl<K> Watch<K> {
    /// Every object, kept as parsed.
    fn all(kind: &'static str) -> Watch<K> {
        Watch {
            kind,
            config: watcher::Config::default(),
            trim: |_| {},
        }
    }
}

/// Services and EndpointSlices as kube-proxy watches them: without those labelled for another
/// proxy or as headless (the model leaves them out too, so the `dir` source agrees).
fn proxied<K>(kind: &'static str) -> Watch<K> {
    Watch {
        config: watcher::Config::default().labels(crate::model::service::PROXIED_SELECTOR),
        ..Watch::all(kind)
    }
}

/// Runs one reflector until its stream ends; every event that changes the store (and every
/// error, logged) wakes the model builder.
fn reflect<K>(api: Api<K>, how: Watch<K>, wake: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + PartialEq
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let current = reader.clone();
    let kind = how.kind;
    let stream = watcher(api, how.config)
        .default_backoff()
        .modify(how.trim)
        .filter(move |event| std::future::ready(!changes_nothing(event, &current)))
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(
                    ev @ (watcher::Event::InitDone
                    | watcher::Event::Apply(_)
                    | watcher::Event::Delete(_)),
                ) => {
                    if failing {
                        let relisted = matches!(ev, watcher::Event::InitDone);
                        info!(kind, relisted, "watch re-established");
                        failing = false;
                    }
                    wake.notify_one();
                }
                Ok(_) => {}
                Err(e) => {
                    // The watcher relists or reconnects by itself, with backoff.
                    warn!(kind, error = %e, "watch failed; retrying with backoff");
                    failing = true;
                }
            }
        }
    });
    reader
}

/// Feeds `tx` from the API server until the receivers are gone. The first model is sent only
/// once the initial lists of all six kinds are in; `reconcile` is the period of the rebuild
/// from scratch.
pub async fn run(
    client: Client,
    scope: ModelScope,
    tx: watch::Sender<Arc<ClusterModel>>,
    reconcile: Duration,
) {
    let wake = Arc::new(Notify::new());
    let c = &client;
    let pods = Watch {
        config: watcher::Config::default().fields(POD_FIELD_SELECTOR),
        ..Watch::all("Pod")
    };
    let namespaces = Watch {
        trim: slim_namespace,
        ..Watch::all("Namespace")
    };
    let mut stores = Stores {
        nodes: reflect(Api::all(c.clone()), Watch::all("Node"), wake.clone()),
        services: reflect(Api::all(c.clone()), proxied("Service"), wake.clone()),
        slices: reflect(Api::all(c.clone()), proxied("EndpointSlice"), wake.clone()),
        pods: reflect(Api::all(c.clone()), pods, wake.clone()),
        namespaces: reflect(Api::all(c.clone()), namespaces, wake.clone()),
        policies: reflect(
            Api::all(c.clone()),
            Watch::all("NetworkPolicy"),
            wake.clone(),
        ),
        parts: Parts::new(),
    };
    info!(
        "waiting for the initial lists of Nodes, Services, EndpointSlices, Pods, Namespaces \
         and NetworkPolicies"
    );
    let ready = async {
        stores.nodes.wait_until_ready().await?;
        stores.services.wait_until_ready().await?;
        stores.slices.wait_until_ready().await?;
        stores.pods.wait_until_ready().await?;
        stores.namespaces.wait_until_ready().await?;
        stores.policies.wait_until_ready().await
    };
    tokio::select! {
        r = ready => if r.is_err() { return },
        _ = tx.closed() => return,
    }
    let mut publisher = super::Publisher::default();
    let mut next_full = tokio::time::Instant::now() + reconcile;
    loop {
        let started = Instant::now();
        let full = tokio::time::Instant::now() >= next_full;
        if full {
            stores.parts.clear();
            next_full = tokio::time::Instant::now() + reconcile;
        }
        let previous = publisher.previous(&tx);
        let model = stores.model(&scope, previous.as_deref());
        let what = if !publisher.published() {
            "initial lists received from the API server"
        } else {
            "cluster model rebuilt from the API server's objects"
        };
        if !publisher.publish(&tx, model, what, started.elapsed()) {
            return;
        }
        tokio::select! {
            _ = wake.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = tokio::time::sleep_until(next_full) => {}
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(rv: &str, tier: &str, ready: &str) -> SlimPod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x", "resourceVersion": rv,
                         "labels": {"tier": tier}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": "10.128.0.5",
                       "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap()
    }

    /// A status update of a pod (a condition flips) changes nothing the store keeps: it does
    /// not wake the model builder. A new label does.
    #[test]
    fn updates_to_fields_not_kept_change_nothing() {
        let (store, mut writer) = reflector::store::<SlimPod>();
        let apply = |p: SlimPod| Ok(watcher::Event::Apply(p));
        let first = pod("1", "backend", "True");
        assert!(!changes_nothing(&apply(first.clone()), &store), "a new pod");
        writer.apply_watcher_event(&watcher::Event::Apply(first.clone()));
        assert!(changes_nothing(
            &apply(pod("2", "backend", "False")),
            &store
        ));
        assert!(!changes_nothing(
            &apply(pod("3", "frontend", "False")),
            &store
        ));
        // Deletions and relists always go through.
        for ev in [
            watcher::Event::Delete(first.clone()),
            watcher::Event::InitApply(first),
        ] {
            assert!(!changes_nothing(&Ok(ev), &store));
        }
    }
}
