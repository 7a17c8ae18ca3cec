//! Following a newer layout while attached ([`Volume::apply_layout`]): new
//! rebuilding replicas, promotions, retirements, new nodes, growth.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ballast_types::{is_block_aligned, ChunkIdx, NodeId, VolumeId};
use tracing::{debug_span, info, warn, Instrument};

use super::{bump, ChunkState, NodeConn, NodeMap, Volume};
use crate::membership::{EjectReason, Membership, ReplicaSet, VolumeLayout};
use crate::policy::{classify, install_set, Reaction};
use crate::replica_io::ReplicaIo;
use crate::FrontendError;

impl<M: Membership, R: ReplicaIo> Volume<M, R> {
    /// Follows a newer layout of this volume while attached: installs the set
    /// of every chunk whose version is newer than the one this volume uses (or
    /// equal, when an ejection's answer left it behind its version), and
    /// returns how many chunks changed. A stale layout changes nothing (Ok(0)),
    /// except where an ejection meanwhile committed a newer set that names
    /// members this volume has not installed (a change made by the provider
    /// after the layout was read): those chunks are reported in
    /// [`FrontendError::LayoutOutdated`] (the other chunks are installed) and
    /// the caller must apply a newer layout before it relies on the guarantee
    /// below for them;
    /// a layout of another volume, or one with a different chunk size or a
    /// smaller size, is an error and changes nothing. A larger size (the volume
    /// grew) is served once this returns: the new chunks' nodes are connected
    /// and told the epoch like any new member, then their states are added, and
    /// only then is the size raised. Only a volume of whole chunks grows (a
    /// replica's chunk file has the chunk's length from its creation).
    ///
    /// Nodes the new sets name that this volume has no connection to (or whose
    /// address changed) are connected with the attach-time connector and told
    /// the volume's epoch before any write goes to them; one that cannot take
    /// the epoch is ejected (through the membership) from the chunks that name
    /// it before its set is installed. A newer epoch on any of them stops the
    /// volume (another front end owns it) and returns `Fenced`.
    ///
    /// ORDERING GUARANTEE (the rebuild copier relies on it): when this returns
    /// Ok, for every changed chunk
    ///   (a) every write, trim or write-zeroes that reaches the chunk's fan-out
    ///       afterwards goes to the new set's in-sync and rebuilding replicas;
    ///   (b) none that was fanned out to the old set is still in flight (its
    ///       replies are in and its ejections committed).
    /// Kept by the chunk's `order` lock: every write takes it shared before it
    /// reads the set and releases it only after its plan is executed, and the
    /// set is swapped with the lock held exclusively (so the swap waits for
    /// every write that read the old set, and writes after it read the new one).
    /// Chunks are swapped one at a time; the guarantee holds for all of them
    /// once this returns. Reads take no `order` lock: one that picked a replica
    /// of the old set may still complete from it, which is harmless (it held
    /// every acknowledged write when the read started).
    pub async fn apply_layout(&self, layout: &VolumeLayout) -> Result<u64, FrontendError> {
        let span = debug_span!("apply_layout", volume = %self.id, epoch = %self.epoch);
        self.apply_layout_inner(layout).instrument(span).await
    }

    async fn apply_layout_inner(&self, layout: &VolumeLayout) -> Result<u64, FrontendError> {
        validate_layout(self.id, layout)?;
        let bad = |message: String| Err(FrontendError::Layout { volume: self.id, message });
        if layout.chunk_size != self.chunk_size {
            return bad(format!("chunk size changed from {} to {}", self.chunk_size, layout.chunk_size));
        }
        let size = self.size.load(Ordering::Acquire);
        if layout.size < size {
            return bad(format!("size shrank from {size} to {}", layout.size));
        }
        if layout.size > size && !size.is_multiple_of(self.chunk_size) {
            return bad(format!("grew from {size} bytes, not a whole number of {}-byte chunks", self.chunk_size));
        }
        if self.is_stopped() {
            return Err(FrontendError::Stopped(self.id));
        }
        let _one_layout_at_a_time = self.reconfigure.lock().await;
        if layout.min_in_sync != self.min_in_sync() {
            info!(volume = %self.id, from = self.min_in_sync(), to = layout.min_in_sync, "min-in-sync changed");
            self.min_in_sync.store(layout.min_in_sync, Ordering::Relaxed);
        }

        // 1. The chunks whose set is newer than ours. Rechecked under the
        //    chunk's locks before the swap (an ejection may have moved on).
        let mut changed: Vec<(ChunkIdx, ReplicaSet)> = Vec::new();
        let mut outdated: Vec<ChunkIdx> = Vec::new();
        let have = self.chunks.count();
        // The chunks a growth added (under `reconfigure`: nothing else appends).
        let mut added: Vec<(ChunkIdx, ReplicaSet)> =
            layout.chunks.iter().enumerate().skip(have).map(|(i, c)| (ChunkIdx(i as u32), c.clone())).collect();
        for (i, next) in layout.chunks.iter().enumerate().take(have) {
            let state = &self.chunks[i];
            let behind = state.membership.lock().await.behind;
            match compare(next, &state.snapshot(), behind) {
                Verdict::Install => changed.push((ChunkIdx(i as u32), next.clone())),
                Verdict::Current => {}
                Verdict::Outdated => outdated.push(ChunkIdx(i as u32)),
            }
        }
        if changed.is_empty() && outdated.is_empty() && added.is_empty() {
            return Ok(0);
        }

        // 2. Connections (and the epoch) for the nodes that need one, before
        //    any set names them.
        let nodes = self.nodes();
        let mut fresh: Vec<NodeConn<R>> = Vec::new();
        for (_, set) in changed.iter().chain(&added) {
            for n in set.write_targets() {
                let Some(replica) = layout.node(n) else { continue }; // validated: cannot happen
                let known = nodes.get(&n).is_some_and(|c| c.replica.addr == replica.addr);
                if !known && !fresh.iter().any(|c| c.replica.node == n) {
                    fresh.push(NodeConn { replica: replica.clone(), io: (self.connect)(replica) });
                }
            }
        }
        let mut unreachable: Vec<(NodeId, EjectReason)> = Vec::new();
        if !fresh.is_empty() {
            let targets: Vec<(NodeId, R)> = fresh.iter().map(|c| (c.replica.node, c.io.clone())).collect();
            let replies = match self.announce_to(targets).await {
                Ok(r) => r,
                Err(e) => {
                    self.stop_fenced(&e.to_string());
                    return Err(e);
                }
            };
            for (node, reply) in replies {
                if let Err(e) = reply {
                    let reason = match classify(&e) {
                        Reaction::Eject(r) => r,
                        _ => EjectReason::ReplicaError,
                    };
                    warn!(volume = %self.id, %node, error = %e, "new replica node did not take the epoch: ejecting it");
                    unreachable.push((node, reason));
                }
            }
            let mut next: NodeMap<R> =
                nodes.iter().map(|(n, c)| (*n, NodeConn { replica: c.replica.clone(), io: c.io.clone() })).collect();
            for c in fresh {
                info!(volume = %self.id, node = %c.replica.node, addr = %c.replica.addr, "replica node connected");
                next.insert(c.replica.node, c);
            }
            *self.nodes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        }

        // 2b. The snapshot cuts to every node that becomes a write target of
        //    this volume, before the swap sends it a write: a write above a cut
        //    to a replica that does not know the cut would not freeze its layer.
        //    Held until the sets are swapped, so a snapshot taken meanwhile
        //    (which sends its cut to the holders of the sets it sees) waits.
        let cuts = self.snapshots.lock().await;
        if !cuts.is_empty() {
            let holders = self.holders(true);
            let newcomers: BTreeSet<NodeId> = changed
                .iter()
                .chain(&added)
                .flat_map(|(_, set)| set.write_targets())
                .filter(|n| !holders.contains(n) && !unreachable.iter().any(|(u, _)| u == n))
                .collect();
            for node in newcomers {
                let r = match self.io(node) {
                    Ok(io) => self.call("set cuts", io.set_cuts(self.id, self.epoch, &cuts)).await,
                    Err(e) => Err(e),
                };
                let Err(e) = r else {
                    info!(volume = %self.id, %node, cuts = cuts.len(), "snapshot cuts sent to a new replica node");
                    continue;
                };
                let reason = match classify(&e) {
                    Reaction::Stop(m) => {
                        self.stop_fenced(&m);
                        return Err(FrontendError::Stopped(self.id));
                    }
                    Reaction::Eject(r) => r,
                    _ => EjectReason::ReplicaError,
                };
                warn!(volume = %self.id, %node, error = %e, "new replica node did not take the snapshot cuts: ejecting it");
                unreachable.push((node, reason));
            }
        }

        // 3. Eject the nodes that could not take the epoch from the new sets,
        //    durably, before they are installed (no write waits for them).
        for (chunk, set) in changed.iter_mut().chain(added.iter_mut()) {
            for &(node, reason) in &unreachable {
                if set.is_member(node) {
                    *set = self.membership.eject(self.id, *chunk, set.version, node, reason).await?;
                    if !set.is_member(node) {
                        bump(&self.stats.ejections, 1);
                        info!(volume = %self.id, chunk = chunk.0, %node, %reason, version = set.version, "replica ejected before joining");
                    }
                }
            }
        }

        // 4. Swap the sets, one chunk at a time.
        let mut count = 0;
        for (chunk, next) in changed {
            let state = &self.chunks[chunk.0 as usize];
            // Invariant (the ORDERING GUARANTEE above): the swap happens with
            // `order` held exclusively, so it waits for every write that read
            // the old set, and every later write reads the new one.
            let _no_write_in_flight = state.order.write().await;
            let mut control = state.membership.lock().await;
            let cur = state.snapshot();
            match compare(&next, &cur, control.behind) {
                Verdict::Install => {}
                Verdict::Current => continue,
                Verdict::Outdated => {
                    outdated.push(chunk);
                    continue;
                }
            }
            let installed = install_set(&cur, &control.write_only, &next, true);
            for n in installed.write_only.iter().filter(|n| !control.write_only.contains(n)) {
                warn!(volume = %self.id, chunk = chunk.0, node = %n, version = next.version, "in sync in the layout, but this attachment never sent it writes: writing to it, not reading from it");
            }
            info!(volume = %self.id, chunk = chunk.0, from = cur.version, to = next.version, in_sync = ?installed.set.in_sync, rebuilding = ?installed.set.rebuilding, "replica set changed");
            control.write_only = installed.write_only;
            control.behind = false;
            state.install(installed.set);
            count += 1;
        }

        // 5. Growth: the new chunks' states, then the size that reaches them.
        if !added.is_empty() {
            let n = added.len() as u64;
            for (chunk, set) in added {
                let at = self.chunks.push(ChunkState::new(set));
                debug_assert_eq!(at, chunk.0 as usize, "chunk states are appended in index order");
            }
            self.size.store(layout.size, Ordering::Release);
            if let Some(m) = &self.metrics {
                m.set_size(layout.size);
            }
            info!(volume = %self.id, from = size, to = layout.size, chunks = self.chunks.count(), "volume grew: serving the new size");
            count += n;
        }
        if !outdated.is_empty() {
            warn!(volume = %self.id, chunks = ?outdated, "layout outdated for some chunks: a newer layout must be applied");
            return Err(FrontendError::LayoutOutdated { volume: self.id, chunks: outdated, installed: count });
        }
        Ok(count)
    }
}

/// What a layout's set means for the one a chunk uses.
enum Verdict {
    /// Newer (or the same version, which `cur` is behind of): install it.
    Install,
    /// Not newer, and `cur` has every member of its own version: nothing to do.
    Current,
    /// Older than `cur`, which is behind its own version (an ejection's answer
    /// named members not installed): neither set has every member, so only a
    /// newer layout can bring the chunk up to date.
    Outdated,
}

fn compare(next: &ReplicaSet, cur: &ReplicaSet, behind: bool) -> Verdict {
    if next.version > cur.version || (behind && next.version == cur.version) {
        Verdict::Install
    } else if behind {
        Verdict::Outdated
    } else {
        Verdict::Current
    }
}

pub(super) fn validate_layout(volume: VolumeId, l: &VolumeLayout) -> Result<(), FrontendError> {
    let bad = |m: String| Err(FrontendError::Layout { volume, message: m });
    if l.volume != volume {
        return bad(format!("layout is for {}", l.volume));
    }
    if l.size == 0 || !is_block_aligned(l.size) || l.chunk_size == 0 || !is_block_aligned(l.chunk_size) {
        return bad(format!("size {} / chunk size {} not whole blocks", l.size, l.chunk_size));
    }
    if l.chunk_count() != l.chunks.len() as u64 {
        return bad(format!("{} chunk sets for {} chunks", l.chunks.len(), l.chunk_count()));
    }
    if l.min_in_sync == 0 {
        return bad("min-in-sync is 0".into());
    }
    for (i, c) in l.chunks.iter().enumerate() {
        if c.in_sync.len() < l.min_in_sync {
            return Err(FrontendError::BelowMinInSync {
                chunk: ChunkIdx(i as u32),
                node: c.ejected.last().map_or(NodeId(0), |e| e.0),
                remaining: c.in_sync.len(),
                min: l.min_in_sync,
            });
        }
        if let Some(n) = c.write_targets().find(|n| l.node(*n).is_none()) {
            return bad(format!("chunk {i} is placed on unknown {n}"));
        }
        let members: Vec<NodeId> = c.write_targets().collect();
        if let Some((k, n)) = members.iter().enumerate().find(|(k, n)| members[..*k].contains(n)) {
            let role = if k < c.in_sync.len() { "in sync" } else { "rebuilding" };
            return bad(format!("chunk {i} lists {n} twice (the second time {role})"));
        }
    }
    Ok(())
}
