//! `ballastctl`: the operator's command line for a Ballast cluster. It talks to
//! the metadata service's Admin API (any member; `--meta` lists them).
//!
//! ```text
//!   ballastctl status
//!   ballastctl node list | cordon ID | uncordon ID | drain ID | remove ID
//!   ballastctl volume create NAME --size 10GiB [--replicas 3] [--min-in-sync N] [--chunk-size 64MiB] [--zones a,b]
//!   ballastctl volume list | inspect NAME [--chunks N] | grow NAME --size S | delete NAME --yes
//!   ballastctl snapshot create VOLUME NAME [--no-wait] | list [--volume V] | delete NAME
//!   ballastctl jobs [--all] [--watch]
//!   ballastctl what-if down --node ID | --zone NAME
//!   ballastctl member add ID ADDR | remove ID
//! ```
//!
//! Tables for people (sizes human-readable), `--output json` for scripts: one
//! JSON document per command, keys named after the proto's fields, sizes in
//! bytes. Errors: one line on stderr (`ballastctl: ...`) and exit code 1;
//! argument errors exit 2 (clap's usage message).
//!
//! The parts: this file (flags and dispatch), `commands.rs` (one function per
//! command: the calls to meta), `render.rs` (tables and text for people,
//! stdout), `json.rs` (the `--output json` documents), `progress.rs` (`jobs
//! --watch`: progress bars on a terminal, lines otherwise).

mod commands;
#[path = "../../dev_record.rs"]
mod dev_record;
mod json;
mod progress;
mod render;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_metaclient::{parse_endpoints, MetaClient, MetaClientOptions};
use ballast_types::units::{parse_duration, parse_size};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "ballastctl", version, about = "Operate a Ballast cluster through its metadata service")]
struct Cli {
    /// Metadata service members (comma-separated host:port); any one answering is enough.
    #[arg(long, visible_alias = "endpoint", global = true, env = "BALLAST_META", default_value = "127.0.0.1:7400")]
    meta: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// An admin (or reader) certificate: a directory with ca.crt, tls.crt and
    /// tls.key (`ballast certs issue --role admin`). Default: the admin
    /// certificate of the `ballast dev` cluster at these endpoints, if one ran here.
    #[arg(long, global = true, value_name = "DIR", env = "BALLAST_TLS_DIR")]
    tls_dir: Option<std::path::PathBuf>,
    /// Plaintext, for a cluster started with --insecure.
    #[arg(long, global = true, conflicts_with = "tls_dir")]
    insecure: bool,
    /// How long to keep trying when no member answers (e.g. 15s, 500ms, 2m; plain numbers are seconds).
    #[arg(long, global = true, default_value = "15s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
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
    /// Crash-consistent volume snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Rebuild and resync jobs (active ones unless --all).
    Jobs(JobsArgs),
    /// What losing a node or a zone would do to each volume.
    #[command(subcommand)]
    WhatIf(WhatIfCommand),
    /// Metadata service (Raft) members.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Cluster settings (kept in the metadata log).
    #[command(subcommand)]
    Settings(SettingsCommand),
}

#[derive(Subcommand, Debug)]
pub(crate) enum SettingsCommand {
    /// How much volume size a node may hold replicas of, in percent of its
    /// capacity (100..=1000; default 200): volumes are thin, so above 100 the
    /// disks may fill before the volumes do, and writes then get ENOSPC.
    OverProvisioning {
        /// e.g. 300 or 300%.
        #[arg(value_parser = parse_percent)]
        pct: u32,
    },
}

fn parse_percent(s: &str) -> Result<u32, String> {
    let n = s.strip_suffix('%').unwrap_or(s).trim();
    n.parse::<u32>().map_err(|_| format!("invalid percentage {s:?}: expected e.g. 300 or 300%"))
}

#[derive(Subcommand, Debug)]
pub(crate) enum NodeCommand {
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
pub(crate) enum VolumeCommand {
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

#[derive(Subcommand, Debug)]
pub(crate) enum SnapshotCommand {
    /// Snapshot a volume, attached or not (idempotent by name). Waits until it
    /// is ready: an attached volume's front end takes it within a layout poll.
    Create {
        /// The volume: name or numeric id.
        volume: String,
        /// The snapshot's name, unique in the cluster.
        name: String,
        /// Return at once, possibly before the snapshot is ready.
        #[arg(long)]
        no_wait: bool,
    },
    /// Snapshots, oldest first.
    List {
        /// Only this volume's (name or id).
        #[arg(long)]
        volume: Option<String>,
    },
    /// Delete a snapshot; every replica reclaims its space.
    Delete {
        /// Name or numeric id.
        name: String,
    },
}

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    pub(crate) name: String,
    /// Size: plain bytes or with a unit (KiB, MiB, GiB, TiB; K/M/G/T and KB/MB/GB/TB mean the same).
    #[arg(long, value_parser = parse_size)]
    pub(crate) size: u64,
    /// Replicas per chunk [service default: 3].
    #[arg(long)]
    pub(crate) replicas: Option<u32>,
    /// Replicas a write must reach [service default: replicas / 2 + 1].
    #[arg(long)]
    pub(crate) min_in_sync: Option<u32>,
    /// Chunk size [service default: 64MiB].
    #[arg(long, value_parser = parse_size)]
    pub(crate) chunk_size: Option<u64>,
    /// Zones to place replicas in (comma-separated) [default: any].
    #[arg(long, value_delimiter = ',')]
    pub(crate) zones: Vec<String>,
    /// `required`: never two replicas of a chunk in one zone (creation fails when
    /// zones run short); `preferred`: as even as the zones allow.
    #[arg(long, default_value = "preferred", value_parser = ["preferred", "required"])]
    pub(crate) zone_spread: String,
    /// Create the volume as a clone of this ready snapshot (name or id): it
    /// holds the snapshot's data at once (copied in the background while it
    /// is attached) and must be at least the snapshot's size.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with = "from_volume")]
    pub(crate) from_snapshot: Option<String>,
    /// Create the volume as a clone of this volume's content now (name or
    /// id), attached or not: a snapshot of it is made for the clone and goes
    /// once the clone is independent; at least the source's size. Waits until
    /// that snapshot is taken (see --timeout).
    #[arg(long, value_name = "VOLUME")]
    pub(crate) from_volume: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct JobsArgs {
    /// Also recently finished jobs.
    #[arg(long)]
    pub(crate) all: bool,
    /// Follow the active jobs every second until none is left (progress bars on a terminal).
    #[arg(long)]
    pub(crate) watch: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum WhatIfCommand {
    /// Per volume: chunks that would be degraded, unwritable or unavailable.
    Down(DownArgs),
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub(crate) struct DownArgs {
    /// A storage node going down.
    #[arg(long)]
    pub(crate) node: Option<u64>,
    /// A whole zone going down.
    #[arg(long)]
    pub(crate) zone: Option<String>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum MemberCommand {
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

/// The admin certificate `ballast dev` recorded for its cluster, when one of
/// `endpoints` is one of its members.
fn dev_admin_dir(endpoints: &[String]) -> Option<std::path::PathBuf> {
    let (meta, dir) = dev_record::read()?;
    let members = parse_endpoints(&meta);
    (endpoints.iter().any(|e| members.contains(e)) && dir.is_dir()).then_some(dir)
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
    let endpoints = parse_endpoints(&cli.meta);
    let tls_dir = match (&cli.tls_dir, cli.insecure) {
        (Some(d), _) => Some(d.clone()),
        (None, true) => None,
        (None, false) => Some(dev_admin_dir(&endpoints).ok_or_else(|| {
            anyhow::anyhow!(
                "no admin certificate: pass --tls-dir DIR (see `ballast certs issue --role admin`), \
                 or --insecure for a cluster started with --insecure"
            )
        })?),
    };
    let security = if cli.insecure {
        ballast_metaclient::Security::Insecure
    } else {
        ballast_metaclient::Security::from_flags(tls_dir.as_deref(), false, "ballastctl")?
    };
    let client = MetaClient::with_options(endpoints, options, security)?;
    let out = cli.output;
    match cli.command {
        Command::Status => commands::status(&client, out).await,
        Command::Node(cmd) => commands::node(&client, out, cmd).await,
        Command::Settings(cmd) => commands::settings(&client, out, cmd).await,
        Command::Volume(cmd) => commands::volume(&client, out, cmd, cli.timeout).await,
        Command::Snapshot(cmd) => commands::snapshot(&client, out, cmd, cli.timeout).await,
        Command::Jobs(args) => commands::jobs(&client, out, args).await,
        Command::WhatIf(WhatIfCommand::Down(args)) => commands::what_if_down(&client, out, args).await,
        Command::Member(cmd) => commands::member(&client, out, cmd).await,
    }
}
