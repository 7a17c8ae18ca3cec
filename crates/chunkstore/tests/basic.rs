//! Functional tests of the public API: round trips, contexts, fencing, bad input,
//! O_DIRECT detection, persistence across reopen.

use ballast_chunkstore::{ChunkInfo, ChunkStore, StoreError, StoreOptions};
use ballast_types::{BlockContext, BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;

const V: VolumeId = VolumeId(7);
const E1: Epoch = Epoch(1);
const SIZE: u64 = 1 << 20;

fn id(c: u32) -> ChunkId {
    ChunkId::new(V, ChunkIdx(c))
}

fn seq(n: u64) -> Seq {
    Seq::new(E1, n)
}

/// A temp dir on a real (non-tmpfs) filesystem, so O_DIRECT is exercised.
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("chunkstore-test").tempdir_in("/var/tmp").expect("tempdir in /var/tmp")
}

fn fs_type(path: &std::path::Path) -> i64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a pointer to a live statfs.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    st.f_type as i64
}

async fn fresh(dir: &std::path::Path) -> ChunkStore {
    let s = ChunkStore::open(dir, StoreOptions::default()).expect("open");
    assert_eq!(s.announce_epoch(V, E1).await.expect("announce"), E1);
    s.create_chunk(id(0), SIZE, E1).await.expect("create");
    s
}

fn pattern(b: u8, len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| b ^ (i as u8)).collect::<Vec<u8>>())
}

#[tokio::test]
async fn write_read_round_trip_and_contexts() {
    let d = disk_dir();
    let s = fresh(d.path()).await;
    // Never written: zeros, empty contexts.
    let z = s.read(id(0), 0, 8192, E1).await.expect("read zeros");
    assert!(z.iter().all(|&b| b == 0));
    let t = s.context_table(id(0), BlockIdx(0), 2, E1).await.expect("ctx");
    assert_eq!(t[0].seq, Seq::ZERO);

    let data = pattern(0x5a, 1 << 20);
    s.write(id(0), 0, data.clone(), seq(1)).await.expect("1 MiB write");
    assert_eq!(s.read(id(0), 0, 1 << 20, E1).await.expect("read"), data);
    // Unaligned source buffer (sliced at an odd offset) still works.
    let odd = pattern(0x11, 4096 + 1).slice(1..);
    s.write(id(0), 4096, odd.clone(), seq(2)).await.expect("odd buffer");
    assert_eq!(s.read(id(0), 4096, 4096, E1).await.expect("read"), odd);
    let t = s.context_table(id(0), BlockIdx(0), 3, E1).await.expect("ctx");
    assert_eq!(t[0], BlockContext { crc: crc32fast::hash(&data[..4096]), seq: seq(1) });
    assert_eq!(t[1], BlockContext { crc: crc32fast::hash(&odd), seq: seq(2) });
    // A write older than the block (one overtaken on the way) succeeds but keeps
    // the newer block: seqs only grow.
    s.write(id(0), 0, pattern(0x77, 8192), seq(1)).await.expect("older seq");
    let t = s.context_table(id(0), BlockIdx(0), 2, E1).await.expect("ctx");
    assert_eq!(t[1].seq, seq(2), "the newer block is kept");
    assert_eq!(s.read(id(0), 4096, 4096, E1).await.expect("read"), odd);
    assert_eq!(t[0].seq, seq(1), "an equal seq is the same write again: kept too");
    assert_eq!(s.read(id(0), 0, 4096, E1).await.expect("read"), data.slice(..4096));

    s.trim(id(0), 0, 8192, seq(3)).await.expect("trim");
    s.write_zeroes(id(0), 8192, 4096, seq(4)).await.expect("zeroes");
    let r = s.read(id(0), 0, 16384, E1).await.expect("read");
    assert!(r[..12288].iter().all(|&b| b == 0));
    assert_eq!(&r[12288..], &data[12288..16384]);
    let t = s.context_table(id(0), BlockIdx(0), 3, E1).await.expect("ctx");
    assert_eq!(t[2].seq, seq(4));
    assert_eq!(t[0].crc, crc32fast::hash(&[0u8; 4096]));
}

#[tokio::test]
async fn o_direct_on_disk_and_buffered_on_tmpfs() {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let d = disk_dir();
    if fs_type(d.path()) == TMPFS_MAGIC {
        println!("SKIP: /var/tmp is tmpfs here, cannot check O_DIRECT");
    } else {
        let s = fresh(d.path()).await;
        assert!(s.direct_io(), "O_DIRECT should be in effect on a disk filesystem");
    }
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() || fs_type(shm) != TMPFS_MAGIC {
        println!("SKIP: /dev/shm is not tmpfs");
        return;
    }
    let t = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
    // Kernels before 6.6 refuse O_DIRECT on tmpfs (EINVAL); newer ones accept it.
    // Whatever this kernel does, the store must agree with it and keep working.
    let accepts = {
        use std::os::unix::fs::OpenOptionsExt;
        let p = t.path().join("probe");
        let r = std::fs::OpenOptions::new().read(true).write(true).create(true).custom_flags(libc::O_DIRECT).open(&p);
        let _ = std::fs::remove_file(&p);
        r.is_ok()
    };
    let s = fresh(t.path()).await;
    if accepts {
        println!("NOTE: this kernel accepts O_DIRECT on tmpfs; the refusal path is covered where it refuses");
    }
    assert_eq!(s.direct_io(), accepts, "store's O_DIRECT decision disagrees with the filesystem");
    let data = pattern(3, 8192);
    s.write(id(0), 0, data.clone(), seq(1)).await.expect("write");
    assert_eq!(s.read(id(0), 0, 8192, E1).await.expect("read"), data);
    drop(s);
    // Buffered by request works too and reads what O_DIRECT wrote.
    let opts = StoreOptions { direct_io: false, ..StoreOptions::default() };
    let s = ChunkStore::open(t.path(), opts).expect("reopen buffered");
    assert!(!s.direct_io());
    assert_eq!(s.read(id(0), 0, 8192, E1).await.expect("read"), data);
}

#[tokio::test]
async fn fencing_survives_reopen() {
    let d = disk_dir();
    {
        let s = fresh(d.path()).await;
        s.write(id(0), 0, pattern(1, 4096), seq(1)).await.expect("write");
        // Unannounced newer epoch.
        let e = s.write(id(0), 0, pattern(2, 4096), Seq::new(Epoch(2), 1)).await;
        assert!(matches!(e, Err(StoreError::UnannouncedEpoch { request: Epoch(2), current: Epoch(1), .. })));
        assert_eq!(s.announce_epoch(V, Epoch(2)).await.expect("announce"), Epoch(2));
        let e = s.write(id(0), 0, pattern(3, 4096), seq(2)).await;
        assert!(matches!(e, Err(StoreError::Fenced { request: Epoch(1), current: Epoch(2), .. })), "{e:?}");
        assert!(matches!(s.announce_epoch(V, E1).await, Err(StoreError::Fenced { .. })));
        assert!(matches!(s.read(id(0), 0, 4096, E1).await, Err(StoreError::Fenced { .. })));
        assert!(matches!(s.flush_volume(V, E1).await, Err(StoreError::Fenced { .. })));
    }
    let s = ChunkStore::open(d.path(), StoreOptions::default()).expect("reopen");
    assert_eq!(s.epoch(V), Epoch(2));
    let e = s.write(id(0), 0, pattern(3, 4096), seq(3)).await;
    assert!(matches!(e, Err(StoreError::Fenced { .. })), "{e:?}");
    let r = s.read(id(0), 0, 4096, Epoch(2)).await.expect("read");
    assert_eq!(r, pattern(1, 4096), "fenced writes changed nothing");
    assert_eq!(s.epoch(VolumeId(99)), Epoch(0));
}

#[tokio::test]
async fn bad_input_is_rejected_and_writes_nothing() {
    let d = disk_dir();
    let s = fresh(d.path()).await;
    let before = s.context_table(id(0), BlockIdx(0), 256, E1).await.expect("ctx");
    let e = s.write(id(0), 100, pattern(1, 4096), seq(1)).await;
    assert!(matches!(e, Err(StoreError::Misaligned { offset: 100, len: 4096 })));
    let e = s.write(id(0), 0, pattern(1, 1000), seq(1)).await;
    assert!(matches!(e, Err(StoreError::Misaligned { .. })));
    let e = s.write(id(0), SIZE - 4096, pattern(1, 8192), seq(1)).await;
    assert!(matches!(e, Err(StoreError::OutOfRange { len: 8192, size: SIZE, .. })), "{e:?}");
    let e = s.trim(id(0), u64::MAX - 4095, 8192, seq(1)).await;
    assert!(matches!(e, Err(StoreError::OutOfRange { .. })), "overflow is out of range: {e:?}");
    let e = s.read(id(0), SIZE, 4096, E1).await;
    assert!(matches!(e, Err(StoreError::OutOfRange { .. })));
    let e = s.write(id(9), 0, pattern(1, 4096), seq(1)).await;
    assert!(matches!(e, Err(StoreError::NoSuchChunk(c)) if c == id(9)));
    let e = s.context_table(id(0), BlockIdx(255), 2, E1).await;
    assert!(matches!(e, Err(StoreError::OutOfRange { .. })));
    let e = s.create_chunk(id(0), 2 * SIZE, E1).await;
    assert!(matches!(e, Err(StoreError::ChunkExists { size, existing: SIZE, .. }) if size == 2 * SIZE));
    assert!(matches!(s.create_chunk(id(1), 1000, E1).await, Err(StoreError::Misaligned { .. })));
    s.create_chunk(id(0), SIZE, E1).await.expect("idempotent create");
    let after = s.context_table(id(0), BlockIdx(0), 256, E1).await.expect("ctx");
    assert_eq!(before, after, "rejected requests changed contexts");
    assert!(s.dirty_chunks(V).is_empty(), "rejected requests set the dirty mark");
    assert!(s.read(id(0), 0, SIZE as u32, E1).await.expect("read").iter().all(|&b| b == 0));
}

#[tokio::test]
async fn dirty_marks_flush_and_persistence() {
    let d = disk_dir();
    {
        let s = fresh(d.path()).await;
        s.create_chunk(id(1), SIZE, E1).await.expect("create");
        assert!(s.dirty_chunks(V).is_empty());
        s.write(id(0), 0, pattern(1, 4096), seq(1)).await.expect("write");
        s.trim(id(1), 0, 4096, seq(2)).await.expect("trim");
        assert_eq!(s.dirty_chunks(V), vec![ChunkIdx(0), ChunkIdx(1)]);
        s.flush_chunk(id(1), E1).await.expect("flush");
        assert_eq!(s.dirty_chunks(V), vec![ChunkIdx(0)]);
        s.write(id(1), 4096, pattern(2, 4096), seq(3)).await.expect("write");
        assert_eq!(
            s.chunks(),
            vec![ChunkInfo { id: id(0), size: SIZE, dirty: true }, ChunkInfo { id: id(1), size: SIZE, dirty: true },]
        );
        assert_eq!(s.chunk_bytes(), 2 * SIZE);
        s.flush_volume(V, E1).await.expect("flush volume");
        assert!(s.dirty_chunks(V).is_empty());
        s.write(id(1), 8192, pattern(3, 4096), seq(4)).await.expect("write");
    }
    let s = ChunkStore::open(d.path(), StoreOptions::default()).expect("reopen");
    assert_eq!(s.chunk_bytes(), 2 * SIZE, "counted at open");
    assert_eq!(s.dirty_chunks(V), vec![ChunkIdx(1)], "dirty mark survives restart");
    assert_eq!(s.chunk_size(id(1)), Some(SIZE));
    assert_eq!(s.read(id(1), 4096, 8192, E1).await.expect("read"), [pattern(2, 4096), pattern(3, 4096)].concat());
    s.delete_chunk(id(1), E1).await.expect("delete");
    s.delete_chunk(id(1), E1).await.expect("delete is idempotent");
    assert_eq!(s.chunk_size(id(1)), None);
    assert_eq!(s.chunk_bytes(), SIZE, "a delete counted once");
    drop(s);
    let s = ChunkStore::open(d.path(), StoreOptions::default()).expect("reopen");
    assert_eq!(s.chunks().len(), 1);
}
