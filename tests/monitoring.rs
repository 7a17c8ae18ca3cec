//! csi/monitoring/: the alert rules load in a real Prometheus's own checker, each
//! alert's unit tests (firing and not firing) pass, the prometheus-operator copy of
//! the rules is the same, and every Ballast container the PodMonitor selects serves
//! a port named "metrics" with `--metrics-listen` on it.
//!
//! promtool is Debian's `prometheus` package (scripts/test-deps installs it); without
//! it the promtool tests print SKIP.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("csi/monitoring")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Runs `promtool ARGS` in csi/monitoring; None (and a SKIP line) when promtool
/// is not installed.
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool").args(args).current_dir(monitoring()).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIP promtool {args:?}: promtool not installed (apt-get install prometheus)");
            None
        }
        Err(e) => panic!("run promtool: {e}"),
    }
}

#[test]
fn alert_rules_pass_promtool_check() {
    let Some(out) = promtool(&["check", "rules", "rules.yml"]) else { return };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check rules:\n{text}");
    assert!(text.contains("SUCCESS: 11 rules found"), "{text}");
}

#[test]
fn every_alert_has_unit_tests_firing_and_not_firing() {
    let rules = yaml(&monitoring().join("rules.yml"));
    let alerts: Vec<String> = rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .map(|r| r["alert"].as_str().expect("alert name").to_string())
        .collect();
    let tests = yaml(&monitoring().join("rules_test.yml"));
    let cases: Vec<&Value> = tests["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().expect("alert_rule_test").iter())
        .collect();
    for alert in &alerts {
        let of_alert: Vec<&&Value> = cases.iter().filter(|c| c["alertname"].as_str() == Some(alert)).collect();
        let empty = |c: &&&Value| c["exp_alerts"].as_sequence().is_some_and(|s| s.is_empty());
        assert!(of_alert.iter().any(empty), "{alert}: no test where it does not fire");
        assert!(of_alert.iter().any(|c| !empty(c)), "{alert}: no test where it fires");
        let fired = of_alert.iter().filter(|c| !empty(c));
        for c in fired {
            let a = &c["exp_alerts"][0];
            assert!(a["exp_annotations"]["runbook"].as_str().is_some_and(|r| r.len() > 40), "{alert}: no runbook");
        }
    }
    let Some(out) = promtool(&["test", "rules", "rules_test.yml"]) else { return };
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_operator_rules_are_the_rule_file() {
    let rules = yaml(&monitoring().join("rules.yml"));
    let cr = yaml(&monitoring().join("prometheusrule.yaml"));
    assert_eq!(cr["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(cr["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(cr["spec"]["groups"], rules["groups"], "prometheusrule.yaml and rules.yml differ");
    let kustomization = yaml(&monitoring().join("kustomization.yaml"));
    let listed: Vec<&str> =
        kustomization["resources"].as_sequence().expect("resources").iter().filter_map(Value::as_str).collect();
    assert_eq!(listed, ["podmonitor.yaml", "prometheusrule.yaml"]);
    let generated = &kustomization["configMapGenerator"][0];
    assert_eq!(generated["files"][0].as_str(), Some("ballast.json=grafana-dashboard.json"));
    assert_eq!(generated["options"]["labels"]["grafana_dashboard"].as_str(), Some("1"));
}

#[test]
fn every_alert_has_a_runbook_in_the_csi_readme() {
    let readme = std::fs::read_to_string(monitoring().join("../README.md")).expect("read csi/README.md");
    let alerts = &readme[readme.find("### Alerts").expect("csi/README.md has an Alerts section")..];
    let rules = yaml(&monitoring().join("rules.yml"));
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().expect("alert name");
            assert!(alerts.contains(&format!("- **{name}**")), "csi/README.md, Alerts: no runbook for {name}");
        }
    }
}

#[test]
fn the_grafana_dashboard_is_a_dashboard_on_a_prometheus_data_source() {
    let text = std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).expect("read the dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(d["uid"].as_str(), Some("ballast-overview"));
    let vars = d["templating"]["list"].as_array().expect("templating");
    assert!(vars.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus"));
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id {}", p["id"]);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"].as_str(), Some("${datasource}"), "panel {}", p["title"]);
        assert!(p["description"].as_str().is_some_and(|s| !s.is_empty()), "panel {} explains nothing", p["title"]);
        assert!(!p["targets"].as_array().expect("targets").is_empty(), "panel {} queries nothing", p["title"]);
    }
    // That every query evaluates and names existing metrics is tests/prometheus.rs.
}

#[test]
fn every_ballast_container_serves_the_port_the_pod_monitor_scrapes() {
    let pm = yaml(&monitoring().join("podmonitor.yaml"));
    assert_eq!(pm["kind"].as_str(), Some("PodMonitor"));
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"].as_str().expect("port name");
    let selector = pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/part-of"].as_str();
    assert_eq!(selector, Some("ballast"));
    let csi = Path::new(env!("CARGO_MANIFEST_DIR")).join("csi");
    let mut checked = Vec::new();
    for file in ["node.yaml", "controller.yaml", "meta.yaml"] {
        let text = std::fs::read_to_string(csi.join(file)).expect("read manifest");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc).expect("parse manifest");
            let template = &v["spec"]["template"];
            if template.is_null() {
                continue;
            }
            assert_eq!(template["metadata"]["labels"]["app.kubernetes.io/part-of"].as_str(), Some("ballast"));
            let ann = &template["metadata"]["annotations"];
            for c in template["spec"]["containers"].as_sequence().expect("containers") {
                let image = c["image"].as_str().unwrap_or_default();
                if !image.contains("/ballast:") {
                    continue; // a sidecar
                }
                let ports = c["ports"].as_sequence().expect("ports");
                let metrics = ports
                    .iter()
                    .find(|p| p["name"].as_str() == Some(port))
                    .unwrap_or_else(|| panic!("{file}: container {:?} has no port {port:?}", c["name"]));
                let number = metrics["containerPort"].as_u64().expect("containerPort");
                let argv =
                    serde_norway::to_string(&c["args"]).unwrap() + &serde_norway::to_string(&c["command"]).unwrap();
                assert!(
                    argv.contains(&format!("--metrics-listen=0.0.0.0:{number}"))
                        || argv.contains(&format!("--metrics-listen 0.0.0.0:{number}")),
                    "{file}: --metrics-listen does not serve port {number}"
                );
                assert_eq!(ann["prometheus.io/port"].as_str(), Some(number.to_string().as_str()), "{file}");
                checked.push(file);
            }
        }
    }
    assert_eq!(checked, ["node.yaml", "controller.yaml", "meta.yaml"]);
}
