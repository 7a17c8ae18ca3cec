//! `ballast meta`: one member of the metadata service.
//!
//! ```text
//!            gRPC (one listener per member)
//!   ballastctl, csi ──► Admin ──┐                 ┌── leader loop: failure detector,
//!   nodes, front ends ► NodeApi ┼─► Core ─ Raft ──┤   rebuild scheduler (plan.rs)
//!   other members ────► Raft ───┘   (openraft)    └── redb log + state machine
//! ```
//!
//! It owns the process side of the metadata service: the openraft instance over
//! the redb store of `ballast-meta`, the gRPC transport between members, the
//! services in `proto/ballast/v1/meta.proto`, and the leader's timers. It decides
//! nothing itself: every decision is a `Command` applied by the state machine.
//! The data path never links this crate.

mod authz;
mod convert;
pub mod leader;
mod metrics;
mod network;
mod service;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballast_meta::raft_config;
use ballast_meta::raft_store::{self, TypeConfig};
use ballast_proto::v1::admin_server::AdminServer;
use ballast_proto::v1::node_api_server::NodeApiServer;
use ballast_proto::v1::raft_server::RaftServer;
use openraft::Raft;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Raft timing: defined with the one openraft configuration builder,
/// [`ballast_meta::raft_config()`], which the Raft simulator runs too.
pub use ballast_meta::RaftTiming;
pub use convert::layout_replica_live;
pub use leader::{Detector, DetectorError};
pub use service::{Core, FORWARDED};

/// The placement seed of every cluster: it must be the same on all members (the
/// state machine starts from it), so it is a constant rather than a flag.
pub const CLUSTER_SEED: u64 = 0x0ba1_1a57;

#[derive(Debug, thiserror::Error)]
pub enum MetaSvcError {
    #[error("meta member {id}: {what}: {message}")]
    Start { id: u64, what: &'static str, message: String },
    /// The configuration is unusable ([`MetaConfig::validate`]): nothing was started.
    #[error("meta member {id}: invalid configuration: {source}")]
    Config {
        id: u64,
        #[source]
        source: ConfigError,
    },
}

/// Why a [`MetaConfig`] is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("failure detector: {0}")]
    Detector(#[from] DetectorError),
    /// Raft's timings out of order (heartbeat < minimum election timeout <
    /// maximum), as openraft checks them.
    #[error("raft timing: {0}")]
    Raft(Box<openraft::ConfigError>),
}

impl From<openraft::ConfigError> for ConfigError {
    fn from(e: openraft::ConfigError) -> Self {
        ConfigError::Raft(Box::new(e))
    }
}

#[derive(Clone, Debug)]
pub struct MetaConfig {
    /// This member's Raft id (1 or more).
    pub id: u64,
    pub data_dir: PathBuf,
    /// Where to listen for gRPC (port 0: any free port).
    pub listen: SocketAddr,
    /// Initial voting members (id → host:port) of a new cluster. The member with
    /// the lowest id initializes the cluster if it has no state yet; the others
    /// wait to hear from it. Empty: join an existing cluster through
    /// `Admin.AddMember`.
    pub initial_members: BTreeMap<u64, String>,
    pub raft: RaftTiming,
    pub detector: Detector,
    /// Mutual TLS on the gRPC listener and on Raft and forwarding channels to
    /// the other members (or `--insecure` plaintext).
    pub security: ballast_tls::Security,
}

impl MetaConfig {
    /// Checks the relations between the timings: the failure detector's
    /// ([`Detector::validate`]) and Raft's. [`start`] and [`start_on`] call it
    /// before anything else, so a bad configuration is an error at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.detector.validate()?;
        raft_config(&self.raft)?;
        Ok(())
    }
}

/// A running member.
pub struct MetaHandle {
    pub id: u64,
    /// The bound gRPC address.
    pub addr: SocketAddr,
    pub core: Core,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    leader: JoinHandle<()>,
}

impl MetaHandle {
    /// Stops serving and shuts Raft down.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.server.await {
            warn!(error = %e, "meta gRPC server task");
        }
        let _ = self.leader.await;
        if let Err(e) = self.core.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
        info!(member = self.id, "meta member stopped");
    }
}

impl MetaHandle {
    /// Registers this member's metrics (`ballast_meta_*`, each series labelled
    /// `member="<id>"`) into `registry`, read at every scrape. Several members
    /// in one process register together through [`register_metrics`] instead:
    /// a family must appear once per exposition.
    pub fn register_metrics(&self, registry: &mut ballast_metrics::Registry) {
        register_metrics(registry, [self]);
    }
}

/// Registers the metrics of `members` (the members one process runs) as one
/// collector under `ballast_` in `registry`: each family once, a series per
/// member labelled `member="<id>"`. Call once per process, before serving
/// `/metrics`, and not under a registry that already labels `member`. The
/// names, their meaning and the liveness rule the chunk counts follow are in
/// the crate's `metrics` module.
pub fn register_metrics<'a>(
    registry: &mut ballast_metrics::Registry,
    members: impl IntoIterator<Item = &'a MetaHandle>,
) {
    metrics::register(registry, members.into_iter().map(|m| m.core.clone()).collect());
}

/// Opens the member's store, starts Raft and the gRPC server, and (for a new
/// cluster) initializes it.
pub async fn start(cfg: MetaConfig) -> Result<MetaHandle, MetaSvcError> {
    let id = cfg.id;
    cfg.validate().map_err(|source| MetaSvcError::Config { id, source })?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| MetaSvcError::Start {
        id,
        what: "listen",
        message: format!("{}: {e}", cfg.listen),
    })?;
    start_on(cfg, listener).await
}

/// [`start`] on a listener bound beforehand (`cfg.listen` is ignored), so that a
/// group's addresses are known before any member starts.
pub async fn start_on(cfg: MetaConfig, listener: tokio::net::TcpListener) -> Result<MetaHandle, MetaSvcError> {
    let id = cfg.id;
    let err = |what: &'static str, e: &dyn std::fmt::Display| MetaSvcError::Start { id, what, message: e.to_string() };
    if id == 0 {
        return Err(err("id", &"member ids start at 1"));
    }
    cfg.validate().map_err(|source| MetaSvcError::Config { id, source })?;
    let config = raft_config(&cfg.raft).map_err(|e| err("raft config", &e))?;
    let (log, sm) = raft_store::open(&cfg.data_dir, CLUSTER_SEED).map_err(|e| err("open store", &e))?;
    let raft = Raft::<TypeConfig>::new(
        id,
        Arc::new(config),
        network::NetworkFactory(cfg.security.clone()),
        log.clone(),
        sm.clone(),
    )
    .await
    .map_err(|e| err("start raft", &e))?;
    let core = Core::new(id, raft.clone(), sm, log, cfg.security.clone());

    let addr = listener.local_addr().map_err(|e| err("listen", &e))?;
    let (stop, stop_rx) = watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftServer::new(service::RaftSvc(core.clone())))
            .add_service(NodeApiServer::new(service::NodeSvc(core.clone())))
            .add_service(AdminServer::new(service::AdminSvc(core.clone())))
            .serve_with_incoming_shutdown(
                ballast_tls::grpc::incoming(listener, cfg.security.clone(), "meta"),
                async move {
                    let _ = server_stop.changed().await;
                },
            ),
    );
    let leader = tokio::spawn(leader::run(core.clone(), cfg.detector, stop_rx));

    let initialized = raft.is_initialized().await.map_err(|e| err("raft state", &e))?;
    let first = cfg.initial_members.keys().next().copied();
    if !initialized && first == Some(id) {
        match raft.initialize(service::members(&cfg.initial_members)).await {
            Ok(()) => info!(member = id, members = ?cfg.initial_members, "cluster initialized"),
            // Another start already did it (or a snapshot arrived): nothing to do.
            Err(e) => warn!(member = id, error = %e, "initialize"),
        }
    }
    info!(member = id, %addr, initialized, "meta member serving");
    Ok(MetaHandle { id, addr, core, stop, server, leader })
}

/// A free-port-friendly default for tests and `ballast dev`.
pub fn fast_timing() -> (RaftTiming, Detector) {
    (
        RaftTiming::fast(),
        Detector {
            suspect_after: Duration::from_secs(2),
            down_after: Duration::from_secs(6),
            tick: Duration::from_millis(200),
            ..Detector::default()
        },
    )
}
