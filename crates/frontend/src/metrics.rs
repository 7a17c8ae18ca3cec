//! Prometheus metrics of the attached volumes.
//!
//! [`VolumeMetrics::register`] registers the families once per process and is
//! handed to every attach through [`crate::VolumeOptions::metrics`]; the attach
//! makes the volume's series (label `volume`: its name), and closing the volume
//! (or dropping it) removes them. Everything the I/O path touches is resolved
//! at attach: a request costs its in-flight gauges (started, then finished),
//! its latency bucket and sum, and its bytes counter: seven relaxed atomic adds
//! on the thread's own shard ([`ballast_metrics::sharded`]), with no lock, no
//! allocation and no cache line shared with another thread. The counters below
//! are the same atomics [`crate::Volume::stats`] reads: nothing is counted twice.
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `ballast_frontend_io_latency_seconds` | histogram | `volume`, `op` (read, write, flush, trim, write_zeroes): requests that succeeded |
//! | `ballast_frontend_read_bytes_total`, `ballast_frontend_written_bytes_total` | counter | `volume` |
//! | `ballast_frontend_inflight_requests`, `ballast_frontend_inflight_bytes` | gauge | `volume` (payload bytes of reads and writes being served) |
//! | `ballast_frontend_errors_total` | counter | `volume`, `op`, `kind` (out_of_range, misaligned, too_large, no_space, io, read_only, shutdown: what the client was answered) |
//! | `ballast_frontend_ejections_total` | counter | `volume`: replicas removed from a chunk's set |
//! | `ballast_frontend_read_repairs_total` | counter | `volume`: pieces a read found corrupt and rewrote |
//! | `ballast_frontend_reconciled_blocks_total` | counter | `volume`: blocks copied by attach's reconciliation |
//! | `ballast_frontend_scrub_passes_total`, `ballast_frontend_scrub_read_bytes_total` | counter | `volume` |
//! | `ballast_frontend_scrub_corrupt_pieces_total`, `..._repaired_pieces_total`, `..._unrepairable_pieces_total` | counter | `volume`: piece copies (one scrub read of up to 1 MiB on one replica) that failed their checksum, were rewritten from a verified copy, or were left as they were |
//! | `ballast_frontend_layout_generation` | gauge | `volume`: the layout generation installed (set by whoever knows it, [`crate::Volume::set_layout_generation`]) |
//! | `ballast_frontend_epoch`, `ballast_frontend_size_bytes` | gauge | `volume` |

use std::sync::Arc;
use std::time::Instant;

use ballast_blockdev::BlockError;
use ballast_metrics::prometheus_client::registry::Unit;
use ballast_metrics::{Counter, Family, Gauge, InFlightGauge, LatencyHistogram, Registry, ShardedCounter};

type Labels = Vec<(&'static str, String)>;

/// A client request, as the `op` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoOp {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

const OPS: [&str; 5] = ["read", "write", "flush", "trim", "write_zeroes"];

/// [`BlockError`] variants, as the `kind` label names them.
const KINDS: [&str; 7] = ["out_of_range", "misaligned", "too_large", "no_space", "io", "read_only", "shutdown"];

fn kind(e: &BlockError) -> usize {
    match e {
        BlockError::OutOfRange { .. } => 0,
        BlockError::Misaligned { .. } => 1,
        BlockError::TooLarge { .. } => 2,
        BlockError::NoSpace(_) => 3,
        BlockError::Io(_) => 4,
        BlockError::ReadOnly => 5,
        BlockError::Shutdown => 6,
    }
}

/// The per-volume counters: (name, help, unit). Index = the `C_*` constants.
const COUNTERS: [(&str, &str, Option<Unit>); 10] = [
    ("read", "Bytes read by clients", Some(Unit::Bytes)),
    ("written", "Bytes written by clients", Some(Unit::Bytes)),
    ("ejections", "Replicas ejected from a chunk's replica set", None),
    ("read_repairs", "Pieces a read found corrupt on a replica and rewrote from a verified copy", None),
    ("reconciled_blocks", "Blocks copied between replicas by attach's reconciliation of dirty chunks", None),
    ("scrub_passes", "Scrub passes completed", None),
    ("scrub_read", "Bytes the scrub read from replicas (every in-sync copy counts)", Some(Unit::Bytes)),
    ("scrub_corrupt_pieces", "Piece copies the scrub found failing their checksum", None),
    ("scrub_repaired_pieces", "Corrupt piece copies the scrub rewrote from a verified copy", None),
    (
        "scrub_unrepairable_pieces",
        "Corrupt piece copies the scrub left as they were (no verified copy, or the rewrite failed)",
        None,
    ),
];
pub(crate) const C_READ_BYTES: usize = 0;
pub(crate) const C_WRITTEN_BYTES: usize = 1;
pub(crate) const C_EJECTIONS: usize = 2;
pub(crate) const C_READ_REPAIRS: usize = 3;
pub(crate) const C_RECONCILED: usize = 4;
pub(crate) const C_SCRUB_PASSES: usize = 5;
pub(crate) const C_SCRUB_BYTES: usize = 6;
pub(crate) const C_SCRUB_CORRUPT: usize = 7;
pub(crate) const C_SCRUB_REPAIRED: usize = 8;
pub(crate) const C_SCRUB_UNREPAIRABLE: usize = 9;

/// The per-volume in-flight gauges: (name, help, unit).
const INFLIGHT: [(&str, &str, Option<Unit>); 2] = [
    ("inflight_requests", "Client requests being served", None),
    ("inflight", "Payload bytes of the reads and writes being served", Some(Unit::Bytes)),
];
const I_REQUESTS: usize = 0;
const I_BYTES: usize = 1;

/// The per-volume gauges: (name, help, unit).
const GAUGES: [(&str, &str, Option<Unit>); 3] = [
    ("layout_generation", "Layout generation the front end writes with", None),
    ("epoch", "Attach epoch of this front end", None),
    ("size", "Volume size served", Some(Unit::Bytes)),
];
const G_LAYOUT_GENERATION: usize = 0;
const G_EPOCH: usize = 1;
const G_SIZE: usize = 2;

/// The front end's metric families (one registration per process; cheap to
/// clone). See the module docs for the names.
#[derive(Clone)]
pub struct VolumeMetrics {
    families: Arc<Families>,
}

struct Families {
    latency: Family<Labels, LatencyHistogram>,
    errors: Family<Labels, Counter>,
    counters: Vec<Family<Labels, ShardedCounter>>,
    inflight: Vec<Family<Labels, InFlightGauge>>,
    gauges: Vec<Family<Labels, Gauge>>,
}

impl std::fmt::Debug for VolumeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeMetrics").finish_non_exhaustive()
    }
}

impl VolumeMetrics {
    /// Registers the families in the process's `registry` (its root: the names
    /// get the `ballast_frontend_` prefix here). Call once per registry.
    pub fn register(registry: &mut Registry) -> VolumeMetrics {
        let families = Families {
            latency: Family::default(),
            errors: Family::default(),
            counters: COUNTERS.iter().map(|_| Family::default()).collect(),
            inflight: INFLIGHT.iter().map(|_| Family::default()).collect(),
            gauges: GAUGES.iter().map(|_| Family::default()).collect(),
        };
        let r = ballast_metrics::ballast(registry).sub_registry_with_prefix("frontend");
        r.register_with_unit(
            "io_latency",
            "Latency of client requests that succeeded, by operation",
            Unit::Seconds,
            families.latency.clone(),
        );
        r.register("errors", "Client requests answered with an error, by operation and kind", families.errors.clone());
        for ((name, help, unit), family) in COUNTERS.iter().zip(&families.counters) {
            match unit {
                Some(u) => r.register_with_unit(*name, *help, u.clone(), family.clone()),
                None => r.register(*name, *help, family.clone()),
            }
        }
        for ((name, help, unit), family) in INFLIGHT.iter().zip(&families.inflight) {
            match unit {
                Some(u) => r.register_with_unit(*name, *help, u.clone(), family.clone()),
                None => r.register(*name, *help, family.clone()),
            }
        }
        for ((name, help, unit), family) in GAUGES.iter().zip(&families.gauges) {
            match unit {
                Some(u) => r.register_with_unit(*name, *help, u.clone(), family.clone()),
                None => r.register(*name, *help, family.clone()),
            }
        }
        VolumeMetrics { families: Arc::new(families) }
    }

    /// Makes the series of volume `name`, all at zero. A volume of that name
    /// whose series exist already (another attachment in this process, about
    /// to be fenced) keeps recording into its own, no longer exported.
    pub fn volume(&self, name: &str) -> VolumeSeries {
        let f = &self.families;
        let volume: Labels = vec![("volume", name.to_string())];
        let with = |more: &[(&'static str, &str)]| {
            let mut l = volume.clone();
            l.extend(more.iter().map(|(k, v)| (*k, v.to_string())));
            l
        };
        let latency_labels: Vec<Labels> = OPS.iter().map(|op| with(&[("op", op)])).collect();
        let error_labels: Vec<Vec<Labels>> =
            OPS.iter().map(|op| KINDS.iter().map(|k| with(&[("op", op), ("kind", k)])).collect()).collect();
        let series = VolumeSeries {
            families: self.families.clone(),
            latency: Vec::new(),
            errors: Vec::new(),
            counters: Vec::new(),
            inflight: Vec::new(),
            gauges: Vec::new(),
            volume,
            latency_labels,
            error_labels,
        };
        series.remove_labels();
        VolumeSeries {
            latency: series.latency_labels.iter().map(|l| f.latency.get_or_create_owned(l)).collect(),
            errors: series
                .error_labels
                .iter()
                .map(|per_op| per_op.iter().map(|l| f.errors.get_or_create_owned(l)).collect())
                .collect(),
            counters: f.counters.iter().map(|c| c.get_or_create_owned(&series.volume)).collect(),
            inflight: f.inflight.iter().map(|g| g.get_or_create_owned(&series.volume)).collect(),
            gauges: f.gauges.iter().map(|g| g.get_or_create_owned(&series.volume)).collect(),
            ..series
        }
    }
}

/// One attached volume's series ([`VolumeMetrics::volume`]), each handle
/// resolved once.
pub struct VolumeSeries {
    families: Arc<Families>,
    /// Index: `IoOp as usize`.
    latency: Vec<LatencyHistogram>,
    /// Index: `[IoOp as usize][kind]`.
    errors: Vec<Vec<Counter>>,
    /// Index: the `C_*` constants.
    counters: Vec<ShardedCounter>,
    /// Index: the `I_*` constants.
    inflight: Vec<InFlightGauge>,
    /// Index: the `G_*` constants.
    gauges: Vec<Gauge>,
    volume: Labels,
    latency_labels: Vec<Labels>,
    error_labels: Vec<Vec<Labels>>,
}

impl std::fmt::Debug for VolumeSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeSeries").field("labels", &self.volume).finish_non_exhaustive()
    }
}

impl VolumeSeries {
    /// Removes the volume's series from the families (the volume detached),
    /// unless they were made anew since by another attachment of the volume.
    pub fn remove(&self) {
        let f = &self.families;
        let Some(mine) = self.counters.get(C_READ_BYTES) else { return };
        let ours = f.counters[C_READ_BYTES].get(&self.volume).is_some_and(|c| c.same_as(mine));
        if ours {
            self.remove_labels();
        }
    }

    fn remove_labels(&self) {
        let f = &self.families;
        for l in &self.latency_labels {
            f.latency.remove(l);
        }
        for l in self.error_labels.iter().flatten() {
            f.errors.remove(l);
        }
        for c in &f.counters {
            c.remove(&self.volume);
        }
        for g in &f.inflight {
            g.remove(&self.volume);
        }
        for g in &f.gauges {
            g.remove(&self.volume);
        }
    }

    /// The counter `C_*` (shared with the volume's stats).
    pub(crate) fn counter(&self, i: usize) -> ShardedCounter {
        self.counters[i].clone()
    }

    pub(crate) fn set_layout_generation(&self, generation: u64) {
        self.gauges[G_LAYOUT_GENERATION].set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_epoch(&self, epoch: u64) {
        self.gauges[G_EPOCH].set(i64::try_from(epoch).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_size(&self, bytes: u64) {
        self.gauges[G_SIZE].set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A request of `bytes` payload starts: counted in flight until the
    /// returned guard is finished or dropped (a cancelled request too).
    pub(crate) fn begin(&self, bytes: u64) -> InFlight<'_> {
        self.inflight[I_REQUESTS].start(1);
        self.inflight[I_BYTES].start(bytes);
        InFlight { series: self, bytes, start: Instant::now() }
    }
}

/// A request in flight (see [`VolumeSeries::begin`]).
pub(crate) struct InFlight<'a> {
    series: &'a VolumeSeries,
    bytes: u64,
    start: Instant,
}

impl InFlight<'_> {
    /// The request ended with `r`: its latency if it succeeded, its error kind if not.
    pub(crate) fn done<T>(self, op: IoOp, r: &Result<T, BlockError>) {
        match r {
            Ok(_) => self.series.latency[op as usize].observe_since(self.start),
            Err(e) => {
                self.series.errors[op as usize][kind(e)].inc();
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.series.inflight[I_REQUESTS].finish(1);
        self.series.inflight[I_BYTES].finish(self.bytes);
    }
}
