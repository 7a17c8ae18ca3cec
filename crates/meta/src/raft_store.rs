//! The Raft log and state machine on disk, for openraft (0.9, storage v2).
//!
//! One redb database per meta member (`DIR/meta.redb`), three tables:
//!
//! ```text
//!   log    u64 index → JSON Entry<TypeConfig>         appended and truncated by Raft
//!   meta   "vote" | "committed" | "purged" → JSON     the vote is durable before it is used
//!   snap   "current" → JSON StoredSnapshot            the latest snapshot (meta + state)
//! ```
//!
//! Every write is one redb transaction, committed (fsync) before openraft is told
//! it is done: `append` calls `log_io_completed` only after the commit, and votes
//! are durable before `save_vote` returns.
//!
//! The state machine lives in memory ([`SmData`]); it is durable through the
//! latest snapshot plus the log: on open it starts from the snapshot, and openraft
//! re-applies the committed entries after it (the committed id is saved). So
//! `apply` writes nothing to disk, and a snapshot is a whole serialised state.
//! JSON because it is self-describing across versions and the state is small
//! (a TiB of volume is 16 Ki chunk entries).

// openraft's traits fix the error type (StorageError, ~224 bytes); the helpers
// return the same type rather than convert on every call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::state::{Command, MetaError, MetaState, Response};

/// What the state machine returns for each command: the command's own result
/// (a failed command is a normal, committed outcome, not a storage error).
pub type MetaResult = Result<Response, MetaError>;

openraft::declare_raft_types!(
    /// The metadata service's Raft types: commands in, results out, u64 node ids.
    pub TypeConfig:
        D = Command,
        R = MetaResult,
);

pub type NodeId = u64;
type SErr = StorageError<NodeId>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAP: TableDefinition<&str, &[u8]> = TableDefinition::new("snap");

/// Opens (creating if needed) the member's database under `dir` and returns its
/// log store and state machine, the state machine loaded from the latest snapshot.
pub fn open(dir: &Path, seed: u64) -> Result<(LogStore, StateMachine), SErr> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
    let db = Database::create(dir.join("meta.redb")).map_err(|e| write_err(&e))?;
    let db = Arc::new(db);
    {
        // Create the tables once, so readers never meet a missing table.
        let tx = db.begin_write().map_err(|e| write_err(&e))?;
        tx.open_table(LOG).map_err(|e| write_err(&e))?;
        tx.open_table(META).map_err(|e| write_err(&e))?;
        tx.open_table(SNAP).map_err(|e| write_err(&e))?;
        tx.commit().map_err(|e| write_err(&e))?;
    }
    let committed: Option<LogId<NodeId>> = get_json::<Option<LogId<NodeId>>>(&db, META, "committed")?.flatten();
    let log = LogStore { db: db.clone(), committed: Arc::new(AtomicU64::new(committed.map_or(0, |l| l.index + 1))) };
    let snapshot: Option<StoredSnapshot> = get_json(&db, SNAP, "current")?;
    let data = match &snapshot {
        Some(s) => serde_json::from_slice(&s.data).map_err(|e| read_sm_err(&e))?,
        None => {
            SmData { last_applied: None, last_membership: StoredMembership::default(), state: MetaState::new(seed) }
        }
    };
    let sm = StateMachine { db, data: Arc::new(RwLock::new(data)), snapshot_counter: Arc::new(AtomicU64::new(0)) };
    Ok((log, sm))
}

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: std::io::Error) -> SErr {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}
fn write_err<E: std::error::Error + 'static>(e: &E) -> SErr {
    StorageIOError::write(AnyError::new(e)).into()
}
fn read_err<E: std::error::Error + 'static>(e: &E) -> SErr {
    StorageIOError::read(AnyError::new(e)).into()
}
fn read_sm_err<E: std::error::Error + 'static>(e: &E) -> SErr {
    StorageIOError::read_state_machine(AnyError::new(e)).into()
}

fn get_json<T: for<'de> Deserialize<'de>>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<Option<T>, SErr> {
    let tx = db.begin_read().map_err(|e| read_err(&e))?;
    let t = tx.open_table(table).map_err(|e| read_err(&e))?;
    match t.get(key).map_err(|e| read_err(&e))? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(|e| read_err(&e))?)),
        None => Ok(None),
    }
}

fn put_json<T: Serialize>(db: &Database, table: TableDefinition<&str, &[u8]>, key: &str, v: &T) -> Result<(), SErr> {
    let bytes = serde_json::to_vec(v).map_err(|e| write_err(&e))?;
    let tx = db.begin_write().map_err(|e| write_err(&e))?;
    {
        let mut t = tx.open_table(table).map_err(|e| write_err(&e))?;
        t.insert(key, bytes.as_slice()).map_err(|e| write_err(&e))?;
    }
    tx.commit().map_err(|e| write_err(&e))
}

/// The Raft log and vote. Cheap to clone (one shared database).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The last committed index openraft saved, plus one (0: none yet); shared
    /// by the clones, for [`LogStore::committed_index`].
    committed: Arc<AtomicU64>,
}

impl LogStore {
    /// The highest log index this member knows committed (openraft saves it on
    /// every member, leader or follower, before applying up to it). None before
    /// the first commit. A clone taken before the store went to openraft reads
    /// it too (for metrics).
    pub fn committed_index(&self) -> Option<u64> {
        self.committed.load(Ordering::Relaxed).checked_sub(1)
    }

    fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let tx = self.db.begin_read().map_err(|e| read_err(&e))?;
        let t = tx.open_table(LOG).map_err(|e| read_err(&e))?;
        let lo = match range.start_bound() {
            Bound::Included(&s) => Bound::Included(s),
            Bound::Excluded(&s) => Bound::Excluded(s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let hi = match range.end_bound() {
            Bound::Included(&s) => Bound::Included(s),
            Bound::Excluded(&s) => Bound::Excluded(s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in t.range::<u64>((lo, hi)).map_err(|e| read_err(&e))? {
            let (_, v) = item.map_err(|e| read_err(&e))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| read_err(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        self.entries(range)
    }

    /// What replication sends after its prev log id `start - 1`.
    ///
    /// Invariant: an unbroken run that starts exactly at `start`, or nothing.
    /// openraft 0.9 ships what this returns as the entries following prev
    /// without checking that they start at prev + 1; a replication stream
    /// that asks after a purge would otherwise send "prev 7, entries 18.."
    /// and leave a hole in a follower's log, wedging it for good (found by
    /// the simulator, crates/sim/src/raft.rs, seed 753). For nothing,
    /// openraft sends a heartbeat, and then a snapshot once it sees the purge.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let mut run = self.entries(start..end)?;
        if run.first().is_some_and(|e| e.log_id.index != start) {
            return Ok(Vec::new());
        }
        if let Some(gap) = run.windows(2).position(|w| w[1].log_id.index != w[0].log_id.index + 1) {
            run.truncate(gap + 1);
        }
        Ok(run)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let purged: Option<LogId<NodeId>> = get_json(&self.db, META, "purged")?;
        let tx = self.db.begin_read().map_err(|e| read_err(&e))?;
        let t = tx.open_table(LOG).map_err(|e| read_err(&e))?;
        let last = match t.last().map_err(|e| read_err(&e))? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(|e| read_err(&e))?;
                Some(e.log_id)
            }
            None => purged,
        };
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        put_json(&self.db, META, "vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        get_json(&self.db, META, "vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        put_json(&self.db, META, "committed", &committed)?;
        self.committed.store(committed.map_or(0, |l| l.index + 1), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(get_json::<Option<LogId<NodeId>>>(&self.db, META, "committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let result = (|| {
            let tx = self.db.begin_write().map_err(|e| write_err(&e))?;
            {
                let mut t = tx.open_table(LOG).map_err(|e| write_err(&e))?;
                // Invariant: the log has no holes. Each entry must follow the
                // last one (or the purge point): refusing a gap fails this
                // member loudly now instead of leaving a log it can never
                // apply (see `limited_get_log_entries`).
                let mut last = match t.last().map_err(|e| write_err(&e))? {
                    Some((k, _)) => Some(k.value()),
                    None => get_json::<LogId<NodeId>>(&self.db, META, "purged")?.map(|l| l.index),
                };
                for e in entries {
                    if let Some(l) = last {
                        if e.log_id.index > l + 1 {
                            return Err(write_err(&std::io::Error::other(format!(
                                "append of log index {} after {l} would leave a hole",
                                e.log_id.index
                            ))));
                        }
                    }
                    last = Some(e.log_id.index);
                    let bytes = serde_json::to_vec(&e).map_err(|err| write_err(&err))?;
                    t.insert(e.log_id.index, bytes.as_slice()).map_err(|err| write_err(&err))?;
                }
            }
            tx.commit().map_err(|e| write_err(&e))
        })();
        // Durable (committed) before Raft may count these entries as persisted.
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.remove_range(log_id.index..)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        // Record the purge point first: a crash between the two leaves extra
        // entries below it, which readers never ask for.
        put_json(&self.db, META, "purged", &log_id)?;
        self.remove_range(..=log_id.index)
    }
}

impl LogStore {
    fn remove_range(&self, range: impl RangeBounds<u64>) -> Result<(), SErr> {
        let tx = self.db.begin_write().map_err(|e| write_err(&e))?;
        {
            let mut t = tx.open_table(LOG).map_err(|e| write_err(&e))?;
            let keys: Vec<u64> = t
                .range::<u64>(range)
                .map_err(|e| write_err(&e))?
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(|e| write_err(&e))?;
            for k in keys {
                t.remove(k).map_err(|e| write_err(&e))?;
            }
        }
        tx.commit().map_err(|e| write_err(&e))
    }
}

/// The in-memory state machine with what Raft needs to know about it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, BasicNode>,
    pub state: MetaState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    /// JSON of [`SmData`].
    data: Vec<u8>,
}

/// The applied state. Cheap to clone; [`StateMachine::read`] serves reads.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    data: Arc<RwLock<SmData>>,
    snapshot_counter: Arc<AtomicU64>,
}

impl StateMachine {
    /// Runs `f` on the current applied state (for reads served by this member).
    pub async fn read<T>(&self, f: impl FnOnce(&MetaState) -> T) -> T {
        f(&self.data.read().await.state)
    }

    /// [`Self::read`] without waiting, for callers that cannot await (a
    /// metrics scrape): None while an apply or a snapshot install holds the
    /// state (an apply holds it for the few microseconds of its commands).
    pub fn try_read<T>(&self, f: impl FnOnce(&MetaState) -> T) -> Option<T> {
        self.data.try_read().ok().map(|d| f(&d.state))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (data, last_applied, last_membership) = {
            let d = self.data.read().await;
            let bytes = serde_json::to_vec(&*d).map_err(|e| read_sm_err(&e))?;
            (bytes, d.last_applied, d.last_membership.clone())
        };
        let n = self.snapshot_counter.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
            None => format!("none-{n}"),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership, snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data: data.clone() };
        put_json(&self.db, SNAP, "current", &stored)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        let d = self.data.read().await;
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResult>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut d = self.data.write().await;
        let mut out = Vec::new();
        for e in entries {
            d.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => Ok(Response::Done),
                EntryPayload::Normal(cmd) => {
                    let r = d.state.apply(&cmd);
                    if let Err(err) = &r {
                        tracing::debug!(index = e.log_id.index, error = %err, "command refused");
                    }
                    r
                }
                EntryPayload::Membership(m) => {
                    d.last_membership = StoredMembership::new(Some(e.log_id), m);
                    Ok(Response::Done)
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let new: SmData = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        // Durable first: a crash after this reopens at the installed snapshot.
        put_json(&self.db, SNAP, "current", &StoredSnapshot { meta: meta.clone(), data })?;
        *self.data.write().await = new;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let s: Option<StoredSnapshot> = get_json(&self.db, SNAP, "current")?;
        Ok(s.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
