//! Conditional (resync) writes: a property test against an in-memory model of the
//! rule (normal writes and trims follow it too: a block only moves to a newer
//! seq), and a race of normal writes against resync writes of older seqs.

use std::collections::HashMap;
use std::path::Path;

use ballast_chunkstore::{ChunkStore, ResyncBlock, ResyncOutcome, StoreError, StoreOptions};
use ballast_types::{BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const BLOCKS: u32 = 16;
const BS: usize = 4096;
const V: VolumeId = VolumeId(1);
const E: Epoch = Epoch(3);
const ID: ChunkId = ChunkId { volume: V, chunk: ChunkIdx(0) };

fn open(dir: &Path) -> ChunkStore {
    ChunkStore::open(dir, StoreOptions { direct_io: true, queue_depth: 16, ..StoreOptions::default() }).expect("open")
}

/// Distinct content per (write, block).
fn block_bytes(tag: u64, block: u32) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(block).wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
    (0..BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Entry {
    Keep,
    Data(Seq),
    Zero(Seq),
}

#[derive(Clone, Debug)]
enum Cmd {
    /// A normal write at the fence epoch.
    Write {
        block: u32,
        n: u32,
        counter: u64,
    },
    /// A normal trim at the fence epoch.
    Trim {
        block: u32,
        n: u32,
        counter: u64,
    },
    Resync {
        block: u32,
        entries: Vec<Entry>,
        protect_from: Seq,
    },
    Check,
    Reopen,
}

fn seq() -> impl Strategy<Value = Seq> {
    // Epochs up to the fence epoch (the source's blocks may be older); ZERO too.
    prop_oneof![
        1 => Just(Seq::ZERO),
        6 => (1u64..=E.0, 0u64..12).prop_map(|(e, c)| Seq::new(Epoch(e), c)),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![1 => Just(Entry::Keep), 4 => seq().prop_map(Entry::Data), 2 => seq().prop_map(Entry::Zero)]
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let range = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(6)));
    prop_oneof![
        3 => (range.clone(), 0u64..12).prop_map(|((block, n), counter)| Cmd::Write { block, n, counter }),
        1 => (range, 0u64..12).prop_map(|((block, n), counter)| Cmd::Trim { block, n, counter }),
        5 => (0..BLOCKS)
            .prop_flat_map(|b| (Just(b), proptest::collection::vec(entry(), 0..=(BLOCKS - b) as usize)))
            .prop_flat_map(|(block, entries)| {
                let protect = prop_oneof![Just(Seq::ZERO), (0u64..12).prop_map(|c| Seq::new(E, c))];
                (Just(block), Just(entries), protect)
            })
            .prop_map(|(block, entries, protect_from)| Cmd::Resync { block, entries, protect_from }),
        2 => Just(Cmd::Check),
        1 => Just(Cmd::Reopen),
    ]
}

#[derive(Clone)]
struct ModelBlock {
    data: Vec<u8>,
    seq: Seq,
}

async fn check(s: &ChunkStore, model: &[ModelBlock]) -> Result<(), TestCaseError> {
    let t = s.context_table(ID, BlockIdx(0), BLOCKS, E).await.expect("contexts");
    let all = s.read(ID, 0, BLOCKS * BS as u32, E).await.expect("read");
    for (b, m) in model.iter().enumerate() {
        prop_assert_eq!(t[b].seq, m.seq, "seq of block {}", b);
        prop_assert_eq!(t[b].crc, crc32fast::hash(&m.data), "crc of block {}", b);
        prop_assert_eq!(&all[b * BS..(b + 1) * BS], &m.data[..], "data of block {}", b);
    }
    Ok(())
}

async fn run(cmds: Vec<Cmd>) -> Result<(), TestCaseError> {
    let dir = tempfile::Builder::new().prefix("chunkstore-resync").tempdir_in("/var/tmp").expect("tempdir");
    let mut s = open(dir.path());
    s.announce_epoch(V, E).await.expect("announce");
    s.create_chunk(ID, u64::from(BLOCKS) * BS as u64, E).await.expect("create");
    let mut model = vec![ModelBlock { data: vec![0; BS], seq: Seq::ZERO }; BLOCKS as usize];
    for (step, c) in cmds.into_iter().enumerate() {
        let tag = step as u64 + 1;
        match c {
            Cmd::Write { block, n, counter } => {
                let seq = Seq::new(E, counter);
                let mut buf = Vec::with_capacity(n as usize * BS);
                for b in block..block + n {
                    let bytes = block_bytes(tag, b);
                    buf.extend_from_slice(&bytes);
                    // A block only moves to a newer seq: an overtaken write keeps it.
                    if model[b as usize].seq < seq {
                        model[b as usize] = ModelBlock { data: bytes, seq };
                    }
                }
                s.write(ID, u64::from(block) * BS as u64, Bytes::from(buf), seq).await.expect("write");
            }
            Cmd::Trim { block, n, counter } => {
                let seq = Seq::new(E, counter);
                let (off, len) = (u64::from(block) * BS as u64, u64::from(n) * BS as u64);
                s.trim(ID, off, len, seq).await.expect("trim");
                for b in block..block + n {
                    if model[b as usize].seq < seq {
                        model[b as usize] = ModelBlock { data: vec![0; BS], seq };
                    }
                }
            }
            Cmd::Resync { block, entries, protect_from } => {
                let mut blocks = Vec::with_capacity(entries.len());
                let mut data = Vec::new();
                let mut expect = ResyncOutcome::default();
                for (i, e) in entries.iter().enumerate() {
                    let b = block + i as u32;
                    let m = &mut model[b as usize];
                    // The rule, restated independently of the store's code.
                    let applies = |incoming: Seq| m.seq < incoming || m.seq < protect_from;
                    match *e {
                        Entry::Keep => blocks.push(ResyncBlock::Keep),
                        Entry::Data(seq) => {
                            let bytes = block_bytes(tag, b);
                            data.extend_from_slice(&bytes);
                            blocks.push(ResyncBlock::Data(seq));
                            if applies(seq) {
                                *m = ModelBlock { data: bytes, seq };
                                expect.written += 1;
                            } else {
                                expect.skipped += 1;
                            }
                        }
                        Entry::Zero(seq) => {
                            blocks.push(ResyncBlock::Zero(seq));
                            if applies(seq) {
                                *m = ModelBlock { data: vec![0; BS], seq };
                                expect.zeroed += 1;
                            } else {
                                expect.skipped += 1;
                            }
                        }
                    }
                }
                let off = u64::from(block) * BS as u64;
                let got = s.resync_write(ID, off, &blocks, Bytes::from(data), E, protect_from).await.expect("resync");
                prop_assert_eq!(got, expect);
            }
            Cmd::Check => check(&s, &model).await?,
            Cmd::Reopen => {
                drop(s);
                s = open(dir.path());
            }
        }
    }
    check(&s, &model).await?;
    // And after a flush and a reopen.
    s.flush_chunk(ID, E).await.expect("flush");
    drop(s);
    let s = open(dir.path());
    check(&s, &model).await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn resync_matches_model(cmds in proptest::collection::vec(cmd(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(cmds))?;
    }
}

#[tokio::test]
async fn resync_requests_are_checked() {
    let dir = tempfile::Builder::new().prefix("chunkstore-resync").tempdir_in("/var/tmp").expect("tempdir");
    let s = open(dir.path());
    s.announce_epoch(V, E).await.expect("announce");
    s.create_chunk(ID, u64::from(BLOCKS) * BS as u64, E).await.expect("create");
    let one = [ResyncBlock::Data(Seq::new(Epoch(1), 1))];
    // Data that does not match the entries.
    let r = s.resync_write(ID, 0, &one, Bytes::from(vec![0u8; 100]), E, Seq::ZERO).await;
    assert!(matches!(r, Err(StoreError::InvalidRequest(_))), "{r:?}");
    // Past the end of the chunk.
    let r = s.resync_write(ID, u64::from(BLOCKS) * BS as u64, &one, Bytes::from(vec![0u8; BS]), E, Seq::ZERO).await;
    assert!(matches!(r, Err(StoreError::OutOfRange { .. })), "{r:?}");
    // Fenced by the request epoch, whatever the block seqs say.
    let r = s.resync_write(ID, 0, &one, Bytes::from(vec![0u8; BS]), Epoch(2), Seq::ZERO).await;
    assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
    // Nothing was changed by the refused requests.
    let t = s.context_table(ID, BlockIdx(0), 1, E).await.expect("contexts");
    assert_eq!(t[0].seq, Seq::ZERO);
    // An empty request is a no-op.
    let r = s.resync_write(ID, 0, &[], Bytes::new(), E, Seq::ZERO).await.expect("empty");
    assert_eq!(r, ResyncOutcome::default());
    // A resync write marks the chunk dirty like any write.
    s.resync_write(ID, 0, &one, Bytes::from(vec![1u8; BS]), E, Seq::ZERO).await.expect("resync");
    assert_eq!(s.dirty_chunks(V), vec![ChunkIdx(0)]);
}

/// A front end writes blocks with ever newer seqs while several copiers resync
/// the same blocks with older seqs (data and zeros). Every block must end with
/// the content of the highest seq ever sent to it: a newer write is never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn normal_writes_racing_resync_writes_never_lose_newer_data() {
    const N: u32 = 32;
    const ROUNDS: u64 = 300;
    let dir = tempfile::Builder::new().prefix("chunkstore-resync-race").tempdir_in("/var/tmp").expect("tempdir");
    let s = open(dir.path());
    s.announce_epoch(V, E).await.expect("announce");
    s.create_chunk(ID, u64::from(N) * BS as u64, E).await.expect("create");

    // Normal writes: seq counters from 1_000_000 up, one writer, so in seq order.
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut sent: Vec<(u32, Seq)> = Vec::new();
            for k in 0..ROUNDS {
                let seq = Seq::new(E, 1_000_000 + k);
                let block = rng.gen_range(0..N);
                let n = rng.gen_range(1..=(N - block).min(4));
                let mut buf = Vec::new();
                for b in block..block + n {
                    buf.extend_from_slice(&block_bytes(seq.counter, b));
                    sent.push((b, seq));
                }
                s.write(ID, u64::from(block) * BS as u64, Bytes::from(buf), seq).await.expect("write");
                tokio::task::yield_now().await;
            }
            sent
        })
    };
    // Resync writes: older seqs (older epochs too), covering wide ranges.
    let mut copiers = Vec::new();
    for t in 0..3u64 {
        let s = s.clone();
        copiers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t);
            let mut sent: Vec<(u32, Seq, bool)> = Vec::new();
            for k in 0..ROUNDS {
                let block = rng.gen_range(0..N);
                let n = rng.gen_range(1..=(N - block).min(16));
                let mut blocks = Vec::new();
                let mut data = Vec::new();
                for b in block..block + n {
                    // Distinct per (copier, round): counters below 1_000_000.
                    let seq = Seq::new(Epoch(rng.gen_range(1..=E.0)), t * 100_000 + k);
                    match rng.gen_range(0..4) {
                        0 => blocks.push(ResyncBlock::Keep),
                        1 => {
                            blocks.push(ResyncBlock::Zero(seq));
                            sent.push((b, seq, true));
                        }
                        _ => {
                            blocks.push(ResyncBlock::Data(seq));
                            data.extend_from_slice(&block_bytes(seq.counter ^ (seq.epoch.0 << 40), b));
                            sent.push((b, seq, false));
                        }
                    }
                }
                let off = u64::from(block) * BS as u64;
                s.resync_write(ID, off, &blocks, Bytes::from(data), E, Seq::ZERO).await.expect("resync");
            }
            sent
        }));
    }
    // The expected content of each block: the one with the highest seq sent to it.
    let mut best: HashMap<u32, (Seq, Vec<u8>)> = HashMap::new();
    let mut offer = |b: u32, seq: Seq, data: Vec<u8>| {
        let e = best.entry(b).or_insert((Seq::ZERO, vec![0; BS]));
        if seq > e.0 {
            *e = (seq, data);
        }
    };
    for (b, seq) in writer.await.expect("writer") {
        offer(b, seq, block_bytes(seq.counter, b));
    }
    for c in copiers {
        for (b, seq, zero) in c.await.expect("copier") {
            let data = if zero { vec![0; BS] } else { block_bytes(seq.counter ^ (seq.epoch.0 << 40), b) };
            offer(b, seq, data);
        }
    }
    let t = s.context_table(ID, BlockIdx(0), N, E).await.expect("contexts");
    let all = s.read(ID, 0, N * BS as u32, E).await.expect("read");
    for b in 0..N {
        let (seq, data) = best.get(&b).cloned().unwrap_or((Seq::ZERO, vec![0; BS]));
        assert_eq!(t[b as usize].seq, seq, "block {b}: seq");
        assert_eq!(&all[b as usize * BS..(b as usize + 1) * BS], &data[..], "block {b}: data");
    }
}
