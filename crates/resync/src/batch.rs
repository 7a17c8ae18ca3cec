//! One batch of a resync: compare contexts, read the differing blocks from the
//! source, check that they did not change meanwhile, apply them on the target;
//! blocks that changed on the source go round again. I/O path: per-batch events
//! at debug only.

use std::sync::{Arc, OnceLock};

use ballast_replica::{ClientError, ReplicaClient, ResyncEntry, ResyncKind, Status};
use ballast_types::{BlockContext, BlockIdx, ChunkId, Epoch, Seq, BLOCK_SIZE, BLOCK_SIZE_U64};
use bytes::Bytes;
use tracing::{debug, warn};

use crate::throttle::Throttle;
use crate::{ResyncError, ResyncStats, Side};

/// Data blocks at most this far apart are read from the source in one request
/// (the few blocks in between are read for nothing, which costs less than a
/// round trip each).
const MERGE_GAP: u32 = 8;
const BS: usize = BLOCK_SIZE as usize;

/// The crc of a block of zeros: the context crc of trimmed, zeroed and never
/// written blocks (and of data writes of zeros, which are the same content).
fn zero_crc() -> u32 {
    static CRC: OnceLock<u32> = OnceLock::new();
    *CRC.get_or_init(|| crc32fast::hash(&[0u8; BS]))
}

/// What to send for one differing block.
#[derive(Clone, Copy, Debug)]
enum Plan {
    Data { seq: Seq, crc: u32 },
    Zero { seq: Seq },
}

pub(crate) struct Batch {
    pub source: ReplicaClient,
    pub target: ReplicaClient,
    pub id: ChunkId,
    /// The snapshot view copied (None: the live data).
    pub view: Option<Seq>,
    pub first: u32,
    pub count: u32,
    pub epoch: Epoch,
    pub protect_from: u64,
    pub max_retries: u32,
    pub throttle: Option<Arc<Throttle>>,
}

impl Batch {
    /// Runs the batch; returns its block count and what it did.
    pub(crate) async fn run(self) -> Result<(u32, ResyncStats), ResyncError> {
        let mut stats = ResyncStats { blocks_compared: u64::from(self.count), ..ResyncStats::default() };
        let protect = Seq::new(self.epoch, self.protect_from);
        let mut pending: Vec<u32> = (self.first..self.first + self.count).collect();
        let mut round = 0u32;
        while let (Some(&lo), Some(&last)) = (pending.first(), pending.last()) {
            let n = last + 1 - lo;
            let (src, tgt) = tokio::join!(self.source_contexts(lo, n), self.target_contexts(lo, n));
            let (src, tgt) = (src?, tgt?);
            let mut plan = Vec::new();
            for &b in &pending {
                let (s, t) = (src[(b - lo) as usize], tgt[(b - lo) as usize]);
                if s == t {
                    continue;
                }
                // The target's own rule (ChunkStore::resync_write), applied here
                // first to spare reading and sending what it would refuse.
                if !(t.seq < s.seq || t.seq < protect) {
                    if t.seq == s.seq {
                        warn!(block = b, seq = %s.seq, "source and target differ under the same seq; left alone");
                    }
                    stats.blocks_skipped_newer += 1;
                    continue;
                }
                let p =
                    if s.crc == zero_crc() { Plan::Zero { seq: s.seq } } else { Plan::Data { seq: s.seq, crc: s.crc } };
                plan.push((b, p));
            }
            let (Some(&(p_lo, _)), Some(&(p_last, _))) = (plan.first(), plan.last()) else {
                break;
            };
            let data_blocks = plan.iter().filter(|(_, p)| matches!(p, Plan::Data { .. })).count();
            if let Some(t) = &self.throttle {
                if let Some(waited) = t.take(data_blocks as u64 * BLOCK_SIZE_U64).await {
                    stats.throttle_waits += 1;
                    stats.throttled += waited;
                }
            }
            let data = self.read_runs(&plan).await?;
            // Invariant: a block is sent under the seq its data was written with.
            // Its source context must be the same before and after the read (a
            // write in between would have changed the seq) and the data must match
            // its crc; otherwise it goes round again.
            let again = self.source_contexts(p_lo, p_last + 1 - p_lo).await?;
            let mut changed = Vec::new();
            let mut entries = vec![ResyncEntry::KEEP; (p_last + 1 - p_lo) as usize];
            let mut pieces: Vec<&[u8]> = Vec::with_capacity(data_blocks);
            for (i, &(b, p)) in plan.iter().enumerate() {
                let stable = src[(b - lo) as usize] == again[(b - p_lo) as usize];
                let entry = match p {
                    Plan::Data { seq, crc } if stable && crc32fast::hash(&data[i]) == crc => {
                        pieces.push(&data[i]);
                        ResyncEntry { kind: ResyncKind::Data, seq }
                    }
                    Plan::Zero { seq } if stable => ResyncEntry { kind: ResyncKind::Zero, seq },
                    _ => {
                        changed.push(b);
                        continue;
                    }
                };
                entries[(b - p_lo) as usize] = entry;
            }
            if entries.iter().any(|e| e.kind != ResyncKind::Keep) {
                let offset = u64::from(p_lo) * BLOCK_SIZE_U64;
                let r = match self.view {
                    None => {
                        self.target
                            .resync_write(self.id, offset, &entries, &pieces, self.epoch, self.protect_from, false)
                            .await
                    }
                    Some(cut) => {
                        self.target
                            .resync_write_at(self.id, cut, offset, &entries, &pieces, self.epoch, self.protect_from)
                            .await
                    }
                }
                .map_err(|e| ResyncError::replica(Side::Target, "resync write", self.epoch, e))?;
                stats.blocks_copied += u64::from(r.written);
                stats.blocks_trimmed += u64::from(r.zeroed);
                stats.blocks_raced += u64::from(r.skipped);
                stats.bytes_copied += pieces.len() as u64 * BLOCK_SIZE_U64;
                debug!(first = p_lo, written = r.written, zeroed = r.zeroed, skipped = r.skipped, "blocks applied");
            }
            pending = changed;
            round += 1;
            if !pending.is_empty() && round > self.max_retries {
                debug!(blocks = pending.len(), "blocks keep changing on the source; the front end's writes carry them");
                stats.blocks_busy += pending.len() as u64;
                break;
            }
        }
        Ok((self.count, stats))
    }

    /// The source's contexts (of the view copied); a source without the chunk
    /// has never had a write to it (chunks are created on first write): all
    /// zeros at `Seq::ZERO`.
    async fn source_contexts(&self, first: u32, count: u32) -> Result<Vec<BlockContext>, ResyncError> {
        let table = match self.view {
            None => self.source.context_table(self.id, BlockIdx(first), count, self.epoch).await,
            Some(cut) => self.source.context_table_at(self.id, cut, BlockIdx(first), count, self.epoch).await,
        };
        match table {
            Ok(t) => Ok(t),
            Err(ClientError::Remote { status: Status::NoSuchChunk, .. }) => {
                Ok(vec![BlockContext { crc: zero_crc(), seq: Seq::ZERO }; count as usize])
            }
            Err(e) => Err(ResyncError::replica(Side::Source, "context table", self.epoch, e)),
        }
    }

    async fn target_contexts(&self, first: u32, count: u32) -> Result<Vec<BlockContext>, ResyncError> {
        match self.view {
            None => self.target.context_table(self.id, BlockIdx(first), count, self.epoch).await,
            Some(cut) => self.target.context_table_at(self.id, cut, BlockIdx(first), count, self.epoch).await,
        }
        .map_err(|e| ResyncError::replica(Side::Target, "context table", self.epoch, e))
    }

    /// Reads the data blocks of `plan` from the source, nearby ones together;
    /// returns one block per plan entry (empty for zero entries), as slices of
    /// the read buffers.
    async fn read_runs(&self, plan: &[(u32, Plan)]) -> Result<Vec<Bytes>, ResyncError> {
        let mut out = vec![Bytes::new(); plan.len()];
        let wanted: Vec<usize> = (0..plan.len()).filter(|&i| matches!(plan[i].1, Plan::Data { .. })).collect();
        let mut k = 0;
        while k < wanted.len() {
            let start = plan[wanted[k]].0;
            let mut end_k = k;
            while end_k + 1 < wanted.len() && plan[wanted[end_k + 1]].0 - plan[wanted[end_k]].0 <= MERGE_GAP {
                end_k += 1;
            }
            let end = plan[wanted[end_k]].0 + 1;
            let (off, len) = (u64::from(start) * BLOCK_SIZE_U64, (end - start) * BLOCK_SIZE);
            let buf = match self.view {
                None => self.source.read(self.id, off, len, self.epoch).await,
                Some(cut) => self.source.read_snapshot(self.id, cut, off, len, self.epoch).await,
            }
            .map_err(|e| ResyncError::replica(Side::Source, "read", self.epoch, e))?;
            for &i in &wanted[k..=end_k] {
                let at = (plan[i].0 - start) as usize * BS;
                out[i] = buf.slice(at..at + BS);
            }
            k = end_k + 1;
        }
        Ok(out)
    }
}
