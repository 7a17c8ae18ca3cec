//! I/O PATH (the async methods). No blocking calls on tokio threads: data I/O and
//! fdatasync go through the ring; file creation, deletion and epoch persistence go
//! through `spawn_blocking`. Per-I/O events are debug/trace; info is for state
//! changes (epoch announced, chunk created/deleted, recovery results).
//! `ChunkStore::open` is synchronous and meant for startup.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ballast_types::{BlockContext, BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId, BLOCK_SIZE, BLOCK_SIZE_U64};
use bytes::Bytes;
use tokio::sync::{oneshot, OwnedRwLockReadGuard, RwLock as AsyncRwLock};
use tracing::{debug, info, trace, warn, Instrument};

use crate::aligned::{self, AlignedBuf};
use crate::ctxmap::CtxMap;
use crate::layout::{self, CtxHeader};
use crate::metrics::{DiskMetrics, StoreOp};
use crate::rangelock::{RangeGuard, RangeLocks};
use crate::ring::{Done, Op, OpKind, Ring, WriteBuf};
use crate::{ChunkInfo, ResyncBlock, ResyncOutcome, StoreError, StoreOptions};

mod snapshot;

use snapshot::destination;

type Result<T> = std::result::Result<T, StoreError>;
/// An operation for the ring: (what, file, offset, len, what to hold until done).
type Req<'a> = (OpKind, &'a Arc<OwnedFd>, u64, u64, Hold);

const CHUNKS_DIR: &str = "chunks";
const EPOCHS_DIR: &str = "epochs";
const SNAPSHOTS_DIR: &str = "snapshots";
const MARKER: &str = "ballast-chunkstore";
/// Recovery reads a dirty chunk in pieces of this many bytes.
const SCAN_PIECE: u64 = 1 << 20;

/// What a store's files take on disk ([`ChunkStore::space`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreSpace {
    /// Every layer of every chunk: data and context files.
    pub used: u64,
    /// Per volume with frozen layers here: the snapshots' share of `used`.
    pub snapshots: std::collections::BTreeMap<VolumeId, SnapshotSpace>,
}

/// One volume's frozen snapshot layers on a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSpace {
    pub layers: u64,
    pub bytes: u64,
}

/// Refuses a filesystem whose allocation block is smaller than a store block.
///
/// Invariant kept: a write that fails part way (ENOSPC as the disk fills) has
/// written whole 4096-byte blocks only, so retracting the slots of the blocks
/// past what was written (`Writing`'s drop) leaves every block matching its
/// current context. On a filesystem of 1024-byte blocks (mkfs.ext4's default
/// below 512 MiB) an O_DIRECT write cut short by ENOSPC can stop inside a
/// store block, which no slot then matches. (The fault suite's
/// every-disk-full scenario still finds blocks failing their checksum on
/// every copy after ENOSPC with 4096-byte filesystem blocks: a second cause,
/// not found yet; see docs/DESIGN.md, section 12.)
fn check_fs_block(dir: &Path) -> Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| StoreError::InvalidRequest(format!("{}: a path with a NUL byte", dir.display())))?;
    // SAFETY: statvfs is plain old data; all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path; statvfs writes only into `st`, which we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(StoreError::io("statvfs", dir, io::Error::last_os_error()));
    }
    let fs_block = st.f_bsize as u64;
    if fs_block != 0 && fs_block < BLOCK_SIZE_U64 {
        return Err(StoreError::SmallFsBlocks { dir: dir.to_path_buf(), fs_block });
    }
    Ok(())
}

/// A handle to one disk's chunk store. Cheap to clone; the ring thread stops when
/// the last clone is dropped (after finishing what is in flight).
#[derive(Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    chunks_dir: PathBuf,
    epochs_dir: PathBuf,
    snapshots_dir: PathBuf,
    direct: bool,
    ring: Ring,
    chunks: RwLock<HashMap<ChunkId, Arc<Chunk>>>,
    /// The sizes of the chunks in `chunks`, summed; changed with the map
    /// (create, delete), under `admin`.
    chunk_bytes: AtomicU64,
    volumes: RwLock<HashMap<VolumeId, Arc<VolumeFence>>>,
    /// Per volume with snapshots, its cuts, ascending (`snapshots/*.cuts`).
    cuts: RwLock<HashMap<VolumeId, Arc<[Seq]>>>,
    /// Serializes chunk creation and deletion (file-system work, rare).
    admin: tokio::sync::Mutex<()>,
    /// One merge of snapshot layers at a time (store/snapshot.rs).
    merging: tokio::sync::Mutex<()>,
    /// One change of a volume's cuts at a time (set_cuts reads the old list,
    /// then replaces it).
    setting_cuts: tokio::sync::Mutex<()>,
    /// The store marker says version 2 (snapshot layers).
    marker_v2: std::sync::atomic::AtomicBool,
    metrics: Option<DiskMetrics>,
}

/// A volume's announced epoch. Data ops hold `lock` shared across their I/O and
/// check the epoch under it; announce takes it exclusively, so once announce has
/// returned no older op is still changing data.
struct VolumeFence {
    lock: Arc<AsyncRwLock<Epoch>>,
    /// Mirror of the locked value for the synchronous `epoch()` getter.
    current: AtomicU64,
}

/// One layer of a chunk replica (see layout.rs, "Snapshot layers"): the live
/// (top) one is in the store's map; the frozen ones hang below it.
struct Chunk {
    id: ChunkId,
    size: u64,
    /// The layer holds block versions with seqs above this (exclusive).
    lower: Seq,
    /// The next layer down (frozen), if any. Changed only with the whole
    /// chunk's range locked exclusively.
    below: RwLock<Option<Arc<Chunk>>>,
    /// Set when a newer layer replaced this one as the live layer: an
    /// operation that locked this layer's blocks after that starts again
    /// from the map.
    retired: std::sync::atomic::AtomicBool,
    data: Arc<OwnedFd>,
    ctx_fd: Arc<OwnedFd>,
    ctx: CtxMap,
    data_path: PathBuf,
    ctx_path: PathBuf,
    locks: Arc<RangeLocks>,
    state: Mutex<DirtyState>,
    /// Serializes setting the durable dirty mark.
    mark_lock: tokio::sync::Mutex<()>,
    /// Done once the chunk's slots are known to match its data (immediately for
    /// chunks that were clean at open; after a scan for chunks that were dirty).
    recovered: tokio::sync::OnceCell<()>,
}

/// Dirty-mark bookkeeping. Invariant: `dirty == false` implies every write started
/// so far has completed and was covered by a completed fdatasync of data and
/// contexts; the on-disk mark is set (durably) before `dirty` becomes true.
#[derive(Default)]
struct DirtyState {
    dirty: bool,
    /// Writes (incl. trims / zeroes) started since open.
    started: u64,
    /// Writes whose I/O has not finished.
    inflight: u64,
}

/// Whatever must stay held until the kernel has finished an operation; dropped by
/// the ring thread at completion, so a caller that stops waiting cannot release
/// locks while its data is still being written. Field order is drop order: a
/// failed write retracts its slots while it still holds the blocks.
pub struct Hold {
    writing: Option<Writing>,
    _locks: Option<Arc<MutationLocks>>,
}

/// The locks a mutation keeps until its last I/O has completed: the blocks it
/// changes and the volume's fence. Shared (`Arc`) by the I/Os of a resync write,
/// which issues one I/O per run of blocks it applies; released with the last.
struct MutationLocks {
    _range: RangeGuard,
    _fence: OwnedRwLockReadGuard<Epoch>,
}

impl Hold {
    pub fn none() -> Hold {
        Hold { writing: None, _locks: None }
    }

    /// The operation failed after `done` bytes.
    pub fn failed(&mut self, done: u64) {
        if let Some(w) = self.writing.as_mut() {
            w.failed_after = Some(done);
        }
    }
}

/// One write in flight on a chunk (counted in `DirtyState::inflight`).
struct Writing {
    chunk: Arc<Chunk>,
    /// Blocks whose inactive slots this write filled, retracted if it fails.
    blocks: Option<(u32, u32)>,
    failed_after: Option<u64>,
}

impl Drop for Writing {
    fn drop(&mut self) {
        if let (Some(done), Some((b0, b1))) = (self.failed_after, self.blocks) {
            // Blocks the kernel counted as written keep their new slot; the
            // rest are settled by what the disk holds.
            let first_unconfirmed = b0 + (done / BLOCK_SIZE_U64) as u32;
            if first_unconfirmed < b1 {
                self.chunk.settle_failed(first_unconfirmed, b1);
            }
        }
        let mut st = self.chunk.state.lock().unwrap_or_else(|p| p.into_inner());
        st.inflight -= 1;
    }
}

impl Chunk {
    /// Blocks [b0, b1) of a write that failed, each with its new context
    /// staged as its current slot: each keeps the slot its data matches.
    /// A failed write may still have written some of the blocks it did not
    /// count (measured: on ext4 on a loop device, an O_DIRECT write through
    /// io_uring into holes of a nearly full filesystem answered ENOSPC after
    /// writing some of its blocks), so the blocks are read back and compared
    /// with the new slot's crc; the new slot is retracted where the data is
    /// not the new version. Synchronous, on the ring thread, with the blocks
    /// still locked: failures only. A block that cannot be read back gets its
    /// new slot retracted; if its data did change, reads then report a
    /// checksum error there, which read repair heals from another replica.
    fn settle_failed(&self, b0: u32, b1: u32) {
        let len = (b1 - b0) as usize * BLOCK_SIZE as usize;
        let mut buf = AlignedBuf::zeroed(len);
        let read = self
            .data
            .try_clone()
            .map(File::from)
            .and_then(|f| f.read_exact_at(buf.as_mut(), u64::from(b0) * BLOCK_SIZE_U64));
        if let Err(e) = &read {
            warn!(chunk = %self.id, error = %e, "reading back the blocks of a failed write failed");
        }
        let mut kept = 0u32;
        for (i, b) in (b0..b1).enumerate() {
            let Some(slot) = self.current_slot(b) else { continue };
            let landed = read.is_ok() && {
                let data = &buf.as_ref()[i * BLOCK_SIZE as usize..(i + 1) * BLOCK_SIZE as usize];
                let (s0, s1) = self.ctx.slots(b);
                [s0, s1][slot].context().is_some_and(|c| c.1 == crc32fast::hash(data))
            };
            if landed {
                kept += 1;
            } else {
                self.ctx.retract(b, slot);
            }
        }
        if kept > 0 {
            warn!(chunk = %self.id, blocks = b1 - b0, landed = kept, "a failed write reached the disk for some blocks: their new contexts kept");
        }
    }

    fn current_slot(&self, b: u32) -> Option<usize> {
        let (s0, s1) = self.ctx.slots(b);
        layout::current_slot(&s0, &s1)
    }

    fn info(self: &Arc<Self>) -> ChunkInfo {
        ChunkInfo { id: self.id, size: self.size, dirty: self.any_layer_dirty() }
    }

    /// True if this layer or one below it has writes not flushed yet.
    fn any_layer_dirty(self: &Arc<Self>) -> bool {
        self.stack().iter().any(|l| l.is_dirty())
    }

    fn is_dirty(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).dirty
    }

    /// True if `block`'s current slot in this layer holds a written version
    /// (not empty, not retracted): the layer answers for the block.
    fn written(&self, block: u32) -> bool {
        let (s0, s1) = self.ctx.slots(block);
        layout::current_slot(&s0, &s1).is_some_and(|i| matches!([s0, s1][i], layout::Slot::Valid { .. }))
    }

    fn below(&self) -> Option<Arc<Chunk>> {
        self.below.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This layer and the ones below it, top first.
    fn stack(self: &Arc<Self>) -> Vec<Arc<Chunk>> {
        let mut out = vec![self.clone()];
        while let Some(b) = out.last().and_then(|c| c.below()) {
            out.push(b);
        }
        out
    }

    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

/// Which layer of `stack` (top first) answers for `block`: the first in which
/// it is written; None: written in none (it reads as zeros).
fn owner(stack: &[Arc<Chunk>], block: u32) -> Option<usize> {
    stack.iter().position(|l| l.written(block))
}

/// True if a mutation at `seq` of a layer with lower bound `lower` must first
/// freeze it: some cut lies strictly between them.
fn needs_freeze(cuts: &[Seq], lower: Seq, seq: Seq) -> bool {
    cuts.iter().any(|c| lower < *c && *c < seq)
}

/// How [`ChunkStore::begin_mutation`] ended.
enum Mutation {
    Staged(Arc<Chunk>, Hold),
    Empty,
    Superseded,
}

/// Blocks locked for a mutation (see `ChunkStore::lock_blocks`).
struct Locked {
    c: Arc<Chunk>,
    b0: u32,
    b1: u32,
    locks: MutationLocks,
}

/// A run of consecutive blocks a resync write applies with one I/O.
struct Run {
    start: u32,
    end: u32,
    /// Punch (zero) rather than write data.
    zero: bool,
    /// Index of the run's first block among the request's data blocks.
    data_first: usize,
    /// The layer it goes to: an index into the chunk's stack, top first.
    layer: usize,
}

/// Where a [`ChunkStore::resync_inner`] call may put versions.
#[derive(Clone, Copy, Debug)]
pub(super) enum Place {
    /// A resync of the source's live view (None) or of its view at a cut:
    /// each version goes to the layer its seq belongs in (store/snapshot.rs).
    Resync(Option<Seq>),
    /// A client write older than some of its blocks: only into the live layer.
    Write,
}

/// Stages the new contexts of blocks [b0, b1) (`ctx_of(b)` = (seq, crc) of block
/// b) for the write counted by `writing`, and returns the hold for its I/O.
///
/// Synchronous on purpose: the caller submits the I/O before its next await, so a
/// caller that drops its future can never leave staged slots whose data never
/// comes (once the op exists, a failure retracts them; see `Writing`'s drop).
fn stage(
    mut writing: Writing,
    b0: u32,
    b1: u32,
    locks: &Arc<MutationLocks>,
    ctx_of: impl Fn(u32) -> (Seq, u32),
) -> Hold {
    // Invariant: each block's new context is in its INACTIVE slot before its
    // data is submitted; the current slot stays intact until the I/O is done.
    for b in b0..b1 {
        let (seq, crc) = ctx_of(b);
        writing.chunk.ctx.write_inactive(b, seq, crc);
    }
    writing.blocks = Some((b0, b1));
    Hold { writing: Some(writing), _locks: Some(locks.clone()) }
}

/// A mutation at `seq` belongs in the live layer `c` only if `seq` is above
/// the layer's lower bound. Below it, it is older than a snapshot cut that froze
/// the layer under it: the front end installs a cut only once no older write is
/// in flight, so such a client write is a delayed one. (A resync's copied
/// versions below it go to frozen layers instead: `resync_write_at`.)
fn below_live_layer(c: &Chunk, seq: Seq) -> Result<()> {
    if c.lower == Seq::ZERO || seq > c.lower {
        return Ok(());
    }
    Err(StoreError::InvalidRequest(format!(
        "write at seq {seq} to chunk {} is not newer than its snapshot layer's lower bound {}",
        c.id, c.lower
    )))
}

fn check_aligned(offset: u64, len: u64) -> Result<()> {
    if !offset.is_multiple_of(BLOCK_SIZE_U64) || !len.is_multiple_of(BLOCK_SIZE_U64) {
        return Err(StoreError::Misaligned { offset, len });
    }
    Ok(())
}

fn check_range(c: &Chunk, offset: u64, len: u64) -> Result<(u32, u32)> {
    check_aligned(offset, len)?;
    match offset.checked_add(len) {
        Some(end) if end <= c.size => Ok(((offset / BLOCK_SIZE_U64) as u32, (end / BLOCK_SIZE_U64) as u32)),
        _ => Err(StoreError::OutOfRange { id: c.id, offset, len, size: c.size }),
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl ChunkStore {
    /// Opens (creating if needed) the store in `dir`: lays out `chunks/` and
    /// `epochs/`, loads chunks and epochs, probes O_DIRECT, starts the ring thread.
    /// Synchronous: call it at startup, not from a latency-sensitive task.
    pub fn open(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<ChunkStore> {
        let dir = dir.as_ref().to_path_buf();
        let chunks_dir = dir.join(CHUNKS_DIR);
        let epochs_dir = dir.join(EPOCHS_DIR);
        let snapshots_dir = dir.join(SNAPSHOTS_DIR);
        for d in [&dir, &chunks_dir, &epochs_dir, &snapshots_dir] {
            fs::create_dir_all(d).map_err(|e| StoreError::io("create directory", d, e))?;
        }
        check_fs_block(&chunks_dir)?;
        let marker_version = ensure_marker(&dir)?;
        let direct = opts.direct_io && probe_direct(&chunks_dir)?;
        if opts.direct_io && !direct {
            warn!(dir = %dir.display(), "O_DIRECT refused by the filesystem; using buffered I/O");
        }
        let volumes = load_epochs(&epochs_dir)?;
        let cuts = load_cuts(&snapshots_dir)?;
        let chunks = load_chunks(&chunks_dir, direct)?;
        let ring = Ring::start(opts.queue_depth, opts.poll, "ballast-uring")
            .map_err(|e| StoreError::io("start io_uring", &dir, e))?;
        let dirty = chunks.values().filter(|c| c.any_layer_dirty()).count();
        if let Some(m) = &opts.metrics {
            for c in chunks.values() {
                m.chunk(c.size, 1);
                for l in &c.stack()[1..] {
                    m.layer(l.size, 1);
                }
            }
        }
        info!(
            dir = %dir.display(), chunks = chunks.len(), dirty, volumes = volumes.len(),
            direct_io = direct, queue_depth = opts.queue_depth, "chunk store opened"
        );
        Ok(ChunkStore {
            inner: Arc::new(Inner {
                dir,
                chunks_dir,
                epochs_dir,
                snapshots_dir,
                direct,
                ring,
                chunk_bytes: AtomicU64::new(chunks.values().map(|c| c.size).sum()),
                chunks: RwLock::new(chunks),
                volumes: RwLock::new(volumes),
                cuts: RwLock::new(cuts),
                admin: tokio::sync::Mutex::new(()),
                merging: tokio::sync::Mutex::new(()),
                setting_cuts: tokio::sync::Mutex::new(()),
                marker_v2: std::sync::atomic::AtomicBool::new(marker_version >= 2),
                metrics: opts.metrics,
            }),
        })
    }

    /// When an operation starts, if it is measured.
    fn started(&self) -> Option<std::time::Instant> {
        self.inner.metrics.as_ref().map(|_| std::time::Instant::now())
    }

    /// Records the end of an operation [`ChunkStore::started`] timed; the
    /// metrics when it succeeded (to count its bytes).
    fn finished<T>(&self, op: StoreOp, started: Option<std::time::Instant>, r: &Result<T>) -> Option<&DiskMetrics> {
        let (m, t) = (self.inner.metrics.as_ref()?, started?);
        m.done(op, t, r);
        r.is_ok().then_some(m)
    }

    /// Whether O_DIRECT is in effect for chunk data.
    pub fn direct_io(&self) -> bool {
        self.inner.direct
    }

    /// The volume's announced epoch (Epoch(0) if never announced).
    pub fn epoch(&self, volume: VolumeId) -> Epoch {
        let v = self.inner.volumes.read().unwrap_or_else(|p| p.into_inner());
        v.get(&volume).map(|f| Epoch(f.current.load(Ordering::Acquire))).unwrap_or_default()
    }

    /// Chunks of `volume` written since their last completed flush, ascending.
    pub fn dirty_chunks(&self, volume: VolumeId) -> Vec<ChunkIdx> {
        let mut out: Vec<ChunkIdx> = self
            .chunk_list()
            .into_iter()
            .filter(|c| c.id.volume == volume && c.any_layer_dirty())
            .map(|c| c.id.chunk)
            .collect();
        out.sort();
        out
    }

    /// Every chunk replica in the store, ordered by id.
    pub fn chunks(&self) -> Vec<ChunkInfo> {
        let mut out: Vec<ChunkInfo> = self.chunk_list().iter().map(|c| c.info()).collect();
        out.sort_by_key(|c| c.id);
        out
    }

    /// The chunk replicas' sizes, summed (what they take once fully
    /// written): a counter, not a walk over the chunks.
    pub fn chunk_bytes(&self) -> u64 {
        self.inner.chunk_bytes.load(Ordering::Relaxed)
    }

    /// What the chunk files take on disk: allocated blocks (so a thin chunk
    /// costs what was written to it), in total and, per volume with snapshot
    /// layers here, in the frozen layers. A stat per file: call it from a
    /// blocking context, now and then, never per request.
    pub fn space(&self) -> StoreSpace {
        use std::os::unix::fs::MetadataExt;
        let allocated = |p: &Path| fs::symlink_metadata(p).map_or(0, |m| m.blocks() * 512);
        let mut out = StoreSpace::default();
        for c in self.chunk_list() {
            for (depth, l) in c.stack().iter().enumerate() {
                let bytes = allocated(&l.data_path) + allocated(&l.ctx_path);
                out.used += bytes;
                if depth > 0 {
                    let e = out.snapshots.entry(l.id.volume).or_default();
                    e.layers += 1;
                    e.bytes += bytes;
                }
            }
        }
        out
    }

    pub fn chunk_size(&self, id: ChunkId) -> Option<u64> {
        self.get(id).map(|c| c.size)
    }

    fn chunk_list(&self) -> Vec<Arc<Chunk>> {
        let m = self.inner.chunks.read().unwrap_or_else(|p| p.into_inner());
        m.values().cloned().collect()
    }

    fn get(&self, id: ChunkId) -> Option<Arc<Chunk>> {
        let m = self.inner.chunks.read().unwrap_or_else(|p| p.into_inner());
        m.get(&id).cloned()
    }

    fn chunk(&self, id: ChunkId) -> Result<Arc<Chunk>> {
        self.get(id).ok_or(StoreError::NoSuchChunk(id))
    }

    fn fence_of(&self, volume: VolumeId) -> Arc<VolumeFence> {
        if let Some(f) = self.inner.volumes.read().unwrap_or_else(|p| p.into_inner()).get(&volume) {
            return f.clone();
        }
        let mut m = self.inner.volumes.write().unwrap_or_else(|p| p.into_inner());
        m.entry(volume)
            .or_insert_with(|| {
                Arc::new(VolumeFence { lock: Arc::new(AsyncRwLock::new(Epoch(0))), current: AtomicU64::new(0) })
            })
            .clone()
    }

    /// Checks `epoch` against the volume's announced epoch and returns the shared
    /// guard that keeps announce out until the caller's I/O is done.
    async fn fence(&self, volume: VolumeId, epoch: Epoch) -> Result<OwnedRwLockReadGuard<Epoch>> {
        let f = self.fence_of(volume);
        let g = f.lock.clone().read_owned().await;
        let current = *g;
        if epoch < current {
            return Err(StoreError::Fenced { volume, request: epoch, current });
        }
        if epoch > current {
            return Err(StoreError::UnannouncedEpoch { volume, request: epoch, current });
        }
        Ok(g)
    }

    /// Runs one operation on the ring and waits for it.
    async fn io(&self, op: &'static str, path: &Path, o: Req<'_>) -> Result<Done> {
        let rx = self.submit(o)?;
        match rx.await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(StoreError::io(op, path, e)),
            Err(_) => Err(StoreError::Shutdown),
        }
    }

    fn submit(&self, r: Req<'_>) -> Result<oneshot::Receiver<io::Result<Done>>> {
        let (tx, rx) = oneshot::channel();
        let o = Op { kind: r.0, file: r.1.clone(), offset: r.2, len: r.3, hold: r.4, reply: tx };
        self.inner.ring.submit(o).map_err(|mut o| {
            // Never submitted: retract whatever contexts it staged.
            o.hold.failed(0);
            StoreError::Shutdown
        })?;
        Ok(rx)
    }

    async fn datasync(&self, file: &Arc<OwnedFd>, path: &Path) -> Result<()> {
        self.io("fdatasync", path, (OpKind::DataSync, file, 0, 0, Hold::none())).await.map(|_| ())
    }

    /// Makes sure the chunk's slots match its data: for a chunk that was dirty at
    /// open, a crash may have left a slot written whose data write never happened.
    /// Such a slot is retracted here, before any new write could pick the wrong
    /// slot as inactive.
    async fn recovered(&self, c: &Arc<Chunk>) -> Result<()> {
        c.recovered.get_or_try_init(|| self.scan(c)).await.map(|_| ())
    }

    async fn scan(&self, c: &Arc<Chunk>) -> Result<()> {
        let (mut retracted, mut bad) = (0u64, 0u64);
        let mut off = 0;
        while off < c.size {
            let len = SCAN_PIECE.min(c.size - off);
            let o = (OpKind::Read(AlignedBuf::for_read(len as usize)), &c.data, off, len, Hold::none());
            let Done::Read(buf) = self.io("recovery read", &c.data_path, o).await? else {
                return Err(StoreError::Shutdown);
            };
            for (i, block) in buf.as_ref().chunks(BLOCK_SIZE as usize).enumerate() {
                let b = (off / BLOCK_SIZE_U64) as u32 + i as u32;
                let crc = crc32fast::hash(block);
                let (s0, s1) = c.ctx.slots(b);
                let Some(cur) = layout::current_slot(&s0, &s1) else {
                    bad += 1;
                    continue;
                };
                let slots = [s0, s1];
                if slots[cur].context().is_some_and(|x| x.1 == crc) {
                    continue;
                }
                if slots[1 - cur].context().is_some_and(|x| x.1 == crc) {
                    c.ctx.retract(b, cur);
                    retracted += 1;
                } else {
                    bad += 1;
                }
            }
            off += len;
        }
        if retracted > 0 || bad > 0 {
            warn!(chunk = %c.id, retracted, unverifiable = bad, "recovered dirty chunk");
        } else {
            info!(chunk = %c.id, "recovered dirty chunk: all blocks match their contexts");
        }
        Ok(())
    }

    /// Counts a write in and makes sure the chunk's dirty mark is durable before
    /// the caller changes anything.
    async fn begin_write(&self, c: &Arc<Chunk>) -> Result<Writing> {
        let writing = {
            let mut st = c.state.lock().unwrap_or_else(|p| p.into_inner());
            st.started += 1;
            st.inflight += 1;
            let w = Writing { chunk: c.clone(), blocks: None, failed_after: None };
            if st.dirty {
                return Ok(w);
            }
            w
        };
        let _m = c.mark_lock.lock().await;
        if c.is_dirty() {
            return Ok(writing);
        }
        c.ctx.set_dirty(true);
        self.datasync(&c.ctx_fd, &c.ctx_path).await?;
        c.state.lock().unwrap_or_else(|p| p.into_inner()).dirty = true;
        debug!(chunk = %c.id, "dirty mark set");
        Ok(writing)
    }

    /// Creates a chunk replica of `size` bytes (a multiple of 4096). Idempotent
    /// for the same size; `ChunkExists` if it exists with another size.
    pub async fn create_chunk(&self, id: ChunkId, size: u64, epoch: Epoch) -> Result<()> {
        let t = self.started();
        let r = self.create_inner(id, size, epoch).await;
        self.finished(StoreOp::CreateChunk, t, &r);
        r
    }

    async fn create_inner(&self, id: ChunkId, size: u64, epoch: Epoch) -> Result<()> {
        let _fence = self.fence(id.volume, epoch).await?;
        check_aligned(0, size)?;
        if size == 0 || size / BLOCK_SIZE_U64 > u32::MAX as u64 {
            return Err(StoreError::OutOfRange { id, offset: 0, len: size, size: u32::MAX as u64 * BLOCK_SIZE_U64 });
        }
        let _admin = self.inner.admin.lock().await;
        if let Some(c) = self.get(id) {
            if c.size == size {
                return Ok(());
            }
            return Err(StoreError::ChunkExists { id, size, existing: c.size });
        }
        let dir = self.inner.chunks_dir.clone();
        let direct = self.inner.direct;
        // Every write it will get is newer than every cut known now (the front
        // end installs a cut on every replica before its first write above it).
        let lower = self.cuts(id.volume).last().copied().unwrap_or(Seq::ZERO);
        let chunk = tokio::task::spawn_blocking(move || create_chunk_files(&dir, id, size, lower, direct))
            .await
            .map_err(|_| StoreError::Shutdown)??;
        self.inner.chunks.write().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::new(chunk));
        self.inner.chunk_bytes.fetch_add(size, Ordering::Relaxed);
        if let Some(m) = &self.inner.metrics {
            m.chunk(size, 1);
        }
        info!(chunk = %id, size, "chunk created");
        Ok(())
    }

    /// Deletes a chunk replica and its files. Idempotent.
    pub async fn delete_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<()> {
        let t = self.started();
        let r = self.delete_inner(id, epoch).await;
        self.finished(StoreOp::DeleteChunk, t, &r);
        r
    }

    async fn delete_inner(&self, id: ChunkId, epoch: Epoch) -> Result<()> {
        let _fence = self.fence(id.volume, epoch).await?;
        let _admin = self.inner.admin.lock().await;
        let Some(c) = self.inner.chunks.write().unwrap_or_else(|p| p.into_inner()).remove(&id) else {
            return Ok(());
        };
        self.inner.chunk_bytes.fetch_sub(c.size, Ordering::Relaxed);
        let stack = c.stack();
        if let Some(m) = &self.inner.metrics {
            m.chunk(c.size, -1);
            for l in &stack[1..] {
                m.layer(l.size, -1);
            }
        }
        // Top layer first: a layer below one whose files are gone would be
        // taken for the live layer at the next open.
        let files: Vec<(PathBuf, PathBuf)> = stack.iter().map(|l| (l.ctx_path.clone(), l.data_path.clone())).collect();
        // In-flight I/O holds the chunk (and its descriptors) until it completes.
        drop((c, stack));
        // The ctx file goes first: a data file without one is removed at open.
        self.remove_files(files.into_iter().flat_map(|(ctx, data)| [ctx, data]).collect()).await?;
        info!(chunk = %id, "chunk deleted");
        Ok(())
    }

    /// Deletes `files` in order (a missing one is fine) and syncs the chunks
    /// directory.
    async fn remove_files(&self, files: Vec<PathBuf>) -> Result<()> {
        let dir = self.inner.chunks_dir.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            for p in &files {
                match fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io("delete chunk file", p, e)),
                }
            }
            fsync_dir(&dir)
        })
        .await
        .map_err(|_| StoreError::Shutdown)?
    }

    /// Writes `data` (whole blocks) at `offset` with sequence `seq`; `seq.epoch` is
    /// fence-checked. (Resync copies blocks with their original seqs through
    /// [`ChunkStore::resync_write`], whose fence epoch is separate.)
    pub async fn write(&self, id: ChunkId, offset: u64, data: Bytes, seq: Seq) -> Result<()> {
        let span = tracing::debug_span!("chunk_write", volume = id.volume.0, chunk = id.chunk.0, offset, len = data.len(), %seq);
        let (t, len) = (self.started(), data.len() as u64);
        let r = self.write_inner(id, offset, data, seq).instrument(span).await;
        if let Some(m) = self.finished(StoreOp::Write, t, &r) {
            m.written(len);
        }
        r
    }

    /// The common start of every mutation (write, trim, write-zeroes): checks the
    /// request, takes the fence, the chunk's block range lock and its dirty mark,
    /// and stages each block's new context (`crc_of(i)` for the i-th block of the
    /// range). Returns the chunk and the [`Hold`] to keep until the I/O is done,
    /// [`Mutation::Empty`] for an empty range, or [`Mutation::Superseded`] when a
    /// block already holds a write at `seq` or newer (nothing staged then; the
    /// caller applies the request block by block, see below).
    ///
    /// Invariant: a block's seq only ever grows. Every write, trim and zeroing of
    /// a front end carries a fresh seq (its epoch, then a counter; epochs only
    /// grow), so an incoming seq at or below a block's current one belongs to a
    /// write that was overtaken: a request delayed in the network or in this
    /// server's queue past the front end's deadline, arriving after a newer
    /// write to the same block was acknowledged. Applying it would silently undo
    /// that acknowledged write (the deterministic simulator, crates/sim, found
    /// exactly this). Such a request keeps the newer blocks and applies only the
    /// rest, decided per block under the range lock by the resync rule with
    /// `protect_from = Seq::ZERO`. Replicas that receive overlapping writes in
    /// different orders thereby also converge on the same (highest-seq) content.
    /// The check is made here, under the exclusive range lock, so no newer write
    /// can land between it and the staging.
    async fn begin_mutation(
        &self,
        id: ChunkId,
        offset: u64,
        len: u64,
        seq: Seq,
        crc_of: impl Fn(u32) -> u32,
    ) -> Result<Mutation> {
        self.freeze_for(id, seq, seq.epoch).await?;
        let Some(l) = self.lock_blocks(id, offset, len, seq.epoch).await? else {
            return Ok(Mutation::Empty);
        };
        below_live_layer(&l.c, seq)?;
        if (l.b0..l.b1).any(|b| l.c.ctx.current(b).is_some_and(|(current, _)| current >= seq)) {
            return Ok(Mutation::Superseded);
        }
        let writing = self.begin_write(&l.c).await?;
        let hold = stage(writing, l.b0, l.b1, &Arc::new(l.locks), |b| (seq, crc_of(b - l.b0)));
        Ok(Mutation::Staged(l.c, hold))
    }

    /// Checks a mutation of [offset, +len) under fence epoch `epoch` and locks its
    /// blocks exclusively; `None` for an empty range.
    async fn lock_blocks(&self, id: ChunkId, offset: u64, len: u64, epoch: Epoch) -> Result<Option<Locked>> {
        check_aligned(offset, len)?;
        let fence = self.fence(id.volume, epoch).await?;
        loop {
            let c = self.chunk(id)?;
            let (b0, b1) = check_range(&c, offset, len)?;
            if len == 0 {
                return Ok(None);
            }
            self.recovered(&c).await?;
            let range = c.locks.lock(b0, b1, false).await;
            if c.is_retired() {
                // Frozen while we waited: the live layer is a new one.
                continue;
            }
            return Ok(Some(Locked { c, b0, b1, locks: MutationLocks { _range: range, _fence: fence } }));
        }
    }

    async fn write_inner(&self, id: ChunkId, offset: u64, data: Bytes, seq: Seq) -> Result<()> {
        let len = data.len() as u64;
        let bs = BLOCK_SIZE as usize;
        let crc_of = |i: u32| crc32fast::hash(&data[i as usize * bs..(i as usize + 1) * bs]);
        let (c, hold) = match self.begin_mutation(id, offset, len, seq, crc_of).await? {
            Mutation::Staged(c, hold) => (c, hold),
            Mutation::Empty => return Ok(()),
            Mutation::Superseded => {
                let blocks = vec![ResyncBlock::Data(seq); data.len() / bs];
                let out = self.resync_inner(id, offset, &blocks, data, seq.epoch, Seq::ZERO, Place::Write).await?;
                debug!(written = out.written, kept = out.skipped, "write older than some of its blocks: those kept");
                return Ok(());
            }
        };
        let buf = if aligned::is_aligned(data.as_ptr(), data.len()) {
            WriteBuf::Bytes(data)
        } else {
            WriteBuf::Aligned(AlignedBuf::copy_from(&data))
        };
        let o = (OpKind::Write(buf), &c.data, offset, len, hold);
        self.io("write", &c.data_path, o).await?;
        debug!("written");
        Ok(())
    }

    /// Reads `len` bytes at `offset`, every block verified against its contexts.
    pub async fn read(&self, id: ChunkId, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes> {
        let span = tracing::debug_span!("chunk_read", volume = id.volume.0, chunk = id.chunk.0, offset, len, %epoch);
        let t = self.started();
        let r = self.read_inner(id, offset, len, epoch).instrument(span).await;
        if let Some(m) = self.finished(StoreOp::Read, t, &r) {
            m.read(u64::from(len));
        }
        r
    }

    async fn read_inner(&self, id: ChunkId, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes> {
        check_aligned(offset, len as u64)?;
        drop(self.fence(id.volume, epoch).await?);
        if len == 0 {
            check_range(&*self.chunk(id)?, offset, 0)?;
            return Ok(Bytes::new());
        }
        // Shared: no write may change these blocks' slots between our read and
        // our verification.
        let (c, b0, b1, _range) = self.lock_shared(id, offset, len as u64).await?;
        if c.below().is_some() {
            return self.read_layers(&c.stack(), b0, b1).await;
        }
        let o = (OpKind::Read(AlignedBuf::for_read(len as usize)), &c.data, offset, len as u64, Hold::none());
        let Done::Read(buf) = self.io("read", &c.data_path, o).await? else {
            return Err(StoreError::Shutdown);
        };
        for (i, block) in buf.as_ref().chunks(BLOCK_SIZE as usize).enumerate() {
            let b = b0 + i as u32;
            if !c.ctx.verifies(b, crc32fast::hash(block)) {
                warn!(chunk = %id, block = b, "checksum mismatch");
                return Err(StoreError::ChecksumMismatch { id, block: BlockIdx(b) });
            }
        }
        debug_assert_eq!(b1 - b0, len / BLOCK_SIZE);
        Ok(Bytes::from_owner(buf))
    }

    /// Zeroes [offset, +len): punches a hole and records the zero block's crc with `seq`.
    pub async fn write_zeroes(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<()> {
        let span =
            tracing::debug_span!("chunk_write_zeroes", volume = id.volume.0, chunk = id.chunk.0, offset, len, %seq);
        let t = self.started();
        let r = self.punch("write zeroes", id, offset, len, seq).instrument(span).await;
        self.finished(StoreOp::WriteZeroes, t, &r);
        r
    }

    /// Discards [offset, +len): afterwards it reads as zeros, with context `seq`.
    pub async fn trim(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<()> {
        let span = tracing::debug_span!("chunk_trim", volume = id.volume.0, chunk = id.chunk.0, offset, len, %seq);
        let t = self.started();
        let r = self.punch("trim", id, offset, len, seq).instrument(span).await;
        self.finished(StoreOp::Trim, t, &r);
        r
    }

    async fn punch(&self, op: &'static str, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<()> {
        let zero = layout::zero_block_crc();
        let (c, hold) = match self.begin_mutation(id, offset, len, seq, |_| zero).await? {
            Mutation::Staged(c, hold) => (c, hold),
            Mutation::Empty => return Ok(()),
            Mutation::Superseded => {
                let blocks = vec![ResyncBlock::Zero(seq); (len / BLOCK_SIZE_U64) as usize];
                let out =
                    self.resync_inner(id, offset, &blocks, Bytes::new(), seq.epoch, Seq::ZERO, Place::Write).await?;
                debug!(zeroed = out.zeroed, kept = out.skipped, "{op} older than some of its blocks: those kept");
                return Ok(());
            }
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let o = (OpKind::Fallocate { mode }, &c.data, offset, len, hold);
        self.io(op, &c.data_path, o).await?;
        debug!("punched");
        Ok(())
    }

    /// Resync and rebuild: applies a source replica's blocks to this (target)
    /// replica, each with the source's ORIGINAL seq, wherever that cannot undo a
    /// newer write. `blocks[i]` describes block `offset / 4096 + i`; `data` holds
    /// the 4096 bytes of each [`ResyncBlock::Data`] entry, in entry order. `epoch`
    /// is the request's fence epoch (the block seqs are the source's and may be
    /// older). Returns how many blocks were written, zeroed and skipped.
    ///
    /// The rule, per block, with `current` the block's seq here (`Seq::ZERO` when
    /// never written or when no slot is usable):
    ///
    /// ```text
    ///   apply  iff  current < incoming  ||  current < protect_from
    /// ```
    ///
    /// The first half is the crux of copying while the front end keeps writing:
    /// the copier may read a block at seq s1 from the source while the front end
    /// writes the same block at s2 > s1 to both replicas; whichever reaches this
    /// replica first, the older copy never replaces the newer write. The second
    /// half lets the caller name the seqs that can be such concurrent writes (the
    /// front end's writes since it began sending to this replica, e.g.
    /// `Seq::new(epoch, 0)`): below it, the in-sync source is authoritative, so a
    /// write this replica got but the source never did (one that was never
    /// acknowledged, from before the replica was ejected) is replaced too.
    /// `protect_from = Seq::ZERO` keeps only the first half.
    ///
    /// Invariant: the decision and the staging of each applied block's context
    /// happen under the chunk's exclusive block range lock, which every normal
    /// write also takes, so no write can slip in between the comparison and the
    /// change. Applied blocks go to disk like any write: new context in the
    /// inactive slot first, then the data (or the punched hole).
    pub async fn resync_write(
        &self,
        id: ChunkId,
        offset: u64,
        blocks: &[ResyncBlock],
        data: Bytes,
        epoch: Epoch,
        protect_from: Seq,
    ) -> Result<ResyncOutcome> {
        let span = tracing::debug_span!(
            "chunk_resync_write", volume = id.volume.0, chunk = id.chunk.0, offset, blocks = blocks.len(), %epoch
        );
        self.resync_measured(span, id, offset, blocks, data, epoch, protect_from, Place::Resync(None)).await
    }

    /// `resync_inner` under `span`, counted as a ResyncWrite in the metrics
    /// (for [`ChunkStore::resync_write`] and `resync_write_at`).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn resync_measured(
        &self,
        span: tracing::Span,
        id: ChunkId,
        offset: u64,
        blocks: &[ResyncBlock],
        data: Bytes,
        epoch: Epoch,
        protect_from: Seq,
        place: Place,
    ) -> Result<ResyncOutcome> {
        let t = self.started();
        let r = self.resync_inner(id, offset, blocks, data, epoch, protect_from, place).instrument(span).await;
        if let (Some(m), Ok(out)) = (self.finished(StoreOp::ResyncWrite, t, &r), &r) {
            m.written(u64::from(out.written) * BLOCK_SIZE_U64);
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn resync_inner(
        &self,
        id: ChunkId,
        offset: u64,
        blocks: &[ResyncBlock],
        data: Bytes,
        epoch: Epoch,
        protect_from: Seq,
        place: Place,
    ) -> Result<ResyncOutcome> {
        let bs = BLOCK_SIZE as usize;
        let data_blocks = blocks.iter().filter(|b| matches!(b, ResyncBlock::Data(_))).count();
        if data.len() != data_blocks * bs {
            return Err(StoreError::InvalidRequest(format!(
                "resync write with {data_blocks} data blocks carries {} bytes of data",
                data.len()
            )));
        }
        let len = blocks.len() as u64 * BLOCK_SIZE_U64;
        let seqs = || blocks.iter().filter(|b| !matches!(b, ResyncBlock::Keep)).map(|b| b.seq());
        let view = match place {
            Place::Resync(view) => view,
            Place::Write => None,
        };
        if let Some(cut) = view {
            if let Some(bad) = seqs().find(|s| *s >= cut) {
                return Err(StoreError::InvalidRequest(format!(
                    "resync of the view at cut {cut} carries a block at seq {bad}, not below the cut"
                )));
            }
        }
        if let Some(newest) = seqs().max() {
            self.freeze_for(id, newest, epoch).await?;
        }
        // Versions below the live layer go to a frozen layer of their seq's
        // range: made to exist first (store/snapshot.rs), and written with no
        // merge running, since a merge copies a frozen layer's blocks up piece
        // by piece before it removes the layer (a version written into it
        // behind the merge would go with it). Merges are rare (a snapshot
        // deleted); the copy waits for one to end.
        let lower = self.get(id).map_or(Seq::ZERO, |c| c.lower);
        let _no_merge = match place {
            Place::Resync(_) if lower > Seq::ZERO && seqs().any(|s| s <= lower) => {
                let guard = self.inner.merging.lock().await;
                let below: Vec<Seq> = seqs().collect();
                self.ensure_layers(id, &below, epoch).await?;
                Some(guard)
            }
            _ => None,
        };
        let Some(Locked { c, b0, b1: _, locks }) = self.lock_blocks(id, offset, len, epoch).await? else {
            return Ok(ResyncOutcome::default());
        };
        if let (Place::Write, Some(oldest)) = (place, seqs().min()) {
            below_live_layer(&c, oldest)?;
        }
        // The layers this resync may change (top first) and, per block, the
        // layers of the view it makes equal to the source's: all of them, or
        // those below the cut.
        let stack = c.stack();
        let in_view = stack.iter().filter(|l| view.is_none_or(|cut| l.lower < cut)).count();
        let view_start = stack.len() - in_view;
        // Decide every block under the range lock; coalesce applied blocks into
        // runs of one layer and one kind, one I/O each.
        let mut out = ResyncOutcome::default();
        let mut runs: Vec<Run> = Vec::new();
        let mut next_data = 0usize;
        for (i, blk) in blocks.iter().enumerate() {
            let b = b0 + i as u32;
            let (seq, zero) = match *blk {
                ResyncBlock::Keep => continue,
                ResyncBlock::Data(s) => (s, false),
                ResyncBlock::Zero(s) => (s, true),
            };
            let data_index = next_data;
            if !zero {
                next_data += 1;
            }
            let view_layers = &stack[view_start..];
            let top = owner(view_layers, b).map(|k| view_start + k);
            let current = top.and_then(|k| stack[k].ctx.current(b)).map_or(Seq::ZERO, |(s, _)| s);
            if !(current < seq || current < protect_from) {
                trace!(block = b, %current, incoming = %seq, "resync skips a newer block");
                out.skipped += 1;
                continue;
            }
            let layer = destination(&stack, top, seq).ok_or_else(|| {
                StoreError::InvalidRequest(format!("chunk {id} has no snapshot layer for a version at seq {seq}"))
            })?;
            if zero {
                out.zeroed += 1;
            } else {
                out.written += 1;
            }
            match runs.last_mut() {
                Some(r) if r.end == b && r.zero == zero && r.layer == layer => r.end += 1,
                _ => runs.push(Run { start: b, end: b + 1, zero, data_first: data_index, layer }),
            }
        }
        if runs.is_empty() {
            return Ok(out);
        }
        let mut writings = Vec::with_capacity(runs.len());
        for run in &runs {
            writings.push(self.begin_write(&stack[run.layer]).await?);
        }
        let locks = Arc::new(locks);
        let zero_crc = layout::zero_block_crc();
        let seq_of = |b: u32| blocks[(b - b0) as usize].seq();
        // From here until every run is submitted there is no await (see `stage`).
        let mut pending = Vec::with_capacity(runs.len());
        let mut first_err = None;
        for (run, writing) in runs.iter().zip(writings) {
            let (off, n) = (run.start as u64 * BLOCK_SIZE_U64, (run.end - run.start) as usize);
            let (op, req) = if run.zero {
                let hold = stage(writing, run.start, run.end, &locks, |b| (seq_of(b), zero_crc));
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                ("resync trim", (OpKind::Fallocate { mode }, &stack[run.layer].data, off, (n * bs) as u64, hold))
            } else {
                let d = data.slice(run.data_first * bs..(run.data_first + n) * bs);
                let crc_at = |b: u32| crc32fast::hash(&d[(b - run.start) as usize * bs..][..bs]);
                let hold = stage(writing, run.start, run.end, &locks, |b| (seq_of(b), crc_at(b)));
                let buf = if aligned::is_aligned(d.as_ptr(), d.len()) {
                    WriteBuf::Bytes(d)
                } else {
                    WriteBuf::Aligned(AlignedBuf::copy_from(&d))
                };
                ("resync write", (OpKind::Write(buf), &stack[run.layer].data, off, (n * bs) as u64, hold))
            };
            match self.submit(req) {
                Ok(rx) => pending.push((op, run.layer, rx)),
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
        }
        // The ring's holds keep the locks until their I/Os complete.
        drop(locks);
        for (op, layer, rx) in pending {
            let r = match rx.await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => StoreError::io(op, &stack[layer].data_path, e),
                Err(_) => StoreError::Shutdown,
            };
            first_err.get_or_insert(r);
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        debug!(written = out.written, zeroed = out.zeroed, skipped = out.skipped, "resync applied");
        Ok(out)
    }

    /// Makes every write to the chunk completed before this call durable, then
    /// clears its dirty mark (unless writes started meanwhile).
    pub async fn flush_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<()> {
        let span = tracing::debug_span!("chunk_flush", volume = id.volume.0, chunk = id.chunk.0, %epoch);
        let t = self.started();
        let r = async {
            drop(self.fence(id.volume, epoch).await?);
            // Every layer: a frozen one may hold writes not flushed yet.
            let c = self.chunk(id)?;
            self.flush_many(c.stack()).await
        }
        .instrument(span)
        .await;
        self.finished(StoreOp::Flush, t, &r);
        r
    }

    /// Flushes every dirty chunk of `volume` (all in parallel on the ring).
    pub async fn flush_volume(&self, volume: VolumeId, epoch: Epoch) -> Result<()> {
        let span = tracing::debug_span!("volume_flush", volume = volume.0, %epoch);
        let t = self.started();
        let r = async {
            drop(self.fence(volume, epoch).await?);
            let list: Vec<Arc<Chunk>> =
                self.chunk_list().into_iter().filter(|c| c.id.volume == volume).flat_map(|c| c.stack()).collect();
            self.flush_many(list).await
        }
        .instrument(span)
        .await;
        self.finished(StoreOp::Flush, t, &r);
        r
    }

    async fn flush_many(&self, list: Vec<Arc<Chunk>>) -> Result<()> {
        // Phase 1: note each dirty chunk's write count and submit its syncs.
        let mut pending = Vec::new();
        for c in list {
            let (started, quiet) = {
                let st = c.state.lock().unwrap_or_else(|p| p.into_inner());
                if !st.dirty {
                    // Clean: every write ever started is already durable.
                    continue;
                }
                (st.started, st.inflight == 0)
            };
            let d = self.submit((OpKind::DataSync, &c.data, 0, 0, Hold::none()))?;
            let x = self.submit((OpKind::DataSync, &c.ctx_fd, 0, 0, Hold::none()))?;
            pending.push((c, started, quiet, d, x));
        }
        // Phase 2: wait; clear marks whose flush covered every write started.
        let mut first_err = None;
        for (c, started, quiet, d, x) in pending {
            let r = async {
                for (rx, p) in [(d, &c.data_path), (x, &c.ctx_path)] {
                    match rx.await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(StoreError::io("fdatasync", p, e)),
                        Err(_) => return Err(StoreError::Shutdown),
                    }
                }
                Ok(())
            }
            .await;
            match r {
                Ok(()) => {
                    let mut st = c.state.lock().unwrap_or_else(|p| p.into_inner());
                    // Invariant: clear only if no write was in flight when the
                    // syncs were issued and none started since. Clearing need not be
                    // durable: a stale "dirty" after a crash is merely conservative.
                    if st.dirty && quiet && st.started == started {
                        c.ctx.set_dirty(false);
                        st.dirty = false;
                        debug!(chunk = %c.id, "flushed; dirty mark cleared");
                    }
                }
                Err(e) => {
                    warn!(chunk = %c.id, error = %e, "flush failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Block contexts (crc, seq) of blocks [first, first+count): what rebuild and
    /// reconciliation compare. A block with no usable slot reports
    /// `{crc: 0, seq: Seq::ZERO}`, which differs from every real context.
    pub async fn context_table(
        &self,
        id: ChunkId,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>> {
        let t = self.started();
        let r = self.context_table_inner(id, first, count, epoch).await;
        self.finished(StoreOp::ContextTable, t, &r);
        r
    }

    async fn context_table_inner(
        &self,
        id: ChunkId,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>> {
        // The live view: through every layer.
        self.context_table_at(id, None, first, count, epoch).await
    }

    /// Raises the volume's epoch to `epoch` (persisted crash-safely before it
    /// returns) and returns the current epoch. `Fenced` if `epoch` is older than
    /// the current one; announcing the current epoch again is a no-op.
    pub async fn announce_epoch(&self, volume: VolumeId, epoch: Epoch) -> Result<Epoch> {
        let f = self.fence_of(volume);
        // Exclusive: waits for every op holding the old epoch to finish its I/O.
        let mut g = f.lock.clone().write_owned().await;
        let current = *g;
        if epoch < current {
            return Err(StoreError::Fenced { volume, request: epoch, current });
        }
        if epoch == current {
            return Ok(current);
        }
        let dir = self.inner.epochs_dir.clone();
        tokio::task::spawn_blocking(move || persist_epoch(&dir, volume, epoch))
            .await
            .map_err(|_| StoreError::Shutdown)??;
        *g = epoch;
        f.current.store(epoch.0, Ordering::Release);
        info!(%volume, from = %current, to = %epoch, "epoch announced");
        Ok(epoch)
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

/// How long opening a chunk waits for its data file's lock.
const DATA_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Takes an exclusive `flock` on a chunk's data file, waiting while someone else
/// holds it.
///
/// Invariant: no write of an earlier incarnation of this store can land after
/// the recovery scan. A killed process's io_uring requests can still be running
/// after the process is reaped (the ring is torn down by a kernel worker), and a
/// write landing after the next process's scan has retracted its context would
/// leave a block that matches neither slot. Each in-flight request holds a
/// reference to the dead process's open file, and with it that file's lock, so
/// waiting for the lock waits for those writes. It also keeps two live stores
/// off the same directory.
fn lock_data_file(f: &File, path: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + DATA_LOCK_WAIT;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(f), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(StoreError::io("lock data file", path, e));
        }
        if std::time::Instant::now() >= deadline {
            let busy = io::Error::new(
                io::ErrorKind::WouldBlock,
                "locked by another process for 30 s (is another replica using this directory?)",
            );
            return Err(StoreError::io("lock data file", path, busy));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Checks the store marker (writing version 1 in a new store); its version.
fn ensure_marker(dir: &Path) -> Result<u8> {
    let p = dir.join(MARKER);
    match File::open(&p) {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b).map_err(|e| StoreError::io("read store marker", &p, e))?;
            layout::check_store_marker(&b).map_err(|m| StoreError::io("open store", &p, invalid(m)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            replace_file(dir, MARKER, &layout::encode_store_marker(1)).map(|()| 1)
        }
        Err(e) => Err(StoreError::io("open store marker", &p, e)),
    }
}

/// Crash-safe replacement: write a temporary file, fsync it, rename it over the
/// target, fsync the directory.
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(|e| StoreError::io("create temporary file", &tmp, e))?;
    f.write_all(bytes).map_err(|e| StoreError::io("write temporary file", &tmp, e))?;
    f.sync_all().map_err(|e| StoreError::io("fsync temporary file", &tmp, e))?;
    fs::rename(&tmp, &dst).map_err(|e| StoreError::io("rename", &dst, e))?;
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io("fsync directory", dir, e))
}

fn persist_epoch(dir: &Path, volume: VolumeId, epoch: Epoch) -> Result<()> {
    replace_file(dir, &layout::epoch_file_name(volume), &layout::encode_epoch_file(volume, epoch))
}

/// Whether the filesystem under `dir` accepts O_DIRECT (tmpfs says EINVAL).
/// The probe reads a hole of a sparse file: it takes no data block, so a
/// store whose disk is full still opens (a node restarted then must come up
/// to be freed). If even the probe file cannot be created for lack of space
/// (no room for a directory entry), O_DIRECT is assumed: every chunk file
/// there was created, and is read, with it.
fn probe_direct(dir: &Path) -> Result<bool> {
    let p = dir.join(".odirect-probe");
    let r = OpenOptions::new().read(true).write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(&p);
    let ok = match r {
        Ok(f) => {
            let mut buf = AlignedBuf::zeroed(4096);
            match f.set_len(4096).and_then(|()| f.read_at(buf.as_mut(), 0)) {
                Ok(_) => true,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
                Err(e) => return Err(StoreError::io("probe O_DIRECT", &p, e)),
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
            warn!(dir = %dir.display(), "no space to probe O_DIRECT: assuming it works");
            true
        }
        Err(e) => return Err(StoreError::io("probe O_DIRECT", &p, e)),
    };
    let _ = fs::remove_file(&p);
    Ok(ok)
}

fn load_cuts(dir: &Path) -> Result<HashMap<VolumeId, Arc<[Seq]>>> {
    let mut out = HashMap::new();
    for ent in fs::read_dir(dir).map_err(|e| StoreError::io("list snapshot cuts", dir, e))? {
        let ent = ent.map_err(|e| StoreError::io("list snapshot cuts", dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let p = ent.path();
        if name.ends_with(".tmp") {
            let _ = fs::remove_file(&p);
            continue;
        }
        let Some(volume) = layout::parse_cuts_file_name(&name) else {
            warn!(path = %p.display(), "ignoring unknown file in snapshots directory");
            continue;
        };
        let b = fs::read(&p).map_err(|e| StoreError::io("read snapshot cuts", &p, e))?;
        let (v, cuts) =
            layout::decode_cuts_file(&b).map_err(|m| StoreError::io("load snapshot cuts", &p, invalid(m)))?;
        if v != volume {
            return Err(StoreError::io("load snapshot cuts", &p, invalid("volume differs from file name")));
        }
        if !cuts.is_empty() {
            out.insert(volume, cuts.into());
        }
    }
    Ok(out)
}

fn load_epochs(dir: &Path) -> Result<HashMap<VolumeId, Arc<VolumeFence>>> {
    let mut out = HashMap::new();
    for ent in fs::read_dir(dir).map_err(|e| StoreError::io("list epochs", dir, e))? {
        let ent = ent.map_err(|e| StoreError::io("list epochs", dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let p = ent.path();
        if name.ends_with(".tmp") {
            // An interrupted replace: the old file (if any) is still authoritative.
            let _ = fs::remove_file(&p);
            continue;
        }
        let Some(volume) = layout::parse_epoch_file_name(&name) else {
            warn!(path = %p.display(), "ignoring unknown file in epochs directory");
            continue;
        };
        let b = fs::read(&p).map_err(|e| StoreError::io("read epoch", &p, e))?;
        // A damaged epoch file stops the open: guessing could un-fence a stale
        // front end.
        let (v, epoch) = layout::decode_epoch_file(&b).map_err(|m| StoreError::io("load epoch", &p, invalid(m)))?;
        if v != volume {
            return Err(StoreError::io("load epoch", &p, invalid("volume id differs from file name")));
        }
        out.insert(
            volume,
            Arc::new(VolumeFence { lock: Arc::new(AsyncRwLock::new(epoch)), current: AtomicU64::new(epoch.0) }),
        );
    }
    Ok(out)
}

fn data_open_options(direct: bool) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o
}

fn load_chunks(dir: &Path, direct: bool) -> Result<HashMap<ChunkId, Arc<Chunk>>> {
    let mut layers: HashMap<ChunkId, Vec<Seq>> = HashMap::new();
    let mut datas = Vec::new();
    for ent in fs::read_dir(dir).map_err(|e| StoreError::io("list chunks", dir, e))? {
        let ent = ent.map_err(|e| StoreError::io("list chunks", dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let p = ent.path();
        if name.ends_with(".tmp") {
            // A creation that never completed.
            let _ = fs::remove_file(&p);
        } else if let Some(stem) = name.strip_suffix(".ctx") {
            let Some((id, lower)) = layout::parse_layer_file_stem(stem) else {
                warn!(path = %p.display(), "ignoring unknown file in chunks directory");
                continue;
            };
            layers.entry(id).or_default().push(lower);
        } else if name.ends_with(".data") {
            datas.push((name, p));
        }
    }
    let mut out = HashMap::new();
    for (id, mut lowers) in layers {
        // Bottom first; each layer hangs below the next one up.
        lowers.sort();
        let mut below: Option<Arc<Chunk>> = None;
        // Every layer of a chunk shares one set of range locks.
        let locks = Arc::new(RangeLocks::default());
        for lower in lowers {
            let mut c = open_chunk(dir, id, lower, direct)?;
            c.locks = locks.clone();
            if let Some(b) = &below {
                b.retired.store(true, Ordering::Release);
            }
            *c.below.write().unwrap_or_else(|p| p.into_inner()) = below.take();
            below = Some(Arc::new(c));
        }
        if let Some(top) = below {
            // Layers share the top's range locks.
            out.insert(id, top);
        }
    }
    for (name, p) in datas {
        let stem = name.trim_end_matches(".data");
        let owned = layout::parse_layer_file_stem(stem)
            .is_some_and(|(id, lower)| out.get(&id).is_some_and(|c| c.stack().iter().any(|l| l.lower == lower)));
        if !owned {
            // Its context file never got renamed into place (or was deleted first).
            info!(path = %p.display(), "removing data file of an incomplete chunk");
            let _ = fs::remove_file(&p);
        }
    }
    Ok(out)
}

fn paths(dir: &Path, id: ChunkId, lower: Seq) -> (PathBuf, PathBuf) {
    let stem = layout::layer_file_stem(id, lower);
    (dir.join(format!("{stem}.data")), dir.join(format!("{stem}.ctx")))
}

fn open_chunk(dir: &Path, id: ChunkId, lower: Seq, direct: bool) -> Result<Chunk> {
    let (data_path, ctx_path) = paths(dir, id, lower);
    let ctx_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ctx_path)
        .map_err(|e| StoreError::io("open context file", &ctx_path, e))?;
    let mut hdr = [0u8; 48];
    ctx_file.read_exact_at(&mut hdr, 0).map_err(|e| StoreError::io("read context header", &ctx_path, e))?;
    let h = CtxHeader::decode(&hdr).map_err(|m| StoreError::io("load chunk", &ctx_path, invalid(m)))?;
    if h.id != id {
        return Err(StoreError::io("load chunk", &ctx_path, invalid("chunk id differs from file name")));
    }
    let ctx_len = ctx_file.metadata().map_err(|e| StoreError::io("stat", &ctx_path, e))?.len();
    if ctx_len != layout::ctx_file_len(h.chunk_size) {
        return Err(StoreError::io("load chunk", &ctx_path, invalid("context file has the wrong length")));
    }
    let data_file =
        data_open_options(direct).open(&data_path).map_err(|e| StoreError::io("open data file", &data_path, e))?;
    lock_data_file(&data_file, &data_path)?;
    let data_len = data_file.metadata().map_err(|e| StoreError::io("stat", &data_path, e))?.len();
    if data_len != h.chunk_size {
        return Err(StoreError::io("load chunk", &data_path, invalid("data file has the wrong length")));
    }
    finish_chunk(id, h.chunk_size, lower, data_file, ctx_file, (data_path, ctx_path))
}

fn finish_chunk(id: ChunkId, size: u64, lower: Seq, data: File, ctx: File, paths: (PathBuf, PathBuf)) -> Result<Chunk> {
    let (data_path, ctx_path) = paths;
    let ctx_fd: OwnedFd = ctx.into();
    let blocks = (size / BLOCK_SIZE_U64) as u32;
    let map = CtxMap::map(&ctx_fd, layout::ctx_file_len(size) as usize, blocks)
        .map_err(|e| StoreError::io("mmap context file", &ctx_path, e))?;
    let dirty = map.dirty();
    let recovered = if dirty { tokio::sync::OnceCell::new() } else { tokio::sync::OnceCell::new_with(Some(())) };
    Ok(Chunk {
        id,
        size,
        lower,
        below: RwLock::new(None),
        retired: std::sync::atomic::AtomicBool::new(false),
        data: Arc::new(data.into()),
        ctx_fd: Arc::new(ctx_fd),
        ctx: map,
        data_path,
        ctx_path,
        locks: Arc::new(RangeLocks::default()),
        state: Mutex::new(DirtyState { dirty, started: 0, inflight: 0 }),
        mark_lock: tokio::sync::Mutex::new(()),
        recovered,
    })
}

/// Creates a chunk's files. The context file is fully allocated here, so running
/// out of space shows up now as `NoSpace` and never later as SIGBUS on the mapping.
fn create_chunk_files(dir: &Path, id: ChunkId, size: u64, lower: Seq, direct: bool) -> Result<Chunk> {
    let (data_path, ctx_path) = paths(dir, id, lower);
    let tmp = ctx_path.with_extension("ctx.tmp");
    let ctx_len = layout::ctx_file_len(size);
    let ctx = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| StoreError::io("create context file", &tmp, e))?;
    let cleanup = |e: StoreError| {
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(&data_path);
        e
    };
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&ctx), 0, 0, ctx_len as libc::off_t) };
    if r != 0 {
        return Err(cleanup(StoreError::io("allocate context file", &tmp, io::Error::last_os_error())));
    }
    let hdr = CtxHeader { id, chunk_size: size }.encode();
    ctx.write_all_at(&hdr, 0).map_err(|e| cleanup(StoreError::io("write context header", &tmp, e)))?;
    ctx.sync_all().map_err(|e| cleanup(StoreError::io("fsync context file", &tmp, e)))?;
    let data = data_open_options(direct)
        .create(true)
        .truncate(true)
        .open(&data_path)
        .map_err(|e| cleanup(StoreError::io("create data file", &data_path, e)))?;
    lock_data_file(&data, &data_path).map_err(cleanup)?;
    data.set_len(size).map_err(|e| cleanup(StoreError::io("size data file", &data_path, e)))?;
    data.sync_all().map_err(|e| cleanup(StoreError::io("fsync data file", &data_path, e)))?;
    // The rename is the commit point: a chunk exists once its .ctx exists.
    fs::rename(&tmp, &ctx_path).map_err(|e| cleanup(StoreError::io("rename context file", &ctx_path, e)))?;
    fsync_dir(dir)?;
    finish_chunk(id, size, lower, data, ctx, (data_path, ctx_path))
}
