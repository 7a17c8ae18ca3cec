//! Command-line arguments of every subcommand (clap derive).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ballast_frontend::ScrubConfig;
use ballast_types::units::{parse_duration, parse_size};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "ballast", version, about = "Replicated block storage for Kubernetes stateful pods")]
pub struct Cli {
    /// Log format on stderr: `text` (colours only when stderr is a terminal) or
    /// `json` (one object per line, for log shippers).
    #[arg(long, global = true, value_enum, default_value = "text", env = "BALLAST_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--metrics-listen`, shared by every long-running subcommand.
#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on `GET /metrics` at this address (e.g.
    /// 0.0.0.0:9820; port 0 picks a free port, printed as `ready metrics addr=...`).
    #[arg(long, value_name = "ADDR", env = "BALLAST_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// `--tls-dir` / `--insecure`, shared by every subcommand that opens a TCP channel.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// Mutual TLS with the certificate in DIR: ca.crt (the cluster CA, or two
    /// during a CA rotation), tls.crt and tls.key, as `ballast certs issue`
    /// writes them and as a Kubernetes TLS Secret mounts them. Renewed files are
    /// picked up without a restart.
    #[arg(long, value_name = "DIR", env = "BALLAST_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Plaintext channels with no authentication: any process that reaches a
    /// port may do anything. For experiments only; a warning is logged.
    #[arg(long)]
    pub insecure: bool,
}

impl TlsArgs {
    /// Plaintext is refused unless asked for.
    pub fn security(&self, process: &str) -> anyhow::Result<ballast_tls::Security> {
        Ok(ballast_tls::Security::from_flags(self.tls_dir.as_deref(), self.insecure, process)?)
    }

    /// [`TlsArgs::security`], refusing a certificate that does not name what
    /// `process` is (`wanted`, e.g. "node/3"): a process never runs as someone else.
    pub fn security_as(
        &self,
        process: &str,
        ok: impl Fn(&ballast_tls::Identity) -> bool,
        wanted: &str,
    ) -> anyhow::Result<ballast_tls::Security> {
        let security = self.security(process)?;
        if let Some(id) = security.identity() {
            let dir = self.tls_dir.as_deref().unwrap_or(std::path::Path::new("")).display();
            anyhow::ensure!(ok(&id), "--tls-dir {dir}: the certificate names {id}, but {process} runs as {wanted}");
        }
        Ok(security)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve one disk directory's chunk store to front ends over the data-path protocol.
    Replica(ReplicaArgs),
    /// Manage static volume definitions.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Attach a volume (new epoch, fencing older front ends) and export it over NBD.
    Export(ExportArgs),
    /// The embedded default: a whole local cluster in one process. Three meta members
    /// (Raft), three storage nodes in three zones on file-backed disks (chunk store,
    /// replica server, agent), a volume attached through meta and exported over NBD,
    /// and the CSI services on a unix socket. Kept across runs in --data.
    Dev(DevArgs),
    /// One member of the metadata service (openraft; nodes, volumes, placement, epochs, jobs).
    Meta(MetaArgs),
    /// A storage node: chunk store and replica server on one disk, registered with meta,
    /// running the rebuild and resync jobs meta assigns to it; with --csi-endpoint also
    /// the CSI Node service (the kubelet stages and publishes volumes through it).
    Node(Box<NodeArgs>),
    /// The CSI Controller service (with Identity) on a unix socket, for the
    /// external-provisioner, -attacher and -resizer sidecars.
    CsiController(CsiControllerArgs),
    /// The cluster CA and the certificates it issues (one identity each).
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key (0600). Refuses to replace one.
    Init(CertsInitArgs),
    /// Issue a certificate for one identity: OUT/ca.crt, OUT/tls.crt, OUT/tls.key
    /// (0600), replacing what is there (a renewal: running processes pick it up).
    Issue(CertsIssueArgs),
}

#[derive(Args, Debug)]
pub struct CertsInitArgs {
    /// Where the CA goes.
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// The CA's name (default: "Ballast cluster CA" and the time).
    #[arg(long)]
    pub name: Option<String>,
    /// Lifetime in days.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
}

#[derive(Args, Debug)]
pub struct CertsIssueArgs {
    /// The CA directory (`ballast certs init`).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// meta, node, frontend, csi-controller, admin or reader.
    #[arg(long)]
    pub role: String,
    /// The member or node id (meta, node, frontend) or a name (admin, reader).
    #[arg(long, conflicts_with = "node_data")]
    pub id: Option<String>,
    /// For a node or front end: take the id from this storage node's data
    /// directory (DATA/node-id), choosing and recording one first as `ballast
    /// node` would (for an init container that runs before the node).
    #[arg(long)]
    pub node_data: Option<PathBuf>,
    /// The directory to write (a `--tls-dir`).
    #[arg(long)]
    pub out: PathBuf,
    /// Lifetime in days.
    #[arg(long, default_value_t = 90)]
    pub days: u32,
    /// Keep running: look again at this interval and issue a new certificate
    /// once the one in OUT has a third of its lifetime left (or is missing,
    /// unreadable, or from another CA). For a sidecar beside a process that
    /// picks up renewed files by itself.
    #[arg(long, value_parser = parse_duration)]
    pub renew_every: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct CsiControllerArgs {
    /// The CSI socket, as the sidecars name it: unix:///csi/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,
    /// Meta members, comma-separated HOST:PORT.
    #[arg(long, env = "BALLAST_META", default_value = "127.0.0.1:7400")]
    pub meta: String,
    /// Serve GET /healthz (the CSI socket answers; never waits for meta) and GET
    /// /readyz (CSI Probe: meta answers too) over HTTP on this address, for the
    /// kubelet's probes.
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Args, Debug)]
pub struct MetaArgs {
    /// This member's id (1 or more, unique in the group).
    #[arg(long, env = "BALLAST_META_ID")]
    pub id: u64,
    /// Directory for the Raft log, votes and snapshots (redb).
    #[arg(long)]
    pub data: PathBuf,
    /// gRPC listen address (Raft, node and admin APIs).
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// A new cluster's voting members as ID=HOST:PORT,...; the lowest id initializes
    /// it. Leave out to join an existing cluster (`ballastctl member add`).
    #[arg(long, value_parser = parse_members)]
    pub initial_members: Option<BTreeMap<u64, String>>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub raft_heartbeat_ms: u64,
    /// Minimum election timeout in milliseconds (the maximum is twice this).
    #[arg(long, default_value_t = 1000)]
    pub election_ms: u64,
    /// A storage node silent this long is suspect (no new replicas on it).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub suspect_after: Duration,
    /// A storage node silent this long is down (its replicas are rebuilt elsewhere).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub down_after: Duration,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// This storage node's id (1 or more, unique in the cluster). Default: the id
    /// recorded in DATA/node-id, chosen at random on the first start.
    #[arg(long, env = "BALLAST_NODE_ID")]
    pub id: Option<u64>,
    /// Its failure zone.
    #[arg(long, env = "BALLAST_ZONE", required_unless_present = "zone_file", conflicts_with = "zone_file")]
    pub zone: Option<String>,
    /// A file holding the zone (e.g. written by an init container from the
    /// Kubernetes node's topology.kubernetes.io/zone label).
    #[arg(long)]
    pub zone_file: Option<PathBuf>,
    /// Disk directory holding the chunk store (created if missing).
    #[arg(long)]
    pub data: PathBuf,
    /// Replica server listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The address other nodes and front ends use (default: the bound address).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Meta members, comma-separated HOST:PORT.
    #[arg(long, env = "BALLAST_META", default_value = "127.0.0.1:7400")]
    pub meta: String,
    /// Capacity to offer (default: the size of the filesystem holding --data).
    #[arg(long, value_parser = parse_size)]
    pub capacity: Option<u64>,
    /// Heartbeat interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Throttle for each copy job (bytes per second, e.g. 200M; 0: unthrottled), so
    /// that rebuilds leave client I/O its latency.
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    pub copy_rate: u64,
    /// Free space below which the disk counts as full: no new replicas here, and its
    /// ejected replicas are rebuilt elsewhere (default: 1% of the filesystem, at
    /// least 64M, at most 1G).
    #[arg(long, value_parser = parse_size)]
    pub disk_reserve: Option<u64>,
    /// How often to look for chunk replicas meta no longer lists here (deleted
    /// volumes, replaced replicas); one is deleted after two looks agree.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub gc_every: Duration,
    /// Fill the clones meta asks this node to fill: restores and clones nobody
    /// has attached yet, copied in the background so they become independent
    /// of their source. `false`: this node ignores those requests (such a clone
    /// is filled once attached).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub fill_clones: bool,
    /// Use buffered I/O instead of O_DIRECT.
    #[arg(long)]
    pub no_direct_io: bool,
    /// Serve the CSI Node service (and Identity) on this socket: unix:///csi/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub csi_endpoint: Option<String>,
    /// Where the CSI Node service records staged volumes and mounts their FUSE
    /// files (keep it on the host: a restarted node stages them again).
    #[arg(long, default_value = "/var/lib/ballast/csi")]
    pub csi_state: PathBuf,
    /// The Kubernetes node this runs on (for logs).
    #[arg(long, env = "NODE_NAME")]
    pub csi_node_name: Option<String>,
    /// Most volumes the CSI Node service stages at once (NodeGetInfo); 0: no limit.
    #[arg(long, default_value_t = 64)]
    pub csi_max_volumes: i64,
    /// Register the CSI plugin with the kubelet, which reaches it at this path: the
    /// CSI socket as the host sees it (/var/lib/kubelet/plugins/csi.ballast.io/csi.sock).
    #[arg(long, requires_all = ["registration_dir", "csi_endpoint"])]
    pub kubelet_registration_path: Option<PathBuf>,
    /// The kubelet's plugin registration directory (the host's
    /// /var/lib/kubelet/plugins_registry, as mounted here): csi.ballast.io-reg.sock is
    /// created there once the CSI socket answers, and removed on shutdown.
    #[arg(long, requires = "kubelet_registration_path")]
    pub registration_dir: Option<PathBuf>,
    /// Serve GET /healthz (the CSI socket answers; never waits for meta) and GET
    /// /readyz (CSI Probe: meta answers too) over HTTP on this address, for the
    /// kubelet's probes.
    #[arg(long, requires = "csi_endpoint")]
    pub health_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Args, Debug)]
pub struct ReplicaArgs {
    /// Disk directory holding the chunk store (created if missing).
    #[arg(long)]
    pub data: PathBuf,
    /// Address to listen on for front ends (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Use buffered I/O instead of O_DIRECT (for filesystems that refuse O_DIRECT
    /// this happens automatically).
    #[arg(long)]
    pub no_direct_io: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Write a static volume definition: its nodes, size and durability settings.
    Create(VolumeCreateArgs),
}

#[derive(Args, Debug)]
pub struct VolumeCreateArgs {
    /// The volume file to write (refuses to overwrite an existing one).
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value = "vol0")]
    pub name: String,
    /// Volume id (unique per cluster; replicas key chunks by it).
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// Size, e.g. 1G, 512M (a multiple of 4 KiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Chunk size, e.g. 64M (a multiple of 4 KiB).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Fewest in-sync replicas a write may be acknowledged with (default: all replicas).
    #[arg(long)]
    pub min_in_sync: Option<usize>,
    /// A replica node as ID=ZONE=HOST:PORT; one per replica, every chunk on all of them.
    #[arg(long = "node", required = true, value_parser = parse_node)]
    pub nodes: Vec<NodeSpec>,
}

#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub id: u64,
    pub zone: String,
    pub addr: SocketAddr,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The volume file written by `ballast volume create` (static membership).
    #[arg(long, conflicts_with = "meta")]
    pub config: Option<PathBuf>,
    /// Meta members, comma-separated HOST:PORT: attach through the metadata service.
    #[arg(long, env = "BALLAST_META")]
    pub meta: Option<String>,
    /// The volume's name (with --meta).
    #[arg(long, conflicts_with = "snapshot")]
    pub volume: Option<String>,
    /// Export this snapshot instead, read-only, under its own name (with --meta):
    /// read from the replicas without attaching the volume, whose front end
    /// keeps writing undisturbed.
    #[arg(long, requires = "meta")]
    pub snapshot: Option<String>,
    /// NBD listen address on loopback (port 0 picks a free port).
    #[arg(long)]
    pub nbd: Option<SocketAddr>,
    /// NBD unix socket path (instead of, or besides, --nbd).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The node id of this host, so reads prefer its local replica.
    #[arg(long)]
    pub local_node: Option<u64>,
    /// Per-replica I/O timeout before the replica is ejected, e.g. 5s, 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub io_timeout: Duration,
    /// Allow a non-loopback NBD address. NBD has no authentication here (its
    /// STARTTLS is not built yet): anyone who reaches the port reads and writes
    /// the volume. Only for a network you trust entirely.
    #[arg(long)]
    pub allow_remote: bool,
    #[command(flatten)]
    pub scrub: ScrubArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Data directory: the meta members' Raft logs and the three nodes' disks (kept across runs).
    #[arg(long, default_value = "ballast-dev")]
    pub data: PathBuf,
    /// NBD listen address (loopback).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd: SocketAddr,
    /// Also export on this unix socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// First of three loopback ports for the meta members on the first run
    /// (ballastctl's default endpoint is 127.0.0.1:7400); 0 picks free ports. Later
    /// runs reuse the recorded ports.
    #[arg(long, default_value_t = 7400)]
    pub meta_port: u16,
    /// Volume name (the NBD export name).
    #[arg(long, default_value = "vol0")]
    pub name: String,
    /// Volume size, used when the volume is created (first run).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Chunk size, used when the volume is created.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Replicas (1-3: the dev cluster has three zones), used when the volume is created.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub replicas: u8,
    /// Fewest in-sync replicas (default: all), used when the volume is created.
    #[arg(long)]
    pub min_in_sync: Option<usize>,
    /// Also serve CSI (Identity, Controller, and the Node service of node 1) on
    /// this unix socket [default: DATA/csi.sock].
    #[arg(long)]
    pub csi_socket: Option<PathBuf>,
    /// Prometheus metrics of the whole dev cluster on `GET /metrics`
    /// [default: 127.0.0.1:(meta-port + 80), i.e. 127.0.0.1:7480; a free port
    /// when --meta-port is 0].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

fn parse_node(s: &str) -> Result<NodeSpec, String> {
    let mut it = s.splitn(3, '=');
    let (Some(id), Some(zone), Some(addr)) = (it.next(), it.next(), it.next()) else {
        return Err(format!("invalid node {s:?}: expected ID=ZONE=HOST:PORT"));
    };
    Ok(NodeSpec {
        id: id.parse().map_err(|_| format!("invalid node id {id:?} in {s:?}"))?,
        zone: zone.to_string(),
        addr: addr.parse().map_err(|_| format!("invalid address {addr:?} in {s:?}"))?,
    })
}

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

/// `ballast export`'s scrub flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ScrubArgs {
    /// Time between scrub passes, which read every replica of every chunk and
    /// rewrite corrupt blocks from a verified copy; the first pass runs one
    /// interval after attach. E.g. 24h, 90m, 30s; 0 or off disables scrubbing.
    #[arg(long = "scrub-interval", value_name = "DURATION", default_value = "24h", value_parser = parse_scrub_interval)]
    pub interval: ScrubInterval,
    /// Replica bytes a scrub pass reads per second (every copy counts), e.g. 64M;
    /// 0 means no limit.
    #[arg(long = "scrub-rate", value_name = "BYTES/s", default_value = "64M", value_parser = parse_size)]
    pub rate: u64,
}

impl ScrubArgs {
    /// The schedule to run, or None when scrubbing is off.
    pub fn config(&self) -> Option<ScrubConfig> {
        self.interval.0.map(|interval| ScrubConfig { interval, rate_bytes_per_sec: self.rate })
    }
}

/// A scrub interval; None is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubInterval(pub Option<Duration>);

/// `off` or `0` (no scrub), `Nh` (hours), or what [`parse_duration`] takes.
pub fn parse_scrub_interval(s: &str) -> Result<ScrubInterval, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") || (!t.is_empty() && t.bytes().all(|b| b == b'0')) {
        return Ok(ScrubInterval(None));
    }
    if let Some(hours) = t.strip_suffix('h') {
        let n: u64 =
            hours.trim().parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 24h, 90m, 30s"))?;
        if n == 0 {
            return Ok(ScrubInterval(None));
        }
        return Ok(ScrubInterval(Some(Duration::from_secs(n.saturating_mul(3600)))));
    }
    parse_duration(t).map(|d| ScrubInterval(Some(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes() {
        let n = parse_node("2=zone-b=127.0.0.1:7002").unwrap();
        assert_eq!((n.id, n.zone.as_str()), (2, "zone-b"));
        assert!(parse_node("2=zone-b").is_err());
        assert!(parse_node("x=z=127.0.0.1:1").is_err());
    }

    #[test]
    fn registration_flags_come_together_and_need_csi() {
        let node = |extra: &[&str]| {
            let mut args = vec!["ballast", "node", "--zone", "z", "--data", "/d"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        let csi = ["--csi-endpoint", "unix:///csi/csi.sock"];
        let path = ["--kubelet-registration-path", "/var/lib/kubelet/plugins/csi.ballast.io/csi.sock"];
        let dir = ["--registration-dir", "/registration"];
        let Command::Node(a) =
            node(&[&csi[..], &path, &dir, &["--health-listen", "0.0.0.0:9818"]].concat()).expect("all flags").command
        else {
            panic!("not node")
        };
        assert_eq!(a.registration_dir.as_deref(), Some(std::path::Path::new("/registration")));
        assert_eq!(a.health_listen, Some("0.0.0.0:9818".parse().unwrap()));
        assert!(node(&[&csi[..], &path].concat()).is_err(), "--kubelet-registration-path without --registration-dir");
        assert!(node(&[&csi[..], &dir].concat()).is_err(), "--registration-dir without --kubelet-registration-path");
        assert!(node(&[&path[..], &dir].concat()).is_err(), "registration without --csi-endpoint");
        assert!(node(&["--health-listen", "0.0.0.0:9818"]).is_err(), "health without --csi-endpoint");
        assert!(node(&csi).is_ok(), "all optional");
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn members() {
        let m = parse_members("1=127.0.0.1:7400, 2=h:7401").unwrap();
        assert_eq!(m.get(&2).map(String::as_str), Some("h:7401"));
        assert!(parse_members("0=h:1").is_err());
        assert!(parse_members("1=h:1,1=h:2").is_err());
        assert!(parse_members("1:h:1").is_err());
    }

    #[test]
    fn scrub_intervals() {
        let p = |s| parse_scrub_interval(s).map(|i| i.0);
        assert_eq!(p("24h"), Ok(Some(Duration::from_secs(24 * 3600))));
        assert_eq!(p("90m"), Ok(Some(Duration::from_secs(90 * 60))));
        assert_eq!(p("30s"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(p("500ms"), Ok(Some(Duration::from_millis(500))));
        for off in ["0", "off", "OFF", "0h", "00"] {
            assert_eq!(p(off), Ok(None), "{off}");
        }
        assert!(p("xh").is_err());
        assert!(p("1d").is_err());
        assert!(p("").is_err());
    }
}
