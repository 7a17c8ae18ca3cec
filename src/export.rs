//! `ballast volume create` and `ballast export`: a static volume definition, and a
//! front end that attaches it (new epoch, fencing older front ends) and serves it
//! over NBD until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{tcp_connector, Membership, StaticConfig, StaticMembership, Volume, VolumeOptions};
use ballast_metaclient::{MetaClient, MetaMembership};
use ballast_nbd::{Export, NbdOptions, NbdServer};
use ballast_proto::v1 as pb;
use ballast_replica::{ClientOptions, ReplicaClient};
use ballast_types::{NodeId, VolumeId, Zone};
use tokio::net::{TcpListener, UnixListener};

use crate::cli::{ExportArgs, VolumeCreateArgs};
use crate::shutdown;

/// The front end as `ballast` runs it: static membership, TCP replica clients.
pub type StaticVolume = Volume<StaticMembership, ReplicaClient>;
/// The front end with the metadata service as its membership.
pub type MetaVolume = Volume<Arc<MetaMembership>, ReplicaClient>;

pub fn create_volume(a: VolumeCreateArgs) -> anyhow::Result<()> {
    let replicas = a.nodes.len();
    let config = StaticConfig::new(
        VolumeSpec {
            id: VolumeId(a.id),
            name: a.name.clone(),
            size: a.size,
            chunk_size: a.chunk_size,
            min_in_sync: a.min_in_sync.unwrap_or(replicas),
        },
        a.nodes.iter().map(|n| NodeSpec { id: NodeId(n.id), zone: Zone(n.zone.clone()), addr: n.addr }).collect(),
        a.nodes.iter().map(|n| NodeId(n.id)).collect(),
    );
    StaticMembership::create(&a.config, config).with_context(|| format!("create {}", a.config.display()))?;
    println!("created volume {} ({} bytes, {} replicas) in {}", a.name, a.size, replicas, a.config.display());
    Ok(())
}

/// Attaches volume `name` through the metadata service as node `node`.
pub async fn attach_meta(
    meta: MetaClient,
    name: &str,
    node: NodeId,
    io_timeout: Duration,
) -> anyhow::Result<(Arc<MetaVolume>, Arc<MetaMembership>)> {
    let membership = Arc::new(MetaMembership::new(meta, name, node));
    let id = membership.resolve_volume_id().await.with_context(|| format!("look up volume {name:?}"))?;
    let client = ClientOptions { timeout: io_timeout, ..ClientOptions::default() };
    let options = VolumeOptions { local_node: Some(node), io_timeout, ..VolumeOptions::default() };
    let volume =
        Volume::attach(membership.clone(), tcp_connector(client), id, options).await.context("attach volume")?;
    Ok((volume, membership))
}

/// How often an attached front end asks meta for a newer layout. A copy job waits
/// for the front end to acknowledge its target, so this bounds that wait; the
/// poll is a local read on any member.
pub const LAYOUT_POLL: Duration = Duration::from_millis(250);

/// Follows the volume's layout while it is attached: every `every`, fetches it
/// from meta, installs a newer generation into the front end (which returns only
/// once writes go to the new targets, see `Volume::apply_layout`), and then
/// acknowledges the generation, which lets meta's copy jobs start. Meta being
/// unreachable only delays this; I/O goes on.
pub async fn follow_layout(
    volume: Arc<MetaVolume>,
    membership: Arc<MetaMembership>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = 0u64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (gen, layout) = match membership.layout().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "layout poll failed");
                continue;
            }
        };
        if gen <= applied {
            continue;
        }
        match volume.apply_layout(&layout).await {
            Ok(changed) => {
                if changed > 0 {
                    tracing::info!(gen, changed, "new layout installed");
                }
                match membership.ack_layout(volume.epoch(), gen).await {
                    Ok(()) => applied = gen,
                    Err(e) => tracing::warn!(gen, error = %e, "layout acknowledgement failed; retrying"),
                }
            }
            Err(e) => tracing::warn!(gen, error = %e, "installing the new layout failed; retrying"),
        }
    }
}

/// Releases the attach lease after a clean stop (best effort: a lease left
/// behind only delays copy jobs until the next attach).
pub async fn detach(meta: &MetaClient, volume: &MetaVolume) {
    let req = pb::DetachRequest { volume: volume.id().0, epoch: volume.epoch().0 };
    if let Err(e) = meta.detach(req).await {
        tracing::warn!(error = %e, "detach failed");
    }
}

/// Attaches the volume described by `membership` with the given options.
pub async fn attach(
    membership: StaticMembership,
    local_node: Option<NodeId>,
    io_timeout: Duration,
) -> anyhow::Result<Arc<StaticVolume>> {
    let id = membership.config().await.volume.id;
    let client = ClientOptions { timeout: io_timeout, ..ClientOptions::default() };
    let options = VolumeOptions { local_node, io_timeout, ..VolumeOptions::default() };
    Volume::attach(membership, tcp_connector(client), id, options).await.context("attach volume")
}

/// Listeners for one NBD export: loopback TCP and/or a unix socket.
pub struct NbdListeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<(UnixListener, PathBuf)>,
}

impl NbdListeners {
    pub async fn bind(tcp: Option<SocketAddr>, unix: Option<&Path>, allow_remote: bool) -> anyhow::Result<Self> {
        if tcp.is_none() && unix.is_none() {
            bail!("give an NBD address (--nbd HOST:PORT) or a unix socket (--socket PATH)");
        }
        let tcp = match tcp {
            Some(addr) => {
                if !addr.ip().is_loopback() && !allow_remote {
                    bail!("refusing to export on {addr}: NBD is unauthenticated; use a loopback address or --allow-remote");
                }
                Some(TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?)
            }
            None => None,
        };
        let unix = match unix {
            Some(path) => {
                // A stale socket file from a killed process would make bind fail.
                if path.exists() {
                    std::fs::remove_file(path).with_context(|| format!("remove stale socket {}", path.display()))?;
                }
                Some((
                    UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?,
                    path.to_path_buf(),
                ))
            }
            None => None,
        };
        Ok(NbdListeners { tcp, unix })
    }

    /// Prints one `ready nbd uri=...` line per listener.
    pub fn announce(&self, export: &str) -> anyhow::Result<()> {
        if let Some(l) = &self.tcp {
            println!("ready nbd uri=nbd://{}/{export}", l.local_addr()?);
        }
        if let Some((_, p)) = &self.unix {
            println!("ready nbd uri=nbd+unix:///{export}?socket={}", p.display());
        }
        Ok(())
    }

    /// Serves `volume` until `stop` turns true, then lets connections finish their
    /// in-flight requests (bounded by `grace`).
    pub async fn serve<M: Membership>(
        self,
        volume: Arc<Volume<M, ReplicaClient>>,
        stop: tokio::sync::watch::Receiver<bool>,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let name = volume.name().to_string();
        let server = Arc::new(
            NbdServer::new(
                vec![Export::new(name.clone(), volume.clone()).with_description("ballast volume")],
                NbdOptions::default(),
            )
            .context("nbd server")?,
        );
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(l) = self.tcp {
            let (s, stop) = (server.clone(), stop.clone());
            tasks.spawn(async move { s.serve_tcp(l, shutdown::wait(stop)).await });
        }
        let socket = self.unix.map(|(l, p)| {
            let (s, stop) = (server.clone(), stop.clone());
            tasks.spawn(async move { s.serve_unix(l, shutdown::wait(stop)).await });
            p
        });
        shutdown::wait(stop).await;
        let drained = tokio::time::timeout(grace, async {
            while let Some(r) = tasks.join_next().await {
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "nbd listener ended with an error");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(?grace, "NBD clients still connected after the grace period; closing them");
            tasks.abort_all();
        }
        if let Some(p) = socket {
            let _ = std::fs::remove_file(p);
        }
        // Everything acknowledged is on every in-sync replica already; a final flush
        // makes it durable there too, so a clean stop leaves no dirty chunk behind.
        use ballast_blockdev::BlockDev;
        if let Err(e) = volume.flush().await {
            tracing::warn!(error = %e, "final flush failed");
        }
        volume.close();
        Ok(())
    }
}

pub async fn run(a: ExportArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    let listeners = NbdListeners::bind(a.nbd, a.socket.as_deref(), a.allow_remote).await?;
    match (&a.config, &a.meta) {
        (Some(config), None) => {
            let membership = StaticMembership::load(config).with_context(|| format!("load {}", config.display()))?;
            let volume = attach(membership, a.local_node.map(NodeId), a.io_timeout).await?;
            listeners.announce(volume.name())?;
            listeners.serve(volume, stop, Duration::from_secs(30)).await
        }
        (None, Some(endpoints)) => {
            let (Some(name), Some(node)) = (&a.volume, a.local_node) else {
                bail!("with --meta, give the volume name (--volume) and this node's id (--local-node)");
            };
            let meta = MetaClient::new(ballast_metaclient::parse_endpoints(endpoints)).context("meta endpoints")?;
            let (volume, membership) = attach_meta(meta.clone(), name, NodeId(node), a.io_timeout).await?;
            let follow = tokio::spawn(follow_layout(volume.clone(), membership, LAYOUT_POLL, stop.clone()));
            listeners.announce(volume.name())?;
            listeners.serve(volume.clone(), stop, Duration::from_secs(30)).await?;
            let _ = follow.await;
            detach(&meta, &volume).await;
            Ok(())
        }
        _ => bail!("give either --config FILE (a static volume) or --meta ENDPOINTS (the metadata service)"),
    }
}
