//! The accept stream: TCP connections in, TLS connections out, handshakes concurrent and
//! bounded; and [`TlsConn`], the connection tonic serves with its [`TlsConnInfo`].

use std::{
    fmt,
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::Sleep,
};
use tokio_rustls::{rustls::pki_types::CertificateDer, server::TlsStream};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use super::{
    ACCEPT_ERROR_BACKOFF, HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES, TlsAcceptor, peer_identity,
};

/// The stream of established TLS connections on `listener`, for tonic's
/// `serve_with_incoming[_shutdown]`.
///
/// Handshakes run concurrently in tasks owned by the stream (dropping it aborts them and closes
/// the listener), each bounded by a timeout (10 s). Failed handshakes are logged at debug
/// and skipped; accept errors are logged and retried after a short pause. The stream never
/// ends and never yields an error; the `io::Result` item is what tonic expects.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> impl Stream<Item = io::Result<TlsConn>> + Send + 'static {
    Incoming {
        listener,
        acceptor,
        handshakes: JoinSet::new(),
        backoff: None,
    }
}

struct Incoming {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<TlsConn>>,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Stream for Incoming {
    type Item = io::Result<TlsConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(sleep) = &mut this.backoff
            && sleep.as_mut().poll(cx).is_ready()
        {
            this.backoff = None;
        }
        while this.backoff.is_none() && this.handshakes.len() < MAX_PENDING_HANDSHAKES {
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, remote))) => {
                    let acceptor = this.acceptor.clone();
                    this.handshakes.spawn(handshake(acceptor, tcp, remote));
                }
                Poll::Ready(Err(error)) => {
                    if !is_connection_error(&error) {
                        warn!(%error, "accepting a connection failed; pausing");
                        let mut sleep = Box::pin(tokio::time::sleep(ACCEPT_ERROR_BACKOFF));
                        // Registers the waker for the end of the pause.
                        let _ = sleep.as_mut().poll(cx);
                        this.backoff = Some(sleep);
                    }
                }
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(conn)))) => return Poll::Ready(Some(Ok(conn))),
                Poll::Ready(Some(Ok(None))) => {}
                Poll::Ready(Some(Err(error))) => {
                    if error.is_panic() {
                        warn!(%error, "TLS handshake task panicked");
                    }
                }
                // No handshake finished: the listener (or the backoff) will wake us.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Errors of one connection that was reset before it was accepted: nothing to pause for.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

async fn handshake(acceptor: TlsAcceptor, tcp: TcpStream, remote: SocketAddr) -> Option<TlsConn> {
    if let Err(error) = tcp.set_nodelay(true) {
        debug!(%remote, %error, "cannot set TCP_NODELAY");
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let peer_certs = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|certs| Arc::new(certs.to_vec()));
            // Parsed once here; every request on the connection shares it.
            let identity = peer_certs
                .as_deref()
                .and_then(|certs| peer_identity(certs))
                .map(Arc::from);
            Some(TlsConn {
                stream,
                info: TlsConnInfo {
                    remote_addr: remote,
                    peer_certs,
                    identity,
                },
            })
        }
        Ok(Err(error)) => {
            debug!(%remote, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(%remote, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
            None
        }
    }
}

/// An established server-side TLS connection, as yielded by [`incoming`].
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: TlsConnInfo,
}

/// What tonic puts into each request's extensions for a [`TlsConn`]:
/// `request.extensions().get::<TlsConnInfo>()`. Made once per connection, at the handshake;
/// each request gets a clone (two `Arc`s).
#[derive(Debug, Clone)]
pub struct TlsConnInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The client's certificate chain, leaf first, verified against the client CAs. `None`
    /// when no client CA is configured.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The caller identity of `peer_certs` ([`peer_identity`]), read at the handshake so that
    /// no request parses the certificate again. `None` without a certificate, or when it names
    /// nobody.
    pub identity: Option<Arc<str>>,
}

impl TlsConnInfo {
    /// The caller identity of the client certificate ([`TlsConnInfo::identity`]), see
    /// [`peer_identity`].
    pub fn peer_identity(&self) -> Option<String> {
        self.identity.as_deref().map(str::to_owned)
    }
}

impl fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConn")
            .field("remote_addr", &self.info.remote_addr)
            .finish_non_exhaustive()
    }
}

impl TlsConn {
    /// The connection's address and client certificate.
    pub fn info(&self) -> &TlsConnInfo {
        &self.info
    }
}

impl Connected for TlsConn {
    type ConnectInfo = TlsConnInfo;

    fn connect_info(&self) -> TlsConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
