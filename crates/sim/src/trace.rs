//! The event trace of a run: every client operation and its result, every
//! fault, every request a replica applied. Its hash is the run's fingerprint
//! (same seed, same hash); with `keep` set the lines are kept for printing.

use std::time::Duration;

/// FNV-1a over the trace lines, each prefixed with the virtual time.
#[derive(Debug)]
pub struct Trace {
    hash: u64,
    events: u64,
    keep: bool,
    lines: Vec<String>,
    start: tokio::time::Instant,
}

impl Trace {
    pub fn new(keep: bool) -> Trace {
        Trace { hash: 0xcbf2_9ce4_8422_2325, events: 0, keep, lines: Vec::new(), start: tokio::time::Instant::now() }
    }

    /// Virtual time since the run started.
    pub fn now(&self) -> Duration {
        tokio::time::Instant::now().duration_since(self.start)
    }

    pub fn event(&mut self, line: String) {
        let line = format!("{:>10.3}ms {line}", self.now().as_secs_f64() * 1000.0);
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.events += 1;
        if self.keep {
            self.lines.push(line);
        }
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// The kept lines (empty unless the trace was created with `keep`).
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// The last `n` kept lines.
    pub fn tail(&self, n: usize) -> &[String] {
        &self.lines[self.lines.len().saturating_sub(n)..]
    }
}
