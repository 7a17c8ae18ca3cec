//! The client's own behaviour over real gRPC connections: failover past a dead
//! member, past a member without a leader, stickiness to the member that
//! answered, non-retryable answers returned at once, the bounded "unreachable"
//! error, and the membership provider's error mapping.
//!
//! The members here are fixture gRPC servers with canned answers (the real
//! service lives in ballast-metasvc, which this crate must not link); each test
//! is about what the CLIENT does with the answers.

// tonic's generated service traits fix the error type to `tonic::Status`.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ballast_frontend::{Membership, MembershipError};
use ballast_metaclient::{pb, MetaClient, MetaClientError, MetaClientOptions};
use ballast_metavolume::MetaMembership;
use ballast_proto::v1::admin_server::{Admin, AdminServer};
use ballast_proto::v1::node_api_server::{NodeApi, NodeApiServer};
use ballast_types::{ChunkIdx, Epoch, NodeId, VolumeId};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// How a fixture member answers Admin.Status.
#[derive(Clone, Copy)]
enum Mode {
    /// Answers with its id.
    Serve,
    /// Has no leader: UNAVAILABLE.
    NoLeader,
}

struct Fixture {
    id: u64,
    mode: Mode,
    calls: AtomicUsize,
}

type Reply<T> = Result<Response<T>, Status>;

fn unimplemented<T>() -> Reply<T> {
    Err(Status::unimplemented("not part of this fixture"))
}

#[tonic::async_trait]
impl Admin for Fixture {
    async fn status(&self, _: Request<pb::StatusRequest>) -> Reply<pb::StatusResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.mode {
            Mode::Serve => Ok(Response::new(pb::StatusResponse { id: self.id, leader: self.id, ..Default::default() })),
            Mode::NoLeader => Err(Status::unavailable("no meta leader elected yet; retry")),
        }
    }
    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Reply<pb::ListNodesResponse> {
        unimplemented()
    }
    async fn set_node_state(&self, _: Request<pb::SetNodeStateRequest>) -> Reply<pb::Node> {
        unimplemented()
    }
    async fn remove_node(&self, _: Request<pb::RemoveNodeRequest>) -> Reply<pb::RemoveNodeResponse> {
        unimplemented()
    }
    async fn create_volume(&self, _: Request<pb::CreateVolumeRequest>) -> Reply<pb::Volume> {
        unimplemented()
    }
    async fn list_volumes(&self, _: Request<pb::ListVolumesRequest>) -> Reply<pb::ListVolumesResponse> {
        unimplemented()
    }
    async fn inspect_volume(&self, req: Request<pb::InspectVolumeRequest>) -> Reply<pb::VolumeLayout> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match req.into_inner().volume.as_str() {
            "pg" => Ok(Response::new(fixture_layout(5))),
            other => Err(Status::not_found(format!("volume {other:?} not found"))),
        }
    }
    async fn grow_volume(&self, _: Request<pb::GrowVolumeRequest>) -> Reply<pb::Volume> {
        unimplemented()
    }
    async fn delete_volume(&self, _: Request<pb::DeleteVolumeRequest>) -> Reply<pb::DeleteVolumeResponse> {
        unimplemented()
    }
    async fn publish_volume(&self, _: Request<pb::PublishVolumeRequest>) -> Reply<pb::Volume> {
        unimplemented()
    }
    async fn unpublish_volume(&self, _: Request<pb::UnpublishVolumeRequest>) -> Reply<pb::Volume> {
        unimplemented()
    }
    async fn list_jobs(&self, _: Request<pb::ListJobsRequest>) -> Reply<pb::ListJobsResponse> {
        unimplemented()
    }
    async fn create_snapshot(&self, _: Request<pb::CreateSnapshotRequest>) -> Reply<pb::Snapshot> {
        unimplemented()
    }
    async fn list_snapshots(&self, _: Request<pb::ListSnapshotsRequest>) -> Reply<pb::ListSnapshotsResponse> {
        unimplemented()
    }
    async fn delete_snapshot(&self, _: Request<pb::DeleteSnapshotRequest>) -> Reply<pb::DeleteSnapshotResponse> {
        unimplemented()
    }
    async fn what_if(&self, _: Request<pb::WhatIfRequest>) -> Reply<pb::WhatIfResponse> {
        unimplemented()
    }
    async fn set_over_provisioning(&self, _: Request<pb::SetOverProvisioningRequest>) -> Reply<pb::StatusResponse> {
        unimplemented()
    }
    async fn add_member(&self, _: Request<pb::AddMemberRequest>) -> Reply<pb::StatusResponse> {
        unimplemented()
    }
    async fn remove_member(&self, _: Request<pb::RemoveMemberRequest>) -> Reply<pb::StatusResponse> {
        unimplemented()
    }
}

fn fixture_layout(id: u64) -> pb::VolumeLayout {
    let in_sync = |node| pb::ChunkReplica { node, role: pb::ReplicaRole::InSync as i32 };
    pb::VolumeLayout {
        snapshots: vec![],
        unfilled: vec![],
        snapshot_layers: 0,
        snapshot_bytes: 0,
        volume: Some(pb::Volume {
            id,
            name: "pg".into(),
            size_bytes: 8 << 20,
            chunk_size_bytes: 4 << 20,
            replicas: 2,
            min_in_sync: 2,
            epoch: 3,
            layout_gen: 9,
            ..Default::default()
        }),
        chunks: (0..2).map(|index| pb::Chunk { index, version: 1, replicas: vec![in_sync(1), in_sync(2)] }).collect(),
        nodes: (1..=2)
            .map(|id| pb::Node {
                id,
                addr: format!("127.0.0.1:{}", 7000 + id),
                zone: format!("z{id}"),
                ..Default::default()
            })
            .collect(),
    }
}

/// NodeApi for volume "pg" (id 5): attach answers epoch 3, eject refuses as the
/// service does when min-in-sync would be broken.
#[tonic::async_trait]
impl NodeApi for Fixture {
    async fn register(&self, _: Request<pb::RegisterRequest>) -> Reply<pb::RegisterResponse> {
        unimplemented()
    }
    async fn heartbeat(&self, _: Request<pb::HeartbeatRequest>) -> Reply<pb::HeartbeatResponse> {
        unimplemented()
    }
    async fn attach(&self, req: Request<pb::AttachRequest>) -> Reply<pb::AttachResponse> {
        let r = req.into_inner();
        if r.volume != "pg" {
            return Err(Status::not_found(format!("volume {:?} not found", r.volume)));
        }
        Ok(Response::new(pb::AttachResponse { epoch: 3, layout: Some(fixture_layout(5)) }))
    }
    async fn get_layout(&self, req: Request<pb::GetLayoutRequest>) -> Reply<pb::VolumeLayout> {
        match req.into_inner().volume {
            5 => Ok(Response::new(fixture_layout(5))),
            v => Err(Status::not_found(format!("volume vol-{v} not found"))),
        }
    }
    async fn eject(&self, req: Request<pb::EjectRequest>) -> Reply<pb::Chunk> {
        let r = req.into_inner();
        Err(Status::failed_precondition(format!(
            "ejecting node-{} from chunk {} would leave 1 in-sync replicas, below the minimum of 2",
            r.node, r.chunk
        )))
    }
    async fn ack_layout(&self, _: Request<pb::AckLayoutRequest>) -> Reply<pb::AckLayoutResponse> {
        Ok(Response::new(pb::AckLayoutResponse {}))
    }
    async fn report_job(&self, _: Request<pb::ReportJobRequest>) -> Reply<pb::ReportJobResponse> {
        unimplemented()
    }
    async fn commit_snapshots(&self, _: Request<pb::CommitSnapshotsRequest>) -> Reply<pb::CommitSnapshotsResponse> {
        unimplemented()
    }
    async fn fill_chunks(&self, _: Request<pb::FillChunksRequest>) -> Reply<pb::FillChunksResponse> {
        unimplemented()
    }
    async fn detach(&self, _: Request<pb::DetachRequest>) -> Reply<pb::DetachResponse> {
        unimplemented()
    }
}

async fn member(id: u64, mode: Mode) -> (SocketAddr, Arc<Fixture>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fixture = Arc::new(Fixture { id, mode, calls: AtomicUsize::new(0) });
    let server = tonic::transport::Server::builder()
        .add_service(AdminServer::from_arc(fixture.clone()))
        .add_service(NodeApiServer::from_arc(fixture.clone()))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(server);
    (addr, fixture)
}

/// A port nothing listens on: bound, then released.
async fn dead_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn options(retry_for: Duration) -> MetaClientOptions {
    MetaClientOptions { retry_for, ..MetaClientOptions::default() }
}

#[tokio::test]
async fn fails_over_past_a_dead_member_and_sticks_to_the_one_that_answered() {
    let dead = dead_port().await;
    let (live, fixture) = member(2, Mode::Serve).await;
    let client = MetaClient::with_options(
        [dead.to_string(), live.to_string()],
        options(Duration::from_secs(15)),
        ballast_metaclient::Security::Insecure,
    )
    .unwrap();
    assert_eq!(client.status().await.unwrap().id, 2);
    assert_eq!(client.status().await.unwrap().id, 2);
    assert_eq!(fixture.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_member_without_a_leader_is_skipped() {
    let (a, no_leader) = member(1, Mode::NoLeader).await;
    let (b, serving) = member(2, Mode::Serve).await;
    let client = MetaClient::with_options(
        [a.to_string(), b.to_string()],
        options(Duration::from_secs(15)),
        ballast_metaclient::Security::Insecure,
    )
    .unwrap();
    assert_eq!(client.status().await.unwrap().id, 2);
    // The next call starts at the member that answered.
    assert_eq!(client.status().await.unwrap().id, 2);
    assert_eq!(no_leader.calls.load(Ordering::SeqCst), 1);
    assert_eq!(serving.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_answer_is_returned_at_once_not_retried_elsewhere() {
    let (a, first) = member(1, Mode::Serve).await;
    let (b, second) = member(2, Mode::Serve).await;
    let client = MetaClient::with_options(
        [a.to_string(), b.to_string()],
        options(Duration::from_secs(15)),
        ballast_metaclient::Security::Insecure,
    )
    .unwrap();
    let err = client.inspect_volume(pb::InspectVolumeRequest { volume: "x".into() }).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert_eq!(err.to_string(), "volume \"x\" not found");
    assert_eq!(first.calls.load(Ordering::SeqCst), 1);
    assert_eq!(second.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn all_members_dead_is_unreachable_after_the_budget() {
    let (a, b) = (dead_port().await, dead_port().await);
    let client = MetaClient::with_options(
        [a.to_string(), b.to_string()],
        options(Duration::from_millis(300)),
        ballast_metaclient::Security::Insecure,
    )
    .unwrap();
    let err = client.status().await.unwrap_err();
    let MetaClientError::Unreachable { endpoints, last_error } = &err else { panic!("{err:?}") };
    assert_eq!(endpoints, &vec![a.to_string(), b.to_string()]);
    assert!(last_error.to_lowercase().contains("refused"), "{last_error}");
    assert!(err.to_string().starts_with(&format!("cluster unreachable: tried {a}, {b}: ")), "{err}");
}

#[tokio::test]
async fn a_cluster_without_a_leader_is_unreachable_with_the_members_reason() {
    let (a, fixture) = member(1, Mode::NoLeader).await;
    let client = MetaClient::with_options(
        [a.to_string()],
        options(Duration::from_millis(300)),
        ballast_metaclient::Security::Insecure,
    )
    .unwrap();
    let err = client.status().await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(err.to_string().ends_with("no meta leader elected yet; retry"), "{err}");
    // Retried (with backoff) until the budget ran out, not just once.
    assert!(fixture.calls.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn membership_attaches_by_name_and_maps_refusals() {
    let dead = dead_port().await;
    let (live, _fixture) = member(1, Mode::Serve).await;
    let client = MetaClient::new([dead.to_string(), live.to_string()], ballast_metaclient::Security::Insecure).unwrap();
    let missing = MetaMembership::new(client.clone(), "nope", NodeId(1));
    assert_eq!(missing.resolve_volume_id().await.unwrap_err().to_string(), "volume \"nope\" not found");
    assert!(matches!(missing.attach(VolumeId(5)).await, Err(MembershipError::UnknownVolume(VolumeId(5)))));
    assert_eq!(MetaMembership::new(client.clone(), "pg", NodeId(1)).resolve_volume_id().await.unwrap(), VolumeId(5));

    let m = MetaMembership::new(client.clone(), "pg", NodeId(1));

    let a = m.attach(VolumeId(5)).await.unwrap();
    assert_eq!(a.epoch, Epoch(3));
    assert_eq!(a.layout.volume, VolumeId(5));
    assert_eq!(a.layout.chunks.len(), 2);
    assert_eq!(a.layout.nodes[1].addr, "127.0.0.1:7002".parse::<SocketAddr>().unwrap());
    assert_eq!(m.volume_id(), Some(VolumeId(5)));
    assert_eq!(m.resolve_volume_id().await.unwrap(), VolumeId(5));

    let (gen, layout) = m.layout().await.unwrap();
    assert_eq!((gen, layout), (9, a.layout.clone()));
    m.ack_layout(Epoch(3), 9).await.unwrap();

    let err =
        m.eject(VolumeId(5), ChunkIdx(1), 1, NodeId(2), ballast_frontend::EjectReason::Timeout).await.unwrap_err();
    assert!(
        matches!(err, MembershipError::BelowMinInSync { chunk: ChunkIdx(1), node: NodeId(2), remaining: 1, min: 2 }),
        "{err:?}"
    );

    // A provider bound to one volume refuses to attach another id.
    assert!(matches!(m.attach(VolumeId(6)).await, Err(MembershipError::UnknownVolume(VolumeId(6)))));
    // The name now resolving to another volume is refused too.
    let other = MetaMembership::new(client, "pg", NodeId(1));
    assert!(matches!(other.attach(VolumeId(4)).await, Err(MembershipError::UnknownVolume(VolumeId(4)))));
}
