//! Snapshot layers: cuts, freezing at the first write above a cut, reads of
//! every snapshot view and of the live view, across reopen; a property test
//! against a model that keeps every version of every block.

use std::path::Path;

use ballast_chunkstore::{ChunkStore, StoreError, StoreOptions};
use ballast_types::{BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;
use proptest::prelude::*;

const BLOCKS: u32 = 16;
const BS: usize = 4096;
const V: VolumeId = VolumeId(1);
const E: Epoch = Epoch(3);
const ID: ChunkId = ChunkId { volume: V, chunk: ChunkIdx(0) };

fn open(dir: &Path) -> ChunkStore {
    ChunkStore::open(dir, StoreOptions { direct_io: true, queue_depth: 8, ..StoreOptions::default() }).expect("open")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("chunkstore-snap").tempdir_in("/var/tmp").expect("tempdir")
}

/// A new store with the volume announced at `E` and the chunk `ID` created.
async fn fresh() -> (tempfile::TempDir, ChunkStore) {
    let dir = tempdir();
    let s = open(dir.path());
    s.announce_epoch(V, E).await.expect("announce");
    s.create_chunk(ID, BLOCKS as u64 * BS as u64, E).await.expect("create");
    (dir, s)
}

fn pattern(fill: u8, block: u32) -> Vec<u8> {
    (0..BS).map(|i| fill.wrapping_mul(13).wrapping_add(block as u8) ^ (i as u8).rotate_left(3)).collect()
}

fn seq(n: u64) -> Seq {
    Seq::new(E, n)
}

async fn write(s: &ChunkStore, block: u32, fill: u8, at: u64) {
    s.write(ID, block as u64 * BS as u64, Bytes::from(pattern(fill, block)), seq(at)).await.expect("write");
}

async fn read_live(s: &ChunkStore, block: u32) -> Vec<u8> {
    s.read(ID, block as u64 * BS as u64, BS as u32, E).await.expect("read").to_vec()
}

async fn read_at(s: &ChunkStore, cut: Seq, block: u32) -> Vec<u8> {
    s.read_snapshot(ID, cut, block as u64 * BS as u64, BS as u32, E).await.expect("read snapshot").to_vec()
}

fn layer_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("chunks"))
        .expect("list")
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".ctx")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_keeps_what_was_there_at_its_cut() {
    let (dir, s) = fresh().await;
    write(&s, 0, 1, 1).await;
    write(&s, 1, 2, 2).await;
    let c1 = seq(10);
    s.set_cuts(V, E, &[c1]).await.expect("cut");
    assert_eq!(layer_files(dir.path()), 1, "no layer until a write above the cut");
    write(&s, 0, 3, 11).await;
    s.trim(ID, BS as u64, BS as u64, seq(12)).await.expect("trim");
    write(&s, 2, 4, 13).await;
    assert_eq!(layer_files(dir.path()), 2, "one frozen layer, one live");
    // Live: the new versions; the trimmed block reads zeros.
    assert_eq!(read_live(&s, 0).await, pattern(3, 0));
    assert_eq!(read_live(&s, 1).await, vec![0; BS]);
    assert_eq!(read_live(&s, 2).await, pattern(4, 2));
    // Snapshot: the versions at the cut; block 2 was never written then.
    assert_eq!(read_at(&s, c1, 0).await, pattern(1, 0));
    assert_eq!(read_at(&s, c1, 1).await, pattern(2, 1));
    assert_eq!(read_at(&s, c1, 2).await, vec![0; BS]);
    // A block written only below the live layer reads through it.
    write(&s, 5, 9, 14).await;
    let whole = s.read(ID, 0, 8 * BS as u32, E).await.expect("read range");
    assert_eq!(&whole[5 * BS..6 * BS], &pattern(9, 5)[..]);
    assert_eq!(&whole[..BS], &pattern(3, 0)[..]);
    let ctx = s.context_table_at(ID, Some(c1), BlockIdx(0), 3, E).await.expect("contexts at cut");
    assert_eq!(ctx.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![seq(1), seq(2), Seq::ZERO]);
    let live = s.context_table(ID, BlockIdx(0), 3, E).await.expect("contexts");
    assert_eq!(live.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![seq(11), seq(12), seq(13)]);

    // Reopened: the same views, and the marker says version 2.
    drop(s);
    let s = open(dir.path());
    assert_eq!(&*s.cuts(V), &[c1]);
    assert_eq!(read_at(&s, c1, 0).await, pattern(1, 0));
    assert_eq!(read_live(&s, 0).await, pattern(3, 0));
    assert_eq!(read_live(&s, 5).await, pattern(9, 5));
    let marker = std::fs::read(dir.path().join("ballast-chunkstore")).expect("marker");
    assert_eq!(&marker[..8], b"BLSTORE\x02");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cuts_and_old_writes_are_refused_and_change_nothing() {
    let (_dir, s) = fresh().await;
    write(&s, 0, 1, 5).await;
    let invalid = |r: Result<(), StoreError>| matches!(r, Err(StoreError::InvalidRequest(_)));
    assert!(invalid(s.set_cuts(V, E, &[seq(9), seq(8)]).await), "unordered");
    assert!(invalid(s.set_cuts(V, E, &[Seq::ZERO]).await), "zero");
    assert!(matches!(s.set_cuts(V, Epoch(2), &[seq(9)]).await, Err(StoreError::Fenced { .. })));
    s.set_cuts(V, E, &[seq(9)]).await.expect("cut");
    assert!(invalid(s.set_cuts(V, E, &[seq(7), seq(9)]).await), "a new cut below an existing one");
    write(&s, 0, 2, 20).await;
    // A write below the live layer's lower bound (a delayed one) is refused.
    let old = s.write(ID, BS as u64, Bytes::from(pattern(3, 1)), seq(6)).await;
    assert!(matches!(old, Err(StoreError::InvalidRequest(_))), "{old:?}");
    assert_eq!(read_live(&s, 1).await, vec![0; BS]);
    assert!(matches!(s.read_snapshot(ID, seq(8), 0, BS as u32, E).await, Err(StoreError::InvalidRequest(_))));
    assert_eq!(read_at(&s, seq(9), 0).await, pattern(1, 0));
    // Removing the cut keeps the live data (the frozen layer stays below it).
    s.set_cuts(V, E, &[]).await.expect("remove cut");
    assert_eq!(read_live(&s, 0).await, pattern(2, 0));
    assert!(s.cuts(V).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_created_after_a_cut_are_absent_from_it_and_deletion_removes_every_layer() {
    let dir = tempdir();
    let s = open(dir.path());
    s.announce_epoch(V, E).await.expect("announce");
    s.set_cuts(V, E, &[seq(4)]).await.expect("cut");
    s.create_chunk(ID, BLOCKS as u64 * BS as u64, E).await.expect("create");
    write(&s, 3, 7, 5).await;
    assert_eq!(layer_files(dir.path()), 1, "created above the cut: no layer to freeze");
    let absent = s.read_snapshot(ID, seq(4), 3 * BS as u64, BS as u32, E).await;
    assert!(matches!(absent, Err(StoreError::NoSuchChunk(_))), "not held at the cut: {absent:?}");
    s.set_cuts(V, E, &[seq(4), seq(6)]).await.expect("second cut");
    write(&s, 3, 8, 7).await;
    assert_eq!(read_at(&s, seq(6), 3).await, pattern(7, 3));
    assert_eq!(read_live(&s, 3).await, pattern(8, 3));
    assert_eq!(layer_files(dir.path()), 2);
    s.delete_chunk(ID, E).await.expect("delete");
    assert_eq!(layer_files(dir.path()), 0);
    let data_files = std::fs::read_dir(dir.path().join("chunks")).expect("list").count();
    assert_eq!(data_files, 0, "every layer's data file is gone too");
}

/// A rebuild target: created after both cuts (so its only layer lies above
/// them), it gets copied versions from below each cut. Each goes to a layer
/// of its own seq's range, added into the stack; the views are right, also
/// after a reopen, and a cut a copy job sets "if none" never replaces one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_versions_below_the_live_layer_go_to_layers_of_their_own() {
    use ballast_chunkstore::ResyncBlock;
    let dir = tempdir();
    let s = open(dir.path());
    s.announce_epoch(V, E).await.expect("announce");
    let cuts = [seq(10), seq(20)];
    assert!(s.set_cuts_if_none(V, E, &cuts).await.expect("cuts"), "none there: set");
    assert!(!s.set_cuts_if_none(V, E, &cuts[..1]).await.expect("cuts"), "some there: left alone");
    assert_eq!(&s.cuts(V)[..], &cuts[..]);
    s.create_chunk(ID, BLOCKS as u64 * BS as u64, E).await.expect("create");
    write(&s, 0, 9, 25).await; // a front end's write, above both cuts
    let store = s.clone();
    let copy = move |block: u32, fill: u8, at: u64, view: Option<Seq>| {
        let s = store.clone();
        async move {
            let data = Bytes::from(pattern(fill, block));
            let blocks = [ResyncBlock::Data(seq(at))];
            let off = block as u64 * BS as u64;
            match view {
                Some(cut) => s.resync_write_at(ID, cut, off, &blocks, data, E, seq(25)).await,
                None => s.resync_write(ID, off, &blocks, data, E, seq(25)).await,
            }
            .expect("resync write")
        }
    };
    copy(1, 1, 5, Some(cuts[0])).await; // below cut 1
    copy(1, 2, 15, Some(cuts[1])).await; // between the cuts
    copy(2, 3, 5, None).await; // not written since before cut 1
    let out = copy(0, 4, 5, None).await; // older than the front end's write: kept
    assert_eq!((out.written, out.skipped), (0, 1));
    let refused =
        s.resync_write_at(ID, cuts[0], 0, &[ResyncBlock::Data(seq(15))], Bytes::from(pattern(5, 0)), E, seq(25)).await;
    assert!(matches!(refused, Err(StoreError::InvalidRequest(_))), "a version above the view's cut: {refused:?}");
    assert_eq!(layer_files(dir.path()), 3, "the live layer and one layer per cut range below it");
    check_copied_views(&s, &cuts).await;
    drop((copy, s));
    let s = open(dir.path());
    s.announce_epoch(V, E).await.expect("announce");
    check_copied_views(&s, &cuts).await;
}

async fn check_copied_views(s: &ChunkStore, cuts: &[Seq]) {
    assert_eq!(read_at(s, cuts[0], 1).await, pattern(1, 1));
    assert_eq!(read_at(s, cuts[1], 1).await, pattern(2, 1));
    assert_eq!(read_live(s, 1).await, pattern(2, 1));
    for cut in [Some(cuts[0]), Some(cuts[1]), None] {
        let got = match cut {
            Some(c) => read_at(s, c, 2).await,
            None => read_live(s, 2).await,
        };
        assert_eq!(got, pattern(3, 2), "block 2 at {cut:?}");
    }
    assert_eq!(read_at(s, cuts[1], 0).await, vec![0; BS], "the front end's write is above cut 2");
    assert_eq!(read_live(s, 0).await, pattern(9, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_the_freeze_land_in_the_right_layer() {
    // Many concurrent writes above the cut: the first freezes the layer, the
    // others wait for it and go to the new live layer.
    let (dir, s) = fresh().await;
    for b in 0..BLOCKS {
        write(&s, b, 1, 1 + b as u64).await;
    }
    s.set_cuts(V, E, &[seq(100)]).await.expect("cut");
    let mut tasks = Vec::new();
    for b in 0..BLOCKS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { write(&s, b, 2, 101 + b as u64).await }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    for b in 0..BLOCKS {
        assert_eq!(read_at(&s, seq(100), b).await, pattern(1, b), "block {b} at the cut");
        assert_eq!(read_live(&s, b).await, pattern(2, b), "block {b} live");
    }
    assert_eq!(layer_files(dir.path()), 2, "one freeze");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_snapshots_merges_their_layers_and_returns_the_space() {
    let (dir, s) = fresh().await;
    for b in 0..BLOCKS {
        write(&s, b, 1, 1 + b as u64).await;
    }
    // Three snapshots; between them, half the blocks overwritten each time.
    let mut at = 100;
    let mut cuts = Vec::new();
    for round in 0..3u8 {
        cuts.push(seq(at));
        s.set_cuts(V, E, &cuts).await.expect("cut");
        for b in (round as u32 % 2..BLOCKS).step_by(2) {
            at += 1;
            write(&s, b, 10 + round, at).await;
        }
        at += 10;
    }
    assert_eq!(layer_files(dir.path()), 4);
    // Their space: three frozen layers, each holding the versions it keeps
    // (its data blocks and its context file), all inside the store's use.
    let space = s.space();
    let frozen = space.snapshots[&V];
    assert_eq!(frozen.layers, 3, "{space:?}");
    assert_eq!(space.snapshots.len(), 1, "one volume has snapshots: {space:?}");
    let data = (BLOCKS as u64) * BS as u64;
    assert!(frozen.bytes >= 3 * (data / 2), "each frozen layer holds at least half the blocks: {space:?}");
    assert!(space.used > frozen.bytes + data / 2, "the live layer is counted too: {space:?}");
    let used_before = space.used;
    let views: Vec<Vec<Vec<u8>>> = {
        let mut v = Vec::new();
        for c in &cuts {
            let mut blocks = Vec::new();
            for b in 0..BLOCKS {
                blocks.push(read_at(&s, *c, b).await);
            }
            v.push(blocks);
        }
        v
    };
    let live: Vec<Vec<u8>> = {
        let mut l = Vec::new();
        for b in 0..BLOCKS {
            l.push(read_live(&s, b).await);
        }
        l
    };
    // The middle snapshot goes: its layer is merged up, the others read the same.
    s.set_cuts(V, E, &[cuts[0], cuts[2]]).await.expect("drop the middle cut");
    // Waits for the background merge (one at a time), or does it.
    s.merge_layers(V).await.expect("merge");
    assert_eq!(layer_files(dir.path()), 3);
    let space = s.space();
    assert_eq!(space.snapshots[&V].layers, 2, "{space:?}");
    assert!(space.used < used_before, "the merged layer's space is returned: {space:?} (was {used_before})");
    for (i, c) in [(0, cuts[0]), (2, cuts[2])] {
        for b in 0..BLOCKS {
            assert_eq!(read_at(&s, c, b).await, views[i][b as usize], "block {b} of snapshot {i}");
        }
    }
    // All of them go: one layer left, the live data unchanged, across reopen.
    s.set_cuts(V, E, &[]).await.expect("drop every cut");
    s.merge_layers(V).await.expect("merge");
    assert_eq!(layer_files(dir.path()), 1);
    let space = s.space();
    assert!(space.snapshots.is_empty(), "no snapshot space left: {space:?}");
    assert!(space.used >= data && space.used < used_before, "{space:?}");
    for b in 0..BLOCKS {
        assert_eq!(read_live(&s, b).await, live[b as usize], "live block {b}");
    }
    drop(s);
    let s = open(dir.path());
    for b in 0..BLOCKS {
        assert_eq!(read_live(&s, b).await, live[b as usize], "live block {b} after reopen");
    }
    let data_files = std::fs::read_dir(dir.path().join("chunks")).expect("list").count();
    assert_eq!(data_files, 2, "one data file and one context file");
}

/// The dirty mark (header bytes 48..56) of every layer's context file, by file name.
fn dirty_marks(dir: &Path) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = std::fs::read_dir(dir.join("chunks"))
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ctx"))
        .map(|n| {
            let b = std::fs::read(dir.join("chunks").join(&n)).expect("read ctx");
            let dirty = b[48..56].iter().any(|x| *x != 0);
            (n, dirty)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezing_leaves_the_layer_dirty_and_a_flush_syncs_it() {
    let (dir, s) = fresh().await;
    write(&s, 0, 1, 1).await;
    s.set_cuts(V, E, &[seq(10)]).await.expect("cut");
    write(&s, 1, 2, 11).await;
    // The frozen base layer keeps its unflushed write and its dirty mark.
    assert_eq!(dirty_marks(dir.path()).iter().filter(|(_, d)| *d).count(), 2, "{:?}", dirty_marks(dir.path()));
    assert_eq!(s.dirty_chunks(V), vec![ChunkIdx(0)]);
    s.flush_volume(V, E).await.expect("flush");
    assert!(dirty_marks(dir.path()).iter().all(|(_, d)| !*d), "{:?}", dirty_marks(dir.path()));
    assert!(s.dirty_chunks(V).is_empty());
    // Frozen while dirty, then the process goes (no flush): the reopened store
    // scans the dirty frozen layer before reading it, and both views hold.
    write(&s, 2, 3, 12).await;
    s.set_cuts(V, E, &[seq(10), seq(20)]).await.expect("cut");
    write(&s, 2, 4, 21).await;
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.dirty_chunks(V), vec![ChunkIdx(0)], "a dirty frozen layer counts as a dirty chunk");
    assert_eq!(read_at(&s, seq(20), 2).await, pattern(3, 2));
    assert_eq!(read_at(&s, seq(10), 0).await, pattern(1, 0));
    assert_eq!(read_live(&s, 2).await, pattern(4, 2));
    assert_eq!(read_live(&s, 1).await, pattern(2, 1));
}

// ---- the property test ----------------------------------------------------

#[derive(Clone, Debug)]
enum Cmd {
    Write { block: u32, n: u32, fill: u8 },
    Trim { block: u32, n: u32 },
    Cut,
    DropOldestCut,
    Reopen,
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let range = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(6)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((block, n), fill)| Cmd::Write { block, n, fill }),
        1 => range.prop_map(|(block, n)| Cmd::Trim { block, n }),
        2 => Just(Cmd::Cut),
        1 => Just(Cmd::DropOldestCut),
        1 => Just(Cmd::Reopen),
    ]
}

/// Every version of every block: (seq, content; None = zeros).
type Versions = Vec<Vec<(Seq, Option<Vec<u8>>)>>;

fn view(model: &Versions, block: u32, at: Option<Seq>) -> Vec<u8> {
    model[block as usize]
        .iter()
        .rev()
        .find(|(s, _)| at.is_none_or(|c| *s <= c))
        .and_then(|(_, d)| d.clone())
        .unwrap_or_else(|| vec![0; BS])
}

async fn run(cmds: Vec<Cmd>) -> Result<(), TestCaseError> {
    let (dir, mut s) = fresh().await;
    let mut model: Versions = vec![Vec::new(); BLOCKS as usize];
    let mut cuts: Vec<Seq> = Vec::new();
    let mut counter = 0u64;
    for c in cmds {
        counter += 1;
        let at = seq(counter);
        match c {
            Cmd::Write { block, n, fill } => {
                let mut buf = Vec::new();
                for b in block..block + n {
                    let p = pattern(fill, b);
                    buf.extend_from_slice(&p);
                    model[b as usize].push((at, Some(p)));
                }
                s.write(ID, block as u64 * BS as u64, Bytes::from(buf), at).await.expect("write");
            }
            Cmd::Trim { block, n } => {
                for b in block..block + n {
                    model[b as usize].push((at, None));
                }
                s.trim(ID, block as u64 * BS as u64, n as u64 * BS as u64, at).await.expect("trim");
            }
            Cmd::Cut => {
                cuts.push(at);
                s.set_cuts(V, E, &cuts).await.expect("set cuts");
            }
            Cmd::DropOldestCut => {
                if !cuts.is_empty() {
                    cuts.remove(0);
                    s.set_cuts(V, E, &cuts).await.expect("set cuts");
                }
            }
            Cmd::Reopen => {
                // Waits for a background merge (one runs at a time) before the
                // store goes.
                s.merge_layers(V).await.expect("merge");
                drop(s);
                s = open(dir.path());
                prop_assert_eq!(&*s.cuts(V), &cuts[..]);
            }
        }
        // Every view of every block, block by block and as one range.
        for view_at in std::iter::once(None).chain(cuts.iter().copied().map(Some)) {
            let got = match view_at {
                None => s.read(ID, 0, BLOCKS * BS as u32, E).await,
                Some(cut) => s.read_snapshot(ID, cut, 0, BLOCKS * BS as u32, E).await,
            }
            .expect("read");
            let contexts = s.context_table_at(ID, view_at, BlockIdx(0), BLOCKS, E).await.expect("contexts");
            for b in 0..BLOCKS {
                let want = view(&model, b, view_at);
                prop_assert!(got[b as usize * BS..][..BS] == want[..], "block {} at {:?} differs", b, view_at);
                let want_seq = model[b as usize]
                    .iter()
                    .rev()
                    .find(|(s, _)| view_at.is_none_or(|c| *s <= c))
                    .map_or(Seq::ZERO, |(s, _)| *s);
                prop_assert_eq!(contexts[b as usize].seq, want_seq, "seq of block {} at {:?}", b, view_at);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_view_matches_the_model(cmds in proptest::collection::vec(cmd(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run(cmds))?;
    }
}
