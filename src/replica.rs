//! `ballast replica`: one disk directory's chunk store served over the data-path
//! protocol until SIGINT/SIGTERM.

use anyhow::Context;
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_replica::{ReplicaServer, ServerOptions};
use tokio::net::TcpListener;

use crate::cli::ReplicaArgs;
use crate::{metrics, shutdown};

pub async fn run(args: ReplicaArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    let security =
        args.tls.security_as("ballast replica", |i| matches!(i, ballast_tls::Identity::Node(_)), "a storage node")?;
    let mut registry = ballast_metrics::registry();
    // No node id here: the disk is named by the address it is served on.
    let disk_metrics = Some(ballast_chunkstore::StoreMetrics::register(&mut registry).disk(args.listen.to_string()));
    let opts = StoreOptions { direct_io: !args.no_direct_io, metrics: disk_metrics, ..StoreOptions::default() };
    let store =
        ChunkStore::open(&args.data, opts).with_context(|| format!("open chunk store {}", args.data.display()))?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data = %args.data.display(), direct_io = store.direct_io(), chunks = store.chunks().len(), "replica serving");
    println!("ready replica addr={addr} data={}", args.data.display());
    let metrics = metrics::start(args.metrics.metrics_listen, registry, stop.clone()).await?;
    ReplicaServer::new(store, ServerOptions { security, ..ServerOptions::default() })
        .serve(listener, shutdown::wait(stop))
        .await
        .context("replica server")?;
    if let Some(m) = metrics {
        let _ = m.task.await;
    }
    tracing::info!("replica stopped");
    Ok(())
}
