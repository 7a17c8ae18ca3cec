//! Kubelet plugin registration: how the kubelet learns that this node runs the
//! `csi.ballast.io` driver and where its CSI socket is (the job the
//! node-driver-registrar sidecar does for other drivers).
//!
//! ```text
//!   kubelet plugin watcher ── inotify ──► <registration dir>/csi.ballast.io-reg.sock
//!        │  GetInfo ─────────────────────► "CSIPlugin", csi.ballast.io, endpoint, ["1.0.0"]
//!        │  NodeGetInfo on endpoint ─────► the CSI socket (node service)
//!        └  NotifyRegistrationStatus ────► logged; visible through [`RegistrationService::state`]
//! ```
//!
//! The kubelet calls NodeGetInfo on the endpoint right after GetInfo, and keeps
//! calling GetInfo afterwards to check the plugin is alive: the caller starts
//! [`serve`] only once the CSI socket answers, and it runs until shutdown.
//! Removing the socket is the kubelet's cue to deregister the plugin, so
//! [`serve`] removes it when it stops.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

#[allow(clippy::all, missing_docs, unused_qualifications)] // generated
pub mod pb {
    tonic::include_proto!("pluginregistration");
}

/// The plugin type the kubelet hands to its CSI plugin handler.
pub const PLUGIN_TYPE: &str = "CSIPlugin";
/// CSI spec versions the node service implements (the kubelet needs a 1.x).
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

/// The registration socket in `dir` (the kubelet's `plugins_registry`), named
/// `<driver>-reg.sock` as the kubelet's plugin watcher recommends.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(format!("{}-reg.sock", crate::DRIVER_NAME))
}

/// Where the socket is bound before it is renamed to [`socket_path`]: the
/// kubelet's watcher ignores names starting with a dot.
fn bind_path(dir: &Path) -> PathBuf {
    dir.join(format!(".{}-reg.sock.tmp", crate::DRIVER_NAME))
}

/// What the kubelet last said about this plugin's registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationState {
    /// No NotifyRegistrationStatus yet.
    Pending,
    Registered,
    /// The kubelet refused the plugin, with its error text (it retries
    /// registration from GetInfo on its own).
    Failed(String),
}

/// The Registration gRPC service. Clones share one state.
#[derive(Clone)]
pub struct RegistrationService {
    endpoint: String,
    state: Arc<watch::Sender<RegistrationState>>,
}

impl RegistrationService {
    /// `kubelet_endpoint`: the CSI socket as the kubelet sees it on the host
    /// (e.g. `/var/lib/kubelet/plugins/csi.ballast.io/csi.sock`), which is not
    /// the path this process sees when it runs in a container.
    pub fn new(kubelet_endpoint: &Path) -> Result<RegistrationService, RegistrationError> {
        let endpoint = kubelet_endpoint
            .to_str()
            .filter(|p| kubelet_endpoint.is_absolute() && !p.is_empty())
            .ok_or_else(|| RegistrationError::Endpoint(kubelet_endpoint.to_path_buf()))?
            .to_string();
        let (state, _) = watch::channel(RegistrationState::Pending);
        Ok(RegistrationService { endpoint, state: Arc::new(state) })
    }

    /// The registration state, updated on every NotifyRegistrationStatus.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.subscribe()
    }
}

#[tonic::async_trait]
impl pb::registration_server::Registration for RegistrationService {
    async fn get_info(&self, _req: Request<pb::InfoRequest>) -> Result<Response<pb::PluginInfo>, Status> {
        Ok(Response::new(pb::PluginInfo {
            r#type: PLUGIN_TYPE.to_string(),
            name: crate::DRIVER_NAME.to_string(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        req: Request<pb::RegistrationStatus>,
    ) -> Result<Response<pb::RegistrationStatusResponse>, Status> {
        let status = req.into_inner();
        let state = if status.plugin_registered {
            tracing::info!(driver = crate::DRIVER_NAME, endpoint = %self.endpoint, "registered with the kubelet");
            RegistrationState::Registered
        } else {
            tracing::error!(
                driver = crate::DRIVER_NAME,
                endpoint = %self.endpoint,
                error = %status.error,
                "the kubelet refused the plugin registration"
            );
            RegistrationState::Failed(status.error)
        };
        // send_replace: the state is kept whether or not anyone watches it.
        self.state.send_replace(state);
        Ok(Response::new(pb::RegistrationStatusResponse {}))
    }
}

/// Serves `service` on [`socket_path`]`(dir)` until `shutdown` resolves, then
/// removes the socket (the kubelet deregisters the plugin).
///
/// The socket is bound under a dot name and renamed into place, so the name
/// the kubelet watches never exists without a listener behind it, and a stale
/// socket of an earlier run is replaced in one step. `dir` must exist (it is
/// the kubelet's directory, mounted into the pod).
pub async fn serve(
    dir: &Path,
    service: RegistrationService,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RegistrationError> {
    let path = socket_path(dir);
    let tmp = bind_path(dir);
    let socket_err = |p: &Path| {
        let p = p.to_path_buf();
        move |e| RegistrationError::Socket(p, e)
    };
    if !dir.is_dir() {
        return Err(RegistrationError::Socket(
            dir.to_path_buf(),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory (the kubelet's plugins_registry?)"),
        ));
    }
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RegistrationError::Socket(tmp, e)),
    }
    let listener = tokio::net::UnixListener::bind(&tmp).map_err(socket_err(&tmp))?;
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(RegistrationError::Socket(path, e));
    }
    tracing::info!(socket = %path.display(), endpoint = %service.endpoint, "kubelet plugin registration socket ready");
    // The kubelet's plugin watcher dials this path with grpc-go's passthrough
    // resolver and no authority override, so its `:authority` is the path
    // percent-encoded (%2Fvar%2Flib%2Fkubelet%2F...), which h2 refuses: every
    // connection goes through the CSI socket's authority relay.
    use tokio_stream::StreamExt;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).map(|c| c.map(crate::Relayed::start));
    let served = tonic::transport::Server::builder()
        .add_service(pb::registration_server::RegistrationServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(socket = %path.display(), "kubelet plugin registration socket removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(socket = %path.display(), error = %e, "cannot remove the registration socket"),
    }
    served.map_err(RegistrationError::Transport)
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("kubelet registration path {0:?}: expected an absolute path to the CSI socket on the host")]
    Endpoint(PathBuf),
    #[error("registration socket {0}: {1}")]
    Socket(PathBuf, #[source] std::io::Error),
    #[error("registration gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::pb::registration_client::RegistrationClient;
    use super::*;
    use crate::dial;
    use tonic::transport::Channel;

    const HOST_SOCKET: &str = "/var/lib/kubelet/plugins/csi.ballast.io/csi.sock";

    /// Waits for the socket to accept; only the final name is ever seen.
    async fn wait_serving(dir: &Path) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if socket_path(dir).exists() {
                return dial(&socket_path(dir)).await.expect("the socket exists, so something listens on it");
            }
            assert!(Instant::now() < deadline, "no registration socket in {}", dir.display());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A registration server of a test, serving in `dir` until [`Running::stop`].
    struct Running {
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<Result<(), RegistrationError>>,
    }

    impl Running {
        fn start(dir: &Path, service: RegistrationService) -> Self {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let d = dir.to_path_buf();
            let server = tokio::spawn(async move {
                serve(&d, service, async {
                    let _ = stopped.await;
                })
                .await
            });
            Running { stop, server }
        }

        /// Stops the server and waits (30 s at most) for a clean end.
        async fn stop(self) {
            self.stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(30), self.server).await.unwrap().unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn kubelet_gets_the_plugin_info_and_its_verdict_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        // A stale socket file of a killed earlier run, and a half-done bind.
        std::fs::write(socket_path(dir.path()), b"stale").unwrap();
        std::fs::write(bind_path(dir.path()), b"stale").unwrap();

        let service = RegistrationService::new(Path::new(HOST_SOCKET)).unwrap();
        let mut state = service.state();
        assert_eq!(*state.borrow(), RegistrationState::Pending);
        let server = Running::start(dir.path(), service);

        // The stale file is replaced by a live socket: poll until the rename.
        let deadline = Instant::now() + Duration::from_secs(30);
        let channel = loop {
            if let Ok(ch) = dial(&socket_path(dir.path())).await {
                break ch;
            }
            assert!(Instant::now() < deadline, "the stale registration socket was not replaced");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(!bind_path(dir.path()).exists(), "the dot name is gone once the socket is in place");
        let mut kubelet = RegistrationClient::new(channel);

        let info = kubelet.get_info(pb::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "csi.ballast.io");
        assert_eq!(info.endpoint, HOST_SOCKET);
        assert_eq!(info.supported_versions, ["1.0.0"]);

        // A refusal is recorded with the kubelet's text...
        let refused = "error updating CSINode object: timed out".to_string();
        let status = pb::RegistrationStatus { plugin_registered: false, error: refused.clone() };
        kubelet.notify_registration_status(status).await.unwrap();
        assert!(state.has_changed().unwrap());
        assert_eq!(*state.borrow_and_update(), RegistrationState::Failed(refused));
        // ...and the kubelet's retry that succeeds replaces it.
        let status = pb::RegistrationStatus { plugin_registered: true, error: String::new() };
        kubelet.notify_registration_status(status).await.unwrap();
        assert!(state.has_changed().unwrap());
        assert_eq!(*state.borrow_and_update(), RegistrationState::Registered);
        // The kubelet keeps checking the plugin with GetInfo after registering.
        assert_eq!(kubelet.get_info(pb::InfoRequest {}).await.unwrap().into_inner().name, "csi.ballast.io");

        drop(kubelet);
        server.stop().await;
        assert!(!socket_path(dir.path()).exists(), "shutdown removes the socket: the kubelet deregisters");
        assert!(!bind_path(dir.path()).exists());
    }

    /// The `:authority` grpc-go sends for a passthrough dial of `path`, as the
    /// kubelet's plugin watcher dials (grpc-go's `encodeAuthority`: everything
    /// but unreserved, sub-delims and `:[]@` percent-encoded).
    fn grpc_go_authority(path: &Path) -> String {
        let mut out = String::new();
        for b in path.to_str().unwrap().bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~!$&'()*+,;=:[]@".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// One unary call over a hand-written HTTP/2 connection (h2's own client
    /// cannot send an authority `http` does not parse): the response's header
    /// fields (headers and trailers) and its DATA bytes.
    async fn raw_call(socket: &Path, authority: &str, path: &str) -> (Vec<(String, String)>, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::UnixStream::connect(socket).await.unwrap();
        let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
            let len = (payload.len() as u32).to_be_bytes();
            let mut f = vec![len[1], len[2], len[3], kind, flags];
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        let fields: [(&[u8], &[u8]); 6] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ];
        let block = loona_hpack::Encoder::new().encode(fields);
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        out.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
        out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])); // DATA, END_STREAM: an empty message
        sock.write_all(&out).await.unwrap();
        let mut decoder = loona_hpack::Decoder::new();
        let (mut fields, mut data) = (Vec::new(), Vec::new());
        loop {
            let mut head = [0u8; 9];
            sock.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags, stream) = (head[3], head[4], u32::from_be_bytes([head[5], head[6], head[7], head[8]]));
            let mut payload = vec![0; len];
            sock.read_exact(&mut payload).await.unwrap();
            match kind {
                0x0 if stream == 1 => data.extend_from_slice(&payload),
                0x1 if stream == 1 => fields.extend(decoder.decode(&payload).unwrap().into_iter().map(|(n, v)| {
                    (String::from_utf8_lossy(&n).into_owned(), String::from_utf8_lossy(&v).into_owned())
                })),
                0x3 => panic!("RST_STREAM: error code {payload:?} (authority {authority:?})"),
                0x4 if flags & 0x1 == 0 => sock.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(), // SETTINGS ACK
                0x7 => panic!("GOAWAY: {payload:?}"),
                _ => {}
            }
            if stream == 1 && matches!(kind, 0x0 | 0x1) && flags & 0x1 != 0 {
                return (fields, data);
            }
        }
    }

    #[tokio::test]
    async fn kubelet_authority_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let service = RegistrationService::new(Path::new(HOST_SOCKET)).unwrap();
        let server = Running::start(dir.path(), service);
        drop(wait_serving(dir.path()).await);
        let socket = socket_path(dir.path());
        let authority = grpc_go_authority(&socket);
        assert!(authority.starts_with("%2F") && !authority.contains('/'), "{authority}");
        let (fields, data) = raw_call(&socket, &authority, "/pluginregistration.Registration/GetInfo").await;
        let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(field(":status"), Some("200"), "{fields:?}");
        assert_eq!(field("grpc-status"), Some("0"), "{fields:?}");
        // A gRPC message: 1 byte flag, 4 bytes length, then the PluginInfo.
        let info = <pb::PluginInfo as prost::Message>::decode(data.get(5..).unwrap()).unwrap();
        assert_eq!((info.r#type.as_str(), info.endpoint.as_str()), ("CSIPlugin", HOST_SOCKET));
        server.stop().await;
    }

    #[tokio::test]
    async fn serves_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            let service = RegistrationService::new(Path::new(HOST_SOCKET)).unwrap();
            let server = Running::start(dir.path(), service);
            let mut kubelet = RegistrationClient::new(wait_serving(dir.path()).await);
            assert_eq!(kubelet.get_info(pb::InfoRequest {}).await.unwrap().into_inner().endpoint, HOST_SOCKET);
            drop(kubelet);
            server.stop().await;
            assert!(!socket_path(dir.path()).exists());
        }
    }

    #[tokio::test]
    async fn a_missing_directory_or_a_relative_endpoint_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("plugins_registry");
        let service = RegistrationService::new(Path::new(HOST_SOCKET)).unwrap();
        let err = serve(&gone, service, std::future::pending()).await.unwrap_err();
        assert!(matches!(&err, RegistrationError::Socket(p, _) if *p == gone), "{err}");
        assert!(err.to_string().contains("plugins_registry"), "{err}");

        for bad in ["csi.sock", ""] {
            let err = RegistrationService::new(Path::new(bad)).err().expect(bad);
            assert!(err.to_string().contains("absolute path"), "{err}");
        }
    }
}
