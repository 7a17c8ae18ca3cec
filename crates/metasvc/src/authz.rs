//! Who may make which call: checked per call, on the member that executes it,
//! against the identity in the caller's certificate (`ballast_tls`).
//!
//! ```text
//!   Raft.*                                   meta members
//!   NodeApi.Register, Heartbeat              node N, for node N only
//!   NodeApi.Attach                           node N or frontend N, for node N only
//!   NodeApi.Eject, AckLayout, Detach,        node N or frontend N, where N holds the
//!     CommitSnapshots, FillChunks              volume's attach (epochs fence on top)
//!   NodeApi.ReportJob                        node N, for jobs targeting N
//!   NodeApi.GetLayout, Admin reads           any identity of the cluster
//!   Admin volume and snapshot writes         admin, csi-controller
//!   Admin node, member and settings writes   admin
//! ```
//! A follower forwards a call to the leader with the caller's identity in
//! [`ON_BEHALF_OF`]; the leader believes that header only from a meta member.
//! With `--insecure` there are no identities and every call is allowed.

// tonic's Status is what every handler returns; boxing it here would only
// unbox it again at each call site.
#![allow(clippy::result_large_err)]

use std::fmt;

use ballast_tls::grpc::peer_of;
use ballast_tls::{Identity, Peer};
use tonic::{Request, Status};
use tracing::warn;

/// Metadata key: the identity a forwarded call acts for.
pub(crate) const ON_BEHALF_OF: &str = "x-ballast-on-behalf-of";

/// The identity a call acts for.
#[derive(Clone, Debug)]
pub(crate) enum Caller {
    Insecure,
    As(Identity),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Insecure => f.write_str("an unauthenticated caller"),
            Caller::As(i) => write!(f, "{i}"),
        }
    }
}

/// What a call requires of its caller.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Need {
    Meta,
    /// Any identity of the cluster (reads).
    Member,
    Admin,
    /// Admin or the CSI controller (volumes and snapshots).
    Provisioner,
    /// Storage node `n` itself.
    Node(u64),
    /// Storage node `n`, or a front end on it.
    OnNode(u64),
}

/// The caller of `req`: its certificate's identity, or for a call forwarded by
/// a meta member, the identity that member vouches for.
pub(crate) fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let info = peer_of(req).ok_or_else(|| Status::unauthenticated("no peer identity on this connection"))?;
    match &info.peer {
        Peer::Insecure => Ok(Caller::Insecure),
        Peer::Authenticated(Identity::Meta(m)) => match req.metadata().get(ON_BEHALF_OF) {
            None => Ok(Caller::As(Identity::Meta(*m))),
            Some(v) => {
                let uri = v.to_str().map_err(|_| Status::invalid_argument("bad on-behalf-of header"))?;
                Identity::from_uri(uri)
                    .map(Caller::As)
                    .map_err(|e| Status::invalid_argument(format!("bad on-behalf-of header: {e}")))
            }
        },
        Peer::Authenticated(i) => Ok(Caller::As(i.clone())),
    }
}

impl Caller {
    /// Ok if the caller meets `need`; otherwise PERMISSION_DENIED naming both,
    /// and a warning in the log.
    pub(crate) fn check(&self, rpc: &'static str, need: Need) -> Result<(), Status> {
        let Caller::As(id) = self else { return Ok(()) };
        let ok = match need {
            Need::Meta => matches!(id, Identity::Meta(_)),
            Need::Member => true,
            Need::Admin => matches!(id, Identity::Admin(_)),
            Need::Provisioner => matches!(id, Identity::Admin(_) | Identity::CsiController),
            Need::Node(n) => *id == Identity::Node(n),
            Need::OnNode(n) => id.node() == Some(n),
        };
        if ok {
            return Ok(());
        }
        let wanted = match need {
            Need::Meta => "a meta member".to_string(),
            Need::Member => "a cluster identity".to_string(),
            Need::Admin => "an admin".to_string(),
            Need::Provisioner => "an admin or the CSI controller".to_string(),
            Need::Node(n) => format!("node/{n}"),
            Need::OnNode(n) => format!("node/{n} or frontend/{n}"),
        };
        warn!(rpc, caller = %id, needs = %wanted, "call refused");
        Err(Status::permission_denied(format!("{rpc}: {id} may not make this call (it needs {wanted})")))
    }

    /// The header a follower adds when it forwards this caller's call.
    pub(crate) fn on_behalf_of(&self) -> Option<String> {
        match self {
            Caller::Insecure => None,
            Caller::As(i) => Some(i.uri()),
        }
    }
}

/// Shorthand: the caller of `req` if it meets `need`.
pub(crate) fn require<T>(req: &Request<T>, rpc: &'static str, need: Need) -> Result<Caller, Status> {
    let c = caller(req)?;
    c.check(rpc, need)?;
    Ok(c)
}
