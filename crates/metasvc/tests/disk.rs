//! Disk health over the wire: a heartbeat reporting a failed disk reaches the
//! replicated state (node list, status), the leader's scheduler rebuilds the
//! node's replicas on another node, and a healthy report clears it. One meta
//! member over real gRPC on loopback.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_metaclient::{pb, MetaClient};
use ballast_metasvc::{fast_timing, MetaConfig, RaftTiming};

const DATA_NODES: [(u64, &str); 4] = [(1, "a"), (2, "b"), (3, "c"), (4, "a")];

fn heartbeat(node: u64, disk: pb::DiskHealth, error: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        node,
        used_bytes: 0,
        disk: disk as i32,
        disk_error: error.into(),
        disk_free_bytes: 1 << 30,
        ..Default::default()
    }
}

async fn node(client: &MetaClient, id: u64) -> pb::Node {
    let nodes = client.list_nodes().await.expect("list nodes").nodes;
    nodes.into_iter().find(|n| n.id == id).expect("node listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_disk_is_recorded_rebuilt_elsewhere_and_cleared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (raft, mut detector) = fast_timing();
    // Nodes that stop heartbeating in this test must not turn suspect under it.
    detector.suspect_after = Duration::from_secs(3600);
    detector.down_after = Duration::from_secs(7200);
    let cfg = MetaConfig {
        id: 1,
        data_dir: dir.path().join("m1"),
        listen: listener.local_addr().expect("addr"),
        initial_members: BTreeMap::from([(1, addr.clone())]),
        raft: RaftTiming { ..raft },
        detector,
        security: ballast_metaclient::Security::Insecure,
    };
    let member = ballast_metasvc::start_on(cfg, listener).await.expect("start member");
    let client = MetaClient::new([addr.as_str()], ballast_metaclient::Security::Insecure).expect("client");
    for (id, zone) in DATA_NODES {
        let req = pb::RegisterRequest {
            node: id,
            addr: format!("127.0.0.1:{}", 7000 + id),
            zone: zone.into(),
            capacity_bytes: 1 << 40,
        };
        client.register(req).await.expect("register");
    }
    let req = pb::CreateVolumeRequest {
        name: "db".into(),
        size_bytes: 16 << 20,
        chunk_size_bytes: 1 << 20,
        replicas: 3,
        ..Default::default()
    };
    client.create_volume(req).await.expect("create volume");
    // Zone a's replicas are on node 1 or 4; node 1 holds some.
    let layout = client.get_layout(pb::GetLayoutRequest { volume: 1 }).await.expect("layout");
    let on_1 = layout.chunks.iter().filter(|c| c.replicas.iter().any(|r| r.node == 1)).count();
    assert!(on_1 > 0, "node 1 holds no chunk");

    // An older node (no disk field) is healthy.
    client.heartbeat(heartbeat(2, pb::DiskHealth::Unspecified, "")).await.expect("heartbeat");
    assert_eq!(node(&client, 2).await.disk, pb::DiskHealth::DiskOk as i32);
    assert_eq!(client.status().await.expect("status").nodes_up, 4);

    let eio = "write /data/.probe: Input/output error (os error 5)";
    client.heartbeat(heartbeat(1, pb::DiskHealth::DiskFailed, eio)).await.expect("heartbeat");
    let n1 = node(&client, 1).await;
    assert_eq!((n1.disk, n1.disk_error.as_str()), (pb::DiskHealth::DiskFailed as i32, eio));
    assert_eq!(n1.state, pb::NodeState::Up as i32, "it heartbeats: the node is up, its disk is not");
    assert_eq!(client.status().await.expect("status").nodes_up, 3, "a failed disk's node does not count as up");
    // Another reason while still failed is not news: the first stands.
    client.heartbeat(heartbeat(1, pb::DiskHealth::DiskFailed, "fdatasync: EIO")).await.expect("heartbeat");
    assert_eq!(node(&client, 1).await.disk_error, eio);

    // The scheduler rebuilds node 1's replicas on its zone mate, node 4, which
    // learns its jobs from its heartbeats.
    let deadline = Instant::now() + Duration::from_secs(60);
    let jobs = loop {
        let r = client.heartbeat(heartbeat(4, pb::DiskHealth::DiskOk, "")).await.expect("heartbeat");
        if r.jobs.len() >= on_1.min(4) {
            break r.jobs;
        }
        assert!(Instant::now() < deadline, "no rebuild jobs for node 4: {:?}", r.jobs);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for j in &jobs {
        assert_eq!((j.kind, j.target, j.replaces), (pb::JobKind::Rebuild as i32, 4, 1), "{j:?}");
        assert!(!j.sources.is_empty() && j.sources.iter().all(|s| s.id != 1), "a failed disk is no source: {j:?}");
    }
    let listed = client.list_jobs(pb::ListJobsRequest { all: true }).await.expect("jobs").jobs;
    assert!(listed.iter().all(|j| j.target != 1), "a failed disk is never a target: {listed:?}");

    // The operator replaced the disk: the node's probe says ok again.
    client.heartbeat(heartbeat(1, pb::DiskHealth::DiskOk, "")).await.expect("heartbeat");
    let n1 = node(&client, 1).await;
    assert_eq!((n1.disk, n1.disk_error.as_str()), (pb::DiskHealth::DiskOk as i32, ""));
    assert_eq!(client.status().await.expect("status").nodes_up, 4);

    // A full disk still counts as up.
    client.heartbeat(heartbeat(3, pb::DiskHealth::DiskFull, "")).await.expect("heartbeat");
    assert_eq!(node(&client, 3).await.disk, pb::DiskHealth::DiskFull as i32);
    assert_eq!(client.status().await.expect("status").nodes_up, 4);
    member.shutdown().await;
}
