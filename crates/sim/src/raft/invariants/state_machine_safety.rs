//! Invariant 2, state machine safety: every member's committed (applied) log
//! entries agree index by index, and members at the same applied log id have
//! the same [`MetaState`] (compared by a hash of its JSON), at every
//! observation and at the end.

use std::collections::BTreeSet;

use ballast_meta::raft_store::TypeConfig;
use ballast_meta::MetaState;
use openraft::{Entry, LogId};

use super::json_hash;
use crate::raft::runner::RaftSim;
use crate::raft::RaftViolation;

impl RaftSim {
    /// A committed entry seen on member `id`: the same as every other member's
    /// at its index.
    pub(in crate::raft) fn check_committed(
        &mut self,
        id: u64,
        e: &Entry<TypeConfig>,
    ) -> Result<(), Box<RaftViolation>> {
        let index = e.log_id.index;
        let h = json_hash(e);
        match self.committed.get(&index) {
            Some((lid, h2)) if *lid != e.log_id || *h2 != h => {
                return Err(self.violation(format!(
                    "state machine safety: member {id} committed {} at index {index}, another member {lid}",
                    e.log_id
                )));
            }
            Some(_) => {}
            None => {
                self.committed.insert(index, (e.log_id, h));
            }
        }
        Ok(())
    }

    /// Member `id`'s state at its applied log id: the same as every other
    /// member's at that id.
    pub(in crate::raft) fn check_applied_state(
        &mut self,
        id: u64,
        applied: LogId<u64>,
        state: &MetaState,
    ) -> Result<(), Box<RaftViolation>> {
        let h = json_hash(state);
        match self.states.get(&applied.index) {
            Some((lid, h2)) if *lid != applied || *h2 != h => {
                return Err(self.violation(format!(
                    "state machine safety: member {id} applied {applied} (state {h:016x}), another member applied {lid} (state {h2:016x}) at the same index"
                )));
            }
            Some(_) => {}
            None => {
                self.states.insert(applied.index, (applied, h));
            }
        }
        Ok(())
    }

    /// At the end, with every member at one applied log id: one state.
    pub(in crate::raft) fn check_final_states(&self, hashes: &BTreeSet<u64>) -> Result<(), Box<RaftViolation>> {
        if hashes.len() != 1 {
            return Err(self.violation(format!("final states differ at one applied log id: {} distinct", hashes.len())));
        }
        Ok(())
    }

    /// The hash the final states are compared by.
    pub(in crate::raft) fn state_hash(state: &MetaState) -> u64 {
        json_hash(state)
    }
}
