//! Clone time to independence (issue 14), on a cluster of real processes as
//! the README starts them:
//!
//! ```text
//!   ballast meta ×3        ballast node ×3 (z1, z2, z3)
//!          ▲                        ▲
//!          └── ballast export (the clone, local node 1, NBD) ◄── fio (during the fill)
//! ```
//!
//! 1. a volume of BENCH_GIB GiB (64 MiB chunks, 3 replicas, min-in-sync 2),
//!    filled sequentially through NBD (fio, 1 MiB, QD8), detached;
//! 2. a snapshot of it, and `ballastctl volume create --from-snapshot`: the time
//!    of each;
//! 3. the clone attached with `ballast export`: its front end copies every chunk
//!    from the snapshot (reading the source's replicas, writing the clone's
//!    three), the background filler in index order; `volume inspect` is polled
//!    every 100 ms until the clone is independent, and the front end's
//!    "clone filled" line gives its own figure;
//! 4. the same with a client on the clone during the fill (fio 4 KiB random
//!    reads and writes at QD1): the time to independence then, and the
//!    client's p50/p99 during the fill against after it;
//! 5. references in the same run, on the same filesystem: copying BENCH_GIB GiB
//!    from one raw file to another (`dd`, 1 MiB, O_DIRECT, fsync at the end)
//!    and `qemu-img convert` of a raw image served by qemu-nbd to a raw file.
//!
//! Every node shares the one bench disk here, so a clone reads and writes it at
//! once, three times over (three replicas): the ratio to a raw copy is the
//! figure to watch. Nothing is asserted. Run: `cargo bench --bench clone`.
//! Knobs: BENCH_DIR (default target/bench-clone), BENCH_GIB (1).

#[path = "fio_log.rs"]
mod fio_log;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ballast_testkit::{try_wait_until, Cluster, ProcOptions};
use fio_log::{fio_json, fio_nbd, quantile_us, read_clat_log, Io};

const MIB: u64 = 1 << 20;
const FILL_TIMEOUT: Duration = Duration::from_secs(900);

fn main() -> Result<()> {
    let dir = std::env::var("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-clone"));
    let gib: u64 = std::env::var("BENCH_GIB").unwrap_or_else(|_| "1".into()).parse().context("BENCH_GIB")?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    for tool in ["fio", "dd", "qemu-img", "qemu-nbd"] {
        if Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status()?.code()
            != Some(0)
        {
            bail!("{tool} is needed (scripts/test-deps installs it)");
        }
    }
    let size = gib << 30;
    let raw = raw_copy_secs(&dir, size)?;
    let qemu = qemu_convert_secs(&dir, size)?;

    let c = Cluster::builder("clone")
        .dir(&dir)
        .nodes(&[(1, "z1".to_string()), (2, "z2".to_string()), (3, "z3".to_string())])
        .node_args(&["--capacity", "64G", "--heartbeat", "1s"])
        .procs(ProcOptions::log_files(&logs))
        .start()?;
    let gib_arg = format!("{gib}GiB");
    c.ctl_json(&["volume", "create", "src", "--size", &gib_arg, "--chunk-size", "64MiB", "--min-in-sync", "2"])?;
    {
        let (mut p, uri) = c.export_with("src", 1, &[])?;
        let mut fill = fio_nbd(&uri);
        fill.args(["--name=fill", "--rw=write", "--bs=1M", "--iodepth=8"]).arg(format!("--size={size}"));
        fio_json(fill, "fill the source")?;
        p.terminate(Duration::from_secs(30))?;
    }
    let t = Instant::now();
    c.ctl_json(&["snapshot", "create", "src", "base"])?;
    let snap_ms = t.elapsed().as_secs_f64() * 1e3;

    let idle = clone_run(&c, &gib_arg, "idle", None)?;
    let busy = clone_run(&c, &gib_arg, "busy", Some(size))?;

    let mb = size as f64 / 1e6;
    println!("\nclone to independence, {gib} GiB, 64 MiB chunks, 3 replicas (3 nodes on one disk)");
    println!("snapshot create (detached source): {snap_ms:.0} ms");
    println!("| run | create | attach to independent | front end's fill | MB/s | × raw copy | × qemu-img convert |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in [&idle, &busy] {
        println!(
            "| {} | {:.0} ms | {:.1} s | {} | {:.0} | {:.2} | {:.2} |",
            r.name,
            r.create_ms,
            r.independent_s,
            r.filler_s.map_or("-".into(), |s| format!("{s:.1} s")),
            mb / r.independent_s,
            r.independent_s / raw,
            r.independent_s / qemu,
        );
    }
    println!("references: raw file copy (dd 1 MiB O_DIRECT) {raw:.1} s ({:.0} MB/s), qemu-img convert from qemu-nbd {qemu:.1} s ({:.0} MB/s)", mb / raw, mb / qemu);
    if let Some((during, after)) = &busy.client {
        println!(
            "client on the clone, fio 4k randrw 70/30 QD1: during the fill p50 {:.0} us p99 {:.0} us ({} I/Os); after it p50 {:.0} us p99 {:.0} us ({} I/Os)",
            during.0, during.1, during.2, after.0, after.1, after.2
        );
    }
    drop(c);
    let _ = std::fs::remove_dir_all(dir.join("raw"));
    Ok(())
}

struct CloneRun {
    name: &'static str,
    create_ms: f64,
    independent_s: f64,
    filler_s: Option<f64>,
    /// The client's latencies during the fill and after it.
    client: Option<(Lat, Lat)>,
}

/// Creates clone `name` of snapshot `base`, attaches it, and times it to
/// independence; with `client_size`, fio runs on the clone meanwhile.
fn clone_run(c: &Cluster, size: &str, name: &'static str, client_size: Option<u64>) -> Result<CloneRun> {
    let t = Instant::now();
    c.ctl_json(&["volume", "create", name, "--size", size, "--chunk-size", "64MiB", "--from-snapshot", "base"])?;
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let (mut p, uri) = c.export_with(name, 1, &[])?;
    let started_ms = unix_ms();
    let lat_prefix = c.path(&format!("lat-{name}"));
    let mut fio_child = match client_size {
        Some(bytes) => {
            let mut cmd = fio_nbd(&uri);
            cmd.args(["--name=lat", "--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=1", "--time_based"])
                .arg(format!("--size={bytes}"))
                .arg("--runtime=3600")
                .arg(format!("--write_lat_log={}", lat_prefix.display()))
                .arg("--log_unix_epoch=1")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Some(cmd.spawn().context("start fio on the clone")?)
        }
        None => None,
    };
    try_wait_until(&format!("clone {name} independent"), FILL_TIMEOUT, || {
        let v = c.ctl_json(&["volume", "inspect", name])?;
        Ok(v["volume"]["unfilled_chunks"].as_u64() == Some(0))
    })?;
    let independent_s = t.elapsed().as_secs_f64();
    let filled_ms = unix_ms();
    let mut client = None;
    if let Some(mut child) = fio_child.take() {
        // As long again after the fill, then stop fio (SIGINT: it writes its logs).
        std::thread::sleep(Duration::from_secs_f64(independent_s.clamp(5.0, 30.0)));
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let _ = child.wait();
        let ios = read_clat_log(&lat_prefix)?;
        client = Some((lat(&ios, started_ms, filled_ms), lat(&ios, filled_ms, u64::MAX)));
    }
    p.terminate(Duration::from_secs(30))?;
    let filler_s = filler_secs(&c.path(&format!("logs/export-{name}.log")));
    Ok(CloneRun { name, create_ms, independent_s, filler_s, client })
}

/// The front end's own figure: its `clone filled ... secs=S` line (the kit
/// keeps each process's stderr in the run's log directory).
fn filler_secs(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rfind(|l| l.contains("clone filled"))?;
    line.split("secs=").nth(1)?.split([' ', ',', '}']).next()?.parse().ok()
}

/// `dd` of a raw file to another, 1 MiB blocks, O_DIRECT both ways, fsync.
fn raw_copy_secs(dir: &Path, size: u64) -> Result<f64> {
    let raw = dir.join("raw");
    std::fs::create_dir_all(&raw)?;
    let (a, b) = (raw.join("a.img"), raw.join("b.img"));
    let count = (size / MIB).to_string();
    run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none", "conv=fsync"])
        .arg(format!("of={}", a.display()))
        .arg(format!("count={count}")))?;
    let t = Instant::now();
    run(Command::new("dd")
        .args(["bs=1M", "iflag=direct", "oflag=direct", "conv=fsync", "status=none"])
        .arg(format!("if={}", a.display()))
        .arg(format!("of={}", b.display())))?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&b);
    Ok(secs)
}

/// `qemu-img convert` from qemu-nbd serving the raw image to a raw file.
fn qemu_convert_secs(dir: &Path, _size: u64) -> Result<f64> {
    let raw = dir.join("raw");
    let (a, b) = (raw.join("a.img"), raw.join("q.img"));
    let sock = raw.join("qemu.sock");
    let mut server = Command::new("qemu-nbd")
        .args(["--format=raw", "--persistent", "--shared=2", "--cache=none", "--aio=native"])
        .arg(format!("--socket={}", sock.display()))
        .arg(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-nbd")?;
    let ready = Instant::now();
    while !sock.exists() && ready.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let result = run(Command::new("qemu-img")
        .args(["convert", "-O", "raw", "-t", "none", "-T", "none"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .arg(&b));
    let secs = t.elapsed().as_secs_f64();
    let _ = server.kill();
    let _ = server.wait();
    result?;
    let _ = std::fs::remove_file(&b);
    Ok(secs)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// p50 and p99 in microseconds, and the count, of I/Os.
type Lat = (f64, f64, usize);

/// The [`Lat`] of I/Os (reads and writes) completed in [from, to).
fn lat(ios: &[Io], from: u64, to: u64) -> Lat {
    let mut v: Vec<u64> = ios.iter().filter(|i| i.at_ms >= from && i.at_ms < to).map(|i| i.clat_ns).collect();
    v.sort_unstable();
    (quantile_us(&v, 0.5), quantile_us(&v, 0.99), v.len())
}
