// Each benchmark that includes this module uses part of it.
#![allow(dead_code)]

//! fio through the NBD engine and its completion-latency logs: shared by the
//! benchmarks that drive a cluster of real processes (rebuild, clone).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// fio with the nbd engine against `uri` (`nbd://host:port`).
pub fn fio_nbd(uri: &str) -> Command {
    let mut cmd = Command::new("fio");
    cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}")).stdin(Stdio::null());
    cmd
}

/// Runs fio to completion; returns its JSON document.
pub fn fio_json(mut cmd: Command, what: &str) -> Result<Value> {
    let out = cmd.arg("--output-format=json").output().with_context(|| format!("run fio ({what})"))?;
    if !out.status.success() {
        bail!("fio ({what}) failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    // Engines may print notes before the document (the nbd engine does).
    let start = out.stdout.iter().position(|&b| b == b'{').context("fio printed no JSON")?;
    serde_json::from_slice(&out.stdout[start..]).context("parse fio JSON")
}

/// One completed I/O from fio's clat log.
#[derive(Clone, Copy)]
pub struct Io {
    pub at_ms: u64,
    pub clat_ns: u64,
    pub write: bool,
}

/// Reads `PREFIX_clat.1.log` ("unix ms, clat ns, ddir, bs, offset[, prio]").
pub fn read_clat_log(prefix: &Path) -> Result<Vec<Io>> {
    let path = PathBuf::from(format!("{}_clat.1.log", prefix.display()));
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 3 {
            continue;
        }
        let (Ok(at_ms), Ok(clat_ns), Ok(ddir)) = (f[0].parse(), f[1].parse(), f[2].parse::<u8>()) else {
            bail!("{}: bad line {line:?}", path.display());
        };
        out.push(Io { at_ms, clat_ns, write: ddir == 1 });
    }
    Ok(out)
}

/// The `p` quantile (0..=1) of sorted latencies in ns, in microseconds.
pub fn quantile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1] as f64 / 1000.0
}
