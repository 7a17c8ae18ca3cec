//! A child process under test: its stdout lines arrive on a channel (so a test
//! waits for a `ready ...` line with a deadline), it is signalled by pid, and it
//! is SIGKILLed and reaped when its handle drops, also when a test panics.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{bin, Error, Result};

/// `RUST_LOG` for a child when neither its command nor the test's environment sets one.
pub const DEFAULT_RUST_LOG: &str = "info,openraft=warn";

/// Where a child's stderr (its tracing logs) goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Stderr {
    /// The test's own stderr (shown when a test fails or runs with --nocapture).
    #[default]
    Inherit,
    /// Discarded.
    Null,
    /// `DIR/<name>.log`, one file per process (created or truncated), with
    /// `NO_COLOR=1` so the logs can be parsed.
    LogDir(PathBuf),
}

/// How a [`Proc`] is started.
#[derive(Clone, Debug)]
pub struct ProcOptions {
    /// `RUST_LOG` for the child, unless its command sets one. `None`: the
    /// test's `RUST_LOG`, else [`DEFAULT_RUST_LOG`].
    pub rust_log: Option<String>,
    pub stderr: Stderr,
    /// Echo every stdout line to the test's stderr as `[name] line`.
    pub echo: bool,
}

impl Default for ProcOptions {
    fn default() -> Self {
        ProcOptions { rust_log: None, stderr: Stderr::Inherit, echo: true }
    }
}

impl ProcOptions {
    /// Nothing from the child reaches the test's output: `RUST_LOG=warn`,
    /// stderr discarded, stdout not echoed (still read, for ready lines).
    pub fn quiet() -> Self {
        ProcOptions { rust_log: Some("warn".into()), stderr: Stderr::Null, echo: false }
    }

    /// Each process logs to `dir/<name>.log`; stdout is not echoed.
    pub fn log_files(dir: &Path) -> Self {
        ProcOptions { rust_log: None, stderr: Stderr::LogDir(dir.to_path_buf()), echo: false }
    }

    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = Some(filter.into());
        self
    }

    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    pub fn stderr(mut self, stderr: Stderr) -> Self {
        self.stderr = stderr;
        self
    }
}

/// A running child process; SIGKILLed and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Every stdout line read so far by [`Proc::wait_for`].
    pub seen: Vec<String>,
}

impl Proc {
    /// `ballast ARGS` (the binary from [`bin::ballast`]) with default options.
    pub fn spawn<I, S>(name: &str, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::spawn_with(name, args, &ProcOptions::default())
    }

    /// `ballast ARGS` with the given options.
    pub fn spawn_with<I, S>(name: &str, args: I, opts: &ProcOptions) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(bin::ballast()?);
        cmd.args(args);
        Proc::spawn_cmd_with(name, cmd, opts)
    }

    /// A prepared command (e.g. `ip netns exec NS ballast ...`, which execs the
    /// program, so the pid is still the program's) with default options.
    pub fn spawn_cmd(name: &str, cmd: Command) -> Result<Proc> {
        Proc::spawn_cmd_with(name, cmd, &ProcOptions::default())
    }

    /// A prepared command with the given options (stdin, stdout and stderr are set here).
    pub fn spawn_cmd_with(name: &str, mut cmd: Command, opts: &ProcOptions) -> Result<Proc> {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            let filter = match &opts.rust_log {
                Some(f) => f.clone(),
                None => std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_RUST_LOG.into()),
            };
            cmd.env("RUST_LOG", filter);
        }
        // `ballast dev` records its cluster for ballastctl in the user's config
        // directory: a test's dev clusters record theirs under target/ instead.
        if !cmd.get_envs().any(|(k, _)| k == "XDG_CONFIG_HOME") {
            cmd.env("XDG_CONFIG_HOME", crate::target_dir().join("test-data").join("xdg-config"));
        }
        let stderr = match &opts.stderr {
            Stderr::Inherit => Stdio::inherit(),
            Stderr::Null => Stdio::null(),
            Stderr::LogDir(dir) => {
                let path = dir.join(format!("{name}.log"));
                cmd.env("NO_COLOR", "1");
                Stdio::from(std::fs::File::create(&path).map_err(Error::io(format!("create {}", path.display())))?)
            }
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        let mut child = cmd.spawn().map_err(Error::io(format!("spawn {name} ({:?})", cmd.get_program())))?;
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            let (tag, echo) = (name.to_string(), opts.echo);
            // Reads to the end whether or not anyone listens, so the child never
            // blocks on a full pipe.
            std::thread::spawn(move || {
                let mut listening = true;
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[{tag}] {line}");
                    }
                    if listening && tx.send(line).is_err() {
                        listening = false;
                    }
                }
            });
        }
        Ok(Proc { name: name.to_string(), child: Some(child), lines: rx, seen: Vec::new() })
    }

    /// Waits for a stdout line containing `needle`; returns the line.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = crate::deadline(timeout);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => {
                    return Err(Error::NotReady {
                        name: self.name.clone(),
                        needle: needle.into(),
                        timeout,
                        seen: self.seen.clone(),
                        exit: self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()),
                    })
                }
            }
        }
    }

    /// The value after `key=` in the next stdout line containing `needle`
    /// (waiting up to a minute), e.g. `wait_value("ready nbd", "uri")`.
    pub fn wait_value(&mut self, needle: &str, key: &str) -> Result<String> {
        let line = self.wait_for(needle, Duration::from_secs(60))?;
        crate::field(&line, key).ok_or_else(|| Error::NoField { name: self.name.clone(), key: key.into(), line })
    }

    /// The pid, while the process has not been killed and reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (not exited, not reaped).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, SIGINT, ...).
    pub fn signal(&self, sig: i32) -> Result<()> {
        let pid = self.pid().ok_or_else(|| Error::NotRunning { name: self.name.clone() })?;
        // SAFETY: plain kill(2) on our own child's pid, which is not reaped yet
        // (we hold its Child), so it cannot name another process.
        if unsafe { libc::kill(pid as i32, sig) } != 0 {
            return Err(Error::io(format!("signal {sig} to {}", self.name))(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// SIGKILL and reap (nothing if already gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit; past `timeout` it SIGKILLs and reaps
    /// the process and returns [`Error::Timeout`].
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut c = self.child.take().ok_or_else(|| Error::NotRunning { name: self.name.clone() })?;
        // SAFETY: as in `signal`: our own unreaped child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = crate::deadline(timeout);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err(Error::Timeout { what: format!("{} to exit after SIGTERM", self.name), timeout });
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
