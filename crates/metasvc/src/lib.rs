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

mod convert;
pub mod leader;
mod network;
mod service;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ballast_meta::raft_store::{self, TypeConfig};
use ballast_proto::v1::admin_server::AdminServer;
use ballast_proto::v1::node_api_server::NodeApiServer;
use ballast_proto::v1::raft_server::RaftServer;
use openraft::{Raft, SnapshotPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use leader::Detector;
pub use service::{Core, FORWARDED};

/// The placement seed of every cluster: it must be the same on all members (the
/// state machine starts from it), so it is a constant rather than a flag.
pub const CLUSTER_SEED: u64 = 0x0ba1_1a57;

#[derive(Debug, thiserror::Error)]
pub enum MetaSvcError {
    #[error("meta member {id}: {what}: {message}")]
    Start { id: u64, what: &'static str, message: String },
}

/// Raft timing (milliseconds).
#[derive(Clone, Copy, Debug)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Log entries between snapshots (older entries are then purged).
    pub snapshot_logs: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming { heartbeat_ms: 250, election_min_ms: 1000, election_max_ms: 2000, snapshot_logs: 2000 }
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

/// Opens the member's store, starts Raft and the gRPC server, and (for a new
/// cluster) initializes it.
pub async fn start(cfg: MetaConfig) -> Result<MetaHandle, MetaSvcError> {
    let id = cfg.id;
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
    let (log, sm) = raft_store::open(&cfg.data_dir, CLUSTER_SEED).map_err(|e| err("open store", &e))?;
    let config = openraft::Config {
        cluster_name: "ballast".into(),
        heartbeat_interval: cfg.raft.heartbeat_ms,
        election_timeout_min: cfg.raft.election_min_ms,
        election_timeout_max: cfg.raft.election_max_ms,
        // The state is small (a TiB volume is 16 Ki chunk entries); snapshot often
        // enough that a restarted or new member catches up from a snapshot.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.raft.snapshot_logs.max(1)),
        max_in_snapshot_log_to_keep: cfg.raft.snapshot_logs / 4,
        ..openraft::Config::default()
    }
    .validate()
    .map_err(|e| err("raft config", &e))?;
    let raft = Raft::<TypeConfig>::new(id, Arc::new(config), network::NetworkFactory, log, sm.clone())
        .await
        .map_err(|e| err("start raft", &e))?;
    let core = Core::new(id, raft.clone(), sm);

    let addr = listener.local_addr().map_err(|e| err("listen", &e))?;
    let (stop, stop_rx) = watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftServer::new(service::RaftSvc(core.clone())))
            .add_service(NodeApiServer::new(service::NodeSvc(core.clone())))
            .add_service(AdminServer::new(service::AdminSvc(core.clone())))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
                let _ = server_stop.changed().await;
            }),
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
        RaftTiming { heartbeat_ms: 100, election_min_ms: 500, election_max_ms: 1000, snapshot_logs: 2000 },
        Detector {
            suspect_after: Duration::from_secs(2),
            down_after: Duration::from_secs(6),
            tick: Duration::from_millis(200),
            ..Detector::default()
        },
    )
}
