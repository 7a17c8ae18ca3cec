//! Load through the replica server over loopback; prints one JSON line.
//!
//! ```text
//! cargo run --release -p ballast-replica --features bench --example replica_bench -- \
//!     --dir /var/tmp/rb --rw randwrite --bs 4096 --qd 32 --seconds 5
//! ```
//! `--dir D` serves a chunk store in D from this process (on 127.0.0.1:0);
//! `--addr HOST:PORT` targets a running replica instead. `--size` is the chunk
//! size in MiB (default 64). Reads prefill the chunk first.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_replica::bench::{prefill, run, BenchSpec, Pattern};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_types::{ChunkId, ChunkIdx, Epoch, VolumeId};

struct Args {
    addr: Option<SocketAddr>,
    dir: Option<String>,
    pattern: Pattern,
    bs: u32,
    qd: usize,
    seconds: f64,
    size_mib: u64,
    connections: usize,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        addr: None,
        dir: None,
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 1,
        seconds: 5.0,
        size_mib: 64,
        connections: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => a.addr = Some(val.parse().context("--addr")?),
            "--dir" => a.dir = Some(val),
            "--rw" => {
                a.pattern = Pattern::parse(&val).with_context(|| format!("unknown --rw {val}"))?
            }
            "--bs" => a.bs = val.parse().context("--bs")?,
            "--qd" => a.qd = val.parse().context("--qd")?,
            "--seconds" => a.seconds = val.parse().context("--seconds")?,
            "--size" => a.size_mib = val.parse().context("--size")?,
            "--connections" => a.connections = val.parse().context("--connections")?,
            other => bail!("unknown flag {other}"),
        }
    }
    if a.addr.is_none() == a.dir.is_none() {
        bail!("give exactly one of --addr or --dir");
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = parse()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server_task = None;
    let addr = match (&args.dir, args.addr) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir)?;
            let store = ChunkStore::open(dir, StoreOptions::default())?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let server = ReplicaServer::new(store, ServerOptions::default());
            server_task = Some(tokio::spawn(server.serve(listener, async move {
                let _ = stop_rx.await;
            })));
            addr
        }
        (None, Some(addr)) => addr,
        (None, None) => bail!("give --addr or --dir"),
    };
    let client = ReplicaClient::new(
        addr,
        ClientOptions {
            connections: args.connections,
            ..ClientOptions::default()
        },
    );
    // A dedicated volume; wall-clock seconds as the epoch keep reruns ahead of earlier ones.
    let volume = VolumeId(0xBE4C);
    let epoch = Epoch(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs());
    let epoch = client.announce_epoch(volume, epoch).await?;
    let chunk = ChunkId::new(volume, ChunkIdx(0));
    let chunk_size = args.size_mib << 20;
    client.create_chunk(chunk, chunk_size, epoch).await?;
    if matches!(args.pattern, Pattern::RandRead | Pattern::SeqRead) {
        prefill(&client, chunk, chunk_size, epoch).await?;
    }
    let spec = BenchSpec {
        pattern: args.pattern,
        bs: args.bs,
        qd: args.qd,
        duration: Duration::from_secs_f64(args.seconds),
        chunk,
        chunk_size,
        epoch,
    };
    let result = run(&client, &spec).await?;
    println!("{}", result.to_json(&spec));
    let _ = stop_tx.send(());
    if let Some(t) = server_task {
        t.await??;
    }
    Ok(())
}
