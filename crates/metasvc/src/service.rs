//! The gRPC services of one meta member: `Raft` (member to member), `NodeApi`
//! and `Admin`.
//!
//! Reads are served from this member's applied state. Writes are proposed to
//! Raft when this member leads; otherwise the whole call is proxied to the
//! leader's gRPC endpoint, marked with [`FORWARDED`] so that a call is proxied
//! at most once (a member that receives a forwarded call while not leading
//! answers UNAVAILABLE and the client retries).

// tonic's handlers return `Status` by value (its size is tonic's choice); the
// helpers return the same type rather than box and unbox it on every call.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ballast_meta::plan::{self, Failure};
use ballast_meta::raft_store::{LogStore, StateMachine, TypeConfig};
use ballast_meta::state::{
    Command, DiskHealth, MetaError, MetaState, NodeState, Response, ZoneSpread, DEFAULT_CHUNK_SIZE,
};
use ballast_proto::v1 as pb;
use ballast_proto::v1::admin_client::AdminClient;
use ballast_proto::v1::node_api_client::NodeApiClient;
use ballast_types::{ChunkIdx, Epoch, NodeId, Seq, VolumeId, Zone};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft};
use tonic::transport::Channel;
use tonic::{Request, Response as Reply, Status};
use tracing::{debug, info, warn};

use crate::authz::{self, Need};
use crate::convert::{self, Progress};
use crate::metrics::Recorder;
use crate::network;

/// Metadata key set on a call a member proxied to the leader.
pub const FORWARDED: &str = "x-ballast-forwarded";

/// A node's frozen snapshot layers of one volume: (layers, bytes on disk).
pub(crate) type LayerSpace = (u64, u64);

/// In-memory, leader-only knowledge that is not worth a log entry per change:
/// when each node was last heard from, its reported disk use, and copy job
/// progress. A new leader starts with empty maps (and a grace period).
#[derive(Default)]
pub(crate) struct Soft {
    pub last_seen: Mutex<HashMap<NodeId, Instant>>,
    /// Bytes each node last reported in use.
    pub used: Mutex<HashMap<NodeId, u64>>,
    /// Each node's last count of the snapshot layers it holds, per volume:
    /// summed into VolumeLayout.snapshot_layers/_bytes.
    pub snapshot_space: Mutex<HashMap<NodeId, HashMap<VolumeId, LayerSpace>>>,
    pub progress: Mutex<HashMap<u64, Progress>>,
}

/// Shared by the services and the leader loop.
#[derive(Clone)]
pub struct Core {
    pub(crate) id: u64,
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) sm: StateMachine,
    /// A clone of the log store Raft writes (for its committed index).
    pub(crate) log: LogStore,
    pub(crate) soft: Arc<Soft>,
    pub(crate) recorder: Recorder,
    leader_channel: Arc<Mutex<Option<(u64, Channel)>>>,
    security: ballast_tls::Security,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn meta_status(e: MetaError) -> Status {
    let msg = e.to_string();
    match e {
        MetaError::InvalidArgument { .. } => Status::invalid_argument(msg),
        MetaError::UnknownNode(_) | MetaError::UnknownVolume(_) | MetaError::UnknownChunk { .. } => {
            Status::not_found(msg)
        }
        MetaError::UnknownJob(_) | MetaError::UnknownSnapshot(_) => Status::not_found(msg),
        MetaError::NameTaken(_) => Status::already_exists(msg),
        MetaError::Placement(_) => Status::resource_exhausted(msg),
        MetaError::BelowMinInSync { .. }
        | MetaError::ZoneChange { .. }
        | MetaError::Conflict(_)
        | MetaError::NodeInUse { .. }
        | MetaError::Published { .. }
        | MetaError::Attached { .. }
        | MetaError::HasSnapshots { .. }
        | MetaError::SnapshotInUse { .. }
        | MetaError::CloneFilling { .. } => Status::failed_precondition(msg),
        MetaError::CloneTooSmall { .. } => Status::out_of_range(msg),
        // Retryable: the source's front end takes the snapshot within moments.
        MetaError::CloneSourcePending { .. } => Status::unavailable(msg),
    }
}

fn write_status(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            Status::unavailable(format!("not the leader (leader: {:?}); retry", f.leader_id))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Status::failed_precondition(e.to_string()),
        RaftError::Fatal(e) => Status::unavailable(format!("raft stopped: {e}")),
    }
}

enum Route {
    Local,
    Leader(Channel),
}

impl Core {
    pub(crate) fn new(
        id: u64,
        raft: Raft<TypeConfig>,
        sm: StateMachine,
        log: LogStore,
        security: ballast_tls::Security,
    ) -> Core {
        Core {
            security,
            id,
            raft,
            sm,
            log,
            soft: Arc::new(Soft::default()),
            recorder: Recorder::default(),
            leader_channel: Arc::new(Mutex::new(None)),
        }
    }

    /// This member's Raft metrics (term, leader, log, snapshot, membership).
    pub fn metrics(&self) -> openraft::RaftMetrics<u64, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Where a write goes: here, or the leader's endpoint.
    fn route<T>(&self, req: &Request<T>) -> Result<Route, Status> {
        let m = self.raft.metrics().borrow().clone();
        let Some(leader) = m.current_leader else {
            return Err(Status::unavailable("no meta leader elected yet; retry"));
        };
        if leader == self.id {
            return Ok(Route::Local);
        }
        if req.metadata().get(FORWARDED).is_some() {
            return Err(Status::unavailable(format!(
                "member {} is not the leader (leader is {leader}); retry",
                self.id
            )));
        }
        let mut cached = self.leader_channel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, ch)) = cached.as_ref() {
            if *id == leader {
                return Ok(Route::Leader(ch.clone()));
            }
        }
        let node = m
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()
            .ok_or_else(|| Status::unavailable(format!("leader {leader} has no known address; retry")))?;
        let ch = network::channel(&node.addr, &self.security).map_err(Status::internal)?;
        *cached = Some((leader, ch.clone()));
        Ok(Route::Leader(ch))
    }

    /// A call about `volume` that only its attached front end may make: the
    /// caller must act for the node holding the attach (any node while nobody
    /// holds it: the epoch check refuses the call then).
    async fn check_attached<T>(&self, req: &Request<T>, rpc: &'static str, volume: VolumeId) -> Result<(), Status> {
        let caller = authz::caller(req)?;
        if let authz::Caller::As(id) = &caller {
            match self.read(|s| s.volumes.get(&volume).map(|v| v.attached_to)).await {
                Some(Some(holder)) => caller.check(rpc, Need::OnNode(holder.0))?,
                _ => caller.check(rpc, Need::OnNode(id.node().unwrap_or(0)))?,
            }
        }
        Ok(())
    }

    /// A copy job's progress, reported only by the node that runs it.
    async fn check_job_runner<T>(&self, req: &Request<T>, job: u64) -> Result<(), Status> {
        let caller = authz::caller(req)?;
        if let authz::Caller::As(id) = &caller {
            let target = self.read(|s| s.jobs.get(&job).map(|j| j.target.0)).await;
            let node = target.unwrap_or(match id {
                ballast_tls::Identity::Node(n) => *n,
                _ => 0,
            });
            caller.check("report_job", Need::Node(node))?;
        }
        Ok(())
    }

    /// Proposes `cmd` and returns its committed result.
    pub(crate) async fn write(&self, cmd: Command) -> Result<Response, Status> {
        debug!(?cmd, "propose");
        let started = Instant::now();
        let r = self.raft.client_write(cmd).await.map_err(write_status)?;
        // openraft answers once the entry is applied here (the leader): the
        // command's commit and apply latency, refused commands included.
        self.recorder.apply.observe(started.elapsed().as_secs_f64());
        r.data.map_err(meta_status)
    }

    pub(crate) async fn read<T>(&self, f: impl FnOnce(&MetaState) -> T) -> T {
        self.sm.read(f).await
    }

    fn last_seen(&self) -> HashMap<NodeId, Instant> {
        self.soft.last_seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn progress(&self) -> HashMap<u64, Progress> {
        self.soft.progress.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn volume_id(&self, name_or_id: &str) -> Result<VolumeId, Status> {
        self.read(|s| s.find_volume(name_or_id).map(|v| v.id))
            .await
            .ok_or_else(|| Status::not_found(format!("volume {name_or_id:?} not found")))
    }

    async fn layout_reply(&self, id: VolumeId) -> Result<pb::VolumeLayout, Status> {
        let seen = self.last_seen();
        let mut layout = self
            .read(|s| s.volumes.get(&id).map(|v| convert::layout(s, v, &seen)))
            .await
            .ok_or_else(|| Status::not_found(format!("volume {id} not found")))?;
        // Every node's count, replica or not: a node ejected from the volume
        // keeps its layers until garbage collection takes them.
        let space = self.soft.snapshot_space.lock().unwrap_or_else(|p| p.into_inner());
        for (layers, bytes) in space.values().filter_map(|per_volume| per_volume.get(&id)) {
            layout.snapshot_layers += layers;
            layout.snapshot_bytes += bytes;
        }
        Ok(layout)
    }

    async fn volume_reply(&self, id: VolumeId) -> Result<pb::Volume, Status> {
        self.read(|s| s.volumes.get(&id).map(|v| convert::volume(s, v)))
            .await
            .ok_or_else(|| Status::not_found(format!("volume {id} not found")))
    }

    async fn status(&self) -> pb::StatusResponse {
        let m = self.raft.metrics().borrow().clone();
        let members = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| pb::Member {
                id: *id,
                addr: n.addr.clone(),
                voter: m.membership_config.membership().voter_ids().any(|v| v == *id),
            })
            .collect();
        let (nodes, nodes_up, volumes, degraded, jobs, over_provisioning_pct) = self
            .read(|s| {
                (
                    s.nodes.len() as u32,
                    // Up with a working disk: a node whose disk failed heartbeats
                    // but serves nothing (a full one still serves its replicas).
                    s.nodes.values().filter(|n| n.is_serving()).count() as u32,
                    s.volumes.len() as u32,
                    // By the liveness rule: a replica on a down or suspect
                    // node or a failed disk is missing, as an ejected one is.
                    s.cluster_health().degraded as u32,
                    s.jobs.values().filter(|j| j.is_active()).count() as u32,
                    s.settings.over_provisioning_pct,
                )
            })
            .await;
        pb::StatusResponse {
            id: self.id,
            leader: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            members,
            nodes,
            nodes_up,
            volumes,
            degraded_chunks: degraded,
            jobs_active: jobs,
            over_provisioning_pct,
        }
    }
}

/// Whether a node's reported disk use moved far enough from the one on the
/// log to be logged: by 1% of its capacity, at least 64 MiB. Placement's
/// room ([`ballast_meta::state::Node::room`]) is off by at most that, and a
/// filling node logs at most about a hundred heartbeats on its way.
fn use_moved(recorded: u64, reported: u64, capacity: u64) -> bool {
    recorded.abs_diff(reported) >= (capacity / 100).max(64 << 20)
}

/// A proxied call's failure as this member reports it: the leader's own answer
/// passes through; a failure to reach it (or it dying mid-call) is UNAVAILABLE,
/// which clients retry.
fn proxy_status(s: Status) -> Status {
    use std::error::Error;
    match s.code() {
        tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Internal if s.source().is_some() => {
            Status::unavailable(format!("the leader did not answer ({}); retry", s.message()))
        }
        tonic::Code::Cancelled => {
            Status::unavailable(format!("the call to the leader was cancelled ({}); retry", s.message()))
        }
        _ => s,
    }
}

/// The call as this member proxies it: the same message, marked [`FORWARDED`].
/// The call as the leader gets it from this member: marked forwarded, and
/// naming the caller this member authenticated (see `authz`).
fn marked<T>(req: Request<T>) -> Result<Request<T>, Status> {
    let caller = authz::caller(&req)?;
    let mut fwd = Request::new(req.into_inner());
    fwd.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(uri) = caller.on_behalf_of() {
        let v = tonic::metadata::MetadataValue::try_from(uri).map_err(|e| Status::internal(e.to_string()))?;
        fwd.metadata_mut().insert(authz::ON_BEHALF_OF, v);
    }
    Ok(fwd)
}

/// Proxies the call to the leader when this member does not lead.
macro_rules! forward {
    ($core:expr, $req:ident, $client:ident, $method:ident) => {
        if let Route::Leader(ch) = $core.route(&$req)? {
            return $client::new(ch).$method(marked($req)?).await.map_err(proxy_status);
        }
    };
}

/// Admin reads go to the leader too when there is one, so that an operator sees
/// their own writes (`volume create` then `volume list`) even when the member
/// they reach has just restarted and lags. Without a leader the member answers
/// from its own state rather than fail.
macro_rules! forward_read {
    ($core:expr, $req:ident, $client:ident, $method:ident) => {
        if let Ok(Route::Leader(ch)) = $core.route(&$req) {
            return $client::new(ch).$method(marked($req)?).await.map_err(proxy_status);
        }
    };
}

// ------------------------------------------------------------------ Raft

pub struct RaftSvc(pub(crate) Core);

fn decode<T: serde::de::DeserializeOwned>(req: Request<pb::RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().json).map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Reply<pb::RaftPayload>, Status> {
    serde_json::to_vec(v).map(|json| Reply::new(pb::RaftPayload { json })).map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftSvc {
    async fn append_entries(&self, req: Request<pb::RaftPayload>) -> Result<Reply<pb::RaftPayload>, Status> {
        authz::require(&req, "append_entries", Need::Meta)?;
        let r = self.0.raft.append_entries(decode(req)?).await;
        encode(&r)
    }

    async fn vote(&self, req: Request<pb::RaftPayload>) -> Result<Reply<pb::RaftPayload>, Status> {
        authz::require(&req, "vote", Need::Meta)?;
        let r = self.0.raft.vote(decode(req)?).await;
        encode(&r)
    }

    async fn install_snapshot(&self, req: Request<pb::RaftPayload>) -> Result<Reply<pb::RaftPayload>, Status> {
        authz::require(&req, "install_snapshot", Need::Meta)?;
        let r = self.0.raft.install_snapshot(decode(req)?).await;
        encode(&r)
    }
}

// ------------------------------------------------------------------ NodeApi

pub struct NodeSvc(pub(crate) Core);

fn parse_addr(param: &str, s: &str) -> Result<SocketAddr, Status> {
    s.parse().map_err(|_| Status::invalid_argument(format!("invalid {param}: {s:?} is not an ip:port address")))
}

fn node_id(param: &str, id: u64) -> Result<NodeId, Status> {
    if id == 0 {
        return Err(Status::invalid_argument(format!("invalid {param}: node ids start at 1")));
    }
    Ok(NodeId(id))
}

#[tonic::async_trait]
impl pb::node_api_server::NodeApi for NodeSvc {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Reply<pb::RegisterResponse>, Status> {
        authz::require(&req, "register", Need::Node(req.get_ref().node))?;
        forward!(self.0, req, NodeApiClient, register);
        let r = req.into_inner();
        let id = node_id("node", r.node)?;
        let addr = parse_addr("addr", &r.addr)?;
        if r.capacity_bytes == 0 {
            return Err(Status::invalid_argument("invalid capacity_bytes: must be positive"));
        }
        self.0
            .write(Command::RegisterNode {
                id,
                addr,
                zone: Zone(r.zone.clone()),
                capacity: r.capacity_bytes,
                now_ms: now_ms(),
            })
            .await?;
        self.0.soft.last_seen.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Instant::now());
        info!(node = %id, %addr, zone = %r.zone, "node registered");
        Ok(Reply::new(pb::RegisterResponse {}))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Reply<pb::HeartbeatResponse>, Status> {
        authz::require(&req, "heartbeat", Need::Node(req.get_ref().node))?;
        forward!(self.0, req, NodeApiClient, heartbeat);
        let r = req.into_inner();
        let id = node_id("node", r.node)?;
        let disk = convert::disk_health(r.disk, &r.disk_error);
        let Some((recorded, recorded_used, capacity)) =
            self.0.read(|s| s.nodes.get(&id).map(|n| (n.disk.clone(), n.reported_used, n.capacity))).await
        else {
            return Err(Status::not_found(format!("unknown node {id}: register first")));
        };
        // The node is alive even if recording its disk's news fails below.
        self.0.soft.last_seen.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Instant::now());
        // Before the node's first count after a start it reports none: what
        // is known stays.
        let used = if r.used_counted { r.used_bytes } else { recorded_used };
        if r.used_counted {
            self.0.soft.used.lock().unwrap_or_else(|p| p.into_inner()).insert(id, used);
            let space = r.snapshot_space.iter().map(|x| (VolumeId(x.volume), (x.layers, x.bytes))).collect();
            self.0.soft.snapshot_space.lock().unwrap_or_else(|p| p.into_inner()).insert(id, space);
        }
        // Heartbeats stay off the log; only a change of the disk's health goes
        // through Raft (a failed disk's reason changing between probes is not
        // one: the first reason stands until the disk is healthy again), and a
        // change of its use placement should know of (see `use_moved`).
        let health_news = !recorded.same_kind(&disk);
        if health_news {
            match &disk {
                DiskHealth::Ok => info!(node = %id, from = ?recorded, "node's disk is healthy again"),
                DiskHealth::Full => warn!(node = %id, free_bytes = r.disk_free_bytes, "node's disk is full"),
                DiskHealth::Failed { reason } => warn!(node = %id, %reason, "node's disk failed"),
            }
        }
        if health_news || use_moved(recorded_used, used, capacity) {
            self.0.write(Command::Heartbeat { id, reported_used: used, now_ms: now_ms(), disk }).await?;
        }
        let (seen, progress) = (self.0.last_seen(), self.0.progress());
        let (jobs, fill_clones) = self
            .0
            .read(|s| {
                let jobs = s
                    .jobs
                    .values()
                    .filter(|j| j.target == id && s.job_ready(j))
                    .map(|j| convert::job(s, j, progress.get(&j.id).copied().unwrap_or_default(), &seen))
                    .collect();
                (jobs, s.fill_assignments(id))
            })
            .await;
        Ok(Reply::new(pb::HeartbeatResponse { jobs, fill_clones }))
    }

    async fn attach(&self, req: Request<pb::AttachRequest>) -> Result<Reply<pb::AttachResponse>, Status> {
        authz::require(&req, "attach", Need::OnNode(req.get_ref().node))?;
        forward!(self.0, req, NodeApiClient, attach);
        let r = req.into_inner();
        let node = node_id("node", r.node)?;
        let volume = self.0.volume_id(&r.volume).await?;
        let cmd = match r.to_fill {
            true => Command::AttachToFill { volume, node },
            false => Command::Attach { volume, node },
        };
        let Response::Epoch(epoch) = self.0.write(cmd).await? else {
            return Err(Status::internal("attach returned no epoch"));
        };
        let layout = self.0.layout_reply(volume).await?;
        info!(%volume, %node, %epoch, to_fill = r.to_fill, "volume attached");
        Ok(Reply::new(pb::AttachResponse { epoch: epoch.0, layout: Some(layout) }))
    }

    async fn get_layout(&self, req: Request<pb::GetLayoutRequest>) -> Result<Reply<pb::VolumeLayout>, Status> {
        authz::require(&req, "get_layout", Need::Member)?;
        let id = VolumeId(req.into_inner().volume);
        self.0.layout_reply(id).await.map(Reply::new)
    }

    async fn eject(&self, req: Request<pb::EjectRequest>) -> Result<Reply<pb::Chunk>, Status> {
        forward!(self.0, req, NodeApiClient, eject);
        self.0.check_attached(&req, "eject", VolumeId(req.get_ref().volume)).await?;
        let r = req.into_inner();
        let (volume, chunk, node) = (VolumeId(r.volume), ChunkIdx(r.chunk), node_id("node", r.node)?);
        let Response::Chunk(c) = self.0.write(Command::Eject { volume, chunk, version: r.version, node }).await? else {
            return Err(Status::internal("eject returned no chunk"));
        };
        warn!(%volume, %chunk, %node, reason = %r.reason, version = c.version, "replica ejected");
        Ok(Reply::new(convert::chunk(chunk.0 as usize, &c)))
    }

    async fn ack_layout(&self, req: Request<pb::AckLayoutRequest>) -> Result<Reply<pb::AckLayoutResponse>, Status> {
        forward!(self.0, req, NodeApiClient, ack_layout);
        self.0.check_attached(&req, "ack_layout", VolumeId(req.get_ref().volume)).await?;
        let r = req.into_inner();
        let volume = VolumeId(r.volume);
        // Only a change is worth a log entry.
        let acked = self.0.read(|s| s.volumes.get(&volume).map(|v| (v.epoch, v.acked_gen))).await;
        match acked {
            None => return Err(Status::not_found(format!("volume {volume} not found"))),
            Some((e, g)) if e.0 == r.epoch && g >= r.layout_gen => {}
            Some(_) => {
                self.0.write(Command::AckLayout { volume, epoch: Epoch(r.epoch), gen: r.layout_gen }).await?;
            }
        }
        Ok(Reply::new(pb::AckLayoutResponse {}))
    }

    async fn detach(&self, req: Request<pb::DetachRequest>) -> Result<Reply<pb::DetachResponse>, Status> {
        forward!(self.0, req, NodeApiClient, detach);
        self.0.check_attached(&req, "detach", VolumeId(req.get_ref().volume)).await?;
        let r = req.into_inner();
        let volume = VolumeId(r.volume);
        self.0.write(Command::Detach { volume, epoch: Epoch(r.epoch) }).await?;
        info!(%volume, epoch = r.epoch, "volume detached");
        Ok(Reply::new(pb::DetachResponse {}))
    }

    async fn commit_snapshots(
        &self,
        req: Request<pb::CommitSnapshotsRequest>,
    ) -> Result<Reply<pb::CommitSnapshotsResponse>, Status> {
        forward!(self.0, req, NodeApiClient, commit_snapshots);
        self.0.check_attached(&req, "commit_snapshots", VolumeId(req.get_ref().volume)).await?;
        let r = req.into_inner();
        let volume = VolumeId(r.volume);
        let cut = r.cut.ok_or_else(|| Status::invalid_argument("invalid cut: missing"))?;
        let cut = Seq::new(Epoch(cut.epoch), cut.counter);
        let cmd = Command::CommitSnapshots { volume, epoch: Epoch(r.epoch), snapshots: r.snapshots.clone(), cut };
        let Response::LayoutGen(layout_gen) = self.0.write(cmd).await? else {
            return Err(Status::internal("CommitSnapshots: unexpected response from the state machine"));
        };
        info!(%volume, epoch = r.epoch, %cut, snapshots = ?r.snapshots, layout_gen, "snapshot cut committed");
        Ok(Reply::new(pb::CommitSnapshotsResponse { layout_gen }))
    }

    async fn fill_chunks(&self, req: Request<pb::FillChunksRequest>) -> Result<Reply<pb::FillChunksResponse>, Status> {
        forward!(self.0, req, NodeApiClient, fill_chunks);
        self.0.check_attached(&req, "fill_chunks", VolumeId(req.get_ref().volume)).await?;
        let r = req.into_inner();
        let volume = VolumeId(r.volume);
        let cmd = Command::FillChunks { volume, epoch: Epoch(r.epoch), chunks: r.chunks.clone() };
        self.0.write(cmd).await?;
        let remaining = self.0.read(|s| s.volumes.get(&volume).map_or(0, |v| v.unfilled.len() as u32)).await;
        info!(%volume, epoch = r.epoch, chunks = ?r.chunks, remaining, "clone chunks filled");
        Ok(Reply::new(pb::FillChunksResponse { remaining }))
    }

    async fn report_job(&self, req: Request<pb::ReportJobRequest>) -> Result<Reply<pb::ReportJobResponse>, Status> {
        forward!(self.0, req, NodeApiClient, report_job);
        self.0.check_job_runner(&req, req.get_ref().job).await?;
        let r = req.into_inner();
        let state = pb::JobState::try_from(r.state).unwrap_or(pb::JobState::Unspecified);
        let done = |ok: bool, error: Option<String>| Command::FinishJob {
            job: r.job,
            ok,
            error,
            blocks_copied: r.blocks_copied,
        };
        let kind = self.0.read(|s| s.jobs.get(&r.job).map(|j| j.kind)).await;
        match state {
            pb::JobState::Running => {
                let mut p = self.0.soft.progress.lock().unwrap_or_else(|p| p.into_inner());
                let e = p.entry(r.job).or_default();
                if !e.running {
                    e.attempts += 1;
                }
                e.running = true;
                e.bytes_done = r.bytes_done;
                e.blocks_copied = r.blocks_copied;
            }
            pb::JobState::Done => {
                self.0.write(done(true, None)).await?;
                if let Some(kind) = kind {
                    self.0.recorder.job_finished(kind, r.blocks_copied);
                }
                self.0.soft.progress.lock().unwrap_or_else(|p| p.into_inner()).remove(&r.job);
                info!(job = r.job, blocks = r.blocks_copied, "copy job done");
            }
            pb::JobState::Failed => {
                self.0.write(done(false, Some(r.error.clone()))).await?;
                if let Some(kind) = kind {
                    self.0.recorder.job_finished(kind, r.blocks_copied);
                }
                self.0.soft.progress.lock().unwrap_or_else(|p| p.into_inner()).remove(&r.job);
                warn!(job = r.job, error = %r.error, "copy job failed");
            }
            _ => return Err(Status::invalid_argument("invalid state: report RUNNING, DONE or FAILED")),
        }
        Ok(Reply::new(pb::ReportJobResponse {}))
    }
}

// ------------------------------------------------------------------ Admin

pub struct AdminSvc(pub(crate) Core);

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminSvc {
    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Reply<pb::StatusResponse>, Status> {
        authz::require(&_req, "status", Need::Member)?;
        Ok(Reply::new(self.0.status().await))
    }

    async fn list_nodes(&self, _req: Request<pb::ListNodesRequest>) -> Result<Reply<pb::ListNodesResponse>, Status> {
        authz::require(&_req, "list_nodes", Need::Member)?;
        forward_read!(self.0, _req, AdminClient, list_nodes);
        let seen = self.0.last_seen();
        let used = self.0.soft.used.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut nodes: Vec<pb::Node> =
            self.0.read(|s| s.nodes.values().map(|n| convert::node(n, &s.settings, &seen)).collect()).await;
        for n in &mut nodes {
            if let Some(u) = used.get(&NodeId(n.id)) {
                n.used_bytes = *u;
            }
        }
        Ok(Reply::new(pb::ListNodesResponse { nodes }))
    }

    async fn set_node_state(&self, req: Request<pb::SetNodeStateRequest>) -> Result<Reply<pb::Node>, Status> {
        authz::require(&req, "set_node_state", Need::Admin)?;
        forward!(self.0, req, AdminClient, set_node_state);
        let r = req.into_inner();
        let id = node_id("node", r.node)?;
        let state = match pb::NodeState::try_from(r.state) {
            Ok(pb::NodeState::Up) => NodeState::Up,
            Ok(pb::NodeState::Cordoned) => NodeState::Cordoned,
            Ok(pb::NodeState::Draining) => NodeState::Draining,
            _ => return Err(Status::invalid_argument("invalid state: an operator sets UP, CORDONED or DRAINING")),
        };
        self.0.write(Command::SetNodeState { id, state }).await?;
        if state == NodeState::Up {
            // Uncordoned: count its silence from now, not from before.
            self.0.soft.last_seen.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_insert_with(Instant::now);
        }
        info!(node = %id, ?state, "node state set by operator");
        let seen = self.0.last_seen();
        let n = self.0.read(|s| s.nodes.get(&id).map(|n| convert::node(n, &s.settings, &seen))).await;
        n.map(Reply::new).ok_or_else(|| Status::not_found(format!("unknown node {id}")))
    }

    async fn set_over_provisioning(
        &self,
        req: Request<pb::SetOverProvisioningRequest>,
    ) -> Result<Reply<pb::StatusResponse>, Status> {
        authz::require(&req, "set_over_provisioning", Need::Admin)?;
        forward!(self.0, req, AdminClient, set_over_provisioning);
        let pct = req.into_inner().pct;
        self.0.write(Command::SetOverProvisioning { pct }).await?;
        info!(pct, "over-provisioning ratio set by operator");
        Ok(Reply::new(self.0.status().await))
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Result<Reply<pb::RemoveNodeResponse>, Status> {
        authz::require(&req, "remove_node", Need::Admin)?;
        forward!(self.0, req, AdminClient, remove_node);
        let id = node_id("node", req.into_inner().node)?;
        self.0.write(Command::RemoveNode { id }).await?;
        self.0.soft.snapshot_space.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        info!(node = %id, "node removed");
        Ok(Reply::new(pb::RemoveNodeResponse {}))
    }

    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Result<Reply<pb::Volume>, Status> {
        authz::require(&req, "create_volume", Need::Provisioner)?;
        forward!(self.0, req, AdminClient, create_volume);
        let r = req.into_inner();
        let replicas = if r.replicas == 0 { 3 } else { r.replicas as usize };
        let min_in_sync = if r.min_in_sync == 0 { (replicas / 2 + 1).min(replicas) } else { r.min_in_sync as usize };
        let chunk_size = if r.chunk_size_bytes == 0 { DEFAULT_CHUNK_SIZE } else { r.chunk_size_bytes };
        let zones = r.zones.iter().map(|z| Zone(z.clone())).collect();
        let zone_spread = match pb::ZoneSpread::try_from(r.zone_spread) {
            Ok(pb::ZoneSpread::Preferred) => ZoneSpread::Preferred,
            Ok(pb::ZoneSpread::Required) => ZoneSpread::Required,
            Err(_) => return Err(Status::invalid_argument(format!("invalid zone_spread: {}", r.zone_spread))),
        };
        if !r.source_snapshot.is_empty() && !r.source_volume.is_empty() {
            return Err(Status::invalid_argument("a volume is cloned from a snapshot or from a volume, not both"));
        }
        let cmd = if !r.source_volume.is_empty() {
            Command::CreateVolumeClone {
                name: r.name.clone(),
                source: self.0.volume_id(&r.source_volume).await?,
                size: r.size_bytes,
                chunk_size,
                replicas,
                min_in_sync,
                zones,
                zone_spread,
                now_ms: now_ms(),
            }
        } else if r.source_snapshot.is_empty() {
            Command::CreateVolume {
                name: r.name.clone(),
                size: r.size_bytes,
                chunk_size,
                replicas,
                min_in_sync,
                zones,
                zone_spread,
            }
        } else {
            let name = r.source_snapshot.clone();
            let snapshot = self
                .0
                .read(|s| s.find_snapshot(&name).map(|x| x.id))
                .await
                .ok_or_else(|| meta_status(MetaError::UnknownSnapshot(name.clone())))?;
            Command::CreateClone {
                name: r.name.clone(),
                snapshot,
                size: r.size_bytes,
                chunk_size,
                replicas,
                min_in_sync,
                zones,
                zone_spread,
            }
        };
        let Response::Volume(id) = self.0.write(cmd).await? else {
            return Err(Status::internal("create returned no volume"));
        };
        info!(volume = %id, name = %r.name, size = r.size_bytes, replicas, "volume created");
        Ok(Reply::new(self.0.volume_reply(id).await?))
    }

    async fn list_volumes(
        &self,
        _req: Request<pb::ListVolumesRequest>,
    ) -> Result<Reply<pb::ListVolumesResponse>, Status> {
        authz::require(&_req, "list_volumes", Need::Member)?;
        forward_read!(self.0, _req, AdminClient, list_volumes);
        let volumes = self.0.read(|s| s.volumes.values().map(|v| convert::volume(s, v)).collect()).await;
        Ok(Reply::new(pb::ListVolumesResponse { volumes }))
    }

    async fn inspect_volume(&self, req: Request<pb::InspectVolumeRequest>) -> Result<Reply<pb::VolumeLayout>, Status> {
        authz::require(&req, "inspect_volume", Need::Member)?;
        forward_read!(self.0, req, AdminClient, inspect_volume);
        let id = self.0.volume_id(&req.into_inner().volume).await?;
        self.0.layout_reply(id).await.map(Reply::new)
    }

    async fn grow_volume(&self, req: Request<pb::GrowVolumeRequest>) -> Result<Reply<pb::Volume>, Status> {
        authz::require(&req, "grow_volume", Need::Provisioner)?;
        forward!(self.0, req, AdminClient, grow_volume);
        let r = req.into_inner();
        let volume = self.0.volume_id(&r.volume).await?;
        self.0.write(Command::GrowVolume { volume, size: r.size_bytes }).await?;
        info!(%volume, size = r.size_bytes, "volume grown");
        Ok(Reply::new(self.0.volume_reply(volume).await?))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Reply<pb::DeleteVolumeResponse>, Status> {
        authz::require(&req, "delete_volume", Need::Provisioner)?;
        forward!(self.0, req, AdminClient, delete_volume);
        let volume = self.0.volume_id(&req.into_inner().volume).await?;
        let Response::Reclaim(r) = self.0.write(Command::DeleteVolume { volume }).await? else {
            return Err(Status::internal("delete returned nothing to reclaim"));
        };
        let chunk_replicas = r.iter().map(|(_, c)| c.len() as u64).sum();
        info!(%volume, chunk_replicas, "volume deleted");
        Ok(Reply::new(pb::DeleteVolumeResponse { chunk_replicas }))
    }

    async fn publish_volume(&self, req: Request<pb::PublishVolumeRequest>) -> Result<Reply<pb::Volume>, Status> {
        authz::require(&req, "publish_volume", Need::Provisioner)?;
        forward!(self.0, req, AdminClient, publish_volume);
        let r = req.into_inner();
        let volume = self.0.volume_id(&r.volume).await?;
        if r.node == 0 {
            return Err(Status::invalid_argument("invalid node: 0 is not a node id"));
        }
        self.0.write(Command::Publish { volume, node: NodeId(r.node) }).await?;
        info!(%volume, node = r.node, "volume published");
        Ok(Reply::new(self.0.volume_reply(volume).await?))
    }

    async fn unpublish_volume(&self, req: Request<pb::UnpublishVolumeRequest>) -> Result<Reply<pb::Volume>, Status> {
        authz::require(&req, "unpublish_volume", Need::Provisioner)?;
        forward!(self.0, req, AdminClient, unpublish_volume);
        let r = req.into_inner();
        let volume = self.0.volume_id(&r.volume).await?;
        let node = (r.node != 0).then_some(NodeId(r.node));
        self.0.write(Command::Unpublish { volume, node }).await?;
        info!(%volume, node = r.node, "volume unpublished");
        Ok(Reply::new(self.0.volume_reply(volume).await?))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Reply<pb::ListJobsResponse>, Status> {
        authz::require(&req, "list_jobs", Need::Member)?;
        forward_read!(self.0, req, AdminClient, list_jobs);
        let all = req.into_inner().all;
        let (seen, progress) = (self.0.last_seen(), self.0.progress());
        let jobs = self
            .0
            .read(|s| {
                s.jobs
                    .values()
                    .filter(|j| all || j.is_active())
                    .map(|j| convert::job(s, j, progress.get(&j.id).copied().unwrap_or_default(), &seen))
                    .collect()
            })
            .await;
        Ok(Reply::new(pb::ListJobsResponse { jobs }))
    }

    async fn create_snapshot(&self, req: Request<pb::CreateSnapshotRequest>) -> Result<Reply<pb::Snapshot>, Status> {
        authz::require(&req, "create_snapshot", Need::Provisioner)?;
        forward!(self.0, req, AdminClient, create_snapshot);
        let r = req.into_inner();
        let volume = self.0.volume_id(&r.volume).await?;
        let cmd = Command::CreateSnapshot { volume, name: r.name.clone(), now_ms: now_ms() };
        let Response::Snapshot(snap) = self.0.write(cmd).await? else {
            return Err(Status::internal("create snapshot returned no snapshot"));
        };
        info!(%volume, snapshot = %snap.name, id = snap.id, ready = snap.is_ready(), "snapshot requested");
        Ok(Reply::new(self.0.read(|s| convert::snapshot(s, &snap)).await))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Reply<pb::ListSnapshotsResponse>, Status> {
        authz::require(&req, "list_snapshots", Need::Member)?;
        forward_read!(self.0, req, AdminClient, list_snapshots);
        let r = req.into_inner();
        let volume = match r.volume.is_empty() {
            true => None,
            false => Some(self.0.volume_id(&r.volume).await?),
        };
        let snapshots = self
            .0
            .read(|s| {
                let one = (!r.snapshot.is_empty()).then(|| s.find_snapshot(&r.snapshot).map(|x| x.id));
                s.snapshots
                    .values()
                    .filter(|x| volume.is_none_or(|v| x.volume == v))
                    .filter(|x| one.is_none_or(|id| id == Some(x.id)))
                    .map(|x| convert::snapshot(s, x))
                    .collect()
            })
            .await;
        Ok(Reply::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Reply<pb::DeleteSnapshotResponse>, Status> {
        authz::require(&req, "delete_snapshot", Need::Provisioner)?;
        forward!(self.0, req, AdminClient, delete_snapshot);
        let name = req.into_inner().snapshot;
        let id = self
            .0
            .read(|s| s.find_snapshot(&name).map(|x| x.id))
            .await
            .ok_or_else(|| meta_status(MetaError::UnknownSnapshot(name.clone())))?;
        self.0.write(Command::DeleteSnapshot { id }).await?;
        info!(snapshot = %name, id, "snapshot deleted");
        Ok(Reply::new(pb::DeleteSnapshotResponse {}))
    }

    async fn what_if(&self, req: Request<pb::WhatIfRequest>) -> Result<Reply<pb::WhatIfResponse>, Status> {
        authz::require(&req, "what_if", Need::Member)?;
        forward_read!(self.0, req, AdminClient, what_if);
        let failure = match req.into_inner().target {
            Some(pb::what_if_request::Target::Node(n)) => Failure::Node(node_id("node", n)?),
            Some(pb::what_if_request::Target::Zone(z)) if !z.is_empty() => Failure::Zone(Zone(z)),
            _ => return Err(Status::invalid_argument("invalid target: give a node id or a zone name")),
        };
        let (impacts, unaffected) = self
            .0
            .read(|s| {
                if let Failure::Node(n) = &failure {
                    if !s.nodes.contains_key(n) {
                        return Err(Status::not_found(format!("unknown node {n}")));
                    }
                }
                if let Failure::Zone(z) = &failure {
                    if !s.nodes.values().any(|n| &n.zone == z) {
                        return Err(Status::not_found(format!("no node in zone {z}")));
                    }
                }
                Ok(plan::what_if(s, &failure))
            })
            .await?;
        Ok(Reply::new(pb::WhatIfResponse {
            volumes: impacts
                .into_iter()
                .map(|i| pb::VolumeImpact {
                    volume: i.volume.0,
                    name: i.name,
                    chunks_degraded: i.degraded,
                    chunks_unwritable: i.unwritable,
                    chunks_unavailable: i.unavailable,
                })
                .collect(),
            unaffected: unaffected as u32,
        }))
    }

    async fn add_member(&self, req: Request<pb::AddMemberRequest>) -> Result<Reply<pb::StatusResponse>, Status> {
        authz::require(&req, "add_member", Need::Admin)?;
        forward!(self.0, req, AdminClient, add_member);
        let r = req.into_inner();
        if r.id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument("invalid member: give an id (1 or more) and its host:port"));
        }
        network::channel(&r.addr, &self.0.security).map_err(Status::invalid_argument)?;
        // A learner first: it catches up on the log, then becomes a voter.
        self.0.raft.add_learner(r.id, BasicNode { addr: r.addr.clone() }, true).await.map_err(write_status)?;
        let mut voters: BTreeSet<u64> =
            self.0.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.insert(r.id);
        self.0.raft.change_membership(voters, false).await.map_err(write_status)?;
        info!(member = r.id, addr = %r.addr, "meta member added");
        Ok(Reply::new(self.0.status().await))
    }

    async fn remove_member(&self, req: Request<pb::RemoveMemberRequest>) -> Result<Reply<pb::StatusResponse>, Status> {
        authz::require(&req, "remove_member", Need::Admin)?;
        forward!(self.0, req, AdminClient, remove_member);
        let id = req.into_inner().id;
        let mut voters: BTreeSet<u64> =
            self.0.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if !voters.remove(&id) {
            return Err(Status::not_found(format!("{id} is not a voting member")));
        }
        if voters.is_empty() {
            return Err(Status::failed_precondition("cannot remove the last member"));
        }
        self.0.raft.change_membership(voters, false).await.map_err(write_status)?;
        info!(member = id, "meta member removed");
        Ok(Reply::new(self.0.status().await))
    }
}

/// Initial members as openraft wants them.
pub(crate) fn members(m: &BTreeMap<u64, String>) -> BTreeMap<u64, BasicNode> {
    m.iter().map(|(id, a)| (*id, BasicNode { addr: a.clone() })).collect()
}
