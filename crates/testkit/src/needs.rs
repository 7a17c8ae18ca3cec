//! What a test needs from the machine, checked up front. A test whose needs are
//! not met prints one `SKIP <test>: <why>` line and returns; CI installs every
//! tool and runs as root, so a SKIP there is a CI setup bug, visible in the log.
//!
//! ```no_run
//! # fn t() -> ballast_testkit::Result<()> {
//! use ballast_testkit::needs;
//! if !needs("ext4_survives_a_restart").root("loop devices, mount").tools(&["nbdfuse", "mkfs.ext4"]).met() {
//!     return Ok(());
//! }
//! # Ok(()) }
//! ```

use std::path::Path;
use std::process::Command;

/// True when `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Starts the checks for `test` (the name its SKIP line shows).
pub fn needs(test: &str) -> Needs {
    Needs { test: test.into(), missing: None }
}

/// Returns false (after printing a SKIP line naming the test and the tools)
/// when any tool is missing. Short for `needs(test).tools(tools).met()`.
pub fn require(test: &str, tools: &[&str]) -> bool {
    needs(test).tools(tools).met()
}

/// Checks in order; the first one that fails is the reason in the SKIP line
/// (later ones are not run: a netns probe without root would only fail again).
#[derive(Debug)]
#[must_use = "call .met() to print the SKIP line and learn whether to run"]
pub struct Needs {
    test: String,
    missing: Option<String>,
}

impl Needs {
    fn check(mut self, f: impl FnOnce() -> Option<String>) -> Self {
        if self.missing.is_none() {
            self.missing = f();
        }
        self
    }

    /// Root, for `why` ("loop devices, mount").
    pub fn root(self, why: &str) -> Self {
        self.check(|| (!is_root()).then(|| format!("needs root ({why})")))
    }

    /// Every tool on PATH.
    pub fn tools(self, tools: &[&str]) -> Self {
        self.check(|| {
            let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
            (!missing.is_empty()).then(|| format!("missing tools {missing:?} (CI installs them in .ci/run)"))
        })
    }

    /// Every path exists (device nodes: /dev/fuse, /dev/loop-control).
    pub fn paths(self, paths: &[&str]) -> Self {
        self.check(|| {
            let missing: Vec<&str> = paths.iter().copied().filter(|p| !Path::new(p).exists()).collect();
            (!missing.is_empty()).then(|| format!("needs {}", missing.join(" and ")))
        })
    }

    /// Private networks can be built here ([`crate::netns::unavailable`]).
    pub fn netns(self) -> Self {
        self.check(crate::netns::unavailable)
    }

    /// Loop-device disks can be built ([`crate::disks::unavailable`]); `faulty`:
    /// also the EIO-injecting kind.
    pub fn disks(self, faulty: bool) -> Self {
        self.check(|| crate::disks::unavailable(faulty))
    }

    /// Any other check: `Some(why)` when it is not met.
    pub fn also(self, f: impl FnOnce() -> Option<String>) -> Self {
        self.check(f)
    }

    /// Why the test cannot run here, if it cannot.
    pub fn missing(&self) -> Option<&str> {
        self.missing.as_deref()
    }

    /// True when every need is met; otherwise prints `SKIP <test>: <why>` to
    /// stderr and returns false.
    pub fn met(self) -> bool {
        match &self.missing {
            None => true,
            Some(why) => {
                eprintln!("SKIP {}: {why}", self.test);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_unmet_need_is_the_reason() {
        let n = needs("t").tools(&["sh"]).paths(&["/"]);
        assert_eq!(n.missing(), None);
        let n = needs("t").tools(&["sh", "no-such-tool-here"]).paths(&["/no/such/device"]);
        assert_eq!(n.missing(), Some(r#"missing tools ["no-such-tool-here"] (CI installs them in .ci/run)"#));
        assert!(!n.met());
        let n = needs("t").paths(&["/no/a", "/", "/no/b"]).also(|| Some("never asked".into()));
        assert_eq!(n.missing(), Some("needs /no/a and /no/b"));
    }
}
