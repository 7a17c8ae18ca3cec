//! Measures a Volume over real in-process replica servers on loopback:
//! 4 KiB random writes and reads at QD1 and QD32, RF 1 and RF 3.
//! `cargo run --release -p ballast-frontend --example volume_bench [-- OPS]`
//! Everything (front end, servers, io_uring threads) shares this machine's
//! cores, so absolute numbers are pessimistic; compare ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_blockdev::BlockDev;
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{tcp_connector, StaticConfig, StaticMembership, Volume, VolumeOptions};
use ballast_replica::{ClientOptions, ReplicaServer, ServerOptions};
use ballast_types::{NodeId, VolumeId, Zone};
use bytes::Bytes;
use tokio::net::TcpListener;

const SIZE: u64 = 256 << 20;

fn main() {
    let ops: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for rf in [1usize, 3] {
            let dirs: Vec<tempfile::TempDir> = (0..rf).map(|_| tempfile::tempdir().unwrap()).collect();
            let mut nodes = Vec::new();
            for (i, d) in dirs.iter().enumerate() {
                let store = ChunkStore::open(d.path(), StoreOptions::default()).unwrap();
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                nodes.push(NodeSpec { id: NodeId(i as u64 + 1), zone: Zone(format!("z{i}")), addr: l.local_addr().unwrap() });
                tokio::spawn(ReplicaServer::new(store, ServerOptions::default()).serve(l, std::future::pending()));
            }
            let meta = tempfile::tempdir().unwrap();
            let ids = nodes.iter().map(|n| n.id).collect();
            let cfg = StaticConfig::new(
                VolumeSpec { id: VolumeId(1), name: "bench".into(), size: SIZE, chunk_size: 64 << 20, min_in_sync: 1 },
                nodes,
                ids,
            );
            let m = Arc::new(StaticMembership::create(meta.path().join("v.toml"), cfg).unwrap());
            let opts = VolumeOptions { local_node: Some(NodeId(1)), ..Default::default() };
            let v = Volume::attach(m, tcp_connector(ClientOptions::default()), VolumeId(1), opts).await.unwrap();
            // Fill once so reads touch written blocks.
            let mib = Bytes::from(vec![0x5a; 1 << 20]);
            for off in (0..SIZE).step_by(1 << 20) {
                v.write(off, mib.clone(), false).await.unwrap();
            }
            v.flush().await.unwrap();
            for (name, write) in [("randwrite", true), ("randread", false)] {
                for qd in [1usize, 32] {
                    let (iops, p50, p99) = run(v.clone(), write, qd, ops).await;
                    println!(
                        "{{\"rf\":{rf},\"rw\":\"{name}\",\"bs\":4096,\"qd\":{qd},\"iops\":{iops:.0},\"p50_us\":{},\"p99_us\":{}}}",
                        p50.as_micros(),
                        p99.as_micros()
                    );
                }
            }
            v.close();
        }
    });
}

async fn run<V: BlockDev>(v: Arc<V>, write: bool, qd: usize, ops: usize) -> (f64, Duration, Duration) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..qd {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(ops / qd);
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1);
            let buf = Bytes::from(vec![w as u8; 4096]);
            for _ in 0..ops / qd {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (SIZE / 4096)) * 4096;
                let t = Instant::now();
                if write {
                    v.write(off, buf.clone(), false).await.unwrap();
                } else {
                    v.read(off, 4096).await.unwrap();
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    (lat.len() as f64 / secs, lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}
