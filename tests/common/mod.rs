//! Shared harness for the cluster scenarios: real `ballast` processes on loopback,
//! killed with real signals, driven by real NBD clients (qemu-io, qemu-img, nbdinfo,
//! fio). Every process is killed when its handle drops, also when a test panics.
#![allow(dead_code)]

pub mod cluster;
pub mod disks;
pub mod faultcluster;
pub mod netns;
pub mod workload;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `ballast meta` timings for tests: fast heartbeats and elections, a node
/// silent for a second is suspect (each harness picks its own --down-after).
pub const FAST_META: [&str; 6] = ["--raft-heartbeat-ms", "100", "--election-ms", "500", "--suspect-after", "1s"];

/// The `ballast` binary built for this test run.
pub fn ballast_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ballast"))
}

/// True when `tool` is on PATH. Tests that need it print a SKIP line otherwise
/// (CI installs every tool, so a skip there is a CI setup bug, visible in the log).
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Returns false (after printing a SKIP line naming the test and the tools) when any
/// tool is missing.
pub fn require(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        true
    } else {
        eprintln!("SKIP {test}: missing tools {missing:?} (CI installs them in .ci/run)");
        false
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A child process that is SIGKILLed when dropped. Its stdout lines arrive on a
/// channel, so a test can wait for a readiness line with a deadline; stderr is
/// passed through to the test's output (tracing logs).
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(ballast_bin());
        cmd.args(args);
        Proc::spawn_cmd(name, cmd)
    }

    /// Like [`Proc::spawn`], for a prepared command (e.g. `ip netns exec NS ballast ...`,
    /// which execs the program, so the pid is still the program's).
    pub fn spawn_cmd(name: &str, mut cmd: Command) -> Proc {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { name: name.to_string(), child: Some(child), lines: rx, seen: Vec::new() }
    }

    /// Waits for a stdout line containing `needle`; returns the line.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{}: no line containing {needle:?} within {timeout:?}; saw {:?}; exit: {:?}",
                    self.name,
                    self.seen,
                    self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
                ),
            }
        }
    }

    /// The value after `key=` in a stdout line containing `needle`.
    pub fn wait_value(&mut self, needle: &str, key: &str) -> String {
        let line = self.wait_for(needle, Duration::from_secs(60));
        field(&line, key).unwrap_or_else(|| panic!("{}: no {key}= in {line:?}", self.name))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit (SIGKILL after the deadline).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: as above.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `key=value` out of a whitespace-separated line.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('='))).map(str::to_string)
}

/// Runs a command to completion, capturing output.
pub fn run(prog: &str, args: &[&str]) -> Output {
    let out = Command::new(prog).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("run {prog}: {e}"));
    if !out.status.success() {
        eprintln!(
            "{prog} {args:?} -> {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command and panics unless it succeeds; returns stdout.
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(out.status.success(), "{prog} {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temp dir on a real filesystem (O_DIRECT works there; /tmp may be tmpfs).
pub fn data_dir(tag: &str) -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("test-data");
    std::fs::create_dir_all(&base).expect("create test-data dir");
    tempfile::Builder::new().prefix(&format!("{tag}-")).tempdir_in(base).expect("tempdir")
}

/// A file of `len` pseudo-random bytes from `seed` (deterministic).
pub fn random_file(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, random_bytes(len, seed)).expect("write random file");
}

/// `len` pseudo-random bytes from `seed` (deterministic: a test can check them later).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    buf
}
