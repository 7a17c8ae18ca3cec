//! The scrub and read repair over snapshot views, against real replica
//! servers (in-process, loopback TCP, chunk stores in temp dirs): bytes
//! rotted in frozen layers, which no live read touches, are found by one pass
//! and rewritten from a verified copy with their seqs, so every replica's own
//! copy of every view verifies afterwards; a pass reads each stored version
//! once; a snapshot read that meets a rotten copy repairs it; a block rotten on
//! every replica is reported and left as it was.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ballast_blockdev::BlockDev;
use ballast_chunkstore::{layout, ChunkStore, StoreOptions};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{tcp_connector, ScrubOptions, StaticConfig, StaticMembership, Volume, VolumeOptions};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_types::{ChunkId, ChunkIdx, NodeId, Seq, VolumeId, Zone};
use bytes::Bytes;
use tokio::net::TcpListener;

const MIB: u64 = 1 << 20;
const VOL: VolumeId = VolumeId(9);
const CHUNK: u64 = 4 * MIB;
const SIZE: u64 = 4 * CHUNK;
const BS: u64 = 4096;

struct Node {
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

async fn start_node() -> Node {
    let dir = tempfile::Builder::new().prefix("frontend-snapscrub").tempdir_in("/var/tmp").expect("tempdir");
    let store = ChunkStore::open(dir.path(), StoreOptions::default()).expect("open store");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(ReplicaServer::new(store, ServerOptions::default()).serve(listener, std::future::pending()));
    Node { addr, dir }
}

type Vol = Volume<Arc<StaticMembership>, ReplicaClient>;

fn options() -> ClientOptions {
    ClientOptions {
        connections: 2,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }
}

async fn volume(nodes: &[Node], dir: &Path) -> Arc<Vol> {
    let path = dir.join("vol.toml");
    let config = StaticConfig::new(
        VolumeSpec { id: VOL, name: "snapscrub".into(), size: SIZE, chunk_size: CHUNK, min_in_sync: 2 },
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeSpec { id: NodeId(i as u64 + 1), zone: Zone(format!("z{i}")), addr: n.addr })
            .collect(),
        vec![NodeId(1), NodeId(2), NodeId(3)],
    );
    StaticMembership::create(&path, config).expect("create membership");
    let m = Arc::new(StaticMembership::load(&path).expect("load membership"));
    let opts = VolumeOptions { local_node: Some(NodeId(1)), io_timeout: Duration::from_secs(5), ..Default::default() };
    Volume::attach(m, tcp_connector(options()), VOL, opts).await.expect("attach")
}

fn fill(len: u64, seed: u8) -> Bytes {
    Bytes::from((0..len as usize).map(|i| ((i / 4096) as u8).wrapping_mul(7).wrapping_add(seed)).collect::<Vec<u8>>())
}

async fn write_all(v: &Vol, offset: u64, len: u64, seed: u8) {
    let data = fill(len, seed);
    for o in (0..len).step_by(MIB as usize) {
        v.write(offset + o, data.slice(o as usize..(o + MIB) as usize), false).await.expect("write");
    }
    v.flush().await.expect("flush");
}

fn id(chunk: u32) -> ChunkId {
    ChunkId::new(VOL, ChunkIdx(chunk))
}

fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        } else if p.file_name().and_then(|f| f.to_str()) == Some(name) {
            return Some(p);
        }
    }
    None
}

/// Flips bytes of `block` in the data file of chunk `chunk`'s layer with
/// lower bound `lower` on `node`: bit rot under the chunk store.
fn rot(node: &Node, chunk: u32, lower: Seq, block: u64) {
    use std::os::unix::fs::FileExt;
    let name = format!("{}.data", layout::layer_file_stem(id(chunk), lower));
    let file = find(node.dir.path(), &name).unwrap_or_else(|| panic!("no layer file {name}"));
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&file).expect("open layer");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, block * BS + 17).expect("read");
    for x in &mut b {
        *x ^= 0xa5;
    }
    f.write_all_at(&b, block * BS + 17).expect("write");
    f.sync_all().expect("sync");
}

/// Every node's own copy of every chunk's view at `cut`: each read verifies
/// on that replica alone, and equals `want` (the view's content).
async fn each_copy_verifies(nodes: &[Node], v: &Vol, cut: Seq, want: &[Bytes]) {
    for (i, n) in nodes.iter().enumerate() {
        let c = ReplicaClient::new(n.addr, options());
        for (chunk, want) in want.iter().enumerate() {
            let got = c
                .read_snapshot(id(chunk as u32), cut, 0, CHUNK as u32, v.epoch())
                .await
                .unwrap_or_else(|e| panic!("node {}: chunk {chunk} at {cut}: {e}", i + 1));
            assert!(got == *want, "node {}: chunk {chunk} at {cut}: wrong data", i + 1);
        }
    }
}

fn quick() -> ScrubOptions {
    ScrubOptions { rate_bytes_per_sec: 0, piece_len: MIB as u32 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rot_in_blocks_only_snapshots_read_is_found_by_the_scrub_and_repaired_on_every_replica() {
    let nodes = [start_node().await, start_node().await, start_node().await];
    let dir = tempfile::tempdir().expect("tempdir");
    let v = volume(&nodes, dir.path()).await;

    // A everywhere; cut 1; B over chunks 0 and 1; cut 2; C over chunk 0. Kept
    // only for the snapshots: A of chunks 0 and 1 (the base layers, frozen at
    // cut 1) and B of chunk 0 (its layer above cut 1, frozen at cut 2).
    write_all(&v, 0, SIZE, 1).await;
    let cut1 = v.snapshot().await.expect("snapshot 1").cut;
    write_all(&v, 0, 2 * CHUNK, 2).await;
    let cut2 = v.snapshot().await.expect("snapshot 2").cut;
    write_all(&v, 0, CHUNK, 3).await;
    let (a, b, c) = (fill(CHUNK, 1), fill(CHUNK, 2), fill(CHUNK, 3));
    let at_cut1 = vec![a.clone(), a.clone(), a.clone(), a.clone()];
    let at_cut2 = vec![b.clone(), b.clone(), a.clone(), a.clone()];
    assert_eq!(v.read(0, CHUNK as u32).await.expect("live read"), c);

    // A clean pass reads the live copies and each version kept for the
    // snapshots once per replica: 16 MiB + 3 chunks of 4 MiB, on 3 replicas.
    let clean = v.scrub(&quick()).await.expect("scrub");
    assert_eq!(clean.snapshot_views, 4 * 2 * 3, "every chunk's view at each cut on each replica: {clean:?}");
    assert_eq!(clean.bytes_read, 3 * (SIZE + 3 * CHUNK), "each stored version read once: {clean:?}");
    assert_eq!((clean.corrupt_pieces, clean.repaired, clean.unrepairable, clean.failed_replicas), (0, 0, 0, 0));

    // Rot in frozen layers on each node, in blocks no live read touches.
    rot(&nodes[1], 0, Seq::ZERO, 100); // A of chunk 0, seen at cut 1
    rot(&nodes[2], 0, cut1, 7); // B of chunk 0, seen at cut 2
    rot(&nodes[0], 1, Seq::ZERO, 1000); // A of chunk 1, seen at cut 1
    assert_eq!(v.read(0, SIZE as u32 / 4).await.expect("live read after the rot"), c, "live data untouched");
    let r = v.scrub(&quick()).await.expect("scrub");
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable, r.failed_replicas), (3, 3, 0, 0), "{r:?}");
    each_copy_verifies(&nodes, &v, cut1, &at_cut1).await;
    each_copy_verifies(&nodes, &v, cut2, &at_cut2).await;
    let after = v.scrub(&quick()).await.expect("scrub");
    assert_eq!((after.corrupt_pieces, after.bytes_read), (0, clean.bytes_read), "a pass after the repair: {after:?}");

    // A snapshot read prefers node 1 (the local one): its rotten copy is
    // read around, the answer is right, and the copy is repaired.
    rot(&nodes[0], 1, Seq::ZERO, 5);
    assert_eq!(v.read_snapshot(cut1, CHUNK, CHUNK as u32).await.expect("snapshot read"), a);
    each_copy_verifies(&nodes, &v, cut1, &at_cut1).await;

    // Rotten on every replica: reported, nothing written, and a read of it
    // fails instead of returning rotten bytes.
    for n in &nodes {
        rot(n, 1, Seq::ZERO, 900);
    }
    let r = v.scrub(&quick()).await.expect("scrub");
    assert_eq!((r.corrupt_pieces, r.repaired, r.unrepairable), (3, 0, 3), "{r:?}");
    assert!(v.read_snapshot(cut1, CHUNK + 900 * BS, BS as u32).await.is_err(), "a rotten block read back");
    assert_eq!(v.read_snapshot(cut1, CHUNK, 4 * BS as u32).await.expect("the rest reads"), a.slice(..4 * BS as usize));
    // Deleting the snapshots leaves a clean live volume behind.
    v.delete_snapshot(cut1).await.expect("delete");
    v.delete_snapshot(cut2).await.expect("delete");
    let r = v.scrub(&quick()).await.expect("scrub");
    assert_eq!((r.snapshot_views, r.corrupt_pieces, r.bytes_read), (0, 0, 3 * SIZE), "{r:?}");
}
