//! ballast-frontend: what a volume looks like to its user. It owns
//!
//! - [`Volume`]: a [`ballast_blockdev::BlockDev`] over replicated chunks — splits
//!   requests at chunk boundaries, fans writes out to every in-sync and
//!   rebuilding replica, ejects failed replicas (durably, through
//!   [`Membership`]) before acknowledging without them, reads from one in-sync
//!   replica (local first) with read repair, reconciles dirty chunks at attach,
//!   and follows newer layouts while attached ([`Volume::apply_layout`]: new
//!   rebuilding replicas, promotions, new nodes);
//! - [`scrub`]: [`Volume::scrub`] reads every in-sync copy of every chunk and
//!   rewrites corrupt pieces from a verified copy (the read-repair path), paced
//!   to a byte rate; [`scrub_periodically`] runs passes on a schedule;
//! - [`Membership`]: the two durable decisions it needs from the configuration
//!   master (attach = bump the epoch; eject), and [`StaticMembership`], a
//!   TOML-file implementation;
//! - [`ReplicaIo`]: what it needs from a replica connection (implemented for
//!   `ballast_replica::ReplicaClient`, and by fakes in tests);
//! - [`policy`]: the decisions as pure functions;
//! - [`metrics`]: [`VolumeMetrics`], the Prometheus series of each attached
//!   volume (given through [`VolumeOptions::metrics`]).
//!
//! It must not depend on tonic, openraft or redb (a meta election must never
//! stall I/O; the Raft-backed `Membership` lives in the binary), nor on the
//! NBD server (which knows nothing of replicas).
//!
//! ```text
//!  NBD / FUSE ──BlockDev──► Volume ─┬─ split by chunk ─► write: in-sync + rebuilding  ─┐
//!                                   │                    read:  one replica (local 1st) ├─► ReplicaIo (TCP)
//!                                   │                    flush: every holder node      ─┘
//!                                   └─ replica failed ─► Membership::eject (durable) ─► then ack
//! ```
//!
//! The promise kept here (docs/DESIGN.md, 5.2 "Replication protocol"): every acknowledged
//! write is on every replica of the chunk's committed in-sync set, and that set
//! never has fewer than min-in-sync members.

pub mod membership;
pub mod metrics;
pub mod policy;
mod replica_client;
pub mod replica_io;
pub mod scrub;
pub mod static_membership;
mod volume;

use ballast_types::{ChunkIdx, Epoch, NodeId, VolumeId};

pub use membership::{Attachment, EjectReason, Membership, MembershipError, Replica, ReplicaSet, VolumeLayout};
pub use metrics::{VolumeMetrics, VolumeSeries};
pub use replica_client::tcp_connector;
pub use replica_io::{ReplicaError, ReplicaIo};
pub use scrub::{scrub_periodically, ScrubConfig, ScrubOptions, ScrubReport};
pub use static_membership::{StaticConfig, StaticMembership};
pub use volume::{join_all, TakenSnapshot, Volume, VolumeOptions, VolumeStats};

/// Why attaching or reconfiguring a volume failed. (Block I/O errors are
/// [`ballast_blockdev::BlockError`]s.)
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("{node} holds epoch {epoch} or newer: another front end owns the volume")]
    Fenced { node: NodeId, epoch: Epoch },
    #[error("removing {node} from chunk {chunk} would leave {remaining} in-sync replicas, below the minimum of {min}")]
    BelowMinInSync { chunk: ChunkIdx, node: NodeId, remaining: usize, min: usize },
    #[error("layout of {volume} is unusable: {message}")]
    Layout { volume: VolumeId, message: String },
    #[error("reconciling chunk {chunk} failed: {message}")]
    Reconcile { chunk: ChunkIdx, message: String },
    #[error("{0} is stopped (closed, or fenced by a newer front end)")]
    Stopped(VolumeId),
    /// The volume's snapshot cuts could not be installed at attach (a node
    /// that failed could not be ejected either).
    #[error("installing the snapshot cuts of {volume}: {message}")]
    Snapshots { volume: VolumeId, message: String },
    /// A layout was applied, but for `chunks` an ejection had meanwhile
    /// committed a newer set naming members not installed yet: apply a newer
    /// layout. `installed` chunks did change.
    #[error("layout of {volume} is older than the sets of chunks {chunks:?} ({installed} other chunks changed): apply a newer layout")]
    LayoutOutdated { volume: VolumeId, chunks: Vec<ChunkIdx>, installed: u64 },
}
