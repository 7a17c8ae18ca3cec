//! The front end against real replica servers (in-process, over loopback TCP,
//! chunk stores in temp dirs) and the file-backed StaticMembership.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ballast_blockdev::{conformance, BlockDev, BlockError};
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{tcp_connector, EjectReason, StaticConfig, StaticMembership, Volume, VolumeOptions};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_types::{ChunkIdx, Epoch, NodeId, VolumeId, Zone};
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
    StaticConfig::new(
        VolumeSpec { id: VOL, name: "real".into(), size, chunk_size, min_in_sync },
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeSpec { id: NodeId(i as u64 + 1), zone: Zone(format!("z{}", i + 1)), addr: n.addr })
            .collect(),
        (1..=nodes.len() as u64).map(NodeId).collect(),
    )
}

type Vol = Volume<Arc<StaticMembership>, ReplicaClient>;

async fn attach(path: &Path) -> Arc<Vol> {
    let m = Arc::new(StaticMembership::load(path).unwrap());
    let client =
        ClientOptions { connections: 2, timeout: Duration::from_secs(5), connect_timeout: Duration::from_secs(2) };
    let opts = VolumeOptions { local_node: Some(NodeId(1)), io_timeout: Duration::from_secs(5), ..Default::default() };
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
    use ballast_types::{BlockIdx, ChunkId, Seq};
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
