//! [`ReplicaIo`]: what the front end needs from a connection to one replica
//! node, and [`ReplicaError`]: the replies it must tell apart.
//!
//! The front end is generic over this trait. Production uses
//! `ballast_replica::ReplicaClient` (the wire protocol over TCP); tests plug in
//! fakes that fail, hang, corrupt or record on command.
//!
//! The error is classified here, once, by what the front end does about it
//! (see [`ReplicaError`]), so the policy code never inspects transport details.

use std::future::Future;

use ballast_types::{BlockContext, BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;

/// A failed replica request, grouped by the front end's reaction.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// The replica knows a newer epoch: another front end attached. Stop
    /// serving; eject nobody.
    #[error("fenced by a newer epoch: {0}")]
    Fenced(String),
    /// The chunk was never created there (lazy allocation): create it (write)
    /// or read zeros (when every replica says so).
    #[error("no such chunk")]
    NoSuchChunk,
    /// A create raced with another; the chunk is there.
    #[error("chunk already exists")]
    ChunkExists,
    /// The request itself is wrong (out of range, misaligned, malformed): fail
    /// the I/O with EINVAL; the replica is fine.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The replica's copy failed its checksum: read elsewhere, repair this one.
    #[error("checksum mismatch: {0}")]
    ChecksumMismatch(String),
    /// No reply in time: eject.
    #[error("{op} timed out")]
    Timeout { op: &'static str },
    /// The connection failed: eject.
    #[error("transport: {0}")]
    Transport(String),
    /// The replica reported a failure of its own (I/O error, shut down, epoch
    /// not announced): eject.
    #[error("replica failure: {0}")]
    Failed(String),
    /// The replica's disk is full: eject it while enough copies remain; when
    /// too few would, the write fails with ENOSPC (the disks filled before the
    /// thin volume did), never EIO.
    #[error("no space left on the replica's disk: {0}")]
    NoSpace(String),
}

/// One replica node's data-path operations. Cheap to clone (shares connections).
pub trait ReplicaIo: Clone + Send + Sync + 'static {
    fn write(
        &self,
        id: ChunkId,
        offset: u64,
        data: Bytes,
        seq: Seq,
        fua: bool,
    ) -> impl Future<Output = Result<(), ReplicaError>> + Send;
    fn read(
        &self,
        id: ChunkId,
        offset: u64,
        len: u32,
        epoch: Epoch,
    ) -> impl Future<Output = Result<Bytes, ReplicaError>> + Send;
    /// Makes every prior write to any chunk of `volume` durable; clears dirty marks.
    fn flush(&self, volume: VolumeId, epoch: Epoch) -> impl Future<Output = Result<(), ReplicaError>> + Send;
    fn flush_chunk(&self, id: ChunkId, epoch: Epoch) -> impl Future<Output = Result<(), ReplicaError>> + Send;
    fn trim(
        &self,
        id: ChunkId,
        offset: u64,
        len: u64,
        seq: Seq,
    ) -> impl Future<Output = Result<(), ReplicaError>> + Send;
    fn write_zeroes(
        &self,
        id: ChunkId,
        offset: u64,
        len: u64,
        seq: Seq,
    ) -> impl Future<Output = Result<(), ReplicaError>> + Send;
    fn context_table(
        &self,
        id: ChunkId,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> impl Future<Output = Result<Vec<BlockContext>, ReplicaError>> + Send;
    fn create_chunk(
        &self,
        id: ChunkId,
        size: u64,
        epoch: Epoch,
    ) -> impl Future<Output = Result<(), ReplicaError>> + Send;
    fn delete_chunk(&self, id: ChunkId, epoch: Epoch) -> impl Future<Output = Result<(), ReplicaError>> + Send;
    /// Returns the node's epoch for the volume after the announce (higher than
    /// `epoch` when a newer front end exists).
    fn announce_epoch(
        &self,
        volume: VolumeId,
        epoch: Epoch,
    ) -> impl Future<Output = Result<Epoch, ReplicaError>> + Send;
    fn list_dirty(
        &self,
        volume: VolumeId,
        epoch: Epoch,
    ) -> impl Future<Output = Result<Vec<ChunkIdx>, ReplicaError>> + Send;
    fn ping(&self) -> impl Future<Output = Result<(), ReplicaError>> + Send;

    /// Replaces the volume's snapshot cuts on the node (all of them,
    /// ascending). The default refuses: a replica without snapshot layers.
    fn set_cuts(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        cuts: &[Seq],
    ) -> impl Future<Output = Result<(), ReplicaError>> + Send {
        let _ = (volume, epoch, cuts);
        async { Err(ReplicaError::Invalid("this replica has no snapshot layers".into())) }
    }

    /// Reads `len` bytes at `offset` of the chunk's view at snapshot `cut`;
    /// `NoSuchChunk` when the node did not hold the chunk at the cut. The
    /// default refuses, as for `set_cuts`.
    fn read_snapshot(
        &self,
        id: ChunkId,
        cut: Seq,
        offset: u64,
        len: u32,
        epoch: Epoch,
    ) -> impl Future<Output = Result<Bytes, ReplicaError>> + Send {
        let _ = (id, cut, offset, len, epoch);
        async { Err(ReplicaError::Invalid("this replica has no snapshot layers".into())) }
    }

    /// Block contexts of `count` blocks from `first` in the chunk's view at
    /// snapshot `cut` (zeros for blocks no layer of the view holds). The
    /// default refuses, as for `set_cuts`.
    fn context_table_at(
        &self,
        id: ChunkId,
        cut: Seq,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> impl Future<Output = Result<Vec<BlockContext>, ReplicaError>> + Send {
        let _ = (id, cut, first, count, epoch);
        async { Err(ReplicaError::Invalid("this replica has no snapshot layers".into())) }
    }

    /// Rewrites the chunk's view at snapshot `cut` over the blocks from
    /// `offset` with another replica's verified copy: `contexts[i]` is the
    /// source's context of block `offset / 4096 + i` and `data` its bytes,
    /// block after block. Each block written in the source's view is written
    /// with the source's seq into the layer of this view that seq belongs in;
    /// blocks the source's view never wrote are left alone. Only the view at
    /// the cut changes (versions below a cut are never a client's to change
    /// any more). The default refuses, as for `set_cuts`.
    fn repair_snapshot(
        &self,
        id: ChunkId,
        cut: Seq,
        offset: u64,
        contexts: &[BlockContext],
        data: Bytes,
        epoch: Epoch,
    ) -> impl Future<Output = Result<(), ReplicaError>> + Send {
        let _ = (id, cut, offset, contexts, data, epoch);
        async { Err(ReplicaError::Invalid("this replica has no snapshot layers".into())) }
    }
}
