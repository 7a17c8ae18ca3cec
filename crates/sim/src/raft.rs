//! The metadata service's Raft layer under the simulator: three (or five) real
//! openraft 0.9 [`Raft`] instances over the REAL [`ballast_meta::raft_store`]
//! (a redb database per member in a temporary directory, the production
//! `LogStore` and `StateMachine`, which apply commands with the real
//! [`MetaState::apply`]), connected by an in-memory [`RaftNetworkFactory`]
//! that carries every RPC through a simulated network, on a current-thread
//! tokio runtime with paused time.
//!
//! # Faults (rates in [`RaftFaults`], drawn from the seed)
//!
//! - per message (request and reply separately): a delay (reordering), a slow
//!   tail, loss. A request whose caller gave up still arrives late (it was
//!   already on the wire), and a lost reply means the request did apply;
//! - member crash: its `Raft` is shut down and dropped with every handle on its
//!   store; a restart reopens the same redb directory, which is all the state
//!   that survives (as a process restart: every redb commit is atomic and
//!   fsynced before openraft hears of it). Usually at most a minority is down;
//!   sometimes a majority (the cluster must then wait, and recover);
//! - partitions: a random split of members and client, or the current leader
//!   isolated from everyone; healed later;
//! - the client (member id 0 on the network) proposes [`Command`]s to the
//!   member it believes leads, follows `ForwardToLeader`, moves on after a
//!   timeout or a refused connection, and records each ACKNOWLEDGED write
//!   (the log id and result openraft returned, as the client received them).
//!
//! # Invariants
//!
//! Checked after every step (and as RPCs pass, for the leader checks):
//!
//! 1. no acknowledged write is lost: the committed entry at an acknowledged
//!    log id's index is that entry, with that command, on every member that
//!    is seen to commit that index (and at the end, on every member's log
//!    where it is not yet purged, and by its effect on the final state where it
//!    is: a registered node exists, a created volume exists, an attach epoch
//!    or an ejection's chunk version is not rolled back);
//! 2. state machine safety: every member's committed (applied) log entries
//!    agree index by index, and members at the same applied log id have the
//!    same [`MetaState`] (compared by a hash of its JSON);
//! 3. leaders: openraft 0.9 (without its `single-term-leader` feature, as
//!    ballast builds it) identifies a leader by `(term, node)` and by design
//!    allows two leaders in one term, the later elected one winning (see its
//!    docs, `docs::data::leader_id`). So "at most one leader per term" is not
//!    an invariant of this Raft; what is checked is that a member acting as
//!    leader holds a committed vote naming itself, and that every
//!    AppendEntries carrying a committed leader id is sent by that node. Terms
//!    with more than one leader are counted in the report, not failed;
//! 4. the structural [`MetaState`] invariants (a subset of those the meta
//!    crate's property tests check; that function is private to its tests):
//!    chunk counts, replica counts, no node twice in a chunk, at least
//!    min-in-sync in-sync replicas, node allocations equal to the replicas
//!    placed on them, no replica on an unknown node, `acked_gen <= layout_gen`.
//!
//! At the end every fault is healed, every member is up, loss stops, the
//! client's barrier write must be acknowledged within 60 s (virtual) and every
//! member must reach the same applied log id; then (1)-(4) are checked on the
//! final states.
//!
//! # What replays exactly, and what does not
//!
//! The seed fixes the fault schedule, the client's commands, and every
//! network draw (delay, loss), in the order messages are sent. openraft draws
//! its election timeout once per `Raft::new` from `rand::thread_rng()` through
//! its `AsyncRuntime`; ballast's `TypeConfig` uses the stock `TokioRuntime`
//! (and the real store implements the storage traits for that `TypeConfig`
//! only), so no custom runtime can supply a seeded rng. Instead each member
//! gets its own `Config` with `election_timeout_min = t` and
//! `election_timeout_max = t + 1`, `t` drawn from the seed (500..1000 ms) at
//! every (re)start: `gen_range(t..t + 1)` can only return `t`, so the timeouts
//! are the seed's and `thread_rng` has no effect.
//!
//! What the seed does NOT control: openraft's replication loop waits with an
//! unbiased `tokio::select!` (sleep against events, `replication/mod.rs`),
//! which picks a branch with tokio's per-runtime rng when both are ready; that
//! rng's seed can only be set with `--cfg tokio_unstable`. When both branches
//! are ready in the same poll the interleaving can differ between two runs of
//! one seed. In practice the CI seeds replay with identical traces (the test
//! `same_seed_same_trace` compares whole traces, which record every RPC); if a
//! seed ever diverges, its fault schedule and network draws still start the
//! same, and the replay command reruns the same scenario.
//!
//! # Commands
//!
//! ```text
//! cargo test --release -p ballast-sim --test raft                      # the CI seed set
//! BALLAST_RAFT_SEED=12 cargo test --release -p ballast-sim --test raft replay -- --nocapture
//! cargo run --release -p ballast-sim --example raft -- --seeds 0..2000 [--members 5] [--fault-rate 2] [--steps 60]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ballast_meta::raft_store::{self, LogStore, MetaResult, StateMachine, TypeConfig};
use ballast_meta::state::{Role, ZoneSpread};
use ballast_meta::{Command, MetaState, Response};
use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};
use openraft::error::{
    ClientWriteError, Infallible, InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, ClientWriteResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{BasicNode, Config, Entry, EntryPayload, LogId, Raft, RaftLogReader, ServerState, SnapshotPolicy};
use tokio::sync::oneshot;
use tokio::time::{sleep, Instant};

use crate::rng::SimRng;
use crate::trace::Trace;

/// The network address of the client.
const CLIENT: u64 = 0;
const HEARTBEAT_MS: u64 = 100;
/// Each member's election timeout is drawn from this range (inclusive).
const ELECTION_MS: (u64, u64) = (500, 999);
/// The client's wait for one attempt, and for one command in all.
const CLIENT_ATTEMPT: Duration = Duration::from_millis(1500);
const CLIENT_DEADLINE: Duration = Duration::from_secs(6);
/// After healing: how long a leader may take to acknowledge the barrier, and
/// every member to reach the same applied log id.
const HEAL_DEADLINE: Duration = Duration::from_secs(60);
/// The seed of the metadata state (placement): `ballast_metasvc::CLUSTER_SEED`.
const CLUSTER_SEED: u64 = 0x0ba1_1a57;
const CHUNK_SIZE: u64 = 64 << 10;
const CHUNKS: u64 = 4;

/// Probabilities of the injected faults: network ones per message, the others
/// per workload step.
#[derive(Clone, Debug, PartialEq)]
pub struct RaftFaults {
    /// A request (or, separately, its reply) is lost.
    pub drop: f64,
    /// A message takes up to `slow_delay_ms` instead of `max_delay_ms`.
    pub slow: f64,
    pub max_delay_ms: u64,
    pub slow_delay_ms: u64,
    /// Per step: a member crashes (its Raft dropped; the redb files stay).
    pub crash: f64,
    /// Per step and crashed member: it restarts from its redb directory.
    pub restart: f64,
    /// Per step: a random split of members and client.
    pub partition: f64,
    /// Per step: the current leader is cut off from everyone.
    pub isolate_leader: f64,
    /// Per step: a partition heals.
    pub heal: f64,
    /// Of the crashes, the share allowed to take down a majority.
    pub majority_down: f64,
    /// Per restart: the member comes back with an EMPTY directory (its disk
    /// replaced, vote and log forgotten). Raft does not survive that (a
    /// forgetful member can vote a stale candidate in and unmake a commit):
    /// 0 by default; a test turns it on to show the checks catch the loss.
    pub amnesia: f64,
}

impl RaftFaults {
    /// No faults (small delays only).
    pub fn none() -> RaftFaults {
        RaftFaults {
            drop: 0.0,
            slow: 0.0,
            max_delay_ms: 5,
            slow_delay_ms: 5,
            crash: 0.0,
            restart: 0.0,
            partition: 0.0,
            isolate_leader: 0.0,
            heal: 0.0,
            majority_down: 0.0,
            amnesia: 0.0,
        }
    }

    /// Every fault probability times `factor` (recovery rates and delays unchanged).
    pub fn scaled(&self, factor: f64) -> RaftFaults {
        let s = |p: f64| (p * factor).clamp(0.0, 1.0);
        RaftFaults {
            drop: s(self.drop),
            slow: s(self.slow),
            crash: s(self.crash),
            partition: s(self.partition),
            isolate_leader: s(self.isolate_leader),
            ..self.clone()
        }
    }
}

impl Default for RaftFaults {
    fn default() -> RaftFaults {
        RaftFaults {
            drop: 0.02,
            slow: 0.02,
            max_delay_ms: 5,
            slow_delay_ms: 600,
            crash: 0.1,
            restart: 0.3,
            partition: 0.08,
            isolate_leader: 0.08,
            heal: 0.3,
            majority_down: 0.2,
            amnesia: 0.0,
        }
    }
}

/// One run's parameters (the seed is separate).
#[derive(Clone, Debug)]
pub struct RaftSimConfig {
    /// Meta members (3 or 5; any odd number works).
    pub members: u64,
    /// Workload steps (each a batch of client commands with maybe a fault in the middle).
    pub steps: usize,
    /// The rates used are `rates.scaled(fault_rate)`.
    pub rates: RaftFaults,
    pub fault_rate: f64,
    /// Entries between snapshots (small, so that snapshots, log purges and
    /// snapshot installs on lagging members happen within a run).
    pub snapshot_logs: u64,
    /// Keep the trace lines (the hash is always computed).
    pub keep_trace: bool,
    /// Where the members' redb directories go (a fresh temporary directory
    /// under it per run); default `/dev/shm` when it exists (tmpfs: fsync is
    /// cheap, and a simulated crash is a process crash, which tmpfs survives),
    /// else the system temporary directory.
    pub dir: Option<PathBuf>,
}

impl Default for RaftSimConfig {
    fn default() -> RaftSimConfig {
        RaftSimConfig {
            members: 3,
            steps: 40,
            rates: RaftFaults::default(),
            fault_rate: 1.0,
            snapshot_logs: 24,
            keep_trace: false,
            dir: None,
        }
    }
}

impl RaftSimConfig {
    /// The defaults, overridden by `BALLAST_RAFT_MEMBERS`, `BALLAST_RAFT_STEPS`
    /// and `BALLAST_RAFT_FAULT_RATE` (what [`raft_replay_command`] names).
    pub fn from_env() -> RaftSimConfig {
        let mut cfg = RaftSimConfig::default();
        let var = |k: &str| std::env::var(k).ok();
        if let Some(m) = var("BALLAST_RAFT_MEMBERS").and_then(|v| v.parse().ok()) {
            cfg.members = m;
        }
        if let Some(s) = var("BALLAST_RAFT_STEPS").and_then(|v| v.parse().ok()) {
            cfg.steps = s;
        }
        if let Some(r) = var("BALLAST_RAFT_FAULT_RATE").and_then(|v| v.parse().ok()) {
            cfg.fault_rate = r;
        }
        cfg
    }
}

/// The command that replays `seed` under `cfg` with its trace printed.
pub fn raft_replay_command(seed: u64, cfg: &RaftSimConfig) -> String {
    let d = RaftSimConfig::default();
    let mut env = format!("BALLAST_RAFT_SEED={seed}");
    if cfg.members != d.members {
        env += &format!(" BALLAST_RAFT_MEMBERS={}", cfg.members);
    }
    if cfg.steps != d.steps {
        env += &format!(" BALLAST_RAFT_STEPS={}", cfg.steps);
    }
    if cfg.fault_rate != d.fault_rate {
        env += &format!(" BALLAST_RAFT_FAULT_RATE={}", cfg.fault_rate);
    }
    format!("{env} cargo test --release -p ballast-sim --test raft replay -- --nocapture")
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct RaftReport {
    pub seed: u64,
    pub trace_hash: u64,
    pub events: u64,
    /// Client commands acknowledged (committed, reply received).
    pub acked: u64,
    /// Client commands given up on (outcome unknown to the client).
    pub unacked: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub partitions: u64,
    /// Distinct leaders observed (by `(term, node)`).
    pub leaders: u64,
    /// Terms in which more than one member was leader (allowed by openraft 0.9).
    pub shared_terms: u64,
    pub rpcs: u64,
    pub lost_messages: u64,
    /// Members seen with a snapshot (built or installed).
    pub snapshots_seen: u64,
    /// The applied log index every member reached at the end.
    pub final_index: u64,
    pub virtual_time: Duration,
    pub trace: Vec<String>,
}

/// A broken invariant, with what replays it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("seed {seed}, step {step}: {what}\n  replay: {replay}\n  last trace lines:\n    {}", trace_tail.join("\n    "))]
pub struct RaftViolation {
    pub seed: u64,
    pub step: usize,
    pub what: String,
    pub replay: String,
    /// The last trace lines (only when the trace was kept).
    pub trace_tail: Vec<String>,
    /// The whole trace up to the violation (only when the trace was kept).
    pub trace: Vec<String>,
}

/// State shared by the network, the client and the members' observers.
struct World {
    rng: SimRng,
    rates: RaftFaults,
    /// Partition side per network address (0: the client, 1..: members):
    /// messages pass only between equal sides.
    side: Vec<u8>,
    /// The running `Raft` of each member (index = member id; 0 unused).
    rafts: Vec<Option<Raft<TypeConfig>>>,
    trace: Trace,
    /// Members seen leading, per term.
    leaders: BTreeMap<u64, BTreeSet<u64>>,
    /// Broken invariants noticed outside the main task.
    violations: Vec<String>,
    rpcs: u64,
    lost: u64,
}

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl World {
    fn connected(&self, a: u64, b: u64) -> bool {
        self.side[a as usize] == self.side[b as usize]
    }

    /// One message's delay.
    fn delay(&mut self) -> Duration {
        let bound = if self.rng.chance(self.rates.slow) { self.rates.slow_delay_ms } else { self.rates.max_delay_ms };
        Duration::from_micros(self.rng.range(100, bound.max(1) * 1000))
    }

    /// A leader `(term, node)` as seen from `by`: in an AppendEntries it sent
    /// (its committed vote) or in its own metrics.
    fn note_leader(&mut self, term: u64, node: u64, by: u64) {
        if node != by {
            self.violations.push(format!("member {by} acts as leader with leader id T{term}-N{node}"));
        }
        let set = self.leaders.entry(term).or_default();
        if set.insert(node) {
            let others: Vec<u64> = set.iter().copied().filter(|&n| n != node).collect();
            let line = if others.is_empty() {
                format!("leader: member {node} at term {term}")
            } else {
                format!(
                    "leader: member {node} at term {term} (also led by {others:?}: allowed by openraft's leader ids)"
                )
            };
            self.trace.event(line);
        }
    }
}

/// How a message exchange ended, as its sender sees it.
enum Delivery<T> {
    Reply(T),
    /// The target is down: connection refused.
    Refused,
    /// Request or reply lost (or the partition): the sender waited out its deadline.
    TimedOut,
}

/// Sends a request from `from` to `to`: after a drawn delay it is delivered to
/// the target's current `Raft` by `call` (in its own task, so it still arrives
/// when the sender gave up), and the reply comes back after another delay.
/// Loss and partitions are judged at delivery and at the reply's arrival.
async fn send<T, F, Fut>(world: &Shared, from: u64, to: u64, what: String, ttl: Duration, call: F) -> Delivery<T>
where
    F: FnOnce(Raft<TypeConfig>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let (d1, d2, lose_req, lose_rep) = {
        let mut w = lock(world);
        w.rpcs += 1;
        let (d1, d2) = (w.delay(), w.delay());
        let drop = w.rates.drop;
        (d1, d2, w.rng.chance(drop), w.rng.chance(drop))
    };
    let (tx, rx) = oneshot::channel();
    let w2 = world.clone();
    tokio::spawn(async move {
        sleep(d1).await;
        let raft = {
            let mut w = lock(&w2);
            if lose_req || !w.connected(from, to) {
                w.lost += 1;
                w.trace.event(format!("{what}: request lost"));
                return;
            }
            match w.rafts[to as usize].clone() {
                Some(r) => r,
                None => {
                    w.trace.event(format!("{what}: refused (member {to} down)"));
                    let _ = tx.send(Delivery::Refused);
                    return;
                }
            }
        };
        let out = call(raft).await;
        sleep(d2).await;
        let mut w = lock(&w2);
        if lose_rep || !w.connected(from, to) {
            w.lost += 1;
            w.trace.event(format!("{what}: reply lost"));
            return;
        }
        w.trace.event(format!("{what}: delivered"));
        let _ = tx.send(Delivery::Reply(out));
    });
    let deadline = Instant::now() + ttl;
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(d)) => d,
        Ok(Err(_)) => {
            tokio::time::sleep_until(deadline).await;
            Delivery::TimedOut
        }
        Err(_) => Delivery::TimedOut,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NetFault(&'static str);

/// The in-memory Raft transport of member `from`.
#[derive(Clone)]
pub struct SimNetwork {
    from: u64,
    world: Shared,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimConn;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> SimConn {
        SimConn { from: self.from, to: target, world: self.world.clone() }
    }
}

/// One member's connection to another.
pub struct SimConn {
    from: u64,
    to: u64,
    world: Shared,
}

type RpcErr<E> = RPCError<u64, BasicNode, RaftError<u64, E>>;

impl SimConn {
    // openraft's trait fixes the error type (RPCError, ~256 bytes).
    #[allow(clippy::result_large_err)]
    fn result<R, E: std::error::Error>(&self, d: Delivery<Result<R, RaftError<u64, E>>>) -> Result<R, RpcErr<E>> {
        match d {
            Delivery::Reply(Ok(r)) => Ok(r),
            // A member shutting down answers like a dead process.
            Delivery::Reply(Err(RaftError::Fatal(f))) => Err(RPCError::Unreachable(Unreachable::new(&f))),
            Delivery::Reply(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.to, e))),
            Delivery::Refused => Err(RPCError::Unreachable(Unreachable::new(&NetFault("connection refused")))),
            Delivery::TimedOut => Err(RPCError::Unreachable(Unreachable::new(&NetFault("timed out")))),
        }
    }
}

impl RaftNetwork<TypeConfig> for SimConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr<Infallible>> {
        let what = {
            let mut w = lock(&self.world);
            if rpc.vote.committed {
                w.note_leader(rpc.vote.leader_id.term, rpc.vote.leader_id.node_id, self.from);
            }
            let range = match (rpc.entries.first(), rpc.entries.last()) {
                (Some(a), Some(b)) => format!("{}..={}", a.log_id.index, b.log_id.index),
                _ => "-".into(),
            };
            format!(
                "{}->{} append {} prev {:?} entries {range} commit {:?}",
                self.from,
                self.to,
                rpc.vote,
                rpc.prev_log_id.map(|l| l.index),
                rpc.leader_commit.map(|l| l.index)
            )
        };
        let d = send(&self.world, self.from, self.to, what, option.hard_ttl(), move |raft| async move {
            raft.append_entries(rpc).await
        })
        .await;
        self.result(d)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let what = format!(
            "{}->{} snapshot {} offset {} done {}",
            self.from, self.to, rpc.meta.snapshot_id, rpc.offset, rpc.done
        );
        let d = send(&self.world, self.from, self.to, what, option.hard_ttl(), move |raft| async move {
            raft.install_snapshot(rpc).await
        })
        .await;
        self.result(d)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr<Infallible>> {
        let what = format!("{}->{} vote {} last {:?}", self.from, self.to, rpc.vote, rpc.last_log_id.map(|l| l.index));
        let d =
            send(
                &self.world,
                self.from,
                self.to,
                what,
                option.hard_ttl(),
                move |raft| async move { raft.vote(rpc).await },
            )
            .await;
        self.result(d)
    }
}

/// One acknowledged client write.
#[derive(Clone, Debug)]
struct Ack {
    log_id: LogId<u64>,
    cmd: Command,
    result: MetaResult,
    step: usize,
}

/// The seeded client: what it proposes, and whom it believes leads.
struct Client {
    rng: SimRng,
    members: u64,
    leader: u64,
    nodes: u64,
    creates: u64,
    /// Volumes a delete was proposed for (acknowledged or not).
    deleted: BTreeSet<VolumeId>,
}

fn node_addr(n: u64) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8), 7000))
}

impl Client {
    fn register(&mut self, id: u64) -> Command {
        Command::RegisterNode {
            id: NodeId(id),
            addr: node_addr(id),
            zone: Zone(format!("z{}", id % 3)),
            capacity: 1 << 40,
            now_ms: self.rng.below(1 << 40),
        }
    }

    fn volume(&mut self) -> VolumeId {
        VolumeId(self.rng.range(1, self.creates.max(1)))
    }

    fn node(&mut self) -> NodeId {
        NodeId(self.rng.range(1, self.nodes.max(1)))
    }

    /// The next command: cheap, state-changing ones the production service
    /// proposes (failures like an unknown volume are committed outcomes too).
    fn next_command(&mut self) -> Command {
        let r = self.rng.below(100);
        if self.nodes < 3 || r < 12 {
            let id = if self.nodes < 6 && self.rng.chance(0.7) {
                self.nodes += 1;
                self.nodes
            } else {
                self.node().0
            };
            return self.register(id);
        }
        if r < 30 {
            self.creates += 1;
            return Command::CreateVolume {
                name: format!("vol-{}", self.creates),
                size: CHUNKS * CHUNK_SIZE,
                chunk_size: CHUNK_SIZE,
                replicas: 3,
                min_in_sync: 2,
                zones: Vec::new(),
                zone_spread: ZoneSpread::Preferred,
            };
        }
        if self.creates == 0 || r < 45 {
            let id = self.node();
            return Command::Heartbeat {
                id,
                reported_used: self.rng.below(1 << 30),
                now_ms: self.rng.below(1 << 40),
                disk: Default::default(),
            };
        }
        let volume = self.volume();
        if r < 70 {
            let node = self.node();
            return Command::Attach { volume, node };
        }
        if r < 94 {
            let (chunk, version, node) = (ChunkIdx(self.rng.below(CHUNKS) as u32), self.rng.below(4), self.node());
            return Command::Eject { volume, chunk, version, node };
        }
        self.deleted.insert(volume);
        Command::DeleteVolume { volume }
    }

    /// Proposes `cmd` until a member acknowledges it or the deadline passes.
    async fn write(&mut self, world: &Shared, cmd: &Command) -> Option<ClientWriteResponse<TypeConfig>> {
        let deadline = Instant::now() + CLIENT_DEADLINE;
        while Instant::now() < deadline {
            let to = self.leader;
            let c = cmd.clone();
            let what = format!("client->{to} write");
            let d =
                send(world, CLIENT, to, what, CLIENT_ATTEMPT, move |raft| async move { raft.client_write(c).await })
                    .await;
            match d {
                Delivery::Reply(Ok(resp)) => return Some(resp),
                Delivery::Reply(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => match f.leader_id {
                    Some(l) if l != to => self.leader = l,
                    _ => {
                        self.leader = self.leader % self.members + 1;
                        sleep(Duration::from_millis(50)).await;
                    }
                },
                Delivery::Reply(Err(_)) | Delivery::Refused | Delivery::TimedOut => {
                    self.leader = self.leader % self.members + 1;
                    sleep(Duration::from_millis(20)).await;
                }
            }
        }
        None
    }
}

/// A client batch, run in its own task while faults happen.
async fn client_batch(world: Shared, mut client: Client, ops: u64, step: usize) -> (Client, Vec<Ack>, u64) {
    let (mut acks, mut failed) = (Vec::new(), 0);
    for _ in 0..ops {
        let cmd = client.next_command();
        lock(&world).trace.event(format!("client: propose {}", short(&cmd)));
        match client.write(&world, &cmd).await {
            Some(resp) => {
                lock(&world).trace.event(format!("client: acked at {} -> {}", resp.log_id, short_result(&resp.data)));
                acks.push(Ack { log_id: resp.log_id, cmd, result: resp.data, step });
            }
            None => {
                lock(&world).trace.event("client: gave up (outcome unknown)".into());
                failed += 1;
            }
        }
    }
    (client, acks, failed)
}

fn short(cmd: &Command) -> String {
    match cmd {
        Command::RegisterNode { id, .. } => format!("register {id}"),
        Command::Heartbeat { id, .. } => format!("heartbeat {id}"),
        Command::CreateVolume { name, .. } => format!("create {name}"),
        Command::Attach { volume, node } => format!("attach {volume} to {node}"),
        Command::Eject { volume, chunk, version, node } => format!("eject {node} from {volume}/{chunk} at v{version}"),
        Command::DeleteVolume { volume } => format!("delete {volume}"),
        other => format!("{other:?}"),
    }
}

fn short_result(r: &MetaResult) -> String {
    match r {
        Ok(Response::Chunk(c)) => format!("Ok(chunk v{})", c.version),
        Ok(other) => format!("Ok({other:?})"),
        Err(e) => format!("Err({e})"),
    }
}

/// FNV-1a of a value's JSON.
fn json_hash<T: serde::Serialize>(v: &T) -> u64 {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The structural invariants of any reachable [`MetaState`] (a subset of
/// `check_invariants` in the meta crate's property tests).
pub fn check_meta_state(s: &MetaState) -> Result<(), String> {
    let mut allocated: BTreeMap<NodeId, u64> = BTreeMap::new();
    for v in s.volumes.values() {
        if v.chunks.len() as u64 != v.size.div_ceil(v.chunk_size) {
            return Err(format!("{}: {} chunks for size {}", v.name, v.chunks.len(), v.size));
        }
        if v.acked_gen > v.layout_gen {
            return Err(format!("{}: acked_gen {} > layout_gen {}", v.name, v.acked_gen, v.layout_gen));
        }
        for (i, c) in v.chunks.iter().enumerate() {
            let rebuilding = c.replicas.iter().filter(|r| r.role == Role::Rebuilding).count();
            if c.in_sync().count() < v.min_in_sync {
                return Err(format!("{} chunk {i}: below min in-sync: {:?}", v.name, c.replicas));
            }
            if c.replicas.len() < v.replicas || c.replicas.len() > v.replicas + rebuilding {
                return Err(format!("{} chunk {i}: {} replicas for {}", v.name, c.replicas.len(), v.replicas));
            }
            let distinct: BTreeSet<NodeId> = c.replicas.iter().map(|r| r.node).collect();
            if distinct.len() != c.replicas.len() {
                return Err(format!("{} chunk {i}: a node twice: {:?}", v.name, c.replicas));
            }
            for r in &c.replicas {
                if !s.nodes.contains_key(&r.node) {
                    return Err(format!("{} chunk {i}: replica on unknown node {}", v.name, r.node));
                }
                *allocated.entry(r.node).or_default() += v.chunk_size;
            }
        }
    }
    for n in s.nodes.values() {
        let want = allocated.get(&n.id).copied().unwrap_or(0);
        if n.allocated != want {
            return Err(format!("node {} allocation {} != {want} placed", n.id, n.allocated));
        }
    }
    Ok(())
}

/// One meta member: its directory (its durable state) and, while up, handles
/// on its store for the checks.
struct Member {
    id: u64,
    dir: PathBuf,
    store: Option<(LogStore, StateMachine)>,
    /// The applied log id last checked.
    checked: Option<LogId<u64>>,
    /// Log entries up to this index were compared with the committed record.
    scanned: u64,
}

struct RaftSim {
    seed: u64,
    cfg: RaftSimConfig,
    replay: String,
    world: Shared,
    rng: SimRng,
    members: Vec<Member>,
    client: Option<Client>,
    step: usize,
    /// Acknowledged writes by log index.
    acked: BTreeMap<u64, Ack>,
    /// The committed entry at each index seen on any member: (log id, hash).
    committed: BTreeMap<u64, (LogId<u64>, u64)>,
    /// The state hash at each applied log id seen on any member.
    states: BTreeMap<u64, (LogId<u64>, u64)>,
    /// (member, snapshot index) pairs seen.
    snapshots: BTreeSet<(u64, u64)>,
    report: RaftReport,
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

    fn violation(&self, what: String) -> Box<RaftViolation> {
        Box::new(RaftViolation {
            seed: self.seed,
            step: self.step,
            what,
            replay: self.replay.clone(),
            trace_tail: Vec::new(),
            trace: Vec::new(),
        })
    }

    fn event(&self, line: String) {
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
        let timeout = self.rng.range(ELECTION_MS.0, ELECTION_MS.1);
        let snapshot_logs = self.cfg.snapshot_logs.max(1);
        let config = Config {
            cluster_name: "ballast-sim".into(),
            heartbeat_interval: HEARTBEAT_MS,
            // `gen_range(t..t + 1)` is `t`: the seed, not `thread_rng`, picks it.
            election_timeout_min: timeout,
            election_timeout_max: timeout + 1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_logs),
            max_in_snapshot_log_to_keep: snapshot_logs / 4,
            ..Config::default()
        }
        .validate()
        .map_err(|e| self.violation(format!("raft config: {e}")))?;
        let network = SimNetwork { from: i, world: self.world.clone() };
        let raft = Raft::<TypeConfig>::new(i, Arc::new(config), network, log.clone(), sm.clone())
            .await
            .map_err(|e| self.violation(format!("member {i}: start raft: {e}")))?;
        self.event(format!("member {i} up (election timeout {timeout} ms)"));
        // Watch its metrics: every leadership it takes is recorded.
        let mut rx = raft.metrics();
        let world = self.world.clone();
        tokio::spawn(async move {
            loop {
                let (state, vote) = {
                    let m = rx.borrow_and_update();
                    (m.state, m.vote)
                };
                if state == ServerState::Leader {
                    let mut w = lock(&world);
                    if !vote.committed {
                        w.violations.push(format!("member {i} leads with an uncommitted vote {vote}"));
                    }
                    w.note_leader(vote.leader_id.term, vote.leader_id.node_id, i);
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
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

    /// Records an acknowledged write, checked against what is known committed.
    fn ack(&mut self, a: Ack) -> Result<(), Box<RaftViolation>> {
        let index = a.log_id.index;
        if let Some((id, _)) = self.committed.get(&index) {
            if *id != a.log_id {
                return Err(self.violation(format!(
                    "acknowledged write {} ({}) lost: index {index} committed as {id}",
                    a.log_id,
                    short(&a.cmd)
                )));
            }
        }
        self.report.acked += 1;
        if let Some(prev) = self.acked.insert(index, a.clone()) {
            return Err(self.violation(format!(
                "two acknowledged writes at index {index}: {} ({}) at step {} and {} ({})",
                prev.log_id,
                short(&prev.cmd),
                prev.step,
                a.log_id,
                short(&a.cmd)
            )));
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
                let h = json_hash(&state);
                match self.states.get(&applied.index) {
                    Some((lid, h2)) if *lid != applied || *h2 != h => {
                        return Err(self.violation(format!(
                            "state machine safety: member {id} applied {applied} (state {h:016x}), another member applied {lid} (state {h2:016x}) at the same index"
                        )));
                    }
                    Some(_) => {}
                    None => {
                        self.states.insert(applied.index, (applied, h));
                    }
                }
                check_meta_state(&state)
                    .map_err(|e| self.violation(format!("member {id} at {applied}: MetaState invariant: {e}")))?;
            }
            let log_state = log.get_log_state().await.map_err(|e| self.violation(err(&e)))?;
            let from = (self.members[k].scanned + 1).max(log_state.last_purged_log_id.map_or(0, |l| l.index + 1));
            if from <= applied.index {
                let entries =
                    log.try_get_log_entries(from..=applied.index).await.map_err(|e| self.violation(err(&e)))?;
                for e in &entries {
                    self.check_committed(id, e)?;
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

    /// A committed entry seen on member `id`.
    fn check_committed(&mut self, id: u64, e: &Entry<TypeConfig>) -> Result<(), Box<RaftViolation>> {
        let index = e.log_id.index;
        let h = json_hash(e);
        match self.committed.get(&index) {
            Some((lid, h2)) if *lid != e.log_id || *h2 != h => {
                return Err(self.violation(format!(
                    "state machine safety: member {id} committed {} at index {index}, another member {lid}",
                    e.log_id
                )));
            }
            Some(_) => {}
            None => {
                self.committed.insert(index, (e.log_id, h));
            }
        }
        if let Some(a) = self.acked.get(&index) {
            let same = matches!(&e.payload, EntryPayload::Normal(c) if *c == a.cmd);
            if a.log_id != e.log_id || !same {
                return Err(self.violation(format!(
                    "acknowledged write {} ({}, step {}) lost: member {id} committed {} at index {index}",
                    a.log_id,
                    short(&a.cmd),
                    a.step,
                    e.log_id
                )));
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
            hashes.insert(json_hash(&state));
            let acked: Vec<Ack> = self.acked.values().cloned().collect();
            for a in &acked {
                let i = a.log_id.index;
                let entries = log.try_get_log_entries(i..=i).await.map_err(|e| self.violation(e.to_string()))?;
                if let Some(e) = entries.first() {
                    self.check_committed(id, e)?;
                }
                self.check_effect(id, &state, a)?;
            }
        }
        if hashes.len() != 1 {
            return Err(self.violation(format!("final states differ at one applied log id: {} distinct", hashes.len())));
        }
        Ok(())
    }

    /// What an acknowledged write left in the final state: nodes are never
    /// removed, and epochs and chunk versions only grow; volumes the client
    /// proposed to delete (acknowledged or not) are skipped.
    fn check_effect(&self, id: u64, s: &MetaState, a: &Ack) -> Result<(), Box<RaftViolation>> {
        let deleted = |v: &VolumeId| self.client.as_ref().is_some_and(|c| c.deleted.contains(v));
        let lost = |what: String| {
            self.violation(format!("acknowledged write {} ({}) lost on member {id}: {what}", a.log_id, short(&a.cmd)))
        };
        match (&a.cmd, &a.result) {
            (Command::RegisterNode { id: n, .. }, Ok(_)) if !s.nodes.contains_key(n) => {
                Err(lost(format!("node {n} not registered")))
            }
            (Command::CreateVolume { name, .. }, Ok(Response::Volume(v))) if !deleted(v) => match s.volumes.get(v) {
                Some(vol) if &vol.name == name => Ok(()),
                other => Err(lost(format!("volume {v} is {:?}", other.map(|v| &v.name)))),
            },
            (Command::Attach { volume, .. }, Ok(Response::Epoch(e))) if !deleted(volume) => {
                match s.volumes.get(volume) {
                    Some(v) if v.epoch >= *e => Ok(()),
                    other => Err(lost(format!("epoch {e} rolled back to {:?}", other.map(|v| v.epoch)))),
                }
            }
            (Command::Eject { volume, chunk, .. }, Ok(Response::Chunk(c))) if !deleted(volume) => {
                let now = s.volumes.get(volume).and_then(|v| v.chunks.get(chunk.0 as usize)).map(|c| c.version);
                match now {
                    Some(v) if v >= c.version => Ok(()),
                    other => Err(lost(format!("chunk version {} rolled back to {other:?}", c.version))),
                }
            }
            _ => Ok(()),
        }
    }
}
