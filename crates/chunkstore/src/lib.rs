//! ballast-chunkstore: one disk's worth of chunk replicas.
//!
//! It owns the bytes on one local disk: a sparse data file and a memory-mapped
//! context file per chunk, per-volume epochs (fencing), per-chunk dirty marks, and
//! the single io_uring (with its own thread) that all data I/O goes through.
//!
//! It must not depend on the network, on other Ballast crates beyond
//! `ballast-types` and `ballast-metrics` (Prometheus counters: atomics), nor on
//! tonic / openraft / redb: it is the bottom of the data path, and a metadata
//! election must never be able to stall it.
//!
//! ```text
//!   replica server (tokio tasks)
//!        │ write/read/trim/flush(id, offset, .., seq|epoch)
//!        ▼
//!   ChunkStore ── fence check (per-volume RwLock<Epoch>, held across the I/O)
//!        │       ── block range lock ── dirty mark (durable before 1st write after flush)
//!        │       ── crc32 per 4 KiB block, new context → INACTIVE slot (mmap store)
//!        ▼
//!   Ring ──mpsc──► ring thread ──io_uring (O_DIRECT)──► chunks/*.data
//!        ◄─oneshot─┘                                   chunks/*.ctx  (mmap, fdatasync on flush)
//!                                                      epochs/*.epoch (tmp+fsync+rename+fsync dir)
//! ```
//!
//! # Guarantees
//! - A read returns data that verifies against one of the block's two context
//!   slots, or [`StoreError::ChecksumMismatch`]; never unverified bytes.
//! - Torn-write safety without a journal: a write stores the new {crc, seq} in the
//!   block's inactive slot before its data is written, and overlapping writes are
//!   serialized, so after a process crash every block matches one of its slots.
//!   Power loss is covered for everything before the last completed flush; blocks
//!   written after it may fail verification (their chunk is marked dirty, and the
//!   front end reconciles dirty chunks at the next attach).
//! - Resync never undoes a newer write: [`ChunkStore::resync_write`] decides per
//!   block, under the block range lock, whether the source's older-or-newer copy
//!   may replace what is here.
//! - Fencing: once `announce_epoch(v, e)` has returned, no operation carrying an
//!   older epoch changes data of volume `v` (data ops hold the volume's epoch lock
//!   shared across their I/O; announce takes it exclusively). Epochs survive restart.
//! - A chunk's dirty mark is durable before the first write after a flush starts,
//!   and is cleared only by a flush that covered every write started before it.
//!
//! The on-disk layout is documented in [`layout`], next to its encoders and
//! golden-bytes tests.

mod aligned;
mod ctxmap;
pub mod layout;
pub mod metrics;
mod rangelock;
mod ring;
mod store;

use std::path::PathBuf;

use ballast_types::{BlockIdx, ChunkId, Epoch, Seq, VolumeId};

pub use metrics::{DiskMetrics, StoreMetrics};
pub use store::{ChunkStore, SnapshotSpace, StoreSpace};

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Use O_DIRECT for chunk data. Where the filesystem refuses it (tmpfs), the
    /// store falls back to buffered I/O and logs one warning. Default: true.
    pub direct_io: bool,
    /// Most I/Os in flight on the ring at once. Default: 256.
    pub queue_depth: u32,
    /// How long the ring thread busy-polls (its channel and completion queue)
    /// after its last activity before it sleeps, only while at most two I/Os are
    /// in flight. Saves the two thread wake-ups per I/O at low queue depth, for up
    /// to one core of CPU while such I/O goes on. Zero: never poll. Default: 500 µs
    /// (covers a device round trip plus the caller's turnaround).
    pub poll: std::time::Duration,
    /// Where the store records its operations ([`StoreMetrics::disk`]); None:
    /// no metrics. Default: None.
    pub metrics: Option<DiskMetrics>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { direct_io: true, queue_depth: 256, poll: std::time::Duration::from_micros(500), metrics: None }
    }
}

/// One chunk replica held by the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    pub id: ChunkId,
    pub size: u64,
    /// Written since the last completed flush (persistent across restart).
    pub dirty: bool,
}

/// One block of a [`ChunkStore::resync_write`]: what the source replica holds
/// for it. The seqs are the source's original ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResyncBlock {
    /// Leave the block alone (source and target already agree on it).
    Keep,
    /// The source's data for this block (its 4096 bytes are the next ones of the
    /// request's data), written with the source's seq.
    Data(Seq),
    /// The block reads as zeros on the source (trimmed, zeroed or never written)
    /// with this seq: punched here.
    Zero(Seq),
}

impl ResyncBlock {
    /// The incoming seq (`Seq::ZERO` for `Keep`).
    pub fn seq(&self) -> Seq {
        match *self {
            ResyncBlock::Keep => Seq::ZERO,
            ResyncBlock::Data(s) | ResyncBlock::Zero(s) => s,
        }
    }
}

/// What a resync write did, in blocks. `Keep` entries count nowhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResyncOutcome {
    /// Data blocks written.
    pub written: u32,
    /// Blocks punched to zeros.
    pub zeroed: u32,
    /// Blocks left alone because this replica's copy was newer (see the rule at
    /// [`ChunkStore::resync_write`]).
    pub skipped: u32,
}

/// Why a store operation failed. Grouped by what the caller should do:
/// never retry (`Fenced`, `UnannouncedEpoch` until announced, the caller's
/// mistakes), repair from another replica (`ChecksumMismatch`), report (`NoSpace`,
/// `Io`), give up (`Shutdown`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request's epoch is older than the volume's announced epoch.
    #[error("{volume}: request epoch {request} is fenced (current epoch {current})")]
    Fenced { volume: VolumeId, request: Epoch, current: Epoch },
    /// The request's epoch is newer than the announced one: announce it first.
    #[error("{volume}: request epoch {request} was never announced (current epoch {current})")]
    UnannouncedEpoch { volume: VolumeId, request: Epoch, current: Epoch },
    #[error("no such chunk: {0}")]
    NoSuchChunk(ChunkId),
    #[error("chunk {id} exists with size {existing}, not {size}")]
    ChunkExists { id: ChunkId, size: u64, existing: u64 },
    #[error("chunk {id}: request [{offset}, +{len}) is past its end ({size} bytes)")]
    OutOfRange { id: ChunkId, offset: u64, len: u64, size: u64 },
    #[error("request [{offset}, +{len}) is not aligned to 4096-byte blocks")]
    Misaligned { offset: u64, len: u64 },
    #[error("chunk {id}: block {block} fails its checksum")]
    ChecksumMismatch { id: ChunkId, block: BlockIdx },
    #[error("no space left on device during {op} of {}", path.display())]
    NoSpace { op: &'static str, path: PathBuf },
    #[error("I/O error during {op} of {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store's filesystem allocates in blocks smaller than the store's
    /// 4096: a write cut short by a full disk could end inside a block, leaving
    /// it torn (neither its old nor its new context matches). Refused at open.
    #[error(
        "{}: the filesystem allocates in {fs_block}-byte blocks; the chunk store needs at least 4096          (a write cut short by a full disk would tear blocks): make it with 4096-byte blocks (mkfs.ext4 -b 4096)",
        dir.display()
    )]
    SmallFsBlocks { dir: PathBuf, fs_block: u64 },
    /// The request contradicts itself (e.g. a resync write's data length vs its entries).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("chunk store is shut down")]
    Shutdown,
}

impl StoreError {
    /// Classifies an OS error: ENOSPC / EDQUOT become `NoSpace`, the rest `Io`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, e: std::io::Error) -> StoreError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace { op, path: path.into() },
            _ => StoreError::Io { op, path: path.into(), source: e },
        }
    }
}
