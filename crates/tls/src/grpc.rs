//! tonic over [`Security`]: a server's incoming connections with the peer's
//! identity attached to every request, and a client channel that dials through
//! the same handshake.
//!
//! A handler reads the caller with [`peer_of`]. A request that did not come
//! through [`incoming`] has no [`PeerInfo`] and is treated as nobody (refused
//! by every check), never as insecure.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use crate::{Peer, Role, Security, Stream};

/// Who sent a request, as the connection's handshake established.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub peer: Peer,
}

/// The caller of a gRPC request, if it came through [`incoming`].
pub fn peer_of<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

/// A secured server connection, as tonic serves it.
pub struct GrpcIo {
    stream: Stream,
    info: PeerInfo,
}

impl Connected for GrpcIo {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for GrpcIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The connections of `listener`, each secured by `security` in a task of its
/// own (a slow or silent peer delays nobody else). A refused handshake is
/// logged with the peer's address and the reason, and never reaches tonic.
/// The listener closes when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    security: Security,
    service: &'static str,
) -> ReceiverStream<io::Result<GrpcIo>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(service, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let security = security.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match security.accept(tcp).await {
                    Ok((stream, peer)) => {
                        debug!(service, %addr, %peer, "connection accepted");
                        let _ = tx.send(Ok(GrpcIo { stream, info: PeerInfo { addr, peer } })).await;
                    }
                    Err(e) => warn!(service, peer = %addr, error = %e, "connection refused"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazily connected channel on `endpoint` whose connections go through
/// `security`, to a server of role `expect`.
pub fn channel(endpoint: &Endpoint, security: Security, expect: Role) -> Channel {
    let connector = tower::service_fn(move |uri: http::Uri| {
        let security = security.clone();
        async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(80);
            let addr = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
            security.dial(&addr, expect).await.map(TokioIo::new)
        }
    });
    endpoint.connect_with_connector_lazy(connector)
}
