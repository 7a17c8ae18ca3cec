//! [`StaticMembership`]: a [`Membership`] provider backed by one TOML file, for
//! `ballast dev`, tests and single-front-end deployments without a metadata
//! service.
//!
//! The file holds the configuration (nodes, the volume, placement) and the
//! persisted state (epoch, ejections). Every state change rewrites the whole
//! file crash-safely (temporary file, fsync, rename, fsync of the directory)
//! BEFORE the call returns, so an attach's epoch and an ejection are durable
//! before the front end acts on them.
//!
//! ```toml
//! [volume]
//! id = 1
//! name = "pg-data"
//! size = 1073741824          # bytes, a multiple of 4096; the last chunk may be partial
//! chunk-size = 67108864      # bytes, a multiple of 4096
//! min-in-sync = 2
//!
//! [[node]]
//! id = 1
//! zone = "z1"
//! addr = "127.0.0.1:7001"
//! # ... more [[node]] tables
//!
//! [placement]
//! nodes = [1, 2, 3]          # every chunk on these nodes ...
//! [[placement.chunk]]        # ... unless overridden per chunk
//! index = 7
//! nodes = [1, 2]
//!
//! [state]                    # written by the provider; absent in a fresh config
//! epoch = 4
//! [[state.ejected]]          # ejections, oldest first
//! chunk = 7
//! node = 2
//! reason = "timeout"
//! [[state.change]]           # changes after the first rebuild, oldest first
//! op = "rebuild"             # node 2 is added back to chunk 7 as rebuilding
//! chunk = 7
//! node = 2
//! [[state.change]]
//! op = "promote"             # ... and, caught up, is in sync again
//! chunk = 7
//! node = 2
//! ```
//!
//! The state is one ordered log of membership changes per chunk, applied to the
//! placement: first `ejected`, then `change`. While no rebuild was ever
//! recorded, ejections are appended to `ejected` (the file keeps the format of
//! files written before rebuilds existed, which therefore still load); from the
//! first rebuild on, every change (ejections too) is appended to `change`. A
//! chunk's membership version is the number of entries recorded for it, so the
//! version needs no field of its own and cannot disagree with the log.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ballast_types::{is_block_aligned, ChunkIdx, Epoch, NodeId, Seq, VolumeId, Zone};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::info;

use crate::membership::{Attachment, EjectReason, Membership, MembershipError, Replica, ReplicaSet, VolumeLayout};

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StaticConfig {
    pub volume: VolumeSpec,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeSpec>,
    pub placement: PlacementSpec,
    /// Written by the provider. Default: epoch 0, nothing ejected.
    #[serde(default)]
    pub state: PersistedState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VolumeSpec {
    pub id: VolumeId,
    pub name: String,
    /// Bytes; a multiple of 4096.
    pub size: u64,
    /// Bytes; a multiple of 4096. Default: 64 MiB.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u64,
    /// At least 1 and at most the replicas of every chunk. Default: 1.
    #[serde(default = "default_min_in_sync")]
    pub min_in_sync: usize,
}

fn default_chunk_size() -> u64 {
    ballast_types::DEFAULT_CHUNK_SIZE
}
fn default_min_in_sync() -> usize {
    1
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeSpec {
    pub id: NodeId,
    pub zone: Zone,
    pub addr: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PlacementSpec {
    /// The nodes of every chunk without an override.
    pub nodes: Vec<NodeId>,
    /// Per-chunk overrides. Default: none.
    #[serde(default, rename = "chunk", skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<ChunkPlacement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ChunkPlacement {
    pub index: ChunkIdx,
    pub nodes: Vec<NodeId>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PersistedState {
    /// The last epoch handed out by an attach. Default: 0 (never attached).
    #[serde(default)]
    pub epoch: Epoch,
    /// Replicas removed from their chunk's set, oldest first; see the module
    /// docs for when ejections go here. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ejected: Vec<Ejection>,
    /// Every change from the first rebuild on, oldest first, applied after
    /// `ejected`. Default: none (files written before rebuilds existed).
    #[serde(default, rename = "change", skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// The volume's snapshot cuts, ascending. Default: none.
    #[serde(default, rename = "snapshot", skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<Seq>,
}

/// One recorded membership change of a chunk. Persisted (`op` names the
/// variant, kebab-case), so variants are only ever added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Change {
    /// Removed from the in-sync or rebuilding set.
    Eject { chunk: ChunkIdx, node: NodeId, reason: EjectReason },
    /// Added as rebuilding (a resync of an ejected replica, or a new one).
    Rebuild { chunk: ChunkIdx, node: NodeId },
    /// Moved from rebuilding to in sync.
    Promote { chunk: ChunkIdx, node: NodeId },
}

impl Change {
    pub fn chunk(&self) -> ChunkIdx {
        match self {
            Change::Eject { chunk, .. } | Change::Rebuild { chunk, .. } | Change::Promote { chunk, .. } => *chunk,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Ejection {
    pub chunk: ChunkIdx,
    pub node: NodeId,
    pub reason: EjectReason,
}

impl StaticConfig {
    /// A config with every chunk on `placement`, nothing persisted yet.
    pub fn new(volume: VolumeSpec, nodes: Vec<NodeSpec>, placement: Vec<NodeId>) -> Self {
        StaticConfig {
            volume,
            nodes,
            placement: PlacementSpec { nodes: placement, overrides: Vec::new() },
            state: PersistedState::default(),
        }
    }

    /// Checks the relations between fields. Decisions: the size need not be a
    /// multiple of the chunk size (the last chunk is then partial), but both
    /// are whole blocks.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.volume;
        if v.size == 0 || !is_block_aligned(v.size) {
            return Err(format!("volume size {} must be a positive multiple of 4096", v.size));
        }
        if v.chunk_size == 0 || !is_block_aligned(v.chunk_size) {
            return Err(format!("chunk-size {} must be a positive multiple of 4096", v.chunk_size));
        }
        let chunks = v.size.div_ceil(v.chunk_size);
        if chunks > u64::from(u32::MAX) {
            return Err(format!("{chunks} chunks exceed the chunk index range"));
        }
        if v.min_in_sync == 0 {
            return Err("min-in-sync must be at least 1".into());
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if self.nodes[..i].iter().any(|m| m.id == n.id) {
                return Err(format!("node {} is listed twice", n.id));
            }
            if self.nodes[..i].iter().any(|m| m.addr == n.addr) {
                return Err(format!("nodes share the address {}", n.addr));
            }
        }
        let check_set = |what: &str, set: &[NodeId]| -> Result<(), String> {
            for (i, id) in set.iter().enumerate() {
                if !self.nodes.iter().any(|n| n.id == *id) {
                    return Err(format!("{what}: unknown node {id}"));
                }
                if set[..i].contains(id) {
                    return Err(format!("{what}: node {id} listed twice"));
                }
            }
            if set.len() < v.min_in_sync {
                return Err(format!("{what}: {} replicas, fewer than min-in-sync {}", set.len(), v.min_in_sync));
            }
            Ok(())
        };
        check_set("placement", &self.placement.nodes)?;
        for (i, o) in self.placement.overrides.iter().enumerate() {
            if u64::from(o.index.0) >= chunks {
                return Err(format!("placement override for chunk {} beyond {chunks} chunks", o.index));
            }
            if self.placement.overrides[..i].iter().any(|p| p.index == o.index) {
                return Err(format!("chunk {} overridden twice", o.index));
            }
            check_set(&format!("chunk {}", o.index), &o.nodes)?;
        }
        for e in &self.state.ejected {
            if u64::from(e.chunk.0) >= chunks {
                return Err(format!("ejection recorded for chunk {} beyond {chunks} chunks", e.chunk));
            }
        }
        for c in &self.state.changes {
            if u64::from(c.chunk().0) >= chunks {
                return Err(format!("change recorded for chunk {} beyond {chunks} chunks", c.chunk()));
            }
        }
        for c in 0..chunks as u32 {
            let (set, problems) = self.replay(ChunkIdx(c));
            if let Some(p) = problems.first() {
                return Err(format!("chunk {c}: {p}"));
            }
            if set.in_sync.len() < v.min_in_sync {
                return Err(format!("chunk {c} has {} in-sync replicas, below min-in-sync", set.in_sync.len()));
            }
        }
        Ok(())
    }

    fn placement_of(&self, chunk: ChunkIdx) -> &[NodeId] {
        self.placement.overrides.iter().find(|o| o.index == chunk).map_or(&self.placement.nodes[..], |o| &o.nodes[..])
    }

    /// The chunk's current set: its placement with its recorded changes applied.
    pub fn replica_set(&self, chunk: ChunkIdx) -> ReplicaSet {
        self.replay(chunk).0
    }

    /// Applies the chunk's log to its placement. Entries of `change` that do not
    /// fit the set they apply to are skipped and reported (`validate` refuses
    /// them); legacy ejections of non-members are no-ops, as they always were.
    fn replay(&self, chunk: ChunkIdx) -> (ReplicaSet, Vec<String>) {
        let mut set = ReplicaSet {
            version: 0,
            in_sync: self.placement_of(chunk).to_vec(),
            rebuilding: Vec::new(),
            ejected: Vec::new(),
        };
        let mut problems = Vec::new();
        for e in self.state.ejected.iter().filter(|e| e.chunk == chunk) {
            set.in_sync.retain(|n| *n != e.node);
            set.ejected.push((e.node, e.reason));
            set.version += 1;
        }
        for c in self.state.changes.iter().filter(|c| c.chunk() == chunk) {
            set.version += 1;
            match *c {
                Change::Eject { node, reason, .. } if set.is_member(node) => {
                    set.in_sync.retain(|n| *n != node);
                    set.rebuilding.retain(|n| *n != node);
                    set.ejected.push((node, reason));
                }
                Change::Rebuild { node, .. } if !set.is_member(node) && self.nodes.iter().any(|n| n.id == node) => {
                    set.ejected.retain(|(n, _)| *n != node);
                    set.rebuilding.push(node);
                }
                Change::Promote { node, .. } if set.is_rebuilding(node) => {
                    set.rebuilding.retain(|n| *n != node);
                    set.in_sync.push(node);
                }
                ref other => problems.push(format!("{other:?} does not apply to {:?}", set)),
            }
        }
        (set, problems)
    }

    /// Records a change of `chunk` (see the module docs for where ejections go).
    fn record(&mut self, change: Change) {
        match change {
            Change::Eject { chunk, node, reason } if self.state.changes.is_empty() => {
                self.state.ejected.push(Ejection { chunk, node, reason })
            }
            c => self.state.changes.push(c),
        }
    }

    pub fn layout(&self) -> VolumeLayout {
        let v = &self.volume;
        let chunks = v.size.div_ceil(v.chunk_size) as u32;
        VolumeLayout {
            volume: v.id,
            name: v.name.clone(),
            size: v.size,
            chunk_size: v.chunk_size,
            min_in_sync: v.min_in_sync,
            nodes: self.nodes.iter().map(|n| Replica { node: n.id, addr: n.addr, zone: n.zone.clone() }).collect(),
            chunks: (0..chunks).map(|c| self.replica_set(ChunkIdx(c))).collect(),
        }
    }
}

/// The file-backed membership provider. One volume per file.
pub struct StaticMembership {
    path: PathBuf,
    // A tokio mutex: held across the blocking write so state changes are
    // persisted in the order they are decided.
    config: Mutex<StaticConfig>,
}

impl StaticMembership {
    /// Writes a new config file (refusing to overwrite an existing one, which
    /// would lose its epoch and ejections) and opens it.
    pub fn create(path: impl Into<PathBuf>, config: StaticConfig) -> Result<Self, MembershipError> {
        let path = path.into();
        config.validate().map_err(|message| config_err(&path, message))?;
        if path.exists() {
            return Err(config_err(&path, "already exists; refusing to overwrite its state".into()));
        }
        persist(&path, &config)?;
        info!(path = %path.display(), volume = %config.volume.id, "membership config created");
        Ok(StaticMembership { path, config: Mutex::new(config) })
    }

    /// Opens an existing config file.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, MembershipError> {
        let path = path.into();
        let text = std::fs::read_to_string(&path).map_err(|source| MembershipError::Io {
            op: "read",
            path: path.display().to_string(),
            source,
        })?;
        let config: StaticConfig = toml::from_str(&text).map_err(|e| config_err(&path, e.to_string()))?;
        config.validate().map_err(|message| config_err(&path, message))?;
        Ok(StaticMembership { path, config: Mutex::new(config) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A snapshot of the config and state.
    pub async fn config(&self) -> StaticConfig {
        self.config.lock().await.clone()
    }

    /// The current layout (what an attach would return, without bumping the epoch).
    pub async fn layout(&self) -> VolumeLayout {
        self.config.lock().await.layout()
    }

    /// Adds a node the volume may place replicas on, durably.
    pub async fn add_node(&self, node: NodeSpec) -> Result<(), MembershipError> {
        let mut config = self.config.lock().await;
        let mut next = config.clone();
        next.nodes.push(node.clone());
        next.validate().map_err(|m| config_err(&self.path, m))?;
        persist_async(&self.path, &next).await?;
        *config = next;
        info!(path = %self.path.display(), node = %node.id, addr = %node.addr, "node added");
        Ok(())
    }

    /// Adds `node` to `chunk` as a rebuilding replica (docs/DESIGN.md, 5.3
    /// "Copy jobs"), durably; returns the new set. The node must be known
    /// and not already a member (an ejected one may come back: a resync).
    pub async fn add_rebuilding(&self, chunk: ChunkIdx, node: NodeId) -> Result<ReplicaSet, MembershipError> {
        self.change(Change::Rebuild { chunk, node }).await
    }

    /// Moves `node` from `chunk`'s rebuilding set to its in-sync set, durably;
    /// returns the new set. The caller vouches that the copy has caught up.
    pub async fn promote(&self, chunk: ChunkIdx, node: NodeId) -> Result<ReplicaSet, MembershipError> {
        self.change(Change::Promote { chunk, node }).await
    }

    async fn change(&self, change: Change) -> Result<ReplicaSet, MembershipError> {
        let mut config = self.config.lock().await;
        let chunk = change.chunk();
        let mut next = config.clone();
        next.record(change.clone());
        // validate() replays every chunk's log: refuses a change that does not
        // fit the current set (unknown node, already a member, not rebuilding).
        next.validate().map_err(|m| config_err(&self.path, m))?;
        persist_async(&self.path, &next).await?;
        *config = next;
        let set = config.replica_set(chunk);
        info!(volume = %config.volume.id, chunk = chunk.0, ?change, version = set.version, "replica set changed (persisted)");
        Ok(set)
    }
}

impl StaticMembership {
    /// Records new addresses for known nodes (a node that restarted on another
    /// port), durably, before any attach uses them. Unknown node ids are an error:
    /// membership changes are not made through this door.
    pub async fn set_node_addrs(&self, addrs: Vec<(NodeId, SocketAddr)>) -> Result<(), MembershipError> {
        let mut config = self.config.lock().await;
        let mut next = config.clone();
        for (id, addr) in addrs {
            let node = next
                .nodes
                .iter_mut()
                .find(|n| n.id == id)
                .ok_or_else(|| config_err(&self.path, format!("no node {id} in the volume file")))?;
            node.addr = addr;
        }
        if next != *config {
            persist_async(&self.path, &next).await?;
            info!(path = %self.path.display(), "node addresses updated");
            *config = next;
        }
        Ok(())
    }
}

fn config_err(path: &Path, message: String) -> MembershipError {
    MembershipError::Config { path: path.display().to_string(), message }
}

/// Crash-safe replacement: temporary file, fsync, rename over, fsync the
/// directory. After a crash the file is either the old or the new version.
fn persist(path: &Path, config: &StaticConfig) -> Result<(), MembershipError> {
    let io = |op: &'static str, p: &Path| {
        let p = p.display().to_string();
        move |source| MembershipError::Io { op, path: p, source }
    };
    let text = toml::to_string(config).map_err(|e| config_err(path, e.to_string()))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io("fsync dir", &dir))?;
    Ok(())
}

async fn persist_async(path: &Path, config: &StaticConfig) -> Result<(), MembershipError> {
    let (p, c) = (path.to_path_buf(), config.clone());
    tokio::task::spawn_blocking(move || persist(&p, &c))
        .await
        .map_err(|e| MembershipError::Unavailable(format!("persist task failed: {e}")))?
}

impl Membership for StaticMembership {
    async fn attach(&self, volume: VolumeId) -> Result<Attachment, MembershipError> {
        let mut config = self.config.lock().await;
        if config.volume.id != volume {
            return Err(MembershipError::UnknownVolume(volume));
        }
        let mut next = config.clone();
        next.state.epoch = Epoch(config.state.epoch.0 + 1);
        // Durable before anyone can act on the new epoch.
        persist_async(&self.path, &next).await?;
        *config = next;
        info!(volume = %volume, epoch = %config.state.epoch, "volume attached: epoch bumped");
        Ok(Attachment {
            epoch: config.state.epoch,
            layout: config.layout(),
            snapshots: config.state.snapshots.clone(),
            unfilled: Vec::new(),
        })
    }

    async fn set_snapshots(&self, volume: VolumeId, epoch: Epoch, cuts: Vec<Seq>) -> Result<(), MembershipError> {
        let mut config = self.config.lock().await;
        if config.volume.id != volume {
            return Err(MembershipError::UnknownVolume(volume));
        }
        if config.state.epoch != epoch {
            return Err(MembershipError::Refused(format!(
                "volume {volume} is attached at epoch {}, not {epoch}",
                config.state.epoch
            )));
        }
        if cuts.windows(2).any(|w| w[0] >= w[1]) {
            return Err(MembershipError::Refused("snapshot cuts must be ascending and distinct".into()));
        }
        let mut next = config.clone();
        next.state.snapshots = cuts;
        persist_async(&self.path, &next).await?;
        *config = next;
        info!(volume = %volume, snapshots = config.state.snapshots.len(), "snapshot cuts recorded (persisted)");
        Ok(())
    }

    async fn eject(
        &self,
        volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        node: NodeId,
        reason: EjectReason,
    ) -> Result<ReplicaSet, MembershipError> {
        let mut config = self.config.lock().await;
        if config.volume.id != volume {
            return Err(MembershipError::UnknownVolume(volume));
        }
        if u64::from(chunk.0) >= config.volume.size.div_ceil(config.volume.chunk_size) {
            return Err(MembershipError::UnknownChunk { volume, chunk });
        }
        let current = config.replica_set(chunk);
        if current.version != version || !current.is_member(node) {
            // Someone changed it first; the caller decides from the current set.
            return Ok(current);
        }
        // A rebuilding replica leaves without a min-in-sync check.
        let remaining = current.in_sync.len() - 1;
        if current.contains(node) && remaining < config.volume.min_in_sync {
            return Err(MembershipError::BelowMinInSync { chunk, node, remaining, min: config.volume.min_in_sync });
        }
        let mut next = config.clone();
        next.record(Change::Eject { chunk, node, reason });
        persist_async(&self.path, &next).await?;
        *config = next;
        info!(volume = %volume, chunk = chunk.0, node = %node, %reason, "replica ejected (persisted)");
        Ok(config.replica_set(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StaticConfig {
        let nodes = (1..=3)
            .map(|i| NodeSpec {
                id: NodeId(i),
                zone: Zone(format!("z{i}")),
                addr: format!("127.0.0.1:{}", 7000 + i).parse().unwrap(),
            })
            .collect();
        let mut c = StaticConfig::new(
            VolumeSpec { id: VolumeId(9), name: "v".into(), size: 10 << 20, chunk_size: 4 << 20, min_in_sync: 2 },
            nodes,
            vec![NodeId(1), NodeId(2), NodeId(3)],
        );
        c.placement.overrides.push(ChunkPlacement { index: ChunkIdx(2), nodes: vec![NodeId(1), NodeId(3)] });
        c
    }

    #[test]
    fn layout_has_partial_last_chunk_and_overrides() {
        let l = sample().layout();
        assert_eq!(l.chunks.len(), 3);
        assert_eq!(l.chunk_len(ChunkIdx(2)), 2 << 20);
        assert_eq!(l.chunks[2].in_sync, vec![NodeId(1), NodeId(3)]);
        assert_eq!(l.chunks[0].in_sync, vec![NodeId(1), NodeId(2), NodeId(3)]);
    }

    #[test]
    fn validate_rejects_bad_relations() {
        let mut c = sample();
        c.volume.min_in_sync = 4;
        assert!(c.validate().unwrap_err().contains("min-in-sync"));
        let mut c = sample();
        c.nodes[1].id = NodeId(1);
        assert!(c.validate().unwrap_err().contains("twice"));
        let mut c = sample();
        c.placement.nodes = vec![NodeId(1), NodeId(1), NodeId(2)];
        assert!(c.validate().is_err());
        let mut c = sample();
        c.placement.nodes.push(NodeId(7));
        assert!(c.validate().unwrap_err().contains("unknown node"));
        let mut c = sample();
        c.volume.size = 4097;
        assert!(c.validate().is_err());
        assert!(sample().validate().is_ok());
    }

    #[test]
    fn config_text_golden() {
        let mut c = sample();
        c.state.epoch = Epoch(3);
        c.state.ejected.push(Ejection { chunk: ChunkIdx(0), node: NodeId(2), reason: EjectReason::Timeout });
        let text = toml::to_string(&c).unwrap();
        let expected = r#"[volume]
id = 9
name = "v"
size = 10485760
chunk-size = 4194304
min-in-sync = 2

[[node]]
id = 1
zone = "z1"
addr = "127.0.0.1:7001"

[[node]]
id = 2
zone = "z2"
addr = "127.0.0.1:7002"

[[node]]
id = 3
zone = "z3"
addr = "127.0.0.1:7003"

[placement]
nodes = [1, 2, 3]

[[placement.chunk]]
index = 2
nodes = [1, 3]

[state]
epoch = 3

[[state.ejected]]
chunk = 0
node = 2
reason = "timeout"
"#;
        assert_eq!(text, expected);
        let back: StaticConfig = toml::from_str(expected).unwrap();
        assert_eq!(back, c);
        assert!(toml::from_str::<StaticConfig>(&expected.replace("min-in-sync", "min-insync")).is_err());
    }

    #[test]
    fn config_text_golden_with_rebuilds() {
        let mut c = sample();
        c.state.epoch = Epoch(5);
        // Before the first rebuild, ejections keep the original format ...
        c.record(Change::Eject { chunk: ChunkIdx(0), node: NodeId(2), reason: EjectReason::Timeout });
        c.record(Change::Rebuild { chunk: ChunkIdx(0), node: NodeId(2) });
        // ... and from then on go to the change log, in order.
        c.record(Change::Eject { chunk: ChunkIdx(1), node: NodeId(3), reason: EjectReason::Transport });
        c.record(Change::Promote { chunk: ChunkIdx(0), node: NodeId(2) });
        let text = toml::to_string(&c).unwrap();
        let expected = r#"[volume]
id = 9
name = "v"
size = 10485760
chunk-size = 4194304
min-in-sync = 2

[[node]]
id = 1
zone = "z1"
addr = "127.0.0.1:7001"

[[node]]
id = 2
zone = "z2"
addr = "127.0.0.1:7002"

[[node]]
id = 3
zone = "z3"
addr = "127.0.0.1:7003"

[placement]
nodes = [1, 2, 3]

[[placement.chunk]]
index = 2
nodes = [1, 3]

[state]
epoch = 5

[[state.ejected]]
chunk = 0
node = 2
reason = "timeout"

[[state.change]]
op = "rebuild"
chunk = 0
node = 2

[[state.change]]
op = "eject"
chunk = 1
node = 3
reason = "transport"

[[state.change]]
op = "promote"
chunk = 0
node = 2
"#;
        assert_eq!(text, expected);
        let back: StaticConfig = toml::from_str(expected).unwrap();
        assert_eq!(back, c);
        assert!(back.validate().is_ok());
        let set0 = back.replica_set(ChunkIdx(0));
        assert_eq!(
            set0,
            ReplicaSet {
                version: 3,
                in_sync: vec![NodeId(1), NodeId(3), NodeId(2)],
                rebuilding: vec![],
                ejected: vec![]
            }
        );
        let set1 = back.replica_set(ChunkIdx(1));
        assert_eq!((set1.version, set1.in_sync), (1, vec![NodeId(1), NodeId(2)]));
        assert!(toml::from_str::<StaticConfig>(&expected.replace("\"promote\"", "\"demote\"")).is_err());
        // A log entry that does not fit the set it applies to is refused.
        let bad = expected.replace("op = \"promote\"\nchunk = 0", "op = \"promote\"\nchunk = 1");
        let bad: StaticConfig = toml::from_str(&bad).unwrap();
        assert!(bad.validate().unwrap_err().contains("chunk 1"));
    }

    #[tokio::test]
    async fn a_file_without_the_change_log_still_loads() {
        // Written before rebuilds existed: no `[[state.change]]`.
        let old = r#"[volume]
id = 9
name = "v"
size = 8388608
chunk-size = 4194304
min-in-sync = 1

[[node]]
id = 1
zone = "z1"
addr = "127.0.0.1:7001"

[[node]]
id = 2
zone = "z2"
addr = "127.0.0.1:7002"

[placement]
nodes = [1, 2]

[state]
epoch = 2

[[state.ejected]]
chunk = 1
node = 1
reason = "transport"
"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.toml");
        std::fs::write(&path, old).unwrap();
        let m = StaticMembership::load(&path).unwrap();
        let l = m.layout().await;
        assert_eq!(
            l.chunks[0],
            ReplicaSet { version: 0, in_sync: vec![NodeId(1), NodeId(2)], rebuilding: vec![], ejected: vec![] }
        );
        assert_eq!(
            l.chunks[1],
            ReplicaSet {
                version: 1,
                in_sync: vec![NodeId(2)],
                rebuilding: vec![],
                ejected: vec![(NodeId(1), EjectReason::Transport)]
            }
        );
        // An ejection keeps the old format (no rebuild recorded yet) ...
        m.eject(VolumeId(9), ChunkIdx(0), 0, NodeId(2), EjectReason::Timeout).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(old), "appended only:\n{text}");
        assert!(!text.contains("[[state.change]]"));
        // ... and the resync of node 1 starts the change log.
        let set = m.add_rebuilding(ChunkIdx(1), NodeId(1)).await.unwrap();
        assert_eq!((set.version, &set.in_sync, &set.rebuilding), (2, &vec![NodeId(2)], &vec![NodeId(1)]));
        assert!(set.ejected.is_empty(), "a replica being resynced is no longer listed as ejected");
        let reloaded = StaticMembership::load(&path).unwrap().layout().await;
        assert_eq!(reloaded.chunks[1], set);
    }

    #[tokio::test]
    async fn rebuild_promote_and_eject_of_a_rebuilding_replica_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.toml");
        let m = StaticMembership::create(&path, sample()).unwrap();
        let (v, c) = (VolumeId(9), ChunkIdx(2)); // chunk 2 is on nodes 1 and 3
        let new_node = NodeSpec { id: NodeId(4), zone: Zone("z4".into()), addr: "127.0.0.1:7004".parse().unwrap() };
        assert!(m.add_rebuilding(c, NodeId(4)).await.is_err(), "unknown node");
        m.add_node(new_node.clone()).await.unwrap();
        assert!(m.add_node(new_node).await.is_err(), "listed twice");
        assert!(m.add_rebuilding(c, NodeId(3)).await.is_err(), "already in sync");
        assert!(m.promote(c, NodeId(2)).await.is_err(), "not rebuilding");
        let set = m.add_rebuilding(c, NodeId(4)).await.unwrap();
        assert_eq!((set.version, set.rebuilding.clone()), (1, vec![NodeId(4)]));
        // A rebuilding replica is ejected without a min-in-sync check (two in
        // sync, min 2), and may come back.
        let set = m.eject(v, c, 1, NodeId(4), EjectReason::Timeout).await.unwrap();
        assert_eq!((set.version, set.in_sync.len(), set.rebuilding.len()), (2, 2, 0));
        assert_eq!(set.ejected, vec![(NodeId(4), EjectReason::Timeout)]);
        m.add_rebuilding(c, NodeId(4)).await.unwrap();
        let set = m.promote(c, NodeId(4)).await.unwrap();
        assert_eq!((set.version, set.in_sync.clone()), (4, vec![NodeId(1), NodeId(3), NodeId(4)]));
        // Now in sync: min-in-sync applies again (3 in sync, min 2).
        m.eject(v, c, 4, NodeId(1), EjectReason::Transport).await.unwrap();
        assert!(matches!(
            m.eject(v, c, 5, NodeId(3), EjectReason::Transport).await,
            Err(MembershipError::BelowMinInSync { .. })
        ));
        drop(m);
        let l = StaticMembership::load(&path).unwrap().layout().await;
        assert_eq!(
            l.chunks[2],
            ReplicaSet {
                version: 5,
                in_sync: vec![NodeId(3), NodeId(4)],
                rebuilding: vec![],
                ejected: vec![(NodeId(1), EjectReason::Transport)]
            }
        );
        assert_eq!(l.node(NodeId(4)).map(|r| r.addr.port()), Some(7004));
        assert_eq!(l.chunks[0].version, 0, "other chunks untouched");
    }

    #[tokio::test]
    async fn persists_epoch_and_ejections_across_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.toml");
        let m = StaticMembership::create(&path, sample()).unwrap();
        assert!(StaticMembership::create(&path, sample()).is_err(), "create must not clobber");
        assert_eq!(m.attach(VolumeId(9)).await.unwrap().epoch, Epoch(1));
        let a = m.attach(VolumeId(9)).await.unwrap();
        assert_eq!(a.epoch, Epoch(2));
        let set = m.eject(VolumeId(9), ChunkIdx(0), 0, NodeId(2), EjectReason::Timeout).await.unwrap();
        assert_eq!(set.in_sync, vec![NodeId(1), NodeId(3)]);
        assert_eq!(set.version, 1);
        // Stale version: no change, current set returned.
        let again = m.eject(VolumeId(9), ChunkIdx(0), 0, NodeId(3), EjectReason::Timeout).await.unwrap();
        assert_eq!(again, set);
        // Below min-in-sync: refused.
        assert!(matches!(
            m.eject(VolumeId(9), ChunkIdx(0), 1, NodeId(3), EjectReason::Timeout).await,
            Err(MembershipError::BelowMinInSync { .. })
        ));
        assert!(matches!(m.attach(VolumeId(8)).await, Err(MembershipError::UnknownVolume(_))));
        drop(m);

        let m = StaticMembership::load(&path).unwrap();
        let a = m.attach(VolumeId(9)).await.unwrap();
        assert_eq!(a.epoch, Epoch(3));
        assert_eq!(a.layout.chunks[0].in_sync, vec![NodeId(1), NodeId(3)]);
        assert_eq!(a.layout.chunks[0].ejected, vec![(NodeId(2), EjectReason::Timeout)]);
        assert_eq!(a.layout.chunks[1].in_sync.len(), 3);
        assert!(!dir.path().join("vol.toml.tmp").exists());
    }
}
