//! Prometheus metrics of one disk's chunk store, and the lock-free latency
//! histogram the data path records into.
//!
//! [`StoreMetrics::register`] registers the families once per process;
//! [`StoreMetrics::disk`] makes the series of one disk (label `node`), which
//! the store is given through [`crate::StoreOptions::metrics`]. Every handle is
//! resolved when the disk's series are made: an operation costs a few relaxed
//! atomic adds (its latency bucket and sum, its bytes), no lock and no
//! allocation.
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `ballast_chunkstore_op_latency_seconds` | histogram | `node`, `op` (read, write, trim, write_zeroes, flush, resync_write, create_chunk, delete_chunk, context_table) |
//! | `ballast_chunkstore_read_bytes_total` | counter | `node` |
//! | `ballast_chunkstore_written_bytes_total` | counter | `node` (client writes and resync data) |
//! | `ballast_chunkstore_errors_total` | counter | `node`, `kind` (io, no_space, checksum) |
//! | `ballast_chunkstore_allocated_bytes` | gauge | `node` (sum of the chunk replicas' sizes) |
//! | `ballast_chunkstore_chunks` | gauge | `node` |
//!
//! Latencies are of operations that succeeded; a failed one counts in
//! `errors_total` when it is the disk's fault (EIO and other OS errors,
//! ENOSPC/EDQUOT, a block failing its checksum), and nowhere otherwise (a
//! fenced or out-of-range request is the caller's business).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_metrics::prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use ballast_metrics::prometheus_client::metrics::{MetricType, TypedMetric};
use ballast_metrics::prometheus_client::registry::Unit;
use ballast_metrics::{Counter, Family, Gauge, Registry};

use crate::StoreError;

/// A latency histogram whose observation is two relaxed atomic adds (its
/// bucket, the sum in nanoseconds): prometheus-client's `Histogram` takes a
/// mutex per observation, which the I/O path does not. Encoded as an ordinary
/// Prometheus histogram in seconds; `_count` is the sum of the buckets read,
/// so a scrape is always self-consistent (`_count` = the `+Inf` bucket).
///
/// Cheap to clone (an `Arc`); clones record into the same buckets.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds in seconds (as encoded) and in nanoseconds (as compared).
    bounds: Box<[f64]>,
    bounds_ns: Box<[u64]>,
    /// One per bound, then the `+Inf` bucket. Not cumulative.
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// A histogram with these upper bounds in seconds (ascending; a
    /// non-finite bound is dropped: `+Inf` is always there).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> LatencyHistogram {
        let mut bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite() && *b >= 0.0).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let bounds_ns: Vec<u64> = bounds.iter().map(|b| (b * 1e9).round() as u64).collect();
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        LatencyHistogram {
            inner: Arc::new(HistogramInner {
                bounds: bounds.into(),
                bounds_ns: bounds_ns.into(),
                buckets,
                sum_ns: AtomicU64::new(0),
            }),
        }
    }

    /// A histogram with the I/O latency buckets of every Ballast process
    /// ([`ballast_metrics::io_latency_buckets`]: 16 µs to about 8 s).
    pub fn io() -> LatencyHistogram {
        LatencyHistogram::new(ballast_metrics::io_latency_buckets())
    }

    /// Records one latency.
    pub fn observe(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let i = self.inner.bounds_ns.partition_point(|&b| b < ns);
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Records the time since `start`.
    pub fn observe_since(&self, start: Instant) {
        self.observe(start.elapsed())
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Sum of the observations.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.inner.sum_ns.load(Ordering::Relaxed))
    }

    /// True if both handles record into the same buckets.
    pub fn same_as(&self, other: &LatencyHistogram) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Default for LatencyHistogram {
    /// [`LatencyHistogram::io`]: what a `Family` of them makes per label set.
    fn default() -> Self {
        LatencyHistogram::io()
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.inner;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A chunk-store operation, as the `op` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreOp {
    Read,
    Write,
    Trim,
    WriteZeroes,
    Flush,
    ResyncWrite,
    CreateChunk,
    DeleteChunk,
    ContextTable,
}

impl StoreOp {
    const ALL: [StoreOp; 9] = [
        StoreOp::Read,
        StoreOp::Write,
        StoreOp::Trim,
        StoreOp::WriteZeroes,
        StoreOp::Flush,
        StoreOp::ResyncWrite,
        StoreOp::CreateChunk,
        StoreOp::DeleteChunk,
        StoreOp::ContextTable,
    ];

    fn label(self) -> &'static str {
        match self {
            StoreOp::Read => "read",
            StoreOp::Write => "write",
            StoreOp::Trim => "trim",
            StoreOp::WriteZeroes => "write_zeroes",
            StoreOp::Flush => "flush",
            StoreOp::ResyncWrite => "resync_write",
            StoreOp::CreateChunk => "create_chunk",
            StoreOp::DeleteChunk => "delete_chunk",
            StoreOp::ContextTable => "context_table",
        }
    }
}

/// The disk's fault, as the `kind` label names it.
const ERROR_KINDS: [&str; 3] = ["io", "no_space", "checksum"];

fn error_kind(e: &StoreError) -> Option<usize> {
    match e {
        StoreError::Io { .. } => Some(0),
        StoreError::NoSpace { .. } => Some(1),
        StoreError::ChecksumMismatch { .. } => Some(2),
        StoreError::Fenced { .. }
        | StoreError::UnannouncedEpoch { .. }
        | StoreError::NoSuchChunk(_)
        | StoreError::ChunkExists { .. }
        | StoreError::OutOfRange { .. }
        | StoreError::Misaligned { .. }
        | StoreError::InvalidRequest(_)
        | StoreError::Shutdown => None,
    }
}

type Labels = Vec<(&'static str, String)>;

/// The chunk-store metric families of a process (one registration; cheap to
/// clone). See the module docs for the names.
#[derive(Clone)]
pub struct StoreMetrics {
    families: Arc<Families>,
}

struct Families {
    op_latency: Family<Labels, LatencyHistogram>,
    read_bytes: Family<Labels, Counter>,
    written_bytes: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    allocated_bytes: Family<Labels, Gauge>,
    chunks: Family<Labels, Gauge>,
}

impl std::fmt::Debug for StoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreMetrics").finish_non_exhaustive()
    }
}

impl StoreMetrics {
    /// Registers the families in the process's `registry` (its root: the names
    /// get the `ballast_chunkstore_` prefix here). Call once per registry.
    pub fn register(registry: &mut Registry) -> StoreMetrics {
        let families = Families {
            op_latency: Family::default(),
            read_bytes: Family::default(),
            written_bytes: Family::default(),
            errors: Family::default(),
            allocated_bytes: Family::default(),
            chunks: Family::default(),
        };
        let r = ballast_metrics::ballast(registry).sub_registry_with_prefix("chunkstore");
        r.register_with_unit(
            "op_latency",
            "Latency of chunk-store operations that succeeded, by operation",
            Unit::Seconds,
            families.op_latency.clone(),
        );
        r.register_with_unit("read", "Bytes read from chunk replicas", Unit::Bytes, families.read_bytes.clone());
        r.register_with_unit(
            "written",
            "Bytes written to chunk replicas (client writes and resync data)",
            Unit::Bytes,
            families.written_bytes.clone(),
        );
        r.register(
            "errors",
            "Operations failed by the disk: kind io (EIO and other OS errors), no_space (ENOSPC, EDQUOT), checksum (a block failing its crc)",
            families.errors.clone(),
        );
        r.register_with_unit(
            "allocated",
            "Sum of the sizes of the chunk replicas on the disk (thin: what they may grow to)",
            Unit::Bytes,
            families.allocated_bytes.clone(),
        );
        r.register("chunks", "Chunk replicas on the disk", families.chunks.clone());
        StoreMetrics { families: Arc::new(families) }
    }

    /// The series of one disk, labelled `node` (the storage node's id; a
    /// standalone replica process names itself by its address). Made (at
    /// zero) now; a disk whose series existed already gets fresh ones.
    pub fn disk(&self, node: impl Into<String>) -> DiskMetrics {
        let node = node.into();
        let f = &self.families;
        let disk: Labels = vec![("node", node.clone())];
        let with = |k: &'static str, v: &str| vec![("node", node.clone()), (k, v.to_string())];
        let op_labels: Vec<Labels> = StoreOp::ALL.iter().map(|op| with("op", op.label())).collect();
        let error_labels: Vec<Labels> = ERROR_KINDS.iter().map(|k| with("kind", k)).collect();
        // A second store under the same label (a reopen) starts afresh rather
        // than sharing, so that removing the old one's series cannot touch it.
        for l in &op_labels {
            f.op_latency.remove(l);
        }
        for l in &error_labels {
            f.errors.remove(l);
        }
        for fam in [&f.read_bytes, &f.written_bytes] {
            fam.remove(&disk);
        }
        for fam in [&f.allocated_bytes, &f.chunks] {
            fam.remove(&disk);
        }
        let latency = op_labels.iter().map(|l| f.op_latency.get_or_create_owned(l)).collect();
        let errors = error_labels.iter().map(|l| f.errors.get_or_create_owned(l)).collect();
        DiskMetrics {
            inner: Arc::new(DiskSeries {
                families: self.families.clone(),
                read_bytes: f.read_bytes.get_or_create_owned(&disk),
                written_bytes: f.written_bytes.get_or_create_owned(&disk),
                allocated_bytes: f.allocated_bytes.get_or_create_owned(&disk),
                chunks: f.chunks.get_or_create_owned(&disk),
                latency,
                errors,
                disk,
                op_labels,
                error_labels,
            }),
        }
    }
}

/// One disk's series (see [`StoreMetrics::disk`]). Cheap to clone.
#[derive(Clone)]
pub struct DiskMetrics {
    inner: Arc<DiskSeries>,
}

struct DiskSeries {
    families: Arc<Families>,
    /// Index: `StoreOp as usize`.
    latency: Vec<LatencyHistogram>,
    /// Index: position in `ERROR_KINDS`.
    errors: Vec<Counter>,
    read_bytes: Counter,
    written_bytes: Counter,
    allocated_bytes: Gauge,
    chunks: Gauge,
    disk: Labels,
    op_labels: Vec<Labels>,
    error_labels: Vec<Labels>,
}

impl std::fmt::Debug for DiskMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskMetrics").field("labels", &self.inner.disk).finish_non_exhaustive()
    }
}

impl DiskMetrics {
    /// Removes this disk's series from the families (a store closed for good).
    /// Series made since for the same label (another store) are left alone.
    pub fn remove(&self) {
        let (s, f) = (&*self.inner, &*self.inner.families);
        let ours = f.read_bytes.get(&s.disk).is_some_and(|c| std::ptr::eq(c.inner(), s.read_bytes.inner()));
        if !ours {
            return;
        }
        for l in &s.op_labels {
            f.op_latency.remove(l);
        }
        for l in &s.error_labels {
            f.errors.remove(l);
        }
        for fam in [&f.read_bytes, &f.written_bytes] {
            fam.remove(&s.disk);
        }
        for fam in [&f.allocated_bytes, &f.chunks] {
            fam.remove(&s.disk);
        }
    }

    /// The end of an operation that began at `start`: its latency when it
    /// succeeded, its error when the disk failed it.
    pub(crate) fn done<T>(&self, op: StoreOp, start: Instant, r: &Result<T, StoreError>) {
        match r {
            Ok(_) => self.inner.latency[op as usize].observe_since(start),
            Err(e) => {
                if let Some(k) = error_kind(e) {
                    self.inner.errors[k].inc();
                }
            }
        }
    }

    pub(crate) fn read(&self, bytes: u64) {
        self.inner.read_bytes.inc_by(bytes);
    }

    pub(crate) fn written(&self, bytes: u64) {
        self.inner.written_bytes.inc_by(bytes);
    }

    /// A chunk replica of `size` bytes appeared (`sign` 1) or went (-1).
    pub(crate) fn chunk(&self, size: u64, sign: i64) {
        self.inner.allocated_bytes.inc_by(sign * i64::try_from(size).unwrap_or(i64::MAX));
        self.inner.chunks.inc_by(sign);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds_inclusive() {
        let h = LatencyHistogram::new([0.001, 0.002, 0.004]);
        for us in [1, 1000, 1001, 2000, 3999, 4001, 10_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let counts: Vec<u64> = h.inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        // <= 1 ms: 1 µs and 1000 µs; <= 2 ms: 1001, 2000; <= 4 ms: 3999; +Inf: 4001 µs and 10 s.
        assert_eq!(counts, vec![2, 2, 1, 2]);
        assert_eq!(h.count(), 7);
        assert_eq!(h.sum(), Duration::from_micros(1 + 1000 + 1001 + 2000 + 3999 + 4001 + 10_000_000));
    }

    #[test]
    fn histogram_encodes_cumulative_buckets_in_seconds() {
        let mut registry = ballast_metrics::registry();
        let h = LatencyHistogram::new([0.001, 0.002]);
        ballast_metrics::ballast(&mut registry).register_with_unit("t", "test", Unit::Seconds, h.clone());
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_micros(1500));
        h.observe(Duration::from_secs(3));
        let text = ballast_metrics::encode(&registry);
        for line in [
            "# TYPE ballast_t_seconds histogram",
            "ballast_t_seconds_count 3",
            "ballast_t_seconds_sum 3.002",
            "ballast_t_seconds_bucket{le=\"0.001\"} 1",
            "ballast_t_seconds_bucket{le=\"0.002\"} 2",
            "ballast_t_seconds_bucket{le=\"+Inf\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
    }

    #[test]
    fn io_buckets_match_the_process_convention() {
        let h = LatencyHistogram::io();
        let want: Vec<f64> = ballast_metrics::io_latency_buckets().collect();
        assert_eq!(&*h.inner.bounds, &want[..]);
        assert_eq!(h.inner.bounds_ns[0], 16_000);
        h.observe(Duration::from_nanos(16_000));
        h.observe(Duration::from_nanos(16_001));
        assert_eq!(h.inner.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.inner.buckets[1].load(Ordering::Relaxed), 1);
    }
}
