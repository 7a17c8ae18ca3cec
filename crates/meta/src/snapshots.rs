//! Volume snapshots in the replicated state (docs/DESIGN.md, 5.3a).
//!
//! A snapshot is a record `{id, name, volume, cut}`. Its data lives on the
//! volume's replicas as frozen chunk layers below `cut` (the chunk store's
//! snapshot layers); meta only decides which cuts exist, and every replica
//! learns them from the front end (SetCuts) before it takes a write above one.
//!
//! How a snapshot gets its cut:
//! - the volume is detached: at once, `(epoch, u64::MAX)`. Every write ever
//!   made carries an epoch up to the volume's current one, and the next attach
//!   writes at a higher epoch, so the cut holds everything written and nothing
//!   that follows; the next attach installs it on the replicas before its first
//!   write;
//! - the volume is attached: the record is pending (`cut: None`) until the
//!   attached front end, which sees it in the layout it polls, drains its
//!   writes, installs a new cut on every replica node and commits it
//!   ([`crate::state::Command::CommitSnapshots`], refused unless the committer still holds
//!   the epoch). One cut may serve several requests that were pending when
//!   the front end began: each holds every write acknowledged before it was
//!   requested;
//! - the front end went away first (a new attach, or a detach): the pending
//!   records take `(old epoch, u64::MAX)`, for the same reason as above.
//!
//! Every change to a volume's snapshots (a request, a commit, a delete, pending
//! ones cut at an epoch's end) raises the volume's `layout_gen`, as a change to
//! its chunks does: the front end polls layouts from any member, which may lag,
//! and a layout at generation `g` shows every snapshot change up to `g`. So a
//! front end that committed a cut at generation `g` (the commit answers it)
//! and later polls a layout at `g` or above without that cut knows the
//! snapshot was deleted, and only then drops the cut from the replicas. A
//! lagging member's older layout, which does not show the cut yet, never makes
//! it drop one.
//!
//! Invariants ([`MetaState::check_invariants`] checks them):
//! - a snapshot's volume exists (a volume with snapshots cannot be deleted:
//!   its snapshots are layers of its chunks, see [`MetaError::HasSnapshots`]);
//! - snapshot names are unique across the cluster;
//! - a ready cut is at most `(volume epoch, u64::MAX)`: no snapshot holds a
//!   write its volume has not been able to issue yet;
//! - a pending snapshot's volume is attached.

use std::collections::BTreeSet;

use ballast_types::{Epoch, Seq, VolumeId};
use serde::{Deserialize, Serialize};

use crate::state::{MetaError, MetaState, Response};

/// One snapshot of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: u64,
    pub name: String,
    pub volume: VolumeId,
    /// The volume's size at the cut (at the request while pending): what a
    /// restore or clone of it holds at least.
    pub size: u64,
    /// When it was requested (the leader's clock, ms since the Unix epoch).
    pub created_ms: u64,
    /// The cut: the snapshot holds every write below it and none above. None
    /// while the attached front end has not taken it yet.
    pub cut: Option<Seq>,
    /// Made for the creation of this clone from the volume
    /// ([`crate::state::Command::CreateVolumeClone`]): deleted with the clone,
    /// or once the clone is independent.
    #[serde(default)]
    pub for_clone: Option<VolumeId>,
}

impl Snapshot {
    pub fn is_ready(&self) -> bool {
        self.cut.is_some()
    }
}

/// The cut a snapshot of a volume not attached (any more) at `epoch` takes.
pub fn detached_cut(epoch: Epoch) -> Seq {
    Seq::new(epoch, u64::MAX)
}

impl MetaState {
    /// The snapshot by name, or by numeric id.
    pub fn find_snapshot(&self, name_or_id: &str) -> Option<&Snapshot> {
        self.snapshots
            .values()
            .find(|s| s.name == name_or_id)
            .or_else(|| name_or_id.parse::<u64>().ok().and_then(|id| self.snapshots.get(&id)))
    }

    /// The volume's snapshots, oldest first.
    pub fn volume_snapshots(&self, volume: VolumeId) -> impl Iterator<Item = &Snapshot> + '_ {
        self.snapshots.values().filter(move |s| s.volume == volume)
    }

    /// The volume's distinct ready cuts, ascending: what its replicas keep.
    pub fn snapshot_cuts(&self, volume: VolumeId) -> Vec<Seq> {
        let cuts: BTreeSet<Seq> = self.volume_snapshots(volume).filter_map(|s| s.cut).collect();
        cuts.into_iter().collect()
    }

    pub(crate) fn create_snapshot(&mut self, volume: VolumeId, name: &str, now_ms: u64) -> Result<Response, MetaError> {
        crate::state::validate_name(name)?;
        self.insert_snapshot(volume, name, now_ms)
    }

    /// [`MetaState::create_snapshot`] without the name's validation (the
    /// snapshots made for clones have names users cannot give).
    pub(crate) fn insert_snapshot(&mut self, volume: VolumeId, name: &str, now_ms: u64) -> Result<Response, MetaError> {
        let v = self.volumes.get(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        if !v.unfilled.is_empty() {
            return Err(MetaError::CloneFilling { volume, remaining: v.unfilled.len() });
        }
        if let Some(s) = self.snapshots.values().find(|s| s.name == name) {
            // A retry gets the snapshot it made; the name on another volume is
            // someone else's.
            return match s.volume == volume {
                true => Ok(Response::Snapshot(s.clone())),
                false => Err(MetaError::NameTaken(name.to_string())),
            };
        }
        let cut = match v.attached_to {
            None => Some(detached_cut(v.epoch)),
            Some(_) => None,
        };
        let id = self.next_snapshot.max(1);
        self.next_snapshot = id + 1;
        let s = Snapshot { id, name: name.to_string(), volume, size: v.size, created_ms: now_ms, cut, for_clone: None };
        self.snapshots.insert(id, s.clone());
        self.bump_layout_gen(volume);
        Ok(Response::Snapshot(s))
    }

    pub(crate) fn commit_snapshots(
        &mut self,
        volume: VolumeId,
        epoch: Epoch,
        snapshots: &[u64],
        cut: Seq,
    ) -> Result<Response, MetaError> {
        let v = self.volumes.get(&volume).ok_or(MetaError::UnknownVolume(volume))?;
        if v.epoch != epoch || v.attached_to.is_none() {
            return Err(MetaError::Conflict(format!(
                "volume {volume} is attached at epoch {} ({}), not {epoch}: a fenced front end commits no snapshot",
                v.epoch,
                if v.attached_to.is_some() { "attached" } else { "detached" }
            )));
        }
        if cut.epoch != epoch {
            return Err(MetaError::InvalidArgument {
                param: "cut".into(),
                reason: format!("{cut} was not taken at epoch {epoch}"),
            });
        }
        if let Some(last) = self.snapshot_cuts(volume).last().filter(|last| **last >= cut) {
            return Err(MetaError::InvalidArgument {
                param: "cut".into(),
                reason: format!("{cut} is not above the volume's last cut {last}"),
            });
        }
        // Requests deleted meanwhile, or already served, are skipped: the cut
        // serves what is still pending among the ones the front end saw.
        let size = v.size;
        for id in snapshots {
            if let Some(s) = self.snapshots.get_mut(id).filter(|s| s.volume == volume && s.cut.is_none()) {
                s.cut = Some(cut);
                s.size = size;
            }
        }
        Ok(Response::LayoutGen(self.bump_layout_gen(volume)))
    }

    pub(crate) fn delete_snapshot(&mut self, id: u64) -> Result<Response, MetaError> {
        let name = self.snapshots.get(&id).ok_or(MetaError::UnknownSnapshot(id.to_string()))?.name.clone();
        if let Some(clone) = self.clone_of(id) {
            return Err(MetaError::SnapshotInUse { snapshot: name, clone });
        }
        self.remove_snapshot(id)?;
        Ok(Response::Done)
    }

    /// Forgets snapshot `id` (a new layout generation of its volume: the
    /// front end drops its cut from the replicas).
    pub(crate) fn remove_snapshot(&mut self, id: u64) -> Result<Snapshot, MetaError> {
        let s = self.snapshots.remove(&id).ok_or(MetaError::UnknownSnapshot(id.to_string()))?;
        self.bump_layout_gen(s.volume);
        Ok(s)
    }

    /// Raises the volume's `layout_gen` (see the module docs) and returns it.
    pub(crate) fn bump_layout_gen(&mut self, volume: VolumeId) -> u64 {
        self.volumes.get_mut(&volume).map_or(0, |v| {
            v.layout_gen += 1;
            v.layout_gen
        })
    }

    /// The front end at the volume's current epoch is going away (a new attach
    /// fences it, or it detached): what it had not taken yet is cut at its
    /// epoch's end.
    pub(crate) fn resolve_pending_snapshots(&mut self, volume: VolumeId, epoch: Epoch) {
        let size = self.volumes.get(&volume).map_or(0, |v| v.size);
        let mut changed = false;
        for s in self.snapshots.values_mut().filter(|s| s.volume == volume && s.cut.is_none()) {
            s.cut = Some(detached_cut(epoch));
            s.size = size;
            changed = true;
        }
        if changed {
            self.bump_layout_gen(volume);
        }
    }
}
