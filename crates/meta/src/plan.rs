//! Decisions the leader takes from the state, as pure functions: which copy jobs
//! to start (the rebuild scheduler) and what a node or zone failure would do to
//! each volume (`ballastctl what-if`). The leader turns their output into
//! commands; `apply` re-checks everything, so a plan computed on a state that
//! moved on is refused, never misapplied.

use std::collections::BTreeMap;

use ballast_placement::{self as placement, ChunkKey, Request};
use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};

use crate::state::{
    ChunkEntry, ChunkHealth, Command, DiskHealth, JobKind, MetaState, NodeState, Role, Volume, VolumeSpec,
};

/// Limits of the rebuild scheduler: copies compete with client I/O, so only so
/// many run at once, in total and per target node. Spreading them over many
/// targets (and, through the sources, many nodes) is what makes the rebuild
/// declustered.
#[derive(Clone, Copy, Debug)]
pub struct JobLimits {
    pub max_active: usize,
    pub max_per_target: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits { max_active: 16, max_per_target: 4 }
    }
}

/// The jobs to start now, as `StartJob` commands, in a deterministic order.
///
/// Per chunk without an active job, first match wins:
/// 1. an ejected replica on an up node whose disk is healthy: resync it in
///    place (only differing blocks are copied);
/// 2. a replica on a down or draining node, on a failed disk (its data is
///    lost, whatever the node's state), or gone from the map; or an ejected one
///    on a cordoned node or a full disk (it cannot be resynced where it is):
///    rebuild onto a new node chosen by [`placement::replace`] (the zone rule,
///    weighted by free space; the other replicas stay), which then replaces it.
///
/// No job ever targets a node that is not up or whose disk is failed or full:
/// placement sees such a node as down or cordoned (`MetaState::cluster_map`),
/// and rule 1 requires a healthy disk.
///
/// A chunk needs at least one in-sync replica to copy from, not on a failed disk.
pub fn plan_jobs(state: &MetaState, limits: JobLimits) -> Vec<Command> {
    let mut active = state.jobs.values().filter(|j| j.is_active()).count();
    let mut per_target: BTreeMap<NodeId, usize> = BTreeMap::new();
    for j in state.jobs.values().filter(|j| j.is_active()) {
        *per_target.entry(j.target).or_default() += 1;
    }
    let node = |n: NodeId| state.nodes.get(&n);
    let mut map = None;
    let mut out = Vec::new();
    for v in state.volumes.values() {
        for (i, c) in v.chunks.iter().enumerate() {
            if active >= limits.max_active {
                return out;
            }
            let chunk = ChunkIdx(i as u32);
            // A replica on a failed disk is no source: it is lost.
            let source = c.in_sync().any(|n| node(n).is_none_or(|n| !n.disk.is_failed()));
            if !source || state.active_job(v.id, chunk).is_some() {
                continue;
            }
            let resync = c
                .replicas
                .iter()
                .find(|r| r.role == Role::Ejected && node(r.node).is_some_and(|n| n.accepts_replicas()));
            let cmd = if let Some(r) = resync {
                Some(start(v, chunk, c, JobKind::Resync, r.node, None))
            } else if let Some(failed) = c.replicas.iter().find(|r| match node(r.node) {
                None => true,
                Some(n) => {
                    matches!(n.state, NodeState::Down | NodeState::Draining)
                        || n.disk.is_failed()
                        // A suspect node may come back: its ejected replicas wait
                        // for it (a resync copies far less than a rebuild).
                        || (r.role == Role::Ejected && (n.state == NodeState::Cordoned || n.disk == DiskHealth::Full))
                }
            }) {
                let map = map.get_or_insert_with(|| state.cluster_map());
                let current: Vec<NodeId> = c.replicas.iter().map(|r| r.node).collect();
                let req = Request { replicas: current.len(), ..VolumeSpec::of(v).placement_request() };
                let key = ChunkKey { volume: v.id, chunk };
                match placement::replace(map, key, &req, &current, failed.node) {
                    Ok(set) => set
                        .into_iter()
                        .find(|n| !current.contains(n))
                        .map(|t| start(v, chunk, c, JobKind::Rebuild, t, Some(failed.node))),
                    // No eligible node now; the next round tries again.
                    Err(_) => None,
                }
            } else {
                None
            };
            if let Some(cmd) = cmd {
                let Command::StartJob { target, kind, .. } = &cmd else { continue };
                let n = per_target.entry(*target).or_default();
                if *n >= limits.max_per_target {
                    continue;
                }
                *n += 1;
                active += 1;
                // A new replica reserves its chunk on the target (as `apply` will),
                // so later placements in this round see the space as taken: a
                // nearly full node is not chosen for more chunks than it can hold.
                if *kind == JobKind::Rebuild {
                    if let Some(t) = map.as_mut().and_then(|m| m.nodes.iter_mut().find(|n| n.id == *target)) {
                        t.used += v.chunk_size;
                    }
                }
                out.push(cmd);
            }
        }
    }
    out
}

fn start(
    v: &Volume,
    chunk: ChunkIdx,
    c: &ChunkEntry,
    kind: JobKind,
    target: NodeId,
    replaces: Option<NodeId>,
) -> Command {
    Command::StartJob { volume: v.id, chunk, version: c.version, kind, target, replaces }
}

/// What fails in a what-if.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Node(NodeId),
    Zone(Zone),
}

/// One volume's exposure to a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Impact {
    pub volume: VolumeId,
    pub name: String,
    /// Chunks left with fewer live replicas than configured (still writable).
    pub degraded: u32,
    /// Chunks left below min-in-sync live replicas: writes fail until a rebuild.
    pub unwritable: u32,
    /// Chunks with no live replica left: data unavailable.
    pub unavailable: u32,
}

/// Which volumes lose redundancy, writability or availability if `failure`
/// happened now, and how many volumes are not affected at all.
///
/// Counted from the cluster as it is now, by its live replicas
/// ([`crate::state::replica_live`]): a replica on a node already down or
/// suspect, on a failed disk, or not in sync counts neither before nor after.
/// So failing a node that is already down affects nothing, and failing another
/// counts what is really left: with node 3 down, losing node 1 leaves a chunk of
/// three replicas one live replica, below min-in-sync 2 (unwritable). A chunk
/// the failure leaves as it is (already degraded or not) is not counted.
pub fn what_if(state: &MetaState, failure: &Failure) -> (Vec<Impact>, usize) {
    let lost = |n: NodeId| match failure {
        Failure::Node(id) => n == *id,
        Failure::Zone(z) => state.nodes.get(&n).is_some_and(|node| &node.zone == z),
    };
    let mut out = Vec::new();
    let mut unaffected = 0;
    for v in state.volumes.values() {
        let mut imp = Impact { volume: v.id, name: v.name.clone(), degraded: 0, unwritable: 0, unavailable: 0 };
        for c in &v.chunks {
            let before = state.live_replicas(c).count();
            let after = state.live_replicas(c).filter(|n| !lost(*n)).count();
            if after == before {
                continue;
            }
            match ChunkHealth::of(after, v.replicas, v.min_in_sync) {
                ChunkHealth::Unavailable => imp.unavailable += 1,
                ChunkHealth::BelowMinInSync => imp.unwritable += 1,
                // It lost a live replica: degraded (Full only if it had more
                // than configured, which a finished job never leaves).
                ChunkHealth::Degraded | ChunkHealth::Full => imp.degraded += 1,
            }
        }
        if imp.degraded + imp.unwritable + imp.unavailable == 0 {
            unaffected += 1;
        } else {
            out.push(imp);
        }
    }
    (out, unaffected)
}
