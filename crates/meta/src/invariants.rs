//! The structural invariants of every state [`MetaState::apply`] can reach
//! ([`MetaState::check_invariants`]): checked after every step by the property
//! tests (`tests/state.rs`) and after every applied command by both simulators
//! (`ballast-sim`: the replication one, whose metadata service applies the
//! front end's commands, and the Raft one, on every member's applied state).
//!
//! Each check names what it found broken ([`Invariant`]), so a failing seed or
//! proptest case says which rule fell, not only that one did.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};

use crate::snapshots::detached_cut;
use crate::state::{ChunkEntry, DiskHealth, Job, JobKind, MetaState, Role, ZoneSpread, FINISHED_JOBS_KEPT};

/// One invariant of [`MetaState`] (the list in `state.rs`'s module docs, as checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Invariant {
    /// A chunk has at most one active job.
    OneActiveJobPerChunk,
    /// An active job is on a chunk of an existing volume.
    JobOnExistingChunk,
    /// An active job's target is a rebuilding member of its chunk.
    JobTargetRebuilding,
    /// An active job's target is a known node whose disk is healthy (a failed
    /// or full disk is never a copy's target).
    JobTargetDiskOk,
    /// An active job's `gen` is not newer than its volume's `layout_gen`.
    JobGenNotAhead,
    /// A rebuild replaces a member of its chunk other than its target; a
    /// resync replaces nothing.
    JobReplaces,
    /// A volume has `size / chunk_size` chunks (rounded up).
    ChunkCount,
    /// `acked_gen <= layout_gen`.
    AckedGenNotAhead,
    /// Every chunk has at least `min_in_sync` in-sync members.
    MinInSync,
    /// A chunk holds the volume's `replicas` members, one more during a rebuild.
    ReplicaCount,
    /// No node holds two replicas of one chunk.
    DistinctNodes,
    /// A chunk's rebuilding members are exactly the target of its active job.
    RebuildingIsJobTarget,
    /// With `zone_spread: required`, no two replicas of a chunk share a zone
    /// (a rebuild's target may share only the zone of the member it replaces).
    ZoneSpread,
    /// Every replica is on a registered node.
    ReplicaOnKnownNode,
    /// A node's `allocated` is the chunk size times the replicas it holds.
    Allocation,
    /// At most [`FINISHED_JOBS_KEPT`] finished jobs are kept.
    FinishedJobsKept,
    /// Every job is stored under its own id, below `next_job`.
    JobIds,
    /// A snapshot is stored under its own id, below `next_snapshot`, on an
    /// existing volume, with a name no other snapshot has.
    SnapshotRecord,
    /// A ready snapshot's cut is at most its volume's epoch's end; a pending
    /// one's volume is attached.
    SnapshotCut,
    /// A clone with unfilled chunks names a snapshot that exists and is ready
    /// (or pending, when made for it), and its unfilled chunks are ascending,
    /// distinct indexes of its chunks; a snapshot made for a clone belongs to
    /// a clone of the volume still copying from it.
    CloneSource,
    /// No snapshot of a clone that is still filling.
    CloneNotSnapshotted,
}

impl Invariant {
    /// A short kebab-case name (what a violation's message starts with).
    pub fn name(self) -> &'static str {
        match self {
            Invariant::OneActiveJobPerChunk => "one-active-job-per-chunk",
            Invariant::JobOnExistingChunk => "job-on-existing-chunk",
            Invariant::JobTargetRebuilding => "job-target-rebuilding",
            Invariant::JobTargetDiskOk => "job-target-disk-ok",
            Invariant::JobGenNotAhead => "job-gen-not-ahead",
            Invariant::JobReplaces => "job-replaces",
            Invariant::ChunkCount => "chunk-count",
            Invariant::AckedGenNotAhead => "acked-gen-not-ahead",
            Invariant::MinInSync => "min-in-sync",
            Invariant::ReplicaCount => "replica-count",
            Invariant::DistinctNodes => "distinct-nodes",
            Invariant::RebuildingIsJobTarget => "rebuilding-is-job-target",
            Invariant::ZoneSpread => "zone-spread",
            Invariant::ReplicaOnKnownNode => "replica-on-known-node",
            Invariant::Allocation => "allocation",
            Invariant::FinishedJobsKept => "finished-jobs-kept",
            Invariant::JobIds => "job-ids",
            Invariant::SnapshotRecord => "snapshot-record",
            Invariant::SnapshotCut => "snapshot-cut",
            Invariant::CloneSource => "clone-source",
            Invariant::CloneNotSnapshotted => "clone-not-snapshotted",
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A broken invariant: which one, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invariant {invariant} broken: {detail}")]
pub struct InvariantViolation {
    pub invariant: Invariant,
    pub detail: String,
}

fn ensure(ok: bool, invariant: Invariant, detail: impl FnOnce() -> String) -> Result<(), InvariantViolation> {
    if ok {
        Ok(())
    } else {
        Err(InvariantViolation { invariant, detail: detail() })
    }
}

fn role_of(c: &ChunkEntry, node: NodeId) -> Option<Role> {
    c.replicas.iter().find(|r| r.node == node).map(|r| r.role)
}

impl MetaState {
    /// Checks the structural invariants of a reachable state; the first broken
    /// one is returned. A pure read: O(state), meant for tests and simulators
    /// after every command (the production state machine does not call it).
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let s = self;
        let active: Vec<&Job> = s.jobs.values().filter(|j| j.is_active()).collect();
        let mut active_per_chunk: BTreeMap<(VolumeId, ChunkIdx), &Job> = BTreeMap::new();
        for j in &active {
            let prev = active_per_chunk.insert((j.volume, j.chunk), j);
            ensure(prev.is_none(), Invariant::OneActiveJobPerChunk, || {
                format!("two active jobs on chunk {} of {}", j.chunk, j.volume)
            })?;
            let v = s.volumes.get(&j.volume).ok_or_else(|| InvariantViolation {
                invariant: Invariant::JobOnExistingChunk,
                detail: format!("active job {} on a deleted volume", j.id),
            })?;
            let c = v.chunks.get(j.chunk.0 as usize).ok_or_else(|| InvariantViolation {
                invariant: Invariant::JobOnExistingChunk,
                detail: format!(
                    "active job {} on chunk {} of {}, which has {} chunks",
                    j.id,
                    j.chunk,
                    v.name,
                    v.chunks.len()
                ),
            })?;
            ensure(role_of(c, j.target) == Some(Role::Rebuilding), Invariant::JobTargetRebuilding, || {
                format!("job {}: target is not rebuilding", j.id)
            })?;
            let disk = s.nodes.get(&j.target).map(|n| &n.disk);
            ensure(disk == Some(&DiskHealth::Ok), Invariant::JobTargetDiskOk, || {
                format!("job {}: target's disk is {disk:?}", j.id)
            })?;
            ensure(j.gen <= v.layout_gen, Invariant::JobGenNotAhead, || format!("job {}: gen from the future", j.id))?;
            match j.kind {
                JobKind::Rebuild => {
                    let r = j.replaces.ok_or_else(|| InvariantViolation {
                        invariant: Invariant::JobReplaces,
                        detail: format!("rebuild job {} replaces nothing", j.id),
                    })?;
                    ensure(role_of(c, r).is_some() && r != j.target, Invariant::JobReplaces, || {
                        format!("job {}: replaced member {r} gone", j.id)
                    })?;
                }
                JobKind::Resync => ensure(j.replaces.is_none(), Invariant::JobReplaces, || {
                    format!("resync job {} replaces a member", j.id)
                })?,
            }
        }
        let mut allocated: BTreeMap<NodeId, u64> = BTreeMap::new();
        for v in s.volumes.values() {
            ensure(v.chunks.len() as u64 == v.size.div_ceil(v.chunk_size), Invariant::ChunkCount, || {
                format!("{}: {} chunks for size {}", v.name, v.chunks.len(), v.size)
            })?;
            ensure(v.acked_gen <= v.layout_gen, Invariant::AckedGenNotAhead, || {
                format!("{}: acked_gen {} > layout_gen {}", v.name, v.acked_gen, v.layout_gen)
            })?;
            for (i, c) in v.chunks.iter().enumerate() {
                let job = active_per_chunk.get(&(v.id, ChunkIdx(i as u32)));
                ensure(c.in_sync().count() >= v.min_in_sync, Invariant::MinInSync, || {
                    format!("{} chunk {i}: below min in-sync: {:?}", v.name, c.replicas)
                })?;
                let extra = usize::from(job.is_some_and(|j| j.kind == JobKind::Rebuild));
                ensure(c.replicas.len() == v.replicas + extra, Invariant::ReplicaCount, || {
                    format!("{} chunk {i}: {} replicas for {} ({job:?})", v.name, c.replicas.len(), v.replicas)
                })?;
                let distinct: BTreeSet<NodeId> = c.replicas.iter().map(|r| r.node).collect();
                ensure(distinct.len() == c.replicas.len(), Invariant::DistinctNodes, || {
                    format!("{} chunk {i}: a node twice: {:?}", v.name, c.replicas)
                })?;
                let rebuilding: Vec<NodeId> =
                    c.replicas.iter().filter(|r| r.role == Role::Rebuilding).map(|r| r.node).collect();
                let targets: Vec<NodeId> = job.map(|j| j.target).into_iter().collect();
                ensure(rebuilding == targets, Invariant::RebuildingIsJobTarget, || {
                    format!("{} chunk {i}: rebuilding {rebuilding:?}, active job targets {targets:?}", v.name)
                })?;
                if v.zone_spread == ZoneSpread::Required {
                    // Every member but a rebuild's target (which may take the zone
                    // of the member it replaces) sits in a zone of its own.
                    let zones: Vec<&Zone> = c
                        .replicas
                        .iter()
                        .filter(|r| r.role != Role::Rebuilding)
                        .filter_map(|r| s.nodes.get(&r.node).map(|n| &n.zone))
                        .collect();
                    let distinct: BTreeSet<&Zone> = zones.iter().copied().collect();
                    ensure(distinct.len() == zones.len(), Invariant::ZoneSpread, || {
                        format!("{} chunk {i}: two replicas in one zone", v.name)
                    })?;
                    if let Some(j) = job.filter(|j| j.kind == JobKind::Rebuild) {
                        let tz = s.nodes.get(&j.target).map(|n| &n.zone);
                        let clash = c
                            .replicas
                            .iter()
                            .filter(|r| Some(r.node) != j.replaces && r.node != j.target)
                            .any(|r| s.nodes.get(&r.node).map(|n| &n.zone) == tz);
                        ensure(!clash, Invariant::ZoneSpread, || {
                            format!("{} chunk {i}: rebuild target shares a zone", v.name)
                        })?;
                    }
                }
                for r in &c.replicas {
                    ensure(s.nodes.contains_key(&r.node), Invariant::ReplicaOnKnownNode, || {
                        format!("{} chunk {i}: replica on unknown node {}", v.name, r.node)
                    })?;
                    *allocated.entry(r.node).or_default() += v.chunk_size;
                }
            }
        }
        for n in s.nodes.values() {
            let want = allocated.get(&n.id).copied().unwrap_or(0);
            ensure(n.allocated == want, Invariant::Allocation, || {
                format!("node {} allocation {} != {want} placed", n.id, n.allocated)
            })?;
        }
        let finished = s.jobs.values().filter(|j| !j.is_active()).count();
        ensure(finished <= FINISHED_JOBS_KEPT, Invariant::FinishedJobsKept, || {
            format!("{finished} finished jobs kept")
        })?;
        for (&key, j) in &s.jobs {
            ensure(key == j.id && key < s.next_job, Invariant::JobIds, || {
                format!("job {} stored under id {key}, next_job {}", j.id, s.next_job)
            })?;
        }
        let mut names = BTreeSet::new();
        for (&key, snap) in &s.snapshots {
            let v = s.volumes.get(&snap.volume);
            ensure(
                key == snap.id && key < s.next_snapshot && v.is_some() && names.insert(&snap.name),
                Invariant::SnapshotRecord,
                || format!("snapshot {snap:?} under id {key}, next_snapshot {}", s.next_snapshot),
            )?;
            let Some(v) = v else { continue };
            let ok = match snap.cut {
                Some(cut) => cut <= detached_cut(v.epoch),
                None => v.attached_to.is_some(),
            };
            ensure(ok, Invariant::SnapshotCut, || {
                format!(
                    "snapshot {} cut {:?}: volume {} at epoch {}, attached {:?}",
                    snap.name, snap.cut, v.name, v.epoch, v.attached_to
                )
            })?;
            let serves = snap.for_clone.is_none_or(|c| {
                s.volumes.get(&c).is_some_and(|x| {
                    !x.unfilled.is_empty() && x.origin.as_ref().is_some_and(|o| o.snapshot == key && o.from_volume)
                })
            });
            ensure(serves, Invariant::CloneSource, || {
                format!("snapshot {} made for clone {:?}, which does not copy from it", snap.name, snap.for_clone)
            })?;
            ensure(v.unfilled.is_empty(), Invariant::CloneNotSnapshotted, || {
                format!(
                    "snapshot {} of volume {}, which still has {} unfilled chunks",
                    snap.name,
                    v.name,
                    v.unfilled.len()
                )
            })?;
        }
        for v in s.volumes.values().filter(|v| !v.unfilled.is_empty()) {
            let source = v.origin.as_ref().and_then(|o| s.snapshots.get(&o.snapshot));
            let ascending = v.unfilled.windows(2).all(|w| w[0] < w[1]);
            let in_range = v.unfilled.last().is_some_and(|c| (*c as usize) < v.chunks.len());
            let decided = source.is_some_and(|x| x.is_ready() || x.for_clone == Some(v.id));
            ensure(decided && ascending && in_range, Invariant::CloneSource, || {
                format!("clone {} with unfilled chunks {:?} from {:?}", v.name, v.unfilled, v.origin)
            })?;
        }
        Ok(())
    }
}
