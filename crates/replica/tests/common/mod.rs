//! Shared helpers: a real replica server over a temp-dir chunk store on 127.0.0.1:0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_types::{ChunkId, ChunkIdx, Epoch, VolumeId};
use ballast_wire::{encode, Decoder, Frame};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const VOL: VolumeId = VolumeId(1);
pub const CHUNK: ChunkId = ChunkId { volume: VOL, chunk: ChunkIdx(0) };
pub const CHUNK_SIZE: u64 = 1 << 20;
pub const E1: Epoch = Epoch(1);
pub const E2: Epoch = Epoch(2);
pub const E3: Epoch = Epoch(3);
/// A guard against a hung test, not a timing assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub async fn start(dir: &Path) -> Running {
        Running::start_on(dir, "127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn start_on(dir: &Path, addr: SocketAddr) -> Running {
        init_tracing();
        let store = ChunkStore::open(dir, StoreOptions::default()).expect("open store");
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let server = ReplicaServer::new(store, ServerOptions::default());
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        Running { addr, stop: Some(tx), task }
    }

    /// Graceful shutdown; returns once every connection is closed and the store released.
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
}

pub fn client(addr: SocketAddr) -> ReplicaClient {
    ReplicaClient::new(addr, ClientOptions::default())
}

/// Deterministic, block-distinct test data.
pub fn pattern(seed: u32, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(x as u8);
    }
    Bytes::from(v)
}

pub fn encoded(frame: &Frame) -> BytesMut {
    let mut b = BytesMut::new();
    encode(frame, &mut b).expect("encode");
    b
}

/// Recomputes the header crc after a test edited header bytes on purpose.
pub fn reseal(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
}

/// Reads frames from `s` until `n` have arrived.
pub async fn read_frames(s: &mut TcpStream, n: usize) -> Vec<Frame> {
    let mut dec = Decoder::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    while out.len() < n {
        while let Some(f) = dec.decode(&mut buf).expect("server sends valid frames") {
            out.push(f);
        }
        if out.len() >= n {
            break;
        }
        let got =
            tokio::time::timeout(HANG_GUARD, s.read_buf(&mut buf)).await.expect("response arrives").expect("read");
        assert!(got > 0, "server closed the connection with {} of {n} responses", out.len());
    }
    out
}

/// Sends raw bytes on a fresh connection and asserts that the server closes it
/// without answering.
pub async fn send_expect_close(addr: SocketAddr, bytes: &[u8], half_close: bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("send");
    if half_close {
        s.shutdown().await.expect("shutdown write");
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(HANG_GUARD, s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => assert!(buf.is_empty(), "server answered a malformed frame: {} bytes", buf.len()),
        // A reset is a close too.
        Ok(Err(_)) => {}
        Err(_) => panic!("server kept a connection with a malformed frame open"),
    }
}

/// Sends one frame on `s` and returns the response.
pub async fn round_trip(s: &mut TcpStream, frame: &Frame) -> Frame {
    s.write_all(&encoded(frame)).await.expect("send");
    read_frames(s, 1).await.remove(0)
}
