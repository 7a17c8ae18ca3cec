//! A meta member refuses a configuration whose timings are out of order at
//! start, with a typed error, before it binds, opens its store or starts Raft.

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_metasvc::{fast_timing, ConfigError, DetectorError, MetaConfig, MetaSvcError, RaftTiming};

fn config(dir: &std::path::Path) -> MetaConfig {
    let (raft, detector) = fast_timing();
    MetaConfig {
        id: 1,
        data_dir: dir.join("m1"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        initial_members: BTreeMap::from([(1, "127.0.0.1:1".to_string())]),
        raft,
        detector,
        security: ballast_metaclient::Security::Insecure,
    }
}

#[test]
fn validate_names_each_bad_ordering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = config(dir.path());
    good.validate().expect("the test timings are valid");
    let mut c = good.clone();
    c.detector.down_after = c.detector.suspect_after;
    assert!(matches!(c.validate(), Err(ConfigError::Detector(DetectorError::SuspectNotBelowDown { .. }))));
    let mut c = good.clone();
    c.detector.tick = c.detector.suspect_after + Duration::from_millis(1);
    assert!(matches!(c.validate(), Err(ConfigError::Detector(DetectorError::TickNotBelowSuspect { .. }))));
    let mut c = good.clone();
    c.detector.tick = Duration::ZERO;
    assert_eq!(c.validate(), Err(ConfigError::Detector(DetectorError::ZeroTick)));
    let mut c = good.clone();
    c.raft = RaftTiming { heartbeat_ms: c.raft.election_min_ms, ..c.raft };
    assert!(matches!(c.validate(), Err(ConfigError::Raft(_))));
    let mut c = good;
    c.raft = RaftTiming { election_max_ms: c.raft.election_min_ms, ..c.raft };
    assert!(matches!(c.validate(), Err(ConfigError::Raft(_))));
}

#[tokio::test]
async fn start_refuses_a_bad_config_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.detector.suspect_after = cfg.detector.down_after * 2;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let err = ballast_metasvc::start_on(cfg.clone(), listener).await.err().expect("refused");
    assert!(
        matches!(
            err,
            MetaSvcError::Config { id: 1, source: ConfigError::Detector(DetectorError::SuspectNotBelowDown { .. }) }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("suspect-after"), "the message names the setting: {err}");
    assert!(!cfg.data_dir.exists(), "no store was opened");
    let err = ballast_metasvc::start(cfg).await.err().expect("refused");
    assert!(matches!(err, MetaSvcError::Config { .. }), "{err}");
}
