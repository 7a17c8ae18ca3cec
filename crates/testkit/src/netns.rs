//! A private network for a cluster test: one network namespace per member (a
//! failure zone, an application host, the operator's shell), each with one veth
//! link to a bridge in a hub namespace. Every address lives on those private
//! links; nothing is configured in the host's own namespace, so fixed ports
//! cannot collide with anything on the machine, and several tests can run at
//! once (each has its own namespaces).
//!
//! ```text
//!   ns <p>-z1 (10.77.0.11-13) ── eth0 ═══ veth ═══ z1 ┐
//!   ns <p>-z2 (10.77.0.21-23) ── eth0 ═══ veth ═══ z2 ├─ br0   (ns <p>-hub)
//!   ns <p>-app1 (10.77.0.101) ── eth0 ═══ veth ═══ app1 ┘
//! ```
//!
//! Faults are real kernel faults: a cut link is a veth with its carrier down
//! (both ways), or blackhole routes on one side (one way: packets leave and are
//! dropped, replies never come); a slow link is a rate-limited queue (tc netem
//! delay where the kernel has sch_netem, else tbf, whose queue adds latency
//! under load; see [`Net::slow`]).
//!
//! Teardown (also when a test panics): `Drop` deletes every namespace, which
//! removes the veths and the bridge with it. Namespaces left by a test process
//! that was itself SIGKILLed are deleted by the next [`Net::new`].

use std::collections::BTreeMap;
use std::process::Command;

use crate::{is_root, needs::have, Error, Result};

/// The subnet every member's addresses are in.
pub const SUBNET: &str = "10.77.0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Nothing leaves the member (its packets to others are dropped).
    Out,
    /// Nothing reaches the member (others' packets to it are dropped).
    In,
    /// Both ways: the link's carrier is down.
    Both,
}

pub struct Net {
    prefix: String,
    /// Member name → its addresses.
    members: BTreeMap<String, Vec<String>>,
    /// Blackhole routes installed, as (namespace member, destination).
    routes: Vec<(String, String)>,
    /// How [`Net::slow`] slows a link on this kernel.
    pub slow_method: &'static str,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().map_err(Error::io("run ip"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::harness(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Why private networks cannot be built here, if they cannot (not root, no `ip`,
/// no netns, veth or bridge support). Tests print it in their SKIP line.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces)".into());
    }
    if !have("ip") || !have("tc") {
        return Some("needs ip and tc (iproute2)".into());
    }
    let probe = format!("blprobe{}", std::process::id());
    let r = ip(&["netns", "add", &probe])
        .and_then(|_| ip(&["-n", &probe, "link", "add", "br0", "type", "bridge"]))
        .and_then(|_| ip(&["-n", &probe, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb"]));
    let _ = ip(&["netns", "del", &probe]);
    r.err().map(|e| format!("no network namespaces with veth and bridge here: {e}"))
}

impl Net {
    /// Builds the hub and one namespace per member, all links up, loopback up.
    /// On an error, whatever was built is deleted again.
    pub fn new(members: &[&str]) -> Result<Net> {
        let first = members.first().ok_or_else(|| Error::harness("a network needs at least one member"))?;
        if let Some(m) = members.iter().find(|m| m.len() > 15) {
            return Err(Error::harness(format!("member name {m:?} is too long for an interface name")));
        }
        reap_stale();
        let prefix = format!("bl{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let hub = format!("{prefix}-hub");
        ip(&["netns", "add", &hub])?;
        // From here on, dropping `net` deletes the hub and every member added.
        let mut net = Net { prefix, members: BTreeMap::new(), routes: Vec::new(), slow_method: "" };
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for m in members {
            let ns = net.ns(m);
            ip(&["netns", "add", &ns])?;
            net.members.insert(m.to_string(), Vec::new());
            ip(&["link", "add", "name", m, "netns", &hub, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &hub, "link", "set", m, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", m, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        net.slow_method =
            if tc(&net.ns(first), &["qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"]).is_ok() {
                let _ = tc(&net.ns(first), &["qdisc", "del", "dev", "eth0", "root"]);
                "netem delay"
            } else {
                "tbf rate limit (no sch_netem in this kernel)"
            };
        Ok(net)
    }

    /// The full namespace name of a member.
    pub fn ns(&self, member: &str) -> String {
        format!("{}-{member}", self.prefix)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    fn addrs_of(&self, member: &str) -> Result<&Vec<String>> {
        self.members.get(member).ok_or_else(|| Error::harness(format!("no network member {member:?}")))
    }

    /// Adds `addr` (in [`SUBNET`]) to the member's link.
    pub fn add_addr(&mut self, member: &str, addr: &str) -> Result<()> {
        self.addrs_of(member)?;
        ip(&["-n", &self.ns(member), "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        if let Some(a) = self.members.get_mut(member) {
            a.push(addr.to_string());
        }
        Ok(())
    }

    /// `ip netns exec NS`: the wrapper that runs a program inside the member's
    /// namespace (it execs the program itself, so the child's pid is the
    /// program's: signals reach it).
    pub fn exec_prefix(&self, member: &str) -> [String; 4] {
        ["ip".into(), "netns".into(), "exec".into(), self.ns(member)]
    }

    /// A command run inside the member's namespace (see [`Net::exec_prefix`]).
    pub fn command(&self, member: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let [ip, netns, exec, ns] = self.exec_prefix(member);
        let mut c = Command::new(ip);
        c.args([netns, exec, ns]).arg(program);
        c
    }

    /// Cuts the member's link in direction `dir` (see [`Dir`]).
    pub fn cut(&mut self, member: &str, dir: Dir) -> Result<()> {
        let mine = self.addrs_of(member)?.clone();
        match dir {
            Dir::Both => ip(&["-n", &self.hub(), "link", "set", member, "down"])?,
            Dir::Out => {
                let others: Vec<String> =
                    self.members.iter().filter(|(m, _)| *m != member).flat_map(|(_, a)| a.clone()).collect();
                for a in others {
                    self.blackhole(member, &a)?;
                }
            }
            Dir::In => {
                let others: Vec<String> = self.members.keys().filter(|m| *m != member).cloned().collect();
                for o in others {
                    for a in &mine {
                        self.blackhole(&o, a)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn blackhole(&mut self, member: &str, dest: &str) -> Result<()> {
        ip(&["-n", &self.ns(member), "route", "add", "blackhole", &format!("{dest}/32")])?;
        self.routes.push((member.to_string(), dest.to_string()));
        Ok(())
    }

    /// Undoes every cut and slowdown involving `member` (best effort: what is
    /// not there to undo is skipped).
    pub fn heal(&mut self, member: &str) -> Result<()> {
        let mine = self.addrs_of(member)?.clone();
        let _ = ip(&["-n", &self.hub(), "link", "set", member, "up"]);
        let (undo, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.routes).into_iter().partition(|(m, d)| m == member || mine.contains(d));
        self.routes = keep;
        for (m, d) in undo {
            let _ = ip(&["-n", &self.ns(&m), "route", "del", "blackhole", &format!("{d}/32")]);
        }
        let _ = tc(&self.ns(member), &["qdisc", "del", "dev", "eth0", "root"]);
        let _ = tc(&self.hub(), &["qdisc", "del", "dev", member, "root"]);
        Ok(())
    }

    /// Slows the member's link both ways: `delay` with netem where the kernel
    /// has it; otherwise a tbf queue at `rate` whose backlog (up to 500 ms)
    /// delays every packet once the link is busy, then drops — a congested link.
    pub fn slow(&mut self, member: &str, delay_ms: u32, rate: &str) -> Result<()> {
        self.addrs_of(member)?;
        for (ns, dev) in [(self.ns(member), "eth0".to_string()), (self.hub(), member.to_string())] {
            let r = if self.slow_method.starts_with("netem") {
                tc(&ns, &["qdisc", "add", "dev", &dev, "root", "netem", "delay", &format!("{delay_ms}ms")])
            } else {
                tc(
                    &ns,
                    &["qdisc", "add", "dev", &dev, "root", "tbf", "rate", rate, "burst", "16kb", "latency", "500ms"],
                )
            };
            r.map_err(|e| Error::harness(format!("slowing {member}: {e}")))?;
        }
        Ok(())
    }
}

fn tc(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(["netns", "exec", ns, "tc"]).args(args).output().map_err(Error::io("run tc"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::harness(format!("tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Deletes namespaces named `bl<pid>-...` whose test process is gone.
fn reap_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix("bl").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks that the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            eprintln!("netns: deleting {name}, left by test process {pid} which is gone");
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for m in self.members.keys().cloned().collect::<Vec<_>>() {
            let _ = ip(&["netns", "del", &self.ns(&m)]);
        }
        let _ = ip(&["netns", "del", &self.hub()]);
    }
}
