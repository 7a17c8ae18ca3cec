//! ballast-resync: the copy engine of rejoin and rebuild (docs/DESIGN.md, 5.3 "Copy jobs:
//! resync and rebuild end to end"). It fills a chunk replica that returns after an ejection
//! (resync) or is new on another node (rebuild) from an in-sync source replica,
//! WHILE the volume's front end keeps writing to it: the caller has already added
//! the target to the chunk's write targets as "rebuilding" before calling
//! [`resync_chunk`], and puts it back in the in-sync set once this returns Ok.
//!
//! It depends only on the replica client, the wire codec and the shared types;
//! never on tonic, openraft or redb, so a meta election cannot stall a copy that
//! needs no membership change.
//!
//! ```text
//!   per batch of blocks (several batches in flight, throttled by copied bytes):
//!   source ── context_table ──┐
//!   target ── context_table ──┴─► compare (seq, crc) ─► differing blocks
//!   source ── read (runs of data blocks) ──► data
//!   source ── context_table again ──► blocks that changed meanwhile: next round
//!   target ◄── ResyncWrite{per block: Keep | Data(seq) | Zero(seq), data} ──┘
//!             (applied per block under the target's range lock, only where it
//!              cannot undo a newer write)
//!   at the end: target ── flush
//! ```
//!
//! # Why copying while the front end writes is safe
//! The copier may read block B at seq s1 from the source while the front end
//! writes B at s2 > s1 to both source and target. The copy carries s1 (the
//! source's ORIGINAL seq) and the target applies it only if its own copy of B is
//! older than s1 (or older than the protect-from boundary, see
//! [`ResyncOptions::protect_from`]), deciding under the same lock as normal
//! writes. So whichever arrives first, the target ends with s2. Data is labelled
//! with a seq only when the source's context for the block was the same before
//! and after the read and the data's crc matches it, so a copy never carries
//! data under another write's seq.

mod batch;
mod throttle;

use std::sync::Arc;

use ballast_replica::{ClientError, ReplicaClient, MAX_RESYNC_BLOCKS};
use ballast_types::{ChunkId, Epoch, Seq, BLOCK_SIZE_U64};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::batch::Batch;
use crate::throttle::Throttle;

/// Copy rounds at most (see `run`): each one copies the views of snapshots
/// taken during the one before.
const MAX_VIEW_ROUNDS: u32 = 4;

/// Tuning of one [`resync_chunk`] call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncOptions {
    /// Blocks compared per batch (one context-table request per replica) and at
    /// most copied per ResyncWrite request. 1..=4096. Default 256 (1 MiB).
    pub batch_blocks: u32,
    /// Cap on copied data, in bytes per second, over all batches of this call;
    /// `None` copies as fast as the replicas answer. Default `None`.
    pub max_bytes_per_sec: Option<u64>,
    /// Batches in flight at once. At least 1. Default 4.
    pub concurrency: usize,
    /// The protect-from counter: target blocks whose seq is at least
    /// `Seq{epoch, protect_from}` may be concurrent front-end writes and are
    /// replaced only by a newer seq; older target blocks that differ from the
    /// source are replaced by the source's copy, since the in-sync source has
    /// every acknowledged write (a target-only block there is a write that was
    /// never acknowledged). Use the counter of the first write the front end sent
    /// to the target as a rebuilding replica, or 0 (every write of this epoch
    /// protected). Default 0.
    pub protect_from: u64,
    /// Times a batch re-copies blocks that changed on the source while they were
    /// being copied. Blocks still changing after that are left to the front end's
    /// writes, which reach the target too (counted in [`ResyncStats::blocks_busy`]).
    /// Default 3.
    pub max_retries: u32,
}

impl Default for ResyncOptions {
    fn default() -> Self {
        ResyncOptions { batch_blocks: 256, max_bytes_per_sec: None, concurrency: 4, protect_from: 0, max_retries: 3 }
    }
}

impl ResyncOptions {
    /// Checks the fields against each other and the protocol's limits.
    pub fn validate(&self) -> Result<(), ResyncError> {
        if self.batch_blocks == 0 || self.batch_blocks > MAX_RESYNC_BLOCKS {
            return Err(ResyncError::InvalidArgument(format!(
                "batch-blocks must be 1..={MAX_RESYNC_BLOCKS}, not {}",
                self.batch_blocks
            )));
        }
        if self.concurrency == 0 {
            return Err(ResyncError::InvalidArgument("concurrency must be at least 1".into()));
        }
        if self.max_bytes_per_sec == Some(0) {
            return Err(ResyncError::InvalidArgument("max-bytes-per-sec must be positive when set".into()));
        }
        Ok(())
    }
}

/// What a resync did, in blocks (4096 bytes) unless named otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncStats {
    /// Blocks whose contexts were compared (each block of the chunk once).
    pub blocks_compared: u64,
    /// Data blocks the target wrote.
    pub blocks_copied: u64,
    /// Blocks the target punched because they read as zeros on the source.
    pub blocks_trimmed: u64,
    /// Blocks left alone because the target's copy was newer when compared (a
    /// concurrent front-end write that reached the target first).
    pub blocks_skipped_newer: u64,
    /// Blocks the target refused when the copy arrived, because a newer
    /// front-end write landed between the compare and the apply: the race the
    /// target's conditional write exists for.
    pub blocks_raced: u64,
    /// Blocks that kept changing on the source during the copy; the front end's
    /// writes bring them to the target.
    pub blocks_busy: u64,
    /// Data bytes sent to the target (blocks offered, whether applied or not).
    pub bytes_copied: u64,
    /// Copies the throttle held up ([`ResyncOptions::max_bytes_per_sec`]).
    pub throttle_waits: u64,
    /// Time they were held up, summed over the batches (which run
    /// concurrently: the sum may exceed the wall time).
    pub throttled: std::time::Duration,
}

impl ResyncStats {
    fn add(&mut self, o: &ResyncStats) {
        self.blocks_compared += o.blocks_compared;
        self.blocks_copied += o.blocks_copied;
        self.blocks_trimmed += o.blocks_trimmed;
        self.blocks_skipped_newer += o.blocks_skipped_newer;
        self.blocks_raced += o.blocks_raced;
        self.blocks_busy += o.blocks_busy;
        self.bytes_copied += o.bytes_copied;
        self.throttle_waits += o.throttle_waits;
        self.throttled += o.throttled;
    }
}

/// Progress, reported after each batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Blocks of the chunk whose batch has completed.
    pub blocks_done: u64,
    pub blocks_total: u64,
    /// Totals so far.
    pub stats: ResyncStats,
}

/// Which replica an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// Why a resync stopped. Grouped by what the caller should do: `Fenced` — the
/// volume was attached again: get the new epoch and start over; `Replica` — look
/// at [`ClientError::is_retryable`] (transport trouble: retry; a checksum error
/// on the source: pick another source); `InvalidArgument` — fix the call.
/// A resync that stopped part-way left the target consistent block by block; a
/// new call continues where the contexts still differ.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// A replica knows a newer epoch than the resync's: never retry with this one.
    #[error("fenced: the {side} replica refuses epoch {epoch}: {message}")]
    Fenced { side: Side, epoch: Epoch, message: String },
    #[error("{op} on the {side} replica failed: {source}")]
    Replica {
        side: Side,
        op: &'static str,
        #[source]
        source: ClientError,
    },
    #[error("invalid resync request: {0}")]
    InvalidArgument(String),
    /// Snapshots kept being taken while the views were copied (a new cut in
    /// every one of `rounds` rounds); retry later.
    #[error("snapshot cuts kept changing during {rounds} copy rounds")]
    CutsChanging { rounds: u32 },
    /// The runtime is shutting down under the copy.
    #[error("resync cancelled: the runtime is shutting down")]
    Cancelled,
}

impl ResyncError {
    /// Wraps a replica call's error, naming fencing on its own.
    pub(crate) fn replica(side: Side, op: &'static str, epoch: Epoch, e: ClientError) -> ResyncError {
        if e.is_fenced() {
            let message = match &e {
                ClientError::Remote { message, .. } => message.clone(),
                other => other.to_string(),
            };
            return ResyncError::Fenced { side, epoch, message };
        }
        ResyncError::Replica { side, op, source: e }
    }

    /// The volume was attached again under a newer epoch.
    pub fn is_fenced(&self) -> bool {
        matches!(self, ResyncError::Fenced { .. })
    }
}

/// Copies chunk `id` (of `chunk_len` bytes) from the in-sync `source` to `target`
/// under attach epoch `epoch`, copying only the blocks whose (seq, crc) contexts
/// differ, while the front end may keep writing to both.
///
/// In order: announces `epoch` to the target (announce only raises; the source
/// is never announced to: its epoch is the front end's business), creates the
/// chunk on the target (idempotent), compares and copies batch by batch
/// (`opts.concurrency` in flight, throttled): first the view at every snapshot
/// cut both replicas keep, oldest first, then the live data; then flushes the
/// target's chunk.
/// `progress` is called after each batch, from this task.
///
/// A block the source never had (or has lost with its whole chunk) counts as
/// zeros at `Seq::ZERO`. Errors stop the copy; see [`ResyncError`].
pub async fn resync_chunk(
    source: &ReplicaClient,
    target: &ReplicaClient,
    id: ChunkId,
    chunk_len: u64,
    epoch: Epoch,
    opts: &ResyncOptions,
    progress: impl Fn(Progress),
) -> Result<ResyncStats, ResyncError> {
    let span = tracing::info_span!(
        "resync_chunk",
        volume = id.volume.0,
        chunk = id.chunk.0,
        epoch = epoch.0,
        source = %source.addr(),
        target = %target.addr(),
    );
    run(source, target, id, chunk_len, epoch, opts, progress).instrument(span).await
}

async fn run(
    source: &ReplicaClient,
    target: &ReplicaClient,
    id: ChunkId,
    chunk_len: u64,
    epoch: Epoch,
    opts: &ResyncOptions,
    progress: impl Fn(Progress),
) -> Result<ResyncStats, ResyncError> {
    opts.validate()?;
    if chunk_len == 0 || !chunk_len.is_multiple_of(BLOCK_SIZE_U64) || chunk_len / BLOCK_SIZE_U64 > u64::from(u32::MAX) {
        return Err(ResyncError::InvalidArgument(format!(
            "chunk length {chunk_len} is not a positive whole number of blocks"
        )));
    }
    let blocks = (chunk_len / BLOCK_SIZE_U64) as u32;
    info!(blocks, "resync started");
    target
        .announce_epoch(id.volume, epoch)
        .await
        .map_err(|e| ResyncError::replica(Side::Target, "announce", epoch, e))?;
    target
        .create_chunk(id, chunk_len, epoch)
        .await
        .map_err(|e| ResyncError::replica(Side::Target, "create chunk", epoch, e))?;
    let throttle =
        opts.max_bytes_per_sec.map(|r| Arc::new(Throttle::new(r, u64::from(opts.batch_blocks) * BLOCK_SIZE_U64)));
    let mut total = ResyncStats::default();
    // Rounds: every view bottom-up, then the live one (the chunk store's
    // `resync_write_at` says why that order rebuilds every view). A snapshot
    // taken during a round reaches both replicas, and from then on they freeze
    // alike; but blocks the round had not copied yet are missing from the new
    // view on the target (the front end's next write freezes the target's
    // stale version there). So the cuts are listed again after each round and
    // the views that appeared are copied in another round (and the live view
    // once more, which finds little left). Invariant: when this returns Ok,
    // every cut both replicas keep was listed before a round that copied its
    // view began (the listing after the last round found none new), so the
    // target holds the source's view at every one of them.
    let mut copied: Vec<Seq> = Vec::new();
    let mut views_total = 0;
    for round in 0u32.. {
        let views = views(source, target, id, epoch).await?;
        let new: Vec<Seq> = views.iter().copied().filter(|c| !copied.contains(c)).collect();
        if round > 0 && new.is_empty() {
            break;
        }
        if round == MAX_VIEW_ROUNDS {
            return Err(ResyncError::CutsChanging { rounds: MAX_VIEW_ROUNDS });
        }
        if round > 0 {
            info!(round, new = new.len(), "snapshots taken during the copy: copying their views");
        }
        let passes: Vec<Option<Seq>> = new.iter().copied().map(Some).chain([None]).collect();
        // A later round re-checks a chunk already copied once: reported as done.
        let report = |p: Progress| progress(if round == 0 { p } else { Progress { blocks_done: p.blocks_total, ..p } });
        copy_passes(source, target, id, blocks, epoch, opts, &throttle, &passes, &mut total, &report).await?;
        views_total += new.len();
        copied.extend(new);
    }
    target.flush_chunk(id, epoch).await.map_err(|e| ResyncError::replica(Side::Target, "flush", epoch, e))?;
    info!(
        views = views_total,
        compared = total.blocks_compared,
        copied = total.blocks_copied,
        trimmed = total.blocks_trimmed,
        skipped_newer = total.blocks_skipped_newer,
        raced = total.blocks_raced,
        busy = total.blocks_busy,
        bytes = total.bytes_copied,
        throttle_waits = total.throttle_waits,
        throttled = ?total.throttled,
        "resync finished"
    );
    Ok(total)
}

/// Copies each of `passes` (a view at a cut, or `None`: the live one) over the
/// whole chunk, batch by batch; adds to `total` and reports progress.
#[allow(clippy::too_many_arguments)]
async fn copy_passes(
    source: &ReplicaClient,
    target: &ReplicaClient,
    id: ChunkId,
    blocks: u32,
    epoch: Epoch,
    opts: &ResyncOptions,
    throttle: &Option<Arc<Throttle>>,
    passes: &[Option<Seq>],
    total: &mut ResyncStats,
    progress: &impl Fn(Progress),
) -> Result<(), ResyncError> {
    let mut done = 0u64;
    for (pass, view) in passes.iter().enumerate() {
        if let Some(cut) = view {
            debug!(%cut, "copying the view at a snapshot cut");
        }
        let mut tasks = JoinSet::new();
        let mut next = 0u32;
        loop {
            while next < blocks && tasks.len() < opts.concurrency {
                let count = opts.batch_blocks.min(blocks - next);
                let b = Batch {
                    source: source.clone(),
                    target: target.clone(),
                    id,
                    view: *view,
                    first: next,
                    count,
                    epoch,
                    protect_from: opts.protect_from,
                    max_retries: opts.max_retries,
                    throttle: throttle.clone(),
                };
                tasks.spawn(b.run().instrument(tracing::Span::current()));
                next += count;
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            // On an error the JoinSet is dropped on return, which aborts the other
            // batches; whatever they already applied is consistent block by block.
            let (count, stats) = match joined {
                Ok(r) => r?,
                // A batch that panicked: a bug, not a replica's fault; let it show.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return Err(ResyncError::Cancelled),
            };
            total.add(&stats);
            done += u64::from(count);
            debug!(pass, done, total = u64::from(blocks) * passes.len() as u64, "batch done");
            // Blocks done over all passes, scaled to one pass of the chunk.
            let blocks_done = done / passes.len() as u64;
            progress(Progress { blocks_done, blocks_total: u64::from(blocks), stats: *total });
        }
    }
    Ok(())
}

/// The snapshot cuts whose views this copy carries: those both replicas
/// keep, ascending. A target that keeps none (new on its node, or of a
/// detached volume) first gets the source's, if it still has none when they
/// arrive: a cut the front end installed meanwhile is never replaced. A cut
/// only the source keeps is one the front end is dropping, or one it will
/// install on the target before its next write above it; it is logged.
async fn views(
    source: &ReplicaClient,
    target: &ReplicaClient,
    id: ChunkId,
    epoch: Epoch,
) -> Result<Vec<Seq>, ResyncError> {
    let theirs = source
        .list_cuts(id.volume, epoch)
        .await
        .map_err(|e| ResyncError::replica(Side::Source, "list cuts", epoch, e))?;
    if theirs.is_empty() {
        return Ok(Vec::new());
    }
    target
        .set_cuts_if_none(id.volume, epoch, &theirs)
        .await
        .map_err(|e| ResyncError::replica(Side::Target, "set cuts", epoch, e))?;
    let ours = target
        .list_cuts(id.volume, epoch)
        .await
        .map_err(|e| ResyncError::replica(Side::Target, "list cuts", epoch, e))?;
    let both: Vec<Seq> = theirs.iter().copied().filter(|c| ours.contains(c)).collect();
    if both.len() < theirs.len() {
        warn!(
            source = theirs.len(),
            target = ours.len(),
            both = both.len(),
            "the replicas keep different snapshot cuts"
        );
    }
    Ok(both)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        assert!(ResyncOptions::default().validate().is_ok());
        let bad = [
            ResyncOptions { batch_blocks: 0, ..ResyncOptions::default() },
            ResyncOptions { batch_blocks: MAX_RESYNC_BLOCKS + 1, ..ResyncOptions::default() },
            ResyncOptions { concurrency: 0, ..ResyncOptions::default() },
            ResyncOptions { max_bytes_per_sec: Some(0), ..ResyncOptions::default() },
        ];
        for o in bad {
            assert!(matches!(o.validate(), Err(ResyncError::InvalidArgument(_))), "{o:?}");
        }
    }

    #[test]
    fn fenced_replies_become_their_own_variant() {
        let fenced = ClientError::Remote { status: ballast_replica::Status::Fenced, message: "old".into() };
        let e = ResyncError::replica(Side::Target, "announce", Epoch(3), fenced);
        assert!(e.is_fenced());
        assert!(matches!(e, ResyncError::Fenced { side: Side::Target, epoch: Epoch(3), .. }));
        let other = ClientError::Remote { status: ballast_replica::Status::Io, message: "eio".into() };
        assert!(!ResyncError::replica(Side::Source, "read", Epoch(3), other).is_fenced());
    }
}
