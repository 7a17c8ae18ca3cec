//! [`SimMembership`]: the front end's [`Membership`] backed by the real
//! metadata state machine ([`MetaState::apply`]) held in-process, so epochs,
//! ejections, versions and the min-in-sync rule are the production ones. What
//! is simulated is only the service around it: commit latency, outages (every
//! call fails with `Unavailable`) and lost replies (the command committed, the
//! caller hears `Unavailable`). After every command the state's invariants
//! are checked ([`MetaState::check_invariants`]).
//!
//! A clone ([`SimMembership::make_clone`]): the volume's source image (a
//! block either holds version 1 of the verify pattern or zeros) and its
//! unfilled chunks are kept beside the state too: the attach names the
//! unfilled chunks, [`Membership::read_parent`] serves the image, and
//! [`Membership::chunks_filled`] records chunks with the same outages, lost
//! replies and epoch check as meta's FillChunks. While any chunk is unfilled
//! snapshots are refused, as meta refuses them (CloneFilling).
//!
//! Snapshot cuts ([`Membership::set_snapshots`]) are kept beside the state,
//! with the same outages and lost replies and the attach-epoch check meta's
//! CommitSnapshots makes; the named snapshots of the real service (requested
//! through Admin, taken from the layout by `ballast-metavolume`) are not
//! modelled: the front end's [`ballast_frontend::Volume::snapshot`] is.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ballast_frontend::{Attachment, EjectReason, Membership, MembershipError, Replica, ReplicaSet, VolumeLayout};
use ballast_meta::state::{ChunkEntry, Role, Volume as MetaVolume};
use ballast_meta::{Command, InvariantViolation, MetaError, MetaState, Response};
use ballast_types::{ChunkIdx, Epoch, NodeId, Seq, VolumeId, BLOCK_SIZE_U64};

use crate::replica::{lock, Shared};
use crate::rng::SimRng;

pub(crate) struct MetaInner {
    pub state: MetaState,
    /// Every call fails with `Unavailable` while set.
    pub down: bool,
    /// Probability that a committed command's reply is lost.
    pub lost_reply: f64,
    rng: SimRng,
    /// The first broken [`MetaState`] invariant seen after a command (the
    /// driver turns it into a violation at the end of the step).
    pub broken: Option<(Command, InvariantViolation)>,
    /// The volume's snapshot cuts, ascending, as last recorded.
    pub snapshots: Vec<Seq>,
    /// A clone's source image, per block: version 1 of the pattern (true) or
    /// zeros. Empty: the volume is not a clone.
    pub parent: Vec<bool>,
    /// A clone's chunks not recorded as filled yet.
    pub unfilled: std::collections::BTreeSet<ChunkIdx>,
}

impl MetaInner {
    /// Applies `cmd` to the state machine, then checks the state's invariants
    /// ([`MetaState::check_invariants`]); the first broken one is kept in
    /// `broken`.
    pub fn apply(&mut self, cmd: &Command) -> Result<Response, MetaError> {
        let r = self.state.apply(cmd);
        if self.broken.is_none() {
            if let Err(e) = self.state.check_invariants() {
                self.broken = Some((cmd.clone(), e));
            }
        }
        r
    }
}

/// The metadata service as the simulated front end sees it.
#[derive(Clone)]
pub struct SimMembership {
    inner: Arc<Mutex<MetaInner>>,
    world: Shared,
    /// The node the front end attaches from.
    node: NodeId,
}

impl SimMembership {
    pub(crate) fn new(state: MetaState, lost_reply: f64, rng: SimRng, world: Shared, node: NodeId) -> SimMembership {
        SimMembership {
            inner: Arc::new(Mutex::new(MetaInner {
                state,
                down: false,
                lost_reply,
                rng,
                broken: None,
                snapshots: Vec::new(),
                parent: Vec::new(),
                unfilled: Default::default(),
            })),
            world,
            node,
        }
    }

    /// Makes the volume a clone of `parent` (per block: version 1 of the
    /// pattern, or zeros) with all of its `chunks` chunks unfilled.
    pub(crate) fn make_clone(&self, parent: Vec<bool>, chunks: u32) {
        let mut m = self.inner();
        m.parent = parent;
        m.unfilled = (0..chunks).map(ChunkIdx).collect();
    }

    /// The clone's chunks not recorded as filled (0: independent or no clone).
    pub(crate) fn unfilled(&self) -> usize {
        self.inner().unfilled.len()
    }

    /// One call to the simulated service: the commit delay, then `Unavailable`
    /// while meta is down; else `f`'s result, traced by `line`, whose reply
    /// may be lost (`Unavailable` although `f` took effect). The outer error
    /// is the service's, the inner result `f`'s.
    async fn service<T, E>(
        &self,
        what: &str,
        f: impl FnOnce(&mut MetaInner) -> Result<T, E>,
        line: impl FnOnce(&Result<T, E>) -> String,
    ) -> Result<Result<T, E>, MembershipError> {
        let delay = Duration::from_micros(self.inner().rng.range(200, 3000));
        tokio::time::sleep(delay).await;
        let mut m = self.inner();
        if m.down {
            drop(m);
            lock(&self.world).trace.event(format!("meta {what}: unavailable"));
            return Err(MembershipError::Unavailable(format!("{what}: no leader")));
        }
        let r = f(&mut m);
        let lost_reply = m.lost_reply;
        let lost = r.is_ok() && m.rng.chance(lost_reply);
        drop(m);
        let line = line(&r);
        lock(&self.world).trace.event(if lost { format!("{line} (reply lost)") } else { line });
        if lost {
            return Err(MembershipError::Unavailable(format!("{what}: leader lost before the reply")));
        }
        Ok(r)
    }

    /// A service call beside the state machine ([`SimMembership::service`]).
    async fn beside<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut MetaInner) -> Result<T, MembershipError>,
    ) -> Result<T, MembershipError> {
        let line = |r: &Result<T, MembershipError>| match r {
            Ok(_) => format!("meta {what}"),
            Err(e) => format!("meta {what}: refused: {e}"),
        };
        self.service(what, f, line).await?
    }

    pub(crate) fn inner(&self) -> MutexGuard<'_, MetaInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `cmd` through the state machine after a commit delay, with the
    /// service's faults.
    async fn commit(&self, what: &str, cmd: Command) -> Result<Response, MembershipError> {
        let line = |r: &Result<Response, MetaError>| match r {
            Ok(Response::Epoch(e)) => format!("meta {what} -> {e}"),
            Ok(Response::Chunk(c)) => format!("meta {what} -> v{} {:?}", c.version, roles(c)),
            Ok(other) => format!("meta {what} -> {other:?}"),
            Err(e) => format!("meta {what} -> Err({e})"),
        };
        let r = self.service(what, |m| m.apply(&cmd), line).await?;
        r.map_err(|e| match e {
            MetaError::UnknownVolume(v) => MembershipError::UnknownVolume(v),
            MetaError::UnknownChunk { volume, chunk } => MembershipError::UnknownChunk { volume, chunk },
            MetaError::BelowMinInSync { chunk, node, remaining, min } => {
                MembershipError::BelowMinInSync { chunk, node, remaining, min }
            }
            other => MembershipError::Unavailable(format!("{what}: {other}")),
        })
    }
}

fn roles(c: &ChunkEntry) -> Vec<(u64, &'static str)> {
    c.replicas
        .iter()
        .map(|r| {
            let role = match r.role {
                Role::InSync => "in",
                Role::Rebuilding => "rb",
                Role::Ejected => "ej",
            };
            (r.node.0, role)
        })
        .collect()
}

/// One chunk entry as the front end's set (ejected replicas get
/// [`EjectReason::ReplicaError`]: the state machine does not keep reasons).
pub fn replica_set(c: &ChunkEntry) -> ReplicaSet {
    let of = |role: Role| c.replicas.iter().filter(move |r| r.role == role).map(|r| r.node);
    ReplicaSet {
        version: c.version,
        in_sync: of(Role::InSync).collect(),
        rebuilding: of(Role::Rebuilding).collect(),
        ejected: of(Role::Ejected).map(|n| (n, EjectReason::ReplicaError)).collect(),
    }
}

/// A metadata volume as the front end's layout (nodes: every registered node).
pub fn layout(state: &MetaState, v: &MetaVolume) -> VolumeLayout {
    VolumeLayout {
        volume: v.id,
        name: v.name.clone(),
        size: v.size,
        chunk_size: v.chunk_size,
        min_in_sync: v.min_in_sync,
        nodes: state.nodes.values().map(|n| Replica { node: n.id, addr: n.addr, zone: n.zone.clone() }).collect(),
        chunks: v.chunks.iter().map(replica_set).collect(),
    }
}

impl Membership for SimMembership {
    async fn attach(&self, volume: VolumeId) -> Result<Attachment, MembershipError> {
        let epoch = match self.commit("attach", Command::Attach { volume, node: self.node }).await? {
            Response::Epoch(e) => e,
            other => return Err(MembershipError::Unavailable(format!("attach answered {other:?}"))),
        };
        let m = self.inner();
        let v = m.state.volumes.get(&volume).ok_or(MembershipError::UnknownVolume(volume))?;
        let unfilled = m.unfilled.iter().copied().collect();
        Ok(Attachment { epoch, layout: layout(&m.state, v), snapshots: m.snapshots.clone(), unfilled })
    }

    async fn read_parent(&self, volume: VolumeId, offset: u64, len: u32) -> Result<bytes::Bytes, MembershipError> {
        let what = format!("read the source of {volume} at {offset}+{len}");
        self.beside(&what, |m| {
            if m.parent.is_empty() {
                return Err(MembershipError::Refused(format!("volume {volume} is not a clone")));
            }
            let bs = BLOCK_SIZE_U64;
            let mut out = Vec::with_capacity(len as usize);
            for b in offset / bs..(offset + u64::from(len)).div_ceil(bs) {
                match m.parent.get(b as usize) {
                    Some(true) => out.extend_from_slice(&crate::pattern::block(b, 1)),
                    _ => out.resize(out.len() + bs as usize, 0),
                }
            }
            Ok(bytes::Bytes::from(out))
        })
        .await
    }

    async fn chunks_filled(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        chunks: Vec<ChunkIdx>,
    ) -> Result<(), MembershipError> {
        let what = format!("fill chunks {chunks:?} at {epoch}");
        self.beside(&what, |m| {
            let current =
                m.state.volumes.get(&volume).map(|v| v.epoch).ok_or(MembershipError::UnknownVolume(volume))?;
            if current != epoch {
                return Err(MembershipError::Refused(format!("{what}: the volume was attached again at {current}")));
            }
            for c in &chunks {
                m.unfilled.remove(c);
            }
            Ok(())
        })
        .await
    }

    async fn set_snapshots(&self, volume: VolumeId, epoch: Epoch, cuts: Vec<Seq>) -> Result<(), MembershipError> {
        let what = format!("set snapshots {cuts:?} at {epoch}");
        self.beside(&what, |m| {
            let current =
                m.state.volumes.get(&volume).map(|v| v.epoch).ok_or(MembershipError::UnknownVolume(volume))?;
            if current != epoch {
                return Err(MembershipError::Refused(format!("{what}: the volume was attached again at {current}")));
            }
            if !m.unfilled.is_empty() && cuts.len() > m.snapshots.len() {
                return Err(MembershipError::Refused(format!(
                    "{what}: a clone still copying {} chunks",
                    m.unfilled.len()
                )));
            }
            m.snapshots = cuts;
            Ok(())
        })
        .await
    }

    async fn eject(
        &self,
        volume: VolumeId,
        chunk: ChunkIdx,
        version: u64,
        node: NodeId,
        reason: EjectReason,
    ) -> Result<ReplicaSet, MembershipError> {
        let what = format!("eject {node} from {chunk} at v{version} ({reason})");
        match self.commit(&what, Command::Eject { volume, chunk, version, node }).await? {
            Response::Chunk(c) => Ok(replica_set(&c)),
            other => Err(MembershipError::Unavailable(format!("eject answered {other:?}"))),
        }
    }
}
