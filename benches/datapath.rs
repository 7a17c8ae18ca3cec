//! The data-path benchmark: the same workloads (4 KiB random write and read at
//! QD1 and QD32, 1 MiB sequential write) against, in one run:
//!
//! ```text
//!   raw file      fio, io_uring, O_DIRECT            (the baseline: "fio")
//!   chunk store   in-process load generator → ChunkStore (io_uring thread)
//!   replica       load generator → ReplicaClient ═ loopback TCP ═ ReplicaServer → ChunkStore
//!   replica tls   the same over mutual TLS (the data path's TLS cost alone)
//!   qemu-nbd      fio nbd engine → qemu-nbd → file   (the peer to beat)
//!   ballast rf1   fio nbd engine → ballast export → 1 replica process   (mutual TLS, as deployed)
//!   ballast rf3   fio nbd engine → ballast export → 3 replica processes (mutual TLS, as deployed)
//!   rf3 plain     the same with --insecure: what TLS costs end to end
//! ```
//!
//! Prints a table with IOPS, p50/p99 completion latency, and ratios to fio on the
//! raw file (IOPS ratio: higher is better; p50 ratio: lower is better). Nothing is
//! asserted: speed is read, not tested. Run: `cargo bench --bench datapath`
//! (BENCH_SECONDS=N per workload, default 3; BENCH_DIR to choose the filesystem,
//! default target/bench-data; BENCH_ONLY=store,replica,nbd to pick sections; BENCH_POLL_US for the
//! chunk store's ring poll budget).
//!
//! `BENCH_ONLY=volume` (not in the default set) is the cost of the data path's
//! Prometheus metrics: a Volume over an in-process replica server with and
//! without them, in alternating rounds (benches/metrics_cost.rs).
//!
//! `BENCH_ONLY=snapshot` (not in the default set either) is what snapshots cost
//! a busy RF 3 volume: creation time, client IOPS and p99 while snapshots are
//! taken, the first write to a chunk after one (benches/snapshot_cost.rs).

#[path = "fio.rs"]
mod fio;
#[path = "loadgen.rs"]
mod loadgen;
#[path = "metrics_cost.rs"]
mod metrics_cost;
#[path = "snapshot_cost.rs"]
mod snapshot_cost;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_testkit::{free_port, Proc, ProcOptions, StaticVolume};
use ballast_tls::Identity;
use ballast_types::{ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;
use fio::{Measured, Target, Workload, WORKLOADS};

/// Bytes each target's workloads range over.
const SPAN: u64 = 1 << 30;

struct Row {
    target: &'static str,
    workload: &'static str,
    m: Measured,
}

fn main() -> Result<()> {
    let secs: u32 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let only = std::env::var("BENCH_ONLY").unwrap_or_else(|_| "store,replica,nbd".into());
    let dir = std::env::var("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-data"));
    if !fio::have_fio() {
        eprintln!("SKIP datapath bench: fio is not installed (apt-get install -y fio)");
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();

    // Baseline: fio on a raw file on the same filesystem.
    let raw = dir.join("raw.img");
    fio::prefill(&Target::File(&raw), SPAN)?;
    for w in WORKLOADS {
        rows.push(Row { target: "fio raw file", workload: w.name, m: fio::run(&Target::File(&raw), w, SPAN, secs)? });
    }
    std::fs::remove_file(&raw)?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if only.contains("store") || only.contains("replica") {
        let mut opts = StoreOptions::default();
        if let Some(us) = std::env::var("BENCH_POLL_US").ok().and_then(|s| s.parse().ok()) {
            opts.poll = Duration::from_micros(us);
        }
        eprintln!("chunk store ring poll: {:?}", opts.poll);
        let store = ChunkStore::open(dir.join("store"), opts)?;
        if !store.direct_io() {
            eprintln!("note: O_DIRECT refused on {}; the chunk store runs buffered", dir.display());
        }
        let id = ChunkId::new(VolumeId(1), ChunkIdx(0));
        let epoch = Epoch(1);
        rt.block_on(async {
            store.announce_epoch(id.volume, epoch).await?;
            store.create_chunk(id, SPAN, epoch).await?;
            prefill_store(&store, id, epoch).await
        })?;
        if only.contains("store") {
            for w in WORKLOADS {
                let m = rt.block_on(bench_store(&store, id, epoch, w, secs))?;
                rows.push(Row { target: "chunk store", workload: w.name, m });
            }
        }
        if only.contains("replica") {
            // One replica server on loopback, in plaintext and with mutual TLS
            // (certificates of a CA made here): what TLS costs the data path
            // alone, without NBD or fio in the way.
            let pki = ballast_tls::certs::Pki::open_or_create(&dir.join("pki"))?;
            let plain = (ServerOptions::default(), ClientOptions::default());
            let tls = (
                ServerOptions { security: pki.security(&Identity::Node(1))?, ..ServerOptions::default() },
                ClientOptions { security: pki.security(&Identity::Frontend(1))?, ..ClientOptions::default() },
            );
            for (target, (sopts, copts)) in [("replica (loopback)", plain), ("replica tls loopback", tls)] {
                let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
                let addr = listener.local_addr()?;
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let server = ReplicaServer::new(store.clone(), sopts);
                let handle = rt.spawn(async move {
                    server
                        .serve(listener, async {
                            let _ = stop_rx.await;
                        })
                        .await
                });
                let client = ReplicaClient::new(addr, copts);
                for w in WORKLOADS {
                    let m = rt.block_on(bench_replica(&client, id, epoch, w, secs))?;
                    rows.push(Row { target, workload: w.name, m });
                }
                let _ = stop_tx.send(());
                let _ = rt.block_on(handle);
            }
        }
    }

    if only.contains("volume") {
        for (target, workload, m) in metrics_cost::run(&rt, &dir, secs)? {
            rows.push(Row { target, workload, m });
        }
    }
    if only.contains("snapshot") {
        for (target, workload, m) in snapshot_cost::run(&rt, &dir, secs)? {
            rows.push(Row { target, workload, m });
        }
    }
    if only.contains("nbd") {
        nbd_section(&dir, secs, &mut rows)?;
    }
    print_table(&rows);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn prefill_store(store: &ChunkStore, id: ChunkId, epoch: Epoch) -> Result<()> {
    let block = Bytes::from(vec![0x5au8; 1 << 20]);
    for (i, off) in (0..SPAN).step_by(1 << 20).enumerate() {
        store.write(id, off, block.clone(), Seq::new(epoch, i as u64 + 1)).await?;
    }
    store.flush_chunk(id, epoch).await?;
    Ok(())
}

/// A payload per workload, shared by every request (as fio reuses its buffers).
fn payload(w: &Workload) -> Bytes {
    Bytes::from((0..w.bs).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

async fn bench_store(store: &ChunkStore, id: ChunkId, epoch: Epoch, w: &Workload, secs: u32) -> Result<Measured> {
    let data = payload(w);
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1 << 32));
    let (shared, write, len) = (store.clone(), w.is_write(), w.bs);
    let m = loadgen::run(w, SPAN, u64::from(secs), move |off| {
        let (store, data, counter) = (shared.clone(), data.clone(), counter.clone());
        async move {
            if write {
                let seq = Seq::new(epoch, counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
                store.write(id, off, data, seq).await.map(|_| ())
            } else {
                store.read(id, off, len, epoch).await.map(|_| ())
            }
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("chunk store {}: {e:?}", w.name))?;
    store.flush_chunk(id, epoch).await?;
    Ok(m)
}

async fn bench_replica(client: &ReplicaClient, id: ChunkId, epoch: Epoch, w: &Workload, secs: u32) -> Result<Measured> {
    let data = payload(w);
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1 << 40));
    let (client, write, len) = (client.clone(), w.is_write(), w.bs);
    let m = loadgen::run(w, SPAN, u64::from(secs), move |off| {
        let (client, data, counter) = (client.clone(), data.clone(), counter.clone());
        async move {
            if write {
                let seq = Seq::new(epoch, counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
                client.write(id, off, data, seq, false).await.map(|_| ())
            } else {
                client.read(id, off, len, epoch).await.map(|_| ())
            }
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("replica {}: {e:?}", w.name))?;
    Ok(m)
}

fn nbd_section(dir: &Path, secs: u32, rows: &mut Vec<Row>) -> Result<()> {
    // The processes' logs at warn level on the bench's stderr; stdout is not echoed.
    let quiet = ProcOptions::default().rust_log("warn").echo(false);
    // qemu-nbd serving a file, as TOOLS.md describes the peer.
    if Command::new("qemu-nbd").arg("--version").output().is_ok() {
        let img = dir.join("qemu.img");
        std::fs::File::create(&img)?.set_len(SPAN)?;
        let port = free_port()?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-t", "-e", "4", "--cache=none", "--aio=io_uring", "-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg(&img);
        let qemu_nbd = Proc::spawn_cmd_with("qemu-nbd", cmd, &quiet)?;
        let uri = format!("nbd://127.0.0.1:{port}/");
        wait_nbd(&uri)?;
        run_nbd_rows("qemu-nbd", &uri, secs, rows)?;
        drop(qemu_nbd);
    } else {
        eprintln!("SKIP qemu-nbd rows: qemu-nbd not installed");
    }
    let size = SPAN.to_string();
    for (label, rf, tls) in [("ballast rf1", 1usize, true), ("ballast rf3", 3, true), ("ballast rf3 plain", 3, false)] {
        // rf replica processes and a volume file naming them, then its export:
        // mutual TLS as deployed, and the same in plaintext (--insecure).
        let root = dir.join(label.replace(' ', "-"));
        let v = if tls {
            StaticVolume::start_in(&root, "bench", &size, rf, &[], quiet.clone())?
        } else {
            StaticVolume::start_in_insecure(&root, "bench", &size, rf, &[], quiet.clone())?
        };
        let (_export, uri) = v.export("export", &[])?;
        run_nbd_rows(label, &uri, secs, rows)?;
    }
    Ok(())
}

fn wait_nbd(uri: &str) -> Result<()> {
    let hostport = uri.trim_start_matches("nbd://").split('/').next().unwrap_or_default().to_string();
    for _ in 0..100 {
        if std::net::TcpStream::connect(&hostport).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{uri} did not come up")
}

fn run_nbd_rows(label: &'static str, uri: &str, secs: u32, rows: &mut Vec<Row>) -> Result<()> {
    fio::prefill(&Target::Nbd(uri), SPAN)?;
    for w in WORKLOADS {
        rows.push(Row { target: label, workload: w.name, m: fio::run(&Target::Nbd(uri), w, SPAN, secs)? });
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<20} {:<18} {:>10} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "target", "workload", "IOPS", "MiB/s", "p50 us", "p99 us", "IOPS/fio", "p50/fio"
    );
    for r in rows {
        let base = rows.iter().find(|b| b.target == "fio raw file" && b.workload == r.workload).map(|b| b.m);
        let (ri, rl) = match base {
            Some(b) if b.iops > 0.0 && b.p50_us > 0.0 => (r.m.iops / b.iops, r.m.p50_us / b.p50_us),
            _ => (f64::NAN, f64::NAN),
        };
        println!(
            "{:<20} {:<18} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.2}x {:>8.2}x",
            r.target, r.workload, r.m.iops, r.m.mib_s, r.m.p50_us, r.m.p99_us, ri, rl
        );
    }
    // What mutual TLS costs: RF3 with it (as deployed) against plaintext.
    println!();
    for r in rows.iter().filter(|r| r.target == "ballast rf3") {
        if let Some(p) = rows.iter().find(|p| p.target == "ballast rf3 plain" && p.workload == r.workload) {
            println!(
                "ballast rf3 TLS vs plaintext, {:<18} IOPS {:.2}x  p50 {:+.1} us",
                r.workload,
                r.m.iops / p.m.iops,
                r.m.p50_us - p.m.p50_us
            );
        }
    }
    // The peer comparison: Ballast against qemu-nbd on the same workloads.
    println!();
    for label in ["ballast rf1", "ballast rf3", "ballast rf3 plain"] {
        for r in rows.iter().filter(|r| r.target == label) {
            if let Some(q) = rows.iter().find(|q| q.target == "qemu-nbd" && q.workload == r.workload) {
                println!(
                    "{label} vs qemu-nbd, {:<18} IOPS {:.2}x  p50 {:.2}x",
                    r.workload,
                    r.m.iops / q.m.iops,
                    r.m.p50_us / q.m.p50_us
                );
            }
        }
    }
}
