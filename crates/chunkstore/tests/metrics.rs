//! The store's Prometheus series, read from the encoded text after real I/O on
//! a temp dir: latencies and bytes per operation, allocation, checksum errors,
//! and a disk's series going away.

use std::os::unix::fs::FileExt;

use ballast_chunkstore::{ChunkStore, ResyncBlock, StoreError, StoreMetrics, StoreOptions};
use ballast_types::{ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;

const V: VolumeId = VolumeId(5);
const E: Epoch = Epoch(1);
const BS: u64 = 4096;

fn id(c: u32) -> ChunkId {
    ChunkId::new(V, ChunkIdx(c))
}

/// The value of `series` (its name and labels, exactly as encoded) in `text`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn operations_bytes_allocation_and_checksum_errors_are_counted() {
    let dir = tempfile::Builder::new().prefix("chunkstore-metrics").tempdir_in("/var/tmp").expect("tempdir");
    let mut registry = ballast_metrics::registry();
    let families = StoreMetrics::register(&mut registry);
    let disk = families.disk("7");
    let opts = StoreOptions { direct_io: false, metrics: Some(disk.clone()), ..StoreOptions::default() };
    let s = ChunkStore::open(dir.path(), opts).expect("open");
    s.announce_epoch(V, E).await.expect("announce");
    s.create_chunk(id(0), 64 * BS, E).await.expect("create");
    s.create_chunk(id(0), 64 * BS, E).await.expect("create again: idempotent, allocates nothing");
    s.create_chunk(id(1), 32 * BS, E).await.expect("create");
    for i in 0..3u64 {
        s.write(id(0), i * BS, Bytes::from(vec![i as u8 + 1; BS as usize]), Seq::new(E, i + 1)).await.expect("write");
    }
    s.read(id(0), 0, 2 * BS as u32, E).await.expect("read");
    s.trim(id(0), 10 * BS, BS, Seq::new(E, 10)).await.expect("trim");
    s.write_zeroes(id(0), 11 * BS, BS, Seq::new(E, 11)).await.expect("write zeroes");
    let blocks = [ResyncBlock::Data(Seq::new(E, 20)), ResyncBlock::Keep, ResyncBlock::Data(Seq::new(E, 21))];
    s.resync_write(id(1), 0, &blocks, Bytes::from(vec![9u8; 2 * BS as usize]), E, Seq::ZERO).await.expect("resync");
    s.flush_chunk(id(0), E).await.expect("flush");
    s.flush_volume(V, E).await.expect("flush volume");
    s.context_table(id(0), ballast_types::BlockIdx(0), 8, E).await.expect("contexts");
    // Not the disk's fault: no error counted.
    assert!(matches!(s.read(id(0), 1, 10, E).await, Err(StoreError::Misaligned { .. })));
    let unannounced = s.write(id(0), 0, Bytes::from(vec![0; 4096]), Seq::new(Epoch(9), 1)).await;
    assert!(matches!(unannounced, Err(StoreError::UnannouncedEpoch { .. })), "{unannounced:?}");

    // Rot block 1 behind the store's back: two reads over it fail their checksum.
    let data = dir.path().join("chunks").join(format!("{}.data", ballast_chunkstore::layout::chunk_file_stem(id(0))));
    let f = std::fs::OpenOptions::new().write(true).open(&data).expect("open data file");
    f.write_at(&[0xee; 8], BS + 5).expect("rot");
    f.sync_all().expect("sync");
    drop(f);
    for _ in 0..2 {
        assert!(matches!(s.read(id(0), BS, BS as u32, E).await, Err(StoreError::ChecksumMismatch { .. })));
    }
    s.delete_chunk(id(1), E).await.expect("delete");

    let text = ballast_metrics::encode(&registry);
    if std::env::var_os("SHOW_METRICS").is_some() {
        println!("{text}");
    }
    let want = [
        ("ballast_chunkstore_op_latency_seconds_count{node=\"7\",op=\"write\"}", 3.0),
        ("ballast_chunkstore_op_latency_seconds_count{node=\"7\",op=\"read\"}", 1.0),
        ("ballast_chunkstore_op_latency_seconds_count{node=\"7\",op=\"trim\"}", 1.0),
        ("ballast_chunkstore_op_latency_seconds_count{node=\"7\",op=\"write_zeroes\"}", 1.0),
        ("ballast_chunkstore_op_latency_seconds_count{node=\"7\",op=\"resync_write\"}", 1.0),
        ("ballast_chunkstore_op_latency_seconds_count{node=\"7\",op=\"flush\"}", 2.0),
        ("ballast_chunkstore_op_latency_seconds_count{node=\"7\",op=\"create_chunk\"}", 3.0),
        ("ballast_chunkstore_op_latency_seconds_count{node=\"7\",op=\"delete_chunk\"}", 1.0),
        ("ballast_chunkstore_op_latency_seconds_count{node=\"7\",op=\"context_table\"}", 1.0),
        ("ballast_chunkstore_read_bytes_total{node=\"7\"}", (2 * BS) as f64),
        // 3 client blocks and 2 resync blocks.
        ("ballast_chunkstore_written_bytes_total{node=\"7\"}", (5 * BS) as f64),
        ("ballast_chunkstore_errors_total{node=\"7\",kind=\"checksum\"}", 2.0),
        ("ballast_chunkstore_errors_total{node=\"7\",kind=\"io\"}", 0.0),
        ("ballast_chunkstore_errors_total{node=\"7\",kind=\"no_space\"}", 0.0),
        // Chunk 1 was deleted: chunk 0 is left.
        ("ballast_chunkstore_allocated_bytes{node=\"7\"}", (64 * BS) as f64),
        ("ballast_chunkstore_chunks{node=\"7\"}", 1.0),
    ];
    for (series, v) in want {
        assert_eq!(value(&text, series), Some(v), "{series} in\n{text}");
    }
    // The histogram's buckets are cumulative: the +Inf bucket holds every write.
    let inf = text.lines().find(|l| {
        l.starts_with("ballast_chunkstore_op_latency_seconds_bucket{")
            && l.contains("op=\"write\"")
            && l.contains("le=\"+Inf\"")
    });
    assert_eq!(inf.and_then(|l| l.rsplit(' ').next()), Some("3"), "{text}");

    // Reopened: the gauges start from what is on the disk.
    drop(s);
    let disk2 = families.disk("7");
    let s = ChunkStore::open(
        dir.path(),
        StoreOptions { direct_io: false, metrics: Some(disk2.clone()), ..Default::default() },
    )
    .expect("reopen");
    let text = ballast_metrics::encode(&registry);
    assert_eq!(value(&text, "ballast_chunkstore_chunks{node=\"7\"}"), Some(1.0), "{text}");
    assert_eq!(value(&text, "ballast_chunkstore_written_bytes_total{node=\"7\"}"), Some(0.0), "fresh series: {text}");
    // The first store's handle no longer owns the series: removing it leaves them.
    disk.remove();
    assert!(ballast_metrics::encode(&registry).contains("ballast_chunkstore_chunks{node=\"7\"} 1"));
    disk2.remove();
    drop(s);
    let text = ballast_metrics::encode(&registry);
    assert!(!text.contains("node=\"7\""), "a removed disk leaves no series: {text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
}
