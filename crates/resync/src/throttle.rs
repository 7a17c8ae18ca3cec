//! A token bucket over copied bytes, shared by a resync's batches, so that a
//! rebuild leaves the disks and the network to client I/O at a bounded rate.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Bytes per second with a burst of a tenth of a second's worth (at least
/// `min_burst`). Takers queue in order (tokio's mutex is fair); a take larger
/// than the tokens at hand goes into debt and sleeps it off while holding the
/// bucket, so the long-run rate never exceeds `rate` whatever the take sizes.
pub(crate) struct Throttle {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub(crate) fn new(bytes_per_sec: u64, min_burst: u64) -> Throttle {
        let rate = bytes_per_sec as f64;
        let burst = (rate / 10.0).max(min_burst as f64);
        Throttle { rate, burst, state: Mutex::new(Bucket { tokens: burst, last: Instant::now() }) }
    }

    /// Waits until `bytes` may be sent. Returns how long the take was held
    /// up (queued behind another taker's debt, or sleeping off its own), or
    /// None when it went straight through.
    pub(crate) async fn take(&self, bytes: u64) -> Option<Duration> {
        let start = Instant::now();
        let (mut b, mut held) = match self.state.try_lock() {
            Ok(b) => (b, false),
            Err(_) => (self.state.lock().await, true),
        };
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * self.rate).min(self.burst);
        b.last = now;
        b.tokens -= bytes as f64;
        if b.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-b.tokens / self.rate)).await;
            b.tokens = 0.0;
            b.last = Instant::now();
            held = true;
        }
        held.then(|| start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On tokio's paused clock: after the burst, 10 MB at 1 MB/s takes 10 s of
    /// (virtual) time, never less.
    #[tokio::test(start_paused = true)]
    async fn long_run_rate_is_bounded() {
        let t = Throttle::new(1_000_000, 4096);
        let start = Instant::now();
        // The burst (100 kB) goes at once.
        assert_eq!(t.take(100_000).await, None, "not held up");
        assert_eq!(start.elapsed(), Duration::ZERO);
        let mut held = Duration::ZERO;
        for _ in 0..100 {
            held += t.take(100_000).await.expect("every take after the burst waits");
        }
        let e = start.elapsed();
        assert!(e >= Duration::from_secs(10), "{e:?}");
        assert!(e < Duration::from_millis(10_100), "{e:?}");
        assert_eq!(held, e, "all of it was spent waiting");
    }

    /// A take bigger than the burst is allowed (in debt), and paid for.
    #[tokio::test(start_paused = true)]
    async fn oversized_take_goes_into_debt() {
        let t = Throttle::new(1000, 1);
        let start = Instant::now();
        t.take(100).await; // the burst
        t.take(5000).await;
        assert!(start.elapsed() >= Duration::from_secs(5));
    }
}
