//! A stand-in Kubernetes API server for the lab and the tests: serves Nodes, Services,
//! EndpointSlices, Pods, Namespaces and NetworkPolicies (cluster-wide) over plain HTTP with the
//! real protocol as kube-rs uses it (lists with a resourceVersion, `limit`/`continue` paging,
//! field selectors, watch streams from a resourceVersion, bookmarks, `410 Gone` for a version
//! that is too old) and can be told to expire its history or to cut
//! every open watch, so relists and reconnects are tested without a cluster. It takes one kind
//! of write, the one the daemon makes: a strategic merge (or JSON merge) PATCH of a Node's
//! status (`nodes/NAME/status`), recorded and served back. Its objects come
//! from a directory of YAML (the lab's cluster directory) or from calls in tests. It can also
//! serve HTTPS and require a bearer token, writing the CA certificate and the token where a
//! pod's service account would have them, to test the daemon's in-cluster configuration.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// The kinds served: what the daemon watches (Node, Service, EndpointSlice) and what
/// NetworkPolicy needs (Pod, Namespace, NetworkPolicy). Each is described once in `KINDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    NetworkPolicy,
}

/// How the API serves a kind.
struct KindInfo {
    kind: Kind,
    name: &'static str,
    /// API group ("" for the core group) and version.
    group: &'static str,
    version: &'static str,
    /// The resource, as RBAC rules and URLs name it.
    resource: &'static str,
    namespaced: bool,
    /// A real API server validates objects: only what parses as the typed object is stored.
    check: fn(&Value) -> Result<(), String>,
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
    serde_json::from_value::<T>(v.clone())
        .map(drop)
        .map_err(|e| e.to_string())
}

const KINDS: [KindInfo; 6] = [
    KindInfo {
        kind: Kind::Node,
        name: "Node",
        group: "",
        version: "v1",
        resource: "nodes",
        namespaced: false,
        check: typed::<Node>,
    },
    KindInfo {
        kind: Kind::Service,
        name: "Service",
        group: "",
        version: "v1",
        resource: "services",
        namespaced: true,
        check: typed::<Service>,
    },
    KindInfo {
        kind: Kind::EndpointSlice,
        name: "EndpointSlice",
        group: "discovery.k8s.io",
        version: "v1",
        resource: "endpointslices",
        namespaced: true,
        check: typed::<EndpointSlice>,
    },
    KindInfo {
        kind: Kind::Pod,
        name: "Pod",
        group: "",
        version: "v1",
        resource: "pods",
        namespaced: true,
        check: typed::<Pod>,
    },
    KindInfo {
        kind: Kind::Namespace,
        name: "Namespace",
        group: "",
        version: "v1",
        resource: "namespaces",
        namespaced: false,
        check: typed::<Namespace>,
    },
    KindInfo {
        kind: Kind::NetworkPolicy,
        name: "NetworkPolicy",
        group: "networking.k8s.io",
        version: "v1",
        resource: "networkpolicies",
        namespaced: true,
        check: typed::<NetworkPolicy>,
    },
];

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Node,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
    ];

    fn info(self) -> &'static KindInfo {
        KINDS
            .iter()
            .find(|i| i.kind == self)
            .expect("every kind is in KINDS")
    }

    fn of(kind: &str) -> Option<Kind> {
        KINDS.iter().find(|i| i.name == kind).map(|i| i.kind)
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The cluster-wide collection path: /api/v1/pods, /apis/networking.k8s.io/v1/networkpolicies.
    fn path(self) -> String {
        let i = self.info();
        match i.group {
            "" => format!("/api/{}/{}", i.version, i.resource),
            g => format!("/apis/{g}/{}/{}", i.version, i.resource),
        }
    }

    /// (API group, resource), as RBAC rules name them.
    pub fn resource(self) -> (&'static str, &'static str) {
        (self.info().group, self.info().resource)
    }

    fn api_version(self) -> String {
        let i = self.info();
        match i.group {
            "" => i.version.to_string(),
            g => format!("{g}/{}", i.version),
        }
    }

    fn namespaced(self) -> bool {
        self.info().namespaced
    }

    fn check(self, v: &Value) -> Result<(), String> {
        (self.info().check)(v)
    }
}

/// (kind, namespace, name).
pub type Key = (Kind, String, String);

struct Event {
    rv: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
    /// The object before a MODIFIED event: a watch with a field selector reports an object
    /// that starts or stops matching as ADDED or DELETED.
    previous: Option<Value>,
}

/// A field selector (`spec.hostNetwork=false,status.phase!=Failed`): every term must hold.
/// Fields are the ones the real API server can select on; any other is refused (400), as the
/// real one refuses it, so a selector the daemon sends is checked here too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses the (URL-decoded) `fieldSelector` of a request for `kind`.
    pub fn parse(kind: Kind, text: &str) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in text.split(',').filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            if field_value(kind, &Value::Null, field).is_none() {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), equal, value.to_string()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn matches(&self, kind: Kind, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            (field_value(kind, object, field).as_deref() == Some(value.as_str())) == *equal
        })
    }

    /// What a watch with this selector reports of `e`: the API server's watch cache turns a
    /// modification into ADDED when the object starts matching and DELETED when it stops.
    fn event<'e>(&self, e: &'e Event) -> Option<(&'static str, &'e Value)> {
        let now = self.matches(e.kind, &e.object);
        let was = e.previous.as_ref().map(|p| self.matches(e.kind, p));
        let kind_of_event = match (e.kind_of_event, was, now) {
            ("MODIFIED", Some(true), true) => "MODIFIED",
            ("MODIFIED", Some(false), true) => "ADDED",
            ("MODIFIED", Some(true), false) => "DELETED",
            (other, None, true) => other,
            _ => return None,
        };
        Some((kind_of_event, &e.object))
    }
}

/// The value of a selectable field of an object of `kind` (None: not selectable). Every kind
/// selects on its name and namespace; Pods on the fields of the API server's
/// `pod.ToSelectableFields`.
fn field_value(kind: Kind, o: &Value, field: &str) -> Option<String> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Some(match (kind, field) {
        (_, "metadata.name") => text(&o["metadata"]["name"]),
        (_, "metadata.namespace") => text(&o["metadata"]["namespace"]),
        (Kind::Pod, "spec.nodeName" | "spec.restartPolicy" | "spec.schedulerName") => {
            text(&o["spec"][&field["spec.".len()..]])
        }
        (Kind::Pod, "spec.serviceAccountName") => text(&o["spec"]["serviceAccountName"]),
        (Kind::Pod, "spec.hostNetwork") => o["spec"]["hostNetwork"]
            .as_bool()
            .unwrap_or(false)
            .to_string(),
        (Kind::Pod, "status.phase") => text(&o["status"]["phase"]),
        (Kind::Pod, "status.podIP") => text(&o["status"]["podIPs"][0]["ip"]),
        (Kind::Pod, "status.nominatedNodeName") => text(&o["status"]["nominatedNodeName"]),
        _ => return None,
    })
}

/// A query parameter's value, URL-decoded.
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the server was asked, for tests to check how the client behaved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Requests {
    pub lists: HashMap<Kind, usize>,
    pub watches: HashMap<Kind, usize>,
    /// The resourceVersion of the last watch request of each kind.
    pub last_watch_from: HashMap<Kind, u64>,
    /// The field selector of the last list or watch of each kind ("" for none).
    pub field_selectors: HashMap<Kind, String>,
    pub bookmarks_sent: usize,
    pub gone_sent: usize,
    /// Requests for anything but a list or watch of the served kinds or a patch of a Node's
    /// status (a get, another write, another resource): answered 404, 405 or 415, as an API
    /// server would to a client without RBAC for them.
    pub refused: Vec<String>,
    /// Every PATCH of a Node's status, answered or not.
    pub patches: Vec<StatusPatch>,
}

/// A PATCH of `nodes/NAME/status`, as it came and how it was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusPatch {
    pub node: String,
    /// (API group, resource, verb), as RBAC rules name them: ("", "nodes/status", "patch").
    pub rbac: (&'static str, &'static str, &'static str),
    pub content_type: String,
    /// The `fieldManager` query parameter ("" for none).
    pub field_manager: String,
    pub body: Value,
    /// The status code answered: 200, or 404 for a Node that does not exist.
    pub code: u16,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Event>,
    /// A watch from a resourceVersion below this is answered 410 Gone.
    oldest: u64,
    requests: Requests,
}

/// What open watches look at when woken.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tick {
    rv: u64,
    expired: u64,
    dropped: u64,
}

/// Events kept for watches to resume from; older ones are compacted away (410 Gone).
const HISTORY: usize = 10_000;

pub struct ApiServer {
    state: Mutex<State>,
    tick: watch::Sender<Tick>,
    bookmark_every: Duration,
    /// When set, every request must carry `Authorization: Bearer <token>`.
    token: OnceLock<String>,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(v: &Value) -> Body {
    Full::new(Bytes::from(v.to_string()))
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn key_of(v: &Value) -> Result<Key, String> {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default();
    let kind = Kind::of(kind).ok_or_else(|| format!("kind {kind:?} is not served"))?;
    let meta = &v["metadata"];
    let name = meta["name"].as_str().filter(|n| !n.is_empty());
    let name = name.ok_or("metadata.name is missing")?.to_string();
    let ns = meta["namespace"].as_str().unwrap_or_default().to_string();
    match (kind.namespaced(), ns.is_empty()) {
        (false, false) => return Err(format!("a {} has no namespace", kind.name())),
        (true, true) => return Err("metadata.namespace is missing".into()),
        _ => {}
    }
    kind.check(v)?;
    Ok((kind, ns, name))
}

/// Merges a patch into an object: RFC 7386 JSON merge (objects merged, `null` removes, lists
/// replaced) or, `strategic`, Kubernetes' strategic merge for what a Node's status needs: its
/// `conditions` and `addresses` lists merge by their `type` (`patchMergeKey`), so a patch
/// that sets one condition keeps the others.
pub fn merge(target: &mut Value, patch: &Value, strategic: bool) {
    const MERGE_BY_TYPE: [&str; 2] = ["conditions", "addresses"];
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        match (v, t.get_mut(k)) {
            (Value::Null, _) => {
                t.remove(k);
            }
            (Value::Array(items), Some(Value::Array(have)))
                if strategic && MERGE_BY_TYPE.contains(&k.as_str()) =>
            {
                for item in items {
                    match have.iter_mut().find(|h| h["type"] == item["type"]) {
                        Some(h) => merge(h, item, true),
                        None => have.push(item.clone()),
                    }
                }
            }
            (v, Some(existing)) => merge(existing, v, strategic),
            (v, None) => {
                let mut fresh = Value::Null;
                merge(&mut fresh, v, strategic);
                t.insert(k.clone(), fresh);
            }
        }
    }
}

/// The object without the fields the server sets, for comparing content.
fn content(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("uid");
    }
    v
}

impl ApiServer {
    pub fn new(bookmark_every: Duration) -> Arc<ApiServer> {
        Arc::new(ApiServer {
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            tick: watch::Sender::new(Tick::default()),
            bookmark_every,
            token: OnceLock::new(),
        })
    }

    /// From now on, refuses (401) requests without `Authorization: Bearer <token>`.
    pub fn require_token(&self, token: String) {
        let _ = self.token.set(token);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(
        &self,
        st: &mut State,
        kind: Kind,
        kind_of_event: &'static str,
        object: Value,
        previous: Option<Value>,
    ) {
        st.history.push_back(Event {
            rv: st.rv,
            kind,
            kind_of_event,
            object,
            previous,
        });
        while st.history.len() > HISTORY {
            if let Some(e) = st.history.pop_front() {
                st.oldest = e.rv + 1;
            }
        }
        let rv = st.rv;
        self.tick.send_modify(|t| t.rv = rv);
    }

    /// Creates or updates an object (an error if it is not a valid object of a served kind).
    /// Returns false when nothing changed. Status conditions are their owners' (the kubelet's,
    /// a network plugin's, written with a PATCH of the status): an object given without
    /// conditions keeps the ones it has, as the lab's Node files carry none.
    pub fn apply(&self, mut object: Value) -> Result<bool, String> {
        let key = key_of(&object)?;
        let mut st = self.lock();
        let old = st.objects.get(&key);
        if let Some(conditions) = old.map(|o| &o["status"]["conditions"]) {
            if !conditions.is_null() && object["status"]["conditions"].is_null() {
                merge(
                    &mut object,
                    &json!({"status": {"conditions": conditions}}),
                    false,
                );
            }
        }
        if old.is_some_and(|o| content(o) == content(&object)) {
            return Ok(false);
        }
        // The object's own uid (a stored object's, as the lab's Pods carry), else the one it
        // was given when created here.
        let given = object["metadata"]["uid"].as_str().map(String::from);
        let uid = given
            .or_else(|| old.and_then(|o| o["metadata"]["uid"].as_str().map(String::from)))
            .unwrap_or_else(|| format!("uid-{}-{}", st.rv + 1, key.2));
        let previous = old.cloned();
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.rv += 1;
        object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        object["metadata"]["uid"] = json!(uid);
        st.objects.insert(key.clone(), object.clone());
        self.record(&mut st, key.0, event, object, previous);
        Ok(true)
    }

    pub fn delete(&self, key: &Key) -> bool {
        let mut st = self.lock();
        let Some(mut object) = st.objects.remove(key) else {
            return false;
        };
        st.rv += 1;
        object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        self.record(&mut st, key.0, "DELETED", object, None);
        true
    }

    /// Makes the served objects exactly `objects` (Lists are flattened): applies what is new
    /// or changed, deletes what is gone. Invalid objects are skipped and returned with why.
    pub fn sync_objects(&self, objects: Vec<Value>) -> Vec<String> {
        let mut skipped = Vec::new();
        let mut wanted = std::collections::HashSet::new();
        let mut flat = Vec::new();
        for o in objects {
            match o.get("items").and_then(Value::as_array) {
                Some(items) if o["kind"].as_str().is_some_and(|k| k.ends_with("List")) => {
                    flat.extend(items.iter().cloned())
                }
                _ if o.is_null() => {}
                _ => flat.push(o),
            }
        }
        for o in flat {
            match key_of(&o) {
                Ok(key) => {
                    wanted.insert(key);
                    if let Err(e) = self.apply(o) {
                        skipped.push(e);
                    }
                }
                Err(e) => skipped.push(format!(
                    "{} {}: {e}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["metadata"]["name"].as_str().unwrap_or("?")
                )),
            }
        }
        let gone: Vec<Key> = self
            .lock()
            .objects
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.delete(&k);
        }
        skipped
    }

    /// Serves the YAML documents of every file in `dir`.
    pub fn sync_dir(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        let mut objects = Vec::new();
        let mut skipped = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        files.sort();
        for f in files {
            match std::fs::read_to_string(&f)
                .map_err(|e| e.to_string())
                .and_then(|t| rsdn::source::dir::read_documents(&t))
            {
                Ok(docs) => objects.extend(docs),
                Err(e) => skipped.push(format!("{}: {e}", f.display())),
            }
        }
        skipped.extend(self.sync_objects(objects));
        Ok(skipped)
    }

    /// Compacts the history: every open watch gets `410 Gone` and must relist.
    pub fn expire(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.oldest = st.rv + 1;
        self.tick.send_modify(|t| t.expired += 1);
    }

    /// Cuts every open watch connection mid-stream (no clean end of the response).
    pub fn drop_watches(&self) {
        self.tick.send_modify(|t| t.dropped += 1);
    }

    /// The object stored under `key`, as a list would serve it.
    pub fn object(&self, key: &Key) -> Option<Value> {
        self.lock().objects.get(key).cloned()
    }

    pub fn requests(&self) -> Requests {
        self.lock().requests.clone()
    }

    fn refused(&self, what: String) {
        warn!(request = %what, "refused a request");
        self.lock().requests.refused.push(what);
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    fn list(
        &self,
        kind: Kind,
        query: &HashMap<&str, &str>,
        fields: &FieldSelector,
    ) -> (StatusCode, Value) {
        let mut st = self.lock();
        *st.requests.lists.entry(kind).or_default() += 1;
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|&l| l > 0)
            .unwrap_or(usize::MAX);
        let offset = match query.get("continue").filter(|c| !c.is_empty()) {
            None => 0,
            // A continue token is good for the version it was cut from only.
            Some(token) => match token.split_once('-') {
                Some((rv, off)) if rv.parse() == Ok(st.rv) => off.parse().unwrap_or(0),
                _ => {
                    return (
                        StatusCode::GONE,
                        status(410, "Expired", "The provided continue parameter is too old to display a consistent list result".into()),
                    )
                }
            },
        };
        let items: Vec<&Value> = st
            .objects
            .iter()
            .filter(|(k, v)| k.0 == kind && fields.matches(kind, v))
            .map(|(_, v)| v)
            .skip(offset)
            .collect();
        let more = items.len() > limit;
        let items: Vec<&Value> = items.into_iter().take(limit).collect();
        let mut meta = json!({"resourceVersion": st.rv.to_string()});
        if more {
            meta["continue"] = json!(format!("{}-{}", st.rv, offset + items.len()));
        }
        let body = json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
                          "metadata": meta, "items": items});
        (StatusCode::OK, body)
    }

    /// A watch: the events after `from`, then new ones as they come, bookmarks if asked,
    /// until the timeout, an expiry (410 in the stream) or a drop (connection cut).
    fn watch(
        self: &Arc<Self>,
        kind: Kind,
        query: &HashMap<&str, &str>,
        fields: FieldSelector,
    ) -> Body {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = query.get("allowWatchBookmarks") == Some(&"true");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(1800), Duration::from_secs);
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(64);
        let me = Arc::clone(self);
        let mut ticks = self.tick.subscribe();
        let start = *ticks.borrow_and_update();
        {
            let mut st = self.lock();
            *st.requests.watches.entry(kind).or_default() += 1;
            st.requests.last_watch_from.insert(kind, from);
        }
        tokio::spawn(async move {
            let line = |v: Value| Ok(Frame::data(Bytes::from(v.to_string() + "\n")));
            let gone = |me: &ApiServer, why: String| {
                me.lock().requests.gone_sent += 1;
                line(json!({"type": "ERROR", "object": status(410, "Expired", why)}))
            };
            let deadline = tokio::time::Instant::now() + timeout;
            let mut sent = from;
            // resourceVersion 0 (or none): the current objects as ADDED events first.
            if from == 0 {
                let (rv, current): (u64, Vec<Value>) = {
                    let st = me.lock();
                    let objects = st
                        .objects
                        .iter()
                        .filter(|(k, v)| k.0 == kind && fields.matches(kind, v));
                    (st.rv, objects.map(|(_, v)| v.clone()).collect())
                };
                for o in current {
                    if tx
                        .send(line(json!({"type": "ADDED", "object": o})))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                sent = rv;
            }
            loop {
                let batch: Result<Vec<Value>, String> = {
                    let st = me.lock();
                    if sent + 1 < st.oldest {
                        Err(format!("too old resource version: {sent} ({})", st.oldest))
                    } else {
                        let events = st.history.iter().filter(|e| e.rv > sent);
                        let out = events
                            .filter(|e| e.kind == kind)
                            .filter_map(|e| fields.event(e))
                            .map(|(event, o)| json!({"type": event, "object": o}))
                            .collect();
                        sent = st.rv;
                        Ok(out)
                    }
                };
                match batch {
                    Ok(events) => {
                        for e in events {
                            if tx.send(line(e)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(why) => {
                        let _ = tx.send(gone(&me, why)).await;
                        return;
                    }
                }
                let bookmark = tokio::time::sleep(me.bookmark_every);
                tokio::select! {
                    r = ticks.changed() => {
                        if r.is_err() { return; }
                        let t = *ticks.borrow_and_update();
                        if t.dropped != start.dropped {
                            let _ = tx.send(Err(std::io::Error::other("watch dropped"))).await;
                            return;
                        }
                        if t.expired != start.expired {
                            let _ = tx.send(gone(&me, "the history was compacted".into())).await;
                            return;
                        }
                    }
                    _ = bookmark, if bookmarks => {
                        me.lock().requests.bookmarks_sent += 1;
                        let b = json!({"type": "BOOKMARK", "object": {"kind": kind.name(),
                            "apiVersion": kind.api_version(),
                            "metadata": {"resourceVersion": sent.to_string()}}});
                        if tx.send(line(b)).await.is_err() { return; }
                    }
                    _ = tokio::time::sleep_until(deadline) => return,
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        BodyExt::boxed(StreamBody::new(stream))
    }

    /// A PATCH of `nodes/NAME/status`: merged into the Node (a MODIFIED event), recorded.
    fn patch_status(
        &self,
        node: &str,
        req: &hyper::http::request::Parts,
        query: &HashMap<&str, &str>,
        body: &[u8],
    ) -> (StatusCode, Value) {
        let content_type = req
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let strategic = match content_type.as_str() {
            "application/strategic-merge-patch+json" => true,
            "application/merge-patch+json" => false,
            other => {
                self.refused(format!(
                    "PATCH {} ({other}: not a merge patch)",
                    req.uri.path()
                ));
                let s = status(
                    415,
                    "UnsupportedMediaType",
                    format!("{other} is not served"),
                );
                return (StatusCode::UNSUPPORTED_MEDIA_TYPE, s);
            }
        };
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            let s = status(400, "BadRequest", "the patch is not JSON".into());
            return (StatusCode::BAD_REQUEST, s);
        };
        let mut st = self.lock();
        let key = (Kind::Node, String::new(), node.to_string());
        let answer = match st.objects.get(&key) {
            None => (
                StatusCode::NOT_FOUND,
                status(404, "NotFound", format!("nodes \"{node}\" not found")),
            ),
            Some(old) => {
                let previous = old.clone();
                let mut object = old.clone();
                // The status subresource changes the status and nothing else.
                let mut new_status = object["status"].take();
                merge(&mut new_status, &patch["status"], strategic);
                object["status"] = new_status;
                if content(&object) != content(&previous) {
                    st.rv += 1;
                    object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                    st.objects.insert(key.clone(), object.clone());
                    self.record(
                        &mut st,
                        Kind::Node,
                        "MODIFIED",
                        object.clone(),
                        Some(previous),
                    );
                }
                (StatusCode::OK, object)
            }
        };
        st.requests.patches.push(StatusPatch {
            node: node.to_string(),
            rbac: ("", "nodes/status", "patch"),
            content_type,
            field_manager: query
                .get("fieldManager")
                .map_or(String::new(), |f| decode(f)),
            body: patch,
            code: answer.0.as_u16(),
        });
        drop(st);
        info!(node, status = answer.0.as_u16(), "patch of a Node's status");
        answer
    }

    fn handle(self: &Arc<Self>, req: &hyper::http::request::Parts, body: &[u8]) -> Response<Body> {
        let path = req.uri.path();
        let query: HashMap<&str, &str> = req
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let reply = |code: StatusCode, body: Body| {
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(body)
                .expect("valid response")
        };
        if let Some(token) = self.token.get() {
            let given = req
                .headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if given != Some(format!("Bearer {token}").as_str()) {
                self.refused(format!("{} {path} (no valid bearer token)", req.method));
                let s = status(401, "Unauthorized", "Unauthorized".into());
                return reply(StatusCode::UNAUTHORIZED, full(&s));
            }
        }
        let node_status = path
            .strip_prefix("/api/v1/nodes/")
            .and_then(|p| p.strip_suffix("/status"))
            .filter(|n| !n.is_empty() && !n.contains('/'));
        if let (Some(node), &hyper::Method::PATCH) = (node_status, &req.method) {
            let (code, body) = self.patch_status(node, req, &query, body);
            return reply(code, full(&body));
        }
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.path() == path) else {
            self.refused(format!("{} {path}", req.method));
            let s = status(404, "NotFound", format!("the server could not find {path}"));
            return reply(StatusCode::NOT_FOUND, full(&s));
        };
        if req.method != hyper::Method::GET {
            self.refused(format!("{} {path}", req.method));
            let s = status(405, "MethodNotAllowed", "read-only".into());
            return reply(StatusCode::METHOD_NOT_ALLOWED, full(&s));
        }
        let selector = query
            .get("fieldSelector")
            .map_or(String::new(), |f| decode(f));
        let fields = match FieldSelector::parse(kind, &selector) {
            Ok(f) => f,
            Err(e) => {
                self.refused(format!(
                    "{} {path}?fieldSelector={selector} ({e})",
                    req.method
                ));
                let s = status(400, "BadRequest", e);
                return reply(StatusCode::BAD_REQUEST, full(&s));
            }
        };
        self.lock().requests.field_selectors.insert(kind, selector);
        if matches!(query.get("watch"), Some(&("true" | "1"))) {
            debug!(kind = kind.name(), query = ?query, "watch");
            reply(StatusCode::OK, self.watch(kind, &query, fields))
        } else {
            let (code, body) = self.list(kind, &query, &fields);
            info!(kind = kind.name(), status = code.as_u16(), resource_version = %body["metadata"]["resourceVersion"], "list");
            reply(code, full(&body))
        }
    }

    /// Serves HTTP on `listener` until the runtime stops.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.serve_tls(listener, None).await
    }

    /// Serves HTTPS with `tls` (HTTP without it) on `listener` until the runtime stops.
    pub async fn serve_tls(self: Arc<Self>, listener: TcpListener, tls: Option<TlsAcceptor>) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let me = Arc::clone(&self);
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => me.connection(stream).await,
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => me.connection(stream).await,
                        Err(e) => debug!(error = %e, "TLS handshake failed"),
                    },
                }
            });
        }
    }

    async fn connection<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let me = Arc::clone(&self);
            async move {
                let (parts, body) = req.into_parts();
                // Only a patch has a body; an unreadable one reads as empty (400 for a patch).
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                Ok::<_, Infallible>(me.handle(&parts, &body))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    }
}

/// A CA, a server certificate for `ip` signed by it, and a bearer token. Writes `ca.crt`,
/// `token` and `namespace` into `dir`, the files kubelet mounts into a pod at
/// `/var/run/secrets/kubernetes.io/serviceaccount`; returns the server's TLS side and the token.
pub fn service_account(dir: &Path, ip: IpAddr) -> anyhow::Result<(TlsAcceptor, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    use sha2::{Digest, Sha256};
    use tokio_rustls::rustls;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "rsdn lab API server CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "rsdn lab API server");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer)?;

    let seed = format!(
        "{:?}{}{}",
        std::time::SystemTime::now(),
        std::process::id(),
        key.serialize_pem()
    );
    let token = data_encoding::HEXLOWER.encode(&Sha256::digest(seed.as_bytes()));
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.crt"), ca_cert.pem())?;
    std::fs::write(dir.join("token"), &token)?;
    std::fs::write(dir.join("namespace"), "rsdn")?;

    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )?;
    Ok((TlsAcceptor::from(Arc::new(config)), token))
}

/// A kubeconfig that points kube-rs at `server` (plain HTTP, no credentials).
pub fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n\
         users:\n- name: lab\n  user: {{}}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\n\
         current-context: lab\n"
    )
}

/// `rsdn-lab apiserver`: serves `dir` on `listen`, re-reading it on change. SIGUSR1 cuts every
/// watch, SIGUSR2 expires the history (410 Gone), SIGTERM/SIGINT stop it.
pub async fn run_dir(
    dir: &Path,
    listen: std::net::SocketAddr,
    bookmark_every: Duration,
    service_account_dir: Option<&Path>,
) -> anyhow::Result<()> {
    use notify::Watcher;
    use tokio::signal::unix::{signal, SignalKind};
    let server = ApiServer::new(bookmark_every);
    let tls = match service_account_dir {
        Some(sa) => {
            let (tls, token) = service_account(sa, listen.ip())?;
            server.require_token(token);
            info!(dir = %sa.display(), "HTTPS with a bearer token; ca.crt, token and namespace written");
            Some(tls)
        }
        None => None,
    };
    let listener = TcpListener::bind(listen).await?;
    info!(address = %listener.local_addr()?, dir = %dir.display(), "lab API server listening");
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = ev_tx.send(());
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    let sync = |server: &ApiServer| match server.sync_dir(dir) {
        Ok(skipped) => {
            for s in skipped {
                warn!("not served: {s}");
            }
            info!(
                resource_version = server.resource_version(),
                "objects synced from the directory"
            );
        }
        Err(e) => warn!(error = %e, "cannot read the directory"),
    };
    sync(&server);
    tokio::spawn(Arc::clone(&server).serve_tls(listener, tls));
    let (mut usr1, mut usr2) = (
        signal(SignalKind::user_defined1())?,
        signal(SignalKind::user_defined2())?,
    );
    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    loop {
        tokio::select! {
            Some(()) = ev_rx.recv() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                while ev_rx.try_recv().is_ok() {}
                sync(&server);
            }
            _ = usr1.recv() => { info!("cutting every watch connection"); server.drop_watches(); }
            _ = usr2.recv() => { info!("expiring the history: watches get 410 Gone"); server.expire(); }
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_at_its_api_path() {
        let paths: Vec<(String, String, (&str, &str))> = Kind::ALL
            .iter()
            .map(|k| (k.path(), k.api_version(), k.resource()))
            .collect();
        assert_eq!(
            paths,
            [
                ("/api/v1/nodes".into(), "v1".into(), ("", "nodes")),
                ("/api/v1/services".into(), "v1".into(), ("", "services")),
                (
                    "/apis/discovery.k8s.io/v1/endpointslices".into(),
                    "discovery.k8s.io/v1".into(),
                    ("discovery.k8s.io", "endpointslices")
                ),
                ("/api/v1/pods".into(), "v1".into(), ("", "pods")),
                ("/api/v1/namespaces".into(), "v1".into(), ("", "namespaces")),
                (
                    "/apis/networking.k8s.io/v1/networkpolicies".into(),
                    "networking.k8s.io/v1".into(),
                    ("networking.k8s.io", "networkpolicies")
                ),
            ]
        );
        for k in Kind::ALL {
            assert_eq!(Kind::of(k.name()), Some(k));
        }
    }

    #[test]
    fn pods_namespaces_and_policies_are_served_and_validated() {
        let server = ApiServer::new(Duration::from_secs(1));
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x", "uid": "given-uid", "labels": {"pod": "a"}},
            "spec": {"nodeName": "node1", "containers": [{"name": "c",
                "ports": [{"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": "10.128.0.5"}});
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "x", "labels": {"kubernetes.io/metadata.name": "x"}}});
        let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
        let skipped = server.sync_objects(vec![
            pod,
            ns,
            np,
            json!({"kind": "Pod", "metadata": {"name": "no-namespace"}}),
            json!({"kind": "Namespace", "metadata": {"name": "y", "namespace": "x"}}),
            json!({"kind": "NetworkPolicy", "metadata": {"name": "bad", "namespace": "x"},
                   "spec": {"podSelector": "everything"}}),
            json!({"kind": "ConfigMap", "metadata": {"name": "c", "namespace": "x"}}),
        ]);
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(skipped[0].contains("Pod no-namespace: metadata.namespace is missing"));
        assert!(skipped[1].contains("Namespace y: a Namespace has no namespace"));
        assert!(skipped[2].contains("NetworkPolicy bad"));
        assert!(skipped[3].contains("\"ConfigMap\" is not served"));
        let none = HashMap::new();
        for (kind, list, api_version, name) in [
            (Kind::Pod, "PodList", "v1", "a"),
            (Kind::Namespace, "NamespaceList", "v1", "x"),
            (
                Kind::NetworkPolicy,
                "NetworkPolicyList",
                "networking.k8s.io/v1",
                "deny",
            ),
        ] {
            let (code, body) = server.list(kind, &none, &FieldSelector::default());
            assert_eq!(code, StatusCode::OK);
            assert_eq!(body["kind"], list);
            assert_eq!(body["apiVersion"], api_version);
            assert_eq!(body["items"].as_array().unwrap().len(), 1);
            assert_eq!(body["items"][0]["metadata"]["name"], name);
        }
        let (_, pods) = server.list(Kind::Pod, &none, &FieldSelector::default());
        assert_eq!(
            pods["items"][0]["metadata"]["uid"], "given-uid",
            "a stored object's uid is kept"
        );
        let (_, nodes) = server.list(Kind::Node, &none, &FieldSelector::default());
        assert!(nodes["items"].as_array().unwrap().is_empty());
    }

    #[test]
    fn a_strategic_merge_sets_one_condition_and_keeps_the_others() {
        let status = json!({"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady"},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}],
            "addresses": [{"type": "InternalIP", "address": "192.168.1.11"}]});
        let patch = json!({"conditions": [
            {"type": "NetworkUnavailable", "status": "False", "reason": "RsdnIsUp"}]});
        let mut s = status.clone();
        merge(&mut s, &patch, true);
        assert_eq!(s["conditions"][0], status["conditions"][0], "Ready kept");
        assert_eq!(
            s["conditions"][1],
            json!({"type": "NetworkUnavailable", "status": "False", "reason": "RsdnIsUp"})
        );
        assert_eq!(s["addresses"], status["addresses"]);
        // A JSON merge patch replaces the list; null removes a field.
        let mut s = status.clone();
        merge(&mut s, &patch, false);
        assert_eq!(s["conditions"], patch["conditions"]);
        merge(&mut s, &json!({"addresses": null}), false);
        assert!(s.get("addresses").is_none());
        // Onto nothing: the patch itself.
        let mut empty = Value::Null;
        merge(&mut empty, &patch, true);
        assert_eq!(empty, patch);
    }

    #[test]
    fn an_object_written_without_conditions_keeps_the_patched_ones() {
        let server = ApiServer::new(Duration::from_secs(1));
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.128.0.0/23"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.11"}]}});
        server.apply(node.clone()).unwrap();
        let key = (Kind::Node, String::new(), "n1".to_string());
        let condition = json!([{"type": "NetworkUnavailable", "status": "False"}]);
        server.lock().objects.get_mut(&key).unwrap()["status"]["conditions"] = condition.clone();
        // The lab rewrites the Node's file: nothing changed, nothing sent to watches.
        assert_eq!(server.apply(node.clone()), Ok(false));
        let mut moved = node;
        moved["spec"]["podCIDR"] = json!("10.128.2.0/23");
        assert_eq!(server.apply(moved), Ok(true));
        assert_eq!(
            server.lock().objects[&key]["status"]["conditions"],
            condition
        );
    }

    #[test]
    fn field_selectors_filter_lists_and_turn_changes_into_added_and_deleted() {
        let selector = decode("spec.hostNetwork%3Dfalse%2Cstatus.phase%21%3DSucceeded");
        assert_eq!(selector, "spec.hostNetwork=false,status.phase!=Succeeded");
        let fields = FieldSelector::parse(Kind::Pod, &selector).unwrap();
        let pod = |name: &str, host: bool, phase: &str| {
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "x"},
                "spec": {"hostNetwork": host, "containers": []}, "status": {"phase": phase}})
        };
        let server = ApiServer::new(Duration::from_secs(1));
        server.apply(pod("runs", false, "Running")).unwrap();
        server.apply(pod("host", true, "Running")).unwrap();
        server.apply(pod("done", false, "Succeeded")).unwrap();
        let (_, list) = server.list(Kind::Pod, &HashMap::new(), &fields);
        let names: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["runs"]);
        // The pod finishes, then (as a new object of the same name) runs again.
        server.apply(pod("runs", false, "Succeeded")).unwrap();
        server.apply(pod("runs", false, "Running")).unwrap();
        server.apply(pod("host", true, "Pending")).unwrap();
        let st = server.lock();
        let seen: Vec<(&str, &str)> = st
            .history
            .iter()
            .filter_map(|e| fields.event(e))
            .map(|(ev, o)| (ev, o["metadata"]["name"].as_str().unwrap()))
            .collect();
        assert_eq!(
            seen,
            [("ADDED", "runs"), ("DELETED", "runs"), ("ADDED", "runs")]
        );
        for bad in ["spec.hostNetwork", "status.hostIP=10.0.0.1"] {
            assert!(FieldSelector::parse(Kind::Pod, bad).is_err(), "{bad}");
        }
        assert!(FieldSelector::parse(Kind::Node, "status.phase=Running").is_err());
        assert!(FieldSelector::parse(Kind::Node, "metadata.name=n1").is_ok());
    }
}
