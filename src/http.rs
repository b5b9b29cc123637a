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

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
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
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (health, registry) = (health.clone(), registry.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = route(req.uri().path(), &health, &registry);
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
    });
    Ok(())
}
