//! What the operator sees, through the real gRPC service and the metrics
//! registry: a replica on a down or suspect node or a failed disk counts as
//! missing in `Status`, `ListVolumes`, `InspectVolume` and `WhatIf` (which starts
//! from the cluster as it is now), and the `ballast_meta_*` series say the same.
//! Members on loopback; storage nodes are simulated by their heartbeats, and the
//! leader's failure detector marks a silent one suspect, then down.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_metaclient::{pb, MetaClient};
use ballast_metasvc::{fast_timing, layout_replica_live, MetaConfig, MetaHandle, RaftTiming};

/// Storage nodes 1, 2, 3 in zones a, b, c.
const NODES: [(u64, &str); 3] = [(1, "a"), (2, "b"), (3, "c")];
/// One volume of 16 chunks, three replicas (one per node), min-in-sync 2.
const CHUNKS: u32 = 16;

async fn start_member(dir: &std::path::Path) -> (MetaHandle, MetaClient) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (raft, mut detector) = fast_timing();
    detector.tick = Duration::from_millis(50);
    detector.suspect_after = Duration::from_millis(1000);
    detector.down_after = Duration::from_millis(2500);
    let cfg = MetaConfig {
        id: 1,
        data_dir: dir.join("m1"),
        listen: listener.local_addr().expect("addr"),
        initial_members: BTreeMap::from([(1, addr.clone())]),
        raft: RaftTiming { ..raft },
        detector,
        security: ballast_metaclient::Security::Insecure,
    };
    let member = ballast_metasvc::start_on(cfg, listener).await.expect("start member");
    (member, MetaClient::new([addr.as_str()], ballast_metaclient::Security::Insecure).expect("client"))
}

/// The nodes that heartbeat, and the disk health each reports.
type Alive = Arc<Mutex<BTreeMap<u64, pb::DiskHealth>>>;

/// Registers the nodes, creates the volume, and heartbeats the nodes in the
/// returned map (all of them, healthy, to begin with) every 100 ms, one after
/// the other: once the service shows a change made in the map, no heartbeat
/// from before it is still on its way.
async fn cluster(client: &MetaClient) -> Alive {
    for (id, zone) in NODES {
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
        size_bytes: u64::from(CHUNKS) << 20,
        chunk_size_bytes: 1 << 20,
        replicas: 3,
        ..Default::default()
    };
    let v = client.create_volume(req).await.expect("create volume");
    assert_eq!((v.replicas, v.min_in_sync), (3, 2));
    let alive: Alive = Arc::new(Mutex::new(NODES.iter().map(|(id, _)| (*id, pb::DiskHealth::DiskOk)).collect()));
    let (c, a) = (client.clone(), alive.clone());
    tokio::spawn(async move {
        loop {
            let nodes: Vec<(u64, pb::DiskHealth)> = a.lock().expect("alive").iter().map(|(n, d)| (*n, *d)).collect();
            for (node, disk) in nodes {
                let _ = c.heartbeat(heartbeat(node, disk)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    alive
}

fn heartbeat(node: u64, disk: pb::DiskHealth) -> pb::HeartbeatRequest {
    let disk_error = if disk == pb::DiskHealth::DiskFailed { "EIO".into() } else { String::new() };
    pb::HeartbeatRequest {
        node,
        used_bytes: 0,
        disk: disk as i32,
        disk_error,
        disk_free_bytes: 1 << 30,
        ..Default::default()
    }
}

async fn node(client: &MetaClient, id: u64) -> pb::Node {
    let nodes = client.list_nodes().await.expect("list nodes").nodes;
    nodes.into_iter().find(|n| n.id == id).expect("node listed")
}

async fn node_state(client: &MetaClient, id: u64) -> pb::NodeState {
    pb::NodeState::try_from(node(client, id).await.state).expect("a known state")
}

/// Makes node `id`'s heartbeats report a failed disk, and waits until the
/// service recorded it.
async fn fail_disk(client: &MetaClient, alive: &Alive, id: u64) {
    alive.lock().expect("alive").insert(id, pb::DiskHealth::DiskFailed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while node(client, id).await.disk != pb::DiskHealth::DiskFailed as i32 {
        assert!(Instant::now() < deadline, "node {id}'s failed disk not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_state(client: &MetaClient, id: u64, want: &[pb::NodeState]) -> pb::NodeState {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = node_state(client, id).await;
        if want.contains(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "node {id} is {s:?}, not one of {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn what_if_node(client: &MetaClient, node: u64) -> pb::WhatIfResponse {
    let req = pb::WhatIfRequest { target: Some(pb::what_if_request::Target::Node(node)) };
    client.what_if(req).await.expect("what-if")
}

fn impact(r: &pb::WhatIfResponse) -> Option<(u32, u32, u32)> {
    r.volumes.first().map(|v| (v.chunks_degraded, v.chunks_unwritable, v.chunks_unavailable))
}

/// Per chunk of the volume: its live replicas as a layout reader (`ballastctl
/// volume inspect`) counts them, and its in-sync ones.
async fn inspect(client: &MetaClient) -> (pb::VolumeLayout, Vec<(usize, usize)>) {
    let l = client.inspect_volume(pb::InspectVolumeRequest { volume: "db".into() }).await.expect("inspect");
    let counts = l
        .chunks
        .iter()
        .map(|c| {
            let live = c.replicas.iter().filter(|r| layout_replica_live(&l, r)).count();
            let in_sync = c.replicas.iter().filter(|r| r.role == pb::ReplicaRole::InSync as i32).count();
            (live, in_sync)
        })
        .collect();
    (l, counts)
}

async fn degraded_everywhere(client: &MetaClient) -> (u32, u32, u32) {
    let status = client.status().await.expect("status").degraded_chunks;
    let listed = client.list_volumes().await.expect("list").volumes[0].degraded_chunks;
    let (l, _) = inspect(client).await;
    (status, listed, l.volume.expect("volume").degraded_chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_node_is_missing_in_status_inspect_and_what_if() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (member, client) = start_member(dir.path()).await;
    let alive = cluster(&client).await;

    // Whole: nothing degraded; losing node 1 would degrade every chunk.
    assert_eq!(degraded_everywhere(&client).await, (0, 0, 0));
    assert_eq!(impact(&what_if_node(&client, 1).await), Some((CHUNKS, 0, 0)));
    let (_, counts) = inspect(&client).await;
    assert!(counts.iter().all(|&c| c == (3, 3)), "{counts:?}");

    // Node 3 goes silent. Suspect already: its replicas are missing.
    alive.lock().expect("alive").remove(&3);
    let s = wait_state(&client, 3, &[pb::NodeState::Suspect, pb::NodeState::Down]).await;
    assert_eq!(degraded_everywhere(&client).await, (CHUNKS, CHUNKS, CHUNKS), "node 3 is {s:?}");
    wait_state(&client, 3, &[pb::NodeState::Down]).await;
    let status = client.status().await.expect("status");
    assert_eq!((status.nodes_up, status.degraded_chunks), (2, CHUNKS));
    assert_eq!(degraded_everywhere(&client).await, (CHUNKS, CHUNKS, CHUNKS));
    // The layout still lists node 3's replicas in sync (nothing ejected them; no
    // node is free to rebuild them on), but a reader of it counts two live.
    let (l, counts) = inspect(&client).await;
    assert_eq!(counts, vec![(2, 3); CHUNKS as usize]);
    let n3 = l.nodes.iter().find(|n| n.id == 3).expect("node 3 in the layout");
    assert_eq!(n3.state, pb::NodeState::Down as i32);

    // "May I take node 1 down now?" No: every chunk would keep one live
    // replica, below min-in-sync 2.
    assert_eq!(impact(&what_if_node(&client, 1).await), Some((0, CHUNKS, 0)));
    let zone_a = pb::WhatIfRequest { target: Some(pb::what_if_request::Target::Zone("a".into())) };
    assert_eq!(impact(&client.what_if(zone_a).await.expect("what-if")), Some((0, CHUNKS, 0)));
    // Losing node 3 again changes nothing.
    let again = what_if_node(&client, 3).await;
    assert_eq!((again.volumes.len(), again.unaffected), (0, 1));

    // A cordoned node still serves: nothing more is missing.
    let cordon = pb::SetNodeStateRequest { node: 1, state: pb::NodeState::Cordoned as i32 };
    client.set_node_state(cordon).await.expect("cordon");
    assert_eq!(degraded_everywhere(&client).await, (CHUNKS, CHUNKS, CHUNKS));
    assert_eq!(impact(&what_if_node(&client, 1).await), Some((0, CHUNKS, 0)));

    // Node 3 is back: whole again.
    alive.lock().expect("alive").insert(3, pb::DiskHealth::DiskOk);
    wait_state(&client, 3, &[pb::NodeState::Up]).await;
    assert_eq!(degraded_everywhere(&client).await, (0, 0, 0));

    // Node 2's disk fails: its replicas are lost, though the node is up.
    fail_disk(&client, &alive, 2).await;
    assert_eq!(node_state(&client, 2).await, pb::NodeState::Up);
    assert_eq!(degraded_everywhere(&client).await, (CHUNKS, CHUNKS, CHUNKS));
    let (_, counts) = inspect(&client).await;
    assert_eq!(counts, vec![(2, 3); CHUNKS as usize]);
    assert_eq!(impact(&what_if_node(&client, 3).await), Some((0, CHUNKS, 0)));
    member.shutdown().await;
}

/// The value of the series `series` (name and labels, as written) in an
/// OpenMetrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meta_metrics_follow_raft_and_the_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (member, client) = start_member(dir.path()).await;
    let mut registry = ballast_metrics::registry();
    member.register_metrics(&mut registry);
    let alive = cluster(&client).await;

    let text = ballast_metrics::encode(&registry);
    assert_eq!(value(&text, "ballast_meta_raft_is_leader{member=\"1\"}"), 1.0, "{text}");
    assert_eq!(value(&text, "ballast_meta_raft_leader_id{member=\"1\"}"), 1.0);
    assert!(value(&text, "ballast_meta_raft_term{member=\"1\"}") >= 1.0);
    assert_eq!(value(&text, "ballast_meta_raft_voters{member=\"1\"}"), 1.0);
    assert_eq!(value(&text, "ballast_meta_raft_learners{member=\"1\"}"), 0.0);
    let last = value(&text, "ballast_meta_raft_last_log_index{member=\"1\"}");
    let committed = value(&text, "ballast_meta_raft_committed_index{member=\"1\"}");
    let applied = value(&text, "ballast_meta_raft_applied_index{member=\"1\"}");
    // Three registrations and a create at least, after the initial entries.
    assert!(applied >= 4.0 && applied <= committed && committed <= last, "{applied} {committed} {last}");
    assert!(value(&text, "ballast_meta_apply_latency_seconds_count{member=\"1\"}") >= 4.0, "{text}");
    assert!(value(&text, "ballast_meta_apply_latency_seconds_sum{member=\"1\"}") > 0.0);
    assert_eq!(value(&text, "ballast_meta_nodes{member=\"1\",state=\"up\"}"), 3.0);
    assert_eq!(value(&text, "ballast_meta_nodes{member=\"1\",state=\"down\"}"), 0.0);
    assert_eq!(value(&text, "ballast_meta_node_disks{member=\"1\",health=\"ok\"}"), 3.0);
    assert_eq!(value(&text, "ballast_meta_volumes{member=\"1\"}"), 1.0);
    assert_eq!(value(&text, "ballast_meta_chunks{member=\"1\"}"), f64::from(CHUNKS));
    assert_eq!(value(&text, "ballast_meta_chunks_degraded{member=\"1\"}"), 0.0);
    assert_eq!(value(&text, "ballast_meta_volume_chunks_degraded{member=\"1\",volume=\"db\"}"), 0.0);
    assert_eq!(value(&text, "ballast_meta_jobs{member=\"1\",kind=\"rebuild\",state=\"active\"}"), 0.0);
    assert_eq!(value(&text, "ballast_meta_job_copied_bytes_total{member=\"1\",kind=\"rebuild\"}"), 0.0);
    assert_eq!(value(&text, "ballast_meta_job_remaining_bytes{member=\"1\",kind=\"resync\"}"), 0.0);
    assert!(text.contains("# TYPE ballast_meta_apply_latency_seconds histogram\n"), "{text}");
    assert!(text.contains("# UNIT ballast_meta_job_copied_bytes bytes\n"), "{text}");

    // Node 3 goes down: its chunks are degraded, the nodes move.
    alive.lock().expect("alive").remove(&3);
    wait_state(&client, 3, &[pb::NodeState::Down]).await;
    let text = ballast_metrics::encode(&registry);
    assert_eq!(value(&text, "ballast_meta_nodes{member=\"1\",state=\"up\"}"), 2.0, "{text}");
    assert_eq!(value(&text, "ballast_meta_nodes{member=\"1\",state=\"down\"}"), 1.0);
    assert_eq!(value(&text, "ballast_meta_nodes{member=\"1\",state=\"suspect\"}"), 0.0);
    assert_eq!(value(&text, "ballast_meta_chunks_degraded{member=\"1\"}"), f64::from(CHUNKS));
    assert_eq!(value(&text, "ballast_meta_chunks_below_min_in_sync{member=\"1\"}"), 0.0);
    assert_eq!(value(&text, "ballast_meta_volume_chunks_degraded{member=\"1\",volume=\"db\"}"), f64::from(CHUNKS));

    // Node 2's disk fails as well: one live replica per chunk, below min-in-sync.
    fail_disk(&client, &alive, 2).await;
    let text = ballast_metrics::encode(&registry);
    assert_eq!(value(&text, "ballast_meta_node_disks{member=\"1\",health=\"failed\"}"), 1.0, "{text}");
    assert_eq!(value(&text, "ballast_meta_chunks_below_min_in_sync{member=\"1\"}"), f64::from(CHUNKS));
    assert_eq!(
        value(&text, "ballast_meta_volume_chunks_below_min_in_sync{member=\"1\",volume=\"db\"}"),
        f64::from(CHUNKS)
    );
    assert_eq!(value(&text, "ballast_meta_chunks_unavailable{member=\"1\"}"), 0.0);
    for line in text.lines().filter(|l| l.starts_with("ballast_meta_")) {
        eprintln!("{line}");
    }
    member.shutdown().await;
}

/// Three members in one process (as `ballast dev` runs them), registered
/// together: each family once, a series per member, one leader among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_in_one_process_share_each_family() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let initial: BTreeMap<u64, String> =
        listeners.iter().enumerate().map(|(i, l)| (i as u64 + 1, l.local_addr().expect("addr").to_string())).collect();
    let mut members = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let (raft, detector) = fast_timing();
        let id = i as u64 + 1;
        let cfg = MetaConfig {
            id,
            data_dir: dir.path().join(format!("m{id}")),
            listen: l.local_addr().expect("addr"),
            initial_members: initial.clone(),
            raft,
            detector,
            security: ballast_metaclient::Security::Insecure,
        };
        members.push(ballast_metasvc::start_on(cfg, l).await.expect("start member"));
    }
    let mut registry = ballast_metrics::registry();
    ballast_metasvc::register_metrics(&mut registry, &members);
    let client = MetaClient::new(initial.values().cloned().collect::<Vec<_>>(), ballast_metaclient::Security::Insecure)
        .expect("client");
    // A write through the leader; then every member has applied it.
    let reg = pb::RegisterRequest { node: 1, addr: "127.0.0.1:7001".into(), zone: "a".into(), capacity_bytes: 1 << 40 };
    client.register(reg).await.expect("register");
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = ballast_metrics::encode(&registry);
        let up = |m: u64| sample(&text, &format!("ballast_meta_nodes{{member=\"{m}\",state=\"up\"}}"));
        if (1..=3).all(|m| up(m) == Some(1.0)) {
            break text;
        }
        assert!(Instant::now() < deadline, "not every member applied the registration:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for family in
        ["ballast_meta_raft_term gauge", "ballast_meta_nodes gauge", "ballast_meta_apply_latency_seconds histogram"]
    {
        assert_eq!(text.matches(&format!("# TYPE {family}\n")).count(), 1, "{family} once:\n{text}");
    }
    let leaders: f64 = (1..=3).map(|m| value(&text, &format!("ballast_meta_raft_is_leader{{member=\"{m}\"}}"))).sum();
    assert_eq!(leaders, 1.0, "{text}");
    let leader = value(&text, "ballast_meta_raft_leader_id{member=\"1\"}");
    assert!((1.0..=3.0).contains(&leader));
    assert_eq!(value(&text, "ballast_meta_raft_voters{member=\"2\"}"), 3.0);
    // The leader proposed the write and sees its followers' logs.
    let l = leader as u64;
    assert!(value(&text, &format!("ballast_meta_apply_latency_seconds_count{{member=\"{l}\"}}")) >= 1.0);
    let peer = if l == 1 { 2 } else { 1 };
    assert!(sample(&text, &format!("ballast_meta_raft_replication_lag_entries{{member=\"{l}\",peer=\"{peer}\"}}"))
        .is_some());
    for m in members {
        m.shutdown().await;
    }
}
