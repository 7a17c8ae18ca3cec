//! The kit's one error type. Every fallible kit call returns [`Result`]; a test
//! `?`s it (a test may return `Result<()>`) or `.unwrap()`s it. `Debug` prints
//! the same sentence as `Display`, so a test that fails with an `Err` (or
//! unwraps one) shows the message, not a struct dump.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(thiserror::Error)]
pub enum Error {
    /// A system call, file or spawn failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A `ballast` binary is not where the kit looks (see [`crate::bin`]).
    #[error("{} is missing: {hint}", path.display())]
    BinaryMissing { path: PathBuf, hint: &'static str },
    /// A process never printed the line it was waited for.
    #[error("{name}: no line containing {needle:?} within {timeout:?}; saw {seen:?}; exit: {exit:?}")]
    NotReady { name: String, needle: String, timeout: Duration, seen: Vec<String>, exit: Option<ExitStatus> },
    /// A line without the `key=value` it should carry.
    #[error("{name}: no {key}= in {line:?}")]
    NoField { name: String, key: String, line: String },
    /// A process handle whose process was already killed and reaped.
    #[error("{name} is not running")]
    NotRunning { name: String },
    /// A command ran and exited unsuccessfully.
    #[error("{command} failed ({status}): {stderr}")]
    Failed { command: String, status: ExitStatus, stderr: String },
    /// Output that should have been JSON was not.
    #[error("{what}: bad JSON ({source})")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// A condition did not become true in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    /// An NBD client call failed.
    #[error("{what}: {source}")]
    Nbd {
        what: String,
        #[source]
        source: ballast_nbd::NbdError,
    },
    /// Anything else that makes the harness unable to go on (a namespace that
    /// cannot be built, ballastctl JSON without an expected field, a bad argument).
    #[error("{0}")]
    Harness(String),
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Error {
    /// For `map_err`: an [`Error::Io`] saying what failed (`.map_err(Error::io("spawn nbdfuse"))`).
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// An [`Error::Harness`].
    pub fn harness(msg: impl Into<String>) -> Error {
        Error::Harness(msg.into())
    }
}
