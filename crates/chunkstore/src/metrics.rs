//! Prometheus metrics of one disk's chunk store.
//!
//! [`StoreMetrics::register`] registers the families once per process;
//! [`StoreMetrics::disk`] makes the series of one disk (label `node`), which
//! the store is given through [`crate::StoreOptions::metrics`]. Every handle is
//! resolved when the disk's series are made: an operation costs three relaxed
//! atomic adds on its thread's shard (its latency bucket and sum, its bytes;
//! [`ballast_metrics::sharded`]), no lock, no allocation, no shared cache line.
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

use std::sync::Arc;
use std::time::Instant;

use ballast_metrics::prometheus_client::registry::Unit;
use ballast_metrics::{Counter, Family, Gauge, LatencyHistogram, Registry, ShardedCounter};

use crate::StoreError;

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
        | StoreError::SmallFsBlocks { .. }
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
    read_bytes: Family<Labels, ShardedCounter>,
    written_bytes: Family<Labels, ShardedCounter>,
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
    read_bytes: ShardedCounter,
    written_bytes: ShardedCounter,
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
        let ours = f.read_bytes.get(&s.disk).is_some_and(|c| c.same_as(&s.read_bytes));
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

    /// A snapshot layer of `size` bytes appeared (`sign` 1) or went (-1): its
    /// chunk's allocation grows by a chunk size, the chunk count stays.
    pub(crate) fn layer(&self, size: u64, sign: i64) {
        self.inner.allocated_bytes.inc_by(sign * i64::try_from(size).unwrap_or(i64::MAX));
    }

    /// A chunk replica of `size` bytes appeared (`sign` 1) or went (-1).
    pub(crate) fn chunk(&self, size: u64, sign: i64) {
        self.inner.allocated_bytes.inc_by(sign * i64::try_from(size).unwrap_or(i64::MAX));
        self.inner.chunks.inc_by(sign);
    }
}
