//! The lab's pods and namespaces: pods attached and detached with the real `rsdn-cni` (called
//! in the node's namespace as a runtime calls it), their records in the state directory, and
//! their Pod and Namespace objects in the cluster directory (rendered by `objects`), where the
//! daemons' `dir` source and the stand-in API server find them. Commands that change them
//! hold the lab's lock, so concurrent `lab` commands do not interleave.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

use crate::cluster::{conflist_path, node_cni_bin, node_count, node_index, node_ip, require_up};
use crate::lab::Lab;
use crate::netns;
use crate::objects::{
    apply_label_changes, check_ports, format_labels, is_dns_label, namespace_file,
    namespace_object, now, pod_file, pod_object, protected_namespace_labels, to_yaml, uid_from,
    LabelChange, Labels, NamespaceRecord, PodRecord, PodRef, PortSpec, DEFAULT_NAMESPACE,
    NAMESPACE_NAME_LABEL,
};
use crate::serve;

/// The lab's lock, held until the returned guard is dropped.
pub fn lock(lab: &Lab) -> Result<Flock<File>> {
    let f = File::create(lab.state_dir().join("lock"))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("cannot lock the lab: {e}"))
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    rsdn::cniconf::write_atomically(path, text)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn remove_if_present(path: &Path, errors: &mut Vec<String>) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("cannot remove {}: {e}", path.display())),
    }
}

/// A uid nobody else has: the lab, the object, the time and this process.
fn new_uid(lab: &Lab, what: &str) -> String {
    let seed = format!(
        "{}/{what}/{:?}/{}",
        lab.name(),
        std::time::SystemTime::now(),
        std::process::id()
    );
    uid_from(seed.as_bytes())
}

fn pod_record_path(lab: &Lab, pod: &PodRef) -> PathBuf {
    lab.pods_dir().join(format!("{}.json", pod.file_stem()))
}

fn read_json<T: serde::de::DeserializeOwned>(dir: &Path) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect()
}

/// Every pod of the lab, node by node, then by namespace and name.
pub fn load_pods(lab: &Lab) -> Vec<PodRecord> {
    let mut pods: Vec<PodRecord> = read_json(&lab.pods_dir());
    pods.sort_by_key(|p| {
        (
            node_index(&p.node).unwrap_or(u32::MAX),
            p.pod_namespace.clone(),
            p.name.clone(),
        )
    });
    pods
}

pub fn find_pod(lab: &Lab, pod: &PodRef) -> Result<PodRecord> {
    let text = std::fs::read_to_string(pod_record_path(lab, pod)).map_err(|_| {
        anyhow::anyhow!(
            "lab {} has no pod {pod} (rsdn lab status lists them)",
            lab.name()
        )
    })?;
    Ok(serde_json::from_str(&text)?)
}

fn save_pod(lab: &Lab, rec: &PodRecord) -> Result<()> {
    std::fs::create_dir_all(lab.pods_dir())?;
    rsdn::cniconf::write_atomically(
        &pod_record_path(lab, &rec.pod_ref()),
        &serde_json::to_string_pretty(rec)?,
    )?;
    write_pod_object(lab, rec)
}

fn write_pod_object(lab: &Lab, rec: &PodRecord) -> Result<()> {
    let i = node_index(&rec.node).context("a pod's node is nodeN")?;
    let yaml = to_yaml(&pod_object(rec, node_ip(i)));
    write_if_changed(&lab.cluster_dir().join(pod_file(&rec.pod_ref())), &yaml)
}

/// The plugin config a runtime would pass for the first plugin of the node's conflist.
fn plugin_conf(lab: &Lab, i: u32) -> Result<serde_json::Value> {
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conflist_path(lab, i))?)?;
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    Ok(conf)
}

/// Runs the node's rsdn-cni as a runtime does: in the node's namespace, CNI_* in the
/// environment (with kubelet's CNI_ARGS), the plugin config on stdin. Its result on success.
fn cni(
    lab: &Lab,
    i: u32,
    command: &str,
    container_id: &str,
    netns: &str,
    pod: &PodRef,
) -> Result<Vec<u8>> {
    let conf = plugin_conf(lab, i)?;
    let mut cmd = netns::command(
        &lab.node(i),
        node_cni_bin(lab, i).join(rsdn::install::PLUGIN),
    )?;
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns::path(netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container_id}",
                pod.namespace, pod.name
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("cannot run rsdn-cni")?;
    std::io::Write::write_all(
        &mut child.stdin.take().expect("piped"),
        conf.to_string().as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "rsdn-cni {command} for {pod} ({netns}) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

struct Attachment<'a> {
    node: u32,
    netns: String,
    container_id: String,
    pod: &'a PodRef,
    labels: Labels,
    ports: Vec<PortSpec>,
}

/// Makes the pod's namespace, attaches it (CNI ADD) and records it with its object.
fn attach(lab: &Lab, a: Attachment) -> Result<PodRecord> {
    netns::ensure(&a.netns)?;
    let out = cni(lab, a.node, "ADD", &a.container_id, &a.netns, a.pod)?;
    let result: serde_json::Value = serde_json::from_slice(&out)?;
    let ip = &result["ips"][0];
    let address = ip["address"].as_str().context("no address in the result")?;
    // Interfaces: the bridge, the host veth (no sandbox), then the pod's own.
    let host_veth = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i.get("sandbox").is_none_or(|s| s.is_null()))
        .filter_map(|i| i["name"].as_str())
        .next_back()
        .context("no host interface in the result")?;
    let rec = PodRecord {
        name: a.pod.name.clone(),
        netns: a.netns,
        node: format!("node{}", a.node),
        ip: address.split('/').next().unwrap_or_default().parse()?,
        pod_namespace: a.pod.namespace.clone(),
        labels: a.labels,
        ports: a.ports,
        uid: new_uid(lab, &a.pod.to_string()),
        created: now(),
        container_id: a.container_id,
        host_veth: host_veth.into(),
        gateway: ip["gateway"]
            .as_str()
            .context("no gateway in the result")?
            .parse()?,
    };
    save_pod(lab, &rec)?;
    Ok(rec)
}

/// Pod `j` of node `i` as `lab up` makes it: `default/nodeI-podJ`, labelled `pod:
/// nodeI-podJ`, in the namespace `<lab>-nodeI-podJ`. Idempotent.
pub fn ensure_node_pod(lab: &Lab, i: u32, j: u32) -> Result<()> {
    let name = format!("node{i}-pod{j}");
    let pod = PodRef::new(DEFAULT_NAMESPACE, &name).expect("a valid name");
    let netns = lab.node_pod(i, j);
    if pod_record_path(lab, &pod).exists() && netns::exists(&netns) {
        return Ok(());
    }
    attach(
        lab,
        Attachment {
            node: i,
            netns,
            container_id: format!("lab-{name}"),
            pod: &pod,
            labels: Labels::from([("pod".to_string(), name.clone())]),
            ports: Vec::new(),
        },
    )?;
    Ok(())
}

/// Writes every pod's and namespace's object again (what `lab up` does for the Nodes: an
/// object removed from the directory by hand comes back).
pub fn write_all_objects(lab: &Lab) -> Result<()> {
    for ns in load_namespaces(lab) {
        write_namespace_object(lab, &ns)?;
    }
    for p in load_pods(lab) {
        write_pod_object(lab, &p)?;
    }
    Ok(())
}

/// `--node`: `node2` or `2`.
pub fn parse_node(s: &str) -> Result<u32, String> {
    node_index(s)
        .or_else(|| s.parse().ok().filter(|i| *i > 0))
        .ok_or_else(|| format!("node {s:?}: nodeN or N"))
}

pub struct NewPod {
    pub pod: PodRef,
    pub node: u32,
    pub labels: Labels,
    pub ports: Vec<PortSpec>,
    pub serve: bool,
}

pub fn pod_add(lab: &Lab, new: NewPod) -> Result<()> {
    let nodes = require_up(lab)?;
    let _lock = lock(lab)?;
    check_ports(&new.ports).map_err(anyhow::Error::msg)?;
    let (pod, i) = (&new.pod, new.node);
    if i > nodes {
        bail!("lab {} has no node{i} (nodes: 1..={nodes})", lab.name());
    }
    if !conflist_path(lab, i).exists() {
        bail!("node{i} is not ready (its daemon wrote no CNI config): rsdn lab status");
    }
    if find_namespace(lab, &pod.namespace).is_none() {
        bail!(
            "namespace {} does not exist (rsdn lab ns add {})",
            pod.namespace,
            pod.namespace
        );
    }
    let rec = match find_pod(lab, pod) {
        Ok(old) => {
            if (old.node.as_str(), &old.labels, &old.ports)
                != (format!("node{i}").as_str(), &new.labels, &new.ports)
            {
                bail!(
                    "pod {pod} exists with another node, labels or ports (on {}, labels {}): delete it first (rsdn lab pod del {pod}) or relabel it",
                    old.node,
                    format_labels(&old.labels)
                );
            }
            println!("pod {pod} unchanged");
            old
        }
        Err(_) => {
            let rec = attach(
                lab,
                Attachment {
                    node: i,
                    netns: lab.pod(pod),
                    container_id: format!("lab-pod.{}.{}", pod.namespace, pod.name),
                    pod,
                    labels: new.labels,
                    ports: new.ports,
                },
            )?;
            println!(
                "pod {pod} added on {}: {} (network namespace {})",
                rec.node, rec.ip, rec.netns
            );
            rec
        }
    };
    if new.serve {
        serve_pod(lab, &rec)?;
    }
    Ok(())
}

fn serve_pod(lab: &Lab, rec: &PodRecord) -> Result<()> {
    let pid = serve::start(lab, rec)?;
    let ports: Vec<String> = rec
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.container_port, p.protocol))
        .collect();
    println!(
        "pod {} serving {} (pid {pid})",
        rec.pod_ref(),
        ports.join(", ")
    );
    Ok(())
}

/// `lab serve`: starts (or with `stop`, stops) the pod's servers.
pub fn serve(lab: &Lab, pod: &PodRef, stop: bool) -> Result<()> {
    require_up(lab)?;
    let rec = find_pod(lab, pod)?;
    if stop {
        serve::stop(lab, &rec);
        println!("pod {pod}: servers stopped");
        return Ok(());
    }
    serve_pod(lab, &rec)
}

pub fn pod_label(lab: &Lab, pod: &PodRef, changes: &[LabelChange]) -> Result<()> {
    require_up(lab)?;
    let _lock = lock(lab)?;
    let mut rec = find_pod(lab, pod)?;
    let labels =
        apply_label_changes(&rec.labels, changes, &Labels::new()).map_err(anyhow::Error::msg)?;
    if labels == rec.labels {
        println!("pod {pod} unchanged: {}", format_labels(&labels));
        return Ok(());
    }
    rec.labels = labels;
    save_pod(lab, &rec)?;
    println!("pod {pod} labelled: {}", format_labels(&rec.labels));
    Ok(())
}

pub fn pod_del(lab: &Lab, pods: &[PodRef]) -> Result<()> {
    require_up(lab)?;
    let _lock = lock(lab)?;
    let mut errors = Vec::new();
    for pod in pods {
        match find_pod(lab, pod) {
            Ok(rec) => {
                if let Err(e) = remove_pod(lab, &rec) {
                    errors.push(format!("{e:#}"));
                } else {
                    println!("pod {pod} deleted");
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(())
}

/// A pod's teardown, in reverse order of its making: its processes (servers), its attachment
/// (CNI DEL), its namespace, its object, its record. Keeps going past errors.
fn remove_pod(lab: &Lab, rec: &PodRecord) -> Result<()> {
    let mut errors = Vec::new();
    serve::stop(lab, rec);
    if let Some(ino) = netns::inode(&rec.netns) {
        let pids = netns::processes_in(&[ino].into());
        netns::terminate(&pids, Duration::from_secs(2));
    }
    let pod = rec.pod_ref();
    match node_index(&rec.node) {
        Some(i) if i <= node_count(lab) => {
            if let Err(e) = cni(lab, i, "DEL", &rec.container_id, &rec.netns, &pod) {
                errors.push(format!("{e:#}"));
            }
        }
        _ => errors.push(format!("{pod}: node {} is gone; not detached", rec.node)),
    }
    if let Err(e) = netns::delete(&rec.netns) {
        errors.push(format!("{e:#}"));
    }
    remove_if_present(&lab.cluster_dir().join(pod_file(&pod)), &mut errors);
    remove_if_present(&pod_record_path(lab, &pod), &mut errors);
    let _ = std::fs::remove_file(serve::log_file(lab, rec));
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(())
}

fn namespace_record_path(lab: &Lab, name: &str) -> PathBuf {
    lab.namespaces_dir().join(format!("{name}.json"))
}

pub fn load_namespaces(lab: &Lab) -> Vec<NamespaceRecord> {
    let mut v: Vec<NamespaceRecord> = read_json(&lab.namespaces_dir());
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn find_namespace(lab: &Lab, name: &str) -> Option<NamespaceRecord> {
    let text = std::fs::read_to_string(namespace_record_path(lab, name)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_namespace_object(lab: &Lab, rec: &NamespaceRecord) -> Result<()> {
    write_if_changed(
        &lab.cluster_dir().join(namespace_file(&rec.name)),
        &to_yaml(&namespace_object(rec)),
    )
}

fn save_namespace(lab: &Lab, rec: &NamespaceRecord) -> Result<()> {
    std::fs::create_dir_all(lab.namespaces_dir())?;
    rsdn::cniconf::write_atomically(
        &namespace_record_path(lab, &rec.name),
        &serde_json::to_string_pretty(rec)?,
    )?;
    write_namespace_object(lab, rec)
}

fn new_namespace(lab: &Lab, name: &str, labels: Labels) -> NamespaceRecord {
    NamespaceRecord {
        name: name.into(),
        labels,
        uid: new_uid(lab, name),
        created: now(),
    }
}

/// The `default` namespace exists in every cluster.
pub fn ensure_default_namespace(lab: &Lab) -> Result<()> {
    if find_namespace(lab, DEFAULT_NAMESPACE).is_none() {
        save_namespace(lab, &new_namespace(lab, DEFAULT_NAMESPACE, Labels::new()))?;
    }
    Ok(())
}

/// The labels kept for a namespace: the given ones without those the API server sets.
fn own_labels(name: &str, mut labels: Labels) -> Result<Labels> {
    if let Some(v) = labels.remove(NAMESPACE_NAME_LABEL) {
        if v != name {
            bail!("label {NAMESPACE_NAME_LABEL} is set by the API server ({NAMESPACE_NAME_LABEL}={name}) and cannot be changed");
        }
    }
    Ok(labels)
}

pub fn ns_add(lab: &Lab, name: &str, labels: Labels) -> Result<()> {
    require_up(lab)?;
    if !is_dns_label(name) {
        bail!("namespace {name:?} must be an RFC 1123 label (lower-case letters, digits and '-', at most 63)");
    }
    let labels = own_labels(name, labels)?;
    let _lock = lock(lab)?;
    if let Some(old) = find_namespace(lab, name) {
        if old.labels != labels {
            bail!(
                "namespace {name} exists with other labels ({}): rsdn lab ns label {name} ...",
                format_labels(&old.labels)
            );
        }
        println!("namespace {name} unchanged");
        return Ok(());
    }
    let rec = new_namespace(lab, name, labels);
    save_namespace(lab, &rec)?;
    println!(
        "namespace {name} added: {}",
        format_labels(&rec.object_labels())
    );
    Ok(())
}

pub fn ns_label(lab: &Lab, name: &str, changes: &[LabelChange]) -> Result<()> {
    require_up(lab)?;
    let _lock = lock(lab)?;
    let mut rec = find_namespace(lab, name)
        .with_context(|| format!("lab {} has no namespace {name}", lab.name()))?;
    let labels = apply_label_changes(
        &rec.object_labels(),
        changes,
        &protected_namespace_labels(name),
    )
    .map_err(anyhow::Error::msg)?;
    let labels = own_labels(name, labels)?;
    if labels == rec.labels {
        println!(
            "namespace {name} unchanged: {}",
            format_labels(&rec.object_labels())
        );
        return Ok(());
    }
    rec.labels = labels;
    save_namespace(lab, &rec)?;
    println!(
        "namespace {name} labelled: {}",
        format_labels(&rec.object_labels())
    );
    Ok(())
}

/// Deletes the namespace and, as the API server does, every pod in it.
pub fn ns_del(lab: &Lab, name: &str) -> Result<()> {
    require_up(lab)?;
    if name == DEFAULT_NAMESPACE {
        bail!("the default namespace cannot be deleted");
    }
    let _lock = lock(lab)?;
    if find_namespace(lab, name).is_none() {
        bail!("lab {} has no namespace {name}", lab.name());
    }
    let mut errors = Vec::new();
    for rec in load_pods(lab).iter().filter(|p| p.pod_namespace == name) {
        match remove_pod(lab, rec) {
            Ok(()) => println!("pod {} deleted", rec.pod_ref()),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    remove_if_present(&lab.cluster_dir().join(namespace_file(name)), &mut errors);
    remove_if_present(&namespace_record_path(lab, name), &mut errors);
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    println!("namespace {name} deleted");
    Ok(())
}
