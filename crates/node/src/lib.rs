//! The storage node's agent: everything a node does besides serving its disk.
//!
//! A storage node (`ballast node`) serves its disk's chunk store over the
//! data-path protocol; this agent, beside that replica server, registers the
//! node with the metadata service (zone, address, capacity), heartbeats, runs
//! the copy jobs meta assigns to it, and reclaims chunk replicas meta no longer
//! lists on it.
//!
//! ```text
//!   meta ◄── register, heartbeat (→ jobs), report job ──  agent ── resync_chunk ──► source replica
//!                                                           │                       (data-path protocol)
//!   front ends ──── data-path protocol ────► replica server ┴─ chunk store (this disk)
//! ```
//! The data path never waits for meta: the replica server runs whether or not
//! meta answers.
//!
//! What runs where, so that the heartbeat keeps its cadence (a late heartbeat
//! makes meta suspect the node, then rebuild its replicas elsewhere):
//!
//! ```text
//!   heartbeat task   register, then every interval: disk verdict + used bytes ──► meta, jobs ◄──
//!   ├─ probe thread  DiskProbe: statvfs, write + fdatasync + read back (DiskMonitor; at most one)
//!   ├─ job tasks     run_job per assigned job (at most one per job id)
//!   ├─ fill tasks    a front end per detached clone meta names (at most one per clone)
//!   └─ GC task       Gc::pass every gc_every: a layout per volume from meta, then deletes
//! ```
//!
//! - [`agent`](mod@agent) ([`agent()`], [`AgentConfig`]): registration and the heartbeat
//!   loop; it starts the GC task and the job tasks, and one stop signal ends
//!   them all.
//! - [`disk`] ([`DiskProbe`], [`DiskMonitor`], [`DiskReport`], [`DiskVerdict`],
//!   [`fs_capacity`]): every heartbeat carries the verdict of a disk probe; a
//!   node whose disk fails or fills up (below its reserve) keeps heartbeating,
//!   and meta moves its replicas away instead of resyncing them in place forever.
//! - [`jobs`] ([`run_job`]): copies one chunk from an in-sync source into this
//!   node's replica and reports the outcome.
//! - [`gc`] ([`Gc`]): deletes a replica meta no longer lists here once two
//!   passes in a row agree;
//! - `fill`: fills the detached clones meta names in heartbeat answers, each
//!   through a front end attached as the clone's background filler, until
//!   it is independent of its source or someone else attaches it;
//! - [`metrics`] ([`NodeMetrics`], given through [`AgentConfig::metrics`]): the
//!   disk's health and space, heartbeats, copy jobs, their bytes and
//!   throttle waits, as Prometheus series per node.
//!
//! The CLI flags and the wiring of a node (node id, zone, CSI) are the server
//! binary's (`src/node.rs`); this crate is a library and reports errors as
//! typed values.

pub mod agent;
pub mod disk;
pub(crate) mod fill;
pub mod gc;
pub mod jobs;
pub mod metrics;

pub use agent::{agent, AgentConfig};
pub use disk::{fs_capacity, CapacityError, DiskMonitor, DiskProbe, DiskReport, DiskVerdict, ProbeFn, PROBE_TIMEOUT};
pub use gc::Gc;
pub use jobs::run_job;
pub use metrics::{NodeMetrics, NodeSeries};
