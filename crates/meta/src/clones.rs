//! Clones in the replicated state (docs/DESIGN.md, 5.6a).
//!
//! A clone is a new volume created from a ready snapshot: its own chunks,
//! placed like any volume's, start empty, and it records its origin (the
//! snapshot) and the chunks not yet copied from it (`unfilled`: those that
//! overlap the snapshot's size). The front end attached to the clone fills a
//! chunk from the snapshot before any I/O to it and the rest in the
//! background, and records each filled chunk
//! ([`crate::state::Command::FillChunks`], refused unless it still holds the
//! epoch). Once `unfilled` is empty the clone is independent: its source
//! snapshot (and then the source volume) can be deleted.
//!
//! A clone of a volume ([`crate::state::Command::CreateVolumeClone`]) is the
//! same thing in one step: a snapshot of the source made for the clone
//! (`for_clone`; named `<clone>@source`, a name users cannot give), pending
//! while the source is attached, and the clone of it. Its front end may attach
//! once that snapshot is ready ([`MetaError::CloneSourcePending`] before), and
//! the snapshot goes when the clone is independent, or deleted: nothing is
//! left behind on the source.
//!
//! # Filling detached clones
//! A clone nobody attaches would keep its source forever. So a node agent
//! fills it: each heartbeat answer names the clones that node should fill
//! ([`MetaState::fill_assignments`]): clones with unfilled chunks whose
//! source snapshot is ready, neither published (CSI ControllerPublish) nor
//! attached by anything but a filler, assigned to the lowest-id Up node
//! holding an in-sync replica of them (deterministic, so two nodes never
//! both get one while the state agrees; if they did, each attach fences the
//! other and the fill is correct anyway). The agent attaches with
//! [`crate::state::Command::AttachToFill`], which refuses a volume in use,
//! and marks the lease as a filler's: every ordinary attach takes it over
//! (fencing the filler, whose filled chunks stay recorded), and another
//! node's filler takes over from a filler whose node is no longer Up.
//!
//! Invariants ([`MetaState::check_invariants`] checks them):
//! - a clone with unfilled chunks names a snapshot that exists and is ready
//!   (or pending, when it was made for that clone), so its source cannot go
//!   away under it ([`MetaError::SnapshotInUse`]);
//! - a snapshot made for a clone belongs to a clone of it that is still
//!   filling;
//! - its unfilled chunks are ascending, distinct chunk indexes of the clone;
//! - a clone takes no snapshot while it is filling ([`MetaError::CloneFilling`]):
//!   the part of its data still in its source would be missing from it.

use ballast_types::{Epoch, NodeId, VolumeId};
use serde::{Deserialize, Serialize};

use crate::state::{MetaError, MetaState, NodeState, Response, VolumeSpec};

/// Where a clone's data came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneOrigin {
    /// The snapshot it was created from (its id; the record may be gone once
    /// the clone is independent).
    pub snapshot: u64,
    pub snapshot_name: String,
    /// The snapshot's volume.
    pub source: VolumeId,
    /// Made from the volume: the snapshot was made for the clone.
    #[serde(default)]
    pub from_volume: bool,
}

/// The name of the snapshot made for clone `clone` of a volume: `@` is not
/// in the names users give, so it takes no one's.
pub fn clone_snapshot_name(clone: &str) -> String {
    format!("{clone}@source")
}

impl MetaState {
    /// Creates volume `name` from ready snapshot `snapshot`, at least as large
    /// as the snapshot. The same name, parameters and snapshot again return
    /// the existing clone (retries are safe).
    pub(crate) fn create_clone(&mut self, name: &str, spec: VolumeSpec, snapshot: u64) -> Result<Response, MetaError> {
        // A snapshot made for a clone of a volume is that clone's alone: it
        // goes with that clone, so a clone of it would lose its source (found
        // by the command-sequence property test). Users never see it.
        let s = self
            .snapshots
            .get(&snapshot)
            .filter(|s| s.for_clone.is_none())
            .ok_or(MetaError::UnknownSnapshot(snapshot.to_string()))?
            .clone();
        if let Some(v) = self.volume_by_name(name) {
            // A retry gets the clone it made; anything else by that name is
            // someone else's.
            let same = v.origin.as_ref().is_some_and(|o| o.snapshot == snapshot && !o.from_volume) && v.has_spec(&spec);
            return if same { Ok(Response::Volume(v.id)) } else { Err(MetaError::NameTaken(name.to_string())) };
        }
        if !s.is_ready() {
            return Err(MetaError::Conflict(format!(
                "snapshot {} is not ready yet: its volume's front end has not taken it",
                s.name
            )));
        }
        if spec.size < s.size {
            return Err(MetaError::CloneTooSmall { size: spec.size, snapshot: s.name.clone(), needed: s.size });
        }
        let chunk_size = spec.chunk_size;
        let Response::Volume(id) = self.create_volume(name, spec)? else {
            return Err(MetaError::Conflict(format!("creating clone {name}: no volume created")));
        };
        let v = self.volumes.get_mut(&id).ok_or(MetaError::UnknownVolume(id))?;
        v.origin = Some(CloneOrigin { snapshot, snapshot_name: s.name.clone(), source: s.volume, from_volume: false });
        v.unfilled = (0..s.size.div_ceil(chunk_size) as u32).collect();
        Ok(Response::Volume(id))
    }

    /// Creates volume `name` as a clone of volume `source`'s content now (see
    /// the module docs), at least as large. The same name, parameters and
    /// source again return the existing clone.
    pub(crate) fn create_volume_clone(
        &mut self,
        name: &str,
        spec: VolumeSpec,
        source: VolumeId,
        now_ms: u64,
    ) -> Result<Response, MetaError> {
        if let Some(v) = self.volume_by_name(name) {
            let same = v.origin.as_ref().is_some_and(|o| o.from_volume && o.source == source) && v.has_spec(&spec);
            return if same { Ok(Response::Volume(v.id)) } else { Err(MetaError::NameTaken(name.to_string())) };
        }
        let src = self.volumes.get(&source).ok_or(MetaError::UnknownVolume(source))?;
        if !src.unfilled.is_empty() {
            return Err(MetaError::CloneFilling { volume: source, remaining: src.unfilled.len() });
        }
        if spec.size < src.size {
            return Err(MetaError::CloneTooSmall { size: spec.size, snapshot: src.name.clone(), needed: src.size });
        }
        let snapshot_name = clone_snapshot_name(name);
        if self.find_snapshot(&snapshot_name).is_some() {
            return Err(MetaError::NameTaken(snapshot_name));
        }
        // The volume first: it is the step that can fail (placement), and a
        // command changes nothing when it fails.
        let chunk_size = spec.chunk_size;
        let Response::Volume(id) = self.create_volume(name, spec)? else {
            return Err(MetaError::Conflict(format!("creating clone {name}: no volume created")));
        };
        let Response::Snapshot(snap) = self.insert_snapshot(source, &snapshot_name, now_ms)? else {
            return Err(MetaError::Conflict(format!("creating clone {name}: no snapshot made")));
        };
        if let Some(x) = self.snapshots.get_mut(&snap.id) {
            x.for_clone = Some(id);
        }
        let v = self.volumes.get_mut(&id).ok_or(MetaError::UnknownVolume(id))?;
        v.origin = Some(CloneOrigin { snapshot: snap.id, snapshot_name, source, from_volume: true });
        v.unfilled = (0..snap.size.div_ceil(chunk_size) as u32).collect();
        Ok(Response::Volume(id))
    }

    /// The snapshot made for clone `clone`, if it still has one.
    pub(crate) fn snapshot_for_clone(&self, clone: VolumeId) -> Option<u64> {
        self.snapshots.values().find(|s| s.for_clone == Some(clone)).map(|s| s.id)
    }

    /// Refuses the attach of a clone whose source snapshot is not taken yet
    /// (its data is not decided).
    pub(crate) fn check_clone_attach(&self, volume: VolumeId) -> Result<(), MetaError> {
        let Some(v) = self.volumes.get(&volume) else { return Ok(()) };
        let Some(o) = v.origin.as_ref().filter(|_| !v.unfilled.is_empty()) else { return Ok(()) };
        match self.snapshots.get(&o.snapshot) {
            Some(s) if !s.is_ready() => {
                Err(MetaError::CloneSourcePending { clone: volume, snapshot: s.name.clone(), from: s.volume })
            }
            _ => Ok(()),
        }
    }

    /// The front end attached at `epoch` copied `chunks` of clone `volume`
    /// from its source, durably: they leave `unfilled`. The last one makes
    /// the clone independent (a new layout generation).
    pub(crate) fn fill_chunks(
        &mut self,
        volume: VolumeId,
        epoch: Epoch,
        chunks: &[u32],
    ) -> Result<Response, MetaError> {
        let v = self.volumes.get_mut(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        if v.epoch != epoch || v.attached_to.is_none() {
            return Err(MetaError::Conflict(format!(
                "volume {volume} is attached at epoch {} now, not {epoch}: the fill is not recorded",
                v.epoch
            )));
        }
        let before = v.unfilled.len();
        v.unfilled.retain(|c| !chunks.contains(c));
        if before > 0 && v.unfilled.is_empty() {
            v.layout_gen += 1;
            // Independent: the snapshot made for it has served.
            if let Some(id) = self.snapshot_for_clone(volume) {
                self.remove_snapshot(id)?;
            }
        }
        Ok(Response::Done)
    }

    /// The clone that still needs snapshot `id`, if any.
    pub(crate) fn clone_of(&self, id: u64) -> Option<VolumeId> {
        self.volumes
            .values()
            .find(|v| !v.unfilled.is_empty() && v.origin.as_ref().is_some_and(|o| o.snapshot == id))
            .map(|v| v.id)
    }

    /// The clones `node` should fill in the background now (module docs,
    /// "Filling detached clones"), by name.
    pub fn fill_assignments(&self, node: NodeId) -> Vec<String> {
        let up = |n: NodeId| self.nodes.get(&n).is_some_and(|x| x.state == NodeState::Up);
        self.volumes
            .values()
            .filter(|v| !v.unfilled.is_empty() && v.published_to.is_none())
            .filter(|v| match v.attached_to {
                None => true,
                // A filler: this node's own (restarted, or still running: the
                // agent knows), or one on a node no longer Up.
                Some(holder) => v.attached_to_fill && (holder == node || !up(holder)),
            })
            .filter(|v| self.check_clone_attach(v.id).is_ok())
            .filter(|v| {
                let holders = v.chunks.iter().flat_map(|c| c.in_sync());
                holders.filter(|n| up(*n)).min() == Some(node)
            })
            .map(|v| v.name.clone())
            .collect()
    }
}
