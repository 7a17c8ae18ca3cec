//! The replicated state machine of the metadata service.
//!
//! [`MetaState::apply`] is a pure function of the state and one [`Command`]: no
//! clock (times come inside commands, stamped by the leader), no randomness
//! (placement is seeded by the cluster seed in the state), no I/O. Raft applies
//! the same log on every member, so every member holds the same state; a snapshot
//! is the serde serialisation of [`MetaState`].
//!
//! Invariants kept by `apply` (checked after every step in `tests/state.rs`):
//! - every chunk's in-sync set has at least the volume's `min_in_sync` members;
//! - a chunk's `version` increases on every change to its replica set;
//! - a volume's `epoch` only increases; each attach raises it by one;
//! - each node's `allocated` is the chunk size times the replicas it holds;
//! - a failed command changes nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ballast_placement::{self as placement, ChunkKey, ClusterMap, NodeInfo, PlacementError, Request};
use ballast_types::{ChunkIdx, Epoch, NodeId, VolumeId, Zone, BLOCK_SIZE};
use serde::{Deserialize, Serialize};

/// Default bytes per chunk (DESIGN.md, "Data model").
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
    pub epoch: Epoch,
    /// The node whose front end holds the attach lease, if any.
    pub attached_to: Option<NodeId>,
    /// Index = chunk index.
    pub chunks: Vec<ChunkEntry>,
}

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
    Heartbeat {
        id: NodeId,
        reported_used: u64,
        now_ms: u64,
    },
    SetNodeState {
        id: NodeId,
        state: NodeState,
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
    /// Removes `node` from the chunk's in-sync set if the set is still at `version`.
    Eject {
        volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        node: NodeId,
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
}

impl MetaState {
    pub fn new(seed: u64) -> MetaState {
        MetaState { seed, next_volume: 1, ..MetaState::default() }
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|v| v.name == name)
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
                            },
                        );
                    }
                }
                Ok(Response::Done)
            }
            Command::Heartbeat { id, reported_used, now_ms } => {
                let n = self.nodes.get_mut(id).ok_or(MetaError::UnknownNode(*id))?;
                n.reported_used = *reported_used;
                n.last_heartbeat_ms = n.last_heartbeat_ms.max(*now_ms);
                // A suspect node that speaks again is up; a down one stays down
                // until an explicit state change (its replicas are being rebuilt).
                if n.state == NodeState::Suspect {
                    n.state = NodeState::Up;
                }
                Ok(Response::Done)
            }
            Command::SetNodeState { id, state } => {
                self.nodes.get_mut(id).ok_or(MetaError::UnknownNode(*id))?.state = *state;
                Ok(Response::Done)
            }
            Command::CreateVolume { name, size, chunk_size, replicas, min_in_sync, zones } => {
                self.create_volume(name, *size, *chunk_size, *replicas, *min_in_sync, zones)
            }
            Command::GrowVolume { volume, size } => self.grow_volume(*volume, *size),
            Command::DeleteVolume { volume } => {
                let v = self.volumes.remove(volume).ok_or(MetaError::UnknownVolume(*volume))?;
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
            Command::Attach { volume, node } => {
                if !self.nodes.contains_key(node) {
                    return Err(MetaError::UnknownNode(*node));
                }
                let v = self.volumes.get_mut(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                v.epoch = Epoch(v.epoch.0 + 1);
                v.attached_to = Some(*node);
                Ok(Response::Epoch(v.epoch))
            }
            Command::Eject { volume, chunk, version, node } => {
                let v = self.volumes.get_mut(volume).ok_or(MetaError::UnknownVolume(*volume))?;
                let min = v.min_in_sync;
                let c = v
                    .chunks
                    .get_mut(chunk.0 as usize)
                    .ok_or(MetaError::UnknownChunk { volume: *volume, chunk: *chunk })?;
                if c.version != *version || !c.in_sync().any(|n| n == *node) {
                    // Someone changed the set first: the caller decides from it.
                    return Ok(Response::Chunk(c.clone()));
                }
                let remaining = c.in_sync().count() - 1;
                if remaining < min {
                    return Err(MetaError::BelowMinInSync { chunk: *chunk, node: *node, remaining, min });
                }
                for r in &mut c.replicas {
                    if r.node == *node {
                        r.role = Role::Ejected;
                    }
                }
                c.version += 1;
                Ok(Response::Chunk(c.clone()))
            }
        }
    }

    fn create_volume(
        &mut self,
        name: &str,
        size: u64,
        chunk_size: u64,
        replicas: usize,
        min_in_sync: usize,
        zones: &[Zone],
    ) -> Result<Response, MetaError> {
        validate_name(name)?;
        validate_geometry(size, chunk_size)?;
        if !(1..=placement::MAX_REPLICAS).contains(&replicas) {
            return Err(invalid("replicas", format!("{replicas} is not in 1..={}", placement::MAX_REPLICAS)));
        }
        if !(1..=replicas).contains(&min_in_sync) {
            return Err(invalid("min_in_sync", format!("{min_in_sync} is not in 1..={replicas}")));
        }
        if let Some(v) = self.volume_by_name(name) {
            let same = v.size == size
                && v.chunk_size == chunk_size
                && v.replicas == replicas
                && v.min_in_sync == min_in_sync
                && v.zones == zones;
            return if same { Ok(Response::Volume(v.id)) } else { Err(MetaError::NameTaken(name.to_string())) };
        }
        let id = VolumeId(self.next_volume);
        let chunks = self.place_chunks(id, 0, size.div_ceil(chunk_size), chunk_size, replicas, zones)?;
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
                epoch: Epoch(0),
                attached_to: None,
                chunks,
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
        let (have, want) = (v.chunks.len() as u64, size.div_ceil(v.chunk_size));
        let (chunk_size, replicas, zones) = (v.chunk_size, v.replicas, v.zones.clone());
        let added = self.place_chunks(volume, have, want, chunk_size, replicas, &zones)?;
        let v = self.volumes.get_mut(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        v.chunks.extend(added);
        v.size = size;
        Ok(Response::Volume(volume))
    }

    /// Places chunks `[from, to)` and reserves their space; all or nothing.
    fn place_chunks(
        &mut self,
        volume: VolumeId,
        from: u64,
        to: u64,
        chunk_size: u64,
        replicas: usize,
        zones: &[Zone],
    ) -> Result<Vec<ChunkEntry>, MetaError> {
        if to > u64::from(u32::MAX) {
            return Err(invalid("size", format!("{to} chunks exceed the chunk index range")));
        }
        let mut map = self.cluster_map();
        let req = Request { replicas, chunk_size, zones: zones.to_vec() };
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

    fn cluster_map(&self) -> ClusterMap {
        ClusterMap {
            seed: self.seed,
            nodes: self
                .nodes
                .values()
                .map(|n| NodeInfo {
                    id: n.id,
                    zone: n.zone.clone(),
                    capacity: n.capacity,
                    used: n.allocated,
                    state: match n.state {
                        NodeState::Up => placement::NodeState::Up,
                        NodeState::Suspect | NodeState::Cordoned => placement::NodeState::Cordoned,
                        NodeState::Draining => placement::NodeState::Draining,
                        NodeState::Down => placement::NodeState::Down,
                    },
                })
                .collect(),
        }
    }
}

fn invalid(param: &str, reason: impl Into<String>) -> MetaError {
    MetaError::InvalidArgument { param: param.to_string(), reason: reason.into() }
}

fn validate_name(name: &str) -> Result<(), MetaError> {
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
