//! The state machine under random command sequences: invariants after every
//! step, per-command postconditions, failed commands change nothing, replay is
//! deterministic, snapshots round-trip.
//!
//! Random commands alone rarely hit a chunk at its current version, so the
//! sequences interleave "driver" steps that read the state first, the way the
//! leader and the front ends do: the rebuild scheduler (`plan_jobs`, every
//! planned job applied), job completions (ok or failed), layout acks, ejects
//! and job starts aimed at real chunks.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ballast_meta::plan::{plan_jobs, JobLimits};
use ballast_meta::state::*;
use ballast_types::{ChunkIdx, Epoch, NodeId, Seq, VolumeId, Zone};
use proptest::prelude::*;

const CHUNK: u64 = 4 << 20;

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
}

fn arb_node_state() -> impl Strategy<Value = NodeState> {
    prop_oneof![
        Just(NodeState::Up),
        Just(NodeState::Down),
        Just(NodeState::Cordoned),
        Just(NodeState::Draining),
        Just(NodeState::Suspect),
    ]
}

fn arb_disk() -> impl Strategy<Value = DiskHealth> {
    prop_oneof![
        4 => Just(DiskHealth::Ok),
        1 => Just(DiskHealth::Full),
        1 => prop_oneof![Just("EIO"), Just("EROFS")].prop_map(|r| DiskHealth::Failed { reason: r.into() }),
    ]
}

fn arb_kind() -> impl Strategy<Value = JobKind> {
    prop_oneof![Just(JobKind::Rebuild), Just(JobKind::Resync)]
}

/// A command as a client, a node or a confused leader might send it: ids and
/// versions at random, so most of the job commands fail (and must change nothing).
fn arb_command() -> impl Strategy<Value = Command> {
    let node = 1u64..8;
    let vol = 1u64..5;
    prop_oneof![
        3 => (node.clone(), 0u8..4, 1u64..64).prop_map(|(id, z, gib)| Command::RegisterNode {
            id: NodeId(id), addr: addr(id), zone: Zone(format!("z{z}")), capacity: gib << 30, now_ms: 0 }),
        2 => (node.clone(), 0u64..1000, arb_disk()).prop_map(|(id, t, disk)| Command::Heartbeat {
            id: NodeId(id), reported_used: 0, now_ms: t, disk }),
        2 => (node.clone(), arb_node_state()).prop_map(|(id, state)| Command::SetNodeState { id: NodeId(id), state }),
        3 => (0u8..4, 1u64..40, 1usize..=4, 1usize..=4, any::<bool>()).prop_map(|(n, chunks, replicas, min, strict)| Command::CreateVolume {
            name: format!("vol{n}"), size: chunks * CHUNK - 4096 * (chunks % 2), chunk_size: CHUNK, replicas, min_in_sync: min, zones: vec![],
            zone_spread: if strict { ZoneSpread::Required } else { ZoneSpread::Preferred } }),
        1 => (vol.clone(), 1u64..60).prop_map(|(v, chunks)| Command::GrowVolume { volume: VolumeId(v), size: chunks * CHUNK }),
        1 => vol.clone().prop_map(|v| Command::DeleteVolume { volume: VolumeId(v) }),
        2 => (vol.clone(), node.clone()).prop_map(|(v, n)| Command::Attach { volume: VolumeId(v), node: NodeId(n) }),
        1 => (vol.clone(), node.clone()).prop_map(|(v, n)| Command::AttachToFill { volume: VolumeId(v), node: NodeId(n) }),
        2 => (vol.clone(), 0u32..40, 1u64..4, node.clone()).prop_map(|(v, c, version, n)| Command::Eject {
            volume: VolumeId(v), chunk: ChunkIdx(c), version, node: NodeId(n) }),
        1 => (vol.clone(), 0u64..4, 0u64..12).prop_map(|(v, e, gen)| Command::AckLayout {
            volume: VolumeId(v), epoch: Epoch(e), gen }),
        1 => (vol.clone(), 0u64..4).prop_map(|(v, e)| Command::Detach { volume: VolumeId(v), epoch: Epoch(e) }),
        1 => (vol.clone(), 0u32..40, 1u64..6, arb_kind(), node.clone(), prop::option::of(node.clone()))
            .prop_map(|(v, c, version, kind, t, r)| Command::StartJob {
                volume: VolumeId(v), chunk: ChunkIdx(c), version, kind, target: NodeId(t), replaces: r.map(NodeId) }),
        1 => (0u64..20, any::<bool>()).prop_map(|(job, ok)| Command::FinishJob {
            job, ok, error: (!ok).then(|| "random".into()), blocks_copied: 0 }),
        1 => node.clone().prop_map(|id| Command::RemoveNode { id: NodeId(id) }),
        1 => (vol.clone(), node.clone()).prop_map(|(v, n)| Command::Publish { volume: VolumeId(v), node: NodeId(n) }),
        1 => (vol.clone(), prop::option::of(node)).prop_map(|(v, n)| Command::Unpublish { volume: VolumeId(v), node: n.map(NodeId) }),
        2 => (vol.clone(), 0u8..5, 0u64..1000).prop_map(|(v, n, t)| Command::CreateSnapshot {
            volume: VolumeId(v), name: format!("snap-{n}"), now_ms: t }),
        1 => (0u64..8).prop_map(|id| Command::DeleteSnapshot { id }),
        1 => (vol.clone(), 0u64..4, prop::collection::vec(0u64..8, 0..3), 0u64..4, 0u64..100).prop_map(|(v, e, snapshots, ce, c)| {
            Command::CommitSnapshots { volume: VolumeId(v), epoch: Epoch(e), snapshots, cut: Seq::new(Epoch(ce), c) }
        }),
        2 => (0u8..4, 0u64..8, 1u64..40).prop_map(|(n, snapshot, chunks)| Command::CreateClone {
            name: format!("clone{n}"), snapshot, size: chunks * CHUNK, chunk_size: CHUNK, replicas: 2, min_in_sync: 1,
            zones: vec![], zone_spread: ZoneSpread::Preferred }),
        2 => (0u8..4, vol.clone(), 1u64..40, 0u64..1000).prop_map(|(n, v, chunks, t)| Command::CreateVolumeClone {
            name: format!("vclone{n}"), source: VolumeId(v), size: chunks * CHUNK, chunk_size: CHUNK, replicas: 2,
            min_in_sync: 1, zones: vec![], zone_spread: ZoneSpread::Preferred, now_ms: t }),
        2 => (vol, 0u64..4, prop::collection::vec(0u32..40, 0..4)).prop_map(|(v, e, chunks)| Command::FillChunks {
            volume: VolumeId(v), epoch: Epoch(e), chunks }),
    ]
}

/// One step of a run. `Raw` sends a command as generated; the others read the
/// current state to build commands that are plausible (`Plan` and `Finish`
/// must succeed).
#[derive(Clone, Debug)]
enum Step {
    Raw(Command),
    /// The leader's scheduler round: every `StartJob` of `plan_jobs` applied in order.
    Plan {
        max_active: usize,
        max_per_target: usize,
    },
    /// The `pick`-th active job ends, ok or failed.
    Finish {
        pick: usize,
        ok: bool,
    },
    /// The attached front end of the `pick`-th volume writes with its newest layout.
    Ack {
        pick: usize,
    },
    /// The front end ejects a member (in-sync or rebuilding) of a chunk at its current version.
    Eject {
        vol: usize,
        chunk: usize,
        member: usize,
    },
    /// The attached front end of the `pick`-th volume takes its pending
    /// snapshots at a cut `advance` writes past its last one.
    Commit {
        pick: usize,
        advance: u64,
    },
    /// A job start on a real chunk at its current version; kind, target and replaced member at random.
    Start {
        vol: usize,
        chunk: usize,
        kind: JobKind,
        target: u64,
        replaces: Option<usize>,
    },
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => arb_command().prop_map(Step::Raw),
        3 => (1usize..20, 1usize..5).prop_map(|(max_active, max_per_target)| Step::Plan { max_active, max_per_target }),
        3 => (any::<usize>(), prop::bool::weighted(0.7)).prop_map(|(pick, ok)| Step::Finish { pick, ok }),
        1 => any::<usize>().prop_map(|pick| Step::Ack { pick }),
        2 => (any::<usize>(), 1u64..50).prop_map(|(pick, advance)| Step::Commit { pick, advance }),
        2 => (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(vol, chunk, member)| Step::Eject { vol, chunk, member }),
        2 => (any::<usize>(), any::<usize>(), arb_kind(), 1u64..8, prop::option::of(any::<usize>()))
            .prop_map(|(vol, chunk, kind, target, replaces)| Step::Start { vol, chunk, kind, target, replaces }),
    ]
}

fn nth_volume(s: &MetaState, pick: usize) -> Option<&Volume> {
    (!s.volumes.is_empty()).then(|| s.volumes.values().nth(pick % s.volumes.len())).flatten()
}

/// The commands a step sends on state `s`, and whether each of them must succeed.
fn resolve(s: &MetaState, step: &Step) -> (Vec<Command>, bool) {
    match step {
        Step::Raw(cmd) => (vec![cmd.clone()], false),
        Step::Plan { max_active, max_per_target } => {
            let limits = JobLimits { max_active: *max_active, max_per_target: *max_per_target };
            (plan_jobs(s, limits), true)
        }
        Step::Finish { pick, ok } => {
            let active: Vec<u64> = s.jobs.values().filter(|j| j.is_active()).map(|j| j.id).collect();
            let cmds = if active.is_empty() {
                vec![]
            } else {
                vec![Command::FinishJob {
                    job: active[pick % active.len()],
                    ok: *ok,
                    error: (!ok).then(|| "copy failed".into()),
                    blocks_copied: 7,
                }]
            };
            (cmds, true)
        }
        Step::Ack { pick } => {
            let cmds = nth_volume(s, *pick)
                .map(|v| Command::AckLayout { volume: v.id, epoch: v.epoch, gen: v.layout_gen })
                .into_iter()
                .collect();
            (cmds, true)
        }
        Step::Commit { pick, advance } => {
            let cmd = nth_volume(s, *pick).filter(|v| v.attached_to.is_some()).map(|v| {
                let last = s.snapshot_cuts(v.id).last().copied().filter(|c| c.epoch == v.epoch);
                let pending = s.volume_snapshots(v.id).filter(|x| x.cut.is_none()).map(|x| x.id).collect();
                let cut = Seq::new(v.epoch, last.map_or(0, |c| c.counter) + advance);
                Command::CommitSnapshots { volume: v.id, epoch: v.epoch, snapshots: pending, cut }
            });
            (cmd.into_iter().collect(), true)
        }
        Step::Eject { vol, chunk, member } => {
            let cmd = nth_volume(s, *vol).and_then(|v| {
                let i = chunk % v.chunks.len();
                let c = &v.chunks[i];
                let members: Vec<NodeId> =
                    c.replicas.iter().filter(|r| r.role != Role::Ejected).map(|r| r.node).collect();
                (!members.is_empty()).then(|| Command::Eject {
                    volume: v.id,
                    chunk: ChunkIdx(i as u32),
                    version: c.version,
                    node: members[member % members.len()],
                })
            });
            (cmd.into_iter().collect(), false)
        }
        Step::Start { vol, chunk, kind, target, replaces } => {
            let cmd = nth_volume(s, *vol).map(|v| {
                let i = chunk % v.chunks.len();
                let c = &v.chunks[i];
                Command::StartJob {
                    volume: v.id,
                    chunk: ChunkIdx(i as u32),
                    version: c.version,
                    kind: *kind,
                    target: NodeId(*target),
                    replaces: replaces.map(|r| c.replicas[r % c.replicas.len()].node),
                }
            });
            (cmd.into_iter().collect(), false)
        }
    }
}

fn role_of(c: &ChunkEntry, node: NodeId) -> Option<Role> {
    c.replicas.iter().find(|r| r.node == node).map(|r| r.role)
}

/// Invariants of any reachable state (`MetaState::check_invariants`, which
/// the simulators check too).
fn check_invariants(s: &MetaState) {
    if let Err(e) = s.check_invariants() {
        panic!("{e}");
    }
}

/// What one applied command may and must have changed.
fn check_step(before: &MetaState, after: &MetaState, cmd: &Command, res: &Result<Response, MetaError>) {
    let Ok(resp) = res else {
        assert_eq!(after, before, "failed {cmd:?} changed the state");
        return;
    };
    for (id, v) in &after.volumes {
        let Some(b) = before.volumes.get(id) else { continue };
        assert!(v.epoch >= b.epoch, "{}: epoch went back", v.name);
        assert!(v.layout_gen >= b.layout_gen, "{}: layout_gen went back", v.name);
        let mut changed = v.chunks.len() != b.chunks.len();
        for (i, (c, cb)) in v.chunks.iter().zip(&b.chunks).enumerate() {
            assert!(c.version >= cb.version, "{} chunk {i}: version went back", v.name);
            if c.replicas != cb.replicas {
                assert!(c.version > cb.version, "{} chunk {i}: set changed at the same version", v.name);
            }
            changed |= c.version != cb.version;
        }
        if changed {
            assert!(v.layout_gen > b.layout_gen, "{}: layout changed without a new layout_gen ({cmd:?})", v.name);
        }
    }
    // A snapshot's cut, once set, never changes; it goes only with the snapshot.
    for (id, b) in &before.snapshots {
        match after.snapshots.get(id) {
            Some(a) => {
                assert!(b.cut.is_none() || a.cut == b.cut, "snapshot {} changed its cut ({cmd:?})", b.name);
                assert_eq!((&a.name, a.volume), (&b.name, b.volume));
            }
            // One made for a clone goes when that clone is filled or deleted.
            None => assert!(
                match cmd {
                    Command::DeleteSnapshot { id: d } => d == id,
                    Command::FillChunks { volume, .. } | Command::DeleteVolume { volume } => {
                        b.for_clone == Some(*volume)
                    }
                    _ => false,
                },
                "snapshot {} lost ({cmd:?})",
                b.name
            ),
        }
    }
    // A change to a volume's snapshots is a new layout generation: the front
    // end, polling any member, tells a deleted snapshot from a lagging member's
    // view by it.
    for (id, v) in &after.volumes {
        let Some(b) = before.volumes.get(id) else { continue };
        let snaps = |s: &MetaState| s.volume_snapshots(*id).map(|x| (x.id, x.cut)).collect::<Vec<_>>();
        if snaps(before) != snaps(after) {
            assert!(v.layout_gen > b.layout_gen, "{}: snapshots changed without a new layout_gen ({cmd:?})", v.name);
        }
    }
    match (cmd, resp) {
        (Command::Publish { volume, node }, _) => {
            let prev = before.volumes[volume].published_to;
            assert!(prev.is_none() || prev == Some(*node), "published over another node's publication");
            assert_eq!(after.volumes[volume].published_to, Some(*node));
        }
        (Command::Attach { volume, node }, Response::Epoch(e)) => {
            let published = before.volumes[volume].published_to;
            assert!(
                published.is_none() || published == Some(*node),
                "attached by a node the volume is not published to"
            );
            assert_eq!(e.0, before.volumes[volume].epoch.0 + 1);
            assert_eq!(after.volumes[volume].acked_gen, after.volumes[volume].layout_gen);
            assert!(!after.volumes[volume].attached_to_fill, "an attach is an ordinary one");
        }
        (Command::AttachToFill { volume, node }, Response::Epoch(e)) => {
            let b = &before.volumes[volume];
            assert!(b.published_to.is_none(), "a filler attached a published volume");
            assert!(b.attached_to.is_none() || b.attached_to_fill, "a filler took over an ordinary attach");
            assert!(!b.unfilled.is_empty(), "a filler attached a volume with nothing to fill");
            assert_eq!(e.0, b.epoch.0 + 1);
            let a = &after.volumes[volume];
            assert_eq!((a.attached_to, a.attached_to_fill), (Some(*node), true));
        }
        (Command::StartJob { volume, chunk, version, kind, target, replaces }, Response::Job(id)) => {
            let j = &after.jobs[id];
            assert!(j.is_active() && !before.jobs.contains_key(id));
            assert_eq!((j.volume, j.chunk, j.kind, j.target, j.replaces), (*volume, *chunk, *kind, *target, *replaces));
            let v = &after.volumes[volume];
            assert_eq!(j.gen, v.layout_gen, "a job's gen is the layout that made its target a write target");
            assert_eq!(v.chunks[chunk.0 as usize].version, version + 1);
            assert_eq!(after.nodes[target].state, NodeState::Up, "job on a target that is not up");
            assert!(after.nodes[target].accepts_replicas(), "job on a target whose disk is not ok");
        }
        (Command::FinishJob { job, ok, error, blocks_copied }, Response::Done) => {
            let j = &before.jobs[job];
            assert!(j.is_active(), "finished an inactive job");
            if let Some(done) = after.jobs.get(job) {
                let state = if *ok { JobState::Done } else { JobState::Failed };
                assert_eq!((done.state, &done.error, done.blocks_copied), (state, error, *blocks_copied));
            }
            if let Some(v) = after.volumes.get(&j.volume) {
                let c = &v.chunks[j.chunk.0 as usize];
                match (ok, j.kind) {
                    (true, _) => {
                        assert_eq!(role_of(c, j.target), Some(Role::InSync), "done target not in sync");
                        if let Some(old) = j.replaces.filter(|&o| o != j.target) {
                            assert_eq!(role_of(c, old), None, "replaced member {old} still in the set");
                        }
                    }
                    (false, JobKind::Rebuild) => assert_eq!(role_of(c, j.target), None, "failed rebuild kept target"),
                    (false, JobKind::Resync) => {
                        assert_eq!(role_of(c, j.target), Some(Role::Ejected), "failed resync target not ejected")
                    }
                }
            }
        }
        (Command::Eject { volume, chunk, node, .. }, Response::Chunk(c)) => {
            assert_eq!(c, &after.volumes[volume].chunks[chunk.0 as usize], "eject answers the current set");
            let was = role_of(&before.volumes[volume].chunks[chunk.0 as usize], *node);
            if c.version != before.volumes[volume].chunks[chunk.0 as usize].version {
                // Ejected: it leaves the set; a rebuilding target fails its job.
                assert_ne!(role_of(c, *node), Some(Role::InSync));
                assert_ne!(role_of(c, *node), Some(Role::Rebuilding));
                if was == Some(Role::Rebuilding) {
                    assert!(after.active_job(*volume, *chunk).is_none(), "ejected target's job still active");
                }
            }
        }
        (Command::DeleteVolume { volume }, Response::Reclaim(_)) => {
            assert_eq!(before.volumes[volume].published_to, None, "deleted a published volume");
            assert!(!after.jobs.values().any(|j| j.is_active() && j.volume == *volume));
        }
        (Command::RemoveNode { id }, Response::Done) => assert!(!after.nodes.contains_key(id)),
        (Command::Heartbeat { id, disk, .. }, Response::Done) => {
            let n = &after.nodes[id];
            assert_eq!(&n.disk, disk, "the heartbeat's disk health is recorded");
            let b = &before.nodes[id];
            let state = if b.state == NodeState::Suspect { NodeState::Up } else { b.state };
            assert_eq!(n.state, state, "a heartbeat only brings a suspect node up");
            if !disk.is_ok() {
                assert!(!after.jobs.values().any(|j| j.is_active() && j.target == *id), "job left on a bad disk");
                // Only its own jobs ended (finished ones may have been trimmed).
                for (jid, j) in before.jobs.iter().filter(|(_, j)| j.is_active() && j.target != *id) {
                    assert_eq!(after.jobs.get(jid), Some(j), "job {jid} of another node");
                }
            } else {
                assert_eq!(after.jobs, before.jobs, "a healthy heartbeat touches no job");
            }
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_and_failures_change_nothing(
        setup in prop::collection::vec((1u64..8, 0u8..4), 3..8),
        steps in prop::collection::vec(arb_step(), 1..120),
    ) {
        // A few nodes first, so most runs have volumes to work on.
        let mut s = MetaState::new(11);
        let mut log: Vec<Command> = Vec::new();
        let setup = setup.into_iter().map(|(id, z)| Step::Raw(Command::RegisterNode {
            id: NodeId(id), addr: addr(id), zone: Zone(format!("z{z}")), capacity: 1 << 40, now_ms: 0 }));
        let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
        for step in setup.chain(steps) {
            let (cmds, must_succeed) = resolve(&s, &step);
            for cmd in cmds {
                let before = s.clone();
                let res = s.apply(&cmd);
                if must_succeed {
                    prop_assert!(res.is_ok(), "{:?} from {:?} failed: {:?}", cmd, step, res);
                }
                let what = match (&cmd, &res) {
                    (Command::StartJob { kind: JobKind::Rebuild, .. }, Ok(_)) => "rebuild started",
                    (Command::StartJob { kind: JobKind::Resync, .. }, Ok(_)) => "resync started",
                    (Command::StartJob { .. }, Err(_)) => "start refused",
                    (Command::FinishJob { ok: true, .. }, Ok(_)) => "job done",
                    (Command::FinishJob { ok: false, .. }, Ok(_)) => "job failed",
                    (Command::Heartbeat { disk: DiskHealth::Failed { .. }, .. }, Ok(_)) => "disk failed",
                    (Command::Heartbeat { disk: DiskHealth::Full, .. }, Ok(_)) => "disk full",
                    (Command::CreateSnapshot { .. }, Ok(Response::Snapshot(x))) if x.cut.is_none() => "snapshot pending",
                    (Command::CreateSnapshot { .. }, Ok(_)) => "snapshot ready at once",
                    (Command::CommitSnapshots { .. }, Ok(_)) => "snapshot cut committed",
                    (Command::CommitSnapshots { .. }, Err(_)) => "snapshot commit refused",
                    (Command::DeleteSnapshot { .. }, Ok(_)) => "snapshot deleted",
                    (_, Ok(_)) => "other ok",
                    (_, Err(_)) => "other refused",
                };
                *outcomes.entry(what).or_default() += 1;
                check_step(&before, &s, &cmd, &res);
                check_invariants(&s);
                log.push(cmd);
            }
        }
        // Captured unless --nocapture: how much of the job machinery the run reached.
        println!("{outcomes:?}");
        // Determinism: replaying the log gives the same state; snapshots round-trip
        // and plan the same jobs.
        let mut replay = MetaState::new(11);
        for cmd in &log {
            let _ = replay.apply(cmd);
        }
        prop_assert_eq!(&replay, &s);
        let snap = serde_json::to_vec(&s).expect("snapshot");
        let back: MetaState = serde_json::from_slice(&snap).expect("restore");
        prop_assert_eq!(plan_jobs(&back, JobLimits::default()), plan_jobs(&s, JobLimits::default()));
        prop_assert_eq!(back, s);
    }
}

fn three_zones() -> MetaState {
    let mut s = MetaState::new(3);
    for i in 1..=6u64 {
        let zone = Zone(format!("zone-{}", ["a", "b", "c"][(i as usize - 1) % 3]));
        s.apply(&Command::RegisterNode { id: NodeId(i), addr: addr(i), zone, capacity: 1 << 40, now_ms: 0 })
            .expect("register");
    }
    s
}

fn create(name: &str, size: u64, replicas: usize, min: usize) -> Command {
    Command::CreateVolume {
        name: name.into(),
        size,
        chunk_size: CHUNK,
        replicas,
        min_in_sync: min,
        zones: vec![],
        zone_spread: ZoneSpread::Preferred,
    }
}

#[test]
fn create_is_idempotent_and_names_are_unique() {
    let mut s = three_zones();
    let a = s.apply(&create("db-0", 64 << 20, 3, 2)).expect("create");
    assert_eq!(s.apply(&create("db-0", 64 << 20, 3, 2)).expect("retry"), a);
    assert_eq!(s.apply(&create("db-0", 128 << 20, 3, 2)), Err(MetaError::NameTaken("db-0".into())));
    let v = s.volume_by_name("db-0").expect("volume");
    for c in &v.chunks {
        let zones: std::collections::HashSet<_> = c.in_sync().map(|n| s.nodes[&n].zone.clone()).collect();
        assert_eq!(zones.len(), 3, "replicas of a chunk in distinct zones");
    }
}

#[test]
fn invalid_parameters_name_the_parameter() {
    let mut s = three_zones();
    let param = |r: Result<Response, MetaError>| match r {
        Err(MetaError::InvalidArgument { param, .. }) => param,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    assert_eq!(param(s.apply(&create("x", 64 << 20, 6, 1))), "replicas");
    assert_eq!(param(s.apply(&create("x", 64 << 20, 3, 4))), "min_in_sync");
    assert_eq!(param(s.apply(&create("x", 1000, 3, 2))), "size");
    assert_eq!(param(s.apply(&create("bad name", 64 << 20, 3, 2))), "name");
    let odd = Command::CreateVolume {
        name: "x".into(),
        size: 64 << 20,
        chunk_size: 5000,
        replicas: 1,
        min_in_sync: 1,
        zones: vec![],
        zone_spread: ZoneSpread::Preferred,
    };
    assert_eq!(param(s.apply(&odd)), "chunk_size");
    // Not enough zones/nodes: a placement error, nothing created.
    let mut small = MetaState::new(1);
    small
        .apply(&Command::RegisterNode {
            id: NodeId(1),
            addr: addr(1),
            zone: Zone("a".into()),
            capacity: 1 << 40,
            now_ms: 0,
        })
        .expect("register");
    assert!(matches!(small.apply(&create("y", 64 << 20, 3, 2)), Err(MetaError::Placement(_))));
    assert!(small.volumes.is_empty());
}

#[test]
fn attach_bumps_the_epoch_and_eject_respects_min_in_sync() {
    let mut s = three_zones();
    let Response::Volume(id) = s.apply(&create("v", CHUNK, 3, 2)).expect("create") else { panic!() };
    assert_eq!(s.apply(&Command::Attach { volume: id, node: NodeId(1) }), Ok(Response::Epoch(Epoch(1))));
    assert_eq!(s.apply(&Command::Attach { volume: id, node: NodeId(2) }), Ok(Response::Epoch(Epoch(2))));
    let set: Vec<NodeId> = s.volumes[&id].chunks[0].in_sync().collect();
    let eject = |node, version| Command::Eject { volume: id, chunk: ChunkIdx(0), version, node };
    let Ok(Response::Chunk(c)) = s.apply(&eject(set[0], 1)) else { panic!("eject") };
    assert_eq!((c.version, c.in_sync().count()), (2, 2));
    // A stale version returns the current set unchanged.
    assert_eq!(s.apply(&eject(set[1], 1)), Ok(Response::Chunk(c.clone())));
    assert!(matches!(s.apply(&eject(set[1], 2)), Err(MetaError::BelowMinInSync { remaining: 1, min: 2, .. })));
    let Ok(Response::Reclaim(r)) = s.apply(&Command::DeleteVolume { volume: id }) else { panic!("delete") };
    assert_eq!(r.len(), 3, "every replica node reclaims");
    assert!(s.nodes.values().all(|n| n.allocated == 0));
}

/// Found under a real Kubernetes: a node that came back after its pod had moved
/// re-attached the volume from its stage records and fenced the new node's
/// front end (the pod there got EIO). A published volume is attached by the node
/// it is published to, and by no other.
#[test]
fn a_published_volume_is_attached_only_by_its_node() {
    let mut s = three_zones();
    let Response::Volume(id) = s.apply(&create("v", CHUNK, 3, 2)).expect("create") else { panic!() };
    let (old, new) = (NodeId(1), NodeId(2));
    s.apply(&Command::Publish { volume: id, node: old }).expect("publish");
    s.apply(&Command::Attach { volume: id, node: old }).expect("attach on the node it is published to");
    // The old node is lost: the CO unpublishes it and publishes the new one.
    s.apply(&Command::Unpublish { volume: id, node: Some(old) }).expect("unpublish");
    s.apply(&Command::Publish { volume: id, node: new }).expect("publish elsewhere");
    let Ok(Response::Epoch(e)) = s.apply(&Command::Attach { volume: id, node: new }) else { panic!("attach new") };
    let before = s.clone();
    assert_eq!(
        s.apply(&Command::Attach { volume: id, node: old }),
        Err(MetaError::Published { volume: id, node: new })
    );
    assert_eq!(s, before, "a refused attach changes nothing");
    assert_eq!((s.volumes[&id].epoch, s.volumes[&id].attached_to), (e, Some(new)));
    // Unpublished again, any node may attach (exports outside CSI).
    s.apply(&Command::Unpublish { volume: id, node: None }).expect("unpublish all");
    assert!(matches!(s.apply(&Command::Attach { volume: id, node: old }), Ok(Response::Epoch(_))));
}

fn start(
    volume: VolumeId,
    chunk: u32,
    version: u64,
    kind: JobKind,
    target: NodeId,
    replaces: Option<NodeId>,
) -> Command {
    Command::StartJob { volume, chunk: ChunkIdx(chunk), version, kind, target, replaces }
}

fn finish(job: u64, ok: bool) -> Command {
    Command::FinishJob { job, ok, error: (!ok).then(|| "copy failed".into()), blocks_copied: 0 }
}

/// A node of the test cluster that holds no replica of the chunk, in the zone of `like`.
fn spare_in_zone_of(s: &MetaState, c: &ChunkEntry, like: NodeId) -> NodeId {
    let zone = &s.nodes[&like].zone;
    *s.nodes
        .values()
        .find(|n| &n.zone == zone && role_of(c, n.id).is_none())
        .map(|n| &n.id)
        .expect("a spare node in the zone")
}

#[test]
fn job_lifecycle_rebuild_resync_and_their_failures() {
    let mut s = three_zones();
    let Response::Volume(id) = s.apply(&create("v", 4 * CHUNK, 3, 2)).expect("create") else { panic!() };
    let c0 = s.volumes[&id].chunks[0].clone();
    let old = c0.replicas[0].node;
    let new = spare_in_zone_of(&s, &c0, old);

    // The job's shape is checked: a rebuild replaces one member, a resync none.
    let bad = s.apply(&start(id, 0, 1, JobKind::Rebuild, new, None));
    assert!(matches!(bad, Err(MetaError::InvalidArgument { ref param, .. }) if param == "replaces"), "{bad:?}");
    let bad = s.apply(&start(id, 0, 1, JobKind::Resync, old, Some(old)));
    assert!(matches!(bad, Err(MetaError::InvalidArgument { ref param, .. }) if param == "replaces"), "{bad:?}");
    // Stale version, a target already in the set, a target not up: refused.
    assert!(matches!(s.apply(&start(id, 0, 7, JobKind::Rebuild, new, Some(old))), Err(MetaError::Conflict(_))));
    let member = c0.replicas[1].node;
    assert!(matches!(s.apply(&start(id, 0, 1, JobKind::Rebuild, member, Some(old))), Err(MetaError::Conflict(_))));
    s.apply(&Command::SetNodeState { id: new, state: NodeState::Cordoned }).expect("cordon");
    assert!(matches!(s.apply(&start(id, 0, 1, JobKind::Rebuild, new, Some(old))), Err(MetaError::Conflict(_))));
    s.apply(&Command::SetNodeState { id: new, state: NodeState::Up }).expect("uncordon");

    // Rebuild: the target writes from the job's gen on; the job may copy once the
    // attached front end acked that layout.
    let e = match s.apply(&Command::Attach { volume: id, node: NodeId(1) }) {
        Ok(Response::Epoch(e)) => e,
        other => panic!("attach: {other:?}"),
    };
    let (new_alloc, old_alloc) = (s.nodes[&new].allocated, s.nodes[&old].allocated);
    let Ok(Response::Job(j)) = s.apply(&start(id, 0, 1, JobKind::Rebuild, new, Some(old))) else { panic!("start") };
    assert!(matches!(s.apply(&start(id, 0, 2, JobKind::Rebuild, new, Some(old))), Err(MetaError::Conflict(_))));
    let job = s.jobs[&j].clone();
    assert_eq!((job.gen, s.volumes[&id].layout_gen), (2, 2), "attach acked gen 1, the start made gen 2");
    assert!(!s.job_ready(&job), "front end still writes with gen 1");
    s.apply(&Command::AckLayout { volume: id, epoch: Epoch(e.0 - 1), gen: 2 }).expect("stale ack");
    assert!(!s.job_ready(&job), "an older attachment does not speak for the writes");
    s.apply(&Command::AckLayout { volume: id, epoch: e, gen: 9 }).expect("future ack");
    assert_eq!(s.volumes[&id].acked_gen, 1, "a gen that does not exist yet is not acked");
    s.apply(&Command::AckLayout { volume: id, epoch: e, gen: 2 }).expect("ack");
    assert!(s.job_ready(&job));
    assert_eq!(s.nodes[&new].allocated, new_alloc + CHUNK, "the target reserves the chunk from the start");
    s.apply(&finish(j, true)).expect("finish");
    assert_eq!(s.nodes[&old].allocated, old_alloc - CHUNK, "the replaced member releases it at the end");
    let c = &s.volumes[&id].chunks[0];
    assert_eq!((role_of(c, new), role_of(c, old), c.replicas.len()), (Some(Role::InSync), None, 3));
    assert_eq!(s.jobs[&j].state, JobState::Done);
    assert!(matches!(s.apply(&finish(j, true)), Err(MetaError::Conflict(_))), "finished twice");
    assert_eq!(s.apply(&finish(999, true)), Err(MetaError::UnknownJob(999)));

    // A rebuild whose target the front end ejects fails; the partial replica leaves.
    s.apply(&Command::Detach { volume: id, epoch: Epoch(e.0 - 1) }).expect("stale detach");
    assert_eq!(s.volumes[&id].attached_to, Some(NodeId(1)), "a stale detach keeps the lease");
    s.apply(&Command::Detach { volume: id, epoch: e }).expect("detach");
    assert_eq!(s.volumes[&id].attached_to, None);
    let c1 = s.volumes[&id].chunks[1].clone();
    let (old1, new1) = (c1.replicas[0].node, spare_in_zone_of(&s, &c1, c1.replicas[0].node));
    let new1_alloc = s.nodes[&new1].allocated;
    let Ok(Response::Job(j1)) = s.apply(&start(id, 1, 1, JobKind::Rebuild, new1, Some(old1))) else { panic!() };
    assert!(s.job_ready(&s.jobs[&j1]), "no front end attached: ready at once");
    let Ok(Response::Chunk(after)) =
        s.apply(&Command::Eject { volume: id, chunk: ChunkIdx(1), version: 2, node: new1 })
    else {
        panic!("eject")
    };
    assert_eq!((after.version, role_of(&after, new1), after.replicas.len()), (4, None, 3));
    assert_eq!(s.jobs[&j1].state, JobState::Failed);
    assert_eq!(s.nodes[&new1].allocated, new1_alloc, "the failed target releases its reservation");

    // Resync: an ejected member comes back in place; failed, it stays ejected.
    let c2 = s.volumes[&id].chunks[2].clone();
    let y = c2.replicas[2].node;
    s.apply(&Command::Eject { volume: id, chunk: ChunkIdx(2), version: 1, node: y }).expect("eject");
    let Ok(Response::Job(j2)) = s.apply(&start(id, 2, 2, JobKind::Resync, y, None)) else { panic!() };
    s.apply(&finish(j2, false)).expect("fail");
    assert_eq!(role_of(&s.volumes[&id].chunks[2], y), Some(Role::Ejected));
    let Ok(Response::Job(j3)) = s.apply(&start(id, 2, 4, JobKind::Resync, y, None)) else { panic!() };
    s.apply(&finish(j3, true)).expect("done");
    let c2 = &s.volumes[&id].chunks[2];
    assert_eq!((c2.in_sync().count(), c2.replicas.len(), c2.version), (3, 3, 6));
    check_invariants(&s);

    // A node is forgotten only once it holds nothing.
    assert!(matches!(s.apply(&Command::RemoveNode { id: new }), Err(MetaError::NodeInUse { .. })));
    s.apply(&Command::DeleteVolume { volume: id }).expect("delete");
    s.apply(&Command::RemoveNode { id: new }).expect("remove");
    assert_eq!(s.apply(&Command::RemoveNode { id: new }), Err(MetaError::UnknownNode(new)));
    check_invariants(&s);
}

#[test]
fn finished_jobs_stay_bounded_when_a_delete_fails_active_jobs() {
    let mut s = three_zones();
    let Response::Volume(id) = s.apply(&create("v", 8 * CHUNK, 3, 2)).expect("create") else { panic!() };
    // One chunk resynced over and over: more finished jobs than are kept.
    for _ in 0..FINISHED_JOBS_KEPT + 10 {
        let c = s.volumes[&id].chunks[0].clone();
        let y = c.replicas[0].node;
        s.apply(&Command::Eject { volume: id, chunk: ChunkIdx(0), version: c.version, node: y }).expect("eject");
        let Ok(Response::Job(j)) = s.apply(&start(id, 0, c.version + 1, JobKind::Resync, y, None)) else { panic!() };
        s.apply(&finish(j, true)).expect("finish");
    }
    assert_eq!(s.jobs.len(), FINISHED_JOBS_KEPT);
    // Active jobs on other chunks fail with the volume.
    let mut active = Vec::new();
    for chunk in 1..4u32 {
        let c = s.volumes[&id].chunks[chunk as usize].clone();
        let y = c.replicas[0].node;
        s.apply(&Command::Eject { volume: id, chunk: ChunkIdx(chunk), version: 1, node: y }).expect("eject");
        let Ok(Response::Job(j)) = s.apply(&start(id, chunk, 2, JobKind::Resync, y, None)) else { panic!() };
        active.push(j);
    }
    s.apply(&Command::DeleteVolume { volume: id }).expect("delete");
    assert_eq!(s.jobs.len(), FINISHED_JOBS_KEPT, "finished jobs kept after a delete");
    for j in active {
        assert_eq!((s.jobs[&j].state, s.jobs[&j].error.as_deref()), (JobState::Failed, Some("volume deleted")));
    }
    check_invariants(&s);
}

/// Issue 13, defect a: `Eject` validates everything (the chunk, min-in-sync,
/// and ending a rebuilding target's job) before it changes anything, so a
/// refused eject leaves the state byte for byte as it was, on every member.
///
/// The one error after the first change used to be ending the target's job
/// (the role, the chunk version and `layout_gen` had changed already). Ending
/// a job found active on the chunk fails only when the job table disagrees with
/// itself, as in a corrupt snapshot: here, a job stored under another id than
/// its own (which `check_invariants` names).
#[test]
fn a_refused_eject_changes_nothing() {
    let mut s = three_zones();
    let Response::Volume(id) = s.apply(&create("v", 2 * CHUNK, 3, 2)).expect("create") else { panic!() };
    let c0 = s.volumes[&id].chunks[0].clone();
    let (old, target) = (c0.replicas[0].node, spare_in_zone_of(&s, &c0, c0.replicas[0].node));
    let Ok(Response::Job(j)) = s.apply(&start(id, 0, 1, JobKind::Rebuild, target, Some(old))) else { panic!() };
    let eject = |chunk: u32, version, node| Command::Eject { volume: id, chunk: ChunkIdx(chunk), version, node };

    let unchanged = |s: &mut MetaState, cmd: &Command| {
        let before = s.clone();
        let bytes = serde_json::to_vec(&before).expect("serialize");
        let r = s.apply(cmd);
        assert!(r.is_err(), "{cmd:?} must be refused: {r:?}");
        assert_eq!(*s, before, "{cmd:?} refused with {r:?} changed the state");
        assert_eq!(serde_json::to_vec(s).expect("serialize"), bytes, "{cmd:?}: not byte for byte the same");
        r
    };

    // The ordinary refusals.
    let c1: Vec<NodeId> = s.volumes[&id].chunks[1].in_sync().collect();
    s.apply(&eject(1, 1, c1[0])).expect("first eject of chunk 1");
    let r = unchanged(&mut s, &eject(1, 2, c1[1]));
    assert!(matches!(r, Err(MetaError::BelowMinInSync { remaining: 1, min: 2, .. })), "{r:?}");
    assert_eq!(unchanged(&mut s, &eject(9, 1, c1[1])), Err(MetaError::UnknownChunk { volume: id, chunk: ChunkIdx(9) }));
    let r = unchanged(&mut s, &Command::Eject { volume: VolumeId(77), chunk: ChunkIdx(0), version: 1, node: old });
    assert_eq!(r, Err(MetaError::UnknownVolume(VolumeId(77))));
    check_invariants(&s);

    // Ejecting the rebuild's target ends its job; a job that cannot be ended
    // (stored under another id than its own) refuses the eject before any change.
    let mut corrupt = s.clone();
    let job = corrupt.jobs.remove(&j).expect("the job");
    corrupt.jobs.insert(j + 100, job);
    corrupt.next_job = j + 101;
    let broken = corrupt.check_invariants().expect_err("a job under a foreign id");
    assert_eq!(broken.invariant, ballast_meta::Invariant::JobIds, "{broken}");
    let version = corrupt.volumes[&id].chunks[0].version;
    assert_eq!(unchanged(&mut corrupt, &eject(0, version, target)), Err(MetaError::UnknownJob(j)));

    // The same eject on the sound state succeeds and fails the job.
    let Ok(Response::Chunk(c)) = s.apply(&eject(0, version, target)) else { panic!("eject the target") };
    assert_eq!((c.version, role_of(&c, target), s.jobs[&j].state), (version + 2, None, JobState::Failed));
    check_invariants(&s);
}

/// `check_invariants` names the invariant a state breaks.
#[test]
fn check_invariants_names_the_broken_invariant() {
    use ballast_meta::Invariant;
    let mut s = three_zones();
    let Response::Volume(id) = s.apply(&create("v", 2 * CHUNK, 3, 2)).expect("create") else { panic!() };
    s.check_invariants().expect("a reachable state");
    let broken = |f: &dyn Fn(&mut MetaState)| {
        let mut t = s.clone();
        f(&mut t);
        t.check_invariants().expect_err("broken on purpose").invariant
    };
    assert_eq!(
        broken(&|t| {
            t.volumes.get_mut(&id).unwrap().chunks.pop();
        }),
        Invariant::ChunkCount
    );
    assert_eq!(broken(&|t| t.volumes.get_mut(&id).unwrap().acked_gen = 99), Invariant::AckedGenNotAhead);
    let demote = |t: &mut MetaState| {
        for r in t.volumes.get_mut(&id).unwrap().chunks[0].replicas.iter_mut().take(2) {
            r.role = Role::Ejected;
        }
    };
    assert_eq!(broken(&demote), Invariant::MinInSync);
    assert_eq!(broken(&|t| t.volumes.get_mut(&id).unwrap().chunks[0].replicas.truncate(2)), Invariant::ReplicaCount);
    let twice = |t: &mut MetaState| {
        let c = &mut t.volumes.get_mut(&id).unwrap().chunks[0];
        c.replicas[1].node = c.replicas[0].node;
    };
    assert_eq!(broken(&twice), Invariant::DistinctNodes);
    assert_eq!(
        broken(&|t| t.volumes.get_mut(&id).unwrap().chunks[0].replicas[2].role = Role::Rebuilding),
        Invariant::RebuildingIsJobTarget
    );
    assert_eq!(broken(&|t| t.nodes.get_mut(&NodeId(1)).unwrap().allocated += 1), Invariant::Allocation);
    let forget = |t: &mut MetaState| {
        let n = t.volumes[&id].chunks[0].replicas[0].node;
        t.nodes.remove(&n);
    };
    assert_eq!(broken(&forget), Invariant::ReplicaOnKnownNode);
}

fn snapshot(s: &mut MetaState, volume: VolumeId, name: &str) -> Result<Snapshot, MetaError> {
    match s.apply(&Command::CreateSnapshot { volume, name: name.into(), now_ms: 5 })? {
        Response::Snapshot(snap) => Ok(snap),
        other => panic!("create snapshot answered {other:?}"),
    }
}

#[test]
fn a_detached_volume_is_cut_at_its_epochs_end_at_once() {
    let mut s = three_zones();
    let Ok(Response::Volume(id)) = s.apply(&create("db", 64 << 20, 3, 2)) else { panic!("create") };
    let never = snapshot(&mut s, id, "never-attached").expect("snapshot");
    assert_eq!(never.cut, Some(Seq::new(Epoch(0), u64::MAX)));
    s.apply(&Command::Attach { volume: id, node: NodeId(1) }).expect("attach");
    s.apply(&Command::Detach { volume: id, epoch: Epoch(1) }).expect("detach");
    let after = snapshot(&mut s, id, "after").expect("snapshot");
    assert_eq!(after.cut, Some(Seq::new(Epoch(1), u64::MAX)));
    assert_eq!(after.size, 64 << 20);
    // A retry finds it; the name on another volume is taken; the volume keeps both.
    assert_eq!(snapshot(&mut s, id, "after"), Ok(after.clone()));
    let Ok(Response::Volume(other)) = s.apply(&create("other", 64 << 20, 3, 2)) else { panic!("create") };
    assert_eq!(snapshot(&mut s, other, "after"), Err(MetaError::NameTaken("after".into())));
    assert_eq!(s.snapshot_cuts(id), vec![Seq::new(Epoch(0), u64::MAX), Seq::new(Epoch(1), u64::MAX)]);
    assert_eq!(s.find_snapshot("after").map(|x| x.id), Some(after.id));
    assert_eq!(s.find_snapshot(&after.id.to_string()).map(|x| x.id), Some(after.id));
    s.check_invariants().expect("invariants");
}

#[test]
fn an_attached_volume_waits_for_its_front_end_to_commit_the_cut() {
    let mut s = three_zones();
    let Ok(Response::Volume(id)) = s.apply(&create("db", 64 << 20, 3, 2)) else { panic!("create") };
    s.apply(&Command::Attach { volume: id, node: NodeId(1) }).expect("attach");
    let a = snapshot(&mut s, id, "a").expect("snapshot");
    let b = snapshot(&mut s, id, "b").expect("snapshot");
    assert_eq!((a.cut, b.cut), (None, None), "pending while attached");
    let commit = |epoch, ids: Vec<u64>, counter| Command::CommitSnapshots {
        volume: id,
        epoch: Epoch(epoch),
        snapshots: ids,
        cut: Seq::new(Epoch(epoch), counter),
    };
    // A front end fenced by a newer attach, or a cut of another epoch, commits nothing.
    assert!(matches!(s.apply(&commit(0, vec![a.id], 10)), Err(MetaError::Conflict(_))));
    let wrong_epoch =
        Command::CommitSnapshots { volume: id, epoch: Epoch(1), snapshots: vec![a.id], cut: Seq::new(Epoch(0), 10) };
    assert!(matches!(s.apply(&wrong_epoch), Err(MetaError::InvalidArgument { .. })));
    // One cut serves the requests the front end saw; a later one stays pending.
    s.apply(&commit(1, vec![a.id], 10)).expect("commit");
    assert_eq!(s.snapshots[&a.id].cut, Some(Seq::new(Epoch(1), 10)));
    assert_eq!(s.snapshots[&b.id].cut, None);
    // Cuts only rise.
    assert!(matches!(s.apply(&commit(1, vec![b.id], 10)), Err(MetaError::InvalidArgument { .. })));
    // A new attach fences the front end: what it had not taken is cut at its epoch's end.
    s.apply(&Command::Attach { volume: id, node: NodeId(2) }).expect("attach elsewhere");
    assert_eq!(s.snapshots[&b.id].cut, Some(Seq::new(Epoch(1), u64::MAX)));
    let c = snapshot(&mut s, id, "c").expect("snapshot");
    s.apply(&Command::Detach { volume: id, epoch: Epoch(2) }).expect("detach");
    assert_eq!(s.snapshots[&c.id].cut, Some(Seq::new(Epoch(2), u64::MAX)), "a detach cuts what is pending");
    s.check_invariants().expect("invariants");
}

#[test]
fn a_volume_with_snapshots_is_not_deleted_and_deleting_them_frees_it() {
    let mut s = three_zones();
    let Ok(Response::Volume(id)) = s.apply(&create("db", 64 << 20, 3, 2)) else { panic!("create") };
    let a = snapshot(&mut s, id, "a").expect("snapshot");
    let before = s.clone();
    assert_eq!(s.apply(&Command::DeleteVolume { volume: id }), Err(MetaError::HasSnapshots { volume: id, count: 1 }));
    assert_eq!(s, before, "a refused delete changes nothing");
    s.apply(&Command::DeleteSnapshot { id: a.id }).expect("delete snapshot");
    assert_eq!(s.apply(&Command::DeleteSnapshot { id: a.id }), Err(MetaError::UnknownSnapshot(a.id.to_string())));
    assert!(matches!(s.apply(&Command::DeleteVolume { volume: id }), Ok(Response::Reclaim(_))));
    assert_eq!(
        s.apply(&Command::CreateSnapshot { volume: id, name: "late".into(), now_ms: 0 }),
        Err(MetaError::UnknownVolume(id))
    );
    assert!(matches!(
        s.apply(&Command::CreateSnapshot { volume: VolumeId(99), name: "bad name!".into(), now_ms: 0 }),
        Err(MetaError::InvalidArgument { .. })
    ));
}

fn clone_cmd(name: &str, snapshot: u64, size: u64) -> Command {
    Command::CreateClone {
        name: name.into(),
        snapshot,
        size,
        chunk_size: CHUNK,
        replicas: 3,
        min_in_sync: 2,
        zones: vec![],
        zone_spread: ZoneSpread::Preferred,
    }
}

#[test]
fn a_clone_copies_its_snapshot_then_lets_it_and_its_source_go() {
    let mut s = three_zones();
    let Ok(Response::Volume(src)) = s.apply(&create("src", 3 * CHUNK, 3, 2)) else { panic!("create") };
    let snap = Command::CreateSnapshot { volume: src, name: "base".into(), now_ms: 1 };
    let Ok(Response::Snapshot(base)) = s.apply(&snap) else { panic!("snapshot") };
    assert!(base.is_ready(), "a detached volume's snapshot is ready at once");
    // Refused, changing nothing: smaller than the snapshot; an unknown one.
    let before = s.clone();
    assert!(matches!(s.apply(&clone_cmd("c", base.id, 2 * CHUNK)), Err(MetaError::CloneTooSmall { .. })));
    assert!(matches!(s.apply(&clone_cmd("c", 99, 3 * CHUNK)), Err(MetaError::UnknownSnapshot(_))));
    assert_eq!(s, before);
    // A clone one chunk larger: the snapshot's three chunks to copy.
    let Ok(Response::Volume(c)) = s.apply(&clone_cmd("c", base.id, 4 * CHUNK)) else { panic!("clone") };
    assert_eq!(s.volumes[&c].unfilled, vec![0, 1, 2]);
    assert_eq!(s.volumes[&c].origin.as_ref().map(|o| (o.snapshot, o.source)), Some((base.id, src)));
    assert!(matches!(s.apply(&clone_cmd("c", base.id, 4 * CHUNK)), Ok(Response::Volume(v)) if v == c), "a retry");
    assert!(matches!(s.apply(&create("c", 4 * CHUNK, 3, 2)), Err(MetaError::NameTaken(_))), "not a clone of base");
    s.check_invariants().expect("invariants");
    // While it copies: its snapshot stays, it takes no snapshot of its own.
    assert!(matches!(s.apply(&Command::DeleteSnapshot { id: base.id }), Err(MetaError::SnapshotInUse { .. })));
    let own = Command::CreateSnapshot { volume: c, name: "of-c".into(), now_ms: 2 };
    assert!(matches!(s.apply(&own), Err(MetaError::CloneFilling { remaining: 3, .. })));
    // Only the front end holding the epoch records fills.
    let fill = |e: u64, chunks: Vec<u32>| Command::FillChunks { volume: c, epoch: Epoch(e), chunks };
    assert!(matches!(s.apply(&fill(0, vec![0])), Err(MetaError::Conflict(_))), "detached");
    let Ok(Response::Epoch(e)) = s.apply(&Command::Attach { volume: c, node: NodeId(1) }) else { panic!("attach") };
    assert!(matches!(s.apply(&fill(e.0 + 1, vec![0])), Err(MetaError::Conflict(_))), "another epoch");
    s.apply(&fill(e.0, vec![2, 0])).expect("fill");
    assert_eq!(s.volumes[&c].unfilled, vec![1]);
    let gen = s.volumes[&c].layout_gen;
    s.apply(&fill(e.0, vec![1])).expect("fill the last");
    assert!(s.volumes[&c].unfilled.is_empty());
    assert!(s.volumes[&c].layout_gen > gen, "independence is a new layout generation");
    s.check_invariants().expect("invariants");
    // Independent: the snapshot, then the source, go; the clone stays.
    s.apply(&Command::DeleteSnapshot { id: base.id }).expect("delete the snapshot");
    s.apply(&Command::DeleteVolume { volume: src }).expect("delete the source");
    assert!(s.volumes.contains_key(&c));
    s.apply(&own).expect("an independent clone takes snapshots");
    s.check_invariants().expect("invariants");
}

/// A clone nobody attaches is given to one node to fill: the lowest-id Up
/// node holding an in-sync replica of it. Its filler's attach refuses a
/// volume in use; any ordinary attach takes the lease over from a filler,
/// and another node's filler takes over from one whose node went down.
#[test]
fn a_detached_clone_is_assigned_to_one_filler_which_any_attach_takes_over() {
    let mut s = three_zones();
    let Ok(Response::Volume(src)) = s.apply(&create("src", 2 * CHUNK, 3, 2)) else { panic!("create") };
    let snap = Command::CreateSnapshot { volume: src, name: "base".into(), now_ms: 1 };
    let Ok(Response::Snapshot(base)) = s.apply(&snap) else { panic!("snapshot") };
    let Ok(Response::Volume(c)) = s.apply(&clone_cmd("c", base.id, 2 * CHUNK)) else { panic!("clone") };
    let assigned = |s: &MetaState| -> Vec<u64> {
        s.nodes.keys().filter(|n| s.fill_assignments(**n).contains(&"c".to_string())).map(|n| n.0).collect()
    };
    let holders: std::collections::BTreeSet<u64> =
        s.volumes[&c].chunks.iter().flat_map(|ch| ch.in_sync()).map(|n| n.0).collect();
    let first = *holders.iter().next().expect("holders");
    assert_eq!(assigned(&s), vec![first], "one filler: the lowest holder");
    assert!(s.nodes.keys().all(|n| !s.fill_assignments(*n).contains(&"src".to_string())), "not a clone");
    // The filler attaches; it keeps the assignment (its agent knows it runs).
    let fill = Command::AttachToFill { volume: c, node: NodeId(first) };
    let Ok(Response::Epoch(e1)) = s.apply(&fill) else { panic!("attach to fill") };
    assert!(s.volumes[&c].attached_to_fill);
    assert_eq!(assigned(&s), vec![first]);
    // Its node goes down: the next holder takes over, fencing it.
    s.apply(&Command::SetNodeState { id: NodeId(first), state: NodeState::Down }).expect("down");
    let second = *holders.iter().nth(1).expect("a second holder");
    assert_eq!(assigned(&s), vec![second]);
    let Ok(Response::Epoch(e2)) = s.apply(&Command::AttachToFill { volume: c, node: NodeId(second) }) else {
        panic!("take over")
    };
    assert!(e2 > e1);
    // An ordinary attach takes over from the filler; then no filler may attach.
    let Ok(Response::Epoch(e3)) = s.apply(&Command::Attach { volume: c, node: NodeId(5) }) else { panic!("attach") };
    assert!(e3 > e2 && !s.volumes[&c].attached_to_fill);
    assert!(assigned(&s).is_empty(), "in use: nobody fills it in the background");
    let before = s.clone();
    assert_eq!(
        s.apply(&Command::AttachToFill { volume: c, node: NodeId(second) }),
        Err(MetaError::Attached { volume: c, node: NodeId(5) })
    );
    assert_eq!(s, before, "a refused filler attach changes nothing");
    // Detached again, but published: still nobody's to fill.
    s.apply(&Command::Detach { volume: c, epoch: e3 }).expect("detach");
    assert_eq!(assigned(&s), vec![second]);
    s.apply(&Command::Publish { volume: c, node: NodeId(4) }).expect("publish");
    assert!(assigned(&s).is_empty());
    assert!(matches!(
        s.apply(&Command::AttachToFill { volume: c, node: NodeId(second) }),
        Err(MetaError::Attached { .. })
    ));
    s.apply(&Command::Unpublish { volume: c, node: None }).expect("unpublish");
    // Filled (by whoever): nothing left to assign, and the filler's attach is refused.
    let Ok(Response::Epoch(e4)) = s.apply(&Command::AttachToFill { volume: c, node: NodeId(second) }) else {
        panic!("attach to fill")
    };
    s.apply(&Command::FillChunks { volume: c, epoch: e4, chunks: vec![0, 1] }).expect("fill");
    assert!(assigned(&s).is_empty());
    assert!(matches!(s.apply(&Command::AttachToFill { volume: c, node: NodeId(second) }), Err(MetaError::Conflict(_))));
    s.check_invariants().expect("invariants");
}

fn volume_clone_cmd(name: &str, source: VolumeId, size: u64) -> Command {
    Command::CreateVolumeClone {
        name: name.into(),
        source,
        size,
        chunk_size: CHUNK,
        replicas: 3,
        min_in_sync: 2,
        zones: vec![],
        zone_spread: ZoneSpread::Preferred,
        now_ms: 7,
    }
}

/// Found by `invariants_hold_and_failures_change_nothing`: a clone of the
/// snapshot meta made for another clone lost its source when that clone was
/// deleted. Such a snapshot is its clone's alone: not found for anyone else.
#[test]
fn a_snapshot_made_for_a_clone_is_not_a_source_for_another() {
    let mut s = three_zones();
    let Ok(Response::Volume(src)) = s.apply(&create("src", CHUNK, 3, 2)) else { panic!("create") };
    let Ok(Response::Volume(w)) = s.apply(&volume_clone_cmd("w", src, CHUNK)) else { panic!("clone of a volume") };
    let made = s.snapshots.values().find(|x| x.for_clone == Some(w)).map(|x| x.id).expect("its snapshot");
    let before = s.clone();
    assert_eq!(s.apply(&clone_cmd("other", made, CHUNK)), Err(MetaError::UnknownSnapshot(made.to_string())));
    assert_eq!(s, before, "refused, nothing changed");
    s.apply(&Command::DeleteVolume { volume: w }).expect("delete the clone");
    s.check_invariants().expect("invariants");
}

#[test]
fn a_clone_of_an_attached_volume_waits_for_its_snapshot_and_takes_it_away_when_independent() {
    let mut s = three_zones();
    let Ok(Response::Volume(src)) = s.apply(&create("src", 2 * CHUNK, 3, 2)) else { panic!("create") };
    let Ok(Response::Epoch(se)) = s.apply(&Command::Attach { volume: src, node: NodeId(2) }) else { panic!("attach") };
    // Refused, changing nothing: smaller than the source; an unknown source.
    let before = s.clone();
    assert!(matches!(s.apply(&volume_clone_cmd("c", src, CHUNK)), Err(MetaError::CloneTooSmall { .. })));
    assert!(matches!(s.apply(&volume_clone_cmd("c", VolumeId(99), 2 * CHUNK)), Err(MetaError::UnknownVolume(_))));
    assert_eq!(s, before);

    let Ok(Response::Volume(c)) = s.apply(&volume_clone_cmd("c", src, 2 * CHUNK)) else { panic!("clone") };
    let origin = s.volumes[&c].origin.clone().expect("origin");
    assert!(origin.from_volume && origin.source == src && origin.snapshot_name == "c@source", "{origin:?}");
    let snap = s.snapshots[&origin.snapshot].clone();
    assert_eq!((snap.volume, snap.for_clone, snap.is_ready()), (src, Some(c), false), "pending: src is attached");
    assert_eq!(s.volumes[&c].unfilled, vec![0, 1]);
    assert!(matches!(s.apply(&volume_clone_cmd("c", src, 2 * CHUNK)), Ok(Response::Volume(v)) if v == c), "retry");
    assert!(
        matches!(s.apply(&clone_cmd("c", snap.id, 2 * CHUNK)), Err(MetaError::UnknownSnapshot(_))),
        "its snapshot is not a source for a clone of a snapshot"
    );
    s.check_invariants().expect("invariants");
    // The clone attaches once its source's front end took the snapshot.
    let attach = Command::Attach { volume: c, node: NodeId(1) };
    assert!(matches!(s.apply(&attach), Err(MetaError::CloneSourcePending { .. })));
    assert!(matches!(s.apply(&Command::DeleteVolume { volume: src }), Err(MetaError::HasSnapshots { .. })));
    let cut = Seq::new(se, 40);
    let commit = Command::CommitSnapshots { volume: src, epoch: se, snapshots: vec![snap.id], cut };
    s.apply(&commit).expect("commit");
    let Ok(Response::Epoch(e)) = s.apply(&attach) else { panic!("attach the clone") };
    assert!(matches!(s.apply(&Command::DeleteSnapshot { id: snap.id }), Err(MetaError::SnapshotInUse { .. })));
    // Independent: the snapshot made for it is gone, and the source is free.
    s.apply(&Command::FillChunks { volume: c, epoch: e, chunks: vec![0, 1] }).expect("fill");
    assert!(!s.snapshots.contains_key(&snap.id), "the clone's snapshot goes with its last fill");
    assert!(s.volumes[&c].origin.is_some(), "the origin is still recorded");
    s.check_invariants().expect("invariants");
    let gen = s.volumes[&src].layout_gen;
    s.apply(&Command::Detach { volume: src, epoch: se }).expect("detach");
    s.apply(&Command::DeleteVolume { volume: src }).expect("the source goes");
    assert!(gen > 0);

    // A clone of a detached volume: ready at once; deleting the clone while
    // it fills takes its snapshot too.
    let Ok(Response::Volume(src2)) = s.apply(&create("src2", CHUNK, 3, 2)) else { panic!("create") };
    let Ok(Response::Volume(d)) = s.apply(&volume_clone_cmd("d", src2, 3 * CHUNK)) else { panic!("clone") };
    let o = s.volumes[&d].origin.clone().expect("origin");
    assert!(s.snapshots[&o.snapshot].is_ready(), "a detached source's snapshot is ready at once");
    assert_eq!(s.volumes[&d].unfilled, vec![0], "only the chunks the source had");
    // A clone still filling is neither snapshotted nor cloned.
    assert!(matches!(s.apply(&volume_clone_cmd("e", d, 3 * CHUNK)), Err(MetaError::CloneFilling { .. })));
    s.apply(&Command::DeleteVolume { volume: d }).expect("delete the filling clone");
    assert!(s.snapshots.is_empty(), "its snapshot went with it");
    s.apply(&Command::DeleteVolume { volume: src2 }).expect("and the source is free");
    s.check_invariants().expect("invariants");
}
