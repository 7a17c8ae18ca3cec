//! A cluster of real processes: three `ballast meta` members (a Raft group) and
//! `ballast node` storage nodes on loopback, driven through `ballastctl`. Every
//! process is killed when the cluster drops, also when a test panics.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

pub fn ctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ballastctl"))
}

/// `ballastctl --meta M --output json ARGS`, parsed; panics on failure.
pub fn ctl(meta: &str, args: &[&str]) -> Value {
    let mut all = vec!["--meta", meta, "--output", "json", "--timeout", "30s"];
    all.extend_from_slice(args);
    let out = run(ctl_bin().to_str().expect("utf8"), &all);
    assert!(out.status.success(), "ballastctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("ballastctl {args:?}: bad JSON ({e})"))
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A free loopback port (bound and released; the member binds it right after).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<(u64, String, Option<Proc>)>,
    pub nodes: Vec<(u64, String, Option<Proc>)>,
    /// Extra `ballast node` arguments per node id (e.g. a CSI endpoint).
    pub node_args: std::collections::HashMap<u64, Vec<String>>,
}

impl Cluster {
    /// Three meta members and storage nodes `(id, zone)`.
    pub fn start(tag: &str, nodes: &[(u64, &str)]) -> Cluster {
        Cluster::start_with(tag, nodes, |_, _| Vec::new())
    }

    /// Like [`Cluster::start`], with extra arguments for each node from `extra(id, dir)`.
    pub fn start_with(tag: &str, nodes: &[(u64, &str)], extra: impl Fn(u64, &Path) -> Vec<String>) -> Cluster {
        let dir = data_dir(tag);
        let members: Vec<(u64, String)> = (1..=3).map(|id| (id, free_addr())).collect();
        let mut c = Cluster { dir, members: Vec::new(), nodes: Vec::new(), node_args: Default::default() };
        for (id, addr) in &members {
            c.members.push((*id, addr.clone(), None));
        }
        for i in 0..3 {
            c.start_member(i);
        }
        for (id, zone) in nodes {
            c.node_args.insert(*id, extra(*id, c.dir.path()));
            c.nodes.push((*id, zone.to_string(), None));
            c.start_node(*id);
        }
        let meta = c.meta();
        wait_until("all nodes up", Duration::from_secs(60), || {
            let s = ctl(&meta, &["status"]);
            s["nodes_up"].as_u64() == Some(nodes.len() as u64)
        });
        c
    }

    pub fn meta(&self) -> String {
        self.members.iter().map(|(_, a, _)| a.as_str()).collect::<Vec<_>>().join(",")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self.members.iter().map(|(id, a, _)| format!("{id}={a}")).collect();
        let (id, addr) = (self.members[i].0, self.members[i].1.clone());
        let data = self.path(&format!("meta{id}"));
        let args = [
            "meta",
            "--id",
            &id.to_string(),
            "--data",
            data.to_str().expect("utf8"),
            "--listen",
            &addr,
            "--initial-members",
            &initial.join(","),
            "--down-after",
            "8s",
        ]
        .map(String::from);
        let mut args = args.to_vec();
        args.extend(FAST_META.map(String::from));
        let mut p = Proc::spawn(&format!("meta{id}"), &args.iter().map(String::as_str).collect::<Vec<_>>());
        p.wait_for("ready meta", Duration::from_secs(30));
        self.members[i].2 = Some(p);
    }

    pub fn start_node(&mut self, id: u64) {
        let meta = self.meta();
        let i = self.nodes.iter().position(|n| n.0 == id).expect("known node");
        let zone = self.nodes[i].1.clone();
        let data = self.path(&format!("node{id}"));
        let args = [
            "node",
            "--id",
            &id.to_string(),
            "--zone",
            &zone,
            "--data",
            data.to_str().expect("utf8"),
            "--meta",
            &meta,
            "--capacity",
            "20G",
            "--heartbeat",
            "300ms",
            "--gc-every",
            "1s",
            // The nodes share the machine's disk and offer more than it has
            // (--capacity): keep the full-disk line low, so a busy CI disk
            // does not turn them all "full".
            "--disk-reserve",
            "16M",
        ]
        .map(String::from);
        let mut args = args.to_vec();
        args.extend(self.node_args.get(&id).cloned().unwrap_or_default());
        let mut p = Proc::spawn(&format!("node{id}"), &args.iter().map(String::as_str).collect::<Vec<_>>());
        p.wait_for("ready node", Duration::from_secs(30));
        self.nodes[i].2 = Some(p);
    }

    pub fn kill_node(&mut self, id: u64) {
        let n = self.nodes.iter_mut().find(|n| n.0 == id).expect("known node");
        if let Some(mut p) = n.2.take() {
            p.kill();
        }
    }

    /// Starts `ballast export` of `volume` as node `node`; returns it and its NBD URI.
    pub fn export(&self, volume: &str, node: u64) -> (Proc, String) {
        let meta = self.meta();
        let args = [
            "export",
            "--meta",
            &meta,
            "--volume",
            volume,
            "--local-node",
            &node.to_string(),
            "--nbd",
            "127.0.0.1:0",
            "--io-timeout",
            "2s",
        ]
        .map(String::from);
        let mut p = Proc::spawn(&format!("export-{volume}"), &args.iter().map(String::as_str).collect::<Vec<_>>());
        let uri = p.wait_value("ready nbd", "uri");
        (p, uri)
    }

    pub fn create_volume(&self, name: &str, size: &str, chunk: &str, min: &str) {
        ctl(
            &self.meta(),
            &["volume", "create", name, "--size", size, "--chunk-size", chunk, "--replicas", "3", "--min-in-sync", min],
        );
    }

    pub fn inspect(&self, name: &str) -> Value {
        ctl(&self.meta(), &["volume", "inspect", name])
    }
}
