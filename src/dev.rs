//! `ballast dev`: the embedded default. One process runs a whole local cluster:
//!
//! ```text
//!   DATA/zone-a/disk0 ─ chunk store ─ replica server 127.0.0.1:p1 ─┐
//!   DATA/zone-b/disk0 ─ chunk store ─ replica server 127.0.0.1:p2 ─┼─ front end ─ NBD nbd://HOST:PORT/NAME
//!   DATA/zone-c/disk0 ─ chunk store ─ replica server 127.0.0.1:p3 ─┘   (static membership: DATA/volumes/NAME.toml)
//! ```
//!
//! The components talk over real loopback TCP exactly as separate processes would.
//! A second run on the same DATA keeps the volume: it reuses the volume file (whose
//! epoch it bumps on attach) and rebinds each replica's recorded port when free,
//! recording the new address when not.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{StaticConfig, StaticMembership};
use ballast_replica::{ReplicaServer, ServerOptions};
use ballast_types::{NodeId, VolumeId, Zone};
use tokio::net::TcpListener;

use crate::cli::DevArgs;
use crate::export::{self, NbdListeners};
use crate::shutdown;

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

pub async fn run(a: DevArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    std::fs::create_dir_all(a.data.join("volumes")).with_context(|| format!("create {}", a.data.display()))?;
    let config_path = a.data.join("volumes").join(format!("{}.toml", a.name));
    let existing = if config_path.exists() {
        let m = StaticMembership::load(&config_path).with_context(|| format!("load {}", config_path.display()))?;
        let config = m.config().await;
        Some((m, config))
    } else {
        None
    };

    // Three replica servers, one per zone, each on its own disk directory.
    let mut servers = tokio::task::JoinSet::new();
    let mut nodes = Vec::new();
    for (i, zone) in ZONES.iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let disk = a.data.join(zone).join("disk0");
        let store = ChunkStore::open(&disk, StoreOptions::default())
            .with_context(|| format!("open chunk store {}", disk.display()))?;
        let recorded = existing.as_ref().and_then(|(_, c)| c.nodes.iter().find(|n| n.id == id)).map(|n| n.addr);
        let listener = bind_replica(recorded).await?;
        let addr = listener.local_addr()?;
        tracing::info!(node = %id, zone, %addr, disk = %disk.display(), direct_io = store.direct_io(), "replica serving");
        println!("ready replica node={} zone={zone} addr={addr} data={}", id.0, disk.display());
        let stop = stop.clone();
        servers.spawn(async move {
            ReplicaServer::new(store, ServerOptions::default()).serve(listener, shutdown::wait(stop)).await
        });
        nodes.push(NodeSpec { id, zone: Zone(zone.to_string()), addr });
    }

    let membership = match existing {
        None => {
            let replicas = usize::from(a.replicas);
            let config = StaticConfig::new(
                VolumeSpec {
                    id: VolumeId(1),
                    name: a.name.clone(),
                    size: a.size,
                    chunk_size: a.chunk_size,
                    min_in_sync: a.min_in_sync.unwrap_or(replicas),
                },
                nodes.clone(),
                nodes.iter().take(replicas).map(|n| n.id).collect(),
            );
            StaticMembership::create(&config_path, config)
                .with_context(|| format!("create {}", config_path.display()))?
        }
        Some((m, c)) => {
            if c.volume.size != a.size || c.volume.chunk_size != a.chunk_size {
                tracing::info!(
                    size = c.volume.size,
                    chunk_size = c.volume.chunk_size,
                    "volume exists in {}; keeping its size and chunk size",
                    config_path.display()
                );
            }
            m.set_node_addrs(nodes.iter().map(|n| (n.id, n.addr)).collect()).await?;
            m
        }
    };
    let listeners = NbdListeners::bind(Some(a.nbd), a.socket.as_deref(), false).await?;
    let volume = export::attach(membership, None, Duration::from_secs(5)).await?;
    print_banner(&a.data, &config_path, &volume, &listeners)?;
    listeners.announce(volume.name())?;
    listeners.serve(volume, stop, Duration::from_secs(10)).await?;

    while let Some(r) = servers.join_next().await {
        match r {
            Ok(Err(e)) => tracing::warn!(error = %e, "replica server ended with an error"),
            Err(e) => bail!("replica server task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    tracing::info!("dev cluster stopped");
    Ok(())
}

/// Binds the replica's recorded address when it is free (so the volume file stays
/// valid), else a fresh loopback port.
async fn bind_replica(recorded: Option<SocketAddr>) -> anyhow::Result<TcpListener> {
    if let Some(addr) = recorded {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => tracing::info!(%addr, error = %e, "recorded replica address is taken; picking a new port"),
        }
    }
    TcpListener::bind("127.0.0.1:0").await.context("bind a replica listener on loopback")
}

fn print_banner(data: &Path, config: &Path, volume: &export::StaticVolume, l: &NbdListeners) -> anyhow::Result<()> {
    let uri = match &l.tcp {
        Some(t) => format!("nbd://{}/{}", t.local_addr()?, volume.name()),
        None => String::new(),
    };
    println!();
    println!("Ballast dev cluster: 3 zones, data in {}", data.display());
    println!(
        "  volume {}: {} bytes, epoch {}, membership {}",
        volume.name(),
        ballast_blockdev::BlockDev::size(volume),
        volume.epoch().0,
        config.display()
    );
    println!("  try:  nbdinfo {uri}");
    println!("        qemu-io -f raw {uri} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'");
    println!("  stop: Ctrl-C");
    println!();
    Ok(())
}
