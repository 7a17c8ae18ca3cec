//! Connecting to a replica that does not answer: requests share one connect
//! attempt per connection slot, and every request is bounded by its own
//! timeout, the wait for a connection included (issue 13, defect c: each slot's
//! lock used to be held across the connect, outside the request timeout, so
//! queued requests redid the connect one after another).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ballast_replica::{ClientError, ClientOptions, ReplicaClient};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A loopback listener that never accepts, with its accept queue filled: the
/// kernel then drops every further SYN, so a connect to it hangs as to a
/// black-holed peer. Returns the listener and the queued connections (both
/// must stay alive).
fn black_hole() -> (TcpListener, Vec<std::net::TcpStream>, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut queued = Vec::new();
    for _ in 0..64 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return (listener, queued, addr),
            Err(e) => panic!("filling the accept queue: {e}"),
        }
    }
    panic!("the accept queue of a backlog-1 listener took 64 connections");
}

/// N concurrent requests to a black-holed replica all fail within about one
/// request timeout (virtual time), not one connect after another.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_requests_to_a_black_hole_fail_together_within_one_timeout() {
    let (_listener, _queued, addr) = black_hole();
    tokio::time::pause();
    let timeout = Duration::from_secs(1);
    // The connect timeout is far longer than the request timeout: the request
    // timeout must bound the wait for a connection.
    let opts =
        ClientOptions { connections: 2, timeout, connect_timeout: Duration::from_secs(30), ..ClientOptions::default() };
    let client = ReplicaClient::new(addr, opts);
    const N: usize = 16;
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..N {
        let c = client.clone();
        set.spawn(async move { (c.ping().await, start.elapsed()) });
    }
    let mut slowest = Duration::ZERO;
    while let Some(joined) = set.join_next().await {
        let (r, took) = joined.expect("request task");
        let err = r.expect_err("nothing answers");
        assert!(matches!(err, ClientError::Connect { addr: a, .. } if a == addr), "{err:?}");
        assert!(err.is_retryable(), "{err:?}");
        slowest = slowest.max(took);
    }
    // Virtual time: every request gives up at its own deadline, one timeout
    // after the start (it was N / connections * connect_timeout = 240 s).
    assert!(slowest >= timeout && slowest < timeout * 2, "{N} requests took {slowest:?} with a {timeout:?} timeout");
    // A later request waits for the attempt still running, again bounded.
    let t = Instant::now();
    let err = client.ping().await.expect_err("still nothing answers");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(t.elapsed() < timeout * 2, "{:?}", t.elapsed());
}

/// Requests that find a slot without a connection wait for the one attempt:
/// N concurrent requests open one connection per slot, not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_connect_per_slot() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    // Accepts and reads, never answers.
    let count = accepted.clone();
    let silent = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let opts = ClientOptions { connections: 2, timeout: Duration::from_secs(1), ..ClientOptions::default() };
    let client = ReplicaClient::new(addr, opts);
    let mut set = JoinSet::new();
    for _ in 0..16 {
        let c = client.clone();
        set.spawn(async move { c.ping().await });
    }
    while let Some(joined) = set.join_next().await {
        // The first request to time out closes the connection, failing the
        // others on it.
        let err = joined.expect("request task").expect_err("no answer");
        assert!(matches!(err, ClientError::Timeout { .. } | ClientError::Disconnected), "{err:?}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "one connection per slot");
    silent.abort();
}
