//! [`MetaMembership`]: the front end's [`Membership`] backed by the metadata
//! service. One per attached volume: it attaches by the volume's NAME on behalf
//! of the local node and remembers the volume id the service answers with.
//!
//! Snapshots: meta holds the records; the front end takes the pending ones
//! and keeps exactly the ready ones' cuts on the replicas. The layout poll
//! ([`crate::follow_layout`]) asks [`MetaMembership::plan_snapshots`] what to
//! do with the snapshots a polled layout shows, and then calls the volume's
//! `snapshot` / `delete_snapshot`, which come back here through
//! [`Membership::set_snapshots`]:
//! - a new cut is committed with the requests it serves (NodeApi.CommitSnapshots);
//! - a cut is dropped only when the plan allowed it: a layout at or above the
//!   generation at which meta had the cut no longer shows it, so the snapshot
//!   was deleted, not merely unseen by a lagging member (meta raises the
//!   generation on every snapshot change);
//! - a commit whose answer was lost (meta unreachable, a timeout) may have
//!   been applied: its cut is kept as if committed, and dropped only once a
//!   layout shows it and later one no longer does (or at the next attach,
//!   which installs exactly meta's cuts). Dropping it early could lose a
//!   snapshot meta calls ready; keeping it costs only space.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ballast_frontend::{Attachment, EjectReason, Membership, MembershipError, ReplicaSet, VolumeLayout};
use ballast_metaclient::pb;
use ballast_types::{ChunkIdx, Epoch, NodeId, Seq, VolumeId};
use tracing::{info, info_span, warn, Instrument};

use crate::convert::{layout_from_proto, replica_set_from_proto, snapshots_from_proto, LayoutSnapshots};
use crate::snapshot_device::SnapshotDevice;
use ballast_blockdev::BlockDev;
use ballast_metaclient::{MetaClient, MetaClientError};
use ballast_replica::ClientOptions;
use bytes::{Bytes, BytesMut};

/// What the front end knows of its volume's snapshots in meta.
#[derive(Debug, Default)]
struct SnapshotSync {
    /// Per cut the front end keeps: the layout generation from which meta's
    /// layouts show it; `u64::MAX` while a commit's outcome is unknown.
    known: BTreeMap<Seq, u64>,
    /// The highest layout generation planned from: an older layout (a lagging
    /// member's) is not planned from.
    seen_gen: u64,
    /// The pending requests the next new cut serves.
    serving: Vec<u64>,
    /// The cuts the last plan found deleted in meta.
    deletable: Vec<Seq>,
}

/// What to do with the snapshots a polled layout shows
/// ([`MetaMembership::plan_snapshots`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotPlan {
    /// Take a snapshot: requests are pending (the volume's `snapshot`).
    pub take: bool,
    /// Cuts whose snapshots were all deleted (the volume's `delete_snapshot`).
    pub drop: Vec<Seq>,
}

/// The metadata service as one volume's membership provider.
pub struct MetaMembership {
    client: MetaClient,
    volume_name: String,
    node: NodeId,
    /// Learnt from the first attach (or [`MetaMembership::resolve_volume_id`]).
    /// A name re-used by a new volume after a delete gets a new id; the id
    /// pins this provider to the volume it first saw.
    volume_id: Mutex<Option<VolumeId>>,
    snapshots: Mutex<SnapshotSync>,
    /// A clone's origin snapshot (its name, from the attach's layout) and,
    /// once the first unfilled chunk is read, the read-only device over it.
    origin: Mutex<Option<String>>,
    parent: tokio::sync::OnceCell<SnapshotDevice>,
    /// Attaches as a clone's background filler (AttachRequest `to_fill`).
    to_fill: bool,
}

impl MetaMembership {
    /// `volume_name`: the volume to attach; `node`: the node this front end runs on.
    pub fn new(client: MetaClient, volume_name: impl Into<String>, node: NodeId) -> Self {
        MetaMembership {
            client,
            volume_name: volume_name.into(),
            node,
            volume_id: Mutex::new(None),
            snapshots: Mutex::new(SnapshotSync::default()),
            origin: Mutex::new(None),
            parent: tokio::sync::OnceCell::new(),
            to_fill: false,
        }
    }

    /// Attaches as a clone's background filler: refused while the volume is
    /// in use, taken over by any ordinary attach (crates/meta/src/clones.rs,
    /// "Filling detached clones").
    pub fn to_fill(mut self) -> Self {
        self.to_fill = true;
        self
    }

    pub fn volume_name(&self) -> &str {
        &self.volume_name
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn client(&self) -> &MetaClient {
        &self.client
    }

    /// The volume's id, once known.
    pub fn volume_id(&self) -> Option<VolumeId> {
        *self.volume_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, id: VolumeId) {
        *self.volume_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    /// The volume's id, looked up by name (Admin.InspectVolume) when not yet
    /// known. Front ends call this to learn the id they pass to
    /// `Volume::attach`, which attaches through this provider. The error keeps
    /// the service's answer (e.g. `volume "pg" not found`).
    pub async fn resolve_volume_id(&self) -> Result<VolumeId, MetaClientError> {
        const RPC: &str = "Admin.InspectVolume";
        if let Some(id) = self.volume_id() {
            return Ok(id);
        }
        let layout = self.client.inspect_volume(pb::InspectVolumeRequest { volume: self.volume_name.clone() }).await?;
        let id = match layout.volume {
            Some(v) if v.id != 0 => VolumeId(v.id),
            _ => return Err(MetaClientError::Malformed { rpc: RPC, message: "no volume in the layout".into() }),
        };
        self.remember(id);
        Ok(id)
    }

    fn known_id(&self) -> Result<VolumeId, MembershipError> {
        self.volume_id().ok_or_else(|| {
            MembershipError::Unavailable(format!("volume {:?} has not been attached yet", self.volume_name))
        })
    }

    /// The current layout and its generation (NodeApi.GetLayout, served by any
    /// member from its own copy: it may lag the leader by a heartbeat).
    pub async fn layout(&self) -> Result<(u64, VolumeLayout), MembershipError> {
        self.layout_and_snapshots().await.map(|(gen, layout, _)| (gen, layout))
    }

    /// [`MetaMembership::layout`] with the volume's snapshots.
    pub async fn layout_and_snapshots(&self) -> Result<(u64, VolumeLayout, LayoutSnapshots), MembershipError> {
        let id = self.resolve_volume_id().await.map_err(|e| membership_error(e, VolumeId(0), None))?;
        let layout = self
            .client
            .get_layout(pb::GetLayoutRequest { volume: id.0 })
            .instrument(info_span!("meta_get_layout", volume = %id))
            .await
            .map_err(|e| membership_error(e, id, None))?;
        let snapshots = snapshots_from_proto(&layout);
        let (gen, layout) =
            layout_from_proto(&layout).map_err(|e| MembershipError::Unavailable(format!("volume {id} layout: {e}")))?;
        Ok((gen, layout, snapshots))
    }

    /// What to do about the snapshots a layout at generation `gen` shows,
    /// given the cuts the volume keeps (see the module docs). Remembers the
    /// pending requests a new cut serves and the cuts that may be dropped.
    pub fn plan_snapshots(&self, gen: u64, shown: &LayoutSnapshots, kept: &[Seq]) -> SnapshotPlan {
        let mut sync = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        if gen < sync.seen_gen {
            // A lagging member's layout: older than what was planned from.
            return SnapshotPlan::default();
        }
        sync.seen_gen = gen;
        for cut in &shown.cuts {
            // Shown: its commit was applied (a lost answer is resolved here).
            match sync.known.get_mut(cut) {
                Some(from) => *from = (*from).min(gen),
                None if kept.contains(cut) => {
                    sync.known.insert(*cut, gen);
                }
                None => warn!(volume = self.volume_name, %cut, "meta shows a snapshot cut the front end does not keep"),
            }
        }
        let drop: Vec<Seq> = kept
            .iter()
            .copied()
            .filter(|c| !shown.cuts.contains(c) && sync.known.get(c).is_some_and(|from| *from <= gen))
            .collect();
        sync.deletable = drop.clone();
        sync.serving = shown.pending.clone();
        SnapshotPlan { take: !shown.pending.is_empty(), drop }
    }

    /// Tells the service that the attached front end (at `epoch`) now writes
    /// with layout generation `layout_gen` (NodeApi.AckLayout).
    pub async fn ack_layout(&self, epoch: Epoch, layout_gen: u64) -> Result<(), MembershipError> {
        let id = self.known_id()?;
        self.client
            .ack_layout(pb::AckLayoutRequest { volume: id.0, epoch: epoch.0, layout_gen })
            .instrument(info_span!("meta_ack_layout", volume = %id, epoch = %epoch, layout_gen))
            .await
            .map_err(|e| membership_error(e, id, None))?;
        Ok(())
    }
}

impl Membership for MetaMembership {
    /// Attaches by name. `volume` must be the volume's id (see
    /// [`MetaMembership::resolve_volume_id`]): a layout for another id (the name
    /// was deleted and re-created) is refused as [`MembershipError::UnknownVolume`].
    async fn attach(&self, volume: VolumeId) -> Result<Attachment, MembershipError> {
        if let Some(known) = self.volume_id() {
            if known != volume {
                return Err(MembershipError::UnknownVolume(volume));
            }
        }
        let span = info_span!("meta_attach", volume = %volume, name = %self.volume_name, node = %self.node);
        let resp = self
            .client
            .attach(pb::AttachRequest { volume: self.volume_name.clone(), node: self.node.0, to_fill: self.to_fill })
            .instrument(span)
            .await
            .map_err(|e| membership_error(e, volume, None))?;
        let layout = resp.layout.as_ref().ok_or_else(|| {
            MembershipError::Unavailable(format!("attach of {:?}: answer without a layout", self.volume_name))
        })?;
        // The ready snapshots' cuts, installed on every replica node before
        // the first write (a snapshot of a detached volume, or one cut when
        // the previous front end went away, exists only in meta until then).
        let snapshots = snapshots_from_proto(layout).cuts;
        let (gen, layout) = layout_from_proto(layout)
            .map_err(|e| MembershipError::Unavailable(format!("volume {volume} layout: {e}")))?;
        if layout.volume != volume {
            // The name now belongs to another volume. The attach raised that
            // volume's epoch, which fences nobody who should keep writing.
            return Err(MembershipError::UnknownVolume(volume));
        }
        self.remember(volume);
        *self.snapshots.lock().unwrap_or_else(|p| p.into_inner()) = SnapshotSync {
            known: snapshots.iter().map(|c| (*c, gen)).collect(),
            seen_gen: gen,
            ..SnapshotSync::default()
        };
        let epoch = Epoch(resp.epoch);
        let unfilled: Vec<ChunkIdx> =
            resp.layout.as_ref().map_or(Vec::new(), |l| l.unfilled.iter().map(|c| ChunkIdx(*c)).collect());
        let origin = resp.layout.as_ref().and_then(|l| l.volume.as_ref()).and_then(|v| v.origin.as_ref());
        if !unfilled.is_empty() {
            let name = origin.map(|o| o.snapshot_name.clone()).ok_or_else(|| {
                MembershipError::Unavailable(format!("volume {volume}: unfilled chunks without an origin snapshot"))
            })?;
            info!(volume = %volume, origin = %name, unfilled = unfilled.len(), "a clone still copying from its origin");
            *self.origin.lock().unwrap_or_else(|p| p.into_inner()) = Some(name);
        }
        info!(volume = %volume, name = %self.volume_name, epoch = %epoch, "attached through the metadata service");
        Ok(Attachment { epoch, layout, snapshots, unfilled })
    }

    async fn eject(
        &self,
        volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        node: NodeId,
        reason: EjectReason,
    ) -> Result<ReplicaSet, MembershipError> {
        let span = info_span!("meta_eject", volume = %volume, chunk = chunk.0, version, node = %node, %reason);
        let req =
            pb::EjectRequest { volume: volume.0, chunk: chunk.0, version, node: node.0, reason: reason.to_string() };
        let answer = self
            .client
            .eject(req)
            .instrument(span)
            .await
            .map_err(|e| membership_error(e, volume, Some((chunk, node))))?;
        if answer.index != chunk.0 {
            return Err(MembershipError::Unavailable(format!(
                "eject from chunk {chunk}: the service answered with chunk {}",
                answer.index
            )));
        }
        replica_set_from_proto(&answer)
            .map_err(|e| MembershipError::Unavailable(format!("eject from chunk {chunk}: {e}")))
    }

    /// Reads the clone's origin snapshot through a [`SnapshotDevice`] (from
    /// its volume's replicas, without attaching it); zeros past its size (a
    /// clone may be larger).
    async fn read_parent(&self, volume: VolumeId, offset: u64, len: u32) -> Result<Bytes, MembershipError> {
        let name = self.origin.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
            MembershipError::Refused(format!("volume {volume} is not a clone copying from a snapshot"))
        })?;
        let dev = self
            .parent
            .get_or_try_init(|| {
                SnapshotDevice::open(
                    self.client.clone(),
                    &name,
                    ClientOptions { security: self.client.security().clone(), ..ClientOptions::default() },
                )
            })
            .await
            .map_err(|e| MembershipError::Unavailable(format!("clone {volume}: opening its origin {name}: {e}")))?;
        let mut out = BytesMut::zeroed(len as usize);
        let end = (offset + u64::from(len)).min(dev.size());
        if offset < end {
            let data = dev
                .read(offset, (end - offset) as u32)
                .await
                .map_err(|e| MembershipError::Unavailable(format!("clone {volume}: reading its origin {name}: {e}")))?;
            out[..data.len()].copy_from_slice(&data);
        }
        Ok(out.freeze())
    }

    async fn chunks_filled(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        chunks: Vec<ChunkIdx>,
    ) -> Result<(), MembershipError> {
        let req =
            pb::FillChunksRequest { volume: volume.0, epoch: epoch.0, chunks: chunks.iter().map(|c| c.0).collect() };
        let span = info_span!("meta_fill_chunks", volume = %volume, epoch = %epoch, chunks = chunks.len());
        let answer =
            self.client.fill_chunks(req).instrument(span).await.map_err(|e| membership_error(e, volume, None))?;
        if answer.remaining == 0 {
            info!(volume = %volume, "clone filled: independent of its origin");
        }
        Ok(())
    }

    /// `cuts` is what the volume keeps from now on: the ones kept so far, plus
    /// a new cut (committed with the pending requests it serves), or minus
    /// cuts the last [`MetaMembership::plan_snapshots`] found deleted.
    async fn set_snapshots(&self, volume: VolumeId, epoch: Epoch, cuts: Vec<Seq>) -> Result<(), MembershipError> {
        let (added, serving) = {
            let sync = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
            let added: Vec<Seq> = cuts.iter().copied().filter(|c| !sync.known.contains_key(c)).collect();
            let dropped = sync.known.keys().filter(|c| !cuts.contains(c));
            if let Some(cut) = dropped.clone().find(|c| !sync.deletable.contains(c)) {
                return Err(MembershipError::Refused(format!(
                    "volume {volume}: snapshot cut {cut} is still in meta; delete the snapshot there (Admin.DeleteSnapshot)"
                )));
            }
            (added, sync.serving.clone())
        };
        let cut = match added[..] {
            [] => {
                let mut sync = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
                sync.known.retain(|c, _| cuts.contains(c));
                return Ok(());
            }
            [cut] if !serving.is_empty() => cut,
            [_] => {
                return Err(MembershipError::Refused(format!(
                    "volume {volume}: snapshots of a volume attached through meta are requested there \
                     (Admin.CreateSnapshot); the front end takes them from its layout"
                )))
            }
            _ => return Err(MembershipError::Refused(format!("volume {volume}: one new snapshot cut at a time"))),
        };
        let span = info_span!("meta_commit_snapshots", volume = %volume, epoch = %epoch, %cut, requests = ?serving);
        let req = pb::CommitSnapshotsRequest {
            volume: volume.0,
            epoch: epoch.0,
            snapshots: serving.clone(),
            cut: Some(pb::Seq { epoch: cut.epoch.0, counter: cut.counter }),
        };
        let from = match self.client.commit_snapshots(req).instrument(span).await {
            Ok(answer) => answer.layout_gen,
            Err(e) if commit_outcome_unknown(&e) => {
                warn!(volume = %volume, %cut, error = %e, "snapshot commit unanswered: keeping its cut until meta shows it, or an attach");
                u64::MAX
            }
            Err(e) => return Err(membership_error(e, volume, None)),
        };
        let mut sync = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        sync.known.insert(cut, from);
        sync.serving.retain(|id| !serving.contains(id));
        if from != u64::MAX {
            // A layout older than the commit still shows its requests pending:
            // planning from one would take a second, useless, snapshot.
            sync.seen_gen = sync.seen_gen.max(from);
        }
        info!(volume = %volume, %cut, requests = ?serving, layout_gen = from, "snapshot committed to meta");
        Ok(())
    }
}

/// Whether a failed commit may still have been applied: meta did not answer
/// (unreachable, a timeout, a leader change mid-call), as opposed to a refusal
/// from the state machine, which changes nothing.
fn commit_outcome_unknown(err: &MetaClientError) -> bool {
    use tonic::Code;
    match err {
        MetaClientError::Status { code, .. } => {
            !matches!(code, Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists)
        }
        _ => true,
    }
}

/// The front end's view of a failed call.
///
/// - NOT_FOUND → [`MembershipError::UnknownChunk`] when the message is about a
///   chunk and the call named one, else [`MembershipError::UnknownVolume`].
/// - FAILED_PRECONDITION on an eject → [`MembershipError::BelowMinInSync`], with
///   `remaining` and `min` parsed from the service's message ("... would leave
///   1 in-sync replicas, below the minimum of 2"); 0 when absent.
/// - FAILED_PRECONDITION on anything else (an attach while the volume is
///   published to another node) → [`MembershipError::Refused`].
/// - Unreachable and every other status → [`MembershipError::Unavailable`] with
///   the full message (the trait has no closer variant; the front end treats
///   them alike: the change was not made).
pub fn membership_error(err: MetaClientError, volume: VolumeId, eject: Option<(ChunkIdx, NodeId)>) -> MembershipError {
    match (&err, eject) {
        (MetaClientError::Status { code: tonic::Code::NotFound, message, .. }, Some((chunk, _)))
            if message.contains("chunk") =>
        {
            MembershipError::UnknownChunk { volume, chunk }
        }
        (MetaClientError::Status { code: tonic::Code::NotFound, .. }, _) => MembershipError::UnknownVolume(volume),
        (MetaClientError::Status { code: tonic::Code::FailedPrecondition, message, .. }, Some((chunk, node))) => {
            MembershipError::BelowMinInSync {
                chunk,
                node,
                remaining: number_after(message, "would leave ").unwrap_or(0),
                min: number_after(message, "minimum of ").unwrap_or(0),
            }
        }
        (MetaClientError::Status { code: tonic::Code::FailedPrecondition, message, .. }, None) => {
            MembershipError::Refused(message.clone())
        }
        _ => MembershipError::Unavailable(err.to_string()),
    }
}

/// The decimal number right after `marker` in `text`.
fn number_after(text: &str, marker: &str) -> Option<usize> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let digits = rest.find(|c: char| !c.is_ascii_digit()).map_or(rest, |end| &rest[..end]);
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> MetaClientError {
        MetaClientError::Status { rpc: "NodeApi.Eject", code, message: message.into() }
    }

    #[test]
    fn below_min_in_sync_is_parsed_from_the_service_message() {
        let e = membership_error(
            status(
                tonic::Code::FailedPrecondition,
                "ejecting node-3 from chunk 4 would leave 1 in-sync replicas, below the minimum of 2",
            ),
            VolumeId(1),
            Some((ChunkIdx(4), NodeId(3))),
        );
        assert!(
            matches!(e, MembershipError::BelowMinInSync { chunk: ChunkIdx(4), node: NodeId(3), remaining: 1, min: 2 }),
            "{e:?}"
        );
        // A message in another shape still maps to the variant, with unknown counts.
        let e = membership_error(
            status(tonic::Code::FailedPrecondition, "refused"),
            VolumeId(1),
            Some((ChunkIdx(4), NodeId(3))),
        );
        assert!(matches!(e, MembershipError::BelowMinInSync { remaining: 0, min: 0, .. }), "{e:?}");
    }

    #[test]
    fn not_found_names_the_chunk_or_the_volume() {
        let e = membership_error(
            status(tonic::Code::NotFound, "volume vol-1 has no chunk 9"),
            VolumeId(1),
            Some((ChunkIdx(9), NodeId(3))),
        );
        assert!(matches!(e, MembershipError::UnknownChunk { volume: VolumeId(1), chunk: ChunkIdx(9) }), "{e:?}");
        let e = membership_error(status(tonic::Code::NotFound, "volume vol-1 not found"), VolumeId(1), None);
        assert!(matches!(e, MembershipError::UnknownVolume(VolumeId(1))), "{e:?}");
    }

    #[test]
    fn everything_else_is_unavailable_with_the_message() {
        let e = membership_error(
            MetaClientError::Unreachable { endpoints: vec!["a:1".into()], last_error: "connection refused".into() },
            VolumeId(1),
            None,
        );
        match e {
            MembershipError::Unavailable(m) => assert_eq!(m, "cluster unreachable: tried a:1: connection refused"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failed_precondition_outside_an_eject_is_a_refusal() {
        // Not about min-in-sync: a definite no (an attach while the volume is
        // published to another node), which the CSI node answers as such.
        let e = membership_error(
            status(tonic::Code::FailedPrecondition, "volume vol-1 is published to node node-7"),
            VolumeId(1),
            None,
        );
        assert!(
            matches!(e, MembershipError::Refused(ref m) if m == "volume vol-1 is published to node node-7"),
            "{e:?}"
        );
    }

    fn seq(counter: u64) -> Seq {
        Seq::new(Epoch(1), counter)
    }

    fn shown(pending: &[u64], cuts: &[u64]) -> LayoutSnapshots {
        LayoutSnapshots { pending: pending.to_vec(), cuts: cuts.iter().map(|c| seq(*c)).collect() }
    }

    fn membership(known: &[(u64, u64)], seen_gen: u64) -> MetaMembership {
        let client =
            MetaClient::new(vec!["127.0.0.1:9".to_string()], ballast_metaclient::Security::Insecure).expect("client");
        let m = MetaMembership::new(client, "v", NodeId(1));
        *m.snapshots.lock().unwrap() = SnapshotSync {
            known: known.iter().map(|(c, gen)| (seq(*c), *gen)).collect(),
            seen_gen,
            ..SnapshotSync::default()
        };
        m
    }

    #[test]
    fn a_cut_is_dropped_only_by_a_layout_that_has_seen_it() {
        // Cut 10 shown from generation 5, cut 20 committed at generation 8.
        let m = membership(&[(10, 5), (20, 8)], 6);
        let kept = [seq(10), seq(20)];
        // A layout at generation 7 (a lagging member) does not show cut 20
        // yet: that is no delete. It does not show 10 either, and it is at or
        // above 5: 10 was deleted.
        let plan = m.plan_snapshots(7, &shown(&[], &[]), &kept);
        assert_eq!(plan, SnapshotPlan { take: false, drop: vec![seq(10)] });
        // Older than what was planned from: nothing at all.
        assert_eq!(m.plan_snapshots(6, &shown(&[3], &[]), &kept), SnapshotPlan::default());
        // At 8 without cut 20: deleted too; pending requests are taken.
        let plan = m.plan_snapshots(8, &shown(&[4], &[]), &kept);
        assert_eq!(plan, SnapshotPlan { take: true, drop: vec![seq(10), seq(20)] });
    }

    #[test]
    fn a_commit_without_an_answer_keeps_its_cut_until_meta_shows_it() {
        let m = membership(&[(30, u64::MAX)], 4);
        let kept = [seq(30)];
        assert_eq!(m.plan_snapshots(9, &shown(&[], &[]), &kept).drop, vec![], "unknown outcome: kept");
        // Shown at 10: the commit was applied; a later layout without it is a delete.
        assert_eq!(m.plan_snapshots(10, &shown(&[], &[30]), &kept).drop, vec![]);
        assert_eq!(m.plan_snapshots(11, &shown(&[], &[]), &kept).drop, vec![seq(30)]);
    }

    #[tokio::test]
    async fn only_planned_drops_and_requested_cuts_reach_the_volume() {
        let m = membership(&[(10, 5)], 5);
        // Dropping a cut meta still has is refused, with no call to meta.
        let e = m.set_snapshots(VolumeId(1), Epoch(1), vec![]).await.unwrap_err();
        assert!(matches!(e, MembershipError::Refused(ref r) if r.contains("still in meta")), "{e:?}");
        // A new cut nobody requested through meta is refused.
        let e = m.set_snapshots(VolumeId(1), Epoch(1), vec![seq(10), seq(11)]).await.unwrap_err();
        assert!(matches!(e, MembershipError::Refused(ref r) if r.contains("Admin.CreateSnapshot")), "{e:?}");
        // Once a plan found it deleted, the drop is local bookkeeping only.
        assert_eq!(m.plan_snapshots(6, &shown(&[], &[]), &[seq(10)]).drop, vec![seq(10)]);
        m.set_snapshots(VolumeId(1), Epoch(1), vec![]).await.expect("planned drop");
        assert!(m.snapshots.lock().unwrap().known.is_empty());
    }

    #[test]
    fn numbers_after_markers() {
        assert_eq!(number_after("would leave 12 in-sync", "would leave "), Some(12));
        assert_eq!(number_after("minimum of 3", "minimum of "), Some(3));
        assert_eq!(number_after("minimum of x", "minimum of "), None);
        assert_eq!(number_after("nothing", "minimum of "), None);
    }
}
