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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ballast_tls::Identity;
use serde_json::Value;

use crate::disks::Disk;
use crate::netns::{Dir, Net, SUBNET};
use crate::workload::{Workload, BS};
use crate::{bin, ctl, data_dir, wait_every, Ctl, Error, Proc, Result, FAST_META};

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
    /// ballastctl on the ops host.
    ctl: Ctl,
    /// The cluster's CA: every process runs with a certificate of its own.
    pki: ballast_tls::certs::Pki,
    pub net: Net,
    pub dir: tempfile::TempDir,
}

/// Why the fault cluster cannot run here, if it cannot.
pub fn unavailable(disks: &[DiskKind]) -> Option<String> {
    if let Some(why) = crate::netns::unavailable() {
        return Some(why);
    }
    let faulty = disks.iter().any(|d| matches!(d, DiskKind::Faulty { .. }));
    if disks.iter().any(|d| *d != DiskKind::Plain) {
        return crate::disks::unavailable(faulty);
    }
    None
}

pub fn node_zone(id: u64) -> &'static str {
    ZONES[((id.clamp(1, 6) - 1) / 2) as usize]
}

impl FaultCluster {
    /// Builds the network and disks and starts every member and node.
    /// `disks[i]` backs node `i + 1` (missing entries: plain directories).
    pub fn start(tag: &str, disks: &[DiskKind]) -> Result<FaultCluster> {
        let dir = data_dir(tag)?;
        let mut net = Net::new(&["z1", "z2", "z3", "app1", "app2", "ops"])?;
        let mut metas = Vec::new();
        for (k, zone) in ZONES.iter().enumerate() {
            let k = k as u64 + 1;
            let ip = format!("{SUBNET}.{}", 10 * k + 1);
            net.add_addr(zone, &ip)?;
            metas.push(MetaMember { id: k, zone, addr: format!("{ip}:7400"), proc: None });
        }
        let mut nodes = Vec::new();
        for id in 1..=6u64 {
            let zone = node_zone(id);
            let z = id.div_ceil(2);
            let ip = format!("{SUBNET}.{}", 10 * z + 2 + (id + 1) % 2);
            net.add_addr(zone, &ip)?;
            let mount = dir.path().join(format!("node{id}"));
            let disk = match disks.get(id as usize - 1).copied().unwrap_or(DiskKind::Plain) {
                DiskKind::Plain => None,
                DiskKind::Small { mib } => Some(Disk::small(dir.path(), &format!("disk{id}"), mib, &mount)?),
                DiskKind::Faulty { mib } => Some(Disk::faulty(dir.path(), &format!("disk{id}"), mib, &mount)?),
            };
            // A subdirectory: a fresh ext4 root holds lost+found.
            let data = mount.join("store");
            nodes.push(StorageNode { id, zone, addr: format!("{ip}:7500"), data, proc: None, disk });
        }
        net.add_addr("app1", &format!("{SUBNET}.101"))?;
        net.add_addr("app2", &format!("{SUBNET}.102"))?;
        net.add_addr("ops", &format!("{SUBNET}.200"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(Error::io("a tokio runtime"))?;
        let meta = metas.iter().map(|m| m.addr.as_str()).collect::<Vec<_>>().join(",");
        let pki = crate::tls::pki(dir.path())?;
        let admin = crate::tls::issue(&pki, &Identity::Admin("ops".into()))?;
        let ctl = Ctl::new(&meta)?.timeout(Some("10s")).via(net.exec_prefix("ops")).tls(&admin);
        let mut c = FaultCluster { rt, metas, nodes, faults: 0, fe_count: 0, ctl, pki, net, dir };
        for id in 1..=3 {
            c.start_meta(id)?;
        }
        for id in 1..=6 {
            c.start_node(id)?;
        }
        c.wait("all six nodes up", Duration::from_secs(60), |c| {
            c.try_ctl(&["status"]).and_then(|s| s["nodes_up"].as_u64()) == Some(6)
        })?;
        Ok(c)
    }

    pub fn meta_addrs(&self) -> String {
        self.metas.iter().map(|m| m.addr.as_str()).collect::<Vec<_>>().join(",")
    }

    fn ballast(&self, member: &str) -> Result<Command> {
        let mut c = self.net.command(member, bin::ballast()?);
        c.env(
            "RUST_LOG",
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| "warn,ballast=info,ballast_frontend=info,ballast_metasvc=info".into()),
        );
        Ok(c)
    }

    /// `--tls-dir DIR` of `identity`.
    fn tls(&self, identity: &Identity) -> Result<[std::ffi::OsString; 2]> {
        Ok(["--tls-dir".into(), crate::tls::issue(&self.pki, identity)?.into()])
    }

    fn meta_mut(&mut self, id: u64) -> Result<&mut MetaMember> {
        self.metas.iter_mut().find(|m| m.id == id).ok_or_else(|| Error::harness(format!("no meta member {id}")))
    }

    fn node(&self, id: u64) -> Result<&StorageNode> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| Error::harness(format!("no storage node {id}")))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut StorageNode> {
        self.nodes.iter_mut().find(|n| n.id == id).ok_or_else(|| Error::harness(format!("no storage node {id}")))
    }

    pub fn start_meta(&mut self, id: u64) -> Result<()> {
        let initial: Vec<String> = self.metas.iter().map(|m| format!("{}={}", m.id, m.addr)).collect();
        let data = self.dir.path().join(format!("meta{id}"));
        let (zone, addr) = {
            let m = self.meta_mut(id)?;
            (m.zone, m.addr.clone())
        };
        let mut cmd = self.ballast(zone)?;
        cmd.args(["meta", "--id", &id.to_string(), "--listen", &addr, "--initial-members", &initial.join(",")])
            .arg("--data")
            .arg(&data)
            .args(FAST_META)
            .args(["--down-after", "12s"])
            .args(self.tls(&Identity::Meta(id))?);
        let mut p = Proc::spawn_cmd(&format!("meta{id}"), cmd)?;
        p.wait_for("ready meta", Duration::from_secs(30))?;
        self.meta_mut(id)?.proc = Some(p);
        Ok(())
    }

    pub fn start_node(&mut self, id: u64) -> Result<()> {
        let meta = self.meta_addrs();
        let n = self.node(id)?;
        let mut cmd = self.ballast(n.zone)?;
        cmd.args(["node", "--id", &id.to_string(), "--zone", n.zone, "--listen", &n.addr, "--meta", &meta])
            .arg("--data")
            .arg(&n.data)
            .args(["--capacity", "4G", "--heartbeat", "300ms", "--gc-every", "2s", "--disk-reserve", "16M"])
            .args(self.tls(&Identity::Node(id))?);
        let mut p = Proc::spawn_cmd(&format!("node{id}"), cmd)?;
        p.wait_for("ready node", Duration::from_secs(30))?;
        self.node_mut(id)?.proc = Some(p);
        Ok(())
    }

    /// SIGKILL a storage node (a fault).
    pub fn kill_node(&mut self, id: u64) -> Result<()> {
        if let Some(mut p) = self.node_mut(id)?.proc.take() {
            p.kill();
            self.faults += 1;
        }
        Ok(())
    }

    /// SIGKILL a meta member (a fault).
    pub fn kill_meta(&mut self, id: u64) -> Result<()> {
        if let Some(mut p) = self.meta_mut(id)?.proc.take() {
            p.kill();
            self.faults += 1;
        }
        Ok(())
    }

    /// SIGSTOP (a fault) or SIGCONT a storage node.
    pub fn pause_node(&mut self, id: u64, pause: bool) -> Result<()> {
        let n = self.node(id)?;
        let p = n.proc.as_ref().ok_or_else(|| Error::NotRunning { name: format!("node{id}") })?;
        p.signal(if pause { libc::SIGSTOP } else { libc::SIGCONT })?;
        if pause {
            self.faults += 1;
        }
        Ok(())
    }

    pub fn cut(&mut self, member: &str, dir: Dir) -> Result<()> {
        eprintln!("fault: cut {member} ({dir:?})");
        self.net.cut(member, dir)?;
        self.faults += 1;
        Ok(())
    }

    pub fn heal(&mut self, member: &str) -> Result<()> {
        eprintln!("heal: {member}");
        self.net.heal(member)
    }

    pub fn slow(&mut self, member: &str) -> Result<()> {
        eprintln!("fault: slow link {member} ({})", self.net.slow_method);
        self.net.slow(member, 400, "400kbit")?;
        self.faults += 1;
        Ok(())
    }

    /// The disk of node `id` (one given a [`DiskKind`] other than `Plain`).
    pub fn disk(&self, id: u64) -> Result<&Disk> {
        self.node(id)?.disk.as_ref().ok_or_else(|| Error::harness(format!("node {id} has no disk of its own")))
    }

    /// `ballastctl --output json ARGS` from the ops host; None if it fails
    /// (why goes to the test's stderr).
    pub fn try_ctl(&self, args: &[&str]) -> Option<Value> {
        self.ctl
            .json(args)
            .map_err(|e| {
                if let Error::Failed { stderr, .. } = &e {
                    eprintln!("ballastctl {args:?}: {stderr}");
                }
            })
            .ok()
    }

    /// `ballastctl --output json ARGS`, retried for a minute (meta may be electing).
    pub fn ctl(&self, args: &[&str]) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.ctl.json(args) {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    if let Error::Failed { stderr, .. } = &e {
                        eprintln!("ballastctl {args:?}: {stderr}");
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Waits until `f(self)` is true, checking every 200 ms.
    pub fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut(&FaultCluster) -> bool) -> Result<()> {
        wait_every(what, timeout, Duration::from_millis(200), || Ok(f(self)))
    }

    /// The meta leader's id (waiting up to 30 s for there to be one).
    pub fn leader(&self) -> Result<u64> {
        let mut leader = 0;
        self.wait("a meta leader", Duration::from_secs(30), |c| {
            leader = c.try_ctl(&["status"]).and_then(|s| s["leader"].as_u64()).unwrap_or(0);
            leader > 0
        })?;
        Ok(leader)
    }

    /// A volume of `mib` MiB in 4 MiB chunks, three replicas in three zones,
    /// min-in-sync two.
    pub fn create_volume(&self, name: &str, mib: u64) -> Result<Value> {
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
        ])
    }

    /// Starts `ballast export` of `volume` on application host `app`, serving
    /// NBD on a unix socket (reachable from the test across namespaces).
    pub fn start_frontend(&mut self, app: &str, volume: &str, io_timeout: &str, extra: &[&str]) -> Result<FrontEnd> {
        self.fe_count += 1;
        let sock = self.dir.path().join(format!("{app}-{}.sock", self.fe_count));
        // Meta records which node's host a volume is attached on: app1 stands
        // for node 1's host, app2 for node 4's (reads prefer that replica).
        let host_node = if app == "app1" { "1" } else { "4" };
        let mut cmd = self.ballast(app)?;
        cmd.args(["export", "--meta", &self.meta_addrs(), "--volume", volume, "--io-timeout", io_timeout])
            .args(["--local-node", host_node])
            .args(self.tls(&Identity::Frontend(if app == "app1" { 1 } else { 4 }))?)
            .arg("--socket")
            .arg(&sock)
            .args(extra);
        let mut proc = Proc::spawn_cmd(&format!("export-{app}-{}", self.fe_count), cmd)?;
        proc.wait_for("ready nbd", Duration::from_secs(60))?;
        Ok(FrontEnd { app: app.into(), sock, proc })
    }

    /// Starts `ballast export --snapshot SNAPSHOT` (read-only, no attach) on
    /// the ops host; returns it once it serves.
    pub fn export_snapshot(&mut self, snapshot: &str) -> Result<FrontEnd> {
        self.fe_count += 1;
        let sock = self.dir.path().join(format!("snap-{snapshot}-{}.sock", self.fe_count));
        let mut cmd = self.ballast("ops")?;
        cmd.args(["export", "--meta", &self.meta_addrs(), "--snapshot", snapshot])
            .arg("--socket")
            .arg(&sock)
            .args(self.tls(&Identity::Frontend(1))?);
        let mut proc = Proc::spawn_cmd(&format!("export-snap-{snapshot}-{}", self.fe_count), cmd)?;
        proc.wait_for("ready nbd", Duration::from_secs(60))?;
        Ok(FrontEnd { app: "ops".into(), sock, proc })
    }

    pub fn inspect(&self, volume: &str) -> Result<Value> {
        self.ctl(&["volume", "inspect", volume])
    }

    /// Waits until every chunk of `volume` has all its replicas in sync;
    /// returns how long that took.
    pub fn wait_full_redundancy(&self, volume: &str, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        self.wait(&format!("full redundancy of {volume}"), timeout, |c| {
            c.try_ctl(&["volume", "inspect", volume]).is_some_and(|v| ctl::fully_redundant(&v))
        })?;
        Ok(t0.elapsed())
    }

    /// The data file of `volume`'s chunk on a node: its one layer (the base
    /// file `<chunk>.data`, or `<chunk>.l<seq>.data` once a snapshot's layers
    /// were merged into the one above). A chunk with snapshot layers has no
    /// one file holding its live data: an error (delete the snapshots and
    /// let the layers merge first).
    pub fn chunk_file(&self, node: u64, volume_id: u64, chunk: u64) -> Result<PathBuf> {
        let dir = self.node(node)?.data.join("chunks");
        let stem = format!("v{volume_id:016x}-c{chunk:08x}");
        let base = dir.join(format!("{stem}.data"));
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(base) };
        let layers: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|f| f.to_str()).is_some_and(|f| {
                    f.strip_prefix(stem.as_str())
                        .is_some_and(|rest| rest == ".data" || (rest.starts_with(".l") && rest.ends_with(".data")))
                })
            })
            .collect();
        match layers.as_slice() {
            [] => Ok(base),
            [one] => Ok(one.clone()),
            more => Err(Error::harness(format!(
                "node {node}: chunk {stem} has {} layers (snapshots): no single file holds its live data",
                more.len()
            ))),
        }
    }

    /// Chunks of `volume_id` with more than one layer file on any node
    /// (snapshot layers not merged away yet).
    pub fn layered_chunks(&self, volume_id: u64) -> usize {
        let prefix = format!("v{volume_id:016x}-c");
        let mut n = 0;
        for node in &self.nodes {
            let Ok(entries) = std::fs::read_dir(node.data.join("chunks")) else { continue };
            let mut per_chunk: BTreeMap<String, usize> = BTreeMap::new();
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(rest) = name.strip_prefix(&prefix).filter(|_| name.ends_with(".data")) {
                    *per_chunk.entry(rest.chars().take(8).collect()).or_default() += 1;
                }
            }
            n += per_chunk.values().filter(|&&c| c > 1).count();
        }
        n
    }

    /// In-sync replicas of each chunk: (volume id, [(chunk index, node ids)]).
    pub fn in_sync(&self, volume: &str) -> Result<(u64, ctl::InSync)> {
        ctl::in_sync(&self.inspect(volume)?)
    }

    /// Checks every block of every in-sync replica's chunk file against the
    /// ledger (call it with the workload stopped and redundancy full). Returns
    /// the replica block copies verified, and the violations.
    pub fn verify_replicas(&self, w: &Workload, volume: &str, chunk_size: u64) -> Result<(u64, Vec<String>)> {
        let (vid, chunks) = self.in_sync(volume)?;
        let per_chunk = chunk_size / BS;
        let mut verified = 0;
        let mut bad = Vec::new();
        for (idx, nodes) in chunks {
            for node in nodes {
                let path = self.chunk_file(node, vid, idx)?;
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
        Ok((verified, bad))
    }

    /// Flips one byte of `block`'s copy in a node's chunk file (bit rot under
    /// the store: its per-block crc no longer matches).
    pub fn flip_byte(&mut self, node: u64, volume_id: u64, chunk_size: u64, block: u64, at: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let per_chunk = chunk_size / BS;
        let path = self.chunk_file(node, volume_id, block / per_chunk)?;
        let io = |what: &str| Error::io(format!("{what} {}", path.display()));
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(io("open"))?;
        let off = (block % per_chunk) * BS + at % BS;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).map_err(io("read a byte of"))?;
        b[0] ^= 0x5a;
        f.write_all_at(&b, off).map_err(io("flip a byte of"))?;
        f.sync_all().map_err(io("sync"))?;
        self.faults += 1;
        Ok(())
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
                let _ = p.signal(libc::SIGCONT);
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
