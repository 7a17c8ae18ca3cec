//! The replicated state's types as the proto's messages.

use std::collections::HashMap;
use std::time::Instant;

use ballast_meta::state::{self, ChunkEntry, JobKind, JobState, MetaState, NodeState, Role};
use ballast_proto::v1 as pb;
use ballast_types::{NodeId, Seq};

pub(crate) fn node_state(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::Up => pb::NodeState::Up,
        NodeState::Suspect => pb::NodeState::Suspect,
        NodeState::Down => pb::NodeState::Down,
        NodeState::Cordoned => pb::NodeState::Cordoned,
        NodeState::Draining => pb::NodeState::Draining,
    }
}

/// The disk health a heartbeat reports. UNSPECIFIED (a node older than disk
/// probing) and unknown values are healthy: only a node that says its disk
/// failed or filled up loses its replicas or its share of new ones.
pub(crate) fn disk_health(disk: i32, error: &str) -> state::DiskHealth {
    match pb::DiskHealth::try_from(disk) {
        Ok(pb::DiskHealth::DiskFailed) => state::DiskHealth::Failed {
            reason: if error.is_empty() { "unspecified disk error".to_string() } else { error.to_string() },
        },
        Ok(pb::DiskHealth::DiskFull) => state::DiskHealth::Full,
        Ok(pb::DiskHealth::DiskOk | pb::DiskHealth::Unspecified) | Err(_) => state::DiskHealth::Ok,
    }
}

/// The proto's disk health and error text.
pub(crate) fn pb_disk_health(d: &state::DiskHealth) -> (pb::DiskHealth, String) {
    match d {
        state::DiskHealth::Ok => (pb::DiskHealth::DiskOk, String::new()),
        state::DiskHealth::Full => (pb::DiskHealth::DiskFull, String::new()),
        state::DiskHealth::Failed { reason } => (pb::DiskHealth::DiskFailed, reason.clone()),
    }
}

/// `last_seen`: when this member (if leader) last heard from each node.
/// A node state from the proto (None: unspecified or unknown).
fn node_state_from_pb(s: i32) -> Option<NodeState> {
    match pb::NodeState::try_from(s) {
        Ok(pb::NodeState::Up) => Some(NodeState::Up),
        Ok(pb::NodeState::Suspect) => Some(NodeState::Suspect),
        Ok(pb::NodeState::Down) => Some(NodeState::Down),
        Ok(pb::NodeState::Cordoned) => Some(NodeState::Cordoned),
        Ok(pb::NodeState::Draining) => Some(NodeState::Draining),
        Ok(pb::NodeState::Unspecified) | Err(_) => None,
    }
}

/// Whether replica `r` of a chunk of layout `l` (as `Admin.InspectVolume`
/// answers) is live, by the same rule the service counts with
/// ([`ballast_meta::state::replica_live`]), judged from the layout's nodes. A
/// replica whose node the layout does not list, or whose role or node state is
/// unknown to this build, is not live. For clients that show a layout
/// (`ballastctl volume inspect`).
pub fn layout_replica_live(l: &pb::VolumeLayout, r: &pb::ChunkReplica) -> bool {
    let role = match pb::ReplicaRole::try_from(r.role) {
        Ok(pb::ReplicaRole::InSync) => Role::InSync,
        Ok(pb::ReplicaRole::Rebuilding) => Role::Rebuilding,
        Ok(pb::ReplicaRole::Ejected) => Role::Ejected,
        Ok(pb::ReplicaRole::Unspecified) | Err(_) => return false,
    };
    let Some(n) = l.nodes.iter().find(|n| n.id == r.node) else { return false };
    let Some(state) = node_state_from_pb(n.state) else { return false };
    state::replica_live(role, state, &disk_health(n.disk, &n.disk_error))
}

pub(crate) fn node(n: &state::Node, settings: &state::Settings, last_seen: &HashMap<NodeId, Instant>) -> pb::Node {
    let (disk, disk_error) = pb_disk_health(&n.disk);
    pb::Node {
        id: n.id.0,
        addr: n.addr.to_string(),
        zone: n.zone.0.clone(),
        capacity_bytes: n.capacity,
        allocated_bytes: n.allocated,
        used_bytes: n.reported_used,
        state: node_state(n.state) as i32,
        heartbeat_age_ms: last_seen.get(&n.id).map_or(0, |t| t.elapsed().as_millis() as u64),
        disk: disk as i32,
        disk_error,
        provisionable_bytes: n.provisionable(settings),
        room_bytes: n.room(settings),
    }
}

pub(crate) fn chunk(index: usize, c: &ChunkEntry) -> pb::Chunk {
    pb::Chunk {
        index: index as u32,
        version: c.version,
        replicas: c
            .replicas
            .iter()
            .map(|r| pb::ChunkReplica {
                node: r.node.0,
                role: match r.role {
                    Role::InSync => pb::ReplicaRole::InSync,
                    Role::Rebuilding => pb::ReplicaRole::Rebuilding,
                    Role::Ejected => pb::ReplicaRole::Ejected,
                } as i32,
            })
            .collect(),
    }
}

/// `degraded_chunks` counts by the liveness rule (`MetaState::volume_health`).
pub(crate) fn volume(s: &MetaState, v: &state::Volume) -> pb::Volume {
    pb::Volume {
        id: v.id.0,
        name: v.name.clone(),
        size_bytes: v.size,
        chunk_size_bytes: v.chunk_size,
        replicas: v.replicas as u32,
        min_in_sync: v.min_in_sync as u32,
        zones: v.zones.iter().map(|z| z.0.clone()).collect(),
        epoch: v.epoch.0,
        attached_to: v.attached_to.map_or(0, |n| n.0),
        attached_to_fill: v.attached_to.is_some() && v.attached_to_fill,
        layout_gen: v.layout_gen,
        degraded_chunks: s.volume_health(v).degraded as u32,
        zone_spread: zone_spread(v.zone_spread) as i32,
        published_node: v.published_to.map_or(0, |n| n.0),
        origin: v.origin.as_ref().map(|o| pb::CloneOrigin {
            snapshot: o.snapshot,
            snapshot_name: o.snapshot_name.clone(),
            source_volume: o.source.0,
            from_volume: o.from_volume,
            source_volume_name: s.volumes.get(&o.source).map(|x| x.name.clone()).unwrap_or_default(),
        }),
        unfilled_chunks: v.unfilled.len() as u32,
    }
}

pub(crate) fn zone_spread(z: state::ZoneSpread) -> pb::ZoneSpread {
    match z {
        state::ZoneSpread::Preferred => pb::ZoneSpread::Preferred,
        state::ZoneSpread::Required => pb::ZoneSpread::Required,
    }
}

pub(crate) fn layout(s: &MetaState, v: &state::Volume, last_seen: &HashMap<NodeId, Instant>) -> pb::VolumeLayout {
    let mut ids: Vec<NodeId> = v.chunks.iter().flat_map(|c| c.replicas.iter().map(|r| r.node)).collect();
    ids.sort();
    ids.dedup();
    pb::VolumeLayout {
        volume: Some(volume(s, v)),
        chunks: v.chunks.iter().enumerate().map(|(i, c)| chunk(i, c)).collect(),
        nodes: ids.iter().filter_map(|id| s.nodes.get(id)).map(|n| node(n, &s.settings, last_seen)).collect(),
        snapshots: s.volume_snapshots(v.id).map(|x| snapshot(s, x)).collect(),
        unfilled: v.unfilled.clone(),
        snapshot_layers: 0,
        snapshot_bytes: 0,
    }
}

pub(crate) fn seq(q: Seq) -> pb::Seq {
    pb::Seq { epoch: q.epoch.0, counter: q.counter }
}

pub(crate) fn snapshot(s: &MetaState, x: &state::Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        id: x.id,
        name: x.name.clone(),
        volume: x.volume.0,
        volume_name: s.volumes.get(&x.volume).map(|v| v.name.clone()).unwrap_or_default(),
        size_bytes: x.size,
        created_ms: x.created_ms,
        ready: x.cut.is_some(),
        cut: x.cut.map(seq),
        for_clone: x.for_clone.map_or(0, |c| c.0),
    }
}

/// Progress a running job reported to this member (the leader).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Progress {
    pub running: bool,
    pub bytes_done: u64,
    pub blocks_copied: u64,
    pub attempts: u32,
}

pub(crate) fn job(s: &MetaState, j: &state::Job, p: Progress, last_seen: &HashMap<NodeId, Instant>) -> pb::Job {
    let v = s.volumes.get(&j.volume);
    let c = v.and_then(|v| v.chunks.get(j.chunk.0 as usize));
    let sources = c
        .map(|c| {
            // A replica on a failed disk is lost: never a source.
            c.in_sync()
                .filter(|n| *n != j.target)
                .filter_map(|n| s.nodes.get(&n))
                .filter(|n| !n.disk.is_failed())
                .map(|n| node(n, &s.settings, last_seen))
                .collect()
        })
        .unwrap_or_default();
    let chunk_len = v.map_or(0, |v| v.chunk_size.min(v.size.saturating_sub(u64::from(j.chunk.0) * v.chunk_size)));
    let state = match j.state {
        JobState::Active if p.running => pb::JobState::Running,
        JobState::Active => pb::JobState::Pending,
        JobState::Done => pb::JobState::Done,
        JobState::Failed => pb::JobState::Failed,
    };
    pb::Job {
        id: j.id,
        kind: match j.kind {
            JobKind::Rebuild => pb::JobKind::Rebuild,
            JobKind::Resync => pb::JobKind::Resync,
        } as i32,
        volume: j.volume.0,
        chunk: j.chunk.0,
        target: j.target.0,
        sources,
        replaces: j.replaces.map_or(0, |n| n.0),
        state: state as i32,
        chunk_len,
        bytes_done: if j.state == JobState::Done { chunk_len } else { p.bytes_done },
        blocks_copied: if j.is_active() { p.blocks_copied } else { j.blocks_copied },
        epoch: v.map_or(0, |v| v.epoch.0),
        error: j.error.clone().unwrap_or_default(),
        attempts: p.attempts,
    }
}
