//! A closed-loop load generator for in-process targets (the chunk store, the
//! replica client): `qd` tasks each issue one I/O at a time for a fixed duration;
//! every completion's latency is recorded, percentiles computed from the sorted
//! samples. Offsets are uniformly random block-aligned (random workloads) or a
//! shared sequential cursor (sequential ones), like fio's.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::fio::{Measured, Workload};

/// Runs `op(offset)` with `w.qd` in flight over `[0, span)` for `secs`, after a
/// one-second warm-up that is not measured.
pub async fn run<F, Fut, E>(w: &Workload, span: u64, secs: u64, op: F) -> Result<Measured, E>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Send + 'static + std::fmt::Debug,
{
    let blocks = span / u64::from(w.bs);
    let cursor = Arc::new(AtomicU64::new(0));
    let sequential = !w.rw.starts_with("rand");
    let warm_until = Instant::now() + Duration::from_secs(1);
    let end = warm_until + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for t in 0..w.qd {
        let op = op.clone();
        let cursor = cursor.clone();
        let bs = u64::from(w.bs);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(t) + 1);
            let mut lat = Vec::with_capacity(1 << 16);
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let blk =
                    if sequential { cursor.fetch_add(1, Ordering::Relaxed) % blocks } else { rng.gen_range(0..blocks) };
                op(blk * bs).await?;
                if now >= warm_until {
                    lat.push(now.elapsed().as_nanos() as u64);
                }
            }
            Ok::<_, E>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task panicked")?);
    }
    all.sort_unstable();
    let n = all.len().max(1) as f64;
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0) as f64
            / 1000.0
    };
    let iops = n / secs as f64;
    Ok(Measured { iops, mib_s: iops * f64::from(w.bs) / (1 << 20) as f64, p50_us: pct(0.50), p99_us: pct(0.99) })
}
