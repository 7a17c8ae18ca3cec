//! Prometheus metrics of a storage node's agent: its disk's health and space,
//! its heartbeats, and the copy jobs it runs. (The chunk store's own
//! operations are `ballast_chunkstore_*`, see
//! [`ballast_chunkstore::StoreMetrics`].)
//!
//! [`NodeMetrics::register`] registers the families once per process and is
//! handed to the agent through [`crate::AgentConfig::metrics`]; the agent makes
//! the series of its node (label `node`: the node id) when it starts.
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `ballast_node_disk_health` | gauge | `node`, `state` (ok, full, failed): 1 for the disk probe's current verdict, 0 for the others |
//! | `ballast_node_disk_capacity_bytes` | gauge | `node`: the capacity registered with meta |
//! | `ballast_node_disk_free_bytes`, `ballast_node_disk_used_bytes` | gauge | `node`: the filesystem's free (for unprivileged writers) and used bytes, as the last probe saw them |
//! | `ballast_node_disk_allocated_bytes` | gauge | `node`: the sizes of the chunk replicas on the disk, summed (what the heartbeat reports) |
//! | `ballast_node_heartbeats_total` | counter | `node`, `result` (ok, failed) |
//! | `ballast_node_copy_jobs_running` | gauge | `node` |
//! | `ballast_node_copy_jobs_total` | counter | `node`, `result` (done, failed) |
//! | `ballast_node_copy_bytes_total` | counter | `node`: data bytes copied into this node's replicas |
//! | `ballast_node_copy_throttle_waits_total`, `ballast_node_copy_throttle_wait_seconds_total` | counter | `node`: copies the copy throttle held up, and for how long (summed over a job's concurrent batches) |

use std::sync::Arc;
use std::time::Duration;

use ballast_metrics::prometheus_client::metrics::counter::Counter as GenericCounter;
use ballast_metrics::prometheus_client::registry::Unit;
use ballast_metrics::{Counter, Family, Gauge, Registry};
use ballast_resync::ResyncStats;

use crate::disk::{DiskReport, DiskVerdict};

type Labels = Vec<(&'static str, String)>;
/// A counter of seconds.
type Seconds = GenericCounter<f64, std::sync::atomic::AtomicU64>;

const STATES: [&str; 3] = ["ok", "full", "failed"];

/// The agent's metric families (one registration per process; cheap to
/// clone). See the module docs for the names.
#[derive(Clone)]
pub struct NodeMetrics {
    families: Arc<Families>,
}

struct Families {
    disk_health: Family<Labels, Gauge>,
    capacity: Family<Labels, Gauge>,
    free: Family<Labels, Gauge>,
    used: Family<Labels, Gauge>,
    allocated: Family<Labels, Gauge>,
    heartbeats: Family<Labels, Counter>,
    jobs_running: Family<Labels, Gauge>,
    jobs: Family<Labels, Counter>,
    copy_bytes: Family<Labels, Counter>,
    throttle_waits: Family<Labels, Counter>,
    throttle_wait: Family<Labels, Seconds>,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

impl NodeMetrics {
    /// Registers the families in the process's `registry` (its root: the names
    /// get the `ballast_node_` prefix here). Call once per registry.
    pub fn register(registry: &mut Registry) -> NodeMetrics {
        let f = Families {
            disk_health: Family::default(),
            capacity: Family::default(),
            free: Family::default(),
            used: Family::default(),
            allocated: Family::default(),
            heartbeats: Family::default(),
            jobs_running: Family::default(),
            jobs: Family::default(),
            copy_bytes: Family::default(),
            throttle_waits: Family::default(),
            throttle_wait: Family::default(),
        };
        let r = ballast_metrics::ballast(registry).sub_registry_with_prefix("node");
        r.register(
            "disk_health",
            "The disk probe's verdict: 1 for the current state (ok, full, failed), 0 for the others",
            f.disk_health.clone(),
        );
        r.register_with_unit("disk_capacity", "Disk capacity registered with meta", Unit::Bytes, f.capacity.clone());
        r.register_with_unit(
            "disk_free",
            "Free bytes of the disk's filesystem (for unprivileged writers), at the last probe",
            Unit::Bytes,
            f.free.clone(),
        );
        r.register_with_unit(
            "disk_used",
            "Used bytes of the disk's filesystem, at the last probe",
            Unit::Bytes,
            f.used.clone(),
        );
        r.register_with_unit(
            "disk_allocated",
            "Sizes of the chunk replicas on the disk, summed (thin: what they may grow to)",
            Unit::Bytes,
            f.allocated.clone(),
        );
        r.register("heartbeats", "Heartbeats sent to meta, by result", f.heartbeats.clone());
        r.register("copy_jobs_running", "Copy jobs (rebuild, resync) running on this node", f.jobs_running.clone());
        r.register("copy_jobs", "Copy jobs finished, by result", f.jobs.clone());
        r.register_with_unit(
            "copy",
            "Data bytes copied into this node's replicas by copy jobs",
            Unit::Bytes,
            f.copy_bytes.clone(),
        );
        r.register("copy_throttle_waits", "Copies the copy throttle held up", f.throttle_waits.clone());
        r.register_with_unit(
            "copy_throttle_wait",
            "Time copies were held up by the copy throttle (summed over a job's concurrent batches)",
            Unit::Seconds,
            f.throttle_wait.clone(),
        );
        NodeMetrics { families: Arc::new(f) }
    }

    /// The series of node `id` (made at zero if new, shared if they exist).
    pub fn node(&self, id: u64) -> NodeSeries {
        let f = &self.families;
        let node: Labels = vec![("node", id.to_string())];
        let with = |k: &'static str, v: &str| {
            let mut l = node.clone();
            l.push((k, v.to_string()));
            l
        };
        NodeSeries {
            inner: Arc::new(Series {
                health: STATES.iter().map(|s| f.disk_health.get_or_create_owned(&with("state", s))).collect(),
                capacity: f.capacity.get_or_create_owned(&node),
                free: f.free.get_or_create_owned(&node),
                used: f.used.get_or_create_owned(&node),
                allocated: f.allocated.get_or_create_owned(&node),
                heartbeats_ok: f.heartbeats.get_or_create_owned(&with("result", "ok")),
                heartbeats_failed: f.heartbeats.get_or_create_owned(&with("result", "failed")),
                jobs_running: f.jobs_running.get_or_create_owned(&node),
                jobs_done: f.jobs.get_or_create_owned(&with("result", "done")),
                jobs_failed: f.jobs.get_or_create_owned(&with("result", "failed")),
                copy_bytes: f.copy_bytes.get_or_create_owned(&node),
                throttle_waits: f.throttle_waits.get_or_create_owned(&node),
                throttle_wait: f.throttle_wait.get_or_create_owned(&node),
            }),
        }
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One node's series ([`NodeMetrics::node`]). Cheap to clone.
#[derive(Clone)]
pub struct NodeSeries {
    inner: Arc<Series>,
}

struct Series {
    /// Index: position in `STATES`.
    health: Vec<Gauge>,
    capacity: Gauge,
    free: Gauge,
    used: Gauge,
    allocated: Gauge,
    heartbeats_ok: Counter,
    heartbeats_failed: Counter,
    jobs_running: Gauge,
    jobs_done: Counter,
    jobs_failed: Counter,
    copy_bytes: Counter,
    throttle_waits: Counter,
    throttle_wait: Seconds,
}

impl NodeSeries {
    pub(crate) fn capacity(&self, bytes: u64) {
        self.inner.capacity.set(gauge(bytes));
    }

    /// What a heartbeat carries: the disk's verdict and space, the replicas' sizes.
    pub(crate) fn disk(&self, report: &DiskReport, allocated: u64) {
        let s = &self.inner;
        let state = match report.verdict {
            DiskVerdict::Ok => 0,
            DiskVerdict::Full => 1,
            DiskVerdict::Failed(_) => 2,
        };
        for (i, g) in s.health.iter().enumerate() {
            g.set(i64::from(i == state));
        }
        s.free.set(gauge(report.free_bytes));
        if report.total_bytes > 0 {
            s.used.set(gauge(report.total_bytes.saturating_sub(report.free_bytes)));
        }
        s.allocated.set(gauge(allocated));
    }

    pub(crate) fn heartbeat(&self, ok: bool) {
        if ok { &self.inner.heartbeats_ok } else { &self.inner.heartbeats_failed }.inc();
    }

    /// A copy job starts: running until the returned guard is dropped.
    pub(crate) fn job(&self) -> JobMetrics {
        self.inner.jobs_running.inc();
        JobMetrics { series: self.clone(), seen: ResyncStats::default() }
    }
}

/// One running copy job's metrics (see [`NodeSeries::job`]).
pub(crate) struct JobMetrics {
    series: NodeSeries,
    /// What the current copy attempt had reported when last seen.
    seen: ResyncStats,
}

impl JobMetrics {
    /// A copy from a new source starts: its stats count from zero.
    pub(crate) fn attempt(&mut self) {
        self.seen = ResyncStats::default();
    }

    /// The attempt's totals so far: what is new since the last call is counted.
    pub(crate) fn progress(&mut self, total: &ResyncStats) {
        let s = &self.series.inner;
        s.copy_bytes.inc_by(total.bytes_copied.saturating_sub(self.seen.bytes_copied));
        s.throttle_waits.inc_by(total.throttle_waits.saturating_sub(self.seen.throttle_waits));
        let waited = total.throttled.saturating_sub(self.seen.throttled);
        if waited > Duration::ZERO {
            s.throttle_wait.inc_by(waited.as_secs_f64());
        }
        self.seen = *total;
    }

    pub(crate) fn finished(self, done: bool) {
        if done { &self.series.inner.jobs_done } else { &self.series.inner.jobs_failed }.inc();
    }
}

impl Drop for JobMetrics {
    fn drop(&mut self) {
        self.series.inner.jobs_running.dec();
    }
}
