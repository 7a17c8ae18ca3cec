//! The seeded client (network address 0): the commands it proposes, whom it
//! believes leads, and what it records as ACKNOWLEDGED (the log id and result
//! openraft returned, as the client received them): the oracle the invariants
//! hold the members to.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ballast_meta::raft_store::{MetaResult, TypeConfig};
use ballast_meta::state::ZoneSpread;
use ballast_meta::{Command, Response};
use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::LogId;
use tokio::time::{sleep, Instant};

use super::network::{lock, send, Delivery, Shared};
use super::{CHUNKS, CHUNK_SIZE, CLIENT, CLIENT_ATTEMPT, CLIENT_DEADLINE};
use crate::rng::SimRng;

/// One acknowledged client write.
#[derive(Clone, Debug)]
pub(super) struct Ack {
    pub(super) log_id: LogId<u64>,
    pub(super) cmd: Command,
    pub(super) result: MetaResult,
    pub(super) step: usize,
}

/// The seeded client: what it proposes, and whom it believes leads.
pub(super) struct Client {
    pub(super) rng: SimRng,
    pub(super) members: u64,
    pub(super) leader: u64,
    pub(super) nodes: u64,
    pub(super) creates: u64,
    /// Volumes a delete was proposed for (acknowledged or not).
    pub(super) deleted: BTreeSet<VolumeId>,
}

fn node_addr(n: u64) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8), 7000))
}

impl Client {
    pub(super) fn register(&mut self, id: u64) -> Command {
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
    pub(super) async fn write(&mut self, world: &Shared, cmd: &Command) -> Option<ClientWriteResponse<TypeConfig>> {
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
pub(super) async fn client_batch(world: Shared, mut client: Client, ops: u64, step: usize) -> (Client, Vec<Ack>, u64) {
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

pub(super) fn short(cmd: &Command) -> String {
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
