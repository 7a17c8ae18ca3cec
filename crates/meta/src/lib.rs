//! The metadata service. This crate holds its replicated state machine
//! ([`state`]): a deterministic function from a log of [`state::Command`]s to the
//! cluster's nodes, volumes, chunk replica sets and attach epochs. Raft
//! (openraft) orders the commands; every member applies them to its own copy and
//! gets the same state.

pub mod plan;
pub mod state;

pub use state::{Command, DiskHealth, MetaError, MetaState, Response, VolumeSpec, ZoneSpread};
pub mod raft_store;
