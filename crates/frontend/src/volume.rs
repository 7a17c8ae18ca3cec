//! [`Volume`]: one attached volume, a [`BlockDev`] over replicated chunks.
//!
//! I/O path file: no blocking calls, no info logs per I/O, no volume-wide lock
//! on the data path that a writer holds (per-chunk state; the node map is a
//! copy-on-write `Arc` behind a std `RwLock`, read for a clone; the membership
//! call happens only when a replica fails).
//!
//! The layout can change while the volume is attached ([`Volume::apply_layout`]):
//! the provider adds rebuilding replicas, promotes them, retires others.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::RwLock as StdRwLock;
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
use crate::policy::{self, classify, install_set, plan_write, Reaction, WriteFailure, WritePlan};
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
    /// Scrub passes completed ([`Volume::scrub`]).
    pub scrub_passes: u64,
    /// Bytes the scrub read from replicas (every in-sync copy counts).
    pub scrubbed_bytes: u64,
    /// Corrupt piece copies the scrub found (one piece on one replica).
    pub scrub_corrupt: u64,
    /// Of those, rewritten from a verified copy.
    pub scrub_repaired: u64,
    /// Of those, left as they were: no verified copy, or the rewrite failed.
    pub scrub_unrepairable: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
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
    pub(crate) scrub_passes: AtomicU64,
    pub(crate) scrubbed_bytes: AtomicU64,
    pub(crate) scrub_corrupt: AtomicU64,
    pub(crate) scrub_repaired: AtomicU64,
    pub(crate) scrub_unrepairable: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

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
    membership: AsyncMutex<SetControl>,
    /// Client writes (and trims, zeroes) hold it shared from before they look
    /// at `set` and take their seq until their replies are in; a repair (read
    /// repair, scrub) holds it exclusively, so a repair can never write old
    /// data over a newer acknowledged write, nor under a seq newer than a
    /// write that waited for it;
    /// `apply_layout` holds it exclusively while it swaps in a new set.
    /// Lock order: `order`, then `membership`.
    order: AsyncRwLock<()>,
}

/// The part of a chunk's state only set changes look at.
#[derive(Default)]
struct SetControl {
    /// Members the provider calls in sync that this attachment does not read
    /// from: they missed writes (see [`policy::install_set`]).
    write_only: Vec<NodeId>,
    /// An ejection's answer named members this attachment has not installed
    /// (no connection, no epoch, no ordering): the set is behind its version,
    /// so a layout of the same version is still installed.
    behind: bool,
}

impl ChunkState {
    fn new(set: ReplicaSet) -> Self {
        ChunkState {
            set: StdRwLock::new(Arc::new(set)),
            membership: AsyncMutex::new(SetControl::default()),
            order: AsyncRwLock::new(()),
        }
    }

    pub(crate) fn snapshot(&self) -> Arc<ReplicaSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn install(&self, set: ReplicaSet) {
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
    }
}

/// A connection to one replica node, with the address it was made for.
struct NodeConn<R> {
    replica: Replica,
    io: R,
}

/// Ordered by node id: every walk over the nodes (announce at attach, ejections
/// it leads to) happens in the same order on every run, which the deterministic
/// simulator (crates/sim) relies on to replay a seed exactly.
type NodeMap<R> = BTreeMap<NodeId, NodeConn<R>>;

/// Makes the connection handle for a replica node (at attach, and for nodes a
/// newer layout adds).
type Connector<R> = Box<dyn Fn(&Replica) -> R + Send + Sync>;

/// An attached volume. Implements [`BlockDev`]; share it as `Arc<Volume<..>>`.
pub struct Volume<M: Membership, R: ReplicaIo> {
    id: VolumeId,
    name: String,
    epoch: Epoch,
    /// Bytes served. Only grows (a layout with a larger size, see
    /// `apply_layout`). Invariant: every chunk below `size` has its state in
    /// `chunks` before `size` is raised (release store, acquire loads), so an
    /// in-range request always finds its chunks.
    size: AtomicU64,
    chunk_size: u64,
    min_in_sync: AtomicUsize,
    local_node: Option<NodeId>,
    io_timeout: Duration,
    membership: M,
    /// Copy-on-write: requests clone the `Arc` (a short read lock); only
    /// `apply_layout` replaces it.
    nodes: StdRwLock<Arc<NodeMap<R>>>,
    connect: Connector<R>,
    /// One `apply_layout` at a time.
    reconfigure: AsyncMutex<()>,
    /// Index = chunk index; appended to (never removed from) when the volume grows.
    pub(crate) chunks: boxcar::Vec<ChunkState>,
    /// Counter half of the next write's Seq; the epoch half is this attachment's.
    next_seq: AtomicU64,
    stopped: AtomicBool,
    inflight: Semaphore,
    max_inflight: u32,
    rr: AtomicUsize,
    pub(crate) stats: Counters,
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
    /// volume ready for I/O. `connect` makes the connection handle for a node
    /// (kept for the nodes later layouts add, see [`Volume::apply_layout`]).
    pub async fn attach(
        membership: M,
        connect: impl Fn(&Replica) -> R + Send + Sync + 'static,
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
            size: AtomicU64::new(layout.size),
            chunk_size: layout.chunk_size,
            min_in_sync: AtomicUsize::new(layout.min_in_sync),
            local_node: options.local_node,
            io_timeout: options.io_timeout,
            membership,
            nodes: StdRwLock::new(Arc::new(
                layout.nodes.iter().map(|r| (r.node, NodeConn { replica: r.clone(), io: connect(r) })).collect(),
            )),
            connect: Box::new(connect),
            reconfigure: AsyncMutex::new(()),
            chunks: layout.chunks.into_iter().map(ChunkState::new).collect::<boxcar::Vec<_>>(),
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

    /// The replica set this attachment currently uses for `chunk` (writes go to
    /// `in_sync` and `rebuilding`, reads to `in_sync`).
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
            scrub_passes: l(&s.scrub_passes),
            scrubbed_bytes: l(&s.scrubbed_bytes),
            scrub_corrupt: l(&s.scrub_corrupt),
            scrub_repaired: l(&s.scrub_repaired),
            scrub_unrepairable: l(&s.scrub_unrepairable),
        }
    }

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
            info!(volume = %self.id, from = size, to = layout.size, chunks = self.chunks.count(), "volume grew: serving the new size");
            count += n;
        }
        if !outdated.is_empty() {
            warn!(volume = %self.id, chunks = ?outdated, "layout outdated for some chunks: a newer layout must be applied");
            return Err(FrontendError::LayoutOutdated { volume: self.id, chunks: outdated, installed: count });
        }
        Ok(count)
    }

    pub(crate) fn chunk_id(&self, chunk: ChunkIdx) -> ChunkId {
        ChunkId::new(self.id, chunk)
    }

    pub(crate) fn chunk_len(&self, chunk: ChunkIdx) -> u64 {
        let start = u64::from(chunk.0) * self.chunk_size;
        self.chunk_size.min(self.size.load(Ordering::Acquire).saturating_sub(start))
    }

    fn next_seq(&self) -> Seq {
        Seq::new(self.epoch, self.next_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs one replica request under the volume's deadline.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, ReplicaError>>,
    ) -> Result<T, ReplicaError> {
        match tokio::time::timeout(self.io_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ReplicaError::Timeout { op }),
        }
    }

    fn min_in_sync(&self) -> usize {
        self.min_in_sync.load(Ordering::Relaxed)
    }

    fn nodes(&self) -> Arc<NodeMap<R>> {
        self.nodes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The connection to `node` (a clone: handles share their connections).
    pub(crate) fn io(&self, node: NodeId) -> Result<R, ReplicaError> {
        let nodes = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        nodes
            .get(&node)
            .map(|c| c.io.clone())
            .ok_or_else(|| ReplicaError::Failed(format!("{node} is not in the volume's node list")))
    }

    pub(crate) fn stop_fenced(&self, message: &str) {
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
        check_range(offset, len, self.size(), BLOCK_SIZE, u64::from(self.max_request()))
    }

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
    async fn eject_everywhere(&self, node: NodeId, reason: EjectReason) -> Result<(), FrontendError> {
        for (i, c) in self.chunks.iter() {
            if c.snapshot().is_member(node) {
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
                Err(BlockError::OutOfRange { offset: u64::from(chunk.0) * self.chunk_size, len: 0, size: self.size() })
            }
            WritePlan::Fail(WriteFailure::BelowMinInSync { failed, remaining, rebuilding_failed }) => {
                let min = self.min_in_sync();
                warn!(volume = %self.id, chunk = chunk.0, ?failed, remaining, min, "write failed: too few in-sync replicas would remain");
                // The write fails anyway; a rebuilding replica that missed what
                // the in-sync ones may have must still not be promoted.
                for (node, reason) in rebuilding_failed {
                    if let Err(e) = self.eject(chunk, node, reason).await {
                        warn!(volume = %self.id, chunk = chunk.0, %node, error = %e, "could not eject a failed rebuilding replica");
                    }
                }
                Err(BlockError::Io(format!(
                    "chunk {chunk}: {} in-sync replicas failed, {remaining} left, min-in-sync {min}",
                    failed.len(),
                )))
            }
        }
    }

    // ---- attach ---------------------------------------------------------------

    async fn announce(&self) -> Result<(), FrontendError> {
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
    async fn announce_to(
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
    fn holders(&self, rebuilding: bool) -> BTreeSet<NodeId> {
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

    /// DESIGN item 7: replicas keep a per-chunk dirty mark until a flush; the
    /// chunks dirty anywhere are made identical on all in-sync replicas
    /// before any I/O is served.
    async fn reconcile(&self) -> Result<(), FrontendError> {
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
                let data = self.read_from_any(id, run.byte_offset(), run.byte_len() as u32, &run.sources).await?;
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

    async fn write_piece(&self, p: policy::Piece, data: Bytes, fua: bool) -> Result<(), BlockError> {
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
        let results = join_all(
            pieces.iter().map(|&p| self.zero_piece(p, trim, fua).instrument(debug_span!("chunk", chunk = p.chunk.0))),
        )
        .await;
        results.into_iter().collect::<Result<(), BlockError>>()?;
        bump(if trim { &self.stats.trims } else { &self.stats.write_zeroes }, 1);
        Ok(())
    }

    async fn do_flush(&self) -> Result<(), BlockError> {
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
