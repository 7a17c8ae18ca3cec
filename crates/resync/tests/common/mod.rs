//! Real replica servers over real chunk stores in temp dirs, on 127.0.0.1:0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_types::{BlockIdx, ChunkId, ChunkIdx, Epoch, Seq, VolumeId, BLOCK_SIZE};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const VOL: VolumeId = VolumeId(7);
pub const CHUNK: ChunkId = ChunkId { volume: VOL, chunk: ChunkIdx(2) };
pub const CHUNK_SIZE: u64 = 1 << 20;
pub const BLOCKS: u32 = (CHUNK_SIZE / BLOCK_SIZE as u64) as u32;
pub const BS: usize = BLOCK_SIZE as usize;
pub const E1: Epoch = Epoch(1);
pub const E2: Epoch = Epoch(2);
/// A guard against a hung test, not a timing assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// One replica node: a chunk store in its own temp dir behind a real server.
pub struct Node {
    pub addr: SocketAddr,
    pub client: ReplicaClient,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    pub async fn start() -> Node {
        init_tracing();
        let dir = tempfile::Builder::new().prefix("ballast-resync").tempdir_in("/var/tmp").expect("tempdir");
        let store = ChunkStore::open(dir.path(), StoreOptions::default()).expect("open store");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let server = ReplicaServer::new(store, ServerOptions::default());
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        let client = ReplicaClient::new(addr, ClientOptions::default());
        Node { addr, client, stop: Some(tx), task, _dir: dir }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(HANG_GUARD, &mut self.task)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("serve result");
    }

    /// Announces `epoch` and creates the test chunk (as the front end does at attach).
    pub async fn attach(&self, epoch: Epoch) {
        self.client.announce_epoch(VOL, epoch).await.expect("announce");
        self.client.create_chunk(CHUNK, CHUNK_SIZE, epoch).await.expect("create chunk");
    }

    pub async fn write(&self, block: u32, n: u32, seq: Seq) {
        let data = blocks_data(block, n, seq);
        self.client.write(CHUNK, u64::from(block) * BS as u64, data, seq, false).await.expect("write");
    }

    pub async fn trim(&self, block: u32, n: u32, seq: Seq) {
        let (off, len) = (u64::from(block) * BS as u64, u64::from(n) * BS as u64);
        self.client.trim(CHUNK, off, len, seq).await.expect("trim");
    }
}

/// Distinct content for blocks [block, +n) written at `seq`.
pub fn blocks_data(block: u32, n: u32, seq: Seq) -> Bytes {
    let mut v = Vec::with_capacity(n as usize * BS);
    for b in block..block + n {
        let mut x = (u64::from(b) << 32) ^ seq.counter.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.epoch.0 | 1;
        for _ in 0..BS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
    }
    Bytes::from(v)
}

/// Asserts that two replicas hold the same chunk: equal context tables and
/// identical data, block by block.
pub async fn assert_identical(a: &ReplicaClient, b: &ReplicaClient, epoch: Epoch) {
    let ta = a.context_table(CHUNK, BlockIdx(0), BLOCKS, epoch).await.expect("contexts a");
    let tb = b.context_table(CHUNK, BlockIdx(0), BLOCKS, epoch).await.expect("contexts b");
    let da = a.read(CHUNK, 0, CHUNK_SIZE as u32, epoch).await.expect("read a");
    let db = b.read(CHUNK, 0, CHUNK_SIZE as u32, epoch).await.expect("read b");
    for i in 0..BLOCKS as usize {
        assert_eq!(ta[i], tb[i], "context of block {i}");
        assert!(da[i * BS..(i + 1) * BS] == db[i * BS..(i + 1) * BS], "data of block {i}");
    }
}

/// A real TCP proxy in front of a replica that holds back every ResyncWrite
/// request for `delay` before passing it on (everything else passes at once).
/// It widens the window between the copier's compare and the target's apply, so
/// front-end writes land in it: the target's own conditional is then what keeps
/// them. Returns the proxy's address.
pub async fn delaying_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    use ballast_wire::{encode, Decoder, Op};
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
            tokio::spawn(async move {
                let mut dec = Decoder::new();
                let mut buf = BytesMut::with_capacity(1 << 20);
                loop {
                    while let Ok(Some(frame)) = dec.decode(&mut buf) {
                        if frame.header.op == Op::ResyncWrite {
                            tokio::time::sleep(delay).await;
                        }
                        let mut out = BytesMut::new();
                        encode(&frame, &mut out).expect("re-encode");
                        if sw.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                    match cr.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    addr
}
