//! ballast-attach: turns a Ballast volume into a real block device on a node, and the
//! filesystem helpers the CSI node service needs.
//!
//! ```text
//!   trait BlockDev (frontend::Volume, MemDev)
//!        │  async read / write / flush / trim / write_zeroes
//!        ▼
//!   FuseFile ── one regular file `<mountpoint>/volume`, served in process (fuser, no libfuse);
//!        │      each FUSE request runs as a tokio task; FOPEN_DIRECT_IO, no page cache
//!        ▼
//!   LoopDevice ── /dev/loopN over that file: 4096-byte sectors, direct I/O, autoclear
//!        │
//!        ▼
//!   fs:: mkfs / mount / grow / stats ── ext4 or xfs on /dev/loopN, bind mounts for pods
//! ```
//!
//! Where the kernel has the `nbd` module, [`nbd`] attaches a volume through NBD netlink
//! instead (the FUSE + loop layers are then not needed); this kernel-independent path
//! is FUSE + loop because both are everywhere.
//!
//! # Durability invariant (the flush path)
//!
//! A filesystem's `fsync` ends in a REQ_OP_FLUSH to /dev/loopN. The loop driver turns it
//! into `vfs_fsync` on the backing file, FUSE turns that into FUSE_FSYNC, and
//! [`FuseFile`] answers FUSE_FSYNC only after [`BlockDev::flush`](ballast_blockdev::BlockDev::flush) completed. Writes
//! with FUA are turned into write + flush by the block layer (loop advertises no FUA).
//! So a filesystem's fsync returns only after every write it covers is durable on the
//! replicas. Three things keep the chain intact and must not change:
//! - FUSE_FSYNC / FUSE_FLUSH / FUSE_FSYNCDIR are never answered with ENOSYS (the kernel
//!   would remember "no fsync" and turn every later fsync into a silent success);
//! - the FUSE connection never asks for FUSE_WRITEBACK_CACHE, and every open is
//!   FOPEN_DIRECT_IO, so no write is acknowledged from a kernel cache;
//! - a write is replied to only after `BlockDev::write` completed.
//!
//! # Memory-pressure deadlocks
//!
//! The threads that serve the FUSE file are in the writeback path of the filesystem
//! above it: if they block in reclaim waiting for that writeback, the node deadlocks.
//! FUSE reader threads mark themselves with PR_SET_IO_FLUSHER; the tokio runtime that
//! runs the requests should too: `Builder::on_thread_start(|| { let _ = set_io_flusher(); })`.
//!
//! # Threads
//!
//! [`FuseFile`] requests run on the tokio runtime handed to [`FuseFile::mount`]. The
//! blocking calls here — mount/unmount, [`LoopDevice::attach`]/[`LoopDevice::detach`]
//! (closing the loop's backing file sends FUSE_FLUSH back to this process), and all
//! of [`fs`] — must therefore not run on a worker thread of that runtime when it could
//! be the only free one: call them from `spawn_blocking`.
//!
//! # Mounting the FUSE file system
//!
//! fuser's pure-Rust mount path (no libfuse) opens /dev/fuse and calls mount(2)
//! itself; that is what runs as root (checked on this kernel). Without the
//! privilege it falls back to the fusermount3 helper.
//!
//! # Cleanup after a crash
//!
//! If the process dies, the FUSE connection dies with it: I/O on the loop device fails
//! and the FUSE mount point answers ENOTCONN. Loop devices are autoclear, so only those
//! still held by a mount remain. Clean up top-down: [`fs::unmount`] the filesystem
//! mounts (works on dead mounts), then [`find_by_backing_file`], [`LoopDevice::open`]
//! and [`LoopDevice::detach`] for any device left, then [`fs::unmount`] the FUSE mount
//! point.
//!
//! Must not depend on the control plane (no tonic, openraft, redb); knows volumes only
//! through [`BlockDev`](ballast_blockdev::BlockDev).

pub mod fs;
mod fuse;
mod loopdev;
pub mod nbd;

pub use fuse::{FuseFile, FILE_NAME};
pub use loopdev::{find_by_backing_file, LoopDevice, LoopOptions};

use std::io;
use std::path::PathBuf;

/// What failed while attaching, mounting or detaching, and on which path or device.
/// Grouped by what the caller can do: `Busy`-like variants may succeed on a retry
/// later; configuration variants never will; the rest carry the OS error.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("mounting the FUSE file system at {mountpoint}: {source}")]
    FuseMount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unmounting the FUSE file system at {mountpoint}: {source}")]
    FuseUnmount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("file {file} is still backing loop device(s) {devices:?}; detach them first")]
    FileInUse { file: PathBuf, devices: Vec<PathBuf> },
    #[error("size {size} is invalid: {reason}")]
    InvalidSize { size: u64, reason: String },
    #[error("loop device {device}: {op}: {source}")]
    Loop {
        op: &'static str,
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no free loop device for {backing} after {attempts} attempts (every candidate was taken)")]
    NoFreeLoop { backing: PathBuf, attempts: u32 },
    #[error("loop device {device} is still in use after detach; the kernel clears it when its last user closes it")]
    LoopBusy { device: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not run {tool} (is it installed?): {source}")]
    ToolMissing {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{tool} on {target} failed with {status}: {stderr}")]
    ToolFailed { tool: &'static str, target: PathBuf, status: String, stderr: String },
    #[error("mount {source_path} on {target} ({fstype}): {source}")]
    Mount {
        source_path: PathBuf,
        target: PathBuf,
        fstype: String,
        #[source]
        source: io::Error,
    },
    #[error("unmount {target}: {source}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unsupported filesystem type {0:?}: Ballast formats only ext4 and xfs")]
    UnsupportedFsType(String),
    #[error("malformed /proc/self/mountinfo line {line:?}")]
    MountInfo { line: String },
    #[error("kernel NBD is not available: {0}")]
    NbdUnavailable(String),
    #[error("NBD netlink {op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, AttachError>;

/// Marks the calling thread as an I/O flusher (PR_SET_IO_FLUSHER, Linux 5.6+): its
/// memory allocations do not recurse into filesystem writeback, which would wait on the
/// very requests the thread is serving. Call it from every thread that serves a
/// [`FuseFile`] or an NBD device, e.g. in the tokio runtime's `on_thread_start`.
/// Needs CAP_SYS_RESOURCE.
pub fn set_io_flusher() -> io::Result<()> {
    // PR_SET_IO_FLUSHER = 57 (include/uapi/linux/prctl.h), arg2 = 1 to set.
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
