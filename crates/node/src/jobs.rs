//! Copy jobs: meta hands a node rebuild and resync jobs in its heartbeat
//! answers; each copies one chunk from an in-sync source into this node's
//! replica and reports how it went.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_metaclient::MetaClient;
use ballast_proto::v1 as pb;
use ballast_replica::{ClientOptions, ReplicaClient};
use ballast_resync::{resync_chunk, ResyncOptions};
use ballast_types::{ChunkId, ChunkIdx, Epoch, VolumeId};
use tracing::{info, info_span, warn, Instrument};

use crate::agent::AgentConfig;

/// The jobs this node is running.
///
/// Invariant: a job runs at most once at a time here. Meta hands an unfinished
/// job out again in every heartbeat answer until it hears the outcome, so a
/// job already running is not started a second time; it leaves the set when
/// its task ends, and a job meta hands out after that (a retry) starts afresh.
#[derive(Clone, Default)]
pub(crate) struct Jobs {
    running: Arc<Mutex<HashSet<u64>>>,
}

impl Jobs {
    /// Starts `job` on its own task unless it is already running.
    pub(crate) fn start(&self, cfg: &AgentConfig, meta: &MetaClient, job: pb::Job) {
        if !self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(job.id) {
            return;
        }
        let (meta, running, cfg) = (meta.clone(), self.running.clone(), cfg.clone());
        let span = info_span!("copy_job", job = job.id, volume = job.volume, chunk = job.chunk);
        tokio::spawn(
            async move {
                let id = job.id;
                run_job(&cfg, &meta, job).await;
                running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }
            .instrument(span),
        );
    }
}

/// Copies one chunk from the first source that works into this node's replica
/// (through its own replica server), then reports the outcome.
pub async fn run_job(cfg: &AgentConfig, meta: &MetaClient, job: pb::Job) {
    let id = ChunkId { volume: VolumeId(job.volume), chunk: ChunkIdx(job.chunk) };
    let epoch = Epoch(job.epoch);
    let copt = ClientOptions {
        timeout: Duration::from_secs(30),
        security: meta.security().clone(),
        ..ClientOptions::default()
    };
    let target = ReplicaClient::new(cfg.addr, copt.clone());
    let opts = ResyncOptions { max_bytes_per_sec: cfg.copy_rate, ..ResyncOptions::default() };
    info!(kind = job.kind, sources = job.sources.len(), chunk_len = job.chunk_len, "copy job starting");
    let report = |state: pb::JobState, bytes: u64, blocks: u64, error: String| pb::ReportJobRequest {
        job: job.id,
        state: state as i32,
        bytes_done: bytes,
        blocks_copied: blocks,
        error,
    };
    let _ = meta.report_job(report(pb::JobState::Running, 0, 0, String::new())).await;
    let last = Mutex::new(Instant::now());
    let job_metrics = Mutex::new(cfg.metrics.as_ref().map(|m| m.node(cfg.id).job()));
    let observe = |f: &mut dyn FnMut(&mut crate::metrics::JobMetrics)| {
        if let Some(m) = job_metrics.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            f(m);
        }
    };
    let finished = |done: bool| {
        if let Some(m) = job_metrics.lock().unwrap_or_else(|p| p.into_inner()).take() {
            m.finished(done);
        }
    };
    let mut errors = Vec::new();
    for src in &job.sources {
        let Ok(addr) = src.addr.parse::<SocketAddr>() else {
            errors.push(format!("source {} has a bad address {:?}", src.id, src.addr));
            continue;
        };
        let source = ReplicaClient::new(addr, copt.clone());
        observe(&mut |m| m.attempt());
        let progress = |p: ballast_resync::Progress| {
            observe(&mut |m| m.progress(&p.stats));
            // At most one progress report per second, sent without waiting.
            let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
            if l.elapsed() >= Duration::from_secs(1) {
                *l = Instant::now();
                let (meta, r) = (
                    meta.clone(),
                    report(pb::JobState::Running, p.blocks_done * 4096, p.stats.blocks_copied, String::new()),
                );
                tokio::spawn(async move { meta.report_job(r).await });
            }
        };
        match resync_chunk(&source, &target, id, job.chunk_len, epoch, &opts, progress).await {
            Ok(s) => {
                observe(&mut |m| m.progress(&s));
                finished(true);
                info!(
                    source = src.id,
                    copied = s.blocks_copied,
                    trimmed = s.blocks_trimmed,
                    compared = s.blocks_compared,
                    "copy job done"
                );
                let r = report(pb::JobState::Done, job.chunk_len, s.blocks_copied + s.blocks_trimmed, String::new());
                if let Err(e) = meta.report_job(r).await {
                    warn!(error = %e, "reporting a finished job failed; meta will hand it out again");
                }
                return;
            }
            Err(e) => {
                warn!(source = src.id, error = %e, "copy from this source failed");
                errors.push(format!("from {}: {e}", src.id));
                if e.is_fenced() {
                    // A newer attach: the job must be retried with the new epoch.
                    break;
                }
            }
        }
    }
    if job.sources.is_empty() {
        errors.push("no in-sync source".into());
    }
    finished(false);
    let _ = meta.report_job(report(pb::JobState::Failed, 0, 0, errors.join("; "))).await;
}
