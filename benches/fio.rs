//! fio runner shared by the benchmarks: one workload description, run against a
//! raw file (io_uring, O_DIRECT) or an NBD URI (fio's nbd engine), parsed from
//! fio's JSON output into IOPS and completion-latency percentiles.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One fio workload: what every target (raw file, qemu-nbd, Ballast) runs alike.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub name: &'static str,
    /// fio `--rw`: randwrite, randread, write, read.
    pub rw: &'static str,
    pub bs: u32,
    pub qd: u32,
}

impl Workload {
    pub fn is_write(&self) -> bool {
        self.rw.contains("write")
    }
}

/// The workload set: 4 KiB random write and read at QD1 and QD32, 1 MiB
/// sequential write.
pub const WORKLOADS: &[Workload] = &[
    Workload { name: "4k randwrite qd1", rw: "randwrite", bs: 4096, qd: 1 },
    Workload { name: "4k randwrite qd32", rw: "randwrite", bs: 4096, qd: 32 },
    Workload { name: "4k randread qd1", rw: "randread", bs: 4096, qd: 1 },
    Workload { name: "4k randread qd32", rw: "randread", bs: 4096, qd: 32 },
    Workload { name: "1m seqwrite qd8", rw: "write", bs: 1 << 20, qd: 8 },
];

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Measured {
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Where fio sends its I/O.
pub enum Target<'a> {
    /// A plain file on the filesystem under test, through io_uring with O_DIRECT.
    File(&'a Path),
    /// An NBD export, through fio's nbd engine (libnbd).
    Nbd(&'a str),
}

pub fn have_fio() -> bool {
    Command::new("fio").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// Runs `w` against `target` over `size` bytes for `seconds`, returning IOPS and
/// latency percentiles.
pub fn run(target: &Target<'_>, w: &Workload, size: u64, seconds: u32) -> Result<Measured> {
    let mut cmd = Command::new("fio");
    cmd.arg("--name=bench")
        .arg(format!("--rw={}", w.rw))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={seconds}"))
        .arg("--time_based=1")
        .arg("--ramp_time=1")
        .arg("--randrepeat=0")
        .arg("--norandommap=1")
        .arg("--output-format=json");
    parse(&execute(cmd, target, w.name)?, w.is_write())
}

/// Points `cmd` at `target`, runs it, and returns fio's stdout (its JSON report).
fn execute(mut cmd: Command, target: &Target<'_>, what: &str) -> Result<Vec<u8>> {
    match target {
        Target::File(p) => {
            cmd.arg("--ioengine=io_uring").arg("--direct=1").arg(format!("--filename={}", p.display()));
        }
        Target::Nbd(uri) => {
            cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        }
    }
    let out = cmd.output().with_context(|| format!("run fio {what}"))?;
    if !out.status.success() {
        bail!("fio {what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// Fills `[0, size)` of `target` once, so reads touch real data, not holes.
pub fn prefill(target: &Target<'_>, size: u64) -> Result<()> {
    let w = Workload { name: "prefill", rw: "write", bs: 1 << 20, qd: 8 };
    let mut cmd = Command::new("fio");
    cmd.arg("--name=prefill")
        .arg("--rw=write")
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--size={size}"))
        .arg("--output-format=json");
    execute(cmd, target, w.name).map(drop)
}

fn parse(json: &[u8], write: bool) -> Result<Measured> {
    // Engines may print notes before the JSON document (the nbd engine does): skip to it.
    let start = json.iter().position(|&b| b == b'{').context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_slice(&json[start..]).context("parse fio json")?;
    let job = &v["jobs"][0][if write { "write" } else { "read" }];
    let pct = |k: &str| job["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Measured {
        iops: job["iops"].as_f64().context("fio json: no iops")?,
        mib_s: job["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}
