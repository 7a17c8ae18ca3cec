//! The harness for Ballast's cluster tests and benchmarks: real `ballast`
//! processes on loopback or in private network namespaces, killed with real
//! signals, on real (and really failing) disks, driven by `ballastctl` and real
//! NBD clients. Everything a handle owns is torn down when it drops, also when
//! a test panics.
//!
//! - [`Proc`]: a child process; waits for its `ready ...` stdout lines,
//!   signals it, SIGKILLs it on drop. [`ProcOptions`] say where its output goes.
//! - [`bin`]: where the binaries are (next to the running test executable).
//! - [`Cluster`]: three `ballast meta` members and `ballast node`s on loopback,
//!   started as the README starts them; [`StaticVolume`]: `ballast replica`s
//!   and a static volume file, no metadata service.
//! - [`faultcluster::FaultCluster`]: the fault-injection cluster, each zone in
//!   its own network namespace ([`netns::Net`]), nodes on [`disks::Disk`]s that
//!   fill up or fail with EIO; [`workload::Workload`]: the verifiable NBD
//!   workload checked against a per-block ledger.
//! - [`prometheus::Prometheus`]: a real Prometheus scraping the test's
//!   processes and evaluating rule files, asked through its HTTP API.
//! - [`Ctl`]: `ballastctl`, its JSON parsed; [`mod@ctl`] reads volume layouts.
//! - [`mod@needs`]: root, tool and kernel-feature checks that print a SKIP line.
//! - [`wait_until`], [`free_addr`], [`run`], [`data_dir`], [`random_bytes`], ...
//!
//! Every fallible call returns [`Result`] with the kit's [`Error`]; the kit
//! itself never panics on a failure (tests `?` or `.unwrap()` the results).

mod error;

pub mod bin;
pub mod cluster;
pub mod ctl;
pub mod disks;
pub mod faultcluster;
pub mod needs;
pub mod netns;
pub mod process;
pub mod prometheus;
pub mod replicas;
pub mod tls;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use cluster::Cluster;
pub use ctl::{ctl, Ctl, CtlOutput};
pub use error::{Error, Result};
pub use needs::{have, is_root, needs, require, Needs};
pub use process::{Proc, ProcOptions, Stderr};
pub use replicas::StaticVolume;

/// `ballast meta` timings for tests: fast heartbeats and elections, a node
/// silent for a second is suspect (each harness picks its own --down-after).
pub const FAST_META: [&str; 6] = ["--raft-heartbeat-ms", "100", "--election-ms", "500", "--suspect-after", "1s"];

/// How often [`wait_until`] and [`try_wait_until`] check.
pub const POLL: Duration = Duration::from_millis(250);

/// Waits until `f` is true, checking every [`POLL`].
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    try_wait_until(what, timeout, || Ok(f()))
}

/// Waits until `f` is `Ok(true)`; an `Err` from `f` ends the wait with that error.
pub fn try_wait_until(what: &str, timeout: Duration, f: impl FnMut() -> Result<bool>) -> Result<()> {
    wait_every(what, timeout, POLL, f)
}

/// [`try_wait_until`], checking every `every`.
pub fn wait_every(what: &str, timeout: Duration, every: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = deadline(timeout);
    while !f()? {
        if Instant::now() >= deadline {
            return Err(Error::Timeout { what: what.into(), timeout });
        }
        std::thread::sleep(every);
    }
    Ok(())
}

/// `timeout` from now, saturating (a timeout of `Duration::MAX` never ends).
pub(crate) fn deadline(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// A free loopback address, `127.0.0.1:PORT` (bound to port 0 and released;
/// the process under test binds it right after).
pub fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("bind a loopback port"))?;
    Ok(l.local_addr().map_err(Error::io("loopback port"))?.to_string())
}

/// A free loopback port (see [`free_addr`]).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("bind a loopback port"))?;
    Ok(l.local_addr().map_err(Error::io("loopback port"))?.port())
}

/// `key=value` out of a whitespace-separated line (a `ready ...` line).
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('='))).map(str::to_string)
}

/// Runs a command to completion, capturing its output; a failed exit is not an
/// error here (its stdout and stderr are printed to the test's stderr).
pub fn run(prog: &str, args: &[&str]) -> Result<Output> {
    run_cmd(Command::new(prog).args(args))
}

/// [`run`] for a prepared command.
pub fn run_cmd(cmd: &mut Command) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().map_err(Error::io(format!("run {}", describe(cmd))))?;
    if !out.status.success() {
        eprintln!(
            "{} -> {}\nstdout: {}\nstderr: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs a command; its stdout if it succeeds, else [`Error::Failed`].
pub fn run_ok(prog: &str, args: &[&str]) -> Result<String> {
    run_cmd_ok(Command::new(prog).args(args))
}

/// [`run_ok`] for a prepared command.
pub fn run_cmd_ok(cmd: &mut Command) -> Result<String> {
    let out = run_cmd(cmd)?;
    if !out.status.success() {
        return Err(Error::Failed {
            command: describe(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `prog arg arg ...` for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The workspace's `target/` directory (found from where this crate's source
/// is), canonical: tests compare paths under it with the kernel's mount table.
pub fn target_dir() -> PathBuf {
    let raw = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("..");
    std::fs::canonicalize(&raw).unwrap_or(raw).join("target")
}

/// A fresh directory `target/test-data/TAG-XXXX`, removed when dropped: on a
/// real filesystem (O_DIRECT works there; /tmp may be tmpfs).
pub fn data_dir(tag: &str) -> Result<tempfile::TempDir> {
    let base = target_dir().join("test-data");
    std::fs::create_dir_all(&base).map_err(Error::io(format!("create {}", base.display())))?;
    tempfile::Builder::new()
        .prefix(&format!("{tag}-"))
        .tempdir_in(&base)
        .map_err(Error::io(format!("a temporary directory in {}", base.display())))
}

/// `len` pseudo-random bytes from `seed` (deterministic: a test can check them later).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    buf
}

/// A file of [`random_bytes`]`(len, seed)`.
pub fn random_file(path: &Path, len: usize, seed: u64) -> Result<()> {
    std::fs::write(path, random_bytes(len, seed)).map_err(Error::io(format!("write {}", path.display())))
}

/// A path as UTF-8 (for argument lists of `&str`).
pub fn utf8(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| Error::harness(format!("path {} is not UTF-8", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_finds_whole_keys() {
        let line = "ready nbd uri=nbd://127.0.0.1:4242/vol0 addr=127.0.0.1:4242";
        assert_eq!(field(line, "uri").as_deref(), Some("nbd://127.0.0.1:4242/vol0"));
        assert_eq!(field(line, "addr").as_deref(), Some("127.0.0.1:4242"));
        assert_eq!(field(line, "ur"), None);
        assert_eq!(field(line, "nbd"), None);
    }

    #[test]
    fn waits_end_in_time_or_with_the_error() {
        let mut n = 0;
        wait_every("three tries", Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            Ok(n == 3)
        })
        .unwrap();
        assert_eq!(n, 3);
        let e = wait_until("never", Duration::from_millis(20), || false).unwrap_err();
        let _ = deadline(Duration::MAX);
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert_eq!(e.to_string(), "timed out after 20ms waiting for never");
        let e = try_wait_until("a failing check", Duration::from_secs(5), || Err(Error::harness("broken")));
        assert_eq!(e.unwrap_err().to_string(), "broken");
    }

    #[test]
    fn run_ok_reports_the_failure() {
        assert_eq!(run_ok("sh", &["-c", "echo hi"]).unwrap(), "hi\n");
        let e = run_ok("sh", &["-c", "echo oops >&2; exit 3"]).unwrap_err();
        assert!(e.to_string().starts_with("sh -c echo oops >&2; exit 3 failed (exit status: 3): oops"), "{e}");
        assert!(matches!(run("/nonexistent/prog", &[]), Err(Error::Io { .. })));
    }

    #[test]
    fn random_bytes_are_deterministic() {
        assert_eq!(random_bytes(64, 7), random_bytes(64, 7));
        assert_ne!(random_bytes(64, 7), random_bytes(64, 8));
    }
}
