//! The scrub: finds and repairs bit rot on every in-sync replica of a volume,
//! not only on the ones client reads happen to hit.
//!
//! One pass ([`Volume::scrub`]) walks every chunk and, for each replica of its
//! in-sync set, reads the chunk from THAT replica in pieces (`piece_len`,
//! block-aligned, clipped to the chunk's length). A piece whose copy fails its
//! checksum is rewritten from another in-sync replica's verified copy through
//! the same path read repair uses (`Volume::rewrite_from_verified_copy`: the
//! chunk's `order` lock held exclusively, a fresh seq). Reads are paced to a
//! byte rate so a pass leaves client I/O its latency.
//!
//! ```text
//!  chunk 0..n ─► in-sync replica A ─► piece 0, 1, .. ─► read from A ─┬─ verifies: next piece
//!                in-sync replica B ─► ..                              ├─ checksum mismatch: rewrite from a
//!                ..                                                   │  verified copy (exclusive lock, fresh seq)
//!                                                                     ├─ no such chunk: zeros, next replica
//!                                                                     └─ failed: eject, next replica
//! ```
//!
//! INVARIANT (the scrub never writes data a client did not write): it writes
//! only through `rewrite_from_verified_copy`, which rewrites a piece with the
//! current content of a verified in-sync copy, read and written while it holds
//! the chunk's `order` lock exclusively, under a fresh seq — so it can neither
//! overwrite a newer client write (none is in flight, later ones take newer
//! seqs) nor be overwritten by an older one (every earlier write has an older
//! seq). A piece with no verified copy anywhere is reported, never written.
//!
//! Snapshot views. After a chunk's live copies, the scrub verifies the
//! versions only the volume's snapshots still read (those of their frozen
//! layers), on every in-sync replica: per replica it takes the chunk's live
//! context table, then the view's table at each cut, newest first, and reads
//! (ReadSnapshot) only where a view's version differs from the next newer
//! view's (the live view's for the newest): a version two views share is on
//! disk once and is read once, and one the live view still reads was read by
//! the live scan. So a pass reads each stored version once, whatever the
//! number of snapshots. A corrupt copy in a view is rewritten from another
//! in-sync replica's verified copy of the same view, with the source's seqs
//! (`Volume::rewrite_view_from_verified_copy`); views never change, so no lock
//! is held and no client write can race it.
//!
//! [`scrub_periodically`] runs passes on a schedule, for the attached front
//! ends (`ballast export`, the CSI node).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ballast_types::{BlockContext, BlockIdx, ChunkId, ChunkIdx, NodeId, Seq, BLOCK_SIZE, BLOCK_SIZE_U64};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, debug_span, info, info_span, warn, Instrument};

use crate::membership::Membership;
use crate::policy::{classify, Piece, Reaction};
use crate::replica_io::{ReplicaError, ReplicaIo};
use crate::volume::{bump, Rewrite, Volume};
use crate::FrontendError;

/// Bytes per scrub read unless told otherwise: 1 MiB.
pub const DEFAULT_SCRUB_PIECE: u32 = 1 << 20;
/// Largest scrub read (a replica read's payload must fit one wire frame).
pub const MAX_SCRUB_PIECE: u32 = 16 << 20;
/// Default pace of a scrub: 64 MiB/s of replica reads.
pub const DEFAULT_SCRUB_RATE: u64 = 64 << 20;
/// Default time between scrub passes: a day.
pub const DEFAULT_SCRUB_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// How one scrub pass reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubOptions {
    /// Replica bytes read per second, on average over the pass (every copy
    /// counts: a chunk with three in-sync replicas costs three chunks). 0: no
    /// limit. Default: 64 MiB/s.
    pub rate_bytes_per_sec: u64,
    /// Bytes per read, rounded down to whole blocks and kept within
    /// [`BLOCK_SIZE`]..=[`MAX_SCRUB_PIECE`]. Default: 1 MiB.
    pub piece_len: u32,
}

impl Default for ScrubOptions {
    fn default() -> Self {
        ScrubOptions { rate_bytes_per_sec: DEFAULT_SCRUB_RATE, piece_len: DEFAULT_SCRUB_PIECE }
    }
}

/// What one scrub pass did. A "piece copy" is one piece on one replica.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Chunks visited.
    pub chunks: u64,
    /// Chunk copies scanned (one chunk on one in-sync replica).
    pub replicas_scanned: u64,
    /// Chunk copies the replica does not have (never written: reads as zeros).
    pub missing_chunks: u64,
    /// Piece reads that returned data or a checksum mismatch.
    pub pieces: u64,
    /// Bytes those reads covered.
    pub bytes_read: u64,
    /// Corrupt piece copies found (by the scan, or while looking for a good copy).
    pub corrupt_pieces: u64,
    /// Corrupt piece copies rewritten from a verified copy.
    pub repaired: u64,
    /// Corrupt piece copies left as they were: no in-sync replica had a
    /// verified copy (nothing was written), or the rewrite failed.
    pub unrepairable: u64,
    /// Chunk copies whose scan stopped on a replica failure (the replica was
    /// ejected, or the request was refused as invalid).
    pub failed_replicas: u64,
    /// Snapshot views scanned: one chunk's view at one cut on one replica
    /// (their reads count in `pieces` and `bytes_read`, their corrupt copies
    /// in `corrupt_pieces`, `repaired` and `unrepairable`).
    pub snapshot_views: u64,
    /// Time spent waiting for the rate limit.
    pub throttled: Duration,
    /// Wall time of the pass.
    pub elapsed: Duration,
}

/// When and how fast an attached front end scrubs its volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubConfig {
    /// Time from attach to the first pass, and between the end of one pass and
    /// the start of the next. Default: 24 h.
    pub interval: Duration,
    /// See [`ScrubOptions::rate_bytes_per_sec`]. Default: 64 MiB/s.
    pub rate_bytes_per_sec: u64,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig { interval: DEFAULT_SCRUB_INTERVAL, rate_bytes_per_sec: DEFAULT_SCRUB_RATE }
    }
}

/// Paces reads to `rate` bytes per second: a read of `n` bytes may start once
/// the reads before it have been paid for, and pays `n / rate` of time. Time a
/// slow stretch left unused is credited up to [`Pacer::MAX_CREDIT`] only, so a
/// pass that fell behind does not catch up in a burst.
struct Pacer {
    rate: u64,
    /// When the next read may start.
    next: Instant,
    waited: Duration,
}

impl Pacer {
    const MAX_CREDIT: Duration = Duration::from_millis(100);

    fn new(rate: u64) -> Pacer {
        Pacer { rate, next: Instant::now(), waited: Duration::ZERO }
    }

    async fn take(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let now = Instant::now();
        if self.next > now {
            self.waited += self.next - now;
            tokio::time::sleep_until(self.next).await;
        } else if now - self.next > Self::MAX_CREDIT {
            self.next = now.checked_sub(Self::MAX_CREDIT).unwrap_or(now);
        }
        self.next += Duration::from_secs_f64(bytes as f64 / self.rate as f64);
    }
}

/// One chunk's scan state: the piece copies already known to have no good
/// copy anywhere (counted once, not retried when another replica's scan
/// reaches the same piece), by view (None: the live one), offset and node.
#[derive(Default)]
struct ChunkScan {
    hopeless: BTreeSet<(Option<Seq>, u64, NodeId)>,
}

/// What one read of a scan found.
enum Scanned {
    /// The piece verifies (or was found corrupt and the repair ran): go on.
    Next,
    /// The replica has no such chunk (or view): nothing more to read of it.
    Missing,
    /// The replica failed or refused: its copy of the chunk is not scanned further.
    Failed,
}

impl<M: Membership, R: ReplicaIo> Volume<M, R> {
    /// One scrub pass over the whole volume (see the module docs): every chunk
    /// (those a growth adds meanwhile too), every in-sync replica of it, piece
    /// by piece; corrupt copies are rewritten from a verified copy. Replica
    /// failures follow the read rules (ejected, the scan goes on with the next
    /// replica). Returns [`FrontendError::Stopped`] when the volume stops
    /// (closed, or fenced by a newer front end) during the pass.
    pub async fn scrub(&self, options: &ScrubOptions) -> Result<ScrubReport, FrontendError> {
        let span = info_span!("scrub", volume = %self.id(), epoch = %self.epoch());
        self.scrub_pass(options).instrument(span).await
    }

    async fn scrub_pass(&self, options: &ScrubOptions) -> Result<ScrubReport, FrontendError> {
        let started = Instant::now();
        let piece_len = u64::from((options.piece_len / BLOCK_SIZE * BLOCK_SIZE).clamp(BLOCK_SIZE, MAX_SCRUB_PIECE));
        let mut pacer = Pacer::new(options.rate_bytes_per_sec);
        let mut report = ScrubReport::default();
        debug!(rate = options.rate_bytes_per_sec, piece_len, "scrub pass starts");
        let mut chunk = 0u32;
        // Re-evaluated every chunk: a volume that grows during the pass has
        // its new chunks scrubbed too (their states exist before the size
        // that reaches them).
        while u64::from(chunk) < ballast_blockdev::BlockDev::size(self).div_ceil(self.chunk_size()) {
            let c = ChunkIdx(chunk);
            self.scrub_chunk(c, piece_len, &mut pacer, &mut report)
                .instrument(debug_span!("scrub_chunk", chunk = chunk))
                .await?;
            report.chunks += 1;
            chunk += 1;
        }
        report.throttled = pacer.waited;
        report.elapsed = started.elapsed();
        bump(&self.stats.scrub_passes, 1);
        info!(
            volume = %self.id(),
            bytes = report.bytes_read,
            corrupt = report.corrupt_pieces,
            repaired = report.repaired,
            unrepairable = report.unrepairable,
            chunks = report.chunks,
            replicas = report.replicas_scanned,
            snapshot_views = report.snapshot_views,
            failed = report.failed_replicas,
            elapsed = ?report.elapsed,
            throttled = ?report.throttled,
            "scrub pass done"
        );
        Ok(report)
    }

    fn scrub_check(&self) -> Result<(), FrontendError> {
        if self.is_stopped() {
            Err(FrontendError::Stopped(self.id()))
        } else {
            Ok(())
        }
    }

    async fn scrub_chunk(
        &self,
        chunk: ChunkIdx,
        piece_len: u64,
        pacer: &mut Pacer,
        report: &mut ScrubReport,
    ) -> Result<(), FrontendError> {
        let state = &self.chunks[chunk.0 as usize];
        let len = self.chunk_len(chunk);
        let mut scan = ChunkScan::default();
        let members = state.snapshot().in_sync.clone();
        for &node in &members {
            // Ejected since the chunk's scan began: no longer read, nor repaired.
            if !state.snapshot().contains(node) {
                continue;
            }
            report.replicas_scanned += 1;
            let mut offset = 0;
            while offset < len {
                let p = Piece { chunk, offset, len: piece_len.min(len - offset), buf_offset: 0 };
                match self.scrub_piece(None, p, node, pacer, &mut scan, report).await? {
                    Scanned::Next => offset += p.len,
                    Scanned::Missing | Scanned::Failed => break,
                }
            }
        }
        let cuts = self.snapshots().await;
        if cuts.is_empty() {
            return Ok(());
        }
        for &node in &members {
            if state.snapshot().contains(node) {
                self.scrub_views(chunk, &cuts, node, piece_len, pacer, &mut scan, report).await?;
            }
        }
        Ok(())
    }

    /// The snapshot views of `chunk` on `node` (module docs, "Snapshot
    /// views"): newest cut first, the blocks whose version differs from the
    /// next newer view's, read in spans within `piece_len` windows.
    #[allow(clippy::too_many_arguments)]
    async fn scrub_views(
        &self,
        chunk: ChunkIdx,
        cuts: &[Seq],
        node: NodeId,
        piece_len: u64,
        pacer: &mut Pacer,
        scan: &mut ChunkScan,
        report: &mut ScrubReport,
    ) -> Result<(), FrontendError> {
        let id = self.chunk_id(chunk);
        let blocks = (self.chunk_len(chunk) / BLOCK_SIZE_U64) as u32;
        let window = (piece_len / BLOCK_SIZE_U64) as u32;
        let table = |cut: Option<Seq>| async move {
            let io = self.io(node)?;
            match cut {
                None => self.call("context table", io.context_table(id, BlockIdx(0), blocks, self.epoch())).await,
                Some(cut) => {
                    self.call("snapshot contexts", io.context_table_at(id, cut, BlockIdx(0), blocks, self.epoch()))
                        .await
                }
            }
        };
        let mut newer = match self.scrub_table(chunk, node, table(None).await, report).await? {
            Some(t) => t,
            None => return Ok(()),
        };
        for &cut in cuts.iter().rev() {
            self.scrub_check()?;
            if !self.snapshots().await.contains(&cut) {
                continue; // deleted during the pass
            }
            let Some(view) = self.scrub_table(chunk, node, table(Some(cut)).await, report).await? else {
                return Ok(());
            };
            report.snapshot_views += 1;
            let kept_for_views = |b: u32| {
                let (v, n) = (view[b as usize].seq, newer[b as usize].seq);
                v != Seq::ZERO && v != n
            };
            let mut w = 0;
            while w < blocks {
                let end = (w + window).min(blocks);
                let first = (w..end).find(|&b| kept_for_views(b));
                let last = (w..end).rev().find(|&b| kept_for_views(b));
                w = end;
                let (Some(first), Some(last)) = (first, last) else { continue };
                let offset = u64::from(first) * BLOCK_SIZE_U64;
                let p = Piece { chunk, offset, len: u64::from(last + 1 - first) * BLOCK_SIZE_U64, buf_offset: 0 };
                match self.scrub_piece(Some(cut), p, node, pacer, scan, report).await? {
                    Scanned::Next => {}
                    Scanned::Missing => break,
                    Scanned::Failed => return Ok(()),
                }
            }
            newer = view;
        }
        Ok(())
    }

    /// A context table for the views' scan, or None when the node's copy is
    /// not scanned further (no such chunk; failed: counted, and ejected as
    /// the read rules say).
    async fn scrub_table(
        &self,
        chunk: ChunkIdx,
        node: NodeId,
        r: Result<Vec<BlockContext>, ReplicaError>,
        report: &mut ScrubReport,
    ) -> Result<Option<Vec<BlockContext>>, FrontendError> {
        let blocks = (self.chunk_len(chunk) / BLOCK_SIZE_U64) as usize;
        let e = match r {
            Ok(t) if t.len() == blocks => return Ok(Some(t)),
            Ok(t) => ReplicaError::Failed(format!("context table of {} blocks, asked {blocks}", t.len())),
            Err(e) => e,
        };
        match classify(&e) {
            Reaction::Missing => Ok(None),
            Reaction::Stop(m) => {
                self.stop_fenced(&m);
                Err(FrontendError::Stopped(self.id()))
            }
            Reaction::Repair | Reaction::Invalid(_) => {
                warn!(volume = %self.id(), chunk = chunk.0, %node, error = %e, "scrub: a replica refused a context table: skipping its snapshot views of the chunk");
                report.failed_replicas += 1;
                Ok(None)
            }
            Reaction::Eject(reason) => {
                warn!(volume = %self.id(), chunk = chunk.0, %node, error = %e, "scrub: context table failed: ejecting the replica");
                report.failed_replicas += 1;
                if let Err(err) = self.eject(chunk, node, reason).await {
                    warn!(volume = %self.id(), chunk = chunk.0, %node, error = %err, "could not eject a failed replica after a scrub error");
                }
                Ok(None)
            }
        }
    }

    /// Reads piece `p` of `view` (None: live) from `node`, paced; a corrupt
    /// copy is repaired, a failure follows the read rules.
    async fn scrub_piece(
        &self,
        view: Option<Seq>,
        p: Piece,
        node: NodeId,
        pacer: &mut Pacer,
        scan: &mut ChunkScan,
        report: &mut ScrubReport,
    ) -> Result<Scanned, FrontendError> {
        self.scrub_check()?;
        let (chunk, offset, n) = (p.chunk, p.offset, p.len);
        let id = self.chunk_id(chunk);
        pacer.take(n).await;
        let r = self.read_view(node, view, id, offset, n as u32).await;
        let e = match r {
            Ok(d) if d.len() as u64 == n => {
                self.scrub_count(report, n);
                return Ok(Scanned::Next);
            }
            Ok(d) => ReplicaError::Failed(format!("read returned {} bytes, asked {n}", d.len())),
            Err(e) => e,
        };
        match classify(&e) {
            Reaction::Repair => {
                self.scrub_count(report, n);
                self.scrub_repair(view, p, node, scan, report).await?;
                Ok(Scanned::Next)
            }
            Reaction::Missing => {
                // As for reads: a replica without the chunk holds no
                // write to it; it reads as zeros, nothing to verify.
                debug!(%node, "chunk not created on this replica: reads as zeros");
                if view.is_none() {
                    report.missing_chunks += 1;
                }
                Ok(Scanned::Missing)
            }
            Reaction::Stop(m) => {
                self.stop_fenced(&m);
                Err(FrontendError::Stopped(self.id()))
            }
            Reaction::Invalid(m) if view.is_some() => {
                // The snapshot was deleted since the view's table was read.
                debug!(volume = %self.id(), chunk = chunk.0, %node, message = %m, "scrub: snapshot view gone");
                Ok(Scanned::Missing)
            }
            Reaction::Invalid(m) => {
                warn!(volume = %self.id(), chunk = chunk.0, %node, offset, message = %m, "replica rejected a scrub read as invalid: skipping its copy of the chunk");
                report.failed_replicas += 1;
                Ok(Scanned::Failed)
            }
            Reaction::Eject(reason) => {
                warn!(volume = %self.id(), chunk = chunk.0, %node, offset, error = %e, "scrub read failed: ejecting the replica");
                report.failed_replicas += 1;
                if let Err(err) = self.eject(chunk, node, reason).await {
                    warn!(volume = %self.id(), chunk = chunk.0, %node, error = %err, "could not eject a failed replica after a scrub read error");
                }
                Ok(Scanned::Failed)
            }
        }
    }

    fn scrub_count(&self, report: &mut ScrubReport, bytes: u64) {
        report.pieces += 1;
        report.bytes_read += bytes;
        bump(&self.stats.scrubbed_bytes, bytes);
    }

    /// `node`'s copy of piece `p` of `view` failed its checksum: rewrite it
    /// (and any other corrupt copy found on the way) from a verified copy.
    ///
    /// When no replica has the whole piece verified, the rot may still be in
    /// different blocks on different replicas: the piece is halved, each half
    /// read from every in-sync replica, and a half some copy fails is
    /// repaired the same way, down to single blocks. Halves every copy
    /// verifies are not written. So a block is left unrepaired only when
    /// every in-sync copy of that block fails its checksum.
    async fn scrub_repair(
        &self,
        view: Option<Seq>,
        p: Piece,
        node: NodeId,
        scan: &mut ChunkScan,
        report: &mut ScrubReport,
    ) -> Result<(), FrontendError> {
        if scan.hopeless.contains(&(view, p.offset, node)) {
            return Ok(());
        }
        warn!(volume = %self.id(), chunk = p.chunk.0, %node, offset = p.offset, len = p.len, snapshot = ?view, "scrub: corrupt piece");
        let mut all: BTreeSet<NodeId> = BTreeSet::new();
        let mut pending = vec![(p, vec![node])];
        let mut left = false;
        while let Some((q, mut corrupt)) = pending.pop() {
            let outcome = match view {
                None => self.rewrite_from_verified_copy(q, None, &mut corrupt).await,
                Some(cut) => self.rewrite_view_from_verified_copy(cut, q, &mut corrupt).await,
            };
            all.extend(corrupt.iter().copied());
            match outcome {
                Rewrite::Done { source, .. } => {
                    info!(volume = %self.id(), chunk = q.chunk.0, corrupt = ?corrupt, offset = q.offset, len = q.len, %source, snapshot = ?view, "scrub: corrupt copies rewritten from a verified copy");
                }
                Rewrite::NoGoodCopy if q.len > BLOCK_SIZE_U64 => {
                    let half = q.len / BLOCK_SIZE_U64 / 2 * BLOCK_SIZE_U64;
                    for h in [Piece { len: half, ..q }, Piece { offset: q.offset + half, len: q.len - half, ..q }] {
                        let bad = self.corrupt_copies(view, h).await?;
                        if !bad.is_empty() {
                            pending.push((h, bad));
                        }
                    }
                }
                Rewrite::NoGoodCopy => {
                    left = true;
                    warn!(volume = %self.id(), chunk = q.chunk.0, corrupt = ?corrupt, offset = q.offset, snapshot = ?view, "scrub: no in-sync replica has a verified copy of the block: left unrepaired");
                }
                Rewrite::WriteFailed { error, .. } => {
                    left = true;
                    warn!(volume = %self.id(), chunk = q.chunk.0, corrupt = ?corrupt, offset = q.offset, len = q.len, %error, "scrub: rewriting the corrupt piece failed");
                }
                Rewrite::Stopped => return Err(FrontendError::Stopped(self.id())),
            }
        }
        let found = all.len() as u64;
        report.corrupt_pieces += found;
        bump(&self.stats.scrub_corrupt, found);
        if left {
            report.unrepairable += found;
            bump(&self.stats.scrub_unrepairable, found);
            scan.hopeless.extend(all.iter().map(|n| (view, p.offset, *n)));
        } else {
            report.repaired += found;
            bump(&self.stats.scrub_repaired, found);
        }
        Ok(())
    }

    /// Reads [offset, +len) of chunk `id`'s `view` (None: the live one) from `node`.
    async fn read_view(
        &self,
        node: NodeId,
        view: Option<Seq>,
        id: ChunkId,
        offset: u64,
        len: u32,
    ) -> Result<bytes::Bytes, ReplicaError> {
        let io = self.io(node)?;
        match view {
            None => self.call("read", io.read(id, offset, len, self.epoch())).await,
            Some(cut) => self.call("read snapshot", io.read_snapshot(id, cut, offset, len, self.epoch())).await,
        }
    }

    /// The in-sync replicas whose copy of piece `p` of `view` fails its
    /// checksum (a replica that cannot be read counts as neither).
    async fn corrupt_copies(&self, view: Option<Seq>, p: Piece) -> Result<Vec<NodeId>, FrontendError> {
        let id = self.chunk_id(p.chunk);
        let set = self.chunks[p.chunk.0 as usize].snapshot();
        let mut bad = Vec::new();
        for &node in &set.in_sync {
            match self.read_view(node, view, id, p.offset, p.len as u32).await {
                Err(ReplicaError::ChecksumMismatch(_)) => bad.push(node),
                Err(ReplicaError::Fenced(m)) => {
                    self.stop_fenced(&m);
                    return Err(FrontendError::Stopped(self.id()));
                }
                _ => {}
            }
        }
        Ok(bad)
    }
}

/// Scrubs `volume` on `config`'s schedule: the first pass one interval after
/// the call, each next one an interval after the previous one ended. Every
/// report is published to `reports`. Returns when the volume stops; abort the
/// task to end it sooner (the attached front ends do on detach).
pub async fn scrub_periodically<M: Membership, R: ReplicaIo>(
    volume: Arc<Volume<M, R>>,
    config: ScrubConfig,
    reports: watch::Sender<Option<ScrubReport>>,
) {
    let options = ScrubOptions { rate_bytes_per_sec: config.rate_bytes_per_sec, ..ScrubOptions::default() };
    info!(volume = %volume.id(), interval = ?config.interval, rate = config.rate_bytes_per_sec, "scrub scheduled");
    loop {
        tokio::time::sleep(config.interval).await;
        match volume.scrub(&options).await {
            Ok(report) => {
                reports.send_replace(Some(report));
            }
            Err(FrontendError::Stopped(_)) => {
                debug!(volume = %volume.id(), "volume stopped: scrub ends");
                return;
            }
            Err(e) => warn!(volume = %volume.id(), error = %e, "scrub pass failed; next one after the interval"),
        }
        if volume.is_stopped() {
            return;
        }
    }
}
