//! Invariant 4: every member's applied [`MetaState`] keeps the structural
//! invariants of the state machine, [`MetaState::check_invariants`] (the same
//! function the meta crate's property tests and the replication simulator
//! check: chunk counts, replica counts, no node twice in a chunk, at least
//! min-in-sync in-sync replicas, allocations equal to the replicas placed, no
//! replica on an unknown node, layout generations, jobs).

use ballast_meta::MetaState;
use openraft::LogId;

use crate::raft::runner::RaftSim;
use crate::raft::RaftViolation;

impl RaftSim {
    /// Checks member `id`'s state at `applied`.
    pub(in crate::raft) fn check_meta_state(
        &self,
        id: u64,
        applied: LogId<u64>,
        state: &MetaState,
    ) -> Result<(), Box<RaftViolation>> {
        state
            .check_invariants()
            .map_err(|e| self.violation(format!("member {id} at {applied}: MetaState invariant: {e}")))
    }
}
