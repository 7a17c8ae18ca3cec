//! The Ballast CSI driver (CSI spec v1.x): Identity, Controller and Node services
//! over gRPC on a unix socket, the way the kubelet and the Kubernetes sidecars
//! (external-provisioner, -attacher, -resizer, node-driver-registrar) call them.
//!
//! ```text
//!   external-provisioner ─ CreateVolume/DeleteVolume ─┐
//!   external-attacher ── ControllerPublish/Unpublish ─┼─► Controller ──► metadata service (Admin API)
//!   external-resizer ─── ControllerExpandVolume ──────┘
//!   kubelet ─ NodeStage/Publish/Expand/Stats ─► Node ──► AttachedVolume (front end, meta epoch)
//!                                                          └► FUSE file ► loop device ► mkfs/mount
//! ```
//!
//! - A CSI volume id is the Ballast volume's name (the CO's CreateVolume name, e.g.
//!   `pvc-<uid>`); a CSI node id is the Ballast storage node's numeric id.
//! - Every call is idempotent; concurrent calls for one volume get `ABORTED`
//!   (the CO retries), see [`locks::VolumeLocks`].
//! - Errors use the codes the spec lists for each call (see each service).

// tonic::Status is the error every gRPC handler returns; boxing it in the helpers
// would only add an allocation on the error path.
#![allow(clippy::result_large_err)]

pub mod controller;
pub mod identity;
pub mod locks;
pub mod node;
pub mod params;
pub mod registration;

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

use std::path::{Path, PathBuf};

use ballast_metaclient::MetaClientError;
use tonic::{Code, Status};

pub use controller::ControllerService;
pub use identity::IdentityService;
pub use node::{NodeConfig, NodeService};

/// The driver's name (the CSIDriver object, StorageClass provisioner).
pub const DRIVER_NAME: &str = "csi.ballast.io";
/// The topology segment key NodeGetInfo reports and CreateVolume reads.
pub const TOPOLOGY_ZONE: &str = "topology.ballast.io/zone";

/// A unix-socket endpoint as the sidecars name it: `unix:///csi/csi.sock` (also
/// `unix:/path` and a plain absolute path).
pub fn parse_endpoint(s: &str) -> Result<PathBuf, String> {
    let path = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")).unwrap_or(s);
    if path.is_empty() || !Path::new(path).is_absolute() {
        return Err(format!("invalid CSI endpoint {s:?}: expected unix:///absolute/path.sock"));
    }
    Ok(PathBuf::from(path))
}

/// A metadata-service error as a CSI status: its code is kept (the service
/// already answers with the codes CSI uses: NOT_FOUND, ALREADY_EXISTS,
/// RESOURCE_EXHAUSTED, FAILED_PRECONDITION, INVALID_ARGUMENT); an unreachable
/// service is UNAVAILABLE, so the CO retries.
pub fn meta_status(what: &str, e: MetaClientError) -> Status {
    let code = match e.code() {
        Some(c) => c,
        None if e.is_unreachable() => Code::Unavailable,
        None => Code::Internal,
    };
    Status::new(code, format!("{what}: {e}"))
}

/// Serves the given services on the unix socket `path` until `shutdown`
/// resolves. A stale socket file from an earlier run is replaced.
pub async fn serve(
    path: &Path,
    identity: IdentityService,
    controller: Option<ControllerService>,
    node: Option<NodeService>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    use pb::controller_server::ControllerServer;
    use pb::identity_server::IdentityServer;
    use pb::node_server::NodeServer;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ServeError::Socket(path.to_path_buf(), e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ServeError::Socket(path.to_path_buf(), e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| ServeError::Socket(path.to_path_buf(), e))?;
    tracing::info!(socket = %path.display(), controller = controller.is_some(), node = node.is_some(), "CSI serving");
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_optional_service(controller.map(ControllerServer::new))
        .add_optional_service(node.map(NodeServer::new));
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let served = router.serve_with_incoming_shutdown(incoming, shutdown).await;
    let _ = std::fs::remove_file(path);
    served.map_err(ServeError::Transport)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("CSI socket {0}: {1}")]
    Socket(PathBuf, #[source] std::io::Error),
    #[error("CSI gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(parse_endpoint("unix:///csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(parse_endpoint("unix:/csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(parse_endpoint("/run/csi.sock").unwrap(), PathBuf::from("/run/csi.sock"));
        assert!(parse_endpoint("unix://relative.sock").is_err());
        assert!(parse_endpoint("").is_err());
    }
}
