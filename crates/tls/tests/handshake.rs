//! Mutual TLS between real sockets on loopback: who gets in, who is refused and
//! why, and renewals picked up by a running server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ballast_tls::certs::{Ca, Pki, CERT, CERT_LIFETIME};
use ballast_tls::{Identity, Peer, Role, Security, TlsError, Validity};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Server {
    addr: String,
    /// What each accepted connection turned out to be.
    accepted: tokio::sync::mpsc::UnboundedReceiver<Result<Peer, String>>,
}

/// A server that accepts with `security` and echoes what each connection sends.
async fn echo_server(security: Security) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let security = security.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match security.accept(tcp).await {
                    Ok((mut s, peer)) => {
                        let _ = tx.send(Ok(peer));
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 || s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    Server { addr, accepted }
}

async fn echo(security: &Security, addr: &str, expect: Role) -> Result<(), TlsError> {
    let mut s = security.dial(addr, expect).await?;
    s.write_all(b"ping").await.map_err(TlsError::Handshake)?;
    s.flush().await.map_err(TlsError::Handshake)?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.map_err(TlsError::Handshake)?;
    assert_eq!(&buf, b"ping");
    Ok(())
}

fn issue(ca: &Ca, identity: Identity, validity: Validity, dir: &Path) -> PathBuf {
    ca.issue(&identity, validity).unwrap().write(dir).unwrap();
    dir.to_path_buf()
}

fn valid() -> Validity {
    Validity::starting_now(CERT_LIFETIME)
}

async fn refusal(server: &mut Server) -> String {
    match tokio::time::timeout(Duration::from_secs(5), server.accepted.recv()).await {
        Ok(Some(Err(e))) => e,
        other => panic!("expected the server to refuse, got {other:?}"),
    }
}

#[tokio::test]
async fn a_node_and_a_meta_member_learn_each_others_identity() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(t.path()).unwrap();
    let meta = Security::from_dir(&pki.issue(&Identity::Meta(1)).unwrap()).unwrap();
    let node = Security::from_dir(&pki.issue(&Identity::Node(3)).unwrap()).unwrap();
    assert_eq!(node.identity(), Some(Identity::Node(3)));
    let mut server = echo_server(meta).await;
    echo(&node, &server.addr, Role::Meta).await.unwrap();
    let peer = server.accepted.recv().await.unwrap().unwrap();
    assert_eq!(peer, Peer::Authenticated(Identity::Node(3)));
}

#[tokio::test]
async fn the_client_refuses_a_server_of_another_role() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(t.path()).unwrap();
    let node = Security::from_dir(&pki.issue(&Identity::Node(3)).unwrap()).unwrap();
    let frontend = Security::from_dir(&pki.issue(&Identity::Frontend(3)).unwrap()).unwrap();
    // A front end's certificate serving where a meta member is expected.
    let server = echo_server(frontend).await;
    let e = echo(&node, &server.addr, Role::Meta).await.unwrap_err().to_string();
    assert!(e.contains("frontend/3, not a meta"), "{e}");
}

#[tokio::test]
async fn plaintext_and_certificates_of_another_ca_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(&t.path().join("ours")).unwrap();
    let theirs = Pki::open_or_create(&t.path().join("theirs")).unwrap();
    let meta = Security::from_dir(&pki.issue(&Identity::Meta(1)).unwrap()).unwrap();
    let mut server = echo_server(meta.clone()).await;

    // Plaintext: the bytes of an rpc where a ClientHello must be.
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let e = refusal(&mut server).await;
    assert!(e.contains("handshake"), "{e}");
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    assert!(!rest.windows(4).any(|w| w == b"ping"), "nothing is served to plaintext");

    // A well-formed certificate from another CA, as a client (that trusts our
    // server, so the refusal is the server's).
    let mallory = theirs.issue(&Identity::Admin("mallory".into())).unwrap();
    std::fs::write(mallory.join("ca.crt"), format!("{}{}", theirs.ca().cert_pem, pki.ca().cert_pem)).unwrap();
    let stranger = Security::from_dir(&mallory).unwrap();
    assert!(echo(&stranger, &server.addr, Role::Meta).await.is_err());
    let e = refusal(&mut server).await;
    assert!(e.contains("UnknownIssuer") || e.contains("BadSignature"), "{e}");

    // And as a server: our client will not talk to it.
    let fake = Security::from_dir(&theirs.issue(&Identity::Meta(1)).unwrap()).unwrap();
    let fake_server = echo_server(fake).await;
    let e = echo(&meta, &fake_server.addr, Role::Meta).await.unwrap_err().to_string();
    assert!(e.contains("UnknownIssuer") || e.contains("BadSignature"), "{e}");
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(t.path()).unwrap();
    let meta = Security::from_dir(&pki.issue(&Identity::Meta(1)).unwrap()).unwrap();
    let mut server = echo_server(meta).await;
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    for (what, validity, expect) in [
        ("expired", Validity { not_before: now - day * 10, not_after: now - day }, "certificate expired"),
        ("not yet valid", Validity { not_before: now + day, not_after: now + day * 10 }, "not valid before"),
    ] {
        let dir = issue(pki.ca(), Identity::Node(2), validity, &t.path().join(what.replace(' ', "-")));
        let client = Security::from_dir(&dir).unwrap();
        assert!(echo(&client, &server.addr, Role::Meta).await.is_err(), "{what}");
        let e = refusal(&mut server).await;
        assert!(e.contains(expect), "{what}: {e}");
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(t.path()).unwrap();
    let meta = Security::from_dir(&pki.issue(&Identity::Meta(1)).unwrap()).unwrap();
    let mut server = echo_server(meta).await;
    // A TLS client that trusts our CA but has no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(pki.ca_dir().join("ca.crt")).unwrap();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca_pem) {
        let c: rustls_pki_types::CertificateDer<'static> = c.unwrap();
        roots.add(c).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(&server.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("ballast.invalid").unwrap();
    // The server's certificate names no DNS name: a stock client fails it, or
    // (were it to pass) the server fails the client for sending no certificate.
    if let Ok(mut s) = connector.connect(name, tcp).await {
        let _ = s.write_all(b"ping").await;
        let _ = s.flush().await;
        let mut buf = [0u8; 4];
        assert!(s.read_exact(&mut buf).await.is_err(), "nothing is echoed");
        let e = refusal(&mut server).await;
        assert!(e.contains("certificate"), "{e}");
    }
}

#[tokio::test]
async fn a_renewed_certificate_serves_new_connections_and_old_ones_keep_working() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(t.path()).unwrap();
    let meta_dir = pki.issue(&Identity::Meta(1)).unwrap();
    let meta = Security::from_dir(&meta_dir).unwrap();
    let node = Security::from_dir(&pki.issue(&Identity::Node(3)).unwrap()).unwrap();
    let mut server = echo_server(meta).await;
    let mut old = node.dial(&server.addr, Role::Meta).await.unwrap();
    server.accepted.recv().await.unwrap().unwrap();
    let served_cert = |s: &ballast_tls::Stream| match s {
        ballast_tls::Stream::Client(c) => c.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        _ => unreachable!(),
    };
    let before = served_cert(&old);

    // Renew the server's certificate in place (same identity, new key).
    pki.ca().issue(&Identity::Meta(1), valid()).unwrap().write(&meta_dir).unwrap();
    let renewed = std::fs::read(meta_dir.join(CERT)).unwrap();
    tokio::time::sleep(ballast_tls::RELOAD_CHECK + Duration::from_millis(200)).await;
    let new = node.dial(&server.addr, Role::Meta).await.unwrap();
    server.accepted.recv().await.unwrap().unwrap();
    let after = served_cert(&new);
    assert_ne!(before, after, "a new connection gets the renewed certificate");
    let (_, p) = x509_parser::pem::parse_x509_pem(&renewed).unwrap();
    assert_eq!(after, p.contents, "it is the file's certificate");

    // The connection made before the renewal still carries data.
    old.write_all(b"ping").await.unwrap();
    old.flush().await.unwrap();
    let mut buf = [0u8; 4];
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn a_broken_renewal_keeps_the_certificate_in_use() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(t.path()).unwrap();
    let meta_dir = pki.issue(&Identity::Meta(1)).unwrap();
    let meta = Security::from_dir(&meta_dir).unwrap();
    let node = Security::from_dir(&pki.issue(&Identity::Node(3)).unwrap()).unwrap();
    let server = echo_server(meta.clone()).await;
    // A key that belongs to another certificate.
    let other = pki.ca().issue(&Identity::Meta(1), valid()).unwrap();
    std::fs::write(meta_dir.join("tls.key"), other.key_pem).unwrap();
    tokio::time::sleep(ballast_tls::RELOAD_CHECK + Duration::from_millis(200)).await;
    echo(&node, &server.addr, Role::Meta).await.unwrap();
    // A renewal that names someone else.
    pki.ca().issue(&Identity::Meta(2), valid()).unwrap().write(&meta_dir).unwrap();
    tokio::time::sleep(ballast_tls::RELOAD_CHECK + Duration::from_millis(200)).await;
    echo(&node, &server.addr, Role::Meta).await.unwrap();
    assert_eq!(meta.identity(), Some(Identity::Meta(1)));
}

#[tokio::test]
async fn a_second_ca_in_the_bundle_lets_both_generations_in() {
    let t = tempfile::tempdir().unwrap();
    let old = Pki::open_or_create(&t.path().join("old")).unwrap();
    let new = Pki::open_or_create(&t.path().join("new")).unwrap();
    let meta_dir = old.issue(&Identity::Meta(1)).unwrap();
    // Rotation step 1: every process trusts both CAs.
    let bundle = format!("{}{}", old.ca().cert_pem, new.ca().cert_pem);
    std::fs::write(meta_dir.join("ca.crt"), &bundle).unwrap();
    let server = echo_server(Security::from_dir(&meta_dir).unwrap()).await;
    // Step 2: a process with a certificate of the new CA (and the bundle) gets in.
    let node_dir = new.issue(&Identity::Node(3)).unwrap();
    std::fs::write(node_dir.join("ca.crt"), &bundle).unwrap();
    echo(&Security::from_dir(&node_dir).unwrap(), &server.addr, Role::Meta).await.unwrap();
    // And one of the old CA still does.
    let node_dir = old.issue(&Identity::Node(4)).unwrap();
    echo(&Security::from_dir(&node_dir).unwrap(), &server.addr, Role::Meta).await.unwrap();
}

#[tokio::test]
async fn a_replayed_or_truncated_tls_stream_delivers_nothing() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(t.path()).unwrap();
    let meta = Security::from_dir(&pki.issue(&Identity::Meta(1)).unwrap()).unwrap();
    let node = Security::from_dir(&pki.issue(&Identity::Node(3)).unwrap()).unwrap();
    let mut server = echo_server(meta).await;
    // Record what a client sends through a proxy.
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    let upstream = server.addr.clone();
    let recorded = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let rec = recorded.clone();
    tokio::spawn(async move {
        let (client, _) = proxy.accept().await.unwrap();
        let server = TcpStream::connect(upstream).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
        let mut buf = [0u8; 4096];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            rec.lock().unwrap().extend_from_slice(&buf[..n]);
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    echo(&node, &proxy_addr, Role::Meta).await.unwrap();
    server.accepted.recv().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let bytes = recorded.lock().unwrap().clone();
    assert!(bytes.len() > 100, "recorded the client's handshake and data");

    // Replayed whole on a new connection: the server's fresh randomness makes
    // the old Finished and records worthless.
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    tcp.write_all(&bytes).await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut back)).await;
    let e = refusal(&mut server).await;
    assert!(e.contains("handshake"), "{e}");
    assert!(!back.windows(4).any(|w| w == b"ping"));

    // Truncated: the first half, then the connection closes.
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    tcp.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
    tcp.shutdown().await.unwrap();
    let e = refusal(&mut server).await;
    assert!(e.contains("handshake"), "{e}");
}

#[test]
fn keys_are_private_and_existing_cas_are_not_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(t.path()).unwrap();
    let dir = pki.issue(&Identity::Admin("ops".into())).unwrap();
    for (f, mode) in [("ca/ca.key", 0o600), ("ca/ca.crt", 0o644)] {
        let m = std::fs::metadata(t.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{f}");
    }
    for (f, mode) in [("tls.key", 0o600), ("tls.crt", 0o644), ("ca.crt", 0o644)] {
        let m = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{f}");
    }
    let e = pki.ca().write(&pki.ca_dir()).unwrap_err().to_string();
    assert!(e.contains("exists"), "{e}");
    // Issuing again for a valid certificate keeps it.
    let before = std::fs::read(dir.join("tls.crt")).unwrap();
    pki.issue(&Identity::Admin("ops".into())).unwrap();
    assert_eq!(before, std::fs::read(dir.join("tls.crt")).unwrap());
}

#[test]
fn plaintext_needs_an_explicit_flag() {
    assert!(matches!(Security::from_flags(None, false, "test"), Err(TlsError::NoIdentity)));
    assert!(matches!(Security::from_flags(Some(Path::new("/x")), true, "test"), Err(TlsError::Conflicting)));
    assert!(matches!(Security::from_flags(None, true, "test"), Ok(Security::Insecure)));
}

#[test]
fn a_ca_rotation_bundle_signs_with_the_key_it_holds_and_renews_at_each_step() {
    let t = tempfile::tempdir().unwrap();
    let old = Ca::generate("old", valid()).unwrap();
    let new = Ca::generate("new", valid()).unwrap();
    let id = Identity::Node(7);
    let out = t.path().join("node-7");
    let lifetime = CERT_LIFETIME;
    let issuer_of = |dir: &Path| {
        let pem = std::fs::read(dir.join(CERT)).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        p.parse_x509().unwrap().issuer().to_string()
    };
    // Before: the old CA alone. Issued once, then left alone while fresh.
    assert!(ballast_tls::certs::renew_if_due(&old, &id, lifetime, &out).unwrap());
    assert!(!ballast_tls::certs::renew_if_due(&old, &id, lifetime, &out).unwrap());
    assert!(issuer_of(&out).contains("old"));
    // Step 2: both certificates trusted, the old key signs: re-issued with the bundle.
    let both = format!("{}{}", old.cert_pem, new.cert_pem);
    let step2 = Ca { cert_pem: both.clone(), key_pem: old.key_pem.clone() };
    assert!(ballast_tls::certs::renew_if_due(&step2, &id, lifetime, &out).unwrap());
    assert_eq!(std::fs::read_to_string(out.join("ca.crt")).unwrap(), both);
    assert!(issuer_of(&out).contains("old"));
    // Step 3: the new key signs: re-issued at once, by the new CA.
    let step3 = Ca { cert_pem: both, key_pem: new.key_pem.clone() };
    assert!(ballast_tls::certs::renew_if_due(&step3, &id, lifetime, &out).unwrap());
    assert!(issuer_of(&out).contains("new"), "{}", issuer_of(&out));
    assert!(!ballast_tls::certs::renew_if_due(&step3, &id, lifetime, &out).unwrap());
    // It is valid: a server with the old-CA certificate and the bundle accepts it,
    // as does everyone during the rotation.
    let s = Security::from_dir(&out).unwrap();
    assert_eq!(s.identity(), Some(id));
    // A key that matches no certificate of the bundle is refused with the reason.
    let stray = Ca::generate("stray", valid()).unwrap();
    let bad = Ca { cert_pem: old.cert_pem.clone(), key_pem: stray.key_pem };
    let e = bad.issue(&Identity::Node(1), valid()).err().expect("refused").to_string();
    assert!(e.contains("no certificate in ca.crt has ca.key's public key"), "{e}");
}
