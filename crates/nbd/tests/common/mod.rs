//! Shared test harness: an NBD server over MemDev exports on 127.0.0.1:0 and on
//! a unix socket in a temporary directory, and helpers to run external clients.
#![allow(dead_code)] // each test binary uses a different part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_blockdev::{BlockDev, MemDev};
use ballast_nbd::{Export, NbdError, NbdOptions, NbdServer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const MIB: u64 = 1 << 20;

pub struct TestServer {
    /// The exports' devices, in the order given to `start`.
    pub devs: Vec<Arc<MemDev>>,
    pub names: Vec<String>,
    pub tcp: SocketAddr,
    pub sock: PathBuf,
    dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<(), NbdError>>>,
}

/// An export spec: name, size, read-only.
pub struct Spec<'a>(pub &'a str, pub u64, pub bool);

impl TestServer {
    pub async fn start(specs: &[Spec<'_>]) -> TestServer {
        Self::start_with(specs, NbdOptions::default()).await
    }

    pub async fn start_with(specs: &[Spec<'_>], opts: NbdOptions) -> TestServer {
        let devs: Vec<Arc<MemDev>> = specs.iter().map(|s| Arc::new(MemDev::new(s.1, 4096))).collect();
        let exports = specs
            .iter()
            .zip(&devs)
            .map(|(s, d)| Export::new(s.0, d.clone()).with_description(format!("test export {}", s.0)).read_only(s.2))
            .collect();
        let server = NbdServer::new(exports, opts).expect("valid exports");
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let tcp_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let tcp = tcp_listener.local_addr().expect("local addr");
        let unix_listener = UnixListener::bind(&sock).expect("bind unix");
        let (stop, stop_rx) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let s1 = server.clone();
        let r1 = stop_rx.clone();
        let t1 = tokio::spawn(async move { s1.serve_tcp(tcp_listener, until(r1)).await });
        let t2 = tokio::spawn(async move { server.serve_unix(unix_listener, until(stop_rx)).await });
        TestServer {
            devs,
            names: specs.iter().map(|s| s.0.to_string()).collect(),
            tcp,
            sock,
            dir,
            stop,
            tasks: vec![t1, t2],
        }
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.tcp, export)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.sock.display())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops both listeners and waits for every connection to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.expect("serve task").expect("serve result");
        }
    }
}

/// The whole content of a MemDev, read through its own BlockDev interface.
pub async fn contents(dev: &MemDev) -> Vec<u8> {
    let mut out = Vec::with_capacity(dev.size() as usize);
    let step = u64::from(dev.max_request());
    let mut at = 0;
    while at < dev.size() {
        let n = step.min(dev.size() - at);
        out.extend_from_slice(&dev.read(at, n as u32).await.expect("memdev read"));
        at += n;
    }
    out
}

/// Is `tool` on PATH? Prints the SKIP line for `test` when not.
pub fn have(tool: &str, test: &str) -> bool {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    if !found {
        println!("SKIP: {test}: `{tool}` is not installed (CI installs it via .ci/run)");
    }
    found
}

/// Runs a command off the async runtime with a time limit (killed when over).
pub async fn run(program: &str, args: &[String], limit: Duration) -> Output {
    let program = program.to_string();
    let args = args.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() > limit => {
                    let _ = child.kill();
                    let out = child.wait_with_output().expect("wait");
                    panic!(
                        "{program} {args:?} timed out after {limit:?}\nstdout:\n{}\nstderr:\n{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("wait {program}: {e}"),
            }
        }
        child.wait_with_output().expect("collect output")
    })
    .await
    .expect("command thread")
}

/// Runs a command and panics with its output unless it succeeded; returns stdout.
pub async fn run_ok(program: &str, args: &[String], limit: Duration) -> String {
    let out = run(program, args, limit).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}
