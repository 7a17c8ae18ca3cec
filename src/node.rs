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
//!
//! With `--csi-endpoint` it is also the CSI Node plugin; `--registration-dir`
//! registers that plugin with the kubelet (crates/csi/src/registration.rs) and
//! `--health-listen` serves the kubelet's probes (src/health.rs).
//!
//! Every heartbeat carries the verdict of a disk probe ([`DiskProbe`], run by a
//! [`DiskMonitor`] on its own thread): a node whose disk fails or fills up keeps
//! heartbeating, and meta moves its replicas away instead of resyncing them in
//! place forever.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_csi::registration::{self, RegistrationError, RegistrationService};
use ballast_csi::{IdentityService, NodeConfig, NodeService};
use ballast_metaclient::MetaClient;
use ballast_proto::v1 as pb;
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_resync::{resync_chunk, ResyncOptions};
use ballast_types::{ChunkId, ChunkIdx, Epoch, VolumeId};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, info_span, warn, Instrument};

use crate::cli::NodeArgs;
use crate::{health, shutdown};

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
    /// Free bytes below which the disk is full (None: the default rule, see `below_reserve`).
    pub disk_reserve: Option<u64>,
}

/// Disk capacity of the filesystem holding `dir`.
pub fn fs_capacity(dir: &std::path::Path) -> anyhow::Result<u64> {
    let space = fs_space(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(space.total)
}

/// Size and free space of a filesystem, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FsSpace {
    total: u64,
    /// Available to unprivileged writers (`f_bavail`): root's reserve is not ours.
    free: u64,
}

fn fs_space(dir: &Path) -> std::io::Result<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a valid C string and a buffer of the right type.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // c_ulong / fsblkcnt_t widths differ by target
    let (blocks, avail, frsize) = (st.f_blocks as u64, st.f_bavail as u64, st.f_frsize as u64);
    Ok(FsSpace { total: blocks.saturating_mul(frsize), free: avail.saturating_mul(frsize) })
}

// ------------------------------------------------------------------ disk health

/// Bytes the probe writes: one block, the unit of O_DIRECT I/O.
const PROBE_LEN: usize = 4096;
/// The probe's file, in the store's directory (beside `chunks/`, never in it).
const PROBE_FILE: &str = ".probe";
/// How long a heartbeat waits for this tick's probe before sending the last verdict.
const PROBE_WAIT: Duration = Duration::from_millis(20);
/// The least free space a node keeps by default: one default chunk. A
/// filesystem over 6.4 GiB keeps 1% instead, up to [`MAX_DISK_RESERVE`].
const MIN_DISK_RESERVE: u64 = 64 << 20;
/// The most a node keeps free by default (1% of a 10 TB disk would idle 100 GB).
const MAX_DISK_RESERVE: u64 = 1 << 30;
/// A probe that has not answered in this long counts as a failed disk: a
/// database above us cannot wait that long for a write either.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a disk probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskVerdict {
    Ok,
    /// Free space below the reserve, or the probe's write hit ENOSPC/EDQUOT.
    Full,
    /// EIO, EROFS, a read-back mismatch, a hung probe, ...: the disk cannot be
    /// trusted with replicas.
    Failed(String),
}

impl DiskVerdict {
    fn same_kind(&self, other: &DiskVerdict) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }

    fn to_pb(&self) -> (pb::DiskHealth, String) {
        match self {
            DiskVerdict::Ok => (pb::DiskHealth::DiskOk, String::new()),
            DiskVerdict::Full => (pb::DiskHealth::DiskFull, String::new()),
            DiskVerdict::Failed(why) => (pb::DiskHealth::DiskFailed, why.clone()),
        }
    }
}

/// One probe's verdict and the free space it saw (0 if statvfs failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskReport {
    pub verdict: DiskVerdict,
    pub free_bytes: u64,
}

/// The space rule: full below the reserve (`reserve`, else 1% of the
/// filesystem clamped to [`MIN_DISK_RESERVE`]..=[`MAX_DISK_RESERVE`]). A full disk stays full until
/// a quarter of the reserve more is free, so a disk hovering at the line does
/// not flap (every flip is a Raft write and moves replicas).
fn below_reserve(space: FsSpace, reserve: Option<u64>, was_full: bool) -> bool {
    let reserve = reserve.unwrap_or_else(|| (space.total / 100).clamp(MIN_DISK_RESERVE, MAX_DISK_RESERVE));
    let line = if was_full { reserve.saturating_add(reserve / 4) } else { reserve };
    space.free < line
}

/// The block the probe writes as its `seq`th: different every time, so a disk
/// that acknowledges writes but returns old data is caught.
fn probe_pattern(seq: u64, out: &mut [u8]) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let x = (seq.rotate_left(32) ^ i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        w.copy_from_slice(&(x ^ (x >> 29)).to_le_bytes());
    }
}

/// A block-aligned buffer, as O_DIRECT needs.
#[repr(C, align(4096))]
struct ProbeBlock([u8; PROBE_LEN]);

/// Checks the disk holding a chunk store: statvfs for free space, then one
/// block written to `DATA/.probe` (O_DIRECT when the store uses it), made
/// durable with fdatasync, read back and compared. Synchronous and possibly
/// stuck forever on a hung disk: [`DiskMonitor`] runs it on its own thread.
#[derive(Clone, Debug)]
pub struct DiskProbe {
    dir: PathBuf,
    direct: bool,
    reserve: Option<u64>,
}

impl DiskProbe {
    /// `reserve`: free bytes below which the disk is full (None: the larger of
    /// 64 MiB and 1% of the filesystem).
    pub fn new(dir: impl Into<PathBuf>, direct: bool, reserve: Option<u64>) -> DiskProbe {
        DiskProbe { dir: dir.into(), direct, reserve }
    }

    /// The `seq`th probe; `was_full`: the previous verdict (hysteresis).
    pub fn run(&self, seq: u64, was_full: bool) -> DiskReport {
        let space = match fs_space(&self.dir) {
            Ok(s) => s,
            Err(e) => {
                let verdict = DiskVerdict::Failed(format!("statvfs {}: {e}", self.dir.display()));
                return DiskReport { verdict, free_bytes: 0 };
            }
        };
        let verdict = match self.write_read(seq) {
            // Out of space is not a broken disk: its replicas are still good.
            Err((_, e)) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => DiskVerdict::Full,
            Err((step, e)) => DiskVerdict::Failed(format!("{step} {}: {e}", self.dir.join(PROBE_FILE).display())),
            Ok(()) if below_reserve(space, self.reserve, was_full) => DiskVerdict::Full,
            Ok(()) => DiskVerdict::Ok,
        };
        DiskReport { verdict, free_bytes: space.free }
    }

    /// Write, fdatasync, read back, compare; an error names the step.
    fn write_read(&self, seq: u64) -> Result<(), (&'static str, std::io::Error)> {
        let path = self.dir.join(PROBE_FILE);
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).mode(0o600);
        if self.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let f = opts.open(&path).map_err(|e| ("open", e))?;
        let mut block = Box::new(ProbeBlock([0; PROBE_LEN]));
        probe_pattern(seq, &mut block.0);
        f.write_all_at(&block.0, 0).map_err(|e| ("write", e))?;
        f.sync_data().map_err(|e| ("fdatasync", e))?;
        if !self.direct {
            // Best effort: drop the cached page so that the read below asks the disk.
            // SAFETY: a valid open descriptor; the call only gives advice.
            let _ = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        let mut back = Box::new(ProbeBlock([0; PROBE_LEN]));
        f.read_exact_at(&mut back.0, 0).map_err(|e| ("read back", e))?;
        match back.0.iter().zip(block.0.iter()).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(at) => Err((
                "compare",
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("read back differs at byte {at}")),
            )),
        }
    }
}

/// A probe as the monitor runs it: `(seq, was_full)` to a report. Blocking.
pub type ProbeFn = Arc<dyn Fn(u64, bool) -> DiskReport + Send + Sync>;

/// Runs the disk probe once per heartbeat on a thread of its own, so that a
/// hung disk (a probe stuck in the kernel) never stalls the heartbeat loop.
///
/// Invariants:
/// - at most one probe is in flight: while one is stuck, no other starts (a
///   hung disk would otherwise collect a stuck thread per tick);
/// - a probe unanswered for `timeout` makes the verdict `Failed`, every tick,
///   until it answers; its late answer is then the verdict;
/// - a probe still within `timeout` when the tick's wait ends is no news: the
///   previous verdict stands;
/// - transitions are logged once (warn on failed or full, info on recovery).
pub struct DiskMonitor {
    probe: ProbeFn,
    timeout: Duration,
    seq: u64,
    in_flight: Option<(oneshot::Receiver<DiskReport>, Instant)>,
    last: DiskReport,
}

impl DiskMonitor {
    pub fn new(probe: DiskProbe, timeout: Duration) -> DiskMonitor {
        DiskMonitor::with_probe(Arc::new(move |seq, was_full| probe.run(seq, was_full)), timeout)
    }

    pub fn with_probe(probe: ProbeFn, timeout: Duration) -> DiskMonitor {
        DiskMonitor {
            probe,
            timeout,
            seq: 0,
            in_flight: None,
            last: DiskReport { verdict: DiskVerdict::Ok, free_bytes: 0 },
        }
    }

    /// Starts a probe unless one is in flight, waits up to `wait` for it, and
    /// returns the verdict to report now.
    pub async fn check(&mut self, wait: Duration) -> DiskReport {
        if self.in_flight.is_none() {
            self.seq += 1;
            let (tx, rx) = oneshot::channel();
            let (probe, seq, was_full) = (self.probe.clone(), self.seq, self.last.verdict == DiskVerdict::Full);
            // A plain thread, not the blocking pool: one stuck in the kernel for
            // good must not hold up the runtime's shutdown.
            let spawned = std::thread::Builder::new().name("ballast-disk-probe".into()).spawn(move || {
                let _ = tx.send(probe(seq, was_full));
            });
            if let Err(e) = spawned {
                // Not the disk's fault: no news this tick.
                warn!(error = %e, "cannot start the disk probe thread");
                return self.last.clone();
            }
            self.in_flight = Some((rx, Instant::now()));
        }
        let Some((rx, started)) = self.in_flight.as_mut() else { return self.last.clone() };
        let started = *started;
        let remaining = self.timeout.saturating_sub(started.elapsed());
        let answer = tokio::time::timeout(wait.min(remaining), rx).await;
        let report = match answer {
            Ok(Ok(report)) => {
                self.in_flight = None;
                report
            }
            Ok(Err(_)) => {
                // The probe thread died (a bug, not a disk verdict): no news.
                self.in_flight = None;
                warn!("the disk probe thread ended without a verdict");
                return self.last.clone();
            }
            Err(_) if started.elapsed() >= self.timeout => DiskReport {
                verdict: DiskVerdict::Failed(format!("disk probe hung: no answer within {:?}", self.timeout)),
                free_bytes: self.last.free_bytes,
            },
            Err(_) => return self.last.clone(),
        };
        if !report.verdict.same_kind(&self.last.verdict) {
            match &report.verdict {
                DiskVerdict::Ok => info!(free_bytes = report.free_bytes, "disk healthy again"),
                DiskVerdict::Full => warn!(free_bytes = report.free_bytes, "disk full: no new replicas here"),
                DiskVerdict::Failed(why) => warn!(reason = %why, "disk failed: its replicas will be rebuilt elsewhere"),
            }
        }
        self.last = report.clone();
        report
    }
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
        disk_reserve: a.disk_reserve,
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
            // Checked before anything is served: a bad flag fails the start.
            let kubelet_reg = match (&a.registration_dir, &a.kubelet_registration_path) {
                (Some(dir), Some(host_path)) => {
                    anyhow::ensure!(
                        dir.is_dir(),
                        "--registration-dir {}: no such directory (mount the kubelet's plugins_registry there)",
                        dir.display()
                    );
                    Some((dir.clone(), RegistrationService::new(host_path)?))
                }
                // clap: the two flags come together.
                _ => None,
            };
            let health = match a.health_listen {
                Some(addr) => Some(health::bind(addr).await?),
                None => None,
            };
            let (svc, stop_csi) = (service.clone(), stop.clone());
            info!(node = id, k8s_node = ?a.csi_node_name, socket = %socket.display(), "CSI node service");
            println!("ready csi socket={}", socket.display());
            let s = socket.clone();
            let server = tokio::spawn(async move {
                // Volumes staged before a restart come back first (meta may need a while).
                svc.recover(Duration::from_secs(120)).await;
                ballast_csi::serve(&s, identity, None, Some(svc), shutdown::wait(stop_csi)).await
            });
            let registration = kubelet_reg.map(|(dir, reg)| {
                let (s, stop) = (socket.clone(), stop.clone());
                tokio::spawn(async move {
                    // The kubelet calls NodeGetInfo on the CSI socket as soon as it
                    // has read the registration: the registration socket appears
                    // only once the CSI socket answers (after the recovery above).
                    if !health::wait_for_csi(&s, stop.clone()).await {
                        return Ok(());
                    }
                    info!(socket = %s.display(), "CSI socket answers: registering with the kubelet");
                    registration::serve(&dir, reg, shutdown::wait(stop)).await
                })
            });
            let health = health.map(|listener| {
                if let Ok(addr) = listener.local_addr() {
                    println!("ready health addr={addr}");
                }
                tokio::spawn(health::serve(listener, socket.clone(), shutdown::wait(stop.clone())))
            });
            Some(Csi { service, server, registration, health })
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
    if let Some(Csi { service, server, registration, health }) = csi {
        result = server.await.context("CSI task").and_then(|r| r.context("CSI server"));
        // Neither ends the node when it fails (the data path goes on), but both
        // are reported: unregistered, the kubelet cannot use this node's plugin.
        if let Some(task) = registration {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "kubelet plugin registration failed"),
                Err(e) => error!(error = %e, "kubelet plugin registration task"),
            }
        }
        if let Some(task) = health {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = format!("{e:#}"), "health endpoints failed"),
                Err(e) => error!(error = %e, "health endpoints task"),
            }
        }
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

/// The CSI side of a storage node: the node service, its server task, and
/// (with their flags) the kubelet plugin registration and the health endpoints.
struct Csi {
    service: NodeService,
    server: tokio::task::JoinHandle<Result<(), ballast_csi::ServeError>>,
    registration: Option<tokio::task::JoinHandle<Result<(), RegistrationError>>>,
    health: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Registers, then heartbeats until `stop`, starting each assigned job once.
pub async fn agent(cfg: AgentConfig, meta: MetaClient, store: ChunkStore, mut stop: watch::Receiver<bool>) {
    let running: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut registered = false;
    let mut gc = Gc::default();
    let mut last_gc = Instant::now();
    let mut disk = DiskMonitor::new(DiskProbe::new(store.dir(), store.direct_io(), cfg.disk_reserve), PROBE_TIMEOUT);
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
        // The heartbeat must not wait on the disk (a late heartbeat makes the
        // node suspect): a probe that has not answered within a few ms reports
        // on a later tick (and a hung one fails after PROBE_TIMEOUT).
        let disk_report = disk.check(PROBE_WAIT.min(cfg.heartbeat / 2)).await;
        let (health, disk_error) = disk_report.verdict.to_pb();
        let req = pb::HeartbeatRequest {
            node: cfg.id,
            used_bytes: used,
            disk: health as i32,
            disk_error,
            disk_free_bytes: disk_report.free_bytes,
        };
        match meta.heartbeat(req).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn probe_writes_a_new_pattern_each_time_and_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let probe = DiskProbe::new(dir.path(), false, Some(0));
        let mut expect = vec![0u8; PROBE_LEN];
        for seq in [1, 2] {
            let r = probe.run(seq, false);
            assert_eq!(r.verdict, DiskVerdict::Ok);
            assert!(r.free_bytes > 0);
            probe_pattern(seq, &mut expect);
            assert_eq!(std::fs::read(dir.path().join(PROBE_FILE)).unwrap(), expect);
        }
        let (mut a, mut b) = (vec![0u8; PROBE_LEN], vec![0u8; PROBE_LEN]);
        probe_pattern(1, &mut a);
        probe_pattern(2, &mut b);
        assert_ne!(a, b, "consecutive probes write different blocks");
    }

    #[test]
    fn probe_uses_o_direct_when_the_store_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), StoreOptions::default()).unwrap();
        let probe = DiskProbe::new(store.dir(), store.direct_io(), Some(0));
        // On a filesystem refusing O_DIRECT the store falls back to buffered
        // I/O, and so does the probe: either way the disk is healthy.
        assert_eq!(probe.run(7, false).verdict, DiskVerdict::Ok);
    }

    #[test]
    fn probe_file_that_cannot_be_written_is_a_failed_disk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(PROBE_FILE)).unwrap();
        let r = DiskProbe::new(dir.path(), false, Some(0)).run(1, false);
        let DiskVerdict::Failed(why) = r.verdict else { panic!("{r:?}") };
        assert!(why.starts_with("open ") && why.contains(".probe"), "{why}");
        assert!(r.free_bytes > 0, "statvfs worked");
    }

    #[test]
    fn missing_data_directory_is_a_failed_disk() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("unmounted");
        let r = DiskProbe::new(&gone, false, None).run(1, false);
        let DiskVerdict::Failed(why) = r.verdict else { panic!("{r:?}") };
        assert!(why.starts_with("statvfs ") && why.contains("unmounted"), "{why}");
    }

    #[test]
    fn enospc_from_the_probe_is_a_full_disk_not_a_failed_one() {
        // /dev/full answers every write with ENOSPC.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join(PROBE_FILE)).unwrap();
        let r = DiskProbe::new(dir.path(), false, Some(0)).run(1, false);
        assert_eq!(r.verdict, DiskVerdict::Full);
    }

    #[test]
    fn free_space_below_the_reserve_is_a_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DiskProbe::new(dir.path(), false, Some(u64::MAX)).run(1, false).verdict, DiskVerdict::Full);
        // The probe itself still ran: the disk is writable, just full.
        assert!(dir.path().join(PROBE_FILE).exists());
    }

    #[test]
    fn reserve_is_one_percent_clamped_with_hysteresis() {
        const MIB: u64 = 1 << 20;
        let fs = |total, free| FsSpace { total, free };
        // A small filesystem keeps 64 MiB.
        assert!(below_reserve(fs(1024 * MIB, 64 * MIB - 1), None, false));
        assert!(!below_reserve(fs(1024 * MIB, 64 * MIB), None, false));
        // A large one keeps 1%: 100 GiB keeps 1 GiB.
        assert!(below_reserve(fs(100 << 30, (1 << 30) - 1), None, false));
        assert!(!below_reserve(fs(100 << 30, 1 << 30), None, false));
        // ... and at most 1 GiB.
        assert!(!below_reserve(fs(10 << 40, 1 << 30), None, false));
        assert!(below_reserve(fs(10 << 40, (1 << 30) - 1), None, false));
        // An explicit reserve wins.
        assert!(!below_reserve(fs(100 << 30, 10 * MIB), Some(10 * MIB), false));
        assert!(below_reserve(fs(100 << 30, 10 * MIB - 1), Some(10 * MIB), false));
        // Once full, a quarter of the reserve more must be free to recover.
        assert!(below_reserve(fs(1024 * MIB, 64 * MIB), None, true));
        assert!(below_reserve(fs(1024 * MIB, 80 * MIB - 1), None, true));
        assert!(!below_reserve(fs(1024 * MIB, 80 * MIB), None, true));
    }

    fn report(verdict: DiskVerdict) -> DiskReport {
        DiskReport { verdict, free_bytes: 1 << 30 }
    }

    #[tokio::test]
    async fn hung_probe_fails_the_disk_without_starting_another() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let hold = Mutex::new(hold);
        let c = calls.clone();
        let probe: ProbeFn = Arc::new(move |_, _| {
            // The first probe hangs until released, like a disk stuck in the kernel.
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                let _ = hold.lock().unwrap().recv();
            }
            report(DiskVerdict::Ok)
        });
        let mut m = DiskMonitor::with_probe(probe, Duration::ZERO);
        for _ in 0..3 {
            let r = m.check(Duration::from_secs(1)).await;
            let DiskVerdict::Failed(why) = &r.verdict else { panic!("{r:?}") };
            assert!(why.contains("hung"), "{why}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no second probe while the first is stuck");
        release.send(()).unwrap();
        // Its late answer is the verdict once it arrives.
        let mut answered = None;
        for _ in 0..1000 {
            let r = m.check(Duration::ZERO).await;
            if r.verdict == DiskVerdict::Ok {
                answered = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(answered, Some(report(DiskVerdict::Ok)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The next tick probes afresh.
        assert_eq!(m.check(Duration::from_secs(60)).await, report(DiskVerdict::Ok));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn slow_probe_within_the_timeout_is_no_news() {
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let hold = Mutex::new(hold);
        let probe: ProbeFn = Arc::new(move |seq, was_full| {
            if seq == 2 {
                let _ = hold.lock().unwrap().recv();
            }
            // The second probe sees the first's verdict (hysteresis).
            report(if seq == 1 || was_full { DiskVerdict::Full } else { DiskVerdict::Ok })
        });
        let mut m = DiskMonitor::with_probe(probe, Duration::from_secs(3600));
        assert_eq!(m.check(Duration::from_secs(60)).await.verdict, DiskVerdict::Full);
        // Probe 2 is slow: the previous verdict stands.
        assert_eq!(m.check(Duration::ZERO).await.verdict, DiskVerdict::Full);
        release.send(()).unwrap();
        assert_eq!(m.check(Duration::from_secs(60)).await.verdict, DiskVerdict::Full);
    }

    #[tokio::test]
    async fn monitor_runs_the_real_probe() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = DiskMonitor::new(DiskProbe::new(dir.path(), false, Some(0)), PROBE_TIMEOUT);
        assert_eq!(m.check(Duration::from_secs(60)).await.verdict, DiskVerdict::Ok);
        std::fs::remove_file(dir.path().join(PROBE_FILE)).unwrap();
        std::fs::create_dir(dir.path().join(PROBE_FILE)).unwrap();
        assert!(matches!(m.check(Duration::from_secs(60)).await.verdict, DiskVerdict::Failed(_)));
        std::fs::remove_dir(dir.path().join(PROBE_FILE)).unwrap();
        assert_eq!(m.check(Duration::from_secs(60)).await.verdict, DiskVerdict::Ok, "recovers");
        let (health, error) = DiskVerdict::Failed("x".into()).to_pb();
        assert_eq!((health, error.as_str()), (pb::DiskHealth::DiskFailed, "x"));
    }
}
