//! The cluster CA and the certificates it issues (`ballast certs init | issue`).
//!
//! Files, all PEM:
//! ```text
//!   CA_DIR/ca.crt   the CA certificate (0644)      CA_DIR/ca.key   its key (0600)
//!   OUT/ca.crt      the CA certificate (0644)      OUT/tls.crt     the certificate (0644)
//!   OUT/tls.key     its key (0600)
//! ```
//! OUT has the layout of a Kubernetes `kubernetes.io/tls` Secret with `ca.crt`,
//! so a mounted Secret is a `--tls-dir` as it is. Keys are ECDSA P-256. A
//! certificate is for client and server use and names exactly one identity
//! ([`crate::Identity::uri`]); it carries no DNS name: peers check identities,
//! not addresses.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::OffsetDateTime;

use crate::{Identity, TlsError};

/// File names in a CA directory and in an issued (`--tls-dir`) directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CERT: &str = "tls.crt";
pub const KEY: &str = "tls.key";

/// A CA lives 10 years; rotate it with a second CA in the trust bundle (docs/security.md).
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// An issued certificate lives 90 days unless `--days` says otherwise.
pub const CERT_LIFETIME: Duration = Duration::from_secs(90 * 86_400);
/// Clocks of the cluster may disagree by this much: a new certificate is valid
/// from this long before its issue.
const BACKDATE: Duration = Duration::from_secs(300);

/// A CA certificate and key in PEM.
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

/// An issued certificate and key in PEM, with the CA certificate that signed it.
pub struct Issued {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The validity of a certificate to issue.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From a few minutes ago (clock skew) for `lifetime`.
    pub fn starting_now(lifetime: Duration) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - BACKDATE, not_after: now + lifetime }
    }
}

fn rcgen_err(what: &'static str) -> impl Fn(rcgen::Error) -> TlsError {
    move |e| TlsError::Issue { what, reason: e.to_string() }
}

impl Ca {
    /// "Ballast cluster CA 2026-12-07T15:58:01Z": two generations in one trust
    /// bundle (a rotation) are told apart by name.
    pub fn default_name() -> String {
        let now = OffsetDateTime::now_utc();
        format!(
            "Ballast cluster CA {:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        )
    }

    /// A new self-signed CA named `name`.
    pub fn generate(name: &str, validity: Validity) -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_err("generate the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(DnType::OrganizationName, "Ballast");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key).map_err(rcgen_err("sign the CA certificate"))?;
        Ok(Ca { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Reads `dir`/ca.crt and `dir`/ca.key.
    pub fn load(dir: &Path) -> Result<Ca, TlsError> {
        Ok(Ca { cert_pem: read(&dir.join(CA_CERT))?, key_pem: read(&dir.join(CA_KEY))? })
    }

    /// Writes `dir`/ca.crt and `dir`/ca.key (0600), refusing to replace either.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(TlsError::io("create", dir))?;
        for f in [CA_CERT, CA_KEY] {
            if dir.join(f).exists() {
                return Err(TlsError::Exists { path: dir.join(f) });
            }
        }
        write_file(&dir.join(CA_KEY), &self.key_pem, 0o600)?;
        write_file(&dir.join(CA_CERT), &self.cert_pem, 0o644)
    }

    /// The DER of the certificate in `cert_pem` (one, or a rotation's bundle
    /// of two) whose public key is `ca.key`'s: the one that signs.
    fn signing_cert(&self, key: &KeyPair) -> Result<Vec<u8>, TlsError> {
        for pem in x509_parser::pem::Pem::iter_from_buffer(self.cert_pem.as_bytes()) {
            let pem = pem.map_err(|e| TlsError::Issue { what: "read the CA certificate", reason: e.to_string() })?;
            let cert = pem
                .parse_x509()
                .map_err(|e| TlsError::Issue { what: "read the CA certificate", reason: e.to_string() })?;
            if cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw() {
                return Ok(pem.contents.clone());
            }
        }
        Err(TlsError::Issue { what: "issue", reason: "no certificate in ca.crt has ca.key's public key".into() })
    }

    /// A certificate for `identity`, signed by this CA. With a bundle of two CA
    /// certificates (a rotation), the one of `ca.key` signs, and the issued
    /// directory trusts both.
    pub fn issue(&self, identity: &Identity, validity: Validity) -> Result<Issued, TlsError> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(rcgen_err("read the CA key"))?;
        let signing = self.signing_cert(&ca_key)?;
        let issuer = Issuer::from_ca_cert_der(&signing.into(), ca_key).map_err(rcgen_err("read the CA certificate"))?;
        let key = KeyPair::generate().map_err(rcgen_err("generate a key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, identity.to_string());
        params.distinguished_name.push(DnType::OrganizationName, "Ballast");
        let uri = identity.uri().try_into().map_err(rcgen_err("encode the identity"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &issuer).map_err(rcgen_err("sign the certificate"))?;
        Ok(Issued { ca_pem: self.cert_pem.clone(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

impl Issued {
    /// Writes `dir`/{ca.crt, tls.crt, tls.key}, replacing what is there the way
    /// a renewal must: each file is written beside and renamed over the old one,
    /// the key before the certificate, so a reader sees old or new, never half.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(TlsError::io("create", dir))?;
        replace_file(&dir.join(CA_CERT), &self.ca_pem, 0o644)?;
        replace_file(&dir.join(KEY), &self.key_pem, 0o600)?;
        replace_file(&dir.join(CERT), &self.cert_pem, 0o644)
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(TlsError::io("read", path))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(TlsError::io("create", path))?;
    // The mode given to open is filtered by the umask; a key must end up 0600 exactly.
    f.set_permissions(fs::Permissions::from_mode(mode)).map_err(TlsError::io("chmod", path))?;
    f.write_all(text.as_bytes()).map_err(TlsError::io("write", path))?;
    f.sync_all().map_err(TlsError::io("sync", path))
}

fn replace_file(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let tmp = PathBuf::from(format!("{}.new", path.display()));
    let _ = fs::remove_file(&tmp);
    write_file(&tmp, text, mode)?;
    fs::rename(&tmp, path).map_err(TlsError::io("rename into place", path))
}

/// Issues a certificate for `identity` into `dir` unless the one there is
/// of this CA, names `identity`, and has more than a third of `lifetime` left.
/// True if it issued one.
pub fn renew_if_due(ca: &Ca, identity: &Identity, lifetime: Duration, dir: &Path) -> Result<bool, TlsError> {
    let left = remaining(ca, identity, dir);
    if left.is_some_and(|l| l > lifetime / 3) {
        return Ok(false);
    }
    ca.issue(identity, Validity::starting_now(lifetime))?.write(dir)?;
    Ok(true)
}

/// How long the certificate in `dir` has left, if `dir` trusts exactly `ca`'s
/// bundle and its certificate names `identity` and was signed by `ca.key`.
fn remaining(ca: &Ca, identity: &Identity, dir: &Path) -> Option<Duration> {
    let trusted = fs::read_to_string(dir.join(CA_CERT)).ok()?;
    if trusted != ca.cert_pem {
        return None;
    }
    let signing = ca.signing_cert(&KeyPair::from_pem(&ca.key_pem).ok()?).ok()?;
    let (_, signing) = x509_parser::parse_x509_certificate(&signing).ok()?;
    let pem = fs::read(dir.join(CERT)).ok()?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    if crate::identity_of_der(&p.contents).ok()? != *identity {
        return None;
    }
    let cert = p.parse_x509().ok()?;
    if cert.issuer().as_raw() != signing.subject().as_raw() {
        return None;
    }
    let end = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()?;
    let left = end - OffsetDateTime::now_utc();
    Duration::try_from(left).ok()
}

/// A CA directory and the `--tls-dir`s it issued, under one root: what
/// `ballast dev` and the cluster tests run with.
///
/// ```text
///   ROOT/ca/{ca.crt, ca.key}     ROOT/IDENTITY/{ca.crt, tls.crt, tls.key}   (node-3, admin-dev, ...)
/// ```
pub struct Pki {
    root: PathBuf,
    ca: Ca,
}

/// A certificate this close to its end is issued again by [`Pki::issue`].
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

impl Pki {
    /// The CA under `root`, made on first use.
    pub fn open_or_create(root: &Path) -> Result<Pki, TlsError> {
        let dir = root.join("ca");
        let ca = if dir.join(CA_CERT).exists() {
            Ca::load(&dir)?
        } else {
            let ca = Ca::generate(&Ca::default_name(), Validity::starting_now(CA_LIFETIME))?;
            ca.write(&dir)?;
            ca
        };
        Ok(Pki { root: root.to_path_buf(), ca })
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// Mutual TLS as `identity` ([`Pki::issue`], then its files loaded).
    pub fn security(&self, identity: &Identity) -> Result<crate::Security, TlsError> {
        crate::Security::from_dir(&self.issue(identity)?)
    }

    /// The `--tls-dir` of `identity`: `ROOT/<identity>`, issued if missing, from
    /// another CA, or within 30 days of its end.
    pub fn issue(&self, identity: &Identity) -> Result<PathBuf, TlsError> {
        let dir = self.root.join(identity.file_stem());
        if remaining(&self.ca, identity, &dir).is_none_or(|left| left <= RENEW_BEFORE) {
            self.ca.issue(identity, Validity::starting_now(CERT_LIFETIME))?.write(&dir)?;
        }
        Ok(dir)
    }
}
