//! Who a certificate names: one Ballast identity per certificate, carried as a
//! SPIFFE-style URI subject alternative name.
//!
//! ```text
//!   spiffe://ballast/meta/<id>          a meta member (Raft, node and admin APIs)
//!   spiffe://ballast/node/<id>          a storage node (replica server, copy jobs, its front ends)
//!   spiffe://ballast/frontend/<node>    a front end (`ballast export`) on storage node <node>
//!   spiffe://ballast/csi-controller     the CSI controller
//!   spiffe://ballast/admin/<name>       an operator who may change the cluster
//!   spiffe://ballast/reader/<name>      an operator who may only read
//! ```
//! A certificate with no such URI, or with two, names nobody and is refused.
//! Names are 1 to 64 characters of `[A-Za-z0-9._-]`; ids are decimal u64 ≥ 1.

use std::fmt;
use std::str::FromStr;

use crate::TlsError;

/// The URI prefix every Ballast identity has.
pub const SPIFFE_PREFIX: &str = "spiffe://ballast/";

/// One authenticated peer of a Ballast channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Meta(u64),
    Node(u64),
    Frontend(u64),
    CsiController,
    Admin(String),
    Reader(String),
}

/// The role part of an [`Identity`], as `ballast certs issue --role` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Meta,
    Node,
    Frontend,
    CsiController,
    Admin,
    Reader,
}

impl Role {
    pub const ALL: [Role; 6] = [Role::Meta, Role::Node, Role::Frontend, Role::CsiController, Role::Admin, Role::Reader];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Meta => "meta",
            Role::Node => "node",
            Role::Frontend => "frontend",
            Role::CsiController => "csi-controller",
            Role::Admin => "admin",
            Role::Reader => "reader",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Role, TlsError> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| TlsError::BadIdentity {
            value: s.to_string(),
            reason: "unknown role (meta, node, frontend, csi-controller, admin, reader)".into(),
        })
    }
}

impl Identity {
    pub fn role(&self) -> Role {
        match self {
            Identity::Meta(_) => Role::Meta,
            Identity::Node(_) => Role::Node,
            Identity::Frontend(_) => Role::Frontend,
            Identity::CsiController => Role::CsiController,
            Identity::Admin(_) => Role::Admin,
            Identity::Reader(_) => Role::Reader,
        }
    }

    /// The identity of `role` with `id` (a number for meta, node and frontend, a
    /// name for admin and reader, nothing for the CSI controller).
    pub fn new(role: Role, id: Option<&str>) -> Result<Identity, TlsError> {
        let bad = |reason: &str| TlsError::BadIdentity {
            value: format!("{role}/{}", id.unwrap_or("")),
            reason: reason.into(),
        };
        let number = || -> Result<u64, TlsError> {
            match id.map(str::parse::<u64>) {
                Some(Ok(n)) if n >= 1 => Ok(n),
                Some(_) => Err(bad("the id must be a number, 1 or more")),
                None => Err(bad("this role needs --id")),
            }
        };
        let name = || -> Result<String, TlsError> {
            let n = id.ok_or_else(|| bad("this role needs --id (a name)"))?;
            let ok = !n.is_empty()
                && n.len() <= 64
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if ok {
                Ok(n.to_string())
            } else {
                Err(bad("a name is 1 to 64 characters of A-Z a-z 0-9 . _ -"))
            }
        };
        Ok(match role {
            Role::Meta => Identity::Meta(number()?),
            Role::Node => Identity::Node(number()?),
            Role::Frontend => Identity::Frontend(number()?),
            Role::CsiController => {
                if id.is_some() {
                    return Err(bad("the CSI controller has no id"));
                }
                Identity::CsiController
            }
            Role::Admin => Identity::Admin(name()?),
            Role::Reader => Identity::Reader(name()?),
        })
    }

    /// The URI subject alternative name that carries this identity.
    pub fn uri(&self) -> String {
        format!("{SPIFFE_PREFIX}{self}")
    }

    /// Parses [`Identity::uri`]'s form.
    pub fn from_uri(uri: &str) -> Result<Identity, TlsError> {
        let rest = uri.strip_prefix(SPIFFE_PREFIX).ok_or_else(|| TlsError::BadIdentity {
            value: uri.to_string(),
            reason: format!("not a Ballast identity (expected {SPIFFE_PREFIX}ROLE[/ID])"),
        })?;
        let (role, id) = match rest.split_once('/') {
            Some((r, id)) => (r, Some(id)),
            None => (rest, None),
        };
        Identity::new(role.parse()?, id)
    }

    /// The storage node this identity acts for: a node, or a front end on it.
    pub fn node(&self) -> Option<u64> {
        match self {
            Identity::Node(n) | Identity::Frontend(n) => Some(*n),
            _ => None,
        }
    }

    /// A short file-name form (`node-3`, `admin-alice`, `csi-controller`).
    pub fn file_stem(&self) -> String {
        self.to_string().replace('/', "-")
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Meta(n) => write!(f, "meta/{n}"),
            Identity::Node(n) => write!(f, "node/{n}"),
            Identity::Frontend(n) => write!(f, "frontend/{n}"),
            Identity::CsiController => f.write_str("csi-controller"),
            Identity::Admin(n) => write!(f, "admin/{n}"),
            Identity::Reader(n) => write!(f, "reader/{n}"),
        }
    }
}

/// Who is on the other end of a channel, as the server saw it at the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `--insecure`: plaintext, nobody authenticated; every call is allowed.
    Insecure,
    /// A certificate of the cluster CA naming this identity.
    Authenticated(Identity),
}

impl Peer {
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Peer::Insecure => None,
            Peer::Authenticated(i) => Some(i),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Insecure => f.write_str("an unauthenticated peer (--insecure)"),
            Peer::Authenticated(i) => write!(f, "{i}"),
        }
    }
}

/// The one Ballast identity in a DER certificate.
pub fn identity_of_der(der: &[u8]) -> Result<Identity, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::BadCertificate { reason: format!("does not parse: {e}") })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate { reason: format!("bad subject alternative names: {e}") })?
        .ok_or_else(|| TlsError::BadCertificate { reason: "no subject alternative names".into() })?;
    let mut found = None;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if uri.starts_with(SPIFFE_PREFIX) {
                if found.is_some() {
                    return Err(TlsError::BadCertificate { reason: "names two Ballast identities".into() });
                }
                found = Some(Identity::from_uri(uri)?);
            }
        }
    }
    found.ok_or_else(|| TlsError::BadCertificate { reason: format!("names no Ballast identity ({SPIFFE_PREFIX}...)") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_identity_survives_its_uri() {
        let all = [
            Identity::Meta(1),
            Identity::Node(u64::MAX),
            Identity::Frontend(7),
            Identity::CsiController,
            Identity::Admin("alice".into()),
            Identity::Reader("ops.team-1".into()),
        ];
        for id in all {
            assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
        }
    }

    #[test]
    fn malformed_identities_are_refused_with_the_reason() {
        for (uri, reason) in [
            ("spiffe://other/node/1", "not a Ballast identity"),
            ("spiffe://ballast/node/0", "1 or more"),
            ("spiffe://ballast/node/x", "1 or more"),
            ("spiffe://ballast/node", "needs --id"),
            ("spiffe://ballast/king/1", "unknown role"),
            ("spiffe://ballast/admin/a b", "a name is"),
            ("spiffe://ballast/admin/", "a name is"),
            ("spiffe://ballast/csi-controller/1", "no id"),
        ] {
            let e = Identity::from_uri(uri).unwrap_err().to_string();
            assert!(e.contains(reason), "{uri}: {e}");
        }
    }
}
