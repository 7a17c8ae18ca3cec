//! Property test: random sequences of write / trim / write-zeroes / read / flush /
//! context-table / reopen on a small chunk, compared with an in-memory model.

use std::path::Path;

use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_types::{BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;
use proptest::prelude::*;

const BLOCKS: u32 = 16;
const BS: usize = 4096;
const V: VolumeId = VolumeId(1);
const E: Epoch = Epoch(3);
const ID: ChunkId = ChunkId { volume: V, chunk: ChunkIdx(0) };

#[derive(Clone, Debug)]
enum Cmd {
    Write { block: u32, n: u32, fill: u8 },
    Trim { block: u32, n: u32 },
    Zeroes { block: u32, n: u32 },
    Read { block: u32, n: u32 },
    Flush,
    FlushVolume,
    Contexts,
    Reopen,
}

fn range() -> impl Strategy<Value = (u32, u32)> {
    (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(8)))
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        5 => (range(), any::<u8>()).prop_map(|((block, n), fill)| Cmd::Write { block, n, fill }),
        1 => range().prop_map(|(block, n)| Cmd::Trim { block, n }),
        1 => range().prop_map(|(block, n)| Cmd::Zeroes { block, n }),
        3 => range().prop_map(|(block, n)| Cmd::Read { block, n }),
        1 => Just(Cmd::Flush),
        1 => Just(Cmd::FlushVolume),
        1 => Just(Cmd::Contexts),
        1 => Just(Cmd::Reopen),
    ]
}

/// Block content: each block of a write gets a distinct pattern.
fn block_bytes(fill: u8, block: u32) -> Vec<u8> {
    (0..BS).map(|i| fill.wrapping_add(block as u8).wrapping_mul(31) ^ (i as u8)).collect()
}

#[derive(Clone)]
struct ModelBlock {
    data: Vec<u8>,
    seq: Seq,
}

fn open(dir: &Path) -> ChunkStore {
    ChunkStore::open(dir, StoreOptions { direct_io: true, queue_depth: 8, ..StoreOptions::default() }).expect("open")
}

async fn run(cmds: Vec<Cmd>) -> Result<(), TestCaseError> {
    let dir = tempfile::Builder::new().prefix("chunkstore-model").tempdir_in("/var/tmp").expect("tempdir");
    let mut s = open(dir.path());
    s.announce_epoch(V, E).await.expect("announce");
    s.create_chunk(ID, BLOCKS as u64 * BS as u64, E).await.expect("create");
    let mut model = vec![ModelBlock { data: vec![0; BS], seq: Seq::ZERO }; BLOCKS as usize];
    let mut dirty = false;
    let mut counter = 0u64;
    for c in cmds {
        counter += 1;
        // Seqs are not monotonic on purpose: a write overtaken on the way arrives
        // with an older seq than the block's, and must keep the newer block.
        let seq = Seq::new(E, counter * 7 % 23);
        match c {
            Cmd::Write { block, n, fill } => {
                let mut buf = Vec::with_capacity(n as usize * BS);
                for b in block..block + n {
                    let bytes = block_bytes(fill, b);
                    buf.extend_from_slice(&bytes);
                    if model[b as usize].seq < seq {
                        model[b as usize] = ModelBlock { data: bytes, seq };
                        // A write that changes nothing (every block newer) marks nothing.
                        dirty = true;
                    }
                }
                s.write(ID, block as u64 * BS as u64, Bytes::from(buf), seq).await.expect("write");
            }
            Cmd::Trim { block, n } | Cmd::Zeroes { block, n } => {
                let (off, len) = (block as u64 * BS as u64, n as u64 * BS as u64);
                if matches!(c, Cmd::Trim { .. }) {
                    s.trim(ID, off, len, seq).await.expect("trim");
                } else {
                    s.write_zeroes(ID, off, len, seq).await.expect("zeroes");
                }
                for b in block..block + n {
                    if model[b as usize].seq < seq {
                        model[b as usize] = ModelBlock { data: vec![0; BS], seq };
                        dirty = true;
                    }
                }
            }
            Cmd::Read { block, n } => {
                let got = s.read(ID, block as u64 * BS as u64, n * BS as u32, E).await.expect("read");
                for (i, b) in (block..block + n).enumerate() {
                    prop_assert_eq!(&got[i * BS..(i + 1) * BS], &model[b as usize].data[..], "block {}", b);
                }
            }
            Cmd::Flush => {
                s.flush_chunk(ID, E).await.expect("flush");
                dirty = false;
            }
            Cmd::FlushVolume => {
                s.flush_volume(V, E).await.expect("flush volume");
                dirty = false;
            }
            Cmd::Contexts => {
                let t = s.context_table(ID, BlockIdx(0), BLOCKS, E).await.expect("contexts");
                for (b, ctx) in t.iter().enumerate() {
                    prop_assert_eq!(ctx.seq, model[b].seq, "seq of block {}", b);
                    prop_assert_eq!(ctx.crc, crc32fast::hash(&model[b].data), "crc of block {}", b);
                }
            }
            Cmd::Reopen => {
                drop(s);
                s = open(dir.path());
                prop_assert_eq!(s.epoch(V), E);
            }
        }
        let expect_dirty: Vec<ChunkIdx> = if dirty { vec![ChunkIdx(0)] } else { vec![] };
        prop_assert_eq!(s.dirty_chunks(V), expect_dirty);
    }
    // Everything at the end, after one more reopen.
    drop(s);
    let s = open(dir.path());
    let all = s.read(ID, 0, BLOCKS * BS as u32, E).await.expect("final read");
    for b in 0..BLOCKS as usize {
        prop_assert_eq!(&all[b * BS..(b + 1) * BS], &model[b].data[..], "final block {}", b);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(cmds in proptest::collection::vec(cmd(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(cmds))?;
    }
}
