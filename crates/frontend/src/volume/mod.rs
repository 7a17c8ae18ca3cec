//! [`Volume`]: one attached volume, a [`BlockDev`] over replicated chunks.
//!
//! I/O path file: no blocking calls, no info logs per I/O, no volume-wide lock
//! on the data path that a writer holds (per-chunk state; the node map is a
//! copy-on-write `Arc` behind a std `RwLock`, read for a clone; the membership
//! call happens only when a replica fails).
//!
//! The layout can change while the volume is attached ([`Volume::apply_layout`]):
//! the provider adds rebuilding replicas, promotes them, retires others.
//!
//! One file per seam:
//! - [`chunk`]: a chunk's state (its replica set, the locks that order writes,
//!   repairs and set changes) and the membership changes made through it
//!   (ejections, executing a write plan);
//! - [`layout`]: following a newer layout while attached ([`Volume::apply_layout`]);
//! - [`reconcile`]: what attach does before I/O is served (announce the epoch,
//!   reconcile the chunks left dirty);
//! - [`io`]: the data path ([`BlockDev`] for [`Volume`], read repair, the one
//!   rewrite path shared with the scrub).

mod chunk;
mod fill;
mod io;
mod layout;
mod reconcile;
mod snapshot;

pub use snapshot::TakenSnapshot;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::RwLock as StdRwLock;
use std::task::Poll;
use std::time::Duration;

use ballast_blockdev::{check_range, BlockDev, BlockError};
use ballast_types::{ChunkId, ChunkIdx, Epoch, NodeId, Seq, VolumeId, BLOCK_SIZE};
use tokio::sync::{Mutex as AsyncMutex, Semaphore};
use tracing::{info, warn};

use crate::membership::{Membership, Replica, ReplicaSet};
use crate::metrics::{self, VolumeMetrics, VolumeSeries};
use crate::replica_io::{ReplicaError, ReplicaIo};
use crate::FrontendError;

pub(crate) use chunk::ChunkState;
pub(crate) use io::Rewrite;
use layout::validate_layout;

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
    /// The process's front-end metric families: the attach makes the volume's
    /// series (label `volume`, its name) and closing it removes them (see
    /// [`crate::metrics`]). None: no metrics. Default: None.
    pub metrics: Option<VolumeMetrics>,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            local_node: None,
            io_timeout: Duration::from_secs(10),
            max_inflight_bytes: 64 << 20,
            metrics: None,
        }
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

/// The volume's counters. Those the metrics export are the metric series
/// themselves (one atomic, counted once); the others are the volume's own.
#[derive(Default)]
pub(crate) struct Counters {
    reads: Counter,
    writes: Counter,
    bytes_read: Counter,
    bytes_written: Counter,
    flushes: Counter,
    trims: Counter,
    write_zeroes: Counter,
    ejections: Counter,
    read_repairs: Counter,
    reconciled_blocks: Counter,
    errors: Counter,
    pub(crate) scrub_passes: Counter,
    pub(crate) scrubbed_bytes: Counter,
    pub(crate) scrub_corrupt: Counter,
    pub(crate) scrub_repaired: Counter,
    pub(crate) scrub_unrepairable: Counter,
}

impl Counters {
    fn new(series: Option<&VolumeSeries>) -> Counters {
        let Some(s) = series else { return Counters::default() };
        Counters {
            bytes_read: s.counter(metrics::C_READ_BYTES),
            bytes_written: s.counter(metrics::C_WRITTEN_BYTES),
            ejections: s.counter(metrics::C_EJECTIONS),
            read_repairs: s.counter(metrics::C_READ_REPAIRS),
            reconciled_blocks: s.counter(metrics::C_RECONCILED),
            scrub_passes: s.counter(metrics::C_SCRUB_PASSES),
            scrubbed_bytes: s.counter(metrics::C_SCRUB_BYTES),
            scrub_corrupt: s.counter(metrics::C_SCRUB_CORRUPT),
            scrub_repaired: s.counter(metrics::C_SCRUB_REPAIRED),
            scrub_unrepairable: s.counter(metrics::C_SCRUB_UNREPAIRABLE),
            ..Counters::default()
        }
    }
}

/// A counter every thread serving requests adds to, one shard per thread
/// ([`ballast_metrics::ShardedCounter`]; the exported ones are the metric series).
type Counter = ballast_metrics::ShardedCounter;

pub(crate) fn bump(c: &Counter, n: u64) {
    c.inc_by(n);
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
    /// The volume's snapshot cuts, ascending; held while a snapshot is taken
    /// or deleted (one at a time).
    snapshots: AsyncMutex<Vec<Seq>>,
    stopped: AtomicBool,
    inflight: Semaphore,
    max_inflight: u32,
    rr: AtomicUsize,
    pub(crate) stats: Counters,
    /// The volume's metric series (None: no metrics).
    pub(crate) metrics: Option<VolumeSeries>,
}

/// A volume dropped without [`Volume::close`] (a failed attach, a failed
/// teardown) takes its series with it too.
impl<M: Membership, R: ReplicaIo> Drop for Volume<M, R> {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.remove();
        }
    }
}

/// Polls every future to completion concurrently on the current task (no
/// spawns: a hand-off to another worker costs about as much as a local I/O).
pub async fn join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
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
        let (epoch, layout, snapshots) = (attachment.epoch, attachment.layout, attachment.snapshots);
        let unfilled = attachment.unfilled;
        validate_layout(volume, &layout)?;
        info!(volume = %volume, name = %layout.name, epoch = %epoch, chunks = layout.chunks.len(), "attaching volume");
        let max_inflight = options.max_inflight_bytes.clamp(BLOCK_SIZE as usize, u32::MAX as usize) as u32;
        let metrics = options.metrics.as_ref().map(|m| m.volume(&layout.name));
        if let Some(m) = &metrics {
            m.set_epoch(epoch.0);
            m.set_size(layout.size);
        }
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
            chunks: layout
                .chunks
                .into_iter()
                .enumerate()
                .map(|(i, set)| ChunkState::with_data(set, !unfilled.contains(&ChunkIdx(i as u32))))
                .collect::<boxcar::Vec<_>>(),
            next_seq: AtomicU64::new(1),
            snapshots: AsyncMutex::new(snapshots),
            stopped: AtomicBool::new(false),
            inflight: Semaphore::new(max_inflight as usize),
            max_inflight,
            rr: AtomicUsize::new(0),
            stats: Counters::new(metrics.as_ref()),
            metrics,
        };
        v.announce().await?;
        // Reconciliation first, then the cuts, then client I/O.
        //
        // Every cut this attach brings that the replicas do not know yet is a
        // previous epoch's end, `(E, MAX)` (a snapshot of the volume while it
        // was detached, or one requested from a front end that went away):
        // nothing written at `E` or before is above it. Reconciliation makes
        // the replicas agree on the blocks the previous front end left in
        // flight (writing the winning version under a seq of this epoch);
        // that agreed state is what the volume held at `E`'s end, so it must
        // be in those snapshots. With the cuts installed first, each replica
        // would freeze its own pre-reconciliation copy, and a snapshot would
        // read differently from one replica to the next (an acknowledged
        // write present on two replicas, missing on the third's frozen view).
        // The cuts the replicas knew already (taken at `E` or before, each
        // installed before any write above it) freeze as before.
        //
        // After the cuts, before any client write: every write from here on
        // is above every cut, and every replica node knows them.
        v.reconcile().await?;
        let cuts = v.snapshots.lock().await.clone();
        if !cuts.is_empty() {
            v.install_cuts(&cuts).await.map_err(|e| FrontendError::Snapshots { volume, message: e.to_string() })?;
        }
        info!(volume = %volume, epoch = %epoch, unfilled = unfilled.len(), "volume attached; serving I/O");
        let v = Arc::new(v);
        if !unfilled.is_empty() {
            v.start_filler(unfilled);
        }
        Ok(v)
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
    /// first for a clean detach. The volume's metric series are removed.
    pub fn close(&self) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            info!(volume = %self.id, epoch = %self.epoch, "volume closed");
        }
        if let Some(m) = &self.metrics {
            m.remove();
        }
    }

    /// Records the layout generation this front end writes with (the
    /// `ballast_frontend_layout_generation` gauge; no-op without metrics). The
    /// membership provider's generation: the front end itself does not have one.
    pub fn set_layout_generation(&self, generation: u64) {
        if let Some(m) = &self.metrics {
            m.set_layout_generation(generation);
        }
    }

    pub fn stats(&self) -> VolumeStats {
        let s = &self.stats;
        let l = |c: &Counter| c.get();
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
}
