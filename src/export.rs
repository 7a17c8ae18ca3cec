//! `ballast volume create` and `ballast export`: a static volume definition, and a
//! front end that attaches it (new epoch, fencing older front ends) and serves it
//! over NBD until SIGINT/SIGTERM, scrubbing it on a schedule meanwhile (one
//! `scrub pass volume=NAME bytes=N corrupt=N repaired=N unrepairable=N` line on
//! stdout per pass).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{
    scrub_periodically, tcp_connector, Membership, ScrubReport, StaticConfig, StaticMembership, Volume, VolumeMetrics,
    VolumeOptions,
};
use ballast_metaclient::MetaClient;
use ballast_metavolume::{AttachOptions, AttachedVolume, SnapshotDevice, LAYOUT_POLL};
use ballast_nbd::{Export, NbdOptions, NbdServer};
use ballast_replica::{ClientOptions, ReplicaClient};
use ballast_tls::Security;
use ballast_types::{NodeId, VolumeId, Zone};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::cli::{ExportArgs, VolumeCreateArgs};
use crate::{metrics, shutdown};

/// The front end as `ballast` runs it: static membership, TCP replica clients.
pub type StaticVolume = Volume<StaticMembership, ReplicaClient>;

/// The stdout line `ballast export` prints after each scrub pass (test
/// harnesses parse it).
pub fn scrub_line(volume: &str, r: &ScrubReport) -> String {
    format!(
        "scrub pass volume={volume} bytes={} corrupt={} repaired={} unrepairable={} snapshot_views={}",
        r.bytes_read, r.corrupt_pieces, r.repaired, r.unrepairable, r.snapshot_views
    )
}

/// Prints [`scrub_line`] for every report published on `reports`, until its
/// sender is gone.
fn print_scrub_reports(
    volume: String,
    mut reports: watch::Receiver<Option<ScrubReport>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while reports.changed().await.is_ok() {
            let report = reports.borrow_and_update().clone();
            if let Some(r) = report {
                println!("{}", scrub_line(&volume, &r));
            }
        }
    })
}

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
    metrics: Option<VolumeMetrics>,
    security: Security,
) -> anyhow::Result<Arc<StaticVolume>> {
    let id = membership.config().await.volume.id;
    let client = ClientOptions { timeout: io_timeout, security, ..ClientOptions::default() };
    let options = VolumeOptions { local_node, io_timeout, metrics, ..VolumeOptions::default() };
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
                // The export is unauthenticated: only this user may connect.
                // Bound beside, made 0600, then renamed into place.
                use std::os::unix::fs::PermissionsExt;
                let tmp = path.with_extension("sock.tmp");
                let _ = std::fs::remove_file(&tmp);
                let listener = UnixListener::bind(&tmp).with_context(|| format!("bind {}", tmp.display()))?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("chmod 0600 {}", tmp.display()))?;
                std::fs::rename(&tmp, path).with_context(|| format!("rename into {}", path.display()))?;
                Some((listener, path.to_path_buf()))
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
    /// in-flight requests (bounded by `grace`), flushes and closes it.
    pub async fn serve<M: Membership>(
        self,
        volume: Arc<Volume<M, ReplicaClient>>,
        stop: watch::Receiver<bool>,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let export = Export::new(volume.name().to_string(), volume.clone()).with_description("ballast volume");
        self.serve_export(export, stop, grace).await?;
        // Everything acknowledged is on every in-sync replica already; a final flush
        // makes it durable there too, so a clean stop leaves no dirty chunk behind.
        use ballast_blockdev::BlockDev;
        if let Err(e) = volume.flush().await {
            tracing::warn!(error = %e, "final flush failed");
        }
        volume.close();
        Ok(())
    }

    /// Serves one export until `stop` turns true, then lets connections finish
    /// their in-flight requests (bounded by `grace`).
    pub async fn serve_export<B: ballast_blockdev::BlockDev>(
        self,
        export: Export<B>,
        stop: watch::Receiver<bool>,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let server = Arc::new(NbdServer::new(vec![export], NbdOptions::default()).context("nbd server")?);
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
        Ok(())
    }
}

pub async fn run(a: ExportArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    let mut registry = ballast_metrics::registry();
    let volume_metrics = VolumeMetrics::register(&mut registry);
    let _metrics = metrics::start(a.metrics.metrics_listen, registry, stop.clone()).await?;
    let listeners = NbdListeners::bind(a.nbd, a.socket.as_deref(), a.allow_remote).await?;
    // A front end: a frontend/N certificate (or node/N: a node's own front ends).
    let security = a.tls.security_as("ballast export", |i| i.node().is_some(), "a front end (frontend/N or node/N)")?;
    let local_node = a.local_node.or_else(|| security.identity().and_then(|i| i.node()));
    match (&a.config, &a.meta) {
        (Some(config), None) => {
            let membership = StaticMembership::load(config).with_context(|| format!("load {}", config.display()))?;
            let volume =
                attach(membership, local_node.map(NodeId), a.io_timeout, Some(volume_metrics), security).await?;
            listeners.announce(volume.name())?;
            let scrub = a.scrub.config().map(|config| {
                let (reports, rx) = watch::channel(None);
                let printer = print_scrub_reports(volume.name().to_string(), rx);
                // Cut short when the shutdown starts, before the final flush.
                let (v, stop) = (volume.clone(), stop.clone());
                let scrubber = tokio::spawn(async move {
                    tokio::select! {
                        _ = scrub_periodically(v, config, reports) => {}
                        _ = shutdown::wait(stop) => {}
                    }
                });
                (scrubber, printer)
            });
            let served = listeners.serve(volume, stop, Duration::from_secs(30)).await;
            if let Some((scrubber, printer)) = scrub {
                scrubber.abort();
                let _ = scrubber.await;
                let _ = printer.await;
            }
            served
        }
        (None, Some(endpoints)) if a.snapshot.is_some() => {
            let name = a.snapshot.as_deref().unwrap_or_default();
            let meta = MetaClient::new(ballast_metaclient::parse_endpoints(endpoints), security.clone())
                .context("meta endpoints")?;
            let client = ClientOptions { timeout: a.io_timeout, security, ..ClientOptions::default() };
            let dev = SnapshotDevice::open(meta, name, client).await?;
            let description = format!("ballast snapshot of {} at {}", dev.volume_name(), dev.cut());
            let export =
                Export::new(dev.name().to_string(), Arc::new(dev)).with_description(description).read_only(true);
            listeners.announce(&export.name)?;
            listeners.serve_export(export, stop, Duration::from_secs(30)).await
        }
        (None, Some(endpoints)) => {
            let (Some(name), Some(node)) = (&a.volume, local_node) else {
                bail!("with --meta, give the volume name (--volume) and this node's id (--local-node)");
            };
            if let Some(n) = security.identity().and_then(|i| i.node()) {
                anyhow::ensure!(n == node, "--local-node {node}: the certificate is for a front end on node {n}");
            }
            let meta =
                MetaClient::new(ballast_metaclient::parse_endpoints(endpoints), security).context("meta endpoints")?;
            let options = AttachOptions {
                io_timeout: a.io_timeout,
                poll: LAYOUT_POLL,
                metrics: Some(volume_metrics),
                to_fill: false,
            };
            let attached = AttachedVolume::attach_with(meta, name, NodeId(node), options).await?;
            listeners.announce(attached.volume().name())?;
            let (attached, printer) = match a.scrub.config() {
                Some(config) => {
                    let attached = attached.with_scrub(config);
                    let printer = print_scrub_reports(attached.volume().name().to_string(), attached.scrub_reports());
                    (attached, Some(printer))
                }
                None => (attached, None),
            };
            listeners.serve(attached.volume().clone(), stop, Duration::from_secs(30)).await?;
            attached.detach().await?;
            if let Some(printer) = printer {
                let _ = printer.await;
            }
            Ok(())
        }
        _ => bail!("give either --config FILE (a static volume) or --meta ENDPOINTS (the metadata service)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_flags_and_line() {
        use ballast_frontend::ScrubConfig;
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(["ballast", "export", "--config", "v.toml"]).unwrap();
        let crate::cli::Command::Export(a) = cli.command else { panic!("not export") };
        assert_eq!(a.scrub.config(), Some(ScrubConfig::default()), "defaults: 24h at 64 MiB/s");
        let cli = crate::cli::Cli::try_parse_from([
            "ballast",
            "export",
            "--config",
            "v.toml",
            "--scrub-interval",
            "off",
            "--scrub-rate",
            "8M",
        ])
        .unwrap();
        let crate::cli::Command::Export(a) = cli.command else { panic!("not export") };
        assert_eq!((a.scrub.config(), a.scrub.rate), (None, 8 << 20));

        let r = ScrubReport {
            bytes_read: 7,
            corrupt_pieces: 3,
            repaired: 2,
            unrepairable: 1,
            snapshot_views: 4,
            ..Default::default()
        };
        assert_eq!(
            scrub_line("pg-0", &r),
            "scrub pass volume=pg-0 bytes=7 corrupt=3 repaired=2 unrepairable=1 snapshot_views=4"
        );
    }
}
