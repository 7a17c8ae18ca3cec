//! The workload driver and the checker: one run per seed.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_blockdev::{BlockDev, BlockError};
use ballast_frontend::{Replica, Volume, VolumeOptions};
use ballast_meta::state::{JobKind, Role};
use ballast_meta::{Command, MetaState, Response, ZoneSpread};
use ballast_types::{ChunkId, ChunkIdx, NodeId, Seq, VolumeId, Zone, BLOCK_SIZE_U64};
use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use crate::meta::SimMembership;
use crate::pattern::{self, Seen};
use crate::replica::{lock, Shared, SimNode, SimReplica, World};
use crate::rng::SimRng;
use crate::trace::Trace;
use crate::{FaultRates, SimConfig, SimReport, Violation};
use ballast_verify::BlockModel;

type Vol = Volume<SimMembership, SimReplica>;

const NODES: u64 = 3;
const CHUNK_SIZE: u64 = 64 << 10;
const CHUNKS: u64 = 4;
const BLOCKS: u64 = CHUNKS * CHUNK_SIZE / BLOCK_SIZE_U64;
const MIN_IN_SYNC: usize = 2;
/// The front end runs on node 1 (reads prefer it).
const FRONTEND_NODE: NodeId = NodeId(1);

/// How a node is faulty (at most one at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Crashed,
    /// Stays down until the volume is next re-attached (see `reattach`).
    PowerCut,
    Partitioned,
}

/// One client operation's result, reported back to the driver.
enum Outcome {
    Write {
        first: u64,
        versions: Vec<u64>,
        fua: bool,
        r: Result<(), BlockError>,
    },
    Read {
        first: u64,
        acked_at_start: Vec<u64>,
        r: Result<Bytes, BlockError>,
    },
    Flush {
        snapshot: Vec<u64>,
        r: Result<(), BlockError>,
    },
    /// A snapshot taken amid the batch: `acked` per block when it was
    /// requested, `issued` once every write of the batch had its version.
    Snapshot {
        acked: Vec<u64>,
        issued: Vec<u64>,
        r: Result<Seq, BlockError>,
    },
    DeleteSnapshot {
        cut: Seq,
        r: Result<(), BlockError>,
    },
}

/// A snapshot the front end took, with the ledger around it: every block of
/// it must hold a version at or above `acked` and at most `issued`.
struct Taken {
    cut: Seq,
    acked: Vec<u64>,
    issued: Vec<u64>,
}

/// At most this many snapshots live at once (the oldest is deleted first).
const SNAPSHOTS_KEPT: usize = 2;

struct Sim {
    seed: u64,
    replay: String,
    cfg: SimConfig,
    rng: SimRng,
    world: Shared,
    meta: SimMembership,
    volume: VolumeId,
    model: Arc<Mutex<Vec<BlockModel>>>,
    vol: Option<Arc<Vol>>,
    fault: Option<(NodeId, Fault)>,
    step: usize,
    report: SimReport,
    snapshots: Vec<Taken>,
}

/// Runs one seed to completion: the workload with faults, then the final
/// check with everything healed. Deterministic: the same seed and config give
/// the same trace hash.
pub fn run_seed(seed: u64, cfg: &SimConfig) -> Result<SimReport, Box<Violation>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().map_err(|e| {
        Box::new(Violation {
            seed,
            step: 0,
            what: format!("cannot build the runtime: {e}"),
            block: 0,
            expected: String::new(),
            got: String::new(),
            replay: String::new(),
            trace_tail: Vec::new(),
            trace: Vec::new(),
        })
    })?;
    let mut cfg = cfg.clone();
    cfg.rates = cfg.rates.scaled(cfg.fault_rate);
    let replay = crate::replay_command(seed, &cfg);
    rt.block_on(async move {
        let mut sim = Sim::new(seed, cfg, replay);
        let r = sim.run().await;
        let w = lock(&sim.world);
        sim.report.trace_hash = w.trace.hash();
        sim.report.events = w.trace.events();
        sim.report.virtual_time = w.trace.now();
        sim.report.trace = w.trace.lines().to_vec();
        drop(w);
        r.map(|()| sim.report.clone())
    })
}

fn node_addr(n: u64) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, n as u8), 7000))
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig, replay: String) -> Sim {
        let mut state = MetaState::new(seed);
        for n in 1..=NODES {
            let reg = Command::RegisterNode {
                id: NodeId(n),
                addr: node_addr(n),
                zone: Zone(format!("z{n}")),
                capacity: 1 << 30,
                now_ms: 0,
            };
            state.apply(&reg).expect("registering a node in a fresh state");
        }
        let create = Command::CreateVolume {
            name: "sim".into(),
            size: CHUNKS * CHUNK_SIZE,
            chunk_size: CHUNK_SIZE,
            replicas: NODES as usize,
            min_in_sync: MIN_IN_SYNC,
            zones: Vec::new(),
            zone_spread: ZoneSpread::Required,
        };
        let volume = match state.apply(&create) {
            Ok(Response::Volume(v)) => v,
            other => panic!("creating the simulated volume: {other:?}"),
        };
        let nodes = (1..=NODES).map(|n| (NodeId(n), SimNode::new(SimRng::derive(seed, n)))).collect();
        let world: Shared = Arc::new(Mutex::new(World {
            nodes,
            rates: cfg.rates.clone(),
            deadline: cfg.io_timeout,
            trace: Trace::new(cfg.keep_trace),
        }));
        let meta = SimMembership::new(
            state,
            cfg.rates.meta_lost_reply,
            SimRng::derive(seed, 1000),
            world.clone(),
            FRONTEND_NODE,
        );
        // A third of the seeds run on a clone: every block of its source
        // image is version 1 or zeros, the model starts from it (acknowledged
        // and flushed), and the front end fills it while the workload runs.
        let mut model = vec![BlockModel::default(); BLOCKS as usize];
        let mut crng = SimRng::derive(seed, 2000);
        let mut report = SimReport { seed, ..SimReport::default() };
        if crng.chance(1.0 / 3.0) {
            let parent: Vec<bool> = (0..BLOCKS).map(|_| crng.chance(0.5)).collect();
            for (m, _) in model.iter_mut().zip(&parent).filter(|(_, p)| **p) {
                let v = m.issue();
                m.completed(v, true, true);
            }
            report.clone_source_blocks = parent.iter().filter(|p| **p).count() as u64;
            meta.make_clone(parent, CHUNKS as u32);
        }
        Sim {
            seed,
            replay,
            rng: SimRng::derive(seed, 0),
            cfg,
            world,
            meta,
            volume,
            model: Arc::new(Mutex::new(model)),
            vol: None,
            fault: None,
            step: 0,
            report,
            snapshots: Vec::new(),
        }
    }

    fn trace(&self, line: String) {
        lock(&self.world).trace.event(line);
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Vec<BlockModel>> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn violation(&self, what: impl Into<String>, block: u64, expected: String, got: String) -> Box<Violation> {
        let (trace_tail, trace) = {
            let w = lock(&self.world);
            (w.trace.tail(60).to_vec(), w.trace.lines().to_vec())
        };
        Box::new(Violation {
            seed: self.seed,
            step: self.step,
            what: what.into(),
            block,
            expected,
            got,
            replay: self.replay.clone(),
            trace_tail,
            trace,
        })
    }

    async fn run(&mut self) -> Result<(), Box<Violation>> {
        self.trace(format!("seed {} volume {} ({} blocks)", self.seed, self.volume, BLOCKS));
        self.attach(false).await?;
        while self.step < self.cfg.steps {
            self.step += 1;
            self.one_step().await?;
            self.check_meta()?;
        }
        self.finish().await?;
        self.check_meta()
    }

    /// The metadata state machine's invariants held after every command of
    /// the step (checked by [`SimMembership`] as it applies them).
    fn check_meta(&self) -> Result<(), Box<Violation>> {
        let broken = self.meta.inner().broken.clone();
        match broken {
            None => Ok(()),
            Some((cmd, e)) => Err(self.violation(
                format!("metadata state invariant broken after {cmd:?}"),
                0,
                e.invariant.to_string(),
                e.to_string(),
            )),
        }
    }

    /// One workload step: a fault, or a batch of client operations.
    async fn one_step(&mut self) -> Result<(), Box<Violation>> {
        let r = self.cfg.rates.clone();
        // Faults first, each drawn independently (the draws always happen, so
        // the stream does not depend on the state).
        let (crash, cut, part, recover, outage, fe) = (
            self.rng.chance(r.crash),
            self.rng.chance(r.power_cut),
            self.rng.chance(r.partition),
            self.rng.chance(r.recover),
            self.rng.chance(r.meta_outage),
            self.rng.chance(r.frontend_crash),
        );
        let victim = NodeId(self.rng.range(1, NODES));
        if self.fault.is_none() {
            if crash {
                self.node_fault(victim, Fault::Crashed);
            } else if cut {
                self.node_fault(victim, Fault::PowerCut);
            } else if part {
                self.node_fault(victim, Fault::Partitioned);
            }
        } else if recover {
            self.recover(false);
        }
        {
            let mut m = self.meta.inner();
            let flip = if m.down { self.rng.chance((r.meta_outage * 4.0).min(1.0)) } else { outage };
            if flip {
                m.down = !m.down;
                let down = m.down;
                drop(m);
                self.trace(format!("fault: metadata service {}", if down { "down" } else { "up" }));
            }
        }
        if fe {
            let stall = self.rng.chance(0.5);
            return self.reattach(stall).await;
        }
        if self.rng.chance(r.resync) {
            self.resync().await;
        }
        let handles = self.spawn_batch();
        self.collect(handles).await
    }

    fn node_fault(&mut self, node: NodeId, f: Fault) {
        let mut w = lock(&self.world);
        let Some(n) = w.nodes.get_mut(&node) else { return };
        let line = match f {
            Fault::Crashed => {
                n.crash();
                format!("fault: {node} crashed")
            }
            Fault::PowerCut => {
                let lost = n.power_cut();
                format!("fault: {node} lost power ({lost} unflushed blocks lost)")
            }
            Fault::Partitioned => {
                n.partitioned = true;
                format!("fault: {node} partitioned")
            }
        };
        w.trace.event(line);
        drop(w);
        self.report.replica_faults += 1;
        self.fault = Some((node, f));
    }

    /// Ends the current node fault (a power-cut node only when `reattaching`).
    fn recover(&mut self, reattaching: bool) {
        let Some((node, f)) = self.fault else { return };
        if f == Fault::PowerCut && !reattaching {
            return;
        }
        let mut w = lock(&self.world);
        if let Some(n) = w.nodes.get_mut(&node) {
            n.up = true;
            n.partitioned = false;
        }
        w.trace.event(format!("recover: {node} back ({f:?})"));
        drop(w);
        self.fault = None;
    }

    /// 1–3 concurrent client operations on disjoint blocks.
    fn spawn_batch(&mut self) -> Vec<JoinHandle<Outcome>> {
        let Some(vol) = self.vol.clone() else { return Vec::new() };
        let ops = self.rng.range(1, 3);
        let mut taken = BTreeSet::new();
        let mut handles = Vec::new();
        let mut snapshot_requested: Option<Vec<u64>> = None;
        for _ in 0..ops {
            let kind = self.rng.below(100);
            let first = self.rng.below(BLOCKS);
            let count = self.rng.range(1, 4).min(BLOCKS - first);
            let fua = self.rng.chance(0.2);
            if (first..first + count).any(|b| taken.contains(&b)) {
                continue;
            }
            taken.extend(first..first + count);
            let v = vol.clone();
            if kind < 55 {
                let versions = {
                    let mut m = self.model();
                    if (first..first + count).any(|b| m[b as usize].busy) {
                        continue;
                    }
                    (first..first + count).map(|b| m[b as usize].issue()).collect::<Vec<u64>>()
                };
                self.trace(format!("op: write blocks {first}..+{count} versions {versions:?} fua={fua}"));
                let mut buf = BytesMut::with_capacity((count * BLOCK_SIZE_U64) as usize);
                for (i, ver) in versions.iter().enumerate() {
                    buf.extend_from_slice(&pattern::block(first + i as u64, *ver));
                }
                let data = buf.freeze();
                handles.push(tokio::spawn(async move {
                    let r = v.write(first * BLOCK_SIZE_U64, data, fua).await;
                    Outcome::Write { first, versions, fua, r }
                }));
            } else if kind < 90 {
                let acked_at_start: Vec<u64> =
                    { self.model()[first as usize..(first + count) as usize].iter().map(|b| b.acked).collect() };
                self.trace(format!("op: read blocks {first}..+{count}"));
                let len = (count * BLOCK_SIZE_U64) as u32;
                handles.push(tokio::spawn(async move {
                    let r = v.read(first * BLOCK_SIZE_U64, len).await;
                    Outcome::Read { first, acked_at_start, r }
                }));
            } else if kind < 97 {
                let snapshot: Vec<u64> = self.model().iter().map(|b| b.acked).collect();
                self.trace("op: flush".into());
                handles.push(tokio::spawn(async move {
                    let r = v.flush().await;
                    Outcome::Flush { snapshot, r }
                }));
            } else if self.snapshots.len() >= SNAPSHOTS_KEPT {
                let cut = self.snapshots[0].cut;
                self.trace(format!("op: delete snapshot {cut}"));
                handles.push(tokio::spawn(async move {
                    let r = v.delete_snapshot(cut).await;
                    Outcome::DeleteSnapshot { cut, r }
                }));
            } else if snapshot_requested.is_none() {
                snapshot_requested = Some(self.model().iter().map(|b| b.acked).collect());
            }
        }
        // Spawned last, once every write of the batch has its version: the
        // snapshot runs amid them, so any of them may or may not be in it.
        if let Some(acked) = snapshot_requested {
            let issued: Vec<u64> = self.model().iter().map(|b| b.issued).collect();
            self.trace("op: snapshot".into());
            handles.push(tokio::spawn(async move {
                let r = vol.snapshot().await.map(|t| t.cut);
                Outcome::Snapshot { acked, issued, r }
            }));
        }
        handles
    }

    async fn collect(&mut self, handles: Vec<JoinHandle<Outcome>>) -> Result<(), Box<Violation>> {
        for h in handles {
            match h.await {
                Ok(o) => self.record(o)?,
                Err(e) => self.trace(format!("op task ended: {e}")),
            }
        }
        Ok(())
    }

    /// Applies an operation's result to the model, checking reads.
    fn record(&mut self, o: Outcome) -> Result<(), Box<Violation>> {
        match o {
            Outcome::Write { first, versions, fua, r } => {
                self.trace(format!("done: write blocks {first}..+{} -> {r:?}", versions.len()));
                let mut m = self.model();
                for (i, ver) in versions.iter().enumerate() {
                    let bm = &mut m[(first + i as u64) as usize];
                    bm.completed(*ver, r.is_ok(), fua);
                }
                drop(m);
                if r.is_ok() {
                    self.report.acked_writes += 1;
                } else {
                    self.report.failed_ops += 1;
                }
            }
            Outcome::Read { first, acked_at_start, r } => {
                match &r {
                    Ok(d) => self.trace(format!(
                        "done: read blocks {first}..+{} -> {}",
                        acked_at_start.len(),
                        seen_list(first, d)
                    )),
                    Err(e) => self.trace(format!("done: read blocks {first}..+{} -> Err({e})", acked_at_start.len())),
                }
                match r {
                    Ok(data) => {
                        self.report.reads_checked += 1;
                        for (i, floor) in acked_at_start.iter().enumerate() {
                            let b = first + i as u64;
                            let bs = BLOCK_SIZE_U64 as usize;
                            let seen = pattern::decode(b, &data[i * bs..(i + 1) * bs]);
                            self.check(b, *floor, &seen, "read")?;
                        }
                    }
                    Err(_) => self.report.failed_ops += 1,
                }
            }
            Outcome::Snapshot { acked, issued, r } => {
                self.trace(format!("done: snapshot -> {r:?}"));
                match r {
                    Ok(cut) => {
                        self.report.snapshots += 1;
                        self.snapshots.push(Taken { cut, acked, issued });
                    }
                    Err(_) => self.report.failed_ops += 1,
                }
            }
            Outcome::DeleteSnapshot { cut, r } => {
                self.trace(format!("done: delete snapshot {cut} -> {r:?}"));
                match r {
                    Ok(()) => self.snapshots.retain(|t| t.cut != cut),
                    Err(_) => self.report.failed_ops += 1,
                }
            }
            Outcome::Flush { snapshot, r } => {
                self.trace(format!("done: flush -> {r:?}"));
                if r.is_ok() {
                    let mut m = self.model();
                    for (bm, v) in m.iter_mut().zip(snapshot) {
                        bm.flushed = bm.flushed.max(v);
                    }
                } else {
                    self.report.failed_ops += 1;
                }
            }
        }
        Ok(())
    }

    /// The invariant for one block read back: its own data, of version
    /// `floor` (the last acknowledged when the read started) or of a later
    /// issued write, and never a fenced front end's.
    fn check(&self, b: u64, floor: u64, seen: &Seen, what: &str) -> Result<(), Box<Violation>> {
        self.model()[b as usize].check(floor, seen, what).map_err(|m| self.violation(m.what, b, m.expected, m.got))
    }

    /// Front-end crash (or stall) and a new attach. A crash aborts a batch
    /// mid-flight and drops the volume; a stall keeps the old volume, which
    /// then tries to write after the new attach and must be fenced.
    async fn reattach(&mut self, stall: bool) -> Result<(), Box<Violation>> {
        let handles = self.spawn_batch();
        let wait = Duration::from_micros(self.rng.range(0, 4000));
        tokio::time::sleep(wait).await;
        let old = self.vol.take();
        if stall {
            self.trace("fault: front end stalls (kept); a new one attaches".into());
        } else {
            self.trace("fault: front end crashes mid-flight".into());
        }
        let mut aborted = Vec::new();
        for h in handles {
            if h.is_finished() {
                if let Ok(o) = h.await {
                    self.record(o)?;
                }
            } else {
                h.abort();
                aborted.push(h);
            }
        }
        for h in aborted {
            match h.await {
                Ok(o) => self.record(o)?,
                Err(_) => self.report.failed_ops += 1,
            }
        }
        // Aborted writes: their outcome is unknown (they may have applied).
        for bm in self.model().iter_mut() {
            bm.busy = false;
        }
        let stale = if stall { old } else { None };
        self.attach(true).await?;
        if let Some(stale) = stale {
            self.fenced_write(&stale).await?;
        }
        Ok(())
    }

    /// A write through a front end an attach has superseded: must fail.
    async fn fenced_write(&mut self, stale: &Arc<Vol>) -> Result<(), Box<Violation>> {
        let first = self.rng.below(BLOCKS);
        let count = self.rng.range(1, 4).min(BLOCKS - first);
        let versions: Vec<u64> = {
            let mut m = self.model();
            (first..first + count)
                .map(|b| {
                    let bm = &mut m[b as usize];
                    bm.issued += 1;
                    bm.forbidden.insert(bm.issued);
                    bm.issued
                })
                .collect()
        };
        let mut buf = BytesMut::new();
        for (i, ver) in versions.iter().enumerate() {
            buf.extend_from_slice(&pattern::block(first + i as u64, *ver));
        }
        self.trace(format!("op: write through the fenced front end, blocks {first}..+{count} versions {versions:?}"));
        self.report.fenced_attempts += 1;
        let r = stale.write(first * BLOCK_SIZE_U64, buf.freeze(), false).await;
        self.trace(format!("done: fenced write -> {r:?}"));
        if r.is_ok() {
            return Err(self.violation(
                "a fenced front end's write was acknowledged",
                first,
                "an error (Shutdown)".into(),
                "Ok".into(),
            ));
        }
        Ok(())
    }

    /// Resyncs what it can, then attaches a new front end, retrying (and
    /// healing faults) until it works.
    async fn attach(&mut self, reattach: bool) -> Result<(), Box<Violation>> {
        if reattach {
            self.recover(true);
        }
        let rates = lock(&self.world).rates.clone();
        let calm = FaultRates { max_delay_ms: rates.max_delay_ms, ..FaultRates::none() };
        for attempt in 0..8 {
            if attempt == 4 {
                // Heal everything (nodes, metadata service, network) for
                // this attach: it must then succeed.
                self.trace("attach: healing every fault".into());
                self.recover(true);
                let mut m = self.meta.inner();
                m.down = false;
                m.lost_reply = 0.0;
                drop(m);
                lock(&self.world).rates = calm.clone();
            }
            let world = self.world.clone();
            let connect = move |r: &Replica| SimReplica::new(r.node, world.clone());
            let opts = VolumeOptions {
                local_node: Some(FRONTEND_NODE),
                io_timeout: self.cfg.io_timeout,
                ..VolumeOptions::default()
            };
            match Volume::attach(self.meta.clone(), connect, self.volume, opts).await {
                Ok(v) => {
                    let sets: Vec<String> = (0..CHUNKS as u32)
                        .filter_map(|c| v.replica_set(ChunkIdx(c)))
                        .map(|s| format!("v{} {:?}", s.version, s.in_sync.iter().map(|n| n.0).collect::<Vec<_>>()))
                        .collect();
                    self.trace(format!("attached at {}: {sets:?}", v.epoch()));
                    self.report.attaches += 1;
                    self.vol = Some(v);
                    lock(&self.world).rates = rates;
                    self.meta.inner().lost_reply = self.cfg.rates.meta_lost_reply;
                    return Ok(());
                }
                Err(e) => {
                    self.trace(format!("attach failed (attempt {attempt}): {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(self.violation(
            "the volume cannot be attached with every fault healed",
            0,
            "a successful attach".into(),
            "repeated failures".into(),
        ))
    }

    /// The simulator's stand-in for the resync job (`ballast-resync`, not
    /// under test here), between client batches, with the production
    /// ordering: `StartJob` makes an ejected replica on a healthy node a
    /// rebuilding member; the front end follows the layout (the real
    /// [`Volume::apply_layout`]: from then on its writes go there too); the
    /// copy (instantaneous: the replica becomes a copy of a healthy in-sync
    /// one, epoch included); `FinishJob` makes it in sync; the front end
    /// follows again. One chunk per call.
    async fn resync(&mut self) {
        let Some(vol) = self.vol.clone() else { return };
        let (chunk, target, src, version) = {
            let m = self.meta.inner();
            if m.down {
                return;
            }
            let Some(v) = m.state.volumes.get(&self.volume) else { return };
            let w = lock(&self.world);
            let healthy = |n: NodeId| w.nodes.get(&n).is_some_and(|x| x.up && !x.partitioned);
            let found = v.chunks.iter().enumerate().find_map(|(i, c)| {
                let src = c.in_sync().find(|&n| healthy(n))?;
                let t = c.replicas.iter().find(|r| r.role == Role::Ejected && healthy(r.node))?;
                Some((ChunkIdx(i as u32), t.node, src, c.version))
            });
            let Some(found) = found else { return };
            found
        };
        let start =
            Command::StartJob { volume: self.volume, chunk, version, kind: JobKind::Resync, target, replaces: None };
        let job = match self.meta.inner().apply(&start) {
            Ok(Response::Job(j)) => j,
            other => {
                self.trace(format!("resync: start of {target} on chunk {chunk} refused: {other:?}"));
                return;
            }
        };
        self.trace(format!("resync: job {job}: {target} rebuilding chunk {chunk} from {src}"));
        let follow = |sim: &Sim| {
            let m = sim.meta.inner();
            m.state.volumes.get(&sim.volume).map(|v| crate::meta::layout(&m.state, v))
        };
        let ok = match follow(self) {
            Some(l) => match vol.apply_layout(&l).await {
                Ok(n) => {
                    self.trace(format!("resync: front end follows the layout ({n} chunks changed)"));
                    true
                }
                Err(e) => {
                    self.trace(format!("resync: front end could not follow the layout: {e}"));
                    false
                }
            },
            None => false,
        };
        if ok {
            let mut w = lock(&self.world);
            let id = ChunkId::new(self.volume, chunk);
            if let Some(source) = w.nodes.remove(&src) {
                if let Some(t) = w.nodes.get_mut(&target) {
                    t.copy_chunk_from(&source, id);
                }
                w.nodes.insert(src, source);
            }
        }
        let finish = Command::FinishJob { job, ok, error: None, blocks_copied: 0 };
        let done = self.meta.inner().apply(&finish);
        self.trace(format!("resync: job {job} finished (ok={ok}): {done:?}"));
        if let Some(l) = follow(self) {
            match vol.apply_layout(&l).await {
                Ok(n) => self.trace(format!("resync: front end follows the layout ({n} chunks changed)")),
                Err(e) => self.trace(format!("resync: front end could not follow the layout: {e}")),
            }
        }
    }

    /// Heals everything, attaches a fresh front end, and checks every block.
    async fn finish(&mut self) -> Result<(), Box<Violation>> {
        self.step = self.cfg.steps + 1;
        self.trace("final: heal everything, re-attach, read every block".into());
        self.cfg.rates = FaultRates { max_delay_ms: self.cfg.rates.max_delay_ms, ..FaultRates::none() };
        lock(&self.world).rates = self.cfg.rates.clone();
        self.meta.inner().down = false;
        self.meta.inner().lost_reply = 0.0;
        self.vol = None;
        self.recover(true);
        self.attach(true).await?;
        let Some(vol) = self.vol.clone() else { return Ok(()) };
        for b in 0..BLOCKS {
            let floor = self.model()[b as usize].acked;
            match vol.read(b * BLOCK_SIZE_U64, BLOCK_SIZE_U64 as u32).await {
                Ok(d) => {
                    let seen = pattern::decode(b, &d);
                    self.trace(format!("final read block {b}: {seen}"));
                    self.check(b, floor, &seen, "final read")?;
                }
                Err(e) => {
                    return Err(self.violation(
                        "a block is unreadable with every fault healed",
                        b,
                        format!("version {floor}"),
                        format!("{e}"),
                    ))
                }
            }
        }
        if self.report.clone_source_blocks > 0 {
            let left = self.meta.unfilled();
            if left > 0 {
                return Err(self.violation(
                    "a clone read whole with every fault healed is not independent",
                    0,
                    "0 unfilled chunks".into(),
                    format!("{left}"),
                ));
            }
        }
        self.check_snapshots(&vol).await
    }

    /// Every block of every snapshot meta still records (one the front end
    /// reported taken), read through the fresh front end: a version the
    /// ledger allowed at its cut.
    async fn check_snapshots(&mut self, vol: &Arc<Vol>) -> Result<(), Box<Violation>> {
        let recorded = self.meta.inner().snapshots.clone();
        let taken = std::mem::take(&mut self.snapshots);
        for t in taken.iter().filter(|t| recorded.contains(&t.cut)) {
            for b in 0..BLOCKS {
                let what = format!("snapshot {} read", t.cut);
                match vol.read_snapshot(t.cut, b * BLOCK_SIZE_U64, BLOCK_SIZE_U64 as u32).await {
                    Ok(d) => {
                        let seen = pattern::decode(b, &d);
                        self.trace(format!("final {what} block {b}: {seen}"));
                        self.check(b, t.acked[b as usize], &seen, &what)?;
                        let upper = t.issued[b as usize];
                        if seen.version().is_some_and(|v| v > upper) {
                            return Err(self.violation(
                                format!("{what} holds a write issued after the snapshot was taken"),
                                b,
                                format!("a version from {} to {upper}", t.acked[b as usize]),
                                seen.to_string(),
                            ));
                        }
                        self.report.snapshot_blocks_checked += 1;
                    }
                    Err(e) => {
                        return Err(self.violation(
                            format!("{what}: a block is unreadable with every fault healed"),
                            b,
                            format!("a version from {}", t.acked[b as usize]),
                            format!("{e}"),
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

fn seen_list(first: u64, d: &[u8]) -> String {
    let bs = BLOCK_SIZE_U64 as usize;
    let v: Vec<String> = d
        .chunks(bs)
        .enumerate()
        .map(|(i, c)| match pattern::decode(first + i as u64, c) {
            Seen::Version(v) => format!("v{v}"),
            Seen::Zeros => "v0".into(),
            other => other.to_string(),
        })
        .collect();
    v.join(",")
}
