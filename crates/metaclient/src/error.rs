//! [`MetaClientError`]: what a call to the metadata service can end in, grouped by
//! what the caller should do about it.

use std::error::Error as _;
use std::fmt;

/// Why a call to the metadata service failed.
///
/// - [`MetaClientError::Status`]: a member answered with an error the caller must
///   look at (not found, invalid argument, failed precondition, ...). Retrying the
///   same call will give the same answer.
/// - [`MetaClientError::Unreachable`]: no member answered usefully within the retry
///   budget (all down, no leader, no quorum). Worth retrying later.
/// - [`MetaClientError::InvalidEndpoint`], [`MetaClientError::NoEndpoints`]: the
///   client's configuration is wrong; never retry.
#[derive(Debug, thiserror::Error)]
pub enum MetaClientError {
    /// A member answered with a non-retryable gRPC status. The message is the
    /// server's; when it is empty the rpc and the code stand in for it.
    #[error("{}", StatusText { rpc, code: *code, message })]
    Status { rpc: &'static str, code: tonic::Code, message: String },
    /// Every member was tried (repeatedly, until the retry budget ran out) and
    /// none answered: down, unreachable, or without a leader.
    #[error("cluster unreachable: tried {}: {last_error}", endpoints.join(", "))]
    Unreachable { endpoints: Vec<String>, last_error: String },
    /// A member endpoint that is not `host:port` (or an http URI).
    #[error("invalid metadata service endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// The member list is empty.
    #[error("no metadata service endpoints given")]
    NoEndpoints,
    /// A member answered, but the answer lacks a field the proto requires (a
    /// server bug or a version mismatch).
    #[error("{rpc}: malformed answer: {message}")]
    Malformed { rpc: &'static str, message: String },
}

impl MetaClientError {
    /// The gRPC code of a member's answer, if one answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            MetaClientError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for NOT_FOUND answers (unknown node, volume, chunk or job).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }

    /// True when the cluster could not be reached: worth retrying later.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, MetaClientError::Unreachable { .. })
    }

    pub(crate) fn from_status(rpc: &'static str, status: &tonic::Status) -> Self {
        MetaClientError::Status { rpc, code: status.code(), message: status.message().to_string() }
    }
}

struct StatusText<'a> {
    rpc: &'a str,
    code: tonic::Code,
    message: &'a str,
}

impl fmt::Display for StatusText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}: {}", self.rpc, self.code.description())
        } else {
            f.write_str(self.message)
        }
    }
}

/// Whether a failed attempt should move on to the next member (and, after a
/// full round, back off and go round again).
///
/// Retryable: UNAVAILABLE (no leader, no quorum, connection refused),
/// DEADLINE_EXCEEDED, CANCELLED, and any status the client library made up from a local
/// transport failure (it carries the failure as its source; a member's own
/// answer never does), e.g. a connection reset mid-call.
///
/// A write that failed after it was sent may have been applied; the metadata
/// service's writes are idempotent (create with the same parameters, grow to a
/// size, eject at a version, attach bumps again) except delete, whose retry can
/// answer NOT_FOUND after the first attempt succeeded.
pub(crate) fn is_retryable(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        // CANCELLED: the call's stream was reset (e.g. the member, or the leader
        // it proxied to, died mid-call).
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => true,
        Code::Unknown | Code::Internal => status.source().is_some(),
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => false,
    }
}

/// A one-line description of a failed attempt: the status message followed by
/// the root cause of a local transport failure ("tcp connect error: Connection
/// refused (os error 111)"), without repeating text already present.
pub(crate) fn describe_failure(status: &tonic::Status) -> String {
    let mut text = if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    };
    let mut source = status.source();
    let mut root = None;
    while let Some(err) = source {
        root = Some(err.to_string());
        source = err.source();
    }
    if let Some(root) = root {
        if !text.contains(&root) {
            text.push_str(": ");
            text.push_str(&root);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_display_is_the_server_message() {
        let e =
            MetaClientError::from_status("Admin.InspectVolume", &tonic::Status::not_found("volume \"x\" not found"));
        assert_eq!(e.to_string(), "volume \"x\" not found");
        assert!(e.is_not_found());
        let e = MetaClientError::from_status("Admin.Status", &tonic::Status::internal(""));
        assert_eq!(e.to_string(), "Admin.Status: Internal error");
        assert_eq!(e.code(), Some(tonic::Code::Internal));
    }

    #[test]
    fn unreachable_names_every_endpoint() {
        let e = MetaClientError::Unreachable {
            endpoints: vec!["a:1".into(), "b:2".into(), "c:3".into()],
            last_error: "connection refused".into(),
        };
        assert_eq!(e.to_string(), "cluster unreachable: tried a:1, b:2, c:3: connection refused");
        assert!(e.is_unreachable());
        assert_eq!(e.code(), None);
    }

    #[test]
    fn retryable_codes() {
        assert!(is_retryable(&tonic::Status::unavailable("no leader")));
        assert!(is_retryable(&tonic::Status::deadline_exceeded("slow")));
        // A member's own UNKNOWN / INTERNAL answers are not retried ...
        assert!(!is_retryable(&tonic::Status::unknown("boom")));
        assert!(!is_retryable(&tonic::Status::internal("bug")));
        // ... but the same codes made up from a local transport failure are.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        assert!(is_retryable(&tonic::Status::from_error(Box::new(io))));
        for s in [
            tonic::Status::not_found(""),
            tonic::Status::invalid_argument(""),
            tonic::Status::failed_precondition(""),
            tonic::Status::already_exists(""),
            tonic::Status::resource_exhausted(""),
        ] {
            assert!(!is_retryable(&s), "{s:?}");
        }
    }

    #[test]
    fn failure_text_appends_root_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let s = tonic::Status::from_error(Box::new(io));
        let text = describe_failure(&s);
        assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
        assert_eq!(describe_failure(&tonic::Status::unavailable("no leader")), "no leader");
    }
}
