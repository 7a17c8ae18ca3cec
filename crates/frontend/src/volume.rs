//! [`Volume`]: one attached volume, a [`BlockDev`] over replicated chunks.
//!
//! I/O path file: no blocking calls, no info logs per I/O, no volume-wide lock
//! on the data path (per-chunk state only; the membership call happens only
//! when a replica fails).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use ballast_blockdev::{check_range, BlockDev, BlockError};
use ballast_types::{
    is_block_aligned, BlockContext, BlockIdx, ChunkId, ChunkIdx, Epoch, NodeId, Seq, VolumeId, BLOCK_SIZE,
    BLOCK_SIZE_U64,
};
use bytes::{Bytes, BytesMut};
use tokio::sync::{Mutex as AsyncMutex, RwLock as AsyncRwLock, Semaphore};
use tracing::{debug, debug_span, info, warn, Instrument};

use crate::membership::{EjectReason, Membership, MembershipError, Replica, ReplicaSet, VolumeLayout};
use crate::policy::{self, classify, plan_write, Reaction, WriteFailure, WritePlan};
use crate::replica_io::{ReplicaError, ReplicaIo};
use crate::FrontendError;

/// Blocks per context-table request during reconciliation (20 bytes each on the wire).
const RECONCILE_BATCH_BLOCKS: u32 = 4096;

/// Tunables of one attached volume.
#[derive(Clone, Debug)]
pub struct VolumeOptions {
    /// The node this front end runs on; its replicas are read first. Default: none.
    pub local_node: Option<NodeId>,
    /// Deadline for every replica request; a replica that misses it is
    /// ejected. Default: 10 s.
    pub io_timeout: Duration,
    /// Bytes of client requests in flight at once; more wait (backpressure).
    /// Default: 64 MiB.
    pub max_inflight_bytes: usize,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions { local_node: None, io_timeout: Duration::from_secs(10), max_inflight_bytes: 64 << 20 }
    }
}

/// A snapshot of a volume's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeStats {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub ejections: u64,
    pub read_repairs: u64,
    pub reconciled_blocks: u64,
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    ejections: AtomicU64,
    read_repairs: AtomicU64,
    reconciled_blocks: AtomicU64,
    errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct ChunkState {
    /// The in-sync set this attachment uses. Only ever shrinks within an
    /// attachment: an ejected replica is never read or written again.
    set: std::sync::RwLock<Arc<ReplicaSet>>,
    /// Serializes ejections of this chunk (one membership change at a time).
    membership: AsyncMutex<()>,
    /// Client writes (and trims, zeroes) hold it shared; a read repair holds it
    /// exclusively, so a repair can never write old data over a newer
    /// acknowledged write.
    order: AsyncRwLock<()>,
}

impl ChunkState {
    fn snapshot(&self) -> Arc<ReplicaSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// An attached volume. Implements [`BlockDev`]; share it as `Arc<Volume<..>>`.
pub struct Volume<M: Membership, R: ReplicaIo> {
    id: VolumeId,
    name: String,
    epoch: Epoch,
    size: u64,
    chunk_size: u64,
    min_in_sync: usize,
    local_node: Option<NodeId>,
    io_timeout: Duration,
    membership: M,
    nodes: HashMap<NodeId, R>,
    chunks: Vec<ChunkState>,
    /// Counter half of the next write's Seq; the epoch half is this attachment's.
    next_seq: AtomicU64,
    stopped: AtomicBool,
    inflight: Semaphore,
    max_inflight: u32,
    rr: AtomicUsize,
    stats: Counters,
}

/// Polls every future to completion concurrently on the current task (no
/// spawns: a hand-off to another worker costs about as much as a local I/O).
async fn join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

fn io_err(what: impl std::fmt::Display) -> BlockError {
    BlockError::Io(what.to_string())
}

impl<M: Membership, R: ReplicaIo> Volume<M, R> {
    /// Attaches the volume: bumps its epoch through `membership`, announces the
    /// epoch to every replica node (ejecting the unreachable ones), reconciles
    /// the chunks left dirty by a previous front end, and only then returns a
    /// volume ready for I/O. `connect` makes the connection handle for a node.
    pub async fn attach(
        membership: M,
        connect: impl Fn(&Replica) -> R,
        volume: VolumeId,
        options: VolumeOptions,
    ) -> Result<Arc<Self>, FrontendError> {
        let attachment = membership.attach(volume).await?;
        let (epoch, layout) = (attachment.epoch, attachment.layout);
        validate_layout(volume, &layout)?;
        info!(volume = %volume, name = %layout.name, epoch = %epoch, chunks = layout.chunks.len(), "attaching volume");
        let max_inflight = options.max_inflight_bytes.clamp(BLOCK_SIZE as usize, u32::MAX as usize) as u32;
        let v = Volume {
            id: volume,
            name: layout.name.clone(),
            epoch,
            size: layout.size,
            chunk_size: layout.chunk_size,
            min_in_sync: layout.min_in_sync,
            local_node: options.local_node,
            io_timeout: options.io_timeout,
            membership,
            nodes: layout.nodes.iter().map(|r| (r.node, connect(r))).collect(),
            chunks: layout
                .chunks
                .into_iter()
                .map(|set| ChunkState {
                    set: std::sync::RwLock::new(Arc::new(set)),
                    membership: AsyncMutex::new(()),
                    order: AsyncRwLock::new(()),
                })
                .collect(),
            next_seq: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
            inflight: Semaphore::new(max_inflight as usize),
            max_inflight,
            rr: AtomicUsize::new(0),
            stats: Counters::default(),
        };
        v.announce().await?;
        v.reconcile().await?;
        info!(volume = %volume, epoch = %epoch, "volume attached; serving I/O");
        Ok(Arc::new(v))
    }

    pub fn id(&self) -> VolumeId {
        self.id
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The in-sync set this attachment currently uses for `chunk`.
    pub fn replica_set(&self, chunk: ChunkIdx) -> Option<ReplicaSet> {
        self.chunks.get(chunk.0 as usize).map(|c| (*c.snapshot()).clone())
    }

    /// True once the volume stopped serving (fenced by a newer front end, or closed).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Stops serving: every later request fails with `Shutdown`. Call `flush`
    /// first for a clean detach.
    pub fn close(&self) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            info!(volume = %self.id, epoch = %self.epoch, "volume closed");
        }
    }

    pub fn stats(&self) -> VolumeStats {
        let s = &self.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VolumeStats {
            reads: l(&s.reads),
            writes: l(&s.writes),
            bytes_read: l(&s.bytes_read),
            bytes_written: l(&s.bytes_written),
            flushes: l(&s.flushes),
            trims: l(&s.trims),
            write_zeroes: l(&s.write_zeroes),
            ejections: l(&s.ejections),
            read_repairs: l(&s.read_repairs),
            reconciled_blocks: l(&s.reconciled_blocks),
            errors: l(&s.errors),
        }
    }

    fn chunk_id(&self, chunk: ChunkIdx) -> ChunkId {
        ChunkId::new(self.id, chunk)
    }

    fn chunk_len(&self, chunk: ChunkIdx) -> u64 {
        let start = u64::from(chunk.0) * self.chunk_size;
        self.chunk_size.min(self.size - start)
    }

    fn next_seq(&self) -> Seq {
        Seq::new(self.epoch, self.next_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs one replica request under the volume's deadline.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, ReplicaError>>,
    ) -> Result<T, ReplicaError> {
        match tokio::time::timeout(self.io_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ReplicaError::Timeout { op }),
        }
    }

    fn io(&self, node: NodeId) -> Result<&R, ReplicaError> {
        self.nodes.get(&node).ok_or_else(|| ReplicaError::Failed(format!("{node} is not in the volume's node list")))
    }

    fn stop_fenced(&self, message: &str) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            warn!(volume = %self.id, epoch = %self.epoch, %message, "fenced by a newer front end: volume stops serving");
        }
    }

    fn check_serving(&self) -> Result<(), BlockError> {
        if self.is_stopped() {
            Err(BlockError::Shutdown)
        } else {
            Ok(())
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.size, BLOCK_SIZE, u64::from(self.max_request()))
    }

    // ---- membership changes -------------------------------------------------

    /// Removes `node` from `chunk`'s in-sync set, durably, before returning Ok.
    /// Refuses (and ejects nobody) when fewer than min-in-sync would remain.
    async fn eject(&self, chunk: ChunkIdx, node: NodeId, reason: EjectReason) -> Result<(), FrontendError> {
        let state = &self.chunks[chunk.0 as usize];
        let _one_change_at_a_time = state.membership.lock().await;
        for _ in 0..4 {
            let set = state.snapshot();
            if !set.contains(node) {
                return Ok(());
            }
            let remaining = set.in_sync.len() - 1;
            if remaining < self.min_in_sync {
                return Err(FrontendError::BelowMinInSync { chunk, node, remaining, min: self.min_in_sync });
            }
            let committed = self.membership.eject(self.id, chunk, set.version, node, reason).await?;
            // Never re-admit a replica this attachment stopped using: keep the
            // intersection (a resync, not a membership answer, brings one back).
            let in_sync: Vec<NodeId> = committed.in_sync.iter().copied().filter(|n| set.in_sync.contains(n)).collect();
            let gone = !in_sync.contains(&node);
            let changed = committed.version != set.version;
            *state.set.write().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(ReplicaSet { version: committed.version, in_sync, ejected: committed.ejected });
            if gone {
                bump(&self.stats.ejections, 1);
                info!(volume = %self.id, chunk = chunk.0, %node, %reason, version = committed.version, "replica ejected from in-sync set");
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

    /// Ejects `node` from every chunk whose in-sync set holds it.
    async fn eject_everywhere(&self, node: NodeId, reason: EjectReason) -> Result<(), FrontendError> {
        for (i, c) in self.chunks.iter().enumerate() {
            if c.snapshot().contains(node) {
                self.eject(ChunkIdx(i as u32), node, reason).await?;
            }
        }
        Ok(())
    }

    /// Executes a write plan: ejections first, durably, then the verdict.
    async fn finish(&self, chunk: ChunkIdx, plan: WritePlan) -> Result<(), BlockError> {
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
                Err(BlockError::OutOfRange { offset: u64::from(chunk.0) * self.chunk_size, len: 0, size: self.size })
            }
            WritePlan::Fail(WriteFailure::BelowMinInSync { failed, remaining }) => {
                warn!(volume = %self.id, chunk = chunk.0, ?failed, remaining, min = self.min_in_sync, "write failed: too few in-sync replicas would remain");
                Err(BlockError::Io(format!(
                    "chunk {chunk}: {} replicas failed, {remaining} left, min-in-sync {}",
                    failed.len(),
                    self.min_in_sync
                )))
            }
        }
    }

    // ---- attach ---------------------------------------------------------------

    async fn announce(&self) -> Result<(), FrontendError> {
        let holders = self.holders();
        let replies = join_all(self.nodes.keys().map(|&node| async move {
            let r = match self.io(node) {
                Ok(io) => self.call("announce_epoch", io.announce_epoch(self.id, self.epoch)).await,
                Err(e) => Err(e),
            };
            (node, r)
        }))
        .await;
        for (node, reply) in replies {
            let holds = holders.contains(&node);
            match reply {
                Ok(e) if e == self.epoch => debug!(volume = %self.id, %node, epoch = %e, "epoch announced"),
                Ok(e) if e > self.epoch => return Err(FrontendError::Fenced { node, epoch: e }),
                Err(ReplicaError::Fenced(m)) => {
                    warn!(volume = %self.id, %node, message = %m, "a newer front end holds the volume");
                    return Err(FrontendError::Fenced { node, epoch: self.epoch });
                }
                other if holds => {
                    warn!(volume = %self.id, %node, reply = ?other, "replica node unreachable or refused the epoch at attach: ejecting it");
                    self.eject_everywhere(node, EjectReason::AttachUnreachable).await?;
                }
                other => {
                    debug!(volume = %self.id, %node, reply = ?other, "node without in-sync replicas did not take the epoch")
                }
            }
        }
        Ok(())
    }

    /// Nodes holding an in-sync copy of at least one chunk.
    fn holders(&self) -> BTreeSet<NodeId> {
        let mut s = BTreeSet::new();
        for c in &self.chunks {
            s.extend(c.snapshot().in_sync.iter().copied());
        }
        s
    }

    /// DESIGN item 7: replicas keep a per-chunk dirty mark until a flush; the
    /// chunks dirty anywhere are made identical on all in-sync replicas
    /// before any I/O is served.
    async fn reconcile(&self) -> Result<(), FrontendError> {
        let holders: Vec<NodeId> = self.holders().into_iter().collect();
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
                let data = self.read_from_any(id, run.byte_offset(), run.byte_len() as u32, &run.sources).await?;
                // The winning content is written to every in-sync replica (the
                // sources too) under a fresh seq of this epoch: a write's seq
                // epoch is also its fencing epoch on the wire, so the original
                // (older-epoch) seq would be refused as stale. Writing all of
                // them keeps the contexts identical, so later comparisons
                // (rebuild, the next reconcile) see no difference.
                let seq = self.next_seq();
                for &target in run.targets.iter().chain(&run.sources) {
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
        // Flush on every in-sync replica: makes the copies durable and clears
        // the dirty marks.
        let set = self.chunks[chunk.0 as usize].snapshot();
        let replies = join_all(set.in_sync.iter().map(|&node| async move {
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

    // ---- the data path --------------------------------------------------------

    async fn permits(&self, bytes: u64) -> Result<tokio::sync::SemaphorePermit<'_>, BlockError> {
        let n = bytes.clamp(1, u64::from(self.max_inflight)) as u32;
        self.inflight.acquire_many(n).await.map_err(|_| BlockError::Shutdown)
    }

    fn count_error<T>(&self, r: Result<T, BlockError>) -> Result<T, BlockError> {
        if r.is_err() {
            bump(&self.stats.errors, 1);
        }
        r
    }

    async fn write_piece(&self, p: policy::Piece, data: Bytes, seq: Seq, fua: bool) -> Result<(), BlockError> {
        let state = &self.chunks[p.chunk.0 as usize];
        let _no_repair_meanwhile = state.order.read().await;
        self.write_piece_locked(p, data, seq, fua).await
    }

    /// The fan-out of one chunk write; the caller holds the chunk's order lock
    /// (shared for client writes, exclusive for repairs).
    async fn write_piece_locked(&self, p: policy::Piece, data: Bytes, seq: Seq, fua: bool) -> Result<(), BlockError> {
        let set = self.chunks[p.chunk.0 as usize].snapshot();
        let id = self.chunk_id(p.chunk);
        let replies = join_all(set.in_sync.iter().map(|&node| {
            let data = data.clone();
            async move { (node, self.write_one(node, id, p.offset, data, seq, fua).await) }
        }))
        .await;
        debug!(chunk = p.chunk.0, offset = p.offset, len = p.len, %seq, "chunk write replies");
        self.finish(p.chunk, plan_write(&replies, self.min_in_sync)).await
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
    async fn zero_piece(&self, p: policy::Piece, seq: Seq, trim: bool, fua: bool) -> Result<(), BlockError> {
        let state = &self.chunks[p.chunk.0 as usize];
        let _no_repair_meanwhile = state.order.read().await;
        let set = state.snapshot();
        let id = self.chunk_id(p.chunk);
        let replies = join_all(set.in_sync.iter().map(|&node| async move {
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
        self.finish(p.chunk, plan_write(&replies, self.min_in_sync)).await
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
                    return Err(BlockError::OutOfRange { offset: p.offset, len: p.len, size: self.size });
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

    /// Read repair: holding the chunk exclusively (so no client write can land
    /// between the re-read and the rewrite), re-reads the good copy and writes
    /// it to every in-sync replica under a fresh seq — the corrupt ones get the
    /// good data, all of them the same context (the original seq cannot be
    /// reused: its epoch would be fenced as stale). A replica that fails the
    /// rewrite is ejected by the ordinary write rules. Returns the data to serve.
    async fn repair(&self, p: policy::Piece, good: NodeId, corrupt: Vec<NodeId>, first_read: Bytes) -> Bytes {
        let state = &self.chunks[p.chunk.0 as usize];
        let _exclusive = state.order.write().await;
        let id = self.chunk_id(p.chunk);
        let Ok(io) = self.io(good) else { return first_read };
        let data = match self.call("read", io.read(id, p.offset, p.len as u32, self.epoch)).await {
            Ok(d) if d.len() as u64 == p.len => d,
            other => {
                warn!(volume = %self.id, chunk = p.chunk.0, %good, reply = ?other.map(|d| d.len()), "read repair skipped: could not re-read the good copy");
                return first_read;
            }
        };
        match self.write_piece_locked(p, data.clone(), self.next_seq(), false).await {
            Ok(()) => {
                bump(&self.stats.read_repairs, 1);
                info!(volume = %self.id, chunk = p.chunk.0, corrupt = ?corrupt, offset = p.offset, len = p.len, source = %good, "read repair: corrupt copies rewritten");
            }
            Err(e) => {
                warn!(volume = %self.id, chunk = p.chunk.0, corrupt = ?corrupt, error = %e, "read repair failed");
            }
        }
        data
    }

    async fn do_read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        self.check(offset, u64::from(len))?;
        self.check_serving()?;
        let _permit = self.permits(u64::from(len)).await?;
        let pieces = policy::split(offset, u64::from(len), self.chunk_size);
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
        let seq = self.next_seq();
        let pieces = policy::split(offset, len, self.chunk_size);
        let results = join_all(pieces.iter().map(|&p| {
            let slice = data.slice(p.buf_offset as usize..(p.buf_offset + p.len) as usize);
            self.write_piece(p, slice, seq, fua).instrument(debug_span!("chunk", chunk = p.chunk.0))
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
        let seq = self.next_seq();
        let pieces = policy::split(offset, len, self.chunk_size);
        let results = join_all(
            pieces
                .iter()
                .map(|&p| self.zero_piece(p, seq, trim, fua).instrument(debug_span!("chunk", chunk = p.chunk.0))),
        )
        .await;
        results.into_iter().collect::<Result<(), BlockError>>()?;
        bump(if trim { &self.stats.trims } else { &self.stats.write_zeroes }, 1);
        Ok(())
    }

    async fn do_flush(&self) -> Result<(), BlockError> {
        self.check_serving()?;
        let holders: Vec<NodeId> = self.holders().into_iter().collect();
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

fn validate_layout(volume: VolumeId, l: &VolumeLayout) -> Result<(), FrontendError> {
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
        if let Some(n) = c.in_sync.iter().find(|n| l.node(**n).is_none()) {
            return bad(format!("chunk {i} is placed on unknown {n}"));
        }
    }
    Ok(())
}

/// The I/O path. Every request: range check, stop check, in-flight bytes
/// (backpressure), split at chunk boundaries, pieces in parallel.
impl<M: Membership, R: ReplicaIo> BlockDev for Volume<M, R> {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        BLOCK_SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        let span = debug_span!("read", volume = %self.id, offset, len);
        let r = self.do_read(offset, len).instrument(span).await;
        self.count_error(r)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let span = debug_span!("write", volume = %self.id, offset, len = data.len(), fua);
        let r = self.do_write(offset, data, fua).instrument(span).await;
        self.count_error(r)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let r = self.do_flush().instrument(debug_span!("flush", volume = %self.id)).await;
        self.count_error(r)
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let span = debug_span!("trim", volume = %self.id, offset, len);
        let r = self.do_zero(offset, len, true, false).instrument(span).await;
        self.count_error(r)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        let span = debug_span!("write_zeroes", volume = %self.id, offset, len, fua);
        let r = self.do_zero(offset, len, false, fua).instrument(span).await;
        self.count_error(r)
    }
}
