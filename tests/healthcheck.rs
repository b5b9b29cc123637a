//! Health check node ports (`rsdn::proxy::healthcheck`) on real sockets, inside a fresh
//! network namespace: served with kube-proxy's answer, following the local endpoint count and
//! the daemon's health, retried while the port is taken, closed when the Service goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rsdn::health::Health;
use rsdn::proxy::healthcheck::{HealthCheckServers, Wanted};
use rsdn_testkit::{root_or_skip, Netns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 32100;

/// `GET /` on the port: the status code and body, or None when nothing answers HTTP.
async fn get() -> Option<(u16, serde_json::Value)> {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", PORT))
            .await
            .ok()?;
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.ok()?;
        let code = reply.get(9..12)?.parse().ok()?;
        let body = reply.split("\r\n\r\n").nth(1)?;
        Some((code, serde_json::from_str(body).ok()?))
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

fn wanted(local_endpoints: usize) -> BTreeMap<(String, String), Wanted> {
    BTreeMap::from([(
        ("shop".to_string(), "web".to_string()),
        Wanted {
            port: PORT,
            local_endpoints,
        },
    )])
}

#[test]
fn served_retried_while_taken_and_closed_with_the_service() {
    if !root_or_skip(module_path!()) {
        return;
    }
    let ns = Netns::new("hcport");
    ns.ip(&["link", "set", "lo", "up"]);
    ns.on_thread(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                // Not healthy yet: the cluster source has not delivered its lists.
                let health = Arc::new(Health::new(Duration::from_secs(5)));
                let mut servers = HealthCheckServers::new(Arc::clone(&health));

                // Taken by someone else: not served, and no error for the sync.
                let squatter = std::net::TcpListener::bind(("0.0.0.0", PORT)).unwrap();
                servers.sync(&wanted(1)).await;
                assert_eq!(get().await, None);
                drop(squatter);

                // Free: served on the next sync, with kube-proxy's JSON; 503 while the daemon
                // itself is not healthy, whatever the endpoints.
                servers.sync(&wanted(1)).await;
                let (code, body) = get().await.expect("an answer once the port is free");
                assert_eq!((code, &body["serviceProxyHealthy"]), (503, &false.into()));
                health.source_ready();
                health.overlay_passed(
                    rsdn::health::OverlayPass {
                        ready: true,
                        ..Default::default()
                    },
                    std::time::Instant::now(),
                );
                health.iptables_synced();
                let (code, body) = get().await.unwrap();
                assert_eq!(code, 200);
                assert_eq!(
                    body,
                    serde_json::json!({"service": {"namespace": "shop", "name": "web"},
                        "localEndpoints": 1, "serviceProxyHealthy": true})
                );

                // No local endpoint: 503; endpoints back: 200.
                servers.sync(&wanted(0)).await;
                assert_eq!(get().await.unwrap().0, 503);
                servers.sync(&wanted(2)).await;
                let (code, body) = get().await.unwrap();
                assert_eq!((code, &body["localEndpoints"]), (200, &2.into()));

                // The Service is gone: the port closes.
                servers.sync(&BTreeMap::new()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(tokio::net::TcpStream::connect(("127.0.0.1", PORT))
                    .await
                    .is_err());
            })
    });
}
