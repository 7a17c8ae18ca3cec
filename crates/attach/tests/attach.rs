//! Real-device tests: a FUSE file over an in-memory device, a loop device over it, real
//! filesystems on that. Each test needs root, /dev/fuse and /dev/loop-control; without
//! them it prints a SKIP line and returns. Guards tear everything down when a test
//! fails half-way.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ballast_attach::fs::{self, FsType, Unmounted};
use ballast_attach::{find_by_backing_file, AttachError, FuseFile, LoopDevice, LoopOptions};
use ballast_blockdev::{check_range, BlockDev, BlockError, MemDev};
use bytes::Bytes;

const MIB: u64 = 1 << 20;
const BS: u32 = 4096;

/// Whether this machine can run the real-device tests; prints why not.
fn can_attach(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    for (ok, what) in [
        (root, "not root"),
        (Path::new("/dev/fuse").exists(), "no /dev/fuse"),
        (Path::new("/dev/loop-control").exists(), "no /dev/loop-control"),
    ] {
        if !ok {
            println!("SKIP {test}: {what}");
            return false;
        }
    }
    true
}

/// [`can_attach`], and the xfs tools (Debian's xfsprogs) for an xfs variant.
fn can_attach_xfs(test: &str) -> bool {
    if !can_attach(test) {
        return false;
    }
    if !fs::have_tool("mkfs.xfs") {
        println!("SKIP {test}: mkfs.xfs not installed (apt-get install xfsprogs)");
        return false;
    }
    true
}

/// CAP_SYS_RESOURCE (bit 24) in the effective set: online ext4 resize needs it.
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| {
            let _ = ballast_attach::set_io_flusher();
        })
        .build()
        .expect("runtime")
}

/// A MemDev whose visible size can change (up to its real size) and that counts flushes.
struct TestDev {
    mem: MemDev,
    size: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    /// When set, reads and writes sleep 1 ms so concurrent requests overlap visibly.
    slow: std::sync::atomic::AtomicBool,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl TestDev {
    fn new(size: u64, capacity: u64) -> Arc<TestDev> {
        Arc::new(TestDev {
            mem: MemDev::new(capacity, BS),
            size: AtomicU64::new(size),
            flushes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            slow: std::sync::atomic::AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        })
    }

    fn grow(&self, size: u64) {
        assert!(size <= self.mem.size());
        self.size.store(size, Ordering::SeqCst);
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Counts a request in flight for its duration (and delays it when `slow`).
    async fn tracked<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let out = f.await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        out
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.size(), BS, u64::from(self.max_request()))
    }
}

impl BlockDev for TestDev {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }
    fn block_size(&self) -> u32 {
        BS
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        self.check(offset, u64::from(len))?;
        self.tracked(self.mem.read(offset, len)).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        self.check(offset, data.len() as u64)?;
        self.tracked(self.mem.write(offset, data, fua)).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.mem.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check(offset, len)?;
        self.trims.fetch_add(1, Ordering::SeqCst);
        self.mem.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.check(offset, len)?;
        self.mem.write_zeroes(offset, len, fua).await
    }
}

/// Tears down, in order, whatever a test set up: mounts, then the loop device, then
/// the FUSE file. Runs on success (explicitly, with errors checked) and on panic (Drop).
#[derive(Default)]
struct Stack {
    mounts: Vec<PathBuf>,
    loopdev: Option<LoopDevice>,
    fuse: Option<FuseFile>,
}

impl Stack {
    fn teardown(&mut self) -> Result<(), AttachError> {
        while let Some(m) = self.mounts.pop() {
            fs::unmount(&m)?;
        }
        if let Some(l) = self.loopdev.take() {
            l.detach()?;
        }
        if let Some(f) = self.fuse.take() {
            f.unmount()?;
        }
        Ok(())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("teardown after failure: {e}");
        }
    }
}

fn aligned_buf(len: usize, seed: u8) -> AlignedBuf {
    let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
    // SAFETY: len > 0 in every caller; the buffer is freed in Drop with the same layout.
    let ptr = unsafe { std::alloc::alloc(layout) };
    assert!(!ptr.is_null());
    let mut b = AlignedBuf { ptr, layout };
    for (i, x) in b.as_mut().iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    b
}

/// A page-aligned buffer, as O_DIRECT wants.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in aligned_buf with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn fuse_file_reads_and_writes_the_device() {
    if !can_attach("fuse_file_reads_and_writes_the_device") {
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 256 * MIB;
    let dev = TestDev::new(size, size);
    let mut stack = Stack::default();
    stack.fuse = Some(FuseFile::mount(dev.clone(), &dir.path().join("mnt"), rt.handle().clone()).expect("mount"));
    let path = stack.fuse.as_ref().expect("fuse").file_path();
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), size);

    // O_DIRECT writes through the file land on the device, at the start, middle and end.
    let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&path).expect("open O_DIRECT");
    for (i, off) in [0, 100 * MIB + 8192, size - MIB].into_iter().enumerate() {
        let buf = aligned_buf(MIB as usize, i as u8);
        f.write_all_at(buf.as_ref(), off).expect("pwrite");
        let on_dev = rt.block_on(dev.read(off, MIB as u32)).expect("dev read");
        assert_eq!(&on_dev[..], buf.as_ref(), "device content at {off}");
        let mut back = aligned_buf(MIB as usize, 0);
        f.read_exact_at(back.as_mut(), off).expect("pread");
        assert_eq!(back.as_ref(), buf.as_ref(), "file content at {off}");
    }
    // And the other way: written on the device, read through the file.
    rt.block_on(dev.write(64 * MIB, Bytes::from(vec![0xab; 8192]), false)).expect("dev write");
    let mut back = aligned_buf(8192, 0);
    f.read_exact_at(back.as_mut(), 64 * MIB).expect("pread");
    assert!(back.as_ref().iter().all(|&b| b == 0xab));

    // fsync reaches the device as a flush (the durability chain's last link).
    let before = dev.flushes();
    f.sync_all().expect("fsync");
    assert!(dev.flushes() > before, "fsync did not flush the device");

    // Reads are short at the end, zero bytes past it; writes past it fail, never short.
    let mut tail = aligned_buf(8192, 0);
    assert_eq!(f.read_at(tail.as_mut(), size - 4096).expect("read at end"), 4096);
    assert_eq!(f.read_at(tail.as_mut(), size).expect("read past end"), 0);
    let err = f.write_at(tail.as_ref(), size - 4096).expect_err("write across the end");
    assert_eq!(errno_of(&err), libc::EFBIG, "{err}");

    // Unaligned I/O through a buffered open (a `cat`, a `dd bs=1`): read-modify-write.
    let g = OpenOptions::new().read(true).write(true).open(&path).expect("open");
    g.write_all_at(b"hello, volume", 4090).expect("unaligned write");
    let on_dev = rt.block_on(dev.read(0, 3 * BS)).expect("dev read");
    let first = aligned_buf(MIB as usize, 0);
    assert_eq!(&on_dev[4090..4103], b"hello, volume");
    assert_eq!(&on_dev[..4090], &first.as_ref()[..4090], "bytes before the write kept");
    assert_eq!(&on_dev[4103..3 * BS as usize], &first.as_ref()[4103..3 * BS as usize], "bytes after kept");
    let mut small = [0u8; 13];
    g.read_exact_at(&mut small, 4090).expect("unaligned read");
    assert_eq!(&small, b"hello, volume");

    // fallocate: punch hole trims, zero range zeroes, both keep the size; plain
    // allocation is refused.
    let trims = dev.trims.load(Ordering::SeqCst);
    // SAFETY: fallocate on an open descriptor with integer arguments.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, 8192) };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
    assert!(dev.trims.load(Ordering::SeqCst) > trims);
    // SAFETY: as above.
    let rc = unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, 100 * MIB as i64, 10_000)
    };
    assert_eq!(rc, 0, "zero range: {}", std::io::Error::last_os_error());
    let z = rt.block_on(dev.read(0, 3 * BS)).expect("dev read");
    assert!(z[..8192].iter().all(|&b| b == 0), "punched range reads zeroes");
    assert_eq!(&z[8192..], &first.as_ref()[8192..3 * BS as usize], "bytes after the hole kept");
    let z = rt.block_on(dev.read(100 * MIB, 3 * BS)).expect("dev read");
    assert!(z[..10_000].iter().all(|&b| b == 0), "zeroed range reads zeroes");
    let second = aligned_buf(MIB as usize, 1);
    assert_eq!(&z[10_000..], &second.as_ref()[10_000 - 8192..3 * BS as usize - 8192], "bytes after zero range kept");
    // SAFETY: as above.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 4096) };
    assert_eq!(rc, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EOPNOTSUPP));
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), size, "size unchanged");

    // The size belongs to the volume: truncation is refused.
    let err = f.set_len(MIB).expect_err("truncate");
    assert_eq!(errno_of(&err), libc::EPERM, "{err}");

    // The file cannot be unmounted under a loop device; without one it can.
    drop((f, g));
    stack.teardown().expect("teardown");
    assert!(!fs::is_mount_point(&dir.path().join("mnt")).expect("mountinfo"));
}

/// FUSE file → loop → mkfs → mount → files → fsck → remount → check → tear down.
fn full_stack(fs_type: FsType) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = TestDev::new(512 * MIB, 512 * MIB);
    let mut stack = Stack::default();
    stack.fuse = Some(FuseFile::mount(dev.clone(), &dir.path().join("fuse"), rt.handle().clone()).expect("fuse mount"));
    let file = stack.fuse.as_ref().expect("fuse").file_path();
    let ld = LoopDevice::attach(&file, &LoopOptions::default()).expect("loop attach");
    let loop_path = ld.path().to_path_buf();
    assert!(ld.direct_io(), "loop device should do direct I/O on the FUSE file");
    assert_eq!(ld.size().expect("size"), 512 * MIB);
    assert_eq!(find_by_backing_file(&file).expect("find"), vec![loop_path.clone()]);
    stack.loopdev = Some(ld);

    assert!(fs::is_blank(&loop_path).expect("blkid"), "a fresh volume is blank");
    fs::mkfs(&loop_path, fs_type, &[]).expect("mkfs");
    assert!(!fs::is_blank(&loop_path).expect("blkid"), "formatted volume is not blank");

    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir");
    fs::mount(&loop_path, &target, fs_type, &["noatime"], false).expect("mount");
    stack.mounts.push(target.clone());
    let info = fs::mount_point_of(&target).expect("mountinfo").expect("mounted");
    assert_eq!(info.fs_type, fs_type.as_str());
    assert_eq!(Path::new(&info.source), loop_path);
    assert!(info.mount_options.contains("noatime"), "{}", info.mount_options);

    // Files, each fsynced: every fsync must reach the device as a flush.
    let content = |i: usize| -> Vec<u8> { (0..100_000 + i * 777).map(|j| (j * 7 + i) as u8).collect() };
    for i in 0..20 {
        let before = dev.flushes();
        let mut f = File::create(target.join(format!("file-{i}"))).expect("create");
        f.write_all(&content(i)).expect("write");
        f.sync_all().expect("fsync");
        assert!(dev.flushes() > before, "fsync of file-{i} did not flush the volume");
    }
    let st = fs::stats(&target).expect("stats");
    assert!(st.bytes_total > 400 * MIB && st.bytes_total <= 512 * MIB, "{st:?}");
    assert!(st.bytes_used > 0 && st.bytes_available < st.bytes_total && st.inodes_used >= 20, "{st:?}");

    assert_eq!(fs::unmount(&target).expect("unmount"), Unmounted::Unmounted);
    stack.mounts.clear();
    assert_eq!(fs::unmount(&target).expect("unmount again"), Unmounted::NotMounted);
    let (tool, args): (&str, &[&str]) = match fs_type {
        FsType::Ext4 => ("e2fsck", &["-f", "-n"]),
        FsType::Xfs => ("xfs_repair", &["-n"]),
    };
    let out = Command::new(tool).args(args).arg(&loop_path).output().expect("fsck");
    assert!(
        out.status.success(),
        "{tool} found problems: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    fs::mount(&loop_path, &target, fs_type, &[], false).expect("remount");
    stack.mounts.push(target.clone());
    for i in 0..20 {
        let mut got = Vec::new();
        File::open(target.join(format!("file-{i}"))).expect("open").read_to_end(&mut got).expect("read");
        assert!(got == content(i), "file-{i} differs after remount");
    }
    stack.teardown().expect("teardown");

    // Nothing left behind.
    assert!(find_by_backing_file(&file).expect("find").is_empty(), "a loop device still uses {}", file.display());
    let left: Vec<_> =
        fs::mounts().expect("mountinfo").into_iter().filter(|m| m.mount_point.starts_with(dir.path())).collect();
    assert!(left.is_empty(), "mounts left under the test dir: {left:?}");
}

#[test]
fn full_stack_ext4() {
    if can_attach("full_stack_ext4") {
        full_stack(FsType::Ext4);
    }
}

#[test]
fn full_stack_xfs() {
    if can_attach_xfs("full_stack_xfs") {
        full_stack(FsType::Xfs);
    }
}

fn grow_mounted(fs_type: FsType) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = TestDev::new(320 * MIB, 640 * MIB);
    let mut stack = Stack::default();
    stack.fuse = Some(FuseFile::mount(dev.clone(), &dir.path().join("fuse"), rt.handle().clone()).expect("fuse mount"));
    let fuse = stack.fuse.as_ref().expect("fuse");
    let file = fuse.file_path();
    let ld = LoopDevice::attach(&file, &LoopOptions::default()).expect("loop attach");
    let loop_path = ld.path().to_path_buf();
    stack.loopdev = Some(ld);
    fs::mkfs(&loop_path, fs_type, &[]).expect("mkfs");
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir");
    fs::mount(&loop_path, &target, fs_type, &[], false).expect("mount");
    stack.mounts.push(target.clone());
    let before = fs::stats(&target).expect("stats");

    // A size the device does not have yet is refused; then the device grows and the file follows.
    assert!(matches!(fuse.set_size(640 * MIB), Err(AttachError::InvalidSize { .. })));
    assert!(matches!(fuse.set_size(320 * MIB + 1), Err(AttachError::InvalidSize { .. })));
    dev.grow(640 * MIB);
    fuse.set_size(640 * MIB).expect("set_size");
    assert_eq!(std::fs::metadata(&file).expect("stat").len(), 640 * MIB);
    let ld = stack.loopdev.as_ref().expect("loop");
    ld.set_capacity().expect("set_capacity");
    assert_eq!(ld.size().expect("size"), 640 * MIB);
    if fs_type == FsType::Ext4 && !has_cap_sys_resource() {
        // The kernel refuses online ext4 resize (EXT4_IOC_RESIZE_FS) without it.
        match fs::grow(fs_type, &loop_path, &target) {
            Err(e @ AttachError::ToolFailed { .. }) => assert!(e.to_string().contains("CAP_SYS_RESOURCE"), "{e}"),
            other => panic!("online ext4 grow without CAP_SYS_RESOURCE: {other:?}"),
        }
        println!("SKIP online_grow_ext4 (filesystem part): no CAP_SYS_RESOURCE here; the block device grew");
        stack.teardown().expect("teardown");
        return;
    }
    fs::grow(fs_type, &loop_path, &target).expect("grow");
    let after = fs::stats(&target).expect("stats");
    assert!(after.bytes_total > before.bytes_total + 250 * MIB, "before {before:?}, after {after:?}");

    // The new space is usable.
    let mut f = File::create(target.join("big")).expect("create");
    let chunk = vec![0x5au8; MIB as usize];
    for _ in 0..(before.bytes_available / MIB + 16) {
        f.write_all(&chunk).expect("write into the grown space");
    }
    f.sync_all().expect("fsync");
    drop(f);
    stack.teardown().expect("teardown");
}

#[test]
fn online_grow_ext4() {
    if can_attach("online_grow_ext4") {
        grow_mounted(FsType::Ext4);
    }
}

#[test]
fn online_grow_xfs() {
    if can_attach_xfs("online_grow_xfs") {
        grow_mounted(FsType::Xfs);
    }
}

#[test]
fn raw_block_bind_mount() {
    if !can_attach("raw_block_bind_mount") {
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = TestDev::new(64 * MIB, 64 * MIB);
    let mut stack = Stack::default();
    stack.fuse = Some(FuseFile::mount(dev.clone(), &dir.path().join("fuse"), rt.handle().clone()).expect("fuse mount"));
    let file = stack.fuse.as_ref().expect("fuse").file_path();
    let ld = LoopDevice::attach(&file, &LoopOptions::default()).expect("loop attach");
    let loop_path = ld.path().to_path_buf();
    stack.loopdev = Some(ld);

    // CSI raw block: the device node bound onto a file the pod sees (created if missing).
    let target = dir.path().join("pods/p1/volumeDevices/vol");
    fs::bind_mount(&loop_path, &target, false).expect("bind");
    stack.mounts.push(target.clone());
    assert!(fs::is_mount_point(&target).expect("mountinfo"));
    let f =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&target).expect("open bound node");
    let buf = aligned_buf(1 << 16, 9);
    f.write_all_at(buf.as_ref(), 12 * MIB).expect("write through the bind");
    f.sync_all().expect("fsync");
    let mut back = aligned_buf(1 << 16, 0);
    f.read_exact_at(back.as_mut(), 12 * MIB).expect("read back");
    assert_eq!(back.as_ref(), buf.as_ref());
    let on_dev = rt.block_on(dev.read(12 * MIB, 1 << 16)).expect("dev read");
    assert_eq!(&on_dev[..], buf.as_ref(), "the write reached the volume");
    drop(f);

    // Read-only raw block: MS_RDONLY on a bind does not stop writes to a device node
    // (only the mount shows ro); a read-only loop device does, with EPERM.
    let ro_loop = LoopDevice::attach(&file, &LoopOptions { read_only: true, ..Default::default() }).expect("ro loop");
    let ro = dir.path().join("pods/p2/volumeDevices/vol");
    let ro_loop_path = ro_loop.path().to_path_buf();
    let mut ro_guard = Stack::default();
    ro_guard.loopdev = Some(ro_loop);
    fs::bind_mount(&ro_loop_path, &ro, true).expect("ro bind");
    stack.mounts.push(ro.clone());
    let info = fs::mount_point_of(&ro).expect("mountinfo").expect("mounted");
    assert!(info.mount_options.split(',').any(|o| o == "ro"), "{}", info.mount_options);
    let w = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&ro).expect("open");
    let err = w.write_all_at(buf.as_ref(), 0).expect_err("write to a read-only volume");
    assert_eq!(errno_of(&err), libc::EPERM, "{err}");
    drop(w);
    fs::unmount(&ro).expect("unmount ro bind");
    stack.mounts.retain(|m| m != &ro);
    ro_guard.teardown().expect("detach ro loop");

    // The FUSE file refuses to unmount while the loop device uses it.
    stack.teardown().expect("teardown");
    assert!(find_by_backing_file(&file).expect("find").is_empty());
}

#[test]
fn fuse_unmount_refused_while_a_loop_device_uses_the_file() {
    if !can_attach("fuse_unmount_refused_while_a_loop_device_uses_the_file") {
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = TestDev::new(16 * MIB, 16 * MIB);
    let mut stack = Stack::default();
    let fuse = FuseFile::mount(dev.clone(), &dir.path().join("fuse"), rt.handle().clone()).expect("fuse mount");
    let file = fuse.file_path();
    stack.loopdev = Some(LoopDevice::attach(&file, &LoopOptions::default()).expect("loop attach"));
    match fuse.unmount() {
        Err(AttachError::FileInUse { devices, .. }) => {
            assert_eq!(devices, vec![stack.loopdev.as_ref().expect("loop").path().to_path_buf()])
        }
        other => panic!("unmount under a loop device: {other:?}"),
    }
    // The refused FuseFile was dropped: Drop detached it lazily, and it keeps serving
    // the loop device until that goes away.
    let mut block = aligned_buf(4096, 3);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(stack.loopdev.as_ref().expect("loop").path())
        .expect("open loop");
    f.write_all_at(block.as_ref(), 0).expect("write after lazy unmount");
    f.read_exact_at(block.as_mut(), 0).expect("read after lazy unmount");
    drop(f);
    stack.teardown().expect("teardown");
    assert!(find_by_backing_file(&file).expect("find").is_empty());
    assert!(!fs::is_mount_point(&dir.path().join("fuse")).expect("mountinfo"));
}

/// What a crash can leave: a loop device without autoclear (losetup's default), found
/// by its backing file, opened by path and detached.
#[test]
fn leftover_loop_device_is_found_and_detached() {
    if !can_attach("leftover_loop_device_is_found_and_detached") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("left over.img");
    File::create(&img).expect("create").set_len(8 * MIB).expect("size");
    let out = Command::new("losetup").arg("--find").arg("--show").arg(&img).output().expect("losetup");
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let made = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let found = find_by_backing_file(&img).expect("find");
    assert_eq!(found, vec![made.clone()]);
    let dev = LoopDevice::open(&made).expect("open existing");
    assert_eq!(dev.backing_file(), img.canonicalize().expect("canonical"));
    assert!(matches!(LoopDevice::open(Path::new("/dev/null")), Err(AttachError::Loop { .. })));
    dev.detach().expect("detach");
    assert!(find_by_backing_file(&img).expect("find").is_empty());
}

#[test]
fn parallel_attaches_get_distinct_loop_devices() {
    if !can_attach("parallel_attaches_get_distinct_loop_devices") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let files: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = dir.path().join(format!("img{i}"));
            File::create(&p).expect("create").set_len(8 * MIB).expect("size");
            p
        })
        .collect();
    let devices: Vec<LoopDevice> = std::thread::scope(|s| {
        let hs: Vec<_> =
            files.iter().map(|f| s.spawn(move || LoopDevice::attach(f, &LoopOptions::default()))).collect();
        hs.into_iter().map(|h| h.join().expect("thread").expect("attach")).collect()
    });
    let mut paths: Vec<_> = devices.iter().map(|d| d.path().to_path_buf()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 4, "two attachers shared a device: {paths:?}");
    for (d, f) in devices.iter().zip(&files) {
        assert_eq!(find_by_backing_file(f).expect("find"), vec![d.path().to_path_buf()]);
    }
    for d in devices {
        d.detach().expect("detach");
    }
    for f in &files {
        assert!(find_by_backing_file(f).expect("find").is_empty());
    }
}

/// fio with a deep queue on the loop device: every block verified after concurrent
/// random writes, and the device saw requests overlap (the FUSE path is parallel).
#[test]
fn fio_verify_through_fuse_and_loop() {
    if !can_attach("fio_verify_through_fuse_and_loop") {
        return;
    }
    if !fs::have_tool("fio") {
        println!("SKIP fio_verify_through_fuse_and_loop: fio not installed");
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = TestDev::new(64 * MIB, 64 * MIB);
    dev.slow.store(true, Ordering::SeqCst);
    let mut stack = Stack::default();
    stack.fuse = Some(FuseFile::mount(dev.clone(), &dir.path().join("fuse"), rt.handle().clone()).expect("fuse mount"));
    let file = stack.fuse.as_ref().expect("fuse").file_path();
    let ld = LoopDevice::attach(&file, &LoopOptions::default()).expect("loop attach");
    let loop_path = ld.path().to_path_buf();
    stack.loopdev = Some(ld);
    let out = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=libaio",
            "--direct=1",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=32",
            "--size=32m",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randrepeat=1",
            "--output-format=terse",
        ])
        .arg(format!("--filename={}", loop_path.display()))
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let overlap = dev.max_in_flight.load(Ordering::SeqCst);
    assert!(overlap > 1, "requests never overlapped on the device (max in flight {overlap})");
    println!("fio_verify_through_fuse_and_loop: max requests in flight on the device: {overlap}");
    stack.teardown().expect("teardown");
}

#[test]
fn kernel_nbd_attach() {
    if !ballast_attach::nbd::kernel_nbd_available() {
        println!("SKIP kernel_nbd_attach: no nbd kernel module");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP kernel_nbd_attach: not root");
        return;
    }
    let rt = runtime();
    let dev = TestDev::new(64 * MIB, 64 * MIB);
    let (nbd, tasks) =
        ballast_attach::nbd::attach_kernel_nbd(dev.clone(), &Default::default(), rt.handle()).expect("nbd connect");
    let path = nbd.path().to_path_buf();
    let mut disconnect = scopeguard(nbd);
    let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&path).expect("open nbd");
    let buf = aligned_buf(1 << 16, 4);
    f.write_all_at(buf.as_ref(), 4 * MIB).expect("write");
    let before = dev.flushes();
    f.sync_all().expect("fsync");
    assert!(dev.flushes() > before, "fsync on /dev/nbdN did not flush the volume");
    let on_dev = rt.block_on(dev.read(4 * MIB, 1 << 16)).expect("dev read");
    assert_eq!(&on_dev[..], buf.as_ref());
    drop(f);
    disconnect.0.take().expect("nbd").disconnect().expect("disconnect");
    for t in tasks {
        rt.block_on(t).expect("join").expect("served cleanly");
    }
}

/// Disconnects the kernel NBD device if the test fails before doing it.
struct NbdGuard(Option<ballast_attach::nbd::KernelNbd>);

fn scopeguard(n: ballast_attach::nbd::KernelNbd) -> NbdGuard {
    NbdGuard(Some(n))
}

impl Drop for NbdGuard {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            let _ = n.disconnect();
        }
    }
}
