//! Kernel NBD through generic netlink, where the `nbd` module is loaded.
//!
//! ```text
//!  BlockDev ◄── NbdServer::serve_transmission ◄── unix socketpair ──► kernel nbd ──► /dev/nbdN
//!                (this process, tokio)                                 (NBD_CMD_CONNECT hands
//!                                                                        it one end's fd)
//! ```
//!
//! The kernel speaks the transmission phase only (no handshake): size, block size
//! and transmission flags come in NBD_CMD_CONNECT. Durability is NBD's own: the
//! kernel sends NBD_CMD_FLUSH for REQ_OP_FLUSH, and the server answers it after
//! `BlockDev::flush`.
//!
//! The netlink messages are hand-rolled rather than built with a netlink crate: the
//! driver needs four messages (resolve the family, connect, disconnect, and the
//! replies) with a dozen attributes, which is less code than a crate's builder setup
//! and keeps the proc-macro-heavy dependency trees of `neli`/`netlink-packet-*` out
//! of the build. The layouts (all native-endian, 4-byte aligned):
//!
//! ```text
//! nlmsghdr (16): 0 len u32 | 4 type u16 (family id) | 6 flags u16 | 8 seq u32 | 12 port id u32 (0 = kernel)
//! genlmsghdr (4): 16 cmd u8 | 17 version u8 | 18 reserved u16
//! nlattr (4 + n, padded to 4): 0 len u16 (4 + n) | 2 type u16 (| NLA_F_NESTED 0x8000) | 4 payload
//! nlmsgerr: 16 error i32 (0 = ACK, else -errno) | 20 the request's nlmsghdr
//! ```

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ballast_blockdev::BlockDev;
use ballast_nbd::{Export, NbdError, NbdOptions, NbdServer};
use tokio::task::JoinHandle;
use tracing::info;

use crate::{AttachError, Result};

// netlink (include/uapi/linux/netlink.h, genetlink.h).
const NETLINK_GENERIC: libc::c_int = 16;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLMSG_ERROR: u16 = 0x02;
const NLMSG_DONE: u16 = 0x03;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// NBD netlink (include/uapi/linux/nbd-netlink.h), family "nbd", version 1.
const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
/// Free the device (/dev/nbdN returns to the pool) once it is disconnected.
const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;

/// Whether the kernel NBD driver is loaded (`/sys/module/nbd`).
pub fn kernel_nbd_available() -> bool {
    Path::new("/sys/module/nbd").exists()
}

/// A netlink message under construction.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Msg { buf }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn put(&mut self, ty: u16, payload: &[u8]) {
        self.buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn put_u32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_ne_bytes());
    }

    fn put_u64(&mut self, ty: u16, v: u64) {
        self.put(ty, &v.to_ne_bytes());
    }

    fn nest_start(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn get_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes of a generic netlink message body (after the genl header), as
/// (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let (Some(len), Some(ty)) = (get_u16(b, 0), get_u16(b, 2)) else { break };
        let len = len as usize;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty & NLA_TYPE_MASK, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// One parsed reply message.
#[derive(Debug, PartialEq)]
enum Reply<'a> {
    /// NLMSG_ERROR: 0 is an ACK, otherwise a positive errno.
    Ack(i32),
    /// A generic netlink message: its attributes.
    Data(Vec<(u16, &'a [u8])>),
    Done,
}

/// Splits a datagram into messages for sequence number `seq`.
fn parse_replies(mut b: &[u8], seq: u32) -> io::Result<Vec<Reply<'_>>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {what}"));
    let mut out = Vec::new();
    while b.len() >= 16 {
        let len = get_u32(b, 0).ok_or_else(|| bad("short header"))? as usize;
        if len < 16 || len > b.len() {
            return Err(bad("length out of bounds"));
        }
        let ty = get_u16(b, 4).ok_or_else(|| bad("short header"))?;
        let mseq = get_u32(b, 8).ok_or_else(|| bad("short header"))?;
        let msg = &b[..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        if mseq != seq {
            continue;
        }
        out.push(match ty {
            NLMSG_ERROR => {
                let err = get_u32(msg, 16).ok_or_else(|| bad("short error message"))? as i32;
                Reply::Ack(-err)
            }
            NLMSG_DONE => Reply::Done,
            _ => Reply::Data(attrs(msg.get(20..).ok_or_else(|| bad("short genl header"))?)),
        });
    }
    Ok(out)
}

/// One reply message's attributes, copied out of the receive buffer.
type OwnedAttrs = Vec<(u16, Vec<u8>)>;

/// A task serving one kernel NBD connection.
pub type ServeTask = JoinHandle<std::result::Result<(), NbdError>>;

/// A NETLINK_GENERIC socket.
struct Genl {
    fd: OwnedFd,
    seq: u32,
}

impl Genl {
    fn open() -> io::Result<Genl> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_GENERIC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Requests to the kernel never block for long, but a wedged driver must not
        // hang a CSI call forever.
        let tv = libc::timeval { tv_sec: 30, tv_usec: 0 };
        // SAFETY: setsockopt with a live timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Genl { fd, seq: 1 })
    }

    /// Sends one request and collects its replies until the ACK. Returns the data
    /// messages' attributes, copied.
    fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Vec<OwnedAttrs>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = build(seq);
        // SAFETY: sockaddr_nl zeroed is the kernel's address (pid 0, no groups).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msg and addr are live for the call and their lengths are given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut data = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: buf is live and writable for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for reply in parse_replies(&buf[..n as usize], seq)? {
                match reply {
                    Reply::Ack(0) | Reply::Done => return Ok(data),
                    Reply::Ack(errno) => return Err(io::Error::from_raw_os_error(errno)),
                    Reply::Data(a) => data.push(a.into_iter().map(|(t, p)| (t, p.to_vec())).collect()),
                }
            }
        }
    }

    /// The id of generic netlink family `name`.
    fn family(&mut self, name: &str) -> io::Result<u16> {
        let replies = self.request(|seq| {
            let mut m = Msg::new(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, CTRL_CMD_GETFAMILY, 1);
            let mut n = name.as_bytes().to_vec();
            n.push(0);
            m.put(CTRL_ATTR_FAMILY_NAME, &n);
            m.finish()
        })?;
        replies
            .iter()
            .flatten()
            .find(|(t, p)| *t == CTRL_ATTR_FAMILY_ID && p.len() >= 2)
            .map(|(_, p)| u16::from_ne_bytes([p[0], p[1]]))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no generic netlink family {name:?}")))
    }
}

/// The NBD_CMD_CONNECT message.
fn connect_msg(family: u16, seq: u32, socks: &[i32], size: u64, opts: &KernelNbdOptions, server_flags: u16) -> Vec<u8> {
    let mut m = Msg::new(family, NLM_F_REQUEST | NLM_F_ACK, seq, NBD_CMD_CONNECT, NBD_GENL_VERSION);
    m.put_u64(NBD_ATTR_SIZE_BYTES, size);
    m.put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, u64::from(opts.block_size));
    m.put_u64(NBD_ATTR_TIMEOUT, opts.timeout.as_secs());
    m.put_u64(NBD_ATTR_SERVER_FLAGS, u64::from(server_flags));
    m.put_u64(NBD_ATTR_CLIENT_FLAGS, NBD_CFLAG_DESTROY_ON_DISCONNECT);
    let all = m.nest_start(NBD_ATTR_SOCKETS);
    for fd in socks {
        let item = m.nest_start(NBD_SOCK_ITEM);
        m.put_u32(NBD_SOCK_FD, *fd as u32);
        m.nest_end(item);
    }
    m.nest_end(all);
    m.finish()
}

fn disconnect_msg(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut m = Msg::new(family, NLM_F_REQUEST | NLM_F_ACK, seq, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
    m.put_u32(NBD_ATTR_INDEX, index);
    m.finish()
}

/// Kernel NBD settings.
#[derive(Clone, Debug)]
pub struct KernelNbdOptions {
    /// Logical block size of /dev/nbdN. Default: 4096.
    pub block_size: u32,
    /// Per-request timeout after which the kernel fails the request (0: the kernel's
    /// default). Default: 0.
    pub timeout: Duration,
    /// Connections (sockets) the kernel spreads requests over. Default: 2.
    pub connections: usize,
}

impl Default for KernelNbdOptions {
    fn default() -> Self {
        KernelNbdOptions { block_size: 4096, timeout: Duration::ZERO, connections: 2 }
    }
}

/// A connected /dev/nbdN.
#[derive(Debug)]
pub struct KernelNbd {
    index: u32,
    path: PathBuf,
    family: u16,
}

impl KernelNbd {
    /// NBD_CMD_CONNECT: the kernel takes `socks` (one end of each connected stream
    /// whose peer serves the transmission phase) and picks a free /dev/nbdN. The
    /// sockets are closed here once the kernel holds them.
    pub fn connect(socks: Vec<OwnedFd>, size: u64, server_flags: u16, opts: &KernelNbdOptions) -> Result<KernelNbd> {
        if !kernel_nbd_available() {
            return Err(AttachError::NbdUnavailable("no nbd kernel module (/sys/module/nbd)".into()));
        }
        let nl = |op| move |source| AttachError::Netlink { op, source };
        let mut genl = Genl::open().map_err(nl("open socket"))?;
        let family = genl.family(NBD_GENL_FAMILY_NAME).map_err(nl("resolve family nbd"))?;
        let raw: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let replies = genl
            .request(|seq| connect_msg(family, seq, &raw, size, opts, server_flags))
            .map_err(nl("NBD_CMD_CONNECT"))?;
        drop(socks);
        let index = replies
            .iter()
            .flatten()
            .find(|(t, p)| *t == NBD_ATTR_INDEX && p.len() >= 4)
            .map(|(_, p)| u32::from_ne_bytes([p[0], p[1], p[2], p[3]]))
            .ok_or_else(|| AttachError::Netlink {
                op: "NBD_CMD_CONNECT",
                source: io::Error::new(io::ErrorKind::InvalidData, "reply carries no NBD_ATTR_INDEX"),
            })?;
        let path = PathBuf::from(format!("/dev/nbd{index}"));
        info!(device = %path.display(), size, "kernel nbd connected");
        Ok(KernelNbd { index, path, family })
    }

    /// `/dev/nbdN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// NBD_CMD_DISCONNECT: the kernel sends NBD_CMD_DISC on every socket and closes
    /// them, which ends the serving tasks.
    pub fn disconnect(self) -> Result<()> {
        let nl = |op| move |source| AttachError::Netlink { op, source };
        let mut genl = Genl::open().map_err(nl("open socket"))?;
        genl.request(|seq| disconnect_msg(self.family, seq, self.index)).map_err(nl("NBD_CMD_DISCONNECT"))?;
        info!(device = %self.path.display(), "kernel nbd disconnected");
        Ok(())
    }
}

/// Attaches `dev` as /dev/nbdN: `opts.connections` socketpairs, each served on `rt`
/// by an [`NbdServer`] in the transmission phase, the other ends handed to the kernel.
/// The returned tasks end after [`KernelNbd::disconnect`].
pub fn attach_kernel_nbd<D: BlockDev>(
    dev: Arc<D>,
    opts: &KernelNbdOptions,
    rt: &tokio::runtime::Handle,
) -> Result<(KernelNbd, Vec<ServeTask>)> {
    let server = NbdServer::new(vec![Export::new("volume", dev)], NbdOptions::default())
        .map_err(|e| AttachError::NbdUnavailable(format!("nbd server: {e}")))?;
    let flags = server.transmission_flags("volume").unwrap_or_default();
    let size = server.export_size("volume").unwrap_or_default();
    let mut kernel_ends = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..opts.connections.max(1) {
        let (k, o) = std::os::unix::net::UnixStream::pair()
            .map_err(|source| AttachError::Netlink { op: "socketpair", source })?;
        o.set_nonblocking(true).map_err(|source| AttachError::Netlink { op: "socketpair", source })?;
        kernel_ends.push(OwnedFd::from(k));
        ours.push(o);
    }
    let mut tasks = Vec::new();
    for o in ours {
        let _enter = rt.enter();
        let stream = tokio::net::UnixStream::from_std(o)
            .map_err(|source| AttachError::Netlink { op: "register socket", source })?;
        let server = server.clone();
        tasks.push(rt.spawn(async move { server.serve_transmission("volume", stream).await }));
    }
    match KernelNbd::connect(kernel_ends, size, flags, opts) {
        Ok(k) => Ok((k, tasks)),
        Err(e) => {
            for t in tasks {
                t.abort();
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }

    #[test]
    fn connect_message_golden_bytes() {
        let opts = KernelNbdOptions { block_size: 4096, timeout: Duration::from_secs(30), connections: 1 };
        let m = connect_msg(0x22, 7, &[5], 1 << 30, &opts, 0x0165);
        let mut want = Vec::new();
        // nlmsghdr: len, type, flags (REQUEST|ACK), seq, port
        want.extend_from_slice(&(m.len() as u32).to_ne_bytes());
        want.extend_from_slice(&ne16(0x22));
        want.extend_from_slice(&ne16(0x05));
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        // genlmsghdr: CONNECT, version 1
        want.extend_from_slice(&[1, 1, 0, 0]);
        for (ty, v) in [(2u16, 1u64 << 30), (3, 4096), (4, 30), (5, 0x0165), (6, 1)] {
            want.extend_from_slice(&ne16(12));
            want.extend_from_slice(&ne16(ty));
            want.extend_from_slice(&v.to_ne_bytes());
        }
        // SOCKETS (nested) > ITEM (nested) > FD u32
        want.extend_from_slice(&ne16(4 + 4 + 8));
        want.extend_from_slice(&ne16(7 | 0x8000));
        want.extend_from_slice(&ne16(4 + 8));
        want.extend_from_slice(&ne16(1 | 0x8000));
        want.extend_from_slice(&ne16(8));
        want.extend_from_slice(&ne16(1));
        want.extend_from_slice(&5u32.to_ne_bytes());
        assert_eq!(m, want);
        assert_eq!(m.len(), 16 + 4 + 5 * 12 + 16);
    }

    #[test]
    fn family_request_pads_the_name() {
        let mut m = Msg::new(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, 1, CTRL_CMD_GETFAMILY, 1);
        m.put(CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        m.put(CTRL_ATTR_FAMILY_NAME, b"ab\0");
        let b = m.finish();
        assert_eq!(b.len(), 20 + 8 + 8);
        assert_eq!(&b[20..22], &ne16(8));
        assert_eq!(&b[22..24], &ne16(CTRL_ATTR_FAMILY_NAME));
        assert_eq!(&b[24..28], b"nbd\0");
        // "ab\0" is 7 bytes with the header, padded to 8.
        assert_eq!(&b[28..30], &ne16(7));
        assert_eq!(b[35], 0);
    }

    #[test]
    fn replies_parse_data_then_ack() {
        // A data message with NBD_ATTR_INDEX = 3, then an ACK, then a message for another seq.
        let mut data = Msg::new(0x22, 0, 9, NBD_CMD_CONNECT, 1);
        data.put_u32(NBD_ATTR_INDEX, 3);
        let mut b = data.finish();
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&ne16(NLMSG_ERROR));
        ack.extend_from_slice(&ne16(0));
        ack.extend_from_slice(&9u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        b.extend_from_slice(&ack);
        let mut other = ack.clone();
        other[8..12].copy_from_slice(&10u32.to_ne_bytes());
        other[16..20].copy_from_slice(&(-22i32).to_ne_bytes());
        b.extend_from_slice(&other);
        let r = parse_replies(&b, 9).expect("parses");
        assert_eq!(r, vec![Reply::Data(vec![(NBD_ATTR_INDEX, &3u32.to_ne_bytes()[..])]), Reply::Ack(0)]);
        assert_eq!(parse_replies(&b, 10).expect("parses"), vec![Reply::Ack(22)]);
        // A length past the buffer is an error, not a panic.
        let mut bad = b.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_replies(&bad, 9).is_err());
    }
}
