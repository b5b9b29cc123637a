//! Cluster sources: where the model of the cluster comes from. Every source publishes on a
//! watch channel; its first publication means "the initial state is complete" (the daemon
//! programs nothing before it), every later one means "the model changed".

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::model::ClusterModel;

pub mod dir;
pub mod kube;

/// Publishes `model` if it is the first or differs from the last one, logging the skipped
/// objects and a summary once per change. Returns false when nobody listens any more.
pub(crate) fn publish(
    tx: &watch::Sender<Arc<ClusterModel>>,
    model: ClusterModel,
    first: &mut bool,
    what: &str,
    took: Duration,
) -> bool {
    if !*first && **tx.borrow() == model {
        return !tx.is_closed();
    }
    *first = false;
    for s in &model.skipped {
        warn!(object = %s.object, reason = %s.reason, "skipping invalid object");
    }
    info!(
        nodes = model.nodes.len(),
        service_ports = model.services.ports.len(),
        skipped = model.skipped.len(),
        took_ms = took.as_millis() as u64,
        "{what}"
    );
    tx.send(Arc::new(model)).is_ok()
}
