//! `--metrics-listen ADDR`: `GET /metrics` over HTTP, the process's registry as
//! OpenMetrics text (crates/metrics has the conventions). Anything else is 404.
//! Every process kind serves it; `ballast dev` prints the address it bound
//! (`ready metrics addr=...`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::HeaderMap;
use axum::routing::get;
use ballast_metrics::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// Binds `addr` and serves `/metrics` from `registry` until `stop` turns true.
/// Returns the bound address (port 0 picks a free one) once listening.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("bind the metrics listener on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route("/metrics", get(scrape)).with_state(registry);
    info!(addr = %bound, "serving /metrics");
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            warn!(error = %e, "metrics listener stopped");
        }
    });
    Ok((bound, task))
}

/// OpenMetrics to a scraper that accepts it (Prometheus asks for it first), the
/// classic text format to anyone else (curl, `promtool check metrics`).
async fn scrape(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> impl axum::response::IntoResponse {
    let openmetrics = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        ([(CONTENT_TYPE, ballast_metrics::CONTENT_TYPE)], ballast_metrics::encode(&registry))
    } else {
        ([(CONTENT_TYPE, ballast_metrics::PROMETHEUS_CONTENT_TYPE)], ballast_metrics::encode_prometheus(&registry))
    }
}

/// A running `/metrics` listener.
pub struct Listener {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Serves `registry` on `addr` when one was given (printing `ready metrics
/// addr=...` for scripts), until `stop`. None: no listener, the registry is dropped.
///
/// Components register their metric families into `registry` before this
/// call; the series inside a family (one per volume, per rpc, ...) come and go
/// afterwards.
pub async fn start(
    addr: Option<SocketAddr>,
    registry: Registry,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<Listener>> {
    let Some(addr) = addr else { return Ok(None) };
    let (addr, task) = serve(addr, Arc::new(registry), stop).await?;
    println!("ready metrics addr={addr}");
    Ok(Some(Listener { addr, task }))
}
