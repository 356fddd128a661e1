//! Server TLS for the gRPC port: a certificate that rotates without a restart, optional client
//! certificates (mTLS), and an accept stream for tonic that runs handshakes concurrently.
//!
//! [`TlsAcceptor`] holds the current rustls [`ServerConfig`] in an [`ArcSwap`]; each accepted
//! connection loads it once, so [`TlsAcceptor::reload`] changes what *new* connections get and
//! leaves established ones alone. The certificate is served by a resolver over an
//! `ArcSwap<CertifiedKey>` shared by every config, so a certificate rotation only swaps the key
//! (the session cache survives); a change of client CA builds a new config with a new verifier.
//!
//! [`incoming`] turns a [`TcpListener`] into the stream tonic's
//! `serve_with_incoming[_shutdown]` takes. Handshakes run as tasks with a timeout, at most
//! [`MAX_PENDING_HANDSHAKES`] at once, so a slow or silent client never holds up the others; a
//! failed handshake is logged at debug and skipped. Each [`TlsConn`] carries a [`TlsConnInfo`]
//! (remote address, verified client certificate chain) that tonic puts into every request's
//! extensions.
//!
//! Only rustls with aws-lc-rs is used; no OpenSSL.

use std::{
    fmt,
    future::Future as _,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::Sleep,
};
use tokio_rustls::{
    rustls::{
        RootCertStore, ServerConfig,
        crypto::{CryptoProvider, aws_lc_rs},
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
        sign::CertifiedKey,
    },
    server::TlsStream,
};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; beyond this, new TCP connections wait in the listen backlog.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Pause after an accept error such as "too many open files", so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

// === Configuration ===

/// The `tls` section as written in the YAML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM file with the server certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file with the CA certificates client certificates must chain to. Set: every client
    /// must present a certificate from one of them (mTLS). Unset: no client certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// A validated `tls` section: the files exist and hold a usable certificate, key and CAs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key.
    pub key_file: PathBuf,
    /// PEM file with the client CA certificates; `None`: no client certificates.
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client may connect without a certificate (set when callers may identify
    /// themselves with a service-account token instead; not a YAML key).
    pub client_cert_optional: bool,
}

impl RawTls {
    /// Reads and parses the files, so that a bad certificate or key is refused at load time.
    /// The message names the field (`tls.cert_file`, `tls.key_file`, `tls.client_ca_file`).
    pub fn validate(self) -> Result<TlsConfig, String> {
        let config = TlsConfig {
            cert_file: self.cert_file,
            key_file: self.key_file,
            client_ca_file: self.client_ca_file,
            client_cert_optional: false,
        };
        Material::load(&config, &provider())?;
        Ok(config)
    }
}

impl TlsConfig {
    /// The files this config reads (to watch for live reload).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [&self.cert_file, &self.key_file]
            .into_iter()
            .chain(&self.client_ca_file)
            .map(PathBuf::as_path)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// What the files of a [`TlsConfig`] hold, parsed.
struct Material {
    key: Arc<CertifiedKey>,
    /// The client CA certificates, as read (compared on reload).
    client_cas: Option<Vec<CertificateDer<'static>>>,
    client_cert_optional: bool,
}

impl Material {
    fn load(config: &TlsConfig, provider: &Arc<CryptoProvider>) -> Result<Self, String> {
        let chain = read_certs(&config.cert_file, "tls.cert_file")?;
        let key_bytes = read_file(&config.key_file, "tls.key_file")?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
            format!(
                "tls.key_file: {} holds no usable PEM private key: {e}",
                config.key_file.display()
            )
        })?;
        let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            format!(
                "tls.key_file: {} does not fit the certificate in tls.cert_file: {e}",
                config.key_file.display()
            )
        })?;
        let client_cas = match &config.client_ca_file {
            Some(path) => {
                let cas = read_certs(path, "tls.client_ca_file")?;
                // Build once now: a CA the verifier cannot use is a config error, not a
                // handshake failure later.
                client_verifier(&cas, provider, config.client_cert_optional)
                    .map_err(|e| format!("tls.client_ca_file: {}: {e}", path.display()))?;
                Some(cas)
            }
            None => None,
        };
        Ok(Self {
            key: Arc::new(key),
            client_cas,
            client_cert_optional: config.client_cert_optional,
        })
    }
}

fn read_file(path: &Path, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
}

fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(path, field)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{field}: {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{field}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn client_verifier(
    cas: &[CertificateDer<'static>],
    provider: &Arc<CryptoProvider>,
    optional: bool,
) -> Result<Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca.clone())
            .map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    // A certificate, when presented, is always verified; without one the caller must
    // authenticate otherwise (the broker's auth layer refuses calls without an identity).
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder.build().map_err(|e| e.to_string())
}

// === impl TlsAcceptor ===

/// Accepts TLS connections with the current certificate and client CAs. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: Arc<Inner>,
}

struct Inner {
    provider: Arc<CryptoProvider>,
    /// Serves the current certificate to every config built here.
    resolver: Arc<CertResolver>,
    /// The config new connections are accepted with.
    config: ArcSwap<ServerConfig>,
    /// The client CAs of `config`. The lock also serializes reloads; it is never held across
    /// an `.await` (reload is synchronous).
    client_cas: Mutex<Option<Vec<CertificateDer<'static>>>>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("client_auth", &self.requires_client_cert())
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Reads the files of `config` and builds an acceptor (ALPN `h2`, TLS 1.2 and 1.3).
    pub fn new(config: &TlsConfig) -> Result<Self, String> {
        let provider = provider();
        let material = Material::load(config, &provider)?;
        let resolver = Arc::new(CertResolver(ArcSwap::new(material.key)));
        let server_config = server_config(
            &provider,
            &resolver,
            material.client_cas.as_deref(),
            material.client_cert_optional,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                provider,
                resolver,
                config: ArcSwap::from_pointee(server_config),
                client_cas: Mutex::new(material.client_cas),
            }),
        })
    }

    /// Re-reads the files of `config`. New connections get the new certificate and client CAs;
    /// established connections are untouched. On error nothing changes.
    pub fn reload(&self, config: &TlsConfig) -> Result<(), String> {
        let material = Material::load(config, &self.inner.provider)?;
        let mut current_cas = self
            .inner
            .client_cas
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *current_cas != material.client_cas {
            let server_config = server_config(
                &self.inner.provider,
                &self.inner.resolver,
                material.client_cas.as_deref(),
                material.client_cert_optional,
            )?;
            self.inner.resolver.0.store(material.key);
            self.inner.config.store(Arc::new(server_config));
            *current_cas = material.client_cas;
        } else {
            self.inner.resolver.0.store(material.key);
        }
        Ok(())
    }

    /// Whether clients must present a certificate (a client CA is configured).
    pub fn requires_client_cert(&self) -> bool {
        self.inner
            .client_cas
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
    }

    /// Runs the TLS handshake on `tcp` with the current config.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        tokio_rustls::TlsAcceptor::from(self.inner.config.load_full())
            .accept(tcp)
            .await
    }
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<CertResolver>,
    client_cas: Option<&[CertificateDer<'static>]>,
    client_cert_optional: bool,
) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match client_cas {
        Some(cas) => builder.with_client_cert_verifier(
            client_verifier(cas, provider, client_cert_optional)
                .map_err(|e| format!("tls.client_ca_file: {e}"))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Serves whatever certificate was stored last.
#[derive(Debug)]
struct CertResolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

// === Accept stream ===

/// The stream of established TLS connections on `listener`, for tonic's
/// `serve_with_incoming[_shutdown]`.
///
/// Handshakes run concurrently in tasks owned by the stream (dropping it aborts them and closes
/// the listener), each bounded by [`HANDSHAKE_TIMEOUT`]. Failed handshakes are logged at debug
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
            Some(TlsConn {
                stream,
                info: TlsConnInfo {
                    remote_addr: remote,
                    peer_certs,
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

// === impl TlsConn ===

/// An established server-side TLS connection, as yielded by [`incoming`].
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: TlsConnInfo,
}

/// What tonic puts into each request's extensions for a [`TlsConn`]:
/// `request.extensions().get::<TlsConnInfo>()`.
#[derive(Debug, Clone)]
pub struct TlsConnInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The client's certificate chain, leaf first, verified against the client CAs. `None`
    /// when no client CA is configured.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl TlsConnInfo {
    /// The caller identity of the client certificate, see [`peer_identity`].
    pub fn peer_identity(&self) -> Option<String> {
        self.peer_certs.as_deref().and_then(|c| peer_identity(c))
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

// === Identity ===

/// The caller identity in a client certificate chain: the leaf's first URI SAN (e.g. a SPIFFE
/// ID), else its first DNS SAN. `None` for an empty chain, an unparsable leaf or a leaf with
/// neither.
///
/// The chain must already be verified (as [`TlsConnInfo::peer_certs`] is).
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<String> {
    let leaf = certs.first()?;
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let uri = names.iter().find_map(|name| match name {
        GeneralName::URI(uri) if !uri.is_empty() => Some(*uri),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) if !dns.is_empty() => Some(*dns),
            _ => None,
        })
    };
    uri.or_else(dns).map(str::to_owned)
}
