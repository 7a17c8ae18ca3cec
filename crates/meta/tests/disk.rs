//! Disk health reported by heartbeats: a failed disk's replicas are rebuilt
//! elsewhere as for a down node and it is never a copy's target; a full disk
//! takes no new replicas and its ejected ones are rebuilt elsewhere; a healthy
//! report clears both; Raft logs and snapshots from before disk health decode.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use ballast_meta::plan::{plan_jobs, what_if, Failure, JobLimits};
use ballast_meta::state::*;
use ballast_placement::NodeState as PlacementState;
use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};

const CHUNK: u64 = 4 << 20;
const UNLIMITED: JobLimits = JobLimits { max_active: usize::MAX, max_per_target: usize::MAX };

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
}

/// Six nodes in zones a, b, c (1 and 4 in a, 2 and 5 in b, 3 and 6 in c) and a
/// 64-chunk volume of 3 replicas, min 2, zone spread `spread`.
fn cluster(spread: ZoneSpread) -> (MetaState, VolumeId) {
    let mut s = MetaState::new(9);
    for i in 1..=6u64 {
        let zone = Zone(["a", "b", "c"][(i as usize - 1) % 3].into());
        s.apply(&Command::RegisterNode { id: NodeId(i), addr: addr(i), zone, capacity: 1 << 40, now_ms: 0 })
            .expect("register");
    }
    let id = create_volume(&mut s, "db", 64, 3, 2, spread);
    (s, id)
}

/// Creates a volume of `chunks` chunks; panics unless it is placed.
fn create_volume(
    s: &mut MetaState,
    name: &str,
    chunks: u64,
    replicas: usize,
    min_in_sync: usize,
    zone_spread: ZoneSpread,
) -> VolumeId {
    let cmd = Command::CreateVolume {
        name: name.into(),
        size: chunks * CHUNK,
        chunk_size: CHUNK,
        replicas,
        min_in_sync,
        zones: vec![],
        zone_spread,
    };
    match s.apply(&cmd) {
        Ok(Response::Volume(id)) => id,
        other => panic!("create {name}: {other:?}"),
    }
}

fn heartbeat(s: &mut MetaState, id: NodeId, disk: DiskHealth) {
    s.apply(&Command::Heartbeat { id, reported_used: 0, now_ms: 1, disk }).expect("heartbeat");
}

fn failed(reason: &str) -> DiskHealth {
    DiskHealth::Failed { reason: reason.into() }
}

fn role_of(c: &ChunkEntry, node: NodeId) -> Option<Role> {
    c.replicas.iter().find(|r| r.node == node).map(|r| r.role)
}

fn held_by(s: &MetaState, v: VolumeId, n: NodeId) -> Vec<u32> {
    let chunks = &s.volumes[&v].chunks;
    (0..chunks.len() as u32).filter(|&i| role_of(&chunks[i as usize], n).is_some()).collect()
}

fn eject(s: &mut MetaState, v: VolumeId, chunk: u32, node: NodeId) {
    let version = s.volumes[&v].chunks[chunk as usize].version;
    s.apply(&Command::Eject { volume: v, chunk: ChunkIdx(chunk), version, node }).expect("eject");
}

/// The plan's jobs as (chunk, kind, target, replaces).
fn jobs(plan: &[Command]) -> Vec<(u32, JobKind, NodeId, Option<NodeId>)> {
    plan.iter()
        .map(|cmd| match cmd {
            Command::StartJob { chunk, kind, target, replaces, .. } => (chunk.0, *kind, *target, *replaces),
            other => panic!("plan_jobs returned {other:?}"),
        })
        .collect()
}

/// Scheduler rounds, every job started and finished ok, until nothing is left.
/// Returns every job run.
fn run_to_completion(s: &mut MetaState) -> Vec<(u32, JobKind, NodeId, Option<NodeId>)> {
    let mut all = Vec::new();
    for _ in 0..100 {
        let plan = plan_jobs(s, JobLimits::default());
        if plan.is_empty() {
            return all;
        }
        all.extend(jobs(&plan));
        let mut started = Vec::new();
        for cmd in &plan {
            match s.apply(cmd) {
                Ok(Response::Job(j)) => started.push(j),
                other => panic!("{cmd:?}: {other:?}"),
            }
        }
        for job in started {
            s.apply(&Command::FinishJob { job, ok: true, error: None, blocks_copied: 1 }).expect("finish");
        }
    }
    panic!("not done after 100 rounds");
}

/// Every chunk has 3 in-sync members in 3 zones, none on `gone`.
fn assert_whole(s: &MetaState, v: VolumeId, gone: NodeId) {
    for (i, c) in s.volumes[&v].chunks.iter().enumerate() {
        assert_eq!(role_of(c, gone), None, "chunk {i} still on {gone}");
        assert_eq!((c.in_sync().count(), c.replicas.len()), (3, 3), "chunk {i}: {c:?}");
        let zones: BTreeSet<&Zone> = c.in_sync().map(|n| &s.nodes[&n].zone).collect();
        assert_eq!(zones.len(), 3, "chunk {i}: zones {zones:?}");
    }
}

#[test]
fn a_failed_disk_is_rebuilt_elsewhere_like_a_down_node() {
    for spread in [ZoneSpread::Preferred, ZoneSpread::Required] {
        let (mut s, vid) = cluster(spread);
        let x = NodeId(1);
        let held = held_by(&s, vid, x);
        assert!(held.len() > 10, "node 1 holds {} chunks", held.len());
        // Writes failed on X before its probe noticed: some replicas are ejected.
        let ejected: Vec<u32> = held.iter().copied().step_by(3).collect();
        for &c in &ejected {
            eject(&mut s, vid, c, x);
        }
        heartbeat(&mut s, x, failed("write /data/.probe: Input/output error (os error 5)"));
        assert_eq!(s.nodes[&x].state, NodeState::Up, "it still heartbeats: the node is up, its disk is not");
        // One rebuild per chunk X held, in-sync or ejected, none a resync onto X.
        let plan = jobs(&plan_jobs(&s, UNLIMITED));
        assert_eq!(plan.iter().map(|j| j.0).collect::<Vec<_>>(), held);
        for (chunk, kind, target, replaces) in &plan {
            assert_eq!((*kind, *replaces), (JobKind::Rebuild, Some(x)), "chunk {chunk}");
            assert_ne!(*target, x, "chunk {chunk}: a failed disk is never a target");
            // The zone rule: X's zone mate is the only node in a zone of its own.
            assert_eq!(*target, NodeId(4), "chunk {chunk}");
        }
        let ran = run_to_completion(&mut s);
        assert_eq!(ran.len(), held.len());
        assert!(ran.iter().all(|j| j.2 != x));
        assert_whole(&s, vid, x);
        assert_eq!(s.nodes[&x].allocated, 0);
    }
}

#[test]
fn a_failed_disk_is_refused_as_a_target_and_fails_the_jobs_it_had() {
    let (mut s, vid) = cluster(ZoneSpread::Preferred);
    let y = NodeId(2);
    let held = held_by(&s, vid, y);
    for &c in &held[..4] {
        eject(&mut s, vid, c, y);
    }
    // Y resyncs its ejected replicas; then its disk fails under the jobs.
    let plan = plan_jobs(&s, UNLIMITED);
    assert_eq!(plan.len(), 4);
    for cmd in &plan {
        s.apply(cmd).expect("resync starts");
    }
    heartbeat(&mut s, y, failed("fdatasync: EIO"));
    let ended: Vec<&Job> = s.jobs.values().collect();
    assert_eq!(ended.len(), 4);
    for j in ended {
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error.as_deref(), Some("target disk failed: fdatasync: EIO"));
        assert_eq!(role_of(&s.volumes[&vid].chunks[j.chunk.0 as usize], y), Some(Role::Ejected));
    }
    // A resync onto it (or any job) is refused by apply itself.
    let c = held[0];
    let start = Command::StartJob {
        volume: vid,
        chunk: ChunkIdx(c),
        version: s.volumes[&vid].chunks[c as usize].version,
        kind: JobKind::Resync,
        target: y,
        replaces: None,
    };
    let before = s.clone();
    assert!(matches!(s.apply(&start), Err(MetaError::Conflict(_))));
    assert_eq!(s, before);
    // The scheduler rebuilds all of Y's replicas elsewhere.
    let plan = jobs(&plan_jobs(&s, UNLIMITED));
    assert_eq!(plan.len(), held.len());
    assert!(plan.iter().all(|j| j.1 == JobKind::Rebuild && j.2 != y && j.3 == Some(y)));
}

#[test]
fn a_chunk_whose_only_in_sync_replica_is_on_a_failed_disk_has_no_source() {
    let (mut s, _) = cluster(ZoneSpread::Preferred);
    let v = create_volume(&mut s, "r2", 4, 2, 1, ZoneSpread::Preferred);
    let c0 = s.volumes[&v].chunks[0].clone();
    let (keep, other) = (c0.replicas[0].node, c0.replicas[1].node);
    eject(&mut s, v, 0, other);
    heartbeat(&mut s, keep, failed("EIO"));
    // Chunk 0 has nothing to copy from (its data is gone unless the disk comes
    // back); the failed node's other chunks are rebuilt from their other replica.
    let chunk0 = plan_jobs(&s, UNLIMITED)
        .into_iter()
        .filter(|c| matches!(c, Command::StartJob { volume, chunk, .. } if *volume == v && chunk.0 == 0))
        .count();
    assert_eq!(chunk0, 0);
    let others = held_by(&s, v, keep).len() - 1;
    let rebuilt = plan_jobs(&s, UNLIMITED)
        .into_iter()
        .filter(|c| matches!(c, Command::StartJob { volume, replaces: Some(r), .. } if *volume == v && *r == keep))
        .count();
    assert_eq!(rebuilt, others);
}

#[test]
fn a_full_disk_keeps_its_in_sync_replicas_and_rebuilds_its_ejected_ones_elsewhere() {
    let (mut s, vid) = cluster(ZoneSpread::Preferred);
    let y = NodeId(2);
    let held = held_by(&s, vid, y);
    let ejected: BTreeSet<u32> = held.iter().copied().step_by(2).collect();
    for &c in &ejected {
        eject(&mut s, vid, c, y);
    }
    heartbeat(&mut s, y, DiskHealth::Full);
    let plan = jobs(&plan_jobs(&s, UNLIMITED));
    assert_eq!(plan.iter().map(|j| j.0).collect::<BTreeSet<_>>(), ejected, "only the ejected replicas move");
    for (chunk, kind, target, replaces) in &plan {
        assert_eq!((*kind, *replaces), (JobKind::Rebuild, Some(y)), "chunk {chunk}");
        assert_eq!(*target, NodeId(5), "chunk {chunk}: into Y's zone mate");
    }
    run_to_completion(&mut s);
    for &c in &held {
        let role = role_of(&s.volumes[&vid].chunks[c as usize], y);
        let want = if ejected.contains(&c) { None } else { Some(Role::InSync) };
        assert_eq!(role, want, "chunk {c}");
    }
    // No new replicas: a new volume and a growth avoid it.
    assert_eq!(s.cluster_map().nodes.iter().find(|n| n.id == y).map(|n| n.state), Some(PlacementState::Cordoned));
    let before = s.nodes[&y].allocated;
    s.apply(&Command::GrowVolume { volume: vid, size: 128 * CHUNK }).expect("grow");
    assert_eq!(s.nodes[&y].allocated, before, "grown chunks avoid the full disk");
}

#[test]
fn a_healthy_heartbeat_clears_a_failed_or_full_disk_and_ejected_replicas_resync_in_place() {
    for bad in [failed("EIO"), DiskHealth::Full] {
        let (mut s, vid) = cluster(ZoneSpread::Preferred);
        let y = NodeId(3);
        let held = held_by(&s, vid, y);
        let ejected: Vec<u32> = held[..3].to_vec();
        for &c in &ejected {
            eject(&mut s, vid, c, y);
        }
        heartbeat(&mut s, y, bad.clone());
        assert!(jobs(&plan_jobs(&s, UNLIMITED)).iter().all(|j| j.1 == JobKind::Rebuild), "{bad:?}");
        // The operator replaced the disk (or freed space): the probe says ok.
        heartbeat(&mut s, y, DiskHealth::Ok);
        assert_eq!(s.nodes[&y].disk, DiskHealth::Ok);
        let plan = jobs(&plan_jobs(&s, UNLIMITED));
        assert_eq!(plan, ejected.iter().map(|&c| (c, JobKind::Resync, y, None)).collect::<Vec<_>>(), "{bad:?}");
        assert_eq!(s.cluster_map().nodes.iter().find(|n| n.id == y).map(|n| n.state), Some(PlacementState::Up));
    }
}

#[test]
fn a_heartbeat_brings_a_suspect_node_up_but_not_a_down_one_whatever_the_disk() {
    let (mut s, _) = cluster(ZoneSpread::Preferred);
    s.apply(&Command::SetNodeState { id: NodeId(1), state: NodeState::Suspect }).expect("suspect");
    s.apply(&Command::SetNodeState { id: NodeId(2), state: NodeState::Down }).expect("down");
    heartbeat(&mut s, NodeId(1), failed("EIO"));
    heartbeat(&mut s, NodeId(2), DiskHealth::Full);
    assert_eq!(s.nodes[&NodeId(1)].state, NodeState::Up);
    assert_eq!(s.nodes[&NodeId(2)].state, NodeState::Down);
    let map = s.cluster_map();
    let state = |id| map.nodes.iter().find(|n| n.id == NodeId(id)).map(|n| n.state);
    assert_eq!(state(1), Some(PlacementState::Down), "a failed disk is a down node to placement");
    assert_eq!(state(2), Some(PlacementState::Down));
    // A new volume lands on neither.
    let v = create_volume(&mut s, "new", 16, 2, 1, ZoneSpread::Preferred);
    assert!(held_by(&s, v, NodeId(1)).is_empty() && held_by(&s, v, NodeId(2)).is_empty());
}

#[test]
fn what_if_counts_a_failed_disk_as_already_lost() {
    let (mut s, vid) = cluster(ZoneSpread::Preferred);
    let x = NodeId(1);
    heartbeat(&mut s, x, failed("EIO"));
    // Failing X again changes nothing: its replicas are gone already.
    let (impacts, unaffected) = what_if(&s, &Failure::Node(x));
    assert!(impacts.is_empty());
    assert_eq!(unaffected, 1);
    // One replica per zone: X and its zone mate 4 share no chunk, so losing 4
    // degrades only its own chunks, and X's keep their other two.
    let on_x = held_by(&s, vid, x).len() as u32;
    let on_4 = held_by(&s, vid, NodeId(4)).len() as u32;
    assert_eq!(on_x + on_4, 64);
    let (impacts, _) = what_if(&s, &Failure::Node(NodeId(4)));
    assert_eq!(impacts.len(), 1);
    assert_eq!((impacts[0].degraded, impacts[0].unwritable, impacts[0].unavailable), (on_4, 0, 0));
    // Zone b failing: X's chunks keep only their zone-c replica.
    let (impacts, _) = what_if(&s, &Failure::Zone(Zone("b".into())));
    assert_eq!(impacts[0].unwritable, on_x, "X's chunks drop below min-in-sync");
    assert_eq!(impacts[0].degraded, 64 - on_x);
}

#[test]
fn node_serving_and_accepting_follow_state_and_disk() {
    let (mut s, _) = cluster(ZoneSpread::Preferred);
    heartbeat(&mut s, NodeId(1), failed("EIO"));
    heartbeat(&mut s, NodeId(2), DiskHealth::Full);
    s.apply(&Command::SetNodeState { id: NodeId(3), state: NodeState::Cordoned }).expect("cordon");
    let n = |id| &s.nodes[&NodeId(id)];
    assert_eq!((n(1).is_serving(), n(1).accepts_replicas()), (false, false));
    assert_eq!((n(2).is_serving(), n(2).accepts_replicas()), (true, false));
    assert_eq!((n(3).is_serving(), n(3).accepts_replicas()), (false, false));
    assert_eq!((n(4).is_serving(), n(4).accepts_replicas()), (true, true));
}

/// The on-log format: serde_json of `Command` (Raft entries) and `MetaState`
/// (snapshots). Entries and snapshots written before disk health must decode,
/// as healthy disks.
#[test]
fn logs_and_snapshots_from_before_disk_health_decode_as_healthy() {
    let old_heartbeat = r#"{"Heartbeat":{"id":3,"reported_used":4096,"now_ms":17}}"#;
    let cmd: Command = serde_json::from_str(old_heartbeat).expect("old heartbeat entry");
    assert_eq!(cmd, Command::Heartbeat { id: NodeId(3), reported_used: 4096, now_ms: 17, disk: DiskHealth::Ok });
    let old_node = r#"{"id":3,"addr":"127.0.0.1:7003","zone":"a","capacity":1099511627776,"allocated":0,
        "reported_used":0,"state":"suspect","last_heartbeat_ms":17}"#;
    let node: Node = serde_json::from_str(old_node).expect("old node");
    assert_eq!((node.state, node.disk), (NodeState::Suspect, DiskHealth::Ok));
    let old_snapshot = format!(r#"{{"seed":9,"nodes":{{"3":{old_node}}},"volumes":{{}},"next_volume":1}}"#);
    let state: MetaState = serde_json::from_str(&old_snapshot).expect("old snapshot");
    assert_eq!(state.nodes[&NodeId(3)].disk, DiskHealth::Ok);
}

/// Golden bytes of the new fields as they go into the log.
#[test]
fn disk_health_log_format() {
    let cmd = Command::Heartbeat { id: NodeId(3), reported_used: 0, now_ms: 5, disk: failed("EIO") };
    assert_eq!(
        serde_json::to_string(&cmd).expect("encode"),
        r#"{"Heartbeat":{"id":3,"reported_used":0,"now_ms":5,"disk":{"failed":{"reason":"EIO"}}}}"#
    );
    assert_eq!(serde_json::to_string(&DiskHealth::Ok).expect("encode"), r#""ok""#);
    assert_eq!(serde_json::to_string(&DiskHealth::Full).expect("encode"), r#""full""#);
    for d in [DiskHealth::Ok, DiskHealth::Full, failed("read back differs at byte 8")] {
        let back: DiskHealth = serde_json::from_str(&serde_json::to_string(&d).expect("encode")).expect("decode");
        assert_eq!(back, d);
    }
}
