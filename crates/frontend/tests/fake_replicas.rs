//! Front-end behaviour against in-process fake replicas whose every reply the
//! test decides: fan-out, ejection before acknowledgement, min-in-sync,
//! fencing, read repair, locality, splitting, attach and reconciliation.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ballast_blockdev::{BlockDev, BlockError, MemDev};
use ballast_frontend::{EjectReason, FrontendError, ReplicaError, Volume, VolumeOptions};
use ballast_types::{ChunkIdx, Epoch, NodeId, Seq};
use bytes::Bytes;
use common::{Cluster, Event, FakeMembership, FakeReplica, VOL};
use tokio::sync::Notify;

const MIB: u64 = 1 << 20;
type Vol = Volume<Arc<FakeMembership>, FakeReplica>;

fn opts(local: Option<u64>) -> VolumeOptions {
    VolumeOptions { local_node: local.map(NodeId), io_timeout: Duration::from_secs(5), ..Default::default() }
}

async fn attach(c: &Cluster, local: Option<u64>) -> Arc<Vol> {
    Volume::attach(c.membership.clone(), c.connector(), VOL, opts(local)).await.expect("attach")
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

fn is_write_to(node: u64) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Write { node: n, .. } if *n == NodeId(node))
}

#[tokio::test]
async fn write_fans_out_to_every_in_sync_replica() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    let data = pattern(8192, 1);
    v.write(4096, data.clone(), false).await.unwrap();
    for n in 1..=3 {
        assert_eq!(c.log.count(is_write_to(n)), 1, "node {n} got the write");
        assert_eq!(c.replica(n).raw(0, 4096, 8192), data.to_vec());
        // Lazily created on first touch.
        assert_eq!(c.log.count(|e| *e == Event::Create { node: NodeId(n), chunk: 0 }), 1);
    }
    let seq = c.replica(1).ctx(0, 1).unwrap().seq;
    assert_eq!(seq.epoch, v.epoch());
    assert_eq!(c.replica(2).ctx(0, 2).unwrap().seq, seq, "one Seq per write on every replica");
    assert_eq!(v.read(4096, 8192).await.unwrap(), data);
    let s = v.stats();
    assert_eq!((s.writes, s.bytes_written, s.reads, s.ejections), (1, 8192, 1, 0));
}

#[tokio::test]
async fn failed_replica_is_ejected_before_the_ack() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    c.replica(2).with(|s| s.fail_writes = Some(ReplicaError::Transport("reset".into())));
    v.write(0, pattern(4096, 2), false).await.unwrap();
    c.log.push(Event::Ack("write"));
    let eject = c
        .log
        .position(|e| *e == Event::Eject { node: NodeId(2), chunk: 0, reason: EjectReason::Transport })
        .expect("node 2 ejected");
    let ack = c.log.position(|e| *e == Event::Ack("write")).unwrap();
    assert!(eject < ack, "ejection must be committed before the write is acknowledged");
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap().in_sync, vec![NodeId(1), NodeId(3)]);
    assert_eq!(v.stats().ejections, 1);

    // Ejected replicas get nothing more from this attachment, not even reads.
    c.replica(2).with(|s| s.fail_writes = None);
    v.write(8192, pattern(4096, 3), false).await.unwrap();
    assert_eq!(c.log.count(is_write_to(2)), 0);
    for _ in 0..6 {
        v.read(8192, 4096).await.unwrap();
    }
    assert_eq!(c.log.count(|e| matches!(e, Event::Read { node: NodeId(2), .. })), 0);
    // Other chunks keep node 2.
    assert!(v.replica_set(ChunkIdx(1)).unwrap().in_sync.contains(&NodeId(2)));
}

#[tokio::test]
async fn write_fails_rather_than_drop_below_min_in_sync() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    v.write(0, pattern(4096, 1), false).await.unwrap();
    c.replica(2).with(|s| s.fail_writes = Some(ReplicaError::Failed("Io: disk".into())));
    c.replica(3).with(|s| s.fail_writes = Some(ReplicaError::Timeout { op: "write" }));
    let r = v.write(0, pattern(4096, 2), false).await;
    assert!(matches!(r, Err(BlockError::Io(_))), "{r:?}");
    assert_eq!(c.log.count(|e| matches!(e, Event::Eject { .. })), 0, "nobody ejected");
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap().in_sync.len(), 3);
    assert_eq!(v.stats().errors, 1);

    // One at a time: the first failure is ejected, the next would leave 1 < 2.
    c.replica(3).with(|s| s.fail_writes = None);
    v.write(0, pattern(4096, 3), false).await.unwrap();
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap().in_sync, vec![NodeId(1), NodeId(3)]);
    c.replica(3).with(|s| s.fail_writes = Some(ReplicaError::Transport("gone".into())));
    assert!(v.write(0, pattern(4096, 4), false).await.is_err());
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap().in_sync, vec![NodeId(1), NodeId(3)]);
}

#[tokio::test]
async fn write_fails_when_the_ejection_cannot_be_committed() {
    let c = Cluster::new(3, 4 * MIB, MIB, 1);
    let v = attach(&c, None).await;
    *c.membership.fail_eject.lock().unwrap() = true;
    c.replica(1).with(|s| s.fail_writes = Some(ReplicaError::Transport("reset".into())));
    assert!(matches!(v.write(0, pattern(4096, 1), false).await, Err(BlockError::Io(_))));
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap().in_sync.len(), 3);
}

#[tokio::test]
async fn fenced_reply_stops_the_volume() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    v.write(0, pattern(4096, 1), false).await.unwrap();
    // A newer front end announced itself on node 3.
    c.replica(3).with(|s| s.epochs.insert(VOL, Epoch(v.epoch().0 + 1)));
    assert_eq!(v.write(0, pattern(4096, 2), false).await, Err(BlockError::Shutdown));
    assert!(v.is_stopped());
    assert_eq!(v.read(0, 4096).await, Err(BlockError::Shutdown));
    assert_eq!(v.flush().await, Err(BlockError::Shutdown));
    assert_eq!(c.log.count(|e| matches!(e, Event::Eject { .. })), 0, "fencing ejects nobody");
}

#[tokio::test]
async fn attach_is_refused_by_a_newer_epoch() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    c.replica(1).with(|s| s.epochs.insert(VOL, Epoch(50)));
    let r = Volume::attach(c.membership.clone(), c.connector(), VOL, opts(None)).await;
    assert!(matches!(r, Err(FrontendError::Fenced { node: NodeId(1), .. })), "{:?}", r.err());
}

#[tokio::test]
async fn checksum_error_reads_another_replica_and_repairs() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, Some(1)).await;
    let data = pattern(16384, 9);
    v.write(MIB + 8192, data.clone(), false).await.unwrap();
    let seq = c.replica(2).ctx(1, 3).unwrap().seq;
    let id = ballast_types::ChunkId::new(VOL, ChunkIdx(1));
    c.replica(1).with(|s| {
        s.corrupt.insert((id, 3));
        s.chunks.get_mut(&id).unwrap().data[3 * 4096] ^= 0xff;
    });
    assert_eq!(v.read(MIB + 8192, 16384).await.unwrap(), data, "good data served");
    assert_eq!(v.stats().read_repairs, 1);
    assert_eq!(c.replica(1).raw(1, 8192, 16384), data.to_vec(), "bad copy rewritten");
    assert!(c.replica(1).with(|s| s.corrupt.is_empty()));
    assert!(c.replica(1).ctx(1, 3).unwrap().seq > seq, "repair writes under a fresh seq");
    assert_eq!(c.replica(1).ctx(1, 3), c.replica(2).ctx(1, 3), "replicas agree after the repair");
    assert_eq!(c.replica(1).ctx(1, 3), c.replica(3).ctx(1, 3));
    assert_eq!(v.replica_set(ChunkIdx(1)).unwrap().in_sync.len(), 3, "a repaired replica stays in sync");
    // The next read is served by the local node again, without repair.
    assert_eq!(v.read(MIB + 8192, 16384).await.unwrap(), data);
    assert_eq!(v.stats().read_repairs, 1);
}

#[tokio::test]
async fn reads_prefer_the_local_node() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, Some(3)).await;
    v.write(0, pattern(65536, 4), false).await.unwrap();
    for i in 0..10 {
        v.read(i * 4096, 4096).await.unwrap();
    }
    let reads = |n: u64| c.log.count(move |e| matches!(e, Event::Read { node, .. } if *node == NodeId(n)));
    assert_eq!((reads(1), reads(2), reads(3)), (0, 0, 10));

    // Without a local node, reads spread over the replicas.
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    v.write(0, pattern(4096, 4), false).await.unwrap();
    for _ in 0..9 {
        v.read(0, 4096).await.unwrap();
    }
    assert_eq!((reads_of(&c, 1), reads_of(&c, 2), reads_of(&c, 3)), (3, 3, 3));
}

fn reads_of(c: &Cluster, n: u64) -> usize {
    c.log.count(move |e| matches!(e, Event::Read { node, .. } if *node == NodeId(n)))
}

#[tokio::test]
async fn read_of_never_written_chunk_is_zeros_and_read_failure_ejects() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, Some(1)).await;
    assert_eq!(v.read(2 * MIB, 8192).await.unwrap(), vec![0u8; 8192]);
    v.write(0, pattern(4096, 5), false).await.unwrap();
    c.replica(1).with(|s| s.fail_all = Some(ReplicaError::Transport("refused".into())));
    assert_eq!(v.read(0, 4096).await.unwrap(), pattern(4096, 5));
    assert!(!v.replica_set(ChunkIdx(0)).unwrap().in_sync.contains(&NodeId(1)));
    assert!(c.log.position(|e| matches!(e, Event::Eject { node: NodeId(1), chunk: 0, .. })).is_some());
}

#[tokio::test(start_paused = true)]
async fn hung_replica_times_out_and_is_ejected() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    c.replica(3).with(|s| s.hang = true);
    v.write(0, pattern(4096, 6), false).await.unwrap();
    assert!(c
        .log
        .position(|e| *e == Event::Eject { node: NodeId(3), chunk: 0, reason: EjectReason::Timeout })
        .is_some());
}

#[tokio::test]
async fn flush_reaches_every_holder_and_ejects_a_failing_one() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    v.write(0, pattern(4096, 1), true).await.unwrap();
    v.write(3 * MIB, pattern(4096, 1), false).await.unwrap();
    v.flush().await.unwrap();
    for n in 1..=3 {
        assert_eq!(c.log.count(|e| *e == Event::Flush { node: NodeId(n) }), 1);
        assert!(c.replica(n).with(|s| s.chunks.values().all(|ch| !ch.dirty)), "flush clears dirty marks");
    }
    c.replica(2).with(|s| s.fail_flush = Some(ReplicaError::Failed("Io: fsync".into())));
    v.flush().await.unwrap();
    for chunk in 0..4 {
        assert!(!v.replica_set(ChunkIdx(chunk)).unwrap().in_sync.contains(&NodeId(2)));
    }
    assert_eq!(v.stats().flushes, 2);
}

#[tokio::test]
async fn attach_ejects_an_unreachable_node_before_io() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    c.replica(3).with(|s| s.fail_all = Some(ReplicaError::Transport("connection refused".into())));
    let v = attach(&c, None).await;
    for chunk in 0..4 {
        assert_eq!(v.replica_set(ChunkIdx(chunk)).unwrap().in_sync, vec![NodeId(1), NodeId(2)]);
        assert!(c
            .log
            .position(|e| *e == Event::Eject { node: NodeId(3), chunk, reason: EjectReason::AttachUnreachable })
            .is_some());
    }
    let first_write = c.log.position(|e| matches!(e, Event::Write { .. }));
    assert!(first_write.is_none(), "no I/O during attach");
    v.write(0, pattern(4096, 1), false).await.unwrap();
    assert_eq!(c.log.count(is_write_to(3)), 0);

    // With min-in-sync 3 the same failure makes the attach fail.
    let c = Cluster::new(3, 4 * MIB, MIB, 3);
    c.replica(3).with(|s| s.fail_all = Some(ReplicaError::Transport("connection refused".into())));
    let r = Volume::attach(c.membership.clone(), c.connector(), VOL, opts(None)).await;
    assert!(matches!(r, Err(FrontendError::BelowMinInSync { .. })), "{:?}", r.err());
}

#[tokio::test]
async fn reconciliation_copies_the_highest_seq_blocks() {
    const CS: u64 = MIB;
    let c = Cluster::new(3, 4 * MIB, CS, 2);
    let old = Seq::new(Epoch(1), 4);
    let newer = Seq::new(Epoch(1), 5);
    let newest = Seq::new(Epoch(1), 7);
    let (a, b, d) = (pattern(4096, 0xa), pattern(65536, 0xb), pattern(8192, 0xd));
    for n in 1..=3 {
        c.replica(n).with(|s| s.epochs.insert(VOL, Epoch(1)));
        c.replica(n).seed(0, CS, 0, &b, old, false);
    }
    // The previous front end crashed mid-writes: node 1 got `newer` at block 0,
    // node 2 got `newest` at blocks 5..7; chunk 2 reached nodes 1 and 2 only.
    c.replica(1).seed(0, CS, 0, &a, newer, true);
    c.replica(2).seed(0, CS, 5 * 4096, &d, newest, true);
    c.replica(1).seed(2, CS, 0, &a, newer, true);
    c.replica(2).seed(2, CS, 0, &a, newer, true);
    // The previous attach was epoch 1; this one is 2.
    *c.membership.epoch.lock().unwrap() = Epoch(1);
    let v = attach(&c, None).await;
    assert_eq!(v.epoch(), Epoch(2));

    for n in 1..=3 {
        let r = c.replica(n);
        assert_eq!(r.raw(0, 0, 4096), a.to_vec(), "node {n} block 0");
        assert!(r.ctx(0, 0).unwrap().seq > newest, "fresh seq of the new epoch on node {n}");
        assert_eq!(r.ctx(0, 0), c.replica(1).ctx(0, 0), "identical contexts on node {n}");
        assert_eq!(r.raw(0, 5 * 4096, 8192), d.to_vec(), "node {n} blocks 5..7");
        assert_eq!(r.ctx(0, 6), c.replica(2).ctx(0, 6));
        assert_eq!(r.ctx(0, 4).unwrap().seq, old, "untouched blocks keep their seq");
        assert_eq!(r.raw(2, 0, 4096), a.to_vec(), "node {n} chunk 2 created and filled");
        assert!(r.with(|s| s.chunks.values().all(|ch| !ch.dirty)), "dirty marks cleared on node {n}");
    }
    assert_eq!(c.replica(3).ctx(0, 1), c.replica(1).ctx(0, 1));
    assert_eq!(v.stats().reconciled_blocks, 1 + 2 + 1);
    assert_eq!(v.read(0, 4096).await.unwrap(), a);
    // New writes sort after everything reconciled.
    v.write(0, pattern(4096, 1), false).await.unwrap();
    assert!(c.replica(3).ctx(0, 0).unwrap().seq > c.replica(3).ctx(0, 6).unwrap().seq);
}

#[tokio::test]
async fn read_repair_never_overwrites_a_concurrent_newer_write() {
    let c = Cluster::new(2, 4 * MIB, MIB, 1);
    let v = attach(&c, Some(1)).await;
    v.write(0, pattern(4096, 1), false).await.unwrap();
    let id = ballast_types::ChunkId::new(VOL, ChunkIdx(0));
    c.replica(1).with(|s| s.corrupt.insert((id, 0)));
    // The read finds node 1 corrupt, then stalls inside node 2's read holding
    // the OLD data, while a client write of new data completes.
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    c.replica(2).with(|s| s.pause_next_read = Some((entered.clone(), release.clone())));
    let reader = {
        let v = v.clone();
        tokio::spawn(async move { v.read(0, 4096).await })
    };
    entered.notified().await;
    let new = pattern(4096, 2);
    v.write(0, new.clone(), false).await.unwrap();
    let new_seq = c.replica(2).ctx(0, 0).unwrap().seq;
    release.notify_one();
    let got = reader.await.unwrap().unwrap();
    assert!(got == pattern(4096, 1) || got == new, "a read concurrent with a write returns old or new");
    // The acknowledged write survives on both replicas, with its own seq.
    for n in 1..=2 {
        assert_eq!(c.replica(n).raw(0, 0, 4096), new.to_vec(), "node {n} kept the acknowledged write");
        assert!(c.replica(n).ctx(0, 0).unwrap().seq >= new_seq);
    }
    assert_eq!(c.replica(1).ctx(0, 0), c.replica(2).ctx(0, 0));
    assert_eq!(v.read(0, 4096).await.unwrap(), new);
}

#[tokio::test]
async fn invalid_request_reply_fails_the_io_and_ejects_nobody() {
    // The layout says 1 MiB chunks, but node 2 created a smaller chunk: its
    // replies are "out of range", which is not the replica's failure.
    let c = Cluster::new(2, 4 * MIB, MIB, 1);
    c.replica(2).with(|s| s.epochs.insert(VOL, Epoch(0)));
    c.replica(2).seed(0, 64 * 1024, 0, &[0u8; 4096], Seq::ZERO, false);
    let v = attach(&c, None).await;
    let r = v.write(512 * 1024, pattern(4096, 1), false).await;
    assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "{r:?}");
    assert_eq!(c.log.count(|e| matches!(e, Event::Eject { .. })), 0);
}

#[tokio::test]
async fn trim_and_write_zeroes_pass_down_per_chunk() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let v = attach(&c, None).await;
    v.write(MIB - 8192, pattern(16384, 3), false).await.unwrap();
    v.trim(MIB - 4096, 8192).await.unwrap();
    assert_eq!(c.replica(2).raw(0, MIB - 8192, 8192), [pattern(4096, 3).to_vec(), vec![0; 4096]].concat());
    assert_eq!(c.replica(3).raw(1, 0, 4096), vec![0; 4096]);
    v.write_zeroes(MIB + 4096, 4096, true).await.unwrap();
    assert_eq!(v.read(MIB - 8192, 16384).await.unwrap(), [pattern(4096, 3).to_vec(), vec![0; 12288]].concat());
    // Zeroing a never-created chunk is a no-op that succeeds.
    v.write_zeroes(3 * MIB, 8192, false).await.unwrap();
    assert_eq!(c.log.count(|e| matches!(e, Event::Create { chunk: 3, .. })), 0);
}

#[tokio::test]
async fn requests_are_range_checked_first() {
    let c = Cluster::new(2, 4 * MIB, MIB, 1);
    let v = attach(&c, None).await;
    assert!(matches!(v.write(100, pattern(4096, 1), false).await, Err(BlockError::Misaligned { .. })));
    assert!(matches!(v.read(4 * MIB, 4096).await, Err(BlockError::OutOfRange { .. })));
    assert!(matches!(v.trim(4 * MIB - 4096, 8192).await, Err(BlockError::OutOfRange { .. })));
    assert_eq!(c.log.count(|e| matches!(e, Event::Write { .. } | Event::Read { .. })), 0);
}

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Write { block: u64, blocks: u64, seed: u8, fua: bool },
        Trim { block: u64, blocks: u64 },
        Zero { block: u64, blocks: u64 },
        Read { block: u64, blocks: u64 },
        Flush,
    }

    // 64 blocks of 4 KiB in chunks of 3 blocks (the last chunk partial).
    const BLOCKS: u64 = 64;

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(12)));
        prop_oneof![
            4 => (range.clone(), any::<u8>(), any::<bool>()).prop_map(|((block, blocks), seed, fua)| Op::Write { block, blocks, seed, fua }),
            1 => range.clone().prop_map(|(block, blocks)| Op::Trim { block, blocks }),
            1 => range.clone().prop_map(|(block, blocks)| Op::Zero { block, blocks }),
            3 => range.prop_map(|(block, blocks)| Op::Read { block, blocks }),
            1 => Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn chunk_spanning_io_matches_the_model(ops in proptest::collection::vec(op(), 1..40), local in 0u64..3) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let c = Cluster::new(2, BLOCKS * 4096, 3 * 4096, 1);
                let v = attach(&c, (local > 0).then_some(local)).await;
                let m = MemDev::new(BLOCKS * 4096, 4096);
                for op in ops {
                    match op {
                        Op::Write { block, blocks, seed, fua } => {
                            let d = pattern((blocks * 4096) as usize, seed);
                            assert_eq!(v.write(block * 4096, d.clone(), fua).await, m.write(block * 4096, d, fua).await);
                        }
                        Op::Trim { block, blocks } => {
                            assert_eq!(v.trim(block * 4096, blocks * 4096).await, m.trim(block * 4096, blocks * 4096).await);
                        }
                        Op::Zero { block, blocks } => {
                            assert_eq!(
                                v.write_zeroes(block * 4096, blocks * 4096, false).await,
                                m.write_zeroes(block * 4096, blocks * 4096, false).await
                            );
                        }
                        Op::Read { block, blocks } => {
                            let len = (blocks * 4096) as u32;
                            assert_eq!(v.read(block * 4096, len).await.unwrap(), m.read(block * 4096, len).await.unwrap());
                        }
                        Op::Flush => v.flush().await.unwrap(),
                    }
                }
                // Both replicas hold exactly the model's bytes.
                let all = m.read(0, (BLOCKS * 4096) as u32).await.unwrap();
                for r in &c.replicas {
                    let mut bytes = Vec::new();
                    for chunk in 0..BLOCKS.div_ceil(3) {
                        let len = (3 * 4096).min(BLOCKS * 4096 - chunk * 3 * 4096) as usize;
                        bytes.extend(r.raw(chunk as u32, 0, len));
                    }
                    assert_eq!(bytes, all.to_vec());
                }
            });
        }
    }
}

#[tokio::test]
async fn an_ejection_answer_naming_an_uninstalled_replica_needs_a_newer_layout() {
    let c = Cluster::new(3, 4 * MIB, MIB, 1);
    c.membership.layout.lock().unwrap().chunks[0].in_sync = vec![NodeId(1), NodeId(2)];
    let v = attach(&c, None).await;
    // The provider adds node 3 to chunk 0 as rebuilding (version 1); this
    // front end has not applied that layout yet.
    let v1 = {
        let mut l = c.membership.layout.lock().unwrap();
        l.chunks[0].version = 1;
        l.chunks[0].rebuilding = vec![NodeId(3)];
        l.clone()
    };
    // Node 2 fails a write; the ejection's answer (version 2) names node 3,
    // which must not be admitted that way (no ordering with in-flight writes).
    c.replica(2).with(|s| s.fail_writes = Some(ReplicaError::Transport("reset".into())));
    v.write(0, pattern(4096, 1), false).await.unwrap();
    let set = v.replica_set(ChunkIdx(0)).unwrap();
    assert_eq!((set.version, set.in_sync, set.rebuilding), (2, vec![NodeId(1)], vec![]));
    assert_eq!(c.log.count(is_write_to(3)), 0);

    // The layout read before the ejection is older than the chunk's set, which
    // lacks a member: the caller is told to apply a newer layout.
    let r = v.apply_layout(&v1).await;
    assert!(
        matches!(&r, Err(FrontendError::LayoutOutdated { chunks, installed: 0, .. }) if chunks == &[ChunkIdx(0)]),
        "{r:?}"
    );
    // The current layout has the same version as the set in use, and installs.
    let v2 = c.membership.layout.lock().unwrap().clone();
    assert_eq!(v2.chunks[0].version, 2);
    assert_eq!(v.apply_layout(&v2).await.unwrap(), 1);
    assert_eq!(v.apply_layout(&v2).await.unwrap(), 0);
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap().rebuilding, vec![NodeId(3)]);
    v.write(4096, pattern(4096, 2), false).await.unwrap();
    assert_eq!(c.log.count(is_write_to(3)), 1);
    assert_eq!(c.replica(3).raw(0, 4096, 4096), pattern(4096, 2).to_vec());
    for _ in 0..6 {
        assert_eq!(v.read(4096, 4096).await.unwrap(), pattern(4096, 2));
    }
    assert_eq!(reads_of(&c, 3), 0, "a rebuilding replica is never read");
}
