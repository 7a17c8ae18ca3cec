//! The replica server: frames in, chunk-store calls, frames out. I/O path: no
//! blocking calls, no global locks, per-request logs at debug/trace only.
//!
//! ```text
//!  accept ─► per connection:
//!    reader: decode ─► acquire in-flight permit ─► spawn handle(frame) ──┐
//!      (no permit: stop reading = TCP backpressure)                      │
//!    writer: ◄── mpsc (response, permit) ◄───────────────────────────────┘
//!            batches what is queued into one writev, then frees the permits
//! ```
//!
//! A frame that does not decode closes that connection (warn, naming the peer and
//! the error); a frame that decodes but asks for something invalid gets an error
//! response and touches nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_chunkstore::{ChunkStore, ResyncBlock, StoreError};
use ballast_tls::{Identity, Peer, Security, Stream};
use ballast_types::{BlockIdx, ChunkId, Epoch, Seq, VolumeId, BLOCK_SIZE};
use ballast_wire::{
    decode_cuts, decode_resync_write, encode_chunk_list, encode_contexts, encode_cuts, encode_resync_result, Decoder,
    Frame, Header, Op, ResyncKind, ResyncResult, Status, ALL_CHUNKS, CONTEXT_ENTRY_LEN, CUT_LEN, MAX_CUTS, MAX_PAYLOAD,
    MAX_RESYNC_BLOCKS, SET_CUTS_IF_NONE,
};
use bytes::{Bytes, BytesMut};
use tokio::io::WriteHalf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::io::{write_frames, MAX_BATCH};

/// Tuning of a [`ReplicaServer`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Requests one connection may have in flight; beyond it the server stops
    /// reading that connection until responses drain. Default 256.
    pub max_in_flight: usize,
    /// The largest frame payload accepted (and read length served). Default
    /// `ballast_wire::MAX_PAYLOAD` (32 MiB + 64 KiB).
    pub max_payload: u32,
    /// Mutual TLS on every connection, and who may connect: storage nodes
    /// (copy jobs, their own front ends) and front ends, nobody else. Default:
    /// insecure plaintext (tests of the protocol itself).
    pub security: Security,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { max_in_flight: 256, max_payload: MAX_PAYLOAD, security: Security::Insecure }
    }
}

/// Whether `peer` may use the data path: a storage node or a front end.
fn may_serve(peer: &Peer) -> bool {
    match peer {
        Peer::Insecure => true,
        Peer::Authenticated(id) => matches!(id, Identity::Node(_) | Identity::Frontend(_)),
    }
}

/// Serves one chunk store over TCP. Cheap to clone.
#[derive(Clone)]
pub struct ReplicaServer {
    store: ChunkStore,
    opts: ServerOptions,
}

/// A request's failure as it goes on the wire.
struct Failure {
    status: Status,
    message: String,
}

impl Failure {
    fn bad_request(message: String) -> Failure {
        Failure { status: Status::BadRequest, message }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure { status: status_of(&e), message: e.to_string() }
    }
}

/// The one mapping from chunk-store errors to wire status codes. Exhaustive on
/// purpose: a new store error does not compile until someone picks its code.
pub fn status_of(e: &StoreError) -> Status {
    match e {
        StoreError::Fenced { .. } => Status::Fenced,
        StoreError::UnannouncedEpoch { .. } => Status::UnannouncedEpoch,
        StoreError::NoSuchChunk(_) => Status::NoSuchChunk,
        StoreError::ChunkExists { .. } => Status::ChunkExists,
        StoreError::OutOfRange { .. } => Status::OutOfRange,
        StoreError::Misaligned { .. } => Status::Misaligned,
        StoreError::ChecksumMismatch { .. } => Status::ChecksumMismatch,
        StoreError::NoSpace { .. } => Status::NoSpace,
        StoreError::Io { .. } | StoreError::SmallFsBlocks { .. } => Status::Io,
        StoreError::InvalidRequest(_) => Status::BadRequest,
        StoreError::Shutdown => Status::Shutdown,
    }
}

/// What a successful request answers: the response epoch (AnnounceEpoch) and payload.
struct Reply {
    epoch: Option<Epoch>,
    payload: Bytes,
}

impl Reply {
    fn empty() -> Reply {
        Reply { epoch: None, payload: Bytes::new() }
    }
}

impl ReplicaServer {
    pub fn new(store: ChunkStore, opts: ServerOptions) -> ReplicaServer {
        ReplicaServer { store, opts }
    }

    /// The store this server serves.
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    /// Accepts connections on `listener` until `shutdown` completes; then stops
    /// accepting, stops reading new requests, lets the requests in flight finish and
    /// their responses go out, and closes every connection before returning.
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> std::io::Result<()>
    where
        F: Future<Output = ()> + Send,
    {
        let local = listener.local_addr()?;
        info!(%local, "replica server listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let server = self.clone();
                        conns.spawn(server.connection(stream, peer, stop_rx.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: keep the
                        // connections we have, try again shortly.
                        warn!(%local, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        info!(%local, connections = conns.len(), "replica server shutting down");
        drop(listener);
        let _ = stop_tx.send(true);
        while conns.join_next().await.is_some() {}
        info!(%local, "replica server stopped");
        Ok(())
    }

    async fn connection(self, tcp: TcpStream, peer: SocketAddr, mut stop: watch::Receiver<bool>) {
        if let Err(e) = tcp.set_nodelay(true) {
            warn!(%peer, error = %e, "cannot set TCP_NODELAY; serving anyway");
        }
        let (stream, who) = tokio::select! {
            r = self.opts.security.accept(tcp) => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(%peer, error = %e, "connection refused");
                    return;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        if !may_serve(&who) {
            warn!(%peer, identity = %who, "connection refused: only storage nodes and front ends use the data path");
            return;
        }
        debug!(%peer, identity = %who, "connection opened");
        let (mut r, w) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel::<(Frame, OwnedSemaphorePermit)>();
        let writer = tokio::spawn(write_loop(w, rx, peer));
        let permits = Arc::new(Semaphore::new(self.opts.max_in_flight.max(1)));
        let mut dec = Decoder::with_max_payload(self.opts.max_payload);
        let mut buf = BytesMut::with_capacity(64 << 10);

        'conn: loop {
            loop {
                let frame = match dec.decode(&mut buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(%peer, error = %e, "closing connection: malformed frame");
                        break 'conn;
                    }
                };
                // Backpressure: with max_in_flight requests outstanding, wait
                // for one to be answered before reading further.
                let permit = tokio::select! {
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break 'conn,
                    },
                    _ = stopped(&mut stop) => break 'conn,
                    _ = tx.closed() => break 'conn,
                };
                let h = frame.header;
                let span = tracing::debug_span!(
                    "replica_req",
                    %peer,
                    volume = h.volume.0,
                    chunk = h.chunk.0,
                    op = h.op.name(),
                    req = h.request_id,
                    epoch = h.epoch.0,
                );
                let server = self.clone();
                let tx = tx.clone();
                tokio::spawn(
                    async move {
                        let resp = server.handle(frame).await;
                        // The writer is gone only if the connection is: nobody to answer.
                        let _ = tx.send((resp, permit));
                    }
                    .instrument(span),
                );
            }
            buf.reserve(dec.bytes_wanted(&buf).max(16 << 10));
            tokio::select! {
                res = r.read_buf(&mut buf) => match res {
                    Ok(0) => {
                        if !buf.is_empty() {
                            warn!(%peer, pending = buf.len(), "closing connection: truncated frame at EOF");
                        }
                        break 'conn;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(%peer, error = %e, "connection read failed");
                        break 'conn;
                    }
                },
                _ = stopped(&mut stop) => break 'conn,
                _ = tx.closed() => break 'conn,
            }
        }
        // Requests in flight still hold senders: the writer sends their
        // responses, then ends when the last one is dropped.
        drop(tx);
        if writer.await.is_err() {
            warn!(%peer, "connection writer task failed");
        }
        debug!(%peer, "connection closed");
    }

    /// Runs one request to its response frame; never fails (errors become statuses).
    async fn handle(&self, req: Frame) -> Frame {
        let h = req.header;
        match self.execute(&req).await {
            Ok(reply) => {
                let mut rh = h.response(Status::Ok);
                if let Some(e) = reply.epoch {
                    rh.epoch = e;
                }
                debug!(bytes = reply.payload.len(), "ok");
                Frame::new(rh, reply.payload)
            }
            Err(f) => {
                match f.status {
                    Status::ChecksumMismatch | Status::Io | Status::NoSpace => {
                        warn!(status = ?f.status, error = %f.message, "request failed")
                    }
                    _ => debug!(status = ?f.status, error = %f.message, "request refused"),
                }
                Frame::error_response(&h, f.status, &f.message)
            }
        }
    }

    async fn execute(&self, req: &Frame) -> Result<Reply, Failure> {
        let h = &req.header;
        if h.flags.response {
            return Err(Failure::bad_request("a response frame was sent as a request".into()));
        }
        let id = ChunkId::new(h.volume, h.chunk);
        let store = &self.store;
        // Only Write, ResyncWrite, SetCuts and ReadSnapshot carry a payload;
        // checked before any store call so a malformed request changes nothing.
        if !matches!(
            h.op,
            Op::Write | Op::ResyncWrite | Op::SetCuts | Op::ReadSnapshot | Op::ContextTableAt | Op::ResyncWriteAt
        ) && !req.payload.is_empty()
        {
            return Err(payload_mismatch(h, 0, req.payload.len()));
        }
        match h.op {
            Op::Write => {
                if req.payload.len() != h.length as usize {
                    return Err(payload_mismatch(h, u64::from(h.length), req.payload.len()));
                }
                store.write(id, h.offset, req.payload.clone(), h.seq()).await?;
                if h.flags.fua {
                    store.flush_chunk(id, h.epoch).await?;
                }
                Ok(Reply::empty())
            }
            Op::Read => {
                if h.length > self.opts.max_payload {
                    return Err(Failure::bad_request(format!(
                        "read of {} bytes exceeds the maximum of {}",
                        h.length, self.opts.max_payload
                    )));
                }
                let data = store.read(id, h.offset, h.length, h.epoch).await?;
                Ok(Reply { epoch: None, payload: data })
            }
            Op::Flush => {
                if h.chunk == ALL_CHUNKS {
                    store.flush_volume(h.volume, h.epoch).await?;
                } else {
                    store.flush_chunk(id, h.epoch).await?;
                }
                Ok(Reply::empty())
            }
            Op::Trim | Op::WriteZeroes => {
                let len = u64::from(h.length);
                if h.op == Op::Trim {
                    store.trim(id, h.offset, len, h.seq()).await?;
                } else {
                    store.write_zeroes(id, h.offset, len, h.seq()).await?;
                }
                if h.flags.fua {
                    store.flush_chunk(id, h.epoch).await?;
                }
                Ok(Reply::empty())
            }
            Op::ContextTable | Op::ContextTableAt => {
                let first = u32::try_from(h.offset).map_err(|_| Failure {
                    status: Status::OutOfRange,
                    message: format!("first block {} is beyond any chunk", h.offset),
                })?;
                let bytes = u64::from(h.length) * CONTEXT_ENTRY_LEN as u64;
                if bytes > u64::from(self.opts.max_payload) {
                    return Err(Failure::bad_request(format!(
                        "context table of {} blocks exceeds the maximum payload",
                        h.length
                    )));
                }
                let table = if h.op == Op::ContextTableAt {
                    let cut = one_cut(h, &req.payload)?;
                    store.context_table_at(id, Some(cut), BlockIdx(first), h.length, h.epoch).await?
                } else {
                    store.context_table(id, BlockIdx(first), h.length, h.epoch).await?
                };
                Ok(Reply { epoch: None, payload: encode_contexts(&table) })
            }
            Op::ChunkCreate => {
                store.create_chunk(id, h.offset, h.epoch).await?;
                info!(size = h.offset, "chunk created");
                Ok(Reply::empty())
            }
            Op::ChunkDelete => {
                store.delete_chunk(id, h.epoch).await?;
                info!("chunk deleted");
                Ok(Reply::empty())
            }
            Op::Ping => Ok(Reply::empty()),
            Op::AnnounceEpoch => {
                let before = store.epoch(h.volume);
                let current = store.announce_epoch(h.volume, h.epoch).await?;
                if current > before {
                    info!(from = before.0, to = current.0, "volume epoch raised");
                }
                Ok(Reply { epoch: Some(current), payload: Bytes::new() })
            }
            Op::ListDirty => {
                check_epoch(h.volume, h.epoch, store.epoch(h.volume))?;
                let dirty = store.dirty_chunks(h.volume);
                Ok(Reply { epoch: None, payload: encode_chunk_list(&dirty) })
            }
            Op::ResyncWrite | Op::ResyncWriteAt => {
                if !h.length.is_multiple_of(BLOCK_SIZE) {
                    return Err(StoreError::Misaligned { offset: h.offset, len: u64::from(h.length) }.into());
                }
                let blocks = h.length / BLOCK_SIZE;
                if blocks > MAX_RESYNC_BLOCKS {
                    return Err(Failure::bad_request(format!(
                        "resync write of {blocks} blocks exceeds the maximum of {MAX_RESYNC_BLOCKS}"
                    )));
                }
                let (view, body) = if h.op == Op::ResyncWriteAt {
                    if req.payload.len() < CUT_LEN {
                        return Err(payload_mismatch(h, CUT_LEN as u64, req.payload.len()));
                    }
                    (Some(one_cut(h, &req.payload[..CUT_LEN])?), req.payload.slice(CUT_LEN..))
                } else {
                    (None, req.payload.clone())
                };
                // The whole payload is checked before the store sees any of it.
                let w = decode_resync_write(&body, blocks).map_err(|e| Failure::bad_request(e.to_string()))?;
                let entries: Vec<ResyncBlock> = w
                    .entries
                    .iter()
                    .map(|e| match e.kind {
                        ResyncKind::Keep => ResyncBlock::Keep,
                        ResyncKind::Data => ResyncBlock::Data(e.seq),
                        ResyncKind::Zero => ResyncBlock::Zero(e.seq),
                    })
                    .collect();
                // The protect-from boundary is in the request's own epoch (see the
                // wire docs): blocks written under it since then stay protected.
                let protect_from = h.seq();
                let out = match view {
                    Some(cut) => {
                        store.resync_write_at(id, cut, h.offset, &entries, w.data, h.epoch, protect_from).await?
                    }
                    None => store.resync_write(id, h.offset, &entries, w.data, h.epoch, protect_from).await?,
                };
                if h.flags.fua {
                    store.flush_chunk(id, h.epoch).await?;
                }
                let result = ResyncResult { written: out.written, zeroed: out.zeroed, skipped: out.skipped };
                Ok(Reply { epoch: None, payload: encode_resync_result(&result) })
            }
            Op::ListCuts => {
                if h.chunk != ALL_CHUNKS {
                    return Err(Failure::bad_request("list cuts names a chunk; it applies to the whole volume".into()));
                }
                check_epoch(h.volume, h.epoch, store.epoch(h.volume))?;
                Ok(Reply { epoch: None, payload: encode_cuts(&store.cuts(h.volume)) })
            }
            Op::SetCuts => {
                if h.chunk != ALL_CHUNKS {
                    return Err(Failure::bad_request("set cuts names a chunk; it applies to the whole volume".into()));
                }
                if h.length > MAX_CUTS || req.payload.len() != h.length as usize * CUT_LEN {
                    return Err(payload_mismatch(
                        h,
                        u64::from(h.length.min(MAX_CUTS)) * CUT_LEN as u64,
                        req.payload.len(),
                    ));
                }
                let cuts = decode_cuts(h.op, &req.payload).map_err(|e| Failure::bad_request(e.to_string()))?;
                match h.offset {
                    0 => store.set_cuts(h.volume, h.epoch, &cuts).await?,
                    SET_CUTS_IF_NONE => {
                        if store.set_cuts_if_none(h.volume, h.epoch, &cuts).await? {
                            info!(cuts = cuts.len(), "snapshot cuts set for a copy");
                        }
                    }
                    other => return Err(Failure::bad_request(format!("set cuts mode {other} is not 0 or 1"))),
                }
                Ok(Reply::empty())
            }
            Op::ReadSnapshot => {
                if h.length > self.opts.max_payload {
                    return Err(Failure::bad_request(format!(
                        "read of {} bytes exceeds the maximum of {}",
                        h.length, self.opts.max_payload
                    )));
                }
                if req.payload.len() != CUT_LEN {
                    return Err(payload_mismatch(h, CUT_LEN as u64, req.payload.len()));
                }
                let cut = one_cut(h, &req.payload)?;
                let data = store.read_snapshot(id, cut, h.offset, h.length, h.epoch).await?;
                Ok(Reply { epoch: None, payload: data })
            }
        }
    }
}

/// Epoch rule for ops the store does not fence itself (read-only metadata):
/// older than announced is fenced, newer must be announced first.
fn check_epoch(volume: VolumeId, request: Epoch, current: Epoch) -> Result<(), Failure> {
    if request < current {
        return Err(StoreError::Fenced { volume, request, current }.into());
    }
    if request > current {
        return Err(StoreError::UnannouncedEpoch { volume, request, current }.into());
    }
    Ok(())
}

/// The one cut a ReadSnapshot, ContextTableAt or ResyncWriteAt names.
fn one_cut(h: &Header, payload: &[u8]) -> Result<Seq, Failure> {
    if payload.len() != CUT_LEN {
        return Err(payload_mismatch(h, CUT_LEN as u64, payload.len()));
    }
    decode_cuts(h.op, payload)
        .map_err(|e| Failure::bad_request(e.to_string()))?
        .first()
        .copied()
        .ok_or_else(|| Failure::bad_request(format!("{:?} names no cut", h.op)))
}

fn payload_mismatch(h: &Header, expected: u64, actual: usize) -> Failure {
    Failure::bad_request(format!("{:?} carries a payload of {actual} bytes, expected {expected}", h.op))
}

/// Resolves once the server asks connections to stop (or the server is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn write_loop(
    mut w: WriteHalf<Stream>,
    mut rx: mpsc::UnboundedReceiver<(Frame, OwnedSemaphorePermit)>,
    peer: SocketAddr,
) {
    let mut frames = Vec::with_capacity(MAX_BATCH);
    let mut permits = Vec::with_capacity(MAX_BATCH);
    while let Some((f, p)) = rx.recv().await {
        frames.push(f);
        permits.push(p);
        while frames.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((f, p)) => {
                    frames.push(f);
                    permits.push(p);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = write_frames(&mut w, &frames).await {
            debug!(%peer, error = %e, "connection write failed");
            return;
        }
        frames.clear();
        // Free the in-flight slots only once the responses are on the socket,
        // so a slow reader cannot make responses pile up in memory.
        permits.clear();
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ballast_types::ChunkIdx;

    use super::*;

    /// Each store error has its own wire status, and none of them is Ok.
    #[test]
    fn every_store_error_maps_to_a_distinct_status() {
        let id = ChunkId::new(VolumeId(1), ChunkIdx(2));
        let errors = [
            StoreError::Fenced { volume: id.volume, request: Epoch(1), current: Epoch(2) },
            StoreError::UnannouncedEpoch { volume: id.volume, request: Epoch(3), current: Epoch(2) },
            StoreError::NoSuchChunk(id),
            StoreError::ChunkExists { id, size: 1, existing: 2 },
            StoreError::OutOfRange { id, offset: 0, len: 1, size: 0 },
            StoreError::Misaligned { offset: 1, len: 1 },
            StoreError::ChecksumMismatch { id, block: BlockIdx(0) },
            StoreError::NoSpace { op: "write", path: PathBuf::from("/x") },
            StoreError::Io { op: "read", path: PathBuf::from("/x"), source: std::io::Error::other("eio") },
            StoreError::InvalidRequest("data length".into()),
            StoreError::Shutdown,
        ];
        let statuses: Vec<Status> = errors.iter().map(status_of).collect();
        assert!(!statuses.contains(&Status::Ok));
        for (i, s) in statuses.iter().enumerate() {
            assert!(!statuses[i + 1..].contains(s), "{s:?} used twice");
        }
        assert_eq!(statuses[0], Status::Fenced);
        assert_eq!(statuses[6], Status::ChecksumMismatch);
    }

    #[test]
    fn list_dirty_epoch_rule() {
        let v = VolumeId(1);
        assert!(check_epoch(v, Epoch(2), Epoch(2)).is_ok());
        assert_eq!(check_epoch(v, Epoch(1), Epoch(2)).err().map(|f| f.status), Some(Status::Fenced));
        assert_eq!(check_epoch(v, Epoch(3), Epoch(2)).err().map(|f| f.status), Some(Status::UnannouncedEpoch));
    }
}
