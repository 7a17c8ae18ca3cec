//! The order of effects when a snapshot is taken, with fake replicas that
//! log every request: a write in flight when `snapshot()` is called finishes
//! on every replica before any replica hears of the cut, a write issued while
//! the snapshot drains that chunk waits and gets a seq above the cut, every
//! write is wholly on one side of the cut on every replica, the cut is
//! recorded only after every replica has it, and a replica that refuses the
//! cut is ejected before client I/O resumes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ballast_blockdev::BlockDev;
use ballast_frontend::{ReplicaError, Volume, VolumeOptions};
use ballast_types::{NodeId, Seq};
use bytes::Bytes;
use common::{Cluster, Event, FakeMembership, FakeReplica, VOL};
use tokio::sync::Notify;

const MIB: u64 = 1 << 20;
type Vol = Volume<Arc<FakeMembership>, FakeReplica>;

async fn attach(c: &Cluster) -> Arc<Vol> {
    let opts = VolumeOptions { io_timeout: Duration::from_secs(5), ..Default::default() };
    Volume::attach(c.membership.clone(), c.connector(), VOL, opts).await.expect("attach")
}

/// (log position, seq) of the writes `node` got to chunk `chunk`.
fn write_seq(log: &[Event], node: u64, chunk: u32) -> Vec<(usize, Seq)> {
    log.iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            Event::Write { node: n, chunk: c, seq, .. } if *n == NodeId(node) && *c == chunk => Some((i, *seq)),
            _ => None,
        })
        .collect()
}

fn set_cuts_at(log: &[Event], node: u64) -> Vec<usize> {
    log.iter()
        .enumerate()
        .filter_map(|(i, e)| matches!(e, Event::SetCuts { node: n, .. } if *n == NodeId(node)).then_some(i))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cut_waits_for_writes_in_flight_and_later_writes_wait_for_the_cut() {
    let c = Cluster::new(3, 8 * MIB, 4 * MIB, 2);
    let v = attach(&c).await;
    // A write to chunk 0 stalls inside replica 2.
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    c.replica(2).with(|s| s.pause_next_write = Some((entered.clone(), release.clone())));
    let before = tokio::spawn({
        let v = v.clone();
        async move { v.write(0, Bytes::from(vec![1u8; 4096]), false).await }
    });
    entered.notified().await;
    let snapshot = tokio::spawn({
        let v = v.clone();
        async move { v.snapshot().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Issued now: a write to chunk 0 (the snapshot waits for that chunk's
    // lock, and this write queues behind it) and one to chunk 1 (not drained
    // yet: it may go either side of the cut, but wholly on one side).
    let during = tokio::spawn({
        let v = v.clone();
        async move { v.write(4096, Bytes::from(vec![2u8; 4096]), false).await }
    });
    let other = tokio::spawn({
        let v = v.clone();
        async move { v.write(4 * MIB, Bytes::from(vec![3u8; 4096]), false).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let early = c.log.events();
    assert_eq!(write_seq(&early, 1, 0).len(), 1, "the write queued behind the snapshot waits");
    assert!(set_cuts_at(&early, 1).is_empty(), "no replica hears of the cut while a write is in flight");
    release.notify_one();
    before.await.expect("join").expect("the write in flight completes");
    let cut = snapshot.await.expect("join").expect("snapshot").cut;
    during.await.expect("join").expect("the write issued during the drain completes");
    other.await.expect("join").expect("the write to the other chunk completes");

    let log = c.log.events();
    let recorded = log.iter().position(|e| matches!(e, Event::Snapshots(s) if s == &vec![cut])).expect("recorded");
    for node in 1..=3 {
        let cuts = set_cuts_at(&log, node);
        assert_eq!(cuts.len(), 1, "node {node} got the cut once");
        let [(w0, s0), (w1, s1)] = write_seq(&log, node, 0)[..] else { panic!("two writes to chunk 0 on node {node}") };
        assert!(s0 < cut && cut < s1, "node {node}: {s0} < {cut} < {s1}");
        assert!(w0 < cuts[0] && cuts[0] < w1, "node {node}: the write in flight, then the cut, then the later write");
        let [(wo, so)] = write_seq(&log, node, 1)[..] else { panic!("one write to chunk 1 on node {node}") };
        assert!((so < cut) == (wo < cuts[0]), "node {node}: the write to chunk 1 ({so}) is on one side of the cut");
        assert!(cuts[0] < recorded, "node {node} had the cut before it was recorded");
    }
    assert_eq!(v.snapshots().await, vec![cut]);
    // A re-attach installs the recorded cuts before anything else.
    v.close();
    drop(v);
    let v = attach(&c).await;
    let log = c.log.events();
    assert!(set_cuts_at(&log, 1).len() == 2, "re-attach sent the cuts again");
    assert_eq!(v.snapshots().await, vec![cut]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_refuses_the_cut_is_ejected_before_io_resumes() {
    let c = Cluster::new(3, 8 * MIB, 4 * MIB, 2);
    let v = attach(&c).await;
    v.write(0, Bytes::from(vec![1u8; 4096]), false).await.expect("write");
    c.replica(3).with(|s| s.fail_all = Some(ReplicaError::Failed("disk gone".into())));
    let cut = v.snapshot().await.expect("snapshot with two of three replicas").cut;
    for chunk in 0..2 {
        let set = v.replica_set(ballast_types::ChunkIdx(chunk)).expect("set");
        assert!(!set.is_member(NodeId(3)), "node 3 ejected from chunk {chunk}");
    }
    let log = c.log.events();
    let ejected =
        log.iter().rposition(|e| matches!(e, Event::Eject { node, .. } if *node == NodeId(3))).expect("eject");
    let recorded = log.iter().position(|e| matches!(e, Event::Snapshots(_))).expect("recorded");
    assert!(ejected < recorded, "ejected before the snapshot is recorded");
    v.write(0, Bytes::from(vec![2u8; 4096]), false).await.expect("a later write");
    let after = write_seq(&c.log.events(), 1, 0);
    assert!(after.last().is_some_and(|(_, s)| *s > cut));
    assert!(write_seq(&c.log.events(), 3, 0).len() <= 1, "the ejected replica gets no later write");
}

/// A node that becomes a write target of a volume with snapshots (a rebuild
/// target) gets the volume's cuts before the swap sends it any write: its
/// writes above a cut must freeze its layers like everyone else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_rebuild_target_gets_the_cuts_before_its_first_write() {
    let c = Cluster::new(3, 8 * MIB, 4 * MIB, 1);
    {
        let mut l = c.membership.layout.lock().unwrap();
        for chunk in &mut l.chunks {
            chunk.in_sync = vec![NodeId(1), NodeId(2)];
        }
    }
    let v = attach(&c).await;
    v.write(0, Bytes::from(vec![1u8; 4096]), false).await.expect("write");
    let cut = v.snapshot().await.expect("snapshot").cut;
    assert!(set_cuts_at(&c.log.events(), 3).is_empty(), "node 3 holds nothing of the volume yet");
    let next = {
        let mut l = c.membership.layout.lock().unwrap();
        l.chunks[0].version += 1;
        l.chunks[0].rebuilding = vec![NodeId(3)];
        l.clone()
    };
    assert_eq!(v.apply_layout(&next).await.expect("apply"), 1);
    v.write(4096, Bytes::from(vec![2u8; 4096]), false).await.expect("write");
    let log = c.log.events();
    let cuts = set_cuts_at(&log, 3);
    let writes = write_seq(&log, 3, 0);
    let [(w, s)] = writes[..] else { panic!("one write to node 3: {writes:?}") };
    assert!(cut < s, "the write is above the cut");
    assert!(cuts.len() == 1 && cuts[0] < w, "node 3 got the cut (at {cuts:?}) before its write (at {w})");
    assert!(matches!(&log[cuts[0]], Event::SetCuts { cuts: got, .. } if got == &vec![cut]), "{:?}", log[cuts[0]]);
}
