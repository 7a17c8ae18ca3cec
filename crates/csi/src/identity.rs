//! CSI Identity: the driver's name and version, its capabilities, and Probe.

use ballast_metaclient::MetaClient;
use tonic::{Request, Response, Status};

use crate::pb;
use crate::pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};

#[derive(Clone)]
pub struct IdentityService {
    controller: bool,
    meta: MetaClient,
}

impl IdentityService {
    /// `controller`: whether this process also serves the Controller service.
    /// Probe is ready when `meta` answers.
    pub fn new(controller: bool, meta: MetaClient) -> Self {
        IdentityService { controller, meta }
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: crate::DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        let service =
            |t: service::Type| pb::PluginCapability { r#type: Some(Type::Service(Service { r#type: t as i32 })) };
        let mut capabilities = vec![service(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.push(service(service::Type::ControllerService));
        }
        // A mounted filesystem grows while in use (the front end follows the new size).
        capabilities.push(pb::PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })),
        });
        Ok(Response::new(pb::GetPluginCapabilitiesResponse { capabilities }))
    }

    /// Ready when the metadata service answers; otherwise still OK, with ready
    /// false (the spec's "not ready yet"), so liveness probes do not kill a
    /// driver that only waits for meta.
    async fn probe(&self, _req: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        let ready = match self.meta.status().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "probe: not ready");
                false
            }
        };
        Ok(Response::new(pb::ProbeResponse { ready: Some(ready) }))
    }
}
