//! The `dir` cluster source: a directory of Kubernetes YAML (or JSON) documents, the same
//! objects the API server would serve, re-read whenever the directory changes. Lets the whole
//! daemon run and be tested without an API server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use notify::{RecursiveMode, Watcher};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::model::{ClusterModel, ModelBuilder, ModelScope};

/// Files the source reads; anything else in the directory is ignored.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Reads the directory once into a model. Unreadable files, bad documents and invalid
/// objects are skipped with a reason; everything else is kept.
pub fn read_cluster_dir(dir: &Path, scope: &ModelScope) -> Result<ClusterModel, std::io::Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_manifest(p))
        .collect();
    files.sort();
    let mut builder = ModelBuilder::default();
    for file in files {
        let name = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => add_documents(&mut builder, &name, &text),
            Err(e) => builder.skip(name, format!("cannot read: {e}")),
        }
    }
    Ok(builder.finish(scope))
}

/// Feeds every document of one file to the builder. YAML is a superset of JSON, so one parser
/// serves both.
pub fn add_documents(builder: &mut ModelBuilder, file: &str, text: &str) {
    match serde_saphyr::from_multiple::<Value>(text) {
        Ok(docs) => {
            for (i, doc) in docs.into_iter().enumerate() {
                add_object(builder, &format!("{file}#{i}"), doc);
            }
        }
        Err(e) => builder.skip(file.to_string(), format!("not valid YAML: {e}")),
    }
}

fn add_object(builder: &mut ModelBuilder, origin: &str, doc: Value) {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    match kind.as_str() {
        "Node" => match serde_json::from_value::<Node>(doc) {
            Ok(node) => builder.add_node(&node),
            Err(e) => builder.skip(origin.to_string(), format!("not a valid Node: {e}")),
        },
        // `kubectl get -o yaml` output.
        "List" | "NodeList" => {
            if let Some(Value::Array(items)) = doc.get("items").cloned() {
                for (i, item) in items.into_iter().enumerate() {
                    add_object(builder, &format!("{origin}.items[{i}]"), item);
                }
            }
        }
        // Empty documents (a trailing `---`) and kinds other sources' consumers handle.
        _ if doc.is_null() => {}
        _ => debug!(origin, kind, "ignoring object"),
    }
}

/// Watches `dir` and publishes a new model after every burst of changes (debounced by
/// `quiet`), and at least every `resync`. Runs until the receiver side is gone.
pub async fn run(
    dir: PathBuf,
    scope: ModelScope,
    tx: watch::Sender<ClusterModel>,
    quiet: Duration,
    resync: Duration,
) {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = match notify::recommended_watcher(
        move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = ev_tx.send(());
            }
        },
    ) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch the cluster directory; re-reading it every resync only");
            None
        }
    };
    let mut watching = false;
    loop {
        if !watching {
            if let Some(w) = watcher.as_mut() {
                watching = w.watch(&dir, RecursiveMode::NonRecursive).is_ok();
            }
        }
        match read_cluster_dir(&dir, &scope) {
            Ok(model) => {
                for s in &model.skipped {
                    warn!(object = %s.object, reason = %s.reason, "skipping invalid object");
                }
                let changed = *tx.borrow() != model;
                if changed {
                    info!(nodes = model.nodes.len(), skipped = model.skipped.len(), dir = %dir.display(), "cluster directory read");
                    if tx.send(model).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot read the cluster directory; retrying")
            }
        }
        // Wait for a change or the resync, then for the burst to end.
        tokio::select! {
            _ = ev_rx.recv() => {}
            _ = tokio::time::sleep(resync) => {}
            _ = tx.closed() => return,
        }
        while let Ok(Some(())) = tokio::time::timeout(quiet, ev_rx.recv()).await {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> ModelScope {
        ModelScope {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            local_node: "n1".into(),
        }
    }

    const N1: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nspec:\n  podCIDR: 10.128.0.0/23\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.77.11\n";

    #[test]
    fn reads_yaml_json_multi_document_and_lists() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("n1.yaml"), N1).unwrap();
        let two = "---\nkind: Node\nmetadata: {name: n2}\nspec: {podCIDR: 10.128.2.0/23}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.12}]}\n---\nkind: Service\nmetadata: {name: s}\n---\n";
        std::fs::write(d.path().join("more.yml"), two).unwrap();
        let list = r#"{"kind":"List","items":[{"kind":"Node","metadata":{"name":"n3"},"spec":{"podCIDR":"10.128.4.0/23"},"status":{"addresses":[{"type":"InternalIP","address":"192.168.77.13"}]}}]}"#;
        std::fs::write(d.path().join("list.json"), list).unwrap();
        std::fs::write(d.path().join("README.txt"), "not a manifest").unwrap();
        let m = read_cluster_dir(d.path(), &scope()).unwrap();
        assert_eq!(m.nodes.keys().collect::<Vec<_>>(), ["n1", "n2", "n3"]);
        assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    }

    #[test]
    fn garbage_and_invalid_objects_are_skipped_and_the_rest_kept() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.yaml"), N1).unwrap();
        std::fs::write(d.path().join("b.yaml"), "kind: Node\nmetadata: [unclosed\n").unwrap();
        std::fs::write(
            d.path().join("c.yaml"),
            "kind: Node\nmetadata: {name: c}\nspec: {podCIDR: 17}\n",
        )
        .unwrap();
        std::fs::write(d.path().join("d.yaml"), "kind: Node\nmetadata: {name: d}\n").unwrap();
        let m = read_cluster_dir(d.path(), &scope()).unwrap();
        assert_eq!(m.nodes.keys().collect::<Vec<_>>(), ["n1"]);
        assert_eq!(m.skipped.len(), 3, "{:?}", m.skipped);
        let all = format!("{:?}", m.skipped);
        assert!(
            all.contains("not valid YAML") && all.contains("no podCIDR"),
            "{all}"
        );
    }

    #[tokio::test]
    async fn watcher_publishes_changes() {
        let d = tempfile::tempdir().unwrap();
        let (tx, mut rx) = watch::channel(ClusterModel::default());
        let task = tokio::spawn(run(
            d.path().to_path_buf(),
            scope(),
            tx,
            Duration::from_millis(20),
            Duration::from_secs(60),
        ));
        std::fs::write(d.path().join("n1.yaml"), N1).unwrap();
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|m| m.nodes.contains_key("n1")),
        )
        .await
        .is_ok();
        assert!(got, "the new node was not published");
        std::fs::remove_file(d.path().join("n1.yaml")).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|m| m.nodes.is_empty()))
            .await
            .is_ok();
        assert!(got, "the removal was not published");
        task.abort();
    }
}
