//! resync_chunk carries snapshot views: after a rebuild or a resync the target
//! holds, at every cut and live, exactly the source's versions (contexts and
//! data, block by block), between real replica servers on real chunk stores.

mod common;

use ballast_replica::{ClientError, ReplicaClient, Status};
use ballast_resync::{resync_chunk, ResyncOptions, ResyncStats};
use ballast_types::{BlockContext, BlockIdx, Epoch, Seq};
use common::*;

fn opts(protect_from: u64) -> ResyncOptions {
    ResyncOptions { batch_blocks: 32, concurrency: 3, protect_from, ..ResyncOptions::default() }
}

async fn resync(src: &Node, tgt: &Node, epoch: Epoch, opts: &ResyncOptions) -> ResyncStats {
    tokio::time::timeout(HANG_GUARD, resync_chunk(&src.client, &tgt.client, CHUNK, CHUNK_SIZE, epoch, opts, |_| {}))
        .await
        .expect("resync finishes")
        .expect("resync")
}

/// Contexts and data of the chunk's view at `cut` (None: live); a replica
/// whose view at the cut holds no layer reads zeros at `Seq::ZERO`.
async fn view(c: &ReplicaClient, cut: Option<Seq>, epoch: Epoch) -> (Vec<BlockContext>, Vec<u8>) {
    match cut {
        None => (
            c.context_table(CHUNK, BlockIdx(0), BLOCKS, epoch).await.expect("contexts"),
            c.read(CHUNK, 0, CHUNK_SIZE as u32, epoch).await.expect("read").to_vec(),
        ),
        Some(cut) => {
            let t = c.context_table_at(CHUNK, cut, BlockIdx(0), BLOCKS, epoch).await.expect("contexts at cut");
            let d = match c.read_snapshot(CHUNK, cut, 0, CHUNK_SIZE as u32, epoch).await {
                Ok(d) => d.to_vec(),
                Err(ClientError::Remote { status: Status::NoSuchChunk, .. }) => vec![0u8; CHUNK_SIZE as usize],
                Err(e) => panic!("read snapshot: {e}"),
            };
            (t, d)
        }
    }
}

/// Asserts every view (each cut, then live) is the same on both replicas,
/// and returns how many blocks differ between consecutive views on the
/// source (so a test can show its views are not all alike).
async fn assert_views_identical(src: &Node, tgt: &Node, cuts: &[Seq], epoch: Epoch) -> Vec<usize> {
    let mut differing = Vec::new();
    let mut prev: Option<Vec<u8>> = None;
    for cut in cuts.iter().copied().map(Some).chain([None]) {
        let (ts, ds) = view(&src.client, cut, epoch).await;
        let (tt, dt) = view(&tgt.client, cut, epoch).await;
        for b in 0..BLOCKS as usize {
            assert_eq!(ts[b].seq, tt[b].seq, "seq of block {b} in the view at {cut:?}");
            assert!(ds[b * BS..(b + 1) * BS] == dt[b * BS..(b + 1) * BS], "data of block {b} in the view at {cut:?}");
        }
        if let Some(p) = &prev {
            differing
                .push((0..BLOCKS as usize).filter(|&b| p[b * BS..(b + 1) * BS] != ds[b * BS..(b + 1) * BS]).count());
        }
        prev = Some(ds);
    }
    differing
}

/// A history with two snapshots on the source: blocks written before, between
/// and after the cuts, some overwritten in every interval, some trimmed.
/// Returns the cuts.
async fn history(src: &Node, epoch: Epoch) -> Vec<Seq> {
    let s = |n: u64| Seq::new(epoch, n);
    src.write(0, 64, s(1)).await;
    src.write(200, 10, s(2)).await;
    let c1 = s(10);
    src.client.set_cuts(VOL, epoch, &[c1]).await.expect("cut 1");
    src.write(8, 16, s(11)).await; // overwrites blocks 8..24 after cut 1
    src.trim(30, 4, s(12)).await;
    src.write(100, 5, s(13)).await; // new blocks
    let c2 = s(20);
    src.client.set_cuts(VOL, epoch, &[c1, c2]).await.expect("cut 2");
    src.write(10, 4, s(21)).await; // overwrites again after cut 2
    src.write(60, 8, s(22)).await; // blocks 60..64 written before cut 1 only
    src.trim(200, 2, s(23)).await;
    vec![c1, c2]
}

/// A rebuild target new on its node, of a detached volume: it keeps no cuts,
/// so the copy gives it the source's first, then every view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_of_a_detached_volume_carries_every_snapshot_view() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.attach(E1).await;
    let cuts = history(&src, E1).await;
    let stats = resync(&src, &tgt, E1, &opts(0)).await;
    assert!(stats.blocks_copied > 0);
    assert_eq!(tgt.client.list_cuts(VOL, E1).await.expect("list"), cuts, "the target got the source's cuts");
    let differing = assert_views_identical(&src, &tgt, &cuts, E1).await;
    assert!(differing.iter().all(|d| *d > 0), "each view differs from the one before: {differing:?}");
    // A second copy finds nothing left to do in any view.
    let again = resync(&src, &tgt, E1, &opts(0)).await;
    assert_eq!((again.blocks_copied, again.blocks_trimmed), (0, 0));
    src.stop().await;
    tgt.stop().await;
}

/// A rebuild target of an attached volume: the front end installed the cuts
/// on it and wrote to it as a rebuilding replica (above every cut) before the
/// copy reached those blocks, which forces the copied versions into frozen
/// layers below its live one. Every view still matches, and the front end's
/// writes are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_front_end_writes_carries_every_snapshot_view() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.attach(E1).await;
    let cuts = history(&src, E1).await;
    tgt.attach(E1).await;
    tgt.client.set_cuts(VOL, E1, &cuts).await.expect("front end installs the cuts");
    // The front end's writes as a rebuilding replica, to both.
    for (block, n, at) in [(12u32, 2u32, 30u64), (62, 1, 31), (150, 3, 32)] {
        src.write(block, n, Seq::new(E1, at)).await;
        tgt.write(block, n, Seq::new(E1, at)).await;
    }
    resync(&src, &tgt, E1, &opts(30)).await;
    let differing = assert_views_identical(&src, &tgt, &cuts, E1).await;
    assert!(differing.iter().all(|d| *d > 0), "each view differs from the one before: {differing:?}");
    // The target's stack survives a restart of nothing: read it once more
    // after a snapshot is taken and written above (a freeze on top of the
    // layers the copy added).
    let c3 = Seq::new(E1, 40);
    let all = [cuts[0], cuts[1], c3];
    src.client.set_cuts(VOL, E1, &all).await.expect("cut 3 on the source");
    tgt.client.set_cuts(VOL, E1, &all).await.expect("cut 3 on the target");
    for c in [&src, &tgt] {
        c.write(0, 4, Seq::new(E1, 41)).await;
    }
    assert_views_identical(&src, &tgt, &all, E1).await;
    src.stop().await;
    tgt.stop().await;
}

/// A replica that was away (ejected) while the source took a snapshot and
/// kept writing: it held old versions of the blocks, and a write at its
/// ejection that reached it alone, above a cut both keep (never acknowledged:
/// the in-sync source does not have it). The resync under the next epoch
/// replaces that write in every view and carries the views it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_of_a_returning_replica_carries_the_views_it_missed() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.attach(E1).await;
    tgt.attach(E1).await;
    let s = |n: u64| Seq::new(E1, n);
    for c in [&src, &tgt] {
        c.write(0, 32, s(1)).await;
    }
    let c1 = s(5);
    for c in [&src, &tgt] {
        c.client.set_cuts(VOL, E1, &[c1]).await.expect("cut 1");
    }
    // In flight at the ejection: reached the target only.
    tgt.write(4, 2, s(6)).await;
    // The source goes on without the target.
    src.write(20, 4, s(7)).await;
    let c2 = s(9);
    src.client.set_cuts(VOL, E1, &[c1, c2]).await.expect("cut 2 on the source");
    src.write(20, 2, s(10)).await;
    src.write(1, 1, s(11)).await;
    // The next attach: the front end installs both cuts on the returning
    // replica's node, then the copy runs under E2.
    for c in [&src, &tgt] {
        c.client.announce_epoch(VOL, E2).await.expect("announce");
    }
    tgt.client.set_cuts(VOL, E2, &[c1, c2]).await.expect("cuts on the target");
    resync(&src, &tgt, E2, &opts(0)).await;
    assert_views_identical(&src, &tgt, &[c1, c2], E2).await;
    src.stop().await;
    tgt.stop().await;
}

/// A snapshot taken while the copy runs: the front end installs the cut on
/// both replicas after the copy's first batch, then overwrites blocks the
/// copy has not reached, on both. The target's stale versions of those blocks
/// froze into the new view, so the copy must carry that view too (a further
/// round) before it reports the target complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_during_the_copy_gets_its_view_copied() {
    use std::sync::Arc;
    let src = Node::start().await;
    let tgt = Node::start().await;
    let s = |n: u64| Seq::new(E1, n);
    for c in [&src, &tgt] {
        c.attach(E1).await;
        c.write(0, BLOCKS, s(1)).await;
    }
    // The target away: every block from 32 on changes on the source only.
    src.write(32, BLOCKS - 32, s(2)).await;
    for c in [&src, &tgt] {
        c.client.announce_epoch(VOL, E2).await.expect("announce");
    }
    // ResyncWrites held back, so the copy is still early when the cut lands.
    let proxy = delaying_proxy(tgt.addr, std::time::Duration::from_millis(20)).await;
    let copier_target = ReplicaClient::new(proxy, ballast_replica::ClientOptions::default());
    let first_batch = Arc::new(tokio::sync::Notify::new());
    let seen = first_batch.clone();
    let opts = ResyncOptions { batch_blocks: 32, concurrency: 1, ..ResyncOptions::default() };
    let source = src.client.clone();
    let copy = tokio::spawn(async move {
        resync_chunk(&source, &copier_target, CHUNK, CHUNK_SIZE, E2, &opts, |_| seen.notify_one()).await
    });
    tokio::time::timeout(HANG_GUARD, first_batch.notified()).await.expect("a first batch");
    // The front end (which sends to the rebuilding target too): the cut, then
    // overwrites near the end of the chunk, above it.
    let cut = Seq::new(E2, 5);
    for c in [&src, &tgt] {
        c.client.set_cuts(VOL, E2, &[cut]).await.expect("cut");
    }
    let late = BLOCKS - 16;
    for c in [&src, &tgt] {
        c.write(late, 8, Seq::new(E2, 6)).await;
    }
    let stats =
        tokio::time::timeout(HANG_GUARD, copy).await.expect("copy finishes").expect("copy task").expect("resync");
    // The away blocks, but for the 8 the front end overwrote before the live
    // copy reached them (and which the view's round copies).
    assert!(stats.blocks_copied >= u64::from(BLOCKS - 32 - 8), "the away blocks were copied: {stats:?}");
    // The view at the cut holds the source's s(2) versions of the
    // overwritten blocks, on the target too.
    let differing = assert_views_identical(&src, &tgt, &[cut], E2).await;
    assert_eq!(differing, vec![8], "live differs from the cut's view in the overwritten blocks");
    let (t, _) = view(&tgt.client, Some(cut), E2).await;
    assert!(t[late as usize..late as usize + 8].iter().all(|c| c.seq == s(2)), "the cut's view on the target");
    src.stop().await;
    tgt.stop().await;
}
