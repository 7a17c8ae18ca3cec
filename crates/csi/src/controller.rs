//! CSI Controller: volumes through the metadata service's Admin API.
//!
//! | call | Ballast | spec codes used |
//! |---|---|---|
//! | CreateVolume | Admin.CreateVolume (placement); from a snapshot (a restore) or a volume (a clone, through a snapshot meta makes and deletes) | INVALID_ARGUMENT, ALREADY_EXISTS, NOT_FOUND, OUT_OF_RANGE, RESOURCE_EXHAUSTED, UNAVAILABLE (a clone's source snapshot not taken yet: retry) |
//! | DeleteVolume | Admin.DeleteVolume (replicas reclaimed by the nodes) | INVALID_ARGUMENT, FAILED_PRECONDITION |
//! | ControllerPublish | Admin.PublishVolume: the one node allowed to stage it | NOT_FOUND, FAILED_PRECONDITION |
//! | ControllerUnpublish | Admin.UnpublishVolume | INVALID_ARGUMENT |
//! | ControllerExpandVolume | Admin.GrowVolume (whole chunks) | NOT_FOUND, OUT_OF_RANGE, RESOURCE_EXHAUSTED |
//! | ListVolumes | Admin.ListVolumes, paged by name | ABORTED (a token it did not issue), INVALID_ARGUMENT |
//! | CreateSnapshot | Admin.CreateSnapshot; waits up to [`SNAPSHOT_READY_WAIT`] for the cut | INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS |
//! | DeleteSnapshot | Admin.DeleteSnapshot (every replica reclaims its layers) | INVALID_ARGUMENT |
//! | ListSnapshots | Admin.ListSnapshots, ready ones only, paged by name | ABORTED, INVALID_ARGUMENT |
//!
//! A snapshot's CSI id is its Ballast name (unique in the cluster), its
//! `ready_to_use` whether meta has its cut: a snapshot of an attached volume
//! is pending until the volume's front end takes it (within a layout poll), and
//! the CO calls CreateSnapshot again until it is ready, as the spec has it.
//!
//! Topology: a volume is reachable over the network from every zone, so it is
//! accessible from all of them (CreateVolume's requisite is satisfied, never a
//! placement constraint); the StorageClass's `zones` decides where replicas live.
//!
//! A missing volume on delete or unpublish is success (idempotency). Every call
//! on a volume holds its [`VolumeLocks`] entry: a concurrent one gets ABORTED.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use ballast_metaclient::{pb as meta, MetaClient};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::locks::VolumeLocks;
use crate::params::{
    self, capability_arg, check_capabilities, check_capability, required, required_capability, VolumeParams,
};
use crate::pb;
use crate::pb::controller_service_capability::rpc::Type as Rpc;
use crate::{meta_status, TOPOLOGY_ZONE};

#[derive(Clone)]
pub struct ControllerService {
    meta: MetaClient,
    locks: VolumeLocks,
}

impl ControllerService {
    pub fn new(meta: MetaClient) -> Self {
        ControllerService { meta, locks: VolumeLocks::default() }
    }

    /// The volume by name, or None when meta does not know it.
    async fn find(&self, name: &str) -> Result<Option<meta::Volume>, Status> {
        match self.meta.inspect_volume(meta::InspectVolumeRequest { volume: name.to_string() }).await {
            Ok(l) => Ok(l.volume),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(meta_status("look up the volume", e)),
        }
    }

    async fn existing(&self, name: &str) -> Result<meta::Volume, Status> {
        self.find(name).await?.ok_or_else(|| Status::not_found(format!("volume {name} does not exist")))
    }

    /// The snapshot a restore names: NOT_FOUND if there is none by that id.
    async fn find_snapshot(&self, id: &str) -> Result<meta::Snapshot, Status> {
        let req = meta::ListSnapshotsRequest { volume: String::new(), snapshot: id.to_string() };
        match self.meta.list_snapshots(req).await {
            Ok(r) => r.snapshots.into_iter().find(|s| s.name == id),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(meta_status("look up the snapshot", e)),
        }
        .ok_or_else(|| Status::not_found(format!("snapshot {id} does not exist")))
    }

    async fn nodes(&self) -> Result<Vec<meta::Node>, Status> {
        Ok(self.meta.list_nodes().await.map_err(|e| meta_status("list nodes", e))?.nodes)
    }
}

/// The CSI view of a Ballast volume, accessible from `zones` (see [`accessible_zones`]).
fn csi_volume(v: &meta::Volume, fs_type: &str, zones: &BTreeSet<String>) -> pb::Volume {
    let mut volume_context = HashMap::new();
    // Known only where the request named it (CreateVolume); meta does not keep it.
    if !fs_type.is_empty() {
        volume_context.insert(params::CONTEXT_FS_TYPE.to_string(), fs_type.to_string());
    }
    volume_context.insert(params::REPLICAS.to_string(), v.replicas.to_string());
    pb::Volume {
        capacity_bytes: v.size_bytes as i64,
        volume_id: v.name.clone(),
        volume_context,
        content_source: match volume_source(v) {
            Source::Empty => None,
            Source::Snapshot(id) => Some(pb::VolumeContentSource {
                r#type: Some(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
                    snapshot_id: id.to_string(),
                })),
            }),
            Source::Volume(id) => Some(pb::VolumeContentSource {
                r#type: Some(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                    volume_id: id.to_string(),
                })),
            }),
        },
        accessible_topology: zones
            .iter()
            .map(|z| pb::Topology { segments: HashMap::from([(TOPOLOGY_ZONE.to_string(), z.clone())]) })
            .collect(),
    }
}

/// What a CreateVolume starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source<'a> {
    Empty,
    /// A restore of this snapshot.
    Snapshot(&'a str),
    /// A clone of this volume (CLONE_VOLUME): through a snapshot of it that
    /// meta makes for the clone and deletes once the clone is independent.
    Volume(&'a str),
}

fn content_source(source: Option<&pb::VolumeContentSource>) -> Result<Source<'_>, Status> {
    use pb::volume_content_source::Type;
    match source.map(|s| s.r#type.as_ref()) {
        None => Ok(Source::Empty),
        Some(Some(Type::Snapshot(s))) if !s.snapshot_id.is_empty() => Ok(Source::Snapshot(s.snapshot_id.as_str())),
        Some(Some(Type::Snapshot(_))) => {
            Err(Status::invalid_argument("volume_content_source.snapshot.snapshot_id is empty"))
        }
        Some(Some(Type::Volume(v))) if !v.volume_id.is_empty() => Ok(Source::Volume(v.volume_id.as_str())),
        Some(Some(Type::Volume(_))) => Err(Status::invalid_argument("volume_content_source.volume.volume_id is empty")),
        Some(None) => Err(Status::invalid_argument("volume_content_source names neither a snapshot nor a volume")),
    }
}

/// The source a volume was made from, as CreateVolume names it.
fn volume_source(v: &meta::Volume) -> Source<'_> {
    match &v.origin {
        None => Source::Empty,
        Some(o) if o.from_volume => Source::Volume(o.source_volume_name.as_str()),
        Some(o) => Source::Snapshot(o.snapshot_name.as_str()),
    }
}

/// The zones a CreateVolume's topology requirement names: every requisite zone,
/// then the preferred ones. A requisite topology without Ballast's key is refused
/// (INVALID_ARGUMENT): no answer could say the volume is accessible from it.
///
/// These zones never restrict placement. A requisite says where the volume must
/// be accessible *from*, and a Ballast volume is reachable over the network from
/// every node with the plugin; the external-provisioner's `--strict-topology`
/// sends exactly one zone, the selected node's, which with `zoneSpread: required`
/// and 3 replicas would otherwise never be satisfiable. Restricting where
/// replicas live is the StorageClass parameter `zones`.
fn requested_zones(req: Option<&pb::TopologyRequirement>) -> Result<BTreeSet<String>, Status> {
    let mut zones = BTreeSet::new();
    let Some(req) = req else { return Ok(zones) };
    for t in &req.requisite {
        match t.segments.get(TOPOLOGY_ZONE) {
            Some(z) if !z.is_empty() => {
                zones.insert(z.clone());
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "accessibility_requirements: a requisite topology without {TOPOLOGY_ZONE}: {:?}",
                    t.segments
                )))
            }
        }
    }
    zones.extend(req.preferred.iter().filter_map(|t| t.segments.get(TOPOLOGY_ZONE)).filter(|z| !z.is_empty()).cloned());
    Ok(zones)
}

/// The zones a volume is accessible from, as its `accessible_topology`: every zone
/// the cluster has a storage node in (in any state: a zone whose nodes are down
/// now is still one a pod may be scheduled in later), plus the zones the request
/// named (`requested`), which the CO took from the nodes running this plugin.
///
/// Every zone, not only the requisite's: Kubernetes turns accessible_topology into
/// the PV's node affinity, which never changes afterwards. Listing only the
/// selected node's zone (all a strict-topology requisite holds) would pin the
/// volume's pod to that zone for good, so a StatefulSet pod could not move to
/// another zone after its node or its zone is lost, although its data is there.
/// The spec allows it: with more accessible topologies than requisite ones, all
/// the requisite ones must be among them (they are) and the rest may be any.
/// A zone added to the cluster later is not in the affinity of older volumes.
fn accessible_zones(nodes: &[meta::Node], requested: &BTreeSet<String>) -> BTreeSet<String> {
    let mut zones: BTreeSet<String> = nodes.iter().map(|n| n.zone.clone()).filter(|z| !z.is_empty()).collect();
    zones.extend(requested.iter().cloned());
    zones
}

/// How long CreateSnapshot waits for an attached volume's front end to take a
/// pending snapshot before answering `ready_to_use: false` (the CO asks again).
/// A few layout polls: most snapshots are ready in the first answer.
pub const SNAPSHOT_READY_WAIT: Duration = Duration::from_secs(2);

/// The CSI view of a Ballast snapshot: its id is its name.
fn csi_snapshot(s: &meta::Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: i64::try_from(s.size_bytes).unwrap_or(i64::MAX),
        snapshot_id: s.name.clone(),
        source_volume_id: s.volume_name.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: i64::try_from(s.created_ms / 1000).unwrap_or(i64::MAX),
            nanos: (s.created_ms % 1000) as i32 * 1_000_000,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}

/// VolumeSnapshotClass parameters: Ballast has none of its own; the keys the
/// external-snapshotter adds (`csi.storage.k8s.io/*`, with
/// `--extra-create-metadata` the VolumeSnapshot's name and namespace) are
/// accepted, any other is refused, as for a StorageClass.
fn check_snapshot_parameters(parameters: &HashMap<String, String>) -> Result<(), Status> {
    match parameters.keys().find(|k| !k.starts_with("csi.storage.k8s.io/")) {
        Some(k) => Err(Status::invalid_argument(format!(
            "invalid parameter {k}: unknown parameter (Ballast snapshots take no parameters)"
        ))),
        None => Ok(()),
    }
}

/// Tags of the list tokens, and the version of their format: one per listing,
/// so a ListVolumes token is no ListSnapshots token.
const TOKEN_TAG: &str = "1";
const VOLUMES: &str = "ballast-csi-list-volumes";
const SNAPSHOTS: &str = "ballast-csi-list-snapshots";

/// The token that resumes a listing (`kind`: [`VOLUMES`] or [`SNAPSHOTS`])
/// after the name `last`: `1.<name in hex>.<check>`, the check a 64-bit FNV-1a
/// hash of the listing, the tag and the name. It holds no state of this
/// process, so any controller replica (and one restarted between pages) takes
/// it; the check tells tokens this plugin issued from garbage, truncated or
/// edited ones, which the spec wants ABORTED. (It is no secret: there is
/// nothing to protect, a token only says where a listing resumes.)
fn page_token(kind: &str, last: &str) -> String {
    let hex: String = last.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{TOKEN_TAG}.{hex}.{:016x}", token_check(kind, last))
}

/// The `starting_token` of a listing: None when empty, the name to resume
/// after, or ABORTED for a token [`page_token`] did not issue for `kind`.
fn starting_after(kind: &str, token: &str) -> Result<Option<String>, Status> {
    match token {
        "" => Ok(None),
        t => parse_page_token(kind, t)
            .map(Some)
            .ok_or_else(|| Status::aborted(format!("starting_token {t:?} is not one this plugin issued"))),
    }
}

/// One page of `items` (sorted by `name`) after `after`: at most
/// `max_entries` of them (0: all), and the next token (empty at the end).
fn page<'a, T>(
    kind: &str,
    items: &'a [T],
    name: impl Fn(&T) -> &str,
    after: Option<&str>,
    max_entries: i32,
) -> Result<(Vec<&'a T>, String), Status> {
    if max_entries < 0 {
        return Err(Status::invalid_argument("max_entries must not be negative"));
    }
    let rest: Vec<&T> = items.iter().filter(|x| after.is_none_or(|after| name(x) > after)).collect();
    let take = if max_entries == 0 { rest.len() } else { (max_entries as usize).min(rest.len()) };
    let next_token = match take.checked_sub(1).and_then(|last| rest.get(last)) {
        Some(last) if take < rest.len() => page_token(kind, name(last)),
        _ => String::new(),
    };
    Ok((rest[..take].to_vec(), next_token))
}

/// The name a token from [`page_token`] resumes after; None for any string
/// it did not produce for `kind`.
fn parse_page_token(kind: &str, token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (Some(TOKEN_TAG), Some(hex), Some(check), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if hex.is_empty() || hex.len() % 2 != 0 || check.len() != 16 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    let name = String::from_utf8(bytes?).ok()?;
    // Lower-case hex only, as issued: one token per position.
    let issued = hex.bytes().chain(check.bytes()).all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    (issued && u64::from_str_radix(check, 16).ok()? == token_check(kind, &name)).then_some(name)
}

fn token_check(kind: &str, name: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let input = kind.as_bytes().iter().chain(b"\0").chain(TOKEN_TAG.as_bytes()).chain(b"\0").chain(name.as_bytes());
    input.fold(FNV_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

fn parse_node_id(node_id: &str) -> Result<u64, Status> {
    match node_id.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Status::not_found(format!("node {node_id:?} is not a Ballast node id"))),
    }
}

impl ControllerService {
    /// A clone of a volume is usable once the snapshot meta made of its
    /// source is taken (the source's front end takes it within a layout poll,
    /// a detached source's at once): waits up to [`SNAPSHOT_READY_WAIT`], then
    /// UNAVAILABLE, and the CO's retry (same name) waits again.
    async fn clone_source_taken(&self, v: &meta::Volume) -> Result<(), Status> {
        let Some(o) = v.origin.as_ref().filter(|o| o.from_volume && v.unfilled_chunks > 0) else { return Ok(()) };
        let snap = self
            .meta
            .wait_snapshot_ready(&o.snapshot_name, SNAPSHOT_READY_WAIT)
            .await
            .map_err(|e| meta_status("look up the clone's source snapshot", e))?;
        match snap {
            Some(s) if !s.ready => Err(Status::unavailable(format!(
                "clone {} of volume {}: the source's snapshot is not taken yet (its front end takes it); retry",
                v.name, o.source_volume_name
            ))),
            _ => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for ControllerService {
    #[instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let name = required("name", &r.name)?;
        check_capabilities("volume_capabilities", &r.volume_capabilities)?;
        let source = content_source(r.volume_content_source.as_ref())?;
        if !r.mutable_parameters.is_empty() {
            return Err(Status::invalid_argument("mutable_parameters: Ballast has none"));
        }
        let p = VolumeParams::parse(&r.parameters)?;
        let mut size = params::create_size(r.capacity_range.as_ref(), p.chunk_size)?;
        let requested = requested_zones(r.accessibility_requirements.as_ref())?;
        let _busy = self.locks.lock(name)?;
        let zones = accessible_zones(&self.nodes().await?, &requested);

        // Same name: the same volume if compatible (a retry), else ALREADY_EXISTS.
        // The topology requirement is not compared: it does not shape the volume,
        // and a retry after the scheduler picked another node names another zone.
        if let Some(v) = self.find(name).await? {
            let (required, limit) = r.capacity_range.as_ref().map_or((0, 0), |c| (c.required_bytes, c.limit_bytes));
            let fits = v.size_bytes as i64 >= required && (limit == 0 || v.size_bytes as i64 <= limit);
            if fits && p.matches(&v) && volume_source(&v) == source {
                self.clone_source_taken(&v).await?;
                return Ok(Response::new(pb::CreateVolumeResponse {
                    volume: Some(csi_volume(&v, p.fs_type.as_str(), &zones)),
                }));
            }
            return Err(Status::already_exists(format!(
                "volume {name} exists with other parameters or a size ({} bytes) outside the requested range",
                v.size_bytes
            )));
        }
        // A restore holds the whole snapshot: at least its size (OUT_OF_RANGE
        // when the request caps it lower); without a requested size, exactly
        // the snapshot's size in whole chunks. Looked up only here, so that a
        // retry of a restore whose snapshot is gone by now gets its volume.
        // A clone likewise holds its whole source volume.
        let least = match source {
            Source::Empty => None,
            Source::Snapshot(snapshot) => {
                Some((format!("snapshot {snapshot}"), self.find_snapshot(snapshot).await?.size_bytes))
            }
            Source::Volume(volume) => match self.find(volume).await? {
                Some(v) => Some((format!("volume {volume}"), v.size_bytes)),
                None => return Err(Status::not_found(format!("volume_content_source: volume {volume} not found"))),
            },
        };
        if let Some((what, needed)) = least {
            let (required, limit) = r.capacity_range.as_ref().map_or((0, 0), |c| (c.required_bytes, c.limit_bytes));
            if limit > 0 && (limit as u64) < needed {
                return Err(Status::out_of_range(format!(
                    "capacity_range: limit {limit} is below {what}'s size of {needed} bytes"
                )));
            }
            if required == 0 || (required as u64) < needed {
                let whole = needed.div_ceil(p.chunk_size) * p.chunk_size;
                size = if limit > 0 && whole > limit as u64 { needed } else { whole };
            }
        }
        let (from_snapshot, from_volume) = match source {
            Source::Empty => ("", ""),
            Source::Snapshot(s) => (s, ""),
            Source::Volume(v) => ("", v),
        };
        let req = meta::CreateVolumeRequest {
            name: name.to_string(),
            size_bytes: size,
            chunk_size_bytes: p.chunk_size,
            replicas: p.replicas,
            min_in_sync: p.min_in_sync,
            zones: p.zones.clone(),
            zone_spread: p.zone_spread as i32,
            source_snapshot: from_snapshot.to_string(),
            source_volume: from_volume.to_string(),
        };
        let v = self.meta.create_volume(req).await.map_err(|e| meta_status("create the volume", e))?;
        info!(volume = %v.name, size = v.size_bytes, replicas = v.replicas, zones = ?v.zones, "volume created");
        self.clone_source_taken(&v).await?;
        Ok(Response::new(pb::CreateVolumeResponse { volume: Some(csi_volume(&v, p.fs_type.as_str(), &zones)) }))
    }

    #[instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let id = required("volume_id", &req.get_ref().volume_id)?.to_string();
        let _busy = self.locks.lock(&id)?;
        match self.meta.delete_volume(meta::DeleteVolumeRequest { volume: id.clone() }).await {
            Ok(r) => info!(volume = %id, chunk_replicas = r.chunk_replicas, "volume deleted"),
            // Already gone: deleting is idempotent.
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(meta_status("delete the volume", e)),
        }
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %req.get_ref().volume_id, node = %req.get_ref().node_id))]
    async fn controller_publish_volume(
        &self,
        req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?;
        let node_id = required("node_id", &r.node_id)?;
        required_capability("volume_capability", r.volume_capability.as_ref())?;
        let node = parse_node_id(node_id)?;
        let _busy = self.locks.lock(id)?;
        let req = meta::PublishVolumeRequest { volume: id.to_string(), node };
        let v = match self.meta.publish_volume(req).await {
            Ok(v) => v,
            Err(e) if e.is_not_found() => return Err(Status::not_found(format!("publish {id} to node {node}: {e}"))),
            Err(e) => return Err(meta_status("publish the volume", e)),
        };
        info!(volume = %v.name, node, "volume published");
        let publish_context = HashMap::from([("ballast.io/node".to_string(), node.to_string())]);
        Ok(Response::new(pb::ControllerPublishVolumeResponse { publish_context }))
    }

    #[instrument(skip_all, fields(volume = %req.get_ref().volume_id, node = %req.get_ref().node_id))]
    async fn controller_unpublish_volume(
        &self,
        req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?;
        // An empty node id: unpublish from every node. A node id that is no Ballast
        // node cannot hold the publication: nothing to do.
        let node = match r.node_id.as_str() {
            "" => 0,
            n => match n.parse::<u64>() {
                Ok(n) => n,
                Err(_) => return Ok(Response::new(pb::ControllerUnpublishVolumeResponse {})),
            },
        };
        let _busy = self.locks.lock(id)?;
        match self.meta.unpublish_volume(meta::UnpublishVolumeRequest { volume: id.to_string(), node }).await {
            Ok(_) => info!(volume = %id, node, "volume unpublished"),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(meta_status("unpublish the volume", e)),
        }
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let v = self.existing(id).await?;
        let p = match VolumeParams::parse(&r.parameters) {
            Ok(p) => p,
            Err(e) => {
                let message = e.message().to_string();
                return Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse { confirmed: None, message }));
            }
        };
        if !r.parameters.is_empty() && !p.matches(&v) {
            let message = format!("volume {id} was created with other parameters");
            return Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse { confirmed: None, message }));
        }
        for c in &r.volume_capabilities {
            if let Err(message) = check_capability(c) {
                return Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse { confirmed: None, message }));
            }
        }
        Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
                mutable_parameters: Default::default(),
            }),
            message: String::new(),
        }))
    }

    /// Pages through volumes in name order; the token names the last volume of
    /// the previous page (see `page_token`), so deletes between pages never skip
    /// or repeat a volume. A token this plugin did not issue is ABORTED.
    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let after = starting_after(VOLUMES, &r.starting_token)?;
        let mut volumes = self.meta.list_volumes().await.map_err(|e| meta_status("list volumes", e))?.volumes;
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let zones = accessible_zones(&self.nodes().await?, &BTreeSet::new());
        let (taken, next_token) = page(VOLUMES, &volumes, |v| v.name.as_str(), after.as_deref(), r.max_entries)?;
        let entries = taken
            .iter()
            .map(|v| pb::list_volumes_response::Entry {
                volume: Some(csi_volume(v, "", &zones)),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: (v.published_node != 0)
                        .then(|| v.published_node.to_string())
                        .into_iter()
                        .collect(),
                }),
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { entries, next_token }))
    }

    /// Bytes a new volume of these parameters could get: the room of the up
    /// nodes in the zones its replicas may use (the `zones` parameter; all by
    /// default) divided by the replicas. A node's room is meta's placement
    /// figure: the smaller of what over-provisioning still allows it and what
    /// its disk, by actual use, still holds (`ballastctl node list`). The topology does not narrow it: a volume
    /// accessible from one zone still places its replicas in all of them.
    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        for c in &r.volume_capabilities {
            capability_arg("volume_capabilities", c)?;
        }
        let p = VolumeParams::parse(&r.parameters)?;
        let nodes = self.nodes().await?;
        let free: u64 = nodes
            .iter()
            .filter(|n| n.state == meta::NodeState::Up as i32)
            // A full or failed disk takes no new replicas (meta's placement rule).
            .filter(|n| {
                matches!(
                    meta::DiskHealth::try_from(n.disk),
                    Ok(meta::DiskHealth::DiskOk | meta::DiskHealth::Unspecified)
                )
            })
            .filter(|n| p.zones.is_empty() || p.zones.contains(&n.zone))
            .map(|n| n.room_bytes)
            .sum();
        let available = free / u64::from(p.replicas);
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: i64::try_from(available).unwrap_or(i64::MAX),
            maximum_volume_size: None,
            minimum_volume_size: Some(params::BLOCK as i64),
        }))
    }

    #[instrument(skip_all, fields(name = %req.get_ref().name, volume = %req.get_ref().source_volume_id))]
    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let name = required("name", &r.name)?;
        let volume = required("source_volume_id", &r.source_volume_id)?;
        check_snapshot_parameters(&r.parameters)?;
        let _busy = self.locks.lock(&format!("snapshot/{name}"))?;
        let req = meta::CreateSnapshotRequest { volume: volume.to_string(), name: name.to_string() };
        let mut snap = self.meta.create_snapshot(req).await.map_err(|e| match e.code() {
            // The name is another volume's snapshot.
            Some(tonic::Code::AlreadyExists) => {
                Status::already_exists(format!("snapshot {name} exists for another source volume"))
            }
            _ => meta_status("create the snapshot", e),
        })?;
        if !snap.ready {
            snap = match self.meta.wait_snapshot_ready(name, SNAPSHOT_READY_WAIT).await {
                Ok(Some(now)) => now,
                Ok(None) => return Err(Status::aborted(format!("snapshot {name} was deleted while being created"))),
                Err(e) => return Err(meta_status("look up the snapshot", e)),
            };
        }
        info!(snapshot = %snap.name, volume = %snap.volume_name, ready = snap.ready, "snapshot created");
        Ok(Response::new(pb::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&snap)) }))
    }

    #[instrument(skip_all, fields(snapshot = %req.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let id = required("snapshot_id", &req.get_ref().snapshot_id)?.to_string();
        let _busy = self.locks.lock(&format!("snapshot/{id}"))?;
        match self.meta.delete_snapshot(meta::DeleteSnapshotRequest { snapshot: id.clone() }).await {
            Ok(_) => info!(snapshot = %id, "snapshot deleted"),
            // Already gone: deleting is idempotent.
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(meta_status("delete the snapshot", e)),
        }
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    /// Ready snapshots only (the spec: none that is not cut yet), by name,
    /// paged as ListVolumes is. An unknown source volume or snapshot id lists
    /// nothing.
    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let after = starting_after(SNAPSHOTS, &r.starting_token)?;
        let req = meta::ListSnapshotsRequest { volume: r.source_volume_id.clone(), snapshot: r.snapshot_id.clone() };
        let mut snaps = match self.meta.list_snapshots(req).await {
            Ok(l) => l.snapshots,
            Err(e) if e.is_not_found() => vec![],
            Err(e) => return Err(meta_status("list snapshots", e)),
        };
        // By name, not by numeric id: the CSI id is the name.
        // Not those meta made for clones of volumes: no CO asked for them.
        snaps.retain(|s| s.ready && s.for_clone == 0 && (r.snapshot_id.is_empty() || s.name == r.snapshot_id));
        snaps.sort_by(|a, b| a.name.cmp(&b.name));
        let (taken, next_token) = page(SNAPSHOTS, &snaps, |s| s.name.as_str(), after.as_deref(), r.max_entries)?;
        let entries =
            taken.into_iter().map(|s| pb::list_snapshots_response::Entry { snapshot: Some(csi_snapshot(s)) }).collect();
        Ok(Response::new(pb::ListSnapshotsResponse { entries, next_token }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        let rpc = |t: Rpc| pb::ControllerServiceCapability {
            r#type: Some(pb::controller_service_capability::Type::Rpc(pb::controller_service_capability::Rpc {
                r#type: t as i32,
            })),
        };
        let capabilities = [
            Rpc::CreateDeleteVolume,
            Rpc::PublishUnpublishVolume,
            Rpc::ListVolumes,
            Rpc::ListVolumesPublishedNodes,
            Rpc::GetCapacity,
            Rpc::ExpandVolume,
            Rpc::GetVolume,
            Rpc::SingleNodeMultiWriter,
            Rpc::CreateDeleteSnapshot,
            Rpc::CloneVolume,
            Rpc::ListSnapshots,
        ]
        .into_iter()
        .map(rpc)
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse { capabilities }))
    }

    #[instrument(skip_all, fields(volume = %req.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required("volume_id", &r.volume_id)?;
        if let Some(c) = &r.volume_capability {
            capability_arg("volume_capability", c)?;
        }
        let _busy = self.locks.lock(id)?;
        let v = self.existing(id).await?;
        let size = match params::expand_size(r.capacity_range.as_ref(), v.size_bytes, v.chunk_size_bytes)? {
            None => v.size_bytes,
            Some(size) => {
                let req = meta::GrowVolumeRequest { volume: id.to_string(), size_bytes: size };
                let grown = self.meta.grow_volume(req).await.map_err(|e| meta_status("grow the volume", e))?;
                info!(volume = %id, from = v.size_bytes, to = grown.size_bytes, "volume grown");
                grown.size_bytes
            }
        };
        // The node grows the front end's view, the loop device and the filesystem.
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let id = required("volume_id", &req.get_ref().volume_id)?;
        let v = self.existing(id).await?;
        let zones = accessible_zones(&self.nodes().await?, &BTreeSet::new());
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, "", &zones)),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: (v.published_node != 0).then(|| v.published_node.to_string()).into_iter().collect(),
                volume_condition: Some(pb::VolumeCondition {
                    abnormal: v.degraded_chunks > 0,
                    message: if v.degraded_chunks > 0 {
                        format!("{} chunks below {} in-sync replicas (rebuilding)", v.degraded_chunks, v.replicas)
                    } else {
                        "all chunks fully replicated".into()
                    },
                }),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(z: &str) -> pb::Topology {
        pb::Topology { segments: HashMap::from([(TOPOLOGY_ZONE.to_string(), z.to_string())]) }
    }

    fn node(id: u64, zone: &str) -> meta::Node {
        meta::Node { id, zone: zone.into(), ..Default::default() }
    }

    #[test]
    fn page_tokens_round_trip_and_refuse_what_was_not_issued() {
        for name in ["a", "pvc-0f3c", "list.b_c-9", &"x".repeat(128)] {
            let t = page_token(VOLUMES, name);
            assert_eq!(parse_page_token(VOLUMES, &t).as_deref(), Some(name), "{t}");
            assert_eq!(parse_page_token(SNAPSHOTS, &t), None, "a volume token is no snapshot token");
        }
        let t = page_token(VOLUMES, "pvc-1");
        let (head, check) = t.rsplit_once('.').expect("three parts");
        let flipped = format!("{head}.{}", if check.starts_with('0') { "1" } else { "0" }.to_owned() + &check[1..]);
        let forged_name =
            format!("{TOKEN_TAG}.{}.{check}", "pvc-2".bytes().map(|b| format!("{b:02x}")).collect::<String>());
        for bad in [
            "",
            "pvc-1", // a bare name: what the old tokens were
            "$$$",
            "1",
            "1..0000000000000000", // no name
            &t[..t.len() - 1],     // truncated
            &format!("{t}.0"),     // a fourth part
            &t.to_uppercase(),     // hex is issued lower-case
            &t.replacen("1.", "2.", 1),
            &flipped,     // the check edited
            &forged_name, // another name under this name's check
            "1.+1.0000000000000000",
            "1.ff.0000000000000000", // not UTF-8
        ] {
            assert_eq!(parse_page_token(VOLUMES, bad), None, "{bad:?} must not be accepted");
        }
    }

    #[test]
    fn pages_resume_after_the_last_name_and_end_with_an_empty_token() {
        let names = ["a", "b", "c", "d", "e"];
        let mut seen = vec![];
        let mut after: Option<String> = None;
        loop {
            let (taken, next) = page(SNAPSHOTS, &names, |n| n, after.as_deref(), 2).unwrap();
            seen.extend(taken.into_iter().copied());
            if next.is_empty() {
                break;
            }
            after = Some(starting_after(SNAPSHOTS, &next).unwrap().expect("a token names where to resume"));
        }
        assert_eq!(seen, names);
        let (all, next) = page(SNAPSHOTS, &names, |n| n, None, 0).unwrap();
        assert_eq!((all.len(), next.as_str()), (5, ""), "max_entries 0: no limit");
        assert_eq!(page(SNAPSHOTS, &names, |n| n, None, -1).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(starting_after(SNAPSHOTS, "garbage").unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(starting_after(SNAPSHOTS, "").unwrap(), None);
    }

    #[test]
    fn snapshot_parameters_are_the_snapshotters_own_only() {
        let ok = HashMap::from([("csi.storage.k8s.io/volumesnapshot/name".to_string(), "s".to_string())]);
        assert!(check_snapshot_parameters(&ok).is_ok());
        let bad = HashMap::from([("incremental".to_string(), "true".to_string())]);
        let e = check_snapshot_parameters(&bad).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("incremental"), "{}", e.message());
    }

    #[test]
    fn a_snapshot_is_named_by_its_ballast_name_with_its_creation_time() {
        let s = meta::Snapshot {
            id: 7,
            name: "snapshot-1".into(),
            volume: 3,
            volume_name: "pvc-1".into(),
            size_bytes: 1 << 30,
            created_ms: 1_700_000_000_123,
            ready: true,
            cut: Some(meta::Seq { epoch: 2, counter: 9 }),
            for_clone: 0,
        };
        let c = csi_snapshot(&s);
        assert_eq!((c.snapshot_id.as_str(), c.source_volume_id.as_str()), ("snapshot-1", "pvc-1"));
        assert_eq!((c.size_bytes, c.ready_to_use), (1 << 30, true));
        assert_eq!(c.creation_time, Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_000_000 }));
    }

    #[test]
    fn a_requisite_never_narrows_what_the_volume_is_accessible_from() {
        let nodes = [node(1, "z1"), node(2, "z2"), node(3, "z3"), node(4, "z1")];
        // --strict-topology: exactly the selected node's zone.
        let strict = pb::TopologyRequirement { requisite: vec![zone("z2")], preferred: vec![zone("z2")] };
        let requested = requested_zones(Some(&strict)).unwrap();
        assert_eq!(requested, BTreeSet::from(["z2".to_string()]));
        let all = BTreeSet::from(["z1", "z2", "z3"].map(String::from));
        assert_eq!(accessible_zones(&nodes, &requested), all, "every zone, so the pod can move to another");
        // A zone the CO knows a node with the plugin in, which meta has no storage node in (yet).
        let wider = pb::TopologyRequirement { requisite: vec![zone("z1"), zone("z4")], preferred: vec![zone("z4")] };
        let z = accessible_zones(&nodes, &requested_zones(Some(&wider)).unwrap());
        assert!(z.is_superset(&BTreeSet::from(["z1".to_string(), "z4".to_string()])) && z.len() == 4, "{z:?}");
        assert_eq!(accessible_zones(&nodes, &requested_zones(None).unwrap()), all);
        // A requisite without Ballast's key cannot be satisfied.
        let other = pb::TopologyRequirement {
            requisite: vec![pb::Topology {
                segments: HashMap::from([("topology.kubernetes.io/zone".into(), "z1".into())]),
            }],
            preferred: vec![],
        };
        assert_eq!(requested_zones(Some(&other)).unwrap_err().code(), tonic::Code::InvalidArgument);
        let v = meta::Volume { name: "v".into(), replicas: 3, zones: vec!["z1".into()], ..Default::default() };
        let topo: Vec<String> =
            csi_volume(&v, "", &all).accessible_topology.iter().map(|t| t.segments[TOPOLOGY_ZONE].clone()).collect();
        assert_eq!(topo, ["z1", "z2", "z3"], "a volume whose replicas are kept to z1 is still reachable from all");
    }
}
