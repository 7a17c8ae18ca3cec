//! A verifiable workload against a real NBD export: tasks write blocks whose
//! contents name their address and version ([`ballast_verify::pattern`]), read
//! and check them, and flush at random points, while a [`BlockModel`] ledger per
//! block remembers what was issued, acknowledged and flushed. Every read is
//! checked by the same rule as in the simulator; afterwards [`Workload::verify_all`]
//! checks every block through the front end and [`Workload::check_copy`] each
//! replica's copy on disk.
//!
//! Writes to one block never overlap (a block with a write in flight is
//! skipped), so "the last acknowledged version" is well defined. A write that
//! fails may or may not have landed; a write that never answers (the safety
//! timeout) keeps its blocks busy for good, since it may still land.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ballast_blockdev::BlockDev;
use ballast_nbd::NbdClient;
use ballast_verify::rng::SimRng;
use ballast_verify::{pattern, BlockModel};
use bytes::{Bytes, BytesMut};

use crate::{Error, Result};

pub const BS: u64 = 4096;
/// A request that has not answered after this long is abandoned (its blocks stay busy).
const OP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Counters {
    pub writes_ok: AtomicU64,
    pub writes_failed: AtomicU64,
    /// Of `writes_failed`, those answered ENOSPC (the disks are full).
    pub writes_no_space: AtomicU64,
    pub reads_ok: AtomicU64,
    pub reads_failed: AtomicU64,
    pub flushes_ok: AtomicU64,
    pub flushes_failed: AtomicU64,
    pub abandoned: AtomicU64,
    pub blocks_checked: AtomicU64,
}

struct Shared {
    ledger: Mutex<Vec<BlockModel>>,
    client: RwLock<Option<Arc<NbdClient>>>,
    stop: AtomicBool,
    paused: AtomicBool,
    inflight: AtomicU64,
    counters: Counters,
    /// (when it completed, latency) of every acknowledged write.
    latencies: Mutex<Vec<(Instant, Duration)>>,
    violations: Mutex<Vec<String>>,
}

pub struct Workload {
    rt: tokio::runtime::Handle,
    blocks: u64,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connects to an NBD unix socket, retrying for 30 s while the server comes up.
pub fn connect(rt: &tokio::runtime::Handle, sock: &Path) -> Result<Arc<NbdClient>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rt.block_on(NbdClient::connect_unix(sock, "")) {
            Ok(c) => return Ok(Arc::new(c)),
            Err(e) if Instant::now() < deadline => {
                eprintln!("workload: connect {}: {e}; retrying", sock.display());
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(source) => return Err(Error::Nbd { what: format!("workload: connect to {}", sock.display()), source }),
        }
    }
}

fn data_for(first: u64, versions: &[u64]) -> Bytes {
    let mut buf = BytesMut::with_capacity(versions.len() * BS as usize);
    for (i, v) in versions.iter().enumerate() {
        buf.extend_from_slice(&pattern::block(first + i as u64, *v));
    }
    buf.freeze()
}

impl Workload {
    /// Starts `tasks` concurrent workers over a volume of `blocks` blocks. They
    /// idle until [`Workload::set_client`] gives them an export.
    pub fn start(rt: &tokio::runtime::Handle, blocks: u64, tasks: usize, seed: u64) -> Workload {
        let shared = Arc::new(Shared {
            ledger: Mutex::new(vec![BlockModel::default(); blocks as usize]),
            client: RwLock::new(None),
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            inflight: AtomicU64::new(0),
            counters: Counters::default(),
            latencies: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
        });
        let tasks =
            (0..tasks).map(|t| rt.spawn(worker(shared.clone(), blocks, SimRng::derive(seed, t as u64 + 1)))).collect();
        Workload { rt: rt.clone(), blocks, shared, tasks }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The export the workers use from now on (`None`: they idle).
    pub fn set_client(&self, c: Option<Arc<NbdClient>>) {
        *self.shared.client.write().unwrap_or_else(|e| e.into_inner()) = c;
    }

    /// Stops issuing new operations and waits for those in flight.
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + OP_TIMEOUT + Duration::from_secs(5);
        while self.shared.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
    }

    /// Stops the workers for good.
    pub fn stop(&mut self) {
        self.pause();
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            let _ = self.rt.block_on(t);
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Acknowledged writes so far.
    pub fn acked_writes(&self) -> u64 {
        self.shared.counters.writes_ok.load(Ordering::Relaxed)
    }

    /// Every operation issued so far, failed ones included.
    pub fn ops(&self) -> u64 {
        let c = &self.shared.counters;
        [&c.writes_ok, &c.writes_failed, &c.reads_ok, &c.reads_failed, &c.flushes_ok, &c.flushes_failed]
            .iter()
            .map(|x| x.load(Ordering::Relaxed))
            .sum()
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.shared.violations).clone()
    }

    fn violation(&self, v: String) {
        eprintln!("VIOLATION: {v}");
        lock(&self.shared.violations).push(v);
    }

    /// Blocks that were ever written (acknowledged or not).
    pub fn written_blocks(&self) -> Vec<u64> {
        lock(&self.shared.ledger).iter().enumerate().filter(|(_, m)| m.issued > 0).map(|(b, _)| b as u64).collect()
    }

    /// The given quantile of acknowledged write latencies that completed in
    /// `[from, to)`, and how many there were.
    pub fn write_latency(&self, q: f64, from: Instant, to: Instant) -> (Duration, usize) {
        let mut v: Vec<Duration> =
            lock(&self.shared.latencies).iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, d)| *d).collect();
        if v.is_empty() {
            return (Duration::ZERO, 0);
        }
        v.sort();
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        (v[i], v.len())
    }

    /// Writes `n` blocks through a front end that must be fenced. Their
    /// versions are recorded as forbidden (no read may ever return them);
    /// an acknowledgement is a violation. Returns the writes attempted.
    pub fn stale_writes(&self, stale: &Arc<NbdClient>, n: u64, seed: u64) -> u64 {
        let mut rng = SimRng::derive(seed, 0x57a1e);
        let mut attempted = 0;
        for _ in 0..n {
            let b = rng.below(self.blocks);
            let v = {
                let mut l = lock(&self.shared.ledger);
                let m = &mut l[b as usize];
                if m.busy {
                    continue;
                }
                let v = m.issue();
                m.forbidden.insert(v);
                v
            };
            attempted += 1;
            let write = stale.write(b * BS, data_for(b, &[v]), true);
            let r = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), write).await });
            let mut l = lock(&self.shared.ledger);
            match r {
                Ok(Ok(())) => {
                    l[b as usize].busy = false;
                    drop(l);
                    self.violation(format!("a fenced front end acknowledged a write (block {b} version {v})"));
                }
                Ok(Err(_)) => l[b as usize].busy = false,
                // Never answered: it may still land, so the block stays busy.
                Err(_) => {}
            }
        }
        attempted
    }

    /// Reads every block through `client` and checks it against the ledger
    /// (floor: the last acknowledged version). Returns the blocks verified.
    pub fn verify_all(&self, client: &Arc<NbdClient>) -> u64 {
        let mut verified = 0;
        self.read_every_block(client, "final read", |block, data| match self.check_copy(block, data, "final read") {
            Some(v) => self.violation(v),
            None => verified += 1,
        });
        verified
    }

    /// Per block, the last acknowledged and the last issued version now. A
    /// snapshot requested after one mark and ready before a later one holds,
    /// on every block, a version from the first mark's acknowledged to the
    /// second's issued ([`Workload::verify_snapshot`]).
    pub fn mark(&self) -> Vec<(u64, u64)> {
        lock(&self.shared.ledger).iter().map(|m| (m.acked, m.issued)).collect()
    }

    /// Reads every block of a snapshot's export through `client` and checks it
    /// against the marks taken before the snapshot was requested (`before`)
    /// and once it was ready (`after`): nothing acknowledged before it
    /// missing, nothing issued after it present, never a fenced write.
    /// Returns the blocks verified and each block's version (0 where the read
    /// failed; violations are recorded).
    pub fn verify_snapshot(&self, client: &NbdClient, before: &[(u64, u64)], after: &[(u64, u64)]) -> (u64, Vec<u64>) {
        let (mut verified, mut versions) = (0, vec![0; self.blocks as usize]);
        self.read_every_block(client, "snapshot read", |block, data| {
            let b = block as usize;
            let seen = pattern::decode(block, data);
            versions[b] = seen.version().unwrap_or(0);
            let forbidden = lock(&self.shared.ledger)[b].forbidden.clone();
            let model = BlockModel { acked: before[b].0, issued: after[b].1, forbidden, ..BlockModel::default() };
            match model.check(before[b].0, &seen, "snapshot read") {
                Ok(()) => verified += 1,
                Err(e) => self.violation(format!("block {block}: {e}")),
            }
        });
        (verified, versions)
    }

    /// Reads the workload's blocks through `client`, 256 at a time, and hands
    /// each block and its data to `check`; a failed read is a violation.
    fn read_every_block(&self, client: &NbdClient, what: &str, mut check: impl FnMut(u64, &[u8])) {
        let per = 256u64;
        let mut b = 0;
        while b < self.blocks {
            let n = per.min(self.blocks - b);
            match self.rt.block_on(client.read(b * BS, (n * BS) as u32)) {
                Ok(data) => {
                    for i in 0..n {
                        check(b + i, &data[(i * BS) as usize..((i + 1) * BS) as usize]);
                    }
                }
                Err(e) => self.violation(format!("{what} of blocks {b}..+{n} failed: {e}")),
            }
            b += n;
        }
    }

    /// Checks one copy of `block` (a final read, or a replica's file on disk);
    /// returns the violation, if any.
    pub fn check_copy(&self, block: u64, data: &[u8], what: &str) -> Option<String> {
        let l = lock(&self.shared.ledger);
        let Some(m) = l.get(block as usize) else {
            return Some(format!("block {block}: outside the workload's {} blocks", self.blocks));
        };
        let seen = pattern::decode(block, data);
        m.check(m.acked, &seen, what).err().map(|e| format!("block {block}: {e}"))
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Inflight<'a>(&'a AtomicU64);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn worker(s: Arc<Shared>, blocks: u64, mut rng: SimRng) {
    while !s.stop.load(Ordering::SeqCst) {
        let client = s.client.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(client) = client.filter(|_| !s.paused.load(Ordering::SeqCst)) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        s.inflight.fetch_add(1, Ordering::SeqCst);
        let _g = Inflight(&s.inflight);
        // Re-check after counting ourselves in, so pause() never misses us.
        if s.paused.load(Ordering::SeqCst) {
            continue;
        }
        let kind = rng.below(100);
        if kind < 60 {
            write_op(&s, &client, blocks, &mut rng).await;
        } else if kind < 92 {
            read_op(&s, &client, blocks, &mut rng).await;
        } else {
            flush_op(&s, &client).await;
        }
    }
}

async fn write_op(s: &Shared, client: &NbdClient, blocks: u64, rng: &mut SimRng) {
    let count = rng.range(1, 8).min(blocks);
    let first = rng.below(blocks - count + 1);
    let fua = rng.chance(0.1);
    let versions: Vec<u64> = {
        let mut l = lock(&s.ledger);
        if (first..first + count).any(|b| l[b as usize].busy) {
            return;
        }
        (first..first + count).map(|b| l[b as usize].issue()).collect()
    };
    let t0 = Instant::now();
    let r = tokio::time::timeout(OP_TIMEOUT, client.write(first * BS, data_for(first, &versions), fua)).await;
    let ok = match r {
        Ok(Err(ballast_blockdev::BlockError::NoSpace(_))) => {
            s.counters.writes_no_space.fetch_add(1, Ordering::Relaxed);
            false
        }
        Ok(r) => r.is_ok(),
        Err(_) => {
            s.counters.abandoned.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if ok {
        lock(&s.latencies).push((Instant::now(), t0.elapsed()));
        s.counters.writes_ok.fetch_add(1, Ordering::Relaxed);
    } else {
        s.counters.writes_failed.fetch_add(1, Ordering::Relaxed);
    }
    let mut l = lock(&s.ledger);
    for (i, v) in versions.iter().enumerate() {
        l[(first + i as u64) as usize].completed(*v, ok, fua);
    }
}

async fn read_op(s: &Shared, client: &NbdClient, blocks: u64, rng: &mut SimRng) {
    let count = rng.range(1, 16).min(blocks);
    let first = rng.below(blocks - count + 1);
    let floors: Vec<u64> = lock(&s.ledger)[first as usize..(first + count) as usize].iter().map(|m| m.acked).collect();
    let r = tokio::time::timeout(OP_TIMEOUT, client.read(first * BS, (count * BS) as u32)).await;
    let Ok(Ok(data)) = r else {
        s.counters.reads_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    s.counters.reads_ok.fetch_add(1, Ordering::Relaxed);
    let l = lock(&s.ledger);
    for (i, floor) in floors.iter().enumerate() {
        let b = first + i as u64;
        let seen = pattern::decode(b, &data[i * BS as usize..(i + 1) * BS as usize]);
        s.counters.blocks_checked.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = l[b as usize].check(*floor, &seen, "read") {
            eprintln!("VIOLATION: block {b}: {e}");
            lock(&s.violations).push(format!("block {b}: {e}"));
        }
    }
}

async fn flush_op(s: &Shared, client: &NbdClient) {
    let snapshot: Vec<u64> = lock(&s.ledger).iter().map(|m| m.acked).collect();
    match tokio::time::timeout(OP_TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {
            s.counters.flushes_ok.fetch_add(1, Ordering::Relaxed);
            for (m, v) in lock(&s.ledger).iter_mut().zip(snapshot) {
                m.flushed = m.flushed.max(v);
            }
        }
        _ => {
            s.counters.flushes_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
