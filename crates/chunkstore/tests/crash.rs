//! Crash safety: a child process writes known patterns through the store and is
//! SIGKILLed at random moments, many rounds. After each kill the parent reopens the
//! store and checks that every block reads (without a checksum error) either its
//! last completed version or the one that was in flight, that its context names the
//! version its data holds, and that nothing flushed was lost.
//!
//! The child is this same test binary, re-executed with `CHUNKSTORE_CRASH_CHILD`
//! set and a filter selecting `crash_child_process`; it reports progress on stdout.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use ballast_chunkstore::{ChunkStore, StoreError, StoreOptions};
use ballast_types::{BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;
use rand::{Rng, SeedableRng};

const ENV_DIR: &str = "CHUNKSTORE_CRASH_CHILD";
const ENV_BASE: &str = "CHUNKSTORE_CRASH_BASE";
const BLOCKS: u32 = 256;
const BS: usize = 4096;
/// Blocks per write op: a version is BLOCKS / PIECE concurrent ops.
const PIECE: u32 = 16;
const V: VolumeId = VolumeId(5);
const E: Epoch = Epoch(1);
const ID: ChunkId = ChunkId { volume: V, chunk: ChunkIdx(0) };
const ROUNDS: u64 = 30;
/// The child stops by itself after this many versions (bounded run time).
const MAX_VERSIONS: u64 = 400;

/// Whether piece `k` of version `v` is a trim instead of a write.
fn trimmed(v: u64, k: u32) -> bool {
    (v + k as u64).is_multiple_of(7)
}

/// The content of block `b` at version `v`.
fn content(b: u32, v: u64) -> Vec<u8> {
    if v == 0 || trimmed(v, b / PIECE) {
        return vec![0; BS];
    }
    let mut out = vec![0u8; BS];
    for (i, w) in out.chunks_mut(8).enumerate() {
        w.copy_from_slice(&(v << 20 ^ (b as u64) << 9 ^ i as u64).to_le_bytes());
    }
    out
}

fn opts() -> StoreOptions {
    StoreOptions { direct_io: true, queue_depth: 64, ..StoreOptions::default() }
}

/// The child: announce, create (idempotent), then write versions base, base+1, ...
/// each as concurrent ops over the whole chunk; flush every third version.
#[test]
fn crash_child_process() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        // Only meaningful when re-executed by `crash_kill_rounds`.
        return;
    };
    let base: u64 = std::env::var(ENV_BASE).ok().and_then(|s| s.parse().ok()).expect("base version");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async move {
        let s = ChunkStore::open(&dir, opts()).expect("child open");
        s.announce_epoch(V, E).await.expect("announce");
        s.create_chunk(ID, BLOCKS as u64 * BS as u64, E).await.expect("create");
        println!("ready");
        for v in base..base + MAX_VERSIONS {
            let mut tasks = Vec::new();
            for k in 0..BLOCKS / PIECE {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    let off = (k * PIECE) as u64 * BS as u64;
                    let seq = Seq::new(E, v);
                    if trimmed(v, k) {
                        s.trim(ID, off, PIECE as u64 * BS as u64, seq).await
                    } else {
                        let mut buf = Vec::with_capacity(PIECE as usize * BS);
                        for b in k * PIECE..(k + 1) * PIECE {
                            buf.extend_from_slice(&content(b, v));
                        }
                        s.write(ID, off, Bytes::from(buf), seq).await
                    }
                }));
            }
            for t in tasks {
                t.await.expect("join").expect("child write");
            }
            println!("done {v}");
            if v % 3 == 0 {
                s.flush_volume(V, E).await.expect("flush");
                println!("flushed {v}");
            }
        }
        println!("finished");
    });
}

struct Report {
    done: Option<u64>,
    flushed: Option<u64>,
}

fn run_child(dir: &Path, base: u64, kill_after_lines: usize, rng: &mut impl Rng) -> Report {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child_process", "--nocapture", "--test-threads=1"])
        .env(ENV_DIR, dir)
        .env(ENV_BASE, base.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut report = Report { done: None, flushed: None };
    let mut seen = 0;
    let parse = |l: &str, r: &mut Report| {
        if let Some(v) = l.strip_prefix("done ") {
            r.done = v.trim().parse().ok();
        } else if let Some(v) = l.strip_prefix("flushed ") {
            r.flushed = v.trim().parse().ok();
        }
    };
    while seen < kill_after_lines {
        match lines.next() {
            Some(Ok(l)) => {
                parse(&l, &mut report);
                seen += 1;
            }
            _ => break,
        }
    }
    // A random extra moment inside the next version.
    std::thread::sleep(std::time::Duration::from_micros(rng.gen_range(0..3000)));
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    // Lines printed before death are still in the pipe.
    for l in lines.map_while(Result::ok) {
        parse(&l, &mut report);
    }
    let _ = child.wait();
    report
}

#[test]
fn crash_kill_rounds() {
    if std::env::var(ENV_DIR).is_ok() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("chunkstore-crash").tempdir_in("/var/tmp").expect("tempdir");
    let seed: u64 =
        std::env::var("CHUNKSTORE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("crash test seed {seed} (rerun with CHUNKSTORE_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    // What each block is known to hold (version) after the last verification.
    let mut known = vec![0u64; BLOCKS as usize];
    let mut last_flushed: Option<u64> = None;
    let mut recovered_torn = 0;
    // The volume's epoch and the chunk exist before the first child runs: a child
    // killed in round 0 before its own (idempotent) announce and create would
    // otherwise leave nothing to verify.
    {
        let s = ChunkStore::open(dir.path(), opts()).expect("open");
        rt.block_on(async {
            s.announce_epoch(V, E).await.expect("announce");
            s.create_chunk(ID, BLOCKS as u64 * BS as u64, E).await.expect("create");
        });
    }
    for round in 0..ROUNDS {
        let base = (round + 1) * 1_000_000;
        // 0..=1 lines kills during open / the first version; more kills later.
        let kill_after = match rng.gen_range(0..10) {
            0 => 0,
            1 => 1,
            _ => rng.gen_range(2..60),
        };
        let r = run_child(dir.path(), base, kill_after, &mut rng);
        let s = ChunkStore::open(dir.path(), opts()).expect("reopen after kill");
        let data = rt
            .block_on(s.read(ID, 0, BLOCKS * BS as u32, E))
            .map_err(|e| match e {
                StoreError::ChecksumMismatch { block, .. } => {
                    format!("round {round}: checksum error at block {}", block.0)
                }
                e => format!("round {round}: {e}"),
            })
            .expect("read after crash");
        let ctx = rt.block_on(s.context_table(ID, BlockIdx(0), BLOCKS, E)).expect("contexts");
        let in_flight = r.done.map_or(base, |d| d + 1);
        for b in 0..BLOCKS {
            let got = &data[b as usize * BS..(b as usize + 1) * BS];
            let old = r.done.unwrap_or(known[b as usize]);
            let (is_old, is_new) = (got == content(b, old).as_slice(), got == content(b, in_flight).as_slice());
            // When both versions have the same content (two trims: zeros), the
            // data cannot tell them apart; the context decides which one the
            // block is at, and that is what the next round must expect.
            let v = match (is_old, is_new) {
                (true, true) if ctx[b as usize].seq == Seq::new(E, in_flight) => in_flight,
                (true, _) => old,
                (false, true) => {
                    recovered_torn += 1;
                    in_flight
                }
                (false, false) => panic!("round {round}: block {b} holds neither version {old} nor {in_flight}"),
            };
            // The context must name the version the data holds.
            let seq_ok = ctx[b as usize].seq == Seq::new(E, v) || (v == 0 && ctx[b as usize].seq == Seq::ZERO);
            assert!(seq_ok, "round {round}: block {b} holds version {v} but its context says {}", ctx[b as usize].seq);
            assert_eq!(ctx[b as usize].crc, crc32fast::hash(got), "round {round}: block {b} context crc");
            if let Some(f) = r.flushed.or(last_flushed) {
                assert!(v >= f, "round {round}: block {b} lost flushed version {f}");
            }
            known[b as usize] = v;
        }
        if r.flushed.is_some() {
            last_flushed = r.flushed;
        }
        drop(s);
    }
    println!("{ROUNDS} rounds, {recovered_torn} blocks found at their in-flight version");
}
