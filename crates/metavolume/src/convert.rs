//! The metadata service's layout messages as the front end's types.

use std::net::SocketAddr;

use ballast_frontend::{EjectReason, Replica, ReplicaSet, VolumeLayout};
use ballast_metaclient::pb;
use ballast_types::{Epoch, NodeId, Seq, VolumeId, Zone};

/// A layout message the front end cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConversionError {
    #[error("layout has no volume")]
    MissingVolume,
    #[error("node {node} has address {addr:?}, not an ip:port")]
    BadAddr { node: NodeId, addr: String },
    #[error("chunk entry {position} has index {index}: the chunk map must list chunks 0.. in order")]
    ChunkOrder { position: usize, index: u32 },
    #[error("chunk {chunk} lists {node} with unknown role {role}")]
    UnknownRole { chunk: u32, node: NodeId, role: i32 },
    #[error("min_in_sync {0} does not fit in usize")]
    MinInSync(u32),
}

/// One chunk's replica set: role IN_SYNC → `in_sync`, EJECTED → `ejected`,
/// REBUILDING → `rebuilding`; replicas keep the message's order.
///
/// The proto does not carry why a replica was ejected, so every ejected replica
/// gets [`EjectReason::ReplicaError`]; the front end only uses the node ids.
pub fn replica_set_from_proto(chunk: &pb::Chunk) -> Result<ReplicaSet, ConversionError> {
    let mut in_sync = Vec::new();
    let mut ejected = Vec::new();
    let mut rebuilding = Vec::new();
    for r in &chunk.replicas {
        let node = NodeId(r.node);
        match pb::ReplicaRole::try_from(r.role) {
            Ok(pb::ReplicaRole::InSync) => in_sync.push(node),
            Ok(pb::ReplicaRole::Ejected) => ejected.push((node, EjectReason::ReplicaError)),
            Ok(pb::ReplicaRole::Rebuilding) => rebuilding.push(node),
            Ok(pb::ReplicaRole::Unspecified) | Err(_) => {
                return Err(ConversionError::UnknownRole { chunk: chunk.index, node, role: r.role })
            }
        }
    }
    Ok(ReplicaSet { version: chunk.version, in_sync, rebuilding, ejected })
}

/// A replica node: `addr` must be an `ip:port` (the replica servers register
/// their socket address).
pub fn replica_from_proto(node: &pb::Node) -> Result<Replica, ConversionError> {
    let id = NodeId(node.id);
    let addr: SocketAddr =
        node.addr.parse().map_err(|_| ConversionError::BadAddr { node: id, addr: node.addr.clone() })?;
    Ok(Replica { node: id, addr, zone: Zone(node.zone.clone()) })
}

/// A volume layout message as the front end's [`VolumeLayout`], with the
/// volume's layout generation (bumped on every replica-set, size or snapshot change).
///
/// The message's chunk list must be in index order from 0 (the front end
/// indexes its chunk map by position); the front end checks the rest (chunk
/// count against the size, in-sync sets against min-in-sync, known nodes).
pub fn layout_from_proto(layout: &pb::VolumeLayout) -> Result<(u64, VolumeLayout), ConversionError> {
    let v = layout.volume.as_ref().ok_or(ConversionError::MissingVolume)?;
    let chunks = layout
        .chunks
        .iter()
        .enumerate()
        .map(|(position, c)| {
            if c.index as usize != position {
                return Err(ConversionError::ChunkOrder { position, index: c.index });
            }
            replica_set_from_proto(c)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let nodes = layout.nodes.iter().map(replica_from_proto).collect::<Result<Vec<_>, _>>()?;
    let min_in_sync = usize::try_from(v.min_in_sync).map_err(|_| ConversionError::MinInSync(v.min_in_sync))?;
    Ok((
        v.layout_gen,
        VolumeLayout {
            volume: VolumeId(v.id),
            name: v.name.clone(),
            size: v.size_bytes,
            chunk_size: v.chunk_size_bytes,
            min_in_sync,
            nodes,
            chunks,
        },
    ))
}

/// A volume's snapshots as a layout message shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayoutSnapshots {
    /// The ids of the requests the attached front end has not taken yet.
    pub pending: Vec<u64>,
    /// The ready snapshots' distinct cuts, ascending: what the volume's
    /// replicas must keep.
    pub cuts: Vec<Seq>,
}

/// The snapshots in a layout message (a ready snapshot without a cut is
/// ignored: it cannot name what to keep).
pub fn snapshots_from_proto(layout: &pb::VolumeLayout) -> LayoutSnapshots {
    let pending = layout.snapshots.iter().filter(|s| !s.ready).map(|s| s.id).collect();
    let cuts: std::collections::BTreeSet<Seq> = layout
        .snapshots
        .iter()
        .filter(|s| s.ready)
        .filter_map(|s| s.cut.as_ref())
        .map(|c| Seq::new(Epoch(c.epoch), c.counter))
        .collect();
    LayoutSnapshots { pending, cuts: cuts.into_iter().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(node: u64, role: pb::ReplicaRole) -> pb::ChunkReplica {
        pb::ChunkReplica { node, role: role as i32 }
    }

    fn node(id: u64, addr: &str) -> pb::Node {
        pb::Node {
            id,
            addr: addr.into(),
            zone: format!("z{id}"),
            state: pb::NodeState::Up as i32,
            ..Default::default()
        }
    }

    fn sample() -> pb::VolumeLayout {
        use pb::ReplicaRole::*;
        pb::VolumeLayout {
            unfilled: vec![],
            snapshot_layers: 0,
            snapshot_bytes: 0,
            snapshots: vec![],
            volume: Some(pb::Volume {
                id: 7,
                name: "pg".into(),
                size_bytes: 10 << 20,
                chunk_size_bytes: 4 << 20,
                replicas: 3,
                min_in_sync: 2,
                zones: vec![],
                epoch: 4,
                attached_to: 1,
                layout_gen: 12,
                degraded_chunks: 1,
                ..Default::default()
            }),
            chunks: vec![
                pb::Chunk {
                    index: 0,
                    version: 1,
                    replicas: vec![replica(1, InSync), replica(2, InSync), replica(3, InSync)],
                },
                pb::Chunk {
                    index: 1,
                    version: 3,
                    replicas: vec![replica(3, InSync), replica(1, Ejected), replica(2, InSync)],
                },
                pb::Chunk {
                    index: 2,
                    version: 5,
                    replicas: vec![replica(1, InSync), replica(2, InSync), replica(4, Rebuilding), replica(3, Ejected)],
                },
            ],
            nodes: vec![
                node(1, "10.0.0.1:7001"),
                node(2, "10.0.0.2:7001"),
                node(3, "[::1]:7001"),
                node(4, "10.0.0.4:7001"),
            ],
        }
    }

    #[test]
    fn layout_converts_roles_nodes_and_generation() {
        let (gen, l) = layout_from_proto(&sample()).unwrap();
        assert_eq!(gen, 12);
        assert_eq!(
            (l.volume, l.name.as_str(), l.size, l.chunk_size, l.min_in_sync),
            (VolumeId(7), "pg", 10 << 20, 4 << 20, 2)
        );
        assert_eq!(l.chunks.len(), 3);
        assert_eq!(
            l.chunks[0],
            ReplicaSet {
                version: 1,
                in_sync: vec![NodeId(1), NodeId(2), NodeId(3)],
                rebuilding: vec![],
                ejected: vec![]
            }
        );
        assert_eq!(l.chunks[1].in_sync, vec![NodeId(3), NodeId(2)]);
        assert_eq!(l.chunks[1].ejected, vec![(NodeId(1), EjectReason::ReplicaError)]);
        assert_eq!(l.chunks[2].version, 5);
        assert_eq!(l.chunks[2].in_sync, vec![NodeId(1), NodeId(2)]);
        assert_eq!(l.chunks[2].rebuilding, vec![NodeId(4)]);
        assert!(l.chunks[1].rebuilding.is_empty());
        assert_eq!(l.chunks[2].ejected, vec![(NodeId(3), EjectReason::ReplicaError)]);
        let n3 = l.node(NodeId(3)).unwrap();
        assert_eq!(n3.addr, "[::1]:7001".parse::<SocketAddr>().unwrap());
        assert_eq!(n3.zone, Zone("z3".into()));
        assert_eq!(l.nodes.len(), 4);
    }

    #[test]
    fn bad_messages_are_refused_with_their_subject() {
        let mut m = sample();
        m.nodes[1].addr = "node-2:7001".into();
        assert_eq!(
            layout_from_proto(&m).unwrap_err(),
            ConversionError::BadAddr { node: NodeId(2), addr: "node-2:7001".into() }
        );
        let mut m = sample();
        m.chunks.swap(0, 1);
        assert_eq!(layout_from_proto(&m).unwrap_err(), ConversionError::ChunkOrder { position: 0, index: 1 });
        let mut m = sample();
        m.volume = None;
        assert_eq!(layout_from_proto(&m).unwrap_err(), ConversionError::MissingVolume);
        let mut m = sample();
        m.chunks[2].replicas[0].role = 9;
        assert_eq!(
            layout_from_proto(&m).unwrap_err(),
            ConversionError::UnknownRole { chunk: 2, node: NodeId(1), role: 9 }
        );
    }

    #[test]
    fn snapshots_are_pending_ids_and_ready_cuts_distinct_and_ascending() {
        let snap = |id, ready, cut: Option<(u64, u64)>| pb::Snapshot {
            id,
            ready,
            cut: cut.map(|(epoch, counter)| pb::Seq { epoch, counter }),
            ..Default::default()
        };
        let mut m = sample();
        m.snapshots = vec![
            snap(1, true, Some((2, u64::MAX))),
            snap(2, true, Some((1, 40))),
            snap(3, false, None),
            snap(4, true, Some((1, 40))),
        ];
        let got = snapshots_from_proto(&m);
        assert_eq!(got.pending, vec![3]);
        assert_eq!(
            got.cuts,
            vec![Seq::new(Epoch(1), 40), Seq::new(Epoch(2), u64::MAX)],
            "a cut shared by two snapshots kept once"
        );
    }
}
