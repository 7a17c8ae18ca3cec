//! A process's TLS material (trust bundle, certificate, key) read from a
//! `--tls-dir`, and picked up again when the files change.
//!
//! Invariant: every handshake uses one consistent set (a certificate with its
//! own key, and the bundle read with them). The files are looked at again at
//! most once per [`RELOAD_CHECK`], at the next handshake; a set that does not
//! load (a half-written renewal, a key that does not match the certificate)
//! is refused with a warning and the set in use stays, so a bad renewal never
//! takes a running process off the network. Connections already open keep the
//! keys they were made with until they close.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tracing::{info, warn};

use crate::certs::{CA_CERT, CERT, KEY};
use crate::identity::identity_of_der;
use crate::{Identity, Role, TlsError};

/// How often, at most, the files are looked at for a renewal.
pub const RELOAD_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The three files of a `--tls-dir`.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The trust bundle: one CA certificate, or two while a CA is rotated.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `dir`/ca.crt, `dir`/tls.crt, `dir`/tls.key (a Kubernetes TLS Secret's layout).
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles { ca: dir.join(CA_CERT), cert: dir.join(CERT), key: dir.join(KEY) }
    }

    /// Modification time and length of each file: what a renewal changes.
    fn stamp(&self) -> Result<[(SystemTime, u64); 3], TlsError> {
        let one = |p: &Path| -> Result<(SystemTime, u64), TlsError> {
            let m = fs::metadata(p).map_err(TlsError::io("stat", p))?;
            Ok((m.modified().map_err(TlsError::io("stat", p))?, m.len()))
        };
        Ok([one(&self.ca)?, one(&self.cert)?, one(&self.key)?])
    }
}

/// One consistent set read from the files.
pub(crate) struct Loaded {
    pub(crate) identity: Identity,
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    stamp: [(SystemTime, u64); 3],
}

fn load(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Loaded, TlsError> {
    let stamp = files.stamp()?;
    let bad = |path: &Path, reason: String| TlsError::BadFile { path: path.to_path_buf(), reason };
    let ca_pem = fs::read(&files.ca).map_err(TlsError::io("read", &files.ca))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        let c = c.map_err(|e| bad(&files.ca, e.to_string()))?;
        roots.add(c).map_err(|e| bad(&files.ca, format!("not a CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad(&files.ca, "holds no certificate".into()));
    }
    let cert_pem = fs::read(&files.cert).map_err(TlsError::io("read", &files.cert))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&files.cert, e.to_string()))?;
    let leaf = chain.first().ok_or_else(|| bad(&files.cert, "holds no certificate".into()))?;
    let identity = identity_of_der(leaf).map_err(|e| bad(&files.cert, e.to_string()))?;
    let key_pem = fs::read(&files.key).map_err(TlsError::io("read", &files.key))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad(&files.key, e.to_string()))?;
    let key = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| bad(&files.key, format!("does not fit {}: {e}", files.cert.display())))?;
    let roots = Arc::new(roots);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| bad(&files.ca, e.to_string()))?;
    Ok(Loaded { identity, key: Arc::new(key), roots, client_verifier, stamp })
}

/// The material in use and where it comes from.
pub(crate) struct Material {
    files: TlsFiles,
    pub(crate) provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
    last_check: Mutex<Instant>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material").field("files", &self.files).finish()
    }
}

impl Material {
    pub(crate) fn open(files: TlsFiles) -> Result<Arc<Material>, TlsError> {
        // ring: no cmake or C++ build, minutes less on a 2-core CI machine than
        // aws-lc-rs. rustls 0.23.48 marks it deprecated for lacking post-quantum
        // key exchange (X25519MLKEM768); moving to aws-lc-rs is a one-line change
        // here and in Cargo.toml (docs/security.md, "Crypto").
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = load(&files, &provider)?;
        info!(identity = %loaded.identity, cert = %files.cert.display(), "TLS identity loaded");
        Ok(Arc::new(Material {
            files,
            provider,
            current: RwLock::new(Arc::new(loaded)),
            last_check: Mutex::new(Instant::now()),
        }))
    }

    /// The set to use now, after picking up changed files (at most once per
    /// [`RELOAD_CHECK`]).
    pub(crate) fn current(&self) -> Arc<Loaded> {
        let due = {
            let mut last = self.last_check.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= RELOAD_CHECK {
                *last = Instant::now();
                true
            } else {
                false
            }
        };
        if due {
            self.reload_if_changed();
        }
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn reload_if_changed(&self) {
        let old = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        match self.files.stamp() {
            Ok(s) if s == old.stamp => return,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "TLS files unreadable; keeping the certificate in use");
                return;
            }
        }
        match load(&self.files, &self.provider) {
            Ok(new) => {
                if new.identity != old.identity {
                    // A renewal must not turn a process into someone else.
                    warn!(old = %old.identity, new = %new.identity, "renewed certificate names another identity; keeping the one in use");
                    return;
                }
                info!(identity = %new.identity, cert = %self.files.cert.display(), "TLS certificate renewed");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
            }
            Err(e) => warn!(error = %e, "renewed TLS files do not load; keeping the certificate in use"),
        }
    }

    pub(crate) fn identity(&self) -> Identity {
        self.current().identity.clone()
    }
}

/// The server side: our certificate, and the client verifier of the current bundle.
#[derive(Debug)]
pub(crate) struct ServerSide(pub(crate) Arc<Material>);

impl ResolvesServerCert for ServerSide {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

impl ClientCertVerifier for ServerSide {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: each process has one certificate and always sends it.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.current().client_verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The client side: our certificate, and a server verifier that checks the
/// chain against the current bundle and the server's identity against the role
/// the caller dials (a replica must be a storage node, meta a meta member). No
/// DNS name is checked: addresses change with every pod, identities do not.
#[derive(Debug)]
pub(crate) struct ClientSide {
    pub(crate) material: Arc<Material>,
    pub(crate) expect: Role,
}

impl rustls::client::ResolvesClientCert for ClientSide {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.material.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ServerCertVerifier for ClientSide {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let current = self.material.current();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &current.roots,
            intermediates,
            now,
            self.material.provider.signature_verification_algorithms.all,
        )?;
        let identity = identity_of_der(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if identity.role() != self.expect {
            return Err(rustls::Error::General(format!("the server is {identity}, not a {} as expected", self.expect)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.material.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.material.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.material.provider.signature_verification_algorithms.supported_schemes()
    }
}
