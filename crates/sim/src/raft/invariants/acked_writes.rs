//! Invariant 1: no acknowledged write is lost. The committed entry at an
//! acknowledged log id's index is that entry, with that command, on every
//! member seen to commit that index (and at the end on every member's log
//! where it is not yet purged); where it is purged, its effect is in the final
//! state: a registered node exists, a created volume exists, an attach epoch
//! or an ejection's chunk version is not rolled back.

use ballast_meta::raft_store::TypeConfig;
use ballast_meta::{Command, MetaState, Response};
use ballast_types::VolumeId;
use openraft::{Entry, EntryPayload};

use crate::raft::client::{short, Ack};
use crate::raft::runner::RaftSim;
use crate::raft::RaftViolation;

impl RaftSim {
    /// Records an acknowledged write, checked against what is known committed.
    pub(in crate::raft) fn ack(&mut self, a: Ack) -> Result<(), Box<RaftViolation>> {
        let index = a.log_id.index;
        if let Some((id, _)) = self.committed.get(&index) {
            if *id != a.log_id {
                return Err(self.violation(format!(
                    "acknowledged write {} ({}) lost: index {index} committed as {id}",
                    a.log_id,
                    short(&a.cmd)
                )));
            }
        }
        self.report.acked += 1;
        if let Some(prev) = self.acked.insert(index, a.clone()) {
            return Err(self.violation(format!(
                "two acknowledged writes at index {index}: {} ({}) at step {} and {} ({})",
                prev.log_id,
                short(&prev.cmd),
                prev.step,
                a.log_id,
                short(&a.cmd)
            )));
        }
        Ok(())
    }

    /// A committed entry seen on member `id` at an index the client was
    /// acknowledged at: it must be that write (log id and command).
    pub(in crate::raft) fn check_acked_entry(&self, id: u64, e: &Entry<TypeConfig>) -> Result<(), Box<RaftViolation>> {
        let index = e.log_id.index;
        if let Some(a) = self.acked.get(&index) {
            let same = matches!(&e.payload, EntryPayload::Normal(c) if *c == a.cmd);
            if a.log_id != e.log_id || !same {
                return Err(self.violation(format!(
                    "acknowledged write {} ({}, step {}) lost: member {id} committed {} at index {index}",
                    a.log_id,
                    short(&a.cmd),
                    a.step,
                    e.log_id
                )));
            }
        }
        Ok(())
    }

    /// What an acknowledged write left in the final state: nodes are never
    /// removed, and epochs and chunk versions only grow; volumes the client
    /// proposed to delete (acknowledged or not) are skipped.
    pub(in crate::raft) fn check_effect(&self, id: u64, s: &MetaState, a: &Ack) -> Result<(), Box<RaftViolation>> {
        let deleted = |v: &VolumeId| self.client.as_ref().is_some_and(|c| c.deleted.contains(v));
        let lost = |what: String| {
            self.violation(format!("acknowledged write {} ({}) lost on member {id}: {what}", a.log_id, short(&a.cmd)))
        };
        match (&a.cmd, &a.result) {
            (Command::RegisterNode { id: n, .. }, Ok(_)) if !s.nodes.contains_key(n) => {
                Err(lost(format!("node {n} not registered")))
            }
            (Command::CreateVolume { name, .. }, Ok(Response::Volume(v))) if !deleted(v) => match s.volumes.get(v) {
                Some(vol) if &vol.name == name => Ok(()),
                other => Err(lost(format!("volume {v} is {:?}", other.map(|v| &v.name)))),
            },
            (Command::Attach { volume, .. }, Ok(Response::Epoch(e))) if !deleted(volume) => {
                match s.volumes.get(volume) {
                    Some(v) if v.epoch >= *e => Ok(()),
                    other => Err(lost(format!("epoch {e} rolled back to {:?}", other.map(|v| v.epoch)))),
                }
            }
            (Command::Eject { volume, chunk, .. }, Ok(Response::Chunk(c))) if !deleted(volume) => {
                let now = s.volumes.get(volume).and_then(|v| v.chunks.get(chunk.0 as usize)).map(|c| c.version);
                match now {
                    Some(v) if v >= c.version => Ok(()),
                    other => Err(lost(format!("chunk version {} rolled back to {other:?}", c.version))),
                }
            }
            _ => Ok(()),
        }
    }
}
