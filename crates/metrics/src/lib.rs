//! Prometheus metrics, the same way in every Ballast process.
//!
//! Each process builds one [`Registry`] at start ([`registry`], which also carries
//! the standard `process_*` metrics). Each component registers its metric families
//! under the `ballast` prefix ([`ballast`]; the `register` functions live in the
//! crates that record them) and keeps cheap handles. The binary serves
//! [`encode`]'s output on `/metrics` (`--metrics-listen ADDR`).
//!
//! Two kinds of handle, by how often they are updated:
//! - the control plane's (heartbeats, copy jobs, Raft, CSI calls): prometheus-
//!   client's `Counter` and `Gauge` (one atomic each) and `Histogram` (a mutex);
//! - the I/O path's, updated per request by every thread serving requests:
//!   [`ShardedCounter`], [`InFlightGauge`] and [`LatencyHistogram`]
//!   ([`sharded`]), one uncontended atomic add per update, summed at scrape.
//!
//! Conventions (Prometheus naming):
//! - base units in the name: `_seconds`, `_bytes`; counters end in `_total`
//!   (prometheus-client appends it to counters);
//! - labels are bounded: a volume name, a node id, an operation, an error kind, a
//!   gRPC method and code. Never a chunk, a block or a request id;
//! - a family whose label set goes away (a volume detached) removes that series
//!   ([`prometheus_client::metrics::family::Family::remove`]), so a scrape shows
//!   what exists now.

mod process;
pub mod sharded;

pub use process::{parse_stat, ProcStat, ProcessCollector};
pub use prometheus_client;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;
pub use sharded::{InFlightGauge, LatencyHistogram, ShardedCounter};

/// The prefix of every Ballast metric name.
pub const PREFIX: &str = "ballast";

/// The content type of [`encode`]'s output (OpenMetrics text; Prometheus and
/// `promtool check metrics` read it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A new registry for one process, with the standard `process_*` metrics
/// ([`ProcessCollector`]). Components register under [`PREFIX`] through
/// [`ballast`].
pub fn registry() -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ProcessCollector));
    r
}

/// The part of `registry` whose names start with `ballast_`: what components
/// register into.
pub fn ballast(registry: &mut Registry) -> &mut Registry {
    registry.sub_registry_with_prefix(PREFIX)
}

/// Bucket bounds for I/O latencies in seconds: 16 µs to about 8.4 s, doubling
/// (NVMe reads through a replica are tens of µs; a write stalled on an eject or
/// a flush on a busy disk is seconds).
pub fn io_latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(16e-6, 2.0, 20)
}

/// Bucket bounds for control-plane calls in seconds: 100 µs to about 13 s
/// (a Raft commit on loopback is ~1 ms; a leader election is seconds).
pub fn rpc_latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1e-4, 2.0, 18)
}

/// A histogram with [`io_latency_buckets`] (for `Family::new_with_constructor`).
pub fn io_latency_histogram() -> Histogram {
    Histogram::new(io_latency_buckets())
}

/// A histogram with [`rpc_latency_buckets`].
pub fn rpc_latency_histogram() -> Histogram {
    Histogram::new(rpc_latency_buckets())
}

/// The content type of [`encode_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry in the classic Prometheus text format (0.0.4): what `/metrics`
/// answers a client that does not ask for OpenMetrics (curl, `promtool check
/// metrics`, older scrapers).
pub fn encode_prometheus(registry: &Registry) -> String {
    let mut out = String::new();
    // As in `encode`: writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// The registry as OpenMetrics text (what `/metrics` answers a scraper that
/// asks for it, as Prometheus does).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an error here would be a bug in a
    // metric's encoder, and a scrape is better partial than absent.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_and_counters_end_in_total() {
        let mut root = registry();
        let r = ballast(&mut root);
        let c = Counter::<u64>::default();
        r.register("frontend_writes", "Writes completed", c.clone());
        c.inc_by(3);
        let h = io_latency_histogram();
        r.register_with_unit(
            "frontend_write_latency",
            "Write latency",
            prometheus_client::registry::Unit::Seconds,
            h.clone(),
        );
        h.observe(0.001);
        let text = encode(&root);
        assert!(text.contains("ballast_frontend_writes_total 3"), "{text}");
        assert!(text.contains("ballast_frontend_write_latency_seconds_count 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        let classic = encode_prometheus(&root);
        assert!(classic.contains("# TYPE ballast_frontend_writes_total counter"), "{classic}");
        assert!(classic.contains("ballast_frontend_writes_total 3"), "{classic}");
        assert!(!classic.contains("# EOF"), "{classic}");
    }

    #[test]
    fn buckets_cover_microseconds_to_seconds() {
        let io: Vec<f64> = io_latency_buckets().collect();
        assert_eq!(io.len(), 20);
        assert!(io[0] <= 20e-6 && *io.last().unwrap() > 5.0, "{io:?}");
        let rpc: Vec<f64> = rpc_latency_buckets().collect();
        assert!(rpc[0] <= 1e-4 && *rpc.last().unwrap() > 10.0, "{rpc:?}");
    }
}
