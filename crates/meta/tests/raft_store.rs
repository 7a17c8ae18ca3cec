//! openraft's own storage test suite against the redb-backed log and state
//! machine, plus a reopen test: what was appended, voted and snapshotted is there
//! after the database is closed and opened again.

use ballast_meta::raft_store::{self, LogStore, StateMachine, TypeConfig};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{RaftLogReader, RaftSnapshotBuilder, StorageError};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = raft_store::open(dir.path(), 1)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

#[tokio::test]
async fn state_survives_reopen() {
    use ballast_meta::state::Command;
    use ballast_types::{NodeId, Zone};
    use openraft::testing::log_id;
    use openraft::{Entry, EntryPayload, Vote};

    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut log, mut sm) = raft_store::open(dir.path(), 1).expect("open");
        log.save_vote(&Vote::new(3, 1)).await.expect("vote");
        let cmd = Command::RegisterNode {
            id: NodeId(7),
            addr: "127.0.0.1:7007".parse().expect("addr"),
            zone: Zone("a".into()),
            capacity: 1 << 40,
            now_ms: 0,
        };
        let e = Entry::<TypeConfig> { log_id: log_id(3, 1, 1), payload: EntryPayload::Normal(cmd) };
        // append's callback needs a Raft core; the suite covers it. Apply and snapshot here.
        sm.apply([e]).await.expect("apply");
        sm.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
    }
    let (mut log, mut sm) = raft_store::open(dir.path(), 1).expect("reopen");
    assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new(3, 1)));
    assert!(log.try_get_log_entries(0..10).await.expect("entries").is_empty());
    let (applied, _) = sm.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(3, 1, 1)));
    assert!(sm.read(|s| s.nodes.contains_key(&NodeId(7))).await, "the snapshot's state is back");
}
