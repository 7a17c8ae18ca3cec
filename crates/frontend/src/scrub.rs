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
//! [`scrub_periodically`] runs passes on a schedule, for the attached front
//! ends (`ballast export`, the CSI node).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ballast_types::{ChunkIdx, NodeId, BLOCK_SIZE};
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
/// reaches the same piece).
#[derive(Default)]
struct ChunkScan {
    hopeless: BTreeSet<(u64, NodeId)>,
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
        let id = self.chunk_id(chunk);
        let len = self.chunk_len(chunk);
        let mut scan = ChunkScan::default();
        let members = state.snapshot().in_sync.clone();
        for node in members {
            // Ejected since the chunk's scan began: no longer read, nor repaired.
            if !state.snapshot().contains(node) {
                continue;
            }
            report.replicas_scanned += 1;
            let mut offset = 0;
            while offset < len {
                self.scrub_check()?;
                let n = piece_len.min(len - offset);
                let p = Piece { chunk, offset, len: n, buf_offset: 0 };
                pacer.take(n).await;
                let r = match self.io(node) {
                    Ok(io) => self.call("read", io.read(id, offset, n as u32, self.epoch())).await,
                    Err(e) => Err(e),
                };
                let e = match r {
                    Ok(d) if d.len() as u64 == n => {
                        self.scrub_count(report, n);
                        offset += n;
                        continue;
                    }
                    Ok(d) => ReplicaError::Failed(format!("read returned {} bytes, asked {n}", d.len())),
                    Err(e) => e,
                };
                match classify(&e) {
                    Reaction::Repair => {
                        self.scrub_count(report, n);
                        self.scrub_repair(p, node, &mut scan, report).await?;
                    }
                    Reaction::Missing => {
                        // As for reads: a replica without the chunk holds no
                        // write to it; it reads as zeros, nothing to verify.
                        debug!(%node, "chunk not created on this replica: reads as zeros");
                        report.missing_chunks += 1;
                        break;
                    }
                    Reaction::Stop(m) => {
                        self.stop_fenced(&m);
                        return Err(FrontendError::Stopped(self.id()));
                    }
                    Reaction::Invalid(m) => {
                        warn!(volume = %self.id(), chunk = chunk.0, %node, offset, message = %m, "replica rejected a scrub read as invalid: skipping its copy of the chunk");
                        report.failed_replicas += 1;
                        break;
                    }
                    Reaction::Eject(reason) => {
                        warn!(volume = %self.id(), chunk = chunk.0, %node, offset, error = %e, "scrub read failed: ejecting the replica");
                        report.failed_replicas += 1;
                        if let Err(err) = self.eject(chunk, node, reason).await {
                            warn!(volume = %self.id(), chunk = chunk.0, %node, error = %err, "could not eject a failed replica after a scrub read error");
                        }
                        break;
                    }
                }
                offset += n;
            }
        }
        Ok(())
    }

    fn scrub_count(&self, report: &mut ScrubReport, bytes: u64) {
        report.pieces += 1;
        report.bytes_read += bytes;
        bump(&self.stats.scrubbed_bytes, bytes);
    }

    /// `node`'s copy of piece `p` failed its checksum: rewrite it (and any
    /// other corrupt copy found on the way) from a verified copy.
    async fn scrub_repair(
        &self,
        p: Piece,
        node: NodeId,
        scan: &mut ChunkScan,
        report: &mut ScrubReport,
    ) -> Result<(), FrontendError> {
        if scan.hopeless.contains(&(p.offset, node)) {
            return Ok(());
        }
        warn!(volume = %self.id(), chunk = p.chunk.0, %node, offset = p.offset, len = p.len, "scrub: corrupt piece");
        let mut corrupt = vec![node];
        let outcome = self.rewrite_from_verified_copy(p, None, &mut corrupt).await;
        let found = corrupt.len() as u64;
        report.corrupt_pieces += found;
        bump(&self.stats.scrub_corrupt, found);
        match outcome {
            Rewrite::Done { source, .. } => {
                report.repaired += found;
                bump(&self.stats.scrub_repaired, found);
                info!(volume = %self.id(), chunk = p.chunk.0, corrupt = ?corrupt, offset = p.offset, len = p.len, %source, "scrub: corrupt copies rewritten from a verified copy");
            }
            Rewrite::NoGoodCopy => {
                report.unrepairable += found;
                bump(&self.stats.scrub_unrepairable, found);
                scan.hopeless.extend(corrupt.iter().map(|n| (p.offset, *n)));
                warn!(volume = %self.id(), chunk = p.chunk.0, corrupt = ?corrupt, offset = p.offset, len = p.len, "scrub: no in-sync replica has a verified copy of the piece: left unrepaired");
            }
            Rewrite::WriteFailed { error, .. } => {
                report.unrepairable += found;
                bump(&self.stats.scrub_unrepairable, found);
                warn!(volume = %self.id(), chunk = p.chunk.0, corrupt = ?corrupt, offset = p.offset, %error, "scrub: rewriting the corrupt piece failed");
            }
            Rewrite::Stopped => return Err(FrontendError::Stopped(self.id())),
        }
        Ok(())
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
