//! What the kubelet sees of `ballast node` and `ballast csi-controller`, run as
//! csi/ runs them but on loopback, on a real cluster of processes (three meta
//! members, one storage node):
//!
//! - plugin registration: `csi.ballast.io-reg.sock` appears in the
//!   registration directory only once the CSI socket answers, GetInfo names the
//!   driver and the host path given by `--kubelet-registration-path`, and
//!   SIGTERM removes it (the kubelet's cue to deregister);
//! - `--health-listen`: `/healthz` and `/readyz` are 200 while meta answers;
//!   with every meta member killed, `/readyz` is 503 and `/healthz` stays 200,
//!   promptly, so the kubelet does not restart the plugins; and the node still
//!   stops within its pod's grace period.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ballast_csi::pb;
use ballast_csi::pb::identity_client::IdentityClient;
use ballast_csi::registration::pb as regpb;
use ballast_csi::registration::pb::registration_client::RegistrationClient;
use ballast_testkit::{wait_until, Cluster, Proc, Result};

const HOST_SOCKET: &str = "/var/lib/kubelet/plugins/csi.ballast.io/csi.sock";
/// What csi/ gives the probes (timeoutSeconds): an answer must come well within it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` as the kubelet's HTTP prober sends it: status, body, time taken.
fn get(addr: SocketAddr, path: &str) -> (u16, String, Duration) {
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.36\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body, start.elapsed())
}

/// Polls `GET path` until it answers `status`.
fn wait_status(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (got, body, _) = get(addr, path);
        if got == status {
            return body;
        }
        assert!(Instant::now() < deadline, "GET {path} on {addr}: {got} {body:?}, waited {timeout:?} for {status}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn health_addr(p: &mut Proc) -> SocketAddr {
    let addr = p.wait_value("ready health", "addr").expect("a ready health line");
    addr.parse().unwrap_or_else(|_| panic!("ready health addr={addr}"))
}

#[test]
fn node_registers_with_the_kubelet_and_health_ignores_meta_outages() -> Result<()> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c = Cluster::start_with("kubelet", &[(1, "z1")], |_, dir| {
        let registry = dir.join("plugins_registry");
        std::fs::create_dir_all(&registry).expect("registration dir");
        vec![
            format!("--csi-endpoint=unix://{}", dir.join("csi.sock").display()),
            format!("--csi-state={}", dir.join("csi-state").display()),
            format!("--kubelet-registration-path={HOST_SOCKET}"),
            format!("--registration-dir={}", registry.display()),
            "--health-listen=127.0.0.1:0".into(),
        ]
    })?;
    let csi_socket = c.path("csi.sock");
    let reg_socket = c.path("plugins_registry").join("csi.ballast.io-reg.sock");
    let node_health = health_addr(c.node_proc(1).expect("node 1 runs"));

    // The registration socket appears, and by then the CSI socket answers
    // (the kubelet calls NodeGetInfo on it right after GetInfo).
    wait_until("the registration socket", Duration::from_secs(60), || reg_socket.exists())?;
    rt.block_on(async {
        let csi = ballast_csi::dial(&csi_socket).await.expect("the CSI socket answers once the plugin is registered");
        let info = IdentityClient::new(csi).get_plugin_info(pb::GetPluginInfoRequest {}).await.expect("GetPluginInfo");
        assert_eq!(info.into_inner().name, "csi.ballast.io");

        let mut kubelet = RegistrationClient::new(ballast_csi::dial(&reg_socket).await.expect("registration socket"));
        let info = kubelet.get_info(regpb::InfoRequest {}).await.expect("GetInfo").into_inner();
        assert_eq!(
            (info.r#type.as_str(), info.name.as_str(), info.endpoint.as_str()),
            ("CSIPlugin", "csi.ballast.io", HOST_SOCKET)
        );
        assert_eq!(info.supported_versions, ["1.0.0"]);
        let status = regpb::RegistrationStatus { plugin_registered: true, error: String::new() };
        kubelet.notify_registration_status(status).await.expect("NotifyRegistrationStatus");
    });

    // The controller, with its own health endpoints.
    let ctl_socket = c.path("csi-controller.sock");
    let mut controller = Proc::spawn(
        "csi-controller",
        [
            "csi-controller",
            "--endpoint",
            &format!("unix://{}", ctl_socket.display()),
            "--meta",
            &c.meta(),
            "--health-listen",
            "127.0.0.1:0",
            "--tls-dir",
            c.tls_dir(&ballast_tls::Identity::CsiController)?.to_str().expect("utf8"),
        ],
    )?;
    let ctl_health = health_addr(&mut controller);

    // Meta answers: alive and ready, both.
    for addr in [node_health, ctl_health] {
        assert_eq!(wait_status(addr, "/readyz", 200, Duration::from_secs(60)), "ok");
        assert_eq!(wait_status(addr, "/healthz", 200, Duration::from_secs(10)), "ok");
        assert_eq!(get(addr, "/metrics").0, 404);
    }

    // Every meta member gone: not ready, and still alive, answered promptly.
    for m in &mut c.members {
        if let Some(mut p) = m.proc.take() {
            p.kill();
        }
    }
    for addr in [node_health, ctl_health] {
        let body = wait_status(addr, "/readyz", 503, Duration::from_secs(60));
        assert!(body.contains("metadata service") || body.contains("no answer"), "{body}");
    }
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        for addr in [node_health, ctl_health] {
            let (status, body, took) = get(addr, "/healthz");
            assert_eq!((status, body.as_str()), (200, "ok"), "/healthz on {addr} during the meta outage");
            assert!(took < PROBE_TIMEOUT / 2, "/healthz on {addr} took {took:?} during the meta outage");
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    // A clean stop removes the registration socket: the kubelet deregisters.
    controller.terminate(Duration::from_secs(60)).expect("the controller stops on SIGTERM");
    // ...within the pod's grace period (60 s in csi/node.yaml), meta down or not.
    let node = c.node_proc(1).expect("node 1 runs");
    let stopping = Instant::now();
    let status = node.terminate(Duration::from_secs(90)).expect("the node stops on SIGTERM");
    assert!(status.success(), "ballast node: {status}");
    assert!(stopping.elapsed() < Duration::from_secs(45), "ballast node took {:?} to stop", stopping.elapsed());
    assert!(!reg_socket.exists(), "the registration socket is removed on shutdown");
    let leftovers: Vec<PathBuf> = std::fs::read_dir(c.path("plugins_registry"))
        .expect("read the registration dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert!(leftovers.is_empty(), "left in the registration dir: {leftovers:?}");
    Ok(())
}
