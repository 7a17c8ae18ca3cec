//! A real Prometheus server (Debian's `prometheus`, the one operators run)
//! scraping a test's processes every second and evaluating rule files every
//! second, on a loopback port, its data in a directory removed on drop. The
//! test asks it what it scraped and which alerts fire through its HTTP API,
//! as Grafana and Alertmanager do.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{data_dir, free_addr, try_wait_until, utf8, Error, Proc, ProcOptions, Result};

/// One scrape job: its `job` label and the `HOST:PORT`s serving `/metrics`.
pub struct Job {
    pub name: String,
    pub targets: Vec<String>,
}

impl Job {
    pub fn new<S: AsRef<str>>(name: &str, targets: &[S]) -> Job {
        Job { name: name.into(), targets: targets.iter().map(|t| t.as_ref().to_string()).collect() }
    }
}

/// One sample of an instant vector: its labels and value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).and_then(Value::as_str)
    }
}

/// An alert as `/api/v1/alerts` lists it.
#[derive(Clone, Debug)]
pub struct Alert {
    pub name: String,
    /// `pending` (its expression holds, its `for` has not elapsed) or `firing`.
    pub state: String,
    pub labels: serde_json::Map<String, Value>,
    pub annotations: serde_json::Map<String, Value>,
}

/// A running Prometheus (SIGKILLed on drop; its data directory is removed).
pub struct Prometheus {
    pub addr: String,
    agent: ureq::Agent,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

/// An HTTP client whose every request ends within 10 s (a hung endpoint fails
/// the test instead of stalling it); 4xx and 5xx answers are returned, not
/// errors, so their bodies (Prometheus's error messages) can be reported.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn job_yaml(j: &Job) -> String {
    let targets: Vec<String> = j.targets.iter().map(|t| format!("'{t}'")).collect();
    format!("  - job_name: '{}'\n    static_configs:\n      - targets: [{}]\n", j.name, targets.join(", "))
}

impl Prometheus {
    /// Starts `prometheus` scraping `jobs` and evaluating `rule_files`, both
    /// every second, and waits until it is ready.
    pub fn start(jobs: &[Job], rule_files: &[PathBuf]) -> Result<Prometheus> {
        let dir = data_dir("prometheus")?;
        let rules: Vec<String> = rule_files.iter().map(|p| format!("  - '{}'\n", p.display())).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n{}scrape_configs:\n{}",
            rules.concat(),
            jobs.iter().map(job_yaml).collect::<String>()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).map_err(Error::io(format!("write {}", config_path.display())))?;
        let addr = free_addr()?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", utf8(&config_path)?))
            .arg(format!("--storage.tsdb.path={}", utf8(&dir.path().join("data"))?))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn_cmd_with("prometheus", cmd, &ProcOptions::default().echo(false))?;
        let p = Prometheus { addr, agent: agent(), _proc: proc, _dir: dir };
        try_wait_until("prometheus ready", Duration::from_secs(60), || Ok(p.get("/-/ready", &[]).is_ok()))?;
        Ok(p)
    }

    /// GET `path` with query parameters; the body of a 2xx answer.
    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<String> {
        let url = format!("http://{}{path}", self.addr);
        let mut req = self.agent.get(&url);
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        let mut resp = req.call().map_err(|e| Error::harness(format!("GET {url}: {e}")))?;
        let status = resp.status();
        let body = resp.body_mut().read_to_string().map_err(|e| Error::harness(format!("GET {url}: {e}")))?;
        if !status.is_success() {
            return Err(Error::harness(format!("GET {url} {query:?}: {status}: {body}")));
        }
        Ok(body)
    }

    /// An API call's `data`, after checking `status` is `success`.
    fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let body = self.get(path, query)?;
        let v: Value =
            serde_json::from_str(&body).map_err(|source| Error::Json { what: format!("prometheus {path}"), source })?;
        if v["status"] != "success" {
            return Err(Error::harness(format!("prometheus {path} {query:?}: {v}")));
        }
        Ok(v["data"].clone())
    }

    /// Evaluates `expr` now; every sample of the instant vector (an error if
    /// the expression does not parse, or is not a vector).
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let data = self.api("/api/v1/query", &[("query", expr)])?;
        if data["resultType"] != "vector" {
            return Err(Error::harness(format!("{expr}: not an instant vector: {data}")));
        }
        let samples = data["result"].as_array().cloned().unwrap_or_default();
        samples
            .into_iter()
            .map(|s| {
                let labels = s["metric"].as_object().cloned().unwrap_or_default();
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| Error::harness(format!("{expr}: bad sample {s}")))?;
                Ok(Sample { labels, value })
            })
            .collect()
    }

    /// The value of `expr` when it yields exactly one sample; None when it
    /// yields none.
    pub fn value(&self, expr: &str) -> Result<Option<f64>> {
        let s = self.query(expr)?;
        match s.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.value)),
            many => Err(Error::harness(format!("{expr}: {} samples, want one: {many:?}", many.len()))),
        }
    }

    /// Every metric name Prometheus holds a series of (`__name__` values).
    pub fn names(&self) -> Result<Vec<String>> {
        let data = self.api("/api/v1/label/__name__/values", &[])?;
        Ok(data.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect())
    }

    /// The alerts now pending or firing.
    pub fn alerts(&self) -> Result<Vec<Alert>> {
        let data = self.api("/api/v1/alerts", &[])?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| Alert {
                name: a["labels"]["alertname"].as_str().unwrap_or_default().to_string(),
                state: a["state"].as_str().unwrap_or_default().to_string(),
                labels: a["labels"].as_object().cloned().unwrap_or_default(),
                annotations: a["annotations"].as_object().cloned().unwrap_or_default(),
            })
            .collect())
    }

    /// `(job, instance, health, last error)` of every scrape target.
    pub fn targets(&self) -> Result<Vec<(String, String, String, String)>> {
        let data = self.api("/api/v1/targets", &[])?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (s(&t["labels"]["job"]), s(&t["labels"]["instance"]), s(&t["health"]), s(&t["lastError"]))
            })
            .collect())
    }

    /// Whether rule evaluation has reported an error for any rule (a rule whose
    /// expression fails at evaluation time, not only at parse time).
    pub fn rule_errors(&self) -> Result<Vec<String>> {
        let data = self.api("/api/v1/rules", &[])?;
        let mut errors = Vec::new();
        for g in data["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                if r["health"] != "ok" && r["health"] != "unknown" {
                    errors.push(format!("{}: {} {}", r["name"], r["health"], r["lastError"]));
                }
            }
        }
        Ok(errors)
    }
}

/// `GET http://ADDR/metrics` as a scraper without OpenMetrics support (curl,
/// `promtool check metrics`) sends it: the classic text format.
pub fn scrape(addr: &str) -> Result<String> {
    let url = format!("http://{addr}/metrics");
    let mut resp = agent().get(&url).call().map_err(|e| Error::harness(format!("GET {url}: {e}")))?;
    let status = resp.status();
    let body = resp.body_mut().read_to_string().map_err(|e| Error::harness(format!("GET {url}: {e}")))?;
    if !status.is_success() {
        return Err(Error::harness(format!("GET {url}: {status}: {body}")));
    }
    Ok(body)
}
