//! Thin provisioning: a node may be allocated replicas up to its capacity times
//! the cluster's over-provisioning ratio, and placement also keeps each node's
//! actual disk use plus a headroom under its capacity; the ratio is a setting
//! on the log, bounded, and states from before it decode with the default.

use std::net::SocketAddr;

use ballast_meta::state::*;
use ballast_meta::MetaError;
use ballast_types::{NodeId, Zone};

const GIB: u64 = 1 << 30;
const CHUNK: u64 = GIB;

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
}

/// Three nodes of 100 GiB, one per zone.
fn cluster() -> MetaState {
    let mut s = MetaState::new(3);
    for i in 1..=3u64 {
        let zone = Zone(format!("z{i}"));
        s.apply(&Command::RegisterNode { id: NodeId(i), addr: addr(i), zone, capacity: 100 * GIB, now_ms: 0 })
            .expect("register");
    }
    s
}

/// A volume of `gib` GiB in 1 GiB chunks, three replicas.
fn create(s: &mut MetaState, name: &str, gib: u64) -> Result<Response, MetaError> {
    s.apply(&Command::CreateVolume {
        name: name.into(),
        size: gib * GIB,
        chunk_size: CHUNK,
        replicas: 3,
        min_in_sync: 2,
        zones: vec![],
        zone_spread: ZoneSpread::Preferred,
    })
}

fn used(s: &mut MetaState, id: u64, bytes: u64) {
    s.apply(&Command::Heartbeat { id: NodeId(id), reported_used: bytes, now_ms: 1, disk: DiskHealth::Ok })
        .expect("heartbeat");
}

#[test]
fn the_default_ratio_lets_volumes_exceed_the_disks_and_stops_at_twice_the_capacity() {
    let mut s = cluster();
    assert_eq!(s.settings.over_provisioning_pct, 200);
    // The case: three 64 GiB volumes on nodes of 100 GiB that hold no data.
    for name in ["a", "b", "c"] {
        create(&mut s, name, 64).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let n = &s.nodes[&NodeId(1)];
    assert_eq!((n.allocated, n.provisionable(&s.settings)), (192 * GIB, 200 * GIB));
    assert_eq!((n.room(&s.settings), n.disk_room()), (8 * GIB, 95 * GIB), "the empty disk is not the limit");
    // 9 GiB more does not fit anywhere; 8 does, and then nothing.
    let e = create(&mut s, "d", 9).expect_err("over the ratio");
    assert!(e.to_string().contains("bytes free"), "{e}");
    assert!(s.volume_by_name("d").is_none(), "a refused create leaves nothing");
    create(&mut s, "d", 8).expect("exactly to the ratio");
    assert!(create(&mut s, "e", 1).is_err());
    assert!(s.check_invariants().is_ok(), "{:?}", s.check_invariants());
}

#[test]
fn the_ratio_is_a_bounded_setting_that_applies_to_new_placements() {
    let mut s = cluster();
    create(&mut s, "a", 90).expect("a");
    for bad in [0, 99, 1001, u32::MAX] {
        let e = s.apply(&Command::SetOverProvisioning { pct: bad }).expect_err("out of bounds");
        assert!(matches!(e, MetaError::InvalidArgument { .. }), "{bad}: {e}");
        assert!(e.to_string().contains("100..=1000"), "{e}");
    }
    assert_eq!(s.settings.over_provisioning_pct, 200, "a refused setting changes nothing");
    // 100%: full reservation, as before thin provisioning; what is placed stays.
    s.apply(&Command::SetOverProvisioning { pct: 100 }).expect("100");
    assert!(create(&mut s, "b", 11).is_err(), "90 + 11 > 100 GiB");
    create(&mut s, "b", 10).expect("90 + 10 = 100 GiB");
    s.apply(&Command::SetOverProvisioning { pct: 1000 }).expect("1000");
    assert_eq!(s.nodes[&NodeId(2)].provisionable(&s.settings), 1000 * GIB);
    create(&mut s, "c", 500).expect("thin: 600 GiB of volumes on 100 GiB disks");
    // Through a Raft snapshot, and from a state written before settings.
    let back: MetaState = serde_json::from_slice(&serde_json::to_vec(&s).expect("encode")).expect("decode");
    assert_eq!(back.settings.over_provisioning_pct, 1000);
    let mut old = serde_json::to_value(&s).expect("encode");
    old.as_object_mut().expect("object").remove("settings");
    let old: MetaState = serde_json::from_value(old).expect("a state from before settings");
    assert_eq!(old.settings, Settings::default());
}

#[test]
fn placement_needs_room_on_the_disk_by_actual_use_and_weighs_nodes_by_it() {
    let mut s = cluster();
    s.apply(&Command::SetOverProvisioning { pct: 1000 }).expect("1000");
    // Node 3's disk holds 90 GiB (its replicas were written, or snapshots keep
    // old versions): 100 - 90 - 5% headroom leaves 5 GiB on its disk. Thin
    // replicas take disk as they are written, so it still takes new ones.
    used(&mut s, 3, 90 * GIB);
    let n3 = &s.nodes[&NodeId(3)];
    assert_eq!((n3.disk_room(), n3.room(&s.settings)), (5 * GIB, 1000 * GIB));
    create(&mut s, "thin", 50).expect("a thin volume larger than node 3's free disk");
    // At 96 GiB its disk is within the headroom: no new replicas at all.
    used(&mut s, 3, 96 * GIB);
    assert_eq!((s.nodes[&NodeId(3)].disk_room(), s.nodes[&NodeId(3)].room(&s.settings)), (0, 0));
    let e = create(&mut s, "none", 1).expect_err("three zones, one disk out of room");
    assert!(e.to_string().contains("need 3 nodes"), "{e}");
    // The disk frees up (snapshots deleted): room comes back.
    used(&mut s, 3, 10 * GIB);
    create(&mut s, "none", 1).expect("room again");
    // Use past the capacity (a capacity set below the disk's use) is no room.
    used(&mut s, 1, 500 * GIB);
    assert_eq!(s.nodes[&NodeId(1)].disk_room(), 0);
    // Nodes are weighed by their disk room: node 2 half used gets fewer
    // chunks of a 1-replica volume than nodes 1 and 3.
    used(&mut s, 1, 0);
    used(&mut s, 2, 60 * GIB);
    let cmd = Command::CreateVolume {
        name: "spread".into(),
        size: 60 * GIB,
        chunk_size: CHUNK,
        replicas: 1,
        min_in_sync: 1,
        zones: vec![],
        zone_spread: ZoneSpread::Preferred,
    };
    let Ok(Response::Volume(id)) = s.apply(&cmd) else { panic!("spread") };
    let on = |node: u64| s.volumes[&id].chunks.iter().filter(|c| c.replicas[0].node == NodeId(node)).count();
    assert!(on(2) < on(1) && on(2) < on(3), "by disk room (95, 35, 85 GiB): {} {} {}", on(1), on(2), on(3));
    assert!(s.check_invariants().is_ok(), "{:?}", s.check_invariants());
}
