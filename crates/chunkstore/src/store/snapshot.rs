//! Snapshot layers of the chunk store (layout.rs, "Snapshot layers"): a
//! volume's cuts, freezing a chunk's live layer at its first write above a cut,
//! and reads and context tables that look through the layers.
//!
//! Every replica decides from seqs alone (the cuts, the write's seq, each
//! layer's lower bound), so replicas that get the same writes and cuts hold
//! the same versions in each view, whatever else differs between them.
//!
//! A frozen layer that no remaining cut reads as its top layer (no cut lies
//! between its lower bound and the lower bound of the layer above it) is
//! merged into the layer above and removed: [`ChunkStore::merge_layers`],
//! started in the background by `set_cuts` when cuts go, and when the same
//! cuts are set again (a front end re-attaching), which finishes a merge that
//! a crash interrupted.
//!
//! Resync and rebuild carry the views (module docs of `resync_write`, and
//! "Views in resync" below): a copied version goes to the layer its seq
//! belongs in, creating that layer when the chunk has none for it, so a
//! rebuilt replica ends with the same view at every cut as its source.

use super::*;

impl ChunkStore {
    /// The volume's snapshot cuts, ascending (empty: none).
    pub fn cuts(&self, volume: VolumeId) -> Arc<[Seq]> {
        let m = self.inner.cuts.read().unwrap_or_else(|p| p.into_inner());
        m.get(&volume).cloned().unwrap_or_else(|| Arc::from(Vec::new()))
    }

    /// Replaces the volume's snapshot cuts with `cuts` (ascending, distinct,
    /// above `Seq::ZERO`, at most [`layout::MAX_CUTS`]), fenced by `epoch`.
    /// A cut not there before must be above every cut there was: the front end
    /// takes a new cut above every seq it has issued. The list is persisted
    /// crash-safely before this returns (a replica restarted after a power
    /// cut must still freeze at the cut); the store's marker becomes version 2
    /// before the first cut is written, so a binary without snapshot layers
    /// refuses the store.
    ///
    /// Nothing is flushed here: a snapshot is exactly as durable as the volume
    /// at the cut. A write below the cut that was not flushed yet is in the
    /// live layer, which the volume's next flush syncs, and freezing a layer
    /// syncs it first; so once the volume is flushed after the cut, its
    /// snapshots are durable too. (A flush here would stall client I/O for
    /// every dirty chunk's fdatasync, measured: 35-46 ms per snapshot.)
    ///
    /// Removing a cut changes which views exist; layers it froze stay until
    /// their chunk is deleted (merging them: not built yet).
    pub async fn set_cuts(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<()> {
        let _one = self.inner.setting_cuts.lock().await;
        self.set_cuts_locked(volume, epoch, cuts).await
    }

    async fn set_cuts_locked(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<()> {
        layout::check_cuts(cuts).map_err(|m| StoreError::InvalidRequest(m.to_string()))?;
        let fence = self.fence(volume, epoch).await?;
        let _admin = self.inner.admin.lock().await;
        let old = self.cuts(volume);
        let newest_old = old.last().copied().unwrap_or(Seq::ZERO);
        let added: Vec<Seq> = cuts.iter().copied().filter(|c| !old.contains(c)).collect();
        if let Some(bad) = added.iter().find(|c| **c <= newest_old) {
            return Err(StoreError::InvalidRequest(format!(
                "new snapshot cut {bad} of volume {volume} is not above the newest existing cut {newest_old}"
            )));
        }
        if added.is_empty() && old.len() == cuts.len() {
            self.merge_in_background(volume);
            return Ok(());
        }
        let (dir, snapshots) = (self.inner.dir.clone(), self.inner.snapshots_dir.clone());
        let bytes = layout::encode_cuts_file(volume, cuts);
        let marker = !self.inner.marker_v2.load(Ordering::Acquire);
        tokio::task::spawn_blocking(move || -> Result<()> {
            if marker {
                replace_file(&dir, MARKER, &layout::encode_store_marker(2))?;
            }
            replace_file(&snapshots, &layout::cuts_file_name(volume), &bytes)
        })
        .await
        .map_err(|_| StoreError::Shutdown)??;
        self.inner.marker_v2.store(true, Ordering::Release);
        drop(fence);
        let mut m = self.inner.cuts.write().unwrap_or_else(|p| p.into_inner());
        if cuts.is_empty() {
            m.remove(&volume);
        } else {
            m.insert(volume, Arc::from(cuts.to_vec()));
        }
        drop(m);
        info!(volume = volume.0, cuts = cuts.len(), added = added.len(), "snapshot cuts set");
        if old.iter().any(|c| !cuts.contains(c)) {
            self.merge_in_background(volume);
        }
        Ok(())
    }

    /// Sets the volume's cuts as [`ChunkStore::set_cuts`] does, only if it has
    /// none here; returns whether it did. Decided under the lock `set_cuts`
    /// takes, so a front end's cuts set meanwhile are never replaced.
    pub async fn set_cuts_if_none(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<bool> {
        let _one = self.inner.setting_cuts.lock().await;
        if !self.cuts(volume).is_empty() {
            return Ok(false);
        }
        self.set_cuts_locked(volume, epoch, cuts).await?;
        Ok(true)
    }

    /// Runs [`ChunkStore::merge_layers`] for `volume` on its own task; a
    /// failure is logged (the next `set_cuts` or open tries again).
    pub(super) fn merge_in_background(&self, volume: VolumeId) {
        let store = self.clone();
        tokio::spawn(async move {
            match store.merge_layers(volume).await {
                Ok(0) => {}
                Ok(n) => info!(volume = volume.0, layers = n, "snapshot layers merged"),
                Err(e) => warn!(volume = volume.0, error = %e, "merging snapshot layers failed"),
            }
        });
    }

    /// Merges every frozen layer of `volume`'s chunks that no cut reads as its
    /// top layer into the layer above it, and removes it: its blocks that the
    /// layer above does not have are copied up with their seqs (under the
    /// chunk's range lock, so a client write that lands meanwhile wins), made
    /// durable, then its files are deleted. Every view stays the same, and
    /// the space of versions no view reads comes back. Returns the layers
    /// removed. Idempotent: a crash half-way leaves the layer, with some of
    /// its blocks also above; the next run finishes it.
    pub async fn merge_layers(&self, volume: VolumeId) -> Result<u64> {
        let _one = self.inner.merging.lock().await;
        let ids: Vec<ChunkId> = self.chunk_list().iter().filter(|c| c.id.volume == volume).map(|c| c.id).collect();
        let mut merged = 0;
        for id in ids {
            loop {
                let cuts = self.cuts(volume);
                let Some(top) = self.get(id) else { break };
                let stack = top.stack();
                let unread = (1..stack.len()).find(|&i| {
                    let (x, above) = (stack[i].lower, stack[i - 1].lower);
                    !cuts.iter().any(|c| x < *c && *c <= above)
                });
                let Some(i) = unread else { break };
                self.merge_one(&stack[i - 1], &stack[i]).await?;
                merged += 1;
            }
        }
        Ok(merged)
    }

    /// Copies `x`'s blocks that `above` lacks into `above`, syncs it, unlinks
    /// `x` from the stack and deletes its files.
    async fn merge_one(&self, above: &Arc<Chunk>, x: &Arc<Chunk>) -> Result<()> {
        const PIECE: u32 = 256;
        let bs = BLOCK_SIZE as usize;
        let blocks = (x.size / BLOCK_SIZE_U64) as u32;
        self.recovered(x).await?;
        self.recovered(above).await?;
        let mut copied = 0u64;
        let mut b0 = 0;
        while b0 < blocks {
            let b1 = (b0 + PIECE).min(blocks);
            let fence = self.fence_of(x.id.volume).lock.clone().read_owned().await;
            let top = self.chunk(x.id)?;
            let range = top.locks.lock(b0, b1, false).await;
            // Runs of blocks written below and not above, decided under the lock.
            let mut runs: Vec<(u32, u32)> = Vec::new();
            for b in b0..b1 {
                if x.written(b) && !above.written(b) {
                    match runs.last_mut() {
                        Some(r) if r.1 == b => r.1 += 1,
                        _ => runs.push((b, b + 1)),
                    }
                }
            }
            let locks = Arc::new(MutationLocks { _range: range, _fence: fence });
            for (r0, r1) in runs {
                let (off, n) = (r0 as u64 * BLOCK_SIZE_U64, (r1 - r0) as u64 * BLOCK_SIZE_U64);
                let o = (OpKind::Read(AlignedBuf::for_read(n as usize)), &x.data, off, n, Hold::none());
                let Done::Read(buf) = self.io("merge read", &x.data_path, o).await? else {
                    return Err(StoreError::Shutdown);
                };
                let mut contexts = Vec::with_capacity((r1 - r0) as usize);
                for (k, block) in buf.as_ref().chunks(bs).enumerate() {
                    let b = r0 + k as u32;
                    let crc = crc32fast::hash(block);
                    if !x.ctx.verifies(b, crc) {
                        warn!(chunk = %x.id, block = b, layer_above = %x.lower, "checksum mismatch while merging a snapshot layer");
                        return Err(StoreError::ChecksumMismatch { id: x.id, block: BlockIdx(b) });
                    }
                    let (seq, _) = x.ctx.current(b).unwrap_or((Seq::ZERO, crc));
                    contexts.push((seq, crc));
                }
                let writing = self.begin_write(above).await?;
                let hold = stage(writing, r0, r1, &locks, |b| contexts[(b - r0) as usize]);
                let o = (OpKind::Write(WriteBuf::Aligned(buf)), &above.data, off, n, hold);
                self.io("merge write", &above.data_path, o).await?;
                copied += u64::from(r1 - r0);
            }
            drop(locks);
            b0 = b1;
        }
        // Durable above before the layer below goes: then every view reads the
        // same from the stack without it.
        self.flush_many(vec![above.clone()]).await?;
        let all = above.locks.lock(0, blocks, false).await;
        *above.below.write().unwrap_or_else(|p| p.into_inner()) = x.below();
        drop(all);
        // The context file first: a data file without one is removed at open.
        self.remove_files(vec![x.ctx_path.clone(), x.data_path.clone()]).await?;
        if let Some(m) = &self.inner.metrics {
            m.layer(x.size, -1);
        }
        info!(chunk = %x.id, layer_above = %x.lower, blocks_copied = copied, "snapshot layer merged into the one above");
        Ok(())
    }

    /// Before a mutation at `seq` of chunk `id` (fenced by `epoch`): freezes its live layer if a
    /// cut lies between the layer's lower bound and `seq`, and starts a new live
    /// layer whose lower bound is the highest cut below `seq`.
    ///
    /// Invariant: a frozen layer is never written again by clients (only a
    /// merge copies blocks into it), and it is not synced here: it keeps its
    /// dirty mark, every flush of the volume syncs dirty frozen layers too
    /// (`flush_chunk`, `flush_volume`), and the recovery scan checks a dirty
    /// one before it is read. So freezing adds no fdatasync of the chunk's
    /// data to the client's write, and a flushed write is durable in whichever
    /// layer holds it. A crash before the new layer's context file is renamed
    /// into place leaves the old layer live.
    pub(super) async fn freeze_for(&self, id: ChunkId, seq: Seq, epoch: Epoch) -> Result<()> {
        let cuts = self.cuts(id.volume);
        match self.get(id) {
            Some(c) if needs_freeze(&cuts, c.lower, seq) => {}
            _ => return Ok(()),
        }
        let _fence = self.fence(id.volume, epoch).await?;
        let _admin = self.inner.admin.lock().await;
        let cuts = self.cuts(id.volume);
        let c = self.chunk(id)?;
        if !needs_freeze(&cuts, c.lower, seq) {
            return Ok(());
        }
        self.recovered(&c).await?;
        // Exclusive over the whole chunk: waits for every operation on it (a
        // mutation holds its blocks until its I/O completes).
        let _all = c.locks.lock(0, (c.size / BLOCK_SIZE_U64) as u32, false).await;
        debug_assert_eq!(c.state.lock().unwrap_or_else(|p| p.into_inner()).inflight, 0);
        let lower = cuts.iter().copied().filter(|x| *x < seq).max().unwrap_or(Seq::ZERO);
        let (dir, direct, size) = (self.inner.chunks_dir.clone(), self.inner.direct, c.size);
        let mut live = tokio::task::spawn_blocking(move || create_chunk_files(&dir, id, size, lower, direct))
            .await
            .map_err(|_| StoreError::Shutdown)??;
        live.locks = c.locks.clone();
        *live.below.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        c.retired.store(true, Ordering::Release);
        self.inner.chunks.write().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::new(live));
        if let Some(m) = &self.inner.metrics {
            m.layer(size, 1);
        }
        info!(chunk = %id, frozen_above = %c.lower, live_above = %lower, "snapshot layer frozen");
        Ok(())
    }

    /// Reads `len` bytes at `offset` of chunk `id` as they were at snapshot
    /// `cut` (one of the volume's cuts), every block verified: the versions of
    /// the layers whose lower bound is below the cut. `NoSuchChunk` if this
    /// replica did not hold the chunk at the cut (created after it): as for a
    /// live read, the caller asks the other replicas, and reads zeros when none
    /// held it.
    pub async fn read_snapshot(&self, id: ChunkId, cut: Seq, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes> {
        if !self.cuts(id.volume).contains(&cut) {
            return Err(StoreError::InvalidRequest(format!("volume {} has no snapshot cut {cut}", id.volume)));
        }
        check_aligned(offset, len as u64)?;
        drop(self.fence(id.volume, epoch).await?);
        let (c, b0, b1, _range) = self.lock_shared(id, offset, len as u64).await?;
        let view: Vec<Arc<Chunk>> = c.stack().into_iter().skip_while(|l| l.lower >= cut).collect();
        if view.is_empty() {
            // Created after the cut: this replica did not hold the chunk then.
            return Err(StoreError::NoSuchChunk(id));
        }
        self.read_layers(&view, b0, b1).await
    }

    /// Views in resync: as [`ChunkStore::resync_write`], for blocks of the
    /// source's view at snapshot `cut` (every seq below it). Afterwards this
    /// replica's view at `cut` holds, for every applied block, the source's
    /// version, whatever its live layer holds.
    ///
    /// Invariant (for [`ChunkStore::resync_write`] too): a version at seq `s`
    /// goes to the layer of the view that already answers for the block when
    /// that layer's lower bound is at or above `s` (it holds a version the
    /// source does not have, which must not keep shadowing the source's), and
    /// otherwise to the layer `s` belongs in: the one with the greatest lower
    /// bound below `s`, which has no cut between its lower bound and `s`
    /// (`ensure_layers` makes it exist first). So views at cuts
    /// below `s` do not see it, views at cuts above do, and copying the views
    /// bottom-up and then the live view (as the resync engine does) rebuilds
    /// every view a replica had, whichever order the front end's concurrent
    /// writes and cuts arrive in.
    #[allow(clippy::too_many_arguments)]
    pub async fn resync_write_at(
        &self,
        id: ChunkId,
        cut: Seq,
        offset: u64,
        blocks: &[ResyncBlock],
        data: Bytes,
        epoch: Epoch,
        protect_from: Seq,
    ) -> Result<ResyncOutcome> {
        if !self.cuts(id.volume).contains(&cut) {
            return Err(StoreError::InvalidRequest(format!("volume {} has no snapshot cut {cut}", id.volume)));
        }
        let span = tracing::debug_span!(
            "chunk_resync_write_at", volume = id.volume.0, chunk = id.chunk.0, offset, blocks = blocks.len(), %cut
        );
        self.resync_measured(span, id, offset, blocks, data, epoch, protect_from, Place::Resync(Some(cut))).await
    }

    /// Makes chunk `id` have, for every seq in `seqs` below its live layer, a
    /// frozen layer that version belongs in (see
    /// [`ChunkStore::resync_write_at`]): where the layer with the greatest
    /// lower bound below `s` has a cut between that bound and `s` (or there is
    /// none), a new empty layer with lower bound the highest cut below `s` is
    /// put into the stack at its place. An empty layer changes no view.
    /// Crash-safe: a layer exists once its context file is renamed into place,
    /// and the store reassembles a stack from the lower bounds in the names.
    pub(super) async fn ensure_layers(&self, id: ChunkId, seqs: &[Seq], epoch: Epoch) -> Result<()> {
        let missing = |c: &Arc<Chunk>, cuts: &[Seq]| -> Vec<Seq> {
            let stack = c.stack();
            let mut need: Vec<Seq> = Vec::new();
            for &s in seqs.iter().filter(|s| **s > Seq::ZERO && **s <= c.lower) {
                let lo = cuts.iter().copied().filter(|x| *x < s).max().unwrap_or(Seq::ZERO);
                let host = stack.iter().find(|l| l.lower < s);
                if host.is_none_or(|h| h.lower < lo) && !need.contains(&lo) {
                    need.push(lo);
                }
            }
            need
        };
        match self.get(id) {
            Some(c) if !missing(&c, &self.cuts(id.volume)).is_empty() => {}
            _ => return Ok(()),
        }
        let _fence = self.fence(id.volume, epoch).await?;
        let _admin = self.inner.admin.lock().await;
        let c = self.chunk(id)?;
        self.recovered(&c).await?;
        let _all = c.locks.lock(0, (c.size / BLOCK_SIZE_U64) as u32, false).await;
        for lo in missing(&c, &self.cuts(id.volume)) {
            let stack = c.stack();
            // The lowest layer above `lo` (the live one at least: `lo` is
            // below a seq at or below the live layer's lower bound).
            let Some(above) = stack.iter().rposition(|l| l.lower > lo) else {
                return Err(StoreError::InvalidRequest(format!("chunk {id} has no layer above {lo}")));
            };
            let (dir, direct, size) = (self.inner.chunks_dir.clone(), self.inner.direct, c.size);
            let mut layer = tokio::task::spawn_blocking(move || create_chunk_files(&dir, id, size, lo, direct))
                .await
                .map_err(|_| StoreError::Shutdown)??;
            layer.locks = c.locks.clone();
            layer.retired.store(true, Ordering::Release);
            *layer.below.get_mut().unwrap_or_else(|p| p.into_inner()) = stack[above].below();
            *stack[above].below.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(layer));
            if let Some(m) = &self.inner.metrics {
                m.layer(size, 1);
            }
            info!(chunk = %id, lower = %lo, under = %stack[above].lower, "snapshot layer added for copied versions");
        }
        Ok(())
    }

    /// Block contexts as [`ChunkStore::context_table`] reports them, of the
    /// view at snapshot `cut` (None: the live view).
    pub async fn context_table_at(
        &self,
        id: ChunkId,
        cut: Option<Seq>,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>> {
        drop(self.fence(id.volume, epoch).await?);
        let offset = first.0 as u64 * BLOCK_SIZE_U64;
        let (c, b0, b1, _range) = self.lock_shared(id, offset, count as u64 * BLOCK_SIZE_U64).await?;
        let stack = c.stack();
        let view: Vec<Arc<Chunk>> = match cut {
            Some(cut) => stack.into_iter().skip_while(|l| l.lower >= cut).collect(),
            None => stack,
        };
        for l in &view {
            self.recovered(l).await?;
        }
        Ok((b0..b1).map(|b| view_context(&view, b)).collect())
    }

    /// The live layer of `id` with blocks of [offset, +len) locked shared.
    pub(super) async fn lock_shared(
        &self,
        id: ChunkId,
        offset: u64,
        len: u64,
    ) -> Result<(Arc<Chunk>, u32, u32, RangeGuard)> {
        loop {
            let c = self.chunk(id)?;
            let (b0, b1) = check_range(&c, offset, len)?;
            self.recovered(&c).await?;
            let range = c.locks.lock(b0, b1, true).await;
            if !c.is_retired() {
                return Ok((c, b0, b1, range));
            }
        }
    }

    /// Reads blocks [b0, b1) through the layers of `view` (top first): each
    /// block from the first layer it is written in, verified against that
    /// layer's contexts; zeros where it is written in none. The caller holds
    /// the blocks shared.
    pub(super) async fn read_layers(&self, view: &[Arc<Chunk>], b0: u32, b1: u32) -> Result<Bytes> {
        let bs = BLOCK_SIZE as usize;
        let mut out = vec![0u8; (b1 - b0) as usize * bs];
        for l in view {
            self.recovered(l).await?;
        }
        // Each block's layer, decided once; then one read per run of blocks
        // from the same layer.
        let owners: Vec<Option<usize>> = (b0..b1).map(|b| owner(view, b)).collect();
        let mut b = b0;
        while b < b1 {
            let who = owners[(b - b0) as usize];
            let mut end = b + 1;
            while end < b1 && owners[(end - b0) as usize] == who {
                end += 1;
            }
            if let Some(i) = who {
                let l = &view[i];
                let (off, n) = (b as u64 * BLOCK_SIZE_U64, (end - b) as u64 * BLOCK_SIZE_U64);
                let o = (OpKind::Read(AlignedBuf::for_read(n as usize)), &l.data, off, n, Hold::none());
                let Done::Read(buf) = self.io("read", &l.data_path, o).await? else {
                    return Err(StoreError::Shutdown);
                };
                for (k, block) in buf.as_ref().chunks(bs).enumerate() {
                    let blk = b + k as u32;
                    if !l.ctx.verifies(blk, crc32fast::hash(block)) {
                        warn!(chunk = %l.id, block = blk, layer_above = %l.lower, "checksum mismatch");
                        return Err(StoreError::ChecksumMismatch { id: l.id, block: BlockIdx(blk) });
                    }
                }
                out[(b - b0) as usize * bs..(end - b0) as usize * bs].copy_from_slice(buf.as_ref());
            }
            b = end;
        }
        Ok(Bytes::from(out))
    }
}

/// The layer of `stack` (top first) a copied version at `seq` goes to, given
/// `top`, the layer of the view being copied that answers for the block now
/// (see [`ChunkStore::resync_write_at`]).
pub(super) fn destination(stack: &[Arc<Chunk>], top: Option<usize>, seq: Seq) -> Option<usize> {
    match top {
        Some(k) if stack[k].lower >= seq => Some(k),
        _ => stack.iter().position(|l| l.lower < seq).or_else(|| stack.iter().position(|l| l.lower == Seq::ZERO)),
    }
}

/// The context of `block` in `view` (top first): that of the layer it is
/// written in, else the bottom layer's (an empty slot: `Seq::ZERO` and the
/// zero block's crc; no usable slot: crc 0).
pub(super) fn view_context(view: &[Arc<Chunk>], block: u32) -> BlockContext {
    if view.is_empty() {
        // The chunk did not exist in this view.
        return BlockContext { crc: layout::zero_block_crc(), seq: Seq::ZERO };
    }
    let layer = owner(view, block).and_then(|i| view.get(i)).or(view.last());
    match layer.and_then(|l| l.ctx.current(block)) {
        Some((seq, crc)) => BlockContext { crc, seq },
        None => BlockContext { crc: 0, seq: Seq::ZERO },
    }
}
