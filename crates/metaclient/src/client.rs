//! [`MetaClient`]: one typed gRPC client over all members of the metadata service.
//!
//! Any member answers any call (reads from its own copy, writes proxied to the
//! leader), so the client does no leader tracking: it remembers the member that
//! answered last and starts there. A call that meets an unreachable member, a
//! member without a leader, or a timeout moves on to the next member; after a
//! full round without an answer it backs off briefly and goes round again until
//! the retry budget is spent. Any other answer (an error the caller must look at)
//! returns at once.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ballast_proto::v1 as pb;
use ballast_proto::v1::admin_client::AdminClient;
use ballast_proto::v1::node_api_client::NodeApiClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, debug_span, Instrument};

use crate::error::{describe_failure, is_retryable, MetaClientError};

/// How often [`MetaClient::wait_snapshot_ready`] looks.
pub const SNAPSHOT_READY_POLL: Duration = Duration::from_millis(100);

/// Timeouts and the retry budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaClientOptions {
    /// TCP connect timeout per member. Default: 2 s.
    pub connect_timeout: Duration,
    /// Per-attempt timeout of one call on one member (also sent to the member as
    /// the call's gRPC deadline). Default: 10 s.
    pub request_timeout: Duration,
    /// How long a call keeps trying members before it reports
    /// [`MetaClientError::Unreachable`]. The first round always tries every
    /// member once, so a call takes at most about
    /// `max(retry_for, members × request_timeout)`. Default: 15 s.
    pub retry_for: Duration,
}

impl Default for MetaClientOptions {
    fn default() -> Self {
        MetaClientOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(15),
        }
    }
}

/// First pause after a round in which no member answered; doubles per round.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

struct Member {
    /// As the user wrote it: error messages name members this way.
    name: String,
    endpoint: Endpoint,
    /// Created on first use (a channel spawns its worker on the current runtime,
    /// so it cannot be made in `new`, which may run outside one). The channel
    /// connects lazily and reconnects by itself after a failure.
    channel: OnceLock<Channel>,
}

struct Inner {
    members: Vec<Member>,
    /// How every member's channel is secured (mutual TLS, a meta member's
    /// certificate expected of the server).
    security: ballast_tls::Security,
    /// Index of the member that answered last: the next call starts there.
    last_good: AtomicUsize,
    options: MetaClientOptions,
}

/// A client of the metadata service. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MetaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaClient")
            .field("endpoints", &self.endpoints())
            .field("options", &self.inner.options)
            .finish()
    }
}

/// Splits a comma-separated member list ("a:7400, b:7400") into endpoints,
/// dropping empty items.
pub fn parse_endpoints(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

fn endpoint(name: &str, options: &MetaClientOptions) -> Result<Endpoint, MetaClientError> {
    let invalid = |reason: String| MetaClientError::InvalidEndpoint { endpoint: name.to_string(), reason };
    let uri = if name.contains("://") { name.to_string() } else { format!("http://{name}") };
    let ep = Endpoint::from_shared(uri).map_err(|e| invalid(e.to_string()))?;
    if ep.uri().host().is_none_or(str::is_empty) {
        return Err(invalid("no host".into()));
    }
    if ep.uri().port_u16().is_none() {
        return Err(invalid("no port (expected host:port)".into()));
    }
    if ep.uri().scheme_str() != Some("http") {
        return Err(invalid("only http:// endpoints are supported".into()));
    }
    // No Endpoint::timeout: the per-attempt timeout is applied in `call`, so a
    // timed-out attempt is told apart from a member's own answers.
    Ok(ep.connect_timeout(options.connect_timeout).tcp_nodelay(true))
}

impl MetaClient {
    /// A client over `endpoints` (`host:port`, `http://` added when missing) with
    /// the default options, its channels secured by `security`. Nothing is
    /// connected until the first call.
    pub fn new<I, S>(endpoints: I, security: ballast_tls::Security) -> Result<Self, MetaClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_options(endpoints, MetaClientOptions::default(), security)
    }

    pub fn with_options<I, S>(
        endpoints: I,
        options: MetaClientOptions,
        security: ballast_tls::Security,
    ) -> Result<Self, MetaClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let members = endpoints
            .into_iter()
            .map(|e| {
                let name = e.as_ref().trim().to_string();
                Ok(Member { endpoint: endpoint(&name, &options)?, name, channel: OnceLock::new() })
            })
            .collect::<Result<Vec<_>, MetaClientError>>()?;
        if members.is_empty() {
            return Err(MetaClientError::NoEndpoints);
        }
        Ok(MetaClient { inner: Arc::new(Inner { members, security, last_good: AtomicUsize::new(0), options }) })
    }

    /// The members, as given.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.members.iter().map(|m| m.name.clone()).collect()
    }

    pub fn options(&self) -> &MetaClientOptions {
        &self.inner.options
    }

    /// How this client's channels are secured.
    pub fn security(&self) -> &ballast_tls::Security {
        &self.inner.security
    }

    fn channel(&self, idx: usize) -> Channel {
        let m = &self.inner.members[idx];
        m.channel
            .get_or_init(|| {
                ballast_tls::grpc::channel(&m.endpoint, self.inner.security.clone(), ballast_tls::Role::Meta)
            })
            .clone()
    }

    /// Runs one rpc with failover and retry (see the module docs). `f` makes the
    /// call on a channel; it runs once per attempt.
    async fn call<M, T, F, Fut>(&self, rpc: &'static str, msg: M, f: F) -> Result<T, MetaClientError>
    where
        M: Clone,
        F: Fn(Channel, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let inner = &*self.inner;
        let n = inner.members.len();
        let deadline = Instant::now() + inner.options.retry_for;
        let first = inner.last_good.load(Ordering::Relaxed) % n;
        let mut backoff = BACKOFF_START;
        let mut last_error: Option<String> = None;
        let mut attempt = 0usize;
        loop {
            let idx = (first + attempt) % n;
            let first_round = attempt < n;
            attempt += 1;
            // The first round gives every member the full request timeout; later
            // rounds stop at the deadline.
            let timeout = if first_round {
                inner.options.request_timeout
            } else {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    break;
                }
                inner.options.request_timeout.min(remaining)
            };
            let member = &inner.members[idx].name;
            let mut req = tonic::Request::new(msg.clone());
            req.set_timeout(timeout);
            let span = debug_span!("meta_rpc", rpc, member = %member, attempt);
            let outcome = tokio::time::timeout(timeout, f(self.channel(idx), req)).instrument(span).await;
            match outcome {
                Ok(Ok(resp)) => {
                    inner.last_good.store(idx, Ordering::Relaxed);
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) if is_retryable(&status) => {
                    let error = describe_failure(&status);
                    debug!(rpc, member = %member, code = ?status.code(), %error, "meta member failed; trying the next");
                    last_error = Some(error);
                }
                Ok(Err(status)) => {
                    // A member answered: this is the cluster's answer.
                    inner.last_good.store(idx, Ordering::Relaxed);
                    return Err(MetaClientError::from_status(rpc, &status));
                }
                Err(_elapsed) => {
                    last_error = Some(format!("no answer within {timeout:?}"));
                    debug!(rpc, member = %member, "meta member timed out; trying the next");
                }
            }
            let now = Instant::now();
            if now >= deadline && attempt >= n {
                break;
            }
            if attempt.is_multiple_of(n) {
                // A full round without an answer: wait before the next one.
                let pause = backoff.min(deadline.saturating_duration_since(now));
                if pause.is_zero() {
                    break;
                }
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        let last_error = last_error.unwrap_or_else(|| "no member was tried".into());
        Err(MetaClientError::Unreachable { endpoints: self.endpoints(), last_error })
    }

    async fn admin<M, T, F, Fut>(&self, rpc: &'static str, msg: M, f: F) -> Result<T, MetaClientError>
    where
        M: Clone,
        F: Fn(AdminClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call(rpc, msg, |ch, req| f(AdminClient::new(ch), req)).await
    }

    async fn node_api<M, T, F, Fut>(&self, rpc: &'static str, msg: M, f: F) -> Result<T, MetaClientError>
    where
        M: Clone,
        F: Fn(NodeApiClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call(rpc, msg, |ch, req| f(NodeApiClient::new(ch), req)).await
    }

    // ---- Admin ------------------------------------------------------------

    pub async fn status(&self) -> Result<pb::StatusResponse, MetaClientError> {
        self.admin("Admin.Status", pb::StatusRequest {}, |mut c, r| async move { c.status(r).await }).await
    }

    pub async fn list_nodes(&self) -> Result<pb::ListNodesResponse, MetaClientError> {
        self.admin("Admin.ListNodes", pb::ListNodesRequest {}, |mut c, r| async move { c.list_nodes(r).await }).await
    }

    pub async fn set_node_state(&self, req: pb::SetNodeStateRequest) -> Result<pb::Node, MetaClientError> {
        self.admin("Admin.SetNodeState", req, |mut c, r| async move { c.set_node_state(r).await }).await
    }

    pub async fn remove_node(&self, req: pb::RemoveNodeRequest) -> Result<pb::RemoveNodeResponse, MetaClientError> {
        self.admin("Admin.RemoveNode", req, |mut c, r| async move { c.remove_node(r).await }).await
    }

    /// Sets the cluster's over-provisioning ratio; answers the status in force.
    pub async fn set_over_provisioning(&self, pct: u32) -> Result<pb::StatusResponse, MetaClientError> {
        let req = pb::SetOverProvisioningRequest { pct };
        self.admin("Admin.SetOverProvisioning", req, |mut c, r| async move { c.set_over_provisioning(r).await }).await
    }

    pub async fn create_volume(&self, req: pb::CreateVolumeRequest) -> Result<pb::Volume, MetaClientError> {
        self.admin("Admin.CreateVolume", req, |mut c, r| async move { c.create_volume(r).await }).await
    }

    pub async fn list_volumes(&self) -> Result<pb::ListVolumesResponse, MetaClientError> {
        self.admin("Admin.ListVolumes", pb::ListVolumesRequest {}, |mut c, r| async move { c.list_volumes(r).await })
            .await
    }

    pub async fn inspect_volume(&self, req: pb::InspectVolumeRequest) -> Result<pb::VolumeLayout, MetaClientError> {
        self.admin("Admin.InspectVolume", req, |mut c, r| async move { c.inspect_volume(r).await }).await
    }

    pub async fn grow_volume(&self, req: pb::GrowVolumeRequest) -> Result<pb::Volume, MetaClientError> {
        self.admin("Admin.GrowVolume", req, |mut c, r| async move { c.grow_volume(r).await }).await
    }

    pub async fn delete_volume(
        &self,
        req: pb::DeleteVolumeRequest,
    ) -> Result<pb::DeleteVolumeResponse, MetaClientError> {
        self.admin("Admin.DeleteVolume", req, |mut c, r| async move { c.delete_volume(r).await }).await
    }

    pub async fn publish_volume(&self, req: pb::PublishVolumeRequest) -> Result<pb::Volume, MetaClientError> {
        self.admin("Admin.PublishVolume", req, |mut c, r| async move { c.publish_volume(r).await }).await
    }

    pub async fn unpublish_volume(&self, req: pb::UnpublishVolumeRequest) -> Result<pb::Volume, MetaClientError> {
        self.admin("Admin.UnpublishVolume", req, |mut c, r| async move { c.unpublish_volume(r).await }).await
    }

    pub async fn list_jobs(&self, req: pb::ListJobsRequest) -> Result<pb::ListJobsResponse, MetaClientError> {
        self.admin("Admin.ListJobs", req, |mut c, r| async move { c.list_jobs(r).await }).await
    }

    pub async fn create_snapshot(&self, req: pb::CreateSnapshotRequest) -> Result<pb::Snapshot, MetaClientError> {
        self.admin("Admin.CreateSnapshot", req, |mut c, r| async move { c.create_snapshot(r).await }).await
    }

    pub async fn list_snapshots(
        &self,
        req: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsResponse, MetaClientError> {
        self.admin("Admin.ListSnapshots", req, |mut c, r| async move { c.list_snapshots(r).await }).await
    }

    /// Waits up to `timeout` for snapshot `name` to be ready (an attached
    /// volume's front end takes a requested snapshot within a layout poll),
    /// looking every [`SNAPSHOT_READY_POLL`]: the snapshot as last seen, ready
    /// or not, or None when it is gone (deleted meanwhile; a clone's source
    /// snapshot also goes once the clone is independent).
    pub async fn wait_snapshot_ready(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<pb::Snapshot>, MetaClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let req = pb::ListSnapshotsRequest { volume: String::new(), snapshot: name.to_string() };
            let now = match self.list_snapshots(req).await {
                Ok(list) => list.snapshots.into_iter().find(|s| s.name == name),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e),
            };
            match now {
                Some(s) if !s.ready && Instant::now() < deadline => tokio::time::sleep(SNAPSHOT_READY_POLL).await,
                other => return Ok(other),
            }
        }
    }

    pub async fn delete_snapshot(
        &self,
        req: pb::DeleteSnapshotRequest,
    ) -> Result<pb::DeleteSnapshotResponse, MetaClientError> {
        self.admin("Admin.DeleteSnapshot", req, |mut c, r| async move { c.delete_snapshot(r).await }).await
    }

    pub async fn what_if(&self, req: pb::WhatIfRequest) -> Result<pb::WhatIfResponse, MetaClientError> {
        self.admin("Admin.WhatIf", req, |mut c, r| async move { c.what_if(r).await }).await
    }

    pub async fn add_member(&self, req: pb::AddMemberRequest) -> Result<pb::StatusResponse, MetaClientError> {
        self.admin("Admin.AddMember", req, |mut c, r| async move { c.add_member(r).await }).await
    }

    pub async fn remove_member(&self, req: pb::RemoveMemberRequest) -> Result<pb::StatusResponse, MetaClientError> {
        self.admin("Admin.RemoveMember", req, |mut c, r| async move { c.remove_member(r).await }).await
    }

    // ---- NodeApi ----------------------------------------------------------

    pub async fn register(&self, req: pb::RegisterRequest) -> Result<pb::RegisterResponse, MetaClientError> {
        self.node_api("NodeApi.Register", req, |mut c, r| async move { c.register(r).await }).await
    }

    pub async fn heartbeat(&self, req: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse, MetaClientError> {
        self.node_api("NodeApi.Heartbeat", req, |mut c, r| async move { c.heartbeat(r).await }).await
    }

    pub async fn attach(&self, req: pb::AttachRequest) -> Result<pb::AttachResponse, MetaClientError> {
        self.node_api("NodeApi.Attach", req, |mut c, r| async move { c.attach(r).await }).await
    }

    pub async fn get_layout(&self, req: pb::GetLayoutRequest) -> Result<pb::VolumeLayout, MetaClientError> {
        self.node_api("NodeApi.GetLayout", req, |mut c, r| async move { c.get_layout(r).await }).await
    }

    pub async fn eject(&self, req: pb::EjectRequest) -> Result<pb::Chunk, MetaClientError> {
        self.node_api("NodeApi.Eject", req, |mut c, r| async move { c.eject(r).await }).await
    }

    pub async fn ack_layout(&self, req: pb::AckLayoutRequest) -> Result<pb::AckLayoutResponse, MetaClientError> {
        self.node_api("NodeApi.AckLayout", req, |mut c, r| async move { c.ack_layout(r).await }).await
    }

    pub async fn report_job(&self, req: pb::ReportJobRequest) -> Result<pb::ReportJobResponse, MetaClientError> {
        self.node_api("NodeApi.ReportJob", req, |mut c, r| async move { c.report_job(r).await }).await
    }

    pub async fn detach(&self, req: pb::DetachRequest) -> Result<pb::DetachResponse, MetaClientError> {
        self.node_api("NodeApi.Detach", req, |mut c, r| async move { c.detach(r).await }).await
    }

    pub async fn commit_snapshots(
        &self,
        req: pb::CommitSnapshotsRequest,
    ) -> Result<pb::CommitSnapshotsResponse, MetaClientError> {
        self.node_api("NodeApi.CommitSnapshots", req, |mut c, r| async move { c.commit_snapshots(r).await }).await
    }

    /// A clone's front end filled chunks from its origin (see the proto).
    pub async fn fill_chunks(&self, req: pb::FillChunksRequest) -> Result<pb::FillChunksResponse, MetaClientError> {
        self.node_api("NodeApi.FillChunks", req, |mut c, r| async move { c.fill_chunks(r).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_a_scheme_and_must_have_a_port() {
        let c =
            MetaClient::new(["127.0.0.1:7400", "http://meta-1:7400", " meta-2:7400 "], ballast_tls::Security::Insecure)
                .unwrap();
        assert_eq!(c.endpoints(), vec!["127.0.0.1:7400", "http://meta-1:7400", "meta-2:7400"]);
        assert_eq!(c.inner.members[0].endpoint.uri().to_string(), "http://127.0.0.1:7400/");
        for bad in ["meta-1", "", "https://meta-1:7400", "a b:1"] {
            assert!(
                matches!(
                    MetaClient::new([bad], ballast_tls::Security::Insecure),
                    Err(MetaClientError::InvalidEndpoint { .. })
                ),
                "{bad:?} should be rejected"
            );
        }
        assert!(matches!(
            MetaClient::new(Vec::<String>::new(), ballast_tls::Security::Insecure),
            Err(MetaClientError::NoEndpoints)
        ));
    }

    #[test]
    fn endpoint_lists_split_on_commas() {
        assert_eq!(parse_endpoints("a:1, b:2,,c:3 "), vec!["a:1", "b:2", "c:3"]);
        assert!(parse_endpoints(" , ").is_empty());
    }
}
