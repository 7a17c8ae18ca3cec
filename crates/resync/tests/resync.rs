//! resync_chunk between real replica servers on real chunk stores.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ballast_replica::{ClientOptions, ReplicaClient};
use ballast_resync::{resync_chunk, Progress, ResyncError, ResyncOptions, ResyncStats, Side};
use ballast_types::{BlockIdx, Seq};
use common::*;

fn small_batches() -> ResyncOptions {
    ResyncOptions { batch_blocks: 32, concurrency: 3, ..ResyncOptions::default() }
}

async fn resync(src: &Node, tgt: &Node, epoch: ballast_types::Epoch, opts: &ResyncOptions) -> ResyncStats {
    let last = Mutex::new(None::<Progress>);
    let stats = tokio::time::timeout(
        HANG_GUARD,
        resync_chunk(&src.client, &tgt.client, CHUNK, CHUNK_SIZE, epoch, opts, |p| {
            *last.lock().expect("progress lock") = Some(p);
        }),
    )
    .await
    .expect("resync finishes")
    .expect("resync");
    let p = last.lock().expect("progress lock").expect("progress reported");
    assert_eq!(p.blocks_done, u64::from(BLOCKS));
    assert_eq!(p.blocks_total, u64::from(BLOCKS));
    assert_eq!(p.stats, stats);
    assert_eq!(stats.blocks_compared, u64::from(BLOCKS));
    stats
}

/// (a) A brand-new replica gets exactly the written blocks (and the trimmed ones
/// as trims); afterwards both replicas are identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_rebuild_of_an_empty_target_copies_exactly_the_written_blocks() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.attach(E1).await;
    src.write(0, 3, Seq::new(E1, 1)).await;
    src.write(40, 20, Seq::new(E1, 2)).await;
    src.write(41, 2, Seq::new(E1, 3)).await; // overwrites two of them
    src.write(255, 1, Seq::new(E1, 4)).await;
    src.write(100, 8, Seq::new(E1, 5)).await;
    src.trim(102, 3, Seq::new(E1, 6)).await; // 3 of those become zeros
    let written = 3 + 20 + 1 + 8 - 3;

    let stats = resync(&src, &tgt, E1, &small_batches()).await;
    assert_eq!(stats.blocks_copied, written);
    assert_eq!(stats.blocks_trimmed, 3);
    assert_eq!(stats.blocks_skipped_newer, 0);
    assert_eq!(stats.blocks_busy, 0);
    assert_eq!(stats.bytes_copied, written * BS as u64);
    assert_identical(&src.client, &tgt.client, E1).await;
    // The target's chunk was flushed.
    assert!(tgt.client.list_dirty(VOL, E1).await.expect("list dirty").is_empty());

    // A second pass finds nothing to do.
    let again = resync(&src, &tgt, E1, &small_batches()).await;
    assert_eq!((again.blocks_copied, again.blocks_trimmed, again.bytes_copied), (0, 0, 0));
    src.stop().await;
    tgt.stop().await;
}

/// (b) After a full sync, N blocks change on the source only (the target was
/// away): the resync copies exactly those N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_resync_copies_only_the_changed_blocks() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.attach(E1).await;
    for i in 0..16u32 {
        src.write(i * 16, 4, Seq::new(E1, u64::from(i) + 1)).await;
    }
    resync(&src, &tgt, E1, &small_batches()).await;
    assert_identical(&src.client, &tgt.client, E1).await;

    // The target is away for a new attach: 5 + 1 + 7 blocks change on the source.
    src.client.announce_epoch(VOL, E2).await.expect("announce");
    src.write(1, 5, Seq::new(E2, 1)).await;
    src.write(130, 1, Seq::new(E2, 2)).await;
    src.write(200, 7, Seq::new(E2, 3)).await;
    let stats = resync(&src, &tgt, E2, &ResyncOptions::default()).await;
    assert_eq!(stats.blocks_copied, 13);
    assert_eq!(stats.blocks_trimmed, 0);
    assert_eq!(stats.bytes_copied, 13 * BS as u64);
    assert_identical(&src.client, &tgt.client, E2).await;
    src.stop().await;
    tgt.stop().await;
}

/// (c) A front end keeps writing to both replicas (newer seqs) while the copy
/// runs, on the very blocks being copied. No front-end write is ever undone:
/// afterwards the replicas are identical and every block written by the front
/// end holds its last write. The copier reaches the target through a proxy that
/// holds back its ResyncWrites, so front-end writes land between the compare and
/// the apply; rounds repeat until the target has refused such a raced copy at
/// least once (so the target's conditional is what was tested), at most 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_front_end_writes_are_never_overwritten() {
    let src = Arc::new(Node::start().await);
    let tgt = Arc::new(Node::start().await);
    src.attach(E1).await;
    tgt.attach(E1).await;
    let proxy = delaying_proxy(tgt.addr, std::time::Duration::from_millis(20)).await;
    let copier_target = ReplicaClient::new(proxy, ClientOptions::default());
    let counter = Arc::new(AtomicU64::new(1));
    let mut raced = 0;
    for round in 0..10 {
        // Lots to copy: every block of the chunk changes on the source only.
        for i in 0..(BLOCKS / 16) {
            let seq = Seq::new(E1, counter.fetch_add(1, Ordering::Relaxed));
            src.write(i * 16, 16, seq).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        // The front end: writes of 1..4 blocks at pseudo-random places, to both
        // replicas at once (as a write to a rebuilding replica goes), each with
        // a fresh, higher seq. Two writers, each owning the blocks of one parity,
        // so per block the front end's writes arrive in seq order.
        let mut writers = Vec::new();
        for w in 0..2u64 {
            let (src, tgt, stop, counter) = (src.clone(), tgt.clone(), stop.clone(), counter.clone());
            writers.push(tokio::spawn(async move {
                let mut x = 0x1234_5678_9abc_def1u64 ^ (w + 2 * round);
                let mut sent: Vec<(u32, u32, Seq)> = Vec::new();
                while !stop.load(Ordering::Relaxed) || sent.len() < 100 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = (x % 4) as u32 + 1;
                    let block = (((x >> 8) % u64::from(BLOCKS / 2 - 4)) as u32) * 2 + w as u32;
                    let seq = Seq::new(E1, counter.fetch_add(1, Ordering::Relaxed));
                    let data = blocks_data(block, len, seq);
                    let (a, b) = tokio::join!(
                        write_every_other(&src, block, len, &data, seq),
                        write_every_other(&tgt, block, len, &data, seq)
                    );
                    a.expect("front-end write to source");
                    b.expect("front-end write to target");
                    sent.push((block, len, seq));
                }
                sent
            }));
        }
        let opts = ResyncOptions { batch_blocks: 16, concurrency: 4, ..Default::default() };
        let stats = tokio::time::timeout(
            HANG_GUARD,
            resync_chunk(&src.client, &copier_target, CHUNK, CHUNK_SIZE, E1, &opts, |_| {}),
        )
        .await
        .expect("resync finishes")
        .expect("resync");
        stop.store(true, Ordering::Relaxed);
        let mut writes = Vec::new();
        for w in writers {
            writes.extend(w.await.expect("writer"));
        }
        assert!(stats.blocks_copied > 0);
        assert_identical(&src.client, &tgt.client, E1).await;
        // Every block the front end wrote holds the highest seq it wrote there.
        let mut best = vec![Seq::ZERO; BLOCKS as usize];
        for (block, len, seq) in writes {
            for b in (block..block + len).step_by(2) {
                best[b as usize] = best[b as usize].max(seq);
            }
        }
        let t = tgt.client.context_table(CHUNK, BlockIdx(0), BLOCKS, E1).await.expect("contexts");
        for (b, s) in best.iter().enumerate() {
            if *s != Seq::ZERO {
                assert_eq!(t[b].seq, *s, "round {round}: block {b} lost its newest front-end write");
            }
        }
        tracing::info!(round, ?stats, "concurrent resync");
        raced += stats.blocks_raced;
        if raced > 0 {
            break;
        }
    }
    assert!(raced > 0, "no copy ever raced a front-end write at the target in 10 rounds");
    for n in [src, tgt] {
        if let Ok(n) = Arc::try_unwrap(n) {
            n.stop().await;
        }
    }
}

/// Writes every other block of [block, +len) (block, block+2, ...), one request
/// each, with the matching slices of `data`.
async fn write_every_other(
    n: &Node,
    block: u32,
    len: u32,
    data: &bytes::Bytes,
    seq: Seq,
) -> Result<(), ballast_replica::ClientError> {
    for b in (block..block + len).step_by(2) {
        let at = (b - block) as usize * BS;
        n.client.write(CHUNK, u64::from(b) * BS as u64, data.slice(at..at + BS), seq, false).await?;
    }
    Ok(())
}

/// (d) Trims on the source reach the target as trims (no data sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_on_the_source_propagates() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.attach(E1).await;
    src.write(10, 30, Seq::new(E1, 1)).await;
    resync(&src, &tgt, E1, &small_batches()).await;

    src.trim(12, 9, Seq::new(E1, 2)).await;
    src.trim(39, 1, Seq::new(E1, 3)).await;
    let stats = resync(&src, &tgt, E1, &small_batches()).await;
    assert_eq!(stats.blocks_trimmed, 10);
    assert_eq!(stats.blocks_copied, 0);
    assert_eq!(stats.bytes_copied, 0);
    assert_identical(&src.client, &tgt.client, E1).await;
    let zeros = tgt.client.read(CHUNK, 12 * BS as u64, 9 * BS as u32, E1).await.expect("read");
    assert!(zeros.iter().all(|&b| b == 0));
    src.stop().await;
    tgt.stop().await;
}

/// (e) A newer attach fences the copy, on either side, as its own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_epoch_fences_the_copy() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.attach(E1).await;
    src.write(0, 4, Seq::new(E1, 1)).await;

    // The target already knows E2: announcing E1 to it is refused.
    tgt.client.announce_epoch(VOL, E2).await.expect("announce");
    let r = resync_chunk(&src.client, &tgt.client, CHUNK, CHUNK_SIZE, E1, &small_batches(), |_| {}).await;
    assert!(matches!(r, Err(ResyncError::Fenced { side: Side::Target, .. })), "{r:?}");
    assert!(r.as_ref().err().is_some_and(|e| e.is_fenced()));

    // The source knows E2: its first context table is refused.
    let tgt2 = Node::start().await;
    src.client.announce_epoch(VOL, E2).await.expect("announce");
    let r = resync_chunk(&src.client, &tgt2.client, CHUNK, CHUNK_SIZE, E1, &small_batches(), |_| {}).await;
    assert!(matches!(r, Err(ResyncError::Fenced { side: Side::Source, .. })), "{r:?}");

    // Retried with the new epoch, it goes through.
    let stats = resync(&src, &tgt2, E2, &small_batches()).await;
    assert_eq!(stats.blocks_copied, 4);
    assert_identical(&src.client, &tgt2.client, E2).await;
    src.stop().await;
    tgt.stop().await;
    tgt2.stop().await;
}

/// A write the target got under an earlier attach but the in-sync source never
/// did was never acknowledged: the source's copy replaces it, even though its
/// seq is higher. Writes of the current attach stay protected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_writes_of_an_earlier_attach_are_replaced() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.attach(E1).await;
    tgt.attach(E1).await;
    src.write(5, 2, Seq::new(E1, 3)).await;
    tgt.write(5, 2, Seq::new(E1, 3)).await;
    // Only the target got this one (it never completed on the source).
    tgt.write(6, 1, Seq::new(E1, 100)).await;
    // A block the source never had at all.
    tgt.write(50, 1, Seq::new(E1, 101)).await;

    // New attach at E2; the source is in sync, the target resyncs.
    src.client.announce_epoch(VOL, E2).await.expect("announce");
    let stats = resync(&src, &tgt, E2, &small_batches()).await;
    assert_eq!(stats.blocks_copied, 1, "block 6 gets the source's data back");
    assert_eq!(stats.blocks_trimmed, 1, "block 50 is zeros on the source");
    assert_identical(&src.client, &tgt.client, E2).await;

    // A write of the current attach on the target only is protected (it may be
    // a front-end write the source has yet to see).
    tgt.write(7, 1, Seq::new(E2, 1)).await;
    let stats = resync(&src, &tgt, E2, &small_batches()).await;
    assert_eq!(stats.blocks_skipped_newer, 1);
    assert_eq!(stats.blocks_copied + stats.blocks_trimmed, 0);
    // Unless the caller says the front end only began sending at E2.2.
    let opts = ResyncOptions { protect_from: 2, ..small_batches() };
    let stats = resync(&src, &tgt, E2, &opts).await;
    assert_eq!(stats.blocks_trimmed, 1);
    assert_identical(&src.client, &tgt.client, E2).await;
    src.stop().await;
    tgt.stop().await;
}

/// A source that has no such chunk has never been written: the target's stale
/// blocks of an earlier attach are zeroed, nothing is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_without_the_chunk_counts_as_never_written() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.client.announce_epoch(VOL, E2).await.expect("announce");
    tgt.attach(E1).await;
    tgt.write(3, 2, Seq::new(E1, 9)).await;
    let stats = resync(&src, &tgt, E2, &small_batches()).await;
    assert_eq!(stats.blocks_trimmed, 2);
    assert_eq!(stats.bytes_copied, 0);
    let data = tgt.client.read(CHUNK, 0, 8 * BS as u32, E2).await.expect("read");
    assert!(data.iter().all(|&b| b == 0));
    src.stop().await;
    tgt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_arguments_are_refused_before_any_io() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    let bad = ResyncOptions { concurrency: 0, ..ResyncOptions::default() };
    let r = resync_chunk(&src.client, &tgt.client, CHUNK, CHUNK_SIZE, E1, &bad, |_| {}).await;
    assert!(matches!(r, Err(ResyncError::InvalidArgument(_))), "{r:?}");
    let r = resync_chunk(&src.client, &tgt.client, CHUNK, 4095, E1, &ResyncOptions::default(), |_| {}).await;
    assert!(matches!(r, Err(ResyncError::InvalidArgument(_))), "{r:?}");
    // Nothing reached the target: no epoch was announced.
    assert_eq!(
        tgt.client.announce_epoch(VOL, ballast_types::Epoch(0)).await.expect("announce"),
        ballast_types::Epoch(0)
    );
    src.stop().await;
    tgt.stop().await;
}

/// A throttled copy reports how often and how long the throttle held it up (the
/// storage node's copy-throttle metrics); an unthrottled one never waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_copies_report_their_waits() {
    let src = Node::start().await;
    let tgt = Node::start().await;
    src.attach(E1).await;
    src.write(0, 200, Seq::new(E1, 1)).await;
    // 800 KiB at 2 MiB/s, a tenth of a second's worth at once: about 0.3 s of waits.
    let opts = ResyncOptions { max_bytes_per_sec: Some(2 << 20), ..small_batches() };
    let started = std::time::Instant::now();
    let stats = resync(&src, &tgt, E1, &opts).await;
    assert_eq!(stats.blocks_copied, 200);
    assert!(stats.throttle_waits >= 3, "{stats:?}");
    assert!(stats.throttled >= std::time::Duration::from_millis(100), "{stats:?}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(250), "{:?}", started.elapsed());

    let unthrottled = resync(&tgt, &src, E1, &small_batches()).await;
    assert_eq!((unthrottled.throttle_waits, unthrottled.throttled), (0, std::time::Duration::ZERO));
    src.stop().await;
    tgt.stop().await;
}
