//! Metrics for the I/O path: every update is one uncontended relaxed atomic add.
//!
//! prometheus-client's `Counter` and `Gauge` are one atomic each, which every
//! thread serving requests adds to: under load the cache line holding it moves
//! between cores on every request (tens of ns each, measured in
//! `benches/metrics_cost.rs`), and its `Histogram` takes a mutex per
//! observation. The types here keep one copy of their atomics per *shard*,
//! each on its own cache lines; a thread always updates the shard it was given
//! at its first update (threads are dealt shards in turn), and a scrape sums
//! the shards. A scrape is rare (seconds apart), an update is per request.
//!
//! What a scrape sees, per type:
//! - [`ShardedCounter`]: the sum of the shards, each read once. Monotonic
//!   between scrapes; it may miss an add made during the read (the next scrape
//!   has it).
//! - [`InFlightGauge`]: `started - finished`, each a sharded counter; finished
//!   is read first (Acquire, paired with the Release of each finish), so every
//!   finish counted has its start counted too and the value is never negative.
//! - [`LatencyHistogram`]: per bucket the sum over shards; `_count` is the sum
//!   of the buckets read, so a scrape is self-consistent (`_count` = the
//!   `+Inf` bucket).
//!
//! Memory: a shard is a whole number of 128-byte blocks (two cache lines:
//! adjacent-line prefetch pairs lines on x86). [`shards`] is the number of
//! shards, 2 × the CPUs rounded up to a power of two, 4 to 64: the I/O path's
//! threads (runtime workers, the io_uring thread) outnumber the CPUs.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// u64 slots per block: 16 × 8 bytes = 128 bytes.
const SLOTS: usize = 16;

/// 128 bytes of atomics, aligned so that no two blocks share a cache line
/// (or a pair of lines the prefetcher fetches together).
#[repr(align(128))]
#[derive(Default)]
struct Block([AtomicU64; SLOTS]);

/// The number of shards each sharded metric has in this process.
pub fn shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        (2 * cpus).next_power_of_two().clamp(4, 64)
    })
}

/// This thread's shard: dealt in turn at the thread's first update.
fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % shards();
    }
    SHARD.with(|s| *s)
}

/// `width` u64 slots per shard, each shard on its own blocks.
struct Slots {
    blocks: Box<[Block]>,
    /// Blocks per shard.
    stride: usize,
    width: usize,
}

impl Slots {
    fn new(width: usize) -> Slots {
        let stride = width.div_ceil(SLOTS).max(1);
        let blocks = (0..stride * shards()).map(|_| Block::default()).collect();
        Slots { blocks, stride, width }
    }

    /// Slot `i` of this thread's shard.
    #[inline]
    fn mine(&self, i: usize) -> &AtomicU64 {
        self.at(my_shard(), i)
    }

    #[inline]
    fn at(&self, shard: usize, i: usize) -> &AtomicU64 {
        debug_assert!(i < self.width);
        &self.blocks[shard * self.stride + i / SLOTS].0[i % SLOTS]
    }

    /// Slot `i` summed over the shards.
    fn sum(&self, i: usize, order: Ordering) -> u64 {
        (0..self.blocks.len() / self.stride).map(|s| self.at(s, i).load(order)).fold(0, u64::wrapping_add)
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sums = String::new();
        for i in 0..self.width {
            let _ = write!(sums, "{}{}", if i == 0 { "" } else { " " }, self.sum(i, Ordering::Relaxed));
        }
        f.debug_struct("Slots").field("width", &self.width).field("sums", &sums).finish()
    }
}

/// A counter for the I/O path (see the module docs). Cheap to clone (an
/// `Arc`); clones count into the same shards.
#[derive(Clone, Debug)]
pub struct ShardedCounter {
    slots: Arc<Slots>,
}

impl Default for ShardedCounter {
    fn default() -> Self {
        ShardedCounter { slots: Arc::new(Slots::new(1)) }
    }
}

impl ShardedCounter {
    #[inline]
    pub fn inc_by(&self, n: u64) {
        self.slots.mine(0).fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.inc_by(1)
    }

    /// The count: the sum of the shards.
    pub fn get(&self) -> u64 {
        self.slots.sum(0, Ordering::Relaxed)
    }

    /// True if both handles count into the same shards.
    pub fn same_as(&self, other: &ShardedCounter) -> bool {
        Arc::ptr_eq(&self.slots, &other.slots)
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A gauge of what is in flight (requests, bytes), for the I/O path: what
/// started minus what finished, each a sharded count (see the module docs).
/// A request may finish on another thread than it started on.
#[derive(Clone, Debug)]
pub struct InFlightGauge {
    /// Slot 0: started; slot 1: finished.
    slots: Arc<Slots>,
}

impl Default for InFlightGauge {
    fn default() -> Self {
        InFlightGauge { slots: Arc::new(Slots::new(2)) }
    }
}

impl InFlightGauge {
    /// `n` more in flight.
    #[inline]
    pub fn start(&self, n: u64) {
        self.slots.mine(0).fetch_add(n, Ordering::Relaxed);
    }

    /// `n` fewer in flight (each unit started before).
    #[inline]
    pub fn finish(&self, n: u64) {
        // Release: a scrape that counts this finish sees its start.
        self.slots.mine(1).fetch_add(n, Ordering::Release);
    }

    /// In flight now: started minus finished, finished read first.
    pub fn get(&self) -> u64 {
        let finished = self.slots.sum(1, Ordering::Acquire);
        let started = self.slots.sum(0, Ordering::Relaxed);
        started.wrapping_sub(finished).min(started)
    }
}

impl TypedMetric for InFlightGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for InFlightGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&i64::try_from(self.get()).unwrap_or(i64::MAX))
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A latency histogram for the I/O path: an observation is two relaxed adds
/// to this thread's shard (its bucket, the sum in nanoseconds). Encoded as an
/// ordinary Prometheus histogram in seconds. Cheap to clone (an `Arc`).
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds in seconds (as encoded) and in nanoseconds (as compared).
    bounds: Box<[f64]>,
    bounds_ns: Box<[u64]>,
    /// Slots 0..=bounds.len(): one bucket per bound, then `+Inf` (not
    /// cumulative); the last slot: the sum in nanoseconds.
    slots: Slots,
}

impl LatencyHistogram {
    /// A histogram with these upper bounds in seconds (ascending; a
    /// non-finite or negative bound is dropped: `+Inf` is always there).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> LatencyHistogram {
        let mut bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite() && *b >= 0.0).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let bounds_ns: Vec<u64> = bounds.iter().map(|b| (b * 1e9).round() as u64).collect();
        let slots = Slots::new(bounds.len() + 2);
        LatencyHistogram {
            inner: Arc::new(HistogramInner { bounds: bounds.into(), bounds_ns: bounds_ns.into(), slots }),
        }
    }

    /// A histogram with the I/O latency buckets of every Ballast process
    /// ([`crate::io_latency_buckets`]: 16 µs to about 8 s).
    pub fn io() -> LatencyHistogram {
        LatencyHistogram::new(crate::io_latency_buckets())
    }

    fn sum_slot(&self) -> usize {
        self.inner.bounds.len() + 1
    }

    /// Records one latency.
    #[inline]
    pub fn observe(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let i = self.inner.bounds_ns.partition_point(|&b| b < ns);
        let shard = my_shard();
        self.inner.slots.at(shard, i).fetch_add(1, Ordering::Relaxed);
        self.inner.slots.at(shard, self.sum_slot()).fetch_add(ns, Ordering::Relaxed);
    }

    /// Records the time since `start`.
    #[inline]
    pub fn observe_since(&self, start: Instant) {
        self.observe(start.elapsed())
    }

    /// Per bucket (the bounds, then `+Inf`), the observations in it: not cumulative.
    pub fn buckets(&self) -> Vec<u64> {
        (0..=self.inner.bounds.len()).map(|i| self.inner.slots.sum(i, Ordering::Relaxed)).collect()
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets().iter().sum()
    }

    /// Sum of the observations.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.inner.slots.sum(self.sum_slot(), Ordering::Relaxed))
    }

    /// The upper bounds in seconds (without `+Inf`).
    pub fn bounds(&self) -> &[f64] {
        &self.inner.bounds
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
        let buckets: Vec<(f64, u64)> =
            self.inner.bounds.iter().copied().chain(std::iter::once(f64::INFINITY)).zip(self.buckets()).collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum().as_secs_f64();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Unit;

    #[test]
    fn blocks_do_not_share_cache_lines() {
        assert_eq!(align_of::<Block>(), 128);
        assert_eq!(size_of::<Block>(), 128);
        let s = Slots::new(22);
        assert_eq!(s.stride, 2);
        let (a, b) = (s.at(0, 21) as *const _ as usize, s.at(1, 0) as *const _ as usize);
        assert!(b > a && b % 128 == 0, "{a:#x} {b:#x}");
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let (c, g, h) = (ShardedCounter::default(), InFlightGauge::default(), LatencyHistogram::new([0.001]));
        std::thread::scope(|s| {
            for t in 0..3 * shards() {
                let (c, g, h) = (&c, &g, &h);
                s.spawn(move || {
                    for i in 0..1000u64 {
                        c.inc_by(2);
                        g.start(4096);
                        h.observe(Duration::from_micros(if (i + t as u64).is_multiple_of(2) { 10 } else { 5000 }));
                        g.finish(4096);
                    }
                });
            }
        });
        let n = 3 * shards() as u64 * 1000;
        assert_eq!(c.get(), 2 * n);
        assert_eq!(g.get(), 0);
        assert_eq!(h.count(), n);
        assert_eq!(h.buckets(), vec![n / 2, n / 2]);
        assert_eq!(h.sum(), Duration::from_micros(n / 2 * 10 + n / 2 * 5000));
    }

    #[test]
    fn in_flight_may_finish_on_another_thread() {
        let g = InFlightGauge::default();
        g.start(3);
        std::thread::scope(|s| {
            s.spawn(|| g.finish(1));
        });
        assert_eq!(g.get(), 2);
        g.finish(2);
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn histogram_buckets_are_upper_bounds_inclusive() {
        let h = LatencyHistogram::new([0.004, 0.001, 0.002, f64::NAN]);
        assert_eq!(h.bounds(), &[0.001, 0.002, 0.004]);
        for us in [1, 1000, 1001, 2000, 3999, 4001, 10_000_000] {
            h.observe(Duration::from_micros(us));
        }
        // <= 1 ms: 1 µs and 1000 µs; <= 2 ms: 1001, 2000; <= 4 ms: 3999; +Inf: 4001 µs and 10 s.
        assert_eq!(h.buckets(), vec![2, 2, 1, 2]);
        assert_eq!(h.count(), 7);
        assert_eq!(h.sum(), Duration::from_micros(1 + 1000 + 1001 + 2000 + 3999 + 4001 + 10_000_000));
    }

    #[test]
    fn io_buckets_match_the_process_convention() {
        let h = LatencyHistogram::io();
        let want: Vec<f64> = crate::io_latency_buckets().collect();
        assert_eq!(h.bounds(), &want[..]);
        assert_eq!(h.inner.bounds_ns[0], 16_000);
        h.observe(Duration::from_nanos(16_000));
        h.observe(Duration::from_nanos(16_001));
        assert_eq!(&h.buckets()[..2], &[1, 1]);
    }

    #[test]
    fn encoded_as_prometheus_types() {
        let mut registry = crate::registry();
        let r = crate::ballast(&mut registry);
        let (c, g, h) = (ShardedCounter::default(), InFlightGauge::default(), LatencyHistogram::new([0.001, 0.002]));
        r.register_with_unit("t", "test", Unit::Seconds, h.clone());
        r.register_with_unit("written", "test", Unit::Bytes, c.clone());
        r.register("inflight_requests", "test", g.clone());
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_micros(1500));
        h.observe(Duration::from_secs(3));
        c.inc_by(4096);
        g.start(2);
        g.finish(1);
        let text = crate::encode(&registry);
        for line in [
            "# TYPE ballast_t_seconds histogram",
            "ballast_t_seconds_count 3",
            "ballast_t_seconds_sum 3.002",
            "ballast_t_seconds_bucket{le=\"0.001\"} 1",
            "ballast_t_seconds_bucket{le=\"0.002\"} 2",
            "ballast_t_seconds_bucket{le=\"+Inf\"} 3",
            "# TYPE ballast_written_bytes counter",
            "ballast_written_bytes_total 4096",
            "# TYPE ballast_inflight_requests gauge",
            "ballast_inflight_requests 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
    }
}
