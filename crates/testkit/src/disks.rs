//! Real disks for storage nodes that can fail on command: an ext4 filesystem
//! on a loop device, mounted where the node keeps its chunk store.
//!
//! - [`Disk::small`]: loop device over a sparse file. [`Disk::fill`] takes every
//!   free block with a filler file (the node's writes then get ENOSPC from the
//!   real filesystem); [`Disk::unfill`] removes it.
//! - [`Disk::faulty`]: the loop device sits on a file served by nbdfuse from an
//!   nbdkit server with the `error` filter, which fails every request with EIO
//!   while a trigger file exists ([`Disk::fail`], [`Disk::heal`]). ext4 sees
//!   real I/O errors from its block device, as from a dying drive: O_DIRECT
//!   I/O returns EIO, and a failed journal write aborts the journal (the
//!   filesystem turns read-only until it is unmounted).
//!
//! Teardown in `Drop` (also on a panic, and of a disk whose setup failed
//! halfway): unmount, detach the loop device, unmount the FUSE file, stop
//! nbdkit. Nothing is left mounted or attached.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{is_root, needs::have, run, run_ok, utf8, wait_every, Error, Result};

pub struct Disk {
    pub mountpoint: PathBuf,
    /// The loop device, once attached.
    loopdev: Option<String>,
    mounted: bool,
    image: PathBuf,
    filler: PathBuf,
    /// nbdkit, its trigger file and the nbdfuse mount dir (faulty disks only).
    faulty: Option<Faulty>,
}

struct Faulty {
    nbdkit: Child,
    nbdfuse: Option<Child>,
    fuse_dir: PathBuf,
    trigger: PathBuf,
}

/// Why these disks cannot be built here, if they cannot.
pub fn unavailable(faulty: bool) -> Option<String> {
    if !is_root() {
        return Some("needs root (loop devices, mount)".into());
    }
    let mut tools = vec!["losetup", "mkfs.ext4", "mount", "umount"];
    if faulty {
        tools.extend(["nbdkit", "nbdfuse", "fusermount3"]);
    }
    let missing: Vec<&str> = tools.into_iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        return Some(format!("missing tools {missing:?}"));
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control".into());
    }
    None
}

fn sparse_file(path: &Path, len: u64) -> Result<()> {
    let f = std::fs::File::create(path).map_err(Error::io(format!("create {}", path.display())))?;
    f.set_len(len).map_err(Error::io(format!("size {}", path.display())))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    wait_every(what, Duration::from_secs(20), Duration::from_millis(50), || Ok(f()))
}

impl Disk {
    fn new(dir: &Path, name: &str, mountpoint: &Path) -> Disk {
        Disk {
            mountpoint: mountpoint.into(),
            loopdev: None,
            mounted: false,
            image: dir.join(format!("{name}.img")),
            filler: mountpoint.join(".filler"),
            faulty: None,
        }
    }

    /// Attaches `device_file` to a loop device, makes ext4 on it and mounts it.
    fn format_and_mount(&mut self, device_file: &Path) -> Result<()> {
        let dev = run_ok("losetup", &["-f", "--show", "--direct-io=on", utf8(device_file)?])?.trim().to_string();
        self.loopdev = Some(dev.clone());
        // -m 0: no blocks reserved for root (the node runs as root: "full" must mean full).
        // 4096-byte blocks: the chunk store refuses smaller ones (mkfs.ext4's
        // default for a filesystem this small is 1024).
        run_ok("mkfs.ext4", &["-q", "-F", "-m", "0", "-b", "4096", "-E", "nodiscard", &dev])?;
        std::fs::create_dir_all(&self.mountpoint)
            .map_err(Error::io(format!("create {}", self.mountpoint.display())))?;
        run_ok("mount", &[&dev, utf8(&self.mountpoint)?])?;
        self.mounted = true;
        Ok(())
    }

    /// An ext4 filesystem of `mib` MiB on a loop device over `dir/NAME.img`,
    /// mounted on `mountpoint`.
    pub fn small(dir: &Path, name: &str, mib: u64, mountpoint: &Path) -> Result<Disk> {
        let mut d = Disk::new(dir, name, mountpoint);
        sparse_file(&d.image, mib << 20)?;
        let image = d.image.clone();
        d.format_and_mount(&image)?;
        Ok(d)
    }

    /// Like [`Disk::small`], with the loop device over nbdkit's error filter
    /// (through nbdfuse), so [`Disk::fail`] makes every block I/O fail with EIO.
    pub fn faulty(dir: &Path, name: &str, mib: u64, mountpoint: &Path) -> Result<Disk> {
        let mut d = Disk::new(dir, name, mountpoint);
        sparse_file(&d.image, mib << 20)?;
        let sock = dir.join(format!("{name}.nbd.sock"));
        let trigger = dir.join(format!("{name}.fail"));
        let nbdkit = Command::new("nbdkit")
            .args(["--exit-with-parent", "-f", "-U"])
            .arg(&sock)
            .args(["--filter=error", "file"])
            .arg(&d.image)
            .args(["error=EIO", "error-rate=100%"])
            .arg(format!("error-file={}", trigger.display()))
            .stdin(Stdio::null())
            .spawn()
            .map_err(Error::io("spawn nbdkit"))?;
        let fuse_dir = dir.join(format!("{name}.fuse"));
        d.faulty = Some(Faulty { nbdkit, nbdfuse: None, fuse_dir: fuse_dir.clone(), trigger });
        wait_for("nbdkit's socket", || sock.exists())?;
        std::fs::create_dir_all(&fuse_dir).map_err(Error::io(format!("create {}", fuse_dir.display())))?;
        let file = fuse_dir.join("disk");
        let nbdfuse = Command::new("nbdfuse")
            .arg(&file)
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .map_err(Error::io("spawn nbdfuse"))?;
        if let Some(f) = d.faulty.as_mut() {
            f.nbdfuse = Some(nbdfuse);
        }
        wait_for("nbdfuse's file", || std::fs::metadata(&file).map(|m| m.len() == mib << 20).unwrap_or(false))?;
        d.format_and_mount(&file)?;
        Ok(d)
    }

    /// From now on every read and write of the disk fails with EIO.
    pub fn fail(&self) -> Result<()> {
        let f = self.faulty.as_ref().ok_or_else(|| Error::harness("fail(): not a faulty disk"))?;
        std::fs::write(&f.trigger, b"").map_err(Error::io(format!("create {}", f.trigger.display())))
    }

    /// I/O succeeds again (a filesystem that aborted stays broken until remounted).
    pub fn heal(&self) {
        if let Some(f) = &self.faulty {
            let _ = std::fs::remove_file(&f.trigger);
        }
    }

    /// Takes every free block; returns the bytes taken.
    pub fn fill(&self) -> Result<u64> {
        use std::os::fd::AsRawFd;
        let what = || format!("filler {}", self.filler.display());
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&self.filler).map_err(Error::io(what()))?;
        let mut taken = f.metadata().map_err(Error::io(what()))?.len();
        let mut step: i64 = 1 << 30;
        while step >= 4096 {
            // SAFETY: fallocate on an open descriptor we own.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, taken as i64, step) };
            if r == 0 {
                taken += step as u64;
            } else {
                step /= 2;
            }
        }
        f.sync_all().map_err(Error::io(what()))?;
        Ok(taken)
    }

    /// Frees what [`Disk::fill`] took.
    pub fn unfill(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.heal();
        let mp = self.mountpoint.to_string_lossy().into_owned();
        if self.mounted && !run("umount", &[&mp]).is_ok_and(|o| o.status.success()) {
            let _ = run("umount", &["-l", &mp]);
        }
        if let Some(dev) = self.loopdev.take() {
            let _ = run("losetup", &["-d", &dev]);
        }
        if let Some(mut f) = self.faulty.take() {
            if let Some(mut nbdfuse) = f.nbdfuse.take() {
                // The loop device lets go of the FUSE file a moment after `losetup -d`
                // (the kernel finishes the detach asynchronously): until then the FUSE
                // mount is busy. Retry, then detach it lazily rather than leave it.
                let fuse_dir = f.fuse_dir.to_string_lossy().into_owned();
                let deadline = Instant::now() + Duration::from_secs(10);
                while !Command::new("fusermount3").args(["-u", "-q", &fuse_dir]).status().is_ok_and(|s| s.success()) {
                    if Instant::now() > deadline {
                        let _ = run("umount", &["-l", &fuse_dir]);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = nbdfuse.kill();
                let _ = nbdfuse.wait();
            }
            let _ = f.nbdkit.kill();
            let _ = f.nbdkit.wait();
        }
        let _ = std::fs::remove_file(&self.image);
    }
}
