//! The simulated network between the members and the client: every RPC goes
//! through [`send`], which draws its delay and loss from the seed, judges
//! partitions at delivery and at the reply, and delivers to the target's
//! current `Raft` (none while it is down: connection refused).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ballast_meta::raft_store::TypeConfig;
use openraft::error::{Infallible, InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft};
use tokio::sync::oneshot;
use tokio::time::{sleep, Instant};

use super::RaftFaults;
use crate::rng::SimRng;
use crate::trace::Trace;

/// State shared by the network, the client and the members' observers.
pub(super) struct World {
    pub(super) rng: SimRng,
    pub(super) rates: RaftFaults,
    /// Partition side per network address (0: the client, 1..: members):
    /// messages pass only between equal sides.
    pub(super) side: Vec<u8>,
    /// The running `Raft` of each member (index = member id; 0 unused).
    pub(super) rafts: Vec<Option<Raft<TypeConfig>>>,
    pub(super) trace: Trace,
    /// Members seen leading, per term.
    pub(super) leaders: BTreeMap<u64, BTreeSet<u64>>,
    /// Broken invariants noticed outside the main task.
    pub(super) violations: Vec<String>,
    pub(super) rpcs: u64,
    pub(super) lost: u64,
}

pub(super) type Shared = Arc<Mutex<World>>;

pub(super) fn lock(w: &Shared) -> MutexGuard<'_, World> {
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
}

/// How a message exchange ended, as its sender sees it.
pub(super) enum Delivery<T> {
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
pub(super) async fn send<T, F, Fut>(
    world: &Shared,
    from: u64,
    to: u64,
    what: String,
    ttl: Duration,
    call: F,
) -> Delivery<T>
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
    pub(super) from: u64,
    pub(super) world: Shared,
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
