//! A front end attached through the metadata service: the volume, the task that
//! follows its layout, optionally the task that scrubs it, and a clean detach. `ballast export --meta`, `ballast dev`
//! and the CSI node service all attach volumes this way.

use std::sync::Arc;
use std::time::Duration;

use ballast_frontend::{
    scrub_periodically, tcp_connector, FrontendError, MembershipError, ScrubConfig, ScrubReport, Volume, VolumeMetrics,
    VolumeOptions,
};
use ballast_replica::{ClientOptions, ReplicaClient};
use ballast_types::NodeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

use ballast_metaclient::{pb, MetaClient, MetaClientError};

use crate::{LayoutSnapshots, MetaMembership};

/// The front end with the metadata service as its membership.
pub type MetaVolume = Volume<Arc<MetaMembership>, ReplicaClient>;

/// How often an attached front end asks meta for a newer layout. A copy job waits
/// for the front end to acknowledge its target, so this bounds that wait; the
/// poll is a local read on any member.
pub const LAYOUT_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("look up volume {name:?}: {source}")]
    Lookup { name: String, source: MetaClientError },
    #[error("attach volume {name:?}: {source}")]
    Attach { name: String, source: FrontendError },
}

impl AttachError {
    /// True when the volume does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AttachError::Lookup { source, .. } if source.is_not_found())
    }

    /// True when meta refused the attach for good (the volume is published to
    /// another node): retrying will not help.
    pub fn is_refused(&self) -> bool {
        matches!(self, AttachError::Attach { source: FrontendError::Membership(MembershipError::Refused(_)), .. })
    }
}

/// How [`AttachedVolume::attach_with`] attaches.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// Per-replica I/O timeout of the front end. Default: 10 s.
    pub io_timeout: Duration,
    /// How often the layout is polled. Default: [`LAYOUT_POLL`].
    pub poll: Duration,
    /// The process's front-end metric families: the volume's series (label
    /// `volume`, its name) exist from the attach to the detach, with the layout
    /// generation the follower installed. None: no metrics. Default: None.
    pub metrics: Option<VolumeMetrics>,
    /// Attach as a clone's background filler ([`MetaMembership::to_fill`]).
    /// Default: false.
    pub to_fill: bool,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions { io_timeout: Duration::from_secs(10), poll: LAYOUT_POLL, metrics: None, to_fill: false }
    }
}

/// An attached volume whose layout is followed (and, with
/// [`AttachedVolume::with_scrub`], which is scrubbed) until
/// [`AttachedVolume::detach`].
pub struct AttachedVolume {
    volume: Arc<MetaVolume>,
    membership: Arc<MetaMembership>,
    meta: MetaClient,
    stop: watch::Sender<bool>,
    follower: JoinHandle<()>,
    scrubber: Option<JoinHandle<()>>,
    /// The last scrub pass's report (None before the first one ends).
    scrub_reports: watch::Sender<Option<ScrubReport>>,
}

impl AttachedVolume {
    /// Attaches volume `name` as node `node` (a new epoch: older front ends are
    /// fenced) and starts following its layout every `poll`. No metrics; see
    /// [`AttachedVolume::attach_with`].
    pub async fn attach(
        meta: MetaClient,
        name: &str,
        node: NodeId,
        io_timeout: Duration,
        poll: Duration,
    ) -> Result<AttachedVolume, AttachError> {
        let options = AttachOptions { io_timeout, poll, metrics: None, to_fill: false };
        AttachedVolume::attach_with(meta, name, node, options).await
    }

    /// [`AttachedVolume::attach`] with `options` (the front end's metrics among
    /// them: the detach removes the volume's series).
    pub async fn attach_with(
        meta: MetaClient,
        name: &str,
        node: NodeId,
        options: AttachOptions,
    ) -> Result<AttachedVolume, AttachError> {
        let AttachOptions { io_timeout, poll, metrics, to_fill } = options;
        let membership = MetaMembership::new(meta.clone(), name, node);
        let membership = Arc::new(if to_fill { membership.to_fill() } else { membership });
        let id = membership
            .resolve_volume_id()
            .await
            .map_err(|source| AttachError::Lookup { name: name.to_string(), source })?;
        let client =
            ClientOptions { timeout: io_timeout, security: meta.security().clone(), ..ClientOptions::default() };
        let options = VolumeOptions { local_node: Some(node), io_timeout, metrics, ..VolumeOptions::default() };
        let volume = Volume::attach(membership.clone(), tcp_connector(client), id, options)
            .await
            .map_err(|source| AttachError::Attach { name: name.to_string(), source })?;
        let (stop, stopped) = watch::channel(false);
        let span = tracing::info_span!("follow_layout", volume = %id, epoch = %volume.epoch());
        let follower = tokio::spawn(follow_layout(volume.clone(), membership.clone(), poll, stopped).instrument(span));
        let (scrub_reports, _) = watch::channel(None);
        Ok(AttachedVolume { volume, membership, meta, stop, follower, scrubber: None, scrub_reports })
    }

    /// Scrubs the volume on `config`'s schedule (see
    /// [`ballast_frontend::scrub_periodically`]: first pass one interval from
    /// now) until detach or drop; replaces a schedule started before. Each
    /// pass's totals are logged (`scrub pass done volume=.. bytes=.. corrupt=..
    /// repaired=.. unrepairable=..`) and kept: [`AttachedVolume::last_scrub`],
    /// [`AttachedVolume::scrub_reports`].
    pub fn with_scrub(mut self, config: ScrubConfig) -> Self {
        if let Some(old) = self.scrubber.take() {
            old.abort();
        }
        let span = tracing::info_span!("scrub_schedule", volume = %self.volume.id(), epoch = %self.volume.epoch());
        let task = scrub_periodically(self.volume.clone(), config, self.scrub_reports.clone()).instrument(span);
        self.scrubber = Some(tokio::spawn(task));
        self
    }

    /// The report of the last completed scrub pass (None before the first).
    pub fn last_scrub(&self) -> Option<ScrubReport> {
        self.scrub_reports.borrow().clone()
    }

    /// Every scrub pass's report as it completes (`changed()` wakes once per pass).
    pub fn scrub_reports(&self) -> watch::Receiver<Option<ScrubReport>> {
        self.scrub_reports.subscribe()
    }

    pub fn volume(&self) -> &Arc<MetaVolume> {
        &self.volume
    }

    /// Fetches the layout now and installs it if newer (what the follower does
    /// every poll): after a resize, the new size is served when this returns.
    pub async fn refresh(&self) -> Result<u64, FrontendError> {
        let (_, layout) = self.membership.layout().await?;
        self.volume.apply_layout(&layout).await
    }

    /// Stops following and scrubbing, flushes, stops I/O (the volume's metric
    /// series go with it) and releases the attach lease (best effort: a lease left behind only delays copy jobs
    /// until the next attach). A scrub pass is cut short between two requests;
    /// a repair it had in flight only rewrote a piece with its current content.
    pub async fn detach(mut self) -> Result<(), ballast_blockdev::BlockError> {
        let _ = self.stop.send(true);
        let _ = (&mut self.follower).await;
        if let Some(scrubber) = self.scrubber.take() {
            scrubber.abort();
            let _ = scrubber.await;
        }
        // A server that already stopped the volume flushed it then.
        let flushed = match self.volume.is_stopped() {
            true => Ok(()),
            false => ballast_blockdev::BlockDev::flush(&*self.volume).await,
        };
        self.volume.close();
        detach_lease(&self.meta, &self.volume).await;
        flushed
    }
}

/// Dropped without [`AttachedVolume::detach`] (a failed teardown): the follower
/// and the scrubber stop, so nothing keeps the front end alive; its lease stays
/// until the next attach (which fences it) or a detach.
impl Drop for AttachedVolume {
    fn drop(&mut self) {
        self.follower.abort();
        if let Some(scrubber) = &self.scrubber {
            scrubber.abort();
        }
    }
}

/// Releases the attach lease after a clean stop (best effort).
pub async fn detach_lease(meta: &MetaClient, volume: &MetaVolume) {
    let req = pb::DetachRequest { volume: volume.id().0, epoch: volume.epoch().0 };
    match meta.detach(req).await {
        Ok(_) => info!(volume = %volume.id(), epoch = %volume.epoch(), "detached"),
        Err(e) => warn!(volume = %volume.id(), error = %e, "detach failed"),
    }
}

/// Follows the volume's layout while it is attached: every `every`, fetches it
/// from meta, installs a newer generation into the front end (which returns only
/// once writes go to the new targets, see `Volume::apply_layout`), and then
/// acknowledges the generation, which lets meta's copy jobs start. Then the
/// snapshots the layout shows ([`sync_snapshots`]). Meta being unreachable only
/// delays this; I/O goes on.
pub async fn follow_layout(
    volume: Arc<MetaVolume>,
    membership: Arc<MetaMembership>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut applied = 0u64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        // A stopped volume (closed, or fenced by a newer front end) serves
        // nothing again: there is no layout left to follow.
        if volume.is_stopped() {
            info!("volume stopped: no longer following its layout");
            return;
        }
        let (gen, layout, snapshots) = match membership.layout_and_snapshots().await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "layout poll failed");
                continue;
            }
        };
        if gen <= applied {
            sync_snapshots(&volume, &membership, gen, &snapshots).await;
            continue;
        }
        match volume.apply_layout(&layout).await {
            Ok(changed) => {
                if changed > 0 {
                    info!(gen, changed, "new layout installed");
                }
                match membership.ack_layout(volume.epoch(), gen).await {
                    Ok(()) => {
                        applied = gen;
                        volume.set_layout_generation(gen);
                    }
                    Err(e) => warn!(gen, error = %e, "layout acknowledgement failed; retrying"),
                }
            }
            Err(e) => warn!(gen, error = %e, "installing the new layout failed; retrying"),
        }
        // After the layout: a new cut also goes to a new rebuild target.
        sync_snapshots(&volume, &membership, gen, &snapshots).await;
    }
}

/// Brings the volume's snapshot cuts in line with a layout at generation
/// `gen` (see [`MetaMembership::plan_snapshots`]): drops the cuts of deleted
/// snapshots (their space is reclaimed on every replica), then takes one
/// snapshot for every pending request. A failure is retried at the next poll.
pub async fn sync_snapshots(volume: &MetaVolume, membership: &MetaMembership, gen: u64, shown: &LayoutSnapshots) {
    let kept = volume.snapshots().await;
    let plan = membership.plan_snapshots(gen, shown, &kept);
    for cut in plan.drop {
        match volume.delete_snapshot(cut).await {
            Ok(()) => info!(%cut, gen, "snapshot deleted in meta: its cut dropped from the replicas"),
            Err(e) => warn!(%cut, error = %e, "dropping a deleted snapshot's cut failed; retrying"),
        }
    }
    if plan.take {
        match volume.snapshot().await {
            Ok(t) => info!(
                cut = %t.cut, requests = ?shown.pending, stall_us = t.stall.as_micros() as u64,
                "snapshot taken for meta's pending requests"
            ),
            Err(e) => warn!(requests = ?shown.pending, error = %e, "taking a requested snapshot failed; retrying"),
        }
    }
}
