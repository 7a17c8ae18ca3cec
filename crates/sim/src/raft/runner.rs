//! One seed's run: the members (started, crashed, restarted from their redb
//! directories), the workload with faults in the middle of client batches,
//! the observation of every running member after each step, then healing,
//! convergence and the final checks. What is checked is in `invariants/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_meta::raft_store::{self, LogStore, StateMachine, TypeConfig};
use ballast_meta::{raft_config, RaftTiming};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{BasicNode, LogId, Raft, RaftLogReader, ServerState};
use tokio::time::{sleep, Instant};

use super::client::{client_batch, Ack, Client};
use super::invariants::leaders;
use super::network::{lock, Shared, SimNetwork, World};
use super::{raft_replay_command, RaftFaults, RaftReport, RaftSimConfig, RaftViolation, CLUSTER_SEED, HEAL_DEADLINE};
use crate::rng::SimRng;
use crate::trace::Trace;

/// One meta member: its directory (its durable state) and, while up, handles
/// on its store for the checks.
pub(super) struct Member {
    pub(super) id: u64,
    pub(super) dir: PathBuf,
    pub(super) store: Option<(LogStore, StateMachine)>,
    /// The applied log id last checked.
    pub(super) checked: Option<LogId<u64>>,
    /// Log entries up to this index were compared with the committed record.
    pub(super) scanned: u64,
}

pub(super) struct RaftSim {
    pub(super) seed: u64,
    pub(super) cfg: RaftSimConfig,
    pub(super) replay: String,
    pub(super) world: Shared,
    pub(super) rng: SimRng,
    pub(super) members: Vec<Member>,
    pub(super) client: Option<Client>,
    pub(super) step: usize,
    /// Acknowledged writes by log index.
    pub(super) acked: BTreeMap<u64, Ack>,
    /// The committed entry at each index seen on any member: (log id, hash).
    pub(super) committed: BTreeMap<u64, (LogId<u64>, u64)>,
    /// The state hash at each applied log id seen on any member.
    pub(super) states: BTreeMap<u64, (LogId<u64>, u64)>,
    /// (member, snapshot index) pairs seen.
    pub(super) snapshots: BTreeSet<(u64, u64)>,
    pub(super) report: RaftReport,
}

/// Runs one seed: the workload with faults, then healing and the final checks.
pub fn run_raft_seed(seed: u64, cfg: &RaftSimConfig) -> Result<RaftReport, Box<RaftViolation>> {
    let replay = raft_replay_command(seed, cfg);
    let fail = |what: String| {
        Box::new(RaftViolation {
            seed,
            step: 0,
            what,
            replay: replay.clone(),
            trace_tail: Vec::new(),
            trace: Vec::new(),
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| fail(format!("cannot build the runtime: {e}")))?;
    let base = cfg.dir.clone().unwrap_or_else(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    });
    let tmp = tempfile::Builder::new()
        .prefix("ballast-raftsim-")
        .tempdir_in(&base)
        .map_err(|e| fail(format!("cannot create a directory under {}: {e}", base.display())))?;
    let mut scaled = cfg.clone();
    scaled.rates = cfg.rates.scaled(cfg.fault_rate);
    let out = rt.block_on(async {
        let mut sim = RaftSim::new(seed, scaled, replay.clone(), tmp.path());
        let r = sim.run().await;
        // Stop every member before the runtime (and the directories) go.
        for i in 1..=sim.cfg.members {
            sim.crash(i, false).await;
        }
        let w = lock(&sim.world);
        sim.report.trace_hash = w.trace.hash();
        sim.report.events = w.trace.events();
        sim.report.virtual_time = w.trace.now();
        sim.report.trace = w.trace.lines().to_vec();
        sim.report.rpcs = w.rpcs;
        sim.report.lost_messages = w.lost;
        sim.report.leaders = w.leaders.values().map(|s| s.len() as u64).sum();
        sim.report.shared_terms = w.leaders.values().filter(|s| s.len() > 1).count() as u64;
        sim.report.snapshots_seen = sim.snapshots.len() as u64;
        let tail = w.trace.tail(40).to_vec();
        let lines = w.trace.lines().to_vec();
        drop(w);
        r.map(|()| sim.report.clone()).map_err(|mut v| {
            v.trace_tail = tail;
            v.trace = lines;
            v
        })
    });
    drop(rt);
    out
}

impl RaftSim {
    fn new(seed: u64, cfg: RaftSimConfig, replay: String, dir: &Path) -> RaftSim {
        let n = cfg.members;
        let world = Arc::new(Mutex::new(World {
            rng: SimRng::derive(seed, 1),
            rates: cfg.rates.clone(),
            side: vec![0; n as usize + 1],
            rafts: vec![None; n as usize + 1],
            trace: Trace::new(cfg.keep_trace),
            leaders: BTreeMap::new(),
            violations: Vec::new(),
            rpcs: 0,
            lost: 0,
        }));
        let members = (1..=n)
            .map(|id| Member { id, dir: dir.join(format!("member-{id}")), store: None, checked: None, scanned: 0 })
            .collect();
        let client = Client {
            rng: SimRng::derive(seed, 2),
            members: n,
            leader: 1,
            nodes: 0,
            creates: 0,
            deleted: BTreeSet::new(),
        };
        RaftSim {
            seed,
            cfg,
            replay,
            world,
            rng: SimRng::derive(seed, 3),
            members,
            client: Some(client),
            step: 0,
            acked: BTreeMap::new(),
            committed: BTreeMap::new(),
            states: BTreeMap::new(),
            snapshots: BTreeSet::new(),
            report: RaftReport { seed, ..RaftReport::default() },
        }
    }

    pub(super) fn violation(&self, what: String) -> Box<RaftViolation> {
        Box::new(RaftViolation {
            seed: self.seed,
            step: self.step,
            what,
            replay: self.replay.clone(),
            trace_tail: Vec::new(),
            trace: Vec::new(),
        })
    }

    pub(super) fn event(&self, line: String) {
        lock(&self.world).trace.event(line);
    }

    fn is_up(&self, i: u64) -> bool {
        lock(&self.world).rafts[i as usize].is_some()
    }

    /// Starts member `i` from its directory (a restart when it has state).
    async fn start(&mut self, i: u64) -> Result<(), Box<RaftViolation>> {
        let dir = self.members[i as usize - 1].dir.clone();
        // The stopped instance's tasks may still hold the database for a few
        // scheduler turns after `shutdown` returned: redb refuses a second open.
        let mut tries = 0;
        let (log, sm) = loop {
            match raft_store::open(&dir, CLUSTER_SEED) {
                Ok(s) => break s,
                Err(e) if tries >= 200 => return Err(self.violation(format!("member {i}: reopen: {e}"))),
                Err(_) => {
                    tries += 1;
                    sleep(Duration::from_millis(1)).await;
                }
            }
        };
        // The production configuration (`ballast_meta::raft_config`) with the
        // fast timing of the test clusters, but a timeout drawn from the seed
        // in its range: `gen_range(t..t + 1)` is `t`, so the seed, not
        // `thread_rng`, picks it.
        let fast = RaftTiming::fast();
        let timeout = self.rng.range(fast.election_min_ms, fast.election_max_ms - 1);
        let timing = RaftTiming {
            election_min_ms: timeout,
            election_max_ms: timeout + 1,
            snapshot_logs: self.cfg.snapshot_logs,
            ..fast
        };
        let config = raft_config(&timing).map_err(|e| self.violation(format!("raft config: {e}")))?;
        let network = SimNetwork { from: i, world: self.world.clone() };
        let raft = Raft::<TypeConfig>::new(i, Arc::new(config), network, log.clone(), sm.clone())
            .await
            .map_err(|e| self.violation(format!("member {i}: start raft: {e}")))?;
        self.event(format!("member {i} up (election timeout {timeout} ms)"));
        // Watch its metrics: every leadership it takes is recorded (invariant 3).
        leaders::watch(&self.world, i, &raft);
        lock(&self.world).rafts[i as usize] = Some(raft);
        let m = &mut self.members[i as usize - 1];
        m.store = Some((log, sm));
        m.checked = None;
        Ok(())
    }

    /// Stops member `i` (a crash: its Raft and every handle on its store are
    /// dropped; the redb files stay).
    async fn crash(&mut self, i: u64, trace: bool) {
        let raft = lock(&self.world).rafts[i as usize].take();
        self.members[i as usize - 1].store = None;
        if let Some(r) = raft {
            if trace {
                self.event(format!("fault: member {i} crashes"));
                self.report.crashes += 1;
            }
            // Returns once RaftCore stopped; a failure only means it had already.
            let _ = r.shutdown().await;
        }
    }

    /// The member that leads in the highest term among the running ones.
    fn leader(&self) -> Option<u64> {
        let w = lock(&self.world);
        w.rafts
            .iter()
            .flatten()
            .map(|r| r.metrics().borrow().clone())
            .filter(|m| m.state == ServerState::Leader)
            .max_by_key(|m| m.vote.leader_id)
            .map(|m| m.id)
    }

    async fn run(&mut self) -> Result<(), Box<RaftViolation>> {
        for i in 1..=self.cfg.members {
            self.start(i).await?;
        }
        let all: BTreeMap<u64, BasicNode> =
            (1..=self.cfg.members).map(|i| (i, BasicNode { addr: format!("meta-{i}") })).collect();
        let first = lock(&self.world).rafts[1].clone();
        if let Some(r) = first {
            r.initialize(all).await.map_err(|e| self.violation(format!("initialize: {e}")))?;
        }
        for step in 0..self.cfg.steps {
            self.step = step;
            let ops = self.rng.range(1, 4);
            let client = self.client.take().ok_or_else(|| self.violation("client lost".into()))?;
            let task = tokio::spawn(client_batch(self.world.clone(), client, ops, step));
            sleep(Duration::from_millis(self.rng.range(0, 1500))).await;
            self.fault().await?;
            let (client, acks, failed) = task.await.map_err(|e| self.violation(format!("client task: {e}")))?;
            self.client = Some(client);
            self.report.unacked += failed;
            for a in acks {
                self.ack(a)?;
            }
            self.observe().await?;
        }
        self.heal_and_check().await
    }

    /// Maybe injects one crash, restarts, one partition change.
    async fn fault(&mut self) -> Result<(), Box<RaftViolation>> {
        let n = self.cfg.members;
        let r = self.cfg.rates.clone();
        let down: Vec<u64> = (1..=n).filter(|&i| !self.is_up(i)).collect();
        if self.rng.chance(r.crash) {
            let cap = if self.rng.chance(r.majority_down) { n } else { (n - 1) / 2 };
            if (down.len() as u64) < cap {
                let up: Vec<u64> = (1..=n).filter(|&i| self.is_up(i)).collect();
                // Half the time the leader, when there is one.
                let victim = match self.leader() {
                    Some(l) if self.rng.chance(0.5) => l,
                    _ => up[self.rng.below(up.len() as u64) as usize],
                };
                self.crash(victim, true).await;
            }
        }
        for i in down {
            if self.rng.chance(r.restart) {
                if r.amnesia > 0.0 && self.rng.chance(r.amnesia) {
                    let dir = &self.members[i as usize - 1].dir;
                    std::fs::remove_dir_all(dir)
                        .map_err(|e| self.violation(format!("wiping {}: {e}", dir.display())))?;
                    self.event(format!("fault: member {i} lost its disk"));
                }
                self.event(format!("fault: member {i} restarts"));
                self.report.restarts += 1;
                self.start(i).await?;
            }
        }
        let partitioned = lock(&self.world).side.iter().any(|&s| s != 0);
        if partitioned {
            if self.rng.chance(r.heal) {
                self.event("fault: partition healed".into());
                lock(&self.world).side.iter_mut().for_each(|s| *s = 0);
            }
        } else if self.rng.chance(r.partition) {
            let sides: Vec<u8> = (0..=n).map(|_| self.rng.below(2) as u8).collect();
            self.event(format!("fault: partition {sides:?} (client, members 1..)"));
            self.report.partitions += 1;
            lock(&self.world).side = sides;
        } else if self.rng.chance(r.isolate_leader) {
            if let Some(l) = self.leader() {
                self.event(format!("fault: leader {l} isolated"));
                self.report.partitions += 1;
                lock(&self.world).side[l as usize] = 1;
            }
        }
        Ok(())
    }

    /// Checks every running member: its applied state against the others' at
    /// the same log id, its committed log entries against the others' and the
    /// acknowledged writes, and the state's invariants; plus what the network
    /// and the metrics watchers noticed.
    async fn observe(&mut self) -> Result<(), Box<RaftViolation>> {
        if let Some(v) = lock(&self.world).violations.first().cloned() {
            return Err(self.violation(v));
        }
        for k in 0..self.members.len() {
            let Some((mut log, mut sm)) = self.members[k].store.clone() else { continue };
            let id = self.members[k].id;
            // A running member whose RaftCore is gone panicked or hit a fatal
            // (storage) error: nothing in the fault model stops one.
            let stopped = lock(&self.world).rafts[id as usize].as_ref().map(|r| {
                let rx = r.metrics();
                let fatal = rx.borrow().running_state.clone().err();
                (rx.has_changed().is_err(), fatal)
            });
            if let Some((gone, fatal)) = stopped {
                if gone || fatal.is_some() {
                    return Err(
                        self.violation(format!("member {id}'s Raft stopped by itself: {fatal:?} (a panic if None)"))
                    );
                }
            }
            let err = |e: &dyn std::fmt::Display| format!("member {id}: storage: {e}");
            // The applied id and the state, read without an apply in between.
            let (a1, _) = sm.applied_state().await.map_err(|e| self.violation(err(&e)))?;
            let state = sm.read(|s| s.clone()).await;
            let (a2, _) = sm.applied_state().await.map_err(|e| self.violation(err(&e)))?;
            let Some(applied) = a1.filter(|_| a1 == a2) else { continue };
            if self.members[k].checked != Some(applied) {
                self.members[k].checked = Some(applied);
                self.check_applied_state(id, applied, &state)?;
                self.check_meta_state(id, applied, &state)?;
            }
            let log_state = log.get_log_state().await.map_err(|e| self.violation(err(&e)))?;
            let from = (self.members[k].scanned + 1).max(log_state.last_purged_log_id.map_or(0, |l| l.index + 1));
            if from <= applied.index {
                let entries =
                    log.try_get_log_entries(from..=applied.index).await.map_err(|e| self.violation(err(&e)))?;
                for e in &entries {
                    self.check_committed(id, e)?;
                    self.check_acked_entry(id, e)?;
                }
                self.members[k].scanned = applied.index;
            }
            let snapshot = lock(&self.world).rafts[id as usize].as_ref().and_then(|r| r.metrics().borrow().snapshot);
            if let Some(s) = snapshot {
                self.snapshots.insert((id, s.index));
            }
        }
        Ok(())
    }

    /// Heals everything, waits for a leader and for every member to converge,
    /// and checks the final states.
    async fn heal_and_check(&mut self) -> Result<(), Box<RaftViolation>> {
        self.step = self.cfg.steps;
        self.event("heal: partitions healed, loss off, every member up".into());
        {
            let mut w = lock(&self.world);
            w.side.iter_mut().for_each(|s| *s = 0);
            w.rates = RaftFaults::none();
        }
        for i in 1..=self.cfg.members {
            if !self.is_up(i) {
                self.start(i).await?;
            }
        }
        // The barrier: one write committed in the final term, after which every
        // earlier acknowledged write is below the commit index everywhere.
        let mut client = self.client.take().ok_or_else(|| self.violation("client lost".into()))?;
        let barrier = client.register(1);
        let start = Instant::now();
        let mut barrier_at = None;
        while barrier_at.is_none() && start.elapsed() < HEAL_DEADLINE {
            if let Some(resp) = client.write(&self.world, &barrier).await {
                self.event(format!("barrier acked at {}", resp.log_id));
                barrier_at = Some(resp.log_id);
                self.ack(Ack { log_id: resp.log_id, cmd: barrier.clone(), result: resp.data, step: self.step })?;
            }
        }
        self.client = Some(client);
        let Some(barrier_at) = barrier_at else {
            return Err(self.violation("no leader acknowledged a write within 60 s of healing".into()));
        };
        let start = Instant::now();
        loop {
            self.observe().await?;
            let applied: Vec<Option<LogId<u64>>> = self.members.iter().map(|m| m.checked).collect();
            let converged = applied.iter().all(|a| a.is_some_and(|a| a.index >= barrier_at.index))
                && applied.windows(2).all(|w| w[0] == w[1]);
            if converged {
                self.report.final_index = barrier_at.index.max(applied[0].map_or(0, |a| a.index));
                break;
            }
            if start.elapsed() > HEAL_DEADLINE {
                return Err(self.violation(format!(
                    "members did not converge within 60 s of healing: applied {applied:?}, barrier at {barrier_at}"
                )));
            }
            sleep(Duration::from_millis(100)).await;
        }
        self.final_checks().await
    }

    /// Every acknowledged write is in every member's log (or below its
    /// snapshot, and then visible in the state), and the states agree.
    async fn final_checks(&mut self) -> Result<(), Box<RaftViolation>> {
        let mut hashes = BTreeSet::new();
        for k in 0..self.members.len() {
            let id = self.members[k].id;
            let Some((mut log, sm)) = self.members[k].store.clone() else {
                return Err(self.violation(format!("member {id} not up at the end")));
            };
            let state = sm.read(|s| s.clone()).await;
            hashes.insert(RaftSim::state_hash(&state));
            let acked: Vec<Ack> = self.acked.values().cloned().collect();
            for a in &acked {
                let i = a.log_id.index;
                let entries = log.try_get_log_entries(i..=i).await.map_err(|e| self.violation(e.to_string()))?;
                if let Some(e) = entries.first() {
                    self.check_committed(id, e)?;
                    self.check_acked_entry(id, e)?;
                }
                self.check_effect(id, &state, a)?;
            }
        }
        self.check_final_states(&hashes)
    }
}
