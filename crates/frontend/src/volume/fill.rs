//! Clones (docs/DESIGN.md, 5.6a): a clone is a new volume whose chunks start
//! empty on their replicas and get the data of its source (a snapshot, read
//! through [`Membership::read_parent`]) chunk by chunk. A chunk is filled
//! before the first client I/O to it (that I/O waits, once), and a background
//! task fills the rest in order, so the clone is usable at once and becomes
//! independent of its source when the last chunk is recorded.
//!
//! Invariant: a chunk is recorded as filled ([`Membership::chunks_filled`])
//! only after its copy is durable on every write target, and no client I/O
//! reaches it before that record is committed. So a front end that dies
//! mid-fill leaves the chunk unfilled (the next attach copies it again, over
//! nothing a client wrote), and one that dies after the record leaves client
//! writes that no later fill overwrites.
//!
//! The copy is made of ordinary replicated writes under this attach's seqs
//! (all-zero pieces skipped: the chunk reads zeros without them), taken while
//! no client write to the chunk can exist, so ordering needs no more than the
//! chunk's usual write path.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ballast_blockdev::BlockError;
use ballast_types::ChunkIdx;
use tracing::{info, warn};

use super::{io_err, join_all, Volume};
use crate::membership::Membership;
use crate::policy::Piece;
use crate::replica_io::ReplicaIo;

/// Bytes copied per parent read and replicated write.
const PIECE: u64 = 1 << 20;
/// Pieces of one chunk copied at once (measured on a 16 MiB chunk under a
/// busy source: one at a time, 550 to 730 ms per chunk).
const PIECES_AT_ONCE: usize = 4;
/// Pause before the background filler tries a chunk again after a failure.
const RETRY: Duration = Duration::from_secs(1);

impl<M: Membership, R: ReplicaIo> Volume<M, R> {
    /// The clone's chunks not filled from its source yet (recorded in the
    /// membership provider): 0 once it is independent, and for a volume
    /// that is not a clone.
    pub fn unfilled_chunks(&self) -> usize {
        self.chunks.iter().filter(|(_, c)| !c.filled.initialized()).count()
    }

    /// Waits until the chunks of `pieces` hold their data, filling any that
    /// nobody is filling yet (at once for all but a clone's unfilled chunks).
    pub(super) async fn ensure_filled(&self, pieces: &[Piece]) -> Result<(), BlockError> {
        for p in pieces {
            let state = &self.chunks[p.chunk.0 as usize];
            if !state.filled.initialized() {
                state.filled.get_or_try_init(|| self.fill_chunk(p.chunk)).await?;
            }
        }
        Ok(())
    }

    /// Copies `chunk` from the clone's source, flushes it on every holder,
    /// then records it filled (see the module docs).
    async fn fill_chunk(&self, chunk: ChunkIdx) -> Result<(), BlockError> {
        self.check_serving()?;
        let started = Instant::now();
        let len = self.chunk_len(chunk);
        let base = u64::from(chunk.0) * self.chunk_size;
        let offsets: Vec<u64> = (0..len.div_ceil(PIECE)).map(|i| i * PIECE).collect();
        let mut copied = 0u64;
        for group in offsets.chunks(PIECES_AT_ONCE) {
            let results = join_all(group.iter().map(|&off| async move {
                let n = (len - off).min(PIECE);
                let data = self.membership.read_parent(self.id, base + off, n as u32).await.map_err(io_err)?;
                if data.len() as u64 != n {
                    return Err(io_err(format!("the clone's source answered {} bytes for {n}", data.len())));
                }
                if !data.iter().any(|b| *b != 0) {
                    return Ok(0);
                }
                self.write_piece(Piece { chunk, offset: off, len: n, buf_offset: 0 }, data, false).await?;
                Ok(n)
            }))
            .await;
            for r in results {
                copied += r?;
            }
        }
        self.do_flush().await?;
        self.membership.chunks_filled(self.id, self.epoch, vec![chunk]).await.map_err(io_err)?;
        info!(
            volume = %self.id, chunk = chunk.0, bytes = copied, ms = started.elapsed().as_millis() as u64,
            "clone chunk filled from its source"
        );
        Ok(())
    }

    /// Fills `unfilled` in the background, one chunk at a time in index
    /// order, retrying a chunk that fails; stops when the volume stops.
    pub(super) fn start_filler(self: &Arc<Self>, unfilled: Vec<ChunkIdx>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let total = unfilled.len();
        tokio::spawn(async move {
            let started = Instant::now();
            for chunk in unfilled {
                loop {
                    let Some(v) = weak.upgrade() else { return };
                    if v.is_stopped() {
                        return;
                    }
                    let state = &v.chunks[chunk.0 as usize];
                    match state.filled.get_or_try_init(|| v.fill_chunk(chunk)).await {
                        Ok(()) => break,
                        Err(e) => {
                            warn!(volume = %v.id, chunk = chunk.0, error = %e, "filling a clone chunk failed; retrying");
                            drop(v);
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                }
            }
            info!(chunks = total, secs = started.elapsed().as_secs_f64(), "clone filled: independent of its source");
        });
    }
}
