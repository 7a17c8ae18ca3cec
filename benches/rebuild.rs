//! The declustered-rebuild benchmark (issue 4): time to full redundancy after a
//! storage node is lost, rebuild throughput, and what the rebuild does to client
//! latency, on a cluster of real processes:
//!
//! ```text
//!   ballast meta ×3 (Raft group)      ballast node ×N (zones z1,z2,z3 round robin)
//!            ▲                                 ▲
//!            └──── ballast export (local node 1, NBD) ◄── fio nbd engine
//! ```
//!
//! Per run (one per node count × copy rate):
//! 1. a volume of BENCH_GIB GiB, 64 MiB chunks, 2 replicas, min-in-sync 1 (two
//!    replicas, not three, so that the 3-node cluster has a spare node for every
//!    chunk and the 3- and 6-node runs are comparable), filled sequentially
//!    through NBD (fio, 1 MiB, QD8);
//! 2. client latency before: fio 4 KiB randrw 70/30 at QD1 for BENCH_LAT_SECONDS;
//! 3. the same fio job runs on in the background while the storage node (not the
//!    export's local node) holding the most replicas is SIGKILLed; meta (suspect
//!    after 1 s, down after 3 s) schedules rebuilds; `ballastctl volume inspect`
//!    is polled every 250 ms until no replica is degraded, rebuilding or ejected
//!    and none is on the dead node;
//! 4. the rebuild jobs (`ballastctl jobs --all`) give the bytes rebuilt, the
//!    targets and the sources.
//!
//! Latencies come from fio's per-I/O completion latency logs (exact
//! percentiles, split at the kill and at the first rebuild job seen). The raw
//! sequential write speed of the bench filesystem is measured in the same run as
//! the reference for the rebuild MB/s: every node shares that one disk here, so
//! a rebuild reads and writes it at once.
//!
//! Nothing is asserted: speed is read, not tested. Run:
//! `cargo bench --bench rebuild`. Knobs: BENCH_DIR (default target/bench-rebuild,
//! a real filesystem), BENCH_GIB (4), BENCH_NODES ("3,6"), BENCH_RATES (node
//! --copy-rate per run, "0,100M"; 0 is unthrottled), BENCH_HEARTBEAT (node
//! heartbeat, default 1s as in production), BENCH_LAT_SECONDS (10).

#[path = "fio_log.rs"]
mod fio_log;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ballast_testkit::ctl::{chunks, healthy, replicas_on};
use ballast_testkit::{try_wait_until, Cluster, ProcOptions};
use fio_log::{fio_json, fio_nbd, quantile_us, read_clat_log, Io};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * MIB;
const REPLICAS: u32 = 2;
const SUSPECT_AFTER: &str = "1s";
const DOWN_AFTER: Duration = Duration::from_secs(3);
/// The node the export runs on (reads prefer its replica); never the victim.
const LOCAL_NODE: u64 = 1;
const VOLUME: &str = "bench";
/// How long a rebuild may take before the run is abandoned.
const REBUILD_TIMEOUT: Duration = Duration::from_secs(900);

struct Settings {
    dir: PathBuf,
    gib: u64,
    nodes: Vec<usize>,
    rates: Vec<String>,
    heartbeat: String,
    lat_seconds: u64,
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn settings() -> Result<Settings> {
    let dir = std::env::var("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-rebuild"));
    let gib = env_or("BENCH_GIB", "4").parse().context("BENCH_GIB: a whole number of GiB")?;
    let nodes = env_or("BENCH_NODES", "3,6")
        .split(',')
        .map(|s| s.trim().parse::<usize>().with_context(|| format!("BENCH_NODES: bad count {s:?}")))
        .collect::<Result<Vec<_>>>()?;
    if let Some(n) = nodes.iter().find(|&&n| n < 3) {
        bail!("BENCH_NODES: {n} nodes leave no spare for a 2-replica chunk after a loss (need 3 or more)");
    }
    let rates = env_or("BENCH_RATES", "0,100M").split(',').map(|s| s.trim().to_string()).collect();
    let heartbeat = env_or("BENCH_HEARTBEAT", "1s");
    let lat_seconds = env_or("BENCH_LAT_SECONDS", "10").parse().context("BENCH_LAT_SECONDS")?;
    Ok(Settings { dir, gib, nodes, rates, heartbeat, lat_seconds })
}

// ---- the cluster ------------------------------------------------------------------

/// Three meta members and N storage nodes (zones z1, z2, z3 round robin) in
/// `dir`, each process logging to `dir/logs/<name>.log`; killed on drop.
fn start_cluster(dir: &Path, nodes: usize, copy_rate: &str, heartbeat: &str) -> Result<Cluster> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let zones: Vec<(u64, String)> = (1..=nodes as u64).map(|id| (id, format!("z{}", (id - 1) % 3 + 1))).collect();
    let down_after = format!("{}s", DOWN_AFTER.as_secs());
    let c = Cluster::builder("rebuild")
        .dir(dir)
        .nodes(&zones)
        .meta_args(&["--suspect-after", SUSPECT_AFTER, "--down-after", &down_after])
        .node_args(&["--capacity", "64G", "--heartbeat", heartbeat, "--copy-rate", copy_rate])
        .procs(ProcOptions::log_files(&logs))
        .start()?;
    Ok(c)
}

/// Kills everything and deletes the data (the logs stay).
fn teardown(c: Cluster, dir: &Path) -> Result<()> {
    drop(c);
    let logs = dir.join("logs");
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p != logs && p.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    Ok(())
}

// ---- fio ------------------------------------------------------------------------

/// The latency workload: 4 KiB random 70 % reads / 30 % writes at QD1 over the
/// whole volume, logging every I/O's completion latency with a wall-clock stamp.
fn latency_job(uri: &str, size: u64, log_prefix: &Path, runtime: Duration) -> Command {
    let mut cmd = fio_nbd(uri);
    cmd.args(["--name=lat", "--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=1", "--time_based"])
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={}", runtime.as_secs()))
        .arg(format!("--write_lat_log={}", log_prefix.display()))
        .arg("--log_unix_epoch=1")
        .arg("--randrepeat=0");
    cmd
}

/// Latency statistics of one kind of I/O in a time window.
#[derive(Clone, Copy, Default)]
struct Lat {
    count: usize,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

fn lat(ios: &[Io], write: bool, from_ms: u64, to_ms: u64) -> Lat {
    let mut v: Vec<u64> =
        ios.iter().filter(|i| i.write == write && i.at_ms >= from_ms && i.at_ms < to_ms).map(|i| i.clat_ns).collect();
    if v.is_empty() {
        return Lat::default();
    }
    v.sort_unstable();
    let max_us = *v.last().unwrap_or(&0) as f64 / 1000.0;
    Lat { count: v.len(), p50_us: quantile_us(&v, 0.50), p99_us: quantile_us(&v, 0.99), max_us }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Raw sequential write speed of the bench filesystem: 1 GiB, 1 MiB, O_DIRECT, QD8.
fn raw_write_mb_s(dir: &Path) -> Result<f64> {
    let file = dir.join("raw.img");
    let mut cmd = Command::new("fio");
    cmd.args(["--name=raw", "--rw=write", "--bs=1M", "--iodepth=8", "--ioengine=libaio", "--direct=1"])
        .arg("--size=1G")
        .arg("--end_fsync=1")
        .arg(format!("--filename={}", file.display()));
    let v = fio_json(cmd, "raw disk")?;
    let _ = std::fs::remove_file(&file);
    Ok(v["jobs"][0]["write"]["bw_bytes"].as_f64().context("fio: no write bw")? / 1e6)
}

// ---- the processes' logs ----------------------------------------------------------

/// Seconds since midnight UTC of a tracing line's RFC 3339 stamp
/// ("2026-11-24T17:10:40.525999Z ..."), and the rest of the line without ANSI colours.
fn log_line(raw: &str) -> Option<(f64, String)> {
    let mut line = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // CSI: ESC [ params final-byte.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            line.push(ch);
        }
    }
    let (stamp, rest) = line.split_once(' ')?;
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut hms = time.split(':');
    let (h, m, sec) =
        (hms.next()?.parse::<f64>().ok()?, hms.next()?.parse::<f64>().ok()?, hms.next()?.parse::<f64>().ok()?);
    Some((h * 3600.0 + m * 60.0 + sec, rest.to_string()))
}

fn log_lines(path: &Path) -> Vec<(f64, String)> {
    std::fs::read_to_string(path).map(|t| t.lines().filter_map(log_line).collect()).unwrap_or_default()
}

/// `key=value` (the value up to the next space, `}` or `,`) in a log line.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    let mut at = 0;
    while let Some(i) = line[at..].find(&pat) {
        let start = at + i;
        // A whole key: preceded by a space, `{` or the line start.
        if start == 0 || matches!(line.as_bytes()[start - 1], b' ' | b'{') {
            let v = &line[start + pat.len()..];
            return Some(v.split([' ', '}', ',']).next().unwrap_or(v));
        }
        at = start + pat.len();
    }
    None
}

/// The rebuild as the logs tell it, in seconds after the kill.
#[derive(Default)]
struct Timeline {
    /// The leader's first `starting copy job ... kind=Rebuild`.
    first_scheduled: Option<f64>,
    /// Per rebuilt chunk: scheduled by meta → copy started on the target (the
    /// front end must acknowledge the new layout, then the target picks the job
    /// up with a heartbeat), and the copy itself.
    waits: Vec<f64>,
    copies: Vec<f64>,
    /// Union of the copy intervals, over (first scheduled … last copy done).
    busy: f64,
    window: f64,
    /// Front end layout installs after the kill.
    layouts: usize,
}

fn timeline(logs: &Path, nodes: usize, kill_ms: u64) -> Timeline {
    // Log stamps and `kill_ms` read the same clock; only midnight needs care.
    let kill = (kill_ms % 86_400_000) as f64 / 1000.0;
    let rel = |t: f64| (t - kill + 43_200.0).rem_euclid(86_400.0) - 43_200.0;
    let after = |t: f64| rel(t) >= 0.0;
    let mut tl = Timeline::default();
    let mut scheduled: BTreeMap<u64, f64> = BTreeMap::new();
    for m in 1..=3 {
        for (t, l) in log_lines(&logs.join(format!("meta{m}.log"))) {
            if after(t) && l.contains("starting copy job") && log_field(&l, "kind") == Some("Rebuild") {
                if let Some(chunk) = log_field(&l, "chunk").and_then(|c| c.parse().ok()) {
                    let r = rel(t);
                    scheduled.entry(chunk).or_insert(r);
                    tl.first_scheduled = Some(tl.first_scheduled.map_or(r, |f: f64| f.min(r)));
                }
            }
        }
    }
    // Per job id on each node: (chunk, copy start, copy done).
    let mut spans: Vec<(f64, f64)> = Vec::new();
    for n in 1..=nodes {
        let mut jobs: BTreeMap<u64, (u64, f64)> = BTreeMap::new();
        for (t, l) in log_lines(&logs.join(format!("node{n}.log"))) {
            if !after(t) {
                continue;
            }
            let (Some(job), Some(chunk)) = (
                log_field(&l, "job").and_then(|j| j.parse::<u64>().ok()),
                log_field(&l, "chunk").and_then(|c| c.parse::<u64>().ok()),
            ) else {
                continue;
            };
            if l.contains("copy job starting") {
                jobs.insert(job, (chunk, rel(t)));
            } else if l.contains("copy job done") {
                if let Some((chunk, start)) = jobs.remove(&job) {
                    if let Some(s) = scheduled.get(&chunk) {
                        tl.waits.push(start - s);
                    }
                    tl.copies.push(rel(t) - start);
                    spans.push((start, rel(t)));
                }
            }
        }
    }
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut end = f64::MIN;
    for (a, b) in &spans {
        if *b > end {
            tl.busy += b - a.max(end);
            end = *b;
        }
    }
    if let (Some(first), Some(last)) = (tl.first_scheduled, spans.iter().map(|s| s.1).reduce(f64::max)) {
        tl.window = last - first;
    }
    tl.layouts = log_lines(&logs.join(format!("export-{VOLUME}.log")))
        .iter()
        .filter(|(t, l)| after(*t) && l.contains("new layout installed"))
        .count();
    tl
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

// ---- one run --------------------------------------------------------------------

struct Row {
    nodes: usize,
    rate: String,
    fill_mb_s: f64,
    victim: u64,
    lost: usize,
    rebuilt: usize,
    bytes: u64,
    failed_jobs: usize,
    victim_resyncs: usize,
    tl: Timeline,
    targets: BTreeMap<u64, usize>,
    sources: BTreeMap<u64, usize>,
    max_running: usize,
    since_kill: Duration,
    detected: Duration,
    before_r: Lat,
    before_w: Lat,
    gap_r: Lat,
    gap_w: Lat,
    during_r: Lat,
    during_w: Lat,
}

impl Row {
    fn after_down(&self) -> Duration {
        self.since_kill.saturating_sub(DOWN_AFTER)
    }
    fn rebuild_secs(&self) -> f64 {
        self.since_kill.saturating_sub(self.detected).as_secs_f64()
    }
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.rebuild_secs().max(1e-3)
    }
}

fn run(s: &Settings, nodes: usize, rate: &str) -> Result<Row> {
    let dir = s.dir.join(format!("n{nodes}-rate{rate}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!("== {nodes} nodes, --copy-rate {rate}: {}", dir.display());
    let mut c = start_cluster(&dir, nodes, rate, &s.heartbeat)?;
    let size = s.gib << 30;
    c.ctl_json(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        &size.to_string(),
        "--chunk-size",
        &CHUNK.to_string(),
        "--replicas",
        &REPLICAS.to_string(),
        "--min-in-sync",
        "1",
    ])?;
    let (export, uri) = c.export_with(VOLUME, LOCAL_NODE, &[])?;

    let mut fill = fio_nbd(&uri);
    fill.args(["--name=fill", "--rw=write", "--bs=1M", "--iodepth=8"]).arg(format!("--size={size}"));
    let t = Instant::now();
    fio_json(fill, "fill")?;
    let fill_mb_s = size as f64 / 1e6 / t.elapsed().as_secs_f64();
    eprintln!("   filled {} GiB at {fill_mb_s:.0} MB/s", s.gib);

    let layout = c.inspect(VOLUME)?;
    if !healthy(&layout) {
        bail!("volume not healthy after the fill: {}", layout["health"]);
    }
    let volume_id = layout["volume"]["id"].as_u64().context("inspect: no volume id")?;

    // Before: the latency job alone.
    let before_log = dir.join("logs").join("lat-before");
    let t0 = unix_ms();
    fio_json(latency_job(&uri, size, &before_log, Duration::from_secs(s.lat_seconds)), "latency before")?;
    let before = read_clat_log(&before_log)?;
    let (before_r, before_w) = (lat(&before, false, t0, u64::MAX), lat(&before, true, t0, u64::MAX));

    // The victim: the node other than the export's holding the most replicas.
    let victim = (1..=nodes as u64)
        .filter(|&n| n != LOCAL_NODE)
        .max_by_key(|&n| (replicas_on(&layout, n), std::cmp::Reverse(n)))
        .context("no victim")?;
    let lost = replicas_on(&layout, victim);

    // During: the same job in the background (fio stops on SIGINT and flushes its log).
    let during_log = dir.join("logs").join("lat-during");
    let mut fio = latency_job(&uri, size, &during_log, REBUILD_TIMEOUT + Duration::from_secs(60))
        .arg(format!("--output={}", dir.join("logs").join("lat-during.json").display()))
        .stdout(Stdio::null())
        .spawn()
        .context("spawn fio")?;
    std::thread::sleep(Duration::from_secs(2));
    eprintln!("   SIGKILL node {victim} ({lost} of {} chunks have a replica there)", chunks(&layout).len());
    let kill_ms = unix_ms();
    let killed = Instant::now();
    c.kill_node(victim)?;
    let mut detected: Option<Duration> = None;
    let mut max_running = 0;
    let waited = try_wait_until("full redundancy", REBUILD_TIMEOUT, || {
        let active = c.ctl_json(&["jobs"])?;
        let running = active["jobs"].as_array().map_or(0, |j| j.iter().filter(|j| j["kind"] == "rebuild").count());
        max_running = max_running.max(running);
        let l = c.inspect(VOLUME)?;
        if detected.is_none() && running > 0 {
            detected = Some(killed.elapsed());
        }
        Ok(healthy(&l) && replicas_on(&l, victim) == 0)
    });
    let since_kill = killed.elapsed();
    let healthy_ms = unix_ms();
    // SAFETY: kill(2) on fio, our own child.
    unsafe {
        libc::kill(fio.id() as i32, libc::SIGINT);
    }
    let _ = fio.wait();
    waited?;
    let tl = timeline(&dir.join("logs"), nodes, kill_ms);
    // The leader's log says when the first rebuild was scheduled; the 250 ms poll
    // is the fallback.
    let detected = tl.first_scheduled.map(Duration::from_secs_f64).or(detected).unwrap_or(since_kill);
    let during = read_clat_log(&during_log)?;
    let detect_ms = kill_ms + detected.as_millis() as u64;

    let jobs = c.ctl_json(&["jobs", "--all"])?;
    let rebuilds: Vec<&Value> = jobs["jobs"]
        .as_array()
        .map(|j| j.iter().filter(|j| j["kind"] == "rebuild" && j["volume"].as_u64() == Some(volume_id)).collect())
        .unwrap_or_default();
    let done: Vec<&&Value> = rebuilds.iter().filter(|j| j["state"] == "done").collect();
    let failed: Vec<&&Value> = rebuilds.iter().filter(|j| j["state"] == "failed").collect();
    // Resyncs meta aimed at the victim while it still counted as up (the front end
    // had ejected its replicas): they can only fail once it is down.
    let resyncs: Vec<&Value> = jobs["jobs"]
        .as_array()
        .map(|j| j.iter().filter(|j| j["kind"] == "resync" && j["target"].as_u64() == Some(victim)).collect())
        .unwrap_or_default();
    if let Some(j) = resyncs.first() {
        eprintln!(
            "   {} resync jobs were aimed at the dead node {victim}, e.g. job {} ({}): {}",
            resyncs.len(),
            j["id"],
            j["state"],
            j["error"]
        );
    }
    for j in &failed {
        eprintln!("   FAILED job {}: chunk {} -> node {}: {}", j["id"], j["chunk"], j["target"], j["error"]);
    }
    let mut targets = BTreeMap::new();
    let mut sources = BTreeMap::new();
    for j in &done {
        *targets.entry(j["target"].as_u64().unwrap_or(0)).or_insert(0) += 1;
        // With two replicas one in-sync replica is left per chunk: the only source.
        if let Some(src) = j["sources"].as_array().and_then(|s| s.first()).and_then(Value::as_u64) {
            *sources.entry(src).or_insert(0) += 1;
        }
    }
    let chunk_set: BTreeSet<u64> = done.iter().filter_map(|j| j["chunk"].as_u64()).collect();
    let row = Row {
        nodes,
        rate: rate.to_string(),
        fill_mb_s,
        victim,
        lost,
        rebuilt: chunk_set.len(),
        bytes: done.iter().filter_map(|j| j["chunk_len"].as_u64()).sum(),
        failed_jobs: failed.len(),
        victim_resyncs: resyncs.len(),
        tl,
        targets,
        sources,
        max_running,
        since_kill,
        detected,
        before_r,
        before_w,
        gap_r: lat(&during, false, kill_ms, detect_ms),
        gap_w: lat(&during, true, kill_ms, detect_ms),
        during_r: lat(&during, false, detect_ms, healthy_ms),
        during_w: lat(&during, true, detect_ms, healthy_ms),
    };
    eprintln!(
        "   full redundancy {:.1} s after the kill (rebuild seen at {:.1} s): {} chunks, {:.0} MB/s",
        row.since_kill.as_secs_f64(),
        row.detected.as_secs_f64(),
        row.rebuilt,
        row.mb_s()
    );
    drop(export);
    teardown(c, &dir)?;
    Ok(row)
}

// ---- report ---------------------------------------------------------------------

fn counts(m: &BTreeMap<u64, usize>) -> String {
    m.iter().map(|(n, c)| format!("{n}:{c}")).collect::<Vec<_>>().join(" ")
}

fn ratio(during: f64, before: f64) -> String {
    if before > 0.0 {
        format!("{:.2}x", during / before)
    } else {
        "-".into()
    }
}

fn print(s: &Settings, raw_mb_s: f64, rows: &[Row]) {
    println!();
    println!(
        "rebuild after SIGKILL of one storage node: {} GiB volume, 64 MiB chunks, {REPLICAS} replicas, min-in-sync 1; \
         meta suspect {SUSPECT_AFTER} / down {}s; node heartbeat {}",
        s.gib,
        DOWN_AFTER.as_secs(),
        s.heartbeat
    );
    println!("raw disk (fio, plain file, 1 MiB seq write, O_DIRECT, QD8, 1 GiB): {raw_mb_s:.0} MB/s");
    println!();
    println!(
        "{:>5} {:>6} {:>4} {:>6} {:>6} {:>7} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "nodes",
        "rate",
        "GiB",
        "fillMB",
        "victim",
        "chunks",
        "targets",
        "sources",
        "t_kill_s",
        "t_down_s",
        "t_rb_s",
        "rbMB/s"
    );
    for r in rows {
        println!(
            "{:>5} {:>6} {:>4} {:>6.0} {:>6} {:>3}/{:<3} {:>7} {:>9} {:>9.1} {:>9.1} {:>8.1} {:>8.0}",
            r.nodes,
            if r.rate == "0" { "unthr" } else { &r.rate },
            s.gib,
            r.fill_mb_s,
            r.victim,
            r.rebuilt,
            r.lost,
            r.targets.len(),
            r.sources.len(),
            r.since_kill.as_secs_f64(),
            r.after_down().as_secs_f64(),
            r.rebuild_secs(),
            r.mb_s()
        );
    }
    println!();
    println!(
        "{:>5} {:>6} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7} {:>12} {:>12}",
        "nodes",
        "rate",
        "rd p99 bef",
        "rd p99 rb",
        "ratio",
        "wr p99 bef",
        "wr p99 rb",
        "ratio",
        "rd max det",
        "wr max det"
    );
    for r in rows {
        println!(
            "{:>5} {:>6} {:>10.0} {:>10.0} {:>7} {:>10.0} {:>10.0} {:>7} {:>12.0} {:>12.0}",
            r.nodes,
            if r.rate == "0" { "unthr" } else { &r.rate },
            r.before_r.p99_us,
            r.during_r.p99_us,
            ratio(r.during_r.p99_us, r.before_r.p99_us),
            r.before_w.p99_us,
            r.during_w.p99_us,
            ratio(r.during_w.p99_us, r.before_w.p99_us),
            r.gap_r.max_us,
            r.gap_w.max_us,
        );
    }
    println!();
    for r in rows {
        println!(
            "{} nodes, rate {}: rebuild jobs per target {}; per source {}; most rebuild jobs seen active {}; \
             failed rebuild jobs {}; resync jobs aimed at the dead node {}",
            r.nodes,
            r.rate,
            counts(&r.targets),
            counts(&r.sources),
            r.max_running,
            r.failed_jobs,
            r.victim_resyncs,
        );
        println!(
            "   timeline (s after kill): first rebuild scheduled {:.2}; per job: scheduled -> copy start mean {:.2} \
             max {:.2}, copy mean {:.2} max {:.2}; copies running {:.1} of {:.1} s ({:.0}%); front-end layout \
             installs {}",
            r.tl.first_scheduled.unwrap_or(f64::NAN),
            mean(&r.tl.waits),
            max(&r.tl.waits),
            mean(&r.tl.copies),
            max(&r.tl.copies),
            r.tl.busy,
            r.tl.window,
            if r.tl.window > 0.0 { 100.0 * r.tl.busy / r.tl.window } else { 0.0 },
            r.tl.layouts,
        );
        println!(
            "   I/Os before {}r/{}w, kill..detect {}r/{}w (p99 {:.0}/{:.0} us), rebuild {}r/{}w (p50 {:.0}/{:.0} us)",
            r.before_r.count,
            r.before_w.count,
            r.gap_r.count,
            r.gap_w.count,
            r.gap_r.p99_us,
            r.gap_w.p99_us,
            r.during_r.count,
            r.during_w.count,
            r.during_r.p50_us,
            r.during_w.p50_us,
        );
    }
    println!();
    println!(
        "chunks: rebuilt/lost (replicas on the victim). t_kill_s: kill to full redundancy; t_down_s: the same less \
         the {}s down timeout; t_rb_s: from the first rebuild job scheduled (leader log) to full redundancy. \
         rbMB/s: bytes of the done rebuild jobs / t_rb_s. Latencies in us (fio clat, 4 KiB randrw 70/30 QD1): \
         'bef' a {} s run before the kill, 'rb' while rebuild jobs ran, 'max det' the worst I/O between the kill \
         and the first rebuild job.",
        DOWN_AFTER.as_secs(),
        s.lat_seconds
    );
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; there are no other arguments.
    let s = settings()?;
    if Command::new("fio").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!("SKIP rebuild bench: fio is not installed (apt-get install -y fio)");
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(&s.dir);
    std::fs::create_dir_all(&s.dir).with_context(|| format!("create {}", s.dir.display()))?;
    let raw = raw_write_mb_s(&s.dir)?;
    eprintln!("raw disk write: {raw:.0} MB/s");
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &n in &s.nodes {
        for rate in &s.rates {
            // A run that fails is reported (its logs stay under BENCH_DIR); the others go on.
            match run(&s, n, rate) {
                Ok(r) => rows.push(r),
                Err(e) => failures.push(format!("{n} nodes, rate {rate}: {e:#}")),
            }
        }
    }
    print(&s, raw, &rows);
    for f in &failures {
        println!("FAILED run: {f}");
    }
    if !failures.is_empty() {
        bail!("{} run(s) failed", failures.len());
    }
    Ok(())
}
