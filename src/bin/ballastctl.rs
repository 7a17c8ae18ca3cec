//! `ballastctl`: the operator's command line for a Ballast cluster. It talks to
//! the metadata service's Admin API (any member; `--meta` lists them).
//!
//! ```text
//!   ballastctl status
//!   ballastctl node list | cordon ID | uncordon ID | drain ID | remove ID
//!   ballastctl volume create NAME --size 10GiB [--replicas 3] [--min-in-sync N] [--chunk-size 64MiB] [--zones a,b]
//!   ballastctl volume list | inspect NAME [--chunks N] | grow NAME --size S | delete NAME --yes
//!   ballastctl jobs [--all] [--watch]
//!   ballastctl what-if down --node ID | --zone NAME
//!   ballastctl member add ID ADDR | remove ID
//! ```
//!
//! Tables for people (sizes human-readable), `--output json` for scripts: one
//! JSON document per command, keys named after the proto's fields, sizes in
//! bytes. Errors: one line on stderr (`ballastctl: ...`) and exit code 1;
//! argument errors exit 2 (clap's usage message).

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_metaclient::{parse_endpoints, pb, MetaClient, MetaClientOptions};
use ballast_types::units::{parse_duration, parse_size};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(name = "ballastctl", version, about = "Operate a Ballast cluster through its metadata service")]
struct Cli {
    /// Metadata service members (comma-separated host:port); any one answering is enough.
    #[arg(long, visible_alias = "endpoint", global = true, env = "BALLAST_META", default_value = "127.0.0.1:7400")]
    meta: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// How long to keep trying when no member answers (e.g. 15s, 500ms, 2m; plain numbers are seconds).
    #[arg(long, global = true, default_value = "15s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The metadata service: members, leader, Raft progress, and a cluster summary.
    Status,
    /// Storage nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Rebuild and resync jobs (active ones unless --all).
    Jobs(JobsArgs),
    /// What losing a node or a zone would do to each volume.
    #[command(subcommand)]
    WhatIf(WhatIfCommand),
    /// Metadata service (Raft) members.
    #[command(subcommand)]
    Member(MemberCommand),
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// All storage nodes with capacity, state and heartbeat age.
    List,
    /// Place no new replicas on the node.
    Cordon { id: u64 },
    /// Return a cordoned or draining node to service.
    Uncordon { id: u64 },
    /// Move every replica off the node (rebuilt elsewhere).
    Drain { id: u64 },
    /// Forget a node that holds no replicas (drain it first).
    Remove { id: u64 },
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a volume (idempotent with the same parameters).
    Create(CreateArgs),
    /// All volumes.
    List,
    /// A volume's summary, zone spread, replica health and chunk map.
    Inspect {
        /// Name or numeric id.
        name: String,
        /// Show at most this many chunk lines (default: all).
        #[arg(long)]
        chunks: Option<usize>,
    },
    /// Grow a volume to a new size.
    Grow {
        name: String,
        /// The new size, e.g. 20GiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume and reclaim its replicas (irreversible; requires --yes).
    Delete {
        name: String,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Debug)]
struct CreateArgs {
    name: String,
    /// Size: plain bytes or with a unit (KiB, MiB, GiB, TiB; K/M/G/T and KB/MB/GB/TB mean the same).
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Replicas per chunk [service default: 3].
    #[arg(long)]
    replicas: Option<u32>,
    /// Replicas a write must reach [service default: replicas / 2 + 1].
    #[arg(long)]
    min_in_sync: Option<u32>,
    /// Chunk size [service default: 64MiB].
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Zones to place replicas in (comma-separated) [default: any].
    #[arg(long, value_delimiter = ',')]
    zones: Vec<String>,
    /// `required`: never two replicas of a chunk in one zone (creation fails when
    /// zones run short); `preferred`: as even as the zones allow.
    #[arg(long, default_value = "preferred", value_parser = ["preferred", "required"])]
    zone_spread: String,
}

#[derive(Args, Debug)]
struct JobsArgs {
    /// Also recently finished jobs.
    #[arg(long)]
    all: bool,
    /// Follow the active jobs every second until none is left (progress bars on a terminal).
    #[arg(long)]
    watch: bool,
}

#[derive(Subcommand, Debug)]
enum WhatIfCommand {
    /// Per volume: chunks that would be degraded, unwritable or unavailable.
    Down(DownArgs),
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct DownArgs {
    /// A storage node going down.
    #[arg(long)]
    node: Option<u64>,
    /// A whole zone going down.
    #[arg(long)]
    zone: Option<String>,
}

#[derive(Subcommand, Debug)]
enum MemberCommand {
    /// Add a member (joins as a learner, then becomes a voter).
    Add {
        id: u64,
        /// Its gRPC endpoint, host:port.
        addr: String,
    },
    /// Remove a member.
    Remove { id: u64 },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`ballastctl jobs | head`): not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One line: the context chain joined by ": ".
            eprintln!("ballastctl: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Refuse before connecting anywhere.
    if let Command::Volume(VolumeCommand::Delete { name, yes: false }) = &cli.command {
        bail!("refusing to delete volume {name:?} without --yes");
    }
    if let Command::Jobs(JobsArgs { watch: true, .. }) = &cli.command {
        if cli.output == Output::Json {
            bail!("--watch draws progress for people; with --output json, poll `ballastctl jobs` instead");
        }
    }
    let options = MetaClientOptions {
        connect_timeout: cli.timeout.min(Duration::from_secs(2)),
        request_timeout: cli.timeout.min(Duration::from_secs(10)),
        retry_for: cli.timeout,
    };
    let client = MetaClient::with_options(parse_endpoints(&cli.meta), options)?;
    let out = cli.output;
    match cli.command {
        Command::Status => {
            let s = client.status().await?;
            emit(out, status_json(&s), || status_table(&s))
        }
        Command::Node(cmd) => node(&client, out, cmd).await,
        Command::Volume(cmd) => volume(&client, out, cmd).await,
        Command::Jobs(args) => jobs(&client, out, args).await,
        Command::WhatIf(WhatIfCommand::Down(args)) => {
            let (target, target_json) = match (args.node, args.zone) {
                (Some(n), _) => (pb::what_if_request::Target::Node(n), json!({ "node": n })),
                (None, Some(z)) => (pb::what_if_request::Target::Zone(z.clone()), json!({ "zone": z })),
                (None, None) => bail!("what-if down needs --node ID or --zone NAME"),
            };
            let r = client.what_if(pb::WhatIfRequest { target: Some(target) }).await?;
            emit(out, what_if_json(target_json, &r), || what_if_table(&r))
        }
        Command::Member(MemberCommand::Add { id, addr }) => {
            let s = client.add_member(pb::AddMemberRequest { id, addr }).await?;
            emit(out, status_json(&s), || status_table(&s))
        }
        Command::Member(MemberCommand::Remove { id }) => {
            let s = client.remove_member(pb::RemoveMemberRequest { id }).await?;
            emit(out, status_json(&s), || status_table(&s))
        }
    }
}

/// Prints the command's one result: the JSON document or the table text.
fn emit(out: Output, json: Value, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    match out {
        Output::Json => say(&format!("{}\n", serde_json::to_string_pretty(&json)?)),
        Output::Table => say(&table()),
    }
}

/// Writes to stdout; unlike `print!`, a closed pipe is an error to return, not a panic.
fn say(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

async fn node(client: &MetaClient, out: Output, cmd: NodeCommand) -> anyhow::Result<()> {
    let set = |node, state: pb::NodeState| pb::SetNodeStateRequest { node, state: state as i32 };
    let req = match cmd {
        NodeCommand::List => {
            let nodes = client.list_nodes().await?.nodes;
            return emit(out, json!({ "nodes": nodes.iter().map(node_json).collect::<Vec<_>>() }), || {
                nodes_table(&nodes)
            });
        }
        NodeCommand::Remove { id } => {
            client.remove_node(pb::RemoveNodeRequest { node: id }).await?;
            return emit(out, json!({ "removed": id }), || format!("node {id} removed\n"));
        }
        NodeCommand::Cordon { id } => set(id, pb::NodeState::Cordoned),
        NodeCommand::Uncordon { id } => set(id, pb::NodeState::Up),
        NodeCommand::Drain { id } => set(id, pb::NodeState::Draining),
    };
    let n = client.set_node_state(req).await?;
    emit(out, node_json(&n), || format!("node {} is now {}\n", n.id, node_state(n.state)))
}

async fn volume(client: &MetaClient, out: Output, cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create(a) => {
            let req = pb::CreateVolumeRequest {
                name: a.name,
                size_bytes: a.size,
                chunk_size_bytes: a.chunk_size.unwrap_or(0),
                replicas: a.replicas.unwrap_or(0),
                min_in_sync: a.min_in_sync.unwrap_or(0),
                zones: a.zones,
                zone_spread: if a.zone_spread == "required" {
                    pb::ZoneSpread::Required
                } else {
                    pb::ZoneSpread::Preferred
                } as i32,
            };
            let v = client.create_volume(req).await?;
            emit(out, volume_json(&v), || volumes_table(std::slice::from_ref(&v)))
        }
        VolumeCommand::List => {
            let vols = client.list_volumes().await?.volumes;
            emit(out, json!({ "volumes": vols.iter().map(volume_json).collect::<Vec<_>>() }), || volumes_table(&vols))
        }
        VolumeCommand::Inspect { name, chunks } => {
            let l = client.inspect_volume(pb::InspectVolumeRequest { volume: name }).await?;
            emit(out, layout_json(&l), || inspect_text(&l, chunks))
        }
        VolumeCommand::Grow { name, size } => {
            let v = client.grow_volume(pb::GrowVolumeRequest { volume: name, size_bytes: size }).await?;
            emit(out, volume_json(&v), || volumes_table(std::slice::from_ref(&v)))
        }
        VolumeCommand::Delete { name, yes } => {
            if !yes {
                bail!("refusing to delete volume {name:?} without --yes");
            }
            let r = client.delete_volume(pb::DeleteVolumeRequest { volume: name.clone() }).await?;
            emit(out, json!({ "deleted": name, "chunk_replicas": r.chunk_replicas }), || {
                format!("volume {name:?} deleted; {} chunk replicas to reclaim on the nodes\n", r.chunk_replicas)
            })
        }
    }
}

async fn jobs(client: &MetaClient, out: Output, args: JobsArgs) -> anyhow::Result<()> {
    let names = volume_names(client).await?;
    let list = client.list_jobs(pb::ListJobsRequest { all: args.all }).await?.jobs;
    if !args.watch {
        return emit(out, json!({ "jobs": list.iter().map(job_json).collect::<Vec<_>>() }), || {
            jobs_table(&list, &names)
        });
    }
    if std::io::stdout().is_terminal() {
        watch_bars(client, list, names).await
    } else {
        watch_lines(client, list, names).await
    }
}

fn is_active(j: &pb::Job) -> bool {
    matches!(pb::JobState::try_from(j.state), Ok(pb::JobState::Pending | pb::JobState::Running))
}

const WATCH_EVERY: Duration = Duration::from_secs(1);

/// One progress bar per active job, refreshed every second until none is active.
async fn watch_bars(client: &MetaClient, mut list: Vec<pb::Job>, names: HashMap<u64, String>) -> anyhow::Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
    let style = ProgressStyle::with_template("{prefix:<40} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
        .context("progress bar template")?
        .progress_chars("=> ");
    let mut bars: BTreeMap<u64, ProgressBar> = BTreeMap::new();
    loop {
        let active: Vec<&pb::Job> = list.iter().filter(|j| is_active(j)).collect();
        for j in &active {
            let bar = bars.entry(j.id).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(j.chunk_len));
                b.set_style(style.clone());
                b.set_prefix(job_title(j, &names));
                b
            });
            bar.set_length(j.chunk_len);
            bar.set_position(j.bytes_done.min(j.chunk_len));
            bar.set_message(job_state(j.state));
        }
        // Jobs that left the active list finished or failed: say which, keep the bar.
        let gone: Vec<u64> = bars.keys().copied().filter(|id| !active.iter().any(|j| j.id == *id)).collect();
        for id in gone {
            if let Some(bar) = bars.remove(&id) {
                bar.finish_with_message(outcome(&list, id));
            }
        }
        if active.is_empty() {
            break;
        }
        tokio::time::sleep(WATCH_EVERY).await;
        // All jobs, so that the ones that just ended show how.
        list = client.list_jobs(pb::ListJobsRequest { all: true }).await?.jobs;
    }
    say("no active jobs\n")
}

/// Not a terminal: one line per active job whenever its progress changes.
async fn watch_lines(client: &MetaClient, mut list: Vec<pb::Job>, names: HashMap<u64, String>) -> anyhow::Result<()> {
    let mut last: HashMap<u64, (i32, u64)> = HashMap::new();
    loop {
        let active: Vec<&pb::Job> = list.iter().filter(|j| is_active(j)).collect();
        for j in &active {
            if last.insert(j.id, (j.state, j.bytes_done)) != Some((j.state, j.bytes_done)) {
                say(&format!("{}: {} {}\n", job_title(j, &names), job_state(j.state), progress(j)))?;
            }
        }
        for id in last.keys().copied().filter(|id| !active.iter().any(|j| j.id == *id)).collect::<Vec<_>>() {
            last.remove(&id);
            say(&format!("job {id}: {}\n", outcome(&list, id)))?;
        }
        if active.is_empty() {
            return say("no active jobs\n");
        }
        tokio::time::sleep(WATCH_EVERY).await;
        list = client.list_jobs(pb::ListJobsRequest { all: true }).await?.jobs;
    }
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

async fn volume_names(client: &MetaClient) -> anyhow::Result<HashMap<u64, String>> {
    Ok(client.list_volumes().await?.volumes.into_iter().map(|v| (v.id, v.name)).collect())
}

// ---- enum names -------------------------------------------------------------

fn node_state(v: i32) -> String {
    match pb::NodeState::try_from(v) {
        Ok(pb::NodeState::Up) => "up".into(),
        Ok(pb::NodeState::Suspect) => "suspect".into(),
        Ok(pb::NodeState::Down) => "down".into(),
        Ok(pb::NodeState::Cordoned) => "cordoned".into(),
        Ok(pb::NodeState::Draining) => "draining".into(),
        Ok(pb::NodeState::Unspecified) | Err(_) => format!("unknown({v})"),
    }
}

/// A node's disk health; unspecified (a meta older than disk probing) is ok, as
/// meta itself treats it.
fn disk_health(v: i32) -> String {
    match pb::DiskHealth::try_from(v) {
        Ok(pb::DiskHealth::DiskOk | pb::DiskHealth::Unspecified) => "ok".into(),
        Ok(pb::DiskHealth::DiskFull) => "full".into(),
        Ok(pb::DiskHealth::DiskFailed) => "failed".into(),
        Err(_) => format!("unknown({v})"),
    }
}

/// The DISK column: the health, and why a failed disk failed.
fn disk_cell(n: &pb::Node) -> String {
    match disk_health(n.disk).as_str() {
        "failed" if !n.disk_error.is_empty() => format!("failed: {}", n.disk_error.replace('\n', " ")),
        h => h.to_string(),
    }
}

fn role(v: i32) -> String {
    match pb::ReplicaRole::try_from(v) {
        Ok(pb::ReplicaRole::InSync) => "in-sync".into(),
        Ok(pb::ReplicaRole::Rebuilding) => "rebuilding".into(),
        Ok(pb::ReplicaRole::Ejected) => "ejected".into(),
        Ok(pb::ReplicaRole::Unspecified) | Err(_) => format!("unknown({v})"),
    }
}

fn job_kind(v: i32) -> String {
    match pb::JobKind::try_from(v) {
        Ok(pb::JobKind::Rebuild) => "rebuild".into(),
        Ok(pb::JobKind::Resync) => "resync".into(),
        Ok(pb::JobKind::Unspecified) | Err(_) => format!("unknown({v})"),
    }
}

fn job_state(v: i32) -> String {
    match pb::JobState::try_from(v) {
        Ok(pb::JobState::Pending) => "pending".into(),
        Ok(pb::JobState::Running) => "running".into(),
        Ok(pb::JobState::Done) => "done".into(),
        Ok(pb::JobState::Failed) => "failed".into(),
        Ok(pb::JobState::Unspecified) | Err(_) => format!("unknown({v})"),
    }
}

// ---- JSON documents (keys: the proto's field names; sizes in bytes) ----------

fn status_json(s: &pb::StatusResponse) -> Value {
    json!({
        "id": s.id,
        "leader": s.leader,
        "term": s.term,
        "last_log_index": s.last_log_index,
        "applied_index": s.applied_index,
        "members": s.members.iter().map(|m| json!({ "id": m.id, "addr": m.addr, "voter": m.voter })).collect::<Vec<_>>(),
        "nodes": s.nodes,
        "nodes_up": s.nodes_up,
        "volumes": s.volumes,
        "degraded_chunks": s.degraded_chunks,
        "jobs_active": s.jobs_active,
    })
}

fn node_json(n: &pb::Node) -> Value {
    json!({
        "id": n.id,
        "addr": n.addr,
        "zone": n.zone,
        "capacity_bytes": n.capacity_bytes,
        "allocated_bytes": n.allocated_bytes,
        "used_bytes": n.used_bytes,
        "state": node_state(n.state),
        "heartbeat_age_ms": n.heartbeat_age_ms,
        "disk": disk_health(n.disk),
        "disk_error": n.disk_error,
    })
}

fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "size_bytes": v.size_bytes,
        "chunk_size_bytes": v.chunk_size_bytes,
        "replicas": v.replicas,
        "min_in_sync": v.min_in_sync,
        "zones": v.zones,
        "zone_spread": spread_text(v.zone_spread),
        "published_node": v.published_node,
        "epoch": v.epoch,
        "attached_to": v.attached_to,
        "layout_gen": v.layout_gen,
        "degraded_chunks": v.degraded_chunks,
    })
}

fn chunk_json(c: &pb::Chunk) -> Value {
    json!({
        "index": c.index,
        "version": c.version,
        "replicas": c.replicas.iter().map(|r| json!({ "node": r.node, "role": role(r.role) })).collect::<Vec<_>>(),
    })
}

fn layout_json(l: &pb::VolumeLayout) -> Value {
    let h = health(l);
    json!({
        "volume": l.volume.as_ref().map(volume_json),
        "nodes": l.nodes.iter().map(node_json).collect::<Vec<_>>(),
        "zones": zone_spread(l).iter().map(|z| json!({
            "zone": z.zone,
            "nodes": z.nodes,
            "in_sync": z.in_sync,
            "rebuilding": z.rebuilding,
            "ejected": z.ejected,
        })).collect::<Vec<_>>(),
        "health": {
            "chunks": h.chunks,
            "chunks_full": h.full,
            "chunks_degraded": h.degraded,
            "chunks_below_min_in_sync": h.below_min,
            "replicas_in_sync": h.in_sync,
            "replicas_rebuilding": h.rebuilding,
            "replicas_ejected": h.ejected,
        },
        "chunks": l.chunks.iter().map(chunk_json).collect::<Vec<_>>(),
    })
}

fn job_json(j: &pb::Job) -> Value {
    json!({
        "id": j.id,
        "kind": job_kind(j.kind),
        "volume": j.volume,
        "chunk": j.chunk,
        "target": j.target,
        "sources": j.sources.iter().map(|n| n.id).collect::<Vec<_>>(),
        "replaces": j.replaces,
        "state": job_state(j.state),
        "chunk_len": j.chunk_len,
        "bytes_done": j.bytes_done,
        "blocks_copied": j.blocks_copied,
        "epoch": j.epoch,
        "error": j.error,
        "attempts": j.attempts,
    })
}

fn what_if_json(target: Value, r: &pb::WhatIfResponse) -> Value {
    json!({
        "target": target,
        "volumes": r.volumes.iter().map(|v| json!({
            "volume": v.volume,
            "name": v.name,
            "chunks_degraded": v.chunks_degraded,
            "chunks_unwritable": v.chunks_unwritable,
            "chunks_unavailable": v.chunks_unavailable,
        })).collect::<Vec<_>>(),
        "unaffected": r.unaffected,
    })
}

// ---- tables ------------------------------------------------------------------

/// Aligned columns under a header; two spaces between columns, no trailing blanks.
struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&'static str]) -> Self {
        Table { header: header.to_vec(), rows: Vec::new() }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let cols = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                if i + 1 < cols {
                    line.push_str(&format!("{c:<w$}  ", w = width[i]));
                } else {
                    line.push_str(c);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Lines of "Key  value" with the keys aligned.
fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs.iter().map(|(k, v)| format!("{k:<w$}  {v}\n")).collect()
}

fn status_table(s: &pb::StatusResponse) -> String {
    let leader = if s.leader == 0 { "none (election in progress?)".to_string() } else { s.leader.to_string() };
    let mut out = key_values(&[
        ("Answered by", format!("member {}", s.id)),
        ("Leader", leader),
        ("Term", s.term.to_string()),
        ("Log", format!("last index {}, applied {}", s.last_log_index, s.applied_index)),
        ("Nodes", format!("{} ({} up)", s.nodes, s.nodes_up)),
        ("Volumes", s.volumes.to_string()),
        ("Degraded chunks", s.degraded_chunks.to_string()),
        ("Active jobs", s.jobs_active.to_string()),
    ]);
    out.push('\n');
    let mut t = Table::new(&["MEMBER", "ADDRESS", "ROLE"]);
    for m in &s.members {
        let mut role = if m.voter { "voter" } else { "learner" }.to_string();
        if m.id == s.leader {
            role.push_str(", leader");
        }
        t.row(vec![m.id.to_string(), m.addr.clone(), role]);
    }
    out.push_str(&t.render());
    out
}

fn nodes_table(nodes: &[pb::Node]) -> String {
    let mut t = Table::new(&["ID", "ZONE", "ADDRESS", "STATE", "DISK", "CAPACITY", "ALLOCATED", "USED", "HEARTBEAT"]);
    for n in nodes {
        t.row(vec![
            n.id.to_string(),
            n.zone.clone(),
            n.addr.clone(),
            node_state(n.state),
            disk_cell(n),
            format_size(n.capacity_bytes),
            format_size(n.allocated_bytes),
            format_size(n.used_bytes),
            format_age(n.heartbeat_age_ms),
        ]);
    }
    t.render()
}

fn volumes_table(vols: &[pb::Volume]) -> String {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "SIZE",
        "CHUNK",
        "REPLICAS",
        "MIN-IN-SYNC",
        "ZONES",
        "EPOCH",
        "ATTACHED",
        "DEGRADED",
    ]);
    for v in vols {
        t.row(vec![
            v.id.to_string(),
            v.name.clone(),
            format_size(v.size_bytes),
            format_size(v.chunk_size_bytes),
            v.replicas.to_string(),
            v.min_in_sync.to_string(),
            zones_text(&v.zones),
            v.epoch.to_string(),
            if v.attached_to == 0 { "-".into() } else { format!("node {}", v.attached_to) },
            v.degraded_chunks.to_string(),
        ]);
    }
    t.render()
}

fn spread_text(z: i32) -> &'static str {
    match pb::ZoneSpread::try_from(z) {
        Ok(pb::ZoneSpread::Required) => "required",
        _ => "preferred",
    }
}

fn zones_text(z: &[String]) -> String {
    if z.is_empty() {
        "any".into()
    } else {
        z.join(",")
    }
}

/// One zone's share of a volume's replicas.
#[derive(Debug, PartialEq, Eq)]
struct ZoneSpread {
    zone: String,
    nodes: usize,
    in_sync: usize,
    rebuilding: usize,
    ejected: usize,
}

fn zone_spread(l: &pb::VolumeLayout) -> Vec<ZoneSpread> {
    let zone_of: HashMap<u64, &str> = l.nodes.iter().map(|n| (n.id, n.zone.as_str())).collect();
    let mut by_zone: BTreeMap<String, ZoneSpread> = BTreeMap::new();
    let entry = |m: &mut BTreeMap<String, ZoneSpread>, z: &str| {
        m.entry(z.to_string()).or_insert_with(|| ZoneSpread {
            zone: z.to_string(),
            nodes: 0,
            in_sync: 0,
            rebuilding: 0,
            ejected: 0,
        });
    };
    for n in &l.nodes {
        entry(&mut by_zone, &n.zone);
        if let Some(z) = by_zone.get_mut(&n.zone) {
            z.nodes += 1;
        }
    }
    for c in &l.chunks {
        for r in &c.replicas {
            let zone = zone_of.get(&r.node).copied().unwrap_or("?");
            entry(&mut by_zone, zone);
            if let Some(z) = by_zone.get_mut(zone) {
                match pb::ReplicaRole::try_from(r.role) {
                    Ok(pb::ReplicaRole::InSync) => z.in_sync += 1,
                    Ok(pb::ReplicaRole::Rebuilding) => z.rebuilding += 1,
                    Ok(pb::ReplicaRole::Ejected) => z.ejected += 1,
                    Ok(pb::ReplicaRole::Unspecified) | Err(_) => {}
                }
            }
        }
    }
    by_zone.into_values().collect()
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Health {
    chunks: usize,
    /// As many in-sync replicas as configured.
    full: usize,
    /// Fewer in-sync replicas than configured, still at least min-in-sync.
    degraded: usize,
    /// Fewer than min-in-sync: writes fail until rebuilt.
    below_min: usize,
    in_sync: usize,
    rebuilding: usize,
    ejected: usize,
}

fn health(l: &pb::VolumeLayout) -> Health {
    let (replicas, min) = l.volume.as_ref().map_or((0, 0), |v| (v.replicas as usize, v.min_in_sync as usize));
    let mut h = Health { chunks: l.chunks.len(), ..Health::default() };
    for c in &l.chunks {
        let count = |want: pb::ReplicaRole| c.replicas.iter().filter(|r| r.role == want as i32).count();
        let in_sync = count(pb::ReplicaRole::InSync);
        h.in_sync += in_sync;
        h.rebuilding += count(pb::ReplicaRole::Rebuilding);
        h.ejected += count(pb::ReplicaRole::Ejected);
        if in_sync < min {
            h.below_min += 1;
        } else if in_sync < replicas {
            h.degraded += 1;
        } else {
            h.full += 1;
        }
    }
    h
}

fn inspect_text(l: &pb::VolumeLayout, max_chunks: Option<usize>) -> String {
    let mut pairs = Vec::new();
    if let Some(v) = &l.volume {
        let size = format_size(v.size_bytes);
        pairs.push(("Volume", format!("{} (id {})", v.name, v.id)));
        pairs.push(("Size", format!("{size} in {} chunks of {}", l.chunks.len(), format_size(v.chunk_size_bytes))));
        pairs.push((
            "Replication",
            format!(
                "{} replicas per chunk, min-in-sync {}, zones {} (spread {})",
                v.replicas,
                v.min_in_sync,
                zones_text(&v.zones),
                spread_text(v.zone_spread)
            ),
        ));
        if v.published_node != 0 {
            pairs.push(("Published", format!("to node {}", v.published_node)));
        }
        pairs.push((
            "Attached",
            if v.attached_to == 0 {
                format!("no (epoch {})", v.epoch)
            } else {
                format!("to node {} (epoch {})", v.attached_to, v.epoch)
            },
        ));
        pairs.push(("Layout gen", v.layout_gen.to_string()));
    }
    let h = health(l);
    pairs.push((
        "Chunks",
        format!("{} fully replicated, {} degraded, {} below min-in-sync", h.full, h.degraded, h.below_min),
    ));
    pairs.push(("Replicas", format!("{} in-sync, {} rebuilding, {} ejected", h.in_sync, h.rebuilding, h.ejected)));
    let mut out = key_values(&pairs);
    out.push('\n');
    let mut t = Table::new(&["ZONE", "NODES", "IN-SYNC", "REBUILDING", "EJECTED"]);
    for z in zone_spread(l) {
        t.row(vec![
            z.zone,
            z.nodes.to_string(),
            z.in_sync.to_string(),
            z.rebuilding.to_string(),
            z.ejected.to_string(),
        ]);
    }
    out.push_str(&t.render());
    out.push('\n');
    let shown = max_chunks.unwrap_or(usize::MAX).min(l.chunks.len());
    let mut t = Table::new(&["CHUNK", "VERSION", "REPLICAS"]);
    for c in &l.chunks[..shown] {
        let replicas: Vec<String> = c.replicas.iter().map(|r| format!("{}({})", r.node, role(r.role))).collect();
        t.row(vec![c.index.to_string(), c.version.to_string(), replicas.join(" ")]);
    }
    out.push_str(&t.render());
    if shown < l.chunks.len() {
        out.push_str(&format!("... {} more chunks (--chunks N shows more)\n", l.chunks.len() - shown));
    }
    out
}

fn job_title(j: &pb::Job, names: &HashMap<u64, String>) -> String {
    let vol = names.get(&j.volume).cloned().unwrap_or_else(|| format!("vol-{}", j.volume));
    format!("job {} {} {vol}/chunk {} -> node {}", j.id, job_kind(j.kind), j.chunk, j.target)
}

fn progress(j: &pb::Job) -> String {
    let pct = if j.chunk_len == 0 { 0 } else { (u128::from(j.bytes_done) * 100 / u128::from(j.chunk_len)) as u64 };
    format!("{} / {} ({pct}%)", format_size(j.bytes_done), format_size(j.chunk_len))
}

fn jobs_table(jobs: &[pb::Job], names: &HashMap<u64, String>) -> String {
    let mut t =
        Table::new(&["ID", "KIND", "VOLUME", "CHUNK", "TARGET", "REPLACES", "STATE", "PROGRESS", "ATTEMPTS", "ERROR"]);
    for j in jobs {
        t.row(vec![
            j.id.to_string(),
            job_kind(j.kind),
            names.get(&j.volume).cloned().unwrap_or_else(|| j.volume.to_string()),
            j.chunk.to_string(),
            j.target.to_string(),
            if j.replaces == 0 { "-".into() } else { j.replaces.to_string() },
            job_state(j.state),
            progress(j),
            j.attempts.to_string(),
            if j.error.is_empty() { "-".into() } else { j.error.replace('\n', " ") },
        ]);
    }
    t.render()
}

fn what_if_table(r: &pb::WhatIfResponse) -> String {
    let mut t = Table::new(&["VOLUME", "NAME", "DEGRADED", "UNWRITABLE", "UNAVAILABLE"]);
    for v in &r.volumes {
        t.row(vec![
            v.volume.to_string(),
            v.name.clone(),
            v.chunks_degraded.to_string(),
            v.chunks_unwritable.to_string(),
            v.chunks_unavailable.to_string(),
        ]);
    }
    let mut out = if r.volumes.is_empty() { "no volume affected\n".to_string() } else { t.render() };
    out.push_str(&format!("{} volume(s) unaffected\n", r.unaffected));
    out
}

// ---- units ---------------------------------------------------------------------

/// `0 B`, `512 B`, `4 KiB`, `1.5 GiB`: the largest unit that keeps the number ≥ 1,
/// one decimal when it is not whole.
fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u64 << (10 * unit);
    // Tenths, rounded half up, computed in integers.
    let tenths = (u128::from(bytes) * 10 + u128::from(scale) / 2) / u128::from(scale);
    if tenths % 10 == 0 {
        format!("{} {}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

fn format_age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms ago"),
        1_000..=119_999 => format!("{}.{}s ago", ms / 1000, ms % 1000 / 100),
        _ => format!("{}m ago", ms / 60_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_format_human_readable() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size((10 << 30) - 1), "10 GiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let mut t = Table::new(&["ID", "NAME", "SIZE"]);
        t.row(vec!["1".into(), "pg-data".into(), "10 GiB".into()]);
        t.row(vec!["12".into(), "x".into(), "".into()]);
        assert_eq!(t.render(), "ID  NAME     SIZE\n1   pg-data  10 GiB\n12  x\n");
    }

    fn layout() -> pb::VolumeLayout {
        let r = |node, role: pb::ReplicaRole| pb::ChunkReplica { node, role: role as i32 };
        use pb::ReplicaRole::*;
        pb::VolumeLayout {
            volume: Some(pb::Volume {
                id: 3,
                name: "pg".into(),
                size_bytes: 3 << 20,
                chunk_size_bytes: 1 << 20,
                replicas: 3,
                min_in_sync: 2,
                epoch: 4,
                attached_to: 1,
                layout_gen: 7,
                degraded_chunks: 2,
                ..Default::default()
            }),
            chunks: vec![
                pb::Chunk { index: 0, version: 1, replicas: vec![r(1, InSync), r(2, InSync), r(3, InSync)] },
                pb::Chunk {
                    index: 1,
                    version: 3,
                    replicas: vec![r(1, InSync), r(2, InSync), r(4, Rebuilding), r(3, Ejected)],
                },
                pb::Chunk { index: 2, version: 5, replicas: vec![r(1, InSync), r(3, Ejected), r(2, Ejected)] },
            ],
            nodes: (1..=4)
                .map(|id| pb::Node {
                    id,
                    addr: format!("10.0.0.{id}:7001"),
                    zone: if id == 4 { "z1".into() } else { format!("z{id}") },
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn inspect_counts_health_and_zone_spread() {
        let l = layout();
        assert_eq!(
            health(&l),
            Health { chunks: 3, full: 1, degraded: 1, below_min: 1, in_sync: 6, rebuilding: 1, ejected: 3 }
        );
        let z = zone_spread(&l);
        assert_eq!(z[0], ZoneSpread { zone: "z1".into(), nodes: 2, in_sync: 3, rebuilding: 1, ejected: 0 });
        assert_eq!(z[2], ZoneSpread { zone: "z3".into(), nodes: 1, in_sync: 1, rebuilding: 0, ejected: 2 });
        let text = inspect_text(&l, Some(2));
        assert!(text.starts_with("Volume       pg (id 3)\nSize         3 MiB in 3 chunks of 1 MiB\n"), "{text}");
        assert!(text.contains("\nChunks       1 fully replicated, 1 degraded, 1 below min-in-sync\n"), "{text}");
        assert!(text.contains("\nz1    2      3        1           0\n"), "{text}");
        assert!(text.contains("\n1      3        1(in-sync) 2(in-sync) 4(rebuilding) 3(ejected)\n"), "{text}");
        assert!(text.ends_with("... 1 more chunks (--chunks N shows more)\n"), "{text}");
        assert!(!text.contains("2(ejected)"), "the third chunk is cut: {text}");
    }

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

    #[test]
    fn json_documents_have_stable_keys_and_raw_bytes() {
        let j = layout_json(&layout());
        assert_eq!(j["volume"]["size_bytes"], 3 << 20);
        assert_eq!(j["chunks"][1]["replicas"][2], json!({ "node": 4, "role": "rebuilding" }));
        assert_eq!(j["health"]["chunks_below_min_in_sync"], 1);
        assert_eq!(j["zones"][0]["zone"], "z1");
        let mut keys: Vec<&String> = j.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["chunks", "health", "nodes", "volume", "zones"]);
        let n = node_json(&pb::Node { id: 2, state: pb::NodeState::Draining as i32, ..Default::default() });
        assert_eq!(n["state"], "draining");
        assert_eq!((&n["disk"], &n["disk_error"]), (&json!("ok"), &json!("")), "unspecified is ok");
        assert_eq!(node_state(42), "unknown(42)");
    }

    #[test]
    fn node_list_shows_disk_health() {
        let node = |id, disk: pb::DiskHealth, error: &str| pb::Node {
            id,
            zone: "z1".into(),
            state: pb::NodeState::Up as i32,
            disk: disk as i32,
            disk_error: error.into(),
            ..Default::default()
        };
        let nodes = vec![
            node(1, pb::DiskHealth::DiskOk, ""),
            node(2, pb::DiskHealth::DiskFull, ""),
            node(3, pb::DiskHealth::DiskFailed, "write DATA/.probe: Input/output error\n(os error 5)"),
        ];
        let text = nodes_table(&nodes);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains(" STATE  DISK "), "{text}");
        assert!(lines[1].contains(" up     ok "), "{text}");
        assert!(lines[2].contains(" up     full "), "{text}");
        assert!(lines[3].contains(" up     failed: write DATA/.probe: Input/output error (os error 5) "), "{text}");
        let j = node_json(&nodes[2]);
        assert_eq!(j["disk"], "failed");
        assert_eq!(j["disk_error"], "write DATA/.probe: Input/output error\n(os error 5)");
        assert_eq!(node_json(&nodes[1])["disk"], "full");
        assert_eq!(disk_health(9), "unknown(9)");
    }
}
