//! What attach does before any I/O is served: announce the epoch to every
//! replica node (ejecting the unreachable ones), then reconcile the chunks a
//! previous front end left dirty (docs/DESIGN.md, 5.2 step 7).

use std::collections::BTreeSet;

use ballast_types::{BlockContext, BlockIdx, ChunkId, ChunkIdx, NodeId, BLOCK_SIZE_U64};
use bytes::Bytes;
use tracing::{debug, debug_span, info, warn, Instrument};

use super::{bump, join_all, Volume};
use crate::membership::{EjectReason, Membership};
use crate::policy::{self, classify, Reaction};
use crate::replica_io::{ReplicaError, ReplicaIo};
use crate::FrontendError;

/// Blocks per context-table request during reconciliation (20 bytes each on the wire).
const RECONCILE_BATCH_BLOCKS: u32 = 4096;

impl<M: Membership, R: ReplicaIo> Volume<M, R> {
    // ---- attach ---------------------------------------------------------------

    pub(super) async fn announce(&self) -> Result<(), FrontendError> {
        let holders = self.holders(true);
        let nodes: Vec<(NodeId, R)> = self.nodes().iter().map(|(&node, c)| (node, c.io.clone())).collect();
        let replies = self.announce_to(nodes).await?;
        for (node, reply) in replies {
            match reply {
                Ok(()) => {}
                Err(e) if holders.contains(&node) => {
                    warn!(volume = %self.id, %node, error = %e, "replica node unreachable or refused the epoch at attach: ejecting it");
                    self.eject_everywhere(node, EjectReason::AttachUnreachable).await?;
                }
                Err(e) => {
                    debug!(volume = %self.id, %node, error = %e, "node without replicas of the volume did not take the epoch")
                }
            }
        }
        Ok(())
    }

    /// Announces this attachment's epoch to `nodes`. A newer epoch anywhere is
    /// an error (another front end owns the volume); other failures are
    /// returned per node.
    pub(super) async fn announce_to(
        &self,
        nodes: Vec<(NodeId, R)>,
    ) -> Result<Vec<(NodeId, Result<(), ReplicaError>)>, FrontendError> {
        let replies = join_all(nodes.into_iter().map(|(node, io)| async move {
            (node, self.call("announce_epoch", io.announce_epoch(self.id, self.epoch)).await)
        }))
        .await;
        let mut out = Vec::with_capacity(replies.len());
        for (node, reply) in replies {
            let r = match reply {
                Ok(e) if e == self.epoch => {
                    debug!(volume = %self.id, %node, epoch = %e, "epoch announced");
                    Ok(())
                }
                Ok(e) if e > self.epoch => return Err(FrontendError::Fenced { node, epoch: e }),
                Err(ReplicaError::Fenced(m)) => {
                    warn!(volume = %self.id, %node, message = %m, "a newer front end holds the volume");
                    return Err(FrontendError::Fenced { node, epoch: self.epoch });
                }
                Ok(e) => Err(ReplicaError::Failed(format!("announce of {} answered with the older {e}", self.epoch))),
                Err(e) => Err(e),
            };
            out.push((node, r));
        }
        Ok(out)
    }

    /// Nodes holding an in-sync copy of at least one chunk, and with
    /// `rebuilding` also those rebuilding one.
    pub(super) fn holders(&self, rebuilding: bool) -> BTreeSet<NodeId> {
        let mut s = BTreeSet::new();
        for (_, c) in self.chunks.iter() {
            let set = c.snapshot();
            s.extend(set.in_sync.iter().copied());
            if rebuilding {
                s.extend(set.rebuilding.iter().copied());
            }
        }
        s
    }

    /// docs/DESIGN.md, 5.2 step 7: replicas keep a per-chunk dirty mark until a flush; the
    /// chunks dirty anywhere are made identical on all in-sync replicas
    /// before any I/O is served.
    pub(super) async fn reconcile(&self) -> Result<(), FrontendError> {
        let holders: Vec<NodeId> = self.holders(false).into_iter().collect();
        let replies = join_all(holders.iter().map(|&node| async move {
            let r = match self.io(node) {
                Ok(io) => self.call("list_dirty", io.list_dirty(self.id, self.epoch)).await,
                Err(e) => Err(e),
            };
            (node, r)
        }))
        .await;
        let mut dirty = BTreeSet::new();
        for (node, reply) in replies {
            match reply {
                Ok(list) => {
                    for c in list {
                        let in_sync = self.chunks.get(c.0 as usize).is_some_and(|s| s.snapshot().contains(node));
                        if in_sync {
                            dirty.insert(c);
                        }
                    }
                }
                Err(e) => self.attach_failure(node, None, &e).await?,
            }
        }
        if !dirty.is_empty() {
            info!(volume = %self.id, chunks = dirty.len(), "reconciling chunks left dirty by the previous front end");
        }
        for chunk in dirty {
            self.reconcile_chunk(chunk)
                .instrument(debug_span!("reconcile", volume = %self.id, chunk = chunk.0))
                .await?;
        }
        Ok(())
    }

    /// A replica failed during attach: fenced stops the attach; anything else
    /// ejects it (from `chunk`, or everywhere).
    async fn attach_failure(
        &self,
        node: NodeId,
        chunk: Option<ChunkIdx>,
        e: &ReplicaError,
    ) -> Result<(), FrontendError> {
        let reason = match classify(e) {
            Reaction::Stop(_) => return Err(FrontendError::Fenced { node, epoch: self.epoch }),
            Reaction::Eject(r) => r,
            Reaction::Invalid(_) | Reaction::Repair | Reaction::Missing => EjectReason::ReplicaError,
        };
        warn!(volume = %self.id, %node, error = %e, "replica failed during attach: ejecting it");
        match chunk {
            Some(c) => self.eject(c, node, reason).await,
            None => self.eject_everywhere(node, reason).await,
        }
    }

    async fn reconcile_chunk(&self, chunk: ChunkIdx) -> Result<(), FrontendError> {
        let id = self.chunk_id(chunk);
        let blocks = (self.chunk_len(chunk) / BLOCK_SIZE_U64) as u32;
        let mut missing: BTreeSet<NodeId> = BTreeSet::new();
        let mut rebuilding_seen: BTreeSet<NodeId> = BTreeSet::new();
        let mut copied = 0u64;
        let mut first = 0u32;
        while first < blocks {
            let count = RECONCILE_BATCH_BLOCKS.min(blocks - first);
            let set = self.chunks[chunk.0 as usize].snapshot();
            if set.in_sync.len() < 2 {
                break;
            }
            let replies = join_all(set.in_sync.iter().map(|&node| async move {
                let r = match self.io(node) {
                    Ok(io) => {
                        self.call("context_table", io.context_table(id, BlockIdx(first), count, self.epoch)).await
                    }
                    Err(e) => Err(e),
                };
                (node, r)
            }))
            .await;
            let mut tables = Vec::with_capacity(replies.len());
            for (node, reply) in replies {
                match reply {
                    Ok(t) if t.len() == count as usize => tables.push((node, t)),
                    Ok(t) => {
                        let e = ReplicaError::Failed(format!("context table of {} entries, asked {count}", t.len()));
                        self.attach_failure(node, Some(chunk), &e).await?;
                    }
                    Err(ReplicaError::NoSuchChunk) => {
                        missing.insert(node);
                        tables.push((node, vec![BlockContext::default(); count as usize]));
                    }
                    Err(e) => self.attach_failure(node, Some(chunk), &e).await?,
                }
            }
            for run in policy::plan_reconcile(BlockIdx(first), &tables) {
                // A replica that lacks the chunk cannot serve a read (the
                // plan makes none a source: a winning default context loses
                // every tie); should one be, its content is zeros.
                let sources: Vec<NodeId> = run.sources.iter().copied().filter(|n| !missing.contains(n)).collect();
                let data = if sources.is_empty() {
                    Bytes::from(vec![0u8; run.byte_len() as usize])
                } else {
                    self.read_from_any(id, run.byte_offset(), run.byte_len() as u32, &sources).await?
                };
                // The winning content is written to every in-sync replica (the
                // sources too) under a fresh seq of this epoch: a write's seq
                // epoch is also its fencing epoch on the wire, so the original
                // (older-epoch) seq would be refused as stale. Writing all of
                // them keeps the contexts identical, so later comparisons
                // (rebuild, the next reconcile) see no difference.
                //
                // Rebuilding replicas get them too (every write goes to them),
                // and may be missing the chunk; their failure only ejects them.
                let seq = self.next_seq();
                let rebuilding = self.chunks[chunk.0 as usize].snapshot().rebuilding.clone();
                for &n in &rebuilding {
                    if rebuilding_seen.insert(n) {
                        missing.insert(n);
                    }
                }
                for &target in run.targets.iter().chain(&run.sources).chain(&rebuilding) {
                    let r = async {
                        let io = self.io(target)?;
                        if missing.contains(&target) {
                            match self
                                .call("create_chunk", io.create_chunk(id, self.chunk_len(chunk), self.epoch))
                                .await
                            {
                                Ok(()) | Err(ReplicaError::ChunkExists) => {}
                                Err(e) => return Err(e),
                            }
                        }
                        self.call("write", io.write(id, run.byte_offset(), data.clone(), seq, false)).await
                    }
                    .await;
                    match r {
                        Ok(()) => {
                            missing.remove(&target);
                        }
                        Err(e) => self.attach_failure(target, Some(chunk), &e).await?,
                    }
                }
                copied += u64::from(run.count);
                debug!(volume = %self.id, chunk = chunk.0, first = run.first.0, count = run.count, winner = %run.seq, %seq, "reconciled blocks");
            }
            first += count;
        }
        // Flush on every replica written to: makes the copies durable and
        // clears the dirty marks.
        let set = self.chunks[chunk.0 as usize].snapshot();
        let replies = join_all(set.write_targets().map(|node| async move {
            let r = match self.io(node) {
                Ok(io) => self.call("flush_chunk", io.flush_chunk(id, self.epoch)).await,
                Err(e) => Err(e),
            };
            (node, r)
        }))
        .await;
        for (node, reply) in replies {
            match reply {
                Ok(()) | Err(ReplicaError::NoSuchChunk) => {}
                Err(e) => self.attach_failure(node, Some(chunk), &e).await?,
            }
        }
        bump(&self.stats.reconciled_blocks, copied);
        info!(volume = %self.id, chunk = chunk.0, blocks = copied, "dirty chunk reconciled");
        Ok(())
    }

    async fn read_from_any(
        &self,
        id: ChunkId,
        offset: u64,
        len: u32,
        sources: &[NodeId],
    ) -> Result<Bytes, FrontendError> {
        let mut last = String::from("no source replica");
        for &node in sources {
            let r = match self.io(node) {
                Ok(io) => self.call("read", io.read(id, offset, len, self.epoch)).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(d) if d.len() == len as usize => return Ok(d),
                Ok(d) => last = format!("{node} returned {} bytes, asked {len}", d.len()),
                Err(e) => last = format!("{node}: {e}"),
            }
        }
        Err(FrontendError::Reconcile { chunk: id.chunk, message: last })
    }
}
