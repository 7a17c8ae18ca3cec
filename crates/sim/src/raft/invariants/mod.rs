//! What the Raft simulation checks, one file per invariant (numbered as in
//! the module docs of `raft`):
//!
//! 1. [`acked_writes`]: no acknowledged write is lost;
//! 2. [`state_machine_safety`]: the members' committed entries and applied
//!    states agree;
//! 3. [`leaders`]: a member acting as leader holds a committed vote naming
//!    itself (terms with two leaders are counted, as openraft 0.9 allows them);
//! 4. [`meta_state`]: every applied [`ballast_meta::MetaState`] keeps its
//!    structural invariants.

pub(super) mod acked_writes;
pub(super) mod leaders;
pub(super) mod meta_state;
pub(super) mod state_machine_safety;

/// FNV-1a of a value's JSON.
fn json_hash<T: serde::Serialize>(v: &T) -> u64 {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
