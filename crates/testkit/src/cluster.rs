//! A cluster of real processes on loopback, started as the README starts one:
//! three `ballast meta` members (a Raft group with static initial membership)
//! and `ballast node` storage nodes, driven through `ballastctl`. Every process
//! is killed when the cluster drops (before its data directory is removed),
//! also when a test panics.
//!
//! ```no_run
//! # fn t() -> ballast_testkit::Result<()> {
//! use ballast_testkit::Cluster;
//! let c = Cluster::start("my-test", &[(1, "z1"), (2, "z2"), (3, "z3")])?;
//! c.create_volume("v", "64M", "16M", "2")?;
//! let (_export, uri) = c.export("v", 1)?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_tls::Identity;
use serde_json::Value;

use crate::{data_dir, free_addr, try_wait_until, utf8, Ctl, Error, Proc, ProcOptions, Result, FAST_META};

/// A `ballast meta` member.
pub struct Member {
    pub id: u64,
    pub addr: String,
    /// Where it serves `/metrics` (with [`Builder::metrics`]).
    pub metrics: Option<String>,
    /// None while it is killed.
    pub proc: Option<Proc>,
}

/// A `ballast node` storage node.
pub struct Node {
    pub id: u64,
    pub zone: String,
    /// Extra `ballast node` arguments (e.g. its CSI endpoint), kept for restarts.
    pub args: Vec<String>,
    /// Where it serves `/metrics` (with [`Builder::metrics`]).
    pub metrics: Option<String>,
    /// None while it is killed.
    pub proc: Option<Proc>,
}

/// Per-node extra arguments, from the node's id and the cluster's directory.
type NodeExtra = Box<dyn Fn(u64, &Path) -> Vec<String>>;

/// How a [`Cluster`] is started; [`Cluster::start`] and [`Cluster::start_with`]
/// use the defaults (the test timings).
pub struct Builder {
    tag: String,
    dir: Option<PathBuf>,
    nodes: Vec<(u64, String)>,
    meta_args: Vec<String>,
    node_args: Vec<String>,
    extra: NodeExtra,
    procs: ProcOptions,
    metrics: bool,
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl Builder {
    /// Storage nodes `(id, zone)`.
    pub fn nodes<Z: AsRef<str>>(mut self, nodes: &[(u64, Z)]) -> Self {
        self.nodes = nodes.iter().map(|(id, z)| (*id, z.as_ref().to_string())).collect();
        self
    }

    /// The cluster's data in `dir` (created, kept afterwards) instead of a
    /// fresh `target/test-data/TAG-*` removed on drop.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Every member's arguments after `--id --data --listen --initial-members`
    /// (default: [`FAST_META`] and `--down-after 8s`).
    pub fn meta_args(mut self, args: &[&str]) -> Self {
        self.meta_args = strings(args);
        self
    }

    /// Every node's arguments after `--id --zone --data --meta` (default:
    /// `--capacity 20G --heartbeat 300ms --gc-every 1s --disk-reserve 16M`).
    pub fn node_args(mut self, args: &[&str]) -> Self {
        self.node_args = strings(args);
        self
    }

    /// More arguments for each node from `extra(id, cluster dir)`.
    pub fn node_extra(mut self, extra: impl Fn(u64, &Path) -> Vec<String> + 'static) -> Self {
        self.extra = Box::new(extra);
        self
    }

    /// How every process of the cluster is started (e.g. [`ProcOptions::log_files`]).
    pub fn procs(mut self, opts: ProcOptions) -> Self {
        self.procs = opts;
        self
    }

    /// Every member and node serves `/metrics` (`--metrics-listen`) on a
    /// loopback port of its own, kept across restarts ([`Member::metrics`],
    /// [`Node::metrics`]).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Starts the three members, then the nodes (each waited for its ready
    /// line), then waits until meta counts every node up.
    pub fn start(self) -> Result<Cluster> {
        let (root, tmp) = match &self.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(Error::io(format!("create {}", d.display())))?;
                (d.clone(), None)
            }
            None => {
                let t = data_dir(&self.tag)?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut members = Vec::new();
        for id in 1..=3 {
            let metrics = if self.metrics { Some(free_addr()?) } else { None };
            members.push(Member { id, addr: free_addr()?, metrics, proc: None });
        }
        let pki = crate::tls::pki(&root)?;
        let mut c = Cluster {
            members,
            nodes: Vec::new(),
            pki,
            root,
            meta_args: self.meta_args,
            node_args: self.node_args,
            procs: self.procs,
            _tmp: tmp,
        };
        for id in 1..=3 {
            c.start_member(id)?;
        }
        for (id, zone) in &self.nodes {
            let args = (self.extra)(*id, &c.root);
            let metrics = if self.metrics { Some(free_addr()?) } else { None };
            c.nodes.push(Node { id: *id, zone: zone.clone(), args, metrics, proc: None });
            c.start_node(*id)?;
        }
        let ctl = c.ctl()?;
        let want = self.nodes.len() as u64;
        try_wait_until("all nodes up", Duration::from_secs(60), || {
            Ok(ctl.json(&["status"])?["nodes_up"].as_u64() == Some(want))
        })?;
        Ok(c)
    }
}

pub struct Cluster {
    pub members: Vec<Member>,
    pub nodes: Vec<Node>,
    /// The cluster's CA (DIR/pki): every process runs with a certificate of its
    /// own identity, as in production.
    pki: ballast_tls::certs::Pki,
    root: PathBuf,
    meta_args: Vec<String>,
    node_args: Vec<String>,
    procs: ProcOptions,
    // Last: the processes are killed before their directory is removed.
    _tmp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// A cluster with the test defaults, data in `target/test-data/TAG-*`.
    pub fn builder(tag: &str) -> Builder {
        Builder {
            tag: tag.into(),
            dir: None,
            nodes: Vec::new(),
            meta_args: [&["--down-after", "8s"][..], &FAST_META].concat().iter().map(|s| s.to_string()).collect(),
            node_args: strings(&[
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
            ]),
            extra: Box::new(|_, _| Vec::new()),
            procs: ProcOptions::default(),
            metrics: false,
        }
    }

    /// Three meta members and storage nodes `(id, zone)`.
    pub fn start(tag: &str, nodes: &[(u64, &str)]) -> Result<Cluster> {
        Cluster::builder(tag).nodes(nodes).start()
    }

    /// Like [`Cluster::start`], with extra arguments for each node from `extra(id, dir)`.
    pub fn start_with(
        tag: &str,
        nodes: &[(u64, &str)],
        extra: impl Fn(u64, &Path) -> Vec<String> + 'static,
    ) -> Result<Cluster> {
        Cluster::builder(tag).nodes(nodes).node_extra(extra).start()
    }

    /// Every member's address, comma-separated (ballastctl's `--meta`).
    pub fn meta(&self) -> String {
        self.members.iter().map(|m| m.addr.as_str()).collect::<Vec<_>>().join(",")
    }

    /// The cluster's directory (meta`N`/ and node`N`/ data directories are in it).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// ballastctl against every member, as an admin.
    pub fn ctl(&self) -> Result<Ctl> {
        Ok(Ctl::new(&self.meta())?.tls(&self.tls_dir(&Identity::Admin("test".into()))?))
    }

    /// The `--tls-dir` of `identity`, issued by this cluster's CA.
    pub fn tls_dir(&self, identity: &Identity) -> Result<PathBuf> {
        crate::tls::issue(&self.pki, identity)
    }

    /// `--tls-dir DIR` for a process running as `identity`.
    pub fn tls_args(&self, identity: &Identity) -> Result<Vec<String>> {
        Ok(vec!["--tls-dir".into(), utf8(&self.tls_dir(identity)?)?.to_string()])
    }

    /// The CA's own directory (ca.crt, ca.key), for tests that issue more.
    pub fn pki(&self) -> &ballast_tls::certs::Pki {
        &self.pki
    }

    /// `ballastctl --output json ARGS` against every member.
    pub fn ctl_json(&self, args: &[&str]) -> Result<Value> {
        self.ctl()?.json(args)
    }

    fn member_index(&self, id: u64) -> Result<usize> {
        self.members.iter().position(|m| m.id == id).ok_or_else(|| Error::harness(format!("no meta member {id}")))
    }

    fn node_index(&self, id: u64) -> Result<usize> {
        self.nodes.iter().position(|n| n.id == id).ok_or_else(|| Error::harness(format!("no storage node {id}")))
    }

    /// Starts (or restarts, on its data) member `id` and waits for it.
    pub fn start_member(&mut self, id: u64) -> Result<()> {
        let i = self.member_index(id)?;
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}={}", m.id, m.addr)).collect();
        let data = self.path(&format!("meta{id}"));
        let mut args = strings(&[
            "meta",
            "--id",
            &id.to_string(),
            "--data",
            utf8(&data)?,
            "--listen",
            &self.members[i].addr,
            "--initial-members",
            &initial.join(","),
        ]);
        args.extend(self.meta_args.iter().cloned());
        args.extend(self.tls_args(&Identity::Meta(id))?);
        if let Some(m) = &self.members[i].metrics {
            args.extend(strings(&["--metrics-listen", m]));
        }
        let mut p = Proc::spawn_with(&format!("meta{id}"), &args, &self.procs)?;
        p.wait_for("ready meta", Duration::from_secs(30))?;
        self.members[i].proc = Some(p);
        Ok(())
    }

    /// SIGKILLs member `id` (nothing if it is not running).
    pub fn kill_member(&mut self, id: u64) -> Result<()> {
        let i = self.member_index(id)?;
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
        Ok(())
    }

    /// The current meta leader's id, as `ballastctl status` reports it.
    pub fn leader(&self) -> Result<u64> {
        let s = self.ctl_json(&["status"])?;
        s["leader"].as_u64().ok_or_else(|| Error::harness(format!("ballastctl status: no leader in {s}")))
    }

    /// Starts (or restarts, on its data) storage node `id` and waits for it.
    pub fn start_node(&mut self, id: u64) -> Result<()> {
        let i = self.node_index(id)?;
        let meta = self.meta();
        let data = self.path(&format!("node{id}"));
        let n = &self.nodes[i];
        let mut args =
            strings(&["node", "--id", &id.to_string(), "--zone", &n.zone, "--data", utf8(&data)?, "--meta", &meta]);
        args.extend(self.node_args.iter().cloned());
        args.extend(n.args.iter().cloned());
        args.extend(self.tls_args(&Identity::Node(id))?);
        if let Some(m) = &n.metrics {
            args.extend(strings(&["--metrics-listen", m]));
        }
        let mut p = Proc::spawn_with(&format!("node{id}"), &args, &self.procs)?;
        p.wait_for("ready node", Duration::from_secs(30))?;
        self.nodes[i].proc = Some(p);
        Ok(())
    }

    /// SIGKILLs storage node `id` (nothing if it is not running).
    pub fn kill_node(&mut self, id: u64) -> Result<()> {
        let i = self.node_index(id)?;
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
        Ok(())
    }

    /// Storage node `id`'s process, while it runs.
    pub fn node_proc(&mut self, id: u64) -> Option<&mut Proc> {
        self.nodes.iter_mut().find(|n| n.id == id).and_then(|n| n.proc.as_mut())
    }

    /// Starts `ballast export` of `volume` as node `node`, NBD on a loopback
    /// port, `--io-timeout 2s`; returns it and its NBD URI.
    pub fn export(&self, volume: &str, node: u64) -> Result<(Proc, String)> {
        self.export_with(volume, node, &["--io-timeout", "2s"])
    }

    /// Like [`Cluster::export`] with `extra` arguments instead of the I/O timeout.
    pub fn export_with(&self, volume: &str, node: u64, extra: &[&str]) -> Result<(Proc, String)> {
        let meta = self.meta();
        let tls = self.tls_args(&Identity::Frontend(node))?;
        let node = node.to_string();
        let mut args =
            vec!["export", "--meta", &meta, "--volume", volume, "--local-node", &node, "--nbd", "127.0.0.1:0"];
        args.extend(tls.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let mut p = Proc::spawn_with(&format!("export-{volume}"), &args, &self.procs)?;
        let uri = p.wait_value("ready nbd", "uri")?;
        Ok((p, uri))
    }

    /// Starts `ballast export --snapshot SNAPSHOT` (read-only, served from
    /// the replicas without attaching the volume) on `DIR/snap-SNAPSHOT.sock`;
    /// returns it and the socket.
    pub fn export_snapshot(&self, snapshot: &str) -> Result<(Proc, PathBuf)> {
        let sock = self.path(&format!("snap-{snapshot}.sock"));
        let meta = self.meta();
        // A snapshot export reads replicas as a front end of node 1.
        let tls = self.tls_args(&Identity::Frontend(1))?;
        let args = ["export", "--meta", &meta, "--snapshot", snapshot, "--socket", utf8(&sock)?, &tls[0], &tls[1]];
        let mut p = Proc::spawn_with(&format!("export-{snapshot}"), args, &self.procs)?;
        p.wait_for("ready nbd", Duration::from_secs(30))?;
        Ok((p, sock))
    }

    /// Starts `ballast csi-controller` on `DIR/csi-controller.sock` against
    /// this cluster's meta, with `extra` arguments, and waits for its `ready
    /// csi` line; returns it and its socket.
    pub fn csi_controller(&self, extra: &[&str]) -> Result<(Proc, PathBuf)> {
        let sock = self.path("csi-controller.sock");
        let endpoint = format!("unix://{}", utf8(&sock)?);
        let meta = self.meta();
        let tls = self.tls_args(&Identity::CsiController)?;
        let mut args = vec!["csi-controller", "--endpoint", &endpoint, "--meta", &meta, &tls[0], &tls[1]];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn_with("csi-controller", &args, &self.procs)?;
        p.wait_for("ready csi", Duration::from_secs(30))?;
        Ok((p, sock))
    }

    /// `volume create NAME --size --chunk-size --replicas 3 --min-in-sync`.
    pub fn create_volume(&self, name: &str, size: &str, chunk: &str, min_in_sync: &str) -> Result<Value> {
        self.ctl_json(&[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--chunk-size",
            chunk,
            "--replicas",
            "3",
            "--min-in-sync",
            min_in_sync,
        ])
    }

    /// `volume inspect NAME`.
    pub fn inspect(&self, name: &str) -> Result<Value> {
        self.ctl_json(&["volume", "inspect", name])
    }
}
