//! [`FuseFile`]: a FUSE file system with one regular file whose contents are a
//! [`BlockDev`]. This file is on the I/O path: the FUSE reader threads only decode a
//! request and hand it to a tokio task, which replies when the device answers, so a
//! loop device with a deep queue gets parallelism (FUSE_ASYNC_DIO +
//! FOPEN_PARALLEL_DIRECT_WRITES let the kernel keep many requests in flight).
//!
//! ```text
//!  /dev/fuse ──► fuser thread ×2 ── decode, copy write payload ──► tokio task ──► dev.read/write/...
//!      ▲                                                              │
//!      └──────────────────────── reply (fuser Reply, Send) ◄──────────┘
//! ```
//!
//! Semantics of the file:
//! - size: the device size at mount, then whatever [`FuseFile::set_size`] says;
//! - reads past the end are short (0 bytes at or past it), like any regular file;
//! - writes that would end past the end fail with EFBIG, never a short write;
//! - unaligned reads read the covering blocks; unaligned writes (a `dd bs=512`, a
//!   `cat >`) are read-modify-write under an exclusive lock, while aligned writes,
//!   trims and zeroings share that lock, so an RMW never loses a concurrent aligned
//!   write to the same block;
//! - fsync, fsyncdir and flush (close) call `dev.flush()` — the durability chain
//!   described in the crate docs; they never answer ENOSYS;
//! - fallocate PUNCH_HOLE|KEEP_SIZE trims, ZERO_RANGE writes zeroes, anything else is
//!   EOPNOTSUPP; truncation to another size is EPERM (the size belongs to the volume).

use std::cell::Cell;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ballast_blockdev::{BlockDev, BlockError};
use bytes::{Bytes, BytesMut};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, Notifier, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tokio::sync::RwLock;
use tracing::{debug, debug_span, info, warn, Instrument};

use crate::{AttachError, Result};

/// The name of the one file under the mount point.
pub const FILE_NAME: &str = "volume";

const ROOT_INO: INodeNo = INodeNo::ROOT;
const FILE_INO: INodeNo = INodeNo(2);
/// How long the kernel may cache attributes and the directory entry. The size changes
/// only through `set_size`, which invalidates the cache explicitly; the TTL only bounds
/// staleness should an invalidation be lost.
const ATTR_TTL: Duration = Duration::from_secs(1);
/// FUSE reader threads per mount (each with its own cloned /dev/fuse descriptor).
const READER_THREADS: usize = 2;
/// Requests the kernel keeps in flight in the background (async direct I/O from the
/// loop device counts here). The kernel default (12) would cap the queue depth.
const MAX_BACKGROUND: u16 = 128;

// fallocate(2) modes (include/uapi/linux/falloc.h).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// A mounted FUSE file system exposing one block device as `<mountpoint>/volume`.
/// Dropping it unmounts (best effort; see [`FuseFile::unmount`]).
pub struct FuseFile {
    mountpoint: PathBuf,
    file: PathBuf,
    size: Arc<AtomicU64>,
    block_size: u32,
    dev_size: Box<dyn Fn() -> u64 + Send + Sync>,
    notifier: Notifier,
    session: Option<BackgroundSession>,
}

impl std::fmt::Debug for FuseFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseFile")
            .field("file", &self.file)
            .field("size", &self.size.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl FuseFile {
    /// Mounts a FUSE file system at `mountpoint` (created if missing) whose one file
    /// has the contents of `dev`. Requests run as tasks on `rt`. Blocks until the
    /// kernel has finished the FUSE handshake. As root this uses mount(2) directly;
    /// otherwise fuser falls back to the fusermount3 helper.
    pub fn mount<D: BlockDev>(dev: Arc<D>, mountpoint: &Path, rt: Handle) -> Result<FuseFile> {
        let mount_err = |source| AttachError::FuseMount { mountpoint: mountpoint.to_path_buf(), source };
        let block_size = dev.block_size();
        let size = dev.size();
        if !block_size.is_power_of_two() || block_size < 512 || !size.is_multiple_of(u64::from(block_size)) {
            return Err(AttachError::InvalidSize {
                size,
                reason: format!("device block size {block_size} is not a power of two ≥ 512 dividing its size"),
            });
        }
        std::fs::create_dir_all(mountpoint).map_err(mount_err)?;
        let mountpoint = mountpoint.canonicalize().map_err(mount_err)?;
        let size = Arc::new(AtomicU64::new(size));
        let inner = Arc::new(Inner {
            dev: dev.clone(),
            size: size.clone(),
            block_size: u64::from(block_size),
            max_request: u64::from(dev.max_request() / block_size * block_size).max(u64::from(block_size)),
            rmw: RwLock::new(()),
            uid: nix_uid(),
            gid: nix_gid(),
            born: SystemTime::now(),
        });
        let fs = VolumeFs { inner, rt };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("ballast".into()),
            MountOption::Subtype("ballast".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(READER_THREADS);
        config.clone_fd = true;
        let session = fuser::Session::new(fs, &mountpoint, &config).map_err(mount_err)?;
        let session = session.spawn().map_err(mount_err)?;
        let notifier = session.notifier();
        let file = mountpoint.join(FILE_NAME);
        info!(file = %file.display(), size = size.load(Ordering::Acquire), "fuse volume file mounted");
        Ok(FuseFile {
            mountpoint,
            file,
            size,
            block_size,
            dev_size: Box::new(move || dev.size()),
            notifier,
            session: Some(session),
        })
    }

    /// The path of the volume file (`<mountpoint>/volume`).
    pub fn file_path(&self) -> PathBuf {
        self.file.clone()
    }

    /// The (canonical) mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The file's current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Changes the file's size, after the device has been resized (it must be at most
    /// the device's size and a multiple of its block size). The kernel's cached size is
    /// invalidated and refreshed before this returns, so a following
    /// [`LoopDevice::set_capacity`](crate::LoopDevice::set_capacity) sees the new size.
    /// Blocks briefly (one stat of the file, served by this file system's threads).
    pub fn set_size(&self, bytes: u64) -> Result<()> {
        let bs = u64::from(self.block_size);
        if !bytes.is_multiple_of(bs) {
            return Err(AttachError::InvalidSize { size: bytes, reason: format!("not a multiple of {bs}") });
        }
        let dev = (self.dev_size)();
        if bytes > dev {
            return Err(AttachError::InvalidSize { size: bytes, reason: format!("larger than the device ({dev})") });
        }
        let old = self.size.swap(bytes, Ordering::AcqRel);
        // offset -1: attributes only, there is no page cache to drop (direct I/O).
        match self.notifier.inval_inode(FILE_INO, -1, 0) {
            Ok(()) => {}
            // The kernel has not looked the file up yet: nothing cached to invalidate.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(AttachError::Io { op: "invalidate cached size of", path: self.file.clone(), source })
            }
        }
        // A stat makes the kernel fetch the new attributes now, updating its i_size.
        let seen = std::fs::metadata(&self.file)
            .map_err(|source| AttachError::Io { op: "stat", path: self.file.clone(), source })?
            .len();
        info!(file = %self.file.display(), old, new = bytes, seen, "fuse volume file resized");
        Ok(())
    }

    /// Unmounts the file system and waits for its threads. Refuses while a loop
    /// device still uses the file ([`AttachError::FileInUse`]; the value is then
    /// dropped, and Drop detaches it lazily). EBUSY is retried for up to 10 s (a loop
    /// device being torn down may still hold the file); after that the mount is
    /// detached lazily (MNT_DETACH): the path disappears at once and the server keeps
    /// answering until the kernel's last user lets go, then ends. Either way no
    /// request in flight is lost: the device lives as long as the server does.
    pub fn unmount(mut self) -> Result<()> {
        let users = crate::find_by_backing_file(&self.file)?;
        if !users.is_empty() {
            return Err(AttachError::FileInUse { file: self.file.clone(), devices: users });
        }
        self.unmount_inner(true)
    }

    /// `wait_busy`: retry EBUSY for 10 s before detaching lazily; otherwise detach
    /// lazily at the first EBUSY.
    fn unmount_inner(&mut self, wait_busy: bool) -> Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let mp = self.mountpoint.clone();
        let err = |source| AttachError::FuseUnmount { mountpoint: mp.clone(), source };
        let mut lazy = false;
        let mut attempt = 0u32;
        loop {
            match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
                Ok(()) => break,
                // Not mounted any more (someone unmounted it): the session has ended or will.
                Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
                Err(nix::errno::Errno::EBUSY) if wait_busy && attempt < 100 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(nix::errno::Errno::EBUSY) => {
                    warn!(mountpoint = %self.mountpoint.display(), waited = wait_busy, "fuse mount busy; detaching lazily");
                    nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                        .map_err(|e| err(io::Error::from(e)))?;
                    lazy = true;
                    break;
                }
                Err(e) => {
                    // Still mounted: keep the session so Drop (or a retry) can finish the job.
                    self.session = Some(session);
                    return Err(err(io::Error::from(e)));
                }
            }
        }
        if lazy {
            // The reader threads end when the kernel drops the connection; joining here
            // could block for as long as some process keeps the file open.
            let name = format!("ballast-fuse-reaper:{}", self.mountpoint.display());
            let spawned = std::thread::Builder::new().name(name).spawn(move || {
                if let Err(e) = session.join() {
                    warn!(error = %e, "fuse session ended with an error");
                }
            });
            if let Err(e) = spawned {
                warn!(error = %e, "could not spawn the fuse reaper thread; the session is left running");
            }
        } else {
            // Unmounted: the kernel aborted the connection, so the readers see ENODEV and stop.
            session.join().map_err(err)?;
            info!(mountpoint = %self.mountpoint.display(), "fuse volume file unmounted");
        }
        Ok(())
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        if self.session.is_some() {
            // A file still backing a loop device would stay busy: do not wait for it.
            let in_use = crate::find_by_backing_file(&self.file).map(|d| !d.is_empty()).unwrap_or(false);
            if let Err(e) = self.unmount_inner(!in_use) {
                warn!(error = %e, "unmounting the fuse volume file on drop failed");
            }
        }
    }
}

fn nix_uid() -> u32 {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    unsafe { libc::getuid() }
}

fn nix_gid() -> u32 {
    // SAFETY: as above.
    unsafe { libc::getgid() }
}

/// Marks each FUSE reader thread as an I/O flusher the first time it serves a request
/// (fuser spawns the threads itself, so there is no start hook).
fn mark_reader_thread() {
    thread_local!(static MARKED: Cell<bool> = const { Cell::new(false) });
    MARKED.with(|m| {
        if !m.get() {
            m.set(true);
            if let Err(e) = crate::set_io_flusher() {
                debug!(error = %e, "PR_SET_IO_FLUSHER failed on a fuse reader thread");
            }
        }
    });
}

/// The device and the file's geometry, shared by the request tasks.
struct Inner<D> {
    dev: Arc<D>,
    size: Arc<AtomicU64>,
    block_size: u64,
    /// Largest piece handed to the device in one call (its max_request, in blocks).
    max_request: u64,
    /// Shared by aligned writes, trims and zeroings; exclusive for read-modify-write.
    rmw: RwLock<()>,
    uid: u32,
    gid: u32,
    born: SystemTime,
}

fn errno(e: &BlockError) -> Errno {
    Errno::from_i32(e.errno())
}

impl<D: BlockDev> Inner<D> {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT_INO {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            (FileType::RegularFile, 0o600, self.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            crtime: self.born,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.block_size as u32,
            flags: 0,
        }
    }

    fn aligned(&self, v: u64) -> bool {
        v.is_multiple_of(self.block_size)
    }

    fn round_down(&self, v: u64) -> u64 {
        v - v % self.block_size
    }

    fn round_up(&self, v: u64) -> u64 {
        v.div_ceil(self.block_size) * self.block_size
    }

    /// Reads aligned `[offset, end)` in pieces of at most `max_request`.
    async fn read_aligned(&self, offset: u64, end: u64) -> std::result::Result<Bytes, BlockError> {
        if end - offset <= self.max_request {
            return self.dev.read(offset, (end - offset) as u32).await;
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(self.max_request);
            out.extend_from_slice(&self.dev.read(at, n as u32).await?);
            at += n;
        }
        Ok(out.freeze())
    }

    /// A file read: short at the end of the file, any alignment.
    async fn read(&self, offset: u64, len: u32) -> std::result::Result<Bytes, Errno> {
        let size = self.size();
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.saturating_add(u64::from(len)).min(size);
        let (start, stop) = (self.round_down(offset), self.round_up(end));
        let data = self.read_aligned(start, stop).await.map_err(|e| errno(&e))?;
        if data.len() as u64 != stop - start {
            return Err(Errno::EIO);
        }
        Ok(data.slice((offset - start) as usize..(end - start) as usize))
    }

    /// A file write: all of it or an error (EFBIG past the end).
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> std::result::Result<u32, Errno> {
        let len = data.len() as u64;
        if len == 0 {
            return Ok(0);
        }
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        if end > self.size() {
            return Err(Errno::EFBIG);
        }
        if self.aligned(offset) && self.aligned(len) {
            let _shared = self.rmw.read().await;
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(self.max_request);
                let piece = data.slice(at as usize..(at + n) as usize);
                self.dev.write(offset + at, piece, fua).await.map_err(|e| errno(&e))?;
                at += n;
            }
        } else {
            let _exclusive = self.rmw.write().await;
            self.read_modify_write(offset, Some(&data), fua).await?;
        }
        Ok(len as u32)
    }

    /// Replaces `[offset, offset + len)` inside the covering blocks with `data` (or
    /// zeroes). The caller holds the exclusive RMW lock.
    async fn read_modify_write(&self, offset: u64, data: Option<&[u8]>, fua: bool) -> std::result::Result<(), Errno> {
        debug!(offset, "read-modify-write");
        let len = data.map_or(0, |d| d.len() as u64);
        let (start, stop) = (self.round_down(offset), self.round_up(offset + len));
        let old = self.read_aligned(start, stop).await.map_err(|e| errno(&e))?;
        let mut buf = BytesMut::from(&old[..]);
        if buf.len() as u64 != stop - start {
            return Err(Errno::EIO);
        }
        let at = (offset - start) as usize;
        if let Some(d) = data {
            buf[at..at + d.len()].copy_from_slice(d);
        }
        let buf = buf.freeze();
        let mut done = 0u64;
        while done < stop - start {
            let n = (stop - start - done).min(self.max_request);
            let piece = buf.slice(done as usize..(done + n) as usize);
            self.dev.write(start + done, piece, fua).await.map_err(|e| errno(&e))?;
            done += n;
        }
        Ok(())
    }

    /// Zeroes `[offset, offset + len)` of any alignment inside the covering blocks.
    async fn zero_partial(&self, offset: u64, len: u64) -> std::result::Result<(), Errno> {
        let zeroes = vec![0u8; len as usize];
        self.read_modify_write(offset, Some(&zeroes), false).await
    }

    async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> std::result::Result<(), Errno> {
        let trim = match mode {
            m if m == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE => true,
            m if m & !FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE => false,
            _ => return Err(Errno::EOPNOTSUPP),
        };
        let size = self.size();
        let mut end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        if end > size {
            if mode & FALLOC_FL_KEEP_SIZE == 0 {
                return Err(Errno::EFBIG);
            }
            end = size;
        }
        if offset >= end {
            return Ok(());
        }
        let (mid_start, mid_end) = (self.round_up(offset), self.round_down(end));
        if mid_start >= mid_end {
            // Within one block (or two partial ones): zero the bytes.
            let _exclusive = self.rmw.write().await;
            return self.zero_partial(offset, end - offset).await;
        }
        let partial = offset != mid_start || end != mid_end;
        let _guard = if partial { Err(self.rmw.write().await) } else { Ok(self.rmw.read().await) };
        if offset < mid_start {
            self.zero_partial(offset, mid_start - offset).await?;
        }
        let mut at = mid_start;
        while at < mid_end {
            let n = (mid_end - at).min(self.max_request);
            let res = if trim { self.dev.trim(at, n).await } else { self.dev.write_zeroes(at, n, false).await };
            res.map_err(|e| errno(&e))?;
            at += n;
        }
        if end > mid_end {
            self.zero_partial(mid_end, end - mid_end).await?;
        }
        Ok(())
    }
}

/// The fuser file system: inode 1 is the root directory, inode 2 the volume file.
struct VolumeFs<D> {
    inner: Arc<Inner<D>>,
    rt: Handle,
}

impl<D: BlockDev> VolumeFs<D> {
    /// Runs a flush on the runtime and replies when it is done. Every path that the
    /// kernel uses for durability (fsync, fsyncdir, flush on close) goes through here.
    fn flush_reply(&self, what: &'static str, reply: ReplyEmpty) {
        mark_reader_thread();
        let inner = self.inner.clone();
        let span = debug_span!("fuse_req", op = what);
        self.rt.spawn(
            async move {
                match inner.dev.flush().await {
                    Ok(()) => {
                        debug!("done");
                        reply.ok()
                    }
                    Err(e) => {
                        debug!(error = %e, "failed");
                        reply.error(errno(&e))
                    }
                }
            }
            .instrument(span),
        );
    }
}

impl<D: BlockDev> Filesystem for VolumeFs<D> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Async direct I/O lets the loop driver keep many requests in flight. Not having
        // it costs parallelism, not correctness.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            warn!(?missing, "kernel lacks FUSE_ASYNC_DIO; direct I/O to the volume file is serialised");
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        // Never FUSE_WRITEBACK_CACHE: see the durability invariant in the crate docs.
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT_INO && name == OsStr::new(FILE_NAME) {
            reply.entry(&ATTR_TTL, &self.inner.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == ROOT_INO || ino == FILE_INO {
            reply.attr(&ATTR_TTL, &self.inner.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != ROOT_INO && ino != FILE_INO {
            return reply.error(Errno::ENOENT);
        }
        // The size belongs to the volume (an O_TRUNC open or a `dd` without
        // conv=notrunc must not look like it wiped the volume); owner and mode are
        // fixed. Timestamps are accepted and ignored so `touch` works.
        let current = self.inner.attr(ino);
        if size.is_some_and(|s| s != current.size) || mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&ATTR_TTL, &current);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        // DIRECT_IO: no page cache (no double buffering, nothing acknowledged from a
        // cache). PARALLEL_DIRECT_WRITES: the kernel does not serialise writes on the
        // inode lock.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        mark_reader_thread();
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let inner = self.inner.clone();
        let span = debug_span!("fuse_req", op = "read", offset, len = size);
        self.rt.spawn(
            async move {
                match inner.read(offset, size).await {
                    Ok(data) => {
                        debug!(got = data.len(), "done");
                        reply.data(&data)
                    }
                    Err(e) => {
                        debug!(errno = ?e, "failed");
                        reply.error(e)
                    }
                }
            }
            .instrument(span),
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        mark_reader_thread();
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        // O_SYNC / O_DSYNC opens ask for every write to be durable when it returns.
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        // The one copy on the write path: fuser's buffer is reused for the next request.
        let data = Bytes::copy_from_slice(data);
        let inner = self.inner.clone();
        let span = debug_span!("fuse_req", op = "write", offset, len = data.len(), fua);
        self.rt.spawn(
            async move {
                match inner.write(offset, data, fua).await {
                    Ok(n) => {
                        debug!("done");
                        reply.written(n)
                    }
                    Err(e) => {
                        debug!(errno = ?e, "failed");
                        reply.error(e)
                    }
                }
            }
            .instrument(span),
        );
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.flush_reply("flush", reply);
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.flush_reply("fsync", reply);
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.flush_reply("fsyncdir", reply);
    }

    /// No extended attributes. ENOSYS (not ENODATA) on purpose: the kernel then
    /// remembers that this file system has none and stops asking, instead of a
    /// `security.capability` lookup before every write.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            // The offset passed back is that of the next entry.
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.inner.size() / self.inner.block_size;
        let bs = self.inner.block_size as u32;
        reply.statfs(blocks, 0, 0, 2, 0, bs, 255, bs);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        mark_reader_thread();
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let inner = self.inner.clone();
        let span = debug_span!("fuse_req", op = "fallocate", offset, len = length, mode);
        self.rt.spawn(
            async move {
                match inner.fallocate(offset, length, mode).await {
                    Ok(()) => {
                        debug!("done");
                        reply.ok()
                    }
                    Err(e) => {
                        debug!(errno = ?e, "failed");
                        reply.error(e)
                    }
                }
            }
            .instrument(span),
        );
    }
}
