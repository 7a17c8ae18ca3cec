//! `ballast meta`: one member of the metadata service until SIGINT/SIGTERM.

use anyhow::Context;
use ballast_metasvc::{Detector, MetaConfig, RaftTiming};

use crate::cli::MetaArgs;
use crate::{metrics, shutdown};

pub fn config(a: &MetaArgs, security: ballast_tls::Security) -> MetaConfig {
    MetaConfig {
        security,
        id: a.id,
        data_dir: a.data.clone(),
        listen: a.listen,
        initial_members: a.initial_members.clone().unwrap_or_default(),
        raft: RaftTiming {
            heartbeat_ms: a.raft_heartbeat_ms,
            election_min_ms: a.election_ms,
            election_max_ms: a.election_ms * 2,
            ..RaftTiming::default()
        },
        detector: Detector { suspect_after: a.suspect_after, down_after: a.down_after, ..Detector::default() },
    }
}

pub async fn run(a: MetaArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    if let Some(m) = &a.initial_members {
        anyhow::ensure!(m.contains_key(&a.id), "--initial-members must include this member ({})", a.id);
    }
    let id = a.id;
    let security =
        a.tls.security_as("ballast meta", |i| *i == ballast_tls::Identity::Meta(id), &format!("meta/{id}"))?;
    let handle = ballast_metasvc::start(config(&a, security)).await.context("start meta member")?;
    println!("ready meta id={} addr={}", handle.id, handle.addr);
    let mut registry = ballast_metrics::registry();
    handle.register_metrics(&mut registry);
    let metrics = metrics::start(a.metrics.metrics_listen, registry, stop.clone()).await?;
    shutdown::wait(stop).await;
    handle.shutdown().await;
    if let Some(m) = metrics {
        let _ = m.task.await;
    }
    Ok(())
}
