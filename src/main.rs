//! `ballast`: the server binary. One process kind per subcommand:
//!
//! ```text
//!   ballast replica  --data DIR --listen ADDR      chunk store + replica server (one disk)
//!   ballast volume create --config FILE ...         writes a static volume/membership file
//!   ballast export   --config FILE --nbd ADDR      volume front end + NBD export
//!   ballast meta     --id N --data DIR --listen ADDR [--initial-members 1=A,2=B,3=C]
//!   ballast node     --id N --zone Z --data DIR --meta ADDRS   storage node (replica + agent)
//!                    with --csi-endpoint also the CSI Node plugin (--registration-dir: registered with the kubelet)
//!   ballast csi-controller --endpoint unix:///csi/csi.sock --meta ADDRS   CSI Controller service
//!   ballast dev      [--data DIR] [--nbd ADDR]     all of the above in one process, 3 zones
//!   ballast certs init --ca-dir DIR | issue --ca-dir DIR --role R --id ID --out DIR
//!
//! Every TCP channel is mutual TLS: each process takes `--tls-dir DIR` (its
//! certificate) or, for experiments, `--insecure`; neither is an error.
//! ```
//!
//! `ballast node` (with CSI) and `ballast csi-controller` serve the kubelet's
//! probes, /healthz and /readyz, with `--health-listen ADDR` (src/health.rs).
//!
//! Readiness is printed on stdout as one line per listener (`ready replica addr=...`,
//! `ready nbd uri=...`) so scripts and tests can wait for it; logs go to stderr.
//! This is the only place that installs a tracing subscriber and uses anyhow.

mod certs;
mod cli;
mod csi_controller;
mod dev;
mod dev_record;
mod export;
mod health;
mod meta;
mod metrics;
mod node;
mod replica;
mod shutdown;

use std::io::IsTerminal;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        // Colour codes only for a person at a terminal: a file, a pipe or the
        // kubelet's log capture gets plain text.
        cli::LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        cli::LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The CSI node serves FUSE volume files from these threads: they must not
        // block in memory reclaim waiting on those very files' writeback. Needs
        // CAP_SYS_RESOURCE; without it the flag is simply not set.
        .on_thread_start(|| {
            let _ = ballast_attach::set_io_flusher();
        })
        .build()?;
    rt.block_on(async move {
        match args.command {
            cli::Command::Replica(a) => replica::run(a).await,
            cli::Command::Volume(cli::VolumeCommand::Create(a)) => export::create_volume(a),
            cli::Command::Export(a) => export::run(a).await,
            cli::Command::Dev(a) => dev::run(a).await,
            cli::Command::Meta(a) => meta::run(a).await,
            cli::Command::Node(a) => node::run(*a).await,
            cli::Command::CsiController(a) => csi_controller::run(a).await,
            cli::Command::Certs(cmd) => certs::run(cmd),
        }
    })
}
