//! The Ballast CSI driver (CSI spec v1.x): Identity, Controller and Node services
//! over gRPC on a unix socket, the way the kubelet and the Kubernetes sidecars
//! (external-provisioner, -attacher, -resizer) call them; the kubelet also finds the
//! driver through [`registration`], its plugin registration service.
//!
//! ```text
//!   external-provisioner ─ CreateVolume/DeleteVolume ─┐
//!   external-attacher ── ControllerPublish/Unpublish ─┼─► Controller ──► metadata service (Admin API)
//!   external-resizer ─── ControllerExpandVolume ──────┘
//!   kubelet ─ NodeStage/Publish/Expand/Stats ─► Node ──► AttachedVolume (front end, meta epoch)
//!                                                          └► FUSE file ► loop device ► mkfs/mount
//! ```
//!
//! - A CSI volume id is the Ballast volume's name (the CO's CreateVolume name, e.g.
//!   `pvc-<uid>`); a CSI node id is the Ballast storage node's numeric id.
//! - Every call is idempotent; concurrent calls for one volume get `ABORTED`
//!   (the CO retries), see [`locks::VolumeLocks`].
//! - Errors use the codes the spec lists for each call (see each service).
//! - Any `:authority` is served, whatever a client names a unix socket by
//!   (`authority`: h2 alone refuses the socket paths gRPC C-core sends).

// tonic::Status is the error every gRPC handler returns; boxing it in the helpers
// would only add an allocation on the error path.
#![allow(clippy::result_large_err)]

mod authority;
pub mod controller;
pub mod identity;
pub mod locks;
pub mod metrics;
pub mod node;
pub mod params;
pub mod registration;

#[allow(clippy::all, missing_docs, unused_qualifications)] // generated
pub mod pb {
    tonic::include_proto!("csi.v1");
}

use std::path::{Path, PathBuf};

use ballast_metaclient::MetaClientError;
use tonic::{Code, Status};

pub use controller::ControllerService;
pub use identity::IdentityService;
pub use metrics::CsiMetrics;
pub use node::{NodeConfig, NodeService};

/// The driver's name (the CSIDriver object, StorageClass provisioner).
pub const DRIVER_NAME: &str = "csi.ballast.io";
/// The topology segment key NodeGetInfo reports and CreateVolume reads.
pub const TOPOLOGY_ZONE: &str = "topology.ballast.io/zone";

/// A gRPC channel over the unix socket at `path`, connected now (not lazily):
/// a socket file nobody listens on is an error. How the kubelet and the
/// sidecars reach the driver; the health probes and the tests dial it so too.
pub async fn dial(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let p = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://csi.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = p.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
        }))
        .await
}

/// A unix-socket endpoint as the sidecars name it: `unix:///csi/csi.sock` (also
/// `unix:/path` and a plain absolute path).
pub fn parse_endpoint(s: &str) -> Result<PathBuf, String> {
    let path = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")).unwrap_or(s);
    if path.is_empty() || !Path::new(path).is_absolute() {
        return Err(format!("invalid CSI endpoint {s:?}: expected unix:///absolute/path.sock"));
    }
    Ok(PathBuf::from(path))
}

/// A metadata-service error as a CSI status: its code is kept (the service
/// already answers with the codes CSI uses: NOT_FOUND, ALREADY_EXISTS,
/// RESOURCE_EXHAUSTED, FAILED_PRECONDITION, INVALID_ARGUMENT); an unreachable
/// service is UNAVAILABLE, so the CO retries.
pub fn meta_status(what: &str, e: MetaClientError) -> Status {
    let code = match e.code() {
        Some(c) => c,
        None if e.is_unreachable() => Code::Unavailable,
        None => Code::Internal,
    };
    Status::new(code, format!("{what}: {e}"))
}

/// Serves the given services on the unix socket `path` until `shutdown`
/// resolves. A stale socket file from an earlier run is replaced. Every
/// connection passes through the `authority` relay, so a client may send any
/// `:authority` (h2 alone resets a request whose authority is no URI authority,
/// such as the percent-encoded socket path gRPC C-core clients send).
/// No metrics; see [`serve_with`].
pub async fn serve(
    path: &Path,
    identity: IdentityService,
    controller: Option<ControllerService>,
    node: Option<NodeService>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_with(path, identity, controller, node, None, shutdown).await
}

/// [`serve`], with every rpc recorded in `metrics` (by method and gRPC code,
/// and its latency: [`metrics`]) when given.
pub async fn serve_with(
    path: &Path,
    identity: IdentityService,
    controller: Option<ControllerService>,
    node: Option<NodeService>,
    metrics: Option<CsiMetrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    use pb::controller_server::ControllerServer;
    use pb::identity_server::IdentityServer;
    use pb::node_server::NodeServer;
    use tokio_stream::StreamExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ServeError::Socket(path.to_path_buf(), e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ServeError::Socket(path.to_path_buf(), e)),
    }
    // Only this user (the kubelet and the sidecars run as it) may connect:
    // whoever reaches the socket may stage, publish and delete volumes. Bound
    // beside, made 0600, then renamed into place: never reachable with more.
    let tmp = path.with_extension("sock.tmp");
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp).map_err(|e| ServeError::Socket(tmp.clone(), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ServeError::Socket(tmp.clone(), e))?;
        std::fs::rename(&tmp, path).map_err(|e| ServeError::Socket(path.to_path_buf(), e))?;
    }
    tracing::info!(socket = %path.display(), controller = controller.is_some(), node = node.is_some(), "CSI serving");
    let router = tonic::transport::Server::builder()
        .layer(metrics::MetricsLayer::new(metrics))
        .add_service(IdentityServer::new(identity))
        .add_optional_service(controller.map(ControllerServer::new))
        .add_optional_service(node.map(NodeServer::new));
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).map(|c| c.map(Relayed::start));
    let served = router.serve_with_incoming_shutdown(incoming, shutdown).await;
    let _ = std::fs::remove_file(path);
    served.map_err(ServeError::Transport)
}

/// A connection to the CSI or the plugin registration socket as tonic sees it:
/// h2's end of an in-process pipe whose other end a task relays to the client's
/// socket ([`authority::relay`] one way, a plain copy the other), with the
/// client's unix peer info.
struct Relayed {
    io: tokio::io::DuplexStream,
    info: tonic::transport::server::UdsConnectInfo,
}

impl Relayed {
    /// Room in the pipe each way: a few frames, so the relay adds no round trips.
    const PIPE: usize = 64 << 10;

    fn start(client: tokio::net::UnixStream) -> Relayed {
        use tokio::io::AsyncWriteExt;
        use tonic::transport::server::Connected;
        let info = client.connect_info();
        let (io, server) = tokio::io::duplex(Self::PIPE);
        tokio::spawn(async move {
            let (from_client, mut to_client) = client.into_split();
            let (mut from_server, to_server) = tokio::io::split(server);
            let requests = authority::relay(from_client, to_server);
            let responses = async {
                tokio::io::copy(&mut from_server, &mut to_client).await?;
                to_client.shutdown().await
            };
            tokio::pin!(requests, responses);
            // h2 ending the connection ends it (the client's side goes with it); the
            // client ending its side leaves h2 to finish its answers first.
            tokio::select! {
                r = &mut responses => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "CSI connection: writing to the client");
                    }
                }
                r = &mut requests => {
                    match r {
                        Ok(()) => {}
                        Err(e @ authority::RelayError::Io(_)) => tracing::debug!(error = %e, "CSI connection"),
                        Err(e) => tracing::warn!(error = %e, "CSI connection closed"),
                    }
                    if let Err(e) = responses.await {
                        tracing::debug!(error = %e, "CSI connection: writing to the client");
                    }
                }
            }
        });
        Relayed { io, info }
    }
}

impl tonic::transport::server::Connected for Relayed {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for Relayed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Relayed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("CSI socket {0}: {1}")]
    Socket(PathBuf, #[source] std::io::Error),
    #[error("CSI gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ballast_metaclient::MetaClient;

    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(parse_endpoint("unix:///csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(parse_endpoint("unix:/csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(parse_endpoint("/run/csi.sock").unwrap(), PathBuf::from("/run/csi.sock"));
        assert!(parse_endpoint("unix://relative.sock").is_err());
        assert!(parse_endpoint("").is_err());
    }

    /// Per stream, the header fields a client got (headers and trailers) and its DATA bytes.
    type Answers = HashMap<u32, (Vec<(String, String)>, Vec<u8>)>;

    /// Frames of one HTTP/2 connection, written and read by hand: h2's own
    /// client cannot send an authority that `http` does not parse.
    struct RawH2 {
        sock: tokio::net::UnixStream,
        encoder: loona_hpack::Encoder<'static>,
        decoder: loona_hpack::Decoder<'static>,
    }

    impl RawH2 {
        async fn connect(path: &Path) -> RawH2 {
            use tokio::io::AsyncWriteExt;
            let mut sock = tokio::net::UnixStream::connect(path).await.expect("connect");
            sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
            let mut h2 = RawH2 { sock, encoder: loona_hpack::Encoder::new(), decoder: loona_hpack::Decoder::new() };
            h2.frame(0x4, 0, 0, &[]).await; // SETTINGS, none changed
            h2
        }

        async fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            use tokio::io::AsyncWriteExt;
            let len = (payload.len() as u32).to_be_bytes();
            let mut f = vec![len[1], len[2], len[3], kind, flags];
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            self.sock.write_all(&f).await.expect("write a frame");
        }

        /// A unary gRPC call with an empty message on `stream`, its headers encoded
        /// by `block` (given the connection's encoder).
        async fn call(&mut self, stream: u32, block: Vec<u8>) {
            self.frame(0x1, 0x4, stream, &block).await; // HEADERS, END_HEADERS
            self.frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]).await; // DATA, END_STREAM: an empty message
        }

        /// Frames until every stream in `streams` has ended: per stream its header
        /// fields (response headers and trailers) and its DATA bytes. Panics on a
        /// RST_STREAM or GOAWAY.
        async fn answers(&mut self, streams: &[u32]) -> Answers {
            use tokio::io::AsyncReadExt;
            let mut got = Answers::new();
            let mut open: std::collections::HashSet<u32> = streams.iter().copied().collect();
            while !open.is_empty() {
                let mut head = [0u8; 9];
                self.sock.read_exact(&mut head).await.expect("a frame header");
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let (kind, flags) = (head[3], head[4]);
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0; len];
                self.sock.read_exact(&mut payload).await.expect("a frame payload");
                match kind {
                    0x0 => got.entry(stream).or_default().1.extend_from_slice(&payload),
                    0x1 => {
                        assert_ne!(flags & 0x4, 0, "one frame per header block here");
                        let fields = self.decoder.decode(&payload).expect("HPACK from h2");
                        got.entry(stream).or_default().0.extend(fields.into_iter().map(|(n, v)| {
                            (String::from_utf8_lossy(&n).into_owned(), String::from_utf8_lossy(&v).into_owned())
                        }));
                    }
                    0x3 => panic!("RST_STREAM on stream {stream}: error code {payload:?}"),
                    0x4 if flags & 0x1 == 0 => self.frame(0x4, 0x1, 0, &[]).await, // SETTINGS: ACK
                    0x7 => panic!("GOAWAY: {payload:?}"),
                    _ => {}
                }
                if matches!(kind, 0x0 | 0x1) && flags & 0x1 != 0 {
                    open.remove(&stream);
                }
            }
            got
        }
    }

    fn get_plugin_info(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/csi.v1.Identity/GetPluginInfo".to_vec()),
            (b":authority", authority.as_bytes().to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"te", b"trailers".to_vec()),
        ]
    }

    /// The literal-only encoding a client without HPACK state would send.
    fn plain_block(fields: &[(&[u8], Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0);
            for s in [*name, value.as_slice()] {
                out.push(s.len() as u8);
                out.extend_from_slice(s);
            }
        }
        out
    }

    #[tokio::test]
    async fn any_authority_is_served_on_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("csi.sock");
        let meta = MetaClient::new(["127.0.0.1:9"], ballast_metaclient::Security::Insecure).expect("meta client");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let path = path.clone();
            async move {
                serve(&path, IdentityService::new(false, meta), None, None, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        while !path.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let encoded = path.display().to_string().replace('/', "%2F");
        // What grpcio sends by default, in the forms its versions and target
        // spellings give (1.85 sends `tmp%2Fcsi.sock` for `unix:/tmp/csi.sock`);
        // the bare path (grpc-java); the kubelet's; a good one with a port.
        let authorities = [
            encoded.clone(),
            format!("unix:{encoded}"),
            encoded.trim_start_matches("%2F").to_string(),
            path.display().to_string(),
        ];
        let authorities = [&authorities[..], &["localhost".into(), "csi.invalid:80".into()]].concat();
        let mut h2 = RawH2::connect(&path).await;
        let mut streams = Vec::new();
        for (i, authority) in authorities.iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            let fields = get_plugin_info(authority);
            // Every other call as a real encoder sends it (static and dynamic table
            // references, which the relay must follow), the others as literals.
            let block = if i % 2 == 0 {
                plain_block(&fields)
            } else {
                h2.encoder.encode(fields.iter().map(|(n, v)| (*n, v.as_slice())))
            };
            h2.call(stream, block).await;
            streams.push(stream);
        }
        // The same authority again, now a dynamic table entry of the client's.
        let again = h2.encoder.encode(get_plugin_info(&authorities[1]).iter().map(|(n, v)| (*n, v.as_slice())));
        let last = 1 + 2 * authorities.len() as u32;
        h2.call(last, again).await;
        streams.push(last);
        let got = h2.answers(&streams).await;
        for stream in streams {
            let (fields, data) = &got[&stream];
            let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
            assert_eq!(field(":status"), Some("200"), "stream {stream}: {fields:?}");
            assert_eq!(field("grpc-status"), Some("0"), "stream {stream}: {fields:?}");
            assert!(data.windows(DRIVER_NAME.len()).any(|w| w == DRIVER_NAME.as_bytes()), "stream {stream}: {data:?}");
        }
        drop(h2);
        let _ = stop.send(());
        server.await.expect("serve task").expect("serve");
        assert!(!path.exists(), "the socket is removed on shutdown");
    }
}
