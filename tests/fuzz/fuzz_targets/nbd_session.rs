//! The NBD server's whole session as a client drives it: the newstyle
//! handshake (client flags, option haggling: LIST, INFO, GO, EXPORT_NAME,
//! STRUCTURED_REPLY, ABORT, unknown options), then transmission (READ, WRITE,
//! TRIM, WRITE_ZEROES, FLUSH, DISC, unknown commands), from arbitrary client
//! bytes, against an in-memory export. The server must end the session with
//! an error or cleanly, never panic or hang, and the export must stay intact
//! outside what valid writes changed (a malformed request loses nothing).
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
        let exports = vec![Export::new("disk", dev.clone()), Export::new("ro", dev).read_only(true)];
        let server = NbdServer::new(exports, NbdOptions::default()).expect("server");
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
        // Paused time: a handshake timeout fires at once instead of hanging.
        let _ = server.serve_stream(conn, "fuzz").await;
        writer.abort();
        drain.abort();
    });
});
