//! Crash-consistent snapshots of an attached volume (docs/DESIGN.md, 5.6).
//!
//! A snapshot is a seq cut `C`: it holds every write whose seq is below `C`
//! and none above. [`Volume::snapshot`] takes one on a busy volume:
//!
//! 1. every chunk's `order` lock, exclusively, all requested at once: each
//!    client write (and repair, and reconciliation write) holds its chunk's
//!    lock from before it takes its seq until its replies are in, so once all
//!    are held no write is in flight and every seq handed out so far belongs
//!    to a write that has completed (acknowledged or failed). Requested
//!    together, the drain lasts as long as the slowest write in flight, not
//!    the sum over the chunks (measured: 6.0 ms median one by one in chunk
//!    order). No deadlock: whoever else takes an `order` lock holds one chunk's
//!    at a time (a write's pieces each take their own and finish without the
//!    others'), and a queued exclusive request holds up new shared ones, so
//!    the drain cannot be starved;
//! 2. the cut: the next seq, reserved, so every earlier write is below it and
//!    every later one above;
//! 3. the volume's cuts with the new one to every node holding an in-sync or
//!    rebuilding replica (SetCuts; each makes the volume durable first). A node
//!    that fails is ejected from every chunk first: it must not take a write
//!    above the cut without knowing the cut;
//! 4. the locks released: client I/O resumes (the stall is steps 1 to 3);
//! 5. the cuts recorded by the membership provider. If that fails the
//!    snapshot does not exist; the replicas' extra cut is dropped by the next
//!    SetCuts.
//!
//! So every replica gets every write below the cut before the cut, and every
//! write above it after: each freezes its layers at the same seq (the chunk
//! store decides from seqs alone), and a snapshot holds, on every block, the
//! last write acknowledged before [`Volume::snapshot`] was called, or one that
//! was in flight then, never one issued after it returned: what a disk holds
//! after a power cut.

use std::time::{Duration, Instant};

use ballast_blockdev::BlockError;
use ballast_types::{BlockIdx, NodeId, Seq, BLOCK_SIZE_U64};
use bytes::{Bytes, BytesMut};
use tracing::{info, warn};

use super::{io_err, join_all, Rewrite, Volume};
use crate::membership::{EjectReason, Membership};
use crate::policy::{self, classify, Reaction};
use crate::replica_io::{ReplicaError, ReplicaIo};
use crate::FrontendError;

/// A snapshot just taken ([`Volume::snapshot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakenSnapshot {
    /// The snapshot's cut: it holds every write with a lower seq, none above.
    pub cut: Seq,
    /// How long client writes were held: the drain and the cut's installation
    /// on every replica node (steps 1 to 3 of the module docs).
    pub stall: Duration,
    /// The part of `stall` spent waiting for writes in flight (step 1).
    pub drain: Duration,
}

impl<M: Membership, R: ReplicaIo> Volume<M, R> {
    /// The volume's snapshot cuts, ascending.
    pub async fn snapshots(&self) -> Vec<Seq> {
        self.snapshots.lock().await.clone()
    }

    /// Takes a crash-consistent snapshot (see the module docs). Client writes
    /// stall while every replica node learns the cut.
    pub async fn snapshot(&self) -> Result<TakenSnapshot, BlockError> {
        self.check_serving()?;
        let mut cuts = self.snapshots.lock().await;
        let started = Instant::now();
        let held = join_all(self.chunks.iter().map(|(_, c)| c.order.write())).await;
        let drained = started.elapsed();
        let cut = self.next_seq();
        let mut next = cuts.clone();
        next.push(cut);
        let installed = self.install_cuts(&next).await;
        drop(held);
        let stall = started.elapsed();
        installed?;
        self.membership.set_snapshots(self.id, self.epoch, next.clone()).await.map_err(io_err)?;
        *cuts = next;
        info!(
            volume = %self.id, %cut, snapshots = cuts.len(), drain_us = drained.as_micros() as u64,
            stall_us = stall.as_micros() as u64, "snapshot taken"
        );
        Ok(TakenSnapshot { cut, stall, drain: drained })
    }

    /// Deletes the snapshot at `cut`: the replicas stop keeping its view, the
    /// membership provider forgets it. Unknown cuts are a no-op.
    pub async fn delete_snapshot(&self, cut: Seq) -> Result<(), BlockError> {
        self.check_serving()?;
        let mut cuts = self.snapshots.lock().await;
        if !cuts.contains(&cut) {
            return Ok(());
        }
        let next: Vec<Seq> = cuts.iter().copied().filter(|c| *c != cut).collect();
        self.membership.set_snapshots(self.id, self.epoch, next.clone()).await.map_err(io_err)?;
        *cuts = next;
        // Best effort: a node that keeps the cut keeps a view nobody reads.
        if let Err(e) = self.install_cuts(&cuts).await {
            warn!(volume = %self.id, %cut, error = %e, "snapshot deleted; some replicas still keep its cut");
        }
        info!(volume = %self.id, %cut, snapshots = cuts.len(), "snapshot deleted");
        Ok(())
    }

    /// Sends `cuts` to every node holding an in-sync or rebuilding replica;
    /// a node that fails is ejected from every chunk (a node that did not get
    /// the cuts must not take writes).
    pub(super) async fn install_cuts(&self, cuts: &[Seq]) -> Result<(), BlockError> {
        let holders: Vec<NodeId> = self.holders(true).into_iter().collect();
        let replies = join_all(holders.iter().map(|&node| async move {
            let r = match self.io(node) {
                Ok(io) => self.call("set cuts", io.set_cuts(self.id, self.epoch, cuts)).await,
                Err(e) => Err(e),
            };
            (node, r)
        }))
        .await;
        for (node, reply) in replies {
            let Err(e) = reply else { continue };
            let reason = match classify(&e) {
                Reaction::Stop(m) => {
                    self.stop_fenced(&m);
                    return Err(BlockError::Shutdown);
                }
                Reaction::Eject(reason) => reason,
                Reaction::Invalid(_) | Reaction::Repair | Reaction::Missing => EjectReason::ReplicaError,
            };
            warn!(volume = %self.id, %node, error = %e, "a replica node did not take the snapshot cuts: ejecting it");
            self.eject_everywhere(node, reason).await.map_err(|e: FrontendError| io_err(e))?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of the snapshot at `cut`, from in-sync
    /// replicas, every block verified by the replica. A chunk no in-sync
    /// replica held at the cut reads as zeros.
    pub async fn read_snapshot(&self, cut: Seq, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        self.check(offset, u64::from(len))?;
        self.check_serving()?;
        if !self.snapshots.lock().await.contains(&cut) {
            return Err(BlockError::Io(format!("volume {} has no snapshot at {cut}", self.id)));
        }
        let pieces = policy::split(offset, u64::from(len), self.chunk_size);
        let parts = join_all(pieces.iter().map(|&p| self.read_snapshot_piece(cut, p))).await;
        let mut buf = BytesMut::with_capacity(len as usize);
        for part in parts {
            buf.extend_from_slice(&part?);
        }
        Ok(buf.freeze())
    }

    async fn read_snapshot_piece(&self, cut: Seq, p: policy::Piece) -> Result<Bytes, BlockError> {
        let set = self.chunks[p.chunk.0 as usize].snapshot();
        let id = self.chunk_id(p.chunk);
        let order = policy::read_order(&set.in_sync, self.local_node, 0);
        let (mut missing, mut last) = (false, String::new());
        for node in order {
            let r = match self.io(node) {
                Ok(io) => {
                    self.call("read snapshot", io.read_snapshot(id, cut, p.offset, p.len as u32, self.epoch)).await
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(d) if d.len() as u64 == p.len => return Ok(d),
                Ok(d) => last = format!("{node}: read returned {} bytes, asked {}", d.len(), p.len),
                Err(ReplicaError::NoSuchChunk) => missing = true,
                Err(ReplicaError::Fenced(m)) => {
                    self.stop_fenced(&m);
                    return Err(BlockError::Shutdown);
                }
                // Read repair, as for live reads: the rotten copy is rewritten
                // from a verified one, whose data is the answer.
                Err(ReplicaError::ChecksumMismatch(m)) => {
                    warn!(volume = %self.id, chunk = p.chunk.0, %node, %cut, message = %m, "checksum mismatch in a snapshot read: repairing from another replica");
                    let mut corrupt = vec![node];
                    match self.rewrite_view_from_verified_copy(cut, p, &mut corrupt).await {
                        Rewrite::Done { data, source } => {
                            info!(volume = %self.id, chunk = p.chunk.0, %cut, corrupt = ?corrupt, %source, "snapshot copies rewritten from a verified copy");
                            return Ok(data);
                        }
                        Rewrite::WriteFailed { data, error } => {
                            warn!(volume = %self.id, chunk = p.chunk.0, %cut, %error, "rewriting a rotten snapshot copy failed; serving the verified copy");
                            return Ok(data);
                        }
                        Rewrite::Stopped => return Err(BlockError::Shutdown),
                        Rewrite::NoGoodCopy => {
                            last = format!("{node}: {m}; no other replica has a verified copy");
                            break;
                        }
                    }
                }
                Err(e) => last = format!("{node}: {e}"),
            }
        }
        if missing && last.is_empty() {
            return Ok(Bytes::from(vec![0u8; p.len as usize]));
        }
        Err(BlockError::Io(format!(
            "chunk {} at {cut}: no replica could serve the snapshot read (last: {last})",
            p.chunk
        )))
    }

    /// Rewrites piece `p` of the view at snapshot `cut` on every node in
    /// `corrupt` from a verified copy of that view on another in-sync replica
    /// (its data and its block contexts: each block keeps its seq, so the
    /// repaired copy holds the same version in the same layer). Sources that
    /// fail their checksum too join `corrupt`.
    ///
    /// No lock is taken: a view below a cut never changes (client writes go
    /// above every cut, and the layer they would overwrite is frozen first),
    /// so the source's data and contexts, read one after the other, describe
    /// the same versions, and no client write can race the rewrite.
    pub(crate) async fn rewrite_view_from_verified_copy(
        &self,
        cut: Seq,
        p: policy::Piece,
        corrupt: &mut Vec<NodeId>,
    ) -> Rewrite {
        let id = self.chunk_id(p.chunk);
        let set = self.chunks[p.chunk.0 as usize].snapshot();
        let (first, count) = (BlockIdx((p.offset / BLOCK_SIZE_U64) as u32), (p.len / BLOCK_SIZE_U64) as u32);
        let mut found = None;
        for node in set.in_sync.iter().copied() {
            if corrupt.contains(&node) {
                continue;
            }
            let read = async {
                let io = self.io(node)?;
                let data = self.call("read snapshot", io.read_snapshot(id, cut, p.offset, p.len as u32, self.epoch));
                let data = data.await?;
                let contexts = self.call("snapshot contexts", io.context_table_at(id, cut, first, count, self.epoch));
                Ok::<_, ReplicaError>((data, contexts.await?))
            };
            match read.await {
                Ok((data, contexts)) if data.len() as u64 == p.len && contexts.len() == count as usize => {
                    found = Some((data, contexts, node));
                    break;
                }
                Ok((data, _)) => {
                    warn!(volume = %self.id, chunk = p.chunk.0, %node, %cut, got = data.len(), asked = p.len, "short snapshot read from a repair source")
                }
                Err(ReplicaError::ChecksumMismatch(_)) => {
                    warn!(volume = %self.id, chunk = p.chunk.0, %node, %cut, offset = p.offset, "checksum mismatch on a snapshot repair source too");
                    corrupt.push(node);
                }
                Err(ReplicaError::Fenced(m)) => {
                    self.stop_fenced(&m);
                    return Rewrite::Stopped;
                }
                Err(e) => {
                    warn!(volume = %self.id, chunk = p.chunk.0, %node, %cut, error = %e, "a snapshot repair source could not serve the view")
                }
            }
        }
        let Some((data, contexts, source)) = found else { return Rewrite::NoGoodCopy };
        for &node in corrupt.iter() {
            let r = match self.io(node) {
                Ok(io) => {
                    let repair = io.repair_snapshot(id, cut, p.offset, &contexts, data.clone(), self.epoch);
                    self.call("repair snapshot", repair).await
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {}
                Err(ReplicaError::Fenced(m)) => {
                    self.stop_fenced(&m);
                    return Rewrite::Stopped;
                }
                Err(e) => return Rewrite::WriteFailed { data, error: BlockError::Io(format!("{node}: {e}")) },
            }
        }
        Rewrite::Done { data, source }
    }
}
