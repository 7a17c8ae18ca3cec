//! `--health-listen ADDR`: `GET /healthz` and `GET /readyz` over HTTP for the
//! kubelet's probes of `ballast node` and `ballast csi-controller` (the job the
//! livenessprobe sidecar does for other drivers). Both dial this process's own
//! CSI socket, so they see what the kubelet and the sidecars see:
//!
//! - `/healthz` (liveness): 200 `ok` when the CSI server answers GetPluginInfo
//!   within [`LIVE_TIMEOUT`]. It never asks meta: a meta outage must not make
//!   the kubelet restart every node plugin, which would also restart the front
//!   ends of every attached volume and break the pods' I/O. (CSI Probe asks
//!   meta, and may wait for it for many seconds: it is not a liveness check.)
//! - `/readyz` (readiness): 200 `ok` when CSI Probe reports ready (meta answers)
//!   within [`READY_TIMEOUT`].
//! - anything else: 404. A failed check is 503 with the reason in the body.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use ballast_csi::pb;
use ballast_csi::pb::identity_client::IdentityClient;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};

/// The longest `/healthz` waits for the CSI socket: well under the probes'
/// `timeoutSeconds` (5 in csi/), so a slow answer is a clear 503, not a
/// kubelet-side timeout.
pub const LIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest `/readyz` waits for CSI Probe (which waits for meta; the meta
/// client may try more than one member).
pub const READY_TIMEOUT: Duration = Duration::from_secs(4);

/// An Identity client on the CSI socket, or why it could not connect.
async fn identity(socket: &Path) -> Result<IdentityClient<Channel>, String> {
    let channel = ballast_csi::dial(socket).await.map_err(|e| format!("CSI socket {}: {e}", socket.display()))?;
    Ok(IdentityClient::new(channel))
}

/// Liveness: the CSI server on `socket` accepts a connection and answers
/// GetPluginInfo as this driver, within [`LIVE_TIMEOUT`]. No meta involved.
pub async fn live(socket: &Path) -> Result<(), String> {
    let check = async {
        let info = identity(socket)
            .await?
            .get_plugin_info(pb::GetPluginInfoRequest {})
            .await
            .map_err(|s| format!("CSI GetPluginInfo: {}", s.message()))?
            .into_inner();
        if info.name != ballast_csi::DRIVER_NAME {
            return Err(format!("CSI socket {} serves driver {:?}", socket.display(), info.name));
        }
        Ok(())
    };
    tokio::time::timeout(LIVE_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("CSI socket {}: no answer within {LIVE_TIMEOUT:?}", socket.display())))
}

/// Readiness: CSI Probe on `socket` reports ready (an absent `ready` means
/// ready, as the spec says), within [`READY_TIMEOUT`].
pub async fn ready(socket: &Path) -> Result<(), String> {
    let check = async {
        let probe = identity(socket)
            .await?
            .probe(pb::ProbeRequest {})
            .await
            .map_err(|s| format!("CSI Probe: {}", s.message()))?
            .into_inner();
        match probe.ready {
            Some(false) => Err("not ready: the metadata service does not answer".to_string()),
            Some(true) | None => Ok(()),
        }
    };
    tokio::time::timeout(READY_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("CSI Probe: no answer within {READY_TIMEOUT:?} (metadata service?)")))
}

/// Waits until the CSI server on `socket` answers ([`live`]); false if `stop`
/// turned first.
pub async fn wait_for_csi(socket: &Path, mut stop: watch::Receiver<bool>) -> bool {
    loop {
        if *stop.borrow() {
            return false;
        }
        if live(socket).await.is_ok() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Binds the health listener (at startup, so that a taken port fails the start).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("health listener on {addr}"))
}

/// Serves `/healthz` and `/readyz` for the CSI socket `socket` until `shutdown`.
///
/// axum rather than hand-rolled hyper: it is already built into the binary
/// (tonic's router), and gives the routing, the 404s and a graceful shutdown.
pub async fn serve(
    listener: TcpListener,
    socket: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("health listener address")?;
    info!(%addr, socket = %socket.display(), "health endpoints serving (/healthz, /readyz)");
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .with_state(Arc::new(socket));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("health server")
}

async fn healthz(State(socket): State<Arc<PathBuf>>) -> (StatusCode, String) {
    answer("healthz", live(&socket).await)
}

async fn readyz(State(socket): State<Arc<PathBuf>>) -> (StatusCode, String) {
    answer("readyz", ready(&socket).await)
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found: GET /healthz or /readyz\n")
}

fn answer(check: &str, outcome: Result<(), String>) -> (StatusCode, String) {
    match outcome {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why) => {
            warn!(check, reason = %why, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Instant;

    use ballast_csi::IdentityService;
    use ballast_metaclient::{MetaClient, MetaClientOptions};
    use ballast_metasvc::{MetaConfig, RaftTiming};

    use super::*;

    /// `METHOD PATH` over HTTP/1.1, as the kubelet's prober asks: status and body.
    fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    /// `http` on a blocking thread, timed.
    async fn get(addr: SocketAddr, path: &'static str) -> (u16, String, Duration) {
        let start = Instant::now();
        let (status, body) = tokio::task::spawn_blocking(move || http(addr, "GET", path)).await.unwrap();
        (status, body, start.elapsed())
    }

    fn pki(dir: &Path) -> ballast_tls::certs::Pki {
        ballast_tls::certs::Pki::open_or_create(&dir.join("pki")).unwrap()
    }

    /// The CSI node plugin of node 1 calls meta as node/1.
    fn node1(dir: &Path) -> ballast_tls::Security {
        pki(dir).security(&ballast_tls::Identity::Node(1)).unwrap()
    }

    /// One meta member forming a cluster of its own.
    async fn meta_member(dir: &Path) -> ballast_metasvc::MetaHandle {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = MetaConfig {
            id: 1,
            data_dir: dir.join("meta"),
            listen: addr,
            initial_members: [(1, addr.to_string())].into(),
            raft: RaftTiming { heartbeat_ms: 50, election_min_ms: 200, election_max_ms: 400, ..RaftTiming::default() },
            detector: Default::default(),
            security: pki(dir).security(&ballast_tls::Identity::Meta(1)).unwrap(),
        };
        ballast_metasvc::start_on(cfg, listener).await.unwrap()
    }

    struct Served {
        health: SocketAddr,
        stop: watch::Sender<bool>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    /// The CSI Identity service on `socket` (Probe asks `meta`) and the health
    /// endpoints for it.
    async fn serve_csi_and_health(socket: &Path, meta: MetaClient) -> Served {
        let (stop, stopped) = watch::channel(false);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let health = listener.local_addr().unwrap();
        let mut tasks = Vec::new();
        let (s, rx) = (socket.to_path_buf(), stopped.clone());
        tasks.push(tokio::spawn(async move {
            let identity = IdentityService::new(false, meta);
            ballast_csi::serve(&s, identity, None, None, crate::shutdown::wait(rx)).await.unwrap();
        }));
        let s = socket.to_path_buf();
        tasks.push(tokio::spawn(async move {
            serve(listener, s, crate::shutdown::wait(stopped)).await.unwrap();
        }));
        Served { health, stop, tasks }
    }

    impl Served {
        async fn stop(self) {
            self.stop.send(true).unwrap();
            for t in self.tasks {
                tokio::time::timeout(Duration::from_secs(30), t).await.unwrap().unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_follows_the_csi_socket_and_readyz_follows_meta() {
        let dir = tempfile::tempdir().unwrap();
        let member = meta_member(dir.path()).await;
        let opts = MetaClientOptions { retry_for: Duration::from_secs(1), ..MetaClientOptions::default() };
        let meta = MetaClient::with_options([member.addr.to_string()], opts, node1(dir.path())).unwrap();
        let socket = dir.path().join("csi.sock");
        let served = serve_csi_and_health(&socket, meta).await;
        let addr = served.health;

        // Meta elects itself and answers: both 200.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body, _) = get(addr, "/readyz").await;
            if status == 200 {
                assert_eq!(body, "ok");
                break;
            }
            assert!(Instant::now() < deadline, "/readyz never 200: {status} {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(get(addr, "/healthz").await.0, 200);

        // Meta gone: not ready, still alive, and /healthz does not wait for meta.
        member.shutdown().await;
        let (status, body, _) = get(addr, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("metadata service"), "{body}");
        for _ in 0..3 {
            let (status, body, took) = get(addr, "/healthz").await;
            assert_eq!((status, body.as_str()), (200, "ok"));
            assert!(took < LIVE_TIMEOUT, "/healthz took {took:?}");
        }

        // Anything else is 404.
        for (method, path) in [("GET", "/"), ("GET", "/healthz/extra"), ("GET", "/metrics"), ("POST", "/healthz")] {
            let (status, _) = tokio::task::spawn_blocking(move || http(addr, method, path)).await.unwrap();
            assert_eq!(status, 404, "{method} {path}");
        }

        // The CSI server stopped: not alive.
        served.stop.send(true).unwrap();
        let mut tasks = served.tasks.into_iter();
        let csi = tasks.next().unwrap();
        tokio::time::timeout(Duration::from_secs(30), csi).await.unwrap().unwrap();
        assert!(live(&socket).await.is_err());
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t).await.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_meta_fails_readyz_in_time_and_never_healthz() {
        let dir = tempfile::tempdir().unwrap();
        // Accepts TCP connections (the kernel's backlog) and never answers:
        // a meta that hangs rather than refuses.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let meta =
            MetaClient::new([silent.local_addr().unwrap().to_string()], ballast_tls::Security::Insecure).unwrap();
        let socket = dir.path().join("csi.sock");
        let served = serve_csi_and_health(&socket, meta).await;
        let addr = served.health;
        let deadline = Instant::now() + Duration::from_secs(30);
        while live(&socket).await.is_err() {
            assert!(Instant::now() < deadline, "the CSI socket never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let (status, body, took) = get(addr, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("no answer within"), "{body}");
        assert!(took < READY_TIMEOUT + Duration::from_secs(2), "/readyz took {took:?}");
        let (status, body, took) = get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        assert!(took < LIVE_TIMEOUT, "/healthz took {took:?}");
        served.stop().await;
    }

    #[tokio::test]
    async fn healthz_fails_without_a_csi_server() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        // A socket file left by a killed process: nobody listens on it.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let why = live(&socket).await.unwrap_err();
        assert!(why.contains("csi.sock"), "{why}");
        let (stop, stopped) = watch::channel(false);
        let waiter = tokio::spawn({
            let socket = socket.clone();
            async move { wait_for_csi(&socket, stopped).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.send(true).unwrap();
        assert!(!tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap());
    }
}
