//! The client side of the Ballast metadata service.
//!
//! [`MetaClient`]: typed calls for every Admin and NodeApi rpc over the list of
//! members, with failover to the next member and bounded retry when a member is
//! down or has no leader (any member serves any call: followers proxy writes to
//! the leader). [`MetaClientError`] groups what a call can end in by what the
//! caller should do about it.
//!
//! This crate is control plane only: it links tonic and the generated messages,
//! but neither openraft, the service itself, nor any data-path crate
//! (`./scripts/lint` checks it). The front end's meta-backed membership lives in
//! `ballast-metavolume`, which depends on this crate.

mod client;
mod error;

pub use ballast_tls::Security;
pub use client::{parse_endpoints, MetaClient, MetaClientOptions, SNAPSHOT_READY_POLL};
pub use error::MetaClientError;

/// The generated message types the client's methods take and return.
pub use ballast_proto::v1 as pb;
