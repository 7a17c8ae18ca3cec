//! A real filesystem on a Ballast volume through a real block device: `ballast dev`
//! (replicas 3) → nbdfuse (the volume as a FUSE file) → a loop device with direct
//! I/O → mkfs.ext4 → mount → files written and fsynced. The dev cluster is then
//! stopped and started again on the same data, the volume attached the same way,
//! and every file must read back byte for byte (the kernel has no nbd module here;
//! loop over FUSE is the block device a node without it would use).
//!
//! Needs root (loop devices, mount) and nbdfuse, losetup, mkfs.ext4, fusermount3;
//! prints SKIP otherwise. Everything set up is torn down on drop, also on failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ballast_testkit::{data_dir, needs, random_file, run, run_ok, wait_every, Error, Proc, Result};

/// The volume attached as a mounted ext4 filesystem; unmounted, detached and
/// unfused (in that order) when dropped.
struct Mounted {
    fuse_dir: PathBuf,
    fuse: Option<Child>,
    loop_dev: Option<String>,
    mnt: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// Attaches `uri`; with `mkfs`, makes a new ext4 filesystem first.
    fn attach(uri: &str, work: &Path, mkfs: bool) -> Result<Mounted> {
        let fuse_dir = work.join("fuse");
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&fuse_dir).expect("fuse dir");
        std::fs::create_dir_all(&mnt).expect("mount dir");
        let pidfile = work.join("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let file = fuse_dir.join("vol");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .map_err(Error::io("spawn nbdfuse"))?;
        let mut m = Mounted { fuse_dir, fuse: Some(child), loop_dev: None, mnt, mounted: false };
        // nbdfuse writes its pid file once it serves the file.
        wait_every("nbdfuse to become ready", Duration::from_secs(20), Duration::from_millis(50), || {
            Ok(pidfile.exists())
        })?;
        let file = file.to_str().expect("utf8 path");
        // 4 KiB sectors: the export's minimum block size is 4096 (a block is the
        // unit of checksums), and nbdfuse refuses smaller requests.
        let dev =
            run_ok("losetup", &["-f", "--show", "--direct-io=on", "--sector-size", "4096", file])?.trim().to_string();
        m.loop_dev = Some(dev.clone());
        if mkfs {
            run_ok("mkfs.ext4", &["-q", "-F", &dev])?;
        }
        run_ok("mount", &[&dev, m.mnt.to_str().expect("utf8 path")])?;
        m.mounted = true;
        Ok(m)
    }
}

impl Mounted {
    /// Unmounts, then checks the filesystem read-only (e2fsck -fn must find nothing).
    fn unmount_and_fsck(&mut self) -> Result<()> {
        run_ok("umount", &[self.mnt.to_str().expect("utf8 path")])?;
        self.mounted = false;
        let dev = self.loop_dev.clone().expect("loop device");
        run_ok("e2fsck", &["-f", "-n", &dev])?;
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run("umount", &[self.mnt.to_str().unwrap_or_default()]);
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = run("losetup", &["-d", &dev]);
        }
        if let Some(mut c) = self.fuse.take() {
            let _ = run("fusermount3", &["-u", self.fuse_dir.to_str().unwrap_or_default()]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_dev(data: &Path) -> Result<(Proc, String)> {
    let mut dev = Proc::spawn(
        "dev",
        [
            "dev",
            "--data",
            data.to_str().expect("utf8 path"),
            "--nbd",
            "127.0.0.1:0",
            "--meta-port",
            "0",
            "--size",
            "512M",
        ],
    )?;
    let uri = dev.wait_value("ready nbd", "uri")?;
    Ok((dev, uri))
}

#[test]
fn ext4_on_a_loop_device_survives_a_cluster_restart() -> Result<()> {
    if !needs("ext4_on_a_loop_device_survives_a_cluster_restart")
        .root("loop devices and mount")
        .tools(&["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "fusermount3"])
        .paths(&["/dev/fuse"])
        .met()
    {
        return Ok(());
    }
    let dir = data_dir("ext4")?;
    let data = dir.path().join("data");
    let originals = dir.path().join("originals");
    std::fs::create_dir_all(&originals).expect("originals dir");

    let (mut dev, uri) = start_dev(&data)?;
    {
        let m = Mounted::attach(&uri, dir.path(), true)?;
        for i in 0..12u64 {
            let len = 4096 * (1 + i as usize * 37) + i as usize * 511; // unaligned tails too
            let src = originals.join(format!("f{i}"));
            random_file(&src, len, 1000 + i)?;
            std::fs::copy(&src, m.mnt.join(format!("f{i}"))).expect("copy into the filesystem");
        }
        std::fs::create_dir_all(m.mnt.join("dir/sub")).expect("mkdir");
        std::fs::write(m.mnt.join("dir/sub/small"), b"ballast").expect("small file");
        run_ok("sync", &["-f", m.mnt.to_str().expect("utf8 path")])?;
        // Dropping `m` unmounts (writing back everything) and detaches.
    }
    assert!(dev.terminate(Duration::from_secs(20)).is_ok_and(|s| s.success()), "dev did not stop cleanly");

    let (_dev, uri) = start_dev(&data)?;
    let m = Mounted::attach(&uri, dir.path(), false)?;
    run_ok("sync", &[])?;
    for i in 0..12u64 {
        let want = std::fs::read(originals.join(format!("f{i}"))).expect("original");
        let got = std::fs::read(m.mnt.join(format!("f{i}"))).expect("file after restart");
        assert!(got == want, "file f{i} differs after the restart ({} vs {} bytes)", got.len(), want.len());
    }
    assert_eq!(std::fs::read(m.mnt.join("dir/sub/small")).expect("small"), b"ballast");
    // The filesystem is consistent, not just readable.
    let mut m = m;
    m.unmount_and_fsck()
}
