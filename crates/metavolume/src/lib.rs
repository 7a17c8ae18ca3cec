//! A front end attached through the metadata service.
//!
//! - [`MetaMembership`]: the front end's [`ballast_frontend::Membership`] on top of
//!   a [`MetaClient`] (attach by volume name, eject, layout, ack of a layout
//!   generation), with [`membership_error`] mapping meta's gRPC answers to the
//!   front end's errors.
//! - [`AttachedVolume`]: the volume, the task that follows its layout
//!   ([`follow_layout`]), optionally the scrubber, and a clean detach. `ballast
//!   export --meta`, `ballast dev` and the CSI node service attach this way.
//! - [`SnapshotDevice`]: a ready snapshot as a read-only block device, read
//!   from the replicas without attaching the volume (`ballast export --snapshot`).
//! - [`layout_from_proto`] and friends: the layout messages as front-end types.
//!
//! Dependency direction: this crate is where the data path (frontend, replica)
//! meets the control plane (metaclient); neither of those links the other.

mod attached;
mod convert;
mod membership;
mod snapshot_device;

pub use attached::{
    detach_lease, follow_layout, sync_snapshots, AttachError, AttachOptions, AttachedVolume, MetaVolume, LAYOUT_POLL,
};
/// The front end's metric families [`AttachOptions::metrics`] takes.
pub use ballast_frontend::VolumeMetrics;
/// The scrub schedule [`AttachedVolume::with_scrub`] takes, and what a pass reports.
pub use ballast_frontend::{ScrubConfig, ScrubReport};
pub use ballast_metaclient::MetaClient;
pub use convert::{
    layout_from_proto, replica_from_proto, replica_set_from_proto, snapshots_from_proto, ConversionError,
    LayoutSnapshots,
};
pub use membership::{membership_error, MetaMembership, SnapshotPlan};
pub use snapshot_device::{SnapshotDevice, SnapshotDeviceError};
