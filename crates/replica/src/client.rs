//! The front end's handle on one replica server: typed calls, pipelined over a
//! few TCP connections. I/O path: no blocking calls, no info logs per request.
//!
//! ```text
//!  caller ─► call() ─► pick connection (round robin, connect lazily: one
//!                 │    connect task per slot, every caller waits for it)
//!                 │    register req id → oneshot in `pending`
//!                 │    frame ─► mpsc ─► writer task ─► writev(socket)
//!                 └─ await oneshot
//!                      (connect wait + exchange: bounded by the request timeout)
//!  reader task ◄─ socket: decode frame, take `pending[req id]`, complete it
//! ```
//!
//! A slot with no live connection gets ONE connect attempt, in a task of its
//! own (bounded by `connect_timeout`); every request that picks the slot
//! meanwhile waits for that attempt, never longer than its own deadline, and
//! they all get its outcome. So N requests to a black-holed replica fail
//! together within one request timeout, instead of taking turns at the
//! connect one after another; a caller that gives up (or is dropped) does not
//! cancel the attempt for the others.
//!
//! A connection that fails (EOF, I/O error, malformed frame) or on which a request
//! times out is marked dead and closed: every request in flight on it fails with
//! `Disconnected`, its tasks end (a black-holed peer leaves nothing behind), and
//! the next request that picks its slot opens a fresh connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use ballast_tls::{Role, Security, Stream};
use ballast_types::{BlockContext, BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId, BLOCK_SIZE};
use ballast_wire::{
    decode_chunk_list, decode_contexts, decode_cuts, decode_resync_result, encode_cuts, encode_resync_write, Decoder,
    Frame, Header, Op, ResyncEntry, ResyncResult, Status, WireError, ALL_CHUNKS, CONTEXT_ENTRY_LEN, CUT_LEN,
    MAX_PAYLOAD, SET_CUTS_IF_NONE,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, trace, warn, Instrument};

use crate::io::{write_frames, MAX_BATCH};

/// Why a replica call failed. Grouped by what the caller should do:
/// retry (`Timeout`, `Disconnected`, `Connect`, `Remote{Shutdown}`), never retry
/// (`Remote{Fenced}`), repair from another replica (`Remote{ChecksumMismatch}`).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{op:?} request to the replica timed out")]
    Timeout { op: Op },
    #[error("connection to the replica was lost with the request in flight")]
    Disconnected,
    #[error("cannot connect to replica at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("replica answered {status:?}: {message}")]
    Remote { status: Status, message: String },
    #[error("replica protocol error: {0}")]
    Protocol(#[from] WireError),
}

impl ClientError {
    /// The replica refused the request's epoch as stale: a newer attach exists.
    pub fn is_fenced(&self) -> bool {
        matches!(self, ClientError::Remote { status: Status::Fenced, .. })
    }

    /// The replica's stored copy failed its checksum (read another, repair this one).
    pub fn is_checksum(&self) -> bool {
        matches!(self, ClientError::Remote { status: Status::ChecksumMismatch, .. })
    }

    /// The same request may succeed if sent again (transport trouble, a replica
    /// restarting). Remote verdicts about the request itself are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Timeout { .. } | ClientError::Disconnected | ClientError::Connect { .. } => true,
            ClientError::Remote { status, .. } => *status == Status::Shutdown,
            ClientError::Protocol(_) => false,
        }
    }
}

/// How a [`ReplicaClient`] talks to its replica.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// TCP connections to pipeline over, used round robin. Default 2.
    pub connections: usize,
    /// Time from a call to its response before it fails: waiting for a
    /// connection counts (a connect still going at the deadline fails the call
    /// with `Connect`), and an exchange past it fails with `Timeout`. Default 5 s.
    pub timeout: Duration,
    /// Time one connect attempt may take, the TLS handshake included. Default 2 s.
    pub connect_timeout: Duration,
    /// Mutual TLS to the replica (which must prove to be a storage node).
    /// Default: insecure plaintext.
    pub security: Security,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connections: 2,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            security: Security::Insecure,
        }
    }
}

/// A cheap, cloneable handle on one replica server. Connects lazily, pipelines
/// requests over `connections` connections, matches responses by request id.
#[derive(Clone)]
pub struct ReplicaClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for ReplicaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaClient").field("addr", &self.inner.addr).finish()
    }
}

struct ClientInner {
    addr: SocketAddr,
    opts: ClientOptions,
    /// Short critical sections only (never held across an await).
    slots: Vec<StdMutex<Slot>>,
    next_slot: AtomicUsize,
    next_id: AtomicU64,
}

/// One connection slot.
enum Slot {
    /// No connection, no attempt: the next request starts one.
    Empty,
    /// A connect task is running; its outcome is published here (`None` until
    /// it ends), and the task has set the slot to `Ready` or `Empty` by then.
    Connecting(watch::Receiver<Option<Result<Conn, ConnectFailure>>>),
    /// A connection (maybe dead: the next request then starts an attempt).
    Ready(Conn),
}

/// A failed connect, shared by every request that waited for it.
#[derive(Clone, Debug)]
struct ConnectFailure {
    kind: std::io::ErrorKind,
    message: String,
}

impl ConnectFailure {
    fn of(e: &std::io::Error) -> ConnectFailure {
        ConnectFailure { kind: e.kind(), message: e.to_string() }
    }

    fn error(&self, addr: SocketAddr) -> ClientError {
        ClientError::Connect { addr, source: std::io::Error::new(self.kind, self.message.clone()) }
    }
}

/// One live connection: the way to its writer task and the table its reader completes.
#[derive(Clone)]
struct Conn {
    tx: mpsc::Sender<Frame>,
    shared: Arc<ConnShared>,
}

struct ConnShared {
    state: StdMutex<ConnState>,
    /// Becomes true once the connection is abandoned; its reader and writer
    /// tasks watch it and drop their halves of the socket, which closes it.
    closed: watch::Sender<bool>,
}

struct ConnState {
    /// Once set, never cleared: the connection is abandoned.
    /// Invariant: no entry is added to `pending` after `dead` is set, so nothing
    /// waits on a connection whose reader has stopped.
    dead: bool,
    pending: HashMap<u64, Waiter>,
}

struct Waiter {
    op: Op,
    tx: oneshot::Sender<Result<Frame, ClientError>>,
}

impl ConnShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        // A poisoned lock only means another task panicked mid-update of a map
        // of waiters; the map itself is still coherent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Marks the connection dead, closes it, and fails every request in flight on it.
    fn fail_all(&self) {
        let waiters: Vec<Waiter> = {
            let mut st = self.lock();
            st.dead = true;
            st.pending.drain().map(|(_, w)| w).collect()
        };
        self.closed.send_replace(true);
        for w in waiters {
            let _ = w.tx.send(Err(ClientError::Disconnected));
        }
    }
}

/// Removes a request's waiter when the call ends in any way (timeout, caller
/// dropped the future), so a late response finds nobody and is discarded.
struct PendingGuard<'a> {
    shared: &'a ConnShared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// The longest trim / write-zeroes range sent in one frame (the header's length
/// field is 32 bits); longer ranges go as several requests.
const MAX_RANGE_PER_FRAME: u64 = 1 << 30;

impl ReplicaClient {
    pub fn new(addr: SocketAddr, opts: ClientOptions) -> ReplicaClient {
        let n = opts.connections.max(1);
        let slots = (0..n).map(|_| StdMutex::new(Slot::Empty)).collect();
        ReplicaClient {
            inner: Arc::new(ClientInner {
                addr,
                opts,
                slots,
                next_slot: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The replica's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Writes `data` at `offset` of chunk `id` with sequence `seq`; with `fua`, the
    /// data is durable on the replica when this returns.
    pub async fn write(&self, id: ChunkId, offset: u64, data: Bytes, seq: Seq, fua: bool) -> Result<(), ClientError> {
        let len =
            u32::try_from(data.len()).map_err(|_| WireError::Oversized { len: data.len() as u64, max: MAX_PAYLOAD })?;
        let mut h = self.header(Op::Write, id.volume, id.chunk, seq.epoch);
        h.offset = offset;
        h.length = len;
        h.seq_counter = seq.counter;
        h.flags.fua = fua;
        self.call(h, data).await.map(drop)
    }

    /// Reads `len` bytes at `offset` of chunk `id`, verified by the replica's checksums.
    pub async fn read(&self, id: ChunkId, offset: u64, len: u32, epoch: Epoch) -> Result<Bytes, ClientError> {
        let mut h = self.header(Op::Read, id.volume, id.chunk, epoch);
        h.offset = offset;
        h.length = len;
        let resp = self.call(h, Bytes::new()).await?;
        if resp.payload.len() != len as usize {
            return Err(WireError::BadPayloadLength {
                op: Op::Read,
                expected: u64::from(len),
                actual: resp.payload.len() as u64,
            }
            .into());
        }
        Ok(resp.payload)
    }

    /// Makes every prior write to any chunk of `volume` on this replica durable.
    pub async fn flush(&self, volume: VolumeId, epoch: Epoch) -> Result<(), ClientError> {
        let h = self.header(Op::Flush, volume, ALL_CHUNKS, epoch);
        self.call(h, Bytes::new()).await.map(drop)
    }

    /// Makes every prior write to chunk `id` on this replica durable.
    pub async fn flush_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<(), ClientError> {
        let h = self.header(Op::Flush, id.volume, id.chunk, epoch);
        self.call(h, Bytes::new()).await.map(drop)
    }

    /// Discards `len` bytes at `offset`; they read as zeros afterwards.
    pub async fn trim(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<(), ClientError> {
        self.range_op(Op::Trim, id, offset, len, seq).await
    }

    /// Makes `len` bytes at `offset` read as zeros.
    pub async fn write_zeroes(&self, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<(), ClientError> {
        self.range_op(Op::WriteZeroes, id, offset, len, seq).await
    }

    /// Block contexts (crc, seq) of `count` blocks from `first`, for resync and rebuild.
    pub async fn context_table(
        &self,
        id: ChunkId,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>, ClientError> {
        self.contexts(Op::ContextTable, id, first, count, epoch, Bytes::new()).await
    }

    /// Block contexts of `count` blocks from `first` in the chunk's view at
    /// snapshot `cut` (ContextTableAt).
    pub async fn context_table_at(
        &self,
        id: ChunkId,
        cut: Seq,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
    ) -> Result<Vec<BlockContext>, ClientError> {
        self.contexts(Op::ContextTableAt, id, first, count, epoch, encode_cuts(&[cut])).await
    }

    async fn contexts(
        &self,
        op: Op,
        id: ChunkId,
        first: BlockIdx,
        count: u32,
        epoch: Epoch,
        payload: Bytes,
    ) -> Result<Vec<BlockContext>, ClientError> {
        let mut h = self.header(op, id.volume, id.chunk, epoch);
        h.offset = u64::from(first.0);
        h.length = count;
        let resp = self.call(h, payload).await?;
        let table = decode_contexts(&resp.payload)?;
        if table.len() != count as usize {
            return Err(WireError::BadPayloadLength {
                op,
                expected: u64::from(count) * CONTEXT_ENTRY_LEN as u64,
                actual: resp.payload.len() as u64,
            }
            .into());
        }
        Ok(table)
    }

    /// Resync / rebuild: asks the replica to apply a source replica's blocks, each
    /// with the source's original seq, where that cannot undo a newer write.
    /// `entries[i]` is block `offset / 4096 + i` (at most
    /// [`ballast_wire::MAX_RESYNC_BLOCKS`]); `data` is the concatenation of the
    /// `Data` entries' blocks (given as pieces, so the caller need not join them;
    /// they are copied once, into the frame). `epoch` is the fence epoch; the
    /// replica's blocks with seq at least `Seq{epoch, protect_from}` are replaced
    /// only by newer ones. With `fua`, the chunk is flushed before the answer.
    #[allow(clippy::too_many_arguments)]
    pub async fn resync_write(
        &self,
        id: ChunkId,
        offset: u64,
        entries: &[ResyncEntry],
        data: &[&[u8]],
        epoch: Epoch,
        protect_from: u64,
        fua: bool,
    ) -> Result<ResyncResult, ClientError> {
        self.resync(Op::ResyncWrite, id, offset, entries, data, epoch, protect_from, fua, None).await
    }

    /// As [`ReplicaClient::resync_write`], for blocks of the source's view at
    /// snapshot `cut` (ResyncWriteAt): the replica makes its own view at the
    /// cut hold the same versions.
    #[allow(clippy::too_many_arguments)]
    pub async fn resync_write_at(
        &self,
        id: ChunkId,
        cut: Seq,
        offset: u64,
        entries: &[ResyncEntry],
        data: &[&[u8]],
        epoch: Epoch,
        protect_from: u64,
    ) -> Result<ResyncResult, ClientError> {
        self.resync(Op::ResyncWriteAt, id, offset, entries, data, epoch, protect_from, false, Some(cut)).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn resync(
        &self,
        op: Op,
        id: ChunkId,
        offset: u64,
        entries: &[ResyncEntry],
        data: &[&[u8]],
        epoch: Epoch,
        protect_from: u64,
        fua: bool,
        cut: Option<Seq>,
    ) -> Result<ResyncResult, ClientError> {
        let range = entries.len() as u64 * u64::from(BLOCK_SIZE);
        let length = u32::try_from(range).map_err(|_| WireError::Oversized { len: range, max: u32::MAX })?;
        let body = encode_resync_write(entries, data)?;
        let payload = match cut {
            None => body,
            Some(cut) => {
                let mut b = BytesMut::with_capacity(CUT_LEN + body.len());
                b.extend_from_slice(&encode_cuts(&[cut]));
                b.extend_from_slice(&body);
                b.freeze()
            }
        };
        let mut h = self.header(op, id.volume, id.chunk, epoch);
        h.offset = offset;
        h.length = length;
        h.seq_counter = protect_from;
        h.flags.fua = fua;
        let resp = self.call(h, payload).await?;
        Ok(decode_resync_result(&resp.payload)?)
    }

    /// Creates chunk `id` of `size` bytes (idempotent for the same size).
    pub async fn create_chunk(&self, id: ChunkId, size: u64, epoch: Epoch) -> Result<(), ClientError> {
        let mut h = self.header(Op::ChunkCreate, id.volume, id.chunk, epoch);
        h.offset = size;
        self.call(h, Bytes::new()).await.map(drop)
    }

    /// Deletes chunk `id` (idempotent).
    pub async fn delete_chunk(&self, id: ChunkId, epoch: Epoch) -> Result<(), ClientError> {
        let h = self.header(Op::ChunkDelete, id.volume, id.chunk, epoch);
        self.call(h, Bytes::new()).await.map(drop)
    }

    /// Raises the replica's epoch for `volume` to `epoch`; returns its epoch after
    /// the call. Fails with `Fenced` when the replica already knows a newer one.
    pub async fn announce_epoch(&self, volume: VolumeId, epoch: Epoch) -> Result<Epoch, ClientError> {
        let h = self.header(Op::AnnounceEpoch, volume, ALL_CHUNKS, epoch);
        let resp = self.call(h, Bytes::new()).await?;
        Ok(resp.header.epoch)
    }

    /// The volume's chunks on this replica written since their last flush.
    pub async fn list_dirty(&self, volume: VolumeId, epoch: Epoch) -> Result<Vec<ChunkIdx>, ClientError> {
        let h = self.header(Op::ListDirty, volume, ALL_CHUNKS, epoch);
        let resp = self.call(h, Bytes::new()).await?;
        Ok(decode_chunk_list(&resp.payload)?)
    }

    /// Replaces the volume's snapshot cuts on this replica (SetCuts).
    pub async fn set_cuts(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<(), ClientError> {
        self.cuts_op(volume, epoch, cuts, 0).await
    }

    /// Sets the volume's snapshot cuts on this replica only if it keeps none
    /// for the volume (SetCuts with [`SET_CUTS_IF_NONE`]); otherwise leaves
    /// them as they are. For copy jobs, which must never replace cuts a front
    /// end installed.
    pub async fn set_cuts_if_none(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq]) -> Result<(), ClientError> {
        self.cuts_op(volume, epoch, cuts, SET_CUTS_IF_NONE).await
    }

    async fn cuts_op(&self, volume: VolumeId, epoch: Epoch, cuts: &[Seq], mode: u64) -> Result<(), ClientError> {
        let mut h = self.header(Op::SetCuts, volume, ALL_CHUNKS, epoch);
        h.length = u32::try_from(cuts.len()).unwrap_or(u32::MAX);
        h.offset = mode;
        self.call(h, encode_cuts(cuts)).await.map(drop)
    }

    /// The volume's snapshot cuts on this replica, ascending (ListCuts).
    pub async fn list_cuts(&self, volume: VolumeId, epoch: Epoch) -> Result<Vec<Seq>, ClientError> {
        let h = self.header(Op::ListCuts, volume, ALL_CHUNKS, epoch);
        let resp = self.call(h, Bytes::new()).await?;
        Ok(decode_cuts(Op::ListCuts, &resp.payload)?)
    }

    /// Reads `len` bytes at `offset` of the chunk's view at snapshot `cut`.
    pub async fn read_snapshot(
        &self,
        id: ChunkId,
        cut: Seq,
        offset: u64,
        len: u32,
        epoch: Epoch,
    ) -> Result<Bytes, ClientError> {
        let mut h = self.header(Op::ReadSnapshot, id.volume, id.chunk, epoch);
        h.offset = offset;
        h.length = len;
        let resp = self.call(h, encode_cuts(&[cut])).await?;
        if resp.payload.len() != len as usize {
            return Err(WireError::BadPayloadLength {
                op: Op::ReadSnapshot,
                expected: u64::from(len),
                actual: resp.payload.len() as u64,
            }
            .into());
        }
        Ok(resp.payload)
    }

    /// A round trip that touches no state.
    pub async fn ping(&self) -> Result<(), ClientError> {
        let h = self.header(Op::Ping, VolumeId(0), ChunkIdx(0), Epoch(0));
        self.call(h, Bytes::new()).await.map(drop)
    }

    async fn range_op(&self, op: Op, id: ChunkId, offset: u64, len: u64, seq: Seq) -> Result<(), ClientError> {
        // One frame per at most MAX_RANGE_PER_FRAME bytes (block aligned, so the
        // replica's alignment verdict on the whole range is unchanged); a zero
        // length still goes out once so the replica validates it.
        debug_assert_eq!(MAX_RANGE_PER_FRAME % u64::from(BLOCK_SIZE), 0);
        let mut done = 0u64;
        loop {
            let piece = (len - done).min(MAX_RANGE_PER_FRAME);
            let mut h = self.header(op, id.volume, id.chunk, seq.epoch);
            h.offset = offset.saturating_add(done);
            h.length = piece as u32;
            h.seq_counter = seq.counter;
            self.call(h, Bytes::new()).await?;
            done += piece;
            if done >= len {
                return Ok(());
            }
        }
    }

    fn header(&self, op: Op, volume: VolumeId, chunk: ChunkIdx, epoch: Epoch) -> Header {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        Header::request(op, id, volume, chunk, epoch)
    }

    /// Sends one request and waits for its response; non-Ok statuses become `Remote`.
    async fn call(&self, header: Header, payload: Bytes) -> Result<Frame, ClientError> {
        let span = tracing::debug_span!(
            "replica_call",
            peer = %self.inner.addr,
            op = header.op.name(),
            req = header.request_id,
            volume = header.volume.0,
            chunk = header.chunk.0,
        );
        self.call_inner(header, payload).instrument(span).await
    }

    async fn call_inner(&self, header: Header, payload: Bytes) -> Result<Frame, ClientError> {
        let op = header.op;
        let id = header.request_id;
        // One deadline for the whole call, the wait for a connection included.
        let deadline = Instant::now() + self.inner.opts.timeout;
        let conn = self.connection(deadline).await?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = conn.shared.lock();
            if st.dead {
                return Err(ClientError::Disconnected);
            }
            st.pending.insert(id, Waiter { op, tx });
        }
        let _guard = PendingGuard { shared: &conn.shared, id };
        let exchange = async {
            if conn.tx.send(Frame::new(header, payload)).await.is_err() {
                // The writer has stopped: the connection is gone.
                conn.shared.fail_all();
                return Err(ClientError::Disconnected);
            }
            match rx.await {
                Ok(result) => result,
                Err(_) => Err(ClientError::Disconnected),
            }
        };
        let resp = match tokio::time::timeout_at(deadline, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                // A peer that does not answer in time may never answer (paused,
                // partitioned): this connection is not trusted again.
                debug!("request timed out: closing its connection");
                conn.shared.fail_all();
                return Err(ClientError::Timeout { op });
            }
        };
        trace!(status = ?resp.header.status, "response");
        match resp.header.status {
            Status::Ok => Ok(resp),
            status => Err(ClientError::Remote { status, message: resp.error_message() }),
        }
    }

    /// A live connection from the next slot. A slot without one gets a single
    /// connect attempt (see the module docs), which this call waits for until
    /// `deadline` at most.
    async fn connection(&self, deadline: Instant) -> Result<Conn, ClientError> {
        let n = self.inner.slots.len();
        let idx = self.inner.next_slot.fetch_add(1, Ordering::Relaxed) % n;
        let mut rx = {
            let mut slot = self.inner.slots[idx].lock().unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Slot::Ready(c) if !c.shared.is_dead() => return Ok(c.clone()),
                Slot::Connecting(rx) => rx.clone(),
                Slot::Ready(_) | Slot::Empty => {
                    let (tx, rx) = watch::channel(None);
                    *slot = Slot::Connecting(rx.clone());
                    tokio::spawn(connect_slot(self.inner.clone(), idx, tx));
                    rx
                }
            }
        };
        let addr = self.inner.addr;
        let waited = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some))
            .await
            .map(|r| r.map(|outcome| outcome.clone()));
        match waited {
            Ok(Ok(Some(Ok(c)))) => Ok(c),
            Ok(Ok(Some(Err(f)))) => Err(f.error(addr)),
            Ok(Ok(None)) => Err(ClientError::Disconnected),
            // The connect task is gone without an outcome (its runtime is
            // shutting down).
            Ok(Err(_)) => Err(ClientError::Connect {
                addr,
                source: std::io::Error::new(std::io::ErrorKind::Interrupted, "connect attempt abandoned"),
            }),
            Err(_) => {
                debug!(peer = %addr, "no connection within the request timeout");
                Err(ClientError::Connect {
                    addr,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no connection within the request timeout",
                    ),
                })
            }
        }
    }
}

/// One connect attempt for slot `idx`: installs its outcome in the slot (a
/// connection, or empty again so the next request tries anew), then tells the
/// requests waiting for it.
async fn connect_slot(inner: Arc<ClientInner>, idx: usize, tx: watch::Sender<Option<Result<Conn, ConnectFailure>>>) {
    let outcome =
        connect(inner.addr, inner.opts.connect_timeout, &inner.opts.security).await.map_err(|e| ConnectFailure::of(&e));
    if let Err(f) = &outcome {
        debug!(peer = %inner.addr, error = %f.message, "connect to replica failed");
    }
    {
        let mut slot = inner.slots[idx].lock().unwrap_or_else(|p| p.into_inner());
        *slot = match &outcome {
            Ok(c) => Slot::Ready(c.clone()),
            Err(_) => Slot::Empty,
        };
    }
    tx.send_replace(Some(outcome));
}

async fn connect(addr: SocketAddr, connect_timeout: Duration, security: &Security) -> Result<Conn, std::io::Error> {
    let secured = async {
        let tcp = TcpStream::connect(addr).await?;
        // Small frames must not wait for Nagle: latency is the product.
        tcp.set_nodelay(true)?;
        security
            .connect(tcp, Role::Node)
            .await
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()))
    };
    let stream = match tokio::time::timeout(connect_timeout, secured).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
    };
    debug!(peer = %addr, tls = stream.is_tls(), "connected to replica");
    let (r, w) = tokio::io::split(stream);
    let shared = Arc::new(ConnShared {
        state: StdMutex::new(ConnState { dead: false, pending: HashMap::new() }),
        closed: watch::Sender::new(false),
    });
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(write_loop(w, rx, shared.clone(), addr));
    tokio::spawn(read_loop(r, shared.clone(), addr));
    Ok(Conn { tx, shared })
}

async fn write_loop(
    mut w: WriteHalf<Stream>,
    mut rx: mpsc::Receiver<Frame>,
    shared: Arc<ConnShared>,
    peer: SocketAddr,
) {
    let mut closed = shared.closed.subscribe();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let f = tokio::select! {
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
            _ = closed.wait_for(|c| *c) => return,
        };
        batch.push(f);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        if let Err(e) = write_frames(&mut w, &batch).await {
            debug!(%peer, error = %e, "replica connection write failed");
            shared.fail_all();
            return;
        }
        batch.clear();
    }
    // Every handle on this connection is gone: tell the server we are done.
    let _ = w.shutdown().await;
}

async fn read_loop(mut r: ReadHalf<Stream>, shared: Arc<ConnShared>, peer: SocketAddr) {
    let mut closed = shared.closed.subscribe();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut dec = Decoder::new();
    loop {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if let Err(e) = deliver(&shared, frame) {
                        warn!(%peer, error = %e, "closing replica connection: bad response");
                        shared.fail_all();
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(%peer, error = %e, "closing replica connection: malformed frame");
                    shared.fail_all();
                    return;
                }
            }
        }
        buf.reserve(dec.bytes_wanted(&buf).max(16 << 10));
        let read = tokio::select! {
            r = r.read_buf(&mut buf) => r,
            _ = closed.wait_for(|c| *c) => return,
        };
        match read {
            Ok(0) => {
                debug!(%peer, "replica closed the connection");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                debug!(%peer, error = %e, "replica connection read failed");
                break;
            }
        }
    }
    shared.fail_all();
}

/// Hands a response to the request waiting for it. A response nobody waits for
/// (its request timed out) is dropped; one that is not a response, or answers a
/// different op than was asked, means the peer is confused: the connection closes.
fn deliver(shared: &ConnShared, frame: Frame) -> Result<(), WireError> {
    let id = frame.header.request_id;
    if !frame.header.flags.response {
        return Err(WireError::UnexpectedResponse { request_id: id });
    }
    let waiter = shared.lock().pending.remove(&id);
    match waiter {
        Some(w) if w.op == frame.header.op => {
            let _ = w.tx.send(Ok(frame));
            Ok(())
        }
        Some(w) => {
            let _ = w.tx.send(Err(ClientError::Protocol(WireError::UnexpectedResponse { request_id: id })));
            Err(WireError::UnexpectedResponse { request_id: id })
        }
        None => {
            trace!(req = id, "late response dropped");
            Ok(())
        }
    }
}
