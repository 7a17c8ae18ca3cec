//! Who holds which chunk, and the two durable decisions the front end needs from
//! the configuration master: "bump my epoch" (attach) and "remove this replica
//! from that chunk's in-sync set" (eject).
//!
//! The data path never asks for anything else, so a Raft-backed implementation
//! (in the binary, which may link openraft) replaces [`crate::StaticMembership`]
//! without touching this crate. Neither call is on the fast path: attach runs
//! once, eject only when a replica fails.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;

use ballast_types::{ChunkIdx, Epoch, NodeId, Seq, VolumeId, Zone};
use serde::{Deserialize, Serialize};

/// A storage node that holds replicas of the volume's chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub zone: Zone,
}

/// Why a replica left a chunk's in-sync set. Persisted by membership providers
/// (kebab-case names), so variants are only ever added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EjectReason {
    /// The node could not be reached (or refused the epoch) at attach.
    AttachUnreachable,
    /// A request to the replica timed out.
    Timeout,
    /// The connection failed (refused, reset, closed, malformed reply).
    Transport,
    /// The replica answered with an error about its own state (I/O error, no
    /// space, shut down, lost epoch).
    ReplicaError,
    /// Its copy could not be repaired (a read repair or a reconciliation write failed).
    RepairFailed,
}

impl fmt::Display for EjectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EjectReason::AttachUnreachable => "unreachable at attach",
            EjectReason::Timeout => "timeout",
            EjectReason::Transport => "transport error",
            EjectReason::ReplicaError => "replica error",
            EjectReason::RepairFailed => "repair failed",
        })
    }
}

/// One chunk's replica set as committed by the membership provider.
///
/// - `in_sync`: replicas that hold every acknowledged write. Reads go to one of
///   them; every write, trim, write-zeroes and flush must succeed on all of them
///   (or they are ejected first) before it is acknowledged.
/// - `rebuilding`: replicas being filled in by a background copy (docs/DESIGN.md
///   5.3 "Copy jobs": a resync after an eject, or a rebuild on a
///   new node). They receive every write, trim, write-zeroes and flush, but are
///   never read from, never count towards `min_in_sync`, and their failure never
///   fails a client request (they are ejected instead). The provider moves one
///   to `in_sync` (a new version) once the copy has caught up.
/// - `ejected`: replicas that left the set because they failed, with the reason.
///
/// Invariants (kept by providers and checked by the front end): `in_sync` never
/// has fewer than the volume's `min_in_sync` members; `in_sync` and `rebuilding`
/// are disjoint; `version` increments on every change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSet {
    pub version: u64,
    pub in_sync: Vec<NodeId>,
    pub rebuilding: Vec<NodeId>,
    pub ejected: Vec<(NodeId, EjectReason)>,
}

impl ReplicaSet {
    /// True if `node` is in the in-sync set (may be read from).
    pub fn contains(&self, node: NodeId) -> bool {
        self.in_sync.contains(&node)
    }

    /// True if `node` is being rebuilt (receives writes, is not read from).
    pub fn is_rebuilding(&self, node: NodeId) -> bool {
        self.rebuilding.contains(&node)
    }

    /// True if `node` receives this chunk's writes (in sync or rebuilding).
    pub fn is_member(&self, node: NodeId) -> bool {
        self.contains(node) || self.is_rebuilding(node)
    }

    /// The replicas a write goes to: the in-sync ones, then the rebuilding ones.
    pub fn write_targets(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.in_sync.iter().chain(&self.rebuilding).copied()
    }
}

/// Everything the front end needs to know about a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeLayout {
    pub volume: VolumeId,
    pub name: String,
    /// Bytes; a multiple of `BLOCK_SIZE`. The last chunk may be partial.
    pub size: u64,
    /// Bytes per chunk; a multiple of `BLOCK_SIZE`.
    pub chunk_size: u64,
    pub min_in_sync: usize,
    pub nodes: Vec<Replica>,
    /// Index = `ChunkIdx`; `ceil(size / chunk_size)` entries.
    pub chunks: Vec<ReplicaSet>,
}

impl VolumeLayout {
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// The length of chunk `idx` (the last one may be shorter).
    pub fn chunk_len(&self, idx: ChunkIdx) -> u64 {
        let start = u64::from(idx.0) * self.chunk_size;
        self.chunk_size.min(self.size.saturating_sub(start))
    }

    pub fn node(&self, id: NodeId) -> Option<&Replica> {
        self.nodes.iter().find(|n| n.node == id)
    }
}

/// The result of an attach: the new epoch (already durable) and the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub epoch: Epoch,
    pub layout: VolumeLayout,
    /// The volume's snapshot cuts, ascending ([`Membership::set_snapshots`]):
    /// the front end installs them on every replica node before its first write.
    pub snapshots: Vec<Seq>,
    /// A clone's chunks not copied from its source yet (empty: not a clone,
    /// or one that is independent already): the front end fills each from
    /// [`Membership::read_parent`] before any I/O to it, and in the
    /// background ([`Membership::chunks_filled`]).
    pub unfilled: Vec<ChunkIdx>,
}

/// Why a membership call failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("unknown volume {0}")]
    UnknownVolume(VolumeId),
    #[error("volume {volume} has no chunk {chunk}")]
    UnknownChunk { volume: VolumeId, chunk: ChunkIdx },
    #[error("ejecting {node} from chunk {chunk} would leave {remaining} in-sync replicas, below the minimum of {min}")]
    BelowMinInSync { chunk: ChunkIdx, node: NodeId, remaining: usize, min: usize },
    #[error("membership config {path}: {message}")]
    Config { path: String, message: String },
    #[error("membership state {op} {path}: {source}")]
    Io { op: &'static str, path: String, source: std::io::Error },
    #[error("membership service unavailable: {0}")]
    Unavailable(String),
    /// A definite no that retrying will not change (an attach by a node the
    /// volume is not published to): the change was not made.
    #[error("membership service refused: {0}")]
    Refused(String),
}

/// The configuration master as seen by a volume's front end.
pub trait Membership: Send + Sync + 'static {
    /// Bumps the volume's epoch durably and returns it with the current layout.
    fn attach(&self, volume: VolumeId) -> impl Future<Output = Result<Attachment, MembershipError>> + Send;

    /// Durably removes `node` from `chunk`'s in-sync set, or from its
    /// rebuilding set, if the set is still at `version`; returns the resulting
    /// set (also when someone else already changed it: the caller looks at the
    /// returned set, not at the call's success). Refuses with
    /// [`MembershipError::BelowMinInSync`] rather than leaving fewer than
    /// `min_in_sync` in-sync members (removing a rebuilding member never does).
    fn eject(
        &self,
        volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        node: NodeId,
        reason: EjectReason,
    ) -> impl Future<Output = Result<ReplicaSet, MembershipError>> + Send;

    /// Durably records the volume's snapshot cuts (all of them, ascending),
    /// if the front end attached at `epoch` still holds the volume. The
    /// default refuses: a provider that does not store snapshots.
    fn set_snapshots(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        cuts: Vec<Seq>,
    ) -> impl Future<Output = Result<(), MembershipError>> + Send {
        let _ = (epoch, cuts);
        async move {
            Err(MembershipError::Refused(format!("volume {volume}: this membership provider does not store snapshots")))
        }
    }

    /// Reads `len` bytes at `offset` of a clone's source (the snapshot it was
    /// created from). The default refuses: a provider without clones never
    /// names unfilled chunks.
    fn read_parent(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<bytes::Bytes, MembershipError>> + Send {
        let _ = (offset, len);
        async move { Err(MembershipError::Refused(format!("volume {volume}: this membership provider has no clones"))) }
    }

    /// Durably records that the front end attached at `epoch` copied `chunks`
    /// of a clone from its source (and flushed them): a later attach does not
    /// copy them again, so client writes to them are never overwritten.
    fn chunks_filled(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        chunks: Vec<ChunkIdx>,
    ) -> impl Future<Output = Result<(), MembershipError>> + Send {
        let _ = (epoch, chunks);
        async move { Err(MembershipError::Refused(format!("volume {volume}: this membership provider has no clones"))) }
    }
}

impl<M: Membership> Membership for std::sync::Arc<M> {
    fn attach(&self, volume: VolumeId) -> impl Future<Output = Result<Attachment, MembershipError>> + Send {
        (**self).attach(volume)
    }

    fn eject(
        &self,
        volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        node: NodeId,
        reason: EjectReason,
    ) -> impl Future<Output = Result<ReplicaSet, MembershipError>> + Send {
        (**self).eject(volume, chunk, version, node, reason)
    }

    fn set_snapshots(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        cuts: Vec<Seq>,
    ) -> impl Future<Output = Result<(), MembershipError>> + Send {
        (**self).set_snapshots(volume, epoch, cuts)
    }

    fn read_parent(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<bytes::Bytes, MembershipError>> + Send {
        (**self).read_parent(volume, offset, len)
    }

    fn chunks_filled(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        chunks: Vec<ChunkIdx>,
    ) -> impl Future<Output = Result<(), MembershipError>> + Send {
        (**self).chunks_filled(volume, epoch, chunks)
    }
}
