//! Garbage collection: reclaiming chunk replicas meta no longer lists on this
//! node (those of deleted volumes, and those a rebuild replaced elsewhere).
//!
//! GC runs on a task of its own, never on the heartbeat's: a pass makes one
//! meta call per volume in sequence, and a slow meta would otherwise hold the
//! next heartbeat back past the suspect timeout.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ballast_chunkstore::ChunkStore;
use ballast_metaclient::MetaClient;
use ballast_proto::v1 as pb;
use ballast_types::{ChunkId, VolumeId};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::agent::AgentConfig;

/// Reclaims chunk replicas meta no longer lists on this node: those of deleted
/// volumes and those a rebuild replaced.
///
/// Invariant: a replica is deleted only after two passes in a row agree (a
/// member answering from a lagging state must not make us delete a replica
/// that was just assigned here), and a pass that cannot read every layout it
/// needs reclaims nothing.
#[derive(Debug, Default)]
pub struct Gc {
    candidates: HashSet<ChunkId>,
}

impl Gc {
    /// One pass: asks meta for the layout of every volume with a replica here,
    /// deletes the replicas unlisted in this pass and the previous one, and
    /// remembers this pass's unlisted replicas for the next.
    pub async fn pass(&mut self, cfg: &AgentConfig, meta: &MetaClient, store: &ChunkStore) {
        let mut layouts: HashMap<VolumeId, Option<pb::VolumeLayout>> = HashMap::new();
        let mut unlisted = HashSet::new();
        for c in store.chunks() {
            let v = c.id.volume;
            let layout = match layouts.entry(v) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    match meta.get_layout(pb::GetLayoutRequest { volume: v.0 }).await {
                        Ok(l) => e.insert(Some(l)),
                        Err(err) if err.is_not_found() => e.insert(None),
                        // Meta unreachable: reclaim nothing this time.
                        Err(_) => return,
                    }
                }
            };
            let listed = layout.as_ref().is_some_and(|l| {
                l.chunks.get(c.id.chunk.0 as usize).is_some_and(|ch| ch.replicas.iter().any(|r| r.node == cfg.id))
            });
            if !listed {
                unlisted.insert(c.id);
            }
        }
        for id in &unlisted {
            if self.candidates.contains(id) {
                let epoch = store.epoch(id.volume);
                match store.delete_chunk(*id, epoch).await {
                    Ok(()) => info!(chunk = %id, "reclaimed a chunk replica meta no longer lists here"),
                    Err(e) => warn!(chunk = %id, error = %e, "reclaim failed"),
                }
            }
        }
        self.candidates = unlisted;
    }
}

/// The GC task: a pass every `cfg.gc_every` (the first one `gc_every` after
/// the start; 0: every heartbeat interval) until `stop`.
///
/// - A pass runs only while `registered` holds: a node whose registration meta
///   refused (another node with this id, in another zone) must not read the
///   layouts as its own.
/// - `stop` ends the task at once, in the middle of a pass too: meta may take
///   many seconds to answer, and a stopping node waits for this task. A
///   deletion already begun finishes (the store removes the files on a
///   blocking thread); the rest waits for a pass after the restart, which
///   starts over with no candidates.
/// - A pass longer than `gc_every` delays the next one; passes never overlap.
pub(crate) async fn run(
    cfg: AgentConfig,
    meta: MetaClient,
    store: ChunkStore,
    registered: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut gc = Gc::default();
    // 0: every heartbeat, as when GC ran on the heartbeat's tick (a zero period panics).
    let every = if cfg.gc_every.is_zero() { cfg.heartbeat } else { cfg.gc_every };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if !registered.load(Ordering::Acquire) {
            continue;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = gc.pass(&cfg, &meta, &store) => {}
        }
    }
}
