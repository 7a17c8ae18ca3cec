//! `ballast dev`: the embedded default. One process runs a whole local cluster:
//!
//! ```text
//!   DATA/meta/m1..m3 ─ three meta members (openraft, gRPC 127.0.0.1:m1..m3) ◄─ ballastctl
//!        ▲ register, heartbeat, jobs            ▲ attach, eject, layout
//!   DATA/zone-a/disk0 ─ node 1 (store + replica server + agent) ─┐
//!   DATA/zone-b/disk0 ─ node 2 ──────────────────────────────────┼─ front end ─ NBD nbd://HOST:PORT/NAME
//!   DATA/zone-c/disk0 ─ node 3 ──────────────────────────────────┘
//! ```
//!
//! The components talk over real loopback TCP and gRPC exactly as separate
//! processes would. A second run on the same DATA keeps everything: the meta
//! members rebind the addresses recorded in `DATA/meta/members` (Raft's
//! membership names them), the nodes re-register with their new ports, and the
//! volume is attached again with a higher epoch.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_metaclient::MetaClient;
use ballast_metasvc::{Detector, MetaConfig, RaftTiming};
use ballast_node::{agent, fs_capacity, AgentConfig};
use ballast_proto::v1 as pb;
use ballast_replica::{ReplicaServer, ServerOptions};
use ballast_tls::certs::Pki;
use ballast_tls::Identity;
use tokio::net::TcpListener;

use crate::cli::DevArgs;
use crate::export::NbdListeners;
use crate::{metrics, shutdown};

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// The admin identity `ballast dev` issues for ballastctl (DATA/pki/admin-dev).
const DEV_ADMIN: &str = "dev";

/// Best effort: a dev cluster runs without the record, ballastctl then needs --tls-dir.
fn record_dev_cluster(endpoints: &[String], admin_dir: &Path) {
    let Some(path) = crate::dev_record::path() else { return };
    let text = crate::dev_record::render(endpoints, admin_dir);
    let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&path, text));
    match written {
        Ok(()) => tracing::info!(file = %path.display(), "ballastctl finds this cluster's admin certificate here"),
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot record the dev cluster for ballastctl"),
    }
}

pub async fn run(a: DevArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    let mut registry = ballast_metrics::registry();
    let store_metrics = ballast_chunkstore::StoreMetrics::register(&mut registry);
    let node_metrics = ballast_node::NodeMetrics::register(&mut registry);
    let volume_metrics = ballast_metavolume::VolumeMetrics::register(&mut registry);
    let csi_metrics = ballast_csi::CsiMetrics::register(&mut registry);
    let metrics_addr = a.metrics_listen.unwrap_or_else(|| {
        let port = if a.meta_port == 0 { 0 } else { a.meta_port.saturating_add(80) };
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    });
    let meta_dir = a.data.join("meta");
    std::fs::create_dir_all(&meta_dir).with_context(|| format!("create {}", meta_dir.display()))?;
    // Mutual TLS as in production: a CA in DATA/pki and one certificate per
    // component, each component on its own identity.
    let pki_dir = std::path::absolute(a.data.join("pki")).context("the dev PKI directory")?;
    let pki = Pki::open_or_create(&pki_dir).context("the dev cluster's CA")?;
    let secure = |id: Identity| pki.security(&id).with_context(|| format!("the dev certificate of {id}"));

    // Three meta members on the addresses recorded at the first run.
    let members_file = meta_dir.join("members");
    let listeners = bind_members(&members_file, a.meta_port).await?;
    let members: BTreeMap<u64, String> =
        listeners.iter().map(|(id, l)| Ok((*id, l.local_addr()?.to_string()))).collect::<std::io::Result<_>>()?;
    let mut metas = Vec::new();
    for (id, l) in listeners {
        let cfg = MetaConfig {
            id,
            data_dir: meta_dir.join(format!("m{id}")),
            listen: l.local_addr()?,
            initial_members: members.clone(),
            raft: RaftTiming::default(),
            detector: Detector::default(),
            security: secure(Identity::Meta(id))?,
        };
        metas.push(ballast_metasvc::start_on(cfg, l).await.with_context(|| format!("start meta member {id}"))?);
    }
    // The three members' metrics, one family each with a series per `member`,
    // registered before /metrics is served.
    ballast_metasvc::register_metrics(&mut registry, &metas);
    let metrics = metrics::start(Some(metrics_addr), registry, stop.clone()).await?;
    let endpoints: Vec<String> = members.values().cloned().collect();
    println!("ready meta endpoints={}", endpoints.join(","));
    // Each component calls meta as itself: the nodes (and node 1's front ends)
    // as node/N, volume creation as an admin, the CSI controller as itself.
    let admin =
        MetaClient::new(endpoints.clone(), secure(Identity::Admin(DEV_ADMIN.into()))?).context("meta client")?;
    let admin_dir = pki.issue(&Identity::Admin(DEV_ADMIN.into()))?;
    record_dev_cluster(&endpoints, &admin_dir);
    let mut node_meta = Vec::new();

    // Three storage nodes, one per zone, each on its own disk directory. They stop
    // only after the front end's final flush.
    let (nodes_stop_tx, nodes_stop) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for (i, zone) in ZONES.iter().enumerate() {
        let id = i as u64 + 1;
        let disk = a.data.join(zone).join("disk0");
        let opts = StoreOptions { metrics: Some(store_metrics.disk(id.to_string())), ..StoreOptions::default() };
        let store = ChunkStore::open(&disk, opts).with_context(|| format!("open chunk store {}", disk.display()))?;
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind a replica listener on loopback")?;
        let addr = listener.local_addr()?;
        let security = secure(Identity::Node(id))?;
        let meta = MetaClient::new(endpoints.clone(), security.clone()).context("meta client")?;
        node_meta.push(meta.clone());
        let cfg = AgentConfig {
            id,
            zone: zone.to_string(),
            addr,
            capacity: fs_capacity(&disk)?,
            heartbeat: Duration::from_secs(1),
            copy_rate: Some(128 << 20),
            gc_every: Duration::from_secs(30),
            disk_reserve: None,
            metrics: Some(node_metrics.clone()),
            fill_clones: true,
        };
        // Registered (with this run's port) before the volume is attached.
        let reg = pb::RegisterRequest {
            node: id,
            addr: addr.to_string(),
            zone: cfg.zone.clone(),
            capacity_bytes: cfg.capacity,
        };
        meta.register(reg).await.with_context(|| format!("register node {id} with meta"))?;
        tracing::info!(node = id, zone, %addr, disk = %disk.display(), direct_io = store.direct_io(), "storage node serving");
        println!("ready node id={id} zone={zone} addr={addr} data={}", disk.display());
        tokio::spawn(agent(cfg, meta.clone(), store.clone(), nodes_stop.clone()));
        let stop = nodes_stop.clone();
        servers.spawn(async move {
            let opts = ServerOptions { security, ..ServerOptions::default() };
            ReplicaServer::new(store, opts).serve(listener, shutdown::wait(stop)).await
        });
    }

    // The volume: created on the first run (create is idempotent for the same
    // parameters), attached through meta on every run.
    let meta = admin;
    let exists = meta.inspect_volume(pb::InspectVolumeRequest { volume: a.name.clone() }).await;
    match exists {
        Ok(v) => {
            if let Some(v) = v.volume {
                if v.size_bytes != a.size || v.chunk_size_bytes != a.chunk_size {
                    tracing::info!(
                        size = v.size_bytes,
                        chunk_size = v.chunk_size_bytes,
                        "volume exists; keeping its size and chunk size"
                    );
                }
            }
        }
        Err(e) if e.is_not_found() => {
            let replicas = u32::from(a.replicas);
            let req = pb::CreateVolumeRequest {
                name: a.name.clone(),
                size_bytes: a.size,
                chunk_size_bytes: a.chunk_size,
                replicas,
                min_in_sync: a.min_in_sync.map_or(replicas, |m| m as u32),
                zones: vec![],
                zone_spread: pb::ZoneSpread::Required as i32,
                source_snapshot: String::new(),
                source_volume: String::new(),
            };
            meta.create_volume(req).await.context("create the dev volume")?;
        }
        Err(e) => bail!("look up the dev volume: {e}"),
    }
    // CSI for any CSI client on this machine: Identity, Controller, and the Node
    // service of node 1 (zone-a), on one socket.
    let csi_socket = a.csi_socket.clone().unwrap_or_else(|| a.data.join("csi.sock"));
    let csi_socket =
        std::path::absolute(&csi_socket).with_context(|| format!("CSI socket {}", csi_socket.display()))?;
    let csi_node = ballast_csi::NodeService::new(
        ballast_csi::NodeConfig {
            node_id: 1,
            zone: ZONES[0].to_string(),
            state_dir: a.data.join("csi"),
            max_volumes: 64,
            io_timeout: Duration::from_secs(5),
            volume_metrics: Some(volume_metrics.clone()),
        },
        node_meta[0].clone(),
    )
    .context("CSI node state")?;
    let csi = {
        let (node, socket, stop) = (csi_node.clone(), csi_socket.clone(), stop.clone());
        let identity = ballast_csi::IdentityService::new(true, meta.clone());
        let controller =
            ballast_csi::ControllerService::new(MetaClient::new(endpoints.clone(), secure(Identity::CsiController)?)?);
        tokio::spawn(async move {
            node.recover(Duration::from_secs(30)).await;
            let metrics = Some(csi_metrics);
            ballast_csi::serve_with(&socket, identity, Some(controller), Some(node), metrics, shutdown::wait(stop))
                .await
        })
    };
    println!("ready csi socket={}", csi_socket.display());
    let nbd = NbdListeners::bind(Some(a.nbd), a.socket.as_deref(), false).await?;
    let options = ballast_metavolume::AttachOptions {
        io_timeout: Duration::from_secs(5),
        poll: ballast_metavolume::LAYOUT_POLL,
        metrics: Some(volume_metrics),
        to_fill: false,
    };
    let attached = ballast_metavolume::AttachedVolume::attach_with(
        node_meta[0].clone(),
        &a.name,
        ballast_types::NodeId(1),
        options,
    )
    .await?
    .with_scrub(ballast_metavolume::ScrubConfig::default());
    print_banner(&a.data, &endpoints, attached.volume(), &nbd, &csi_socket, metrics.as_ref().map(|m| m.addr))?;
    nbd.announce(attached.volume().name())?;
    nbd.serve(attached.volume().clone(), stop, Duration::from_secs(10)).await?;
    attached.detach().await?;
    match csi.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "CSI server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "CSI task failed"),
        Ok(Ok(())) => {}
    }
    // Volumes staged through CSI: flushed and detached while the nodes still run.
    csi_node.shutdown().await;
    let _ = nodes_stop_tx.send(true);

    while let Some(r) = servers.join_next().await {
        match r {
            Ok(Err(e)) => tracing::warn!(error = %e, "replica server ended with an error"),
            Err(e) => bail!("replica server task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    for m in metas {
        m.shutdown().await;
    }
    tracing::info!("dev cluster stopped");
    Ok(())
}

/// Binds the three meta listeners: the addresses in `file` when it exists (they
/// are part of the Raft membership and cannot change), else `base`..`base+2`
/// when free (any free ports otherwise), which are then recorded.
async fn bind_members(file: &Path, base: u16) -> anyhow::Result<Vec<(u64, TcpListener)>> {
    let mut out = Vec::new();
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let members = crate::cli::parse_members(text.trim()).map_err(anyhow::Error::msg)?;
            for (id, addr) in members {
                let l = TcpListener::bind(&addr).await.with_context(|| {
                    format!(
                        "meta member {id} must listen on {addr} again (recorded in {}); free that port",
                        file.display()
                    )
                })?;
                out.push((id, l));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // ballastctl's default endpoint is 127.0.0.1:7400: take 7400-7402 when
            // they are free, so that it talks to this cluster without flags.
            if base != 0 {
                for id in 1..=3u64 {
                    match TcpListener::bind(("127.0.0.1", base.saturating_add(id as u16 - 1))).await {
                        Ok(l) => out.push((id, l)),
                        Err(_) => break,
                    }
                }
            }
            if out.len() < 3 {
                if base != 0 {
                    tracing::warn!(
                        base,
                        "meta ports {base}-{} are not all free; using other ports (give ballastctl --meta)",
                        base.saturating_add(2)
                    );
                }
                out.clear();
                for id in 1..=3u64 {
                    out.push((id, TcpListener::bind("127.0.0.1:0").await.context("bind a meta listener")?));
                }
            }
            let text: Vec<String> =
                out.iter().map(|(id, l)| Ok(format!("{id}={}", l.local_addr()?))).collect::<std::io::Result<_>>()?;
            std::fs::write(file, text.join(",") + "\n").with_context(|| format!("write {}", file.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("read {}", file.display())),
    }
    Ok(out)
}

fn print_banner(
    data: &Path,
    meta: &[String],
    volume: &ballast_metavolume::MetaVolume,
    l: &NbdListeners,
    csi: &Path,
    metrics: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let uri = match &l.tcp {
        Some(t) => format!("nbd://{}/{}", t.local_addr()?, volume.name()),
        None => String::new(),
    };
    let meta = meta.join(",");
    println!();
    println!("Ballast dev cluster: 3 meta members, 3 storage nodes in 3 zones, data in {}", data.display());
    println!(
        "  volume {}: {} bytes, epoch {}",
        volume.name(),
        ballast_blockdev::BlockDev::size(volume),
        volume.epoch().0
    );
    println!("  TLS:    every channel; CA and certificates in {}/pki", data.display());
    println!("  admin:  ballastctl --meta {meta} status");
    println!("          ballastctl --meta {meta} volume inspect {}", volume.name());
    println!("  try:    nbdinfo {uri}");
    println!("          qemu-io -f raw {uri} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'");
    println!("  CSI:    unix://{} (Identity, Controller, Node of node 1)", csi.display());
    if let Some(addr) = metrics {
        println!("  metrics: http://{addr}/metrics (Prometheus)");
    }
    println!("  stop:   Ctrl-C");
    println!();
    Ok(())
}
