//! ballast-verify: how a test knows a block device kept its promise.
//!
//! - [`pattern`]: block contents that name their own address and version, so a
//!   read tells which write it sees, and misplaced, torn or corrupt data shows.
//! - [`ledger`]: per block, what was issued, acknowledged, flushed and fenced;
//!   [`ledger::BlockModel::check`] is the invariant every read is held to.
//! - [`rng`]: the seeded generator both use (deterministic runs and replays).
//!
//! Shared by the deterministic simulator (`ballast-sim`) and the fault-injection
//! cluster suite (`tests/faults.rs`), so both check exactly the same rule.

pub mod ledger;
pub mod pattern;
pub mod rng;

pub use ledger::{BlockModel, Mismatch};
pub use pattern::Seen;
