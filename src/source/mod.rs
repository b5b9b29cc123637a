//! Cluster sources: where the model of the cluster comes from. Every source publishes on a
//! watch channel; its first publication means "the initial state is complete" (the daemon
//! programs nothing before it), every later one means "the model changed".

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::model::{ClusterModel, Skipped};

pub mod dir;
pub mod kube;
pub mod slim;

/// A source's side of the model channel: publishes models that changed, and logs each
/// skipped object once (see `SkipLog`).
#[derive(Debug, Default)]
pub(crate) struct Publisher {
    published: bool,
    skips: SkipLog,
}

impl Publisher {
    /// Publishes `model` if it is the first or differs from the last one, logging the skips
    /// that appeared or went away and a summary. Returns false when nobody listens any more.
    pub fn publish(
        &mut self,
        tx: &watch::Sender<Arc<ClusterModel>>,
        model: ClusterModel,
        what: &str,
        took: Duration,
    ) -> bool {
        if self.published && **tx.borrow() == model {
            return !tx.is_closed();
        }
        self.published = true;
        let changes = self.skips.update(&model.skipped);
        for s in changes.appeared {
            warn!(object = %s.object, reason = %s.reason, "skipping invalid object");
        }
        for object in changes.cleared {
            info!(object = %object, "no longer skipped");
        }
        info!(
            nodes = model.nodes.len(),
            service_ports = model.services.ports.len(),
            pods = model.pods.len(),
            policies = model.policies.len(),
            skipped = model.skipped.len(),
            took_ms = took.as_millis() as u64,
            "{what}"
        );
        tx.send(Arc::new(model)).is_ok()
    }

    /// Whether the first model is out.
    pub fn published(&self) -> bool {
        self.published
    }

    /// The model published last, `None` before the first: its nodes hold established subnet
    /// claims the next model keeps (`ModelBuilder::finish_after`).
    pub fn previous(&self, tx: &watch::Sender<Arc<ClusterModel>>) -> Option<Arc<ClusterModel>> {
        self.published.then(|| Arc::clone(&tx.borrow()))
    }
}

/// Which skipped objects to log after a rebuild: a skip when it appears or its reason changes,
/// and an object once when it is no longer skipped. A rebuild for one endpoint change must not
/// repeat the warnings of hundreds of invalid Nodes.
#[derive(Debug, Default)]
pub(crate) struct SkipLog {
    /// (object, reason) of the skips logged so far.
    logged: BTreeSet<(String, String)>,
}

/// What changed in the skipped list since the last call.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SkipChanges<'a> {
    /// New skips, and skips whose reason changed.
    pub appeared: Vec<&'a Skipped>,
    /// Objects skipped before and not any more.
    pub cleared: Vec<String>,
}

impl SkipLog {
    pub fn update<'a>(&mut self, skipped: &'a [Skipped]) -> SkipChanges<'a> {
        let now: BTreeSet<(String, String)> = skipped
            .iter()
            .map(|s| (s.object.clone(), s.reason.clone()))
            .collect();
        let mut seen = BTreeSet::new();
        let appeared = skipped
            .iter()
            .filter(|s| !self.logged.contains(&(s.object.clone(), s.reason.clone())))
            .filter(|s| seen.insert((&s.object, &s.reason)))
            .collect();
        let still: BTreeSet<&String> = now.iter().map(|(o, _)| o).collect();
        let mut cleared: Vec<String> = self
            .logged
            .iter()
            .map(|(o, _)| o)
            .filter(|o| !still.contains(o))
            .cloned()
            .collect();
        cleared.dedup();
        self.logged = now;
        SkipChanges { appeared, cleared }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(object: &str, reason: &str) -> Skipped {
        Skipped {
            object: object.into(),
            reason: reason.into(),
            conflicts_with: None,
        }
    }

    fn objects<'a>(c: &SkipChanges<'a>) -> Vec<&'a str> {
        c.appeared.iter().map(|s| s.object.as_str()).collect()
    }

    #[test]
    fn a_rebuild_with_the_same_skips_logs_nothing() {
        let nodes: Vec<Skipped> = (0..488)
            .map(|i| skip(&format!("Node/n{i}"), "no podCIDR yet"))
            .collect();
        let mut log = SkipLog::default();
        assert_eq!(log.update(&nodes).appeared.len(), 488);
        // One endpoint changed: the model was rebuilt, the skips are the same.
        assert_eq!(log.update(&nodes), SkipChanges::default());
    }

    #[test]
    fn new_changed_and_cleared_skips_are_logged_once() {
        let mut log = SkipLog::default();
        let first = [
            skip("Node/a", "no podCIDR yet"),
            skip("Node/b", "no podCIDR yet"),
        ];
        assert_eq!(objects(&log.update(&first)), ["Node/a", "Node/b"]);
        // b's reason changes, c appears: both logged, a is not.
        let second = [
            skip("Node/a", "no podCIDR yet"),
            skip("Node/b", "no IPv4 InternalIP in status.addresses"),
            skip("Node/c", "duplicate node name"),
        ];
        let c = log.update(&second);
        assert_eq!(objects(&c), ["Node/b", "Node/c"]);
        assert_eq!(
            c.appeared[0].reason,
            "no IPv4 InternalIP in status.addresses"
        );
        assert!(c.cleared.is_empty(), "{c:?}");
        // a is fixed: cleared once, and then nothing more.
        let third = &second[1..];
        assert_eq!(
            log.update(third),
            SkipChanges {
                appeared: vec![],
                cleared: vec!["Node/a".into()],
            }
        );
        assert_eq!(log.update(third), SkipChanges::default());
    }

    #[test]
    fn one_object_skipped_for_two_reasons() {
        // A Service with two duplicate ports is skipped twice under one name.
        let mut log = SkipLog::default();
        let both = [
            skip("Service/ns/web", "duplicate Service port ns/web:http (tcp)"),
            skip("Service/ns/web", "duplicate Service port ns/web:dns (udp)"),
        ];
        assert_eq!(log.update(&both).appeared.len(), 2);
        let one = &both[..1];
        assert_eq!(log.update(one), SkipChanges::default(), "still skipped");
        assert_eq!(log.update(&[]).cleared, ["Service/ns/web"]);
    }
}
