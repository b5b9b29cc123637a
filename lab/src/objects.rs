//! What the lab knows about its pods and namespaces, and the Kubernetes objects it writes for
//! them into the cluster directory: plain data and pure functions (parsing what the CLI is
//! given, rendering Pod and Namespace objects as an API server would hold them). The files and
//! the kernel are `workloads.rs`'s.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HostIP, Namespace, NamespaceSpec, NamespaceStatus, Pod, PodCondition,
    PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{Deserialize, Serialize};

pub type Labels = BTreeMap<String, String>;

/// The label the API server puts on every Namespace (and refuses to let anyone change).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The namespace of the pods `lab up` makes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// An RFC 1123 label: lower-case letters, digits and `-`, starting and ending with a letter or
/// digit, at most 63 characters (namespace names, and the pod names the lab accepts).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A pod, as `NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: &str, name: &str) -> Result<PodRef, String> {
        for (what, v) in [("namespace", namespace), ("pod name", name)] {
            if !is_dns_label(v) {
                return Err(format!(
                    "{what} {v:?} must be an RFC 1123 label (lower-case letters, digits and '-', at most 63)"
                ));
            }
        }
        Ok(PodRef {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    /// The file the pod's record is kept in, and the stem of its object's file.
    pub fn file_stem(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

impl FromStr for PodRef {
    type Err = String;
    fn from_str(s: &str) -> Result<PodRef, String> {
        let (ns, name) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: a pod is NAMESPACE/NAME"))?;
        PodRef::new(ns, name)
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A label name (the part after an optional `prefix/`) or a non-empty value: at most 63
/// characters, alphanumerics with `-`, `_` and `.` inside.
fn is_label_word(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || "-_.".contains(c))
}

/// Checks a label key as the API server does: `[prefix/]name`, the prefix a DNS subdomain.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if !is_label_word(name) {
        return Err(format!("label key {key:?}: the name part must be 1-63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"));
    }
    if let Some(p) = prefix {
        if p.len() > 253 || !p.split('.').all(is_dns_label) {
            return Err(format!(
                "label key {key:?}: the prefix must be a DNS subdomain"
            ));
        }
    }
    Ok(())
}

pub fn check_label_value(key: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_word(value) {
        Ok(())
    } else {
        Err(format!("label {key}: value {value:?} must be empty or 1-63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"))
    }
}

/// `k=v,k2=v2` (what `--labels` takes); an empty string is no labels.
pub fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut out = Labels::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("label {item:?} is not KEY=VALUE"))?;
        check_label_key(k)?;
        check_label_value(k, v)?;
        if out.insert(k.into(), v.into()).is_some() {
            return Err(format!("label {k} given twice"));
        }
    }
    Ok(out)
}

/// One argument of `lab pod label` / `lab ns label`, as kubectl takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelChange {
    /// `key=value`
    Set(String, String),
    /// `key-`
    Remove(String),
}

impl FromStr for LabelChange {
    type Err = String;
    fn from_str(s: &str) -> Result<LabelChange, String> {
        if let Some((k, v)) = s.split_once('=') {
            check_label_key(k)?;
            check_label_value(k, v)?;
            return Ok(LabelChange::Set(k.into(), v.into()));
        }
        if let Some(k) = s.strip_suffix('-') {
            check_label_key(k)?;
            return Ok(LabelChange::Remove(k.into()));
        }
        Err(format!(
            "{s:?}: a label change is KEY=VALUE (set) or KEY- (remove)"
        ))
    }
}

/// Applies `changes` in order; `protected` keys cannot be set to another value or removed.
pub fn apply_label_changes(
    labels: &Labels,
    changes: &[LabelChange],
    protected: &Labels,
) -> Result<Labels, String> {
    let mut out = labels.clone();
    for c in changes {
        let key = match c {
            LabelChange::Set(k, v) => {
                out.insert(k.clone(), v.clone());
                k
            }
            LabelChange::Remove(k) => {
                out.remove(k);
                k
            }
        };
        if let Some(v) = protected.get(key) {
            if out.get(key) != Some(v) {
                return Err(format!(
                    "label {key} is set by the API server ({key}={v}) and cannot be changed"
                ));
            }
        }
    }
    Ok(out)
}

/// `k=v,k2=v2`, for tables.
pub fn format_labels(labels: &Labels) -> String {
    let v: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if v.is_empty() {
        "<none>".into()
    } else {
        v.join(",")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("protocol {s:?}: TCP or UDP")),
        }
    }
}

/// A declared container port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    pub name: String,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// An IANA service name, what a named container port must be: 1-15 lower-case letters,
/// digits and `-`, at least one letter, no `-` at either end nor twice in a row.
fn is_port_name(s: &str) -> bool {
    is_dns_label(s)
        && s.len() <= 15
        && !s.contains("--")
        && s.bytes().any(|b| b.is_ascii_lowercase())
}

/// One `--port`: `NAME:PORT/PROTO`, `PORT/PROTO` (named `serve-PORT-proto`, the names of the
/// upstream NetworkPolicy tests) or `PORT` (both protocols, so two ports). PROTO defaults to TCP
/// when a name is given.
pub fn parse_ports(s: &str) -> Result<Vec<PortSpec>, String> {
    let (name, rest) = match s.split_once(':') {
        Some((n, r)) => (Some(n), r),
        None => (None, s),
    };
    let (port, protocols) = match rest.split_once('/') {
        Some((p, proto)) => (p, vec![proto.parse::<Protocol>()?]),
        None if name.is_some() => (rest, vec![Protocol::Tcp]),
        None => (rest, vec![Protocol::Tcp, Protocol::Udp]),
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port {s:?}: the port must be 1-65535"))?;
    protocols
        .into_iter()
        .map(|protocol| {
            let name = match name {
                Some(n) => n.to_string(),
                None => format!("serve-{port}-{}", protocol.lower()),
            };
            if !is_port_name(&name) {
                return Err(format!("port name {name:?} must be 1-15 lower-case letters, digits and '-', with a letter"));
            }
            Ok(PortSpec {
                name,
                container_port: port,
                protocol,
            })
        })
        .collect()
}

/// Checks a pod's whole port list: names and (port, protocol) pairs unique.
pub fn check_ports(ports: &[PortSpec]) -> Result<(), String> {
    for (i, p) in ports.iter().enumerate() {
        for q in &ports[..i] {
            if p.name == q.name {
                return Err(format!("port name {} declared twice", p.name));
            }
            if (p.container_port, p.protocol) == (q.container_port, q.protocol) {
                return Err(format!(
                    "port {}/{} declared twice",
                    p.container_port, p.protocol
                ));
            }
        }
    }
    Ok(())
}

/// What the lab keeps about a pod (`/run/<lab>/pods/<namespace>.<name>.json`), and what `lab
/// status --json` shows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// The pod's name (`node1-pod2` for the pods `lab up` makes).
    pub name: String,
    /// The pod's network namespace. (The key is `namespace` for scripts written before pods had
    /// a Kubernetes namespace, which is `podNamespace`.)
    #[serde(rename = "namespace")]
    pub netns: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub pod_namespace: String,
    pub labels: Labels,
    pub ports: Vec<PortSpec>,
    pub uid: String,
    /// RFC 3339, seconds.
    pub created: String,
    /// The CNI_CONTAINERID it was attached with (and is detached with).
    pub container_id: String,
    /// Its end of the veth pair, a port of tun0 on its node.
    pub host_veth: String,
    pub gateway: Ipv4Addr,
}

impl PodRecord {
    pub fn pod_ref(&self) -> PodRef {
        PodRef {
            namespace: self.pod_namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// What the pod's servers answer: `<namespace>/<name>`.
    pub fn answer(&self) -> String {
        self.pod_ref().to_string()
    }
}

/// What the lab keeps about a namespace (`/run/<lab>/namespaces/<name>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceRecord {
    pub name: String,
    /// Labels as given: the object always has `kubernetes.io/metadata.name` as well.
    pub labels: Labels,
    pub uid: String,
    pub created: String,
}

impl NamespaceRecord {
    /// The labels the object carries.
    pub fn object_labels(&self) -> Labels {
        let mut l = self.labels.clone();
        l.extend(protected_namespace_labels(&self.name));
        l
    }
}

/// The labels of a Namespace only the API server sets.
pub fn protected_namespace_labels(name: &str) -> Labels {
    Labels::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())])
}

/// A UUID-shaped uid (version 4 layout) from `seed`'s digest.
pub fn uid_from(seed: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut b: [u8; 16] = Sha256::digest(seed)[..16].try_into().expect("16 bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = data_encoding::HEXLOWER.encode(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Now, as the API server writes timestamps (RFC 3339, seconds, UTC).
pub fn now() -> String {
    let s = k8s_openapi::jiff::Timestamp::now().as_second();
    k8s_openapi::jiff::Timestamp::from_second(s)
        .expect("now is a valid time")
        .to_string()
}

fn time(s: &str) -> Option<Time> {
    s.parse().ok().map(Time)
}

fn labels_or_none(l: &Labels) -> Option<Labels> {
    (!l.is_empty()).then(|| l.clone())
}

/// The Pod object of a lab pod: Running, on its node, one container per declared port
/// (`cont-<port>-<proto>`, as the upstream NetworkPolicy tests' pods have), or one container
/// without ports.
pub fn pod_object(rec: &PodRecord, host_ip: Ipv4Addr) -> Pod {
    let containers = if rec.ports.is_empty() {
        vec![Container {
            name: "main".into(),
            image: Some("rsdn-lab/pod".into()),
            ..Container::default()
        }]
    } else {
        rec.ports
            .iter()
            .map(|p| Container {
                name: format!("cont-{}-{}", p.container_port, p.protocol.lower()),
                image: Some("rsdn-lab/serve".into()),
                ports: Some(vec![ContainerPort {
                    name: Some(p.name.clone()),
                    container_port: p.container_port.into(),
                    protocol: Some(p.protocol.to_string()),
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            })
            .collect()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(rec.name.clone()),
            namespace: Some(rec.pod_namespace.clone()),
            uid: Some(rec.uid.clone()),
            creation_timestamp: time(&rec.created),
            labels: labels_or_none(&rec.labels),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(rec.node.clone()),
            host_network: Some(false),
            containers,
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(rec.ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: rec.ip.to_string(),
            }]),
            host_ip: Some(host_ip.to_string()),
            host_ips: Some(vec![HostIP {
                ip: host_ip.to_string(),
            }]),
            start_time: time(&rec.created),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                last_transition_time: time(&rec.created),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

pub fn namespace_object(rec: &NamespaceRecord) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(rec.name.clone()),
            uid: Some(rec.uid.clone()),
            creation_timestamp: time(&rec.created),
            labels: Some(rec.object_labels()),
            ..ObjectMeta::default()
        },
        spec: Some(NamespaceSpec {
            finalizers: Some(vec!["kubernetes".into()]),
        }),
        status: Some(NamespaceStatus {
            phase: Some("Active".into()),
            ..NamespaceStatus::default()
        }),
    }
}

/// The cluster directory's file of a pod's object. Hidden files are ignored by the readers and
/// names are RFC 1123 labels, so `.` separates without ambiguity.
pub fn pod_file(pod: &PodRef) -> String {
    format!("pod.{}.yaml", pod.file_stem())
}

pub fn namespace_file(name: &str) -> String {
    format!("namespace.{name}.yaml")
}

pub fn to_yaml<T: Serialize>(object: &T) -> String {
    serde_saphyr::to_string(object).expect("Kubernetes objects serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> PodRecord {
        PodRecord {
            name: "a".into(),
            netns: "hlab-pod.x.a".into(),
            node: "node2".into(),
            ip: "10.128.2.5".parse().unwrap(),
            pod_namespace: "x".into(),
            labels: parse_labels("pod=a,app.kubernetes.io/name=web").unwrap(),
            ports: [parse_ports("80").unwrap(), parse_ports("81").unwrap()].concat(),
            uid: uid_from(b"x/a"),
            created: "2025-01-02T03:04:05Z".into(),
            container_id: "lab-pod.x.a".into(),
            host_veth: "rsdn0123456789a".into(),
            gateway: "10.128.2.1".parse().unwrap(),
        }
    }

    #[test]
    fn pod_refs() {
        let p: PodRef = "x/a".parse().unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("x", "a"));
        assert_eq!(p.to_string(), "x/a");
        assert_eq!(p.file_stem(), "x.a");
        for bad in ["a", "x/", "/a", "X/a", "x/a/b", "x/a.b", "x/-a", "x_y/a"] {
            assert!(bad.parse::<PodRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_parse_and_validate() {
        let l = parse_labels("pod=a,ns=x,empty=,example.com/tier=web_1.0").unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(l["empty"], "");
        assert_eq!(l["example.com/tier"], "web_1.0");
        assert!(parse_labels("").unwrap().is_empty());
        for bad in [
            "a",
            "=v",
            "a=b,a=c",
            "a=-b",
            "a=b c",
            "-a=b",
            "Ex.com/a=b",
            "a/b/c=d",
            &format!("a={}", "v".repeat(64)),
            &format!("{}=v", "k".repeat(64)),
        ] {
            assert!(parse_labels(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_changes_kubectl_style() {
        let changes: Vec<LabelChange> = ["b=2", "a-", "c=", "missing-"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let out = apply_label_changes(&parse_labels("a=1,b=1").unwrap(), &changes, &Labels::new())
            .unwrap();
        assert_eq!(format_labels(&out), "b=2,c=");
        assert!("a".parse::<LabelChange>().is_err());
        assert!("-".parse::<LabelChange>().is_err());
        assert!("a=b=c".parse::<LabelChange>().is_err());
        assert_eq!(format_labels(&Labels::new()), "<none>");
    }

    #[test]
    fn the_namespace_name_label_is_protected() {
        let protected = protected_namespace_labels("x");
        for change in [
            "kubernetes.io/metadata.name=y",
            "kubernetes.io/metadata.name-",
        ] {
            let c = [change.parse().unwrap()];
            assert!(
                apply_label_changes(&Labels::new(), &c, &protected).is_err(),
                "{change}"
            );
        }
        let same = ["kubernetes.io/metadata.name=x".parse().unwrap()];
        assert!(apply_label_changes(&Labels::new(), &same, &protected).is_ok());
    }

    #[test]
    fn ports_parse() {
        let both = parse_ports("80").unwrap();
        assert_eq!(
            both,
            vec![
                PortSpec {
                    name: "serve-80-tcp".into(),
                    container_port: 80,
                    protocol: Protocol::Tcp
                },
                PortSpec {
                    name: "serve-80-udp".into(),
                    container_port: 80,
                    protocol: Protocol::Udp
                },
            ]
        );
        assert_eq!(parse_ports("81/udp").unwrap()[0].name, "serve-81-udp");
        let named = parse_ports("http:8080").unwrap();
        assert_eq!(
            (named.len(), named[0].protocol, named[0].container_port),
            (1, Protocol::Tcp, 8080)
        );
        assert_eq!(
            parse_ports("dns:53/UDP").unwrap()[0].protocol,
            Protocol::Udp
        );
        for bad in [
            "0",
            "65536",
            "x",
            "80/sctp",
            "Http:80",
            "80-:80",
            "a--b:80",
            "123:80",
            "averyveryverylongname:80",
        ] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
        let dup = [parse_ports("80").unwrap(), parse_ports("x:80/udp").unwrap()].concat();
        assert!(check_ports(&dup).is_err());
        let dup_name = [parse_ports("a:80").unwrap(), parse_ports("a:81").unwrap()].concat();
        assert!(check_ports(&dup_name).is_err());
        assert!(check_ports(&record().ports).is_ok());
    }

    #[test]
    fn uids_are_uuid_shaped_and_stable() {
        let u = uid_from(b"seed");
        assert_eq!(u, uid_from(b"seed"));
        assert_ne!(u, uid_from(b"other"));
        let parts: Vec<usize> = u.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]));
    }

    /// The rendered YAML reads back (through the daemon's own YAML reader) as a Pod that has
    /// every field NetworkPolicy code reads.
    #[test]
    fn pod_object_renders_as_a_running_pod() {
        let rec = record();
        let yaml = to_yaml(&pod_object(&rec, "192.168.77.12".parse().unwrap()));
        let docs = rsdn::source::dir::read_documents(&yaml).unwrap();
        assert_eq!(docs.len(), 1);
        let v = &docs[0];
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["kind"], "Pod");
        assert_eq!(v["metadata"]["name"], "a");
        assert_eq!(v["metadata"]["namespace"], "x");
        assert_eq!(v["metadata"]["uid"], rec.uid.as_str());
        assert_eq!(v["metadata"]["creationTimestamp"], "2025-01-02T03:04:05Z");
        assert_eq!(v["metadata"]["labels"]["pod"], "a");
        assert_eq!(v["metadata"]["labels"]["app.kubernetes.io/name"], "web");
        assert_eq!(v["spec"]["nodeName"], "node2");
        assert_eq!(v["spec"]["hostNetwork"], false);
        let ports: Vec<(String, i64, String)> = v["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["ports"].as_array().unwrap().clone())
            .map(|p| {
                (
                    p["name"].as_str().unwrap().into(),
                    p["containerPort"].as_i64().unwrap(),
                    p["protocol"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                ("serve-80-tcp".into(), 80, "TCP".into()),
                ("serve-80-udp".into(), 80, "UDP".into()),
                ("serve-81-tcp".into(), 81, "TCP".into()),
                ("serve-81-udp".into(), 81, "UDP".into()),
            ]
        );
        assert_eq!(v["spec"]["containers"][0]["name"], "cont-80-tcp");
        assert_eq!(v["status"]["phase"], "Running");
        assert_eq!(v["status"]["podIP"], "10.128.2.5");
        assert_eq!(v["status"]["podIPs"][0]["ip"], "10.128.2.5");
        assert_eq!(v["status"]["hostIP"], "192.168.77.12");
        let typed: Pod = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(typed.status.unwrap().conditions.unwrap()[0].type_, "Ready");
    }

    #[test]
    fn a_pod_without_ports_has_one_container_and_no_labels_key() {
        let mut rec = record();
        rec.ports.clear();
        rec.labels.clear();
        let v = serde_json::to_value(pod_object(&rec, Ipv4Addr::LOCALHOST)).unwrap();
        assert_eq!(v["spec"]["containers"].as_array().unwrap().len(), 1);
        assert!(v["spec"]["containers"][0].get("ports").is_none());
        assert!(v["metadata"].get("labels").is_none());
    }

    #[test]
    fn namespace_object_carries_the_name_label() {
        let rec = NamespaceRecord {
            name: "x".into(),
            labels: parse_labels("ns=x").unwrap(),
            uid: uid_from(b"x"),
            created: "2025-01-02T03:04:05Z".into(),
        };
        let yaml = to_yaml(&namespace_object(&rec));
        let v = &rsdn::source::dir::read_documents(&yaml).unwrap()[0];
        assert_eq!(v["kind"], "Namespace");
        assert_eq!(v["metadata"]["name"], "x");
        assert!(v["metadata"].get("namespace").is_none());
        assert_eq!(v["metadata"]["labels"]["ns"], "x");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/metadata.name"], "x");
        assert_eq!(v["status"]["phase"], "Active");
        serde_json::from_value::<Namespace>(v.clone()).unwrap();
    }

    #[test]
    fn records_keep_the_status_keys_scripts_use() {
        let v = serde_json::to_value(record()).unwrap();
        assert_eq!(v["name"], "a");
        assert_eq!(v["namespace"], "hlab-pod.x.a", "the network namespace");
        assert_eq!(v["podNamespace"], "x");
        assert_eq!(v["ip"], "10.128.2.5");
        assert_eq!(v["node"], "node2");
        assert_eq!(v["ports"][0]["containerPort"], 80);
        assert_eq!(v["ports"][0]["protocol"], "TCP");
        let back: PodRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, record());
    }

    #[test]
    fn file_names() {
        assert_eq!(pod_file(&"x/a".parse().unwrap()), "pod.x.a.yaml");
        assert_eq!(namespace_file("x"), "namespace.x.yaml");
    }
}
