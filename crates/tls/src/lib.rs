//! Transport security for every Ballast TCP channel.
//!
//! One cluster CA; each process holds one certificate naming one [`Identity`]
//! (see [`identity`] for the encoding), read from a `--tls-dir` holding
//! `ca.crt`, `tls.crt` and `tls.key`. Every channel is mutual TLS 1.3: the
//! server requires a client certificate of the CA and learns the client's
//! identity ([`Peer`]), which the services then authorize per call; the client
//! checks the server's chain and that its identity has the role it dialed
//! (a replica is a storage node, meta is a meta member). Renewed files are
//! picked up at the next handshake (src/material.rs).
//!
//! [`Security::Insecure`] (`--insecure`) is plaintext with no identity, for
//! experiments only: every call is allowed and a warning is logged at start.
//!
//! ```text
//!   accept: TcpStream ─► Security::accept ─► (Stream, Peer) ─► service checks Peer per call
//!   dial:   TcpStream ─► Security::connect(expect Role) ─► Stream
//!   gRPC:   grpc::incoming (server, PeerInfo in each request), grpc::channel (client)
//! ```

pub mod certs;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod identity;
mod material;
mod stream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::warn;

pub use certs::{Ca, Issued, Validity};
pub use identity::{identity_of_der, Identity, Peer, Role};
use material::{ClientSide, Material, ServerSide};
pub use material::{TlsFiles, RELOAD_CHECK};
pub use stream::Stream;

/// A handshake that has not finished in this long is dropped (a peer that
/// connects and sends nothing must not hold a task forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("{} exists; not replacing it", path.display())]
    Exists { path: PathBuf },
    #[error("bad identity {value:?}: {reason}")]
    BadIdentity { value: String, reason: String },
    #[error("certificate refused: {reason}")]
    BadCertificate { reason: String },
    #[error("cannot {what}: {reason}")]
    Issue { what: &'static str, reason: String },
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error(
        "no TLS identity: pass --tls-dir DIR (ca.crt, tls.crt, tls.key; see `ballast certs`), \
         or --insecure for a plaintext experiment"
    )]
    NoIdentity,
    #[error("--tls-dir and --insecure exclude each other")]
    Conflicting,
}

impl TlsError {
    pub(crate) fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TlsError + 'a {
        move |source| TlsError::Io { op, path: path.to_path_buf(), source }
    }
}

/// How a process's channels are secured. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Security {
    /// Plaintext, no identities (`--insecure`).
    Insecure,
    Tls(Arc<Tls>),
}

/// Mutual TLS with one process's material.
pub struct Tls {
    material: Arc<Material>,
    acceptor: TlsAcceptor,
    /// One client configuration per role a server may be expected to have.
    connectors: Vec<(Role, TlsConnector)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("material", &self.material).finish_non_exhaustive()
    }
}

impl Security {
    /// Mutual TLS with the files of `dir` (ca.crt, tls.crt, tls.key).
    pub fn from_dir(dir: &Path) -> Result<Security, TlsError> {
        Self::from_files(TlsFiles::in_dir(dir))
    }

    pub fn from_files(files: TlsFiles) -> Result<Security, TlsError> {
        let material = Material::open(files)?;
        let server = rustls::ServerConfig::builder_with_provider(material.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Issue { what: "configure TLS", reason: e.to_string() })?
            .with_client_cert_verifier(Arc::new(ServerSide(material.clone())))
            .with_cert_resolver(Arc::new(ServerSide(material.clone())));
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let mut connectors = Vec::new();
        for expect in Role::ALL {
            let side = Arc::new(ClientSide { material: material.clone(), expect });
            let mut client = rustls::ClientConfig::builder_with_provider(material.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| TlsError::Issue { what: "configure TLS", reason: e.to_string() })?
                .dangerous()
                .with_custom_certificate_verifier(side.clone())
                .with_client_cert_resolver(side);
            // Servers are named by identity, not by DNS: no SNI to send.
            client.enable_sni = false;
            connectors.push((expect, TlsConnector::from(Arc::new(client))));
        }
        Ok(Security::Tls(Arc::new(Tls { material, acceptor, connectors })))
    }

    /// What the command line asked for: `--tls-dir`, or `--insecure` (with its
    /// warning), never neither (plaintext is refused by default).
    pub fn from_flags(tls_dir: Option<&Path>, insecure: bool, process: &str) -> Result<Security, TlsError> {
        match (tls_dir, insecure) {
            (Some(_), true) => Err(TlsError::Conflicting),
            (Some(dir), false) => Security::from_dir(dir),
            (None, true) => {
                warn!(
                    process,
                    "--insecure: plaintext channels, no peer is authenticated and every call is allowed; \
                     for experiments only"
                );
                Ok(Security::Insecure)
            }
            (None, false) => Err(TlsError::NoIdentity),
        }
    }

    /// This process's identity (none when insecure). Reflects a renewal.
    pub fn identity(&self) -> Option<Identity> {
        match self {
            Security::Insecure => None,
            Security::Tls(t) => Some(t.material.identity()),
        }
    }

    /// The server side of a new connection: the handshake (bounded by
    /// [`HANDSHAKE_TIMEOUT`]) and the client's identity.
    pub async fn accept(&self, tcp: TcpStream) -> Result<(Stream, Peer), TlsError> {
        let t = match self {
            Security::Insecure => return Ok((Stream::Plain(tcp), Peer::Insecure)),
            Security::Tls(t) => t,
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, t.acceptor.accept(tcp)).await {
            Ok(r) => r.map_err(TlsError::Handshake)?,
            Err(_) => return Err(TlsError::HandshakeTimeout),
        };
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| TlsError::BadCertificate { reason: "the client sent none".into() })?;
        let identity = identity_of_der(leaf)?;
        Ok((Stream::Server(Box::new(tls)), Peer::Authenticated(identity)))
    }

    /// The client side of a connection to a server that must have role `expect`.
    pub async fn connect(&self, tcp: TcpStream, expect: Role) -> Result<Stream, TlsError> {
        let t = match self {
            Security::Insecure => return Ok(Stream::Plain(tcp)),
            Security::Tls(t) => t,
        };
        let connector = t
            .connectors
            .iter()
            .find(|(r, _)| *r == expect)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| TlsError::Issue { what: "connect", reason: format!("no configuration for {expect}") })?;
        // Ignored by the verifier (identities, not names, are checked) and not sent (no SNI).
        let name = ServerName::try_from("ballast.invalid")
            .map_err(|e| TlsError::Issue { what: "connect", reason: e.to_string() })?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(r) => Ok(Stream::Client(Box::new(r.map_err(TlsError::Handshake)?))),
            Err(_) => Err(TlsError::HandshakeTimeout),
        }
    }

    /// Dials `addr` (TCP_NODELAY) and secures the connection.
    pub async fn dial(&self, addr: &str, expect: Role) -> Result<Stream, TlsError> {
        let tcp =
            TcpStream::connect(addr).await.map_err(|source| TlsError::Connect { addr: addr.to_string(), source })?;
        tcp.set_nodelay(true).map_err(|source| TlsError::Connect { addr: addr.to_string(), source })?;
        self.connect(tcp, expect).await
    }
}
