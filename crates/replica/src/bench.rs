//! A load generator through [`ReplicaClient`]: fixed queue depth, fixed block
//! size, for a fixed time; reports IOPS, throughput and latency percentiles.
//! Behind the `bench` feature; `examples/replica_bench.rs` is its command line.
//!
//! ```text
//!  qd workers ──(one request each in flight)──► ReplicaClient ══ TCP ══► server
//!     └─ per-op latency samples ─► merged, sorted ─► p50 / p99
//! ```

use std::time::{Duration, Instant};

use ballast_types::{ChunkId, Epoch, Seq, BLOCK_SIZE_U64};
use bytes::Bytes;

use crate::{ClientError, ReplicaClient};

/// The access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    RandWrite,
    RandRead,
    SeqWrite,
    SeqRead,
}

impl Pattern {
    /// Parses fio's names: randwrite, randread, write, read.
    pub fn parse(s: &str) -> Option<Pattern> {
        match s {
            "randwrite" => Some(Pattern::RandWrite),
            "randread" => Some(Pattern::RandRead),
            "write" => Some(Pattern::SeqWrite),
            "read" => Some(Pattern::SeqRead),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandWrite => "randwrite",
            Pattern::RandRead => "randread",
            Pattern::SeqWrite => "write",
            Pattern::SeqRead => "read",
        }
    }

    fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }
}

/// One run's parameters. The chunk must exist, be `chunk_size` bytes, and
/// `epoch` must be announced for its volume.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub pattern: Pattern,
    /// Bytes per request; a multiple of the block size.
    pub bs: u32,
    /// Requests kept in flight.
    pub qd: usize,
    pub duration: Duration,
    pub chunk: ChunkId,
    pub chunk_size: u64,
    pub epoch: Epoch,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub iops: f64,
    pub mib_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl BenchResult {
    /// One JSON object on one line (no serde needed for flat numbers).
    pub fn to_json(&self, spec: &BenchSpec) -> String {
        format!(
            "{{\"rw\":\"{}\",\"bs\":{},\"qd\":{},\"seconds\":{:.3},\"ops\":{},\"iops\":{:.0},\"mib_s\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1}}}",
            spec.pattern.name(),
            spec.bs,
            spec.qd,
            self.elapsed.as_secs_f64(),
            self.ops,
            self.iops,
            self.mib_per_s,
            self.p50_us,
            self.p99_us
        )
    }
}

/// Runs the load; the first failed request stops the run and is returned.
pub async fn run(client: &ReplicaClient, spec: &BenchSpec) -> Result<BenchResult, ClientError> {
    let slots = (spec.chunk_size / u64::from(spec.bs)).max(1);
    let data = Bytes::from(vec![0xa5u8; spec.bs as usize]);
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut workers = Vec::with_capacity(spec.qd);
    for w in 0..spec.qd.max(1) {
        let client = client.clone();
        let spec = spec.clone();
        let data = data.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut rng =
                0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            // Sequential workers stride through the chunk interleaved.
            let mut next = w as u64;
            let mut counter = (w as u64) << 40;
            while Instant::now() < deadline {
                let slot = match spec.pattern {
                    Pattern::RandWrite | Pattern::RandRead => {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % slots
                    }
                    Pattern::SeqWrite | Pattern::SeqRead => {
                        let s = next % slots;
                        next += spec.qd as u64;
                        s
                    }
                };
                let offset = slot * u64::from(spec.bs);
                let t = Instant::now();
                if spec.pattern.is_write() {
                    counter += 1;
                    client
                        .write(
                            spec.chunk,
                            offset,
                            data.clone(),
                            Seq::new(spec.epoch, counter),
                            false,
                        )
                        .await?;
                } else {
                    client.read(spec.chunk, offset, spec.bs, spec.epoch).await?;
                }
                lat.push(t.elapsed().as_nanos() as u64);
            }
            Ok::<_, ClientError>(lat)
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        match w.await {
            Ok(r) => all.extend(r?),
            Err(_) => return Err(ClientError::Disconnected),
        }
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i] as f64 / 1000.0
    };
    let ops = all.len() as u64;
    let bytes = ops * u64::from(spec.bs);
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(BenchResult {
        ops,
        bytes,
        elapsed,
        iops: ops as f64 / secs,
        mib_per_s: bytes as f64 / secs / f64::from(1u32 << 20),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

/// Writes the whole chunk once in 1 MiB requests, so reads hit real data.
pub async fn prefill(
    client: &ReplicaClient,
    chunk: ChunkId,
    chunk_size: u64,
    epoch: Epoch,
) -> Result<(), ClientError> {
    let step = (1u64 << 20).min(chunk_size) / BLOCK_SIZE_U64 * BLOCK_SIZE_U64;
    let data = Bytes::from(vec![0x5au8; step as usize]);
    let mut off = 0;
    let mut counter = 1u64 << 62;
    while off + step <= chunk_size {
        counter += 1;
        client
            .write(chunk, off, data.clone(), Seq::new(epoch, counter), false)
            .await?;
        off += step;
    }
    client.flush_chunk(chunk, epoch).await
}
