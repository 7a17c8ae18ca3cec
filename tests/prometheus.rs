//! A real Prometheus (Debian's `prometheus`) scrapes a cluster started as the
//! README starts one — three `ballast meta`, three `ballast node` in three
//! zones, a `ballast export` and a `ballast csi-controller`, each with
//! `--metrics-listen` — and evaluates csi/monitoring/rules.yml every second:
//!
//! - every endpoint passes `promtool check metrics` and every target is up;
//! - what Prometheus holds equals what the clients did: fio's write and read
//!   counts and bytes in the front end, three times the writes in the chunk
//!   stores, the CSI calls by method and code, one leader, the volume's chunks;
//! - every metric the alert rules and the Grafana dashboard name is in the
//!   scrape, and every dashboard query evaluates;
//! - a healthy cluster raises no alert; a SIGKILLed storage node makes
//!   BallastNodeDown fire (after its `for: 1m`), every chunk count as degraded
//!   and BallastChunksDegraded pending, and nothing count below min-in-sync.
//!
//! Needs prometheus, promtool and fio (scripts/test-deps installs them);
//! without them the test prints SKIP.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ballast_csi::pb;
use ballast_csi::pb::controller_client::ControllerClient;
use ballast_csi::pb::identity_client::IdentityClient;
use ballast_testkit::prometheus::{scrape, Job, Prometheus};
use ballast_testkit::{free_addr, needs, run_ok, try_wait_until, Cluster, Result};
use serde_json::Value;

const MIB: f64 = 1048576.0;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("csi/monitoring")
}

/// `fio` against the NBD export; (I/Os, bytes) of `dir` ("read" or "write").
fn fio(uri: &str, rw: &str, size: &str, dir: &str) -> Result<(f64, f64)> {
    let out = run_ok(
        "fio",
        &[
            "--name=prom",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            "--bs=4k",
            &format!("--size={size}"),
            "--iodepth=16",
            "--output-format=json",
        ],
    )?;
    // fio may print notes before its JSON.
    let json = out.find("\n{").map_or(out.as_str(), |i| &out[i + 1..]);
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {out}"));
    let job = &v["jobs"][0][dir];
    Ok((job["total_ios"].as_f64().expect("total_ios"), job["io_bytes"].as_f64().expect("io_bytes")))
}

/// `promtool check metrics` on what `addr` serves: no lint problem.
fn promtool_check(name: &str, addr: &str) {
    let text = scrape(addr).expect("scrape");
    assert!(text.contains("# TYPE"), "{name} ({addr}) serves no metrics: {text:?}");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics on {name} ({addr}):\n{said}");
}

/// Every metric name in a PromQL expression (series selectors and aggregation
/// arguments alike; PromQL keywords and functions are not metric names).
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut word = String::new();
    let mut in_braces = false;
    let mut in_string = false;
    let flush = |w: &mut String, into: &mut BTreeSet<String>| {
        if w.starts_with("ballast_") || w.starts_with("process_") || w == "up" {
            into.insert(std::mem::take(w));
        }
        w.clear();
    };
    for ch in expr.chars() {
        match ch {
            '"' => in_string = !in_string,
            '{' if !in_string => in_braces = true,
            '}' if !in_string => in_braces = false,
            _ => {}
        }
        if !in_string && !in_braces && (ch.is_ascii_alphanumeric() || ch == '_') {
            word.push(ch);
        } else {
            flush(&mut word, into);
        }
    }
    flush(&mut word, into);
}

fn rule_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(monitoring().join("rules.yml")).expect("read rules.yml");
    let rules: serde_norway::Value = serde_norway::from_str(&text).expect("parse rules.yml");
    let mut out = Vec::new();
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            out.push((r["alert"].as_str().expect("alert").into(), r["expr"].as_str().expect("expr").into()));
        }
    }
    out
}

/// Every query of the dashboard (panels, annotations), with its template
/// variables set to "all".
fn dashboard_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).expect("read the dashboard");
    let d: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((p["title"].as_str().unwrap_or_default().to_string(), t["expr"].as_str().expect("expr").into()));
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        out.push((a["name"].as_str().unwrap_or_default().to_string(), a["expr"].as_str().expect("expr").into()));
    }
    out.into_iter().map(|(t, e): (String, String)| (t, e.replace("$volume", ".*").replace("$node", ".*"))).collect()
}

fn csi_calls(sock: &Path) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let ch = ballast_csi::dial(sock).await.expect("dial the CSI controller");
        let mut identity = IdentityClient::new(ch.clone());
        for _ in 0..3 {
            identity.get_plugin_info(pb::GetPluginInfoRequest {}).await.expect("GetPluginInfo");
        }
        let refused = ControllerClient::new(ch).create_volume(pb::CreateVolumeRequest::default()).await;
        assert_eq!(refused.expect_err("a CreateVolume without a name").code(), tonic::Code::InvalidArgument);
    });
}

#[test]
fn a_real_prometheus_scrapes_every_process_and_the_alerts_follow_the_cluster() -> Result<()> {
    if !needs("a_real_prometheus_scrapes_every_process_and_the_alerts_follow_the_cluster")
        .tools(&["prometheus", "promtool", "fio"])
        .met()
    {
        return Ok(());
    }
    let mut c = Cluster::builder("prometheus").nodes(&[(1, "a"), (2, "b"), (3, "c")]).metrics().start()?;
    c.create_volume("pv", "64M", "16M", "2")?;
    let export_metrics = free_addr()?;
    let (_export, uri) = c.export_with("pv", 2, &["--io-timeout", "2s", "--metrics-listen", &export_metrics])?;
    let csi_metrics = free_addr()?;
    let (_csi, sock) = c.csi_controller(&["--metrics-listen", &csi_metrics])?;

    let metas: Vec<String> = c.members.iter().map(|m| m.metrics.clone().expect("metrics")).collect();
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.metrics.clone().expect("metrics")).collect();
    for (name, addr) in metas.iter().map(|a| ("meta", a)).chain(nodes.iter().map(|a| ("node", a))) {
        promtool_check(name, addr);
    }
    promtool_check("export", &export_metrics);
    promtool_check("csi-controller", &csi_metrics);

    let prom = Prometheus::start(
        &[
            Job::new("ballast-meta", &metas),
            Job::new("ballast-node", &nodes),
            Job::new("ballast-export", &[&export_metrics]),
            Job::new("ballast-csi-controller", &[&csi_metrics]),
        ],
        &[monitoring().join("rules.yml")],
    )?;
    try_wait_until("every target up", Duration::from_secs(30), || {
        Ok(prom.targets()?.iter().filter(|t| t.2 == "up").count() == 8)
    })
    .map_err(|e| ballast_testkit::Error::harness(format!("{e}: {:?}", prom.targets())))?;

    // The clients' work, counted by them.
    let (writes, written) = fio(&uri, "randwrite", "16M", "write")?;
    let (reads, read) = fio(&uri, "randread", "8M", "read")?;
    assert_eq!((writes, written, reads, read), (4096.0, 16.0 * MIB, 2048.0, 8.0 * MIB), "fio's own counts");
    csi_calls(&sock);

    // ... and as Prometheus scraped it (one more scrape after the last I/O).
    let one = |expr: &str| -> f64 {
        prom.value(expr).unwrap_or_else(|e| panic!("{expr}: {e}")).unwrap_or_else(|| panic!("{expr}: no sample"))
    };
    // Each target is scraped on its own schedule: wait until every one has been
    // scraped since the clients finished.
    try_wait_until("the last requests scraped", Duration::from_secs(15), || {
        Ok(prom.value(r#"sum(ballast_frontend_io_latency_seconds_count{op="read"})"#)? == Some(reads)
            && prom.value(r#"sum(ballast_csi_rpcs_total{method="CreateVolume"})"#)? == Some(1.0)
            && prom.value("sum(ballast_chunkstore_read_bytes_total)")?.is_some_and(|b| b >= read)
            && prom.value("sum(ballast_chunkstore_written_bytes_total)")? == Some(3.0 * written))
    })?;
    assert_eq!(one(r#"sum(ballast_frontend_io_latency_seconds_count{volume="pv",op="write"})"#), writes);
    assert_eq!(one(r#"sum(ballast_frontend_written_bytes_total{volume="pv"})"#), written);
    assert_eq!(one(r#"sum(ballast_frontend_read_bytes_total{volume="pv"})"#), read);
    assert_eq!(one("sum(ballast_frontend_errors_total)"), 0.0);
    assert_eq!(one("sum(ballast_frontend_inflight_requests)"), 0.0);
    assert_eq!(one(r#"ballast_frontend_size_bytes{volume="pv"}"#), 64.0 * MIB);
    // Every write on all three replicas, each one chunk-store write.
    assert_eq!(one(r#"sum(ballast_chunkstore_op_latency_seconds_count{op="write"})"#), 3.0 * writes);
    assert_eq!(one("sum(ballast_chunkstore_written_bytes_total)"), 3.0 * written);
    assert_eq!(one(r#"count(ballast_chunkstore_op_latency_seconds_count{op="write"} > 0)"#), 3.0);
    let store_read = one("sum(ballast_chunkstore_read_bytes_total)");
    assert!(store_read >= read, "chunk stores read {store_read} bytes, clients {read}");
    assert_eq!(one(r#"ballast_csi_rpcs_total{method="GetPluginInfo",code="OK"}"#), 3.0);
    assert_eq!(one(r#"ballast_csi_rpcs_total{method="CreateVolume",code="InvalidArgument"}"#), 1.0);
    assert_eq!(one("count(ballast_meta_raft_is_leader == 1)"), 1.0);
    assert_eq!(one("count(ballast_meta_raft_term)"), 3.0);
    assert_eq!(one(r#"min(ballast_meta_nodes{state="up"})"#), 3.0);
    assert_eq!(one("max(ballast_meta_volumes)"), 1.0);
    assert_eq!(one("max(ballast_meta_chunks)"), 4.0);
    assert_eq!(one("max(ballast_meta_chunks_degraded)"), 0.0);
    assert_eq!(one(r#"count(ballast_node_disk_health{state="ok"} == 1)"#), 3.0);
    assert_eq!(one(r#"sum(ballast_node_heartbeats_total{result="failed"})"#), 0.0);

    // Every metric the rules and the dashboard name exists, every dashboard
    // query evaluates, every rule evaluates, and nothing alerts.
    let held: BTreeSet<String> = prom.names()?.into_iter().collect();
    let mut named = BTreeSet::new();
    let (rules, panels) = (rule_exprs(), dashboard_exprs());
    for (_, expr) in rules.iter().chain(&panels) {
        metric_names(expr, &mut named);
    }
    assert!(named.len() > 30, "too few names found in the rules and dashboard: {named:?}");
    let missing: Vec<&String> = named.difference(&held).collect();
    assert!(missing.is_empty(), "named by the rules or the dashboard, not in any scrape: {missing:?}");
    for (title, expr) in &panels {
        if let Err(e) = prom.query(expr) {
            panic!("dashboard panel {title:?}: {e}");
        }
    }
    assert!(prom.rule_errors()?.is_empty(), "rules failing: {:?}", prom.rule_errors());
    assert!(prom.alerts()?.is_empty(), "a healthy cluster alerts: {:?}", prom.alerts());

    // Node 1 (the only one in zone a: every chunk has a replica there, and no
    // other node may take it) is killed while the volume is written.
    let killed = Instant::now();
    c.kill_node(1)?;
    let (w, _) = fio(&uri, "randwrite", "1M", "write")?;
    assert_eq!(w, 256.0, "writes with one of three replicas gone (min-in-sync 2) must succeed");
    try_wait_until("BallastNodeDown firing", Duration::from_secs(150), || {
        Ok(prom.alerts()?.iter().any(|a| a.name == "BallastNodeDown" && a.state == "firing"))
    })?;
    eprintln!("BallastNodeDown fired {:.0?} after the SIGKILL", killed.elapsed());
    let alerts = prom.alerts()?;
    let names: BTreeSet<(&str, &str)> = alerts.iter().map(|a| (a.name.as_str(), a.state.as_str())).collect();
    assert!(names.contains(&("BallastChunksDegraded", "pending")), "{alerts:?}");
    assert!(!alerts.iter().any(|a| a.name == "BallastChunksBelowMinInSync"), "{alerts:?}");
    let down = alerts.iter().find(|a| a.name == "BallastNodeDown").expect("BallastNodeDown");
    assert_eq!(down.annotations.get("summary").and_then(Value::as_str), Some("1 storage nodes are down"));
    assert!(down.annotations.get("runbook").and_then(Value::as_str).is_some_and(|r| r.contains("ballastctl node")));
    assert_eq!(one("max(ballast_meta_chunks_degraded)"), 4.0);
    assert_eq!(one("max(ballast_meta_chunks_below_min_in_sync)"), 0.0);
    assert_eq!(one(r#"max(ballast_meta_volume_chunks_degraded{volume="pv"})"#), 4.0);
    assert_eq!(one(r#"max(ballast_meta_nodes{state="down"})"#), 1.0);
    assert!(one(r#"sum(ballast_frontend_ejections_total{volume="pv"})"#) >= 1.0);
    assert_eq!(one(&format!(r#"up{{job="ballast-node",instance="{}"}}"#, nodes[0])), 0.0);
    assert_eq!(one(r#"sum(ballast_frontend_errors_total)"#), 0.0);
    Ok(())
}
