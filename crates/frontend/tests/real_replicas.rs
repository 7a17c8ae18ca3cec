//! The front end against real replica servers (in-process, over loopback TCP,
//! chunk stores in temp dirs) and the file-backed StaticMembership: the block
//! device contract, ejection, fencing, reconciliation, and live layout changes
//! (rebuilding replicas, promotion, the ordering guarantee of `apply_layout`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ballast_blockdev::{conformance, BlockDev, BlockError};
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{
    tcp_connector, EjectReason, FrontendError, Membership, ReplicaSet, StaticConfig, StaticMembership, Volume,
    VolumeOptions,
};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_types::{ChunkId, ChunkIdx, Epoch, NodeId, Seq, VolumeId, Zone};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
const VOL: VolumeId = VolumeId(42);

struct Node {
    addr: SocketAddr,
    task: JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start_node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), StoreOptions::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = ReplicaServer::new(store, ServerOptions::default());
    let task = tokio::spawn(server.serve(listener, std::future::pending()));
    Node { addr, task, _dir: dir }
}

fn config(nodes: &[Node], size: u64, chunk_size: u64, min_in_sync: usize) -> StaticConfig {
    config_at(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>(), size, chunk_size, min_in_sync)
}

/// Node i + 1 at `addrs[i]`, every chunk on all of them.
fn config_at(addrs: &[SocketAddr], size: u64, chunk_size: u64, min_in_sync: usize) -> StaticConfig {
    StaticConfig::new(
        VolumeSpec { id: VOL, name: "real".into(), size, chunk_size, min_in_sync },
        addrs.iter().enumerate().map(|(i, a)| node_spec(i as u64 + 1, *a)).collect(),
        (1..=addrs.len() as u64).map(NodeId).collect(),
    )
}

fn node_spec(id: u64, addr: SocketAddr) -> NodeSpec {
    NodeSpec { id: NodeId(id), zone: Zone(format!("z{id}")), addr }
}

type Vol = Volume<Arc<StaticMembership>, ReplicaClient>;

async fn attach(path: &Path) -> Arc<Vol> {
    attach_with(Arc::new(StaticMembership::load(path).unwrap()), 1).await
}

async fn attach_with(m: Arc<StaticMembership>, local_node: u64) -> Arc<Vol> {
    let client = ClientOptions {
        connections: 2,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let opts = VolumeOptions {
        local_node: Some(NodeId(local_node)),
        io_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    Volume::attach(m, tcp_connector(client), VOL, opts).await.expect("attach")
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed)).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_over_three_real_replicas() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    // 1 MiB chunks and a partial last chunk, so requests span chunks.
    StaticMembership::create(&path, config(&nodes, 16 * MIB + 256 * 1024, MIB, 2)).unwrap();
    let v = attach(&path).await;
    conformance::run(&*v).await;
    v.flush().await.unwrap();
    let s = v.stats();
    assert_eq!((s.ejections, s.errors > 0), (0, true), "invalid requests counted as errors, nobody ejected: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_is_ejected_and_io_continues() {
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    StaticMembership::create(&path, config(&nodes, 8 * MIB, MIB, 2)).unwrap();
    let v = attach(&path).await;

    let block = |i: u64| (i * 7919 % 2048) * 4096; // scattered over all 8 chunks
    for i in 0..200u64 {
        if i == 100 {
            // Drop node 3's server: its listener and connections go away mid-stream.
            nodes[2].task.abort();
        }
        v.write(block(i), pattern(4096, i as u8), i % 10 == 0).await.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    v.flush().await.unwrap();
    for i in 0..200u64 {
        assert_eq!(v.read(block(i), 4096).await.unwrap(), pattern(4096, i as u8), "block of write {i}");
    }
    for c in 0..8 {
        assert!(!v.replica_set(ChunkIdx(c)).unwrap().in_sync.contains(&NodeId(3)), "chunk {c}");
    }
    assert_eq!(v.stats().ejections, 8);

    // The ejections and the epoch are durable: a fresh load sees them.
    let cfg = StaticMembership::load(&path).unwrap().config().await;
    assert_eq!(cfg.state.epoch, Epoch(1));
    assert_eq!(cfg.state.ejected.len(), 8);
    assert!(cfg
        .state
        .ejected
        .iter()
        .all(|e| e.node == NodeId(3) && matches!(e.reason, EjectReason::Transport | EjectReason::Timeout)));
    let layout = cfg.layout();
    assert!(layout.chunks.iter().all(|s| s.in_sync == vec![NodeId(1), NodeId(2)] && s.version == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_fences_the_old_front_end_and_keeps_the_data() {
    let nodes = vec![start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    StaticMembership::create(&path, config(&nodes, 4 * MIB, MIB, 2)).unwrap();
    let old = attach(&path).await;
    let data = pattern(3 * 4096, 5);
    old.write(MIB - 4096, data.clone(), false).await.unwrap();
    // No flush: the chunks are left dirty, as after a front-end crash.

    let new = attach(&path).await;
    assert_eq!(new.epoch(), Epoch(2));
    assert_eq!(new.read(MIB - 4096, 3 * 4096).await.unwrap(), data);

    // The stale front end can no longer write: fenced, it stops.
    assert_eq!(old.write(0, pattern(4096, 6), false).await, Err(BlockError::Shutdown));
    assert!(old.is_stopped());
    assert_eq!(new.read(0, 4096).await.unwrap(), vec![0u8; 4096], "the fenced write reached nobody");
    new.write(0, pattern(4096, 7), true).await.unwrap();
    assert_eq!(new.read(0, 4096).await.unwrap(), pattern(4096, 7));
    assert_eq!(new.stats().ejections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_ejects_a_dead_node_persistently() {
    let mut nodes = vec![start_node().await, start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    StaticMembership::create(&path, config(&nodes, 2 * MIB, MIB, 2)).unwrap();
    nodes[1].task.abort();
    let _ = (&mut nodes[1].task).await; // wait until the listener is gone
    let v = attach(&path).await;
    v.write(0, pattern(8192, 1), true).await.unwrap();
    assert_eq!(v.read(0, 8192).await.unwrap(), pattern(8192, 1));
    let cfg = StaticMembership::load(&path).unwrap().config().await;
    assert_eq!(cfg.state.ejected.len(), 2);
    assert!(cfg.state.ejected.iter().all(|e| e.node == NodeId(2) && e.reason == EjectReason::AttachUnreachable));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_reconciles_a_write_that_reached_one_replica() {
    use ballast_types::BlockIdx;
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    StaticMembership::create(&path, config(&nodes, 4 * MIB, MIB, 2)).unwrap();
    let old = attach(&path).await;
    old.write(0, pattern(16384, 1), false).await.unwrap();
    old.flush().await.unwrap();
    // The old front end crashes in the middle of a write that reached node 2 only.
    let id = ChunkId::new(VOL, ChunkIdx(0));
    let c2 = ReplicaClient::new(nodes[1].addr, ClientOptions::default());
    c2.write(id, 4096, pattern(8192, 9), Seq::new(old.epoch(), 1_000), false).await.unwrap();
    drop(old);

    let new = attach(&path).await;
    let expected = [
        pattern(16384, 1).slice(0..4096).to_vec(),
        pattern(8192, 9).to_vec(),
        pattern(16384, 1).slice(12288..).to_vec(),
    ]
    .concat();
    assert_eq!(new.stats().reconciled_blocks, 2);
    let clients: Vec<ReplicaClient> =
        nodes.iter().map(|n| ReplicaClient::new(n.addr, ClientOptions::default())).collect();
    let table0 = clients[0].context_table(id, BlockIdx(0), 4, new.epoch()).await.unwrap();
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c.read(id, 0, 16384, new.epoch()).await.unwrap().to_vec(), expected, "node {}", i + 1);
        assert_eq!(
            c.context_table(id, BlockIdx(0), 4, new.epoch()).await.unwrap(),
            table0,
            "contexts agree on node {}",
            i + 1
        );
        assert!(c.list_dirty(VOL, new.epoch()).await.unwrap().is_empty(), "clean after reconcile on node {}", i + 1);
    }
    assert_eq!(new.read(0, 16384).await.unwrap().to_vec(), expected);
}

// ---- live layout changes ------------------------------------------------------

/// A direct client of one replica node, bypassing the volume.
fn direct(addr: SocketAddr) -> ReplicaClient {
    ReplicaClient::new(addr, ClientOptions::default())
}

/// What `node` stores at `offset` of chunk `chunk`; None if it has no such chunk.
async fn stored(c: &ReplicaClient, chunk: u32, offset: u64, len: u32, epoch: Epoch) -> Option<Bytes> {
    use ballast_replica::{ClientError, Status};
    match c.read(ChunkId::new(VOL, ChunkIdx(chunk)), offset, len, epoch).await {
        Ok(d) => Some(d),
        Err(ClientError::Remote { status: Status::NoSuchChunk, .. }) => None,
        Err(e) => panic!("direct read of chunk {chunk} at {offset}: {e}"),
    }
}

/// Writes straight to one replica (without flushing it), as a rebuild copier
/// (or a corruption) would.
async fn put(c: &ReplicaClient, chunk: u32, offset: u64, data: Bytes, seq: Seq) {
    let id = ChunkId::new(VOL, ChunkIdx(chunk));
    match c.create_chunk(id, MIB, seq.epoch).await {
        Ok(()) | Err(ballast_replica::ClientError::Remote { status: ballast_replica::Status::ChunkExists, .. }) => {}
        Err(e) => panic!("create chunk {chunk}: {e}"),
    }
    c.write(id, offset, data, seq, false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_replica_gets_writes_but_no_reads_until_promoted() {
    let nodes = [start_node().await, start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    let m = Arc::new(StaticMembership::create(&path, config(&nodes[..2], 4 * MIB, MIB, 2)).unwrap());
    // Node 3 is "local": once readable, it is read first.
    let v = attach_with(m.clone(), 3).await;
    let epoch = v.epoch();
    let c3 = direct(nodes[2].addr);
    let before = pattern(8192, 1);
    v.write(0, before.clone(), false).await.unwrap();

    // Meta adds node 3 to chunk 0 as rebuilding (a rebuild on a new node).
    m.add_node(node_spec(3, nodes[2].addr)).await.unwrap();
    let committed = m.add_rebuilding(ChunkIdx(0), NodeId(3)).await.unwrap();
    let layout = m.layout().await;
    assert_eq!(v.apply_layout(&layout).await.unwrap(), 1, "only chunk 0 changed");
    assert_eq!(v.apply_layout(&layout).await.unwrap(), 0, "the same version again changes nothing");
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap(), committed);
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap().rebuilding, vec![NodeId(3)]);
    assert_eq!(v.replica_set(ChunkIdx(1)).unwrap().version, 0);

    // Writes land on it (its epoch was announced: direct reads at it work) ...
    let after = pattern(16384, 2);
    v.write(64 * 1024, after.clone(), false).await.unwrap();
    assert_eq!(stored(&c3, 0, 64 * 1024, 16384, epoch).await.as_deref(), Some(&after[..]));
    // ... only the writes since the change (the rest is the copier's job) ...
    assert_eq!(stored(&c3, 0, 0, 8192, epoch).await.unwrap(), vec![0u8; 8192]);
    // ... and trims and flushes too.
    let marker = pattern(4096, 99);
    // An early seq of this epoch: the front end's later trim (a newer seq) must replace it.
    put(&c3, 0, 200 * 4096, marker.clone(), Seq::new(epoch, 1)).await;
    assert!(!c3.list_dirty(VOL, epoch).await.unwrap().is_empty());
    v.flush().await.unwrap();
    assert!(c3.list_dirty(VOL, epoch).await.unwrap().is_empty(), "the flush reached the rebuilding replica");
    // Reads never go to it: node 3 (local, read first if it were readable)
    // holds a block no other replica has, and nothing returns it.
    for _ in 0..8 {
        assert_eq!(v.read(200 * 4096, 4096).await.unwrap(), vec![0u8; 4096]);
        assert_eq!(v.read(0, 8192).await.unwrap(), before);
    }
    v.trim(200 * 4096, 4096).await.unwrap();
    assert_eq!(stored(&c3, 0, 200 * 4096, 4096, epoch).await.unwrap(), vec![0u8; 4096], "the trim reached it");
    // Other chunks do not write to it.
    v.write(MIB, pattern(4096, 3), false).await.unwrap();
    assert_eq!(stored(&c3, 1, 0, 4096, epoch).await, None);

    // The copier fills in the rest; meta promotes node 3.
    let c1 = direct(nodes[0].addr);
    let copied = stored(&c1, 0, 0, 8192, epoch).await.unwrap();
    put(&c3, 0, 0, copied, Seq::new(epoch, 1 << 41)).await;
    let promoted = m.promote(ChunkIdx(0), NodeId(3)).await.unwrap();
    assert_eq!(v.apply_layout(&m.layout().await).await.unwrap(), 1);
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap(), promoted);
    assert_eq!(promoted.in_sync, vec![NodeId(1), NodeId(2), NodeId(3)]);
    // Now reads may use it: a block only node 3 has is what the local read returns.
    put(&c3, 0, 240 * 4096, marker.clone(), Seq::new(epoch, 1 << 42)).await;
    assert_eq!(v.read(240 * 4096, 4096).await.unwrap(), marker);
    assert_eq!(v.read(0, 8192).await.unwrap(), before);
    assert_eq!(v.stats().ejections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rebuilding_replica_is_ejected_and_never_fails_a_write() {
    let mut nodes = [start_node().await, start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    // Two in sync with min-in-sync 2: ejecting an in-sync replica would fail
    // the write; ejecting a rebuilding one must not.
    let m = Arc::new(StaticMembership::create(&path, config(&nodes[..2], 4 * MIB, MIB, 2)).unwrap());
    let v = attach_with(m.clone(), 1).await;
    m.add_node(node_spec(3, nodes[2].addr)).await.unwrap();
    m.add_rebuilding(ChunkIdx(0), NodeId(3)).await.unwrap();
    m.add_rebuilding(ChunkIdx(1), NodeId(3)).await.unwrap();
    assert_eq!(v.apply_layout(&m.layout().await).await.unwrap(), 2);
    v.write(0, pattern(4096, 1), false).await.unwrap();
    assert!(stored(&direct(nodes[2].addr), 0, 0, 4096, v.epoch()).await.is_some());

    nodes[2].task.abort();
    let _ = (&mut nodes[2].task).await;
    for (i, offset) in [0, 4096, MIB, MIB + 8192].into_iter().enumerate() {
        v.write(offset, pattern(4096, 10 + i as u8), i % 2 == 0).await.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    v.flush().await.unwrap();
    for c in 0..2 {
        let set = v.replica_set(ChunkIdx(c)).unwrap();
        assert!(set.rebuilding.is_empty() && set.in_sync == vec![NodeId(1), NodeId(2)], "chunk {c}: {set:?}");
        assert_eq!(set.ejected.len(), 1, "chunk {c}: {set:?}");
    }
    assert_eq!(v.stats().ejections, 2);
    let persisted = StaticMembership::load(&path).unwrap().layout().await;
    assert!(persisted.chunks[..2].iter().all(|s| s.rebuilding.is_empty()
        && matches!(s.ejected[..], [(NodeId(3), EjectReason::Transport | EjectReason::Timeout)])));
    assert_eq!(v.read(MIB + 8192, 4096).await.unwrap(), pattern(4096, 13));

    // Node 3 comes back (on another port, with an empty store): the resync
    // adds it as rebuilding again; the volume reconnects to the new address
    // and announces its epoch there before writing to it.
    let back = start_node().await;
    m.set_node_addrs(vec![(NodeId(3), back.addr)]).await.unwrap();
    m.add_rebuilding(ChunkIdx(0), NodeId(3)).await.unwrap();
    assert_eq!(v.apply_layout(&m.layout().await).await.unwrap(), 1);
    v.write(8192, pattern(4096, 20), false).await.unwrap();
    assert_eq!(stored(&direct(back.addr), 0, 8192, 4096, v.epoch()).await.unwrap(), pattern(4096, 20));

    // A new node that cannot take the epoch is ejected before it joins.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    m.add_node(node_spec(4, dead)).await.unwrap();
    m.add_rebuilding(ChunkIdx(2), NodeId(4)).await.unwrap();
    assert_eq!(v.apply_layout(&m.layout().await).await.unwrap(), 1);
    let set = v.replica_set(ChunkIdx(2)).unwrap();
    assert!(set.rebuilding.is_empty() && set.ejected.iter().any(|e| e.0 == NodeId(4)), "{set:?}");
    assert_eq!(set, m.layout().await.chunks[2], "the ejection is committed");
    v.write(2 * MIB, pattern(4096, 30), false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layouts_of_another_volume_or_shape_are_refused() {
    let nodes = vec![start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    let m = Arc::new(StaticMembership::create(&path, config(&nodes, 4 * MIB, MIB, 1)).unwrap());
    let v = attach_with(m.clone(), 1).await;
    let good = m.layout().await;
    let mut other = good.clone();
    other.volume = VolumeId(43);
    assert!(matches!(v.apply_layout(&other).await, Err(FrontendError::Layout { .. })));
    let mut chunk_size = good.clone();
    chunk_size.chunk_size = 2 * MIB;
    chunk_size.chunks.truncate(2);
    assert!(matches!(v.apply_layout(&chunk_size).await, Err(FrontendError::Layout { .. })));
    // Newer versions in an unusable layout change nothing either.
    let mut overlapping = good.clone();
    overlapping.chunks[0].version = 7;
    overlapping.chunks[0].rebuilding = vec![NodeId(2)];
    assert!(matches!(v.apply_layout(&overlapping).await, Err(FrontendError::Layout { .. })));
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap(), good.chunks[0]);
    // An older layout than the one in use changes nothing.
    v.write(0, pattern(4096, 1), false).await.unwrap();
    m.eject(VOL, ChunkIdx(0), 0, NodeId(2), EjectReason::Timeout).await.unwrap();
    assert_eq!(v.apply_layout(&m.layout().await).await.unwrap(), 1);
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap().in_sync, vec![NodeId(1)]);
    assert_eq!(v.apply_layout(&good).await.unwrap(), 0, "stale");
    assert_eq!(v.replica_set(ChunkIdx(0)).unwrap().in_sync, vec![NodeId(1)]);
}

/// A TCP relay in front of a replica node whose replies the test can hold back,
/// so a write stays in flight for as long as the test wants.
struct HoldingProxy {
    addr: SocketAddr,
    hold: tokio::sync::watch::Sender<bool>,
}

async fn holding_proxy(upstream: SocketAddr) -> HoldingProxy {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hold, held) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
            let mut held = held.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    // Replies received while held wait here, unread by the client.
                    while *held.borrow_and_update() {
                        if held.changed().await.is_err() {
                            return;
                        }
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    HoldingProxy { addr, hold }
}

/// The ordering guarantee of `apply_layout`: (b) when it returns, no write
/// that was fanned out to the old set is in flight any more, and (a) every
/// write after it returns reaches the new rebuilding replica.
///
/// (b) is checked twice. Deterministically: write 0 is held in flight (node 1
/// stores it, its reply is held back by a relay) and apply_layout must not
/// return until it is released. And over racing writes: the moment
/// apply_layout returns, the test reads what the old set's replicas hold; every
/// write is then either on the new replica or already complete on the whole
/// old set. (That snapshot is taken just after the return, so a violation that
/// lands in between goes unseen; it never flags a correct implementation.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_layout_waits_for_writes_to_the_old_set_and_later_writes_reach_the_new_one() {
    const RACING: u64 = 32;
    let nodes = [start_node().await, start_node().await, start_node().await];
    let proxy = holding_proxy(nodes[0].addr).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    let cfg = config_at(&[proxy.addr, nodes[1].addr], 4 * MIB, MIB, 2);
    let m = Arc::new(StaticMembership::create(&path, cfg).unwrap());
    let v = attach_with(m.clone(), 1).await;
    let epoch = v.epoch();
    v.write(0, pattern(4096, 0), false).await.unwrap(); // chunk 0 exists on nodes 1 and 2
    m.add_node(node_spec(3, nodes[2].addr)).await.unwrap();
    m.add_rebuilding(ChunkIdx(0), NodeId(3)).await.unwrap();
    let layout = m.layout().await;

    const FIRST: u64 = 16; // block of write 0; write i is at block FIRST + i, all in chunk 0
    let block = |i: u64| (FIRST + i) * 4096;
    let expect = |i: u64| pattern(4096, i as u8 ^ 0x5a);
    let write = |i: u64| {
        let v = v.clone();
        tokio::spawn(async move { v.write(block(i), expect(i), false).await })
    };
    let (c1, c2, c3) = (direct(nodes[0].addr), direct(nodes[1].addr), direct(nodes[2].addr));
    let span = ((RACING + 1) * 4096) as u32;

    // Write 0 is in flight on the old set: node 1 has it, its reply is held.
    proxy.hold.send_replace(true);
    let held = write(0);
    while stored(&c1, 0, block(0), 4096, epoch).await.as_deref() != Some(&expect(0)[..]) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // More writes race with the change, on both sides of it.
    let mut racing: Vec<_> = (1..=RACING / 2).map(write).collect();
    let applying = {
        let (v, layout, c1, c2) = (v.clone(), layout.clone(), c1.clone(), c2.clone());
        tokio::spawn(async move {
            let changed = v.apply_layout(&layout).await.unwrap();
            // What the old set holds the moment apply_layout returned.
            let (on1, on2) = tokio::join!(stored(&c1, 0, block(0), span, epoch), stored(&c2, 0, block(0), span, epoch));
            (changed, on1.unwrap(), on2.unwrap())
        })
    };
    // The second batch starts once apply_layout has told node 3 the epoch (the
    // step before the swap), so it likely queues behind the swap.
    while c3.list_dirty(VOL, epoch).await.is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    racing.extend((RACING / 2 + 1..=RACING).map(write));
    // apply_layout cannot return while write 0 is in flight. (This cannot fail
    // a correct implementation, which waits for as long as the reply is held.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!applying.is_finished(), "apply_layout returned while a write to the old set was in flight");
    assert!(!held.is_finished());
    proxy.hold.send_replace(false);

    held.await.unwrap().unwrap();
    let (changed, on1, on2) = applying.await.unwrap();
    assert_eq!(changed, 1);
    let at = |snap: &Bytes, i: u64| snap[(i * 4096) as usize..((i + 1) * 4096) as usize] == expect(i)[..];
    assert!(at(&on1, 0) && at(&on2, 0), "write 0 was complete on the old set when apply_layout returned");
    assert_ne!(
        stored(&c3, 0, block(0), 4096, epoch).await.as_deref(),
        Some(&expect(0)[..]),
        "write 0 used the old set"
    );

    // Writes that start afterwards all reach the new replica ...
    let after: Vec<_> = (RACING + 1..=RACING + 16).map(write).collect();
    for (i, w) in (RACING + 1..).zip(after) {
        w.await.unwrap().unwrap();
        assert_eq!(stored(&c3, 0, block(i), 4096, epoch).await.unwrap(), expect(i), "write {i}");
    }
    // ... and every racing one is on the new replica or was complete on the
    // old set when apply_layout returned.
    let mut on_new = 0;
    for (i, w) in (1..).zip(racing) {
        w.await.unwrap().unwrap();
        let there = stored(&c3, 0, block(i), 4096, epoch).await.as_deref() == Some(&expect(i)[..]);
        assert!(there || (at(&on1, i) && at(&on2, i)), "write {i}: neither on node 3 nor complete when apply returned");
        on_new += u32::from(there);
    }
    eprintln!("racing writes that reached the new replica: {on_new}/{RACING}");
    for i in 0..=RACING + 16 {
        assert_eq!(v.read(block(i), 4096).await.unwrap(), expect(i), "write {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_grows_while_attached() {
    let nodes = vec![start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    let m = Arc::new(StaticMembership::create(&path, config(&nodes, 2 * MIB, MIB, 2)).unwrap());
    let v = attach_with(m.clone(), 1).await;
    v.write(MIB, pattern(4096, 1), false).await.unwrap();
    let beyond = v.write(3 * MIB, pattern(4096, 2), false).await;
    assert!(matches!(beyond, Err(BlockError::OutOfRange { .. })), "{beyond:?}");

    // The provider grew the volume to 4 chunks: the new ones are placed on the
    // same nodes (a fresh set at version 1).
    let mut grown = m.layout().await;
    grown.size = 4 * MIB;
    let fresh = ReplicaSet { version: 1, in_sync: vec![NodeId(1), NodeId(2)], rebuilding: vec![], ejected: vec![] };
    grown.chunks.extend([fresh.clone(), fresh]);
    assert_eq!(v.apply_layout(&grown).await.unwrap(), 2, "two chunks added");
    assert_eq!(v.size(), 4 * MIB);
    assert_eq!(v.apply_layout(&grown).await.unwrap(), 0, "applied once");
    v.write(3 * MIB, pattern(4096, 2), false).await.unwrap();
    v.flush().await.unwrap();
    assert_eq!(v.read(3 * MIB, 4096).await.unwrap(), pattern(4096, 2));
    assert_eq!(v.read(MIB, 4096).await.unwrap(), pattern(4096, 1), "old data kept");
    assert_eq!(v.read(2 * MIB, 4096).await.unwrap(), Bytes::from(vec![0u8; 4096]), "new space reads zeroes");
    for n in &nodes {
        assert_eq!(stored(&direct(n.addr), 3, 0, 4096, v.epoch()).await.unwrap(), pattern(4096, 2));
    }
    // Shrinking is refused and changes nothing.
    let mut shrunk = grown.clone();
    shrunk.size = 3 * MIB;
    shrunk.chunks.truncate(3);
    assert!(matches!(v.apply_layout(&shrunk).await, Err(FrontendError::Layout { .. })));
    assert_eq!(v.size(), 4 * MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_with_a_partial_last_chunk_does_not_grow() {
    let nodes = vec![start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    let m = Arc::new(StaticMembership::create(&path, config(&nodes, MIB + 8192, MIB, 1)).unwrap());
    let v = attach_with(m.clone(), 1).await;
    let mut grown = m.layout().await;
    grown.size = 3 * MIB;
    grown.chunks.push(ReplicaSet { version: 1, in_sync: vec![NodeId(1)], rebuilding: vec![], ejected: vec![] });
    assert!(matches!(v.apply_layout(&grown).await, Err(FrontendError::Layout { .. })));
    assert_eq!(v.size(), MIB + 8192);
}

/// Flips bytes of `chunk`'s data file on a node's disk, behind its store: bit rot.
fn rot_on_disk(node: &Node, chunk: u32, offset: u64) {
    use std::os::unix::fs::FileExt;
    let stem = ballast_chunkstore::layout::chunk_file_stem(ChunkId::new(VOL, ChunkIdx(chunk)));
    let path = node._dir.path().join("chunks").join(format!("{stem}.data"));
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_at(&[0xff, 0x00, 0x55], offset).unwrap();
    f.sync_all().unwrap();
}

/// The scrub against real chunk stores: rot flipped into the data files of two
/// replicas reads never use (one in the partial last chunk) is found by one
/// pass and rewritten; a direct read from each replica verifies afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_repairs_bit_rot_on_replicas_reads_never_use() {
    use ballast_frontend::ScrubOptions;
    let nodes = vec![start_node().await, start_node().await, start_node().await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    let size = 2 * MIB + 256 * 1024;
    StaticMembership::create(&path, config(&nodes, size, MIB, 2)).unwrap();
    let v = attach(&path).await; // local node 1: reads go there
    let data = pattern(size as usize, 11);
    v.write(0, data.clone(), false).await.unwrap();
    v.flush().await.unwrap();
    rot_on_disk(&nodes[1], 0, 200 * 4096 + 9);
    rot_on_disk(&nodes[2], 2, 10 * 4096 + 100);
    assert_eq!(v.read(0, size as u32).await.unwrap(), data, "reads from node 1 see nothing wrong");
    assert_eq!(v.stats().read_repairs, 0);
    let epoch = v.epoch();
    let (c2, c3) = (direct(nodes[1].addr), direct(nodes[2].addr));
    assert!(c2.read(ChunkId::new(VOL, ChunkIdx(0)), 0, MIB as u32, epoch).await.is_err(), "node 2 is rotten");
    assert!(c3.read(ChunkId::new(VOL, ChunkIdx(2)), 0, 256 * 1024, epoch).await.is_err(), "node 3 is rotten");

    let r = v.scrub(&ScrubOptions { rate_bytes_per_sec: 0, ..ScrubOptions::default() }).await.unwrap();
    assert_eq!((r.chunks, r.replicas_scanned, r.bytes_read), (3, 9, 3 * size), "{r:?}");
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable, r.failed_replicas), (2, 2, 0, 0), "{r:?}");
    assert_eq!(stored(&c2, 0, 0, MIB as u32, epoch).await.unwrap(), data.slice(..MIB as usize));
    assert_eq!(stored(&c3, 2, 0, 256 * 1024, epoch).await.unwrap(), data.slice(2 * MIB as usize..));
    let r = v.scrub(&ScrubOptions { rate_bytes_per_sec: 0, ..ScrubOptions::default() }).await.unwrap();
    assert_eq!((r.corrupt_pieces, r.bytes_read), (0, 3 * size), "the second pass finds nothing: {r:?}");
    assert_eq!(v.stats().ejections, 0);
}
