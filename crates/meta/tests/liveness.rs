//! The liveness rule (`replica_live`) and everything that counts by it: a
//! replica on a down or suspect node, on a failed disk, or out of the in-sync
//! set is missing from a chunk's health (what `status`, `volume inspect` and the
//! metrics show), and `what_if` starts from the cluster as it is now.

use std::net::SocketAddr;

use ballast_meta::plan::{what_if, Failure, Impact};
use ballast_meta::state::*;
use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};
use proptest::prelude::*;

const CHUNK: u64 = 4 << 20;

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
}

fn register(s: &mut MetaState, id: u64, zone: &str) {
    let cmd =
        Command::RegisterNode { id: NodeId(id), addr: addr(id), zone: Zone(zone.into()), capacity: 1 << 40, now_ms: 0 };
    s.apply(&cmd).expect("register");
}

fn create(s: &mut MetaState, name: &str, chunks: u64, replicas: usize, min: usize) -> VolumeId {
    let cmd = Command::CreateVolume {
        name: name.into(),
        size: chunks * CHUNK,
        chunk_size: CHUNK,
        replicas,
        min_in_sync: min,
        zones: vec![],
        zone_spread: ZoneSpread::Preferred,
    };
    match s.apply(&cmd) {
        Ok(Response::Volume(id)) => id,
        other => panic!("create {name}: {other:?}"),
    }
}

fn set_state(s: &mut MetaState, id: u64, state: NodeState) {
    s.apply(&Command::SetNodeState { id: NodeId(id), state }).expect("set state");
}

fn fail_disk(s: &mut MetaState, id: u64) {
    let disk = DiskHealth::Failed { reason: "EIO".into() };
    s.apply(&Command::Heartbeat { id: NodeId(id), reported_used: 0, now_ms: 1, disk }).expect("heartbeat");
}

const NODE_STATES: [NodeState; 5] =
    [NodeState::Up, NodeState::Suspect, NodeState::Down, NodeState::Cordoned, NodeState::Draining];

#[test]
fn the_rule_live_means_in_sync_on_an_answering_node_with_a_working_disk() {
    let disks = [DiskHealth::Ok, DiskHealth::Full, DiskHealth::Failed { reason: "EIO".into() }];
    for role in [Role::InSync, Role::Rebuilding, Role::Ejected] {
        for state in NODE_STATES {
            for disk in &disks {
                let want = role == Role::InSync
                    && matches!(state, NodeState::Up | NodeState::Cordoned | NodeState::Draining)
                    && !disk.is_failed();
                assert_eq!(replica_live(role, state, disk), want, "{role:?} on a {state:?} node, disk {disk:?}");
            }
        }
    }
    assert_eq!(ChunkHealth::of(3, 3, 2), ChunkHealth::Full);
    assert_eq!(ChunkHealth::of(2, 3, 2), ChunkHealth::Degraded);
    assert_eq!(ChunkHealth::of(1, 3, 2), ChunkHealth::BelowMinInSync);
    assert_eq!(ChunkHealth::of(0, 3, 2), ChunkHealth::Unavailable);
    assert_eq!(ChunkHealth::of(0, 1, 1), ChunkHealth::Unavailable);
}

/// Four storage nodes in four zones and volumes of three replicas, min-in-sync
/// 2 (the cluster of issue 15, smaller).
fn four_nodes() -> (MetaState, Vec<VolumeId>) {
    let mut s = MetaState::new(15);
    for id in 1..=4 {
        register(&mut s, id, &format!("z{id}"));
    }
    let vols = (0..6).map(|i| create(&mut s, &format!("v{i}"), 16, 3, 2)).collect();
    (s, vols)
}

/// The chunks of `v` holding an in-sync replica on every node of `on` and on
/// none of `off`.
fn chunks_on(s: &MetaState, v: VolumeId, on: &[u64], off: &[u64]) -> u32 {
    let has = |c: &ChunkEntry, n: u64| c.in_sync().any(|m| m == NodeId(n));
    let chunks = &s.volumes[&v].chunks;
    chunks.iter().filter(|c| on.iter().all(|&n| has(c, n)) && !off.iter().any(|&n| has(c, n))).count() as u32
}

#[test]
fn a_down_node_degrades_its_chunks_and_what_if_starts_from_there() {
    let (mut s, vols) = four_nodes();
    let total: usize = vols.iter().map(|v| s.volumes[v].chunks.len()).sum();
    assert_eq!(s.cluster_health(), VolumeHealth { chunks: total, ..VolumeHealth::default() });
    // Node 3 dies and is marked down: its replicas stay in-sync members of their
    // sets (nothing ejected them; a rebuild will replace them), yet they are gone.
    set_state(&mut s, 3, NodeState::Down);
    let on_3: u32 = vols.iter().map(|&v| chunks_on(&s, v, &[3], &[])).sum();
    assert!(on_3 > 0);
    let h = s.cluster_health();
    assert_eq!((h.degraded, h.below_min_in_sync, h.unavailable), (on_3 as usize, 0, 0), "{h:?}");
    for &v in &vols {
        let vol = &s.volumes[&v];
        assert_eq!(s.volume_health(vol).degraded as u32, chunks_on(&s, v, &[3], &[]));
        for c in &vol.chunks {
            let live: Vec<NodeId> = s.live_replicas(c).collect();
            assert!(!live.contains(&NodeId(3)));
            assert_eq!(live.len(), c.in_sync().filter(|n| *n != NodeId(3)).count());
        }
    }
    // "May I take node 1 down now?" No: every chunk on nodes 1 and 3 would be
    // left one live replica, below min-in-sync 2.
    let (impacts, unaffected) = what_if(&s, &Failure::Node(NodeId(1)));
    let want: Vec<Impact> = vols
        .iter()
        .map(|&v| Impact {
            volume: v,
            name: s.volumes[&v].name.clone(),
            degraded: chunks_on(&s, v, &[1], &[3]),
            unwritable: chunks_on(&s, v, &[1, 3], &[]),
            unavailable: 0,
        })
        .filter(|i| i.degraded + i.unwritable > 0)
        .collect();
    assert!(want.iter().map(|i| i.unwritable).sum::<u32>() > 0, "some chunk is on both 1 and 3");
    assert_eq!(impacts, want);
    assert_eq!(unaffected, vols.len() - want.len());
    // Losing node 3 again changes nothing: it is already gone.
    assert_eq!(what_if(&s, &Failure::Node(NodeId(3))), (vec![], vols.len()));
    // Node 3 comes back: whole again.
    set_state(&mut s, 3, NodeState::Up);
    assert_eq!(s.cluster_health().degraded, 0);
}

#[test]
fn suspect_failed_disk_and_ejected_count_as_missing_cordoned_and_draining_do_not() {
    let (mut s, vols) = four_nodes();
    let v = vols[0];
    let degraded = |s: &MetaState| s.volume_health(&s.volumes[&v]).degraded as u32;
    for state in [NodeState::Cordoned, NodeState::Draining] {
        set_state(&mut s, 2, state);
        assert_eq!(degraded(&s), 0, "a {state:?} node still serves its replicas");
    }
    set_state(&mut s, 2, NodeState::Suspect);
    assert_eq!(degraded(&s), chunks_on(&s, v, &[2], &[]), "a suspect node's replicas are missing");
    set_state(&mut s, 2, NodeState::Up);
    fail_disk(&mut s, 4);
    assert_eq!(degraded(&s), chunks_on(&s, v, &[4], &[]), "a failed disk's replicas are missing");
    // An ejected replica on a healthy node is missing too.
    let (mut s, vols) = four_nodes();
    let v = vols[0];
    let c = s.volumes[&v].chunks[0].clone();
    let node = c.in_sync().next().expect("a member");
    s.apply(&Command::Eject { volume: v, chunk: ChunkIdx(0), version: c.version, node }).expect("eject");
    let vol = &s.volumes[&v];
    assert_eq!(s.chunk_health(vol, &vol.chunks[0]), ChunkHealth::Degraded);
    assert_eq!(s.volume_health(vol), VolumeHealth { chunks: vol.chunks.len(), degraded: 1, ..VolumeHealth::default() });
    // Two of three gone: below min-in-sync; all three: unavailable.
    set_state(&mut s, 1, NodeState::Down);
    set_state(&mut s, 2, NodeState::Down);
    set_state(&mut s, 3, NodeState::Down);
    set_state(&mut s, 4, NodeState::Down);
    let h = s.cluster_health();
    assert_eq!((h.degraded, h.below_min_in_sync, h.unavailable), (h.chunks, h.chunks, h.chunks));
}

// ---- properties -----------------------------------------------------------------

/// A cluster in some state: nodes in zones with a state and a disk, volumes,
/// some replicas ejected.
#[derive(Clone, Debug)]
struct Spec {
    nodes: Vec<(u8, NodeState, bool)>,
    volumes: Vec<(u64, usize, usize)>,
    ejects: Vec<(usize, usize, usize)>,
}

fn arb_state() -> impl Strategy<Value = NodeState> {
    prop_oneof![
        5 => Just(NodeState::Up),
        2 => Just(NodeState::Down),
        1 => Just(NodeState::Suspect),
        1 => Just(NodeState::Cordoned),
        1 => Just(NodeState::Draining),
    ]
}

fn arb_spec() -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec((0u8..4, arb_state(), prop::bool::weighted(0.15)), 3..=8),
        prop::collection::vec((1u64..12, 1usize..=3, any::<usize>()), 1..=4),
        prop::collection::vec((any::<usize>(), any::<usize>(), any::<usize>()), 0..10),
    )
        .prop_map(|(nodes, volumes, ejects)| Spec { nodes, volumes, ejects })
}

fn build(spec: &Spec) -> MetaState {
    let mut s = MetaState::new(7);
    for (i, (z, _, _)) in spec.nodes.iter().enumerate() {
        register(&mut s, i as u64 + 1, &format!("z{z}"));
    }
    for (i, &(chunks, replicas, min)) in spec.volumes.iter().enumerate() {
        let cmd = Command::CreateVolume {
            name: format!("v{i}"),
            size: chunks * CHUNK,
            chunk_size: CHUNK,
            replicas,
            min_in_sync: 1 + min % replicas,
            zones: vec![],
            zone_spread: ZoneSpread::Preferred,
        };
        let _ = s.apply(&cmd);
    }
    for &(v, c, m) in &spec.ejects {
        if s.volumes.is_empty() {
            break;
        }
        let vol = s.volumes.values().nth(v % s.volumes.len()).expect("volume");
        let i = c % vol.chunks.len();
        let chunk = &vol.chunks[i];
        let node = chunk.replicas[m % chunk.replicas.len()].node;
        let cmd = Command::Eject { volume: vol.id, chunk: ChunkIdx(i as u32), version: chunk.version, node };
        // Below min-in-sync: refused, and that is fine here.
        let _ = s.apply(&cmd);
    }
    for (i, &(_, state, failed)) in spec.nodes.iter().enumerate() {
        if failed {
            fail_disk(&mut s, i as u64 + 1);
        }
        set_state(&mut s, i as u64 + 1, state);
    }
    s
}

/// What `failure` would do, computed the long way: mark the failed nodes down
/// in a copy of the state and compare each chunk's live replicas.
fn what_if_by_marking_down(s: &MetaState, failure: &Failure) -> (Vec<Impact>, usize) {
    let mut after = s.clone();
    let failed: Vec<NodeId> = s
        .nodes
        .values()
        .filter(|n| match failure {
            Failure::Node(id) => n.id == *id,
            Failure::Zone(z) => &n.zone == z,
        })
        .map(|n| n.id)
        .collect();
    for id in failed {
        after.apply(&Command::SetNodeState { id, state: NodeState::Down }).expect("mark down");
    }
    let (mut out, mut unaffected) = (Vec::new(), 0);
    for (v, va) in s.volumes.values().zip(after.volumes.values()) {
        let mut imp = Impact { volume: v.id, name: v.name.clone(), degraded: 0, unwritable: 0, unavailable: 0 };
        for (c, ca) in v.chunks.iter().zip(&va.chunks) {
            if s.live_replicas(c).count() == after.live_replicas(ca).count() {
                continue;
            }
            match after.chunk_health(va, ca) {
                ChunkHealth::Unavailable => imp.unavailable += 1,
                ChunkHealth::BelowMinInSync => imp.unwritable += 1,
                ChunkHealth::Degraded | ChunkHealth::Full => imp.degraded += 1,
            }
        }
        if imp.degraded + imp.unwritable + imp.unavailable == 0 {
            unaffected += 1;
        } else {
            out.push(imp);
        }
    }
    (out, unaffected)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// what-if of a node or zone is what marking it down would leave, from the
    /// cluster as it is (nodes already down, suspect or on failed disks, and
    /// ejected replicas, all already missing).
    #[test]
    fn what_if_is_what_marking_the_failure_down_leaves(spec in arb_spec(), pick in any::<usize>()) {
        let s = build(&spec);
        let node = NodeId(1 + (pick % spec.nodes.len()) as u64);
        let zone = s.nodes[&node].zone.clone();
        for f in [Failure::Node(node), Failure::Zone(zone)] {
            prop_assert_eq!(what_if(&s, &f), what_if_by_marking_down(&s, &f), "{:?}", f);
        }
        // A node that holds no live replica already can fail without effect.
        let n = &s.nodes[&node];
        if !replica_live(Role::InSync, n.state, &n.disk) {
            prop_assert_eq!(what_if(&s, &Failure::Node(node)).0, vec![]);
        }
    }

    /// The health counts agree with the rule chunk by chunk, nest, and sum.
    #[test]
    fn health_counts_follow_the_rule_and_nest(spec in arb_spec()) {
        let s = build(&spec);
        let mut total = VolumeHealth::default();
        for v in s.volumes.values() {
            let h = s.volume_health(v);
            let live = |c: &ChunkEntry| {
                c.replicas
                    .iter()
                    .filter(|r| s.nodes.get(&r.node).is_some_and(|n| replica_live(r.role, n.state, &n.disk)))
                    .count()
            };
            let count = |f: &dyn Fn(usize) -> bool| v.chunks.iter().filter(|c| f(live(c))).count();
            prop_assert_eq!(h.chunks, v.chunks.len());
            prop_assert_eq!(h.degraded, count(&|l| l < v.replicas));
            prop_assert_eq!(h.below_min_in_sync, count(&|l| l < v.min_in_sync));
            prop_assert_eq!(h.unavailable, count(&|l| l == 0));
            prop_assert!(h.unavailable <= h.below_min_in_sync && h.below_min_in_sync <= h.degraded);
            prop_assert!(h.degraded <= h.chunks);
            total += h;
        }
        prop_assert_eq!(s.cluster_health(), total);
    }
}
