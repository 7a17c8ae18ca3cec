//! `ballast csi-controller`: the CSI Controller and Identity services on a unix
//! socket for the Kubernetes sidecars (external-provisioner, -attacher, -resizer).
//! It keeps no state of its own: every call goes to the metadata service.
//! `--health-listen` serves the kubelet's probes (src/health.rs).

use anyhow::Context;
use ballast_csi::{ControllerService, IdentityService};
use ballast_metaclient::MetaClient;

use crate::cli::CsiControllerArgs;
use crate::{health, metrics, shutdown};

pub async fn run(a: CsiControllerArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    let socket = ballast_csi::parse_endpoint(&a.endpoint).map_err(anyhow::Error::msg)?;
    let security = a.tls.security_as(
        "ballast csi-controller",
        |i| *i == ballast_tls::Identity::CsiController,
        "csi-controller",
    )?;
    let meta = MetaClient::new(ballast_metaclient::parse_endpoints(&a.meta), security).context("meta endpoints")?;
    let identity = IdentityService::new(true, meta.clone());
    let controller = ControllerService::new(meta);
    let health = match a.health_listen {
        Some(addr) => {
            let listener = health::bind(addr).await?;
            println!("ready health addr={}", listener.local_addr().context("health listener address")?);
            Some(tokio::spawn(health::serve(listener, socket.clone(), shutdown::wait(stop.clone()))))
        }
        None => None,
    };
    let mut registry = ballast_metrics::registry();
    let csi_metrics = Some(ballast_csi::CsiMetrics::register(&mut registry));
    let metrics = metrics::start(a.metrics.metrics_listen, registry, stop.clone()).await?;
    println!("ready csi socket={}", socket.display());
    let served = ballast_csi::serve_with(&socket, identity, Some(controller), None, csi_metrics, shutdown::wait(stop))
        .await
        .context("CSI server");
    if let Some(m) = metrics {
        if served.is_err() {
            m.task.abort();
        }
        let _ = m.task.await;
    }
    if let Some(task) = health {
        if served.is_err() {
            // The CSI server failed before any signal: the health server would
            // wait for one forever.
            task.abort();
        }
        match task.await {
            Err(e) if e.is_cancelled() => {}
            joined => joined.context("health endpoints task")?.context("health endpoints")?,
        }
    }
    served
}
