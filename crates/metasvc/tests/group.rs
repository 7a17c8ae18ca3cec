//! A meta group in one process, over real gRPC on loopback: snapshots and log
//! purging under a small snapshot interval, a member added later catching up
//! from a snapshot, and a member restarted on its data directory keeping its
//! state.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_metaclient::{pb, MetaClient};
use ballast_metasvc::{fast_timing, Detector, MetaConfig, MetaHandle, RaftTiming};

async fn start(
    id: u64,
    dir: &std::path::Path,
    listener: tokio::net::TcpListener,
    initial: &BTreeMap<u64, String>,
) -> MetaHandle {
    let (raft, fast) = fast_timing();
    // The nodes below are registrations without a process (no heartbeats): with
    // the fast detector they turn suspect after 2 s and placement refuses them,
    // which failed this test whenever it ran longer than that on a busy machine.
    // Liveness is not what it tests.
    let detector = Detector { suspect_after: Duration::from_secs(600), down_after: Duration::from_secs(1200), ..fast };
    let cfg = MetaConfig {
        id,
        data_dir: dir.join(format!("m{id}")),
        listen: listener.local_addr().expect("addr"),
        initial_members: initial.clone(),
        raft: RaftTiming { snapshot_logs: 20, ..raft },
        detector,
        security: ballast_metaclient::Security::Insecure,
    };
    ballast_metasvc::start_on(cfg, listener).await.expect("start member")
}

async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

async fn volumes_on(addr: &str) -> Vec<String> {
    let c = MetaClient::new([addr], ballast_metaclient::Security::Insecure).expect("client");
    match c.list_volumes().await {
        Ok(r) => r.volumes.into_iter().map(|v| v.name).collect(),
        Err(_) => Vec::new(),
    }
}

async fn wait_for_volumes(addr: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = volumes_on(addr).await;
        if v.len() == n {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} has {} volumes, want {n}", v.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_catch_up_a_new_member_and_a_restart_keeps_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ls = [listener().await, listener().await, listener().await];
    let initial: BTreeMap<u64, String> =
        ls.iter().enumerate().map(|(i, l)| (i as u64 + 1, l.local_addr().expect("addr").to_string())).collect();
    let mut members = Vec::new();
    for (i, l) in ls.into_iter().enumerate() {
        members.push(start(i as u64 + 1, dir.path(), l, &initial).await);
    }
    let endpoints: Vec<String> = initial.values().cloned().collect();
    let client = MetaClient::new(endpoints.clone(), ballast_metaclient::Security::Insecure).expect("client");
    for (i, zone) in ["a", "b", "c"].iter().enumerate() {
        let req = pb::RegisterRequest {
            node: i as u64 + 1,
            addr: format!("127.0.0.1:{}", 7000 + i),
            zone: (*zone).into(),
            capacity_bytes: 1 << 40,
        };
        client.register(req).await.expect("register");
    }
    // Far more entries than the snapshot interval (20): snapshots are taken and
    // the log before them purged.
    for i in 0..60 {
        let req = pb::CreateVolumeRequest {
            name: format!("v{i}"),
            size_bytes: 64 << 20,
            chunk_size_bytes: 16 << 20,
            replicas: 3,
            ..Default::default()
        };
        client.create_volume(req).await.expect("create");
    }
    let status = client.status().await.expect("status");
    assert!(status.applied_index >= 63, "{status:?}");
    let leader = members.iter().find(|m| m.core.metrics().current_leader == Some(m.id)).expect("a leader");
    let m = leader.core.metrics();
    assert!(m.snapshot.is_some_and(|s| s.index >= 20), "no snapshot taken: {:?}", m.snapshot);
    assert!(m.purged.is_some(), "log not purged after snapshots");

    // A new member joins: the entries it lacks are purged, so it must install
    // the leader's snapshot to catch up.
    let l4 = listener().await;
    let addr4 = l4.local_addr().expect("addr").to_string();
    let m4 = start(4, dir.path(), l4, &BTreeMap::new()).await;
    client.add_member(pb::AddMemberRequest { id: 4, addr: addr4.clone() }).await.expect("add member");
    wait_for_volumes(&addr4, 60).await;
    assert!(m4.core.metrics().snapshot.is_some(), "member 4 caught up without a snapshot");

    // A member stopped and restarted on its directory comes back with its state
    // (snapshot plus log), and follows new writes.
    let victim = members.pop().expect("member 3");
    let (id, addr) = (victim.id, victim.addr);
    victim.shutdown().await;
    client
        .create_volume(pb::CreateVolumeRequest {
            name: "while-away".into(),
            size_bytes: 64 << 20,
            replicas: 3,
            ..Default::default()
        })
        .await
        .expect("create while a member is down");
    let l = tokio::net::TcpListener::bind(addr).await.expect("rebind the member's address");
    let back = start(id, dir.path(), l, &initial).await;
    wait_for_volumes(&addr.to_string(), 61).await;
    back.shutdown().await;
    m4.shutdown().await;
    for m in members {
        m.shutdown().await;
    }
}
