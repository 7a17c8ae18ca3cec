//! `ballast meta`: one member of the metadata service until SIGINT/SIGTERM.

use std::collections::BTreeMap;

use anyhow::Context;
use ballast_metasvc::{Detector, MetaConfig, RaftTiming};

use crate::cli::MetaArgs;
use crate::shutdown;

/// Parses `1=host:port,2=host:port,...`.
pub fn parse_members(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) =
            part.split_once('=').ok_or_else(|| format!("invalid member {part:?}: expected ID=HOST:PORT"))?;
        let id: u64 = id.parse().map_err(|_| format!("invalid member id {id:?} in {part:?}"))?;
        if id == 0 || addr.is_empty() || !addr.contains(':') {
            return Err(format!("invalid member {part:?}: ids start at 1, the address is HOST:PORT"));
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(format!("member {id} given twice"));
        }
    }
    Ok(out)
}

pub fn config(a: &MetaArgs) -> MetaConfig {
    MetaConfig {
        id: a.id,
        data_dir: a.data.clone(),
        listen: a.listen,
        initial_members: a.initial_members.clone().unwrap_or_default(),
        raft: RaftTiming {
            heartbeat_ms: a.raft_heartbeat_ms,
            election_min_ms: a.election_ms,
            election_max_ms: a.election_ms * 2,
            ..RaftTiming::default()
        },
        detector: Detector { suspect_after: a.suspect_after, down_after: a.down_after, ..Detector::default() },
    }
}

pub async fn run(a: MetaArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signals()?;
    if let Some(m) = &a.initial_members {
        anyhow::ensure!(m.contains_key(&a.id), "--initial-members must include this member ({})", a.id);
    }
    let handle = ballast_metasvc::start(config(&a)).await.context("start meta member")?;
    println!("ready meta id={} addr={}", handle.id, handle.addr);
    shutdown::wait(stop).await;
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members() {
        let m = parse_members("1=127.0.0.1:7400, 2=h:7401").unwrap();
        assert_eq!(m.get(&2).map(String::as_str), Some("h:7401"));
        assert!(parse_members("0=h:1").is_err());
        assert!(parse_members("1=h:1,1=h:2").is_err());
        assert!(parse_members("1:h:1").is_err());
    }
}
