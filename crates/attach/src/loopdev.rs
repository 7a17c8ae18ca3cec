//! [`LoopDevice`]: a file attached as /dev/loopN through the loop ioctls (no losetup).
//!
//! Attach: LOOP_CTL_GET_FREE on /dev/loop-control names a free device; LOOP_CONFIGURE
//! binds the file with its block size and flags in one call (Linux 5.8+), or, where
//! that ioctl is unknown (ENOTTY/EINVAL on old kernels), LOOP_SET_FD +
//! LOOP_SET_STATUS64 + LOOP_SET_BLOCK_SIZE + LOOP_SET_DIRECT_IO. Two attachers can be
//! handed the same free device; the loser's bind fails with EBUSY and it asks again.
//!
//! Every device is LO_FLAGS_AUTOCLEAR: the kernel unbinds it when its last opener
//! closes it. A [`LoopDevice`] holds the device open, so the device lives at least as
//! long as the value, and as long after as a mount (or another opener) uses it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::{AttachError, Result};

// ioctl numbers (include/uapi/linux/loop.h): _IO(0x4C, n) has no size or direction bits.
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

// lo_flags.
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` (include/uapi/linux/loop.h), 232 bytes, no padding:
///
/// | offset | field               | width |
/// |--------|---------------------|-------|
/// | 0      | lo_device           | u64   |
/// | 8      | lo_inode            | u64   |
/// | 16     | lo_rdevice          | u64   |
/// | 24     | lo_offset           | u64   |
/// | 32     | lo_sizelimit        | u64 (0 = whole file) |
/// | 40     | lo_number           | u32   |
/// | 44     | lo_encrypt_type     | u32   |
/// | 48     | lo_encrypt_key_size | u32   |
/// | 52     | lo_flags            | u32   |
/// | 56     | lo_file_name        | [u8; 64] |
/// | 120    | lo_crypt_name       | [u8; 64] |
/// | 184    | lo_encrypt_key      | [u8; 32] |
/// | 216    | lo_init             | [u64; 2] |
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`, 304 bytes: `fd: u32` at 0, `block_size: u32` at 4,
/// `info: loop_info64` at 8, `__reserved: [u64; 8]` at 240 (must be zero).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopInfo64 {
    fn new(flags: u32, file: &Path) -> Self {
        let mut name = [0u8; LO_NAME_SIZE];
        // Informational only (shown by losetup); truncated, NUL-terminated.
        let bytes = file.as_os_str().as_encoded_bytes();
        let n = bytes.len().min(LO_NAME_SIZE - 1);
        name[..n].copy_from_slice(&bytes[..n]);
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// How to attach.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// Logical block size of the device. Default: 4096 (the volume's block size).
    pub block_size: u32,
    /// Ask for direct I/O to the backing file (no page cache in between). Default: true.
    pub direct_io: bool,
    /// Attach read-only. Default: false.
    pub read_only: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions { block_size: 4096, direct_io: true, read_only: false }
    }
}

/// Times a bind is retried after another attacher took the free device first.
const BIND_ATTEMPTS: u32 = 32;

/// An attached loop device, held open. Dropping it closes the descriptor: the
/// device is then unbound by the kernel (autoclear) once no mount or process uses it.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    number: u32,
    backing: PathBuf,
    fd: File,
}

fn ioctl(fd: &File, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: `req` is one of the loop ioctls above; `arg` is either an integer or a
    // pointer to a live, correctly laid out struct owned by the caller for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl LoopDevice {
    /// Attaches `file` to a free loop device.
    pub fn attach(file: &Path, opts: &LoopOptions) -> Result<LoopDevice> {
        let io_err = |op, source| AttachError::Io { op, path: file.to_path_buf(), source };
        let backing = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(file)
            .map_err(|e| io_err("open backing file", e))?;
        let backing_path = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
        let ctl_path = Path::new("/dev/loop-control");
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(ctl_path)
            .map_err(|e| io_err("open /dev/loop-control for", e))?;
        let mut flags = LO_FLAGS_AUTOCLEAR;
        if opts.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        if opts.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        for attempt in 1..=BIND_ATTEMPTS {
            let number = ioctl(&ctl, LOOP_CTL_GET_FREE, 0).map_err(|e| AttachError::Loop {
                op: "LOOP_CTL_GET_FREE",
                device: ctl_path.to_path_buf(),
                source: e,
            })? as u32;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let dev = match open_loop_node(&path, opts.read_only) {
                Ok(dev) => dev,
                // udev / devtmpfs may lag a freshly created device, or it was removed again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    debug!(device = %path.display(), attempt, "loop device node not there yet; retrying");
                    std::thread::sleep(Duration::from_millis(10 * u64::from(attempt)));
                    continue;
                }
                Err(source) => return Err(AttachError::Loop { op: "open", device: path, source }),
            };
            match bind(&dev, &backing, &backing_path, flags, opts) {
                Ok(()) => {
                    let ld = LoopDevice { path, number, backing: backing_path, fd: dev };
                    info!(device = %ld.path.display(), file = %ld.backing.display(), direct_io = ld.direct_io(), "loop device attached");
                    return Ok(ld);
                }
                Err((_, e)) if e.raw_os_error() == Some(libc::EBUSY) => {
                    debug!(device = %path.display(), attempt, "loop device taken by another attacher; retrying");
                    continue;
                }
                Err((op, source)) => return Err(AttachError::Loop { op, device: path, source }),
            }
        }
        Err(AttachError::NoFreeLoop { backing: backing_path, attempts: BIND_ATTEMPTS })
    }

    /// Opens an already attached `/dev/loopN` (e.g. one [`find_by_backing_file`]
    /// found after a crash), so it can be [`detach`](LoopDevice::detach)ed or resized.
    pub fn open(device: &Path) -> Result<LoopDevice> {
        let bad = |source| AttachError::Loop { op: "open", device: device.to_path_buf(), source };
        let number = device
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| bad(io::Error::new(io::ErrorKind::InvalidInput, "not a /dev/loopN path")))?;
        let backing = read_sys(number, "backing_file").ok_or_else(|| {
            bad(io::Error::new(io::ErrorKind::NotFound, "no backing file: the device is not attached"))
        })?;
        let backing = PathBuf::from(backing.strip_suffix(" (deleted)").unwrap_or(&backing));
        let fd = open_loop_node(device, false).map_err(bad)?;
        Ok(LoopDevice { path: device.to_path_buf(), number, backing, fd })
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// N in `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The backing file, as it was attached.
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// Whether the kernel does direct I/O to the backing file (it may decline the
    /// request, e.g. for a file system without O_DIRECT).
    pub fn direct_io(&self) -> bool {
        read_sys(self.number, "dio").is_some_and(|s| s == "1")
    }

    /// The device's size in bytes, as the kernel sees it.
    pub fn size(&self) -> Result<u64> {
        let sectors = std::fs::read_to_string(format!("/sys/block/loop{}/size", self.number))
            .map_err(|source| AttachError::Loop { op: "read size", device: self.path.clone(), source })?;
        let sectors: u64 = sectors.trim().parse().map_err(|_| AttachError::Loop {
            op: "parse size",
            device: self.path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, format!("{sectors:?}")),
        })?;
        Ok(sectors * 512)
    }

    /// Re-reads the backing file's size (LOOP_SET_CAPACITY): call after the file grew.
    pub fn set_capacity(&self) -> Result<()> {
        ioctl(&self.fd, LOOP_SET_CAPACITY, 0).map_err(|source| AttachError::Loop {
            op: "LOOP_SET_CAPACITY",
            device: self.path.clone(),
            source,
        })?;
        info!(device = %self.path.display(), size = self.size().ok(), "loop device capacity updated");
        Ok(())
    }

    /// Unbinds the device (LOOP_CLR_FD) and closes it. If something else still has it
    /// open (a mount, udev probing), the kernel unbinds it at that last close; this
    /// waits up to 10 s for that, then returns [`AttachError::LoopBusy`] (the device
    /// stays marked to clear itself).
    pub fn detach(self) -> Result<()> {
        let LoopDevice { path, number, backing, fd } = self;
        match ioctl(&fd, LOOP_CLR_FD, 0) {
            Ok(_) => {}
            // Already unbound.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(source) => return Err(AttachError::Loop { op: "LOOP_CLR_FD", device: path, source }),
        }
        drop(fd);
        for _ in 0..200 {
            if !is_bound_to(number, &backing) {
                info!(device = %path.display(), "loop device detached");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        warn!(device = %path.display(), "loop device still in use after detach");
        Err(AttachError::LoopBusy { device: path })
    }
}

fn open_loop_node(path: &Path, read_only: bool) -> io::Result<File> {
    let f = OpenOptions::new().read(true).write(!read_only).custom_flags(libc::O_CLOEXEC).open(path)?;
    if !f.metadata()?.file_type().is_block_device() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a block device"));
    }
    Ok(f)
}

/// Binds `backing` to the open loop device. The error names the ioctl that failed.
fn bind(
    dev: &File,
    backing: &File,
    backing_path: &Path,
    flags: u32,
    opts: &LoopOptions,
) -> std::result::Result<(), (&'static str, io::Error)> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: opts.block_size,
        info: LoopInfo64::new(flags, backing_path),
        reserved: [0; 8],
    };
    match ioctl(dev, LOOP_CONFIGURE, &config as *const LoopConfig as libc::c_ulong) {
        Ok(_) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
            debug!(error = %e, "LOOP_CONFIGURE unsupported; falling back to LOOP_SET_FD");
        }
        Err(e) => return Err(("LOOP_CONFIGURE", e)),
    }
    ioctl(dev, LOOP_SET_FD, backing.as_raw_fd() as libc::c_ulong).map_err(|e| ("LOOP_SET_FD", e))?;
    // From here the device is bound: undo on failure so it does not leak.
    let rest = (|| {
        // SET_STATUS64 may change only AUTOCLEAR and PARTSCAN; READ_ONLY came from the
        // descriptor's mode, DIRECT_IO has its own ioctl.
        let info = LoopInfo64::new(flags & LO_FLAGS_AUTOCLEAR, backing_path);
        ioctl(dev, LOOP_SET_STATUS64, &info as *const LoopInfo64 as libc::c_ulong)
            .map_err(|e| ("LOOP_SET_STATUS64", e))?;
        ioctl(dev, LOOP_SET_BLOCK_SIZE, libc::c_ulong::from(opts.block_size))
            .map_err(|e| ("LOOP_SET_BLOCK_SIZE", e))?;
        if opts.direct_io {
            if let Err(e) = ioctl(dev, LOOP_SET_DIRECT_IO, 1) {
                // The kernel may refuse direct I/O for this file; buffered I/O still works.
                warn!(error = %e, "loop direct I/O refused; using buffered I/O");
            }
        }
        Ok(())
    })();
    if rest.is_err() {
        let _ = ioctl(dev, LOOP_CLR_FD, 0);
    }
    rest
}

fn read_sys(number: u32, attr: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/loop{number}/loop/{attr}")).ok().map(|s| s.trim_end().to_string())
}

/// Whether loopN is still bound to `backing` (its sysfs `loop/` directory exists while
/// it is bound to anything at all).
fn is_bound_to(number: u32, backing: &Path) -> bool {
    read_sys(number, "backing_file").is_some_and(|b| same_backing(&b, backing))
}

fn same_backing(sys: &str, file: &Path) -> bool {
    // The kernel appends " (deleted)" once the file is unlinked.
    let sys = sys.strip_suffix(" (deleted)").unwrap_or(sys);
    Path::new(sys) == file
}

/// The loop devices (`/dev/loopN`) bound to `file`, from
/// `/sys/block/loop*/loop/backing_file`: what is left to clean up after a crash.
pub fn find_by_backing_file(file: &Path) -> Result<Vec<PathBuf>> {
    // A dead FUSE mount fails canonicalize (ENOTCONN); compare as given then.
    let file = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
    let dir = Path::new("/sys/block");
    let entries =
        std::fs::read_dir(dir).map_err(|source| AttachError::Io { op: "list", path: dir.to_path_buf(), source })?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(|s| s.strip_prefix("loop")).and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if is_bound_to(n, &file) {
            found.push(PathBuf::from(format!("/dev/loop{n}")));
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn loop_structs_match_the_kernel_layout() {
        assert_eq!(size_of::<LoopInfo64>(), 232);
        assert_eq!(offset_of!(LoopInfo64, lo_offset), 24);
        assert_eq!(offset_of!(LoopInfo64, lo_sizelimit), 32);
        assert_eq!(offset_of!(LoopInfo64, lo_number), 40);
        assert_eq!(offset_of!(LoopInfo64, lo_flags), 52);
        assert_eq!(offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(offset_of!(LoopInfo64, lo_crypt_name), 120);
        assert_eq!(offset_of!(LoopInfo64, lo_encrypt_key), 184);
        assert_eq!(offset_of!(LoopInfo64, lo_init), 216);
        assert_eq!(size_of::<LoopConfig>(), 304);
        assert_eq!(offset_of!(LoopConfig, block_size), 4);
        assert_eq!(offset_of!(LoopConfig, info), 8);
        assert_eq!(offset_of!(LoopConfig, reserved), 240);
    }

    #[test]
    fn loop_info_golden_bytes() {
        let info = LoopInfo64::new(LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO, Path::new("/m/volume"));
        // SAFETY: LoopInfo64 is repr(C) plain data with no padding (checked above).
        let bytes: [u8; 232] = unsafe { std::mem::transmute(info) };
        let mut want = [0u8; 232];
        want[52..56].copy_from_slice(&20u32.to_ne_bytes());
        want[56..65].copy_from_slice(b"/m/volume");
        assert_eq!(bytes, want);
        // A name longer than the field is cut and stays NUL-terminated.
        let long = "x".repeat(100);
        let info = LoopInfo64::new(0, Path::new(&long));
        assert_eq!(info.lo_file_name[62], b'x');
        assert_eq!(info.lo_file_name[63], 0);
    }

    #[test]
    fn deleted_backing_files_still_match() {
        assert!(same_backing("/a/volume", Path::new("/a/volume")));
        assert!(same_backing("/a/volume (deleted)", Path::new("/a/volume")));
        assert!(!same_backing("/a/volume2", Path::new("/a/volume")));
    }
}
