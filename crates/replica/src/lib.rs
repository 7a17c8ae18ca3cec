//! The replica side of Ballast's data path: a TCP server that turns wire frames
//! into chunk-store calls, and the client the volume front end uses to reach it.
//!
//! It owns: request validation (payload length vs op, ranges handed to the
//! store), the one mapping from store errors to wire status codes, per-connection
//! pipelining and backpressure, and the client's connection pool, request ids and
//! timeouts. Epoch fencing itself is kept by the chunk store (atomic with
//! announce); this crate carries every request's epoch to it unchanged. It must
//! not depend on tonic, openraft or redb: a metadata election must never stall I/O.
//!
//! ```text
//!  front end                         replica node
//!  ReplicaClient ══ TCP (ballast-wire frames, pipelined) ══► ReplicaServer
//!   n connections, round robin         per connection:
//!   req id → waiter                      reader ─► spawn per request ─► ChunkStore
//!                                          ▲ (cap in flight:               │
//!                                          │  stop reading when full)      ▼
//!   ◄══════════════ responses (any order) ═══════════ writer (batched writev)
//! ```

mod client;
mod io;
mod server;

pub use ballast_wire::{Op, ResyncEntry, ResyncKind, ResyncResult, Status, WireError, MAX_RESYNC_BLOCKS};
pub use client::{ClientError, ClientOptions, ReplicaClient};
pub use server::{status_of, ReplicaServer, ServerOptions};
