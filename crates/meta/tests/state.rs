//! The state machine under random command sequences: invariants after every
//! step, failed commands change nothing, replay is deterministic, snapshots
//! round-trip.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ballast_meta::state::*;
use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};
use proptest::prelude::*;

const CHUNK: u64 = 4 << 20;

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
}

fn arb_command() -> impl Strategy<Value = Command> {
    let node = 1u64..8;
    let vol = 1u64..5;
    prop_oneof![
        3 => (node.clone(), 0u8..4, 1u64..64).prop_map(|(id, z, gib)| Command::RegisterNode {
            id: NodeId(id), addr: addr(id), zone: Zone(format!("z{z}")), capacity: gib << 30, now_ms: 0 }),
        1 => (node.clone(), 0u64..1000).prop_map(|(id, t)| Command::Heartbeat { id: NodeId(id), reported_used: 0, now_ms: t }),
        1 => (node.clone(), prop_oneof![Just(NodeState::Up), Just(NodeState::Down), Just(NodeState::Cordoned), Just(NodeState::Draining), Just(NodeState::Suspect)])
            .prop_map(|(id, state)| Command::SetNodeState { id: NodeId(id), state }),
        3 => (0u8..4, 1u64..40, 1usize..=4, 1usize..=4).prop_map(|(n, chunks, replicas, min)| Command::CreateVolume {
            name: format!("vol{n}"), size: chunks * CHUNK - 4096 * (chunks % 2), chunk_size: CHUNK, replicas, min_in_sync: min, zones: vec![] }),
        1 => (vol.clone(), 1u64..60).prop_map(|(v, chunks)| Command::GrowVolume { volume: VolumeId(v), size: chunks * CHUNK }),
        1 => vol.clone().prop_map(|v| Command::DeleteVolume { volume: VolumeId(v) }),
        2 => (vol.clone(), node.clone()).prop_map(|(v, n)| Command::Attach { volume: VolumeId(v), node: NodeId(n) }),
        4 => (vol, 0u32..40, 1u64..4, node).prop_map(|(v, c, version, n)| Command::Eject {
            volume: VolumeId(v), chunk: ChunkIdx(c), version, node: NodeId(n) }),
    ]
}

fn check_invariants(s: &MetaState) {
    let mut allocated: BTreeMap<NodeId, u64> = BTreeMap::new();
    for v in s.volumes.values() {
        assert_eq!(v.chunks.len() as u64, v.size.div_ceil(v.chunk_size), "{}: chunk count", v.name);
        for (i, c) in v.chunks.iter().enumerate() {
            assert!(c.in_sync().count() >= v.min_in_sync, "{} chunk {i}: below min in-sync", v.name);
            assert_eq!(c.replicas.len(), v.replicas, "{} chunk {i}: replica count", v.name);
            for r in &c.replicas {
                *allocated.entry(r.node).or_default() += v.chunk_size;
            }
        }
    }
    for n in s.nodes.values() {
        assert_eq!(n.allocated, allocated.get(&n.id).copied().unwrap_or(0), "node {} allocation", n.id.0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_and_failures_change_nothing(
        setup in prop::collection::vec((1u64..8, 0u8..4), 3..8),
        rest in prop::collection::vec(arb_command(), 1..60),
    ) {
        // A few nodes first, so most runs have volumes to work on.
        let mut cmds: Vec<Command> = setup
            .into_iter()
            .map(|(id, z)| Command::RegisterNode {
                id: NodeId(id), addr: addr(id), zone: Zone(format!("z{z}")), capacity: 1 << 40, now_ms: 0 })
            .collect();
        cmds.extend(rest);
        let mut s = MetaState::new(11);
        let mut epochs: BTreeMap<VolumeId, u64> = BTreeMap::new();
        let mut versions: BTreeMap<(VolumeId, usize), u64> = BTreeMap::new();
        for cmd in &cmds {
            let before = s.clone();
            match s.apply(cmd) {
                Ok(Response::Epoch(e)) => {
                    let Command::Attach { volume, .. } = cmd else { panic!("epoch from {cmd:?}") };
                    let prev = epochs.insert(*volume, e.0).unwrap_or(0);
                    prop_assert_eq!(e.0, before.volumes[volume].epoch.0 + 1);
                    prop_assert!(e.0 > prev || before.volumes.get(volume).is_some_and(|v| v.epoch.0 < e.0));
                }
                Ok(_) => {}
                Err(_) => prop_assert_eq!(&s, &before, "failed {:?} changed the state", cmd),
            }
            for v in s.volumes.values() {
                for (i, c) in v.chunks.iter().enumerate() {
                    let prev = versions.insert((v.id, i), c.version);
                    if let Some(p) = prev {
                        // A deleted and recreated volume gets a new id, so ids are not reused.
                        prop_assert!(c.version >= p, "chunk version went back");
                    }
                }
            }
            check_invariants(&s);
        }
        // Determinism: replaying the log gives the same state; snapshots round-trip.
        let mut replay = MetaState::new(11);
        for cmd in &cmds {
            let _ = replay.apply(cmd);
        }
        prop_assert_eq!(&replay, &s);
        let snap = serde_json::to_vec(&s).expect("snapshot");
        let back: MetaState = serde_json::from_slice(&snap).expect("restore");
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
    Command::CreateVolume { name: name.into(), size, chunk_size: CHUNK, replicas, min_in_sync: min, zones: vec![] }
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
    assert_eq!(s.apply(&Command::Attach { volume: id, node: NodeId(1) }), Ok(Response::Epoch(ballast_types::Epoch(1))));
    assert_eq!(s.apply(&Command::Attach { volume: id, node: NodeId(2) }), Ok(Response::Epoch(ballast_types::Epoch(2))));
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
