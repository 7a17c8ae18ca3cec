//! What snapshots cost a busy volume (issue 14): an RF 3 Volume over three
//! in-process replica servers on loopback (chunk stores in BENCH_DIR, static
//! membership), `BENCH_ONLY=snapshot`.
//!
//! - Snapshot creation time, and the client's 4 KiB random-write IOPS and
//!   p50/p99 at QD32 without snapshots and while a snapshot is taken every
//!   500 ms (`snapshot()` stalls writes while it drains and installs the cut;
//!   after it, the first write to each chunk freezes that chunk's layer).
//! - The first write to a chunk after a snapshot (it freezes the chunk's live
//!   layer: fdatasync of the layer, a new data and context file) against the
//!   next write to the same chunk, at QD1, per chunk.
//!
//! Nothing is asserted; figures are printed.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ballast_blockdev::BlockDev;
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{tcp_connector, StaticConfig, StaticMembership, Volume, VolumeOptions};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_types::{NodeId, VolumeId, Zone};
use bytes::Bytes;

use crate::fio::{Measured, Workload};
use crate::loadgen;

const SPAN: u64 = 256 << 20;
const CHUNK: u64 = 16 << 20;
const WRITE: Workload = Workload { name: "4k randwrite qd32", rw: "randwrite", bs: 4096, qd: 32 };

type Vol = Volume<Arc<StaticMembership>, ReplicaClient>;

async fn volume(dir: &Path) -> Result<Arc<Vol>> {
    let mut nodes = Vec::new();
    for i in 1..=3u64 {
        let store = ChunkStore::open(dir.join(format!("node{i}")), StoreOptions::default())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(ReplicaServer::new(store, ServerOptions::default()).serve(listener, std::future::pending()));
        nodes.push(NodeSpec { id: NodeId(i), zone: Zone(format!("z{i}")), addr });
    }
    let spec = VolumeSpec { id: VolumeId(1), name: "snap".into(), size: SPAN, chunk_size: CHUNK, min_in_sync: 2 };
    let config = StaticConfig::new(spec, nodes, vec![NodeId(1), NodeId(2), NodeId(3)]);
    let membership = Arc::new(StaticMembership::create(dir.join("vol.toml"), config)?);
    let opts = VolumeOptions { local_node: Some(NodeId(1)), ..VolumeOptions::default() };
    let v = Volume::attach(membership, tcp_connector(ClientOptions::default()), VolumeId(1), opts)
        .await
        .context("attach the snapshot bench volume")?;
    let mib = Bytes::from(vec![0x5au8; 1 << 20]);
    for off in (0..SPAN).step_by(1 << 20) {
        v.write(off, mib.clone(), false).await?;
    }
    v.flush().await?;
    Ok(v)
}

async fn writes(v: &Arc<Vol>, secs: u32) -> Result<Measured> {
    let data = Bytes::from(vec![0x33u8; 4096]);
    let v = v.clone();
    loadgen::run(&WRITE, SPAN, u64::from(secs), move |off| {
        let (v, data) = (v.clone(), data.clone());
        async move { v.write(off, data, false).await }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{}: {e}", WRITE.name))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(xs: &mut [Duration]) -> String {
    xs.sort();
    if xs.is_empty() {
        return "none".into();
    }
    format!(
        "n {} min {:.2} ms median {:.2} ms max {:.2} ms",
        xs.len(),
        ms(xs[0]),
        ms(xs[xs.len() / 2]),
        ms(xs[xs.len() - 1])
    )
}

/// Runs the measurements; returns the rows for the table (without and with
/// snapshots being taken).
pub fn run(rt: &tokio::runtime::Runtime, dir: &Path, secs: u32) -> Result<Vec<(&'static str, &'static str, Measured)>> {
    let dir = dir.join("snapshot");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let out = rt.block_on(async {
        let v = volume(&dir).await?;
        let quiet = writes(&v, secs).await?;

        let stop = Arc::new(AtomicBool::new(false));
        let took: Arc<Mutex<Vec<(Duration, Duration, Duration)>>> = Arc::new(Mutex::new(Vec::new()));
        let taker = tokio::spawn({
            let (v, stop, took) = (v.clone(), stop.clone(), took.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let t = Instant::now();
                    let s = v.snapshot().await?;
                    took.lock().unwrap_or_else(|p| p.into_inner()).push((t.elapsed(), s.stall, s.drain));
                }
                Ok::<_, anyhow::Error>(())
            }
        });
        let busy = writes(&v, secs).await?;
        stop.store(true, Ordering::Relaxed);
        taker.await??;
        let took = took.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut calls: Vec<Duration> = took.iter().map(|t| t.0).collect();
        let mut stalls: Vec<Duration> = took.iter().map(|t| t.1).collect();
        let mut drains: Vec<Duration> = took.iter().map(|t| t.2).collect();

        // First write to each chunk after a snapshot, then the next one.
        v.snapshot().await?;
        let (mut first, mut next) = (Vec::new(), Vec::new());
        let data = Bytes::from(vec![0x44u8; 4096]);
        for round in 0..2u64 {
            for c in 0..SPAN / CHUNK {
                let t = Instant::now();
                v.write(c * CHUNK + round * 4096, data.clone(), false).await?;
                if round == 0 { &mut first } else { &mut next }.push(t.elapsed());
            }
        }
        println!();
        println!("snapshot cost: RF 3 over loopback, {} MiB volume in {} MiB chunks, {secs} s per run", SPAN >> 20, CHUNK >> 20);
        println!("snapshot() while writing 4k randwrite qd32: {}", summary(&mut calls));
        println!("  of which writes stalled (drain + cut on every replica): {}", summary(&mut stalls));
        println!("  of which the drain (writes in flight finishing): {}", summary(&mut drains));
        println!(
            "4k randwrite qd32: without snapshots {:.0} IOPS p50 {:.0} us p99 {:.0} us; with a snapshot every 500 ms {:.0} IOPS p50 {:.0} us p99 {:.0} us (IOPS ratio {:.3}, p99 ratio {:.2})",
            quiet.iops,
            quiet.p50_us,
            quiet.p99_us,
            busy.iops,
            busy.p50_us,
            busy.p99_us,
            busy.iops / quiet.iops,
            busy.p99_us / quiet.p99_us
        );
        println!("first 4k write to a chunk after a snapshot (freezes its layer), qd1: {}", summary(&mut first));
        println!("next 4k write to the same chunk, qd1: {}", summary(&mut next));
        v.close();
        Ok::<_, anyhow::Error>(vec![
            ("volume rf3", WRITE.name, quiet),
            ("volume rf3, snapshots", WRITE.name, busy),
        ])
    });
    let _ = std::fs::remove_dir_all(&dir);
    out
}
