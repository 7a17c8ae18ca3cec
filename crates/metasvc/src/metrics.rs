//! The meta members' Prometheus metrics (`ballast_meta_*`).
//!
//! A [`Collector`] reads each member's state at scrape time: its Raft metrics
//! (openraft's watch, plus the committed index the log store saves), its applied
//! state machine (nodes, volumes, chunk health by the liveness rule of
//! [`ballast_meta::state::replica_live`], jobs), and what only the leader knows
//! (copy progress). Two things are recorded as they happen, in [`Recorder`]: the
//! apply latency of this member's proposals and the bytes its finished copy jobs
//! copied.
//!
//! Every series carries `member="<raft id>"`, and one collector covers all the
//! members that run in one process (three in `ballast dev`), so each family is
//! written once with a series per member: an exposition must not repeat a family
//! (a registry per member under a `member` label would repeat every HELP and
//! TYPE line, which the text format refuses). Register once per process
//! ([`crate::register_metrics`] or [`crate::MetaHandle::register_metrics`]), not
//! under a registry that already labels `member`.
//!
//! Every member reports the state it has applied: a lagging follower shows an
//! older picture, so rules aggregate over members (`max`) or select the leader
//! (`ballast_meta_raft_is_leader == 1`).

use std::collections::BTreeSet;
use std::time::Duration;

use ballast_meta::state::{DiskHealth, JobKind, JobState, MetaState, NodeState, VolumeHealth};
use ballast_metrics::prometheus_client::collector::Collector;
use ballast_metrics::prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use ballast_metrics::prometheus_client::metrics::counter::ConstCounter;
use ballast_metrics::prometheus_client::metrics::gauge::ConstGauge;
use ballast_metrics::prometheus_client::metrics::MetricType;
use ballast_metrics::prometheus_client::registry::Unit;
use ballast_metrics::{Counter, Histogram, Registry};
use ballast_types::BLOCK_SIZE_U64;

use crate::service::Core;

/// What a member records as it happens (cheap handles: atomics behind `Arc`s).
#[derive(Clone, Debug)]
pub(crate) struct Recorder {
    /// Seconds from `client_write` to the entry applied on this member (openraft
    /// answers a write once the leader applied it), for this member's proposals.
    pub apply: Histogram,
    /// Bytes (blocks copied × block size) of the copy jobs that finished through
    /// this member as leader, by [`JobKind`] (index: [`kind_index`]).
    pub copied: [Counter; 2],
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder { apply: ballast_metrics::rpc_latency_histogram(), copied: Default::default() }
    }
}

impl Recorder {
    pub(crate) fn job_finished(&self, kind: JobKind, blocks_copied: u64) {
        self.copied[kind_index(kind)].inc_by(blocks_copied.saturating_mul(BLOCK_SIZE_U64));
    }
}

const KINDS: [(JobKind, &str); 2] = [(JobKind::Rebuild, "rebuild"), (JobKind::Resync, "resync")];

fn kind_index(k: JobKind) -> usize {
    match k {
        JobKind::Rebuild => 0,
        JobKind::Resync => 1,
    }
}

const NODE_STATES: [(NodeState, &str); 5] = [
    (NodeState::Up, "up"),
    (NodeState::Suspect, "suspect"),
    (NodeState::Down, "down"),
    (NodeState::Cordoned, "cordoned"),
    (NodeState::Draining, "draining"),
];

const DISKS: [&str; 3] = ["ok", "full", "failed"];

fn disk_index(d: &DiskHealth) -> usize {
    match d {
        DiskHealth::Ok => 0,
        DiskHealth::Full => 1,
        DiskHealth::Failed { .. } => 2,
    }
}

const JOB_STATES: [(JobState, &str); 3] =
    [(JobState::Active, "active"), (JobState::Done, "done"), (JobState::Failed, "failed")];

fn job_state_index(s: JobState) -> usize {
    match s {
        JobState::Active => 0,
        JobState::Done => 1,
        JobState::Failed => 2,
    }
}

/// Registers one collector for `members` under `ballast_` in `registry`.
pub(crate) fn register(registry: &mut Registry, members: Vec<Core>) {
    ballast_metrics::ballast(registry).register_collector(Box::new(MetaCollector { members }));
}

struct MetaCollector {
    members: Vec<Core>,
}

impl std::fmt::Debug for MetaCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u64> = self.members.iter().map(|c| c.id).collect();
        f.debug_struct("MetaCollector").field("members", &ids).finish()
    }
}

/// One member's Raft view at a scrape.
struct RaftView {
    term: u64,
    leader: u64,
    is_leader: bool,
    last_log: u64,
    committed: Option<u64>,
    applied: u64,
    voters: usize,
    learners: usize,
    /// On the leader: per other member, entries its log is behind ours.
    lag: Vec<(u64, u64)>,
}

fn raft_view(c: &Core) -> RaftView {
    let m = c.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let learners = membership.learner_ids().count();
    let last_log = m.last_log_index.unwrap_or(0);
    let lag = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, _)| **id != c.id)
                .map(|(id, matched)| (*id, last_log.saturating_sub(matched.map_or(0, |l| l.index))))
                .collect()
        })
        .unwrap_or_default();
    RaftView {
        term: m.current_term,
        leader: m.current_leader.unwrap_or(0),
        is_leader: m.current_leader == Some(c.id),
        last_log,
        committed: c.log.committed_index(),
        applied: m.last_applied.map_or(0, |l| l.index),
        voters: voters.len(),
        learners,
        lag,
    }
}

/// One member's applied state at a scrape, summed.
#[derive(Default)]
struct StateView {
    nodes: [u64; 5],
    disks: [u64; 3],
    volumes: u64,
    health: VolumeHealth,
    per_volume: Vec<(String, VolumeHealth)>,
    /// [kind][state]
    jobs: [[u64; 3]; 2],
    /// Per kind: bytes the active jobs still have to go through.
    remaining: [u64; 2],
}

fn state_view(s: &MetaState, progress: &std::collections::HashMap<u64, crate::convert::Progress>) -> StateView {
    let mut v = StateView::default();
    for n in s.nodes.values() {
        if let Some(i) = NODE_STATES.iter().position(|(st, _)| *st == n.state) {
            v.nodes[i] += 1;
        }
        v.disks[disk_index(&n.disk)] += 1;
    }
    v.volumes = s.volumes.len() as u64;
    for vol in s.volumes.values() {
        let h = s.volume_health(vol);
        v.health += h;
        v.per_volume.push((vol.name.clone(), h));
    }
    for j in s.jobs.values() {
        v.jobs[kind_index(j.kind)][job_state_index(j.state)] += 1;
        if j.is_active() {
            let chunk_len = s
                .volumes
                .get(&j.volume)
                .map_or(0, |vol| vol.chunk_size.min(vol.size.saturating_sub(u64::from(j.chunk.0) * vol.chunk_size)));
            let done = progress.get(&j.id).map_or(0, |p| p.bytes_done);
            v.remaining[kind_index(j.kind)] += chunk_len.saturating_sub(done);
        }
    }
    v
}

/// Reads the member's applied state without waiting on the async lock (a
/// scrape is synchronous): an apply holds it for microseconds, so a few tries
/// find it free. None if it stayed busy (that member's state series are left
/// out of this scrape rather than reported stale).
fn read_state(c: &Core) -> Option<StateView> {
    let progress = c.soft.progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for _ in 0..100 {
        if let Some(v) = c.sm.try_read(|s| state_view(s, &progress)) {
            return Some(v);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    tracing::debug!(member = c.id, "metrics scrape: state machine busy, state series left out");
    None
}

struct MemberView {
    id: String,
    raft: RaftView,
    state: Option<StateView>,
    apply: Histogram,
    copied: [u64; 2],
}

/// One family: its descriptor, then a series per member (and per extra label set).
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    ty: MetricType,
    mut series: impl FnMut(&mut MetricEncoder) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut m = encoder.encode_descriptor(name, help, unit, ty)?;
    series(&mut m)
}

/// Every gauge here is a count or an index: written as an integer.
fn gauge(m: &mut MetricEncoder, labels: &[(&str, &str)], v: u64) -> std::fmt::Result {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(m.encode_family(&labels)?)
}

fn counter(m: &mut MetricEncoder, labels: &[(&str, &str)], v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(m.encode_family(&labels)?)
}

impl Collector for MetaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let views: Vec<MemberView> = self
            .members
            .iter()
            .map(|c| MemberView {
                id: c.id.to_string(),
                raft: raft_view(c),
                state: read_state(c),
                apply: c.recorder.apply.clone(),
                copied: [c.recorder.copied[0].get(), c.recorder.copied[1].get()],
            })
            .collect();
        let e = &mut encoder;
        let (gauge_t, counter_t) = (MetricType::Gauge, MetricType::Counter);
        type RaftField = fn(&RaftView) -> u64;
        let raft: [(&str, &str, RaftField); 6] = [
            ("meta_raft_term", "This member's current Raft term", |r| r.term),
            ("meta_raft_leader_id", "The Raft leader this member knows (0: none)", |r| r.leader),
            ("meta_raft_is_leader", "1 if this member is the Raft leader, else 0", |r| u64::from(r.is_leader)),
            ("meta_raft_last_log_index", "Index of the last entry in this member's Raft log", |r| r.last_log),
            ("meta_raft_applied_index", "Index of the last entry this member applied to its state", |r| r.applied),
            ("meta_raft_voters", "Voting members in this member's Raft membership", |r| r.voters as u64),
        ];
        for (name, help, f) in raft {
            family(e, name, help, None, gauge_t, |m| {
                views.iter().try_for_each(|v| gauge(m, &[("member", &v.id)], f(&v.raft)))
            })?;
        }
        family(
            e,
            "meta_raft_committed_index",
            "Highest Raft log index this member knows committed (none before the first commit)",
            None,
            gauge_t,
            |m| {
                views.iter().try_for_each(|v| match v.raft.committed {
                    Some(c) => gauge(m, &[("member", &v.id)], c),
                    None => Ok(()),
                })
            },
        )?;
        family(
            e,
            "meta_raft_learners",
            "Non-voting members (learners) in this member's Raft membership",
            None,
            gauge_t,
            |m| views.iter().try_for_each(|v| gauge(m, &[("member", &v.id)], v.raft.learners as u64)),
        )?;
        family(
            e,
            "meta_raft_replication_lag_entries",
            "On the leader: entries each other member's log is behind the leader's (a lost member's grows)",
            None,
            gauge_t,
            |m| {
                views.iter().try_for_each(|v| {
                    v.raft
                        .lag
                        .iter()
                        .try_for_each(|(peer, lag)| gauge(m, &[("member", &v.id), ("peer", &peer.to_string())], *lag))
                })
            },
        )?;
        family(
            e,
            "meta_apply_latency",
            "Time from proposing a command to Raft to its result applied, for commands this member proposed as leader",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            |m| views.iter().try_for_each(|v| v.apply.encode(m.encode_family(&[("member", v.id.as_str())])?)),
        )?;
        family(
            e,
            "meta_job_copied",
            "Bytes copied (blocks copied x block size) by copy jobs that finished through this member as leader",
            Some(&Unit::Bytes),
            counter_t,
            |m| {
                views.iter().try_for_each(|v| {
                    KINDS.iter().try_for_each(|(k, kind)| {
                        counter(m, &[("member", &v.id), ("kind", kind)], v.copied[kind_index(*k)])
                    })
                })
            },
        )?;

        // The applied state, by the liveness rule.
        let with_state = || views.iter().filter_map(|v| v.state.as_ref().map(|s| (v.id.as_str(), s)));
        family(e, "meta_nodes", "Storage nodes by state", None, gauge_t, |m| {
            with_state().try_for_each(|(id, s)| {
                NODE_STATES
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, (_, st))| gauge(m, &[("member", id), ("state", st)], s.nodes[i]))
            })
        })?;
        family(
            e,
            "meta_node_disks",
            "Storage nodes by the health their disk probe last reported",
            None,
            gauge_t,
            |m| {
                with_state().try_for_each(|(id, s)| {
                    DISKS
                        .iter()
                        .enumerate()
                        .try_for_each(|(i, d)| gauge(m, &[("member", id), ("health", d)], s.disks[i]))
                })
            },
        )?;
        family(e, "meta_volumes", "Volumes", None, gauge_t, |m| {
            with_state().try_for_each(|(id, s)| gauge(m, &[("member", id)], s.volumes))
        })?;
        type HealthField = fn(&VolumeHealth) -> usize;
        let health: [(&str, &str, HealthField); 4] = [
            ("meta_chunks", "Chunks of all volumes", |h| h.chunks),
            (
                "meta_chunks_degraded",
                "Chunks with fewer live replicas than configured (a replica on a down or suspect node, on a failed disk, ejected or rebuilding is not live)",
                |h| h.degraded,
            ),
            (
                "meta_chunks_below_min_in_sync",
                "Chunks with fewer live replicas than their volume's min-in-sync: writes to them fail",
                |h| h.below_min_in_sync,
            ),
            ("meta_chunks_unavailable", "Chunks with no live replica: their data cannot be read", |h| h.unavailable),
        ];
        for (name, help, f) in health {
            family(e, name, help, None, gauge_t, |m| {
                with_state().try_for_each(|(id, s)| gauge(m, &[("member", id)], f(&s.health) as u64))
            })?;
        }
        let per_volume: [(&str, &str, HealthField); 2] = [
            ("meta_volume_chunks_degraded", "Per volume: chunks with fewer live replicas than configured", |h| {
                h.degraded
            }),
            (
                "meta_volume_chunks_below_min_in_sync",
                "Per volume: chunks with fewer live replicas than min-in-sync (writes fail)",
                |h| h.below_min_in_sync,
            ),
        ];
        for (name, help, f) in per_volume {
            family(e, name, help, None, gauge_t, |m| {
                with_state().try_for_each(|(id, s)| {
                    s.per_volume
                        .iter()
                        .try_for_each(|(vol, h)| gauge(m, &[("member", id), ("volume", vol)], f(h) as u64))
                })
            })?;
        }
        family(
            e,
            "meta_jobs",
            "Copy jobs by kind and state (done and failed: the finished jobs the state keeps, the newest 256)",
            None,
            gauge_t,
            |m| {
                with_state().try_for_each(|(id, s)| {
                    KINDS.iter().try_for_each(|(k, kind)| {
                        JOB_STATES.iter().try_for_each(|(st, state)| {
                            let n = s.jobs[kind_index(*k)][job_state_index(*st)];
                            gauge(m, &[("member", id), ("kind", kind), ("state", state)], n)
                        })
                    })
                })
            },
        )?;
        family(
            e,
            "meta_job_remaining",
            "Bytes the active copy jobs have yet to go through (chunk lengths less the progress the copying nodes reported to this member; a follower hears no progress)",
            Some(&Unit::Bytes),
            gauge_t,
            |m| {
                with_state().try_for_each(|(id, s)| {
                    KINDS.iter().try_for_each(|(k, kind)| {
                        gauge(m, &[("member", id), ("kind", kind)], s.remaining[kind_index(*k)])
                    })
                })
            },
        )?;
        Ok(())
    }
}
