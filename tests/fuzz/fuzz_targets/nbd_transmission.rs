//! The NBD transmission phase as the kernel client enters it (no handshake:
//! `serve_transmission`), from arbitrary request bytes: request headers with
//! any magic, flags, command, cookie, offset and length, and any payload.
//! The server must answer or end the session, never panic or hang.
#![no_main]

use std::sync::Arc;

use ballast_blockdev::MemDev;
use ballast_nbd::{Export, NbdOptions, NbdServer};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
    rt.block_on(async {
        let dev = Arc::new(MemDev::new(1 << 20, 4096));
        let server = NbdServer::new(vec![Export::new("disk", dev)], NbdOptions::default()).expect("server");
        let (client, conn) = tokio::io::duplex(1 << 16);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let input = data.to_vec();
        let writer = tokio::spawn(async move {
            let _ = to_server.write_all(&input).await;
            let _ = to_server.shutdown().await;
        });
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = from_server.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = server.serve_transmission("disk", conn).await;
        writer.abort();
        drain.abort();
    });
});
