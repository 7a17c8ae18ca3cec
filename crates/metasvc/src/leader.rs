//! What only the leader does, on a timer: the failure detector and the rebuild
//! scheduler.
//!
//! Failure detection is local to the leader: heartbeats update an in-memory
//! clock (`service::Soft`); only state *changes* go through Raft. A node
//! silent for `suspect_after` becomes suspect (no new replicas on it), for
//! `down_after` down (its replicas are rebuilt elsewhere); a suspect or down node
//! that speaks again is up. A new leader gives every node a full grace period
//! before judging it, since it has not been receiving heartbeats until now.

use std::time::{Duration, Instant};

use ballast_meta::plan::{self, JobLimits};
use ballast_meta::state::{Command, JobState, NodeState};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::service::Core;

/// Failure detector and scheduler timing.
#[derive(Clone, Copy, Debug)]
pub struct Detector {
    /// A node silent this long is suspect. Default 5 s.
    pub suspect_after: Duration,
    /// A suspect node silent this long is down (its replicas are rebuilt
    /// elsewhere). Default 30 s.
    pub down_after: Duration,
    /// How often the leader looks: the detector's heartbeat, the granularity
    /// at which silence is measured. Default 500 ms.
    pub tick: Duration,
    pub limits: JobLimits,
}

/// Failure detector timings out of order ([`Detector::validate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DetectorError {
    #[error("tick must be positive")]
    ZeroTick,
    #[error("tick ({tick:?}) must be shorter than suspect-after ({suspect_after:?})")]
    TickNotBelowSuspect { tick: Duration, suspect_after: Duration },
    #[error("suspect-after ({suspect_after:?}) must be shorter than down-after ({down_after:?})")]
    SuspectNotBelowDown { suspect_after: Duration, down_after: Duration },
}

impl Default for Detector {
    fn default() -> Self {
        Detector {
            suspect_after: Duration::from_secs(5),
            down_after: Duration::from_secs(30),
            tick: Duration::from_millis(500),
            limits: JobLimits::default(),
        }
    }
}

impl Detector {
    /// Checks `0 < tick < suspect_after < down_after`. A tick at or past
    /// `suspect_after` could not tell a node a tick late from one that is
    /// silent; a node must be suspect (no new replicas) before it is down
    /// (its replicas rebuilt elsewhere). A zero tick would stop the leader's
    /// loop at once (tokio refuses a zero interval).
    pub fn validate(&self) -> Result<(), DetectorError> {
        let Detector { tick, suspect_after, down_after, .. } = *self;
        if tick.is_zero() {
            return Err(DetectorError::ZeroTick);
        }
        if tick >= suspect_after {
            return Err(DetectorError::TickNotBelowSuspect { tick, suspect_after });
        }
        if suspect_after >= down_after {
            return Err(DetectorError::SuspectNotBelowDown { suspect_after, down_after });
        }
        Ok(())
    }
}

pub(crate) async fn run(core: Core, d: Detector, mut stop: watch::Receiver<bool>) {
    let mut leading_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(d.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !core.is_leader() {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(|| {
            info!(member = core.id, "leading: failure detector and scheduler start (grace period)");
            Instant::now()
        });
        if let Err(e) = round(&core, &d, since).await {
            // Lost leadership or quorum mid-round: the next tick looks again.
            warn!(error = %e, "leader round stopped");
        }
    }
}

async fn round(core: &Core, d: &Detector, since: Instant) -> Result<(), tonic::Status> {
    let now = Instant::now();
    let nodes = core.read(|s| s.nodes.values().map(|n| (n.id, n.state)).collect::<Vec<_>>()).await;
    let seen = core.soft.last_seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (id, state) in nodes {
        // Silence counts from the later of the last heartbeat and our election.
        let heard = seen.get(&id).copied().map_or(since, |t| t.max(since));
        let silent = now.saturating_duration_since(heard);
        let next = match state {
            NodeState::Up if silent >= d.suspect_after => Some(NodeState::Suspect),
            NodeState::Suspect if silent >= d.down_after => Some(NodeState::Down),
            NodeState::Suspect | NodeState::Down if silent < d.suspect_after && seen.contains_key(&id) => {
                Some(NodeState::Up)
            }
            _ => None,
        };
        if let Some(next) = next {
            match next {
                NodeState::Up => info!(node = %id, from = ?state, "node is back"),
                _ => warn!(node = %id, from = ?state, to = ?next, silent_ms = silent.as_millis() as u64, "node silent"),
            }
            core.write(Command::SetNodeState { id, state: next }).await?;
        }
    }
    // Jobs whose target went down will never finish: fail them so that the
    // scheduler picks another target.
    let dead = core
        .read(|s| {
            s.jobs
                .values()
                .filter(|j| j.state == JobState::Active)
                .filter(|j| s.nodes.get(&j.target).is_none_or(|n| n.state == NodeState::Down))
                .map(|j| j.id)
                .collect::<Vec<_>>()
        })
        .await;
    for job in dead {
        warn!(job, "copy job target is down");
        core.write(Command::FinishJob { job, ok: false, error: Some("target node down".into()), blocks_copied: 0 })
            .await?;
    }
    let starts = core.read(|s| plan::plan_jobs(s, d.limits)).await;
    // A target must be heard from lately: a node that just died is still "up"
    // until `suspect_after`, and a copy onto it would only fail and churn the
    // layout.
    let fresh = d.suspect_after.min(Duration::from_secs(3)) / 2;
    for cmd in starts {
        if let Command::StartJob { target, .. } = &cmd {
            let heard = seen.get(target).copied().map_or(since, |t| t.max(since));
            if now.saturating_duration_since(heard) > fresh {
                continue;
            }
        }
        if let Command::StartJob { volume, chunk, kind, target, replaces, .. } = &cmd {
            info!(%volume, %chunk, ?kind, %target, replaces = ?replaces, "starting copy job");
        }
        match core.write(cmd).await {
            Ok(_) => {}
            // The state moved since the plan: the next round replans.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
            Err(s) => return Err(s),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(tick_ms: u64, suspect_ms: u64, down_ms: u64) -> Detector {
        Detector {
            tick: Duration::from_millis(tick_ms),
            suspect_after: Duration::from_millis(suspect_ms),
            down_after: Duration::from_millis(down_ms),
            ..Detector::default()
        }
    }

    #[test]
    fn ordered_timings_are_valid() {
        Detector::default().validate().expect("the defaults");
        crate::fast_timing().1.validate().expect("the test timings");
        detector(1, 2, 3).validate().expect("strictly increasing");
    }

    #[test]
    fn each_bad_ordering_is_refused() {
        let ms = Duration::from_millis;
        assert_eq!(detector(0, 2000, 6000).validate(), Err(DetectorError::ZeroTick));
        // tick == suspect, tick > suspect (also past down)
        assert_eq!(
            detector(2000, 2000, 6000).validate(),
            Err(DetectorError::TickNotBelowSuspect { tick: ms(2000), suspect_after: ms(2000) })
        );
        assert_eq!(
            detector(7000, 2000, 6000).validate(),
            Err(DetectorError::TickNotBelowSuspect { tick: ms(7000), suspect_after: ms(2000) })
        );
        // suspect == down, suspect > down
        assert_eq!(
            detector(200, 6000, 6000).validate(),
            Err(DetectorError::SuspectNotBelowDown { suspect_after: ms(6000), down_after: ms(6000) })
        );
        assert_eq!(
            detector(200, 6000, 2000).validate(),
            Err(DetectorError::SuspectNotBelowDown { suspect_after: ms(6000), down_after: ms(2000) })
        );
    }
}
