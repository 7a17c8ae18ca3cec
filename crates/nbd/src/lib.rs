//! ballast-nbd: an NBD server over any [`BlockDev`](ballast_blockdev::BlockDev),
//! and a small pipelined NBD client.
//!
//! ```text
//!  qemu / nbdinfo / fio / kernel ──TCP or unix──► NbdServer ──► Export { dev: Arc<B: BlockDev> }
//!                                                   │  fixed newstyle handshake (LIST, INFO, GO, EXPORT_NAME, ABORT)
//!                                                   │  transmission: READ WRITE FLUSH TRIM WRITE_ZEROES DISC (+FUA),
//!                                                   │  pipelined, out-of-order replies by cookie, multi-conn
//!  NbdClient (tests, benches) ──────────────────────┘  implements BlockDev itself
//! ```
//!
//! Owns: the NBD wire format ([`proto`]), the server ([`NbdServer`]) and the client
//! ([`NbdClient`]). Must not depend on replicas, chunks or the control plane (no
//! tonic, openraft, redb): it knows devices only through the `BlockDev` trait, so
//! a replicated volume and the in-memory model are served by the same code.
//!
//! Replies are simple replies only (structured replies are refused with
//! NBD_REP_ERR_UNSUP, which every mainstream client accepts). Kernel attach (NBD
//! netlink) is done elsewhere; [`NbdServer::serve_stream`] serves any connected
//! stream.

pub mod client;
pub mod proto;
mod server;

pub use client::{ExportInfo, NbdClient};
pub use server::{Export, NbdOptions, NbdServer};

use std::time::Duration;

/// Why an NBD session or server failed. The server's variants describe a client
/// that broke the protocol (its connection is closed, other clients go on) or a
/// socket failure; the client's describe a server that refused or misbehaved.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD server configuration: {0}")]
    Config(String),
    #[error("socket error during {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("bad magic {got:#x} in the {phase}")]
    BadMagic { phase: &'static str, got: u64 },
    #[error("client flags {flags:#x} contain bits this server does not know")]
    ClientFlags { flags: u32 },
    #[error("option {option} carries {len} bytes, more than the {max} accepted")]
    OptionTooLong { option: u32, len: u32, max: usize },
    #[error("no export named {name:?}")]
    UnknownExport { name: String },
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("write of {len} bytes exceeds the maximum payload of {max}; the stream cannot be resynchronised")]
    PayloadTooLarge { len: u32, max: u32 },
    #[error("server refused option {option} with reply {reply:#x}: {message}")]
    OptionRefused { option: u32, reply: u32, message: String },
    #[error("server broke the protocol: {0}")]
    ServerProtocol(String),
    #[error("request failed with NBD error {errno}")]
    Request { errno: u32 },
    #[error("connection closed")]
    Closed,
}
