//! The client side of the Ballast metadata service.
//!
//! - [`MetaClient`]: typed calls for every Admin and NodeApi rpc over the list of
//!   members, with failover to the next member and bounded retry when a member
//!   is down or has no leader (any member serves any call: followers proxy
//!   writes to the leader).
//! - [`MetaMembership`]: the front end's [`ballast_frontend::Membership`] on top
//!   of it (attach by volume name, eject, layout, ack of a layout generation).
//! - [`layout_from_proto`] and friends: the layout messages as front-end types.
//!
//! This crate links tonic but neither openraft nor the service itself, so
//! storage nodes and tools use the metadata service without carrying it.

mod attached;
mod client;
mod convert;
mod error;
mod membership;

pub use attached::{detach_lease, follow_layout, AttachError, AttachedVolume, MetaVolume, LAYOUT_POLL};
/// The scrub schedule [`AttachedVolume::with_scrub`] takes, and what a pass reports.
pub use ballast_frontend::{ScrubConfig, ScrubReport};
pub use client::{parse_endpoints, MetaClient, MetaClientOptions};
pub use convert::{layout_from_proto, replica_from_proto, replica_set_from_proto, ConversionError};
pub use error::MetaClientError;
pub use membership::{membership_error, MetaMembership};

/// The generated message types the client's methods take and return.
pub use ballast_proto::v1 as pb;
