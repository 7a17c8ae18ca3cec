//! `ballastctl` as a process: exit codes and one-line messages for an unreachable
//! cluster and for bad arguments; against a real cluster whose certificates
//! `ballast certs` made, and what each role may do.

use std::path::Path;
use std::time::Duration;

use ballast_testkit::{free_addr, Ctl, CtlOutput, Proc, ProcOptions, Result};

/// `ballastctl --insecure ARGS` (no BALLAST_META, no RUST_LOG from the test's
/// environment): for the tests that never reach a cluster.
fn ballastctl(args: &[&str]) -> CtlOutput {
    let all = [&["--insecure"][..], args].concat();
    Ctl::bare().and_then(|c| c.run(&all)).expect("run ballastctl")
}

/// `ballast ARGS`, which must succeed; its stdout.
fn ballast(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast")).args(args).output().expect("run ballast");
    assert!(out.status.success(), "ballast {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_kit_runs_the_binaries_cargo_built() {
    // The kit finds them next to this test executable; cargo names them here.
    let found = ballast_testkit::bin::ballast().expect("ballast");
    assert_eq!(found, Path::new(env!("CARGO_BIN_EXE_ballast")));
    let found = ballast_testkit::bin::ballastctl().expect("ballastctl");
    assert_eq!(found, Path::new(env!("CARGO_BIN_EXE_ballastctl")));
}

#[test]
fn unreachable_cluster_is_one_line_and_exit_1() {
    // Ports nothing listens on: bound, then released.
    let (a, b) = (free_addr().unwrap(), free_addr().unwrap());
    let meta = format!("{a},{b}");
    for args in [
        vec!["--meta", &meta, "--timeout", "500ms", "status"],
        vec!["--meta", &meta, "--timeout", "500ms", "--output", "json", "volume", "list"],
    ] {
        let o = ballastctl(&args);
        assert_eq!(o.code(), Some(1), "{args:?}");
        let err = &o.stderr;
        assert!(err.starts_with(&format!("ballastctl: cluster unreachable: tried {a}, {b}: ")), "{err}");
        assert!(err.to_lowercase().contains("connection refused"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(o.stdout.is_empty());
    }
    // BALLAST_META is the default member list.
    let o = Ctl::bare()
        .unwrap()
        .command(&["--insecure", "--timeout", "500ms", "node", "list"])
        .env("BALLAST_META", &a)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.starts_with(&format!("ballastctl: cluster unreachable: tried {a}: ")), "{err}");
}

#[test]
fn argument_errors_exit_2_with_usage() {
    for (args, expect) in [
        (vec!["volume", "create", "x", "--size", "10XB"], "invalid size unit"),
        (vec!["volume", "create", "x"], "--size"),
        (vec!["volume", "grow", "x", "--size", "lots"], "invalid size"),
        (vec!["what-if", "down"], "--node"),
        (vec!["what-if", "down", "--node", "1", "--zone", "a"], "cannot be used with"),
        (vec!["--output", "yaml", "status"], "possible values"),
        (vec!["--timeout", "0s", "status"], "positive"),
        (vec!["node", "cordon", "three"], "invalid digit"),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ] {
        let o = ballastctl(&args);
        assert_eq!(o.code(), Some(2), "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains(expect), "{args:?}: {}", o.stderr);
    }
}

#[test]
fn refusals_before_any_call_exit_1() {
    // No server at this address: these must fail before trying to reach it.
    let dead = free_addr().unwrap();
    for (args, expect) in [
        (
            vec!["--meta", &dead, "volume", "delete", "pg"],
            "ballastctl: refusing to delete volume \"pg\" without --yes\n",
        ),
        (
            vec!["--meta", &dead, "--output", "json", "jobs", "--watch"],
            "ballastctl: --watch draws progress for people; with --output json, poll `ballastctl jobs` instead\n",
        ),
        (
            vec!["--meta", "meta-1", "status"],
            "ballastctl: invalid metadata service endpoint \"meta-1\": no port (expected host:port)\n",
        ),
        (vec!["--meta", ",", "status"], "ballastctl: no metadata service endpoints given\n"),
    ] {
        let o = ballastctl(&args);
        assert_eq!(o.code(), Some(1), "{args:?}");
        assert_eq!(o.stderr, expect);
    }
}

// ---- against a real cluster: one `ballast meta` member and three `ballast node`s ----

fn ctl_json(meta: &str, tls: &Path, args: &[&str]) -> serde_json::Value {
    // ballastctl's own retry timeout, as an operator runs it.
    Ctl::new(meta).unwrap().timeout(None).tls(tls).json(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn no_certificate_is_a_clear_error() {
    let home = tempfile::tempdir().expect("tempdir");
    let dead = free_addr().unwrap();
    let o = Ctl::bare()
        .unwrap()
        .command(&["--meta", &dead, "status"])
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("ballastctl: no admin certificate: pass --tls-dir DIR"), "{err}");
}

#[test]
fn end_to_end_against_a_real_meta_member() -> Result<()> {
    let dir = tempfile::tempdir().expect("tempdir");
    let meta_dir = dir.path().join("meta");
    let quiet = ProcOptions::quiet();
    // Certificates as an operator makes them.
    let ca = dir.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    assert!(ballast(&["certs", "init", "--ca-dir", ca_s]).starts_with("created CA"));
    let issue = |role: &str, id: &str| -> std::path::PathBuf {
        let out = dir.path().join(format!("{role}-{id}"));
        let printed =
            ballast(&["certs", "issue", "--ca-dir", ca_s, "--role", role, "--id", id, "--out", out.to_str().unwrap()]);
        assert!(printed.starts_with(&format!("issued spiffe://ballast/{role}/{id}")), "{printed}");
        out
    };
    let admin = issue("admin", "ops");
    let meta_tls = issue("meta", "1");
    let mut meta_proc = Proc::spawn_with(
        "meta",
        [
            "meta",
            "--id",
            "1",
            "--data",
            meta_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--initial-members",
            "1=127.0.0.1:0",
            "--tls-dir",
            meta_tls.to_str().unwrap(),
        ],
        &quiet,
    )?;
    let meta = meta_proc.wait_value("ready meta", "addr")?;
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let data = dir.path().join(format!("node{id}"));
        let (id, zone) = (id.to_string(), format!("z{id}"));
        let args = ["node", "--id", &id, "--zone", &zone, "--data", data.to_str().unwrap()];
        let tls = issue("node", &id);
        let tls = tls.to_str().unwrap();
        let args = [&args[..], &["--meta", &meta, "--capacity", "4G", "--no-direct-io", "--tls-dir", tls]].concat();
        nodes.push(Proc::spawn_with(&format!("node{id}"), &args, &quiet)?);
    }
    // Wait (no time limit asserted) until the three nodes registered and are up.
    loop {
        let s = ctl_json(&meta, &admin, &["status"]);
        if s["nodes_up"] == 3 {
            assert_eq!(s["leader"], 1);
            assert_eq!(s["members"][0]["voter"], true);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let list = ctl_json(&meta, &admin, &["node", "list"]);
    let zones: Vec<&str> = list["nodes"].as_array().unwrap().iter().map(|n| n["zone"].as_str().unwrap()).collect();
    assert_eq!(zones, ["z1", "z2", "z3"]);

    let create = ["volume", "create", "pg", "--size", "256MiB", "--chunk-size", "64MiB"];
    let v = ctl_json(&meta, &admin, &create);
    assert_eq!((v["name"].as_str(), v["size_bytes"].as_u64()), (Some("pg"), Some(256 << 20)));
    assert_eq!((v["replicas"].as_u64(), v["min_in_sync"].as_u64()), (Some(3), Some(2)));
    // Same parameters again: the same volume.
    assert_eq!(ctl_json(&meta, &admin, &create)["id"], v["id"]);
    assert_eq!(ctl_json(&meta, &admin, &["volume", "list"])["volumes"][0]["name"], "pg");

    let l = ctl_json(&meta, &admin, &["volume", "inspect", "pg"]);
    assert_eq!(l["health"]["chunks"], 4);
    assert_eq!(l["health"]["chunks_full"], 4);
    assert_eq!(l["health"]["replicas_in_sync"], 12);
    for z in l["zones"].as_array().unwrap() {
        assert_eq!(z["in_sync"], 4, "one replica of every chunk per zone: {z}");
    }
    let secure = |args: &[&str]| -> CtlOutput { Ctl::bare().unwrap().tls(&admin).run(args).unwrap() };
    let o = secure(&["--meta", &meta, "volume", "inspect", "pg", "--chunks", "1"]);
    let text = &o.stdout;
    assert!(text.contains("Size         256 MiB in 4 chunks of 64 MiB\n"), "{text}");
    assert!(text.contains("\nCHUNK  VERSION  REPLICAS\n0 "), "{text}");
    assert!(text.ends_with("... 3 more chunks (--chunks N shows more)\n"), "{text}");

    let w = ctl_json(&meta, &admin, &["what-if", "down", "--zone", "z1"]);
    assert_eq!(w["volumes"][0]["chunks_degraded"], 4);
    assert_eq!(w["volumes"][0]["chunks_unwritable"], 0);
    assert_eq!(ctl_json(&meta, &admin, &["node", "cordon", "3"])["state"], "cordoned");
    assert_eq!(ctl_json(&meta, &admin, &["node", "uncordon", "3"])["state"], "up");
    assert_eq!(ctl_json(&meta, &admin, &["volume", "grow", "pg", "--size", "512MiB"])["size_bytes"], 512u64 << 20);
    assert!(ctl_json(&meta, &admin, &["jobs", "--all"])["jobs"].is_array());

    let o = secure(&["--meta", &meta, "volume", "inspect", "missing"]);
    assert_eq!(o.code(), Some(1));
    assert_eq!(o.stderr, "ballastctl: volume \"missing\" not found\n");

    // A reader reads and may change nothing; a node's certificate is no admin;
    // plaintext gets no answer at all.
    let reader = issue("reader", "audit");
    let as_reader = |args: &[&str]| Ctl::new(&meta).unwrap().tls(&reader).run(args).unwrap();
    assert!(as_reader(&["volume", "list"]).status.success());
    for (tls, who) in [(&reader, "reader/audit"), (&dir.path().join("node-2"), "node/2")] {
        let o = Ctl::new(&meta).unwrap().tls(tls).run(&["volume", "delete", "pg", "--yes"]).unwrap();
        assert_eq!(o.code(), Some(1), "{who}");
        assert!(o.stderr.contains(&format!("{who} may not make this call")), "{who}: {}", o.stderr);
    }
    let o = Ctl::new(&meta).unwrap().timeout(Some("1s")).run(&["--insecure", "volume", "list"]).unwrap();
    assert_eq!(o.code(), Some(1), "plaintext: {}", o.stderr);
    assert_eq!(ctl_json(&meta, &admin, &["volume", "list"])["volumes"][0]["name"], "pg", "nothing was deleted");

    assert_eq!(ctl_json(&meta, &admin, &["volume", "delete", "pg", "--yes"])["deleted"], "pg");
    assert_eq!(ctl_json(&meta, &admin, &["volume", "list"])["volumes"], serde_json::json!([]));
    Ok(())
}
