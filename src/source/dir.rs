//! The `dir` cluster source: a directory of Kubernetes YAML (or JSON) documents, the same
//! objects the API server would serve, re-read whenever the directory changes. Lets the whole
//! daemon run and be tested without an API server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod as K8sPod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use notify::{RecursiveMode, Watcher};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::model::{ClusterModel, ModelBuilder, ModelScope};

/// Files the source reads; anything else in the directory is ignored. Hidden names are
/// temporaries of an atomic replace (`.NAME.tmp`, as `cniconf::write_atomically` writes them)
/// or a mounted ConfigMap's `..data` and `..2024_...` entries: reading them would see an object
/// twice.
fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    !hidden
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

/// Identity of a file's content as far as re-reading goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        }
    }
}

/// Parsed files, so a re-read parses only what changed (a directory of 5000 Node files where
/// one changes costs one parse, not 5000).
#[derive(Debug, Default)]
pub struct DirCache {
    files: std::collections::HashMap<PathBuf, (Stamp, ModelBuilder)>,
}

impl DirCache {
    /// Reads the directory into a model, after `previous` (the model published last, if any).
    /// Unreadable files, bad documents and invalid objects are skipped with a reason;
    /// everything else is kept.
    pub fn read(
        &mut self,
        dir: &Path,
        scope: &ModelScope,
        previous: Option<&ClusterModel>,
    ) -> Result<ClusterModel, std::io::Error> {
        #[cfg(test)]
        READS.lock().unwrap().push(dir.to_path_buf());
        let mut files: Vec<(PathBuf, Stamp)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter(|e| is_manifest(&e.path()))
            .filter_map(|e| Some((e.path(), Stamp::of(&e.metadata().ok()?))))
            .collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        self.files
            .retain(|path, _| files.iter().any(|(p, _)| p == path));
        let mut builder = ModelBuilder::default();
        for (path, stamp) in files {
            let fresh = matches!(self.files.get(&path), Some((s, _)) if *s == stamp);
            if !fresh {
                let name = path.display().to_string();
                let mut part = ModelBuilder::default();
                match std::fs::read_to_string(&path) {
                    Ok(text) => add_documents(&mut part, &name, &text),
                    Err(e) => part.skip(name, format!("cannot read: {e}")),
                }
                self.files.insert(path.clone(), (stamp, part));
            }
            builder.absorb(&self.files[&path].1);
        }
        Ok(builder.finish_after(scope, previous))
    }
}

/// Reads the directory once into a model (no cache).
pub fn read_cluster_dir(dir: &Path, scope: &ModelScope) -> Result<ClusterModel, std::io::Error> {
    DirCache::default().read(dir, scope, None)
}

/// Feeds every document of one file to the builder. YAML is a superset of JSON, so one parser
/// serves both. Large multi-document files are cut at document markers and parsed on every
/// core: parsing is most of the time between a write and the kernel holding its entries.
pub fn add_documents(builder: &mut ModelBuilder, file: &str, text: &str) {
    let starts = document_starts(text);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    // Directives (%YAML) bind to the following document: do not cut files that have any.
    if starts.len() < PARALLEL_DOCUMENTS
        || workers < 2
        || text.starts_with('%')
        || text.contains("\n%")
    {
        parse_documents(builder, file, text, 0);
        return;
    }
    let per = starts.len().div_ceil(workers);
    let mut cuts: Vec<(usize, usize)> = (0..workers)
        .filter_map(|k| {
            let from = if k == 0 { 0 } else { *starts.get(k * per)? };
            Some((from, k * per))
        })
        .collect();
    cuts.dedup_by_key(|c| c.0);
    let parts: Vec<ModelBuilder> = std::thread::scope(|s| {
        let handles: Vec<_> = cuts
            .iter()
            .enumerate()
            .map(|(i, &(from, first))| {
                let to = cuts.get(i + 1).map_or(text.len(), |c| c.0);
                s.spawn(move || {
                    let mut part = ModelBuilder::default();
                    parse_documents(&mut part, file, &text[from..to], first);
                    part
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for part in &parts {
        builder.absorb(part);
    }
}

/// Below this many documents a file is parsed on one thread.
const PARALLEL_DOCUMENTS: usize = 256;

/// Byte offsets of the lines that start a document (`---` at column 0).
fn document_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let l = line.trim_end_matches(['\n', '\r']);
        if l == "---" || l.starts_with("--- ") || l.starts_with("---\t") {
            starts.push(offset);
        }
        offset += line.len();
    }
    starts
}

/// Every document of a YAML (or JSON) text.
pub fn read_documents(text: &str) -> Result<Vec<Value>, String> {
    // The parser's default budget (1024 documents, 250k nodes) guards against hostile input;
    // a cluster directory is written by the operator and may hold a large cluster's objects,
    // so the limits are sized for 100k objects instead of removed.
    // YAML 1.2 booleans only (true, false): under YAML 1.1's, a namespace named `y` (the
    // upstream NetworkPolicy tests' x, y, z) or `on` would read as a boolean.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 100_000,
            max_nodes: 20_000_000,
            max_events: 50_000_000,
        },
        strict_booleans: true,
    };
    serde_saphyr::from_multiple_with_options::<Value>(text, options).map_err(|e| e.to_string())
}

fn parse_documents(builder: &mut ModelBuilder, file: &str, text: &str, first_index: usize) {
    match read_documents(text) {
        Ok(docs) => {
            for (i, doc) in docs.into_iter().enumerate() {
                add_object(builder, &format!("{file}#{}", first_index + i), doc);
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
        "Service" => match serde_json::from_value::<Service>(doc) {
            Ok(svc) => builder.add_service(&svc),
            Err(e) => builder.skip(origin.to_string(), format!("not a valid Service: {e}")),
        },
        "EndpointSlice" => match serde_json::from_value::<EndpointSlice>(doc) {
            Ok(slice) => builder.add_endpoint_slice(&slice),
            Err(e) => builder.skip(
                origin.to_string(),
                format!("not a valid EndpointSlice: {e}"),
            ),
        },
        "Pod" => match serde_json::from_value::<K8sPod>(doc) {
            Ok(pod) => builder.add_pod(&pod),
            Err(e) => builder.skip(origin.to_string(), format!("not a valid Pod: {e}")),
        },
        "Namespace" => match serde_json::from_value::<Namespace>(doc) {
            Ok(ns) => builder.add_namespace(&ns),
            Err(e) => builder.skip(origin.to_string(), format!("not a valid Namespace: {e}")),
        },
        "NetworkPolicy" => match serde_json::from_value::<NetworkPolicy>(doc) {
            Ok(np) => builder.add_policy(&np),
            Err(e) => builder.skip(
                origin.to_string(),
                format!("not a valid NetworkPolicy: {e}"),
            ),
        },
        // `kubectl get -o yaml` output.
        "List" | "NodeList" | "ServiceList" | "EndpointSliceList" | "PodList" | "NamespaceList"
        | "NetworkPolicyList" => {
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
    tx: watch::Sender<Arc<ClusterModel>>,
    quiet: Duration,
    resync: Duration,
) {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Change>();
    let mut watcher = match notify::recommended_watcher(
        move |res: notify::Result<notify::Event>| {
            if let Some(change) = res.ok().and_then(|ev| Change::of(&ev.kind)) {
                let _ = ev_tx.send(change);
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
    let mut cache = Some(DirCache::default());
    let mut publisher = super::Publisher::default();
    loop {
        if !watching {
            if let Some(w) = watcher.as_mut() {
                watching = w.watch(&dir, RecursiveMode::NonRecursive).is_ok();
            }
        }
        // Events queued so far are covered by the read that follows.
        while ev_rx.try_recv().is_ok() {}
        let started = std::time::Instant::now();
        // Parsing thousands of objects takes a while: off the runtime thread, so reconciles and
        // netlink events keep flowing meanwhile.
        let mut c = cache.take().unwrap_or_default();
        let (d, sc) = (dir.clone(), scope.clone());
        let previous = publisher.previous(&tx);
        let read = tokio::task::spawn_blocking(move || {
            let r = c.read(&d, &sc, previous.as_deref());
            (c, r)
        })
        .await;
        let result = match read {
            Ok((c, r)) => {
                cache = Some(c);
                r
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        match result {
            Ok(model) => {
                let what = format!("cluster directory {} read", dir.display());
                if !publisher.publish(&tx, model, &what, started.elapsed()) {
                    return;
                }
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot read the cluster directory; retrying")
            }
        }
        // Wait for a change or the resync. A finished write is read at once; a write in
        // progress is read once the directory has been quiet for `quiet` (or it finishes).
        let change = tokio::select! {
            c = ev_rx.recv() => c,
            _ = tokio::time::sleep(resync) => None,
            _ = tx.closed() => return,
        };
        if change == Some(Change::InProgress) {
            while let Ok(Some(Change::InProgress)) = tokio::time::timeout(quiet, ev_rx.recv()).await
            {
            }
        }
    }
}

/// What a filesystem event says about the directory's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A file was closed after writing, renamed into place or removed: its content is final.
    Complete,
    /// Anything else (created, being written): more is likely to follow.
    InProgress,
}

impl Change {
    /// None for an event that changes nothing: a file or the directory opened, read or closed
    /// without writing (inotify reports those too, our own reads among them: taken as changes,
    /// each read caused the next, dozens a second).
    fn of(kind: &notify::EventKind) -> Option<Change> {
        use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
        use notify::EventKind;
        match kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(
                RenameMode::To | RenameMode::Both | RenameMode::From,
            ))
            | EventKind::Remove(_) => Some(Change::Complete),
            EventKind::Access(_) => None,
            _ => Some(Change::InProgress),
        }
    }
}

/// Reads of each directory so far (tests count them).
#[cfg(test)]
static READS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> ModelScope {
        ModelScope {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            local_node: "n1".into(),
            programmed: Default::default(),
        }
    }

    const N1: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nspec:\n  podCIDR: 10.128.0.0/23\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.77.11\n";

    #[test]
    fn names_that_yaml_1_1_calls_booleans_are_strings() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("ns.yaml"),
            "kind: Namespace\nmetadata: {name: y, labels: {on: yes}}\n---\nkind: Namespace\nmetadata: {name: n}\n",
        )
        .unwrap();
        let m = read_cluster_dir(d.path(), &scope()).unwrap();
        assert!(m.skipped.is_empty(), "{:?}", m.skipped);
        assert_eq!(m.namespaces.keys().collect::<Vec<_>>(), ["n", "y"]);
        assert_eq!(m.namespaces["y"].labels["on"], "yes");
    }

    #[test]
    fn reads_yaml_json_multi_document_and_lists() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("n1.yaml"), N1).unwrap();
        let two = "---\nkind: Node\nmetadata: {name: n2}\nspec: {podCIDR: 10.128.2.0/23}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.12}]}\n---\nkind: ConfigMap\nmetadata: {name: s}\n---\n";
        std::fs::write(d.path().join("more.yml"), two).unwrap();
        let list = r#"{"kind":"List","items":[{"kind":"Node","metadata":{"name":"n3"},"spec":{"podCIDR":"10.128.4.0/23"},"status":{"addresses":[{"type":"InternalIP","address":"192.168.77.13"}]}}]}"#;
        std::fs::write(d.path().join("list.json"), list).unwrap();
        std::fs::write(d.path().join("README.txt"), "not a manifest").unwrap();
        let m = read_cluster_dir(d.path(), &scope()).unwrap();
        assert_eq!(m.nodes.keys().collect::<Vec<_>>(), ["n1", "n2", "n3"]);
        assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    }

    #[test]
    fn hidden_and_temporary_files_are_not_read() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("n1.yaml"), N1).unwrap();
        // A file being replaced through a temporary name, and a mounted ConfigMap's entries.
        std::fs::write(d.path().join(".tmp-n1.yaml"), N1).unwrap();
        std::fs::write(d.path().join(".n1.yaml.tmp"), N1).unwrap();
        std::fs::create_dir(d.path().join("..2024_01_01_00_00_00.1")).unwrap();
        std::fs::write(d.path().join("..2024_01_01_00_00_00.1/n1.yaml"), N1).unwrap();
        std::os::unix::fs::symlink("..2024_01_01_00_00_00.1", d.path().join("..data")).unwrap();
        std::fs::write(d.path().join("..n1.yaml"), N1).unwrap();
        let m = read_cluster_dir(d.path(), &scope()).unwrap();
        assert_eq!(m.nodes.keys().collect::<Vec<_>>(), ["n1"]);
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

    #[test]
    fn a_file_with_thousands_of_documents_is_read() {
        let d = tempfile::tempdir().unwrap();
        let many: String = (0..3000)
            .map(|i| format!("---\nkind: Node\nmetadata: {{name: n{i}}}\nspec: {{podCIDR: 10.{}.{}.0/24}}\nstatus: {{addresses: [{{type: InternalIP, address: 100.64.{}.{}}}]}}\n", i / 256, i % 256, i / 256, i % 256))
            .collect();
        std::fs::write(d.path().join("many.yaml"), many).unwrap();
        let scope = ModelScope {
            cluster_network: "10.0.0.0/8".parse().unwrap(),
            local_node: "n0".into(),
            programmed: Default::default(),
        };
        let m = read_cluster_dir(d.path(), &scope).unwrap();
        assert_eq!(
            (m.nodes.len(), m.skipped.len()),
            (3000, 0),
            "{:?}",
            m.skipped.first()
        );
    }

    #[test]
    fn cached_rereads_see_changed_added_and_removed_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("n1.yaml"), N1).unwrap();
        let n2 = |cidr: &str| {
            format!("kind: Node\nmetadata: {{name: n2}}\nspec: {{podCIDR: {cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.77.12}}]}}\n")
        };
        std::fs::write(d.path().join("n2.yaml"), n2("10.128.2.0/23")).unwrap();
        let mut cache = DirCache::default();
        assert_eq!(
            cache.read(d.path(), &scope(), None).unwrap().nodes["n2"]
                .subnet
                .to_string(),
            "10.128.2.0/23"
        );
        std::fs::write(d.path().join("n2.yaml"), n2("10.128.8.0/23")).unwrap();
        assert_eq!(
            cache.read(d.path(), &scope(), None).unwrap().nodes["n2"]
                .subnet
                .to_string(),
            "10.128.8.0/23"
        );
        std::fs::remove_file(d.path().join("n1.yaml")).unwrap();
        let m = cache.read(d.path(), &scope(), None).unwrap();
        assert_eq!(m.nodes.keys().collect::<Vec<_>>(), ["n2"]);
        assert_eq!(cache.files.len(), 1, "a removed file leaves the cache");
    }

    /// A node of the lab's shape (no creationTimestamp) or with one.
    fn node_yaml(name: &str, cidr: &str, ip: &str, created: Option<&str>) -> String {
        let created = created
            .map(|t| format!(", creationTimestamp: \"{t}\""))
            .unwrap_or_default();
        format!("kind: Node\nmetadata: {{name: {name}{created}}}\nspec: {{podCIDR: {cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n")
    }

    /// The source running on `dir`, and its model channel.
    fn watch_dir(
        dir: &Path,
    ) -> (
        tokio::task::JoinHandle<()>,
        watch::Receiver<Arc<ClusterModel>>,
    ) {
        let (tx, rx) = watch::channel(Arc::new(ClusterModel::default()));
        let quiet = Duration::from_millis(20);
        let task = tokio::spawn(run(
            dir.to_path_buf(),
            scope(),
            tx,
            quiet,
            Duration::from_secs(60),
        ));
        (task, rx)
    }

    /// The first model published (within 5 s) for which `want` holds.
    async fn published(
        rx: &mut watch::Receiver<Arc<ClusterModel>>,
        what: &str,
        want: impl Fn(&ClusterModel) -> bool,
    ) -> Arc<ClusterModel> {
        let got = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|m| want(m)))
            .await
            .ok()
            .and_then(|r| r.ok().map(|m| Arc::clone(&m)));
        got.unwrap_or_else(|| panic!("not published: {what}; last {:?}", rx.borrow()))
    }

    fn reads_of(dir: &Path) -> usize {
        READS.lock().unwrap().iter().filter(|d| *d == dir).count()
    }

    /// Reading the directory is no change of it: an idle directory is read once, a write
    /// once more (inotify reports opens and reads too; taken as changes, the source read its
    /// directory in a loop, 46 times a second).
    #[tokio::test]
    async fn an_idle_directory_is_read_once_and_a_change_once_more() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("n1.yaml"), N1).unwrap();
        let (task, mut rx) = watch_dir(d.path());
        published(&mut rx, "n1", |m| m.nodes.contains_key("n1")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(reads_of(d.path()), 1, "reads of an idle directory");
        let node2 = node_yaml("node2", "10.128.2.0/23", "192.168.77.12", None);
        std::fs::write(d.path().join("node2.yaml"), node2).unwrap();
        published(&mut rx, "node2", |m| m.nodes.contains_key("node2")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The write is seen as a create, a modify and a close-write: a read or two.
        let reads = reads_of(d.path());
        assert!((2..=3).contains(&reads), "{reads} reads after one write");
        task.abort();
    }

    #[tokio::test]
    async fn a_new_node_does_not_take_over_a_published_subnet() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("n1.yaml"), N1).unwrap();
        let node2 = node_yaml("node2", "10.128.2.0/23", "192.168.77.12", None);
        std::fs::write(d.path().join("node2.yaml"), node2).unwrap();
        let (task, mut rx) = watch_dir(d.path());
        published(&mut rx, "node2", |m| m.nodes.contains_key("node2")).await;
        // An older-looking newcomer with node2's subnet.
        let zzz = node_yaml(
            "zzz-new",
            "10.128.2.0/23",
            "192.168.77.99",
            Some("2020-01-01T00:00:00Z"),
        );
        std::fs::write(d.path().join("zzz-new.yaml"), zzz).unwrap();
        let m = published(&mut rx, "the conflict", |m| m.conflicts().count() == 1).await;
        assert_eq!(m.nodes.keys().collect::<Vec<_>>(), ["n1", "node2"]);
        assert_eq!(m.conflicts().next().unwrap().object, "Node/zzz-new");
        task.abort();
    }

    #[tokio::test]
    async fn watcher_publishes_changes() {
        let d = tempfile::tempdir().unwrap();
        let (task, mut rx) = watch_dir(d.path());
        std::fs::write(d.path().join("n1.yaml"), N1).unwrap();
        published(&mut rx, "the new node", |m| m.nodes.contains_key("n1")).await;
        std::fs::remove_file(d.path().join("n1.yaml")).unwrap();
        published(&mut rx, "the removal", |m| m.nodes.is_empty()).await;
        task.abort();
    }
}
