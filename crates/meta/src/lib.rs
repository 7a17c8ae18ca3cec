//! The metadata service. This crate holds its replicated state machine
//! ([`state`]): a deterministic function from a log of [`state::Command`]s to the
//! cluster's nodes, volumes, chunk replica sets and attach epochs. Raft
//! (openraft) orders the commands; every member applies them to its own copy and
//! gets the same state. [`invariants`] checks what every reachable state keeps
//! ([`MetaState::check_invariants`]); [`raft_store`] is the Raft log and state
//! machine on disk, and [`raft_config()`] the one openraft configuration every
//! member (and the simulator) runs with.

pub mod clones;
pub mod invariants;
pub mod plan;
pub mod raft_config;
pub mod raft_store;
pub mod snapshots;
pub mod state;

pub use invariants::{Invariant, InvariantViolation};
pub use raft_config::{raft_config, RaftTiming};
pub use state::{
    replica_live, ChunkHealth, Command, DiskHealth, MetaError, MetaState, Response, Snapshot, VolumeHealth, VolumeSpec,
    ZoneSpread,
};
