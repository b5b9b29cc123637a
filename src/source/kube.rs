//! The `kube` cluster source: kube-rs watchers with reflectors on Nodes, Services and
//! EndpointSlices. The watchers list, then watch from the list's resourceVersion, follow
//! bookmarks, relist after a 410 Gone and reconnect with backoff after errors; the reflector
//! stores hold the current objects. A model is built from the stores once all three initial
//! lists are in, then after every burst of events, and from scratch periodically.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::model::{ClusterModel, ModelBuilder, ModelScope};

/// What the daemon reads from the API server, as (API group, resource, verbs): the RBAC rules
/// in `manifests/` are checked against this list by a test.
pub const WATCHED: &[(&str, &str, &[&str])] = &[
    ("", "nodes", &["list", "watch"]),
    ("", "services", &["list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
];

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

/// The three stores, and the per-object cache of what each object contributes.
struct Stores {
    nodes: Store<Node>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    parts: Parts,
}

impl Stores {
    /// Builds the model from the stores; only objects whose resourceVersion changed are
    /// converted again. Objects are fed in a fixed order (kind, namespace/name), the order a
    /// directory of one file per object gives, so both sources build the same model.
    /// `previous` is the model published last: its nodes' subnet claims are established.
    fn model(&mut self, scope: &ModelScope, previous: Option<&ClusterModel>) -> ClusterModel {
        let mut seen: Vec<(&'static str, String)> = Vec::new();
        let mut touch = |kind: &'static str,
                         key: String,
                         rv: String,
                         add: &dyn Fn(&mut ModelBuilder)| {
            let fresh = matches!(self.parts.get(&(kind, key.clone())), Some((v, _)) if *v == rv && !rv.is_empty());
            if !fresh {
                let mut part = ModelBuilder::default();
                add(&mut part);
                self.parts.insert((kind, key.clone()), (rv, part));
            }
            seen.push((kind, key));
        };
        for n in self.nodes.state() {
            touch(
                "Node",
                key(&*n),
                n.resource_version().unwrap_or_default(),
                &|b| b.add_node(&n),
            );
        }
        for s in self.services.state() {
            touch(
                "Service",
                key(&*s),
                s.resource_version().unwrap_or_default(),
                &|b| b.add_service(&s),
            );
        }
        for e in self.slices.state() {
            touch(
                "EndpointSlice",
                key(&*e),
                e.resource_version().unwrap_or_default(),
                &|b| b.add_endpoint_slice(&e),
            );
        }
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

fn key<K: Resource>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

/// Runs one reflector until its stream ends; every event (and every error, logged) wakes the
/// model builder.
fn reflect<K>(api: Api<K>, kind: &'static str, wake: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
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
/// once the initial lists of all three kinds are in; `reconcile` is the period of the rebuild
/// from scratch.
pub async fn run(
    client: Client,
    scope: ModelScope,
    tx: watch::Sender<Arc<ClusterModel>>,
    reconcile: Duration,
) {
    let wake = Arc::new(Notify::new());
    let mut stores = Stores {
        nodes: reflect(Api::<Node>::all(client.clone()), "Node", wake.clone()),
        services: reflect(Api::<Service>::all(client.clone()), "Service", wake.clone()),
        slices: reflect(
            Api::<EndpointSlice>::all(client),
            "EndpointSlice",
            wake.clone(),
        ),
        parts: Parts::new(),
    };
    info!("waiting for the initial lists of Nodes, Services and EndpointSlices");
    let ready = async {
        stores.nodes.wait_until_ready().await?;
        stores.services.wait_until_ready().await?;
        stores.slices.wait_until_ready().await
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
