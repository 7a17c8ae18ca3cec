//! The NBD server: accept loop, fixed-newstyle handshake, and the pipelined
//! transmission phase. This file is on the I/O path: no blocking calls, no
//! info-level events per request, no locks shared between connections.
//!
//! ```text
//!            ┌──────────── one connection ─────────────────────────────────┐
//!  socket ──►│ reader: header → permits (count, bytes) → payload → validate │
//!            │            │ spawn per request              │ error replies  │
//!            │            ▼                                ▼                │
//!            │   task: dev.read/write/... ──► mpsc<Reply> ──► writer ───────┼──► socket
//!            └──────────────────────────────────────────────────────────────┘
//! ```
//!
//! Backpressure: the reader takes a request permit and a byte permit before it
//! reads a payload; the writer releases them once the reply has left. A slow
//! device or a client that does not read its replies therefore stops the reader,
//! and TCP flow control pushes back on the client.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use ballast_blockdev::{BlockDev, BlockError};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, debug_span, info, info_span, warn, Instrument, Span};

use crate::proto::{self, Request};
use crate::NbdError;

/// One export: a name clients ask for and the device behind it.
pub struct Export<B> {
    /// The name clients pass (`nbd://host/NAME`). The first export is also the
    /// default one, served for an empty name.
    pub name: String,
    /// Free text shown by `nbdinfo --list` and NBD_INFO_DESCRIPTION.
    pub description: String,
    pub dev: Arc<B>,
    /// Refuse writes, trims and write-zeroes with EPERM and advertise READ_ONLY.
    pub read_only: bool,
}

impl<B: BlockDev> Export<B> {
    /// A writable export with no description.
    pub fn new(name: impl Into<String>, dev: Arc<B>) -> Self {
        Export { name: name.into(), description: String::new(), dev, read_only: false }
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }
}

/// Server tuning. Every field has a default suited to a volume front end.
#[derive(Clone, Debug)]
pub struct NbdOptions {
    /// Requests in flight per connection before the server stops reading the
    /// socket. Default: 128.
    pub max_in_flight: usize,
    /// Payload bytes in flight per connection (write data received but not yet
    /// acknowledged, read data not yet sent). Raised to the maximum payload if
    /// smaller. Default: 64 MiB.
    pub max_in_flight_bytes: usize,
    /// Largest READ / WRITE payload advertised; lowered to the device's
    /// `max_request` and to its block-size multiple. Default: 32 MiB.
    pub max_payload: u32,
    /// Preferred block size advertised (raised to the device block size).
    /// Default: 4096.
    pub preferred_block_size: u32,
    /// Time a client has to finish option haggling. Default: 30 s.
    pub handshake_timeout: Duration,
    /// Concurrent connections per `serve_*` call; more are closed at accept.
    /// Default: 256.
    pub max_connections: usize,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            max_in_flight: 128,
            max_in_flight_bytes: 64 << 20,
            max_payload: 32 << 20,
            preferred_block_size: 4096,
            handshake_timeout: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

/// An export with its negotiated geometry, fixed at server construction.
struct Served<B> {
    name: String,
    description: String,
    dev: Arc<B>,
    read_only: bool,
    size: u64,
    block_size: u32,
    preferred: u32,
    max_payload: u32,
    /// Largest piece a TRIM / WRITE_ZEROES is split into (the device limit).
    max_effect: u64,
    flags: u16,
}

struct Shared<B> {
    exports: Vec<Served<B>>,
    opts: NbdOptions,
}

/// An NBD server over one or more block devices. Cheap to clone; clones share
/// the exports.
pub struct NbdServer<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for NbdServer<B> {
    fn clone(&self) -> Self {
        NbdServer { shared: self.shared.clone() }
    }
}

impl<B: BlockDev> NbdServer<B> {
    /// Checks the exports (at least one, unique names, sane geometry) and fixes
    /// each export's advertised size constraints.
    pub fn new(exports: Vec<Export<B>>, opts: NbdOptions) -> Result<Self, NbdError> {
        if exports.is_empty() {
            return Err(NbdError::Config("an NBD server needs at least one export".into()));
        }
        if opts.max_in_flight == 0 {
            return Err(NbdError::Config("max_in_flight must be at least 1".into()));
        }
        let mut served: Vec<Served<B>> = Vec::with_capacity(exports.len());
        for e in exports {
            if served.iter().any(|s| s.name == e.name) {
                return Err(NbdError::Config(format!("export name {:?} is used twice", e.name)));
            }
            if e.name.len() > proto::MAX_NAME_LEN || e.description.len() > proto::MAX_NAME_LEN {
                return Err(NbdError::Config(format!(
                    "export {:?}: name and description must be at most {} bytes",
                    e.name,
                    proto::MAX_NAME_LEN
                )));
            }
            let bs = e.dev.block_size();
            // The protocol caps the minimum block size at 64 KiB and wants powers of two.
            if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
                return Err(NbdError::Config(format!(
                    "export {:?}: block size {bs} is not a power of two in [512, 65536]",
                    e.name
                )));
            }
            let size = e.dev.size();
            if size % u64::from(bs) != 0 {
                return Err(NbdError::Config(format!(
                    "export {:?}: size {size} is not a multiple of the block size {bs}",
                    e.name
                )));
            }
            let dev_max = e.dev.max_request();
            let max_payload = opts.max_payload.min(dev_max) / bs * bs;
            if max_payload < bs {
                return Err(NbdError::Config(format!(
                    "export {:?}: maximum payload {} is below the block size {bs}",
                    e.name,
                    opts.max_payload.min(dev_max)
                )));
            }
            let preferred = opts.preferred_block_size.max(bs).next_power_of_two().min(max_payload.max(bs));
            let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_CAN_MULTI_CONN;
            // CAN_MULTI_CONN is sound because the device is one consistent object shared by
            // every connection, and a flush on any connection covers writes from all of them.
            if e.read_only {
                flags |= proto::FLAG_READ_ONLY;
            } else {
                flags |= proto::FLAG_SEND_FUA | proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES;
            }
            served.push(Served {
                name: e.name,
                description: e.description,
                dev: e.dev,
                read_only: e.read_only,
                size,
                block_size: bs,
                preferred: preferred.max(bs),
                max_payload,
                max_effect: u64::from(dev_max / bs * bs),
                flags,
            });
        }
        Ok(NbdServer { shared: Arc::new(Shared { exports: served, opts }) })
    }

    /// Serves clients from `listener` until `shutdown` resolves; then stops
    /// accepting, lets every connection finish its in-flight requests, and
    /// returns once all connections are closed.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), NbdError> {
        let accept = || async {
            let (stream, peer) = listener.accept().await?;
            // Replies are latency-bound: never wait for Nagle.
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            Ok((r, w, peer.to_string()))
        };
        self.serve_loop(accept, shutdown).await
    }

    /// As [`NbdServer::serve_tcp`], on a unix socket.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), NbdError> {
        let accept = || async {
            let (stream, _) = listener.accept().await?;
            let (r, w) = stream.into_split();
            Ok((r, w, "unix".to_string()))
        };
        self.serve_loop(accept, shutdown).await
    }

    /// Serves one already-connected client (handshake included) until it
    /// disconnects. The error says why the server ended a misbehaving session.
    pub async fn serve_stream<S>(&self, stream: S, peer: &str) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        // A sender kept alive for the call, so the connection never sees a shutdown.
        let (_stop_tx, stop_rx) = watch::channel(false);
        self.clone().connection(r, w, peer.to_string(), stop_rx).await
    }

    /// The transmission flags export `name` is served with (what a handshake would
    /// have sent), or None if there is no such export. Kernel NBD takes them as
    /// NBD_ATTR_SERVER_FLAGS.
    pub fn transmission_flags(&self, name: &str) -> Option<u16> {
        self.find_export(name.as_bytes()).map(|i| self.shared.exports[i].flags)
    }

    /// The size export `name` is served with, or None if there is no such export.
    pub fn export_size(&self, name: &str) -> Option<u64> {
        self.find_export(name.as_bytes()).map(|i| self.shared.exports[i].size)
    }

    /// Serves an already-negotiated stream in the transmission phase, for export
    /// `name` (the empty name: the first export). For the Linux kernel's NBD client
    /// attached through netlink: it sends no handshake and starts with requests. Runs
    /// until the peer sends NBD_CMD_DISC or closes the stream.
    pub async fn serve_transmission<S>(&self, name: &str, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let idx =
            self.find_export(name.as_bytes()).ok_or_else(|| NbdError::UnknownExport { name: name.to_string() })?;
        let export = &self.shared.exports[idx];
        let span = info_span!("nbd_conn", peer = "kernel", export = export.name.as_str());
        let (r, w) = tokio::io::split(stream);
        // A sender kept alive for the call, so the connection never sees a shutdown.
        let (_stop_tx, stop_rx) = watch::channel(false);
        async move {
            info!(size = export.size, read_only = export.read_only, "nbd transmission started without handshake");
            let r = BufReader::with_capacity(64 << 10, r);
            let result = self.transmission(idx, r, w, stop_rx).await;
            match &result {
                Ok(()) => info!("nbd client disconnected"),
                Err(e) => warn!(reason = %e, "nbd connection closed by the server"),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn serve_loop<F, Fut, R, W>(
        &self,
        accept: F,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), NbdError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<(R, W, String)>>,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = done {
                        warn!(error = %e, "nbd connection task failed");
                    }
                }
                accepted = accept() => match accepted {
                    Ok((r, w, peer)) => {
                        if conns.len() >= self.shared.opts.max_connections {
                            warn!(%peer, limit = self.shared.opts.max_connections, "nbd connection refused: too many connections");
                            continue;
                        }
                        let server = self.clone();
                        let stop = stop_rx.clone();
                        conns.spawn(async move {
                            // The connection logs its own end; the result is only for serve_stream callers.
                            let _ = server.connection(r, w, peer, stop).await;
                        });
                    }
                    Err(e) if accept_error_is_transient(&e) => {
                        warn!(error = %e, "nbd accept failed; retrying");
                        // Out of descriptors or memory: give in-flight work a moment to release some.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => break Err(NbdError::Io { op: "accept", source: e }),
                },
            }
        };
        info!(connections = conns.len(), "nbd server stopping; draining connections");
        let _ = stop_tx.send(true);
        while let Some(done) = conns.join_next().await {
            if let Err(e) = done {
                warn!(error = %e, "nbd connection task failed");
            }
        }
        info!("nbd server stopped");
        result
    }

    /// One client from greeting to close, inside its connection span.
    async fn connection<R, W>(self, r: R, w: W, peer: String, stop: watch::Receiver<bool>) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let span = info_span!("nbd_conn", %peer, export = tracing::field::Empty);
        async move {
            info!("nbd client connected");
            let result = self.connection_inner(r, w, stop).await;
            match &result {
                Ok(()) => info!("nbd client disconnected"),
                Err(e) => warn!(reason = %e, "nbd connection closed by the server"),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn connection_inner<R, W>(&self, r: R, mut w: W, mut stop: watch::Receiver<bool>) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut r = BufReader::with_capacity(64 << 10, r);
        let timeout = self.shared.opts.handshake_timeout;
        let negotiated = tokio::select! {
            res = tokio::time::timeout(timeout, self.handshake(&mut r, &mut w)) => match res {
                Ok(res) => res?,
                Err(_) => return Err(NbdError::HandshakeTimeout(timeout)),
            },
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let Some(idx) = negotiated else {
            debug!("client aborted the handshake");
            return Ok(());
        };
        let export = &self.shared.exports[idx];
        Span::current().record("export", export.name.as_str());
        info!(size = export.size, read_only = export.read_only, "nbd transmission started");
        self.transmission(idx, r, w, stop).await
    }

    /// Option haggling. `Ok(Some(i))`: transmission on export `i`; `Ok(None)`: the
    /// client aborted.
    async fn handshake<R, W>(&self, r: &mut R, w: &mut W) -> Result<Option<usize>, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let io = |op: &'static str| move |source| NbdError::Io { op, source };
        w.write_all(&proto::greeting()).await.map_err(io("send greeting"))?;
        w.flush().await.map_err(io("send greeting"))?;
        let client_flags = r.read_u32().await.map_err(io("read client flags"))?;
        if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Err(NbdError::ClientFlags { flags: client_flags });
        }
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        loop {
            let mut head = [0u8; 16];
            r.read_exact(&mut head).await.map_err(io("read option"))?;
            let magic = u64::from_be_bytes(head[0..8].try_into().unwrap_or_default());
            if magic != proto::IHAVEOPT {
                return Err(NbdError::BadMagic { phase: "option header", got: magic });
            }
            let option = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
            // Every legal option fits easily; a longer one is garbage or an attack, and
            // skipping it would mean reading unbounded data from an unknown client.
            if len as usize > MAX_OPTION_LEN {
                return Err(NbdError::OptionTooLong { option, len, max: MAX_OPTION_LEN });
            }
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data).await.map_err(io("read option data"))?;
            debug!(option, len, "nbd option");
            let mut replies = OptionReplies::new(option);
            let outcome = match option {
                proto::OPT_EXPORT_NAME => {
                    let idx = self
                        .find_export(&data)
                        .ok_or_else(|| NbdError::UnknownExport { name: String::from_utf8_lossy(&data).into_owned() })?;
                    let e = &self.shared.exports[idx];
                    let mut b = Vec::with_capacity(134);
                    b.extend_from_slice(&e.size.to_be_bytes());
                    b.extend_from_slice(&e.flags.to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    w.write_all(&b).await.map_err(io("send export info"))?;
                    w.flush().await.map_err(io("send export info"))?;
                    return Ok(Some(idx));
                }
                proto::OPT_ABORT => {
                    replies.push(proto::REP_ACK, &[]);
                    // The client may already have gone; a failed ACK changes nothing.
                    let _ = replies.send(w).await;
                    return Ok(None);
                }
                proto::OPT_LIST => {
                    if data.is_empty() {
                        for e in &self.shared.exports {
                            let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                            d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                            d.extend_from_slice(e.name.as_bytes());
                            d.extend_from_slice(e.description.as_bytes());
                            replies.push(proto::REP_SERVER, &d);
                        }
                        replies.push(proto::REP_ACK, &[]);
                    } else {
                        replies.push(proto::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    }
                    None
                }
                proto::OPT_INFO | proto::OPT_GO => self.info_or_go(&data, &mut replies),
                _ => {
                    // Includes STRUCTURED_REPLY: simple replies only (qemu, libnbd, fio accept that).
                    replies.push(proto::REP_ERR_UNSUP, b"option not supported by ballast");
                    None
                }
            };
            replies.send(w).await?;
            if option == proto::OPT_GO {
                if let Some(idx) = outcome {
                    return Ok(Some(idx));
                }
            }
        }
    }

    /// NBD_OPT_INFO / NBD_OPT_GO: the export's information, then ACK (or an
    /// error). Returns the export on success.
    fn info_or_go(&self, data: &[u8], replies: &mut OptionReplies) -> Option<usize> {
        let Some((name, requests)) = parse_info_request(data) else {
            replies.push(proto::REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data");
            return None;
        };
        let Some(idx) = self.find_export(name) else {
            replies.push(proto::REP_ERR_UNKNOWN, b"no such export");
            return None;
        };
        let e = &self.shared.exports[idx];
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&e.size.to_be_bytes());
        d.extend_from_slice(&e.flags.to_be_bytes());
        replies.push(proto::REP_INFO, &d);
        // Block sizes are sent whether or not asked for: this server enforces a minimum
        // above the protocol's default of 1, so a client should know it.
        let mut d = Vec::with_capacity(14);
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&e.block_size.to_be_bytes());
        d.extend_from_slice(&e.preferred.to_be_bytes());
        d.extend_from_slice(&e.max_payload.to_be_bytes());
        replies.push(proto::REP_INFO, &d);
        if requests.contains(&proto::INFO_NAME) {
            let mut d = proto::INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(e.name.as_bytes());
            replies.push(proto::REP_INFO, &d);
        }
        if requests.contains(&proto::INFO_DESCRIPTION) && !e.description.is_empty() {
            let mut d = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(e.description.as_bytes());
            replies.push(proto::REP_INFO, &d);
        }
        replies.push(proto::REP_ACK, &[]);
        Some(idx)
    }

    /// The export for a requested name; the empty name is the first (default) export.
    fn find_export(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return Some(0);
        }
        self.shared.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    async fn transmission<R, W>(
        &self,
        idx: usize,
        mut r: BufReader<R>,
        w: W,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let e = &self.shared.exports[idx];
        let opts = &self.shared.opts;
        let ctx = Arc::new(ReqCtx {
            dev: e.dev.clone(),
            size: e.size,
            block_size: e.block_size,
            max_payload: e.max_payload,
            max_effect: e.max_effect,
            read_only: e.read_only,
        });
        let count = Arc::new(Semaphore::new(opts.max_in_flight));
        let byte_budget = opts.max_in_flight_bytes.max(e.max_payload as usize).min(Semaphore::MAX_PERMITS);
        let bytes = Arc::new(Semaphore::new(byte_budget));
        // Never full: every queued reply holds a count permit.
        let (tx, rx) = mpsc::channel::<Reply>(opts.max_in_flight);
        let writer = tokio::spawn(write_replies(BufWriter::with_capacity(256 << 10, w), rx).in_current_span());

        let outcome: Result<(), NbdError> = loop {
            if tx.is_closed() {
                break Err(NbdError::Io {
                    op: "send reply",
                    source: io::Error::new(io::ErrorKind::BrokenPipe, "reply writer stopped"),
                });
            }
            let mut head = [0u8; proto::REQUEST_LEN];
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => {
                    info!("server shutting down: closing after in-flight requests");
                    break Ok(());
                }
                res = r.read_exact(&mut head) => match res {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        debug!("client closed the connection without NBD_CMD_DISC");
                        break Ok(());
                    }
                    Err(source) => break Err(NbdError::Io { op: "read request", source }),
                },
            }
            let req = match Request::decode(&head) {
                Ok(req) => req,
                Err(got) => break Err(NbdError::BadMagic { phase: "request header", got: u64::from(got) }),
            };
            if req.cmd == proto::CMD_DISC {
                debug!("client sent NBD_CMD_DISC");
                break Ok(());
            }
            let payload_len = match req.cmd {
                proto::CMD_READ | proto::CMD_WRITE => req.len.min(ctx.max_payload),
                _ => 0,
            };
            let Ok(count_permit) = count.clone().acquire_owned().await else {
                break Ok(());
            };
            let Ok(byte_permit) = bytes.clone().acquire_many_owned(payload_len).await else {
                break Ok(());
            };
            let permits = Permits { _count: count_permit, _bytes: byte_permit };
            let mut payload = Bytes::new();
            if req.cmd == proto::CMD_WRITE {
                if req.len > ctx.max_payload {
                    // The payload cannot be skipped safely (up to 4 GiB of unknown data): reply
                    // and end the session, as the protocol allows for a broken MUST.
                    let _ = tx.send(Reply::error(req.cookie, proto::EINVAL, permits)).await;
                    break Err(NbdError::PayloadTooLarge { len: req.len, max: ctx.max_payload });
                }
                let mut buf = BytesMut::zeroed(req.len as usize);
                if let Err(source) = r.read_exact(&mut buf).await {
                    break Err(NbdError::Io { op: "read write payload", source });
                }
                payload = buf.freeze();
            }
            let op = match ctx.validate(&req, payload) {
                Ok(op) => op,
                Err(errno) => {
                    debug!(
                        cmd = proto::cmd_name(req.cmd),
                        cookie = req.cookie,
                        offset = req.offset,
                        len = req.len,
                        errno,
                        "nbd request rejected"
                    );
                    // A failed send means the writer is gone; the loop head reports it.
                    let _ = tx.send(Reply::error(req.cookie, errno, permits)).await;
                    continue;
                }
            };
            let span = debug_span!(
                "nbd_req",
                cmd = proto::cmd_name(req.cmd),
                cookie = req.cookie,
                offset = req.offset,
                len = req.len
            );
            let ctx = ctx.clone();
            let tx = tx.clone();
            tokio::spawn(
                async move {
                    let reply = match ctx.execute(op).await {
                        Ok(data) => {
                            debug!("done");
                            Reply { cookie: req.cookie, error: 0, data, _permits: permits }
                        }
                        Err(e) => {
                            debug!(error = %e, "failed");
                            Reply::error(req.cookie, nbd_errno(&e), permits)
                        }
                    };
                    // A closed channel means the client is gone; the result has nowhere to go.
                    let _ = tx.send(reply).await;
                }
                .instrument(span),
            );
        };
        // In-flight requests hold senders: the writer ends once the last one has replied.
        drop(tx);
        let written = writer.await;
        outcome?;
        match written {
            Ok(res) => res,
            Err(join) => Err(NbdError::Io { op: "send reply", source: io::Error::other(join.to_string()) }),
        }
    }
}

/// The largest option payload accepted: a name of the maximum length, plus the
/// INFO/GO framing and a generous list of information requests.
const MAX_OPTION_LEN: usize = proto::MAX_NAME_LEN + 4 + 2 + 2 * 64;

fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::OutOfMemory
    ) || matches!(e.raw_os_error(), Some(code) if code == EMFILE || code == ENFILE || code == ENOBUFS || code == ENOMEM)
}

// Linux errno values for accept(2) resource exhaustion (stable ABI).
const ENOMEM: i32 = 12;
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const ENOBUFS: i32 = 105;

/// Splits NBD_OPT_INFO/GO data into (name, information requests); `None` if the
/// lengths do not add up.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?;
    let n = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
    let rest = data.get(name_end + 2..)?;
    if rest.len() != 2 * n {
        return None;
    }
    Some((name, rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

/// Replies to one option, sent together.
struct OptionReplies {
    option: u32,
    buf: Vec<u8>,
}

impl OptionReplies {
    fn new(option: u32) -> Self {
        OptionReplies { option, buf: Vec::new() }
    }

    fn push(&mut self, reply: u32, data: &[u8]) {
        self.buf.extend_from_slice(&proto::option_reply_header(self.option, reply, data.len() as u32));
        self.buf.extend_from_slice(data);
    }

    async fn send<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<(), NbdError> {
        let io = |source| NbdError::Io { op: "send option reply", source };
        w.write_all(&self.buf).await.map_err(io)?;
        w.flush().await.map_err(io)
    }
}

/// The permits a request holds from the moment its header is read until its
/// reply has been written.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

struct Reply {
    cookie: u64,
    error: u32,
    /// READ data; empty for every other reply.
    data: Bytes,
    _permits: Permits,
}

impl Reply {
    fn error(cookie: u64, error: u32, permits: Permits) -> Self {
        Reply { cookie, error, data: Bytes::new(), _permits: permits }
    }
}

/// Writes replies in completion order, flushing when the queue runs dry so that
/// replies completing together share a syscall.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
) -> Result<(), NbdError> {
    let mut failed: Option<io::Error> = None;
    while let Some(reply) = rx.recv().await {
        if failed.is_none() {
            let res = async {
                w.write_all(&proto::simple_reply(reply.error, reply.cookie)).await?;
                if !reply.data.is_empty() {
                    w.write_all(&reply.data).await?;
                }
                if rx.is_empty() {
                    w.flush().await?;
                }
                io::Result::Ok(())
            }
            .await;
            if let Err(e) = res {
                // Keep draining so in-flight tasks can finish and release their permits;
                // closing makes their sends fail fast and tells the reader to stop.
                rx.close();
                failed = Some(e);
            }
        }
        drop(reply);
    }
    match failed {
        Some(source) => Err(NbdError::Io { op: "send reply", source }),
        None => {
            w.flush().await.map_err(|source| NbdError::Io { op: "send reply", source })?;
            // Closing our half tells the client we are done (after DISC or shutdown).
            let _ = w.shutdown().await;
            Ok(())
        }
    }
}

/// What a connection needs to check and run requests on its export.
struct ReqCtx<B> {
    dev: Arc<B>,
    size: u64,
    block_size: u32,
    max_payload: u32,
    max_effect: u64,
    read_only: bool,
}

/// A validated request.
enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// A zero-length read, write, trim or write-zeroes: the protocol leaves it
    /// unspecified; it succeeds without touching the device.
    Nothing,
}

impl<B: BlockDev> ReqCtx<B> {
    /// Checks a request against the export before anything touches the device,
    /// with the errors the protocol asks for: EINVAL for misalignment, bad flags,
    /// unknown commands and reads or trims past the end; ENOSPC for writes past the
    /// end; EPERM for changes to a read-only export.
    fn validate(&self, req: &Request, data: Bytes) -> Result<Op, u32> {
        // FUA is valid on every command; NO_HOLE on write-zeroes (and harmless elsewhere).
        // DF, REQ_ONE and FAST_ZERO need features this server does not advertise.
        if req.flags & !(proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE) != 0 {
            return Err(proto::EINVAL);
        }
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let len = u64::from(req.len);
        let (writes, past_end) = match req.cmd {
            proto::CMD_READ => (false, proto::EINVAL),
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => (true, proto::ENOSPC),
            proto::CMD_TRIM => (true, proto::EINVAL),
            proto::CMD_FLUSH => return Ok(Op::Flush),
            _ => return Err(proto::EINVAL),
        };
        if writes && self.read_only {
            return Err(proto::EPERM);
        }
        let bs = u64::from(self.block_size);
        if !req.offset.is_multiple_of(bs) || len % bs != 0 {
            return Err(proto::EINVAL);
        }
        if req.cmd == proto::CMD_READ && req.len > self.max_payload {
            return Err(proto::EINVAL);
        }
        match req.offset.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => return Err(past_end),
        }
        if len == 0 {
            return Ok(Op::Nothing);
        }
        Ok(match req.cmd {
            proto::CMD_READ => Op::Read { offset: req.offset, len: req.len },
            proto::CMD_WRITE => Op::Write { offset: req.offset, data, fua },
            proto::CMD_TRIM => Op::Trim { offset: req.offset, len, fua },
            _ => Op::WriteZeroes { offset: req.offset, len, fua },
        })
    }

    /// Runs a validated request; returns READ data (empty otherwise).
    async fn execute(&self, op: Op) -> Result<Bytes, BlockError> {
        match op {
            Op::Read { offset, len } => {
                let data = self.dev.read(offset, len).await?;
                // A short or long buffer would desynchronise the client's stream.
                if data.len() != len as usize {
                    return Err(BlockError::Io(format!(
                        "device returned {} bytes for a {len}-byte read at {offset}",
                        data.len()
                    )));
                }
                Ok(data)
            }
            Op::Write { offset, data, fua } => self.dev.write(offset, data, fua).await.map(|()| Bytes::new()),
            Op::Flush => self.dev.flush().await.map(|()| Bytes::new()),
            Op::Trim { offset, len, fua } | Op::WriteZeroes { offset, len, fua } => {
                let zeroes = matches!(op, Op::WriteZeroes { .. });
                // NBD lets trim / write-zeroes cover far more than a payload (qemu sends up to
                // 2 GiB); the device takes at most max_request per call.
                let pieces = len.div_ceil(self.max_effect);
                let mut at = offset;
                let end = offset + len;
                while at < end {
                    let n = (end - at).min(self.max_effect);
                    if zeroes {
                        self.dev.write_zeroes(at, n, fua && pieces == 1).await?;
                    } else {
                        self.dev.trim(at, n).await?;
                    }
                    at += n;
                }
                // FUA on a trim, or on a split write-zeroes: make the whole effect durable.
                if fua && (!zeroes || pieces > 1) {
                    self.dev.flush().await?;
                }
                Ok(Bytes::new())
            }
            Op::Nothing => Ok(Bytes::new()),
        }
    }
}

/// The NBD error for a device error: [`BlockError::errno`] (the one mapping),
/// kept inside the set the protocol allows.
fn nbd_errno(e: &BlockError) -> u32 {
    match u32::try_from(e.errno()) {
        Ok(n @ (proto::EPERM | proto::EIO | proto::EINVAL | proto::ENOSPC | proto::EOVERFLOW | proto::ESHUTDOWN)) => n,
        _ => proto::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&proto::INFO_NAME.to_be_bytes());
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info_request(&d), Some((&b"vol"[..], vec![proto::INFO_NAME, proto::INFO_BLOCK_SIZE])));
        // Name length past the data, a count that does not match, and truncations.
        let mut bad = d.clone();
        bad[3] = 200;
        assert_eq!(parse_info_request(&bad), None);
        let mut bad = d.clone();
        bad[8] = 3;
        assert_eq!(parse_info_request(&bad), None);
        for cut in 0..d.len() {
            assert_eq!(parse_info_request(&d[..cut]), None, "truncated at {cut}");
        }
    }

    #[test]
    fn errno_mapping_stays_in_the_nbd_set() {
        let cases = [
            (BlockError::OutOfRange { offset: 0, len: 1, size: 0 }, proto::EINVAL),
            (BlockError::Misaligned { offset: 1, len: 1, block_size: 4096 }, proto::EINVAL),
            (BlockError::TooLarge { len: 2, max: 1 }, proto::EOVERFLOW),
            (BlockError::NoSpace("disk".into()), proto::ENOSPC),
            (BlockError::Io("bad".into()), proto::EIO),
            (BlockError::ReadOnly, proto::EPERM),
            (BlockError::Shutdown, proto::ESHUTDOWN),
        ];
        for (e, want) in cases {
            assert_eq!(nbd_errno(&e), want, "{e}");
        }
    }

    /// The kernel's side of a netlink-attached device: no handshake, requests at once.
    #[tokio::test]
    async fn transmission_without_handshake() {
        use ballast_blockdev::MemDev;
        let dev = Arc::new(MemDev::new(1 << 20, 4096));
        let server = NbdServer::new(vec![Export::new("vol", dev.clone())], NbdOptions::default()).expect("server");
        let flags = server.transmission_flags("vol").expect("flags");
        assert_ne!(flags & proto::FLAG_SEND_FLUSH, 0);
        assert_eq!(server.transmission_flags("nope"), None);
        assert_eq!(server.export_size("vol"), Some(1 << 20));
        let missing = server.serve_transmission("nope", tokio::io::duplex(64).0).await;
        assert!(matches!(missing, Err(NbdError::UnknownExport { .. })));

        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let serving = tokio::spawn({
            let server = server.clone();
            async move { server.serve_transmission("vol", theirs).await }
        });
        let (mut r, mut w) = tokio::io::split(ours);
        let req = |cmd, cookie, offset, len| Request { flags: 0, cmd, cookie, offset, len }.encode();
        let reply = async |r: &mut tokio::io::ReadHalf<tokio::io::DuplexStream>| {
            let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
            r.read_exact(&mut h).await.expect("reply");
            proto::decode_simple_reply(&h).expect("magic")
        };
        w.write_all(&req(proto::CMD_WRITE, 1, 8192, 4096)).await.expect("send");
        w.write_all(&[7u8; 4096]).await.expect("send");
        assert_eq!(reply(&mut r).await, (0, 1));
        w.write_all(&req(proto::CMD_FLUSH, 2, 0, 0)).await.expect("send");
        assert_eq!(reply(&mut r).await, (0, 2));
        w.write_all(&req(proto::CMD_READ, 3, 8192, 4096)).await.expect("send");
        assert_eq!(reply(&mut r).await, (0, 3));
        let mut data = vec![0u8; 4096];
        r.read_exact(&mut data).await.expect("data");
        assert!(data.iter().all(|&b| b == 7));
        assert_eq!(&dev.read(8192, 4096).await.expect("dev")[..], &data[..]);
        w.write_all(&req(proto::CMD_DISC, 4, 0, 0)).await.expect("send");
        serving.await.expect("join").expect("clean end");
    }
}
