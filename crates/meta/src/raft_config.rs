//! The openraft [`Config`] of a meta member, built from its [`RaftTiming`]: the
//! one builder the meta service (`ballast-metasvc`) and the Raft simulator
//! (`ballast-sim`) both use, so the simulated Raft runs with the production
//! settings and differs only in the timings it is handed.

use openraft::{Config, ConfigError, SnapshotPolicy};

/// Raft timing (milliseconds) and snapshot cadence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaftTiming {
    /// Leader heartbeat interval. Default 250.
    pub heartbeat_ms: u64,
    /// Election timeout, drawn from `election_min_ms..election_max_ms` by each
    /// member. Default 1000..2000.
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Log entries between snapshots (older entries are then purged). Default 2000.
    pub snapshot_logs: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming { heartbeat_ms: 250, election_min_ms: 1000, election_max_ms: 2000, snapshot_logs: 2000 }
    }
}

impl RaftTiming {
    /// Fast elections for tests, `ballast dev` and the simulator: heartbeat
    /// 100 ms, election timeout 500..1000 ms.
    pub fn fast() -> RaftTiming {
        RaftTiming { heartbeat_ms: 100, election_min_ms: 500, election_max_ms: 1000, ..RaftTiming::default() }
    }
}

/// The validated openraft configuration of a meta member with `timing`.
/// Fails when the timings are out of order (the heartbeat must be shorter
/// than the minimum election timeout, which must be below the maximum).
// openraft's own error (what `Config::validate` returns, ~128 bytes), built
// once per member start.
#[allow(clippy::result_large_err)]
pub fn raft_config(timing: &RaftTiming) -> Result<Config, ConfigError> {
    Config {
        cluster_name: "ballast".into(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_min_ms,
        election_timeout_max: timing.election_max_ms,
        // The state is small (a TiB volume is 16 Ki chunk entries); snapshot often
        // enough that a restarted or new member catches up from a snapshot.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(timing.snapshot_logs.max(1)),
        max_in_snapshot_log_to_keep: timing.snapshot_logs / 4,
        ..Config::default()
    }
    .validate()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_reach_the_config() {
        let t = RaftTiming { heartbeat_ms: 50, election_min_ms: 300, election_max_ms: 301, snapshot_logs: 24 };
        let c = raft_config(&t).expect("valid timing");
        assert_eq!((c.heartbeat_interval, c.election_timeout_min, c.election_timeout_max), (50, 300, 301));
        assert_eq!(c.max_in_snapshot_log_to_keep, 6);
        assert!(matches!(c.snapshot_policy, SnapshotPolicy::LogsSinceLast(24)));
        raft_config(&RaftTiming::default()).expect("the default timing is valid");
        raft_config(&RaftTiming::fast()).expect("the fast timing is valid");
    }

    #[test]
    fn timings_out_of_order_are_refused() {
        let d = RaftTiming::default();
        let heartbeat_too_long = RaftTiming { heartbeat_ms: d.election_min_ms, ..d };
        assert!(matches!(raft_config(&heartbeat_too_long), Err(ConfigError::ElectionTimeoutLTHeartBeat { .. })));
        let empty_range = RaftTiming { election_max_ms: d.election_min_ms, ..d };
        assert!(matches!(raft_config(&empty_range), Err(ConfigError::ElectionTimeout { .. })));
    }
}
