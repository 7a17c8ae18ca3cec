//! The volume's Prometheus series, read from the encoded text: requests against
//! real replica servers (in-process, loopback, chunk stores in temp dirs), and
//! ejections, read repairs and scrub findings against the fakes that fail and
//! corrupt on command; a closed volume's series are gone.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_blockdev::{BlockDev, BlockError};
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_frontend::static_membership::{NodeSpec, VolumeSpec};
use ballast_frontend::{
    tcp_connector, ReplicaError, ScrubOptions, StaticConfig, StaticMembership, Volume, VolumeMetrics, VolumeOptions,
};
use ballast_metrics::Registry;
use ballast_replica::{ClientOptions, ReplicaServer, ServerOptions};
use ballast_types::{ChunkId, ChunkIdx, NodeId, VolumeId, Zone};
use bytes::Bytes;
use common::{Cluster, VOL};
use tokio::net::TcpListener;
use tokio::sync::Notify;

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;

/// The value of `series` (its name and labels, exactly as encoded).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn assert_values(registry: &Registry, want: &[(&str, f64)]) -> String {
    let text = ballast_metrics::encode(registry);
    for (series, v) in want {
        assert_eq!(value(&text, series), Some(*v), "{series} in\n{text}");
    }
    text
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed)).collect::<Vec<u8>>())
}

async fn replica_server(dir: &tempfile::TempDir) -> SocketAddr {
    let store = ChunkStore::open(dir.path(), StoreOptions::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ReplicaServer::new(store, ServerOptions::default()).serve(listener, std::future::pending()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_against_real_replicas_are_counted_per_volume_and_removed_on_close() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut addrs = Vec::new();
    for d in &dirs {
        addrs.push(replica_server(d).await);
    }
    let meta = tempfile::tempdir().unwrap();
    let path = meta.path().join("vol.toml");
    let nodes = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| NodeSpec { id: NodeId(i as u64 + 1), zone: Zone(format!("z{i}")), addr: *a })
        .collect();
    let spec = VolumeSpec { id: VolumeId(9), name: "pg-data".into(), size: 8 * MIB, chunk_size: MIB, min_in_sync: 2 };
    StaticMembership::create(&path, StaticConfig::new(spec, nodes, (1..=3).map(NodeId).collect())).unwrap();

    let mut registry = ballast_metrics::registry();
    let metrics = VolumeMetrics::register(&mut registry);
    let opts = VolumeOptions { local_node: Some(NodeId(1)), metrics: Some(metrics.clone()), ..Default::default() };
    let client = ClientOptions { timeout: Duration::from_secs(5), ..ClientOptions::default() };
    let m = Arc::new(StaticMembership::load(&path).unwrap());
    let v = Volume::attach(m, tcp_connector(client), VolumeId(9), opts).await.expect("attach");

    for i in 0..3u64 {
        v.write(i * 7 * BS, pattern(BS as usize, i as u8), false).await.unwrap();
    }
    v.read(0, 2 * BS as u32).await.unwrap();
    v.read(MIB - BS, 2 * BS as u32).await.unwrap(); // spans two chunks: one request
    v.flush().await.unwrap();
    v.trim(MIB, 4 * BS).await.unwrap();
    v.write_zeroes(2 * MIB, BS, false).await.unwrap();
    assert!(matches!(v.read(8 * MIB, BS as u32).await, Err(BlockError::OutOfRange { .. })));
    assert!(matches!(v.write(1, pattern(10, 0), false).await, Err(BlockError::Misaligned { .. })));
    v.set_layout_generation(17);

    let text = assert_values(
        &registry,
        &[
            ("ballast_frontend_io_latency_seconds_count{volume=\"pg-data\",op=\"write\"}", 3.0),
            ("ballast_frontend_written_bytes_total{volume=\"pg-data\"}", 3.0 * BS as f64),
            ("ballast_frontend_io_latency_seconds_count{volume=\"pg-data\",op=\"read\"}", 2.0),
            ("ballast_frontend_read_bytes_total{volume=\"pg-data\"}", 4.0 * BS as f64),
            ("ballast_frontend_io_latency_seconds_count{volume=\"pg-data\",op=\"flush\"}", 1.0),
            ("ballast_frontend_io_latency_seconds_count{volume=\"pg-data\",op=\"trim\"}", 1.0),
            ("ballast_frontend_io_latency_seconds_count{volume=\"pg-data\",op=\"write_zeroes\"}", 1.0),
            ("ballast_frontend_errors_total{volume=\"pg-data\",op=\"read\",kind=\"out_of_range\"}", 1.0),
            ("ballast_frontend_errors_total{volume=\"pg-data\",op=\"write\",kind=\"misaligned\"}", 1.0),
            ("ballast_frontend_errors_total{volume=\"pg-data\",op=\"write\",kind=\"io\"}", 0.0),
            ("ballast_frontend_inflight_requests{volume=\"pg-data\"}", 0.0),
            ("ballast_frontend_inflight_bytes{volume=\"pg-data\"}", 0.0),
            ("ballast_frontend_ejections_total{volume=\"pg-data\"}", 0.0),
            ("ballast_frontend_layout_generation{volume=\"pg-data\"}", 17.0),
            ("ballast_frontend_epoch{volume=\"pg-data\"}", v.epoch().0 as f64),
            ("ballast_frontend_size_bytes{volume=\"pg-data\"}", 8.0 * MIB as f64),
        ],
    );
    if std::env::var_os("SHOW_METRICS").is_some() {
        println!("{text}");
    }
    // The histogram's sum is a real time: three loopback writes to three
    // replicas take more than nothing and (here) far less than a second each.
    let sum = value(&text, "ballast_frontend_io_latency_seconds_sum{volume=\"pg-data\",op=\"write\"}").unwrap();
    assert!(sum > 0.0 && sum < 3.0, "{sum}");
    // What the stats say is what the metrics say: one set of counters.
    let s = v.stats();
    assert_eq!((s.writes, s.bytes_written, s.reads, s.bytes_read, s.errors), (3, 3 * BS, 2, 4 * BS, 2));

    v.close();
    let text = ballast_metrics::encode(&registry);
    assert!(!text.contains("pg-data"), "a closed volume leaves no series: {text}");
}

type FakeVol = Volume<Arc<common::FakeMembership>, common::FakeReplica>;

async fn attach_fake(c: &Cluster, metrics: &VolumeMetrics) -> Arc<FakeVol> {
    let opts = VolumeOptions {
        local_node: Some(NodeId(1)),
        io_timeout: Duration::from_secs(5),
        metrics: Some(metrics.clone()),
        ..Default::default()
    };
    Volume::attach(c.membership.clone(), c.connector(), VOL, opts).await.expect("attach")
}

/// Rots `block` of `chunk` on `node` (reads covering it fail their checksum).
fn rot(c: &Cluster, node: u64, chunk: u32, block: u32) {
    let id = ChunkId::new(VOL, ChunkIdx(chunk));
    c.replica(node).with(|s| {
        s.corrupt.insert((id, block));
        s.chunks.get_mut(&id).expect("chunk exists").data[block as usize * BS as usize + 3] ^= 0x5a;
    });
}

#[tokio::test]
async fn ejections_read_repairs_and_scrub_findings_are_counted() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let mut registry = ballast_metrics::registry();
    let metrics = VolumeMetrics::register(&mut registry);
    let v = attach_fake(&c, &metrics).await;
    let data = pattern(4 * MIB as usize, 1);
    v.write(0, data.clone(), false).await.unwrap();

    // A read that finds the local copy corrupt repairs it.
    rot(&c, 1, 1, 5);
    let at = MIB + 5 * BS;
    assert_eq!(v.read(at, BS as u32).await.unwrap(), data.slice(at as usize..(at + BS) as usize));
    // The scrub: a copy on node 3 repaired; a piece corrupt on every replica left alone.
    rot(&c, 3, 2, 70);
    for node in 1..=3 {
        rot(&c, node, 3, 200);
    }
    let report = v.scrub(&ScrubOptions { rate_bytes_per_sec: 0, piece_len: 256 * 1024 }).await.unwrap();
    assert_eq!((report.corrupt_pieces, report.repaired, report.unrepairable), (4, 1, 3), "{report:?}");
    // A replica failing writes is ejected from the chunk it was written.
    c.replica(2).with(|s| s.fail_writes = Some(ReplicaError::Transport("reset".into())));
    v.write(0, pattern(BS as usize, 2), false).await.unwrap();

    let text = assert_values(
        &registry,
        &[
            ("ballast_frontend_read_repairs_total{volume=\"test\"}", 1.0),
            ("ballast_frontend_scrub_passes_total{volume=\"test\"}", 1.0),
            ("ballast_frontend_scrub_read_bytes_total{volume=\"test\"}", report.bytes_read as f64),
            ("ballast_frontend_scrub_corrupt_pieces_total{volume=\"test\"}", 4.0),
            ("ballast_frontend_scrub_repaired_pieces_total{volume=\"test\"}", 1.0),
            ("ballast_frontend_scrub_unrepairable_pieces_total{volume=\"test\"}", 3.0),
            ("ballast_frontend_ejections_total{volume=\"test\"}", 1.0),
            ("ballast_frontend_io_latency_seconds_count{volume=\"test\",op=\"write\"}", 2.0),
            ("ballast_frontend_written_bytes_total{volume=\"test\"}", (4 * MIB + BS) as f64),
        ],
    );
    assert!(text.contains("# TYPE ballast_frontend_io_latency_seconds histogram"), "{text}");
    v.close();
}

#[tokio::test]
async fn a_request_in_flight_is_counted_until_it_ends() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let mut registry = ballast_metrics::registry();
    let metrics = VolumeMetrics::register(&mut registry);
    let v = attach_fake(&c, &metrics).await;
    v.write(0, pattern(2 * BS as usize, 1), false).await.unwrap();
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    c.replica(1).with(|s| s.pause_next_read = Some((entered.clone(), release.clone())));
    let reader = tokio::spawn({
        let v = v.clone();
        async move { v.read(0, 2 * BS as u32).await }
    });
    entered.notified().await;
    assert_values(
        &registry,
        &[
            ("ballast_frontend_inflight_requests{volume=\"test\"}", 1.0),
            ("ballast_frontend_inflight_bytes{volume=\"test\"}", 2.0 * BS as f64),
        ],
    );
    release.notify_one();
    reader.await.unwrap().unwrap();
    assert_values(
        &registry,
        &[
            ("ballast_frontend_inflight_requests{volume=\"test\"}", 0.0),
            ("ballast_frontend_inflight_bytes{volume=\"test\"}", 0.0),
            ("ballast_frontend_io_latency_seconds_count{volume=\"test\",op=\"read\"}", 1.0),
        ],
    );

    // A request dropped half-way (its client went away) leaves the gauges too.
    c.replica(1).with(|s| s.pause_next_read = Some((entered.clone(), release.clone())));
    let reader = tokio::spawn({
        let v = v.clone();
        async move { v.read(0, BS as u32).await }
    });
    entered.notified().await;
    reader.abort();
    let _ = reader.await;
    assert_values(
        &registry,
        &[
            ("ballast_frontend_inflight_requests{volume=\"test\"}", 0.0),
            ("ballast_frontend_io_latency_seconds_count{volume=\"test\",op=\"read\"}", 1.0),
        ],
    );
    v.close();
}

#[tokio::test]
async fn a_second_attachment_gets_its_own_series_and_the_first_close_leaves_them() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let mut registry = ballast_metrics::registry();
    let metrics = VolumeMetrics::register(&mut registry);
    let old = attach_fake(&c, &metrics).await;
    old.write(0, pattern(BS as usize, 1), false).await.unwrap();
    // A newer front end in the same process (the old one is fenced by it).
    let new = attach_fake(&c, &metrics).await;
    assert_values(&registry, &[("ballast_frontend_written_bytes_total{volume=\"test\"}", 0.0)]);
    new.write(BS, pattern(BS as usize, 2), false).await.unwrap();
    assert!(old.write(0, pattern(BS as usize, 3), false).await.is_err(), "fenced");
    old.close();
    drop(old);
    assert_values(
        &registry,
        &[
            ("ballast_frontend_written_bytes_total{volume=\"test\"}", BS as f64),
            ("ballast_frontend_epoch{volume=\"test\"}", new.epoch().0 as f64),
        ],
    );
    drop(new);
    assert!(!ballast_metrics::encode(&registry).contains("volume=\"test\""), "dropped: series gone");
}

#[tokio::test]
async fn without_metrics_nothing_is_registered_and_stats_still_count() {
    let c = Cluster::new(3, 4 * MIB, MIB, 2);
    let opts = VolumeOptions { local_node: Some(NodeId(1)), ..Default::default() };
    let v = Volume::attach(c.membership.clone(), c.connector(), VOL, opts).await.expect("attach");
    v.write(0, pattern(BS as usize, 1), false).await.unwrap();
    v.read(0, BS as u32).await.unwrap();
    let s = v.stats();
    assert_eq!((s.writes, s.bytes_written, s.reads, s.bytes_read), (1, BS, 1, BS));
    v.set_layout_generation(3); // a no-op
}
