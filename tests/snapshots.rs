//! Snapshots on the path users take: three real `ballast meta` members, three
//! `ballast node` storage nodes in three zones, a `ballast export` front end
//! attached through meta with the verifiable workload running on it over NBD,
//! `ballastctl snapshot create|list|delete`, and every snapshot read back
//! through `ballast export --snapshot` (a read-only NBD export served from the
//! replicas, without attaching the volume) and checked block by block against
//! the workload's ledger:
//!
//! - taken while the volume is attached and busy: nothing acknowledged before
//!   the request missing, nothing issued after it was ready present, and it
//!   stays so while the volume keeps changing and after a re-attach;
//! - the front end SIGKILLed with a snapshot requested and not yet taken: the
//!   snapshot is cut at the dead front end's epoch's end when the volume is
//!   next attached, and holds everything that front end acknowledged;
//! - taken while the volume is detached: ready at once, and installed on the
//!   replicas by the next attach before its first write;
//! - refusals: the volume cannot be deleted while it has snapshots, a name is
//!   taken across volumes, an unknown snapshot is not found;
//! - deleting every snapshot leaves no frozen layer on any node: one layer per
//!   chunk replica, as before the first snapshot;
//! - a storage node holding snapshots lost for good while the workload runs:
//!   its chunks are rebuilt onto a node that held nothing of the volume, and
//!   with every other holder SIGKILLed, each snapshot read from the rebuilt
//!   replicas alone verifies block by block;
//! - a clone (`ballastctl volume create --from-snapshot`) of a snapshot taken
//!   under load: attached at once, every block read from it verifies against
//!   the ledger at the cut while it still copies, its source snapshot cannot
//!   be deleted until the copy is done, then the snapshot and the source
//!   volume are deleted and the clone, re-attached, holds the same data and
//!   takes writes of its own;
//! - snapshot space: volume inspect reports the frozen layers the nodes hold
//!   and their bytes on disk, and nothing once the snapshots are deleted;
//! - a storage node SIGKILLed while a snapshot is taken: the snapshot exists
//!   complete or not at all, and after the node's resync it verifies read
//!   from that node alone;
//! - a clone nobody attaches: filled by a node agent in the background until
//!   independent, so its snapshot and source can be deleted; it verifies when
//!   attached afterwards;
//! - a clone of a busy attached volume (`--from-volume`): every block within
//!   the ledger around its creation, while it copies and after its source is
//!   deleted; the snapshot meta made for it goes once it is independent;
//! - bit rot in snapshot blocks on every node (different blocks of the same
//!   pieces) under a volume attached with a scrub schedule: the scrub passes
//!   find and repair every rotten copy, the snapshot verifies against the
//!   ledger, and each node's store, opened alone after SIGKILL, verifies every
//!   block of the snapshot.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_nbd::NbdClient;
use ballast_testkit::ctl::{healthy, replicas_on};
use ballast_testkit::workload::{connect, Workload, BS};
use ballast_testkit::{try_wait_until, Cluster, Proc, Result};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const TASKS: usize = 8;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Attaches `v` through `ballast export` on node 1, with a unix socket the
/// workload connects to.
fn attach(c: &Cluster) -> Result<(Proc, std::path::PathBuf)> {
    let sock = c.path("v.sock");
    let sock_arg = sock.to_str().expect("utf-8 path").to_string();
    let (p, _uri) = c.export_with("v", 1, &["--io-timeout", "2s", "--socket", &sock_arg])?;
    Ok((p, sock))
}

/// Reads snapshot `name` through its own read-only export and checks every
/// block against the marks around its creation; returns the blocks' versions.
fn read_back(c: &Cluster, rt: &tokio::runtime::Runtime, w: &Workload, name: &str, marks: &Marks) -> Result<Vec<u64>> {
    let (mut p, sock) = c.export_snapshot(name)?;
    let client = rt.block_on(NbdClient::connect_unix(&sock, "")).expect("connect to the snapshot export");
    assert_eq!(client.info().size, SIZE, "the snapshot's export has the volume's size");
    // Read-only: a write is refused and changes nothing.
    let refused = rt.block_on(ballast_blockdev::BlockDev::write(&client, 0, vec![0u8; BS as usize].into(), false));
    assert!(refused.is_err(), "a snapshot export took a write");
    let started = Instant::now();
    let (verified, versions) = w.verify_snapshot(&client, &marks.before, &marks.after);
    eprintln!("snapshot {name}: {verified} blocks verified in {:?}", started.elapsed());
    let violations = w.violations();
    let first: Vec<&String> = violations.iter().take(5).collect();
    assert_eq!(
        verified,
        w.blocks(),
        "every block of {name} verifies; {} violations, the first: {first:?}",
        violations.len()
    );
    let _ = rt.block_on(client.disconnect());
    p.terminate(Duration::from_secs(10))?;
    Ok(versions)
}

/// The ledger just before a snapshot was requested and once it was ready.
struct Marks {
    before: Vec<(u64, u64)>,
    after: Vec<(u64, u64)>,
}

fn snapshot(c: &Cluster, w: &Workload, name: &str) -> Result<(Marks, Value, Duration)> {
    let before = w.mark();
    let t = Instant::now();
    let s = c.ctl_json(&["snapshot", "create", "v", name])?;
    let took = t.elapsed();
    let after = w.mark();
    assert_eq!(s["ready"], true, "snapshot create waits until ready: {s}");
    assert_eq!(s["name"], name, "{s}");
    Ok((Marks { before, after }, s, took))
}

/// Frozen snapshot layers under a node's data directory: a chunk replica is
/// a stack of layers, one data file each (`<chunk>.data` for the base layer,
/// `<chunk>.l<seq>.data` above it); all but the top one per chunk are frozen.
fn frozen_layers(dir: &Path) -> usize {
    let mut chunks = std::collections::HashSet::new();
    let mut layers = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let Some(stem) = p.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_suffix(".data")) else {
                continue;
            };
            layers += 1;
            chunks.insert(stem.split(".l").next().unwrap_or(stem).to_string());
        }
    }
    layers - chunks.len()
}

fn frozen_on_nodes(c: &Cluster) -> usize {
    (1..=3).map(|id| frozen_layers(&c.path(&format!("node{id}")))).sum()
}

#[test]
fn snapshots_through_meta_hold_exactly_what_the_ledger_allows() -> Result<()> {
    let rt = runtime();
    let c = Cluster::start("snapshots", &[(1, "z1"), (2, "z2"), (3, "z3")])?;
    c.create_volume("v", "64M", "16M", "2")?;
    let (mut export, sock) = attach(&c)?;
    let mut w = Workload::start(rt.handle(), SIZE / BS, TASKS, 0x5_4a95);
    w.set_client(Some(connect(rt.handle(), &sock)?));
    std::thread::sleep(Duration::from_millis(1500));

    // Attached and busy: two snapshots a second apart, the workload running.
    let (m1, s1, took1) = snapshot(&c, &w, "s1")?;
    std::thread::sleep(Duration::from_secs(1));
    let (m2, _, took2) = snapshot(&c, &w, "s2")?;
    eprintln!("snapshot create (request to ready, through ballastctl): {took1:?}, {took2:?}");
    assert!(s1["cut"]["counter"].as_u64() != Some(u64::MAX), "an attached volume's cut is the front end's: {s1}");
    std::thread::sleep(Duration::from_millis(500));
    // Read back while the workload keeps writing.
    let v1 = read_back(&c, &rt, &w, "s1", &m1)?;
    let v2 = read_back(&c, &rt, &w, "s2", &m2)?;
    let changed = v1.iter().zip(&v2).filter(|(a, b)| a != b).count();
    assert!(changed > 0, "the workload ran between s1 and s2");
    eprintln!("{} acknowledged writes so far; s1 and s2 differ in {changed} blocks", w.acked_writes());

    // Refusals: the volume has snapshots; a name is taken; unknown names.
    let out = c.ctl()?.run(&["volume", "delete", "v", "--yes"])?;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("snapshot"), "the refusal names the snapshots: {}", out.stderr);
    c.create_volume("other", "16M", "16M", "2")?;
    let out = c.ctl()?.run(&["snapshot", "create", "other", "s1"])?;
    assert!(out.code() == Some(1) && out.stderr.contains("s1"), "a name of v's snapshot, on another volume: {out:?}");
    let out = c.ctl()?.run(&["snapshot", "delete", "never-was"])?;
    assert!(out.code() == Some(1) && out.stderr.contains("not found"), "{out:?}");
    let list = c.ctl_json(&["snapshot", "list", "--volume", "v"])?;
    let names: Vec<&str> =
        list["snapshots"].as_array().expect("list").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["s1", "s2"], "{list}");
    let inspect = c.inspect("v")?;
    assert_eq!(inspect["snapshots"].as_array().map(Vec::len), Some(2), "volume inspect shows them: {inspect}");

    // The front end SIGKILLed with a snapshot requested, not yet taken: the
    // workload pauses first, so the ledger at the kill is known exactly.
    w.pause();
    let at_kill = w.mark();
    export.kill();
    let req = c.ctl_json(&["snapshot", "create", "v", "s3", "--no-wait"])?;
    assert_eq!(req["ready"], false, "pending while the dead front end still holds the attach: {req}");
    let (export2, sock2) = attach(&c)?;
    drop(export);
    let s3 = c.ctl_json(&["snapshot", "list"])?;
    let s3 = s3["snapshots"].as_array().expect("list").iter().find(|s| s["name"] == "s3").cloned().expect("s3");
    assert_eq!(s3["ready"], true, "the new attach cut it at the old epoch's end: {s3}");
    assert_eq!(s3["cut"]["counter"].as_u64(), Some(u64::MAX), "{s3}");
    w.set_client(Some(connect(rt.handle(), &sock2)?));
    w.resume();
    std::thread::sleep(Duration::from_secs(1));
    read_back(&c, &rt, &w, "s3", &Marks { before: at_kill.clone(), after: at_kill })?;

    // Detached: the snapshot is ready at once; the next attach installs its
    // cut before the first write, so it keeps what was there.
    w.pause();
    let mut export2 = export2;
    export2.terminate(Duration::from_secs(30))?;
    let at_detach = w.mark();
    let s4 = c.ctl_json(&["snapshot", "create", "v", "s4", "--no-wait"])?;
    assert_eq!(s4["ready"], true, "a detached volume's snapshot is ready at once: {s4}");
    let m4 = Marks { before: at_detach.clone(), after: at_detach };
    read_back(&c, &rt, &w, "s4", &m4)?;
    let (export3, sock3) = attach(&c)?;
    w.set_client(Some(connect(rt.handle(), &sock3)?));
    w.resume();
    std::thread::sleep(Duration::from_secs(1));
    let v4 = read_back(&c, &rt, &w, "s4", &m4)?;
    read_back(&c, &rt, &w, "s1", &m1)?;
    w.pause();
    let live = connect(rt.handle(), &sock3)?;
    assert_eq!(w.verify_all(&live), SIZE / BS, "the volume itself: {:?}", w.violations());
    let moved = w.mark().iter().zip(&v4).filter(|((acked, _), v)| acked > v).count();
    assert!(moved > 0, "the volume changed after s4, which did not");

    // Deleting every snapshot: the attached front end drops the cuts, every
    // replica merges its layers, no snapshot layer is left on any node.
    let frozen = frozen_on_nodes(&c);
    assert!(frozen > 0, "snapshot layers exist on the nodes");
    // Their space, as the nodes count it (each recounts within 15 s) and
    // volume inspect shows it: the layers found on disk, each holding blocks.
    let space = |c: &Cluster| -> Result<(u64, u64)> {
        let l = c.inspect("v")?;
        let s = &l["snapshot_space"];
        Ok((s["layers"].as_u64().unwrap_or(0), s["bytes"].as_u64().unwrap_or(0)))
    };
    try_wait_until("volume inspect counts every frozen layer", Duration::from_secs(40), || {
        Ok(space(&c)?.0 == frozen as u64)
    })?;
    let (layers, bytes) = space(&c)?;
    eprintln!("snapshot space reported: {layers} layers, {bytes} bytes on disk over the 3 nodes");
    assert!(bytes >= layers * BS, "each frozen layer holds at least a block: {bytes} bytes in {layers} layers");
    for name in ["s1", "s2", "s3", "s4"] {
        c.ctl_json(&["snapshot", "delete", name])?;
    }
    let t = Instant::now();
    try_wait_until("no frozen layer left on any node", Duration::from_secs(30), || Ok(frozen_on_nodes(&c) == 0))?;
    eprintln!("all {frozen} frozen layers merged away {:?} after the deletes", t.elapsed());
    try_wait_until("volume inspect counts no snapshot space", Duration::from_secs(40), || Ok(space(&c)? == (0, 0)))?;
    assert!(c.ctl_json(&["snapshot", "list"])?["snapshots"].as_array().is_some_and(|l| l.is_empty()));
    let live: Arc<NbdClient> = connect(rt.handle(), &sock3)?;
    assert_eq!(w.verify_all(&live), SIZE / BS, "the volume after the merges: {:?}", w.violations());
    c.ctl_json(&["volume", "delete", "v", "--yes"]).map(|_| ()).or_else(|e| {
        // Still attached (the export runs): the refusal must not be about snapshots.
        assert!(!e.to_string().contains("snapshot"), "{e}");
        Ok::<(), ballast_testkit::Error>(())
    })?;
    w.stop();
    assert!(w.violations().is_empty(), "{:?}", w.violations());
    drop(export3);
    Ok(())
}

/// A node holding snapshots is lost while the volume is busy; the rebuild
/// (under the front end's writes) carries the snapshots to the new node, and
/// they verify when that node is the only replica left.
#[test]
fn snapshots_are_rebuilt_with_the_chunks_and_read_from_the_rebuilt_replicas_alone() -> Result<()> {
    let rt = runtime();
    // Node 4 (a second z1 node) is down while the volume is placed, so it
    // holds nothing of it; it is where node 3's chunks are rebuilt.
    let mut c = Cluster::start("snapshot-rebuild", &[(1, "z1"), (2, "z2"), (3, "z3"), (4, "z1")])?;
    c.kill_node(4)?;
    try_wait_until("node 4 down in meta", Duration::from_secs(30), || {
        let nodes = c.ctl_json(&["node", "list"])?;
        Ok(nodes["nodes"].as_array().is_some_and(|n| n.iter().any(|n| n["id"] == 4 && n["state"] != "up")))
    })?;
    c.create_volume("v", "64M", "16M", "2")?;
    assert_eq!(replicas_on(&c.inspect("v")?, 4), 0, "node 4 holds nothing of v");
    let (export, sock) = attach(&c)?;
    let mut w = Workload::start(rt.handle(), SIZE / BS, TASKS, 0x7e_b11d);
    w.set_client(Some(connect(rt.handle(), &sock)?));
    std::thread::sleep(Duration::from_millis(1000));
    let (m1, _, _) = snapshot(&c, &w, "r1")?;
    std::thread::sleep(Duration::from_millis(700));
    let (m2, _, _) = snapshot(&c, &w, "r2")?;
    std::thread::sleep(Duration::from_millis(500));

    // Node 3 (all of z3) is lost for good with the workload running; after
    // the down timeout its chunks are rebuilt onto node 4.
    c.start_node(4)?;
    let started = Instant::now();
    c.kill_node(3)?;
    try_wait_until("node 3's chunks rebuilt onto node 4", Duration::from_secs(120), || {
        let l = c.inspect("v")?;
        Ok(replicas_on(&l, 3) == 0 && replicas_on(&l, 4) == 4 && healthy(&l))
    })?;
    eprintln!("rebuild with two snapshots took {:?} (including the down timeout)", started.elapsed());
    // One more snapshot after the rebuild: the new node takes it like the others.
    let (m3, _, _) = snapshot(&c, &w, "r3")?;
    std::thread::sleep(Duration::from_millis(500));
    w.pause();
    let live = connect(rt.handle(), &sock)?;
    assert_eq!(w.verify_all(&live), SIZE / BS, "the volume after the rebuild: {:?}", w.violations());
    drop(live);
    drop(export);

    // Only node 4 left among the holders: every snapshot block comes from
    // the rebuilt replicas.
    c.kill_node(1)?;
    c.kill_node(2)?;
    for (name, marks) in [("r1", &m1), ("r2", &m2), ("r3", &m3)] {
        read_back(&c, &rt, &w, name, marks)?;
    }
    w.stop();
    assert!(w.violations().is_empty(), "{:?}", w.violations());
    Ok(())
}

/// Reads the clone through its own export: every block against the marks of
/// the snapshot it came from; returns the versions.
fn verify_clone(
    rt: &tokio::runtime::Runtime,
    w: &Workload,
    sock: &Path,
    marks: &Marks,
    when: &str,
) -> Result<Vec<u64>> {
    let client = connect(rt.handle(), sock)?;
    let started = Instant::now();
    let (verified, versions) = w.verify_snapshot(&client, &marks.before, &marks.after);
    eprintln!("clone {when}: {verified} blocks verified in {:?}", started.elapsed());
    let violations = w.violations();
    let first: Vec<&String> = violations.iter().take(5).collect();
    assert_eq!(
        verified,
        w.blocks(),
        "every block of the clone verifies {when}; {} violations: {first:?}",
        violations.len()
    );
    let _ = rt.block_on(client.disconnect());
    Ok(versions)
}

/// A clone of a snapshot taken under load is usable at once, verifies while
/// it copies and after, blocks the snapshot's deletion until it is
/// independent, and outlives its source.
#[test]
fn a_clone_of_a_busy_snapshot_verifies_while_copying_and_outlives_its_source() -> Result<()> {
    let rt = runtime();
    let c = Cluster::start("snapshot-clone", &[(1, "z1"), (2, "z2"), (3, "z3")])?;
    c.create_volume("v", "64M", "16M", "2")?;
    let (export, sock) = attach(&c)?;
    let mut w = Workload::start(rt.handle(), SIZE / BS, TASKS, 0xc1_0e5);
    w.set_client(Some(connect(rt.handle(), &sock)?));
    std::thread::sleep(Duration::from_millis(1500));
    let (marks, _, _) = snapshot(&c, &w, "base")?;

    // Refusals first: smaller than the snapshot, an unknown snapshot.
    let small = c.ctl()?.run(&["volume", "create", "tiny", "--size", "16M", "--from-snapshot", "base"])?;
    assert!(small.code() == Some(1) && small.stderr.contains("smaller"), "{small:?}");
    let unknown = c.ctl()?.run(&["volume", "create", "w", "--size", "64M", "--from-snapshot", "never-was"])?;
    assert!(unknown.code() == Some(1) && unknown.stderr.contains("not found"), "{unknown:?}");

    let created = Instant::now();
    let args = [
        "volume",
        "create",
        "w",
        "--size",
        "64M",
        "--chunk-size",
        "16M",
        "--min-in-sync",
        "2",
        "--from-snapshot",
        "base",
    ];
    let clone = c.ctl_json(&args)?;
    assert_eq!(clone["origin"]["snapshot"], "base", "{clone}");
    assert_eq!(clone["unfilled_chunks"], 4, "{clone}");
    assert_eq!(c.ctl_json(&args)?["id"], clone["id"], "the same create again is the same clone");
    let refused = c.ctl()?.run(&["snapshot", "delete", "base"])?;
    assert!(refused.code() == Some(1) && refused.stderr.contains("copying"), "the clone still needs it: {refused:?}");
    let filling = c.ctl()?.run(&["snapshot", "create", "w", "of-w"])?;
    assert!(
        filling.code() == Some(1) && filling.stderr.contains("clone"),
        "no snapshot of a filling clone: {filling:?}"
    );

    // Attached on another node while the source keeps changing, and
    // SIGKILLed while it copies: a chunk it had not recorded is copied again
    // by the next attach.
    let wsock = c.path("w.sock");
    let wsock_arg = wsock.to_str().expect("utf-8 path").to_string();
    let (mut killed, _) = c.export_with("w", 2, &["--io-timeout", "2s", "--socket", &wsock_arg])?;
    try_wait_until("the first clone chunk copied", Duration::from_secs(30), || {
        Ok(c.inspect("w")?["volume"]["unfilled_chunks"].as_u64().is_some_and(|n| n < 4))
    })?;
    killed.kill();
    let left = c.inspect("w")?["volume"]["unfilled_chunks"].as_u64();
    eprintln!("clone front end SIGKILLed with {left:?} of 4 chunks left to copy");
    // Read at once through the next attach, while it copies.
    let (wexport, _) = c.export_with("w", 2, &["--io-timeout", "2s", "--socket", &wsock_arg])?;
    drop(killed);
    let first = verify_clone(&rt, &w, &wsock, &marks, "while copying")?;
    try_wait_until("the clone is independent", Duration::from_secs(60), || {
        Ok(c.inspect("w")?["volume"]["unfilled_chunks"] == 0)
    })?;
    eprintln!("clone of 64 MiB independent {:?} after its creation", created.elapsed());

    // The source goes: its snapshot, then the volume itself.
    w.pause();
    let live = connect(rt.handle(), &sock)?;
    assert_eq!(w.verify_all(&live), SIZE / BS, "the source volume: {:?}", w.violations());
    drop(live);
    drop(export);
    c.ctl_json(&["snapshot", "delete", "base"])?;
    c.ctl_json(&["volume", "delete", "v", "--yes"])?;
    let mut wexport = wexport;
    wexport.terminate(Duration::from_secs(30))?;

    // Re-attached: the same data, then writes of its own.
    let (_wexport, _) = c.export_with("w", 3, &["--io-timeout", "2s", "--socket", &wsock_arg])?;
    let again = verify_clone(&rt, &w, &wsock, &marks, "after its source was deleted")?;
    assert_eq!(first, again, "the clone holds the same versions as before");
    let client = connect(rt.handle(), &wsock)?;
    let own = vec![0x5au8; 64 * 1024];
    rt.block_on(ballast_blockdev::BlockDev::write(&*client, 8 * MIB, own.clone().into(), true))
        .expect("write to the clone");
    let back =
        rt.block_on(ballast_blockdev::BlockDev::read(&*client, 8 * MIB, own.len() as u32)).expect("read the clone");
    assert!(back[..] == own[..], "the clone keeps its own writes");
    let _ = rt.block_on(client.disconnect());
    w.stop();
    Ok(())
}

/// A clone nobody attaches (a restore whose pod is not scheduled yet) is
/// filled by a node agent in the background: it becomes independent without
/// an attach, so its snapshot and then its source can be deleted; attached
/// afterwards, every block verifies against the ledger at the cut.
#[test]
fn a_clone_nobody_attaches_is_filled_in_the_background_and_lets_its_source_go() -> Result<()> {
    let rt = runtime();
    let mut c = Cluster::start("clone-detached", &[(1, "z1"), (2, "z2"), (3, "z3")])?;
    c.create_volume("v", "64M", "16M", "2")?;
    let (export, sock) = attach(&c)?;
    let mut w = Workload::start(rt.handle(), SIZE / BS, TASKS, 0xc1_0e7);
    w.set_client(Some(connect(rt.handle(), &sock)?));
    std::thread::sleep(Duration::from_millis(1500));
    let (marks, _, _) = snapshot(&c, &w, "base")?;
    let created = Instant::now();
    let args = [
        "volume",
        "create",
        "w",
        "--size",
        "64M",
        "--chunk-size",
        "16M",
        "--min-in-sync",
        "2",
        "--from-snapshot",
        "base",
    ];
    let clone = c.ctl_json(&args)?;
    assert_eq!(clone["unfilled_chunks"], 4, "{clone}");
    // The source stays busy meanwhile.
    try_wait_until("the detached clone independent", Duration::from_secs(120), || {
        Ok(c.inspect("w")?["volume"]["unfilled_chunks"] == 0)
    })?;
    eprintln!("detached clone of 64 MiB independent {:?} after its creation", created.elapsed());
    let after = c.inspect("w")?;
    assert!(after["volume"]["epoch"].as_u64().is_some_and(|e| e >= 1), "a filler attached it: {after}");
    try_wait_until("the filler detached", Duration::from_secs(10), || {
        Ok(c.inspect("w")?["volume"]["attached_to"].as_u64().unwrap_or(0) == 0)
    })?;
    w.pause();
    drop(export);
    c.ctl_json(&["snapshot", "delete", "base"])?;
    c.ctl_json(&["volume", "delete", "v", "--yes"])?;
    let wsock = c.path("w.sock");
    let wsock_arg = wsock.to_str().expect("utf-8 path").to_string();
    let (_wexport, _) = c.export_with("w", 2, &["--io-timeout", "2s", "--socket", &wsock_arg])?;
    let first = verify_clone(&rt, &w, &wsock, &marks, "filled while detached, its source deleted")?;
    // A storage node SIGKILLed and restarted under the attached clone.
    c.kill_node(1)?;
    c.start_node(1)?;
    try_wait_until("the clone healthy after the node's restart", Duration::from_secs(60), || {
        Ok(healthy(&c.inspect("w")?))
    })?;
    let again = verify_clone(&rt, &w, &wsock, &marks, "after a storage node's restart")?;
    assert_eq!(first, again, "the clone holds the same versions as before");
    w.stop();
    Ok(())
}

/// Flips a byte in up to `per_node` written blocks of the frozen base layers
/// (`<chunk>.data` of a chunk that also has a layer above) under `dir`, one
/// block per chunk: its `nth` written block, so that nodes given different
/// `nth` rot different copies; returns how many.
fn rot_frozen_blocks(dir: &Path, per_node: usize, nth: usize) -> usize {
    use std::os::unix::fs::FileExt;
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|f| f.to_str()) {
                files.push((p.clone(), name.to_string()));
            }
        }
    }
    files.sort();
    let mut rotted = 0;
    for (path, name) in &files {
        let Some(stem) = name.strip_suffix(".data").filter(|s| !s.contains(".l")) else { continue };
        if !files.iter().any(|(_, n)| n.starts_with(&format!("{stem}.l")) && n.ends_with(".data")) {
            continue;
        }
        let data = std::fs::read(path).expect("read a frozen layer");
        let written = data.chunks(BS as usize).enumerate().filter(|(_, b)| b.iter().any(|&x| x != 0));
        let Some((block, _)) = written.map(|(i, _)| (i, ())).nth(nth) else { continue };
        let f = std::fs::OpenOptions::new().write(true).open(path).expect("open a frozen layer");
        f.write_all_at(&[!data[block * BS as usize + 64]; 1], (block * BS as usize + 64) as u64).expect("flip");
        f.sync_all().expect("sync");
        rotted += 1;
        if rotted == per_node {
            break;
        }
    }
    rotted
}

/// Bit rot in snapshot blocks, on every node, under a volume attached with
/// its scrub schedule: the scrub passes of `ballast export` find and repair
/// every rotten copy; the snapshot then verifies against the ledger, and
/// each node's own store, opened alone after the processes are SIGKILLed,
/// verifies every block of every chunk's view at the cut.
#[test]
fn bit_rot_in_snapshot_blocks_is_found_by_the_scrub_and_repaired() -> Result<()> {
    let rt = runtime();
    let mut c = Cluster::start("snapshot-scrub", &[(1, "z1"), (2, "z2"), (3, "z3")])?;
    c.create_volume("v", "64M", "16M", "2")?;
    let sock = c.path("v.sock");
    let sock_arg = sock.to_str().expect("utf-8 path").to_string();
    let scrub = ["--io-timeout", "2s", "--socket", &sock_arg, "--scrub-interval", "2s", "--scrub-rate", "512M"];
    let (mut export, _) = c.export_with("v", 1, &scrub)?;
    let mut w = Workload::start(rt.handle(), SIZE / BS, TASKS, 0x5c_4b);
    w.set_client(Some(connect(rt.handle(), &sock)?));
    std::thread::sleep(Duration::from_millis(1500));
    let (marks, s, _) = snapshot(&c, &w, "s")?;
    std::thread::sleep(Duration::from_millis(1500));
    w.pause();
    let cut = ballast_types::Seq {
        epoch: ballast_types::Epoch(s["cut"]["epoch"].as_u64().expect("cut epoch")),
        counter: s["cut"]["counter"].as_u64().expect("cut counter"),
    };

    let rotted: usize = (1..=3).map(|id| rot_frozen_blocks(&c.path(&format!("node{id}")), 2, id as usize * 5)).sum();
    assert!(rotted >= 3, "frozen layers with data on the nodes: {rotted} blocks rotted");
    let (mut found, mut repaired, mut views) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    for _ in 0..4 {
        let line = export.wait_for("scrub pass volume=", Duration::from_secs(60))?;
        let num = |k: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        found += num("corrupt");
        repaired += num("repaired");
        views = num("snapshot_views");
        assert_eq!(num("unrepairable"), 0, "{line}");
        if found >= rotted as u64 && num("corrupt") == 0 {
            break;
        }
    }
    eprintln!(
        "{rotted} rotten snapshot blocks: the scrub found {found} corrupt pieces and repaired {repaired} in {:?} ({views} snapshot views per pass)",
        started.elapsed()
    );
    assert!(views > 0, "the passes scanned the snapshot's views");
    assert!(found >= rotted as u64 && repaired == found, "found {found}, repaired {repaired}, rotted {rotted}");
    read_back(&c, &rt, &w, "s", &marks)?;
    w.stop();
    export.kill();
    for id in 1..=3 {
        c.kill_node(id)?;
    }
    for id in 1..=3u64 {
        let store = ballast_chunkstore::ChunkStore::open(c.path(&format!("node{id}")), Default::default())
            .map_err(|e| ballast_testkit::Error::harness(format!("reopen node {id}: {e}")))?;
        let mut read = 0u64;
        for chunk in store.chunks() {
            let epoch = store.epoch(chunk.id.volume);
            for off in (0..chunk.size).step_by(MIB as usize) {
                match rt.block_on(store.read_snapshot(chunk.id, cut, off, MIB as u32, epoch)) {
                    Ok(_) => read += MIB,
                    Err(ballast_chunkstore::StoreError::NoSuchChunk(_)) => break,
                    Err(e) => panic!("node {id}: chunk {} at {cut}, offset {off}: {e}", chunk.id),
                }
            }
        }
        eprintln!("node {id}: {} MiB of the snapshot verified in its own store", read / MIB);
        assert!(read > 0, "node {id} holds some of the snapshot");
    }
    Ok(())
}

/// A clone of a busy attached volume (`ballastctl volume create --from-volume`):
/// it holds the source as it was at its creation (every block within the
/// ledger around the create), through a snapshot meta made for it, which is
/// gone once the clone is independent, so the source can be deleted right
/// after; the clone keeps its data across a re-attach.
#[test]
fn a_clone_of_a_busy_volume_holds_its_content_at_creation_and_leaves_nothing_on_the_source() -> Result<()> {
    let rt = runtime();
    let c = Cluster::start("volume-clone", &[(1, "z1"), (2, "z2"), (3, "z3")])?;
    c.create_volume("v", "64M", "16M", "2")?;
    let (export, sock) = attach(&c)?;
    let mut w = Workload::start(rt.handle(), SIZE / BS, TASKS, 0xc1_0e6);
    w.set_client(Some(connect(rt.handle(), &sock)?));
    std::thread::sleep(Duration::from_millis(1500));

    let small = c.ctl()?.run(&["volume", "create", "tiny", "--size", "16M", "--from-volume", "v"])?;
    assert!(small.code() == Some(1) && small.stderr.contains("smaller"), "{small:?}");
    let unknown = c.ctl()?.run(&["volume", "create", "w", "--size", "64M", "--from-volume", "never-was"])?;
    assert!(unknown.code() == Some(1) && unknown.stderr.contains("not found"), "{unknown:?}");

    let args =
        ["volume", "create", "w", "--size", "64M", "--chunk-size", "16M", "--min-in-sync", "2", "--from-volume", "v"];
    let before = w.mark();
    let t = Instant::now();
    let clone = c.ctl_json(&args)?;
    let took = t.elapsed();
    let marks = Marks { before, after: w.mark() };
    eprintln!("clone of a busy 64 MiB volume created (its snapshot taken) in {took:?}");
    assert_eq!(
        (&clone["origin"]["snapshot"], &clone["origin"]["from_volume"]),
        (&Value::from("w@source"), &Value::from(true)),
        "{clone}"
    );
    assert_eq!(c.ctl_json(&args)?["id"], clone["id"], "the same create again is the same clone");
    let snaps = c.ctl_json(&["snapshot", "list", "--volume", "v"])?;
    let made = snaps["snapshots"].as_array().map(|s| s.iter().filter(|x| x["for_clone"] == clone["id"]).count());
    assert_eq!(made, Some(1), "one snapshot made for the clone, ready: {snaps}");

    let wsock = c.path("w.sock");
    let wsock_arg = wsock.to_str().expect("utf-8 path").to_string();
    let (wexport, _) = c.export_with("w", 3, &["--io-timeout", "2s", "--socket", &wsock_arg])?;
    let first = verify_clone(&rt, &w, &wsock, &marks, "while it copies")?;
    try_wait_until("the clone independent", Duration::from_secs(120), || {
        Ok(c.inspect("w")?["volume"]["unfilled_chunks"] == 0)
    })?;
    let snaps = c.ctl_json(&["snapshot", "list"])?;
    assert_eq!(snaps["snapshots"].as_array().map(Vec::len), Some(0), "the clone's snapshot is gone: {snaps}");

    // The source goes at once: nothing of the clone is left on it.
    w.pause();
    drop(export);
    c.ctl_json(&["volume", "delete", "v", "--yes"])?;
    let mut wexport = wexport;
    wexport.terminate(Duration::from_secs(30))?;
    let (_wexport, _) = c.export_with("w", 3, &["--io-timeout", "2s", "--socket", &wsock_arg])?;
    let again = verify_clone(&rt, &w, &wsock, &marks, "after its source was deleted")?;
    assert_eq!(first, again, "the clone holds the same versions as before");
    w.stop();
    Ok(())
}

/// A storage node SIGKILLed while a snapshot is being taken on the busy
/// volume: the snapshot either exists complete (every block within the
/// ledger around the request) or does not exist. The node comes back, is
/// resynced, and with the other two holders SIGKILLed the snapshot read from
/// it alone verifies.
#[test]
fn a_storage_node_sigkilled_during_snapshot_creation_leaves_a_complete_snapshot_or_none() -> Result<()> {
    let rt = runtime();
    let mut c = Cluster::start("snapshot-nodekill", &[(1, "z1"), (2, "z2"), (3, "z3")])?;
    c.create_volume("v", "64M", "16M", "2")?;
    let (export, sock) = attach(&c)?;
    let mut w = Workload::start(rt.handle(), SIZE / BS, TASKS, 0x6b_111);
    w.set_client(Some(connect(rt.handle(), &sock)?));
    std::thread::sleep(Duration::from_millis(1500));

    let before = w.mark();
    let ctl = c.ctl()?;
    let create = std::thread::spawn(move || ctl.run(&["--output", "json", "snapshot", "create", "v", "k"]));
    // ballastctl starts, meta records the request, the front end sees it on
    // its next layout poll and installs the cut: the kill lands in there.
    std::thread::sleep(Duration::from_millis(120));
    c.kill_node(2)?;
    let out = create.join().map_err(|_| ballast_testkit::Error::harness("snapshot create thread panicked"))??;
    let after = w.mark();
    let listed = c.ctl_json(&["snapshot", "list"])?;
    let exists =
        listed["snapshots"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == "k" && s["ready"] == true));
    eprintln!("snapshot create with node 2 SIGKILLed: exit {:?}, snapshot exists: {exists}", out.code());
    assert_eq!(out.code() == Some(0), exists, "ballastctl's answer matches meta: {out:?} {listed}");
    let marks = Marks { before, after };
    if exists {
        read_back(&c, &rt, &w, "k", &marks)?;
    }

    // Back, and resynced with the snapshot's cut and views.
    c.start_node(2)?;
    let started = Instant::now();
    try_wait_until("node 2 resynced", Duration::from_secs(120), || {
        let l = c.inspect("v")?;
        Ok(replicas_on(&l, 2) == 4 && ballast_testkit::ctl::fully_redundant(&l))
    })?;
    eprintln!("node 2 resynced {:?} after its restart", started.elapsed());
    w.pause();
    let live = connect(rt.handle(), &sock)?;
    assert_eq!(w.verify_all(&live), SIZE / BS, "the volume after the resync: {:?}", w.violations());
    drop(live);
    drop(export);
    if exists {
        c.kill_node(1)?;
        c.kill_node(3)?;
        read_back(&c, &rt, &w, "k", &marks)?;
    }
    w.stop();
    assert!(w.violations().is_empty(), "{:?}", w.violations());
    Ok(())
}
