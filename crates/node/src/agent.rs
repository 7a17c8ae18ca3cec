//! The agent loop: registration with meta, then a heartbeat every interval,
//! each carrying the disk's verdict and answered with the jobs to run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_chunkstore::{ChunkStore, StoreSpace};
use ballast_metaclient::MetaClient;
use ballast_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::disk::{DiskMonitor, DiskProbe, PROBE_TIMEOUT, PROBE_WAIT};
use crate::fill::Fillers;
use crate::gc;
use crate::jobs::Jobs;
use crate::metrics::NodeMetrics;

/// What the agent needs besides the store.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub id: u64,
    pub zone: String,
    /// The replica server's address as others reach it.
    pub addr: SocketAddr,
    pub capacity: u64,
    pub heartbeat: Duration,
    /// Copy throttle per job (bytes/s); None: unthrottled.
    pub copy_rate: Option<u64>,
    /// How often to look for chunk replicas to reclaim.
    pub gc_every: Duration,
    /// Free bytes below which the disk is full (None: the default rule: 1% of
    /// the filesystem, at least 64 MiB, at most 1 GiB).
    pub disk_reserve: Option<u64>,
    /// The process's node metric families (see [`crate::metrics`]): the agent
    /// records its disk, heartbeats and copy jobs under label `node` = `id`.
    /// None: no metrics.
    pub metrics: Option<NodeMetrics>,
    /// Fill the detached clones meta names in heartbeat answers (fill.rs).
    pub fill_clones: bool,
}

/// Registers, then heartbeats until `stop`, starting each assigned job once.
/// Garbage collection runs beside it on a task of its own, stopped by the same
/// `stop`; this returns once both have stopped.
pub async fn agent(cfg: AgentConfig, meta: MetaClient, store: ChunkStore, stop: watch::Receiver<bool>) {
    let registered = Arc::new(AtomicBool::new(false));
    let gc = tokio::spawn(
        gc::run(cfg.clone(), meta.clone(), store.clone(), registered.clone(), stop.clone()).in_current_span(),
    );
    heartbeat(cfg, meta, store, registered, stop).await;
    if let Err(e) = gc.await {
        warn!(error = %e, "the garbage collection task failed");
    }
}

/// How far behind the disk use heartbeats report may be, at most (unless a
/// count takes long: see [`SpaceCount`]).
const SPACE_RECOUNT: Duration = Duration::from_secs(15);

/// What this node's chunk files take on disk ([`ChunkStore::space`]),
/// recounted now and then on a blocking thread (a stat per layer file):
/// heartbeats carry the last count and never wait for one. A count that took
/// `d` is followed by the next one no sooner than `20 d` later, so counting a
/// large store (a million chunks) keeps to about 5% of one core.
struct SpaceCount {
    every: Duration,
    due: Instant,
    running: Option<(Instant, JoinHandle<StoreSpace>)>,
    last: Option<(u64, Vec<pb::VolumeSpace>)>,
}

impl SpaceCount {
    fn new(every: Duration) -> Self {
        SpaceCount { every, due: Instant::now(), running: None, last: None }
    }

    /// The last finished count (None before the first one), starting the next
    /// one when it is due.
    async fn latest(&mut self, store: &ChunkStore) -> Option<(u64, Vec<pb::VolumeSpace>)> {
        if let Some((started, h)) = self.running.take_if(|(_, h)| h.is_finished()) {
            let took = started.elapsed();
            self.due = started + self.every.max(took * 20);
            match h.await {
                Ok(x) => {
                    let snapshots = x
                        .snapshots
                        .into_iter()
                        .map(|(v, s)| pb::VolumeSpace { volume: v.0, layers: s.layers, bytes: s.bytes })
                        .collect();
                    self.last = Some((x.used, snapshots));
                }
                Err(e) => warn!(error = %e, "counting the disk use failed"),
            }
        }
        if self.running.is_none() && Instant::now() >= self.due {
            let store = store.clone();
            self.running = Some((Instant::now(), tokio::task::spawn_blocking(move || store.space())));
        }
        self.last.clone()
    }
}

/// The heartbeat loop.
///
/// Invariants:
/// - a heartbeat goes out every `cfg.heartbeat` while meta answers: nothing
///   else the node does waits in this loop. The disk probe gets at most
///   [`PROBE_WAIT`] (a slow one reports on a later tick, a hung one fails after
///   [`PROBE_TIMEOUT`]), copy jobs run on tasks of their own, and so does
///   garbage collection, and so does counting the disk use (a late
///   heartbeat makes the node suspect);
/// - `registered` is true from a successful registration until meta answers a
///   heartbeat with "unknown node", which makes the next tick register again;
/// - `stop` wins over a due tick (see the `select!`).
async fn heartbeat(
    cfg: AgentConfig,
    meta: MetaClient,
    store: ChunkStore,
    registered: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let jobs = Jobs::default();
    let fillers = Fillers::default();
    let mut disk = DiskMonitor::new(DiskProbe::new(store.dir(), store.direct_io(), cfg.disk_reserve), PROBE_TIMEOUT);
    let metrics = cfg.metrics.as_ref().map(|m| m.node(cfg.id));
    if let Some(m) = &metrics {
        m.capacity(cfg.capacity);
    }
    let mut space = SpaceCount::new((cfg.heartbeat * 10).min(SPACE_RECOUNT));
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Biased, stop first: while meta is down a heartbeat outlasts the
        // interval, so the next tick is always ready too, and an unbiased pick
        // kept heartbeating after a stop, 15 s a round, past the pod's grace period.
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if !registered.load(Ordering::Acquire) {
            let req = pb::RegisterRequest {
                node: cfg.id,
                addr: cfg.addr.to_string(),
                zone: cfg.zone.clone(),
                capacity_bytes: cfg.capacity,
            };
            match meta.register(req).await {
                Ok(_) => {
                    info!(node = cfg.id, "registered with meta");
                    registered.store(true, Ordering::Release);
                }
                Err(e) => {
                    warn!(error = %e, "register with meta failed; retrying");
                    continue;
                }
            }
        }
        let allocated = store.chunk_bytes();
        // Until the first count meta keeps the use it knows (`used_counted`).
        let counted = space.latest(&store).await;
        let used_counted = counted.is_some();
        let (used, snapshot_space) = counted.unwrap_or_default();
        // The heartbeat must not wait on the disk (a late heartbeat makes the
        // node suspect): a probe that has not answered within a few ms reports
        // on a later tick (and a hung one fails after PROBE_TIMEOUT).
        let disk_report = disk.check(PROBE_WAIT.min(cfg.heartbeat / 2)).await;
        if let Some(m) = &metrics {
            m.disk(&disk_report, allocated);
        }
        let (health, disk_error) = disk_report.verdict.to_pb();
        let req = pb::HeartbeatRequest {
            node: cfg.id,
            used_bytes: used,
            disk: health as i32,
            disk_error,
            disk_free_bytes: disk_report.free_bytes,
            snapshot_space,
            used_counted,
        };
        let answer = meta.heartbeat(req).await;
        if let Some(m) = &metrics {
            m.heartbeat(answer.is_ok());
        }
        match answer {
            Ok(r) => {
                for job in r.jobs {
                    jobs.start(&cfg, &meta, job);
                }
                for clone in r.fill_clones.into_iter().filter(|_| cfg.fill_clones) {
                    fillers.start(&meta, cfg.id, clone, stop.clone());
                }
            }
            Err(e) if e.is_not_found() => {
                warn!("meta does not know this node; registering again");
                registered.store(false, Ordering::Release);
            }
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
    }
}
