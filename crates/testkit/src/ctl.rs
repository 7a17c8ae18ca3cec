//! `ballastctl` as the operator runs it, and its JSON read back: [`Ctl`] runs
//! it (on loopback, or inside a network namespace through a wrapper such as
//! `ip netns exec NS`); the free functions read `volume inspect` layouts.

use std::ffi::OsString;
use std::process::{Command, ExitStatus, Stdio};

use serde_json::Value;

use crate::{bin, describe, Error, Result};

/// How long ballastctl keeps retrying an unanswering cluster, unless told otherwise.
pub const DEFAULT_TIMEOUT: &str = "30s";

/// `ballastctl [--meta M] [--timeout T] ARGS`, with `BALLAST_META` and
/// `RUST_LOG` removed from its environment (the flags say everything).
#[derive(Clone, Debug)]
pub struct Ctl {
    /// The program and any wrapper before it (`ip netns exec NS ballastctl`).
    argv: Vec<OsString>,
    meta: Option<String>,
    timeout: Option<String>,
    /// `--tls-dir`: the admin (or reader) certificate it runs with.
    tls_dir: Option<std::path::PathBuf>,
}

/// What one ballastctl run printed.
#[derive(Clone, Debug)]
pub struct CtlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// The exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl Ctl {
    /// Against the members `meta` (comma-separated), retrying for [`DEFAULT_TIMEOUT`].
    pub fn new(meta: &str) -> Result<Ctl> {
        Ok(Ctl { meta: Some(meta.into()), ..Ctl::bare()? })
    }

    /// No `--meta`, no `--timeout`: exactly the arguments given.
    pub fn bare() -> Result<Ctl> {
        Ok(Ctl { argv: vec![bin::ballastctl()?.into()], meta: None, timeout: None, tls_dir: None })
    }

    /// `--tls-dir DIR`: run as the identity of the certificate in DIR.
    pub fn tls(mut self, dir: &std::path::Path) -> Ctl {
        self.tls_dir = Some(dir.to_path_buf());
        self
    }

    /// `--timeout T` (`None`: ballastctl's own default).
    pub fn timeout(mut self, t: Option<&str>) -> Ctl {
        self.timeout = t.map(String::from);
        self
    }

    /// Runs ballastctl through `wrapper` (e.g. `["ip", "netns", "exec", NS]`).
    pub fn via<I, S>(mut self, wrapper: I) -> Ctl
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut argv: Vec<OsString> = wrapper.into_iter().map(Into::into).collect();
        argv.append(&mut self.argv);
        self.argv = argv;
        self
    }

    /// The command, ready to run (stdin closed).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]);
        if let Some(m) = &self.meta {
            cmd.args(["--meta", m]);
        }
        if let Some(t) = &self.timeout {
            cmd.args(["--timeout", t]);
        }
        if let Some(d) = &self.tls_dir {
            cmd.arg("--tls-dir").arg(d);
        }
        cmd.args(args)
            .env_remove("BALLAST_META")
            .env_remove("BALLAST_TLS_DIR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs it to completion, whatever its exit code.
    pub fn run(&self, args: &[&str]) -> Result<CtlOutput> {
        let mut cmd = self.command(args);
        let out = cmd.output().map_err(Error::io(format!("run {}", describe(&cmd))))?;
        Ok(CtlOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `--output json ARGS`, parsed; [`Error::Failed`] unless it exits 0.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let all = [&["--output", "json"][..], args].concat();
        let out = self.run(&all)?;
        if !out.status.success() {
            return Err(Error::Failed {
                command: format!("ballastctl {}", args.join(" ")),
                status: out.status,
                stderr: out.stderr.trim().to_string(),
            });
        }
        serde_json::from_str(&out.stdout)
            .map_err(|source| Error::Json { what: format!("ballastctl {}: {:?}", args.join(" "), out.stdout), source })
    }
}

/// `ballastctl --meta M --tls-dir TLS --output json --timeout 30s ARGS`, parsed.
pub fn ctl(meta: &str, tls: &std::path::Path, args: &[&str]) -> Result<Value> {
    Ctl::new(meta)?.tls(tls).json(args)
}

// ---- reading `volume inspect` ----------------------------------------------------

/// The chunks of a layout (empty if it has none).
pub fn chunks(layout: &Value) -> &[Value] {
    layout["chunks"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The node ids of a chunk's replicas, any role.
pub fn replica_nodes(chunk: &Value) -> Vec<u64> {
    chunk["replicas"].as_array().map(|r| r.iter().filter_map(|r| r["node"].as_u64()).collect()).unwrap_or_default()
}

/// How many chunks have a replica (any role) on `node`.
pub fn replicas_on(layout: &Value, node: u64) -> usize {
    chunks(layout).iter().filter(|c| replica_nodes(c).contains(&node)).count()
}

/// No chunk degraded, no replica rebuilding or ejected.
pub fn healthy(layout: &Value) -> bool {
    let h = &layout["health"];
    h["chunks_degraded"].as_u64() == Some(0)
        && h["replicas_rebuilding"].as_u64() == Some(0)
        && h["replicas_ejected"].as_u64() == Some(0)
}

/// Every chunk has all its replicas in sync.
pub fn fully_redundant(layout: &Value) -> bool {
    let h = &layout["health"];
    h["chunks"].as_u64().is_some() && h["chunks_full"] == h["chunks"]
}

/// Per chunk: its index and the nodes of its in-sync replicas.
pub type InSync = Vec<(u64, Vec<u64>)>;

/// The volume's id and its chunks' in-sync replicas.
pub fn in_sync(layout: &Value) -> Result<(u64, InSync)> {
    let bad = |what: &str| Error::harness(format!("volume inspect: no {what} in {layout}"));
    let id = layout["volume"]["id"].as_u64().ok_or_else(|| bad("volume id"))?;
    let chunks = layout["chunks"].as_array().ok_or_else(|| bad("chunks"))?;
    let mut out = Vec::with_capacity(chunks.len());
    for c in chunks {
        let replicas = c["replicas"].as_array().ok_or_else(|| bad("replicas"))?;
        let nodes = replicas.iter().filter(|r| r["role"] == "in-sync").filter_map(|r| r["node"].as_u64()).collect();
        out.push((c["index"].as_u64().ok_or_else(|| bad("chunk index"))?, nodes));
    }
    Ok((id, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn layouts_read_back() {
        let l = json!({
            "volume": {"id": 7},
            "health": {"chunks": 2, "chunks_full": 1, "chunks_degraded": 1, "replicas_rebuilding": 0, "replicas_ejected": 1},
            "chunks": [
                {"index": 0, "replicas": [{"node": 1, "role": "in-sync"}, {"node": 2, "role": "in-sync"}]},
                {"index": 1, "replicas": [{"node": 1, "role": "in-sync"}, {"node": 3, "role": "ejected"}]},
            ],
        });
        assert_eq!(replicas_on(&l, 1), 2);
        assert_eq!(replicas_on(&l, 3), 1);
        assert!(!healthy(&l));
        assert!(!fully_redundant(&l));
        assert_eq!(in_sync(&l).unwrap(), (7, vec![(0, vec![1, 2]), (1, vec![1])]));
        assert!(in_sync(&json!({})).is_err());
    }

    #[test]
    fn the_command_line_is_wrapper_program_flags_args() {
        let c = Ctl {
            argv: vec!["ballastctl".into()],
            meta: Some("a:1,b:2".into()),
            timeout: Some("10s".into()),
            tls_dir: None,
        }
        .via(["ip", "netns", "exec", "ns1"]);
        assert_eq!(
            describe(&c.command(&["status"])),
            "ip netns exec ns1 ballastctl --meta a:1,b:2 --timeout 10s status"
        );
    }
}
