//! The replicated state machine of the metadata service.
//!
//! [`MetaState::apply`] is a pure function of the state and one [`Command`]: no
//! clock (times come inside commands, stamped by the leader), no randomness
//! (placement is seeded by the cluster seed in the state), no I/O. Raft applies
//! the same log on every member, so every member holds the same state; a snapshot
//! is the serde serialisation of [`MetaState`].
//!
//! Invariants kept by `apply` (the structural ones are
//! [`MetaState::check_invariants`], checked after every step in `tests/state.rs`
//! and after every command by both simulators):
//! - every chunk's in-sync set has at least the volume's `min_in_sync` members;
//! - a chunk's `version` increases on every change to its replica set;
//! - a volume's `epoch` only increases; each attach raises it by one;
//! - each node's `allocated` is the chunk size times the replicas it holds;
//! - a chunk has at most one active job, whose target is its only rebuilding
//!   member; it holds the volume's `replicas` members, one more during a rebuild;
//! - `layout_gen` rises with every chunk version change and every change to the
//!   volume's snapshots; `acked_gen <= layout_gen`;
//! - at most [`FINISHED_JOBS_KEPT`] finished jobs are kept;
//! - a volume is published to at most one node (single-node-writer), and only
//!   an unpublished volume can be deleted;
//! - a snapshot's volume exists, its name is unique, its cut is at most the
//!   volume's epoch's end ([`crate::snapshots`]);
//! - a volume with `zone_spread: required` never has two replicas of a chunk in
//!   one zone;
//! - a failed command changes nothing: every check of a command comes before
//!   its first change (see `Eject`, and `finishable` for the jobs a command ends).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ballast_placement::{self as placement, ChunkKey, ClusterMap, NodeInfo, PlacementError, Request};
use ballast_types::{ChunkIdx, Epoch, NodeId, Seq, VolumeId, Zone, BLOCK_SIZE};

pub use crate::snapshots::Snapshot;
use serde::{Deserialize, Serialize};

/// Default bytes per chunk (docs/DESIGN.md, 1 "Vocabulary").
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;

/// A node's health and administrative state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    Up,
    /// Missed heartbeats for a while: no new replicas; not yet rebuilt elsewhere.
    Suspect,
    /// Missed heartbeats past the down timeout: its replicas are rebuilt elsewhere.
    Down,
    /// Operator: no new replicas.
    Cordoned,
    /// Operator: no new replicas, existing ones moved away.
    Draining,
}

/// What a node's disk probe last reported (carried by its heartbeats).
///
/// Invariant (kept by `apply`, `cluster_map` and [`crate::plan::plan_jobs`]):
/// - `Failed`: the node's replicas are lost. Placement never picks it (it maps
///   to a down node), no job targets it (`StartJob` refuses it, and reporting
///   the failure fails the jobs that did), and `plan_jobs` rebuilds each of its
///   replicas elsewhere exactly as for a down node.
/// - `Full`: no new replicas (placement sees it cordoned), no job targets it;
///   its in-sync replicas stay, an ejected one is rebuilt elsewhere rather than
///   resynced in place.
/// - Either is cleared only by a heartbeat that reports a healthy disk (after an
///   operator replaced the disk, or freed space, and the node probed again); its
///   ejected replicas then resync in place as usual if they are still listed.
///
/// Independent of [`NodeState`]: a node with a failed disk still heartbeats, so
/// the failure detector keeps it up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskHealth {
    /// Also what a node too old to probe its disk reports.
    #[default]
    Ok,
    Full,
    Failed {
        reason: String,
    },
}

impl DiskHealth {
    pub fn is_ok(&self) -> bool {
        *self == DiskHealth::Ok
    }

    pub fn is_failed(&self) -> bool {
        matches!(self, DiskHealth::Failed { .. })
    }

    /// Same variant (a failed disk's reason may change between probes without
    /// being news).
    pub fn same_kind(&self, other: &DiskHealth) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub zone: Zone,
    pub capacity: u64,
    /// Bytes reserved for the replicas placed on it (thin: not yet written).
    pub allocated: u64,
    /// Bytes the node last reported in use on its disks.
    pub reported_used: u64,
    pub state: NodeState,
    /// Leader's clock (ms since the epoch) at the last heartbeat.
    pub last_heartbeat_ms: u64,
    /// Absent in logs and snapshots from before disk probing: healthy.
    #[serde(default)]
    pub disk: DiskHealth,
}

impl Node {
    /// Whether it may receive a new replica or be a copy job's target: up, and
    /// its disk neither failed nor full.
    pub fn accepts_replicas(&self) -> bool {
        self.state == NodeState::Up && self.disk.is_ok()
    }

    /// Whether it counts as up for the operator (`status`): up with a working
    /// disk. A full disk still serves its replicas, so that node counts.
    pub fn is_serving(&self) -> bool {
        self.state == NodeState::Up && !self.disk.is_failed()
    }

    /// The volume bytes it may hold replicas of: its capacity times the
    /// cluster's over-provisioning ratio (volumes are thin: a replica takes
    /// disk only for the blocks written to it).
    pub fn provisionable(&self, settings: &Settings) -> u64 {
        (u128::from(self.capacity) * u128::from(settings.over_provisioning_pct) / 100).min(u128::from(u64::MAX)) as u64
    }

    /// What its disk still takes by actual use: its capacity less what it
    /// reports in use (every layer's allocated blocks) and a headroom of
    /// [`USE_HEADROOM_PCT`] of the capacity, kept for the writes of the thin
    /// replicas it already holds. Placing a replica does not lower it (the
    /// replica takes disk as it is written); a node gets new replicas only
    /// while it is at least a chunk, and placement weighs nodes by it.
    pub fn disk_room(&self) -> u64 {
        let headroom = self.capacity / 100 * USE_HEADROOM_PCT;
        self.capacity.saturating_sub(self.reported_used).saturating_sub(headroom)
    }

    /// The volume bytes placement may still put on it: what provisioning
    /// allows ([`Node::provisionable`] less its replicas' full size), or
    /// nothing when its disk has no room left by actual use. (Exactly: a
    /// chunk goes to it only if the disk room is at least the chunk.)
    pub fn room(&self, settings: &Settings) -> u64 {
        if self.disk_room() == 0 {
            return 0;
        }
        self.provisionable(settings).saturating_sub(self.allocated)
    }
}

/// Of a node's capacity, the share [`Node::room`] keeps free of new replicas
/// for the writes of the thin replicas it already holds.
pub const USE_HEADROOM_PCT: u64 = 5;

/// Cluster-wide settings, changed through the log (`ballastctl settings`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// How much volume size a node may hold replicas of, in percent of its
    /// capacity (as Longhorn's over-provisioning percentage): 100 reserves
    /// every replica's full size on its disk; above it, volumes are thin
    /// and the disk may fill before they do, and a write that finds it full
    /// gets ENOSPC (never corruption). Bounds: [`OVER_PROVISIONING_PCT`].
    pub over_provisioning_pct: u32,
}

/// The accepted over-provisioning percentages.
pub const OVER_PROVISIONING_PCT: std::ops::RangeInclusive<u32> = 100..=1000;

impl Default for Settings {
    /// 200%: databases rarely fill their claims, and the disk's actual use is
    /// kept in check by [`Node::room`]; states from before settings decode so.
    fn default() -> Self {
        Settings { over_provisioning_pct: 200 }
    }
}

/// Whether a chunk's replica is live: the one rule by which `status`, `volume
/// inspect`, `what-if` and the metrics count a chunk's replicas.
///
/// Live means all of:
/// - the replica is in the chunk's in-sync set (a rebuilding one is not whole
///   yet, an ejected one is out of the set);
/// - its node answers: up, cordoned or draining (an operator's cordon or drain
///   stops new replicas, not I/O to the ones it holds). A suspect node has
///   missed its heartbeats and may be gone; a down one is;
/// - its disk has not failed (its replicas are lost). A full disk still
///   serves the replicas it holds.
///
/// A replica on a node the state does not know is not live
/// ([`MetaState::is_live`]).
pub fn replica_live(role: Role, node: NodeState, disk: &DiskHealth) -> bool {
    role == Role::InSync
        && matches!(node, NodeState::Up | NodeState::Cordoned | NodeState::Draining)
        && !disk.is_failed()
}

/// A chunk's redundancy, by its live replicas ([`replica_live`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChunkHealth {
    /// As many live replicas as the volume's replication factor (or more).
    Full,
    /// Fewer live replicas than configured, at least min-in-sync: writable.
    Degraded,
    /// At least one live replica, fewer than min-in-sync: writes fail.
    BelowMinInSync,
    /// No live replica: the data cannot be read.
    Unavailable,
}

impl ChunkHealth {
    /// The health of a chunk with `live` live replicas in a volume of
    /// `replicas` replicas per chunk and `min_in_sync`.
    pub fn of(live: usize, replicas: usize, min_in_sync: usize) -> ChunkHealth {
        if live == 0 {
            ChunkHealth::Unavailable
        } else if live < min_in_sync {
            ChunkHealth::BelowMinInSync
        } else if live < replicas {
            ChunkHealth::Degraded
        } else {
            ChunkHealth::Full
        }
    }
}

/// A volume's chunks counted by [`ChunkHealth`]. The counts nest: every chunk
/// below min-in-sync is also degraded, every unavailable one also below
/// min-in-sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeHealth {
    pub chunks: usize,
    /// Fewer live replicas than configured (including the two below).
    pub degraded: usize,
    /// Fewer live replicas than min-in-sync: writes fail (including the one below).
    pub below_min_in_sync: usize,
    /// No live replica.
    pub unavailable: usize,
}

impl VolumeHealth {
    pub fn add(&mut self, h: ChunkHealth) {
        self.chunks += 1;
        self.degraded += usize::from(h != ChunkHealth::Full);
        self.below_min_in_sync += usize::from(h >= ChunkHealth::BelowMinInSync);
        self.unavailable += usize::from(h == ChunkHealth::Unavailable);
    }

    /// Chunks with every replica live.
    pub fn full(&self) -> usize {
        self.chunks - self.degraded
    }
}

impl std::ops::AddAssign for VolumeHealth {
    fn add_assign(&mut self, o: VolumeHealth) {
        self.chunks += o.chunks;
        self.degraded += o.degraded;
        self.below_min_in_sync += o.below_min_in_sync;
        self.unavailable += o.unavailable;
    }
}

/// A replica's role in its chunk's set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    InSync,
    /// Receives new writes while a background copy fills it in.
    Rebuilding,
    /// Out of the set (ejected); kept for resync bookkeeping until replaced.
    Ejected,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkReplica {
    pub node: NodeId,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub version: u64,
    pub replicas: Vec<ChunkReplica>,
}

impl Volume {
    /// True if the volume was created with `spec`'s parameters.
    pub fn has_spec(&self, spec: &VolumeSpec) -> bool {
        self.size == spec.size
            && self.chunk_size == spec.chunk_size
            && self.replicas == spec.replicas
            && self.min_in_sync == spec.min_in_sync
            && self.zones == spec.zones
            && self.zone_spread == spec.zone_spread
    }
}

impl ChunkEntry {
    pub fn in_sync(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas.iter().filter(|r| r.role == Role::InSync).map(|r| r.node)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
    pub chunk_size: u64,
    pub replicas: usize,
    pub min_in_sync: usize,
    /// Zones the volume may use (empty: any).
    pub zones: Vec<Zone>,
    /// Whether two replicas of a chunk may share a zone when zones run short.
    #[serde(default)]
    pub zone_spread: ZoneSpread,
    /// The node a container orchestrator published the volume to (CSI
    /// ControllerPublish): the one node allowed to stage it. Independent of
    /// `attached_to`, which is the front end that actually holds the epoch.
    #[serde(default)]
    pub published_to: Option<NodeId>,
    pub epoch: Epoch,
    /// The node whose front end holds the attach lease, if any.
    pub attached_to: Option<NodeId>,
    /// The lease is a background filler's ([`Command::AttachToFill`]): any
    /// attach may take it over.
    #[serde(default)]
    pub attached_to_fill: bool,
    /// Index = chunk index.
    pub chunks: Vec<ChunkEntry>,
    /// Increments on every change to a chunk's replica set, to the size or to
    /// the volume's snapshots; the attached front end polls it.
    #[serde(default)]
    pub layout_gen: u64,
    /// The highest `layout_gen` the attached front end (at `epoch`) reported it
    /// writes with. A copy job may only start once the front end writes to its
    /// target, i.e. `acked_gen >= job.gen` (or no front end is attached).
    #[serde(default)]
    pub acked_gen: u64,
    /// The snapshot a clone was created from ([`crate::clones`]); None for a
    /// volume created empty.
    #[serde(default)]
    pub origin: Option<crate::clones::CloneOrigin>,
    /// A clone's chunks not copied from its origin yet, ascending (empty:
    /// not a clone, or an independent one).
    #[serde(default)]
    pub unfilled: Vec<u32>,
}

/// How strictly a volume's replicas are kept in distinct zones (placement's
/// [`placement::Spread`], stored with the volume so rebuilds keep it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZoneSpread {
    #[default]
    Preferred,
    Required,
}

impl From<ZoneSpread> for placement::Spread {
    fn from(z: ZoneSpread) -> Self {
        match z {
            ZoneSpread::Preferred => placement::Spread::Preferred,
            ZoneSpread::Required => placement::Spread::Required,
        }
    }
}

/// What a copy job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// A new replica on another node (replacing a down or draining one).
    Rebuild,
    /// An ejected replica whose node is up again, copied incrementally.
    Resync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Committed; its target is a rebuilding member of the chunk's set.
    Active,
    Done,
    Failed,
}

/// A copy job: fill `target`'s replica of one chunk from the in-sync replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub kind: JobKind,
    pub volume: VolumeId,
    pub chunk: ChunkIdx,
    pub target: NodeId,
    /// The replica that leaves the set when the job is done.
    pub replaces: Option<NodeId>,
    pub state: JobState,
    /// The volume's `layout_gen` that made `target` a write target.
    pub gen: u64,
    pub error: Option<String>,
    pub blocks_copied: u64,
}

impl Job {
    pub fn is_active(&self) -> bool {
        self.state == JobState::Active
    }
}

/// Finished jobs kept for `ballastctl jobs --all`.
pub const FINISHED_JOBS_KEPT: usize = 256;

/// One entry of the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds a node or updates its address, zone and capacity (idempotent).
    RegisterNode {
        id: NodeId,
        addr: SocketAddr,
        zone: Zone,
        capacity: u64,
        now_ms: u64,
    },
    /// The node is alive and its disk probe found `disk` (entries from before
    /// disk probing decode as healthy, which is what those nodes reported).
    Heartbeat {
        id: NodeId,
        reported_used: u64,
        now_ms: u64,
        #[serde(default)]
        disk: DiskHealth,
    },
    SetNodeState {
        id: NodeId,
        state: NodeState,
    },
    /// Sets the over-provisioning ratio ([`Settings::over_provisioning_pct`]):
    /// placement from now on; replicas already placed stay.
    SetOverProvisioning {
        pct: u32,
    },
    /// Creates a volume and places all its chunks. Same name and parameters again:
    /// returns the existing volume (retries are safe).
    CreateVolume {
        name: String,
        size: u64,
        chunk_size: u64,
        replicas: usize,
        min_in_sync: usize,
        zones: Vec<Zone>,
        #[serde(default)]
        zone_spread: ZoneSpread,
    },
    GrowVolume {
        volume: VolumeId,
        size: u64,
    },
    DeleteVolume {
        volume: VolumeId,
    },
    /// Gives `node` the attach lease and raises the epoch (fencing older front ends).
    Attach {
        volume: VolumeId,
        node: NodeId,
    },
    /// As `Attach`, for a node agent that fills a detached clone from its
    /// source (crates/meta/src/clones.rs, "Filling detached clones"): only
    /// while the volume is neither published nor attached by anything but
    /// another filler, and only while it still has unfilled chunks.
    AttachToFill {
        volume: VolumeId,
        node: NodeId,
    },
    /// Removes `node` from the chunk's in-sync (or rebuilding) set if the set is
    /// still at `version`.
    Eject {
        volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        node: NodeId,
    },
    /// The front end attached at `epoch` writes with layout generation `gen`.
    AckLayout {
        volume: VolumeId,
        epoch: Epoch,
        gen: u64,
    },
    /// Releases the attach lease if `epoch` still holds it.
    Detach {
        volume: VolumeId,
        epoch: Epoch,
    },
    /// Makes `target` a rebuilding member of the chunk (a new replica, or an
    /// ejected one for a resync) and records the copy job. The chunk must still
    /// be at `version` and have no active job.
    StartJob {
        volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        kind: JobKind,
        target: NodeId,
        replaces: Option<NodeId>,
    },
    /// The job's target has every block: it joins the in-sync set and the
    /// replaced replica leaves (or, `ok == false`, the job failed and the target
    /// leaves the set again).
    FinishJob {
        job: u64,
        ok: bool,
        error: Option<String>,
        blocks_copied: u64,
    },
    /// Forgets a node that holds no replicas.
    RemoveNode {
        id: NodeId,
    },
    /// Publishes the volume to `node` (CSI ControllerPublish). Idempotent for the
    /// same node; refused while it is published to another.
    Publish {
        volume: VolumeId,
        node: NodeId,
    },
    /// Withdraws the publication if it is to `node` (None: whichever node).
    Unpublish {
        volume: VolumeId,
        node: Option<NodeId>,
    },
    /// Requests a snapshot of the volume: ready at once when it is detached,
    /// else pending until the attached front end commits its cut. The same
    /// name on the same volume again returns the existing one.
    CreateSnapshot {
        volume: VolumeId,
        name: String,
        now_ms: u64,
    },
    /// The front end attached at `epoch` installed `cut` on every replica
    /// node: the listed snapshots, if still pending, take it.
    CommitSnapshots {
        volume: VolumeId,
        epoch: Epoch,
        snapshots: Vec<u64>,
        cut: Seq,
    },
    /// Forgets the snapshot; the replicas drop its layers when the front end
    /// (or the next attach) installs the remaining cuts.
    DeleteSnapshot {
        id: u64,
    },
    /// Creates a volume from ready snapshot `snapshot` (a clone, see
    /// [`crate::clones`]); the parameters as for CreateVolume.
    CreateClone {
        name: String,
        snapshot: u64,
        size: u64,
        chunk_size: u64,
        replicas: usize,
        min_in_sync: usize,
        zones: Vec<Zone>,
        zone_spread: ZoneSpread,
    },
    /// Creates a volume from volume `source`'s content now: a snapshot of it
    /// made for the clone, and the clone of that snapshot (see
    /// [`crate::clones`]); the parameters as for CreateVolume.
    CreateVolumeClone {
        name: String,
        source: VolumeId,
        size: u64,
        chunk_size: u64,
        replicas: usize,
        min_in_sync: usize,
        zones: Vec<Zone>,
        zone_spread: ZoneSpread,
        now_ms: u64,
    },
    /// The front end attached at `epoch` filled `chunks` of a clone from its
    /// origin, durably.
    FillChunks {
        volume: VolumeId,
        epoch: Epoch,
        chunks: Vec<u32>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Done,
    Volume(VolumeId),
    Epoch(Epoch),
    /// The chunk's set after an eject (also when someone else changed it first).
    Chunk(ChunkEntry),
    /// What a deleted volume leaves to reclaim: per node, the chunk indexes it held.
    Reclaim(Vec<(NodeId, Vec<ChunkIdx>)>),
    /// The id of a started job.
    Job(u64),
    /// The snapshot made (or found again) by `CreateSnapshot`.
    Snapshot(Snapshot),
    /// The volume's `layout_gen` after the change (`CommitSnapshots`).
    LayoutGen(u64),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MetaError {
    #[error("invalid {param}: {reason}")]
    InvalidArgument { param: String, reason: String },
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    #[error("unknown volume {0}")]
    UnknownVolume(VolumeId),
    #[error("volume {volume} has no chunk {chunk}")]
    UnknownChunk { volume: VolumeId, chunk: ChunkIdx },
    #[error("a volume named {0:?} exists with other parameters")]
    NameTaken(String),
    #[error("placement: {0}")]
    Placement(String),
    #[error("ejecting {node} from chunk {chunk} would leave {remaining} in-sync replicas, below the minimum of {min}")]
    BelowMinInSync { chunk: ChunkIdx, node: NodeId, remaining: usize, min: usize },
    #[error("node {node} is in zone {existing}, not {requested}: remove it before re-registering")]
    ZoneChange { node: NodeId, existing: Zone, requested: Zone },
    #[error("unknown job {0}")]
    UnknownJob(u64),
    #[error("{0}")]
    Conflict(String),
    #[error("node {node} still holds {replicas} chunk replicas: drain it first")]
    NodeInUse { node: NodeId, replicas: usize },
    #[error("volume {volume} is published to node {node}")]
    Published { volume: VolumeId, node: NodeId },
    /// A background filler attaches only a volume nobody uses.
    #[error("volume {volume} is attached or published to node {node}")]
    Attached { volume: VolumeId, node: NodeId },
    #[error("snapshot {0} not found")]
    UnknownSnapshot(String),
    /// A volume's snapshots are layers of its chunks: they go first.
    #[error("volume {volume} has {count} snapshots: delete them first")]
    HasSnapshots { volume: VolumeId, count: usize },
    /// A clone holds at least its snapshot's data.
    #[error("a clone of {size} bytes is smaller than snapshot {snapshot} ({needed} bytes)")]
    CloneTooSmall { size: u64, snapshot: String, needed: u64 },
    /// A clone still reads part of its data from the snapshot.
    #[error("snapshot {snapshot} is the source of clone {clone}, which is still copying from it")]
    SnapshotInUse { snapshot: String, clone: VolumeId },
    /// A snapshot of a filling clone would miss what it has not copied yet.
    #[error("volume {volume} is a clone still copying {remaining} chunks from its source: snapshot or clone it once it is independent")]
    CloneFilling { volume: VolumeId, remaining: usize },
    /// A clone of a volume waits for the snapshot made for it.
    #[error("clone {clone} cannot attach yet: snapshot {snapshot} of its source volume {from} is not taken (its front end takes it within moments; or the next attach does)")]
    CloneSourcePending { clone: VolumeId, snapshot: String, from: VolumeId },
}

impl From<PlacementError> for MetaError {
    fn from(e: PlacementError) -> Self {
        MetaError::Placement(e.to_string())
    }
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Mixed into placement, fixed when the cluster is created.
    pub seed: u64,
    pub nodes: BTreeMap<NodeId, Node>,
    pub volumes: BTreeMap<VolumeId, Volume>,
    pub next_volume: u64,
    #[serde(default)]
    pub jobs: BTreeMap<u64, Job>,
    #[serde(default)]
    pub next_job: u64,
    /// Every volume's snapshots, by id ([`crate::snapshots`]).
    #[serde(default)]
    pub snapshots: BTreeMap<u64, Snapshot>,
    #[serde(default)]
    pub next_snapshot: u64,
    #[serde(default)]
    pub settings: Settings,
}

impl MetaState {
    pub fn new(seed: u64) -> MetaState {
        MetaState { seed, next_volume: 1, next_job: 1, next_snapshot: 1, ..MetaState::default() }
    }

    /// The volume by name, or by numeric id.
    pub fn find_volume(&self, name_or_id: &str) -> Option<&Volume> {
        self.volume_by_name(name_or_id)
            .or_else(|| name_or_id.parse::<u64>().ok().and_then(|id| self.volumes.get(&VolumeId(id))))
    }

    /// The active job of a chunk, if any (at most one at a time).
    pub fn active_job(&self, volume: VolumeId, chunk: ChunkIdx) -> Option<&Job> {
        self.jobs.values().find(|j| j.is_active() && j.volume == volume && j.chunk == chunk)
    }

    /// Whether the job may copy now: its target must already receive the front
    /// end's writes (or no front end is attached), else a write acknowledged
    /// without the target could land on the source after the copy read it.
    pub fn job_ready(&self, job: &Job) -> bool {
        job.is_active()
            && self.volumes.get(&job.volume).is_some_and(|v| v.attached_to.is_none() || v.acked_gen >= job.gen)
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|v| v.name == name)
    }

    /// Whether `r` is live ([`replica_live`]); a replica on an unknown node is not.
    pub fn is_live(&self, r: &ChunkReplica) -> bool {
        self.nodes.get(&r.node).is_some_and(|n| replica_live(r.role, n.state, &n.disk))
    }

    /// The nodes of the chunk's live replicas.
    pub fn live_replicas<'a>(&'a self, c: &'a ChunkEntry) -> impl Iterator<Item = NodeId> + 'a {
        c.replicas.iter().filter(|r| self.is_live(r)).map(|r| r.node)
    }

    /// The chunk's health in volume `v`, by its live replicas.
    pub fn chunk_health(&self, v: &Volume, c: &ChunkEntry) -> ChunkHealth {
        ChunkHealth::of(self.live_replicas(c).count(), v.replicas, v.min_in_sync)
    }

    /// Volume `v`'s chunks by health. `VolumeHealth::degraded` is what `status`,
    /// `volume list` and the metrics call degraded chunks.
    pub fn volume_health(&self, v: &Volume) -> VolumeHealth {
        let mut h = VolumeHealth::default();
        for c in &v.chunks {
            h.add(self.chunk_health(v, c));
        }
        h
    }

    /// Every volume's chunks by health, summed.
    pub fn cluster_health(&self) -> VolumeHealth {
        let mut h = VolumeHealth::default();
        for v in self.volumes.values() {
            h += self.volume_health(v);
        }
        h
    }

    /// Applies one command. On error the state is unchanged.
    pub fn apply(&mut self, cmd: &Command) -> Result<Response, MetaError> {
        match cmd {
            Command::RegisterNode { id, addr, zone, capacity, now_ms } => {
                if zone.0.is_empty() {
                    return Err(invalid("zone", "must not be empty"));
                }
                match self.nodes.get_mut(id) {
                    Some(n) => {
                        if &n.zone != zone {
                            return Err(MetaError::ZoneChange {
                                node: *id,
                                existing: n.zone.clone(),
                                requested: zone.clone(),
                            });
                        }
                        n.addr = *addr;
                        n.capacity = *capacity;
                        n.last_heartbeat_ms = *now_ms;
                    }
                    None => {
                        self.nodes.insert(
                            *id,
                            Node {
                                id: *id,
                                addr: *addr,
                                zone: zone.clone(),
                                capacity: *capacity,
                                allocated: 0,
                                reported_used: 0,
                                state: NodeState::Up,
                                last_heartbeat_ms: *now_ms,
                                disk: DiskHealth::Ok,
                            },
                        );
                    }
                }
                Ok(Response::Done)
            }
            Command::Heartbeat { id, reported_used, now_ms, disk } => {
                if !self.nodes.contains_key(id) {
                    return Err(MetaError::UnknownNode(*id));
                }
                if !disk.is_ok() {
                    // No job targets a failed or full disk: the copy could not
                    // land (and a rebuild elsewhere replaces what it would fill).
                    let why = match disk {
                        DiskHealth::Failed { reason } => format!("target disk failed: {reason}"),
                        _ => "target disk full".to_string(),
                    };
                    // Every job is checked before the first one ends: a failed
                    // command changes nothing.
                    let doomed = self
                        .jobs
                        .values()
                        .filter(|j| j.is_active() && j.target == *id)
                        .map(|j| self.finishable(j.id, false))
                        .collect::<Result<Vec<Job>, MetaError>>()?;
                    for job in &doomed {
                        self.finish_checked(job, false, Some(why.clone()), 0);
                    }
                }
                if let Some(n) = self.nodes.get_mut(id) {
                    n.reported_used = *reported_used;
                    n.last_heartbeat_ms = n.last_heartbeat_ms.max(*now_ms);
                    // A suspect node that speaks again is up; a down one stays down
                    // until an explicit state change (its replicas are being rebuilt).
                    if n.state == NodeState::Suspect {
                        n.state = NodeState::Up;
                    }
                    n.disk = disk.clone();
                }
                Ok(Response::Done)
            }
            Command::SetNodeState { id, state } => {
                self.nodes.get_mut(id).ok_or(MetaError::UnknownNode(*id))?.state = *state;
                Ok(Response::Done)
            }
            Command::SetOverProvisioning { pct } => {
                if !OVER_PROVISIONING_PCT.contains(pct) {
                    return Err(invalid(
                        "over_provisioning_pct",
                        format!(
                            "{pct}% is outside {}..={}%",
                            OVER_PROVISIONING_PCT.start(),
                            OVER_PROVISIONING_PCT.end()
                        ),
                    ));
                }
                self.settings.over_provisioning_pct = *pct;
                Ok(Response::Done)
            }
            Command::CreateVolume { name, size, chunk_size, replicas, min_in_sync, zones, zone_spread } => {
                let spec = VolumeSpec::new(*size, *chunk_size, *replicas, *min_in_sync, zones, *zone_spread);
                self.create_volume(name, spec)
            }
            Command::GrowVolume { volume, size } => self.grow_volume(*volume, *size),
            Command::DeleteVolume { volume } => {
                let v = self.volumes.get(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                if let Some(node) = v.published_to {
                    return Err(MetaError::Published { volume: *volume, node });
                }
                let count = self.volume_snapshots(*volume).count();
                if count > 0 {
                    return Err(MetaError::HasSnapshots { volume: *volume, count });
                }
                // A clone of a volume deleted while it still fills: the
                // snapshot made for it goes with it.
                if let Some(id) = self.snapshot_for_clone(*volume) {
                    self.remove_snapshot(id)?;
                }
                let v = self.volumes.remove(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                for j in self.jobs.values_mut().filter(|j| j.is_active() && j.volume == *volume) {
                    j.state = JobState::Failed;
                    j.error = Some("volume deleted".into());
                }
                // The jobs it failed count against the finished jobs kept.
                self.trim_finished_jobs();
                let mut reclaim: BTreeMap<NodeId, Vec<ChunkIdx>> = BTreeMap::new();
                for (i, c) in v.chunks.iter().enumerate() {
                    for r in &c.replicas {
                        reclaim.entry(r.node).or_default().push(ChunkIdx(i as u32));
                        if let Some(n) = self.nodes.get_mut(&r.node) {
                            n.allocated = n.allocated.saturating_sub(v.chunk_size);
                        }
                    }
                }
                Ok(Response::Reclaim(reclaim.into_iter().collect()))
            }
            Command::Attach { volume, node } => self.attach(*volume, *node, false),
            Command::AttachToFill { volume, node } => {
                let v = self.volumes.get(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                if let Some(holder) = v.published_to.or(v.attached_to.filter(|_| !v.attached_to_fill)) {
                    return Err(MetaError::Attached { volume: *volume, node: holder });
                }
                if v.unfilled.is_empty() {
                    return Err(MetaError::Conflict(format!("volume {volume} has nothing left to fill")));
                }
                self.attach(*volume, *node, true)
            }
            Command::Eject { volume, chunk, version, node } => {
                let v = self.volumes.get(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                let c =
                    v.chunks.get(chunk.0 as usize).ok_or(MetaError::UnknownChunk { volume: *volume, chunk: *chunk })?;
                let role = c.replicas.iter().find(|r| r.node == *node).map(|r| r.role);
                if c.version != *version || !matches!(role, Some(Role::InSync | Role::Rebuilding)) {
                    // Someone changed the set first: the caller decides from it.
                    return Ok(Response::Chunk(c.clone()));
                }
                // A rebuilding member is not counted towards min-in-sync.
                if role == Some(Role::InSync) {
                    let remaining = c.in_sync().count() - 1;
                    if remaining < v.min_in_sync {
                        return Err(MetaError::BelowMinInSync {
                            chunk: *chunk,
                            node: *node,
                            remaining,
                            min: v.min_in_sync,
                        });
                    }
                }
                // A rebuilding target that fails a write fails its job; ending
                // that job is checked here too.
                let job = match role {
                    Some(Role::Rebuilding) => {
                        self.active_job(*volume, *chunk).map(|j| self.finishable(j.id, false)).transpose()?
                    }
                    _ => None,
                };
                // Invariant: every check comes before the first change, and
                // nothing below fails, so a refused eject changes nothing (on
                // every member alike).
                let mut ejected = c.clone();
                for r in &mut ejected.replicas {
                    if r.node == *node {
                        r.role = Role::Ejected;
                    }
                }
                ejected.version += 1;
                if let Some(v) = self.volumes.get_mut(volume) {
                    v.layout_gen += 1;
                    if let Some(c) = v.chunks.get_mut(chunk.0 as usize) {
                        *c = ejected.clone();
                    }
                }
                if let Some(job) = &job {
                    self.finish_checked(job, false, Some("target ejected by the front end".into()), 0);
                }
                // The set after the eject and the end of its job.
                let now = self.volumes.get(volume).and_then(|v| v.chunks.get(chunk.0 as usize));
                Ok(Response::Chunk(now.cloned().unwrap_or(ejected)))
            }
            Command::AckLayout { volume, epoch, gen } => {
                let v = self.volumes.get_mut(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                // Only the current attachment speaks for the writes in flight.
                if *epoch == v.epoch && *gen <= v.layout_gen {
                    v.acked_gen = v.acked_gen.max(*gen);
                }
                Ok(Response::Done)
            }
            Command::Detach { volume, epoch } => {
                let v = self.volumes.get_mut(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                if *epoch == v.epoch {
                    v.attached_to = None;
                    v.attached_to_fill = false;
                    self.resolve_pending_snapshots(*volume, *epoch);
                }
                Ok(Response::Done)
            }
            Command::StartJob { volume, chunk, version, kind, target, replaces } => {
                self.start_job(*volume, *chunk, *version, *kind, *target, *replaces)
            }
            Command::FinishJob { job, ok, error, blocks_copied } => {
                self.finish_job(*job, *ok, error.clone(), *blocks_copied)
            }
            Command::RemoveNode { id } => {
                if !self.nodes.contains_key(id) {
                    return Err(MetaError::UnknownNode(*id));
                }
                let replicas = self
                    .volumes
                    .values()
                    .flat_map(|v| v.chunks.iter())
                    .filter(|c| c.replicas.iter().any(|r| r.node == *id))
                    .count();
                if replicas > 0 {
                    return Err(MetaError::NodeInUse { node: *id, replicas });
                }
                self.nodes.remove(id);
                Ok(Response::Done)
            }
            Command::Publish { volume, node } => {
                if !self.nodes.contains_key(node) {
                    return Err(MetaError::UnknownNode(*node));
                }
                let v = self.volumes.get_mut(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                match v.published_to {
                    Some(other) if other != *node => Err(MetaError::Published { volume: *volume, node: other }),
                    _ => {
                        v.published_to = Some(*node);
                        Ok(Response::Done)
                    }
                }
            }
            Command::Unpublish { volume, node } => {
                let v = self.volumes.get_mut(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                if node.is_none() || v.published_to == *node {
                    v.published_to = None;
                }
                Ok(Response::Done)
            }
            Command::CreateSnapshot { volume, name, now_ms } => self.create_snapshot(*volume, name, *now_ms),
            Command::CommitSnapshots { volume, epoch, snapshots, cut } => {
                self.commit_snapshots(*volume, *epoch, snapshots, *cut)
            }
            Command::DeleteSnapshot { id } => self.delete_snapshot(*id),
            Command::CreateClone { name, snapshot, size, chunk_size, replicas, min_in_sync, zones, zone_spread } => {
                let spec = VolumeSpec::new(*size, *chunk_size, *replicas, *min_in_sync, zones, *zone_spread);
                self.create_clone(name, spec, *snapshot)
            }
            Command::CreateVolumeClone {
                name,
                source,
                size,
                chunk_size,
                replicas,
                min_in_sync,
                zones,
                zone_spread,
                now_ms,
            } => {
                let spec = VolumeSpec::new(*size, *chunk_size, *replicas, *min_in_sync, zones, *zone_spread);
                self.create_volume_clone(name, spec, *source, *now_ms)
            }
            Command::FillChunks { volume, epoch, chunks } => self.fill_chunks(*volume, *epoch, chunks),
        }
    }

    /// Gives `node` the attach lease of `volume` (a new epoch, fencing older
    /// front ends); `for_fill`: a background filler's ([`Command::AttachToFill`]).
    fn attach(&mut self, volume: VolumeId, node: NodeId, for_fill: bool) -> Result<Response, MetaError> {
        if !self.nodes.contains_key(&node) {
            return Err(MetaError::UnknownNode(node));
        }
        let v = self.volumes.get_mut(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        // Invariant: a volume published to a node (CSI ControllerPublish,
        // the single-node writer) is attached by that node only. A node
        // coming back after its pod moved elsewhere must not re-attach
        // the volume from its stage records: the new epoch would fence
        // the front end the pod now uses. Unpublished volumes (exports
        // outside CSI) stay free to attach anywhere.
        if let Some(other) = v.published_to.filter(|p| *p != node) {
            return Err(MetaError::Published { volume, node: other });
        }
        self.check_clone_attach(volume)?;
        let v = self.volumes.get_mut(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        let old = v.epoch;
        v.epoch = Epoch(v.epoch.0 + 1);
        v.attached_to = Some(node);
        v.attached_to_fill = for_fill;
        let epoch = v.epoch;
        // What the old front end left pending is cut at its epoch's
        // end (a new layout generation), then the new front end starts
        // from the current layout, snapshots included.
        self.resolve_pending_snapshots(volume, old);
        let v = self.volumes.get_mut(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        v.acked_gen = v.layout_gen;
        Ok(Response::Epoch(epoch))
    }

    fn start_job(
        &mut self,
        volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        kind: JobKind,
        target: NodeId,
        replaces: Option<NodeId>,
    ) -> Result<Response, MetaError> {
        // A rebuild swaps one member for a new one and a resync swaps none, so the
        // chunk is back at the volume's replica count when the job is done.
        match (kind, replaces) {
            (JobKind::Rebuild, None) => return Err(invalid("replaces", "a rebuild must name the replica it replaces")),
            (JobKind::Resync, Some(r)) => {
                return Err(invalid("replaces", format!("a resync replaces no replica, not {r}")));
            }
            _ => {}
        }
        let tn = self.nodes.get(&target).ok_or(MetaError::UnknownNode(target))?;
        if tn.state != NodeState::Up {
            return Err(MetaError::Conflict(format!("target {target} is {:?}, not up", tn.state)));
        }
        if !tn.disk.is_ok() {
            return Err(MetaError::Conflict(format!("target {target}'s disk is {:?}", tn.disk)));
        }
        if self.active_job(volume, chunk).is_some() {
            return Err(MetaError::Conflict(format!("chunk {chunk} of volume {volume} already has an active job")));
        }
        // Required zone spread: the new member may share a zone only with the
        // replica it replaces (it takes that one's place).
        let v = self.volumes.get(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        if v.zone_spread == ZoneSpread::Required && kind == JobKind::Rebuild {
            let c = v.chunks.get(chunk.0 as usize).ok_or(MetaError::UnknownChunk { volume, chunk })?;
            let clash = c
                .replicas
                .iter()
                .filter(|r| Some(r.node) != replaces && r.node != target)
                .find(|r| self.nodes.get(&r.node).is_some_and(|n| n.zone == tn.zone));
            if let Some(r) = clash {
                return Err(MetaError::Conflict(format!(
                    "volume {volume} requires zone spread: target {target} shares zone {} with replica {}",
                    tn.zone, r.node
                )));
            }
        }
        let v = self.volumes.get_mut(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        let chunk_size = v.chunk_size;
        let c = v.chunks.get_mut(chunk.0 as usize).ok_or(MetaError::UnknownChunk { volume, chunk })?;
        if c.version != version {
            return Err(MetaError::Conflict(format!("chunk {chunk} is at version {}, not {version}", c.version)));
        }
        if let Some(r) = replaces {
            if !c.replicas.iter().any(|x| x.node == r) {
                return Err(MetaError::Conflict(format!("{r} holds no replica of chunk {chunk}")));
            }
        }
        let existing = c.replicas.iter().position(|r| r.node == target);
        match (kind, existing) {
            (JobKind::Resync, Some(i)) if c.replicas[i].role == Role::Ejected => c.replicas[i].role = Role::Rebuilding,
            (JobKind::Resync, _) => {
                return Err(MetaError::Conflict(format!("{target} is not an ejected replica of chunk {chunk}")))
            }
            (JobKind::Rebuild, None) => c.replicas.push(ChunkReplica { node: target, role: Role::Rebuilding }),
            (JobKind::Rebuild, Some(_)) => {
                return Err(MetaError::Conflict(format!("{target} already holds chunk {chunk}")))
            }
        }
        c.version += 1;
        v.layout_gen += 1;
        let gen = v.layout_gen;
        if kind == JobKind::Rebuild {
            if let Some(n) = self.nodes.get_mut(&target) {
                n.allocated += chunk_size;
            }
        }
        let id = self.next_job;
        self.next_job += 1;
        self.jobs.insert(
            id,
            Job {
                id,
                kind,
                volume,
                chunk,
                target,
                replaces,
                state: JobState::Active,
                gen,
                error: None,
                blocks_copied: 0,
            },
        );
        Ok(Response::Job(id))
    }

    fn finish_job(&mut self, id: u64, ok: bool, error: Option<String>, blocks: u64) -> Result<Response, MetaError> {
        let job = self.finishable(id, ok)?;
        self.finish_checked(&job, ok, error, blocks);
        Ok(Response::Done)
    }

    /// The checks of ending job `id` (`ok`: done, else failed), changing
    /// nothing: what [`Self::finish_checked`] then applies without failing.
    /// Commands that end jobs on the way (an eject, a heartbeat reporting a bad
    /// disk) check them all before they change anything.
    fn finishable(&self, id: u64, ok: bool) -> Result<Job, MetaError> {
        let job = self.jobs.get(&id).ok_or(MetaError::UnknownJob(id))?;
        if !job.is_active() {
            return Err(MetaError::Conflict(format!("job {id} is not active")));
        }
        // A job whose volume was deleted under it just fails.
        if let Some(v) = self.volumes.get(&job.volume) {
            let c = v
                .chunks
                .get(job.chunk.0 as usize)
                .ok_or(MetaError::UnknownChunk { volume: job.volume, chunk: job.chunk })?;
            let target_rebuilding = c.replicas.iter().any(|r| r.node == job.target && r.role == Role::Rebuilding);
            if ok && !target_rebuilding {
                return Err(MetaError::Conflict(format!(
                    "job {id}: {} is no longer rebuilding chunk {}",
                    job.target, job.chunk
                )));
            }
        }
        Ok(job.clone())
    }

    /// Ends a job [`Self::finishable`] accepted (on the same state). Never fails.
    fn finish_checked(&mut self, job: &Job, ok: bool, error: Option<String>, blocks: u64) {
        let Some(v) = self.volumes.get_mut(&job.volume) else {
            // The volume was deleted under the job.
            if let Some(j) = self.jobs.get_mut(&job.id) {
                j.state = JobState::Failed;
                j.error = Some("volume deleted".into());
            }
            self.trim_finished_jobs();
            return;
        };
        let chunk_size = v.chunk_size;
        let mut released = Vec::new();
        if let Some(c) = v.chunks.get_mut(job.chunk.0 as usize) {
            if ok {
                for r in &mut c.replicas {
                    if r.node == job.target {
                        r.role = Role::InSync;
                    }
                }
                if let Some(old) = job.replaces {
                    if old != job.target {
                        c.replicas.retain(|r| r.node != old);
                        released.push(old);
                    }
                }
            } else if job.kind == JobKind::Rebuild {
                // A partial new replica leaves the set; its node reclaims it later.
                if c.replicas.iter().any(|r| r.node == job.target) {
                    c.replicas.retain(|r| r.node != job.target);
                    released.push(job.target);
                }
            } else {
                for r in &mut c.replicas {
                    if r.node == job.target {
                        r.role = Role::Ejected;
                    }
                }
            }
            c.version += 1;
            v.layout_gen += 1;
        }
        for n in released {
            if let Some(n) = self.nodes.get_mut(&n) {
                n.allocated = n.allocated.saturating_sub(chunk_size);
            }
        }
        if let Some(j) = self.jobs.get_mut(&job.id) {
            j.state = if ok { JobState::Done } else { JobState::Failed };
            j.error = error;
            j.blocks_copied = blocks;
        }
        self.trim_finished_jobs();
    }

    /// Keeps only the newest [`FINISHED_JOBS_KEPT`] finished jobs.
    fn trim_finished_jobs(&mut self) {
        let finished: Vec<u64> = self.jobs.values().filter(|j| !j.is_active()).map(|j| j.id).collect();
        if finished.len() > FINISHED_JOBS_KEPT {
            for id in &finished[..finished.len() - FINISHED_JOBS_KEPT] {
                self.jobs.remove(id);
            }
        }
    }

    pub(crate) fn create_volume(&mut self, name: &str, spec: VolumeSpec) -> Result<Response, MetaError> {
        let VolumeSpec { size, chunk_size, replicas, min_in_sync, ref zones, zone_spread } = spec;
        validate_name(name)?;
        validate_geometry(size, chunk_size)?;
        if !(1..=placement::MAX_REPLICAS).contains(&replicas) {
            return Err(invalid("replicas", format!("{replicas} is not in 1..={}", placement::MAX_REPLICAS)));
        }
        if !(1..=replicas).contains(&min_in_sync) {
            return Err(invalid("min_in_sync", format!("{min_in_sync} is not in 1..={replicas}")));
        }
        if let Some(v) = self.volume_by_name(name) {
            // A clone by that name is not the empty volume asked for.
            let same = v.origin.is_none() && v.has_spec(&spec);
            return if same { Ok(Response::Volume(v.id)) } else { Err(MetaError::NameTaken(name.to_string())) };
        }
        let id = VolumeId(self.next_volume);
        let chunks = self.place_chunks(id, 0, size.div_ceil(chunk_size), &spec)?;
        self.next_volume += 1;
        self.volumes.insert(
            id,
            Volume {
                id,
                name: name.to_string(),
                size,
                chunk_size,
                replicas,
                min_in_sync,
                zones: zones.to_vec(),
                zone_spread,
                published_to: None,
                epoch: Epoch(0),
                attached_to: None,
                attached_to_fill: false,
                chunks,
                layout_gen: 1,
                acked_gen: 0,
                origin: None,
                unfilled: Vec::new(),
            },
        );
        Ok(Response::Volume(id))
    }

    fn grow_volume(&mut self, volume: VolumeId, size: u64) -> Result<Response, MetaError> {
        let v = self.volumes.get(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        validate_geometry(size, v.chunk_size)?;
        if size < v.size {
            return Err(invalid("size", format!("{size} is smaller than the volume's {}", v.size)));
        }
        // Replicas create a chunk's file at its length; a partial last chunk
        // cannot become longer, so only a volume of whole chunks grows.
        if size > v.size && !v.size.is_multiple_of(v.chunk_size) {
            return Err(MetaError::Conflict(format!(
                "volume {volume} is {} bytes, not a whole number of {}-byte chunks: it cannot grow",
                v.size, v.chunk_size
            )));
        }
        let (have, want) = (v.chunks.len() as u64, size.div_ceil(v.chunk_size));
        let spec = VolumeSpec::of(v);
        let added = self.place_chunks(volume, have, want, &spec)?;
        let v = self.volumes.get_mut(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        v.chunks.extend(added);
        v.size = size;
        v.layout_gen += 1;
        Ok(Response::Volume(volume))
    }

    /// Places chunks `[from, to)` and reserves their space; all or nothing.
    fn place_chunks(
        &mut self,
        volume: VolumeId,
        from: u64,
        to: u64,
        spec: &VolumeSpec,
    ) -> Result<Vec<ChunkEntry>, MetaError> {
        let chunk_size = spec.chunk_size;
        if to > u64::from(u32::MAX) {
            return Err(invalid("size", format!("{to} chunks exceed the chunk index range")));
        }
        let mut map = self.cluster_map();
        let req = spec.placement_request();
        let mut out = Vec::with_capacity((to - from) as usize);
        for c in from..to {
            let set = placement::place(&map, ChunkKey { volume, chunk: ChunkIdx(c as u32) }, &req)?;
            for id in &set {
                if let Some(n) = map.nodes.iter_mut().find(|n| n.id == *id) {
                    n.used += chunk_size;
                }
            }
            out.push(ChunkEntry {
                version: 1,
                replicas: set.into_iter().map(|node| ChunkReplica { node, role: Role::InSync }).collect(),
            });
        }
        // Committed only now that every chunk found a home.
        for e in &out {
            for r in &e.replicas {
                if let Some(n) = self.nodes.get_mut(&r.node) {
                    n.allocated += chunk_size;
                }
            }
        }
        Ok(out)
    }

    pub fn cluster_map(&self) -> ClusterMap {
        ClusterMap {
            seed: self.seed,
            nodes: self
                .nodes
                .values()
                .map(|n| NodeInfo {
                    id: n.id,
                    zone: n.zone.clone(),
                    // Thin: allocated up to the over-provisioned capacity, and
                    // only while its disk has room by actual use.
                    capacity: n.provisionable(&self.settings),
                    used: n.allocated,
                    disk_room: n.disk_room(),
                    // A failed disk is a down node (its replicas are lost); a
                    // full one a cordoned node, unless it is leaving anyway.
                    state: match (&n.disk, n.state) {
                        (DiskHealth::Failed { .. }, _) | (_, NodeState::Down) => placement::NodeState::Down,
                        (_, NodeState::Draining) => placement::NodeState::Draining,
                        (DiskHealth::Full, _) | (_, NodeState::Suspect | NodeState::Cordoned) => {
                            placement::NodeState::Cordoned
                        }
                        (DiskHealth::Ok, NodeState::Up) => placement::NodeState::Up,
                    },
                })
                .collect(),
        }
    }
}

/// A volume's shape and placement rules: what creating it names and what every
/// later placement of its chunks (growth, rebuilds) must respect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    pub size: u64,
    pub chunk_size: u64,
    pub replicas: usize,
    pub min_in_sync: usize,
    pub zones: Vec<Zone>,
    pub zone_spread: ZoneSpread,
}

impl VolumeSpec {
    pub fn new(
        size: u64,
        chunk_size: u64,
        replicas: usize,
        min_in_sync: usize,
        zones: &[Zone],
        zone_spread: ZoneSpread,
    ) -> VolumeSpec {
        VolumeSpec { size, chunk_size, replicas, min_in_sync, zones: zones.to_vec(), zone_spread }
    }

    pub fn of(v: &Volume) -> VolumeSpec {
        VolumeSpec {
            size: v.size,
            chunk_size: v.chunk_size,
            replicas: v.replicas,
            min_in_sync: v.min_in_sync,
            zones: v.zones.clone(),
            zone_spread: v.zone_spread,
        }
    }

    pub fn placement_request(&self) -> Request {
        Request {
            replicas: self.replicas,
            chunk_size: self.chunk_size,
            zones: self.zones.clone(),
            spread: self.zone_spread.into(),
        }
    }
}

fn invalid(param: &str, reason: impl Into<String>) -> MetaError {
    MetaError::InvalidArgument { param: param.to_string(), reason: reason.into() }
}

pub(crate) fn validate_name(name: &str) -> Result<(), MetaError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid("name", format!("{name:?}: 1 to 128 characters of [A-Za-z0-9._-]")))
    }
}

fn validate_geometry(size: u64, chunk_size: u64) -> Result<(), MetaError> {
    let bs = u64::from(BLOCK_SIZE);
    if chunk_size == 0 || !chunk_size.is_multiple_of(bs) || chunk_size > 1 << 32 {
        return Err(invalid("chunk_size", format!("{chunk_size} is not a multiple of {bs} up to 4 GiB")));
    }
    if size == 0 || !size.is_multiple_of(bs) {
        return Err(invalid("size", format!("{size} is not a positive multiple of {bs}")));
    }
    Ok(())
}
