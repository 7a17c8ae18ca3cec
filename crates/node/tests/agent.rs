//! The agent against a test meta server: a real tonic server implementing the
//! NodeApi rpcs the agent calls (register, heartbeat, get_layout, report_job),
//! in-process on 127.0.0.1:0, reached through the real `MetaClient`. What the
//! server answers is set per test; each test is about what the AGENT does.

// tonic's generated service traits fix the error type to `tonic::Status`.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_metaclient::MetaClient;
use ballast_node::{agent, AgentConfig, Gc};
use ballast_proto::v1 as pb;
use ballast_proto::v1::node_api_server::{NodeApi, NodeApiServer};
use ballast_types::{ChunkId, ChunkIdx, Epoch, VolumeId};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

const NODE: u64 = 7;

type Reply<T> = Result<Response<T>, Status>;

/// One GetLayout call as the server saw it.
#[derive(Clone, Copy, Debug)]
struct LayoutCall {
    volume: u64,
    started: Instant,
    answered: Option<Instant>,
}

/// The test meta server's NodeApi: it records what the agent sends.
struct TestMeta {
    /// Register answers this refusal instead of OK.
    refuse_register: Option<Status>,
    /// How long GetLayout takes to answer.
    layout_delay: Duration,
    /// GetLayout's answers by volume id; a volume not here is NOT_FOUND (deleted).
    layouts: HashMap<u64, pb::VolumeLayout>,
    registers: Mutex<Vec<pb::RegisterRequest>>,
    heartbeats: Mutex<Vec<(Instant, pb::HeartbeatRequest)>>,
    layout_calls: Mutex<Vec<LayoutCall>>,
    /// Jobs handed out with the next heartbeat's answer.
    jobs: Mutex<Vec<pb::Job>>,
    reports: Mutex<Vec<pb::ReportJobRequest>>,
}

impl TestMeta {
    fn new() -> TestMeta {
        TestMeta {
            refuse_register: None,
            layout_delay: Duration::ZERO,
            layouts: HashMap::new(),
            registers: Mutex::default(),
            heartbeats: Mutex::default(),
            layout_calls: Mutex::default(),
            jobs: Mutex::default(),
            reports: Mutex::default(),
        }
    }

    fn heartbeat_times(&self) -> Vec<Instant> {
        self.heartbeats.lock().unwrap().iter().map(|(t, _)| *t).collect()
    }

    fn layout_calls(&self) -> Vec<LayoutCall> {
        self.layout_calls.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl NodeApi for TestMeta {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Reply<pb::RegisterResponse> {
        self.registers.lock().unwrap().push(req.into_inner());
        match &self.refuse_register {
            Some(status) => Err(status.clone()),
            None => Ok(Response::new(pb::RegisterResponse {})),
        }
    }
    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Reply<pb::HeartbeatResponse> {
        self.heartbeats.lock().unwrap().push((Instant::now(), req.into_inner()));
        let jobs = std::mem::take(&mut *self.jobs.lock().unwrap());
        Ok(Response::new(pb::HeartbeatResponse { jobs, fill_clones: vec![] }))
    }
    async fn get_layout(&self, req: Request<pb::GetLayoutRequest>) -> Reply<pb::VolumeLayout> {
        let volume = req.into_inner().volume;
        let at = {
            let mut calls = self.layout_calls.lock().unwrap();
            calls.push(LayoutCall { volume, started: Instant::now(), answered: None });
            calls.len() - 1
        };
        tokio::time::sleep(self.layout_delay).await;
        self.layout_calls.lock().unwrap()[at].answered = Some(Instant::now());
        match self.layouts.get(&volume) {
            Some(l) => Ok(Response::new(l.clone())),
            None => Err(Status::not_found(format!("volume vol-{volume} not found"))),
        }
    }
    async fn report_job(&self, req: Request<pb::ReportJobRequest>) -> Reply<pb::ReportJobResponse> {
        self.reports.lock().unwrap().push(req.into_inner());
        Ok(Response::new(pb::ReportJobResponse {}))
    }
    async fn attach(&self, _: Request<pb::AttachRequest>) -> Reply<pb::AttachResponse> {
        Err(Status::unimplemented("the agent does not attach"))
    }
    async fn eject(&self, _: Request<pb::EjectRequest>) -> Reply<pb::Chunk> {
        Err(Status::unimplemented("the agent does not eject"))
    }
    async fn ack_layout(&self, _: Request<pb::AckLayoutRequest>) -> Reply<pb::AckLayoutResponse> {
        Err(Status::unimplemented("the agent does not ack layouts"))
    }
    async fn commit_snapshots(&self, _: Request<pb::CommitSnapshotsRequest>) -> Reply<pb::CommitSnapshotsResponse> {
        Err(Status::unimplemented("not part of this fixture"))
    }
    async fn fill_chunks(&self, _: Request<pb::FillChunksRequest>) -> Reply<pb::FillChunksResponse> {
        Err(Status::unimplemented("not part of this fixture"))
    }
    async fn detach(&self, _: Request<pb::DetachRequest>) -> Reply<pb::DetachResponse> {
        Err(Status::unimplemented("the agent does not detach"))
    }
}

/// Serves `meta` on a loopback port until the test's runtime ends; a client for it.
async fn serve(meta: TestMeta) -> (Arc<TestMeta>, MetaClient) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let meta = Arc::new(meta);
    let server = tonic::transport::Server::builder()
        .add_service(NodeApiServer::from_arc(meta.clone()))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(server);
    (meta, MetaClient::new([addr.to_string()], ballast_metaclient::Security::Insecure).unwrap())
}

fn chunk(volume: u64, chunk: u32) -> ChunkId {
    ChunkId { volume: VolumeId(volume), chunk: ChunkIdx(chunk) }
}

/// A chunk store in `dir` holding `chunks` (64 KiB each).
async fn store_with(dir: &std::path::Path, chunks: &[ChunkId]) -> ChunkStore {
    let store = ChunkStore::open(dir, StoreOptions::default()).unwrap();
    for id in chunks {
        store.create_chunk(*id, 64 << 10, Epoch(0)).await.unwrap();
    }
    store
}

fn config(heartbeat: Duration, gc_every: Duration) -> AgentConfig {
    AgentConfig {
        id: NODE,
        zone: "z1".into(),
        // Nothing dials it: the test meta assigns no jobs.
        addr: SocketAddr::from(([127, 0, 0, 1], 9)),
        capacity: 1 << 30,
        heartbeat,
        copy_rate: None,
        gc_every,
        disk_reserve: Some(0),
        metrics: None,
        fill_clones: true,
    }
}

/// Polls `cond` every 10 ms for up to `limit`.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// The defect this guards against: GC ran on the heartbeat's task, one meta
/// call per volume in sequence, so a slow meta held heartbeats back past the
/// suspect timeout. Here every GetLayout takes 4 s; while the first one is
/// outstanding, heartbeats must keep arriving at their 200 ms interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_their_cadence_while_a_gc_pass_waits_on_a_slow_meta() {
    const HEARTBEAT: Duration = Duration::from_millis(200);
    const WINDOW: Duration = Duration::from_millis(3000);
    let dir = tempfile::tempdir().unwrap();
    // Three volumes: a pass makes three 4 s calls in a row.
    let store = store_with(dir.path(), &[chunk(1, 0), chunk(2, 0), chunk(3, 0)]).await;
    let (meta, client) = serve(TestMeta { layout_delay: Duration::from_secs(4), ..TestMeta::new() }).await;
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(agent(config(HEARTBEAT, Duration::from_millis(300)), client, store.clone(), stop));

    assert!(wait_for(Duration::from_secs(10), || !meta.layout_calls().is_empty()).await, "GC never asked meta");
    let gc_started = meta.layout_calls()[0].started;
    tokio::time::sleep(WINDOW).await;
    let window_end = gc_started + WINDOW;

    let calls = meta.layout_calls();
    assert_eq!(calls.len(), 1, "one call at a time, in sequence: {calls:?}");
    assert!(calls[0].answered.is_none(), "the first GetLayout is still outstanding: {calls:?}");
    // Every heartbeat from the one before GC's call to the end of the window.
    let times = meta.heartbeat_times();
    let before = times.iter().rposition(|t| *t <= gc_started).expect("a heartbeat before GC's first pass");
    let during: Vec<Instant> = times[before..].iter().copied().filter(|t| *t <= window_end).collect();
    let gaps: Vec<Duration> = during.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = gaps.iter().max().copied().unwrap_or(WINDOW);
    // 3 s at 200 ms is 15 heartbeats; at most 2 late ones allowed for a busy machine.
    assert!(gaps.len() >= 13, "{} heartbeats while GC waited on meta: {gaps:?}", gaps.len());
    assert!(longest < Duration::from_secs(1), "a heartbeat came {longest:?} after the one before: {gaps:?}");
    let last = *during.last().unwrap();
    assert!(window_end - last < Duration::from_secs(1), "heartbeats stopped {:?} before the end", window_end - last);
    let sent = meta.heartbeats.lock().unwrap().last().map(|(_, r)| r.clone()).unwrap();
    assert_eq!((sent.node, sent.disk), (NODE, pb::DiskHealth::DiskOk as i32));
    assert_eq!(meta.registers.lock().unwrap().len(), 1, "registered once");

    // The same stop ends the heartbeat loop and the GC pass still waiting on meta.
    let stopping = Instant::now();
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the agent stops without waiting for the GC pass's meta call")
        .unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(2));
    assert_eq!(meta.layout_calls().len(), 1, "no other GetLayout after the stop");
    assert_eq!(store.chunks().len(), 3, "a pass cut short reclaims nothing");
}

/// A replica meta does not list here is deleted by the second pass that finds
/// it unlisted, never by the first; a listed one stays.
#[tokio::test]
async fn gc_reclaims_a_replica_only_when_two_passes_agree() {
    let dir = tempfile::tempdir().unwrap();
    // Volume 1 lists this node for chunk 0 only; volume 2 was deleted.
    let store = store_with(dir.path(), &[chunk(1, 0), chunk(1, 1), chunk(2, 0)]).await;
    let replica = |node| pb::ChunkReplica { node, role: pb::ReplicaRole::InSync as i32 };
    let layout = pb::VolumeLayout {
        snapshots: vec![],
        unfilled: vec![],
        snapshot_layers: 0,
        snapshot_bytes: 0,
        volume: Some(pb::Volume { id: 1, name: "pg".into(), ..Default::default() }),
        chunks: vec![
            pb::Chunk { index: 0, version: 1, replicas: vec![replica(NODE), replica(2)] },
            pb::Chunk { index: 1, version: 1, replicas: vec![replica(2), replica(3)] },
        ],
        nodes: vec![],
    };
    let (meta, client) = serve(TestMeta { layouts: HashMap::from([(1, layout)]), ..TestMeta::new() }).await;
    let cfg = config(Duration::from_secs(1), Duration::from_secs(30));
    let mut gc = Gc::default();

    gc.pass(&cfg, &client, &store).await;
    assert_eq!(store.chunks().len(), 3, "the first pass only marks candidates");
    let volumes: Vec<u64> = meta.layout_calls().iter().map(|c| c.volume).collect();
    assert_eq!(volumes, [1, 2], "one call per volume");

    gc.pass(&cfg, &client, &store).await;
    let left: Vec<ChunkId> = store.chunks().iter().map(|c| c.id).collect();
    assert_eq!(left, [chunk(1, 0)], "the second pass reclaims what both found unlisted");
}

/// A node whose registration meta refuses (another node has its id in another
/// zone) keeps trying to register and never reads the layouts as its own.
#[tokio::test]
async fn gc_does_not_run_while_registration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), &[chunk(2, 0)]).await;
    let refusal = Status::failed_precondition("node 7 is in zone z2, not z1: remove it before re-registering");
    let (meta, client) = serve(TestMeta { refuse_register: Some(refusal), ..TestMeta::new() }).await;
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(agent(config(Duration::from_millis(50), Duration::from_millis(50)), client, store, stop));

    assert!(wait_for(Duration::from_secs(10), || meta.registers.lock().unwrap().len() >= 5).await);
    // Several GC periods have passed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(meta.layout_calls().is_empty(), "GC asked meta while unregistered: {:?}", meta.layout_calls());
    assert!(meta.heartbeats.lock().unwrap().is_empty(), "no heartbeat before registration");
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("the agent stops").unwrap();
}

/// The value of `series` (its name and labels, exactly as encoded).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A replica server on `store`, on a loopback port.
async fn replica_server(store: ChunkStore) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = ballast_replica::ReplicaServer::new(store, ballast_replica::ServerOptions::default());
    tokio::spawn(server.serve(listener, std::future::pending()));
    addr
}

/// The agent's series after a heartbeat and a throttled copy job: the disk's
/// health and space, the heartbeats, the job's bytes and throttle waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_heartbeats_and_copy_jobs_are_counted() {
    const CHUNK_LEN: u64 = 4 << 20;
    let epoch = Epoch(3);
    let id = chunk(4, 0);
    // The source: another node's replica server, with 3 MiB written.
    let src_dir = tempfile::tempdir().unwrap();
    let src = replica_server(ChunkStore::open(src_dir.path(), StoreOptions::default()).unwrap()).await;
    let client = ballast_replica::ReplicaClient::new(src, ballast_replica::ClientOptions::default());
    client.announce_epoch(id.volume, epoch).await.unwrap();
    client.create_chunk(id, CHUNK_LEN, epoch).await.unwrap();
    let written = 3u64 << 20;
    let data = bytes::Bytes::from(vec![0x3c; written as usize]);
    client.write(id, 0, data, ballast_types::Seq::new(epoch, 1), true).await.unwrap();
    // This node: its store behind its own replica server (the job writes through it).
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), &[chunk(9, 0)]).await;
    let addr = replica_server(store.clone()).await;

    let mut registry = ballast_metrics::registry();
    let metrics = ballast_node::NodeMetrics::register(&mut registry);
    let job = pb::Job {
        id: 11,
        kind: pb::JobKind::Rebuild as i32,
        volume: id.volume.0,
        chunk: id.chunk.0,
        target: NODE,
        sources: vec![pb::Node { id: 2, addr: src.to_string(), ..Default::default() }],
        chunk_len: CHUNK_LEN,
        epoch: epoch.0,
        ..Default::default()
    };
    let (meta, meta_client) = serve(TestMeta { jobs: Mutex::new(vec![job]), ..TestMeta::new() }).await;
    let cfg = AgentConfig {
        addr,
        // 8 MiB/s, 1 MiB at once (a batch): the copy is held up for about 0.25 s.
        copy_rate: Some(8 << 20),
        metrics: Some(metrics),
        ..config(Duration::from_millis(100), Duration::from_secs(3600))
    };
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(agent(cfg, meta_client, store.clone(), stop));
    let done = || meta.reports.lock().unwrap().iter().any(|r| r.job == 11 && r.state == pb::JobState::Done as i32);
    assert!(
        wait_for(Duration::from_secs(20), done).await,
        "the job never finished: {:?}",
        meta.reports.lock().unwrap()
    );
    // One more heartbeat after the job, so that the allocation includes its chunk.
    let beats = meta.heartbeats.lock().unwrap().len();
    assert!(wait_for(Duration::from_secs(5), || meta.heartbeats.lock().unwrap().len() > beats + 1).await);
    stop_tx.send(true).unwrap();
    task.await.unwrap();

    let text = ballast_metrics::encode(&registry);
    let n = "node=\"7\"";
    for (series, v) in [
        (format!("ballast_node_copy_jobs_total{{{n},result=\"done\"}}"), 1.0),
        (format!("ballast_node_copy_jobs_total{{{n},result=\"failed\"}}"), 0.0),
        (format!("ballast_node_copy_jobs_running{{{n}}}"), 0.0),
        (format!("ballast_node_copy_bytes_total{{{n}}}"), written as f64),
        (format!("ballast_node_disk_health{{{n},state=\"ok\"}}"), 1.0),
        (format!("ballast_node_disk_health{{{n},state=\"full\"}}"), 0.0),
        (format!("ballast_node_disk_health{{{n},state=\"failed\"}}"), 0.0),
        (format!("ballast_node_disk_capacity_bytes{{{n}}}"), (1u64 << 30) as f64),
        (format!("ballast_node_disk_allocated_bytes{{{n}}}"), ((64 << 10) + CHUNK_LEN) as f64),
        (format!("ballast_node_heartbeats_total{{{n},result=\"failed\"}}"), 0.0),
    ] {
        assert_eq!(value(&text, &series), Some(v), "{series} in\n{text}");
    }
    let beats = value(&text, &format!("ballast_node_heartbeats_total{{{n},result=\"ok\"}}")).unwrap();
    assert_eq!(beats as usize, meta.heartbeats.lock().unwrap().len(), "{text}");
    let waits = value(&text, &format!("ballast_node_copy_throttle_waits_total{{{n}}}")).unwrap();
    let waited = value(&text, &format!("ballast_node_copy_throttle_wait_seconds_total{{{n}}}")).unwrap();
    assert!(waits >= 1.0 && waited > 0.05, "waits {waits}, {waited} s: {text}");
    let free = value(&text, &format!("ballast_node_disk_free_bytes{{{n}}}")).unwrap();
    let used = value(&text, &format!("ballast_node_disk_used_bytes{{{n}}}")).unwrap();
    assert!(free > 0.0 && used > 0.0, "{text}");
}

/// A disk below its reserve shows as full.
#[tokio::test]
async fn a_full_disk_shows_in_the_health_gauge() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), &[]).await;
    let (meta, client) = serve(TestMeta::new()).await;
    let mut registry = ballast_metrics::registry();
    let cfg = AgentConfig {
        disk_reserve: Some(u64::MAX),
        metrics: Some(ballast_node::NodeMetrics::register(&mut registry)),
        ..config(Duration::from_millis(50), Duration::from_secs(3600))
    };
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(agent(cfg, client, store, stop));
    let full = || meta.heartbeats.lock().unwrap().iter().any(|(_, h)| h.disk == pb::DiskHealth::DiskFull as i32);
    assert!(wait_for(Duration::from_secs(10), full).await);
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    let text = ballast_metrics::encode(&registry);
    assert_eq!(value(&text, "ballast_node_disk_health{node=\"7\",state=\"full\"}"), Some(1.0), "{text}");
    assert_eq!(value(&text, "ballast_node_disk_health{node=\"7\",state=\"ok\"}"), Some(0.0), "{text}");
}
