//! The replica server and client against a real chunk store in a temp dir, on
//! 127.0.0.1:0.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use ballast_replica::{ClientError, ClientOptions, Op, ReplicaClient, Status};
use ballast_types::{BlockIdx, ChunkId, ChunkIdx, Seq, BLOCK_SIZE};
use ballast_wire::{Frame, Header, MAX_PAYLOAD};
use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BS: usize = BLOCK_SIZE as usize;

fn remote_status(r: Result<impl std::fmt::Debug, ClientError>) -> Status {
    match r {
        Err(ClientError::Remote { status, .. }) => status,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

async fn setup_chunk(c: &ReplicaClient) {
    assert_eq!(c.announce_epoch(VOL, E1).await.expect("announce"), E1);
    c.create_chunk(CHUNK, CHUNK_SIZE, E1).await.expect("create");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Running::start(dir.path()).await;
    let c = client(server.addr);

    c.ping().await.expect("ping");
    setup_chunk(&c).await;
    // Create is idempotent for the same size, refused for another.
    c.create_chunk(CHUNK, CHUNK_SIZE, E1).await.expect("create again");
    assert_eq!(remote_status(c.create_chunk(CHUNK, 2 * CHUNK_SIZE, E1).await), Status::ChunkExists);

    let data = pattern(1, 2 * BS);
    c.write(CHUNK, BS as u64, data.clone(), Seq::new(E1, 1), false).await.expect("write");
    assert_eq!(c.read(CHUNK, BS as u64, 2 * BS as u32, E1).await.expect("read"), data);
    // Never-written blocks read as zeros.
    assert!(c.read(CHUNK, 8 * BS as u64, BS as u32, E1).await.expect("read").iter().all(|&b| b == 0));
    assert_eq!(c.list_dirty(VOL, E1).await.expect("list dirty"), vec![ChunkIdx(0)]);

    c.flush_chunk(CHUNK, E1).await.expect("flush chunk");
    let fua = pattern(2, BS);
    c.write(CHUNK, 0, fua.clone(), Seq::new(E1, 2), true).await.expect("fua write");
    c.flush(VOL, E1).await.expect("flush volume");
    assert_eq!(c.list_dirty(VOL, E1).await.expect("list dirty"), Vec::<ChunkIdx>::new());

    let table = c.context_table(CHUNK, BlockIdx(0), 4, E1).await.expect("context table");
    assert_eq!(table.len(), 4);
    assert_eq!(table[0].seq, Seq::new(E1, 2));
    assert_eq!(table[0].crc, crc32fast::hash(&fua));
    assert_eq!(table[1].seq, Seq::new(E1, 1));
    assert_eq!(table[1].crc, crc32fast::hash(&data[..BS]));
    assert_eq!(table[2].crc, crc32fast::hash(&data[BS..]));
    assert_eq!(table[3].seq, Seq::ZERO);

    c.trim(CHUNK, 0, BS as u64, Seq::new(E1, 3)).await.expect("trim");
    assert!(c.read(CHUNK, 0, BS as u32, E1).await.expect("read").iter().all(|&b| b == 0));
    c.write_zeroes(CHUNK, BS as u64, BS as u64, Seq::new(E1, 4)).await.expect("write zeroes");
    let after = c.read(CHUNK, 0, 3 * BS as u32, E1).await.expect("read");
    assert!(after[..2 * BS].iter().all(|&b| b == 0));
    assert_eq!(&after[2 * BS..], &data[BS..]);
    let table = c.context_table(CHUNK, BlockIdx(0), 2, E1).await.expect("context table");
    assert_eq!(table[0].seq, Seq::new(E1, 3));
    assert_eq!(table[1].seq, Seq::new(E1, 4));

    // A 1 MiB write and read in one frame each.
    let big = pattern(3, CHUNK_SIZE as usize);
    c.write(CHUNK, 0, big.clone(), Seq::new(E1, 5), false).await.expect("big write");
    assert_eq!(c.read(CHUNK, 0, CHUNK_SIZE as u32, E1).await.expect("big read"), big);

    c.delete_chunk(CHUNK, E1).await.expect("delete");
    c.delete_chunk(CHUNK, E1).await.expect("delete is idempotent");
    assert_eq!(remote_status(c.read(CHUNK, 0, BS as u32, E1).await), Status::NoSuchChunk);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_is_fenced_also_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Running::start(dir.path()).await;
    let c = client(server.addr);
    assert_eq!(c.announce_epoch(VOL, E2).await.expect("announce"), E2);
    c.create_chunk(CHUNK, CHUNK_SIZE, E2).await.expect("create");
    let good = pattern(10, BS);
    c.write(CHUNK, 0, good.clone(), Seq::new(E2, 1), false).await.expect("write");

    let stale = c.write(CHUNK, 0, pattern(11, BS), Seq::new(E1, 99), false).await;
    let err = stale.expect_err("stale write must be refused");
    assert!(err.is_fenced(), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(
        remote_status(c.write(CHUNK, 0, pattern(12, BS), Seq::new(E3, 1), false).await),
        Status::UnannouncedEpoch
    );
    assert!(c.announce_epoch(VOL, E1).await.expect_err("lower announce").is_fenced());
    assert!(c.read(CHUNK, 0, BS as u32, E1).await.expect_err("stale read").is_fenced());
    assert!(c.list_dirty(VOL, E1).await.expect_err("stale list").is_fenced());
    assert_eq!(c.read(CHUNK, 0, BS as u32, E2).await.expect("read"), good);
    c.flush(VOL, E2).await.expect("flush");
    server.stop().await;

    // A new process opening the same store remembers the epoch.
    let server = Running::start(dir.path()).await;
    let c = client(server.addr);
    let err = c.write(CHUNK, 0, pattern(13, BS), Seq::new(E1, 100), true).await.expect_err("stale after restart");
    assert!(err.is_fenced(), "{err:?}");
    assert_eq!(c.read(CHUNK, 0, BS as u32, E2).await.expect("read"), good);
    assert_eq!(c.announce_epoch(VOL, E3).await.expect("announce"), E3);
    assert!(c.write(CHUNK, 0, pattern(14, BS), Seq::new(E2, 2), false).await.expect_err("e2 now stale").is_fenced());
    assert_eq!(c.read(CHUNK, 0, BS as u32, E3).await.expect("read"), good);
    server.stop().await;
}

fn write_frame(req: u64, offset: u64, length: u32, payload: Bytes) -> Frame {
    let mut h = Header::request(Op::Write, req, VOL, CHUNK.chunk, E1);
    h.offset = offset;
    h.length = length;
    h.seq_counter = 1000 + req;
    Frame::new(h, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_or_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Running::start(dir.path()).await;
    let addr = server.addr;
    let c = client(addr);
    setup_chunk(&c).await;
    let original = pattern(20, 4 * BS);
    c.write(CHUNK, 0, original.clone(), Seq::new(E1, 1), false).await.expect("write");
    // A second client, connected throughout, must keep being served.
    let other = ReplicaClient::new(addr, ClientOptions { connections: 1, ..ClientOptions::default() });
    other.ping().await.expect("ping");

    let evil = pattern(21, BS);
    let good_frame = encoded(&write_frame(1, 0, BS as u32, evil.clone()));

    // Connection-closing cases: the stream cannot be trusted any more.
    let mut bad_magic = good_frame.clone();
    bad_magic[0] = b'X';
    send_expect_close(addr, &bad_magic, false).await;
    other.ping().await.expect("other client served after bad magic");

    let mut bad_crc = good_frame.clone();
    bad_crc[33] ^= 0x10; // offset field, crc not updated
    send_expect_close(addr, &bad_crc, false).await;
    other.ping().await.expect("other client served after bad header crc");

    send_expect_close(addr, &good_frame[..good_frame.len() / 2], true).await;
    other.ping().await.expect("other client served after truncated frame");

    let mut unknown_op = good_frame.clone();
    unknown_op[5] = 77;
    reseal(&mut unknown_op);
    send_expect_close(addr, &unknown_op, false).await;
    other.ping().await.expect("other client served after unknown op");

    let mut oversized = good_frame.clone();
    oversized[56..60].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    reseal(&mut oversized);
    send_expect_close(addr, &oversized[..64], false).await;
    other.ping().await.expect("other client served after oversized frame");

    let mut bad_payload = good_frame.clone();
    bad_payload[64 + 100] ^= 1;
    send_expect_close(addr, &bad_payload, false).await;
    other.ping().await.expect("other client served after payload crc error");

    // Requests that decode but are invalid: an error response, connection stays.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let beyond = round_trip(&mut s, &write_frame(2, CHUNK_SIZE - BS as u64, 2 * BS as u32, pattern(22, 2 * BS))).await;
    assert_eq!(beyond.header.status, Status::OutOfRange, "{}", beyond.error_message());
    assert_eq!(beyond.header.request_id, 2);
    assert!(!beyond.error_message().is_empty());

    let unaligned = round_trip(&mut s, &write_frame(3, 100, BS as u32, evil.clone())).await;
    assert_eq!(unaligned.header.status, Status::Misaligned, "{}", unaligned.error_message());

    let mismatch = round_trip(&mut s, &write_frame(4, 0, 2 * BS as u32, evil.clone())).await;
    assert_eq!(mismatch.header.status, Status::BadRequest, "{}", mismatch.error_message());

    let mut read_with_payload = Header::request(Op::Read, 5, VOL, CHUNK.chunk, E1);
    read_with_payload.length = BS as u32;
    let resp = round_trip(&mut s, &Frame::new(read_with_payload, evil.clone())).await;
    assert_eq!(resp.header.status, Status::BadRequest);

    let mut trim_with_payload = Header::request(Op::Trim, 6, VOL, CHUNK.chunk, E1);
    trim_with_payload.length = BS as u32;
    let resp = round_trip(&mut s, &Frame::new(trim_with_payload, evil.clone())).await;
    assert_eq!(resp.header.status, Status::BadRequest);

    let response_as_request =
        Frame::new(write_frame(7, 0, BS as u32, Bytes::new()).header.response(Status::Ok), Bytes::new());
    let resp = round_trip(&mut s, &response_as_request).await;
    assert_eq!(resp.header.status, Status::BadRequest);

    let mut read_beyond = Header::request(Op::Read, 8, VOL, CHUNK.chunk, E1);
    read_beyond.offset = CHUNK_SIZE;
    read_beyond.length = BS as u32;
    let resp = round_trip(&mut s, &Frame::new(read_beyond, Bytes::new())).await;
    assert_eq!(resp.header.status, Status::OutOfRange);

    let missing = write_frame(9, 0, BS as u32, evil.clone());
    let mut missing_h = missing.header;
    missing_h.chunk = ChunkIdx(5);
    let resp = round_trip(&mut s, &Frame::new(missing_h, evil.clone())).await;
    assert_eq!(resp.header.status, Status::NoSuchChunk);

    // The same connection still serves good requests.
    let ping = round_trip(&mut s, &Frame::new(Header::request(Op::Ping, 10, VOL, CHUNK.chunk, E1), Bytes::new())).await;
    assert_eq!(ping.header.status, Status::Ok);
    assert_eq!(ping.header.request_id, 10);

    // Nothing was written by any of it.
    assert_eq!(c.read(CHUNK, 0, 4 * BS as u32, E1).await.expect("read back"), original);
    let tail = c.read(CHUNK, CHUNK_SIZE - BS as u64, BS as u32, E1).await.expect("read tail");
    assert!(tail.iter().all(|&b| b == 0));
    let table = c.context_table(CHUNK, BlockIdx(0), 4, E1).await.expect("table");
    assert!(table.iter().all(|ctx| ctx.seq == Seq::new(E1, 1)), "{table:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_complete_by_request_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Running::start(dir.path()).await;
    let addr = server.addr;
    let c = client(addr);
    setup_chunk(&c).await;
    let blocks = 64usize;
    let content = pattern(30, blocks * BS);
    c.write(CHUNK, 0, content.clone(), Seq::new(E1, 1), false).await.expect("fill");

    // Raw: one burst of mixed requests on one connection, answered in any order.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut burst = Vec::new();
    let mut expect: HashMap<u64, (Op, Bytes)> = HashMap::new();
    for i in 0..96u64 {
        let op = match i % 4 {
            0 => Op::Ping,
            3 if i % 8 == 3 => Op::Flush,
            _ => Op::Read,
        };
        let mut h = Header::request(op, 500 + i, VOL, CHUNK.chunk, E1);
        let mut want = Bytes::new();
        if op == Op::Read {
            // Sizes from 1 block to the whole filled range, so completions differ.
            let first = (i as usize * 7) % blocks;
            let n = if i % 16 == 1 { blocks - first } else { 1 + (i as usize % 5).min(blocks - first - 1) };
            h.offset = (first * BS) as u64;
            h.length = (n * BS) as u32;
            want = content.slice(first * BS..(first + n) * BS);
        }
        burst.extend_from_slice(&encoded(&Frame::new(h, Bytes::new())));
        expect.insert(500 + i, (op, want));
    }
    s.write_all(&burst).await.expect("send burst");
    let responses = read_frames(&mut s, expect.len()).await;
    let order: Vec<u64> = responses.iter().map(|f| f.header.request_id).collect();
    for f in responses {
        let (op, want) = expect.remove(&f.header.request_id).expect("each request answered exactly once");
        assert_eq!(f.header.op, op);
        assert_eq!(f.header.status, Status::Ok, "{}", f.error_message());
        assert!(f.header.flags.response);
        assert_eq!(f.payload, want, "request {}", f.header.request_id);
    }
    assert!(expect.is_empty());
    let in_order = order.windows(2).all(|w| w[0] < w[1]);
    println!("raw burst of {} requests answered {}", order.len(), if in_order { "in order" } else { "out of order" });

    // Client: many concurrent calls over ONE connection.
    let one = ReplicaClient::new(addr, ClientOptions { connections: 1, ..ClientOptions::default() });
    let mut tasks = Vec::new();
    for i in 0..blocks as u32 {
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(1000 + i, BS);
            let off = u64::from(i) * BS as u64;
            one.write(CHUNK, off, data.clone(), Seq::new(E1, 10 + u64::from(i)), i % 8 == 0).await?;
            let back = one.read(CHUNK, off, BS as u32, E1).await?;
            Ok::<_, ClientError>(back == data)
        }));
    }
    for t in tasks {
        assert!(t.await.expect("task").expect("call"), "read back what was written");
    }
    let table = one.context_table(CHUNK, BlockIdx(0), blocks as u32, E1).await.expect("table");
    for (i, ctx) in table.iter().enumerate() {
        assert_eq!(ctx.seq, Seq::new(E1, 10 + i as u64));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_times_out_on_a_silent_server() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accepts and reads, never answers; reports each connection the client closes.
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let hole = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        let _ = closed_tx.send(());
                        return;
                    }
                }
            });
        }
    });
    let opts = ClientOptions { timeout: Duration::from_millis(200), ..ClientOptions::default() };
    let c = ReplicaClient::new(addr, opts);
    let err = c.ping().await.expect_err("no answer");
    assert!(matches!(err, ClientError::Timeout { op: Op::Ping }), "{err:?}");
    assert!(err.is_retryable());
    let err = c.read(CHUNK, 0, BS as u32, E1).await.expect_err("no answer");
    assert!(matches!(err, ClientError::Timeout { op: Op::Read }), "{err:?}");
    // Each timed-out request's connection was abandoned and closed (a black-holed
    // peer must not keep tasks and sockets alive on the client).
    for n in 0..2 {
        tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("connection {n} was not closed after its timeout"))
            .expect("hole alive");
    }
    hole.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_fail_when_the_connection_drops() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Reads one request's bytes, then hangs up.
    let rude = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 64];
            let _ = s.read_exact(&mut buf).await;
            drop(s);
        }
    });
    let c = ReplicaClient::new(addr, ClientOptions { connections: 1, ..ClientOptions::default() });
    let err = c.ping().await.expect_err("hung up");
    assert!(matches!(err, ClientError::Disconnected), "{err:?}");
    assert!(err.is_retryable());
    rude.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_to_a_restarted_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Running::start(dir.path()).await;
    let addr = server.addr;
    let c = client(addr);
    setup_chunk(&c).await;
    let data = pattern(40, BS);
    c.write(CHUNK, 0, data.clone(), Seq::new(E1, 1), false).await.expect("write");
    c.flush(VOL, E1).await.expect("flush");
    server.stop().await;

    let err = c.ping().await.expect_err("server is down");
    assert!(err.is_retryable(), "{err:?}");

    let server = Running::start_on(dir.path(), addr).await;
    // Connections that died with the old server fail at most once each (retryable),
    // then the client reconnects.
    let mut attempts = 0;
    let back = loop {
        attempts += 1;
        match c.read(CHUNK, 0, BS as u32, E1).await {
            Ok(b) => break b,
            Err(e) if e.is_retryable() && attempts <= 4 => continue,
            Err(e) => panic!("no reconnect after {attempts} attempts: {e:?}"),
        }
    };
    assert_eq!(back, data);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_dead_port_fails_retryably() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let c = client(addr);
    let err = c.ping().await.expect_err("nobody listens");
    assert!(matches!(err, ClientError::Connect { addr: a, .. } if a == addr), "{err:?}");
    assert!(err.is_retryable());
    let _ = ChunkId::new(VOL, ChunkIdx(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_ops_round_trip_and_malformed_ones_are_refused_without_effect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Running::start(dir.path()).await;
    let c = client(server.addr);
    setup_chunk(&c).await;
    let (old, new) = (pattern(31, BS), pattern(32, BS));
    c.write(CHUNK, 0, old.clone(), Seq::new(E1, 1), false).await.expect("write");
    let cut = Seq::new(E1, 5);
    c.set_cuts(VOL, E1, &[cut]).await.expect("set cuts");
    c.write(CHUNK, 0, new.clone(), Seq::new(E1, 6), false).await.expect("overwrite");
    assert_eq!(c.read(CHUNK, 0, BS as u32, E1).await.expect("read"), new);
    assert_eq!(c.read_snapshot(CHUNK, cut, 0, BS as u32, E1).await.expect("read snapshot"), old);

    // Refused by the store: cuts out of order, a new cut below the existing
    // one, a cut the volume does not have, a fenced epoch.
    let unordered = c.set_cuts(VOL, E1, &[Seq::new(E1, 9), Seq::new(E1, 7)]).await;
    assert_eq!(remote_status(unordered), Status::BadRequest);
    assert_eq!(remote_status(c.set_cuts(VOL, E1, &[Seq::new(E1, 2), cut]).await), Status::BadRequest);
    assert_eq!(remote_status(c.read_snapshot(CHUNK, Seq::new(E1, 4), 0, BS as u32, E1).await), Status::BadRequest);
    assert_eq!(c.announce_epoch(VOL, E2).await.expect("announce"), E2);
    assert_eq!(remote_status(c.set_cuts(VOL, E1, &[cut, Seq::new(E1, 8)]).await), Status::Fenced);

    // Malformed frames: an error response each, the connection stays.
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    let cuts = ballast_wire::encode_cuts(&[cut, Seq::new(E2, 1)]);
    let mut on_a_chunk = Header::request(Op::SetCuts, 1, VOL, CHUNK.chunk, E2);
    on_a_chunk.length = 2;
    let resp = round_trip(&mut s, &Frame::new(on_a_chunk, cuts.clone())).await;
    assert_eq!(resp.header.status, Status::BadRequest, "{}", resp.error_message());
    let mut short = Header::request(Op::SetCuts, 2, VOL, ballast_wire::ALL_CHUNKS, E2);
    short.length = 3;
    let resp = round_trip(&mut s, &Frame::new(short, cuts.clone())).await;
    assert_eq!(resp.header.status, Status::BadRequest, "{}", resp.error_message());
    let mut too_many = Header::request(Op::SetCuts, 3, VOL, ballast_wire::ALL_CHUNKS, E2);
    too_many.length = ballast_wire::MAX_CUTS + 1;
    let resp = round_trip(&mut s, &Frame::new(too_many, cuts.clone())).await;
    assert_eq!(resp.header.status, Status::BadRequest, "{}", resp.error_message());
    for (req, payload) in [(4, Bytes::new()), (5, cuts.slice(..20)), (6, cuts.clone())] {
        let mut h = Header::request(Op::ReadSnapshot, req, VOL, CHUNK.chunk, E2);
        h.length = BS as u32;
        let resp = round_trip(&mut s, &Frame::new(h, payload)).await;
        assert_eq!(resp.header.status, Status::BadRequest, "request {req}: {}", resp.error_message());
    }
    // Nothing changed: the one cut is still there and reads the same.
    assert_eq!(c.read_snapshot(CHUNK, cut, 0, BS as u32, E2).await.expect("read snapshot"), old);
    assert_eq!(c.read(CHUNK, 0, BS as u32, E2).await.expect("read"), new);
    let mut ping = Header::request(Op::Ping, 7, VOL, CHUNK.chunk, E2);
    ping.length = 0;
    assert_eq!(round_trip(&mut s, &Frame::new(ping, Bytes::new())).await.header.status, Status::Ok);
    server.stop().await;
}
