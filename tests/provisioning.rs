//! Thin provisioning through the processes a user runs: three `ballast node`s
//! of 20 GiB capacity each, `ballastctl` against `ballast meta`.
//! - the default over-provisioning (200%) lets volumes total more than the
//!   nodes' capacity and stops at twice it, with a clear refusal;
//! - `ballastctl settings over-provisioning` is bounded and changes what fits;
//! - `node list` reports provisionable, allocated, used and room, and a
//!   volume written through a real front end shows up as used disk (not its
//!   size) on every replica's node.

use std::time::Duration;

use ballast_blockdev::BlockDev;
use ballast_nbd::NbdClient;
use ballast_testkit::{try_wait_until, Cluster, Result};
use serde_json::Value;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn nodes(c: &Cluster) -> Result<Vec<Value>> {
    Ok(c.ctl_json(&["node", "list"])?["nodes"].as_array().cloned().unwrap_or_default())
}

fn field(n: &Value, k: &str) -> u64 {
    n[k].as_u64().unwrap_or_else(|| panic!("{k} in {n}"))
}

#[test]
fn volumes_are_thin_up_to_the_over_provisioning_ratio() -> Result<()> {
    let c = Cluster::start("provisioning", &[(1, "z1"), (2, "z2"), (3, "z3")])?;
    assert_eq!(c.ctl_json(&["status"])?["over_provisioning_pct"], 200, "the default");
    // 3 × 12 GiB of volumes, three replicas each: 36 GiB on every 20 GiB node.
    for name in ["a", "b", "c"] {
        c.create_volume(name, "12GiB", "64MiB", "2")?;
    }
    for n in nodes(&c)? {
        assert_eq!(field(&n, "capacity_bytes"), 20 * GIB, "{n}");
        assert_eq!(field(&n, "provisionable_bytes"), 40 * GIB, "{n}");
        assert_eq!(field(&n, "allocated_bytes"), 36 * GIB, "{n}");
        assert_eq!(field(&n, "room_bytes"), 4 * GIB, "{n}");
        assert!(field(&n, "used_bytes") < GIB, "nothing written yet: {n}");
    }
    let refused = c.ctl()?.run(&["volume", "create", "d", "--size", "5GiB", "--chunk-size", "64MiB"])?;
    assert_eq!(refused.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("bytes free"), "names the shortage: {}", refused.stderr);
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    assert!(c.ctl_json(&["volume", "list"])?["volumes"].as_array().is_some_and(|v| v.len() == 3));

    // The setting: bounded, and it changes what fits from now on.
    for bad in ["50", "1001", "lots"] {
        let out = c.ctl()?.run(&["settings", "over-provisioning", bad])?;
        assert_ne!(out.code(), Some(0), "{bad}: {out:?}");
        assert!(out.stderr.contains("100..=1000") || out.stderr.contains("invalid percentage"), "{out:?}");
    }
    let s = c.ctl_json(&["settings", "over-provisioning", "300%"])?;
    assert_eq!(s["over_provisioning_pct"], 300, "{s}");
    c.create_volume("d", "5GiB", "64MiB", "2")?;
    let n = &nodes(&c)?[0];
    assert_eq!((field(n, "provisionable_bytes"), field(n, "allocated_bytes")), (60 * GIB, 41 * GIB), "{n}");
    let text = c.ctl()?.run(&["node", "list"])?;
    assert!(text.stdout.contains("PROVISIONABLE") && text.stdout.contains("ROOM"), "{}", text.stdout);
    assert!(c.ctl()?.run(&["status"])?.stdout.contains("300% of each node's capacity"));

    // Written through a real front end: 48 MiB of a 12 GiB volume take about
    // 48 MiB on each replica's disk, which the nodes count and meta reports.
    let before: Vec<u64> = nodes(&c)?.iter().map(|n| field(n, "used_bytes")).collect();
    let sock = c.path("a.sock");
    let (mut export, _) = c.export_with("a", 1, &["--socket", sock.to_str().expect("utf-8 path")])?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let client = rt.block_on(NbdClient::connect_unix(&sock, "")).expect("connect");
    for i in 0..48u64 {
        // One MiB at the start of 48 of the volume's 192 chunks of 64 MiB.
        let data = vec![(i as u8) | 1; MIB as usize];
        rt.block_on(client.write(i * 64 * MIB, data.into(), false)).expect("write");
    }
    rt.block_on(client.flush()).expect("flush");
    let _ = rt.block_on(client.disconnect());
    try_wait_until("every node reports the written data as used", Duration::from_secs(30), || {
        let now = nodes(&c)?;
        Ok(now.iter().zip(&before).all(|(n, b)| field(n, "used_bytes") >= b + 48 * MIB))
    })?;
    for (n, b) in nodes(&c)?.iter().zip(&before) {
        let grew = field(n, "used_bytes") - b;
        eprintln!("node {}: used grew by {} MiB for 48 MiB written", n["id"], grew / MIB);
        // Per chunk written: its MiB of data and its context file (1 MiB for
        // a 64 MiB chunk, fallocated whole), with a MiB of slack for the
        // filesystem; not the chunk's 64 MiB.
        assert!(grew <= 48 * 3 * MIB, "thin: {grew} bytes for 48 MiB written: {n}");
    }
    export.terminate(Duration::from_secs(10))?;
    Ok(())
}
