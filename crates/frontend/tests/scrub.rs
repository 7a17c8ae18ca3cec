//! The scrub against in-process fake replicas that corrupt blocks on command
//! (as the read-repair tests do): corrupt copies on replicas reads never use are
//! found and rewritten from a verified copy, a piece corrupt everywhere is left
//! alone, a concurrent client write wins, the pace is kept, and the schedule
//! runs passes until the volume stops.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ballast_blockdev::BlockDev;
use ballast_frontend::{
    scrub_periodically, FrontendError, ReplicaError, ReplicaIo, ScrubConfig, ScrubOptions, ScrubReport, Volume,
    VolumeOptions,
};
use ballast_types::{ChunkId, ChunkIdx, NodeId};
use bytes::Bytes;
use common::{Cluster, Event, FakeMembership, FakeReplica, VOL};
use tokio::sync::{watch, Notify};

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;
type Vol = Volume<Arc<FakeMembership>, FakeReplica>;

async fn attach(c: &Cluster, local: Option<u64>) -> Arc<Vol> {
    let opts =
        VolumeOptions { local_node: local.map(NodeId), io_timeout: Duration::from_secs(5), ..Default::default() };
    Volume::attach(c.membership.clone(), c.connector(), VOL, opts).await.expect("attach")
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

/// Unthrottled, in 256 KiB pieces (a 1 MiB chunk is 4 pieces).
fn quick() -> ScrubOptions {
    ScrubOptions { rate_bytes_per_sec: 0, piece_len: 256 * 1024 }
}

fn id(chunk: u32) -> ChunkId {
    ChunkId::new(VOL, ChunkIdx(chunk))
}

/// Rots `block` of `chunk` on `node`: flips its stored bytes and makes reads
/// covering it fail their checksum, as bit rot under a chunk store does.
fn rot(c: &Cluster, node: u64, chunk: u32, block: u32) {
    c.replica(node).with(|s| {
        s.corrupt.insert((id(chunk), block));
        s.chunks.get_mut(&id(chunk)).expect("chunk exists").data[block as usize * BS as usize + 17] ^= 0x5a;
    });
}

fn writes_since(c: &Cluster, from: usize) -> Vec<Event> {
    c.log.events()[from..].iter().filter(|e| matches!(e, Event::Write { .. })).cloned().collect()
}

#[tokio::test]
async fn a_corrupt_block_on_a_replica_reads_never_use_is_repaired_by_one_pass() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, Some(1)).await;
    let data = pattern(4 * MIB as usize, 3);
    v.write(0, data.clone(), false).await.unwrap();
    let written_seq = c.replica(3).ctx(2, 70).unwrap().seq;
    rot(&c, 3, 2, 70);
    // Reads prefer node 1: the rot on node 3 is never seen by them.
    assert_eq!(v.read(0, 4 * MIB as u32).await.unwrap(), data);
    assert_eq!(v.stats().read_repairs, 0);
    assert!(c.replica(3).with(|s| s.corrupt.contains(&(id(2), 70))), "reads did not find it");

    let before = c.log.events().len();
    let r = v.scrub(&quick()).await.unwrap();
    assert_eq!(
        (r.chunks, r.replicas_scanned, r.pieces, r.bytes_read, r.missing_chunks),
        (4, 12, 48, 12 * MIB, 0),
        "every piece of every in-sync copy read once: {r:?}"
    );
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable, r.failed_replicas), (1, 1, 0, 0), "{r:?}");
    // Block 70 is in piece 1 of chunk 2 (blocks 64..128): that piece, and only
    // it, was rewritten on every replica, once.
    let writes = writes_since(&c, before);
    assert_eq!(writes.len(), 3, "{writes:?}");
    for w in &writes {
        assert!(matches!(w, Event::Write { chunk: 2, offset, len, .. } if *offset == 256 * 1024 && *len == 256 * 1024));
    }
    assert_eq!(c.replica(3).raw(2, 0, MIB as usize), data[2 * MIB as usize..3 * MIB as usize].to_vec());
    assert!(c.replica(3).with(|s| s.corrupt.is_empty()));
    let ctx = c.replica(3).ctx(2, 70).unwrap();
    assert!(ctx.seq > written_seq, "rewritten under a fresh seq");
    assert_eq!(Some(ctx), c.replica(1).ctx(2, 70), "replicas agree after the rewrite");
    assert_eq!(Some(ctx), c.replica(2).ctx(2, 70));
    let s = v.stats();
    assert_eq!(
        (s.scrub_passes, s.scrubbed_bytes, s.scrub_corrupt, s.scrub_repaired, s.scrub_unrepairable),
        (1, 12 * MIB, 1, 1, 0)
    );
    assert_eq!(v.replica_set(ChunkIdx(2)).unwrap().in_sync.len(), 3, "nobody ejected");

    // A read forced to node 3 (a new front end local to it) verifies.
    v.close();
    let v3 = attach(&c, Some(3)).await;
    let reads_before = c.log.count(|e| matches!(e, Event::Read { node: NodeId(3), .. }));
    assert_eq!(v3.read(2 * MIB, MIB as u32).await.unwrap(), data.slice(2 * MIB as usize..3 * MIB as usize));
    assert_eq!(c.log.count(|e| matches!(e, Event::Read { node: NodeId(3), .. })), reads_before + 1);
    assert_eq!(v3.stats().read_repairs, 0);

    // A second pass finds nothing.
    let r = v3.scrub(&quick()).await.unwrap();
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable), (0, 0, 0));
}

#[tokio::test]
async fn corruption_on_two_replicas_in_different_pieces_is_all_repaired() {
    let c = Cluster::new(3, 2 * MIB, MIB, 2);
    let v = attach(&c, Some(1)).await;
    let data = pattern(2 * MIB as usize, 9);
    v.write(0, data.clone(), false).await.unwrap();
    rot(&c, 2, 0, 3); // piece 0 of chunk 0 on node 2
    rot(&c, 3, 0, 200); // piece 3 of chunk 0 on node 3
    rot(&c, 3, 1, 64); // piece 1 of chunk 1 on node 3
    let before = c.log.events().len();
    let r = v.scrub(&quick()).await.unwrap();
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable), (3, 3, 0), "{r:?}");
    assert_eq!(writes_since(&c, before).len(), 3 * 3, "three pieces rewritten on three replicas");
    for n in 1..=3 {
        assert_eq!(c.replica(n).raw(0, 0, MIB as usize), data[..MIB as usize].to_vec(), "node {n} chunk 0");
        assert_eq!(c.replica(n).raw(1, 0, MIB as usize), data[MIB as usize..].to_vec(), "node {n} chunk 1");
        assert!(c.replica(n).with(|s| s.corrupt.is_empty()), "node {n} verifies everywhere");
    }
    assert_eq!(c.replica(2).ctx(0, 3), c.replica(3).ctx(0, 3));
    assert_eq!(c.replica(1).ctx(0, 200), c.replica(3).ctx(0, 200));
    assert_eq!(v.stats().scrub_repaired, 3);
}

/// Two corrupt copies of one piece: the scan of the first finds the second
/// while looking for a good copy; one rewrite heals both.
#[tokio::test]
async fn two_corrupt_copies_of_one_piece_are_healed_by_one_rewrite() {
    let c = Cluster::new(3, MIB, MIB, 2);
    let v = attach(&c, None).await;
    let data = pattern(MIB as usize, 4);
    v.write(0, data.clone(), false).await.unwrap();
    rot(&c, 1, 0, 10);
    rot(&c, 2, 0, 11);
    let before = c.log.events().len();
    let r = v.scrub(&quick()).await.unwrap();
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable), (2, 2, 0), "{r:?}");
    assert_eq!(writes_since(&c, before).len(), 3, "one rewrite of the piece");
    for n in 1..=3 {
        assert_eq!(c.replica(n).raw(0, 0, MIB as usize), data.to_vec());
    }
}

/// Every copy of one piece is corrupt, each in a different block: the piece
/// is halved until each part has a verified copy somewhere, and every copy
/// ends whole; parts no copy fails are not written.
#[tokio::test]
async fn rot_in_different_blocks_of_every_copy_of_a_piece_is_all_repaired() {
    let c = Cluster::new(3, MIB, MIB, 2);
    let v = attach(&c, None).await;
    let data = pattern(MIB as usize, 6);
    v.write(0, data.clone(), false).await.unwrap();
    rot(&c, 1, 0, 3);
    rot(&c, 2, 0, 9);
    rot(&c, 3, 0, 60);
    let before = c.log.events().len();
    let r = v.scrub(&quick()).await.unwrap();
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable), (3, 3, 0), "{r:?}");
    for n in 1..=3 {
        assert_eq!(c.replica(n).raw(0, 0, MIB as usize), data.to_vec(), "node {n}");
        assert!(c.replica(n).with(|s| s.corrupt.is_empty()), "node {n} verifies");
    }
    // Blocks 0..64 hold every rot (piece 0 of 256 KiB); the rewrites stay
    // inside them, and only parts some copy failed were written.
    let writes = writes_since(&c, before);
    assert!(!writes.is_empty());
    for w in &writes {
        let Event::Write { offset, len, .. } = w else { unreachable!() };
        assert!(offset + *len as u64 <= 64 * BS, "a rewrite outside the corrupt piece: {w:?}");
        assert!((*len as u64) < 64 * BS, "parts, not the whole piece: {w:?}");
    }
}

#[tokio::test]
async fn a_piece_corrupt_on_every_replica_is_reported_and_never_written() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, Some(1)).await;
    let data = pattern(4 * MIB as usize, 5);
    v.write(0, data.clone(), false).await.unwrap();
    for n in 1..=3 {
        rot(&c, n, 1, 7);
    }
    // Elsewhere, an ordinary repairable rot: the pass goes on past the hopeless piece.
    rot(&c, 2, 3, 0);
    let rotten: Vec<Vec<u8>> = (1..=3).map(|n| c.replica(n).raw(1, 0, 256 * 1024)).collect();
    let seqs: Vec<_> = (1..=3).map(|n| c.replica(n).ctx(1, 7)).collect();
    let before = c.log.events().len();

    let r = v.scrub(&quick()).await.unwrap();
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable), (4, 1, 3), "{r:?}");
    let writes = writes_since(&c, before);
    assert!(
        writes.iter().all(|w| matches!(w, Event::Write { chunk: 3, .. })),
        "nothing written to chunk 1: {writes:?}"
    );
    for n in 1..=3 {
        assert_eq!(c.replica(n).raw(1, 0, 256 * 1024), rotten[n as usize - 1], "node {n}'s copy untouched");
        assert_eq!(c.replica(n).ctx(1, 7), seqs[n as usize - 1]);
        assert!(c.replica(n).with(|s| s.corrupt.contains(&(id(1), 7))), "still detected on node {n}");
    }
    assert_eq!(c.replica(2).raw(3, 0, 4096), data[3 * MIB as usize..3 * MIB as usize + 4096].to_vec());
    assert_eq!(v.replica_set(ChunkIdx(1)).unwrap().in_sync.len(), 3, "corruption ejects nobody");
    let s = v.stats();
    assert_eq!((s.scrub_corrupt, s.scrub_repaired, s.scrub_unrepairable), (4, 1, 3));
    // The client sees an error for it, not rotten bytes.
    assert!(v.read(MIB + 7 * BS, 4096).await.is_err());
}

/// The scrub's rewrite holds the chunk while it reads the good copy; a client
/// write to the same piece arrives then and waits. The client's data is what
/// every replica holds afterwards (its seq is taken after the rewrite's, so the
/// replicas' newest-seq rule keeps it, not the rewrite).
#[tokio::test]
async fn a_client_write_racing_the_scrub_rewrite_wins() {
    let c = Cluster::new(2, MIB, MIB, 1);
    let v = attach(&c, None).await;
    v.write(0, pattern(MIB as usize, 1), false).await.unwrap();
    rot(&c, 1, 0, 2);
    // Node 2's next read (the rewrite's source read) snapshots the OLD data,
    // then waits for the test.
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    c.replica(2).with(|s| s.pause_next_read = Some((entered.clone(), release.clone())));
    let scrub = {
        let v = v.clone();
        tokio::spawn(async move { v.scrub(&quick()).await })
    };
    entered.notified().await;
    let new = pattern(8192, 77);
    let writer = {
        let (v, new) = (v.clone(), new.clone());
        tokio::spawn(async move { v.write(2 * BS, new, false).await })
    };
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(!writer.is_finished(), "the client write waits for the rewrite");
    release.notify_one();
    writer.await.unwrap().unwrap();
    let r = scrub.await.unwrap().unwrap();
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable), (1, 1, 0), "{r:?}");
    for n in 1..=2 {
        assert!(c.replica(n).raw(0, 2 * BS, 8192) == new.to_vec(), "node {n} lost the client's write");
    }
    assert_eq!(c.replica(1).ctx(0, 2), c.replica(2).ctx(0, 2));
    assert_eq!(v.read(2 * BS, 8192).await.unwrap(), new);
    assert_eq!(v.read(0, 8192).await.unwrap(), pattern(MIB as usize, 1).slice(..8192));
}

/// A client write between the scan's read and the rewrite: the rewrite copies
/// the client's data (the current content), never the old.
#[tokio::test]
async fn a_client_write_between_detection_and_rewrite_wins() {
    let c = Cluster::new(2, MIB, MIB, 1);
    let v = attach(&c, None).await;
    v.write(0, pattern(MIB as usize, 1), false).await.unwrap();
    rot(&c, 1, 0, 2);
    // Node 1's scan read finds the rot, then waits.
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    c.replica(1).with(|s| s.pause_next_read = Some((entered.clone(), release.clone())));
    let scrub = {
        let v = v.clone();
        tokio::spawn(async move { v.scrub(&quick()).await })
    };
    entered.notified().await;
    let new = pattern(4096, 99);
    v.write(2 * BS, new.clone(), false).await.unwrap();
    release.notify_one();
    let r = scrub.await.unwrap().unwrap();
    assert_eq!(r.corrupt_pieces, 1, "{r:?}");
    for n in 1..=2 {
        assert_eq!(c.replica(n).raw(0, 2 * BS, 4096), new.to_vec(), "node {n} holds the client's write");
    }
    assert_eq!(v.read(2 * BS, 4096).await.unwrap(), new);
}

/// On tokio's paused clock: a pass reading 6 MiB in 24 pieces at 1 MiB/s waits
/// at least 23 x 0.25 s (each read after the first pays for the one before);
/// unthrottled, not at all.
#[tokio::test(start_paused = true)]
async fn the_scrub_keeps_its_pace() {
    let c = Cluster::new(3, 2 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    v.write(0, pattern(2 * MIB as usize, 1), false).await.unwrap();
    let start = tokio::time::Instant::now();
    let r = v.scrub(&ScrubOptions { rate_bytes_per_sec: MIB, piece_len: 256 * 1024 }).await.unwrap();
    assert_eq!((r.pieces, r.bytes_read), (24, 6 * MIB));
    let floor = Duration::from_secs(6) - Duration::from_millis(250);
    assert!(start.elapsed() >= floor, "{:?}", start.elapsed());
    assert!(r.throttled >= floor, "{r:?}");

    let start = tokio::time::Instant::now();
    let r = v.scrub(&quick()).await.unwrap();
    assert_eq!(r.bytes_read, 6 * MIB);
    assert_eq!((start.elapsed(), r.throttled), (Duration::ZERO, Duration::ZERO));
}

#[tokio::test]
async fn never_written_chunks_read_as_zeros_and_a_failing_replica_is_ejected() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    v.write(0, pattern(4096, 1), false).await.unwrap();
    // Chunks 1..3 exist nowhere; node 2 fails every request from now on.
    c.replica(2).with(|s| s.fail_all = Some(ReplicaError::Transport("reset".into())));
    let r = v.scrub(&quick()).await.unwrap();
    assert_eq!(r.missing_chunks, 3 * 2, "chunks 1..3 on nodes 1 and 3: {r:?}");
    assert_eq!(r.failed_replicas, 4, "node 2 failed on every chunk and was ejected from each: {r:?}");
    assert_eq!(r.bytes_read, 2 * MIB, "chunk 0 from nodes 1 and 3");
    for chunk in 0..4 {
        assert_eq!(v.replica_set(ChunkIdx(chunk)).unwrap().in_sync, vec![NodeId(1), NodeId(3)]);
        assert!(c
            .log
            .position(|e| matches!(e, Event::Eject { node: NodeId(2), chunk: ch, .. } if *ch == chunk))
            .is_some());
    }
    assert_eq!(c.log.count(|e| matches!(e, Event::Create { chunk: 1..=3, .. })), 0, "the scrub creates nothing");
}

#[tokio::test]
async fn a_fenced_scrub_stops_the_volume() {
    let c = Cluster::new(2, 2 * MIB, MIB, 1);
    let v = attach(&c, None).await;
    v.write(0, pattern(4096, 1), false).await.unwrap();
    // A newer front end announced itself.
    c.replica(1).with(|s| s.epochs.insert(VOL, ballast_types::Epoch(v.epoch().0 + 1)));
    let r = v.scrub(&quick()).await;
    assert!(matches!(r, Err(FrontendError::Stopped(VOL))), "{r:?}");
    assert!(v.is_stopped());
    assert_eq!(c.log.count(|e| matches!(e, Event::Eject { .. })), 0, "fencing ejects nobody");
}

/// The schedule: the first pass one interval after the start, then one per
/// interval, each report published; the task ends when the volume stops.
#[tokio::test(start_paused = true)]
async fn the_schedule_runs_a_pass_every_interval_until_the_volume_stops() {
    let c = Cluster::new(2, MIB, MIB, 1);
    let v = attach(&c, None).await;
    v.write(0, pattern(MIB as usize, 1), false).await.unwrap();
    let (tx, mut rx) = watch::channel::<Option<ScrubReport>>(None);
    let interval = Duration::from_secs(3600);
    let start = tokio::time::Instant::now();
    let task = tokio::spawn(scrub_periodically(v.clone(), ScrubConfig { interval, rate_bytes_per_sec: 0 }, tx));
    rx.changed().await.unwrap();
    assert!(start.elapsed() >= interval, "first pass after one interval");
    assert_eq!(rx.borrow_and_update().as_ref().map(|r| r.bytes_read), Some(2 * MIB));
    rot(&c, 2, 0, 1);
    rx.changed().await.unwrap();
    assert!(start.elapsed() >= 2 * interval);
    let r = rx.borrow_and_update().clone().unwrap();
    assert_eq!((r.corrupt_pieces, r.repaired), (1, 1));
    assert_eq!(v.stats().scrub_passes, 2);
    v.close();
    task.await.unwrap();
    assert!(rx.changed().await.is_err(), "the task ended and dropped its sender");
}

/// Checks the fake itself: a read at a replica directly after a repair verifies.
#[tokio::test]
async fn direct_read_of_a_repaired_copy_verifies() {
    let c = Cluster::new(2, MIB, MIB, 1);
    let v = attach(&c, Some(1)).await;
    v.write(0, pattern(MIB as usize, 6), false).await.unwrap();
    rot(&c, 2, 0, 0);
    let direct = c.replica(2).read(id(0), 0, 4096, v.epoch()).await;
    assert!(matches!(direct, Err(ReplicaError::ChecksumMismatch(_))));
    v.scrub(&quick()).await.unwrap();
    assert_eq!(c.replica(2).read(id(0), 0, 4096, v.epoch()).await.unwrap(), pattern(4096, 6));
}
