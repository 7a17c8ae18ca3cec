//! The `--output json` documents: one per command, keys named after the
//! proto's fields, sizes in bytes, enums by the names the tables use.

use ballast_metaclient::pb;
use serde_json::{json, Value};

use crate::render::{disk_health, health, job_kind, job_state, node_state, role, spread_text, zone_spread};

pub(crate) fn status_json(s: &pb::StatusResponse) -> Value {
    json!({
        "id": s.id,
        "leader": s.leader,
        "term": s.term,
        "last_log_index": s.last_log_index,
        "applied_index": s.applied_index,
        "members": s.members.iter().map(|m| json!({ "id": m.id, "addr": m.addr, "voter": m.voter })).collect::<Vec<_>>(),
        "nodes": s.nodes,
        "nodes_up": s.nodes_up,
        "volumes": s.volumes,
        "degraded_chunks": s.degraded_chunks,
        "jobs_active": s.jobs_active,
        "over_provisioning_pct": s.over_provisioning_pct,
    })
}

pub(crate) fn node_json(n: &pb::Node) -> Value {
    json!({
        "id": n.id,
        "addr": n.addr,
        "zone": n.zone,
        "capacity_bytes": n.capacity_bytes,
        "allocated_bytes": n.allocated_bytes,
        "used_bytes": n.used_bytes,
        "provisionable_bytes": n.provisionable_bytes,
        "room_bytes": n.room_bytes,
        "state": node_state(n.state),
        "heartbeat_age_ms": n.heartbeat_age_ms,
        "disk": disk_health(n.disk),
        "disk_error": n.disk_error,
    })
}

pub(crate) fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "size_bytes": v.size_bytes,
        "chunk_size_bytes": v.chunk_size_bytes,
        "replicas": v.replicas,
        "min_in_sync": v.min_in_sync,
        "zones": v.zones,
        "zone_spread": spread_text(v.zone_spread),
        "published_node": v.published_node,
        "epoch": v.epoch,
        "attached_to": v.attached_to,
        "attached_to_fill": v.attached_to_fill,
        "layout_gen": v.layout_gen,
        "degraded_chunks": v.degraded_chunks,
        "origin": v.origin.as_ref().map(|o| json!({
            "snapshot": o.snapshot_name,
            "snapshot_id": o.snapshot,
            "source_volume": o.source_volume,
            "from_volume": o.from_volume,
        })),
        "unfilled_chunks": v.unfilled_chunks,
    })
}

fn chunk_json(c: &pb::Chunk) -> Value {
    json!({
        "index": c.index,
        "version": c.version,
        "replicas": c.replicas.iter().map(|r| json!({ "node": r.node, "role": role(r.role) })).collect::<Vec<_>>(),
    })
}

pub(crate) fn layout_json(l: &pb::VolumeLayout) -> Value {
    let h = health(l);
    json!({
        "volume": l.volume.as_ref().map(volume_json),
        "nodes": l.nodes.iter().map(node_json).collect::<Vec<_>>(),
        "zones": zone_spread(l).iter().map(|z| json!({
            "zone": z.zone,
            "nodes": z.nodes,
            "in_sync": z.in_sync,
            "rebuilding": z.rebuilding,
            "ejected": z.ejected,
        })).collect::<Vec<_>>(),
        "health": {
            "chunks": h.chunks,
            "chunks_full": h.full,
            "chunks_degraded": h.degraded,
            "chunks_below_min_in_sync": h.below_min,
            "replicas_in_sync": h.in_sync,
            "replicas_rebuilding": h.rebuilding,
            "replicas_ejected": h.ejected,
        },
        "chunks": l.chunks.iter().map(chunk_json).collect::<Vec<_>>(),
        "snapshots": l.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
        "snapshot_space": { "layers": l.snapshot_layers, "bytes": l.snapshot_bytes },
    })
}

pub(crate) fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "volume": s.volume,
        "volume_name": s.volume_name,
        "size_bytes": s.size_bytes,
        "created_ms": s.created_ms,
        "ready": s.ready,
        "cut": s.cut.as_ref().map(|c| json!({ "epoch": c.epoch, "counter": c.counter })),
        "for_clone": s.for_clone,
    })
}

pub(crate) fn job_json(j: &pb::Job) -> Value {
    json!({
        "id": j.id,
        "kind": job_kind(j.kind),
        "volume": j.volume,
        "chunk": j.chunk,
        "target": j.target,
        "sources": j.sources.iter().map(|n| n.id).collect::<Vec<_>>(),
        "replaces": j.replaces,
        "state": job_state(j.state),
        "chunk_len": j.chunk_len,
        "bytes_done": j.bytes_done,
        "blocks_copied": j.blocks_copied,
        "epoch": j.epoch,
        "error": j.error,
        "attempts": j.attempts,
    })
}

pub(crate) fn what_if_json(target: Value, r: &pb::WhatIfResponse) -> Value {
    json!({
        "target": target,
        "volumes": r.volumes.iter().map(|v| json!({
            "volume": v.volume,
            "name": v.name,
            "chunks_degraded": v.chunks_degraded,
            "chunks_unwritable": v.chunks_unwritable,
            "chunks_unavailable": v.chunks_unavailable,
        })).collect::<Vec<_>>(),
        "unaffected": r.unaffected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::layout;

    #[test]
    fn json_documents_have_stable_keys_and_raw_bytes() {
        let j = layout_json(&layout());
        assert_eq!(j["volume"]["size_bytes"], 3 << 20);
        assert_eq!(j["chunks"][1]["replicas"][2], json!({ "node": 4, "role": "rebuilding" }));
        assert_eq!(j["health"]["chunks_below_min_in_sync"], 1);
        assert_eq!(j["zones"][0]["zone"], "z1");
        let mut keys: Vec<&String> = j.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["chunks", "health", "nodes", "snapshot_space", "snapshots", "volume", "zones"]);
        assert_eq!(j["snapshot_space"], json!({ "layers": 3, "bytes": 12u64 << 20 }));
        let s = snapshot_json(&pb::Snapshot {
            id: 3,
            name: "nightly".into(),
            volume: 1,
            volume_name: "pg".into(),
            size_bytes: 1 << 30,
            created_ms: 5,
            ready: true,
            cut: Some(pb::Seq { epoch: 2, counter: 77 }),
            for_clone: 0,
        });
        assert_eq!(s["cut"], json!({ "epoch": 2, "counter": 77 }));
        assert_eq!((&s["name"], &s["ready"], &s["size_bytes"]), (&json!("nightly"), &json!(true), &json!(1u64 << 30)));
        let pending = snapshot_json(&pb::Snapshot { name: "p".into(), ..Default::default() });
        assert_eq!((&pending["ready"], &pending["cut"]), (&json!(false), &Value::Null), "pending: no cut yet");
        let n = node_json(&pb::Node { id: 2, state: pb::NodeState::Draining as i32, ..Default::default() });
        assert_eq!(n["state"], "draining");
        assert_eq!((&n["disk"], &n["disk_error"]), (&json!("ok"), &json!("")), "unspecified is ok");
        assert_eq!(node_state(42), "unknown(42)");
    }
}
