//! Invariant 3, leaders. openraft 0.9 (without its `single-term-leader`
//! feature, as ballast builds it) identifies a leader by `(term, node)` and by
//! design allows two leaders in one term, the later elected one winning (see
//! its docs, `docs::data::leader_id`). So "at most one leader per term" is not
//! an invariant of this Raft; what is checked is that a member acting as
//! leader holds a committed vote naming itself (its metrics, watched by
//! [`watch`]), and that every AppendEntries carrying a committed leader id is
//! sent by that node (the network calls [`World::note_leader`]). Terms with
//! more than one leader are counted in the report, not failed.
//!
//! These checks run outside the main task: a broken one is queued in
//! `World::violations`, which the runner reports at its next observation.

use ballast_meta::raft_store::TypeConfig;
use openraft::{Raft, ServerState};

use crate::raft::network::{lock, Shared, World};

impl World {
    /// A leader `(term, node)` as seen from `by`: in an AppendEntries it sent
    /// (its committed vote) or in its own metrics.
    pub(in crate::raft) fn note_leader(&mut self, term: u64, node: u64, by: u64) {
        if node != by {
            self.violations.push(format!("member {by} acts as leader with leader id T{term}-N{node}"));
        }
        let set = self.leaders.entry(term).or_default();
        if set.insert(node) {
            let others: Vec<u64> = set.iter().copied().filter(|&n| n != node).collect();
            let line = if others.is_empty() {
                format!("leader: member {node} at term {term}")
            } else {
                format!(
                    "leader: member {node} at term {term} (also led by {others:?}: allowed by openraft's leader ids)"
                )
            };
            self.trace.event(line);
        }
    }
}

/// Watches member `i`'s metrics for as long as its `Raft` runs: every
/// leadership it takes is recorded, and must rest on a committed vote.
pub(in crate::raft) fn watch(world: &Shared, i: u64, raft: &Raft<TypeConfig>) {
    let mut rx = raft.metrics();
    let world = world.clone();
    tokio::spawn(async move {
        loop {
            let (state, vote) = {
                let m = rx.borrow_and_update();
                (m.state, m.vote)
            };
            if state == ServerState::Leader {
                let mut w = lock(&world);
                if !vote.committed {
                    w.violations.push(format!("member {i} leads with an uncommitted vote {vote}"));
                }
                w.note_leader(vote.leader_id.term, vote.leader_id.node_id, i);
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
}
