//! Prometheus metrics of the CSI services: every rpc the socket serves
//! (Identity, Controller, Node; failures, unknown methods and refusals
//! included), counted by method and gRPC code, and timed by method.
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `ballast_csi_rpcs_total` | counter | `method` (e.g. `NodeStageVolume`; `unknown` for a path outside the CSI services), `code` (gRPC code name: `OK`, `NotFound`, `Aborted`, ...) |
//! | `ballast_csi_rpc_latency_seconds` | histogram | `method` ([`ballast_metrics::rpc_latency_buckets`]) |
//!
//! [`CsiMetrics::register`] registers them once per process; [`crate::serve_with`]
//! records through a tower layer around the whole router, so that no handler
//! can forget to. The code is the one the response headers carry (tonic
//! answers every failure of a unary call "trailers-only", with `grpc-status`
//! in the headers); a response without one succeeded (its status, OK, comes
//! in the trailers).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use ballast_metrics::prometheus_client::metrics::family::MetricConstructor;
use ballast_metrics::prometheus_client::registry::Unit;
use ballast_metrics::{Counter, Family, Histogram, Registry};
use tonic::codegen::http;
use tonic::Code;

/// The rpcs of the CSI services this driver serves (proto/csi/v1/csi.proto):
/// the only `method` label values besides `unknown`, so that a client calling
/// made-up paths cannot grow the label set.
const METHODS: [&str; 21] = [
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "ControllerGetCapabilities",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
];

const SERVICES: [&str; 3] = ["/csi.v1.Identity/", "/csi.v1.Controller/", "/csi.v1.Node/"];

/// The `method` label of a request path (`/csi.v1.Node/NodeStageVolume`).
pub fn method_label(path: &str) -> &'static str {
    SERVICES
        .iter()
        .find_map(|s| path.strip_prefix(s))
        .and_then(|m| METHODS.iter().find(|k| **k == m))
        .copied()
        .unwrap_or("unknown")
}

/// A gRPC code's name, as the Prometheus ecosystem spells it (grpc-go's
/// `codes.Code.String()`, used by every gRPC exporter: `OK`, `NotFound`, ...).
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The gRPC code a response's headers carry; none: OK (see the module docs).
fn response_code(headers: &http::HeaderMap) -> Code {
    match headers.get("grpc-status") {
        None => Code::Ok,
        Some(v) => v.to_str().ok().and_then(|s| s.parse::<i32>().ok()).map_or(Code::Unknown, Code::from_i32),
    }
}

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Clone)]
struct RpcHistogram;

impl MetricConstructor<Histogram> for RpcHistogram {
    fn new_metric(&self) -> Histogram {
        ballast_metrics::rpc_latency_histogram()
    }
}

/// The CSI metric families (one registration per process; cheap to clone).
#[derive(Clone)]
pub struct CsiMetrics {
    inner: Arc<Families>,
}

struct Families {
    rpcs: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, RpcHistogram>,
}

impl std::fmt::Debug for CsiMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsiMetrics").finish_non_exhaustive()
    }
}

impl CsiMetrics {
    /// Registers the families in the process's `registry` (its root: the names
    /// get the `ballast_csi_` prefix here). Call once per registry.
    pub fn register(registry: &mut Registry) -> CsiMetrics {
        let f = Families { rpcs: Family::default(), latency: Family::new_with_constructor(RpcHistogram) };
        let r = ballast_metrics::ballast(registry).sub_registry_with_prefix("csi");
        r.register("rpcs", "CSI rpcs served, by method and gRPC code", f.rpcs.clone());
        r.register_with_unit("rpc_latency", "Latency of CSI rpcs, by method", Unit::Seconds, f.latency.clone());
        CsiMetrics { inner: Arc::new(f) }
    }

    /// Records one rpc. (Per rpc, off the data path: the family lookups take
    /// their read lock here.)
    pub fn record(&self, method: &'static str, code: Code, seconds: f64) {
        self.inner.rpcs.get_or_create(&vec![("method", method), ("code", code_label(code))]).inc();
        self.inner.latency.get_or_create(&vec![("method", method)]).observe(seconds);
    }
}

/// The tower layer [`crate::serve_with`] puts around the router: with
/// metrics, every rpc is recorded; without, requests pass through.
#[derive(Clone, Debug, Default)]
pub struct MetricsLayer {
    metrics: Option<CsiMetrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Option<CsiMetrics>) -> MetricsLayer {
        MetricsLayer { metrics }
    }
}

impl<S> tower_layer::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService { inner, metrics: self.metrics.clone() }
    }
}

/// See [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Option<CsiMetrics>,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for MetricsService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The service polled ready is the one that takes the request; a clone
        // stays behind for the next (tower's rule for services called from a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(metrics) = self.metrics.clone() else { return Box::pin(inner.call(req)) };
        let method = method_label(req.uri().path());
        let start = Instant::now();
        let answer = inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            // A transport-level failure (no response at all) is the client's
            // Unavailable.
            let code = r.as_ref().map_or(Code::Unavailable, |resp| response_code(resp.headers()));
            metrics.record(method, code, start.elapsed().as_secs_f64());
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(method_label("/csi.v1.Node/NodeStageVolume"), "NodeStageVolume");
        assert_eq!(method_label("/csi.v1.Identity/Probe"), "Probe");
        assert_eq!(method_label("/csi.v1.Controller/CreateVolume"), "CreateVolume");
        assert_eq!(method_label("/csi.v1.Node/MadeUp"), "unknown");
        assert_eq!(method_label("/other.Service/Probe"), "unknown");
        assert_eq!(method_label("/csi.v1.Node/"), "unknown");
        assert_eq!(code_label(Code::Ok), "OK");
        assert_eq!(code_label(Code::NotFound), "NotFound");
        let mut h = http::HeaderMap::new();
        assert_eq!(response_code(&h), Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("10"));
        assert_eq!(response_code(&h), Code::Aborted);
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(response_code(&h), Code::Unknown);
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Calls over the socket, as the kubelet and the sidecars make them, to all
    /// three services: successes and failures are counted by method and code.
    #[tokio::test]
    async fn every_rpc_over_the_socket_is_counted_by_method_and_code() {
        use crate::pb::controller_client::ControllerClient;
        use crate::pb::identity_client::IdentityClient;
        use crate::pb::node_client::NodeClient;
        use crate::{ControllerService, IdentityService, NodeConfig, NodeService};
        use ballast_metaclient::MetaClient;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("csi.sock");
        // Nothing answers here: calls that need meta fail, and are counted too.
        let meta = MetaClient::new(["127.0.0.1:9"], ballast_metaclient::Security::Insecure).expect("meta client");
        let node_cfg = NodeConfig {
            node_id: 4,
            zone: "z1".into(),
            state_dir: dir.path().join("state"),
            max_volumes: 8,
            io_timeout: std::time::Duration::from_secs(1),
            volume_metrics: None,
        };
        let node = NodeService::new(node_cfg, meta.clone()).expect("node service");
        let mut registry = ballast_metrics::registry();
        let metrics = CsiMetrics::register(&mut registry);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let (path, identity, controller) =
                (path.clone(), IdentityService::new(true, meta.clone()), ControllerService::new(meta.clone()));
            async move {
                crate::serve_with(&path, identity, Some(controller), Some(node), Some(metrics), async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        while !path.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let channel = crate::dial(&path).await.expect("connect");
        let mut identity = IdentityClient::new(channel.clone());
        for _ in 0..2 {
            identity.get_plugin_info(crate::pb::GetPluginInfoRequest {}).await.expect("plugin info");
        }
        let mut controller = ControllerClient::new(channel.clone());
        let refused = controller.create_volume(crate::pb::CreateVolumeRequest::default()).await.expect_err("no name");
        assert_eq!(refused.code(), Code::InvalidArgument);
        let mut node = NodeClient::new(channel.clone());
        node.node_get_info(crate::pb::NodeGetInfoRequest {}).await.expect("node info");
        let refused = node.node_stage_volume(crate::pb::NodeStageVolumeRequest::default()).await.expect_err("no id");
        let stage_code = code_label(refused.code());
        // A path outside the CSI services: Unimplemented, under `unknown`.
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.expect("ready");
        let codec = tonic::codec::ProstCodec::<crate::pb::ProbeRequest, crate::pb::ProbeResponse>::default();
        let path = http::uri::PathAndQuery::from_static("/csi.v1.Node/MadeUp");
        let unknown =
            grpc.unary(tonic::Request::new(crate::pb::ProbeRequest {}), path, codec).await.expect_err("unknown");
        assert_eq!(unknown.code(), Code::Unimplemented);

        let text = ballast_metrics::encode(&registry);
        let stage = format!("ballast_csi_rpcs_total{{method=\"NodeStageVolume\",code=\"{stage_code}\"}}");
        for (series, want) in [
            ("ballast_csi_rpcs_total{method=\"GetPluginInfo\",code=\"OK\"}", 2.0),
            ("ballast_csi_rpcs_total{method=\"CreateVolume\",code=\"InvalidArgument\"}", 1.0),
            ("ballast_csi_rpcs_total{method=\"NodeGetInfo\",code=\"OK\"}", 1.0),
            (stage.as_str(), 1.0),
            ("ballast_csi_rpcs_total{method=\"unknown\",code=\"Unimplemented\"}", 1.0),
            ("ballast_csi_rpc_latency_seconds_count{method=\"GetPluginInfo\"}", 2.0),
            ("ballast_csi_rpc_latency_seconds_count{method=\"CreateVolume\"}", 1.0),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
        assert!(!text.contains("MadeUp"), "{text}");
        if std::env::var_os("SHOW_METRICS").is_some() {
            println!("{text}");
        }
        drop((identity, controller, node, grpc, channel));
        let _ = stop.send(());
        server.await.expect("serve task").expect("serve");
    }
}
