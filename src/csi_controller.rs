//! `ballast csi-controller`: the CSI Controller and Identity services on a unix
//! socket for the Kubernetes sidecars (external-provisioner, -attacher, -resizer).
//! It keeps no state of its own: every call goes to the metadata service.

use anyhow::Context;
use ballast_csi::{ControllerService, IdentityService};
use ballast_metaclient::MetaClient;

use crate::cli::CsiControllerArgs;
use crate::shutdown;

pub async fn run(a: CsiControllerArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    let socket = ballast_csi::parse_endpoint(&a.endpoint).map_err(anyhow::Error::msg)?;
    let meta = MetaClient::new(ballast_metaclient::parse_endpoints(&a.meta)).context("meta endpoints")?;
    let identity = IdentityService::new(true, meta.clone());
    let controller = ControllerService::new(meta);
    println!("ready csi socket={}", socket.display());
    ballast_csi::serve(&socket, identity, Some(controller), None, shutdown::wait(stop)).await.context("CSI server")
}
