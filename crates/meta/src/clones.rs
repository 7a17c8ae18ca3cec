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
//! Invariants ([`MetaState::check_invariants`] checks them):
//! - a clone with unfilled chunks names a snapshot that exists and is ready,
//!   so its source cannot go away under it ([`MetaError::SnapshotInUse`]);
//! - its unfilled chunks are ascending, distinct chunk indexes of the clone;
//! - a clone takes no snapshot while it is filling ([`MetaError::CloneFilling`]):
//!   the part of its data still in its source would be missing from it.

use ballast_types::{Epoch, VolumeId};
use serde::{Deserialize, Serialize};

use crate::state::{MetaError, MetaState, Response, VolumeSpec};

/// Where a clone's data came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneOrigin {
    /// The snapshot it was created from (its id; the record may be gone once
    /// the clone is independent).
    pub snapshot: u64,
    pub snapshot_name: String,
    /// The snapshot's volume.
    pub source: VolumeId,
}

impl MetaState {
    /// Creates volume `name` from ready snapshot `snapshot`, at least as large
    /// as the snapshot. The same name, parameters and snapshot again return
    /// the existing clone (retries are safe).
    pub(crate) fn create_clone(&mut self, name: &str, spec: VolumeSpec, snapshot: u64) -> Result<Response, MetaError> {
        let s = self.snapshots.get(&snapshot).ok_or(MetaError::UnknownSnapshot(snapshot.to_string()))?.clone();
        if let Some(v) = self.volume_by_name(name) {
            // A retry gets the clone it made; anything else by that name is
            // someone else's.
            let same = v.origin.as_ref().is_some_and(|o| o.snapshot == snapshot) && v.has_spec(&spec);
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
        v.origin = Some(CloneOrigin { snapshot, snapshot_name: s.name.clone(), source: s.volume });
        v.unfilled = (0..s.size.div_ceil(chunk_size) as u32).collect();
        Ok(Response::Volume(id))
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
}
