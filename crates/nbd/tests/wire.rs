//! The block-device conformance suite through the wire (our own client against
//! our server), multi-connection consistency, soft disconnect and shutdown.

mod common;

use std::time::Duration;

use ballast_blockdev::{conformance, BlockDev, BlockError};
use ballast_nbd::{proto, NbdClient, NbdError};
use bytes::Bytes;
use common::{contents, Spec, TestServer, MIB};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_tcp_and_unix() {
    let srv = TestServer::start(&[Spec("tcp", 80 * MIB, false), Spec("unix", 4 * MIB, false)]).await;
    let tcp = NbdClient::connect_tcp(srv.tcp, "tcp").await.expect("connect tcp");
    assert_eq!(tcp.info().min_block, 4096);
    assert_eq!(tcp.info().max_payload, 32 << 20);
    assert_eq!(tcp.info().description.as_deref(), Some("test export tcp"));
    conformance::run(&tcp).await;
    let unix = NbdClient::connect_unix(&srv.sock, "unix").await.expect("connect unix");
    conformance::run(&unix).await;
    tcp.disconnect().await.expect("disc");
    unix.disconnect().await.expect("disc");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_see_each_others_writes() {
    let srv = TestServer::start(&[Spec("vol", 8 * MIB, false)]).await;
    let a = NbdClient::connect_tcp(srv.tcp, "vol").await.expect("a");
    let b = NbdClient::connect_unix(&srv.sock, "").await.expect("b (default export)");
    let c = NbdClient::connect_tcp(srv.tcp, "vol").await.expect("c");
    let data = Bytes::from(common::random_bytes(256 * 1024, 3));
    a.write(MIB, data.clone(), false).await.expect("write via a");
    a.flush().await.expect("flush via a");
    assert_eq!(b.read(MIB, data.len() as u32).await.expect("read via b"), data);
    c.trim(MIB, 64 * 1024).await.expect("trim via c");
    let got = a.read(MIB, 128 * 1024).await.expect("read via a");
    assert!(got[..64 * 1024].iter().all(|&x| x == 0));
    assert_eq!(&got[64 * 1024..], &data[64 * 1024..128 * 1024]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_changes() {
    let srv = TestServer::start(&[Spec("ro", 4 * MIB, true)]).await;
    let c = NbdClient::connect_tcp(srv.tcp, "ro").await.expect("connect");
    assert_ne!(c.info().flags & proto::FLAG_READ_ONLY, 0);
    // The client refuses locally; the raw request shows the server refuses too.
    assert_eq!(c.write(0, Bytes::from(vec![1u8; 4096]), false).await, Err(BlockError::ReadOnly));
    for (cmd, payload) in [
        (proto::CMD_WRITE, Bytes::from(vec![1u8; 4096])),
        (proto::CMD_TRIM, Bytes::new()),
        (proto::CMD_WRITE_ZEROES, Bytes::new()),
    ] {
        match c.request(cmd, 0, 0, 4096, payload).await {
            Err(NbdError::Request { errno }) => assert_eq!(errno, proto::EPERM, "cmd {cmd}"),
            other => panic!("cmd {cmd} on a read-only export: {other:?}"),
        }
    }
    assert_eq!(c.read(0, 4096).await.expect("reads work"), vec![0u8; 4096]);
    assert!(contents(&srv.devs[0]).await.iter().all(|&x| x == 0));
    srv.stop().await;
}

/// Raw fixed-newstyle handshake with NBD_OPT_EXPORT_NAME; returns the stream in
/// transmission with the export size.
async fn export_name_handshake(addr: std::net::SocketAddr, name: &str) -> (TcpStream, u64) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(greeting, proto::greeting());
    let mut msg = Vec::new();
    msg.extend_from_slice(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
    msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
    msg.extend_from_slice(name.as_bytes());
    s.write_all(&msg).await.expect("send export name");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.expect("export reply (no zeroes)");
    let size = u64::from_be_bytes(reply[0..8].try_into().expect("8 bytes"));
    let flags = u16::from_be_bytes([reply[8], reply[9]]);
    assert_ne!(flags & proto::FLAG_CAN_MULTI_CONN, 0);
    (s, size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_completes_pipelined_writes_first() {
    let srv = TestServer::start(&[Spec("vol", 8 * MIB, false)]).await;
    let (mut s, size) = export_name_handshake(srv.tcp, "vol").await;
    assert_eq!(size, 8 * MIB);
    // 200 writes, a flush and DISC in one burst; the server must answer every
    // request before it closes.
    let n = 200u64;
    let mut burst = Vec::new();
    for i in 0..n {
        let req = proto::Request { flags: 0, cmd: proto::CMD_WRITE, cookie: i, offset: i * 8192, len: 4096 };
        burst.extend_from_slice(&req.encode());
        burst.extend_from_slice(&[(i % 251) as u8 + 1; 4096]);
    }
    burst.extend_from_slice(&proto::Request { flags: 0, cmd: proto::CMD_FLUSH, cookie: n, offset: 0, len: 0 }.encode());
    burst.extend_from_slice(
        &proto::Request { flags: 0, cmd: proto::CMD_DISC, cookie: n + 1, offset: 0, len: 0 }.encode(),
    );
    s.write_all(&burst).await.expect("burst");
    let mut replies = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut replies))
        .await
        .expect("server closes")
        .expect("read");
    assert_eq!(replies.len(), (n as usize + 1) * proto::SIMPLE_REPLY_LEN, "one reply per request, none for DISC");
    let mut cookies: Vec<u64> = replies
        .chunks(proto::SIMPLE_REPLY_LEN)
        .map(|r| {
            let (err, cookie) = proto::decode_simple_reply(r.try_into().expect("16 bytes")).expect("reply magic");
            assert_eq!(err, 0, "cookie {cookie}");
            cookie
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..=n).collect::<Vec<_>>());
    let data = contents(&srv.devs[0]).await;
    for i in 0..n as usize {
        assert!(data[i * 8192..i * 8192 + 4096].iter().all(|&x| x == (i % 251) as u8 + 1), "write {i}");
        assert!(data[i * 8192 + 4096..(i + 1) * 8192].iter().all(|&x| x == 0), "gap {i}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_and_active_connections() {
    let srv = TestServer::start(&[Spec("vol", 4 * MIB, false)]).await;
    let client = NbdClient::connect_tcp(srv.tcp, "vol").await.expect("connect");
    client.write(0, Bytes::from(vec![9u8; 4096]), true).await.expect("write");
    // A second client still in the handshake.
    let mut half = TcpStream::connect(srv.tcp).await.expect("connect");
    let mut greeting = [0u8; 18];
    half.read_exact(&mut greeting).await.expect("greeting");
    let tcp = srv.tcp;
    tokio::time::timeout(Duration::from_secs(60), srv.stop()).await.expect("stop returns once connections end");
    assert_eq!(client.read(0, 4096).await, Err(BlockError::Shutdown), "requests after shutdown fail");
    let mut rest = Vec::new();
    let _ = half.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    assert!(TcpStream::connect(tcp).await.is_err(), "listener closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tight_in_flight_limits_still_serve_pipelined_clients() {
    // One request and one payload in flight per connection: the reader must stall
    // on permits, never deadlock, and the conformance suite's concurrent steps must
    // still complete.
    let opts = ballast_nbd::NbdOptions { max_in_flight: 1, max_in_flight_bytes: 0, ..Default::default() };
    let srv = TestServer::start_with(&[Spec("vol", 4 * MIB, false)], opts).await;
    let c = NbdClient::connect_tcp(srv.tcp, "vol").await.expect("connect");
    conformance::run(&c).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stream_over_a_socketpair() {
    let dev = std::sync::Arc::new(ballast_blockdev::MemDev::new(4 * MIB, 4096));
    let server = ballast_nbd::NbdServer::new(
        vec![ballast_nbd::Export::new("pair", dev.clone())],
        ballast_nbd::NbdOptions::default(),
    )
    .expect("server");
    let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
    let serving = tokio::spawn(async move { server.serve_stream(a, "socketpair").await });
    let (r, w) = b.into_split();
    let c = NbdClient::handshake(r, w, "pair").await.expect("handshake");
    c.write(0, Bytes::from(vec![7u8; 8192]), true).await.expect("write");
    assert_eq!(c.read(4096, 4096).await.expect("read"), vec![7u8; 4096]);
    c.disconnect().await.expect("disconnect");
    serving.await.expect("task").expect("clean end after DISC");
    assert_eq!(contents(&dev).await[..8192], [7u8; 8192]);
}
