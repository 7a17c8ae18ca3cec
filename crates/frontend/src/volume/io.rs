//! The data path: every request is range checked, stop checked, admitted by
//! in-flight bytes (backpressure), split at chunk boundaries and its pieces run
//! in parallel; read repair and the one rewrite path it shares with the scrub.
//!
//! I/O path file (see the module docs of `volume`).

use std::sync::atomic::Ordering;

use ballast_blockdev::{BlockDev, BlockError};
use ballast_types::{ChunkId, NodeId, Seq, BLOCK_SIZE, BLOCK_SIZE_U64};
use bytes::{Bytes, BytesMut};
use tracing::{debug, debug_span, info, warn, Instrument};

use super::{bump, io_err, join_all, Volume};
use crate::membership::{EjectReason, Membership};
use crate::metrics::IoOp;
use crate::policy::{self, classify, plan_write, Reaction};
use crate::replica_io::{ReplicaError, ReplicaIo};

impl<M: Membership, R: ReplicaIo> Volume<M, R> {
    // ---- the data path --------------------------------------------------------

    async fn permits(&self, bytes: u64) -> Result<tokio::sync::SemaphorePermit<'_>, BlockError> {
        let n = bytes.clamp(1, u64::from(self.max_inflight)) as u32;
        self.inflight.acquire_many(n).await.map_err(|_| BlockError::Shutdown)
    }

    /// Runs one client request: counts its error, and records it in the
    /// volume's metrics when it has them (in flight while it runs, then its
    /// latency or its error kind; a request dropped half-way leaves the
    /// in-flight gauges too).
    async fn served<T>(
        &self,
        op: IoOp,
        payload: u64,
        req: impl std::future::Future<Output = Result<T, BlockError>>,
    ) -> Result<T, BlockError> {
        let inflight = self.metrics.as_ref().map(|m| m.begin(payload));
        let r = req.await;
        if r.is_err() {
            bump(&self.stats.errors, 1);
        }
        if let Some(m) = inflight {
            m.done(op, &r);
        }
        r
    }

    pub(super) async fn write_piece(&self, p: policy::Piece, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let state = &self.chunks[p.chunk.0 as usize];
        // Held from before the set is read until the replies are in and the
        // ejections committed: no repair meanwhile, and no set change by
        // apply_layout (its ordering guarantee rests on this).
        let _no_repair_or_set_change_meanwhile = state.order.read().await;
        // Invariant: the seq is taken under the lock. A repair (exclusive)
        // takes its fresh seq under the lock too, so the seqs of a chunk's
        // writes and repairs are ordered as the writes are applied: a write that
        // waited for a repair has a newer seq than the repair's rewrite, and
        // replicas keep a block's newest seq (a write with an older seq than
        // the block's is kept out), so the client's data is what stays.
        let seq = self.next_seq();
        self.write_piece_locked(p, data, seq, fua).await
    }

    /// The fan-out of one chunk write to every in-sync and rebuilding replica;
    /// the caller holds the chunk's order lock (shared for client writes,
    /// exclusive for repairs).
    async fn write_piece_locked(&self, p: policy::Piece, data: Bytes, seq: Seq, fua: bool) -> Result<(), BlockError> {
        let set = self.chunks[p.chunk.0 as usize].snapshot();
        let id = self.chunk_id(p.chunk);
        let replies = join_all(set.write_targets().map(|node| {
            let data = data.clone();
            async move { (node, self.write_one(node, id, p.offset, data, seq, fua).await) }
        }))
        .await;
        debug!(chunk = p.chunk.0, offset = p.offset, len = p.len, %seq, "chunk write replies");
        self.finish(p.chunk, plan_write(&replies, &set.rebuilding, self.min_in_sync())).await
    }

    /// One replica's write; creates the chunk on first touch (thin provisioning)
    /// and retries once.
    async fn write_one(
        &self,
        node: NodeId,
        id: ChunkId,
        offset: u64,
        data: Bytes,
        seq: Seq,
        fua: bool,
    ) -> Result<(), ReplicaError> {
        let io = self.io(node)?;
        match self.call("write", io.write(id, offset, data.clone(), seq, fua)).await {
            Err(ReplicaError::NoSuchChunk) => {
                match self.call("create_chunk", io.create_chunk(id, self.chunk_len(id.chunk), self.epoch)).await {
                    Ok(()) | Err(ReplicaError::ChunkExists) => {}
                    Err(e) => return Err(e),
                }
                debug!(%node, chunk = id.chunk.0, "chunk created on first write");
                self.call("write", io.write(id, offset, data, seq, fua)).await
            }
            r => r,
        }
    }

    /// Trim or write-zeroes of one piece: no payload, a missing chunk already
    /// reads as zeros.
    async fn zero_piece(&self, p: policy::Piece, trim: bool, fua: bool) -> Result<(), BlockError> {
        let state = &self.chunks[p.chunk.0 as usize];
        let _no_repair_or_set_change_meanwhile = state.order.read().await;
        // Taken under the lock, as for writes (see `write_piece`).
        let seq = self.next_seq();
        let set = state.snapshot();
        let id = self.chunk_id(p.chunk);
        let replies = join_all(set.write_targets().map(|node| async move {
            let r = async {
                let io = self.io(node)?;
                let r = if trim {
                    self.call("trim", io.trim(id, p.offset, p.len, seq)).await
                } else {
                    self.call("write_zeroes", io.write_zeroes(id, p.offset, p.len, seq)).await
                };
                match r {
                    Err(ReplicaError::NoSuchChunk) => Ok(()),
                    Ok(()) if fua => match self.call("flush_chunk", io.flush_chunk(id, self.epoch)).await {
                        Err(ReplicaError::NoSuchChunk) => Ok(()),
                        r => r,
                    },
                    r => r,
                }
            }
            .await;
            (node, r)
        }))
        .await;
        self.finish(p.chunk, plan_write(&replies, &set.rebuilding, self.min_in_sync())).await
    }

    async fn read_piece(&self, p: policy::Piece) -> Result<Bytes, BlockError> {
        let state = &self.chunks[p.chunk.0 as usize];
        let set = state.snapshot();
        let id = self.chunk_id(p.chunk);
        let order = policy::read_order(&set.in_sync, self.local_node, self.rr.fetch_add(1, Ordering::Relaxed));
        let mut corrupt = Vec::new();
        let mut missing = false;
        let mut last = String::new();
        for node in order {
            let r = match self.io(node) {
                Ok(io) => self.call("read", io.read(id, p.offset, p.len as u32, self.epoch)).await,
                Err(e) => Err(e),
            };
            let e = match r {
                Ok(d) if d.len() as u64 == p.len => {
                    if corrupt.is_empty() {
                        return Ok(d);
                    }
                    return Ok(self.repair(p, node, corrupt, d).await);
                }
                Ok(d) => ReplicaError::Failed(format!("read returned {} bytes, asked {}", d.len(), p.len)),
                Err(e) => e,
            };
            last = format!("{node}: {e}");
            match classify(&e) {
                Reaction::Stop(m) => {
                    self.stop_fenced(&m);
                    return Err(BlockError::Shutdown);
                }
                Reaction::Invalid(m) => {
                    warn!(volume = %self.id, chunk = p.chunk.0, message = %m, "replica rejected a read as invalid");
                    return Err(BlockError::OutOfRange { offset: p.offset, len: p.len, size: self.size() });
                }
                Reaction::Missing => missing = true,
                Reaction::Repair => {
                    warn!(volume = %self.id, chunk = p.chunk.0, %node, offset = p.offset, len = p.len, "checksum mismatch on read: trying another replica");
                    corrupt.push(node);
                }
                Reaction::Eject(reason) => {
                    // A read needs no ejection to proceed (it reduces no
                    // durability), but a failed replica must not receive
                    // writes that would then wait for it.
                    if let Err(err) = self.eject(p.chunk, node, reason).await {
                        warn!(volume = %self.id, chunk = p.chunk.0, %node, error = %err, "could not eject a failed replica after a read error");
                    }
                }
            }
        }
        if missing && corrupt.is_empty() {
            // An in-sync replica without the chunk proves no write to it was
            // ever acknowledged (every acknowledged write created it on all of
            // them): the chunk reads as zeros.
            return Ok(Bytes::from(vec![0u8; p.len as usize]));
        }
        Err(BlockError::Io(format!("chunk {}: no replica could serve the read (last: {last})", p.chunk)))
    }

    /// Read repair: the piece the read served from `good` is rewritten on
    /// every replica from a verified copy (see
    /// [`Volume::rewrite_from_verified_copy`], shared with the scrub). Returns
    /// the data to serve: the rewritten content, or the first read's when no
    /// copy verified again under the lock.
    async fn repair(&self, p: policy::Piece, good: NodeId, mut corrupt: Vec<NodeId>, first_read: Bytes) -> Bytes {
        match self.rewrite_from_verified_copy(p, Some(good), &mut corrupt).await {
            Rewrite::Done { data, source } => {
                bump(&self.stats.read_repairs, 1);
                info!(volume = %self.id, chunk = p.chunk.0, corrupt = ?corrupt, offset = p.offset, len = p.len, %source, "read repair: corrupt copies rewritten");
                data
            }
            Rewrite::WriteFailed { data, error } => {
                warn!(volume = %self.id, chunk = p.chunk.0, corrupt = ?corrupt, %error, "read repair failed");
                data
            }
            Rewrite::NoGoodCopy | Rewrite::Stopped => {
                warn!(volume = %self.id, chunk = p.chunk.0, %good, corrupt = ?corrupt, "read repair skipped: no copy verified when re-read");
                first_read
            }
        }
    }

    /// The one repair path (read repair and the scrub): holding the chunk's
    /// `order` lock exclusively (so no client write is in flight on the chunk
    /// and none can start until this returns), reads the piece from an in-sync
    /// replica whose copy verifies — `preferred` first, then the others in set
    /// order, skipping those in `corrupt` — and writes it to every in-sync and
    /// rebuilding replica under a fresh seq: the corrupt ones get the good
    /// data, all of them the same context (the original seq cannot be reused:
    /// its epoch would be fenced as stale). A replica that fails the rewrite is
    /// ejected by the ordinary write rules.
    ///
    /// Replicas found corrupt on the way are added to `corrupt`; a source that
    /// fails otherwise is ejected like a failed read; one without the chunk is
    /// no source (an in-sync copy that has data is preferred over none).
    ///
    /// INVARIANT (neither repair writes data no client wrote): the data written
    /// is the current content of a verified in-sync copy, read and written
    /// under the exclusive lock. With no write in flight, every in-sync copy
    /// holds every acknowledged write, so the content is the latest
    /// acknowledged one; the fresh seq is newer than any write acknowledged
    /// before, and every later client write takes a newer seq still, so the
    /// rewrite can neither overwrite a newer client write nor be overwritten by
    /// an older one. With no verified copy, nothing is written.
    pub(crate) async fn rewrite_from_verified_copy(
        &self,
        p: policy::Piece,
        preferred: Option<NodeId>,
        corrupt: &mut Vec<NodeId>,
    ) -> Rewrite {
        let state = &self.chunks[p.chunk.0 as usize];
        let _exclusive = state.order.write().await;
        let id = self.chunk_id(p.chunk);
        let set = state.snapshot();
        let sources: Vec<NodeId> = preferred
            .into_iter()
            .chain(set.in_sync.iter().copied().filter(|n| Some(*n) != preferred))
            .filter(|n| set.contains(*n))
            .collect();
        let mut found = None;
        for node in sources {
            if corrupt.contains(&node) {
                continue;
            }
            let r = match self.io(node) {
                Ok(io) => self.call("read", io.read(id, p.offset, p.len as u32, self.epoch)).await,
                Err(e) => Err(e),
            };
            let e = match r {
                Ok(d) if d.len() as u64 == p.len => {
                    found = Some((d, node));
                    break;
                }
                Ok(d) => ReplicaError::Failed(format!("read returned {} bytes, asked {}", d.len(), p.len)),
                Err(e) => e,
            };
            match classify(&e) {
                Reaction::Stop(m) => {
                    self.stop_fenced(&m);
                    return Rewrite::Stopped;
                }
                Reaction::Repair => {
                    warn!(volume = %self.id, chunk = p.chunk.0, %node, offset = p.offset, len = p.len, "checksum mismatch on a repair source: trying another replica");
                    corrupt.push(node);
                }
                Reaction::Missing => {}
                Reaction::Invalid(m) => {
                    warn!(volume = %self.id, chunk = p.chunk.0, %node, message = %m, "replica rejected a repair read as invalid")
                }
                Reaction::Eject(reason) => {
                    if let Err(err) = self.eject(p.chunk, node, reason).await {
                        warn!(volume = %self.id, chunk = p.chunk.0, %node, error = %err, "could not eject a failed replica after a repair read error");
                    }
                }
            }
        }
        let Some((data, source)) = found else { return Rewrite::NoGoodCopy };
        match self.write_piece_locked(p, data.clone(), self.next_seq(), false).await {
            Ok(()) => Rewrite::Done { data, source },
            Err(error) => Rewrite::WriteFailed { data, error },
        }
    }

    async fn do_read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        self.check(offset, u64::from(len))?;
        self.check_serving()?;
        let _permit = self.permits(u64::from(len)).await?;
        let pieces = policy::split(offset, u64::from(len), self.chunk_size);
        self.ensure_filled(&pieces).await?;
        let data = if pieces.len() == 1 {
            self.read_piece(pieces[0]).instrument(debug_span!("chunk", chunk = pieces[0].chunk.0)).await?
        } else {
            let parts = join_all(
                pieces.iter().map(|&p| self.read_piece(p).instrument(debug_span!("chunk", chunk = p.chunk.0))),
            )
            .await;
            let mut buf = BytesMut::with_capacity(len as usize);
            for part in parts {
                buf.extend_from_slice(&part?);
            }
            buf.freeze()
        };
        bump(&self.stats.reads, 1);
        bump(&self.stats.bytes_read, u64::from(len));
        Ok(data)
    }

    async fn do_write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        self.check_serving()?;
        let _permit = self.permits(len).await?;
        // Each chunk's piece takes its seq under that chunk's lock (see
        // `write_piece`): one seq per piece, the same on every replica.
        let pieces = policy::split(offset, len, self.chunk_size);
        self.ensure_filled(&pieces).await?;
        let results = join_all(pieces.iter().map(|&p| {
            let slice = data.slice(p.buf_offset as usize..(p.buf_offset + p.len) as usize);
            self.write_piece(p, slice, fua).instrument(debug_span!("chunk", chunk = p.chunk.0))
        }))
        .await;
        results.into_iter().collect::<Result<(), BlockError>>()?;
        bump(&self.stats.writes, 1);
        bump(&self.stats.bytes_written, len);
        Ok(())
    }

    async fn do_zero(&self, offset: u64, len: u64, trim: bool, fua: bool) -> Result<(), BlockError> {
        self.check(offset, len)?;
        self.check_serving()?;
        let _permit = self.permits(BLOCK_SIZE_U64).await?;
        let pieces = policy::split(offset, len, self.chunk_size);
        self.ensure_filled(&pieces).await?;
        let results = join_all(
            pieces.iter().map(|&p| self.zero_piece(p, trim, fua).instrument(debug_span!("chunk", chunk = p.chunk.0))),
        )
        .await;
        results.into_iter().collect::<Result<(), BlockError>>()?;
        bump(if trim { &self.stats.trims } else { &self.stats.write_zeroes }, 1);
        Ok(())
    }

    pub(super) async fn do_flush(&self) -> Result<(), BlockError> {
        self.check_serving()?;
        let holders: Vec<NodeId> = self.holders(true).into_iter().collect();
        let replies = join_all(holders.iter().map(|&node| async move {
            let r = match self.io(node) {
                Ok(io) => self.call("flush", io.flush(self.id, self.epoch)).await,
                Err(e) => Err(e),
            };
            (node, r)
        }))
        .await;
        for (node, reply) in replies {
            let e = match reply {
                Ok(()) | Err(ReplicaError::NoSuchChunk) => continue,
                Err(e) => e,
            };
            match classify(&e) {
                Reaction::Stop(m) => {
                    self.stop_fenced(&m);
                    return Err(BlockError::Shutdown);
                }
                Reaction::Eject(reason) => {
                    warn!(volume = %self.id, %node, error = %e, "flush failed on a replica node: ejecting it");
                    self.eject_everywhere(node, reason).await.map_err(io_err)?;
                }
                Reaction::Invalid(_) | Reaction::Repair | Reaction::Missing => {
                    warn!(volume = %self.id, %node, error = %e, "flush failed on a replica node: ejecting it");
                    self.eject_everywhere(node, EjectReason::ReplicaError).await.map_err(io_err)?;
                }
            }
        }
        bump(&self.stats.flushes, 1);
        Ok(())
    }
}

/// What [`Volume::rewrite_from_verified_copy`] did.
pub(crate) enum Rewrite {
    /// Every write target acknowledged `data`, read from `source`, under a fresh seq.
    Done { data: Bytes, source: NodeId },
    /// A verified copy was read but the rewrite failed (the write rules ran:
    /// failed replicas ejected, or too few left to acknowledge).
    WriteFailed { data: Bytes, error: BlockError },
    /// No in-sync replica outside the corrupt ones returned a verified copy:
    /// nothing was written.
    NoGoodCopy,
    /// A newer front end fenced this one while a source was read: nothing was written.
    Stopped,
}

/// The I/O path. Every request: range check, stop check, in-flight bytes
/// (backpressure), split at chunk boundaries, pieces in parallel.
impl<M: Membership, R: ReplicaIo> BlockDev for Volume<M, R> {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn block_size(&self) -> u32 {
        BLOCK_SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        let span = debug_span!("read", volume = %self.id, offset, len);
        self.served(IoOp::Read, u64::from(len), self.do_read(offset, len).instrument(span)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let span = debug_span!("write", volume = %self.id, offset, len = data.len(), fua);
        let len = data.len() as u64;
        self.served(IoOp::Write, len, self.do_write(offset, data, fua).instrument(span)).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.served(IoOp::Flush, 0, self.do_flush().instrument(debug_span!("flush", volume = %self.id))).await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let span = debug_span!("trim", volume = %self.id, offset, len);
        self.served(IoOp::Trim, 0, self.do_zero(offset, len, true, false).instrument(span)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        let span = debug_span!("write_zeroes", volume = %self.id, offset, len, fua);
        self.served(IoOp::WriteZeroes, 0, self.do_zero(offset, len, false, fua).instrument(span)).await
    }
}
