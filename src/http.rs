//! The daemon's HTTP endpoint (default 0.0.0.0:10256, kube-proxy's healthz port):
//! `/healthz` (liveness), `/readyz` (readiness) and `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info};

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
    reply(status, "text/plain; charset=utf-8", a.body)
}

/// Answers one request; everything is read-only.
pub fn route(path: &str, health: &Health, registry: &Registry) -> Response<Full<Bytes>> {
    match path {
        "/healthz" | "/livez" => probe(health.healthz(Instant::now())),
        "/readyz" => probe(health.readyz()),
        "/metrics" => {
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
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

/// Binds `addr` (an error if it is taken), then serves until the runtime stops.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    registry: Arc<Registry>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(address = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    spawn_server(listener, move |path| route(path, &health, &registry));
    Ok(())
}

/// Serves HTTP/1 on `listener` with `answer(path)` for every request, on a task of its own
/// (abort it to close the listener). Accept errors (out of file descriptors) pause a little
/// instead of spinning.
pub fn spawn_server<F>(listener: TcpListener, answer: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = answer(req.uri().path());
                    async move { Ok::<_, Infallible>(r) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(error = %e, "HTTP connection ended with an error");
                }
            });
        }
    })
}
