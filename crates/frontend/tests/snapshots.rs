//! Snapshots through the front end, against real replica servers (in-process,
//! loopback TCP, chunk stores in temp dirs) and the file-backed
//! StaticMembership: crash consistency under a concurrent verifiable
//! workload, checked block by block against the ledger at each cut and as a
//! whole (one instant explains every block); the snapshots kept across a
//! re-attach and later writes; delete.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_blockdev::BlockDev;
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{tcp_connector, StaticConfig, StaticMembership, Volume, VolumeOptions};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_types::{NodeId, Seq, VolumeId, Zone, BLOCK_SIZE};
use ballast_verify::{pattern, BlockModel};
use bytes::Bytes;
use tokio::net::TcpListener;

const MIB: u64 = 1 << 20;
const VOL: VolumeId = VolumeId(7);
const SIZE: u64 = 32 * MIB;
const BS: u64 = BLOCK_SIZE as u64;
const BLOCKS: u64 = SIZE / BS;
const WORKERS: u64 = 8;

struct Node {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start_node() -> Node {
    let dir = tempfile::Builder::new().prefix("frontend-snap").tempdir_in("/var/tmp").expect("tempdir");
    let store = ChunkStore::open(dir.path(), StoreOptions::default()).expect("open store");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(ReplicaServer::new(store, ServerOptions::default()).serve(listener, std::future::pending()));
    Node { addr, _dir: dir }
}

type Vol = Volume<Arc<StaticMembership>, ReplicaClient>;

async fn attach(path: &Path) -> Arc<Vol> {
    let m = Arc::new(StaticMembership::load(path).expect("load membership"));
    let client = ClientOptions {
        connections: 2,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let opts = VolumeOptions { local_node: Some(NodeId(1)), io_timeout: Duration::from_secs(5), ..Default::default() };
    Volume::attach(m, tcp_connector(client), VOL, opts).await.expect("attach")
}

/// What the ledger allowed at a snapshot: per block, the last version
/// acknowledged when `snapshot()` was called and the last one issued when it
/// returned.
struct Cut {
    cut: Seq,
    floor: Vec<u64>,
    issued: Vec<u64>,
    took: Duration,
    /// The event clock when `snapshot()` was called and when it returned.
    called: u64,
    returned: u64,
}

/// Per block, per version (index = version - 1): the event clock when the
/// write was issued and when it was acknowledged.
type Events = Vec<Vec<(u64, Option<u64>)>>;

/// Crash consistency of a whole image: some instant `t` during the snapshot
/// call explains every block, i.e. each block's version was issued before `t`
/// and its next version was not acknowledged before `t`. (The per-block
/// ledger check alone would accept an image mixing instants.)
fn one_instant(cut: &Cut, image: &[u8], events: &Events) -> Result<(u64, u64), String> {
    let (mut after, mut before) = (cut.called, cut.returned);
    for b in 0..BLOCKS {
        let seen = pattern::decode(b, &image[(b * BS) as usize..][..BS as usize]);
        let v = seen.version().ok_or_else(|| format!("block {b}: {seen}"))?;
        let e = &events[b as usize];
        if v > 0 {
            after = after.max(e[v as usize - 1].0);
        }
        if let Some(&(_, Some(acked))) = e.get(v as usize) {
            before = before.min(acked);
        }
    }
    if after < before {
        Ok((after, before))
    } else {
        Err(format!("no instant explains the image at {}: needs after {after} and before {before}", cut.cut))
    }
}

fn check_block(cut: &Cut, b: u64, data: &[u8]) -> Result<(), String> {
    let model = BlockModel { acked: cut.floor[b as usize], issued: cut.issued[b as usize], ..Default::default() };
    model
        .check(cut.floor[b as usize], &pattern::decode(b, data), "snapshot read")
        .map_err(|m| format!("block {b} at {}: {m}", cut.cut))
}

async fn read_all_snapshot(v: &Vol, cut: Seq) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(MIB as usize) {
        out.extend_from_slice(&v.read_snapshot(cut, off, MIB as u32).await.expect("read snapshot"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_a_busy_volume_hold_exactly_what_the_ledger_allows() {
    let nodes = [start_node().await, start_node().await, start_node().await];
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vol.toml");
    let config = StaticConfig::new(
        VolumeSpec { id: VOL, name: "snap".into(), size: SIZE, chunk_size: 4 * MIB, min_in_sync: 2 },
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeSpec { id: NodeId(i as u64 + 1), zone: Zone(format!("z{i}")), addr: n.addr })
            .collect(),
        vec![NodeId(1), NodeId(2), NodeId(3)],
    );
    StaticMembership::create(&path, config).expect("create membership");
    let v = attach(&path).await;

    // Workers own disjoint blocks (worker w: blocks b with b % WORKERS == w),
    // so each block has at most one write in flight, as the ledger requires.
    let ledger: Arc<Mutex<Vec<BlockModel>>> = Arc::new(Mutex::new(vec![BlockModel::default(); BLOCKS as usize]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let clock = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let events: Arc<Mutex<Events>> = Arc::new(Mutex::new(vec![Vec::new(); BLOCKS as usize]));
    let tick = |c: &std::sync::atomic::AtomicU64| c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (v, ledger, stop, latencies) = (v.clone(), ledger.clone(), stop.clone(), latencies.clone());
        let (clock, events) = (clock.clone(), events.clone());
        workers.push(tokio::spawn(async move {
            let mut x = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut writes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = (x % (BLOCKS / WORKERS)) * WORKERS + w;
                let version = ledger.lock().expect("ledger")[b as usize].issue();
                events.lock().expect("events")[b as usize].push((tick(&clock), None));
                let t = Instant::now();
                let r = v.write(b * BS, Bytes::from(pattern::block(b, version)), false).await;
                if r.is_ok() {
                    events.lock().expect("events")[b as usize][version as usize - 1].1 = Some(tick(&clock));
                }
                latencies.lock().expect("latencies").push(t.elapsed());
                ledger.lock().expect("ledger")[b as usize].completed(version, r.is_ok(), false);
                r.expect("write");
                writes += 1;
            }
            writes
        }));
    }
    let mut cuts = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let floor: Vec<u64> = ledger.lock().expect("ledger").iter().map(|m| m.acked).collect();
        let called = tick(&clock);
        let t = Instant::now();
        let cut = v.snapshot().await.expect("snapshot").cut;
        let took = t.elapsed();
        let returned = tick(&clock);
        let issued: Vec<u64> = ledger.lock().expect("ledger").iter().map(|m| m.issued).collect();
        cuts.push(Cut { cut, floor, issued, took, called, returned });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for w in workers {
        writes += w.await.expect("worker");
    }
    let final_ledger = ledger.lock().expect("ledger").clone();
    let mut lat = latencies.lock().expect("latencies").clone();
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{writes} writes; latency p50 {:?} p99 {:?} max {:?}; snapshot() took {:?}",
        p(0.5),
        p(0.99),
        lat.last().copied().unwrap_or_default(),
        cuts.iter().map(|c| c.took).collect::<Vec<_>>()
    );
    assert!(writes > 1000, "the workload ran ({writes} writes)");
    assert_eq!(v.snapshots().await, cuts.iter().map(|c| c.cut).collect::<Vec<_>>());

    // Every block of every snapshot holds a version the ledger allowed at its
    // cut, and the cuts differ: the snapshots caught the workload mid-flight.
    let mut images = HashMap::new();
    for c in &cuts {
        let image = read_all_snapshot(&v, c.cut).await;
        let mut bad = Vec::new();
        for b in 0..BLOCKS {
            if let Err(e) = check_block(c, b, &image[(b * BS) as usize..][..BS as usize]) {
                bad.push(e);
            }
        }
        assert!(bad.is_empty(), "{} blocks broke the ledger, first: {:?}", bad.len(), &bad[..bad.len().min(5)]);
        let events = events.lock().expect("events").clone();
        let (after, before) = one_instant(c, &image, &events).expect("one instant explains the snapshot");
        eprintln!(
            "snapshot {}: an instant between events {after} and {before} explains every block (call: {}..{})",
            c.cut, c.called, c.returned
        );
        images.insert(c.cut, image);
    }
    assert_ne!(images[&cuts[0].cut], images[&cuts[2].cut], "the workload changed the volume between snapshots");
    // The live volume holds the last acknowledged versions.
    for b in (0..BLOCKS).step_by(7) {
        let data = v.read(b * BS, BS as u32).await.expect("read");
        let m = &final_ledger[b as usize];
        m.check(m.acked, &pattern::decode(b, &data), "live read").expect("live block");
    }

    // Re-attached: the snapshots are still there, byte for byte, and writes of
    // the new attachment do not reach them.
    v.flush().await.expect("flush");
    v.close();
    drop(v);
    let v = attach(&path).await;
    assert_eq!(v.snapshots().await, cuts.iter().map(|c| c.cut).collect::<Vec<_>>());
    for b in 0..BLOCKS {
        v.write(b * BS, Bytes::from(vec![0xee; BS as usize]), false).await.expect("overwrite");
    }
    assert_eq!(read_all_snapshot(&v, cuts[1].cut).await, images[&cuts[1].cut]);

    // Deleted: gone from the list, the others intact.
    v.delete_snapshot(cuts[1].cut).await.expect("delete");
    assert_eq!(v.snapshots().await, vec![cuts[0].cut, cuts[2].cut]);
    assert!(v.read_snapshot(cuts[1].cut, 0, BS as u32).await.is_err(), "a deleted snapshot cannot be read");
    assert_eq!(read_all_snapshot(&v, cuts[2].cut).await, images[&cuts[2].cut]);
    v.close();
}
