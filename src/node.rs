//! `ballast node`: a storage node. It serves its disk's chunk store over the
//! data-path protocol and runs the agent beside it (crates/node: registration,
//! heartbeats with the disk's verdict, copy jobs, garbage collection).
//!
//! This file only turns flags into components: it resolves the node's id (flag
//! or `DATA/node-id`) and zone, opens the store, and wires the replica server,
//! the agent and, with `--csi-endpoint`, the CSI Node plugin together; with
//! `--registration-dir` that plugin registers with the kubelet
//! (crates/csi/src/registration.rs) and `--health-listen` serves the kubelet's
//! probes (src/health.rs).

use std::time::Duration;

use anyhow::Context;
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_csi::registration::{self, RegistrationError, RegistrationService};
use ballast_csi::{IdentityService, NodeConfig, NodeService};
use ballast_metaclient::MetaClient;
use ballast_node::{agent, fs_capacity, AgentConfig};
use ballast_replica::{ReplicaServer, ServerOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info};

use crate::cli::NodeArgs;
use crate::{health, metrics, shutdown};

/// The node id: the flag, else the one recorded in `data/node-id`, else a new
/// random one recorded there (written before the node first registers, so a
/// restart keeps its identity and its replicas).
pub(crate) fn node_id(flag: Option<u64>, data: &std::path::Path) -> anyhow::Result<u64> {
    let path = data.join("node-id");
    let recorded = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().parse::<u64>().with_context(|| format!("{} holds no node id", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    match (flag, recorded) {
        (Some(f), Some(r)) if f != r => {
            anyhow::bail!(
                "--id {f} differs from the id {r} recorded in {}: this disk belongs to node {r}",
                path.display()
            )
        }
        (Some(0), _) => anyhow::bail!("--id must be 1 or more"),
        (Some(f), _) => Ok(f),
        (None, Some(r)) => Ok(r),
        (None, None) => {
            let mut b = [0u8; 4];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
                .context("read /dev/urandom")?;
            // 1 ..= 2^31: readable in ballastctl, and collisions are for an
            // operator's --id to settle (registering checks the zone).
            let id = u64::from(u32::from_le_bytes(b) >> 1) + 1;
            std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{id}\n")).with_context(|| format!("write {}", tmp.display()))?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).context("sync the node id")?;
            std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
            info!(node = id, file = %path.display(), "new node id chosen");
            Ok(id)
        }
    }
}

fn zone(a: &NodeArgs) -> anyhow::Result<String> {
    let zone = match (&a.zone, &a.zone_file) {
        (Some(z), _) => z.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("read the zone from {}", f.display()))?,
        (None, None) => anyhow::bail!("give --zone or --zone-file"),
    };
    let zone = zone.trim().to_string();
    anyhow::ensure!(!zone.is_empty(), "the zone is empty (a node without a zone label?)");
    Ok(zone)
}

pub async fn run(a: NodeArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    let mut registry = ballast_metrics::registry();
    let store_metrics = ballast_chunkstore::StoreMetrics::register(&mut registry);
    let node_metrics = ballast_node::NodeMetrics::register(&mut registry);
    let volume_metrics = ballast_metavolume::VolumeMetrics::register(&mut registry);
    let csi_metrics = ballast_csi::CsiMetrics::register(&mut registry);
    let _metrics = metrics::start(a.metrics.metrics_listen, registry, stop.clone()).await?;
    let id = node_id(a.id, &a.data)?;
    let security =
        a.tls.security_as("ballast node", |i| *i == ballast_tls::Identity::Node(id), &format!("node/{id}"))?;
    let zone = zone(&a)?;
    let disk_metrics = Some(store_metrics.disk(id.to_string()));
    let opts = StoreOptions { direct_io: !a.no_direct_io, metrics: disk_metrics, ..StoreOptions::default() };
    let store = ChunkStore::open(&a.data, opts).with_context(|| format!("open chunk store {}", a.data.display()))?;
    let listener = TcpListener::bind(a.listen).await.with_context(|| format!("listen on {}", a.listen))?;
    let bound = listener.local_addr()?;
    let addr = a.advertise.unwrap_or(bound);
    let capacity = match a.capacity {
        Some(c) => c,
        None => fs_capacity(&a.data)?,
    };
    let meta =
        MetaClient::new(ballast_metaclient::parse_endpoints(&a.meta), security.clone()).context("meta endpoints")?;
    let cfg = AgentConfig {
        id,
        zone: zone.clone(),
        addr,
        capacity,
        heartbeat: a.heartbeat,
        copy_rate: (a.copy_rate > 0).then_some(a.copy_rate),
        gc_every: a.gc_every,
        fill_clones: a.fill_clones,
        disk_reserve: a.disk_reserve,
        metrics: Some(node_metrics),
    };
    info!(node = id, zone = %zone, %addr, capacity, "storage node serving");
    println!("ready node id={id} addr={bound}");
    let csi = match &a.csi_endpoint {
        Some(endpoint) => {
            let socket = ballast_csi::parse_endpoint(endpoint).map_err(anyhow::Error::msg)?;
            let cfg = NodeConfig {
                node_id: id,
                zone: zone.clone(),
                state_dir: a.csi_state.clone(),
                max_volumes: a.csi_max_volumes,
                io_timeout: Duration::from_secs(5),
                volume_metrics: Some(volume_metrics),
            };
            let service = NodeService::new(cfg, meta.clone())
                .with_context(|| format!("CSI state directory {}", a.csi_state.display()))?;
            let identity = IdentityService::new(false, meta.clone());
            // Checked before anything is served: a bad flag fails the start.
            let kubelet_reg = match (&a.registration_dir, &a.kubelet_registration_path) {
                (Some(dir), Some(host_path)) => {
                    anyhow::ensure!(
                        dir.is_dir(),
                        "--registration-dir {}: no such directory (mount the kubelet's plugins_registry there)",
                        dir.display()
                    );
                    Some((dir.clone(), RegistrationService::new(host_path)?))
                }
                // clap: the two flags come together.
                _ => None,
            };
            let health = match a.health_listen {
                Some(addr) => Some(health::bind(addr).await?),
                None => None,
            };
            let (svc, stop_csi) = (service.clone(), stop.clone());
            info!(node = id, k8s_node = ?a.csi_node_name, socket = %socket.display(), "CSI node service");
            println!("ready csi socket={}", socket.display());
            let s = socket.clone();
            let server = tokio::spawn(async move {
                // Volumes staged before a restart come back first (meta may need a while).
                svc.recover(Duration::from_secs(120)).await;
                ballast_csi::serve_with(&s, identity, None, Some(svc), Some(csi_metrics), shutdown::wait(stop_csi))
                    .await
            });
            let registration = kubelet_reg.map(|(dir, reg)| {
                let (s, stop) = (socket.clone(), stop.clone());
                tokio::spawn(async move {
                    // The kubelet calls NodeGetInfo on the CSI socket as soon as it
                    // has read the registration: the registration socket appears
                    // only once the CSI socket answers (after the recovery above).
                    if !health::wait_for_csi(&s, stop.clone()).await {
                        return Ok(());
                    }
                    info!(socket = %s.display(), "CSI socket answers: registering with the kubelet");
                    registration::serve(&dir, reg, shutdown::wait(stop)).await
                })
            });
            let health = health.map(|listener| {
                if let Ok(addr) = listener.local_addr() {
                    println!("ready health addr={addr}");
                }
                tokio::spawn(health::serve(listener, socket.clone(), shutdown::wait(stop.clone())))
            });
            Some(Csi { service, server, registration, health })
        }
        None => None,
    };
    let agent = tokio::spawn(agent(cfg, meta, store.clone(), stop.clone()));
    // The replica server stops last: the volumes this node's CSI service staged
    // may keep replicas here, and their final flush needs it.
    let (replicas_stop, replicas_stopped) = watch::channel(false);
    let replicas = tokio::spawn(
        ReplicaServer::new(store, ServerOptions { security, ..ServerOptions::default() })
            .serve(listener, shutdown::wait(replicas_stopped)),
    );
    shutdown::wait(stop).await;
    let mut result = Ok(());
    if let Some(Csi { service, server, registration, health }) = csi {
        result = server.await.context("CSI task").and_then(|r| r.context("CSI server"));
        // Neither ends the node when it fails (the data path goes on), but both
        // are reported: unregistered, the kubelet cannot use this node's plugin.
        if let Some(task) = registration {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "kubelet plugin registration failed"),
                Err(e) => error!(error = %e, "kubelet plugin registration task"),
            }
        }
        if let Some(task) = health {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = format!("{e:#}"), "health endpoints failed"),
                Err(e) => error!(error = %e, "health endpoints task"),
            }
        }
        // A clean stop unstages (flushes, releases leases); the records stay so
        // the next start stages the same volumes again.
        service.shutdown().await;
    }
    let _ = replicas_stop.send(true);
    replicas.await.context("replica server task")?.context("replica server")?;
    result?;
    let _ = agent.await;
    info!("storage node stopped");
    Ok(())
}

/// The CSI side of a storage node: the node service, its server task, and
/// (with their flags) the kubelet plugin registration and the health endpoints.
struct Csi {
    service: NodeService,
    server: tokio::task::JoinHandle<Result<(), ballast_csi::ServeError>>,
    registration: Option<tokio::task::JoinHandle<Result<(), RegistrationError>>>,
    health: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}
