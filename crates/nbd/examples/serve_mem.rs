//! Serves an in-memory device over NBD until Ctrl-C, for trying clients and for
//! measuring the server's own overhead (no storage behind it).
//!
//! `cargo run --release -p ballast-nbd --example serve_mem -- 127.0.0.1:10810 /tmp/nbd.sock 1024`
//! (address, unix socket path, size in MiB; export name "mem").

use std::sync::Arc;

use ballast_blockdev::MemDev;
use ballast_nbd::{Export, NbdOptions, NbdServer};
use tokio::net::{TcpListener, UnixListener};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10810".into());
    let sock = args.next().unwrap_or_else(|| "/tmp/ballast-nbd-mem.sock".into());
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let dev = Arc::new(MemDev::new(mib << 20, 4096));
    let server = NbdServer::new(
        vec![Export::new("mem", dev).with_description("ballast in-memory device")],
        NbdOptions::default(),
    )?;
    let _ = std::fs::remove_file(&sock);
    let tcp = TcpListener::bind(&addr).await?;
    let unix = UnixListener::bind(&sock)?;
    let addr = tcp.local_addr()?;
    println!("serving export \"mem\" ({mib} MiB) on nbd://{addr}/mem and nbd+unix:///mem?socket={sock}");
    let ctrl_c = || async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let (a, b) = tokio::join!(server.serve_tcp(tcp, ctrl_c()), server.serve_unix(unix, ctrl_c()));
    a?;
    b?;
    Ok(())
}
