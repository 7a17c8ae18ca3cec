//! Placement properties under random clusters: zones, capacities, node states,
//! joins, leaves and drains.

use std::collections::{HashMap, HashSet};

use ballast_placement::*;
use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};
use proptest::prelude::*;

const CHUNK: u64 = 64 << 20;

fn key(v: u64, c: u32) -> ChunkKey {
    ChunkKey { volume: VolumeId(v), chunk: ChunkIdx(c) }
}

fn req(replicas: usize) -> Request {
    Request { replicas, chunk_size: CHUNK, zones: vec![], spread: Spread::Preferred }
}

fn arb_state() -> impl Strategy<Value = NodeState> {
    prop_oneof![
        6 => Just(NodeState::Up),
        1 => Just(NodeState::Cordoned),
        1 => Just(NodeState::Draining),
        1 => Just(NodeState::Down),
    ]
}

/// 1 to 12 nodes in 1 to 5 zones, capacities from 0 to 4 TiB, some used, any
/// state; disks with some room by actual use, or not known (most).
fn arb_map() -> impl Strategy<Value = ClusterMap> {
    let node = (0u8..5, 0u64..4096, 0u64..100, 0u64..150, arb_state());
    (prop::collection::vec(node, 1..12), any::<u64>()).prop_map(|(spec, seed)| ClusterMap {
        nodes: spec
            .into_iter()
            .enumerate()
            .map(|(i, (z, cap_gib, used_pct, disk_pct, state))| NodeInfo {
                id: NodeId(i as u64 + 1),
                zone: Zone(format!("z{z}")),
                capacity: cap_gib << 30,
                used: (cap_gib << 30) / 100 * used_pct,
                disk_room: if disk_pct >= 100 { u64::MAX } else { (cap_gib << 30) / 100 * disk_pct },
                state,
            })
            .collect(),
        seed,
    })
}

fn zone_of(map: &ClusterMap, id: NodeId) -> Zone {
    map.nodes.iter().find(|n| n.id == id).expect("known node").zone.clone()
}

fn usable(map: &ClusterMap) -> Vec<&NodeInfo> {
    map.nodes
        .iter()
        .filter(|n| n.state == NodeState::Up && n.capacity - n.used >= CHUNK && n.disk_room >= CHUNK)
        .collect()
}

/// The placement rules every result must satisfy.
fn check_set(map: &ClusterMap, set: &[NodeId], replicas: usize) {
    assert_eq!(set.len(), replicas);
    let distinct: HashSet<_> = set.iter().collect();
    assert_eq!(distinct.len(), replicas, "replicas on one node: {set:?}");
    let zones: HashSet<Zone> = usable(map).iter().map(|n| n.zone.clone()).collect();
    let mut per_zone: HashMap<Zone, usize> = HashMap::new();
    for &id in set {
        *per_zone.entry(zone_of(map, id)).or_default() += 1;
    }
    // One per zone while zones suffice; otherwise every zone is used.
    assert_eq!(per_zone.len(), replicas.min(zones.len()), "zone spread broken: {per_zone:?} of {zones:?}");
    if zones.len() >= replicas {
        assert!(per_zone.values().all(|&c| c == 1), "two replicas in one zone: {per_zone:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Either a valid set (distinct, eligible nodes, zone rule) or an error exactly
    /// when there are not enough usable nodes.
    #[test]
    fn sets_are_valid_or_errors_are_justified(map in arb_map(), replicas in 1usize..=5, c in 0u32..64) {
        let ok = usable(&map);
        match place(&map, key(1, c), &req(replicas)) {
            Ok(set) => {
                check_set(&map, &set, replicas);
                for id in &set {
                    prop_assert!(ok.iter().any(|n| n.id == *id), "ineligible node {id:?} chosen");
                }
                prop_assert_eq!(place(&map, key(1, c), &req(replicas)).expect("again"), set, "not deterministic");
            }
            Err(PlacementError::NotEnoughNodes { .. }) => prop_assert!(ok.len() < replicas),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    /// A joining node changes at most one replica per chunk, and only to itself.
    #[test]
    fn a_join_moves_at_most_one_replica_to_the_newcomer(map in arb_map(), replicas in 1usize..=3, zone in 0u8..5) {
        let mut bigger = map.clone();
        let new = NodeId(1000);
        bigger.nodes.push(up(new.0, format!("z{zone}"), 1 << 40));
        // The rule only promises this when the newcomer does not change the zone count.
        let zones_before: HashSet<Zone> = usable(&map).iter().map(|n| n.zone.clone()).collect();
        prop_assume!(zones_before.contains(&Zone(format!("z{zone}"))));
        for c in 0..32 {
            let (Ok(before), Ok(after)) = (place(&map, key(2, c), &req(replicas)), place(&bigger, key(2, c), &req(replicas))) else {
                continue;
            };
            let b: HashSet<_> = before.iter().collect();
            let moved: Vec<_> = after.iter().filter(|n| !b.contains(n)).collect();
            prop_assert!(moved.is_empty() || moved == vec![&new], "chunk {c}: {before:?} -> {after:?}");
        }
    }

    /// Replacing a failed replica keeps the others and respects the rules.
    #[test]
    fn replace_moves_only_the_failed_replica(map in arb_map(), replicas in 2usize..=4, c in 0u32..64, pick in 0usize..4) {
        let Ok(set) = place(&map, key(3, c), &req(replicas)) else { return Ok(()) };
        let failed = set[pick % set.len()];
        let mut after_failure = map.clone();
        for n in &mut after_failure.nodes {
            if n.id == failed {
                n.state = NodeState::Down;
            }
        }
        match replace(&after_failure, key(3, c), &req(replicas), &set, failed) {
            Ok(new_set) => {
                prop_assert!(!new_set.contains(&failed));
                for id in set.iter().filter(|&&n| n != failed) {
                    prop_assert!(new_set.contains(id), "healthy replica {id:?} moved");
                }
                let distinct: HashSet<_> = new_set.iter().collect();
                prop_assert_eq!(distinct.len(), replicas);
            }
            Err(PlacementError::NotEnoughNodes { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

/// An empty, healthy node.
fn up(id: u64, zone: String, capacity: u64) -> NodeInfo {
    NodeInfo { id: NodeId(id), zone: Zone(zone), capacity, used: 0, disk_room: u64::MAX, state: NodeState::Up }
}

/// Nodes 1..=n of 1 TiB, spread round robin over three zones.
fn three_zone_cluster(n: u64, seed: u64) -> ClusterMap {
    ClusterMap { nodes: (1..=n).map(|i| up(i, format!("z{}", i % 3), 1 << 40)).collect(), seed }
}

/// Equal nodes get equal shares: 9 nodes in 3 zones, 30 000 replicas.
#[test]
fn balance_within_a_few_percent() {
    let map = three_zone_cluster(9, 42);
    let mut count: HashMap<NodeId, usize> = HashMap::new();
    for c in 0..10_000 {
        for id in place(&map, key(9, c), &req(3)).expect("place") {
            *count.entry(id).or_default() += 1;
        }
    }
    let even = 30_000.0 / 9.0;
    for (id, n) in &count {
        let dev = (*n as f64 - even).abs() / even;
        assert!(dev < 0.05, "node {id:?} holds {n} replicas, {:.1}% off even", dev * 100.0);
    }
}

/// Free capacity weighs: a node with twice the free space gets about twice the chunks.
#[test]
fn weighted_by_free_capacity() {
    let map = ClusterMap {
        nodes: (1..=4).map(|i| up(i, format!("z{i}"), if i == 1 { 2 << 40 } else { 1 << 40 })).collect(),
        seed: 5,
    };
    let mut count: HashMap<NodeId, usize> = HashMap::new();
    for c in 0..20_000 {
        let set = place(&map, key(4, c), &req(1)).expect("place");
        *count.entry(set[0]).or_default() += 1;
    }
    let ratio = count[&NodeId(1)] as f64 / count[&NodeId(2)] as f64;
    assert!((1.8..2.2).contains(&ratio), "2x capacity got {ratio:.2}x the chunks");
}

/// A volume's chunks spread over the whole cluster (declustered rebuild sources).
#[test]
fn one_volume_spreads_over_every_node() {
    let map = three_zone_cluster(12, 1);
    let used: HashSet<NodeId> = (0..64).flat_map(|c| place(&map, key(7, c), &req(3)).expect("place")).collect();
    assert_eq!(used.len(), 12, "a 64-chunk volume should touch every node");
}
