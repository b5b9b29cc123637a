//! The one thing rsdn writes to the API server: its Node's `NetworkUnavailable` condition, set
//! to False with reason `RsdnIsUp` once the node network is programmed (the overlay and the
//! conflist in place: when readiness first becomes true), as flannel (`FlannelIsUp`) and
//! Calico (`CalicoIsUp`) do. Until a network plugin clears it, a Node that carries the
//! condition as True (a cloud's route controller sets it) is tainted
//! `node.kubernetes.io/network-unavailable` and gets no pods.
//!
//! A strategic merge PATCH of `nodes/status`: conditions merge by type, so the kubelet's
//! (Ready, MemoryPressure, ...) stay as they are. Failures are retried with backoff on a task
//! of its own: the datapath never waits for the API server.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// What the daemon writes to the API server, as (API group, resource, verbs): the RBAC rules
/// in `manifests/` are checked against this list and `source::kube::WATCHED` by a test.
pub const PATCHED: &[(&str, &str, &[&str])] = &[("", "nodes/status", &["patch"])];

pub const CONDITION: &str = "NetworkUnavailable";
pub const REASON: &str = "RsdnIsUp";
pub const MESSAGE: &str = "rsdn programmed this node's network: overlay and CNI config in place";
/// The field manager the API server records for the condition.
pub const FIELD_MANAGER: &str = "rsdn";

/// The status patch: the condition alone, both its times `now`.
pub fn patch(now: SystemTime) -> NodeStatus {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let time = k8s_openapi::jiff::Timestamp::from_second(secs as i64)
        .ok()
        .map(Time);
    NodeStatus {
        conditions: Some(vec![NodeCondition {
            type_: CONDITION.into(),
            status: "False".into(),
            reason: Some(REASON.into()),
            message: Some(MESSAGE.into()),
            last_transition_time: time.clone(),
            last_heartbeat_time: time,
        }]),
        ..Default::default()
    }
}

/// Where the patch goes: the API server (`kube::Client`), or a fake in tests.
#[allow(async_fn_in_trait)]
pub trait NodeStatusApi {
    async fn patch_status(&self, node: &str, status: &NodeStatus) -> Result<(), String>;
}

impl NodeStatusApi for kube::Client {
    async fn patch_status(&self, node: &str, status: &NodeStatus) -> Result<(), String> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let body = serde_json::json!({ "status": status });
        Api::<Node>::all(self.clone())
            .patch_status(node, &params, &Patch::Strategic(body))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Retry delays: doubling from `first` up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// Waits until the node network is ready (`ready` true), then patches the condition until it
/// goes through, once. Ends when it is set, or when `ready`'s sender is gone before.
pub async fn run(
    api: impl NodeStatusApi,
    node: String,
    mut ready: watch::Receiver<bool>,
    backoff: Backoff,
) {
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let mut delay = backoff.first;
    for attempt in 1u32.. {
        match api.patch_status(&node, &patch(SystemTime::now())).await {
            Ok(()) => {
                info!(node = %node, condition = CONDITION, status = "False", reason = REASON, attempt, "Node condition set");
                return;
            }
            Err(e) => {
                warn!(node = %node, condition = CONDITION, attempt, retry_in_ms = delay.as_millis() as u64, error = %e, "cannot set the Node condition; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(backoff.max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Fake {
        /// Attempts so far; the first `fail` of them fail.
        calls: Arc<Mutex<Vec<(String, NodeStatus)>>>,
        fail: usize,
    }

    impl NodeStatusApi for Fake {
        async fn patch_status(&self, node: &str, status: &NodeStatus) -> Result<(), String> {
            let mut calls = self.calls.lock().unwrap();
            calls.push((node.to_string(), status.clone()));
            if calls.len() <= self.fail {
                return Err("503 Service Unavailable".into());
            }
            Ok(())
        }
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn the_patch_is_the_condition_alone_as_flannel_and_calico_write_it() {
        let p =
            serde_json::to_value(patch(UNIX_EPOCH + Duration::from_secs(1_700_000_000))).unwrap();
        assert_eq!(
            p,
            serde_json::json!({"conditions": [{
                "type": "NetworkUnavailable", "status": "False", "reason": "RsdnIsUp",
                "message": MESSAGE,
                "lastTransitionTime": "2023-11-14T22:13:20Z",
                "lastHeartbeatTime": "2023-11-14T22:13:20Z"}]})
        );
    }

    #[test]
    fn nothing_before_readiness_then_once_with_retries() {
        let fake = Fake {
            fail: 2,
            ..Default::default()
        };
        let calls = fake.calls.clone();
        let backoff = Backoff {
            first: Duration::from_millis(5),
            max: Duration::from_millis(10),
        };
        let (tx, rx) = watch::channel(false);
        block_on(async move {
            let task = tokio::spawn(run(fake, "n1".into(), rx, backoff));
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert!(calls.lock().unwrap().is_empty(), "patched before ready");
            tx.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("ends once the patch went through")
                .unwrap();
            // Two refused, the third went through; nothing after it.
            tx.send(false).ok();
            tx.send(true).ok();
            tokio::time::sleep(Duration::from_millis(30)).await;
            let calls = calls.lock().unwrap();
            assert_eq!(calls.len(), 3);
            assert!(calls.iter().all(|(n, s)| n == "n1"
                && s.conditions.as_ref().unwrap()[0].reason.as_deref() == Some(REASON)));
        });
    }

    #[test]
    fn a_daemon_that_stops_before_readiness_patches_nothing() {
        let fake = Fake::default();
        let calls = fake.calls.clone();
        let (tx, rx) = watch::channel(false);
        drop(tx);
        block_on(run(fake, "n1".into(), rx, Backoff::default()));
        assert!(calls.lock().unwrap().is_empty());
    }
}
