//! A small pipelined NBD client: fixed-newstyle handshake with NBD_OPT_GO, simple
//! replies, many requests in flight on one connection. It implements
//! [`BlockDev`], so the block-device conformance suite runs through the wire
//! against any NBD server, and benches can drive a server without an external tool.
//!
//! ```text
//!  callers ──request()──► writer (mutex: one frame at a time) ──► socket
//!     ▲                                                              │
//!     └── oneshot by cookie ◄── reader task (demultiplexes replies) ◄┘
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ballast_blockdev::{check_range, BlockDev, BlockError};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::proto::{self, Request};
use crate::NbdError;

/// What the server told us about the export during NBD_OPT_GO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    /// Transmission flags (`proto::FLAG_*`).
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    pub description: Option<String>,
}

type Waiters = HashMap<u64, Waiter>;

struct Waiter {
    /// Bytes of data that follow a successful reply (READ only).
    read_len: u32,
    tx: oneshot::Sender<Result<Bytes, NbdError>>,
}

struct PendingState {
    waiters: Waiters,
    /// Set by the reader when the connection is gone; later requests fail at once.
    closed: bool,
}

/// A connected NBD client in the transmission phase.
pub struct NbdClient {
    info: ExportInfo,
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Arc<Mutex<PendingState>>,
    next_cookie: AtomicU64,
    reader: JoinHandle<()>,
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl NbdClient {
    pub async fn connect_tcp(addr: impl ToSocketAddrs, export: &str) -> Result<Self, NbdError> {
        let s = TcpStream::connect(addr).await.map_err(|source| NbdError::Io { op: "connect", source })?;
        s.set_nodelay(true).map_err(|source| NbdError::Io { op: "connect", source })?;
        let (r, w) = s.into_split();
        Self::handshake(r, w, export).await
    }

    pub async fn connect_unix(path: impl AsRef<Path>, export: &str) -> Result<Self, NbdError> {
        let s = UnixStream::connect(path).await.map_err(|source| NbdError::Io { op: "connect", source })?;
        let (r, w) = s.into_split();
        Self::handshake(r, w, export).await
    }

    /// Negotiates `export` (empty: the server's default) over an open stream and
    /// enters transmission.
    pub async fn handshake<R, W>(r: R, mut w: W, export: &str) -> Result<Self, NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let io = |op: &'static str| move |source| NbdError::Io { op, source };
        let mut r = BufReader::new(r);
        let mut greeting = [0u8; proto::GREETING_LEN];
        r.read_exact(&mut greeting).await.map_err(io("read greeting"))?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap_or_default());
        let opt = u64::from_be_bytes(greeting[8..16].try_into().unwrap_or_default());
        let hflags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if magic != proto::NBDMAGIC || opt != proto::IHAVEOPT {
            return Err(NbdError::ServerProtocol(format!("not a newstyle NBD greeting: {magic:#x} {opt:#x}")));
        }
        if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::ServerProtocol("server does not speak fixed newstyle".into()));
        }
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if hflags & proto::FLAG_NO_ZEROES != 0 {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        let requests = [proto::INFO_BLOCK_SIZE, proto::INFO_NAME, proto::INFO_DESCRIPTION];
        let mut msg = Vec::new();
        msg.extend_from_slice(&cflags.to_be_bytes());
        msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        msg.extend_from_slice(&((4 + export.len() + 2 + 2 * requests.len()) as u32).to_be_bytes());
        msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
        msg.extend_from_slice(export.as_bytes());
        msg.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for q in requests {
            msg.extend_from_slice(&q.to_be_bytes());
        }
        w.write_all(&msg).await.map_err(io("send NBD_OPT_GO"))?;
        w.flush().await.map_err(io("send NBD_OPT_GO"))?;

        let mut info = ExportInfo {
            name: export.to_string(),
            size: 0,
            flags: 0,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 << 20,
            description: None,
        };
        let mut have_export = false;
        loop {
            let mut head = [0u8; 20];
            r.read_exact(&mut head).await.map_err(io("read option reply"))?;
            let magic = u64::from_be_bytes(head[0..8].try_into().unwrap_or_default());
            let option = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
            let reply = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap_or_default()) as usize;
            if magic != proto::OPT_REPLY_MAGIC || option != proto::OPT_GO {
                return Err(NbdError::ServerProtocol(format!("bad option reply {magic:#x} for option {option}")));
            }
            if len > 1 << 20 {
                return Err(NbdError::ServerProtocol(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len];
            r.read_exact(&mut data).await.map_err(io("read option reply"))?;
            match reply {
                proto::REP_ACK => break,
                proto::REP_INFO if data.len() >= 2 => {
                    let kind = u16::from_be_bytes([data[0], data[1]]);
                    let d = &data[2..];
                    match kind {
                        proto::INFO_EXPORT if d.len() == 10 => {
                            info.size = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
                            info.flags = u16::from_be_bytes([d[8], d[9]]);
                            have_export = true;
                        }
                        proto::INFO_BLOCK_SIZE if d.len() == 12 => {
                            info.min_block = u32::from_be_bytes(d[0..4].try_into().unwrap_or_default());
                            info.preferred_block = u32::from_be_bytes(d[4..8].try_into().unwrap_or_default());
                            info.max_payload = u32::from_be_bytes(d[8..12].try_into().unwrap_or_default());
                        }
                        proto::INFO_NAME => info.name = String::from_utf8_lossy(d).into_owned(),
                        proto::INFO_DESCRIPTION => info.description = Some(String::from_utf8_lossy(d).into_owned()),
                        _ => {} // the protocol says: ignore what we do not understand
                    }
                }
                r if r & (1 << 31) != 0 => {
                    return Err(NbdError::OptionRefused {
                        option: proto::OPT_GO,
                        reply: r,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
                other => return Err(NbdError::ServerProtocol(format!("unexpected option reply type {other}"))),
            }
        }
        if !have_export {
            return Err(NbdError::ServerProtocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into()));
        }
        if !info.min_block.is_power_of_two() || info.max_payload < info.min_block {
            return Err(NbdError::ServerProtocol(format!(
                "unusable block sizes: min {} max {}",
                info.min_block, info.max_payload
            )));
        }
        let pending = Arc::new(Mutex::new(PendingState { waiters: HashMap::new(), closed: false }));
        let reader = tokio::spawn(read_replies(r, pending.clone()));
        Ok(NbdClient {
            info,
            writer: tokio::sync::Mutex::new(Box::new(w)),
            pending,
            next_cookie: AtomicU64::new(1),
            reader,
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Sends one request as given (no local checks: tests use this to send what a
    /// careful client would not) and waits for its reply. READ returns the data;
    /// an error reply is [`NbdError::Request`].
    pub async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Bytes,
    ) -> Result<Bytes, NbdError> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.closed {
                return Err(NbdError::Closed);
            }
            let read_len = if cmd == proto::CMD_READ { len } else { 0 };
            p.waiters.insert(cookie, Waiter { read_len, tx });
        }
        let header = Request { flags, cmd, cookie, offset, len }.encode();
        let sent = async {
            let mut w = self.writer.lock().await;
            w.write_all(&header).await?;
            if !payload.is_empty() {
                w.write_all(&payload).await?;
            }
            w.flush().await
        }
        .await;
        if let Err(source) = sent {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).waiters.remove(&cookie);
            // The server hung up: report it like the reader does, whichever notices first.
            let gone = matches!(
                source.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::NotConnected
            );
            return Err(if gone { NbdError::Closed } else { NbdError::Io { op: "send request", source } });
        }
        rx.await.unwrap_or(Err(NbdError::Closed))
    }

    /// Soft disconnect: NBD_CMD_DISC, then close our side. Wait for in-flight
    /// requests first; the server answers them but this client no longer listens.
    pub async fn disconnect(&self) -> Result<(), NbdError> {
        let header = Request { flags: 0, cmd: proto::CMD_DISC, cookie: 0, offset: 0, len: 0 }.encode();
        let mut w = self.writer.lock().await;
        let io = |source| NbdError::Io { op: "send disconnect", source };
        w.write_all(&header).await.map_err(io)?;
        w.flush().await.map_err(io)?;
        w.shutdown().await.map_err(io)
    }

    fn has(&self, flag: u16) -> bool {
        self.info.flags & flag != 0
    }

    /// Device-style geometry check, as every `BlockDev` does before any I/O.
    fn check(&self, offset: u64, len: u64, max: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.info.size, self.block_size(), max)
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.has(proto::FLAG_READ_ONLY) {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    /// The largest trim / write-zeroes length one request carries.
    fn max_effect(&self) -> u64 {
        u64::from(u32::MAX / self.block_size() * self.block_size())
    }
}

/// Maps a failed request to the device error a caller of `BlockDev` expects.
fn to_block_error(e: NbdError, offset: u64, len: u64, max: u64) -> BlockError {
    match e {
        NbdError::Request { errno } => match errno {
            proto::EPERM => BlockError::ReadOnly,
            proto::ENOSPC => BlockError::NoSpace("NBD server replied ENOSPC".into()),
            proto::EOVERFLOW => BlockError::TooLarge { len, max },
            proto::ESHUTDOWN => BlockError::Shutdown,
            other => BlockError::Io(format!("NBD server replied errno {other} to [{offset}, +{len})")),
        },
        NbdError::Closed => BlockError::Shutdown,
        other => BlockError::Io(other.to_string()),
    }
}

impl BlockDev for NbdClient {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn block_size(&self) -> u32 {
        self.info.min_block.max(512)
    }

    fn max_request(&self) -> u32 {
        self.info.max_payload
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        let max = u64::from(self.max_request());
        self.check(offset, u64::from(len), max)?;
        let data = self
            .request(proto::CMD_READ, 0, offset, len, Bytes::new())
            .await
            .map_err(|e| to_block_error(e, offset, u64::from(len), max))?;
        Ok(data)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let max = u64::from(self.max_request());
        let len = data.len() as u64;
        self.check(offset, len, max)?;
        self.check_writable()?;
        let native_fua = fua && self.has(proto::FLAG_SEND_FUA);
        let flags = if native_fua { proto::CMD_FLAG_FUA } else { 0 };
        self.request(proto::CMD_WRITE, flags, offset, len as u32, data)
            .await
            .map_err(|e| to_block_error(e, offset, len, max))?;
        if fua && !native_fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        if !self.has(proto::FLAG_SEND_FLUSH) {
            return Err(BlockError::Io("NBD server does not support flush".into()));
        }
        self.request(proto::CMD_FLUSH, 0, 0, 0, Bytes::new()).await.map_err(|e| to_block_error(e, 0, 0, 0))?;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check(offset, len, u64::MAX)?;
        self.check_writable()?;
        if !self.has(proto::FLAG_SEND_TRIM) {
            return Err(BlockError::Io("NBD server does not support trim".into()));
        }
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let n = (end - at).min(self.max_effect());
            self.request(proto::CMD_TRIM, 0, at, n as u32, Bytes::new())
                .await
                .map_err(|e| to_block_error(e, at, n, u64::MAX))?;
            at += n;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.check(offset, len, u64::MAX)?;
        self.check_writable()?;
        if !self.has(proto::FLAG_SEND_WRITE_ZEROES) {
            return Err(BlockError::Io("NBD server does not support write zeroes".into()));
        }
        let flags = if fua && self.has(proto::FLAG_SEND_FUA) { proto::CMD_FLAG_FUA } else { 0 };
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let n = (end - at).min(self.max_effect());
            self.request(proto::CMD_WRITE_ZEROES, flags, at, n as u32, Bytes::new())
                .await
                .map_err(|e| to_block_error(e, at, n, u64::MAX))?;
            at += n;
        }
        if fua && flags == 0 {
            self.flush().await?;
        }
        Ok(())
    }
}

/// Demultiplexes replies to their waiters until the connection ends, then fails
/// every request still waiting.
async fn read_replies<R: AsyncRead + Unpin>(mut r: BufReader<R>, pending: Arc<Mutex<PendingState>>) {
    let reason = loop {
        let mut head = [0u8; proto::SIMPLE_REPLY_LEN];
        if let Err(e) = r.read_exact(&mut head).await {
            break format!("reading reply: {e}");
        }
        let (errno, cookie) = match proto::decode_simple_reply(&head) {
            Ok(v) => v,
            Err(magic) => break format!("bad reply magic {magic:#x}"),
        };
        let waiter = pending.lock().unwrap_or_else(|e| e.into_inner()).waiters.remove(&cookie);
        let Some(waiter) = waiter else {
            break format!("reply for unknown cookie {cookie}");
        };
        let result = if errno != 0 {
            Err(NbdError::Request { errno })
        } else if waiter.read_len > 0 {
            let mut buf = BytesMut::zeroed(waiter.read_len as usize);
            if let Err(e) = r.read_exact(&mut buf).await {
                let _ = waiter.tx.send(Err(NbdError::Closed));
                break format!("reading data of cookie {cookie}: {e}");
            }
            Ok(buf.freeze())
        } else {
            Ok(Bytes::new())
        };
        // The caller may have stopped waiting (its future was dropped); nothing to do then.
        let _ = waiter.tx.send(result);
    };
    debug!(%reason, "nbd client connection ended");
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    p.closed = true;
    for (_, w) in p.waiters.drain() {
        let _ = w.tx.send(Err(NbdError::Closed));
    }
}
