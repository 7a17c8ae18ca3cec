//! The data path over mutual TLS: front ends and storage nodes get in; a meta
//! member's, an admin's or another CA's certificate, and plaintext, are
//! refused at the connection and write nothing; a client refuses a server that
//! is no storage node.

use std::time::Duration;

use ballast_chunkstore::{ChunkStore, StoreOptions};
use ballast_replica::{ClientOptions, ReplicaClient, ReplicaServer, ServerOptions};
use ballast_tls::certs::Pki;
use ballast_tls::{Identity, Security};
use ballast_types::{ChunkId, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::Bytes;
use tokio::net::TcpListener;

const CHUNK: ChunkId = ChunkId { volume: VolumeId(1), chunk: ChunkIdx(0) };
const E1: Epoch = Epoch(1);

fn client(addr: std::net::SocketAddr, security: Security) -> ReplicaClient {
    let opts = ClientOptions { security, timeout: Duration::from_secs(5), connections: 1, ..ClientOptions::default() };
    ReplicaClient::new(addr, opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_nodes_and_front_ends_use_the_data_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::open_or_create(&dir.path().join("pki")).expect("pki");
    let other = Pki::open_or_create(&dir.path().join("other-ca")).expect("pki");
    let store = ChunkStore::open(dir.path().join("disk"), StoreOptions::default()).expect("store");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opts = ServerOptions { security: pki.security(&Identity::Node(1)).expect("cert"), ..ServerOptions::default() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ReplicaServer::new(store.clone(), opts).serve(listener, async {
        let _ = stopped.await;
    }));

    // Refused: identities that are no front end or node, another CA, plaintext.
    let refused = [
        ("meta/1", pki.security(&Identity::Meta(1)).unwrap()),
        ("admin/ops", pki.security(&Identity::Admin("ops".into())).unwrap()),
        ("csi-controller", pki.security(&Identity::CsiController).unwrap()),
        ("another CA's node/2", other.security(&Identity::Node(2)).unwrap()),
        ("plaintext", Security::Insecure),
    ];
    for (who, security) in refused {
        let c = client(addr, security);
        assert!(c.announce_epoch(CHUNK.volume, E1).await.is_err(), "{who} must not announce an epoch");
        let r = c.create_chunk(CHUNK, 1 << 20, E1).await;
        assert!(r.is_err(), "{who} must not create a chunk");
        let w = c.write(CHUNK, 0, Bytes::from(vec![7u8; 4096]), Seq::new(E1, 1), true).await;
        assert!(w.is_err(), "{who} must not write");
    }
    assert!(store.chunks().is_empty(), "nothing was created: {:?}", store.chunks().len());

    // A front end and a copy peer (another node) get in.
    for (i, (who, id)) in [("frontend/1", Identity::Frontend(1)), ("node/2", Identity::Node(2))].into_iter().enumerate()
    {
        let c = client(addr, pki.security(&id).unwrap());
        let chunk = ChunkId { chunk: ChunkIdx(i as u32), ..CHUNK };
        c.announce_epoch(CHUNK.volume, E1).await.unwrap_or_else(|e| panic!("{who}: {e}"));
        c.create_chunk(chunk, 1 << 20, E1).await.unwrap_or_else(|e| panic!("{who}: {e}"));
        let data = Bytes::from(vec![0x5a; 4096]);
        c.write(chunk, 0, data.clone(), Seq::new(E1, 1), true).await.unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(c.read(chunk, 0, 4096, E1).await.unwrap(), data, "{who}");
    }

    // A client refuses a server that is no storage node: a front end's
    // certificate serving the data path.
    let fake = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let fake_addr = fake.local_addr().expect("addr");
    let fake_store = ChunkStore::open(dir.path().join("fake"), StoreOptions::default()).expect("store");
    let fake_opts =
        ServerOptions { security: pki.security(&Identity::Frontend(9)).unwrap(), ..ServerOptions::default() };
    let (fake_stop, fake_stopped) = tokio::sync::oneshot::channel::<()>();
    let fake_server = tokio::spawn(ReplicaServer::new(fake_store.clone(), fake_opts).serve(fake, async {
        let _ = fake_stopped.await;
    }));
    let c = client(fake_addr, pki.security(&Identity::Frontend(1)).unwrap());
    let e = c.announce_epoch(CHUNK.volume, E1).await.expect_err("not a storage node").to_string();
    assert!(e.contains("not a node"), "{e}");
    assert!(fake_store.chunks().is_empty());

    let _ = stop.send(());
    let _ = fake_stop.send(());
    server.await.expect("join").expect("serve");
    fake_server.await.expect("join").expect("serve");
}
