//! A chunk's state in an attached volume: the replica set it uses and the locks
//! that order writes, repairs and set changes; and the membership changes made
//! through it (ejections, durably, before any acknowledgement without the node).
//!
//! I/O path file (see the module docs of `volume`).

use std::sync::Arc;
use std::sync::RwLock as StdRwLock;

use ballast_blockdev::{BlockDev, BlockError};
use ballast_types::{ChunkIdx, NodeId};
use tokio::sync::{Mutex as AsyncMutex, RwLock as AsyncRwLock};
use tracing::{debug, info, warn};

use super::{bump, io_err, Volume};
use crate::membership::{EjectReason, Membership, MembershipError, ReplicaSet};
use crate::policy::{install_set, WriteFailure, WritePlan};
use crate::replica_io::ReplicaIo;
use crate::FrontendError;

pub(crate) struct ChunkState {
    /// The replica set this attachment uses: writes go to `in_sync` and
    /// `rebuilding`, reads to `in_sync`. Changed by ejections (members leave)
    /// and by [`Volume::apply_layout`] (members join, get promoted, retire).
    /// A replica ejected within this attachment is never read from again unless
    /// a newer layout brings it back as rebuilding and then promotes it (see
    /// [`policy::install_set`]).
    set: StdRwLock<Arc<ReplicaSet>>,
    /// Serializes changes of `set` (one membership change at a time) and holds
    /// what only those changes need.
    pub(super) membership: AsyncMutex<SetControl>,
    /// Client writes (and trims, zeroes) hold it shared from before they look
    /// at `set` and take their seq until their replies are in; a repair (read
    /// repair, scrub) holds it exclusively, so a repair can never write old
    /// data over a newer acknowledged write, nor under a seq newer than a
    /// write that waited for it;
    /// `apply_layout` holds it exclusively while it swaps in a new set.
    /// Lock order: `order`, then `membership`.
    pub(super) order: AsyncRwLock<()>,
    /// Set once the chunk holds its data: at once for every chunk but a
    /// clone's unfilled ones, which get it from the clone's source first
    /// (volume/fill.rs); client I/O to the chunk waits for it.
    pub(super) filled: tokio::sync::OnceCell<()>,
}

/// The part of a chunk's state only set changes look at.
#[derive(Default)]
pub(super) struct SetControl {
    /// Members the provider calls in sync that this attachment does not read
    /// from: they missed writes (see [`policy::install_set`]).
    pub(super) write_only: Vec<NodeId>,
    /// An ejection's answer named members this attachment has not installed
    /// (no connection, no epoch, no ordering): the set is behind its version,
    /// so a layout of the same version is still installed.
    pub(super) behind: bool,
}

impl ChunkState {
    pub(super) fn new(set: ReplicaSet) -> Self {
        Self::with_data(set, true)
    }

    /// A chunk's state; `filled` false: a clone's chunk still to be copied
    /// from its source.
    pub(super) fn with_data(set: ReplicaSet, filled: bool) -> Self {
        ChunkState {
            set: StdRwLock::new(Arc::new(set)),
            membership: AsyncMutex::new(SetControl::default()),
            order: AsyncRwLock::new(()),
            filled: if filled { tokio::sync::OnceCell::new_with(Some(())) } else { tokio::sync::OnceCell::new() },
        }
    }

    pub(crate) fn snapshot(&self) -> Arc<ReplicaSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn install(&self, set: ReplicaSet) {
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
    }
}

impl<M: Membership, R: ReplicaIo> Volume<M, R> {
    // ---- membership changes -------------------------------------------------

    /// Removes `node` from `chunk`'s in-sync or rebuilding set, durably, before
    /// returning Ok. Refuses (and ejects nobody) when fewer than min-in-sync
    /// in-sync replicas would remain; removing a rebuilding replica has no
    /// such limit.
    pub(crate) async fn eject(&self, chunk: ChunkIdx, node: NodeId, reason: EjectReason) -> Result<(), FrontendError> {
        let state = &self.chunks[chunk.0 as usize];
        let mut control = state.membership.lock().await;
        for _ in 0..4 {
            let set = state.snapshot();
            if !set.is_member(node) {
                return Ok(());
            }
            let min = self.min_in_sync();
            if set.contains(node) && set.in_sync.len() - 1 < min {
                return Err(FrontendError::BelowMinInSync { chunk, node, remaining: set.in_sync.len() - 1, min });
            }
            let committed = self.membership.eject(self.id, chunk, set.version, node, reason).await?;
            // Never admit a replica through an ejection's answer: keep only
            // members this attachment already writes to (install_set with
            // admit_new = false); a newer layout, not a membership answer,
            // brings one back (apply_layout).
            let next = install_set(&set, &control.write_only, &committed, false);
            if !next.left_out.is_empty() {
                debug!(volume = %self.id, chunk = chunk.0, version = committed.version, left_out = ?next.left_out, "ejection answer names members not installed yet; waiting for the layout");
            }
            let gone = !next.set.is_member(node);
            let changed = committed.version != set.version;
            control.write_only = next.write_only;
            control.behind = !next.left_out.is_empty();
            state.install(next.set);
            if gone {
                bump(&self.stats.ejections, 1);
                let role = if set.contains(node) { "in-sync" } else { "rebuilding" };
                info!(volume = %self.id, chunk = chunk.0, %node, %reason, version = committed.version, role, "replica ejected");
                return Ok(());
            }
            if !changed {
                return Err(FrontendError::Membership(MembershipError::Unavailable(format!(
                    "eject of {node} from chunk {chunk} was not applied"
                ))));
            }
        }
        Err(FrontendError::Membership(MembershipError::Unavailable(format!(
            "eject of {node} from chunk {chunk}: the set kept changing"
        ))))
    }

    /// Ejects `node` from every chunk whose set (in sync or rebuilding) holds it.
    pub(super) async fn eject_everywhere(&self, node: NodeId, reason: EjectReason) -> Result<(), FrontendError> {
        for (i, c) in self.chunks.iter() {
            if c.snapshot().is_member(node) {
                self.eject(ChunkIdx(i as u32), node, reason).await?;
            }
        }
        Ok(())
    }

    /// Executes a write plan: ejections first, durably, then the verdict.
    pub(super) async fn finish(&self, chunk: ChunkIdx, plan: WritePlan) -> Result<(), BlockError> {
        match plan {
            WritePlan::Ack => Ok(()),
            WritePlan::EjectThenAck(failed) => {
                for (node, reason) in failed {
                    // Invariant: no acknowledgement without this node unless the
                    // ejection is committed first.
                    self.eject(chunk, node, reason).await.map_err(io_err)?;
                }
                Ok(())
            }
            WritePlan::Fail(WriteFailure::Fenced(m)) => {
                self.stop_fenced(&m);
                Err(BlockError::Shutdown)
            }
            WritePlan::Fail(WriteFailure::Invalid(m)) => {
                warn!(volume = %self.id, chunk = chunk.0, message = %m, "replica rejected a request as invalid");
                Err(BlockError::OutOfRange { offset: u64::from(chunk.0) * self.chunk_size, len: 0, size: self.size() })
            }
            WritePlan::Fail(WriteFailure::BelowMinInSync { failed, remaining, rebuilding_failed, no_space }) => {
                let min = self.min_in_sync();
                warn!(volume = %self.id, chunk = chunk.0, ?failed, remaining, min, "write failed: too few in-sync replicas would remain");
                // The write fails anyway; a rebuilding replica that missed what
                // the in-sync ones may have must still not be promoted.
                for (node, reason) in rebuilding_failed {
                    if let Err(e) = self.eject(chunk, node, reason).await {
                        warn!(volume = %self.id, chunk = chunk.0, %node, error = %e, "could not eject a failed rebuilding replica");
                    }
                }
                let what = format!(
                    "chunk {chunk}: {} in-sync replicas failed, {remaining} left, min-in-sync {min}",
                    failed.len(),
                );
                if no_space {
                    // The disks filled before the thin volume did: ENOSPC, as
                    // a local disk would answer, so filesystems report it.
                    return Err(BlockError::NoSpace(format!("{what}: their disks are full")));
                }
                Err(BlockError::Io(what))
            }
        }
    }
}
