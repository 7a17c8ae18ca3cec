//! Malformed traffic over raw sockets: the offending connection is closed (or
//! the request refused with the right error), other clients go on, and nothing
//! reaches the device.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use ballast_blockdev::BlockDev;
use ballast_nbd::{proto, NbdClient, NbdError};
use bytes::Bytes;
use common::{contents, have, run_ok, strings, Spec, TestServer, MIB};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SIZE: u64 = 8 * MIB;

/// Reads until the server closes; returns what it sent. Panics if it keeps the
/// connection open (the point of these tests is that it does not).
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
    match read {
        Ok(_) => rest, // EOF, or a reset after the server dropped unread input
        Err(_) => panic!("server kept a misbehaving connection open"),
    }
}

async fn greeted(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut greeting = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(greeting, proto::greeting());
    s
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = proto::IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Reads option replies until a final one (not NBD_REP_INFO / NBD_REP_SERVER);
/// returns the reply types seen.
async fn option_replies(s: &mut TcpStream, opt: u32) -> Vec<u32> {
    let mut types = Vec::new();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).await.expect("option reply");
        assert_eq!(u64::from_be_bytes(head[0..8].try_into().expect("8")), proto::OPT_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(head[8..12].try_into().expect("4")), opt);
        let kind = u32::from_be_bytes(head[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(head[16..20].try_into().expect("4"));
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.expect("option reply data");
        types.push(kind);
        if kind != proto::REP_INFO && kind != proto::REP_SERVER {
            return types;
        }
    }
}

/// A raw connection in transmission on `name` (NBD_OPT_GO).
async fn transmitting(addr: SocketAddr, name: &str) -> TcpStream {
    let mut s = greeted(addr).await;
    let mut m = proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    m.extend_from_slice(&option(proto::OPT_GO, &go_data(name)));
    s.write_all(&m).await.expect("go");
    let replies = option_replies(&mut s, proto::OPT_GO).await;
    assert_eq!(replies.last(), Some(&proto::REP_ACK));
    s
}

/// The long-lived client that must keep working whatever the others do.
async fn still_serving(good: &NbdClient, round: u8) {
    let at = SIZE - 4096;
    good.write(at, Bytes::from(vec![round; 4096]), false).await.expect("good client write");
    assert_eq!(good.read(at, 4096).await.expect("good client read"), vec![round; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_close_only_their_connection() {
    let srv = TestServer::start(&[Spec("vol", SIZE, false)]).await;
    let good = NbdClient::connect_tcp(srv.tcp, "vol").await.expect("good client");
    let flags = proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes();

    // Unknown client flag bits.
    let mut s = greeted(srv.tcp).await;
    s.write_all(&0x8000_0001u32.to_be_bytes()).await.expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(&good, 1).await;

    // Not NBD at all.
    let mut s = greeted(srv.tcp).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("send");
    assert!(until_closed(&mut s).await.is_empty());

    // Bad option magic.
    let mut s = greeted(srv.tcp).await;
    let mut m = flags.to_vec();
    m.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    m.extend_from_slice(&[0u8; 8]);
    s.write_all(&m).await.expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(&good, 2).await;

    // An option claiming 2 GiB of data.
    let mut s = greeted(srv.tcp).await;
    let mut m = flags.to_vec();
    m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    m.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    s.write_all(&m).await.expect("send");
    assert!(until_closed(&mut s).await.is_empty());

    // NBD_OPT_EXPORT_NAME cannot report errors: an unknown name ends the session.
    let mut s = greeted(srv.tcp).await;
    let mut m = flags.to_vec();
    m.extend_from_slice(&option(proto::OPT_EXPORT_NAME, b"nope"));
    s.write_all(&m).await.expect("send");
    assert!(until_closed(&mut s).await.is_empty());

    // Truncated at every stage: mid flags, mid option header, mid option data.
    for cut in [2usize, 4 + 7, 4 + 16 + 3] {
        let mut s = greeted(srv.tcp).await;
        let mut m = flags.to_vec();
        m.extend_from_slice(&option(proto::OPT_GO, &go_data("vol")));
        s.write_all(&m[..cut]).await.expect("send");
        s.shutdown().await.expect("half close");
        assert!(until_closed(&mut s).await.is_empty(), "cut at {cut}");
    }
    still_serving(&good, 3).await;

    // Options that are refused keep the session in option haggling.
    let mut s = greeted(srv.tcp).await;
    s.write_all(&flags).await.expect("flags");
    let cases: [(u32, Vec<u8>, u32); 6] = [
        (0x1234, b"whatever".to_vec(), proto::REP_ERR_UNSUP),
        (proto::OPT_STRUCTURED_REPLY, vec![], proto::REP_ERR_UNSUP),
        (proto::OPT_LIST, b"x".to_vec(), proto::REP_ERR_INVALID),
        (proto::OPT_GO, vec![0, 0, 0, 200, b'v'], proto::REP_ERR_INVALID),
        (proto::OPT_GO, go_data("missing"), proto::REP_ERR_UNKNOWN),
        (proto::OPT_INFO, go_data("vol"), proto::REP_ACK),
    ];
    for (opt, data, want) in cases {
        s.write_all(&option(opt, &data)).await.expect("option");
        let replies = option_replies(&mut s, opt).await;
        assert_eq!(replies.last(), Some(&want), "option {opt}: {replies:?}");
    }
    s.write_all(&option(proto::OPT_LIST, &[])).await.expect("list");
    assert_eq!(option_replies(&mut s, proto::OPT_LIST).await, vec![proto::REP_SERVER, proto::REP_ACK]);
    s.write_all(&option(proto::OPT_ABORT, &[])).await.expect("abort");
    assert_eq!(option_replies(&mut s, proto::OPT_ABORT).await, vec![proto::REP_ACK]);
    assert!(until_closed(&mut s).await.is_empty());

    still_serving(&good, 4).await;
    let data = contents(&srv.devs[0]).await;
    assert!(data[..(SIZE - 4096) as usize].iter().all(|&x| x == 0), "nothing written by bad handshakes");
    srv.stop().await;
}

fn errno(r: Result<Bytes, NbdError>) -> u32 {
    match r {
        Err(NbdError::Request { errno }) => errno,
        other => panic!("expected an NBD error reply, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_nothing_is_written() {
    let srv = TestServer::start(&[Spec("vol", SIZE, false)]).await;
    let good = NbdClient::connect_unix(&srv.sock, "vol").await.expect("good client");
    let c = NbdClient::connect_tcp(srv.tcp, "vol").await.expect("raw client");
    let block = || Bytes::from(vec![0xffu8; 4096]);
    let (r, w, t, z) = (proto::CMD_READ, proto::CMD_WRITE, proto::CMD_TRIM, proto::CMD_WRITE_ZEROES);
    let far = u64::MAX - 4095;
    // (command, flags, offset, length, payload, expected errno)
    let cases: Vec<(u16, u16, u64, u32, Bytes, u32)> = vec![
        (r, 0, SIZE, 4096, Bytes::new(), proto::EINVAL),
        (r, 0, SIZE - 4096, 8192, Bytes::new(), proto::EINVAL),
        (r, 0, far, 8192, Bytes::new(), proto::EINVAL),
        (r, 0, 512, 4096, Bytes::new(), proto::EINVAL),
        (r, 0, 0, 512, Bytes::new(), proto::EINVAL),
        (r, 0, 0, 64 << 20, Bytes::new(), proto::EINVAL),
        (r, 1 << 2, 0, 4096, Bytes::new(), proto::EINVAL), // DF: structured replies only
        (w, 0, SIZE, 4096, block(), proto::ENOSPC),
        (w, 0, SIZE - 4096, 8192, Bytes::from(vec![0xffu8; 8192]), proto::ENOSPC),
        (w, proto::CMD_FLAG_FUA, far, 4096, block(), proto::ENOSPC),
        (w, 0, 100, 4096, block(), proto::EINVAL),
        (w, 0, 0, 1000, Bytes::from(vec![0xffu8; 1000]), proto::EINVAL),
        (w, 1 << 7, 0, 4096, block(), proto::EINVAL), // undefined flag bit
        (t, 0, SIZE - 4096, 8192, Bytes::new(), proto::EINVAL),
        (t, 0, 4096, 100, Bytes::new(), proto::EINVAL),
        (z, 0, SIZE, 4096, Bytes::new(), proto::ENOSPC),
        (z, 0, 2048, 4096, Bytes::new(), proto::EINVAL),
        (z, 1 << 4, 0, 4096, Bytes::new(), proto::EINVAL), // FAST_ZERO was not advertised
        (5, 0, 0, 4096, Bytes::new(), proto::EINVAL),      // CACHE
        (7, 0, 0, 4096, Bytes::new(), proto::EINVAL),      // BLOCK_STATUS
        (99, 0, 0, 0, Bytes::new(), proto::EINVAL),
        (0xffff, proto::CMD_FLAG_FUA, far, u32::MAX, Bytes::new(), proto::EINVAL),
    ];
    for (cmd, flags, off, len, payload, want) in cases {
        let got = errno(c.request(cmd, flags, off, len, payload).await);
        assert_eq!(got, want, "cmd {cmd} flags {flags:#x} [{off}, +{len})");
    }
    // Zero-length requests are accepted as no-ops; the connection is still in sync.
    assert_eq!(c.request(w, 0, 0, 0, Bytes::new()).await.expect("empty write"), Bytes::new());
    assert_eq!(c.read(SIZE - 8192, 8192).await.expect("read after errors"), vec![0u8; 8192]);
    still_serving(&good, 1).await;

    // Stream-level garbage: each closes its own connection only.
    // Bad request magic.
    let mut s = transmitting(srv.tcp, "vol").await;
    let mut req = proto::Request { flags: 0, cmd: w, cookie: 1, offset: 0, len: 4096 }.encode();
    req[0] ^= 0xff;
    s.write_all(&req).await.expect("send");
    s.write_all(&[0xee; 4096]).await.expect("send");
    let _ = until_closed(&mut s).await;
    // Truncated header.
    let mut s = transmitting(srv.tcp, "vol").await;
    let req = proto::Request { flags: 0, cmd: w, cookie: 2, offset: 0, len: 4096 }.encode();
    s.write_all(&req[..10]).await.expect("send");
    s.shutdown().await.expect("half close");
    assert!(until_closed(&mut s).await.is_empty());
    // Truncated write payload.
    let mut s = transmitting(srv.tcp, "vol").await;
    let req = proto::Request { flags: 0, cmd: w, cookie: 3, offset: 0, len: 8192 }.encode();
    s.write_all(&req).await.expect("send");
    s.write_all(&[0xee; 4096]).await.expect("send");
    s.shutdown().await.expect("half close");
    assert!(until_closed(&mut s).await.is_empty(), "no reply for a write that never arrived");
    // A write far above the maximum payload: refused, then the session ends.
    let mut s = transmitting(srv.tcp, "vol").await;
    let req = proto::Request { flags: 0, cmd: w, cookie: 4, offset: 0, len: 0xffff_f000 }.encode();
    s.write_all(&req).await.expect("send");
    let _ = s.write_all(&[0xee; 65536]).await;
    let reply = until_closed(&mut s).await;
    assert!(reply.len() >= proto::SIMPLE_REPLY_LEN, "an error reply before closing");
    let head: [u8; 16] = reply[..16].try_into().expect("16");
    assert_eq!(proto::decode_simple_reply(&head), Ok((proto::EINVAL, 4)));
    still_serving(&good, 2).await;

    // Nothing reached the device except the good client's last block.
    let data = contents(&srv.devs[0]).await;
    assert!(data[..(SIZE - 4096) as usize].iter().all(|&x| x == 0), "nothing written by bad requests");

    // And a real client still gets served.
    if have("qemu-io", "bad_requests_are_refused_and_nothing_is_written (qemu-io part)") {
        let out = run_ok(
            "qemu-io",
            &strings(&["-f", "raw", &srv.tcp_uri("vol"), "-c", "write -P 0x42 0 64k", "-c", "read -P 0x42 0 64k"]),
            Duration::from_secs(120),
        )
        .await;
        assert!(!out.contains("fail"), "{out}");
        let data = contents(&srv.devs[0]).await;
        assert!(data[..65536].iter().all(|&x| x == 0x42));
        assert!(data[65536..(SIZE - 4096) as usize].iter().all(|&x| x == 0));
    }
    srv.stop().await;
}
