//! Per-call authorization over mutual TLS: a three-member group on loopback,
//! called with certificates of every role. Each refusal is PERMISSION_DENIED
//! naming the caller, and changes nothing; a call forwarded by a follower is
//! judged by its original caller's identity, not the follower's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_metaclient::{pb, MetaClient, MetaClientError, MetaClientOptions};
use ballast_metasvc::{fast_timing, MetaConfig, MetaHandle};
use ballast_tls::certs::Pki;
use ballast_tls::{Identity, Role, Security};

struct Group {
    members: Vec<MetaHandle>,
    pki: Pki,
    _dir: tempfile::TempDir,
}

impl Group {
    async fn start() -> Group {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::open_or_create(&dir.path().join("pki")).expect("pki");
        let mut listeners = Vec::new();
        for _ in 0..3 {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"));
        }
        let initial: BTreeMap<u64, String> =
            listeners.iter().enumerate().map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap().to_string())).collect();
        let mut members = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let id = i as u64 + 1;
            let (raft, detector) = fast_timing();
            let cfg = MetaConfig {
                id,
                data_dir: dir.path().join(format!("m{id}")),
                listen: l.local_addr().unwrap(),
                initial_members: initial.clone(),
                raft,
                detector: ballast_metasvc::Detector {
                    suspect_after: Duration::from_secs(600),
                    down_after: Duration::from_secs(1200),
                    ..detector
                },
                security: pki.security(&Identity::Meta(id)).expect("meta cert"),
            };
            members.push(ballast_metasvc::start_on(cfg, l).await.expect("start member"));
        }
        Group { members, pki, _dir: dir }
    }

    fn security(&self, id: &Identity) -> Security {
        self.pki.security(id).expect("certificate")
    }

    /// A client of the members `which` (indexes), as `id`.
    fn client_of(&self, id: &Identity, which: &[usize]) -> MetaClient {
        let endpoints: Vec<String> = which.iter().map(|i| self.members[*i].addr.to_string()).collect();
        let options = MetaClientOptions { retry_for: Duration::from_secs(20), ..MetaClientOptions::default() };
        MetaClient::with_options(endpoints, options, self.security(id)).expect("client")
    }

    fn client(&self, id: &Identity) -> MetaClient {
        self.client_of(id, &[0, 1, 2])
    }

    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.members.iter().position(|m| m.core.metrics().current_leader == Some(m.id)) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn register(node: u64) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node,
        addr: format!("127.0.0.1:{}", 7000 + node),
        zone: format!("z{node}"),
        capacity_bytes: 1 << 40,
    }
}

fn create(name: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: 64 << 20,
        chunk_size_bytes: 16 << 20,
        replicas: 3,
        min_in_sync: 2,
        zones: vec![],
        zone_spread: pb::ZoneSpread::Preferred as i32,
        source_snapshot: String::new(),
        source_volume: String::new(),
    }
}

/// A refusal of `who` by per-call authorization (not by the handshake).
fn assert_denied<T: std::fmt::Debug>(r: Result<T, MetaClientError>, who: &str) {
    match r {
        Err(MetaClientError::Status { code: tonic::Code::PermissionDenied, message, .. }) => {
            assert!(message.contains(&format!("{who} may not make this call")), "{message}");
        }
        other => panic!("expected {who} to be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_may_make_its_own_calls_and_no_others() {
    let g = Group::start().await;
    let leader = g.leader().await;
    let follower = (leader + 1) % 3;
    let admin = g.client(&Identity::Admin("ops".into()));
    let reader = g.client(&Identity::Reader("audit".into()));
    let csi = g.client(&Identity::CsiController);

    // Nodes register as themselves, through the leader or a follower.
    for n in 1..=3u64 {
        let via = if n == 2 { follower } else { leader };
        g.client_of(&Identity::Node(n), &[via]).register(register(n)).await.expect("register as itself");
    }
    let node2 = g.client(&Identity::Node(2));
    // ... and never as another, even when a follower forwards the call.
    for via in [leader, follower] {
        let n2 = g.client_of(&Identity::Node(2), &[via]);
        assert_denied(n2.register(register(4)).await, "node/2");
        let hb = pb::HeartbeatRequest { node: 3, ..Default::default() };
        assert_denied(n2.heartbeat(hb).await, "node/2");
    }
    // A front end cannot register a node, not even its own.
    assert_denied(g.client(&Identity::Frontend(1)).register(register(1)).await, "frontend/1");

    // Volumes: admins and the CSI controller create; readers and nodes do not.
    csi.create_volume(create("by-csi")).await.expect("the CSI controller provisions");
    admin.create_volume(create("by-admin")).await.expect("an admin creates");
    assert_denied(reader.create_volume(create("by-reader")).await, "reader/audit");
    assert_denied(node2.create_volume(create("by-node")).await, "node/2");
    // Node state is the admin's alone.
    let cordon = pb::SetNodeStateRequest { node: 3, state: pb::NodeState::Cordoned as i32 };
    assert_denied(csi.set_node_state(cordon).await, "csi-controller");
    assert_denied(node2.set_node_state(cordon).await, "node/2");
    admin.set_node_state(cordon).await.expect("an admin cordons");
    // Everyone of the cluster reads.
    for c in [&reader, &node2, &csi] {
        let names: Vec<String> = c.list_volumes().await.expect("read").volumes.into_iter().map(|v| v.name).collect();
        assert_eq!(names.len(), 2, "nothing refused was created: {names:?}");
    }
    let nodes = reader.list_nodes().await.expect("nodes").nodes;
    assert_eq!(nodes.iter().map(|n| n.id).collect::<Vec<_>>(), [1, 2, 3], "no node 4 was registered");

    // The attach: frontend/1 attaches on node 1; the calls that only the
    // attached front end may make are refused to the front end of node 2.
    let fe1 = g.client_of(&Identity::Frontend(1), &[follower]);
    let fe2 = g.client(&Identity::Frontend(2));
    assert_denied(
        fe2.attach(pb::AttachRequest { volume: "by-csi".into(), node: 1, to_fill: false }).await,
        "frontend/2",
    );
    let a = fe1.attach(pb::AttachRequest { volume: "by-csi".into(), node: 1, to_fill: false }).await.expect("attach");
    let layout = a.layout.expect("layout");
    let v = layout.volume.as_ref().expect("volume");
    let volume = v.id;
    let ack = pb::AckLayoutRequest { volume, epoch: a.epoch, layout_gen: v.layout_gen };
    assert_denied(fe2.ack_layout(ack).await, "frontend/2");
    fe1.ack_layout(ack).await.expect("the attached front end acks, through a follower");
    let chunk = &layout.chunks[0];
    let victim = chunk.replicas[0].node;
    let eject = pb::EjectRequest { volume, chunk: 0, version: chunk.version, node: victim, reason: "test".into() };
    assert_denied(fe2.eject(eject).await, "frontend/2");
    let after = reader.inspect_volume(pb::InspectVolumeRequest { volume: "by-csi".into() }).await.expect("inspect");
    assert_eq!(after.chunks[0].version, chunk.version, "the refused ejection changed nothing");
    assert_denied(fe2.detach(pb::DetachRequest { volume, epoch: a.epoch }).await, "frontend/2");
    fe1.detach(pb::DetachRequest { volume, epoch: a.epoch }).await.expect("detach");

    // Membership is the admin's.
    let add = pb::AddMemberRequest { id: 9, addr: "127.0.0.1:9".into() };
    assert_denied(csi.add_member(add).await, "csi-controller");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_meta_members_speak_raft_and_plaintext_gets_nothing() {
    let g = Group::start().await;
    g.leader().await;
    let addr = format!("http://{}", g.members[0].addr);
    let endpoint = tonic::transport::Endpoint::from_shared(addr.clone()).expect("endpoint");
    let payload = || pb::RaftPayload { json: b"{}".to_vec() };
    for id in [Identity::Frontend(1), Identity::Node(1), Identity::Admin("ops".into())] {
        let ch = ballast_tls::grpc::channel(&endpoint, g.security(&id), Role::Meta);
        let mut raft = pb::raft_client::RaftClient::new(ch);
        let s = raft.vote(payload()).await.expect_err("refused");
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{id}: {s:?}");
        assert!(s.message().contains(&format!("{id} may not make this call")), "{}", s.message());
    }
    // A member's own certificate is let through to Raft (which then judges the payload).
    let ch = ballast_tls::grpc::channel(&endpoint, g.security(&Identity::Meta(2)), Role::Meta);
    let s = pb::raft_client::RaftClient::new(ch).vote(payload()).await.expect_err("bad payload");
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");

    // Plaintext: the handshake fails, no call is made.
    let insecure = MetaClient::with_options(
        [g.members[0].addr.to_string()],
        MetaClientOptions { retry_for: Duration::from_millis(500), ..MetaClientOptions::default() },
        Security::Insecure,
    )
    .expect("client");
    match insecure.list_volumes().await {
        Err(MetaClientError::Unreachable { .. }) => {}
        other => panic!("plaintext must not be answered: {other:?}"),
    }
}
