//! `ballastctl jobs --watch`: the active jobs every second until none is left,
//! as progress bars on a terminal ([`Bars`]) and as lines otherwise ([`Lines`]).
//! The polling is the command's (src/bin/ballastctl/commands.rs); these draw.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use ballast_metaclient::pb;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::render::{job_kind, job_state, progress, say};

/// How `--watch` shows the jobs.
pub(crate) trait JobsView {
    /// Shows `list` (every recent job: the active ones and those that just
    /// ended); false once no job in it is active.
    fn show(&mut self, list: &[pb::Job]) -> anyhow::Result<bool>;
}

/// One progress bar per active job, refreshed every second until none is active.
pub(crate) struct Bars {
    multi: MultiProgress,
    style: ProgressStyle,
    bars: BTreeMap<u64, ProgressBar>,
    names: HashMap<u64, String>,
}

impl Bars {
    pub(crate) fn new(names: HashMap<u64, String>) -> anyhow::Result<Bars> {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let style = ProgressStyle::with_template("{prefix:<40} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .context("progress bar template")?
            .progress_chars("=> ");
        Ok(Bars { multi, style, bars: BTreeMap::new(), names })
    }
}

impl JobsView for Bars {
    fn show(&mut self, list: &[pb::Job]) -> anyhow::Result<bool> {
        let active: Vec<&pb::Job> = list.iter().filter(|j| is_active(j)).collect();
        for j in &active {
            let bar = self.bars.entry(j.id).or_insert_with(|| {
                let b = self.multi.add(ProgressBar::new(j.chunk_len));
                b.set_style(self.style.clone());
                b.set_prefix(job_title(j, &self.names));
                b
            });
            bar.set_length(j.chunk_len);
            bar.set_position(j.bytes_done.min(j.chunk_len));
            bar.set_message(job_state(j.state));
        }
        // Jobs that left the active list finished or failed: say which, keep the bar.
        let gone: Vec<u64> = self.bars.keys().copied().filter(|id| !active.iter().any(|j| j.id == *id)).collect();
        for id in gone {
            if let Some(bar) = self.bars.remove(&id) {
                bar.finish_with_message(outcome(list, id));
            }
        }
        Ok(!active.is_empty())
    }
}

/// Not a terminal: one line per active job whenever its progress changes.
pub(crate) struct Lines {
    last: HashMap<u64, (i32, u64)>,
    names: HashMap<u64, String>,
}

impl Lines {
    pub(crate) fn new(names: HashMap<u64, String>) -> Lines {
        Lines { last: HashMap::new(), names }
    }
}

impl JobsView for Lines {
    fn show(&mut self, list: &[pb::Job]) -> anyhow::Result<bool> {
        let active: Vec<&pb::Job> = list.iter().filter(|j| is_active(j)).collect();
        for j in &active {
            if self.last.insert(j.id, (j.state, j.bytes_done)) != Some((j.state, j.bytes_done)) {
                say(&format!("{}: {} {}\n", job_title(j, &self.names), job_state(j.state), progress(j)))?;
            }
        }
        for id in self.last.keys().copied().filter(|id| !active.iter().any(|j| j.id == *id)).collect::<Vec<_>>() {
            self.last.remove(&id);
            say(&format!("job {id}: {}\n", outcome(list, id)))?;
        }
        Ok(!active.is_empty())
    }
}

fn is_active(j: &pb::Job) -> bool {
    matches!(pb::JobState::try_from(j.state), Ok(pb::JobState::Pending | pb::JobState::Running))
}

/// How a job that is no longer active ended, from a list of all recent jobs.
fn outcome(list: &[pb::Job], id: u64) -> String {
    match list.iter().find(|j| j.id == id) {
        Some(j) if j.state == pb::JobState::Failed as i32 && !j.error.is_empty() => {
            format!("failed: {}", j.error.replace('\n', " "))
        }
        Some(j) => job_state(j.state),
        None => "finished".into(),
    }
}

fn job_title(j: &pb::Job, names: &HashMap<u64, String>) -> String {
    let vol = names.get(&j.volume).cloned().unwrap_or_else(|| format!("vol-{}", j.volume));
    format!("job {} {} {vol}/chunk {} -> node {}", j.id, job_kind(j.kind), j.chunk, j.target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_says_how_a_job_ended() {
        let job = |id, state: pb::JobState, error: &str| pb::Job {
            id,
            state: state as i32,
            error: error.into(),
            ..Default::default()
        };
        let list = vec![job(1, pb::JobState::Done, ""), job(2, pb::JobState::Failed, "source\nunreachable")];
        assert_eq!(outcome(&list, 1), "done");
        assert_eq!(outcome(&list, 2), "failed: source unreachable");
        assert_eq!(outcome(&list, 3), "finished");
        assert!(!is_active(&list[0]));
        assert!(is_active(&job(4, pb::JobState::Pending, "")));
    }
}
