//! Simulated replica nodes and the network between them and the front end.
//!
//! Each node is an in-memory model of a `ballast_chunkstore::ChunkStore` behind
//! a `ballast_replica` server, answering with the errors the real client maps
//! to [`ReplicaError`] (see `crates/frontend/src/replica_client.rs`):
//!
//! - per-volume epoch, persisted: a request with an older epoch is `Fenced`, a
//!   newer one `UnannouncedEpoch` (→ `Failed`); `announce_epoch` raises it and
//!   refuses an older one with `Fenced`;
//! - the fence is checked before the chunk lookup, the chunk lookup before the
//!   range check (as `ChunkStore::lock_blocks` does);
//! - per-block context {crc32 of the block, seq}; trim and write-zeroes store
//!   zeros with the zero block's crc;
//! - `create_chunk` is durable at once and idempotent for the same size;
//! - a chunk's dirty mark is durable from the first write after a flush and is
//!   cleared by a flush (`flush`, `flush_chunk`, a write with FUA);
//! - durability: writes land in a volatile layer; a flush moves it to the
//!   durable layer. A process crash keeps both (completed `O_DIRECT` writes
//!   survive a process kill); a power cut keeps any subset of the volatile
//!   blocks (chosen per block from the node's random stream);
//! - snapshot cuts per volume (`set_cuts`: the volume made durable first,
//!   then the cuts, durably): a write with seq above a cut that replaces a
//!   block whose version is at or below it keeps that version first,
//!   durably (the store freezes the chunk's layer with an fdatasync; the
//!   model keeps per block, which gives the same views), and a read at a cut
//!   returns each block's newest version at or below it (zeros if none).
//!   Cuts dropped by a later `set_cuts` release the versions only they kept.
//!
//! The network is per request: a request is delivered after a random delay
//! (so requests overtake each other), may be dropped, and its reply may be
//! delayed or dropped (the request still applied). A crashed node refuses
//! connections; a partitioned node swallows requests (the caller's deadline
//! fires). Delivery runs in its own task, so a request the caller gave up on
//! (timeout, dropped front end) can still apply later, as over TCP.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ballast_frontend::{ReplicaError, ReplicaIo};
use ballast_types::{
    is_block_aligned, BlockContext, BlockIdx, ChunkId, ChunkIdx, Epoch, NodeId, Seq, VolumeId, BLOCK_SIZE_U64,
};
use bytes::{Bytes, BytesMut};

use crate::rng::SimRng;
use crate::trace::Trace;
use crate::FaultRates;

const BS: usize = BLOCK_SIZE_U64 as usize;

/// crc32 of a zero block (what trim and write-zeroes record).
fn zero_crc() -> u32 {
    crc32fast::hash(&[0u8; BS])
}

/// One block's content and context. `data == None` reads as zeros.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    data: Option<Bytes>,
    ctx: BlockContext,
}

impl Block {
    fn empty() -> Block {
        Block { data: None, ctx: BlockContext::default() }
    }
}

/// One chunk replica: the durable blocks and the volatile ones written since
/// the last flush.
#[derive(Clone, Debug)]
pub(crate) struct ChunkRep {
    durable: Vec<Block>,
    volatile: BTreeMap<u32, Block>,
    /// Persistent "written since the last flush" mark.
    dirty: bool,
    /// Versions replaced above a cut while a cut saw them, per block, oldest
    /// first (durable: frozen layers).
    kept: BTreeMap<u32, Vec<Block>>,
}

impl ChunkRep {
    fn new(blocks: usize) -> ChunkRep {
        ChunkRep {
            durable: vec![Block::empty(); blocks],
            volatile: BTreeMap::new(),
            dirty: false,
            kept: BTreeMap::new(),
        }
    }

    fn block(&self, b: u32) -> &Block {
        self.volatile.get(&b).unwrap_or(&self.durable[b as usize])
    }

    fn size(&self) -> u64 {
        self.durable.len() as u64 * BLOCK_SIZE_U64
    }

    /// Block `b` as snapshot `cut` sees it: its newest version at or below
    /// the cut, live or kept (empty when none).
    fn block_at(&self, b: u32, cut: Seq) -> Block {
        let live = self.block(b);
        if live.ctx.seq <= cut {
            return live.clone();
        }
        let kept = self.kept.get(&b).into_iter().flatten();
        kept.filter(|k| k.ctx.seq <= cut).max_by_key(|k| k.ctx.seq).cloned().unwrap_or_else(Block::empty)
    }

    /// Drops the kept versions no cut in `cuts` sees any more.
    fn release(&mut self, cuts: &[Seq]) {
        let blocks: Vec<u32> = self.kept.keys().copied().collect();
        for b in blocks {
            let seen: Vec<Seq> = cuts.iter().map(|&c| self.block_at(b, c).ctx.seq).collect();
            if let Some(k) = self.kept.get_mut(&b) {
                k.retain(|v| seen.contains(&v.ctx.seq));
                if k.is_empty() {
                    self.kept.remove(&b);
                }
            }
        }
    }

    fn flush(&mut self) {
        for (b, blk) in std::mem::take(&mut self.volatile) {
            self.durable[b as usize] = blk;
        }
        self.dirty = false;
    }
}

/// One simulated storage node (a chunk store behind a replica server).
#[derive(Debug)]
pub(crate) struct SimNode {
    pub up: bool,
    pub partitioned: bool,
    /// Bumped on every crash: requests sent to an older incarnation are lost.
    pub incarnation: u64,
    epochs: BTreeMap<VolumeId, Epoch>,
    /// Per volume, its snapshot cuts, ascending (durable).
    cuts: BTreeMap<VolumeId, Vec<Seq>>,
    chunks: BTreeMap<ChunkId, ChunkRep>,
    /// This node's network and crash decisions.
    rng: SimRng,
}

impl SimNode {
    pub fn new(rng: SimRng) -> SimNode {
        SimNode {
            up: true,
            partitioned: false,
            incarnation: 0,
            epochs: BTreeMap::new(),
            cuts: BTreeMap::new(),
            chunks: BTreeMap::new(),
            rng,
        }
    }

    pub fn epoch(&self, v: VolumeId) -> Epoch {
        self.epochs.get(&v).copied().unwrap_or(Epoch(0))
    }

    /// The store's fence rule.
    fn fence(&self, v: VolumeId, e: Epoch) -> Result<(), ReplicaError> {
        let cur = self.epoch(v);
        if e < cur {
            return Err(ReplicaError::Fenced(format!(
                "Fenced: {v}: request epoch {e} is fenced (current epoch {cur})"
            )));
        }
        if e > cur {
            return Err(ReplicaError::Failed(format!(
                "UnannouncedEpoch: {v}: request epoch {e} was never announced (current epoch {cur})"
            )));
        }
        Ok(())
    }

    fn chunk_mut(&mut self, id: ChunkId) -> Result<&mut ChunkRep, ReplicaError> {
        self.chunks.get_mut(&id).ok_or(ReplicaError::NoSuchChunk)
    }

    fn chunk(&self, id: ChunkId) -> Result<&ChunkRep, ReplicaError> {
        self.chunks.get(&id).ok_or(ReplicaError::NoSuchChunk)
    }

    /// Write (`data: Some`) or punch (`None`) of whole blocks under `seq`.
    fn mutate(
        &mut self,
        id: ChunkId,
        offset: u64,
        len: u64,
        data: Option<&Bytes>,
        seq: Seq,
    ) -> Result<(), ReplicaError> {
        aligned(offset, len)?;
        self.fence(id.volume, seq.epoch)?;
        let cuts = self.cuts.get(&id.volume).cloned().unwrap_or_default();
        let c = self.chunk_mut(id)?;
        in_range(c, offset, len)?;
        let first = (offset / BLOCK_SIZE_U64) as u32;
        let mut applied = false;
        for i in 0..(len / BLOCK_SIZE_U64) as u32 {
            // The store's rule: a block only moves to a newer seq; an overtaken
            // (late) write keeps the newer blocks (ChunkStore::begin_mutation).
            let cur = c.block(first + i).clone();
            if cur.ctx.seq >= seq {
                continue;
            }
            // Copy-on-write: a cut that sees the version being replaced keeps
            // it, durably (the live layer's old content too, as the freeze's
            // fdatasync makes it).
            if cur.ctx.seq > Seq::ZERO && cuts.iter().any(|&k| cur.ctx.seq <= k && k < seq) {
                c.durable[(first + i) as usize] = cur.clone();
                c.kept.entry(first + i).or_default().push(cur);
            }
            applied = true;
            let blk = match data {
                Some(d) => {
                    let bytes = d.slice(i as usize * BS..(i as usize + 1) * BS);
                    Block { ctx: BlockContext { crc: crc32fast::hash(&bytes), seq }, data: Some(bytes) }
                }
                None => Block { data: None, ctx: BlockContext { crc: zero_crc(), seq } },
            };
            c.volatile.insert(first + i, blk);
        }
        if applied {
            c.dirty = true;
        }
        Ok(())
    }

    fn read(&self, id: ChunkId, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes, ReplicaError> {
        aligned(offset, u64::from(len))?;
        self.fence(id.volume, epoch)?;
        let c = self.chunk(id)?;
        in_range(c, offset, u64::from(len))?;
        let mut out = BytesMut::with_capacity(len as usize);
        let first = (offset / BLOCK_SIZE_U64) as u32;
        for b in first..first + len / BLOCK_SIZE_U64 as u32 {
            match &c.block(b).data {
                Some(d) => out.extend_from_slice(d),
                None => out.extend_from_slice(&[0u8; BS]),
            }
        }
        Ok(out.freeze())
    }

    /// Reads at snapshot `cut` (one of the volume's cuts here).
    fn read_snapshot(&self, id: ChunkId, cut: Seq, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes, ReplicaError> {
        aligned(offset, u64::from(len))?;
        self.fence(id.volume, epoch)?;
        if !self.cuts.get(&id.volume).is_some_and(|c| c.contains(&cut)) {
            return Err(ReplicaError::Invalid(format!("BadRequest: {} has no snapshot cut {cut}", id.volume)));
        }
        let c = self.chunk(id)?;
        in_range(c, offset, u64::from(len))?;
        let mut out = BytesMut::with_capacity(len as usize);
        let first = (offset / BLOCK_SIZE_U64) as u32;
        for b in first..first + len / BLOCK_SIZE_U64 as u32 {
            match c.block_at(b, cut).data {
                Some(d) => out.extend_from_slice(&d),
                None => out.extend_from_slice(&[0u8; BS]),
            }
        }
        Ok(out.freeze())
    }

    /// Replaces the volume's cuts: the volume is made durable first, as the
    /// store does, so every version a new cut sees survives a power cut.
    fn set_cuts(&mut self, v: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<(), ReplicaError> {
        self.fence(v, epoch)?;
        if cuts.contains(&Seq::ZERO) || cuts.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ReplicaError::Invalid(format!("BadRequest: cuts {cuts:?} are not ascending and non-zero")));
        }
        for c in self.chunks.iter_mut().filter(|(id, _)| id.volume == v).map(|(_, c)| c) {
            c.flush();
            c.release(cuts);
        }
        self.cuts.insert(v, cuts.to_vec());
        Ok(())
    }

    fn flush_volume(&mut self, v: VolumeId, epoch: Epoch) -> Result<(), ReplicaError> {
        self.fence(v, epoch)?;
        for c in self.chunks.iter_mut().filter(|(id, _)| id.volume == v).map(|(_, c)| c) {
            c.flush();
        }
        Ok(())
    }

    fn flush_chunk(&mut self, id: ChunkId, epoch: Epoch) -> Result<(), ReplicaError> {
        self.fence(id.volume, epoch)?;
        self.chunk_mut(id)?.flush();
        Ok(())
    }

    fn context_table(
        &self,
        id: ChunkId,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>, ReplicaError> {
        self.fence(id.volume, epoch)?;
        let c = self.chunk(id)?;
        in_range(c, u64::from(first.0) * BLOCK_SIZE_U64, u64::from(count) * BLOCK_SIZE_U64)?;
        Ok((first.0..first.0 + count).map(|b| c.block(b).ctx).collect())
    }

    fn create_chunk(&mut self, id: ChunkId, size: u64, epoch: Epoch) -> Result<(), ReplicaError> {
        self.fence(id.volume, epoch)?;
        aligned(0, size)?;
        if size == 0 {
            return Err(ReplicaError::Invalid("OutOfRange: chunk of 0 bytes".into()));
        }
        match self.chunks.get(&id) {
            Some(c) if c.size() == size => Ok(()),
            Some(_) => Err(ReplicaError::ChunkExists),
            None => {
                // Created durably (files fsynced, renamed) before the reply.
                self.chunks.insert(id, ChunkRep::new((size / BLOCK_SIZE_U64) as usize));
                Ok(())
            }
        }
    }

    fn announce(&mut self, v: VolumeId, e: Epoch) -> Result<Epoch, ReplicaError> {
        let cur = self.epoch(v);
        if e < cur {
            return Err(ReplicaError::Fenced(format!(
                "Fenced: {v}: request epoch {e} is fenced (current epoch {cur})"
            )));
        }
        // Persisted (tmp + fsync + rename) before the reply.
        self.epochs.insert(v, e);
        Ok(e)
    }

    fn list_dirty(&self, v: VolumeId, e: Epoch) -> Result<Vec<ChunkIdx>, ReplicaError> {
        self.fence(v, e)?;
        Ok(self.chunks.iter().filter(|(id, c)| id.volume == v && c.dirty).map(|(id, _)| id.chunk).collect())
    }

    /// A process crash (SIGKILL): connections drop; completed writes survive.
    pub fn crash(&mut self) {
        self.up = false;
        self.incarnation += 1;
    }

    /// A power cut: connections drop and each block written since the last
    /// flush independently survives or reverts to its durable content (the
    /// store's slots make every block one of the two). Dirty marks stay.
    /// Returns how many blocks were lost.
    pub fn power_cut(&mut self) -> u64 {
        self.crash();
        let mut lost = 0;
        for c in self.chunks.values_mut() {
            for (b, blk) in std::mem::take(&mut c.volatile) {
                if self.rng.chance(0.5) {
                    c.durable[b as usize] = blk;
                } else {
                    lost += 1;
                }
            }
        }
        lost
    }

    /// An offline resync (the copy job the simulator stands in for): makes
    /// this node's replica of `id` a copy of `src`'s, epoch included.
    pub fn copy_chunk_from(&mut self, src: &SimNode, id: ChunkId) {
        if let Some(c) = src.chunks.get(&id) {
            self.chunks.insert(id, c.clone());
        }
        // Its snapshot views come along, and so do the volume's cuts (the
        // real resync carries both).
        if let Some(cuts) = src.cuts.get(&id.volume) {
            self.cuts.insert(id.volume, cuts.clone());
        }
        let e = src.epoch(id.volume).max(self.epoch(id.volume));
        self.epochs.insert(id.volume, e);
    }
}

fn aligned(offset: u64, len: u64) -> Result<(), ReplicaError> {
    if is_block_aligned(offset) && is_block_aligned(len) {
        Ok(())
    } else {
        Err(ReplicaError::Invalid(format!("Misaligned: request [{offset}, +{len}) is not aligned")))
    }
}

fn in_range(c: &ChunkRep, offset: u64, len: u64) -> Result<(), ReplicaError> {
    if offset.checked_add(len).is_some_and(|end| end <= c.size()) {
        Ok(())
    } else {
        Err(ReplicaError::Invalid(format!("OutOfRange: [{offset}, +{len}) past {} bytes", c.size())))
    }
}

/// Everything outside the front end: nodes, fault rates, the trace.
pub(crate) struct World {
    pub nodes: BTreeMap<NodeId, SimNode>,
    pub rates: FaultRates,
    /// The front end's per-request deadline: without
    /// [`FaultRates::late_delivery`], a request that would arrive after it is
    /// lost instead (as if the server dropped expired requests).
    pub deadline: Duration,
    pub trace: Trace,
}

pub(crate) type Shared = Arc<Mutex<World>>;

pub(crate) fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the network does to one request.
struct Fate {
    request_delay: Duration,
    reply_delay: Duration,
    drop_request: bool,
    drop_reply: bool,
}

impl Fate {
    fn draw(rng: &mut SimRng, r: &FaultRates) -> Fate {
        let slow = rng.chance(r.slow);
        let max = if slow { r.slow_delay_ms } else { r.max_delay_ms };
        Fate {
            request_delay: Duration::from_micros(rng.range(50, max.max(1) * 1000)),
            reply_delay: Duration::from_micros(rng.range(50, max.max(1) * 1000)),
            drop_request: rng.chance(r.drop_request),
            drop_reply: rng.chance(r.drop_reply),
        }
    }
}

/// The front end's connection to one simulated node: a [`ReplicaIo`].
#[derive(Clone)]
pub struct SimReplica {
    node: NodeId,
    world: Shared,
}

impl SimReplica {
    pub(crate) fn new(node: NodeId, world: Shared) -> SimReplica {
        SimReplica { node, world }
    }

    /// Sends one request: `apply` runs on the node when (if) it arrives, with
    /// this request's fate (delay, loss of request or reply) drawn from the
    /// node's random stream. Announces too: the front end walks its nodes in
    /// id order, so their faults replay like any other request's.
    async fn rpc<T: std::fmt::Debug + Send + 'static>(
        &self,
        op: &'static str,
        what: String,
        apply: impl FnOnce(&mut SimNode) -> Result<T, ReplicaError> + Send + 'static,
    ) -> Result<T, ReplicaError> {
        let node = self.node;
        let drawn = {
            let mut w = lock(&self.world);
            let rates = w.rates.clone();
            w.nodes.get_mut(&node).filter(|n| n.up).map(|n| (Fate::draw(&mut n.rng, &rates), n.incarnation))
        };
        let Some((fate, incarnation)) = drawn else {
            tokio::time::sleep(Duration::from_micros(200)).await;
            return Err(ReplicaError::Transport(format!("connect to {node}: connection refused")));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let world = self.world.clone();
        tokio::spawn(async move {
            tokio::time::sleep(fate.request_delay).await;
            let mut w = lock(&world);
            let expired = !w.rates.late_delivery && fate.request_delay + Duration::from_millis(1) >= w.deadline;
            let lost = fate.drop_request || expired;
            let Some(n) = w.nodes.get_mut(&node) else { return };
            if lost || !n.up || n.partitioned || n.incarnation != incarnation {
                let why = if lost { "dropped" } else { "undeliverable" };
                w.trace.event(format!("{node} {op} {what}: request {why}"));
                return;
            }
            let r = apply(n);
            w.trace.event(format!("{node} {op} {what} -> {}", short(&r)));
            let _ = tx.send(r);
        });
        let crashed = |w: &World| w.nodes.get(&node).is_none_or(|n| !n.up || n.incarnation != incarnation);
        match rx.await {
            Ok(r) => {
                tokio::time::sleep(fate.reply_delay).await;
                let (partitioned, gone) = {
                    let w = lock(&self.world);
                    (w.nodes.get(&node).is_some_and(|n| n.partitioned), crashed(&w))
                };
                if fate.drop_reply || partitioned {
                    // The reply never comes: the caller's deadline decides.
                    std::future::pending::<()>().await;
                }
                if gone {
                    return Err(ReplicaError::Transport("connection lost with the request in flight".into()));
                }
                r
            }
            Err(_) => {
                let gone = crashed(&lock(&self.world));
                if gone {
                    return Err(ReplicaError::Transport("connection lost with the request in flight".into()));
                }
                // The request was lost: no reply ever comes.
                std::future::pending().await
            }
        }
    }
}

fn short<T: std::fmt::Debug>(r: &Result<T, ReplicaError>) -> String {
    match r {
        Ok(v) => {
            let s = format!("{v:?}");
            if s.len() > 40 {
                "Ok(..)".into()
            } else {
                format!("Ok({s})")
            }
        }
        Err(e) => format!("Err({e})"),
    }
}

impl ReplicaIo for SimReplica {
    async fn write(&self, id: ChunkId, offset: u64, data: Bytes, seq: Seq, fua: bool) -> Result<(), ReplicaError> {
        let what = format!("{} o{offset} l{} {seq} fua={fua}", id.chunk, data.len());
        self.rpc("write", what, move |n| {
            n.mutate(id, offset, data.len() as u64, Some(&data), seq)?;
            if fua {
                n.flush_chunk(id, seq.epoch)?;
            }
            Ok(())
        })
        .await
    }

    async fn read(&self, id: ChunkId, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes, ReplicaError> {
        self.rpc("read", format!("{} o{offset} l{len} {epoch}", id.chunk), move |n| n.read(id, offset, len, epoch))
            .await
    }

    async fn flush(&self, volume: VolumeId, epoch: Epoch) -> Result<(), ReplicaError> {
        self.rpc("flush", format!("{epoch}"), move |n| n.flush_volume(volume, epoch)).await
    }

    async fn flush_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<(), ReplicaError> {
        self.rpc("flush_chunk", format!("{} {epoch}", id.chunk), move |n| n.flush_chunk(id, epoch)).await
    }

    async fn trim(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<(), ReplicaError> {
        self.rpc("trim", format!("{} o{offset} l{len} {seq}", id.chunk), move |n| n.mutate(id, offset, len, None, seq))
            .await
    }

    async fn write_zeroes(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<(), ReplicaError> {
        let what = format!("{} o{offset} l{len} {seq}", id.chunk);
        self.rpc("write_zeroes", what, move |n| n.mutate(id, offset, len, None, seq)).await
    }

    async fn context_table(
        &self,
        id: ChunkId,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>, ReplicaError> {
        let what = format!("{} b{} n{count} {epoch}", id.chunk, first.0);
        self.rpc("context_table", what, move |n| n.context_table(id, first, count, epoch)).await
    }

    async fn create_chunk(&self, id: ChunkId, size: u64, epoch: Epoch) -> Result<(), ReplicaError> {
        self.rpc("create_chunk", format!("{} s{size} {epoch}", id.chunk), move |n| n.create_chunk(id, size, epoch))
            .await
    }

    async fn delete_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<(), ReplicaError> {
        self.rpc("delete_chunk", format!("{} {epoch}", id.chunk), move |n| {
            n.fence(id.volume, epoch)?;
            n.chunks.remove(&id);
            Ok(())
        })
        .await
    }

    async fn announce_epoch(&self, volume: VolumeId, epoch: Epoch) -> Result<Epoch, ReplicaError> {
        self.rpc("announce_epoch", format!("{epoch}"), move |n| n.announce(volume, epoch)).await
    }

    async fn list_dirty(&self, volume: VolumeId, epoch: Epoch) -> Result<Vec<ChunkIdx>, ReplicaError> {
        self.rpc("list_dirty", format!("{epoch}"), move |n| n.list_dirty(volume, epoch)).await
    }

    async fn ping(&self) -> Result<(), ReplicaError> {
        self.rpc("ping", String::new(), |_| Ok(())).await
    }

    async fn set_cuts(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<(), ReplicaError> {
        let cuts = cuts.to_vec();
        self.rpc("set_cuts", format!("{cuts:?} {epoch}"), move |n| n.set_cuts(volume, epoch, &cuts)).await
    }

    async fn read_snapshot(
        &self,
        id: ChunkId,
        cut: Seq,
        offset: u64,
        len: u32,
        epoch: Epoch,
    ) -> Result<Bytes, ReplicaError> {
        let what = format!("{} at {cut} o{offset} l{len} {epoch}", id.chunk);
        self.rpc("read_snapshot", what, move |n| n.read_snapshot(id, cut, offset, len, epoch)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: VolumeId = VolumeId(1);

    fn id(c: u32) -> ChunkId {
        ChunkId::new(V, ChunkIdx(c))
    }

    fn block(x: u8) -> Bytes {
        Bytes::from(vec![x; BS])
    }

    #[test]
    fn store_semantics_fence_create_write_flush() {
        let mut n = SimNode::new(SimRng::new(1));
        // Nothing announced yet: epoch 1 is unannounced (→ Failed), not fenced.
        assert!(matches!(n.create_chunk(id(0), 8 * 4096, Epoch(1)), Err(ReplicaError::Failed(_))));
        assert_eq!(n.announce(V, Epoch(2)), Ok(Epoch(2)));
        assert!(matches!(n.announce(V, Epoch(1)), Err(ReplicaError::Fenced(_))));
        let s = Seq::new(Epoch(2), 1);
        assert_eq!(n.mutate(id(0), 0, 4096, Some(&block(1)), s), Err(ReplicaError::NoSuchChunk));
        n.create_chunk(id(0), 8 * 4096, Epoch(2)).unwrap();
        n.create_chunk(id(0), 8 * 4096, Epoch(2)).unwrap();
        assert_eq!(n.create_chunk(id(0), 4096, Epoch(2)), Err(ReplicaError::ChunkExists));
        n.mutate(id(0), 4096, 4096, Some(&block(7)), s).unwrap();
        assert_eq!(n.list_dirty(V, Epoch(2)).unwrap(), vec![ChunkIdx(0)]);
        assert_eq!(n.read(id(0), 4096, 4096, Epoch(2)).unwrap(), block(7));
        let t = n.context_table(id(0), BlockIdx(0), 2, Epoch(2)).unwrap();
        assert_eq!(t[0], BlockContext::default());
        assert_eq!(t[1], BlockContext { crc: crc32fast::hash(&block(7)), seq: s });
        // Older epoch: fenced, and nothing changes.
        assert!(matches!(
            n.mutate(id(0), 4096, 4096, Some(&block(9)), Seq::new(Epoch(1), 5)),
            Err(ReplicaError::Fenced(_))
        ));
        assert!(matches!(n.mutate(id(0), 0, 4096 * 9, None, s), Err(ReplicaError::Invalid(_))));
        // A power cut may lose unflushed blocks; a flushed block always survives.
        n.flush_volume(V, Epoch(2)).unwrap();
        assert!(n.list_dirty(V, Epoch(2)).unwrap().is_empty());
        n.mutate(id(0), 0, 4096, None, Seq::new(Epoch(2), 2)).unwrap();
        n.power_cut();
        n.up = true;
        assert_eq!(n.read(id(0), 4096, 4096, Epoch(2)).unwrap(), block(7));
        assert_eq!(n.list_dirty(V, Epoch(2)).unwrap(), vec![ChunkIdx(0)], "dirty mark survives the cut");
        assert_eq!(n.epoch(V), Epoch(2), "epoch is durable");
    }
}
