//! ballast-sim: a deterministic simulation of the replication protocol
//! (docs/DESIGN.md, 5.2 "Replication protocol"), explored by seed.
//!
//! # What is real, what is simulated
//!
//! - **Real**: the front end under test, [`ballast_frontend::Volume`] (fan-out,
//!   ejection before acknowledgement, min-in-sync, fencing, read repair,
//!   attach-time announce and reconciliation of dirty chunks), with its
//!   `policy` module; and the metadata state machine
//!   [`ballast_meta::MetaState::apply`] (node registration, placement, attach
//!   epochs, ejections with versions and the min-in-sync rule, resync jobs).
//! - **Simulated**: the replica nodes ([`SimReplica`]: an in-memory model of
//!   the chunk store behind a replica server, with its epochs, per-block
//!   contexts, dirty marks, error replies and volatile/durable layers), the
//!   network between front end and replicas (per-request delay, loss of the
//!   request or of the reply, reordering, partitions), the metadata service
//!   around the state machine ([`SimMembership`]: commit latency, outages,
//!   lost replies), the background resync (an instantaneous copy, see below), and
//!   the clock: everything runs on a current-thread tokio runtime with paused
//!   time, so a run is a function of its seed and takes milliseconds of real
//!   time for minutes of virtual time. Real sockets, threads and io_uring
//!   would make the interleaving depend on the OS; that is what the cluster
//!   tests cover.
//!
//! # Fault model (rates in [`FaultRates`])
//!
//! - per replica request: random delay (reordering), a slow tail beyond the
//!   front end's deadline (timeouts, late application), request dropped,
//!   reply dropped (the request applied);
//! - replica process crash (connections drop, completed writes survive) and
//!   power cut (each block written since the last flush independently
//!   survives or reverts), later restart; partition (requests vanish, the
//!   deadline fires), later healed. At most one node is faulty at a time
//!   (with three replicas and min-in-sync two, two faulty nodes only test
//!   unavailability);
//! - metadata outages (every call `Unavailable`) and lost replies (the command
//!   committed, the caller hears `Unavailable`);
//! - front-end crash mid-flight (its tasks aborted; its requests already sent
//!   still arrive) followed by a new attach; or a stalled front end that
//!   survives a new attach and then tries to write (it must be fenced).
//!
//! Between client batches, an ejected replica on a healthy node is resynced:
//! the state machine's `StartJob`, the front end follows the layout (the real
//! `Volume::apply_layout`), an instantaneous copy of a healthy in-sync
//! replica, `FinishJob`, the front end follows again: the simulator's
//! stand-in for `ballast-resync`, which is not under test here. Announce
//! requests get random faults like every other request (the front end walks its
//! nodes in id order, so they replay exactly).
//!
//! Snapshots: now and then a batch takes one amid its client writes (the
//! real `Volume::snapshot`: drain, cut, SetCuts to every replica node,
//! recorded by [`SimMembership`]), and with two alive the oldest is deleted;
//! the simulated replicas keep the versions a cut sees (see [`SimReplica`]).
//!
//! # Invariant (checked after every read, and for every block at the end)
//!
//! For each volume block, with `acked` the version of its last acknowledged
//! write (0: none; writes to one block are never concurrent in the workload):
//! a read returns this block's own data (never another block's, never torn
//! or corrupt bytes, never zeros unless nothing was acknowledged), of
//! version `acked` or of a later issued write (in flight, or failed and
//! possibly applied), never an older one, and never one written by a fenced
//! front end. A fenced front end's write never succeeds. After the run every
//! fault is healed, a fresh front end attaches, and every block is read and
//! checked the same way: every acknowledged write (flushed or not, since at
//! most one replica loses power at a time and reconciliation restores it)
//! survives. And every block of every snapshot still recorded, read back
//! through that front end, holds a version at or above the one last
//! acknowledged when the snapshot was requested and no version issued after
//! it was taken (nor a fenced front end's).
//!
//! The metadata state meanwhile keeps its own invariants: after every command
//! applied ([`SimMembership`] and the resync driver), the run checks
//! [`ballast_meta::MetaState::check_invariants`], as the meta crate's property
//! tests and the Raft simulation do.
//!
//! # Found and fixed
//!
//! With late delivery (a request may apply after the front end's deadline, as
//! a request stuck in a replica's queue or disk does) the store used to lose an
//! acknowledged, flushed write: a write timed out on an in-sync replica that
//! could not be ejected (it would leave fewer than min-in-sync, so the write
//! failed instead); the next write to the same blocks was acknowledged by that
//! replica; then the late request applied over it, because the store applied
//! writes in arrival order, and reads from that replica returned the older
//! version. Seed 7 reproduced it. The store now keeps a block whose seq is at
//! or above an incoming write's (`ChunkStore::begin_mutation`), the simulated
//! replica follows the same rule, and seed 7 is a regression test
//! (`late_write_after_timeout_keeps_the_newer_block`). Late delivery is on in
//! the default fault rates.
//!
//! # Not modelled (yet)
//!
//! Trim and write-zeroes (not in the workload); torn blocks that match
//! neither context slot after a power cut; read-repair triggers (no
//! checksum errors are injected); two faulty nodes at once; random faults on
//! `announce_epoch`; concurrent writes to one block; a partitioned front end
//! (only nodes are partitioned); resync copies concurrent with client writes
//! (the copy is instantaneous, between batches); volume growth; meta
//! leadership changes beyond outages and lost replies.
//!
//! # The metadata service's Raft layer
//!
//! [`raft`] runs three or five real openraft members over the real redb log
//! store and state machine of `ballast-meta`, connected by a simulated network
//! (delay, reordering, loss, partitions), with member crashes and restarts from
//! their redb directories, and checks that no acknowledged write is lost and
//! that the members' applied logs and states agree. See its docs for what
//! replays exactly.
//!
//! # Commands
//!
//! ```text
//! cargo test --release -p ballast-sim                  # the CI seed set
//! BALLAST_SIM_SEED=1234 cargo test --release -p ballast-sim replay -- --nocapture
//! cargo run --release -p ballast-sim --example explore -- --seeds 0..100000 [--fault-rate 1.5] [--steps 300] [--late-delivery]
//! cargo run --release -p ballast-sim --example raft -- --seeds 0..2000 [--members 5] [--fault-rate 2]
//! ```
//!
//! A violation's message names the seed, the step, the block, what was
//! expected and what was read, the replay command (with the fault rate, steps
//! and late delivery of the failing run) and the last trace lines.

mod meta;
pub mod raft;
mod replica;
mod sim;
pub use ballast_verify::{pattern, rng};
pub mod trace;

use std::time::Duration;

pub use meta::{layout, replica_set, SimMembership};
pub use replica::SimReplica;
pub use sim::run_seed;

/// Probabilities of the injected faults. Network ones apply per replica
/// request; event ones per workload step.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultRates {
    /// A request never arrives.
    pub drop_request: f64,
    /// A request applies but its reply never arrives.
    pub drop_reply: f64,
    /// A request or reply takes up to `slow_delay_ms` instead of `max_delay_ms`.
    pub slow: f64,
    /// Usual one-way delay bound.
    pub max_delay_ms: u64,
    /// Slow-tail one-way delay bound (above the front end's deadline: timeouts,
    /// and requests applied after their caller gave up).
    pub slow_delay_ms: u64,
    /// Whether a request whose delivery takes longer than the front end's
    /// deadline still applies (after the caller gave up), as a request stuck in
    /// a replica's queue does. On by default (see the crate docs, "Found and
    /// fixed").
    pub late_delivery: bool,
    /// A committed metadata command's reply is lost.
    pub meta_lost_reply: f64,
    /// Per step: a replica process crashes.
    pub crash: f64,
    /// Per step: a replica loses power.
    pub power_cut: f64,
    /// Per step: a replica is partitioned away.
    pub partition: f64,
    /// Per step: the faulty replica comes back (restart, heal).
    pub recover: f64,
    /// Per step: the metadata service goes down (or, if down, comes back at
    /// four times this rate).
    pub meta_outage: f64,
    /// Per step: the front end crashes (or stalls) and a new one attaches.
    pub frontend_crash: f64,
    /// Per step: a resync job brings one ejected replica on a healthy node
    /// back (not a fault: the repair that keeps a long run writable).
    pub resync: f64,
}

impl FaultRates {
    /// No faults at all.
    pub fn none() -> FaultRates {
        FaultRates {
            drop_request: 0.0,
            drop_reply: 0.0,
            slow: 0.0,
            max_delay_ms: 2,
            slow_delay_ms: 2,
            late_delivery: false,
            meta_lost_reply: 0.0,
            crash: 0.0,
            power_cut: 0.0,
            partition: 0.0,
            recover: 0.0,
            meta_outage: 0.0,
            frontend_crash: 0.0,
            resync: 0.0,
        }
    }

    /// Every probability multiplied by `factor` (delays unchanged).
    pub fn scaled(&self, factor: f64) -> FaultRates {
        let s = |p: f64| (p * factor).clamp(0.0, 1.0);
        FaultRates {
            drop_request: s(self.drop_request),
            drop_reply: s(self.drop_reply),
            slow: s(self.slow),
            meta_lost_reply: s(self.meta_lost_reply),
            crash: s(self.crash),
            power_cut: s(self.power_cut),
            partition: s(self.partition),
            recover: self.recover,
            meta_outage: s(self.meta_outage),
            frontend_crash: s(self.frontend_crash),
            ..self.clone()
        }
    }
}

impl Default for FaultRates {
    fn default() -> FaultRates {
        FaultRates {
            drop_request: 0.004,
            drop_reply: 0.004,
            slow: 0.004,
            max_delay_ms: 3,
            slow_delay_ms: 1500,
            late_delivery: true,
            meta_lost_reply: 0.05,
            crash: 0.02,
            power_cut: 0.015,
            partition: 0.015,
            recover: 0.15,
            meta_outage: 0.02,
            frontend_crash: 0.02,
            resync: 0.15,
        }
    }
}

/// One run's parameters (the seed is separate).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Workload steps (each a batch of client operations or a fault).
    pub steps: usize,
    /// The fault rates used are `rates.scaled(fault_rate)`.
    pub rates: FaultRates,
    pub fault_rate: f64,
    /// The front end's per-request deadline (virtual time).
    pub io_timeout: Duration,
    /// Keep the trace lines (for printing); the hash is always computed.
    pub keep_trace: bool,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            steps: 300,
            rates: FaultRates::default(),
            fault_rate: 1.0,
            io_timeout: Duration::from_secs(1),
            keep_trace: false,
        }
    }
}

/// What a run did (all of it a function of the seed).
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub trace_hash: u64,
    pub events: u64,
    pub acked_writes: u64,
    pub failed_ops: u64,
    pub reads_checked: u64,
    pub attaches: u64,
    pub fenced_attempts: u64,
    pub replica_faults: u64,
    /// Snapshots the front end took, and their blocks checked at the end.
    pub snapshots: u64,
    pub snapshot_blocks_checked: u64,
    /// On a clone: the blocks its source image holds (0: not a clone).
    pub clone_source_blocks: u64,
    pub virtual_time: Duration,
    /// The trace lines, when [`SimConfig::keep_trace`] was set.
    pub trace: Vec<String>,
}

/// The command that replays `seed` under `cfg` with its trace printed (the
/// fault rates are given as [`SimConfig::fault_rate`] times the defaults,
/// [`FaultRates::late_delivery`] and [`SimConfig::steps`]).
pub fn replay_command(seed: u64, cfg: &SimConfig) -> String {
    let d = SimConfig::default();
    let mut env = format!("BALLAST_SIM_SEED={seed}");
    if cfg.fault_rate != d.fault_rate {
        env += &format!(" BALLAST_SIM_FAULT_RATE={}", cfg.fault_rate);
    }
    if cfg.steps != d.steps {
        env += &format!(" BALLAST_SIM_STEPS={}", cfg.steps);
    }
    if cfg.rates.late_delivery != d.rates.late_delivery {
        env += if cfg.rates.late_delivery { " BALLAST_SIM_LATE_DELIVERY=1" } else { " BALLAST_SIM_LATE_DELIVERY=0" };
    }
    format!("{env} cargo test --release -p ballast-sim replay -- --nocapture")
}

impl SimConfig {
    /// The configuration a replay command names: the defaults, overridden by
    /// `BALLAST_SIM_FAULT_RATE`, `BALLAST_SIM_STEPS` and
    /// `BALLAST_SIM_LATE_DELIVERY` (`1` or `0`).
    pub fn from_env() -> SimConfig {
        let mut cfg = SimConfig::default();
        let var = |k: &str| std::env::var(k).ok();
        if let Some(r) = var("BALLAST_SIM_FAULT_RATE").and_then(|v| v.parse().ok()) {
            cfg.fault_rate = r;
        }
        if let Some(s) = var("BALLAST_SIM_STEPS").and_then(|v| v.parse().ok()) {
            cfg.steps = s;
        }
        if let Some(v) = var("BALLAST_SIM_LATE_DELIVERY") {
            cfg.rates.late_delivery = v == "1";
        }
        cfg
    }
}

/// A broken invariant, with everything needed to replay it.
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "seed {seed}, step {step}: {what}; block {block}: expected {expected}, got {got}\n  replay: {replay}\n  last trace lines:\n    {}",
    trace_tail.join("\n    ")
)]
pub struct Violation {
    pub seed: u64,
    pub step: usize,
    pub what: String,
    pub block: u64,
    pub expected: String,
    pub got: String,
    /// The command that replays the run.
    pub replay: String,
    /// The last trace lines before the violation (only when the trace was kept).
    pub trace_tail: Vec<String>,
    /// The whole trace up to the violation (only when the trace was kept).
    pub trace: Vec<String>,
}
