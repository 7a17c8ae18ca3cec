//! What both NBD targets share: a client that sends the fuzz input and then
//! closes its side, while everything the server answers is read and dropped.

use std::future::Future;
use std::sync::Arc;

use ballast_blockdev::MemDev;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// A 1 MiB in-memory export of 4096-byte blocks.
pub fn device() -> Arc<MemDev> {
    Arc::new(MemDev::new(1 << 20, 4096))
}

/// Runs `serve` on the server end of a stream whose client sends `data`,
/// then EOF, on a current-thread runtime with paused time (a timeout fires
/// at once instead of hanging the run).
pub fn drive<F, Fut>(data: &[u8], serve: F)
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
    rt.block_on(async {
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
        serve(conn).await;
        writer.abort();
        drain.abort();
    });
}
