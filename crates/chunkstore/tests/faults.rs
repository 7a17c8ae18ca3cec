//! Faults from below: bytes rotting on disk, and a full filesystem.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ballast_chunkstore::{ChunkStore, StoreError, StoreOptions};
use ballast_types::{BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;

const V: VolumeId = VolumeId(3);
const E: Epoch = Epoch(1);
const BS: u64 = 4096;

fn id(c: u32) -> ChunkId {
    ChunkId::new(V, ChunkIdx(c))
}

fn block(b: u32, salt: u8) -> Vec<u8> {
    (0..BS as usize).map(|i| (i as u8) ^ (b as u8).wrapping_mul(13) ^ salt).collect()
}

fn data_file(dir: &Path, id: ChunkId) -> PathBuf {
    dir.join("chunks").join(format!("{}.data", ballast_chunkstore::layout::chunk_file_stem(id)))
}

#[tokio::test]
async fn bit_rot_is_reported_per_block() {
    let d = tempfile::Builder::new().prefix("chunkstore-rot").tempdir_in("/var/tmp").expect("tempdir");
    let s = ChunkStore::open(d.path(), StoreOptions::default()).expect("open");
    s.announce_epoch(V, E).await.expect("announce");
    s.create_chunk(id(0), 64 * BS, E).await.expect("create");
    let mut all = Vec::new();
    for b in 0..8 {
        all.extend(block(b, 1));
    }
    s.write(id(0), 0, Bytes::from(all.clone()), Seq::new(E, 1)).await.expect("write");
    s.flush_chunk(id(0), E).await.expect("flush");

    // Flip bytes of block 3 behind the store's back; also in a never-written block.
    let f = std::fs::OpenOptions::new().write(true).open(data_file(d.path(), id(0))).expect("open data");
    f.write_at(&[0xff, 0x00, 0x55], 3 * BS + 100).expect("rot");
    f.write_at(&[1], 40 * BS + 7).expect("rot hole");
    f.sync_all().expect("sync");
    drop(f);

    for (off, len, bad) in [(3 * BS, BS, 3), (0, 8 * BS, 3), (40 * BS, BS, 40)] {
        match s.read(id(0), off, len as u32, E).await {
            Err(StoreError::ChecksumMismatch { id: c, block }) => {
                assert_eq!(c, id(0));
                assert_eq!(block, BlockIdx(bad));
            }
            other => panic!("read [{off}, +{len}) should fail on block {bad}, got {other:?}"),
        }
    }
    // Neighbours are intact.
    assert_eq!(s.read(id(0), 2 * BS, BS as u32, E).await.expect("block 2"), block(2, 1));
    assert_eq!(s.read(id(0), 4 * BS, 4 * BS as u32, E).await.expect("blocks 4..8"), all[4 * BS as usize..].to_vec());
    assert!(s.read(id(0), 41 * BS, BS as u32, E).await.expect("hole").iter().all(|&x| x == 0));
    // Rewriting the rotten block heals it (read repair's path: a fresh seq, as
    // every front-end write has; the same seq again would be taken for an
    // overtaken copy of the write that is already there).
    s.write(id(0), 3 * BS, Bytes::from(block(3, 1)), Seq::new(E, 2)).await.expect("repair");
    assert_eq!(s.read(id(0), 0, 8 * BS as u32, E).await.expect("healed"), all);
}

/// A small ext4 image mounted on a loop device; unmounted and detached on drop.
struct LoopFs {
    img: PathBuf,
    mnt: tempfile::TempDir,
    dev: Option<String>,
    mounted: bool,
}

impl LoopFs {
    fn skip_reason() -> Option<String> {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            return Some("not root".into());
        }
        for tool in ["losetup", "mkfs.ext4", "mount", "umount"] {
            let ok = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                return Some(format!("{tool} not found"));
            }
        }
        None
    }

    fn new(work: &Path, mib: u64) -> Result<LoopFs, String> {
        LoopFs::with_block_size(work, mib, 4096)
    }

    fn with_block_size(work: &Path, mib: u64, block: u32) -> Result<LoopFs, String> {
        let img = work.join("disk.img");
        std::fs::File::create(&img).and_then(|f| f.set_len(mib << 20)).map_err(|e| e.to_string())?;
        let mnt = tempfile::Builder::new().prefix("chunkstore-mnt").tempdir_in(work).map_err(|e| e.to_string())?;
        let mut fs = LoopFs { img, mnt, dev: None, mounted: false };
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&fs.img).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("losetup: {}", String::from_utf8_lossy(&out.stderr)));
        }
        fs.dev = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let dev = fs.dev.clone().unwrap_or_default();
        run("mkfs.ext4", &["-F", "-q", "-m", "0", "-b", &block.to_string(), &dev])?;
        run("mount", &[&dev, &fs.mnt.path().to_string_lossy()])?;
        fs.mounted = true;
        Ok(fs)
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run("umount", &[&self.mnt.path().to_string_lossy()]);
        }
        if let Some(dev) = &self.dev {
            let _ = run("losetup", &["-d", dev]);
        }
        let _ = std::fs::remove_file(&self.img);
    }
}

#[tokio::test]
async fn disk_full_reports_no_space_and_keeps_data() {
    if let Some(why) = LoopFs::skip_reason() {
        println!("SKIP disk_full_reports_no_space_and_keeps_data: {why}");
        return;
    }
    let work = tempfile::Builder::new().prefix("chunkstore-full").tempdir_in("/var/tmp").expect("tempdir");
    let fs = match LoopFs::new(work.path(), 24) {
        Ok(fs) => fs,
        Err(e) => {
            println!("SKIP disk_full_reports_no_space_and_keeps_data: cannot set up loop ext4: {e}");
            return;
        }
    };
    let dir = fs.mnt.path().join("store");
    let mut registry = ballast_metrics::registry();
    let opts = StoreOptions {
        metrics: Some(ballast_chunkstore::StoreMetrics::register(&mut registry).disk("1")),
        ..StoreOptions::default()
    };
    let s = ChunkStore::open(&dir, opts).expect("open");
    s.announce_epoch(V, E).await.expect("announce");
    // A 64 MiB sparse chunk on a ~24 MiB filesystem: writes must run out of space.
    s.create_chunk(id(0), 64 << 20, E).await.expect("create");
    // Creating a chunk whose context file cannot be allocated fails at create.
    let big = s.create_chunk(id(1), 1 << 40, E).await;
    assert!(matches!(big, Err(StoreError::NoSpace { .. })), "huge chunk create: {big:?}");
    assert_eq!(s.chunk_size(id(1)), None);

    let piece = 256 * BS; // 1 MiB
    let mut written = Vec::new();
    let mut no_space = None;
    for i in 0..64u64 {
        let data: Vec<u8> = (0..piece as usize).map(|j| (j as u8) ^ (i as u8)).collect();
        match s.write(id(0), i * piece, Bytes::from(data.clone()), Seq::new(E, i + 1)).await {
            Ok(()) => written.push((i, data)),
            Err(e) => {
                no_space = Some((i, e));
                break;
            }
        }
    }
    let (failed_at, err) = no_space.expect("the filesystem never filled up");
    assert!(
        matches!(&err, StoreError::NoSpace { op: "write", path } if path.extension().is_some_and(|x| x == "data")),
        "{err:?}"
    );
    assert!(!written.is_empty());
    // The failed create and the failed write, as the metrics count them.
    let text = ballast_metrics::encode(&registry);
    assert!(text.contains("ballast_chunkstore_errors_total{node=\"1\",kind=\"no_space\"} 2\n"), "{text}");
    assert!(text.contains("ballast_chunkstore_errors_total{node=\"1\",kind=\"io\"} 0\n"), "{text}");
    // Everything acknowledged still reads back, and the failed range reads without
    // a checksum error (old or new content).
    for (i, data) in &written {
        assert_eq!(&s.read(id(0), i * piece, piece as u32, E).await.expect("read back")[..], &data[..]);
    }
    s.read(id(0), failed_at * piece, piece as u32, E).await.expect("failed range verifies");
    // The store stays usable: trimming frees space, and a write then succeeds.
    s.trim(id(0), 0, piece, Seq::new(E, 100)).await.expect("trim");
    s.flush_chunk(id(0), E).await.expect("flush");
    let retry: Vec<u8> = vec![0xab; 16 * BS as usize];
    s.write(id(0), failed_at * piece, Bytes::from(retry.clone()), Seq::new(E, 101)).await.expect("write after trim");
    assert_eq!(&s.read(id(0), failed_at * piece, 16 * BS as u32, E).await.expect("read")[..], &retry[..]);
    drop(s);
    drop(fs);
}

/// Contents of block `b` as written at seq counter `n` (0: never written or
/// trimmed, zeros).
fn versioned(b: u64, n: u64) -> Vec<u8> {
    if n == 0 {
        return vec![0; BS as usize];
    }
    let mut x = (b << 32) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Checks every block of `blocks` against the versions it may hold: it must
/// read without a checksum error and be one of them. Returns the number of
/// blocks whose write failed and which hold the failed write's version.
async fn check_blocks(s: &ChunkStore, chunk: ChunkId, may_hold: &[Vec<u64>], what: &str) -> usize {
    let mut new_after_failure = 0;
    for (b, allowed) in may_hold.iter().enumerate() {
        let got = match s.read(chunk, b as u64 * BS, BS as u32, E).await {
            Ok(d) => d,
            Err(e) => {
                let raw = std::fs::File::open(data_file(s.dir(), chunk)).expect("data file");
                let mut buf = vec![0u8; BS as usize];
                raw.read_exact_at(&mut buf, b as u64 * BS).expect("raw read");
                let ctx = std::fs::File::open(data_file(s.dir(), chunk).with_extension("ctx")).expect("ctx file");
                let slots: Vec<_> = (0..2)
                    .map(|i| {
                        let mut sb = [0u8; ballast_chunkstore::layout::SLOT_LEN];
                        ctx.read_exact_at(&mut sb, ballast_chunkstore::layout::slot_offset(b as u32, i) as u64)
                            .expect("slot");
                        ballast_chunkstore::layout::Slot::decode(&sb)
                    })
                    .collect();
                let crcs: Vec<u32> = allowed.iter().map(|n| crc32fast::hash(&versioned(b as u64, *n))).collect();
                let like: Vec<u64> = allowed.iter().copied().filter(|n| buf == versioned(b as u64, *n)).collect();
                panic!("{what}: block {b} does not read: {e}; may hold {allowed:?}; on disk: {like:?}; slots {slots:?}; crc on disk {:08x}, of the versions {crcs:x?}", crc32fast::hash(&buf))
            }
        };
        let Some(i) = allowed.iter().position(|n| got[..] == versioned(b as u64, *n)[..]) else {
            panic!("{what}: block {b} holds none of the versions {allowed:?}");
        };
        if i > 0 {
            new_after_failure += 1;
        }
    }
    new_after_failure
}

/// Writes, overwrites and trims of random sizes from four tasks at once into
/// a chunk larger than its filesystem, past the point where it is full: every
/// write that succeeded reads back, every block reads without a checksum
/// error and holds its last acknowledged version or that of a write that
/// failed after it; the same after space is freed and written again, and
/// after the store is reopened (the recovery scan of a dirty chunk).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_racing_a_full_disk_leave_every_block_verifiable() {
    use rand::{Rng, SeedableRng};
    use std::sync::{Arc, Mutex};
    const NAME: &str = "writes_racing_a_full_disk_leave_every_block_verifiable";
    if let Some(why) = LoopFs::skip_reason() {
        println!("SKIP {NAME}: {why}");
        return;
    }
    let work = tempfile::Builder::new().prefix("chunkstore-race").tempdir_in("/var/tmp").expect("tempdir");
    let fs = match LoopFs::new(work.path(), 40) {
        Ok(fs) => fs,
        Err(e) => {
            println!("SKIP {NAME}: cannot set up loop ext4: {e}");
            return;
        }
    };
    let dir = fs.mnt.path().join("store");
    let s = ChunkStore::open(&dir, StoreOptions::default()).expect("open");
    s.announce_epoch(V, E).await.expect("announce");
    let chunk = id(0);
    let blocks = (64u64 << 20) / BS;
    s.create_chunk(chunk, blocks * BS, E).await.expect("create");
    // Per block, the versions it may hold: [last acknowledged, failed writes after it...].
    let may_hold = Arc::new(Mutex::new(vec![vec![0u64]; blocks as usize]));
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let tasks = 4u64;
    let per_task = blocks / tasks;
    let run_round = |round: u64, writes: u32| {
        let mut set = tokio::task::JoinSet::new();
        for t in 0..tasks {
            let (s, may_hold, seq) = (s.clone(), may_hold.clone(), seq.clone());
            set.spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(round * 100 + t);
                let (mut ok, mut no_space) = (0u32, 0u32);
                for _ in 0..writes {
                    let len = rng.gen_range(1..=32u64);
                    let first = t * per_task + rng.gen_range(0..per_task - len);
                    let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let trim = rng.gen_range(0..10) == 0;
                    let r = if trim {
                        s.trim(chunk, first * BS, len * BS, Seq::new(E, n)).await
                    } else {
                        let mut data = Vec::with_capacity((len * BS) as usize);
                        for b in first..first + len {
                            data.extend_from_slice(&versioned(b, n));
                        }
                        s.write(chunk, first * BS, Bytes::from(data), Seq::new(E, n)).await
                    };
                    let v = if trim { 0 } else { n };
                    let mut m = may_hold.lock().unwrap();
                    match r {
                        Ok(()) => {
                            ok += 1;
                            for b in first..first + len {
                                m[b as usize] = vec![v];
                            }
                        }
                        Err(StoreError::NoSpace { .. }) => {
                            no_space += 1;
                            for b in first..first + len {
                                m[b as usize].push(v);
                            }
                        }
                        Err(e) => panic!("write or trim of blocks {first}+{len}: {e}"),
                    }
                }
                (ok, no_space)
            });
        }
        set
    };
    let (mut ok, mut no_space) = (0, 0);
    let mut set = run_round(0, 1500);
    while let Some(r) = set.join_next().await {
        let (o, n) = r.expect("task");
        (ok, no_space) = (ok + o, no_space + n);
    }
    println!("{NAME}: {ok} writes and trims succeeded, {no_space} ran out of space");
    assert!(no_space > 0, "the filesystem never filled up");
    let snapshot = may_hold.lock().unwrap().clone();
    let kept_new = check_blocks(&s, chunk, &snapshot, "full").await;
    println!("{NAME}: {kept_new} blocks hold the version of a write that failed");
    // Space freed (a trim of half of each task's range), then more writes.
    for t in 0..tasks {
        let (first, len) = (t * per_task, per_task / 2);
        let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        s.trim(chunk, first * BS, len * BS, Seq::new(E, n)).await.expect("trim to free space");
        let mut m = may_hold.lock().unwrap();
        for b in first..first + len {
            m[b as usize] = vec![0];
        }
    }
    s.flush_chunk(chunk, E).await.expect("flush");
    let mut set = run_round(1, 300);
    while set.join_next().await.is_some() {}
    let snapshot = may_hold.lock().unwrap().clone();
    check_blocks(&s, chunk, &snapshot, "after freeing").await;
    // Reopened without a flush: the chunk is dirty, so the open scans it.
    drop(s);
    let s = ChunkStore::open(&dir, StoreOptions::default()).expect("reopen");
    check_blocks(&s, chunk, &snapshot, "reopened").await;
    drop(s);
    drop(fs);
}

/// A filesystem with 1024-byte blocks is refused at open: a write cut short
/// by a full disk could end inside a 4096-byte block there.
#[tokio::test]
async fn a_filesystem_with_small_blocks_is_refused() {
    const NAME: &str = "a_filesystem_with_small_blocks_is_refused";
    if let Some(why) = LoopFs::skip_reason() {
        println!("SKIP {NAME}: {why}");
        return;
    }
    let work = tempfile::Builder::new().prefix("chunkstore-1k").tempdir_in("/var/tmp").expect("tempdir");
    let fs = match LoopFs::with_block_size(work.path(), 16, 1024) {
        Ok(fs) => fs,
        Err(e) => {
            println!("SKIP {NAME}: cannot set up loop ext4: {e}");
            return;
        }
    };
    let dir = fs.mnt.path().join("store");
    match ChunkStore::open(&dir, StoreOptions::default()) {
        Err(StoreError::SmallFsBlocks { fs_block, .. }) => assert_eq!(fs_block, 1024),
        Err(e) => panic!("expected SmallFsBlocks, got {e}"),
        Ok(_) => panic!("a store opened on 1024-byte filesystem blocks"),
    }
    drop(fs);
}
