//! `ballast node`: a storage node. It serves its disk's chunk store over the
//! data-path protocol, registers with the metadata service (zone, address,
//! capacity), heartbeats, runs the copy jobs meta assigns to it, and reclaims
//! chunk replicas meta no longer lists on it.
//!
//! ```text
//!   meta ◄── register, heartbeat (→ jobs), report job ──  agent ── resync_chunk ──► source replica
//!                                                           │                       (data-path protocol)
//!   front ends ──── data-path protocol ────► replica server ┴─ chunk store (this disk)
//! ```
//! The data path never waits for meta: the replica server runs whether or not
//! meta answers.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_csi::{IdentityService, NodeConfig, NodeService};
use ballast_metaclient::MetaClient;
use ballast_proto::v1 as pb;
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_resync::{resync_chunk, ResyncOptions};
use ballast_types::{ChunkId, ChunkIdx, Epoch, VolumeId};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, info_span, warn, Instrument};

use crate::cli::NodeArgs;
use crate::shutdown;

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
}

/// Disk capacity of the filesystem holding `dir`.
pub fn fs_capacity(dir: &std::path::Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).context("data path has a NUL byte")?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a valid C string and a buffer of the right type.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statvfs {}", dir.display()));
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // c_ulong / fsblkcnt_t widths differ by target
    Ok(st.f_blocks as u64 * st.f_frsize as u64)
}

/// The node id: the flag, else the one recorded in `data/node-id`, else a new
/// random one recorded there (written before the node first registers, so a
/// restart keeps its identity and its replicas).
fn node_id(flag: Option<u64>, data: &std::path::Path) -> anyhow::Result<u64> {
    let path = data.join("node-id");
    let recorded = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().parse::<u64>().with_context(|| format!("{} holds no node id", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    match (flag, recorded) {
        (Some(f), Some(r)) if f != r => {
            anyhow::bail!(
                "--id {f} differs from the id {r} recorded in {}: this disk belongs to node {r}",
                path.display()
            )
        }
        (Some(0), _) => anyhow::bail!("--id must be 1 or more"),
        (Some(f), _) => Ok(f),
        (None, Some(r)) => Ok(r),
        (None, None) => {
            let mut b = [0u8; 4];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
                .context("read /dev/urandom")?;
            // 1 ..= 2^31: readable in ballastctl, and collisions are for an
            // operator's --id to settle (registering checks the zone).
            let id = u64::from(u32::from_le_bytes(b) >> 1) + 1;
            std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{id}\n")).with_context(|| format!("write {}", tmp.display()))?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).context("sync the node id")?;
            std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
            info!(node = id, file = %path.display(), "new node id chosen");
            Ok(id)
        }
    }
}

fn zone(a: &NodeArgs) -> anyhow::Result<String> {
    let zone = match (&a.zone, &a.zone_file) {
        (Some(z), _) => z.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("read the zone from {}", f.display()))?,
        (None, None) => anyhow::bail!("give --zone or --zone-file"),
    };
    let zone = zone.trim().to_string();
    anyhow::ensure!(!zone.is_empty(), "the zone is empty (a node without a zone label?)");
    Ok(zone)
}

pub async fn run(a: NodeArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    let id = node_id(a.id, &a.data)?;
    let zone = zone(&a)?;
    let opts = StoreOptions { direct_io: !a.no_direct_io, ..StoreOptions::default() };
    let store = ChunkStore::open(&a.data, opts).with_context(|| format!("open chunk store {}", a.data.display()))?;
    let listener = TcpListener::bind(a.listen).await.with_context(|| format!("listen on {}", a.listen))?;
    let bound = listener.local_addr()?;
    let addr = a.advertise.unwrap_or(bound);
    let capacity = match a.capacity {
        Some(c) => c,
        None => fs_capacity(&a.data)?,
    };
    let meta = MetaClient::new(ballast_metaclient::parse_endpoints(&a.meta)).context("meta endpoints")?;
    let cfg = AgentConfig {
        id,
        zone: zone.clone(),
        addr,
        capacity,
        heartbeat: a.heartbeat,
        copy_rate: (a.copy_rate > 0).then_some(a.copy_rate),
        gc_every: a.gc_every,
    };
    info!(node = id, zone = %zone, %addr, capacity, "storage node serving");
    println!("ready node id={id} addr={bound}");
    let csi = match &a.csi_endpoint {
        Some(endpoint) => {
            let socket = ballast_csi::parse_endpoint(endpoint).map_err(anyhow::Error::msg)?;
            let cfg = NodeConfig {
                node_id: id,
                zone: zone.clone(),
                state_dir: a.csi_state.clone(),
                max_volumes: a.csi_max_volumes,
                io_timeout: Duration::from_secs(5),
            };
            let service = NodeService::new(cfg, meta.clone())
                .with_context(|| format!("CSI state directory {}", a.csi_state.display()))?;
            let identity = IdentityService::new(false, meta.clone());
            let (svc, stop) = (service.clone(), stop.clone());
            info!(node = id, k8s_node = ?a.csi_node_name, socket = %socket.display(), "CSI node service");
            println!("ready csi socket={}", socket.display());
            let server = tokio::spawn(async move {
                // Volumes staged before a restart come back first (meta may need a while).
                svc.recover(Duration::from_secs(120)).await;
                ballast_csi::serve(&socket, identity, None, Some(svc), shutdown::wait(stop)).await
            });
            Some((service, server))
        }
        None => None,
    };
    let agent = tokio::spawn(agent(cfg, meta, store.clone(), stop.clone()));
    // The replica server stops last: the volumes this node's CSI service staged
    // may keep replicas here, and their final flush needs it.
    let (replicas_stop, replicas_stopped) = watch::channel(false);
    let replicas = tokio::spawn(
        ReplicaServer::new(store, ServerOptions::default()).serve(listener, shutdown::wait(replicas_stopped)),
    );
    shutdown::wait(stop).await;
    let mut result = Ok(());
    if let Some((service, server)) = csi {
        result = server.await.context("CSI task").and_then(|r| r.context("CSI server"));
        // A clean stop unstages (flushes, releases leases); the records stay so
        // the next start stages the same volumes again.
        service.shutdown().await;
    }
    let _ = replicas_stop.send(true);
    replicas.await.context("replica server task")?.context("replica server")?;
    result?;
    let _ = agent.await;
    info!("storage node stopped");
    Ok(())
}

/// Registers, then heartbeats until `stop`, starting each assigned job once.
pub async fn agent(cfg: AgentConfig, meta: MetaClient, store: ChunkStore, mut stop: watch::Receiver<bool>) {
    let running: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut registered = false;
    let mut gc = Gc::default();
    let mut last_gc = Instant::now();
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !registered {
            let req = pb::RegisterRequest {
                node: cfg.id,
                addr: cfg.addr.to_string(),
                zone: cfg.zone.clone(),
                capacity_bytes: cfg.capacity,
            };
            match meta.register(req).await {
                Ok(_) => {
                    info!(node = cfg.id, "registered with meta");
                    registered = true;
                }
                Err(e) => {
                    warn!(error = %e, "register with meta failed; retrying");
                    continue;
                }
            }
        }
        let used = store.chunks().iter().map(|c| c.size).sum();
        match meta.heartbeat(pb::HeartbeatRequest { node: cfg.id, used_bytes: used }).await {
            Ok(r) => {
                for job in r.jobs {
                    if running.lock().unwrap_or_else(|p| p.into_inner()).insert(job.id) {
                        let (meta, running, cfg) = (meta.clone(), running.clone(), cfg.clone());
                        let span = info_span!("copy_job", job = job.id, volume = job.volume, chunk = job.chunk);
                        tokio::spawn(
                            async move {
                                let id = job.id;
                                run_job(&cfg, &meta, job).await;
                                running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                            }
                            .instrument(span),
                        );
                    }
                }
            }
            Err(e) if e.is_not_found() => {
                warn!("meta does not know this node; registering again");
                registered = false;
            }
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
        if last_gc.elapsed() >= cfg.gc_every {
            last_gc = Instant::now();
            gc.pass(&cfg, &meta, &store).await;
        }
    }
}

/// Copies one chunk from the first source that works into this node's replica
/// (through its own replica server), then reports the outcome.
async fn run_job(cfg: &AgentConfig, meta: &MetaClient, job: pb::Job) {
    let id = ChunkId { volume: VolumeId(job.volume), chunk: ChunkIdx(job.chunk) };
    let epoch = Epoch(job.epoch);
    let copt = ClientOptions { timeout: Duration::from_secs(30), ..ClientOptions::default() };
    let target = ReplicaClient::new(cfg.addr, copt.clone());
    let opts = ResyncOptions { max_bytes_per_sec: cfg.copy_rate, ..ResyncOptions::default() };
    info!(kind = job.kind, sources = job.sources.len(), chunk_len = job.chunk_len, "copy job starting");
    let report = |state: pb::JobState, bytes: u64, blocks: u64, error: String| pb::ReportJobRequest {
        job: job.id,
        state: state as i32,
        bytes_done: bytes,
        blocks_copied: blocks,
        error,
    };
    let _ = meta.report_job(report(pb::JobState::Running, 0, 0, String::new())).await;
    let last = Mutex::new(Instant::now());
    let mut errors = Vec::new();
    for src in &job.sources {
        let Ok(addr) = src.addr.parse::<SocketAddr>() else {
            errors.push(format!("source {} has a bad address {:?}", src.id, src.addr));
            continue;
        };
        let source = ReplicaClient::new(addr, copt.clone());
        let progress = |p: ballast_resync::Progress| {
            // At most one progress report per second, sent without waiting.
            let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
            if l.elapsed() >= Duration::from_secs(1) {
                *l = Instant::now();
                let (meta, r) = (
                    meta.clone(),
                    report(pb::JobState::Running, p.blocks_done * 4096, p.stats.blocks_copied, String::new()),
                );
                tokio::spawn(async move { meta.report_job(r).await });
            }
        };
        match resync_chunk(&source, &target, id, job.chunk_len, epoch, &opts, progress).await {
            Ok(s) => {
                info!(
                    source = src.id,
                    copied = s.blocks_copied,
                    trimmed = s.blocks_trimmed,
                    compared = s.blocks_compared,
                    "copy job done"
                );
                let r = report(pb::JobState::Done, job.chunk_len, s.blocks_copied + s.blocks_trimmed, String::new());
                if let Err(e) = meta.report_job(r).await {
                    warn!(error = %e, "reporting a finished job failed; meta will hand it out again");
                }
                return;
            }
            Err(e) => {
                warn!(source = src.id, error = %e, "copy from this source failed");
                errors.push(format!("from {}: {e}", src.id));
                if e.is_fenced() {
                    // A newer attach: the job must be retried with the new epoch.
                    break;
                }
            }
        }
    }
    if job.sources.is_empty() {
        errors.push("no in-sync source".into());
    }
    let _ = meta.report_job(report(pb::JobState::Failed, 0, 0, errors.join("; "))).await;
}

/// Reclaims chunk replicas meta no longer lists on this node: those of deleted
/// volumes and those a rebuild replaced. A replica is deleted only after two
/// passes in a row agree (a member answering from a lagging state must not make
/// us delete a replica that was just assigned here).
#[derive(Default)]
struct Gc {
    candidates: HashSet<ChunkId>,
}

impl Gc {
    async fn pass(&mut self, cfg: &AgentConfig, meta: &MetaClient, store: &ChunkStore) {
        let mut layouts: HashMap<VolumeId, Option<pb::VolumeLayout>> = HashMap::new();
        let mut unlisted = HashSet::new();
        for c in store.chunks() {
            let v = c.id.volume;
            let layout = match layouts.entry(v) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    match meta.get_layout(pb::GetLayoutRequest { volume: v.0 }).await {
                        Ok(l) => e.insert(Some(l)),
                        Err(err) if err.is_not_found() => e.insert(None),
                        // Meta unreachable: reclaim nothing this time.
                        Err(_) => return,
                    }
                }
            };
            let listed = layout.as_ref().is_some_and(|l| {
                l.chunks.get(c.id.chunk.0 as usize).is_some_and(|ch| ch.replicas.iter().any(|r| r.node == cfg.id))
            });
            if !listed {
                unlisted.insert(c.id);
            }
        }
        for id in &unlisted {
            if self.candidates.contains(id) {
                let epoch = store.epoch(id.volume);
                match store.delete_chunk(*id, epoch).await {
                    Ok(()) => info!(chunk = %id, "reclaimed a chunk replica meta no longer lists here"),
                    Err(e) => warn!(chunk = %id, error = %e, "reclaim failed"),
                }
            }
        }
        self.candidates = unlisted;
    }
}
