//! Snapshot layers of the chunk store (layout.rs, "Snapshot layers"): a
//! volume's cuts, freezing a chunk's live layer at its first write above a cut,
//! and reads and context tables that look through the layers.
//!
//! Every replica decides from seqs alone (the cuts, the write's seq, each
//! layer's lower bound), so replicas that get the same writes and cuts hold
//! the same versions in each view, whatever else differs between them.
//!
//! Not built yet: copying frozen layers in resync and rebuild, and merging a
//! layer into the one above when the snapshots that read it are deleted (the
//! space of a deleted snapshot is reclaimed when its chunk is deleted).

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
    /// takes a new cut above every seq it has issued. Adding cuts first makes
    /// the volume's chunks durable (a snapshot's blocks are then on disk), then
    /// persists the list crash-safely; the store's marker becomes version 2
    /// before the first cut is written, so a binary without snapshot layers
    /// refuses the store.
    ///
    /// Removing a cut changes which views exist; layers it froze stay until
    /// their chunk is deleted (merging them: not built yet).
    pub async fn set_cuts(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<()> {
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
            return Ok(());
        }
        if !added.is_empty() {
            drop(fence);
            self.flush_volume(volume, epoch).await?;
        }
        let (dir, snapshots) = (self.inner.dir.clone(), self.inner.snapshots_dir.clone());
        let bytes = layout::encode_cuts_file(volume, cuts);
        tokio::task::spawn_blocking(move || -> Result<()> {
            replace_file(&dir, MARKER, &layout::encode_store_marker(2))?;
            replace_file(&snapshots, &layout::cuts_file_name(volume), &bytes)
        })
        .await
        .map_err(|_| StoreError::Shutdown)??;
        let mut m = self.inner.cuts.write().unwrap_or_else(|p| p.into_inner());
        if cuts.is_empty() {
            m.remove(&volume);
        } else {
            m.insert(volume, Arc::from(cuts.to_vec()));
        }
        info!(volume = volume.0, cuts = cuts.len(), added = added.len(), "snapshot cuts set");
        Ok(())
    }

    /// Before a mutation at `seq` of chunk `id` (fenced by `epoch`): freezes its live layer if a
    /// cut lies between the layer's lower bound and `seq`, and starts a new live
    /// layer whose lower bound is the highest cut below `seq`.
    ///
    /// Invariant: a frozen layer is durable and clean before the layer above it
    /// exists (fdatasync of data and contexts, dirty mark cleared and synced,
    /// then the new layer's context file renamed into place), and it is never
    /// written again. A crash before the rename leaves the old layer live.
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
        self.datasync(&c.data, &c.data_path).await?;
        self.datasync(&c.ctx_fd, &c.ctx_path).await?;
        {
            let mut st = c.state.lock().unwrap_or_else(|p| p.into_inner());
            debug_assert_eq!(st.inflight, 0);
            c.ctx.set_dirty(false);
            st.dirty = false;
        }
        self.datasync(&c.ctx_fd, &c.ctx_path).await?;
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
    /// the layers whose lower bound is below the cut. A chunk created after the
    /// cut reads as zeros.
    pub async fn read_snapshot(&self, id: ChunkId, cut: Seq, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes> {
        if !self.cuts(id.volume).contains(&cut) {
            return Err(StoreError::InvalidRequest(format!("volume {} has no snapshot cut {cut}", id.volume)));
        }
        check_aligned(offset, len as u64)?;
        drop(self.fence(id.volume, epoch).await?);
        let (c, b0, b1, _range) = self.lock_shared(id, offset, len as u64).await?;
        let view: Vec<Arc<Chunk>> = c.stack().into_iter().skip_while(|l| l.lower >= cut).collect();
        self.read_layers(&view, b0, b1).await
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
        let mut b = b0;
        while b < b1 {
            let who = owner(view, b);
            let mut end = b + 1;
            while end < b1 && owner(view, end) == who {
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
