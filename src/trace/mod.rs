//! `rsdn trace SRC DST`: a packet's path through the cluster, hop by hop, computed from the
//! same model and renderers the daemon uses and, on a node, checked against its kernel.
//!
//! - `spec`: the ends as the operator names them, resolved against the model;
//! - `rule`: one iptables rule as data (rsdn's spelling and the kernel's), its evaluation;
//! - `walk`: a packet's walk through chains, forking at random choices;
//! - `view`: a node as the model says (rendered by the daemon's producers) or as its kernel
//!   holds it (`live`: read back as the netfilter engine and `overlay::kernel` read it);
//! - `path`: the hops, from node views; `compare`: the model's path against the kernel's;
//! - `text`: the operator's rendering (`-o json` serialises `Trace`).

pub mod compare;
pub mod live;
pub mod path;
pub mod rule;
pub mod spec;
pub mod text;
pub mod view;
pub mod walk;

#[cfg(test)]
mod tests;

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::config::{NodeConfig, SourceConfig};
use crate::model::{ClusterModel, ModelScope};
use crate::overlay::kernel::Kernel;
use path::{Path, Status, Tracer};
use rule::Packet;
use view::NodeView;

/// What `rsdn trace` was asked.
#[derive(Debug, Clone)]
pub struct Request {
    pub src: String,
    pub dst: String,
    /// Do not read this node's kernel even where it could be.
    pub offline: bool,
    /// The node an external or load-balancer IP is routed to.
    pub via: Option<String>,
    pub sport: u16,
}

/// A trace: every way the packet can go.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    pub from: String,
    pub to: String,
    pub packet: Packet,
    /// The node whose kernel was read (None: predicted from the model only).
    pub checked_on: Option<String>,
    /// Some hop of that node differs from the model.
    pub drift: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub paths: Vec<Path>,
}

/// How long to wait for the API server's initial lists.
const KUBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The model the daemon would build with this configuration: from the cluster directory, or
/// from the API server's initial lists.
pub async fn load_model(config: &NodeConfig, scope: ModelScope) -> anyhow::Result<ClusterModel> {
    match &config.source {
        SourceConfig::Dir(dir) => crate::source::dir::read_cluster_dir(dir, &scope)
            .with_context(|| format!("cannot read {}", dir.display())),
        SourceConfig::Kube(kubeconfig) => {
            let client = crate::source::kube::client(kubeconfig.as_deref())
                .await
                .context("cannot configure the Kubernetes client")?;
            let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(ClusterModel::default()));
            let task = tokio::spawn(crate::source::kube::run(
                client,
                scope,
                tx,
                Duration::from_secs(3600),
            ));
            let got = tokio::time::timeout(KUBE_TIMEOUT, rx.changed()).await;
            task.abort();
            match got {
                Ok(Ok(())) => Ok((**rx.borrow()).clone()),
                _ => bail!("the API server's initial lists did not come within {KUBE_TIMEOUT:?}"),
            }
        }
    }
}

/// Node views from the model, rendered when first needed.
struct ModelViews<'a> {
    config: &'a NodeConfig,
    model: Arc<ClusterModel>,
    cells: BTreeMap<String, OnceCell<NodeView>>,
}

impl ModelViews<'_> {
    fn get(&self, name: &str) -> Option<&NodeView> {
        let node = self.model.nodes.get(name)?;
        Some(
            self.cells
                .get(name)?
                .get_or_init(|| view::model_view(self.config, &self.model, node)),
        )
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// Runs a trace: the model's paths and, on a node whose kernel holds vxlan0 (unless offline),
/// the same paths from the kernel's view of this node, compared.
pub fn run(config: &NodeConfig, req: &Request) -> anyhow::Result<Trace> {
    runtime()?.block_on(async {
        let kernel = if req.offline {
            None
        } else {
            match Kernel::connect() {
                Ok(k) if k.vxlan_index().await.ok().flatten().is_some() => Some(k),
                _ => None,
            }
        };
        let mut scope = crate::daemon::model_scope(config);
        if let Some(k) = &kernel {
            scope.programmed =
                crate::overlay::reconcile::programmed_claims(k, config.cluster_network).await;
        }
        let model = Arc::new(load_model(config, scope).await?);
        let err = |e: String| anyhow::anyhow!(e);
        let src =
            spec::resolve(&spec::parse(&req.src).map_err(err)?, &model, false).map_err(err)?;
        let dst = spec::resolve(&spec::parse(&req.dst).map_err(err)?, &model, true).map_err(err)?;
        let views = ModelViews {
            config,
            model: model.clone(),
            cells: model
                .nodes
                .keys()
                .map(|n| (n.clone(), OnceCell::new()))
                .collect(),
        };
        let local = config.node_name.clone();
        let mut notes = Vec::new();
        // The kernel's view of this node, read before anything is traced: the recent lists of
        // ClientIP affinity are state, not configuration, and the model's view takes them too.
        let theirs = match (&kernel, model.nodes.get(&local)) {
            (Some(k), Some(node)) => {
                let mut mine = view::model_view(config, &model, node);
                let theirs = live::kernel_view(config, &mine, k).await?;
                mine.recent = theirs.recent.clone();
                let _ = views.cells[&local].set(mine);
                Some(theirs)
            }
            (Some(_), None) => {
                notes.push(format!(
                    "node {local} is not in the model: its kernel was not compared"
                ));
                None
            }
            _ => None,
        };
        let by_model = |name: &str| views.get(name);
        let tracer = Tracer {
            model: &model,
            views: &by_model,
            via: req.via.clone(),
        };
        let (packet, mut paths) = tracer.trace(&src, &dst, req.sport).map_err(err)?;
        let checked_on = match &theirs {
            Some(theirs) => {
                let by_kernel = |name: &str| {
                    if name == local {
                        Some(theirs)
                    } else {
                        views.get(name)
                    }
                };
                let tracer = Tracer {
                    model: &model,
                    views: &by_kernel,
                    via: req.via.clone(),
                };
                let (_, kernel_paths) = tracer.trace(&src, &dst, req.sport).map_err(err)?;
                notes.extend(compare::compare(&mut paths, &kernel_paths, &local));
                Some(local)
            }
            None => None,
        };
        let drift = notes.iter().any(|n| n.starts_with("drift"))
            || paths
                .iter()
                .any(|p| p.kernel.is_some() || p.hops.iter().any(|h| h.status == Status::Drift));
        Ok(Trace {
            from: src.label,
            to: dst.label,
            packet,
            checked_on,
            drift,
            notes,
            paths,
        })
    })
}
