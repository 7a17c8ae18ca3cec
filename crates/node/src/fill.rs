//! Background fillers of detached clones (crates/meta/src/clones.rs, "Filling
//! detached clones"): meta names in heartbeat answers the clones this node
//! should fill; for each, the agent attaches the clone as its filler (a front
//! end in this process, attached with `to_fill`: refused while the volume is
//! in use), lets the front end's own filler copy every chunk from the source
//! snapshot, and detaches once the clone is independent.
//!
//! Any ordinary attach (a pod's CSI stage, an export) takes the lease over:
//! it fences this front end, whose chunks filled so far stay recorded, and
//! the new front end fills the rest. A filler is stopped (flushed, detached)
//! with the agent.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_metaclient::MetaClient;
use ballast_metavolume::{AttachOptions, AttachedVolume, LAYOUT_POLL};
use ballast_types::NodeId;
use tokio::sync::watch;
use tracing::{info, info_span, warn, Instrument};

/// How often a filler looks at its clone's progress.
const CHECK: Duration = Duration::from_millis(500);

/// The clones this node is filling, by name.
///
/// Invariant: one filler per clone at a time here. Meta names a clone in
/// every heartbeat answer while its filler runs; a name leaves the set when
/// its task ends, and meta naming it after that (its filler was fenced and
/// the volume detached again) starts a new one.
#[derive(Clone, Default)]
pub(crate) struct Fillers {
    running: Arc<Mutex<HashSet<String>>>,
}

impl Fillers {
    /// Starts filling clone `name` as node `node` unless it is being filled
    /// here already; `stop` ends the filler (flushed, detached).
    pub(crate) fn start(&self, meta: &MetaClient, node: u64, name: String, stop: watch::Receiver<bool>) {
        if !self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone()) {
            return;
        }
        let (meta, running) = (meta.clone(), self.running.clone());
        let span = info_span!("clone_filler", volume = %name);
        tokio::spawn(
            async move {
                fill(meta, &name, NodeId(node), stop).await;
                running.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            }
            .instrument(span),
        );
    }
}

async fn fill(meta: MetaClient, name: &str, node: NodeId, mut stop: watch::Receiver<bool>) {
    let options =
        AttachOptions { io_timeout: Duration::from_secs(10), poll: LAYOUT_POLL, metrics: None, to_fill: true };
    let attached = match AttachedVolume::attach_with(meta, name, node, options).await {
        Ok(a) => a,
        Err(e) => {
            // In use or filled meanwhile, or meta unreachable: meta names it
            // again in a later heartbeat answer if it still needs a filler.
            info!(error = %e, "not filling the clone now");
            return;
        }
    };
    let started = Instant::now();
    let volume = attached.volume().clone();
    info!(epoch = %volume.epoch(), unfilled = volume.unfilled_chunks(), "filling a detached clone in the background");
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                info!(unfilled = volume.unfilled_chunks(), "the agent stops: the clone filler detaches");
                break;
            }
            _ = tokio::time::sleep(CHECK) => {}
        }
        if volume.is_stopped() {
            info!(
                unfilled = volume.unfilled_chunks(),
                "the clone was attached elsewhere: its front end fills the rest"
            );
            break;
        }
        if volume.unfilled_chunks() == 0 {
            info!(secs = started.elapsed().as_secs_f64(), "clone filled in the background: independent of its source");
            break;
        }
    }
    drop(volume);
    if let Err(e) = attached.detach().await {
        warn!(error = %e, "detaching the clone filler failed");
    }
}
