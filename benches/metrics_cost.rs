//! What the data path's Prometheus metrics cost (issue 15: at most 2% of IOPS):
//! a Volume over one in-process replica server on loopback (RF 1, so the front
//! end's and the chunk store's share of the work is as large as it gets), once
//! without metrics (`VolumeOptions::metrics` and `StoreOptions::metrics` None)
//! and once with both, 4 KiB random writes and reads at QD32 through the
//! in-process load generator. Each variant has two volumes, set up in the
//! order without, with, with, without (ABBA), and every round runs all four in
//! alternating order, so that drift on a shared machine and whatever comes of
//! being set up first or last fall on both variants; every run's IOPS is
//! printed, then per workload the mean, the spread, and the ratio
//! of the means. `BENCH_ONLY=volume` (rounds: `BENCH_ROUNDS`, default 4).
//!
//! IOPS on a shared 2-core machine swing by several percent from run to run,
//! more than the effect looked for, so two steadier figures come with them: the
//! process's CPU time per I/O in each run (everything runs in this process:
//! load generator, front end, replica server, chunk store ring), and the
//! metrics' bookkeeping alone, emulated on the same handle types (the front
//! end's in-flight gauges, latency histogram and bytes counter, the chunk
//! store's histogram and bytes counter, clocks read as they are) by two
//! threads sharing one set of handles, as the I/O path's tasks do.
//!
//! `BENCH_AA=1` runs the same rounds with metrics off in all four volumes: the
//! ratio it prints is the bench's own bias. With one volume per variant (set up
//! one after the other) it was 0.91-0.96 IOPS and 1.02-1.03 CPU per I/O on the
//! 2-core machine, as large as the metrics' effect; hence the ABBA setup.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use ballast_blockdev::BlockDev;
use ballast_chunkstore::{ChunkStore, StoreMetrics, StoreOptions};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{tcp_connector, StaticConfig, StaticMembership, Volume, VolumeMetrics, VolumeOptions};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_types::{NodeId, VolumeId, Zone};
use bytes::Bytes;

use crate::fio::{Measured, Workload};
use crate::loadgen;

/// Bytes the volume's workloads range over.
const SPAN: u64 = 256 << 20;

const WORKLOADS: [Workload; 2] = [
    Workload { name: "4k randwrite qd32", rw: "randwrite", bs: 4096, qd: 32 },
    Workload { name: "4k randread qd32", rw: "randread", bs: 4096, qd: 32 },
];

type Vol = Volume<Arc<StaticMembership>, ReplicaClient>;

struct Variant {
    label: &'static str,
    volume: Arc<Vol>,
    /// Kept for the runs (the metrics' families live in it).
    _registry: Option<ballast_metrics::Registry>,
    runs: Vec<Vec<f64>>,
    /// Process CPU microseconds per I/O, per run.
    cpu_us: Vec<Vec<f64>>,
}

async fn variant(dir: &Path, label: &'static str, metrics: bool) -> Result<Variant> {
    let mut registry = metrics.then(ballast_metrics::registry);
    let (store_metrics, volume_metrics) = match registry.as_mut() {
        Some(r) => (Some(StoreMetrics::register(r).disk("1")), Some(VolumeMetrics::register(r))),
        None => (None, None),
    };
    let store_dir = dir.join(label).join("store");
    let store = ChunkStore::open(&store_dir, StoreOptions { metrics: store_metrics, ..StoreOptions::default() })?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(ReplicaServer::new(store, ServerOptions::default()).serve(listener, std::future::pending()));
    let spec = VolumeSpec { id: VolumeId(1), name: label.into(), size: SPAN, chunk_size: 64 << 20, min_in_sync: 1 };
    let node = NodeSpec { id: NodeId(1), zone: Zone("z1".into()), addr };
    let config = dir.join(label).join("vol.toml");
    let membership = Arc::new(StaticMembership::create(&config, StaticConfig::new(spec, vec![node], vec![NodeId(1)]))?);
    let opts = VolumeOptions { local_node: Some(NodeId(1)), metrics: volume_metrics, ..VolumeOptions::default() };
    let volume = Volume::attach(membership, tcp_connector(ClientOptions::default()), VolumeId(1), opts)
        .await
        .with_context(|| format!("attach the {label} volume"))?;
    // Written once, so that reads find data.
    let mib = Bytes::from(vec![0x5au8; 1 << 20]);
    for off in (0..SPAN).step_by(1 << 20) {
        volume.write(off, mib.clone(), false).await?;
    }
    volume.flush().await?;
    let runs = vec![Vec::new(); WORKLOADS.len()];
    Ok(Variant { label, volume, _registry: registry, cpu_us: runs.clone(), runs })
}

/// This process's CPU time so far (user + system), seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| ballast_metrics::parse_stat(&t, ticks, 4096))
        .map_or(0.0, |s| s.cpu_seconds)
}

/// CPU nanoseconds per request of the metrics' bookkeeping alone (see the
/// module docs): two threads, one set of handles.
fn bookkeeping_ns() -> f64 {
    use ballast_metrics::{InFlightGauge, LatencyHistogram, ShardedCounter};
    const N: u64 = 2_000_000;
    let (requests, bytes) = (InFlightGauge::default(), InFlightGauge::default());
    let (frontend, store) = (LatencyHistogram::io(), LatencyHistogram::io());
    let (frontend_bytes, store_bytes) = (ShardedCounter::default(), ShardedCounter::default());
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            let h = (&requests, &bytes, &frontend, &store, &frontend_bytes, &store_bytes);
            s.spawn(move || {
                let (requests, bytes, frontend, store, frontend_bytes, store_bytes) = h;
                for _ in 0..N {
                    let t0 = std::time::Instant::now();
                    requests.start(1);
                    bytes.start(4096);
                    let t1 = std::time::Instant::now();
                    store.observe_since(t1);
                    store_bytes.inc_by(4096);
                    frontend_bytes.inc_by(4096);
                    frontend.observe_since(t0);
                    requests.finish(1);
                    bytes.finish(4096);
                }
            });
        }
    });
    assert_eq!(frontend.count(), 2 * N);
    // Two threads busy for the wall time: CPU time is twice it.
    2.0 * start.elapsed().as_nanos() as f64 / (2 * N) as f64
}

async fn run_one(v: &Arc<Vol>, w: &Workload, secs: u32) -> Result<Measured> {
    let data = Bytes::from((0..w.bs).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let (volume, write, len) = (v.clone(), w.is_write(), w.bs);
    loadgen::run(w, SPAN, u64::from(secs), move |off| {
        let (volume, data) = (volume.clone(), data.clone());
        async move {
            if write {
                volume.write(off, data, false).await
            } else {
                volume.read(off, len).await.map(|_| ())
            }
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("volume {}: {e}", w.name))
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// Sample standard deviation relative to the mean.
fn rel_sd(xs: &[f64]) -> f64 {
    let m = mean(xs);
    if xs.len() < 2 || m == 0.0 {
        return 0.0;
    }
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt() / m
}

/// Runs the comparison; returns one row per variant and workload (mean IOPS).
///
/// Four volumes, set up in the order without, with, with, without metrics
/// (ABBA): what comes of being set up first or last (files, connections) falls
/// on both variants alike. Each round runs all four, in alternating order.
pub fn run(rt: &tokio::runtime::Runtime, dir: &Path, secs: u32) -> Result<Vec<(&'static str, &'static str, Measured)>> {
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let on = std::env::var_os("BENCH_AA").is_none();
    let mut volumes = rt.block_on(async {
        Ok::<_, anyhow::Error>(vec![
            variant(dir, "volume, no metrics", false).await?,
            variant(dir, "volume, metrics", on).await?,
            variant(dir, "volume, metrics (2)", on).await?,
            variant(dir, "volume, no metrics (2)", false).await?,
        ])
    })?;
    let mut last: Vec<Vec<Measured>> = vec![Vec::new(); volumes.len()];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1, 2, 3] } else { [3, 2, 1, 0] };
        for i in order {
            for (k, w) in WORKLOADS.iter().enumerate() {
                let cpu = cpu_seconds();
                let m = rt.block_on(run_one(&volumes[i].volume, w, secs))?;
                // The load generator's warm-up second is not counted in IOPS but burns CPU:
                // count its I/Os at the measured rate.
                let cpu_us = (cpu_seconds() - cpu) * 1e6 / (m.iops * f64::from(secs + 1));
                eprintln!(
                    "round {round} {:<22} {:<18} {:>9.0} IOPS {:>6.1} CPU us/IO",
                    volumes[i].label, w.name, m.iops, cpu_us
                );
                volumes[i].runs[k].push(m.iops);
                volumes[i].cpu_us[k].push(cpu_us);
                last[i].push(m);
            }
        }
    }
    // Per variant (index 0: without metrics, volumes 0 and 3; 1: with, 1 and 2).
    let kinds: [(&'static str, [usize; 2]); 2] = [("volume, no metrics", [0, 3]), ("volume, metrics", [1, 2])];
    // Workload k's IOPS (or CPU per I/O) of both volumes of variant `kind`.
    let pooled = |cpu: bool, k: usize, kind: usize| -> Vec<f64> {
        let of = |v: &Variant| if cpu { v.cpu_us[k].clone() } else { v.runs[k].clone() };
        kinds[kind].1.iter().flat_map(|&i| of(&volumes[i])).collect()
    };
    println!();
    println!(
        "metrics cost: {rounds} alternating rounds of {secs} s per workload, RF 1 over loopback, 2 volumes per variant (ABBA)"
    );
    let mut rows = Vec::new();
    for (k, w) in WORKLOADS.iter().enumerate() {
        let (off, on) = (pooled(false, k, 0), pooled(false, k, 1));
        let runs = |xs: &[f64]| xs.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
        println!(
            "{:<18} no metrics: mean {:>8.0} (sd {:>4.1}%; {})  metrics: mean {:>8.0} (sd {:>4.1}%; {})  with/without {:.3}",
            w.name,
            mean(&off),
            rel_sd(&off) * 100.0,
            runs(&off),
            mean(&on),
            rel_sd(&on) * 100.0,
            runs(&on),
            mean(&on) / mean(&off),
        );
        let (off_cpu, on_cpu) = (pooled(true, k, 0), pooled(true, k, 1));
        let runs = |xs: &[f64]| xs.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" ");
        println!(
            "{:<18} CPU us per I/O: no metrics {:.2} (sd {:.1}%; {})  metrics {:.2} (sd {:.1}%; {})  with/without {:.3}",
            w.name,
            mean(&off_cpu),
            rel_sd(&off_cpu) * 100.0,
            runs(&off_cpu),
            mean(&on_cpu),
            rel_sd(&on_cpu) * 100.0,
            runs(&on_cpu),
            mean(&on_cpu) / mean(&off_cpu),
        );
        for (kind, (label, ix)) in kinds.iter().enumerate() {
            // The table shows the mean IOPS with the last run's latencies.
            let latest = last[ix[0]][last[ix[0]].len() - WORKLOADS.len() + k];
            let iops = mean(&pooled(false, k, kind));
            rows.push((
                *label,
                w.name,
                Measured { iops, mib_s: iops * f64::from(w.bs) / f64::from(1 << 20), ..latest },
            ));
        }
    }
    let ns = bookkeeping_ns();
    let per_io_us = mean(&volumes[0].cpu_us.concat());
    println!(
        "metrics bookkeeping alone: {ns:.0} ns of CPU per request (front end + chunk store, 2 threads on one set of handles), {:.2}% of the {per_io_us:.1} us of CPU an I/O costs without metrics",
        ns / (per_io_us * 1000.0) * 100.0
    );
    for v in &volumes {
        v.volume.close();
    }
    Ok(rows)
}
