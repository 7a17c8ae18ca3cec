//! CSI Controller: volumes through the metadata service's Admin API.
//!
//! | call | Ballast | spec codes used |
//! |---|---|---|
//! | CreateVolume | Admin.CreateVolume (placement) | INVALID_ARGUMENT, ALREADY_EXISTS, OUT_OF_RANGE, RESOURCE_EXHAUSTED |
//! | DeleteVolume | Admin.DeleteVolume (replicas reclaimed by the nodes) | INVALID_ARGUMENT, FAILED_PRECONDITION |
//! | ControllerPublish | Admin.PublishVolume: the one node allowed to stage it | NOT_FOUND, FAILED_PRECONDITION |
//! | ControllerUnpublish | Admin.UnpublishVolume | INVALID_ARGUMENT |
//! | ControllerExpandVolume | Admin.GrowVolume (whole chunks) | NOT_FOUND, OUT_OF_RANGE, RESOURCE_EXHAUSTED |
//!
//! A missing volume on delete or unpublish is success (idempotency). Every call
//! on a volume holds its [`VolumeLocks`] entry: a concurrent one gets ABORTED.

use std::collections::{BTreeSet, HashMap};

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
}

/// The CSI view of a Ballast volume.
fn csi_volume(v: &meta::Volume, fs_type: &str) -> pb::Volume {
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
        content_source: None,
        // Restricted volumes are reachable from the zones they were placed in; a
        // Ballast volume is network-attached, so an unrestricted one from anywhere.
        accessible_topology: v
            .zones
            .iter()
            .map(|z| pb::Topology { segments: HashMap::from([(TOPOLOGY_ZONE.to_string(), z.clone())]) })
            .collect(),
    }
}

/// The zones a CreateVolume's requisite topology allows (empty: any). A
/// topology naming none of Ballast's keys is refused: it cannot be satisfied.
fn requisite_zones(req: Option<&pb::TopologyRequirement>) -> Result<Vec<String>, Status> {
    let mut zones = BTreeSet::new();
    for t in req.map(|r| r.requisite.as_slice()).unwrap_or_default() {
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
    Ok(zones.into_iter().collect())
}

fn parse_node_id(node_id: &str) -> Result<u64, Status> {
    match node_id.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Status::not_found(format!("node {node_id:?} is not a Ballast node id"))),
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
        if r.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume_content_source: Ballast creates empty volumes only (no snapshots or clones)",
            ));
        }
        if !r.mutable_parameters.is_empty() {
            return Err(Status::invalid_argument("mutable_parameters: Ballast has none"));
        }
        let p = VolumeParams::parse(&r.parameters)?;
        let size = params::create_size(r.capacity_range.as_ref(), p.chunk_size)?;
        let zones = requisite_zones(r.accessibility_requirements.as_ref())?;
        let _busy = self.locks.lock(name)?;

        // Same name: the same volume if compatible (a retry), else ALREADY_EXISTS.
        if let Some(v) = self.find(name).await? {
            let (required, limit) = r.capacity_range.map_or((0, 0), |c| (c.required_bytes, c.limit_bytes));
            let fits = v.size_bytes as i64 >= required && (limit == 0 || v.size_bytes as i64 <= limit);
            let same_zones = zones.is_empty() || v.zones == zones;
            if fits && p.matches(&v) && same_zones {
                return Ok(Response::new(pb::CreateVolumeResponse {
                    volume: Some(csi_volume(&v, p.fs_type.as_str())),
                }));
            }
            return Err(Status::already_exists(format!(
                "volume {name} exists with other parameters or a size ({} bytes) outside the requested range",
                v.size_bytes
            )));
        }
        let req = meta::CreateVolumeRequest {
            name: name.to_string(),
            size_bytes: size,
            chunk_size_bytes: p.chunk_size,
            replicas: p.replicas,
            min_in_sync: p.min_in_sync,
            zones,
            zone_spread: p.zone_spread as i32,
        };
        let v = self.meta.create_volume(req).await.map_err(|e| meta_status("create the volume", e))?;
        info!(volume = %v.name, size = v.size_bytes, replicas = v.replicas, "volume created");
        Ok(Response::new(pb::CreateVolumeResponse { volume: Some(csi_volume(&v, p.fs_type.as_str())) }))
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

    /// Pages through volumes in name order; the token is the last name of the
    /// previous page, so deletes between pages never skip or repeat a volume.
    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let token_ok = r.starting_token.is_empty()
            || (r.starting_token.len() <= 128
                && r.starting_token.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
        if !token_ok {
            return Err(Status::aborted(format!(
                "starting_token {:?} is not one this plugin issued",
                r.starting_token
            )));
        }
        let mut volumes = self.meta.list_volumes().await.map_err(|e| meta_status("list volumes", e))?.volumes;
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let rest: Vec<&meta::Volume> =
            volumes.iter().filter(|v| r.starting_token.is_empty() || v.name > r.starting_token).collect();
        let take = if r.max_entries == 0 { rest.len() } else { (r.max_entries as usize).min(rest.len()) };
        let next_token = if take < rest.len() { rest[take - 1].name.clone() } else { String::new() };
        let entries = rest[..take]
            .iter()
            .map(|v| pb::list_volumes_response::Entry {
                volume: Some(csi_volume(v, "")),
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

    /// Bytes a new volume of these parameters could get: the free space of the
    /// up nodes (in the topology's zone, when given) divided by the replicas.
    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        for c in &r.volume_capabilities {
            capability_arg("volume_capabilities", c)?;
        }
        let p = VolumeParams::parse(&r.parameters)?;
        let zone = r.accessible_topology.as_ref().and_then(|t| t.segments.get(TOPOLOGY_ZONE)).cloned();
        let nodes = self.meta.list_nodes().await.map_err(|e| meta_status("list nodes", e))?.nodes;
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
            .filter(|n| zone.as_ref().is_none_or(|z| &n.zone == z))
            .map(|n| n.capacity_bytes.saturating_sub(n.allocated_bytes))
            .sum();
        let available = free / u64::from(p.replicas);
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: i64::try_from(available).unwrap_or(i64::MAX),
            maximum_volume_size: None,
            minimum_volume_size: Some(params::BLOCK as i64),
        }))
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
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, "")),
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
