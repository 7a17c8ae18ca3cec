//! The rebuild scheduler (`plan_jobs`) on random clusters, rebuild and resync
//! scenarios driven to completion, and `what_if` counts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ballast_meta::plan::{plan_jobs, what_if, Failure, Impact, JobLimits};
use ballast_meta::state::*;
use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};
use proptest::prelude::*;

const CHUNK: u64 = 4 << 20;

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
}

fn register(s: &mut MetaState, id: u64, zone: &str, capacity: u64) {
    s.apply(&Command::RegisterNode { id: NodeId(id), addr: addr(id), zone: Zone(zone.into()), capacity, now_ms: 0 })
        .expect("register");
}

fn create(s: &mut MetaState, name: &str, chunks: u64, replicas: usize, min: usize, zones: &[&str]) -> VolumeId {
    let cmd = Command::CreateVolume {
        name: name.into(),
        size: chunks * CHUNK,
        chunk_size: CHUNK,
        replicas,
        min_in_sync: min,
        zones: zones.iter().map(|z| Zone(z.to_string())).collect(),
        zone_spread: ZoneSpread::Preferred,
    };
    match s.apply(&cmd) {
        Ok(Response::Volume(id)) => id,
        other => panic!("create {name}: {other:?}"),
    }
}

fn role_of(c: &ChunkEntry, node: NodeId) -> Option<Role> {
    c.replicas.iter().find(|r| r.node == node).map(|r| r.role)
}

fn zone_of(s: &MetaState, n: NodeId) -> Zone {
    s.nodes[&n].zone.clone()
}

/// A random cluster: nodes in 3–4 zones, volumes, some ejected replicas, maybe
/// some jobs already running, then node states changed under them.
#[derive(Clone, Debug)]
struct Spec {
    zones: u8,
    /// Per node: zone pick, small disk, state, what its disk probe reports.
    nodes: Vec<(u8, bool, NodeState, DiskHealth)>,
    /// Per volume: chunks, replicas, min-in-sync pick, restricted to two zones.
    volumes: Vec<(u64, usize, usize, bool)>,
    /// (volume, chunk, member) picks, ejected while every node is up.
    ejects: Vec<(usize, usize, usize)>,
    /// Run one scheduler round (these limits) before the node states change.
    prestart: Option<(usize, usize)>,
    /// White-box: every replica of one chunk ejected (a disaster state the
    /// scheduler must not copy from).
    hollow: Option<(usize, usize)>,
    limits: (usize, usize),
}

fn arb_state() -> impl Strategy<Value = NodeState> {
    prop_oneof![
        6 => Just(NodeState::Up),
        2 => Just(NodeState::Down),
        1 => Just(NodeState::Draining),
        1 => Just(NodeState::Cordoned),
        1 => Just(NodeState::Suspect),
    ]
}

fn arb_disk() -> impl Strategy<Value = DiskHealth> {
    prop_oneof![
        8 => Just(DiskHealth::Ok),
        1 => Just(DiskHealth::Full),
        1 => Just(DiskHealth::Failed { reason: "EIO".into() }),
    ]
}

fn arb_spec() -> impl Strategy<Value = Spec> {
    (
        3u8..=4,
        prop::collection::vec((any::<u8>(), prop::bool::weighted(0.15), arb_state(), arb_disk()), 3..=12),
        prop::collection::vec((1u64..24, 1usize..=3, any::<usize>(), prop::bool::weighted(0.2)), 1..=3),
        prop::collection::vec((any::<usize>(), any::<usize>(), any::<usize>()), 0..12),
        prop::option::of((1usize..12, 1usize..4)),
        prop::option::weighted(0.2, (any::<usize>(), any::<usize>())),
        (1usize..24, 1usize..6),
    )
        .prop_map(|(zones, nodes, volumes, ejects, prestart, hollow, limits)| Spec {
            zones,
            nodes,
            volumes,
            ejects,
            prestart,
            hollow,
            limits,
        })
}

fn nth_volume(s: &MetaState, pick: usize) -> Option<&Volume> {
    (!s.volumes.is_empty()).then(|| s.volumes.values().nth(pick % s.volumes.len())).flatten()
}

fn build(spec: &Spec) -> MetaState {
    let mut s = MetaState::new(5);
    for (i, (z, small, _, _)) in spec.nodes.iter().enumerate() {
        // A small disk (two chunks of capacity, room for one beside the use
        // headroom): placement must skip it when full.
        let capacity = if *small { 2 * CHUNK } else { 1 << 40 };
        register(&mut s, i as u64 + 1, &format!("z{}", z % spec.zones), capacity);
    }
    for (i, (chunks, replicas, min, restricted)) in spec.volumes.iter().enumerate() {
        let zones = if *restricted { vec![Zone("z0".into()), Zone("z1".into())] } else { vec![] };
        let cmd = Command::CreateVolume {
            name: format!("v{i}"),
            size: chunks * CHUNK,
            chunk_size: CHUNK,
            replicas: *replicas,
            min_in_sync: 1 + min % replicas,
            zones,
            zone_spread: if i % 2 == 0 { ZoneSpread::Preferred } else { ZoneSpread::Required },
        };
        // Too few nodes or zones for this one: the cluster simply has fewer volumes.
        let _ = s.apply(&cmd);
    }
    for &(v, c, m) in &spec.ejects {
        let Some(vol) = nth_volume(&s, v) else { break };
        let i = c % vol.chunks.len();
        let chunk = &vol.chunks[i];
        let node = chunk.replicas[m % chunk.replicas.len()].node;
        let cmd = Command::Eject { volume: vol.id, chunk: ChunkIdx(i as u32), version: chunk.version, node };
        // Below min-in-sync: refused, and that is fine here.
        let _ = s.apply(&cmd);
    }
    if let Some((max_active, max_per_target)) = spec.prestart {
        for cmd in plan_jobs(&s, JobLimits { max_active, max_per_target }) {
            s.apply(&cmd).expect("planned job starts");
        }
    }
    // Disks fail or fill under running jobs (which end), then node states change
    // (a heartbeat would bring a suspect node up).
    for (i, (_, _, _, disk)) in spec.nodes.iter().enumerate() {
        let hb = Command::Heartbeat { id: NodeId(i as u64 + 1), reported_used: 0, now_ms: 1, disk: disk.clone() };
        s.apply(&hb).expect("heartbeat");
    }
    for (i, (_, _, state, _)) in spec.nodes.iter().enumerate() {
        s.apply(&Command::SetNodeState { id: NodeId(i as u64 + 1), state: *state }).expect("set state");
    }
    if let Some((v, c)) = spec.hollow {
        let volume = nth_volume(&s, v).map(|v| v.id);
        if let Some(vid) = volume {
            let n = s.volumes[&vid].chunks.len();
            let chunk = ChunkIdx((c % n) as u32);
            if s.active_job(vid, chunk).is_none() {
                let entry = &mut s.volumes.get_mut(&vid).expect("volume").chunks[chunk.0 as usize];
                for r in &mut entry.replicas {
                    r.role = Role::Ejected;
                }
                entry.version += 1;
            }
        }
    }
    s
}

/// Nodes placement may put a new replica of `v`'s chunk on (the map of `s`).
fn eligible(s: &MetaState, v: &Volume, c: &ChunkEntry) -> Vec<NodeId> {
    s.nodes
        .values()
        .filter(|n| {
            n.accepts_replicas()
                && n.room(&s.settings) >= v.chunk_size
                && n.disk_room() >= v.chunk_size
                && (v.zones.is_empty() || v.zones.contains(&n.zone))
                && role_of(c, n.id).is_none()
        })
        .map(|n| n.id)
        .collect()
}

/// Checks a plan made on `s` and applies it in order: every job must start.
/// Returns the state after the plan.
fn check_plan(s: &MetaState, limits: JobLimits, plan: &[Command]) -> MetaState {
    let active: Vec<&Job> = s.jobs.values().filter(|j| j.is_active()).collect();
    // Limits: the total, and per target (existing jobs count).
    if active.len() >= limits.max_active {
        assert!(plan.is_empty(), "planned past max_active");
    } else {
        assert!(active.len() + plan.len() <= limits.max_active, "{} + {} > max_active", active.len(), plan.len());
    }
    let mut per_target: BTreeMap<NodeId, (usize, usize)> = BTreeMap::new();
    for j in &active {
        per_target.entry(j.target).or_default().0 += 1;
    }
    let mut chunks = BTreeSet::new();
    // `s` with the plan's earlier jobs applied: their reservations count
    // against the room (and so the zones) left for the later ones.
    let mut cur = s.clone();
    for cmd in plan {
        let Command::StartJob { volume, chunk, version, kind, target, replaces } = cmd else {
            panic!("plan_jobs returned {cmd:?}")
        };
        per_target.entry(*target).or_default().1 += 1;
        assert!(chunks.insert((*volume, *chunk)), "two jobs for chunk {chunk} of {volume}");
        assert!(s.active_job(*volume, *chunk).is_none(), "a job for a chunk that has one");
        let v = &s.volumes[volume];
        let c = &v.chunks[chunk.0 as usize];
        assert_eq!(*version, c.version);
        assert!(
            c.in_sync().any(|n| !s.nodes[&n].disk.is_failed()),
            "a job for chunk {chunk} with no in-sync source on a working disk"
        );
        let tn = &s.nodes[target];
        assert_eq!(tn.state, NodeState::Up, "target {target} is not up");
        assert_eq!(tn.disk, DiskHealth::Ok, "target {target}'s disk is not ok");
        let state_of = |n: NodeId| s.nodes.get(&n).map(|n| n.state);
        let disk_of = |n: NodeId| s.nodes.get(&n).map(|n| n.disk.clone());
        let up_ejected = c
            .replicas
            .iter()
            .any(|r| r.role == Role::Ejected && s.nodes.get(&r.node).is_some_and(|n| n.accepts_replicas()));
        match kind {
            JobKind::Resync => {
                assert_eq!(*replaces, None);
                assert_eq!(role_of(c, *target), Some(Role::Ejected), "resync target is not an ejected member");
            }
            JobKind::Rebuild => {
                assert!(!up_ejected, "rebuild planned where a resync is possible");
                assert_eq!(role_of(c, *target), None, "rebuild target {target} already holds chunk {chunk}");
                let room = cur.nodes[target].room(&cur.settings).min(cur.nodes[target].disk_room());
                assert!(room >= v.chunk_size, "target {target} has no room left for chunk {chunk} in this round");
                assert!(v.zones.is_empty() || v.zones.contains(&tn.zone), "target outside the volume's zones");
                let old = replaces.expect("a rebuild replaces a member");
                let role = role_of(c, old).expect("replaced node is a member");
                let (st, disk) = (state_of(old), disk_of(old));
                assert!(
                    matches!(st, None | Some(NodeState::Down | NodeState::Draining))
                        || matches!(disk, Some(DiskHealth::Failed { .. }))
                        || (role == Role::Ejected
                            && (st == Some(NodeState::Cordoned) || disk == Some(DiskHealth::Full))),
                    "rebuild replaces {old}, which is {st:?}, {disk:?} and {role:?}"
                );
                // The zone rule: with enough zones for one replica each (zones of
                // the other members, and of nodes with room left), the new
                // replica's zone is none of the remaining members' zones.
                let others: Vec<NodeId> = c.replicas.iter().map(|r| r.node).filter(|&n| n != old).collect();
                let other_zones: BTreeSet<Zone> = others.iter().map(|&n| zone_of(s, n)).collect();
                let mut zones: BTreeSet<Zone> = eligible(&cur, v, c).iter().map(|&n| zone_of(s, n)).collect();
                zones.extend(other_zones.iter().cloned());
                if zones.len() >= c.replicas.len() {
                    assert!(!other_zones.contains(&tn.zone), "target {target} shares zone {} with a member", tn.zone.0);
                }
            }
        }
        let r = cur.apply(cmd);
        assert!(matches!(r, Ok(Response::Job(_))), "planned {cmd:?} does not start: {r:?}");
    }
    for (t, (existing, planned)) in per_target {
        assert!(planned == 0 || existing + planned <= limits.max_per_target, "target {t}: {existing} + {planned}");
    }
    cur
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn planned_jobs_are_valid_bounded_and_deterministic(spec in arb_spec()) {
        let s = build(&spec);
        let limits = JobLimits { max_active: spec.limits.0, max_per_target: spec.limits.1 };
        let plan = plan_jobs(&s, limits);
        let after = check_plan(&s, limits, &plan);
        let kinds = |p: &[Command], k: JobKind| p.iter().filter(|c| matches!(c, Command::StartJob { kind, .. } if *kind == k)).count();
        // Captured unless --nocapture: how much the random clusters exercise.
        println!("plan: rebuild {} resync {} active {}", kinds(&plan, JobKind::Rebuild), kinds(&plan, JobKind::Resync),
            s.jobs.values().filter(|j| j.is_active()).count());
        // Deterministic: the same state (also through a snapshot) plans the same jobs.
        prop_assert_eq!(&plan_jobs(&s.clone(), limits), &plan);
        let back: MetaState = serde_json::from_slice(&serde_json::to_vec(&s).expect("snapshot")).expect("restore");
        prop_assert_eq!(&plan_jobs(&back, limits), &plan);
        // Every planned job started on the state it was planned on (check_plan
        // applied them in order), and no target took more than it has room for.
        for cmd in &plan {
            if let Command::StartJob { kind: JobKind::Rebuild, target, .. } = cmd {
                let n = &after.nodes[target];
                let most = n.provisionable(&after.settings);
                prop_assert!(n.allocated <= most, "target {} over-reserved: {} > {}", target, n.allocated, most);
            }
        }
        // Unbounded, every chunk with an ejected member on an up node (and a
        // source, and no job yet) gets its resync.
        let all = plan_jobs(&s, JobLimits { max_active: usize::MAX, max_per_target: usize::MAX });
        check_plan(&s, JobLimits { max_active: usize::MAX, max_per_target: usize::MAX }, &all);
        for v in s.volumes.values() {
            for (i, c) in v.chunks.iter().enumerate() {
                let chunk = ChunkIdx(i as u32);
                let wants = c.in_sync().any(|n| !s.nodes[&n].disk.is_failed())
                    && s.active_job(v.id, chunk).is_none()
                    && c.replicas.iter().any(|r| r.role == Role::Ejected && s.nodes[&r.node].accepts_replicas());
                let got = all.iter().any(|cmd| matches!(cmd,
                    Command::StartJob { volume, chunk: ch, kind: JobKind::Resync, .. } if *volume == v.id && *ch == chunk));
                prop_assert_eq!(wants, got, "resync of chunk {} of {}", i, v.name);
            }
        }
    }
}

/// Scheduler rounds until nothing is left to do: every planned job starts and
/// then finishes ok. Returns the targets of all jobs.
fn run_to_completion(s: &mut MetaState, limits: JobLimits) -> Vec<(JobKind, NodeId)> {
    let mut targets = Vec::new();
    for _round in 0..200 {
        let plan = plan_jobs(s, limits);
        if plan.is_empty() {
            assert!(s.jobs.values().all(|j| !j.is_active()));
            return targets;
        }
        check_plan(s, limits, &plan);
        let mut started = Vec::new();
        for cmd in &plan {
            let Command::StartJob { kind, target, .. } = cmd else { unreachable!("plan_jobs returns StartJob") };
            targets.push((*kind, *target));
            match s.apply(cmd) {
                Ok(Response::Job(j)) => started.push(j),
                other => panic!("{cmd:?}: {other:?}"),
            }
        }
        for j in started {
            s.apply(&Command::FinishJob { job: j, ok: true, error: None, blocks_copied: 1 }).expect("finish");
        }
    }
    panic!("not done after 200 rounds");
}

fn distribution(targets: &[(JobKind, NodeId)]) -> BTreeMap<u64, usize> {
    let mut d = BTreeMap::new();
    for (_, t) in targets {
        *d.entry(t.0).or_default() += 1;
    }
    d
}

/// Every chunk of `v` has `replicas` in-sync members in as many distinct zones, none on `gone`.
fn assert_whole(s: &MetaState, v: VolumeId, gone: NodeId) {
    let v = &s.volumes[&v];
    for (i, c) in v.chunks.iter().enumerate() {
        assert_eq!(role_of(c, gone), None, "chunk {i} still on {gone}");
        assert_eq!(c.in_sync().count(), v.replicas, "chunk {i}: {c:?}");
        assert_eq!(c.replicas.len(), v.replicas, "chunk {i}: {c:?}");
        let zones: BTreeSet<Zone> = c.in_sync().map(|n| zone_of(s, n)).collect();
        assert_eq!(zones.len(), v.replicas, "chunk {i}: zones {zones:?}");
    }
}

#[test]
fn a_down_node_is_rebuilt_within_its_zone_from_many_sources() {
    let mut s = MetaState::new(9);
    for i in 1..=6u64 {
        register(&mut s, i, ["a", "b", "c"][(i as usize - 1) % 3], 1 << 40);
    }
    let vid = create(&mut s, "db", 64, 3, 2, &[]);
    let x = NodeId(1);
    let on_x: Vec<usize> = (0..64).filter(|&i| role_of(&s.volumes[&vid].chunks[i], x).is_some()).collect();
    assert!(on_x.len() > 10, "node 1 holds {} chunks", on_x.len());
    // The sources of the copies: the surviving members of X's chunks.
    let sources: BTreeSet<NodeId> = on_x
        .iter()
        .flat_map(|&i| s.volumes[&vid].chunks[i].in_sync().filter(|&n| n != x).collect::<Vec<_>>())
        .collect();
    s.apply(&Command::SetNodeState { id: x, state: NodeState::Down }).expect("down");
    let targets = run_to_completion(&mut s, JobLimits::default());
    println!("rebuild targets (node -> chunks): {:?}; sources {:?}", distribution(&targets), sources);
    assert_eq!(targets.len(), on_x.len(), "one rebuild per chunk X held");
    assert!(targets.iter().all(|(k, _)| *k == JobKind::Rebuild));
    // Three zones of two nodes: the zone rule leaves X's zone mate as the only
    // home for the new replica, while the copies read from four nodes.
    assert!(targets.iter().all(|(_, t)| *t == NodeId(4)), "all into zone a");
    assert_eq!(sources.len(), 4, "copies read from both nodes of each other zone");
    assert_whole(&s, vid, x);
    assert_eq!(s.nodes[&x].allocated, 0);
    s.apply(&Command::RemoveNode { id: x }).expect("X holds nothing and can be removed");
}

#[test]
fn a_draining_node_is_rebuilt_declustered_over_its_zone() {
    let mut s = MetaState::new(9);
    for i in 1..=12u64 {
        register(&mut s, i, ["a", "b", "c"][(i as usize - 1) % 3], 1 << 40);
    }
    let vid = create(&mut s, "db", 64, 3, 2, &[]);
    let x = NodeId(1);
    let held = s.volumes[&vid].chunks.iter().filter(|c| role_of(c, x).is_some()).count();
    s.apply(&Command::SetNodeState { id: x, state: NodeState::Draining }).expect("drain");
    let limits = JobLimits { max_active: 8, max_per_target: 2 };
    let targets = run_to_completion(&mut s, limits);
    let dist = distribution(&targets);
    println!("drain targets (node -> chunks): {dist:?}");
    assert_eq!(targets.len(), held);
    assert!(dist.len() >= 2, "targets spread over several nodes: {dist:?}");
    assert!(dist.keys().all(|&n| zone_of(&s, NodeId(n)) == Zone("a".into())), "targets in X's zone");
    assert_whole(&s, vid, x);
    assert_eq!(s.nodes[&x].allocated, 0);
    s.apply(&Command::RemoveNode { id: x }).expect("drained node removed");
}

#[test]
fn ejected_replicas_on_an_up_node_are_resynced_in_place() {
    let mut s = MetaState::new(9);
    for i in 1..=6u64 {
        register(&mut s, i, ["a", "b", "c"][(i as usize - 1) % 3], 1 << 40);
    }
    let vid = create(&mut s, "db", 64, 3, 2, &[]);
    let y = NodeId(2);
    let y_alloc = s.nodes[&y].allocated;
    let held: Vec<usize> = (0..64).filter(|&i| role_of(&s.volumes[&vid].chunks[i], y).is_some()).collect();
    let ejected: BTreeSet<u32> = held.iter().step_by(2).map(|&i| i as u32).collect();
    assert!(ejected.len() > 4);
    for &i in &ejected {
        let version = s.volumes[&vid].chunks[i as usize].version;
        s.apply(&Command::Eject { volume: vid, chunk: ChunkIdx(i), version, node: y }).expect("eject");
    }
    // Y stays up: one resync per ejected chunk, onto Y, replacing nobody.
    let plan = plan_jobs(&s, JobLimits { max_active: 1000, max_per_target: 1000 });
    let mut planned = BTreeSet::new();
    for cmd in &plan {
        let Command::StartJob { chunk, kind, target, replaces, .. } = cmd else { panic!("{cmd:?}") };
        assert_eq!((*kind, *target, *replaces), (JobKind::Resync, y, None));
        planned.insert(chunk.0);
    }
    assert_eq!(plan.len(), ejected.len());
    assert_eq!(planned, ejected);
    // With the default limits they run a few at a time on Y, and all finish.
    let targets = run_to_completion(&mut s, JobLimits::default());
    assert_eq!(targets.len(), ejected.len());
    assert_eq!(s.nodes[&y].allocated, y_alloc, "a resync reserves nothing new");
    assert_whole(&s, vid, NodeId(99));
}

#[test]
fn a_suspect_node_waits_and_a_chunk_without_a_source_is_left_alone() {
    let mut s = MetaState::new(9);
    for i in 1..=6u64 {
        register(&mut s, i, ["a", "b", "c"][(i as usize - 1) % 3], 1 << 40);
    }
    let vid = create(&mut s, "db", 8, 3, 1, &[]);
    let c0 = s.volumes[&vid].chunks[0].clone();
    let y = c0.replicas[0].node;
    s.apply(&Command::Eject { volume: vid, chunk: ChunkIdx(0), version: 1, node: y }).expect("eject");
    s.apply(&Command::SetNodeState { id: y, state: NodeState::Suspect }).expect("suspect");
    assert!(plan_jobs(&s, JobLimits::default()).is_empty(), "a suspect node's ejected replica waits for it");
    s.apply(&Command::SetNodeState { id: y, state: NodeState::Cordoned }).expect("cordon");
    let plan = plan_jobs(&s, JobLimits::default());
    assert!(
        matches!(plan.as_slice(), [Command::StartJob { kind: JobKind::Rebuild, replaces: Some(r), .. }] if *r == y),
        "an ejected replica on a cordoned node is rebuilt elsewhere: {plan:?}"
    );
    // No in-sync source (a state only a disaster leaves): nothing to copy from.
    s.apply(&Command::SetNodeState { id: y, state: NodeState::Up }).expect("up");
    for r in &mut s.volumes.get_mut(&vid).expect("volume").chunks[0].replicas {
        r.role = Role::Ejected;
    }
    assert!(plan_jobs(&s, JobLimits::default()).is_empty());
}

/// Six nodes, zones a, b, c (nodes 1 and 4 in a) and four volumes: replicas 3 /
/// min 2, 2 / 2, 1 / 1, and 2 / 1 restricted to zones b and c.
fn what_if_cluster() -> (MetaState, [VolumeId; 4]) {
    let mut s = MetaState::new(21);
    for i in 1..=6u64 {
        register(&mut s, i, ["a", "b", "c"][(i as usize - 1) % 3], 1 << 40);
    }
    let ids = [
        create(&mut s, "r3", 24, 3, 2, &[]),
        create(&mut s, "r2", 24, 2, 2, &[]),
        create(&mut s, "r1", 24, 1, 1, &[]),
        create(&mut s, "bc", 24, 2, 1, &["b", "c"]),
    ];
    (s, ids)
}

fn count(s: &MetaState, v: VolumeId, pred: impl Fn(&ChunkEntry) -> bool) -> u32 {
    s.volumes[&v].chunks.iter().filter(|c| pred(c)).count() as u32
}

fn impact(s: &MetaState, v: VolumeId, degraded: u32, unwritable: u32, unavailable: u32) -> Impact {
    Impact { volume: v, name: s.volumes[&v].name.clone(), degraded, unwritable, unavailable }
}

#[test]
fn what_if_a_node_fails() {
    let (s, [r3, r2, r1, bc]) = what_if_cluster();
    let n = NodeId(1);
    let on = |c: &ChunkEntry| c.in_sync().any(|m| m == n);
    let (h3, h2, h1) = (count(&s, r3, on), count(&s, r2, on), count(&s, r1, on));
    assert!(h3 > 0 && h2 > 0 && h1 > 0, "node 1 holds chunks of every unrestricted volume");
    let (impacts, unaffected) = what_if(&s, &Failure::Node(n));
    assert_eq!(impacts, vec![impact(&s, r3, h3, 0, 0), impact(&s, r2, 0, h2, 0), impact(&s, r1, 0, 0, h1)]);
    assert_eq!(unaffected, 1, "bc has nothing in zone a");
    assert_eq!(count(&s, bc, on), 0);
}

#[test]
fn what_if_a_zone_fails() {
    let (mut s, [r3, r2, r1, _bc]) = what_if_cluster();
    let a = Zone("a".into());
    let in_a = |s: &MetaState, c: &ChunkEntry| c.in_sync().any(|m| s.nodes[&m].zone == a);
    let (h2, h1) = (count(&s, r2, |c| in_a(&s, c)), count(&s, r1, |c| in_a(&s, c)));
    assert!(h2 > 0 && h2 < 24 && h1 > 0 && h1 < 24);
    // Replicas 3 / min 2: every chunk has one replica in a, and keeps two: degraded, still writable.
    // Replicas 2 / min 2: the chunks with a replica in a can no longer be written.
    // Replicas 1: the chunks in a are unavailable.
    let (impacts, unaffected) = what_if(&s, &Failure::Zone(a.clone()));
    assert_eq!(impacts, vec![impact(&s, r3, 24, 0, 0), impact(&s, r2, 0, h2, 0), impact(&s, r1, 0, 0, h1)]);
    assert_eq!(unaffected, 1);

    // Counted against the in-sync sets: an r3 chunk that already lost its zone b
    // member is left with one in-sync replica, below min 2.
    let c = s.volumes[&r3].chunks[5].clone();
    let in_b = c.in_sync().find(|&m| s.nodes[&m].zone == Zone("b".into())).expect("a member in b");
    s.apply(&Command::Eject { volume: r3, chunk: ChunkIdx(5), version: c.version, node: in_b }).expect("eject");
    let (impacts, _) = what_if(&s, &Failure::Zone(a.clone()));
    assert_eq!(impacts[0], impact(&s, r3, 23, 1, 0));
    // A failure of the ejected node itself changes nothing for that chunk.
    let (impacts, _) = what_if(&s, &Failure::Node(in_b));
    let on_b = count(&s, r3, |c| c.in_sync().any(|m| m == in_b));
    assert_eq!(impacts[0], impact(&s, r3, on_b, 0, 0));
    // A zone with no nodes affects nobody.
    assert_eq!(what_if(&s, &Failure::Zone(Zone("nowhere".into()))), (vec![], 4));
}
