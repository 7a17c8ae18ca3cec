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
//! Teardown in `Drop` (also on a panic): unmount, detach the loop device, unmount
//! the FUSE file, stop nbdkit. Nothing is left mounted or attached.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::run;

pub struct Disk {
    pub mountpoint: PathBuf,
    loopdev: String,
    image: PathBuf,
    filler: PathBuf,
    /// nbdkit, its trigger file and the nbdfuse mount dir (faulty disks only).
    faulty: Option<Faulty>,
}

struct Faulty {
    nbdkit: Child,
    nbdfuse: Child,
    fuse_dir: PathBuf,
    trigger: PathBuf,
}

/// Why these disks cannot be built here, if they cannot.
pub fn unavailable(faulty: bool) -> Option<String> {
    if !super::is_root() {
        return Some("needs root (loop devices, mount)".into());
    }
    let mut tools = vec!["losetup", "mkfs.ext4", "mount", "umount"];
    if faulty {
        tools.extend(["nbdkit", "nbdfuse", "fusermount3"]);
    }
    let missing: Vec<&str> = tools.into_iter().filter(|t| !super::have(t)).collect();
    if !missing.is_empty() {
        return Some(format!("missing tools {missing:?}"));
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control".into());
    }
    None
}

fn ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(out.status.success(), "{prog} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn format_and_mount(device_file: &Path, mountpoint: &Path) -> String {
    let dev = ok("losetup", &["-f", "--show", "--direct-io=on", device_file.to_str().expect("utf8")]);
    // -m 0: no blocks reserved for root (the node runs as root: "full" must mean full).
    ok("mkfs.ext4", &["-q", "-F", "-m", "0", "-E", "nodiscard", &dev]);
    std::fs::create_dir_all(mountpoint).expect("mountpoint");
    ok("mount", &[&dev, mountpoint.to_str().expect("utf8")]);
    dev
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Disk {
    /// An ext4 filesystem of `mib` MiB on a loop device over `dir/NAME.img`,
    /// mounted on `mountpoint`.
    pub fn small(dir: &Path, name: &str, mib: u64, mountpoint: &Path) -> Disk {
        let image = dir.join(format!("{name}.img"));
        let f = std::fs::File::create(&image).expect("image");
        f.set_len(mib << 20).expect("size image");
        drop(f);
        let loopdev = format_and_mount(&image, mountpoint);
        Disk { mountpoint: mountpoint.into(), loopdev, filler: mountpoint.join(".filler"), image, faulty: None }
    }

    /// Like [`Disk::small`], with the loop device over nbdkit's error filter
    /// (through nbdfuse), so [`Disk::fail`] makes every block I/O fail with EIO.
    pub fn faulty(dir: &Path, name: &str, mib: u64, mountpoint: &Path) -> Disk {
        let image = dir.join(format!("{name}.img"));
        std::fs::File::create(&image).expect("image").set_len(mib << 20).expect("size image");
        let sock = dir.join(format!("{name}.nbd.sock"));
        let trigger = dir.join(format!("{name}.fail"));
        let nbdkit = Command::new("nbdkit")
            .args(["--exit-with-parent", "-f", "-U"])
            .arg(&sock)
            .args(["--filter=error", "file"])
            .arg(&image)
            .args(["error=EIO", "error-rate=100%"])
            .arg(format!("error-file={}", trigger.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdkit");
        wait_for("nbdkit's socket", || sock.exists());
        let fuse_dir = dir.join(format!("{name}.fuse"));
        std::fs::create_dir_all(&fuse_dir).expect("fuse dir");
        let file = fuse_dir.join("disk");
        let nbdfuse = Command::new("nbdfuse")
            .arg(&file)
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        wait_for("nbdfuse's file", || std::fs::metadata(&file).map(|m| m.len() == mib << 20).unwrap_or(false));
        let loopdev = format_and_mount(&file, mountpoint);
        Disk {
            mountpoint: mountpoint.into(),
            loopdev,
            filler: mountpoint.join(".filler"),
            image,
            faulty: Some(Faulty { nbdkit, nbdfuse, fuse_dir, trigger }),
        }
    }

    /// From now on every read and write of the disk fails with EIO.
    pub fn fail(&self) {
        let f = self.faulty.as_ref().expect("a faulty disk");
        std::fs::write(&f.trigger, b"").expect("trigger");
    }

    /// I/O succeeds again (a filesystem that aborted stays broken until remounted).
    pub fn heal(&self) {
        if let Some(f) = &self.faulty {
            let _ = std::fs::remove_file(&f.trigger);
        }
    }

    /// Takes every free block; returns the bytes taken.
    pub fn fill(&self) -> u64 {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&self.filler).expect("filler");
        let mut taken = f.metadata().expect("filler size").len();
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
        f.sync_all().expect("sync filler");
        taken
    }

    /// Frees what [`Disk::fill`] took.
    pub fn unfill(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.heal();
        let mp = self.mountpoint.to_str().expect("utf8").to_string();
        if !run("umount", &[&mp]).status.success() {
            let _ = run("umount", &["-l", &mp]);
        }
        let _ = run("losetup", &["-d", &self.loopdev]);
        if let Some(mut f) = self.faulty.take() {
            // The loop device lets go of the FUSE file a moment after `losetup -d`
            // (the kernel finishes the detach asynchronously): until then the FUSE
            // mount is busy. Retry, then detach it lazily rather than leave it.
            let fuse_dir = f.fuse_dir.to_str().expect("utf8").to_string();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !Command::new("fusermount3").args(["-u", "-q", &fuse_dir]).status().is_ok_and(|s| s.success()) {
                if Instant::now() > deadline {
                    let _ = run("umount", &["-l", &fuse_dir]);
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            for c in [&mut f.nbdfuse, &mut f.nbdkit] {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_file(&self.image);
    }
}
