//! The metadata service's Raft payloads as redb holds them and peers send
//! them (JSON): a log entry's command and a state-machine snapshot, from
//! arbitrary bytes. Decoding never panics. A decoded command applied to a
//! valid state (three zones, two nodes each, a volume with a snapshot and a
//! clone filling from it) never panics and leaves every invariant of the
//! state intact, whether it is applied or refused.
#![no_main]

use ballast_meta::raft_store::SmData;
use ballast_meta::state::ZoneSpread;
use ballast_meta::{Command, MetaState, Response};
use ballast_types::{NodeId, VolumeId, Zone};
use libfuzzer_sys::fuzz_target;

const CHUNK: u64 = 4 << 20;

fn state() -> MetaState {
    let mut s = MetaState::new(7);
    for i in 1..=6u64 {
        let zone = Zone(format!("z{}", i % 3));
        let addr = format!("10.0.0.{i}:7000").parse().expect("addr");
        s.apply(&Command::RegisterNode { id: NodeId(i), addr, zone, capacity: 1 << 36, now_ms: 0 }).expect("register");
    }
    let create = Command::CreateVolume {
        name: "v".into(),
        size: 3 * CHUNK,
        chunk_size: CHUNK,
        replicas: 3,
        min_in_sync: 2,
        zones: vec![],
        zone_spread: ZoneSpread::Required,
    };
    let Ok(Response::Volume(v)) = s.apply(&create) else { panic!("create") };
    let snap = Command::CreateSnapshot { volume: v, name: "s".into(), now_ms: 1 };
    let Ok(Response::Snapshot(snap)) = s.apply(&snap) else { panic!("snapshot") };
    let clone = Command::CreateClone {
        name: "c".into(),
        snapshot: snap.id,
        size: 4 * CHUNK,
        chunk_size: CHUNK,
        replicas: 3,
        min_in_sync: 2,
        zones: vec![],
        zone_spread: ZoneSpread::Preferred,
    };
    s.apply(&clone).expect("clone");
    s.apply(&Command::Attach { volume: VolumeId(1), node: NodeId(1) }).expect("attach");
    s.check_invariants().expect("a valid start");
    s
}

fuzz_target!(|data: &[u8]| {
    if let Ok(sm) = serde_json::from_slice::<SmData>(data) {
        let _ = sm.state.check_invariants();
    }
    // Commands one per line: each applied in turn to the valid state.
    let mut s = state();
    for line in data.split(|b| *b == b'\n') {
        let Ok(cmd) = serde_json::from_slice::<Command>(line) else { continue };
        let _ = s.apply(&cmd);
        if let Err(e) = s.check_invariants() {
            panic!("{cmd:?} broke an invariant: {e}");
        }
    }
});
