//! The daemon's HTTP servers, split as kube-proxy splits them. The health server
//! (`healthzBindAddress`, default 0.0.0.0:10256, kube-proxy's healthz port) answers `/healthz`
//! (the node's datapath, what load balancers' health checks ask), `/livez` (liveness) and
//! `/readyz` (readiness), and nothing else: health-check traffic from outside never reaches the
//! metrics. The metrics server (`metricsBindAddress`, default 127.0.0.1:10249, kube-proxy's)
//! answers `/metrics` (OpenMetrics text) and nothing else.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::health::{Answer, Health};

pub fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn probe(a: Answer) -> Response<Full<Bytes>> {
    let status = if a.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(status, "application/json", a.body())
}

fn not_found(try_paths: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::NOT_FOUND,
        "text/plain",
        format!("not found: try {try_paths}\n"),
    )
}

type Code = Vec<(&'static str, &'static str)>;

/// kube-proxy's counts of the health server's answers, by status code
/// (`kubeproxy_proxy_healthz_total{code}`, `kubeproxy_proxy_livez_total{code}`).
#[derive(Clone, Default)]
pub struct ProbeMetrics {
    healthz: Family<Code, Counter>,
    livez: Family<Code, Counter>,
}

impl ProbeMetrics {
    pub fn register(registry: &mut Registry) -> ProbeMetrics {
        let m = ProbeMetrics::default();
        // Counters: the text encoding appends `_total`, giving kube-proxy's names.
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez.clone(),
        );
        m
    }

    fn count(family: &Family<Code, Counter>, ok: bool) {
        let code = if ok { "200" } else { "503" };
        family.get_or_create(&vec![("code", code)]).inc();
    }
}

/// The health server's answer to one request; nothing but the counts changes.
pub fn health_route(path: &str, health: &Health, probes: &ProbeMetrics) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => {
            let a = health.healthz(Instant::now());
            ProbeMetrics::count(&probes.healthz, a.ok);
            probe(a)
        }
        "/livez" => {
            let a = health.livez(Instant::now());
            ProbeMetrics::count(&probes.livez, a.ok);
            probe(a)
        }
        "/readyz" => probe(health.readyz()),
        _ => not_found("/healthz, /livez or /readyz"),
    }
}

/// The metrics server's answer to one request.
pub fn metrics_route(path: &str, registry: &Registry) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        return not_found("/metrics");
    }
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

/// Binds the health server on `addr` (an error if it is taken), then serves until the runtime
/// stops.
pub async fn serve_health(
    addr: SocketAddr,
    health: Arc<Health>,
    probes: ProbeMetrics,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(address = %listener.local_addr()?, "serving /healthz, /livez and /readyz");
    spawn_server(listener, Limits::default(), move |path| {
        health_route(path, &health, &probes)
    });
    Ok(())
}

/// Binds the metrics server on `addr` (an error if it is taken), then serves until the
/// runtime stops.
pub async fn serve_metrics(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(address = %listener.local_addr()?, "serving /metrics");
    spawn_server(listener, Limits::default(), move |path| {
        metrics_route(path, &registry)
    });
    Ok(())
}

/// Bounds on what clients can hold of one listener. Every listener may face the network (the
/// healthz port and the health check node ports cloud load balancers reach from outside, the
/// metrics port where it is opened up), so
/// idle, slow or numerous clients must not pin descriptors and tasks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; at the cap a new one evicts the quietest (`spawn_server`).
    pub max_connections: usize,
    /// Time for a request head to arrive, counted from the connection's start or from the end
    /// of the previous response: both a head trickled in (slowloris) and an idle keep-alive
    /// connection end here. hyper 1.x restarts its header timer when a kept-alive connection
    /// goes idle, so this one setting covers both (tests/http_limits.rs checks each).
    pub header_timeout: Duration,
    /// Longest life of a connection however busy; it then ends after the request in flight.
    pub max_lifetime: Duration,
}

/// Far above what legitimately talks to one listener at once (kubelet's probes, a metrics
/// scraper, a cloud load balancer's health checkers: tens at most, each answered in
/// microseconds), while a flood costs each listener at most this many descriptors and a few
/// MiB of buffers instead of one descriptor per connection without end.
pub const MAX_CONNECTIONS: usize = 256;
/// Probes send their request as soon as they connect and time out after 1 s (kubelet's
/// default); 5 s leaves room for a retransmitted segment or two on a bad network.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Long enough that a keep-alive client reconnects rarely; bounds whatever a connection can
/// still be made to wait for once its head is in (a request body trickled in).
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            max_lifetime: MAX_LIFETIME,
        }
    }
}

/// The open connections of one listener, so that the accept loop can evict one at the cap.
#[derive(Default)]
struct Slots {
    open: Mutex<HashMap<u64, Slot>>,
}

struct Slot {
    /// Accepted, or last request head received: what "quiet" is measured from.
    active: Instant,
    task: AbortHandle,
}

impl Slots {
    fn touch(&self, id: u64) {
        if let Some(slot) = self.open.lock().expect("not poisoned").get_mut(&id) {
            slot.active = Instant::now();
        }
    }
}

/// Owned by the accept loop: when that ends (aborted, its Service gone), so do its connections,
/// rather than answering for a port that is closed.
struct CloseAll(Arc<Slots>);

impl Drop for CloseAll {
    fn drop(&mut self) {
        let open: Vec<Slot> = {
            let mut open = self.0.open.lock().expect("not poisoned");
            open.drain().map(|(_, slot)| slot).collect()
        };
        for slot in open {
            slot.task.abort();
        }
    }
}

/// Frees a connection's slot however its task ends: done, failed, timed out or aborted.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots
            .open
            .lock()
            .expect("not poisoned")
            .remove(&self.id);
    }
}

/// Serves HTTP/1 on `listener` with `answer(path)` for every request, on a task of its own
/// (abort it to close the listener and its connections), within `limits`. Accept errors (out
/// of file descriptors) pause a little instead of spinning.
///
/// At the connection cap, a new connection is accepted and the one that has been quiet longest
/// (no request head for the longest time) is closed. Leaving new ones in the kernel's backlog
/// until a slot frees would queue kubelet's probe behind a flood of idle connections, and
/// closing the newcomer would refuse it: either way the probe fails and kubelet restarts a
/// healthy daemon. A probe sends its request as soon as it is connected, so it is the newest,
/// never the quietest; an idle flood's oldest connections go first.
pub fn spawn_server<F>(
    listener: TcpListener,
    limits: Limits,
    answer: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    let slots = Arc::new(Slots::default());
    let address = listener.local_addr().ok();
    tokio::spawn(async move {
        let _close_all = CloseAll(slots.clone());
        let mut next_id = 0u64;
        let mut evicted_since_warning = 0u64;
        let mut last_warning: Option<Instant> = None;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let id = next_id;
            next_id += 1;
            let evicted = {
                let mut open = slots.open.lock().expect("not poisoned");
                let evicted = if open.len() >= limits.max_connections {
                    let quietest = open.iter().min_by_key(|(_, s)| s.active).map(|(id, _)| *id);
                    quietest.and_then(|id| open.remove(&id))
                } else {
                    None
                };
                // Spawned with the lock held: the guard of a task that ends at once waits for
                // the insert to remove it.
                let guard = SlotGuard {
                    slots: slots.clone(),
                    id,
                };
                let task = tokio::spawn(serve_connection(stream, limits, answer.clone(), guard));
                open.insert(
                    id,
                    Slot {
                        active: Instant::now(),
                        task: task.abort_handle(),
                    },
                );
                evicted
            };
            if let Some(slot) = evicted {
                slot.task.abort();
                evicted_since_warning += 1;
                // A flood is worth knowing about, once a minute.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    warn!(address = ?address, cap = limits.max_connections, evicted = evicted_since_warning, "HTTP connection cap reached; closing the quietest connections");
                    last_warning = Some(Instant::now());
                    evicted_since_warning = 0;
                }
                // Let the aborted task close its socket before the next accept opens another.
                tokio::task::yield_now().await;
            }
        }
    })
}

/// One connection: hyper with the header timeout (which also ends idle keep-alive), ended
/// gracefully at its lifetime.
async fn serve_connection<F>(stream: TcpStream, limits: Limits, answer: Arc<F>, slot: SlotGuard)
where
    F: Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let (slots, id) = (slot.slots.clone(), slot.id);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        slots.touch(id);
        let r = answer(req.uri().path());
        async move { Ok::<_, Infallible>(r) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = tokio::time::sleep(limits.max_lifetime) => {
            // Finish the request in flight, if any, then close; a client that stalls even
            // that gets no longer than a request head.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.header_timeout, conn).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = ended {
        debug!(error = %e, "HTTP connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn health_and_metrics_are_apart() {
        let health = Health::new(Duration::from_secs(5));
        let probes = ProbeMetrics::default();
        for path in ["/healthz", "/livez", "/readyz"] {
            assert_ne!(
                health_route(path, &health, &probes).status(),
                StatusCode::NOT_FOUND
            );
            assert_eq!(
                metrics_route(path, &Registry::default()).status(),
                StatusCode::NOT_FOUND,
                "{path} on the metrics server"
            );
        }
        for path in ["/metrics", "/", "/metrics/"] {
            assert_eq!(
                health_route(path, &health, &probes).status(),
                StatusCode::NOT_FOUND,
                "{path} on the health server"
            );
        }
        let r = metrics_route("/metrics", &Registry::default());
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
    }

    #[test]
    fn answers_are_counted_by_code_as_kube_proxy_counts_them() {
        let mut reg = Registry::default();
        let probes = ProbeMetrics::register(&mut reg);
        // The source has not delivered: /healthz fails, /livez does not.
        let health = Health::new(Duration::from_secs(5));
        for path in ["/healthz", "/healthz", "/livez", "/readyz"] {
            health_route(path, &health, &probes);
        }
        let r = metrics_route("/metrics", &reg);
        let text = String::from_utf8(
            futures::executor::block_on(http_body_util::BodyExt::collect(r.into_body()))
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        for want in [
            "kubeproxy_proxy_healthz_total{code=\"503\"} 2",
            "kubeproxy_proxy_livez_total{code=\"200\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
