//! Disk health: the probe that checks the disk under a chunk store, the monitor
//! that runs it beside the heartbeat, and the space rule that calls a disk full.
//!
//! Every heartbeat carries the verdict of a disk probe ([`DiskProbe`], run by a
//! [`DiskMonitor`] on its own thread): a node whose disk fails or fills up keeps
//! heartbeating, and meta moves its replicas away instead of resyncing them in
//! place forever.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_proto::v1 as pb;
use tokio::sync::oneshot;
use tracing::{info, warn};

/// Bytes the probe writes: one block, the unit of O_DIRECT I/O.
pub(crate) const PROBE_LEN: usize = 4096;
/// The probe's file, in the store's directory (beside `chunks/`, never in it).
pub(crate) const PROBE_FILE: &str = ".probe";
/// How long a heartbeat waits for this tick's probe before sending the last verdict.
pub(crate) const PROBE_WAIT: Duration = Duration::from_millis(20);
/// The least free space a node keeps by default: one default chunk. A
/// filesystem over 6.4 GiB keeps 1% instead, up to [`MAX_DISK_RESERVE`].
const MIN_DISK_RESERVE: u64 = 64 << 20;
/// The most a node keeps free by default (1% of a 10 TB disk would idle 100 GB).
const MAX_DISK_RESERVE: u64 = 1 << 30;
/// A probe that has not answered in this long counts as a failed disk: a
/// database above us cannot wait that long for a write either.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`fs_capacity`] could not read the filesystem's size.
#[derive(Debug, thiserror::Error)]
#[error("statvfs {}", dir.display())]
pub struct CapacityError {
    /// The directory asked about.
    pub dir: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Disk capacity of the filesystem holding `dir`.
pub fn fs_capacity(dir: &Path) -> Result<u64, CapacityError> {
    let space = fs_space(dir).map_err(|source| CapacityError { dir: dir.to_path_buf(), source })?;
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

    /// The verdict as a heartbeat carries it: the health and, for a failed
    /// disk, why.
    pub(crate) fn to_pb(&self) -> (pb::DiskHealth, String) {
        match self {
            DiskVerdict::Ok => (pb::DiskHealth::DiskOk, String::new()),
            DiskVerdict::Full => (pb::DiskHealth::DiskFull, String::new()),
            DiskVerdict::Failed(why) => (pb::DiskHealth::DiskFailed, why.clone()),
        }
    }
}

/// One probe's verdict and the space it saw (0 if statvfs failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskReport {
    pub verdict: DiskVerdict,
    pub free_bytes: u64,
    /// The filesystem's size.
    pub total_bytes: u64,
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
    /// `reserve`: free bytes below which the disk is full (None: 1% of the
    /// filesystem, at least 64 MiB and at most 1 GiB).
    pub fn new(dir: impl Into<PathBuf>, direct: bool, reserve: Option<u64>) -> DiskProbe {
        DiskProbe { dir: dir.into(), direct, reserve }
    }

    /// The `seq`th probe; `was_full`: the previous verdict (hysteresis).
    pub fn run(&self, seq: u64, was_full: bool) -> DiskReport {
        let space = match fs_space(&self.dir) {
            Ok(s) => s,
            Err(e) => {
                let verdict = DiskVerdict::Failed(format!("statvfs {}: {e}", self.dir.display()));
                return DiskReport { verdict, free_bytes: 0, total_bytes: 0 };
            }
        };
        let verdict = match self.write_read(seq) {
            // Out of space is not a broken disk: its replicas are still good.
            Err((_, e)) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => DiskVerdict::Full,
            Err((step, e)) => DiskVerdict::Failed(format!("{step} {}: {e}", self.dir.join(PROBE_FILE).display())),
            Ok(()) if below_reserve(space, self.reserve, was_full) => DiskVerdict::Full,
            Ok(()) => DiskVerdict::Ok,
        };
        DiskReport { verdict, free_bytes: space.free, total_bytes: space.total }
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
            last: DiskReport { verdict: DiskVerdict::Ok, free_bytes: 0, total_bytes: 0 },
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
                total_bytes: self.last.total_bytes,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use ballast_chunkstore::{ChunkStore, StoreOptions};

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
        DiskReport { verdict, free_bytes: 1 << 30, total_bytes: 1 << 31 }
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
        // The next tick probes afresh (with this monitor's zero timeout a
        // probe thread slow to start on a loaded machine is "hung" until it
        // answers, so the fresh answer is waited for as above).
        let mut fresh = None;
        for _ in 0..1000 {
            let r = m.check(Duration::from_secs(60)).await;
            if r.verdict == DiskVerdict::Ok {
                fresh = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(fresh, Some(report(DiskVerdict::Ok)));
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
