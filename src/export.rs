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
use ballast_metaclient::{AttachedVolume, MetaClient, LAYOUT_POLL};
use ballast_nbd::{Export, NbdOptions, NbdServer};
use ballast_replica::{ClientOptions, ReplicaClient};
use ballast_types::{NodeId, VolumeId, Zone};
use tokio::net::{TcpListener, UnixListener};

use crate::cli::{ExportArgs, VolumeCreateArgs};
use crate::shutdown;

/// The front end as `ballast` runs it: static membership, TCP replica clients.
pub type StaticVolume = Volume<StaticMembership, ReplicaClient>;

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
            let attached = AttachedVolume::attach(meta, name, NodeId(node), a.io_timeout, LAYOUT_POLL).await?;
            listeners.announce(attached.volume().name())?;
            listeners.serve(attached.volume().clone(), stop, Duration::from_secs(30)).await?;
            attached.detach().await?;
            Ok(())
        }
        _ => bail!("give either --config FILE (a static volume) or --meta ENDPOINTS (the metadata service)"),
    }
}
