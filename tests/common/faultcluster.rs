//! The fault-injection cluster: three `ballast meta` members and six `ballast
//! node` storage nodes in three zones, each zone in its own network namespace
//! ([`Net`]), front ends (`ballast export`) on application hosts in their own
//! namespaces, and the operator's `ballastctl` in another. Every process is a
//! real process; every fault is a real signal, link, queue, disk or byte.
//!
//! | member | namespace | address            |
//! |--------|-----------|--------------------|
//! | meta k | zk        | 10.77.0.(10k+1):7400 |
//! | node i | z⌈i/2⌉    | 10.77.0.(10z+2+(i+1)%2):7500 |
//! | front ends | app1, app2 | 10.77.0.101, .102 (NBD on a unix socket) |
//! | ballastctl | ops   | 10.77.0.200        |
//!
//! Fixed ports are safe: the addresses exist only inside these namespaces.
//! Teardown (`Drop`, also on a panic): processes killed, disks unmounted and
//! detached, namespaces deleted, the data directory removed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::disks::Disk;
use super::netns::{Dir, Net, SUBNET};
use super::workload::{Workload, BS};
use super::{data_dir, Proc};

pub const ZONES: [&str; 3] = ["z1", "z2", "z3"];

/// What backs a storage node's data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// A directory of the test's data dir.
    Plain,
    /// A small ext4 on a loop device (can be filled).
    Small { mib: u64 },
    /// ext4 on loop over nbdkit's error filter (can fail with EIO).
    Faulty { mib: u64 },
}

pub struct MetaMember {
    pub id: u64,
    pub zone: &'static str,
    pub addr: String,
    pub proc: Option<Proc>,
}

pub struct StorageNode {
    pub id: u64,
    pub zone: &'static str,
    pub addr: String,
    /// The chunk store directory.
    pub data: PathBuf,
    pub proc: Option<Proc>,
    pub disk: Option<Disk>,
}

pub struct FrontEnd {
    pub app: String,
    pub sock: PathBuf,
    pub proc: Proc,
}

pub struct FaultCluster {
    pub rt: tokio::runtime::Runtime,
    pub metas: Vec<MetaMember>,
    pub nodes: Vec<StorageNode>,
    /// Faults injected so far (each verb counts one).
    pub faults: u64,
    fe_count: u32,
    pub net: Net,
    pub dir: tempfile::TempDir,
}

/// Why the fault cluster cannot run here, if it cannot.
pub fn unavailable(disks: &[DiskKind]) -> Option<String> {
    if let Some(why) = super::netns::unavailable() {
        return Some(why);
    }
    let faulty = disks.iter().any(|d| matches!(d, DiskKind::Faulty { .. }));
    if disks.iter().any(|d| *d != DiskKind::Plain) {
        return super::disks::unavailable(faulty);
    }
    None
}

pub fn node_zone(id: u64) -> &'static str {
    ZONES[((id - 1) / 2) as usize]
}

impl FaultCluster {
    /// Builds the network and disks and starts every member and node.
    /// `disks[i]` backs node `i + 1` (missing entries: plain directories).
    pub fn start(tag: &str, disks: &[DiskKind]) -> FaultCluster {
        let dir = data_dir(tag);
        let mut net = Net::new(&["z1", "z2", "z3", "app1", "app2", "ops"]);
        let mut metas = Vec::new();
        for (k, zone) in ZONES.iter().enumerate() {
            let k = k as u64 + 1;
            let ip = format!("{SUBNET}.{}", 10 * k + 1);
            net.add_addr(zone, &ip);
            metas.push(MetaMember { id: k, zone, addr: format!("{ip}:7400"), proc: None });
        }
        let mut nodes = Vec::new();
        for id in 1..=6u64 {
            let zone = node_zone(id);
            let z = id.div_ceil(2);
            let ip = format!("{SUBNET}.{}", 10 * z + 2 + (id + 1) % 2);
            net.add_addr(zone, &ip);
            let mount = dir.path().join(format!("node{id}"));
            let disk = match disks.get(id as usize - 1).copied().unwrap_or(DiskKind::Plain) {
                DiskKind::Plain => None,
                DiskKind::Small { mib } => Some(Disk::small(dir.path(), &format!("disk{id}"), mib, &mount)),
                DiskKind::Faulty { mib } => Some(Disk::faulty(dir.path(), &format!("disk{id}"), mib, &mount)),
            };
            // A subdirectory: a fresh ext4 root holds lost+found.
            let data = mount.join("store");
            nodes.push(StorageNode { id, zone, addr: format!("{ip}:7500"), data, proc: None, disk });
        }
        net.add_addr("app1", &format!("{SUBNET}.101"));
        net.add_addr("app2", &format!("{SUBNET}.102"));
        net.add_addr("ops", &format!("{SUBNET}.200"));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let mut c = FaultCluster { rt, metas, nodes, faults: 0, fe_count: 0, net, dir };
        for id in 1..=3 {
            c.start_meta(id);
        }
        for id in 1..=6 {
            c.start_node(id);
        }
        c.wait("all six nodes up", Duration::from_secs(60), |c| {
            c.try_ctl(&["status"]).and_then(|s| s["nodes_up"].as_u64()) == Some(6)
        });
        c
    }

    pub fn meta_addrs(&self) -> String {
        self.metas.iter().map(|m| m.addr.as_str()).collect::<Vec<_>>().join(",")
    }

    fn ballast(&self, member: &str) -> Command {
        let mut c = self.net.command(member, super::ballast_bin().to_str().expect("utf8"));
        c.env(
            "RUST_LOG",
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| "warn,ballast=info,ballast_frontend=info,ballast_metasvc=info".into()),
        );
        c
    }

    pub fn start_meta(&mut self, id: u64) {
        let initial: Vec<String> = self.metas.iter().map(|m| format!("{}={}", m.id, m.addr)).collect();
        let m = &self.metas[id as usize - 1];
        let data = self.dir.path().join(format!("meta{id}"));
        let mut cmd = self.ballast(m.zone);
        cmd.args(["meta", "--id", &id.to_string(), "--listen", &m.addr, "--initial-members", &initial.join(",")])
            .arg("--data")
            .arg(&data)
            .args(super::FAST_META)
            .args(["--down-after", "12s"]);
        let mut p = Proc::spawn_cmd(&format!("meta{id}"), cmd);
        p.wait_for("ready meta", Duration::from_secs(30));
        self.metas[id as usize - 1].proc = Some(p);
    }

    pub fn start_node(&mut self, id: u64) {
        let meta = self.meta_addrs();
        let n = &self.nodes[id as usize - 1];
        let mut cmd = self.ballast(n.zone);
        cmd.args(["node", "--id", &id.to_string(), "--zone", n.zone, "--listen", &n.addr, "--meta", &meta])
            .arg("--data")
            .arg(&n.data)
            .args(["--capacity", "4G", "--heartbeat", "300ms", "--gc-every", "2s", "--disk-reserve", "16M"]);
        let mut p = Proc::spawn_cmd(&format!("node{id}"), cmd);
        p.wait_for("ready node", Duration::from_secs(30));
        self.nodes[id as usize - 1].proc = Some(p);
    }

    /// SIGKILL a storage node (a fault).
    pub fn kill_node(&mut self, id: u64) {
        if let Some(mut p) = self.nodes[id as usize - 1].proc.take() {
            p.kill();
            self.faults += 1;
        }
    }

    /// SIGKILL a meta member (a fault).
    pub fn kill_meta(&mut self, id: u64) {
        if let Some(mut p) = self.metas[id as usize - 1].proc.take() {
            p.kill();
            self.faults += 1;
        }
    }

    /// SIGSTOP (a fault) or SIGCONT a storage node.
    pub fn pause_node(&mut self, id: u64, pause: bool) {
        let p = self.nodes[id as usize - 1].proc.as_ref().expect("running node");
        p.signal(if pause { libc::SIGSTOP } else { libc::SIGCONT });
        if pause {
            self.faults += 1;
        }
    }

    pub fn cut(&mut self, member: &str, dir: Dir) {
        eprintln!("fault: cut {member} ({dir:?})");
        self.net.cut(member, dir);
        self.faults += 1;
    }

    pub fn heal(&mut self, member: &str) {
        eprintln!("heal: {member}");
        self.net.heal(member);
    }

    pub fn slow(&mut self, member: &str) {
        eprintln!("fault: slow link {member} ({})", self.net.slow_method);
        self.net.slow(member, 400, "400kbit");
        self.faults += 1;
    }

    pub fn disk(&self, id: u64) -> &Disk {
        self.nodes[id as usize - 1].disk.as_ref().expect("node has its own disk")
    }

    /// `ballastctl --output json ARGS` from the ops host; None if it fails.
    pub fn try_ctl(&self, args: &[&str]) -> Option<Value> {
        let meta = self.meta_addrs();
        let out = self
            .net
            .command("ops", super::cluster::ctl_bin().to_str().expect("utf8"))
            .args(["--meta", &meta, "--output", "json", "--timeout", "10s"])
            .args(args)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("ballastctl {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn ctl(&self, args: &[&str]) -> Value {
        // Meta may be electing: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.try_ctl(args) {
                return v;
            }
            assert!(Instant::now() < deadline, "ballastctl {args:?} kept failing");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut(&FaultCluster) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The meta leader's id.
    pub fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.try_ctl(&["status"]).and_then(|s| s["leader"].as_u64()).filter(|l| *l > 0) {
                return l;
            }
            assert!(Instant::now() < deadline, "no meta leader");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A volume of `mib` MiB in 4 MiB chunks, three replicas in three zones,
    /// min-in-sync two.
    pub fn create_volume(&self, name: &str, mib: u64) {
        self.ctl(&[
            "volume",
            "create",
            name,
            "--size",
            &format!("{mib}Mi"),
            "--chunk-size",
            "4Mi",
            "--replicas",
            "3",
            "--min-in-sync",
            "2",
            "--zone-spread",
            "required",
        ]);
    }

    /// Starts `ballast export` of `volume` on application host `app`, serving
    /// NBD on a unix socket (reachable from the test across namespaces).
    pub fn start_frontend(&mut self, app: &str, volume: &str, io_timeout: &str, extra: &[&str]) -> FrontEnd {
        self.fe_count += 1;
        let sock = self.dir.path().join(format!("{app}-{}.sock", self.fe_count));
        // Meta records which node's host a volume is attached on: app1 stands
        // for node 1's host, app2 for node 4's (reads prefer that replica).
        let host_node = if app == "app1" { "1" } else { "4" };
        let mut cmd = self.ballast(app);
        cmd.args(["export", "--meta", &self.meta_addrs(), "--volume", volume, "--io-timeout", io_timeout])
            .args(["--local-node", host_node])
            .arg("--socket")
            .arg(&sock)
            .args(extra);
        let mut proc = Proc::spawn_cmd(&format!("export-{app}-{}", self.fe_count), cmd);
        proc.wait_for("ready nbd", Duration::from_secs(60));
        FrontEnd { app: app.into(), sock, proc }
    }

    pub fn inspect(&self, volume: &str) -> Value {
        self.ctl(&["volume", "inspect", volume])
    }

    /// Waits until every chunk of `volume` has all its replicas in sync;
    /// returns how long that took.
    pub fn wait_full_redundancy(&self, volume: &str, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        self.wait(&format!("full redundancy of {volume}"), timeout, |c| {
            c.try_ctl(&["volume", "inspect", volume]).is_some_and(|v| {
                let h = &v["health"];
                h["chunks"].as_u64().is_some() && h["chunks_full"] == h["chunks"]
            })
        });
        t0.elapsed()
    }

    /// The data file of `volume`'s chunk on a node.
    pub fn chunk_file(&self, node: u64, volume_id: u64, chunk: u64) -> PathBuf {
        self.nodes[node as usize - 1].data.join("chunks").join(format!("v{volume_id:016x}-c{chunk:08x}.data"))
    }

    /// In-sync replicas of each chunk: (chunk index, node ids).
    pub fn in_sync(&self, volume: &str) -> (u64, Vec<(u64, Vec<u64>)>) {
        let v = self.inspect(volume);
        let id = v["volume"]["id"].as_u64().expect("volume id");
        let chunks = v["chunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .map(|c| {
                let nodes = c["replicas"]
                    .as_array()
                    .expect("replicas")
                    .iter()
                    .filter(|r| r["role"] == "in-sync")
                    .filter_map(|r| r["node"].as_u64())
                    .collect();
                (c["index"].as_u64().expect("index"), nodes)
            })
            .collect();
        (id, chunks)
    }

    /// Checks every block of every in-sync replica's chunk file against the
    /// ledger (call it with the workload stopped and redundancy full). Returns
    /// the replica block copies verified; violations go to the workload.
    pub fn verify_replicas(&self, w: &Workload, volume: &str, chunk_size: u64) -> (u64, Vec<String>) {
        let (vid, chunks) = self.in_sync(volume);
        let per_chunk = chunk_size / BS;
        let mut verified = 0;
        let mut bad = Vec::new();
        for (idx, nodes) in chunks {
            for node in nodes {
                let path = self.chunk_file(node, vid, idx);
                // An in-sync replica without the file never had a write acknowledged: zeros.
                let data = std::fs::read(&path).unwrap_or_default();
                for i in 0..per_chunk {
                    let b = idx * per_chunk + i;
                    if b >= w.blocks() {
                        break;
                    }
                    let off = (i * BS) as usize;
                    let copy = data.get(off..off + BS as usize).unwrap_or(&[0u8; BS as usize]);
                    match w.check_copy(b, copy, &format!("node {node}'s copy")) {
                        Some(v) => bad.push(v),
                        None => verified += 1,
                    }
                }
            }
        }
        (verified, bad)
    }

    /// Flips one byte of `block`'s copy in a node's chunk file (bit rot under
    /// the store: its per-block crc no longer matches).
    pub fn flip_byte(&mut self, node: u64, volume_id: u64, chunk_size: u64, block: u64, at: u64) {
        use std::os::unix::fs::FileExt;
        let per_chunk = chunk_size / BS;
        let path = self.chunk_file(node, volume_id, block / per_chunk);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("chunk file");
        let off = (block % per_chunk) * BS + at % BS;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).expect("read byte");
        b[0] ^= 0x5a;
        f.write_all_at(&b, off).expect("flip byte");
        f.sync_all().expect("sync");
        self.faults += 1;
    }

    pub fn data_path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FaultCluster {
    fn drop(&mut self) {
        // Resume paused nodes so that SIGKILL can reap them at once.
        for n in &mut self.nodes {
            if let Some(p) = &n.proc {
                p.signal(libc::SIGCONT);
            }
            n.proc.take();
        }
        for m in &mut self.metas {
            m.proc.take();
        }
        for n in &mut self.nodes {
            n.disk.take();
        }
        // Then `net` deletes the namespaces and `dir` removes the files.
    }
}
