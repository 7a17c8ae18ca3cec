//! An attached volume's series, through a one-member metadata service and a
//! replica server in-process on loopback: they exist from the attach, carry the
//! layout generation the follower installed, count I/O, and the detach removes
//! them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_blockdev::BlockDev;
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_metaclient::{pb, MetaClient};
use ballast_metasvc::{fast_timing, MetaConfig};
use ballast_metavolume::{AttachOptions, AttachedVolume, VolumeMetrics};
use ballast_replica::{ReplicaServer, ServerOptions};
use ballast_types::NodeId;
use bytes::Bytes;

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_makes_the_volume_series_and_detach_removes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (raft, detector) = fast_timing();
    let cfg = MetaConfig {
        id: 1,
        data_dir: dir.path().join("m1"),
        listen: listener.local_addr().expect("addr"),
        initial_members: BTreeMap::from([(1, addr.clone())]),
        raft,
        detector,
        security: ballast_metaclient::Security::Insecure,
    };
    let member = ballast_metasvc::start_on(cfg, listener).await.expect("start member");
    let meta = MetaClient::new([addr.as_str()], ballast_metaclient::Security::Insecure).expect("client");

    // One storage node: a replica server on a chunk store in a temp dir.
    let store = ChunkStore::open(dir.path().join("disk"), StoreOptions::default()).expect("store");
    let replica = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let replica_addr = replica.local_addr().expect("addr");
    tokio::spawn(ReplicaServer::new(store, ServerOptions::default()).serve(replica, std::future::pending()));
    let req =
        pb::RegisterRequest { node: 1, addr: replica_addr.to_string(), zone: "a".into(), capacity_bytes: 1 << 40 };
    meta.register(req).await.expect("register");
    let req = pb::CreateVolumeRequest {
        name: "orders".into(),
        size_bytes: 8 << 20,
        chunk_size_bytes: 1 << 20,
        replicas: 1,
        min_in_sync: 1,
        ..Default::default()
    };
    meta.create_volume(req).await.expect("create volume");

    let mut registry = ballast_metrics::registry();
    let metrics = VolumeMetrics::register(&mut registry);
    let options = AttachOptions {
        io_timeout: Duration::from_secs(5),
        poll: Duration::from_millis(50),
        metrics: Some(metrics),
        to_fill: false,
    };
    let attached = AttachedVolume::attach_with(meta.clone(), "orders", NodeId(1), options).await.expect("attach");
    let v = attached.volume().clone();
    for i in 0..3u64 {
        v.write(i * 4096, Bytes::from(vec![i as u8; 4096]), false).await.expect("write");
    }
    v.flush().await.expect("flush");

    // The follower installs the current generation (and acknowledges it) on its first poll.
    let gen = meta.get_layout(pb::GetLayoutRequest { volume: v.id().0 }).await.expect("layout");
    let gen = gen.volume.expect("volume").layout_gen as f64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let series = "ballast_frontend_layout_generation{volume=\"orders\"}";
    while value(&ballast_metrics::encode(&registry), series) != Some(gen) {
        assert!(Instant::now() < deadline, "{}", ballast_metrics::encode(&registry));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = ballast_metrics::encode(&registry);
    for (series, want) in [
        ("ballast_frontend_io_latency_seconds_count{volume=\"orders\",op=\"write\"}", 3.0),
        ("ballast_frontend_written_bytes_total{volume=\"orders\"}", 12288.0),
        ("ballast_frontend_io_latency_seconds_count{volume=\"orders\",op=\"flush\"}", 1.0),
        ("ballast_frontend_epoch{volume=\"orders\"}", v.epoch().0 as f64),
        ("ballast_frontend_size_bytes{volume=\"orders\"}", (8u64 << 20) as f64),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    }
    assert!(gen >= 1.0, "{gen}");

    attached.detach().await.expect("detach");
    let text = ballast_metrics::encode(&registry);
    assert!(!text.contains("orders"), "the detached volume's series are gone: {text}");
    drop(v);
    member.shutdown().await;
}
