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
//! [[state.ejected]]
//! chunk = 7
//! node = 2
//! reason = "timeout"
//! ```
//!
//! A chunk's membership version is the number of ejections recorded for it, so
//! the version needs no field of its own and cannot disagree with the list.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ballast_types::{is_block_aligned, ChunkIdx, Epoch, NodeId, VolumeId, Zone};
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
    /// Replicas removed from their chunk's in-sync set, oldest first. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ejected: Vec<Ejection>,
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
        for c in 0..chunks as u32 {
            let set = self.replica_set(ChunkIdx(c));
            if set.in_sync.len() < v.min_in_sync {
                return Err(format!("chunk {c} has {} in-sync replicas, below min-in-sync", set.in_sync.len()));
            }
        }
        Ok(())
    }

    fn placement_of(&self, chunk: ChunkIdx) -> &[NodeId] {
        self.placement.overrides.iter().find(|o| o.index == chunk).map_or(&self.placement.nodes[..], |o| &o.nodes[..])
    }

    /// The chunk's current set: its placement minus its ejections.
    pub fn replica_set(&self, chunk: ChunkIdx) -> ReplicaSet {
        let ejected: Vec<(NodeId, EjectReason)> =
            self.state.ejected.iter().filter(|e| e.chunk == chunk).map(|e| (e.node, e.reason)).collect();
        let in_sync =
            self.placement_of(chunk).iter().copied().filter(|n| !ejected.iter().any(|(e, _)| e == n)).collect();
        ReplicaSet { version: ejected.len() as u64, in_sync, ejected }
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
        Ok(Attachment { epoch: config.state.epoch, layout: config.layout() })
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
        if current.version != version || !current.contains(node) {
            // Someone changed it first; the caller decides from the current set.
            return Ok(current);
        }
        let remaining = current.in_sync.len() - 1;
        if remaining < config.volume.min_in_sync {
            return Err(MembershipError::BelowMinInSync { chunk, node, remaining, min: config.volume.min_in_sync });
        }
        let mut next = config.clone();
        next.state.ejected.push(Ejection { chunk, node, reason });
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
