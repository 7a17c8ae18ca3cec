//! Placement: which nodes hold the replicas of a chunk.
//!
//! Pure functions of a [`ClusterMap`] and a chunk key; no I/O, no clock, no
//! randomness beyond the map's seed. The metadata service calls them when it
//! creates a chunk, replaces a failed replica, or drains a node, and stores the
//! result: placement is decided once, not recomputed on every map change.
//!
//! # Algorithm: weighted rendezvous hashing with a zone rule
//!
//! Every eligible node gets a score for the chunk,
//! `score = -ln(u) / weight`, where `u ∈ (0, 1]` is a hash of (seed, volume,
//! chunk, node) and `weight` is the node's free capacity (allocation room,
//! bounded by what its disk still holds by actual use). The node with the
//! lowest score wins with probability proportional to its weight (the minimum of
//! exponential variables), so chunks spread in proportion to free space, and each
//! chunk's ranking is independent of every other chunk's: a volume's chunks land
//! on many nodes, which is what makes rebuild declustered.
//!
//! Replicas are then taken in score order under the zone rule:
//! - while there are at least as many usable zones as replicas, at most one replica
//!   per zone;
//! - otherwise (fewer zones than replicas) distinct nodes, spread over as many
//!   zones as possible: every zone gets one before any gets a second, and so on;
//!   unless the request's [`Spread`] is `Required`, which refuses a set that would
//!   put two replicas in one zone (a StorageClass's `zoneSpread: required`).
//!
//! # Invariants (property-tested in `tests/properties.rs`)
//! - The result has `replicas` distinct, eligible nodes, or an error says why.
//! - No two replicas share a zone when there are enough zones.
//! - Deterministic: the same map and key give the same nodes.
//! - Minimal movement: a node joining changes at most one replica of a chunk (and
//!   the newcomer is that node); a node leaving changes only the chunks it held,
//!   by exactly that one replica ([`replace`]).
//! - Balance: with equal capacities, chunk counts per node are within a few
//!   percent of even for many chunks.

use std::collections::{BTreeMap, HashSet};

use ballast_types::{ChunkIdx, NodeId, VolumeId, Zone};

/// A storage node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: NodeId,
    pub zone: Zone,
    /// Bytes the node offers for chunks.
    pub capacity: u64,
    /// Bytes already allocated to chunks on it.
    pub used: u64,
    /// Bytes its disk can still take by actual use (`u64::MAX`: not known).
    /// Replicas are thin, taking disk as they are written: placing one lowers
    /// `used`'s room, not this. A node is eligible only with a chunk's worth.
    pub disk_room: u64,
    pub state: NodeState,
}

impl NodeInfo {
    fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used)
    }

    /// The weight's base: allocation room, bounded by the disk's room.
    fn room(&self) -> u64 {
        self.free().min(self.disk_room)
    }
}

/// Whether a node may receive new replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Healthy: receives new replicas.
    Up,
    /// Serves what it has, receives nothing new (operator's cordon).
    Cordoned,
    /// Being emptied: receives nothing new; its replicas are moved away.
    Draining,
    /// Missed its heartbeats: receives nothing; its replicas are rebuilt elsewhere.
    Down,
}

/// The cluster as placement sees it.
#[derive(Clone, Debug, Default)]
pub struct ClusterMap {
    pub nodes: Vec<NodeInfo>,
    /// Mixed into every score: two clusters with the same nodes place differently.
    pub seed: u64,
}

/// What to place: one chunk of one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub volume: VolumeId,
    pub chunk: ChunkIdx,
}

/// What a replica set must satisfy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub replicas: usize,
    /// Bytes each replica needs on its node.
    pub chunk_size: u64,
    /// When non-empty, only nodes in these zones are used (a StorageClass or
    /// topology constraint).
    pub zones: Vec<Zone>,
    pub spread: Spread,
}

/// How strictly replicas are kept in distinct zones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Spread {
    /// One replica per zone while there are enough zones; otherwise as even as
    /// possible (a zone may hold two).
    #[default]
    Preferred,
    /// One replica per zone, always: too few usable zones is an error.
    Required,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("a replica count of {0} is out of range (1 to 5)")]
    InvalidReplicas(usize),
    #[error("need {need} nodes with {chunk_size} bytes free{}, found {have}", zone_note(.zones))]
    NotEnoughNodes { need: usize, have: usize, chunk_size: u64, zones: Vec<Zone> },
    #[error("the replica to replace, {0}, is not in the replica set")]
    NotAReplica(NodeId),
    #[error("zone spread is required: need {need} zones with a node that has {chunk_size} bytes free{}, found {have}", zone_note(.zones))]
    NotEnoughZones { need: usize, have: usize, chunk_size: u64, zones: Vec<Zone> },
}

fn zone_note(zones: &[Zone]) -> String {
    if zones.is_empty() {
        String::new()
    } else {
        let names: Vec<&str> = zones.iter().map(|z| z.0.as_str()).collect();
        format!(" in zones {}", names.join(", "))
    }
}

/// The most replicas a volume may have.
pub const MAX_REPLICAS: usize = 5;

/// The replica set of a new chunk, best first.
pub fn place(map: &ClusterMap, key: ChunkKey, req: &Request) -> Result<Vec<NodeId>, PlacementError> {
    select(map, key, req, &[], &HashSet::new())
}

/// A new replica set for `key` with `failed` replaced: the other replicas stay
/// where they are (nothing else moves), and one node is added under the zone rule.
/// `failed` may be down, draining, or gone from the map.
pub fn replace(
    map: &ClusterMap,
    key: ChunkKey,
    req: &Request,
    current: &[NodeId],
    failed: NodeId,
) -> Result<Vec<NodeId>, PlacementError> {
    if !current.contains(&failed) {
        return Err(PlacementError::NotAReplica(failed));
    }
    let keep: Vec<NodeId> = current.iter().copied().filter(|&n| n != failed).collect();
    let exclude: HashSet<NodeId> = [failed].into();
    select(map, key, req, &keep, &exclude)
}

/// Chooses `req.replicas` nodes: `keep` first (already holding the chunk), then
/// the best-scored eligible nodes not in `exclude`, under the zone rule.
fn select(
    map: &ClusterMap,
    key: ChunkKey,
    req: &Request,
    keep: &[NodeId],
    exclude: &HashSet<NodeId>,
) -> Result<Vec<NodeId>, PlacementError> {
    if req.replicas == 0 || req.replicas > MAX_REPLICAS {
        return Err(PlacementError::InvalidReplicas(req.replicas));
    }
    let zone_ok = |z: &Zone| req.zones.is_empty() || req.zones.contains(z);
    let eligible: Vec<&NodeInfo> = map
        .nodes
        .iter()
        .filter(|n| {
            n.state == NodeState::Up
                && n.room() >= req.chunk_size.max(1)
                && zone_ok(&n.zone)
                && !exclude.contains(&n.id)
                && !keep.contains(&n.id)
        })
        .collect();
    let zone_of = |id: NodeId| map.nodes.iter().find(|n| n.id == id).map(|n| n.zone.clone());
    // Zones that could hold a replica: those of the eligible nodes and of the kept ones.
    let mut zones: HashSet<Zone> = eligible.iter().map(|n| n.zone.clone()).collect();
    zones.extend(keep.iter().filter_map(|&id| zone_of(id)));
    let have = eligible.len() + keep.len();
    if have < req.replicas {
        return Err(PlacementError::NotEnoughNodes {
            need: req.replicas,
            have,
            chunk_size: req.chunk_size,
            zones: req.zones.clone(),
        });
    }
    let mut ranked: Vec<(f64, &NodeInfo)> = eligible.iter().map(|n| (score(map.seed, key, n), *n)).collect();
    // Ties (equal hash and weight) are broken by node id, so the order is total.
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.id.cmp(&b.1.id)));

    let mut chosen: Vec<NodeId> = keep.to_vec();
    let mut count: BTreeMap<Zone, usize> = BTreeMap::new();
    for &id in keep {
        if let Some(z) = zone_of(id) {
            *count.entry(z).or_default() += 1;
        }
    }
    // Pass k admits a node while its zone holds fewer than k replicas: the first
    // pass takes one per zone in score order, later passes (only when there are
    // fewer zones than replicas) add a second, third ... so every zone is used
    // before any gets two more than another.
    let passes = if zones.len() >= req.replicas || req.spread == Spread::Required { 1 } else { req.replicas };
    for limit in 1..=passes {
        for (_, n) in &ranked {
            if chosen.len() == req.replicas {
                break;
            }
            let c = count.entry(n.zone.clone()).or_default();
            if *c < limit && !chosen.contains(&n.id) {
                *c += 1;
                chosen.push(n.id);
            }
        }
    }
    if chosen.len() < req.replicas && req.spread == Spread::Required {
        return Err(PlacementError::NotEnoughZones {
            need: req.replicas,
            have: count.values().filter(|&&c| c > 0).count(),
            chunk_size: req.chunk_size,
            zones: req.zones.clone(),
        });
    }
    if chosen.len() < req.replicas {
        // Enough nodes but not enough zones for one replica per zone (kept replicas
        // already use some): that is still "not enough nodes" for this request.
        return Err(PlacementError::NotEnoughNodes {
            need: req.replicas,
            have: chosen.len(),
            chunk_size: req.chunk_size,
            zones: req.zones.clone(),
        });
    }
    Ok(chosen)
}

/// `-ln(u) / weight`: lower is better. The weight is the node's room in MiB
/// (allocation room bounded by disk room, at least 1), so ratios stay exact
/// enough in f64 for any realistic disk.
fn score(seed: u64, key: ChunkKey, n: &NodeInfo) -> f64 {
    let h = mix(mix(mix(seed ^ key.volume.0) ^ u64::from(key.chunk.0)) ^ n.id.0);
    // Top 53 bits to a uniform u in (0, 1].
    let u = ((h >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let weight = (n.room() >> 20).max(1) as f64;
    -u.ln() / weight
}

/// SplitMix64's finaliser: a fixed, well-distributed 64-bit mix. Placement must
/// not change across builds or platforms, so no std hasher (its seed and
/// algorithm are unspecified).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, zone: &str) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            zone: Zone(zone.into()),
            capacity: 1 << 40,
            used: 0,
            disk_room: u64::MAX,
            state: NodeState::Up,
        }
    }

    /// Golden values: placement is stored by the metadata service, so the function
    /// must never change silently between versions.
    #[test]
    fn placement_is_stable_across_builds() {
        let map =
            ClusterMap { nodes: (1..=6).map(|i| node(i, ["a", "b", "c"][(i as usize - 1) % 3])).collect(), seed: 7 };
        let req = Request { replicas: 3, chunk_size: 64 << 20, zones: vec![], spread: Spread::Preferred };
        let got: Vec<Vec<u64>> = (0..4)
            .map(|c| {
                place(&map, ChunkKey { volume: VolumeId(1), chunk: ChunkIdx(c) }, &req)
                    .expect("place")
                    .iter()
                    .map(|n| n.0)
                    .collect()
            })
            .collect();
        assert_eq!(got, GOLDEN);
    }

    const GOLDEN: [[u64; 3]; 4] = [[1, 2, 3], [2, 6, 4], [3, 4, 5], [1, 3, 5]];

    #[test]
    fn required_spread_never_doubles_a_zone() {
        // Four nodes in two zones: preferred spread takes 3 nodes over 2 zones,
        // required spread refuses, and says how many zones it found.
        let map = ClusterMap { nodes: vec![node(1, "a"), node(2, "a"), node(3, "b"), node(4, "b")], seed: 3 };
        let preferred = Request { replicas: 3, chunk_size: 1 << 20, zones: vec![], spread: Spread::Preferred };
        let required = Request { spread: Spread::Required, ..preferred.clone() };
        for c in 0..32 {
            let key = ChunkKey { volume: VolumeId(9), chunk: ChunkIdx(c) };
            assert_eq!(place(&map, key, &preferred).expect("preferred").len(), 3);
            let e = place(&map, key, &required).expect_err("two zones for three replicas");
            assert!(matches!(e, PlacementError::NotEnoughZones { need: 3, have: 2, .. }), "{e}");
            let two = place(&map, key, &Request { replicas: 2, ..required.clone() }).expect("two zones suffice");
            let zones: HashSet<&Zone> = two.iter().map(|id| &map.nodes[id.0 as usize - 1].zone).collect();
            assert_eq!(zones.len(), 2, "{two:?}");
            // Replacing a replica keeps the rule: the new one must go to the failed one's zone.
            let failed = two[0];
            let next = replace(&map, key, &Request { replicas: 2, ..required.clone() }, &two, failed).expect("replace");
            let zones: HashSet<&Zone> = next.iter().map(|id| &map.nodes[id.0 as usize - 1].zone).collect();
            assert_eq!(zones.len(), 2, "{next:?}");
        }
    }

    #[test]
    fn errors_name_what_is_missing() {
        let map = ClusterMap { nodes: vec![node(1, "a"), node(2, "b")], seed: 0 };
        let key = ChunkKey { volume: VolumeId(1), chunk: ChunkIdx(0) };
        let req = Request { replicas: 3, chunk_size: 1 << 20, zones: vec![], spread: Spread::Preferred };
        let e = place(&map, key, &req).expect_err("two nodes");
        assert!(matches!(e, PlacementError::NotEnoughNodes { need: 3, have: 2, .. }), "{e}");
        assert_eq!(place(&map, key, &Request { replicas: 0, ..req.clone() }), Err(PlacementError::InvalidReplicas(0)));
        let only_c =
            Request { replicas: 1, chunk_size: 1 << 20, zones: vec![Zone("c".into())], spread: Spread::Preferred };
        let e = place(&map, key, &only_c).expect_err("no node in c");
        assert!(e.to_string().contains("in zones c"), "{e}");
        let full = Request { replicas: 1, chunk_size: 2 << 40, zones: vec![], spread: Spread::Preferred };
        assert!(place(&map, key, &full).is_err(), "no node has 2 TiB free");
        assert_eq!(replace(&map, key, &req, &[NodeId(1)], NodeId(9)), Err(PlacementError::NotAReplica(NodeId(9))));
    }
}
