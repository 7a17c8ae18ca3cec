//! Filesystem helpers for the CSI node service: probe, format, mount, bind mount,
//! unmount, grow and measure. The real tools (blkid, mkfs.*, resize2fs, xfs_growfs)
//! run as child processes; mounts are mount(2)/umount2(2) calls; mount state comes
//! from /proc/self/mountinfo.
//!
//! Nothing here is on the I/O path, but everything may block (child processes,
//! unmount retries): call it from `spawn_blocking` in async code.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::{AttachError, Result};

/// The filesystems Ballast formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// The name mount(2) and mkfs use.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = AttachError;

    /// Exactly `ext4` or `xfs` (a CSI fs_type); anything else, the empty string
    /// included, is [`AttachError::UnsupportedFsType`].
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(AttachError::UnsupportedFsType(other.to_string())),
        }
    }
}

/// Runs a tool to completion with no stdin; its stderr goes into the error.
fn run(tool: &'static str, cmd: &mut Command) -> Result<std::process::Output> {
    debug!(?cmd, "running");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| AttachError::ToolMissing { tool, source })?;
    Ok(out)
}

fn failed(tool: &'static str, target: &Path, out: &std::process::Output) -> AttachError {
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    AttachError::ToolFailed { tool, target: target.to_path_buf(), status: out.status.to_string(), stderr }
}

/// Whether `dev` carries no filesystem, RAID, LVM or partition-table signature
/// (`blkid -p`: exit 2 means nothing found). Ambiguous probes (several signatures)
/// count as not blank: the answer guards mkfs, so doubt means "do not format".
pub fn is_blank(dev: &Path) -> Result<bool> {
    let out = run("blkid", Command::new("blkid").arg("-p").arg("-o").arg("export").arg(dev))?;
    match out.status.code() {
        // A signature was found: a filesystem (TYPE=) or a partition table (PTTYPE=).
        Some(0) => {
            debug!(dev = %dev.display(), found = %String::from_utf8_lossy(&out.stdout).replace('\n', " "), "device is not blank");
            Ok(false)
        }
        Some(2) => Ok(true),
        // 8: ambivalent probing result (more than one signature).
        Some(8) => Ok(false),
        _ => Err(failed("blkid", dev, &out)),
    }
}

/// Formats `dev`. Discard at format time is off (`-E nodiscard` / `-K`): a fresh
/// volume already reads zeroes, and a whole-device trim would touch every chunk.
/// `extra` options come after the defaults, so they can override them. mkfs.xfs
/// refuses to overwrite an existing filesystem (no `-f`); mke2fs is run with `-F`
/// only because a whole device (not a partition) would otherwise make it ask — check
/// [`is_blank`] first.
pub fn mkfs(dev: &Path, fs: FsType, extra: &[&str]) -> Result<()> {
    let (tool, mut cmd) = match fs {
        FsType::Ext4 => {
            let mut c = Command::new("mkfs.ext4");
            c.args(["-F", "-q", "-E", "nodiscard"]);
            ("mkfs.ext4", c)
        }
        FsType::Xfs => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-K"]);
            ("mkfs.xfs", c)
        }
    };
    cmd.args(extra).arg(dev);
    let out = run(tool, &mut cmd)?;
    if !out.status.success() {
        return Err(failed(tool, dev, &out));
    }
    info!(dev = %dev.display(), fs = %fs, "filesystem created");
    Ok(())
}

/// The `-o` list for mount(8): the caller's options (comma lists allowed), and
/// `ro` when asked; `defaults`/`rw` and empty entries dropped.
fn option_list(options: &[&str], read_only: bool) -> String {
    let mut out: Vec<&str> = Vec::new();
    for o in options.iter().flat_map(|o| o.split(',')).map(str::trim) {
        if !o.is_empty() && o != "defaults" && o != "rw" && !out.contains(&o) {
            out.push(o);
        }
    }
    if read_only && !out.contains(&"ro") {
        out.push("ro");
    }
    out.join(",")
}

/// The options a mount of `fstype` always gets: for xfs, `nouuid`. A clone or
/// restore carries its source's filesystem UUID, and xfs refuses to mount a
/// second filesystem with a UUID already mounted on the node, so a pod that
/// uses a volume and its clone on one node would fail to start.
fn always(fstype: FsType) -> &'static [&'static str] {
    match fstype {
        FsType::Xfs => &["nouuid"],
        FsType::Ext4 => &[],
    }
}

// Mounts and unmounts run as mount(8)/umount(8) child processes, never as
// syscalls in this process. A filesystem on a FUSE-backed loop device does I/O
// to this very process while it mounts (xfs log recovery, ext4 journal replay)
// and unmounts (final writeback): if this process were killed while one of its
// own threads waits in the kernel for that I/O, the thread could never finish
// (its server is gone) and the process could never fully exit, so its
// /dev/fuse descriptors would stay open and the FUSE connection would never
// abort: an unkillable process and a hung device until someone writes to
// /sys/fs/fuse/connections/N/abort. A child waiting on that I/O holds no
// /dev/fuse descriptor (they are close-on-exec): when this process dies the
// connection aborts, the child's I/O fails and it exits.

/// Mounts filesystem `fstype` from `dev` on `target` (which must exist). `options`
/// are mount(8) options (`noatime`, `discard`, `nouuid`, comma lists allowed).
pub fn mount(dev: &Path, target: &Path, fstype: FsType, options: &[&str], read_only: bool) -> Result<()> {
    let all: Vec<&str> = options.iter().chain(always(fstype)).copied().collect();
    let opts = option_list(&all, read_only);
    let mut cmd = Command::new("mount");
    cmd.arg("-t").arg(fstype.as_str());
    if !opts.is_empty() {
        cmd.arg("-o").arg(&opts);
    }
    cmd.arg(dev).arg(target);
    let out = run("mount", &mut cmd)?;
    if !out.status.success() {
        return Err(failed("mount", target, &out));
    }
    info!(dev = %dev.display(), target = %target.display(), fs = %fstype, read_only, options = %opts, "mounted");
    Ok(())
}

/// Bind-mounts `src` on `target`. A missing target is created: a directory for a
/// directory source, an empty file otherwise (raw block volumes bind the device node
/// onto a file). Read-only takes a second, remounting step (a first bind ignores
/// `ro`); if that fails the bind is undone, never left writable.
///
/// A read-only bind of a device node does not stop writes to the device (I/O on
/// device nodes ignores the mount's flags): for a read-only raw block volume, bind a
/// loop device attached with [`LoopOptions::read_only`](crate::LoopOptions), whose
/// writes fail with EPERM.
pub fn bind_mount(src: &Path, target: &Path, read_only: bool) -> Result<()> {
    let io_err = |op, path: &Path, source| AttachError::Io { op, path: path.to_path_buf(), source };
    let meta = std::fs::metadata(src).map_err(|e| io_err("stat bind source", src, e))?;
    if std::fs::symlink_metadata(target).is_err() {
        if meta.is_dir() {
            std::fs::create_dir_all(target).map_err(|e| io_err("create bind target", target, e))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io_err("create bind target parent", parent, e))?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(target)
                .map_err(|e| io_err("create bind target", target, e))?;
        }
    }
    let out = run("mount", Command::new("mount").arg("--bind").arg(src).arg(target))?;
    if !out.status.success() {
        return Err(failed("mount", target, &out));
    }
    if read_only {
        let out = run("mount", Command::new("mount").args(["-o", "remount,bind,ro"]).arg(target))?;
        if !out.status.success() {
            // Never leave a writable bind where a read-only one was asked for.
            let _ = run("umount", Command::new("umount").arg("-l").arg(target));
            return Err(failed("mount", target, &out));
        }
    }
    info!(src = %src.display(), target = %target.display(), read_only, "bind mounted");
    Ok(())
}

/// How [`unmount`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Nothing was mounted there.
    NotMounted,
    /// Every mount stacked on the target was unmounted.
    Unmounted,
    /// Still busy after the retries: detached lazily (`umount -l`). The path is
    /// free, but the filesystem lives on until its last user closes it, and so
    /// does its device (a loop device then clears itself at that moment).
    Lazy,
}

/// Unmounts `target`, every mount stacked on it included. Not a mount point: Ok.
/// A busy target is retried for about 5 s, then detached lazily, as a last
/// resort (logged; see [`Unmounted::Lazy`]).
pub fn unmount(target: &Path) -> Result<Unmounted> {
    let mut outcome = Unmounted::NotMounted;
    // Bounded: each pass removes one mount; 64 stacked mounts means something is looping.
    for _ in 0..64 {
        if !is_mount_point(target)? {
            if outcome != Unmounted::NotMounted {
                info!(target = %target.display(), lazy = outcome == Unmounted::Lazy, "unmounted");
            }
            return Ok(outcome);
        }
        let mut busy_tries = 0;
        loop {
            let out = run("umount", Command::new("umount").arg(target))?;
            if out.status.success() {
                if outcome == Unmounted::NotMounted {
                    outcome = Unmounted::Unmounted;
                }
                break;
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("not mounted") || stderr.contains("no mount point") {
                // Gone between the check and the call.
                break;
            }
            if !stderr.contains("busy") {
                return Err(failed("umount", target, &out));
            }
            if busy_tries < 50 {
                busy_tries += 1;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            warn!(target = %target.display(), "still busy after 5 s; detaching lazily");
            let out = run("umount", Command::new("umount").arg("-l").arg(target))?;
            if !out.status.success() {
                return Err(failed("umount", target, &out));
            }
            outcome = Unmounted::Lazy;
            break;
        }
    }
    Err(AttachError::Unmount {
        target: target.to_path_buf(),
        source: io::Error::other("more than 64 mounts stacked on the target"),
    })
}

/// One line of /proc/self/mountinfo (proc(5)), paths unescaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u32,
    pub parent_id: u32,
    /// st_dev of the filesystem: (major, minor).
    pub dev: (u32, u32),
    /// The directory of the filesystem that forms this mount's root (not `/` for binds
    /// of a subdirectory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,noatime`).
    pub mount_options: String,
    pub fs_type: String,
    /// The mount source (`/dev/loop3`, `tmpfs`), or `none`.
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

/// Undoes mountinfo's escaping: space, tab, newline and backslash appear as `\ooo`
/// octal escapes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FromStr for MountInfo {
    type Err = AttachError;

    /// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:
    /// six fixed fields, optional fields up to `-`, then type, source, super options.
    fn from_str(line: &str) -> Result<Self> {
        let bad = || AttachError::MountInfo { line: line.to_string() };
        let mut it = line.split(' ');
        let mount_id = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let parent_id = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let dev = it
            .next()
            .and_then(|s| s.split_once(':'))
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(bad)?;
        let root = PathBuf::from(unescape(it.next().ok_or_else(bad)?));
        let mount_point = PathBuf::from(unescape(it.next().ok_or_else(bad)?));
        let mount_options = it.next().ok_or_else(bad)?.to_string();
        // Optional fields (shared:N, master:N, ...), then the separator.
        loop {
            match it.next() {
                Some("-") => break,
                Some(_) => {}
                None => return Err(bad()),
            }
        }
        let fs_type = unescape(it.next().ok_or_else(bad)?);
        let source = unescape(it.next().ok_or_else(bad)?);
        let super_options = it.next().unwrap_or("").to_string();
        Ok(MountInfo { mount_id, parent_id, dev, root, mount_point, mount_options, fs_type, source, super_options })
    }
}

/// Parses a whole mountinfo text.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>> {
    text.lines().filter(|l| !l.trim().is_empty()).map(str::parse).collect()
}

/// Every mount in this process's mount namespace, in mount order.
pub fn mounts() -> Result<Vec<MountInfo>> {
    let p = Path::new("/proc/self/mountinfo");
    let text =
        std::fs::read_to_string(p).map_err(|source| AttachError::Io { op: "read", path: p.to_path_buf(), source })?;
    parse_mountinfo(&text)
}

/// `path` made absolute and free of `.`/`..`/symlinks where possible. A path under a
/// dead FUSE mount cannot be canonicalized (ENOTCONN); it is normalised lexically.
fn normalize(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")).join(path)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The mount whose mount point is exactly `path` (the topmost, if several are
/// stacked), or None if `path` is not a mount point.
pub fn mount_point_of(path: &Path) -> Result<Option<MountInfo>> {
    let path = normalize(path);
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// Whether `path` is a mount point (from /proc/self/mountinfo: a bind mount of a file
/// or of a directory onto itself counts, which a st_dev comparison would miss).
pub fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(mount_point_of(path)?.is_some())
}

/// Grows a mounted filesystem to fill its (grown) device: `resize2fs DEV` for ext4
/// (online), `xfs_growfs MOUNT_POINT` for xfs.
pub fn grow(fs: FsType, dev: &Path, mount_point: &Path) -> Result<()> {
    let (tool, target, mut cmd) = match fs {
        FsType::Ext4 => {
            let mut c = Command::new("resize2fs");
            c.arg(dev);
            ("resize2fs", dev, c)
        }
        FsType::Xfs => {
            let mut c = Command::new("xfs_growfs");
            c.arg(mount_point);
            ("xfs_growfs", mount_point, c)
        }
    };
    let out = run(tool, &mut cmd)?;
    if !out.status.success() {
        let mut e = failed(tool, target, &out);
        if let AttachError::ToolFailed { stderr, .. } = &mut e {
            if fs == FsType::Ext4 && stderr.contains("Permission denied") {
                stderr.push_str(" (online ext4 resize needs CAP_SYS_RESOURCE)");
            }
        }
        return Err(e);
    }
    info!(fs = %fs, dev = %dev.display(), mount_point = %mount_point.display(), "filesystem grown");
    Ok(())
}

/// Space and inode usage of the filesystem holding `path` (CSI NodeGetVolumeStats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeStats {
    pub bytes_total: u64,
    pub bytes_used: u64,
    /// Available to unprivileged users (excludes the root reserve).
    pub bytes_available: u64,
    pub inodes_total: u64,
    pub inodes_used: u64,
    pub inodes_free: u64,
}

/// statvfs(3) of `path`.
pub fn stats(path: &Path) -> Result<VolumeStats> {
    let s = nix::sys::statvfs::statvfs(path).map_err(|e| AttachError::Io {
        op: "statvfs",
        path: path.to_path_buf(),
        source: io::Error::from(e),
    })?;
    let frsize = s.fragment_size() as u64;
    let blocks = s.blocks() as u64;
    let bfree = s.blocks_free() as u64;
    let files = s.files() as u64;
    let ffree = s.files_free() as u64;
    Ok(VolumeStats {
        bytes_total: blocks * frsize,
        bytes_used: blocks.saturating_sub(bfree) * frsize,
        bytes_available: s.blocks_available() as u64 * frsize,
        inodes_total: files,
        inodes_used: files.saturating_sub(ffree),
        inodes_free: ffree,
    })
}

/// Whether a program is on PATH (for callers and tests that need an optional tool).
pub fn have_tool(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(OsStr::new(name)).is_file()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_type_parsing() {
        assert_eq!("ext4".parse::<FsType>().ok(), Some(FsType::Ext4));
        assert_eq!("xfs".parse::<FsType>().ok(), Some(FsType::Xfs));
        for bad in ["", "EXT4", "ext3", "btrfs", " xfs", "xfs "] {
            let err = bad.parse::<FsType>().expect_err(bad);
            assert!(matches!(&err, AttachError::UnsupportedFsType(s) if s == bad), "{bad:?}: {err}");
            assert!(err.to_string().contains("only ext4 and xfs"), "{err}");
        }
        assert_eq!(FsType::Xfs.to_string(), "xfs");
    }

    #[test]
    fn mountinfo_lines_with_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    412 29 7:3 / /var/lib/kubelet/pods/a\\040b/vol\\011x\\012y\\134z rw,relatime shared:7 master:2 - xfs /dev/loop3 rw,attr2\n\
                    500 29 0:51 / /tmp/no\\040opt rw - fuse.ballast ballast rw,user_id=0\n";
        let m = parse_mountinfo(text).expect("parses");
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            MountInfo {
                mount_id: 36,
                parent_id: 35,
                dev: (98, 0),
                root: "/mnt1".into(),
                mount_point: "/mnt2".into(),
                mount_options: "rw,noatime".into(),
                fs_type: "ext3".into(),
                source: "/dev/root".into(),
                super_options: "rw,errors=continue".into(),
            }
        );
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/kubelet/pods/a b/vol\tx\ny\\z"));
        assert_eq!(m[1].dev, (7, 3));
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[2].mount_point, PathBuf::from("/tmp/no opt"));
        assert_eq!(m[2].fs_type, "fuse.ballast");
    }

    #[test]
    fn unescape_leaves_non_escapes_alone() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\9999"), "a\\9999");
        assert_eq!(unescape("trailing\\"), "trailing\\");
        assert_eq!(unescape("\\134\\134"), "\\\\");
    }

    #[test]
    fn malformed_mountinfo_is_an_error() {
        for bad in ["", "36 35 98:0 /a /b rw", "x 35 98:0 /a /b rw - ext4 /dev/x rw", "36 35 980 /a /b rw - ext4 s o"] {
            assert!(bad.parse::<MountInfo>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn this_process_mountinfo_parses_and_root_is_a_mount_point() {
        let all = mounts().expect("mountinfo");
        assert!(!all.is_empty());
        assert!(is_mount_point(Path::new("/")).expect("lookup"));
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_mount_point(dir.path()).expect("lookup"));
        // Lexical normalisation: `.` and `..` do not hide the root.
        assert!(is_mount_point(&dir.path().join("..").join("..").join("..").join("..").join("..")).expect("lookup"));
    }

    #[test]
    fn mount_options_become_one_list() {
        assert_eq!(
            option_list(&["noatime,discard", "nodev", "defaults", "nouuid"], false),
            "noatime,discard,nodev,nouuid"
        );
        assert_eq!(option_list(&[], true), "ro");
        assert_eq!(option_list(&["ro", "rw"], true), "ro");
        assert_eq!(option_list(&["nouuid,noatime", "nouuid"], false), "nouuid,noatime", "each once");
        assert_eq!((always(FsType::Xfs), always(FsType::Ext4)), (&["nouuid"][..], &[][..]));
    }
}
