//! Server TLS for the gRPC port: a certificate that rotates without a restart, optional client
//! certificates (mTLS), and an accept stream for tonic that runs handshakes concurrently.
//!
//! [`TlsAcceptor`] holds the current rustls [`ServerConfig`] in an [`ArcSwap`]; each accepted
//! connection loads it once, so [`TlsAcceptor::reload`] changes what *new* connections get and
//! leaves established ones alone. The certificate is served by a resolver over an
//! `ArcSwap<CertifiedKey>` shared by every config, so a certificate rotation only swaps the key
//! (the session cache survives); a change of client CA builds a new config with a new verifier.
//!
//! [`incoming`] (in `incoming`) turns a [`TcpListener`] into the stream tonic's
//! `serve_with_incoming[_shutdown]` takes. Handshakes run as tasks with a timeout, at most
//! `MAX_PENDING_HANDSHAKES` at once, so a slow or silent client never holds up the others; a
//! failed handshake is logged at debug and skipped. Each [`TlsConn`] carries a [`TlsConnInfo`]
//! (remote address, verified client certificate chain, and the caller identity read from it
//! once, at the handshake) that tonic puts into every request's extensions.
//!
//! Only rustls with aws-lc-rs is used; no OpenSSL.
//!
//! The `tls` section's schema and the parsing of its files live in [`crate::config`].

mod identity;
mod incoming;

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{io, net::TcpStream};
use tokio_rustls::{
    rustls::{
        ServerConfig,
        crypto::CryptoProvider,
        pki_types::CertificateDer,
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    },
    server::TlsStream,
};

pub use self::{
    identity::peer_identity,
    incoming::{TlsConn, TlsConnInfo, incoming},
};
use crate::config::{
    FieldError, TlsConfig, TlsMaterial, client_verifier, tls_provider as provider,
};

/// Why a TLS setup cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the `tls` section is missing or holds no usable certificate, key or CA.
    #[error(transparent)]
    Files(#[from] FieldError),
    /// rustls refused the setup.
    #[error("TLS setup: {0}")]
    Setup(tokio_rustls::rustls::Error),
}

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; beyond this, new TCP connections wait in the listen backlog.
pub(crate) const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Pause after an accept error such as "too many open files", so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

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
    pub fn new(config: &TlsConfig) -> Result<Self, TlsError> {
        let provider = provider();
        let material = TlsMaterial::load(config, &provider)?;
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

    /// Re-reads the files of `config` and prepares what new connections will get, without
    /// changing anything yet: [`PreparedTls::commit`] does. A reload prepares every section
    /// first and commits only when all of them are good.
    pub fn prepare(&self, config: &TlsConfig) -> Result<PreparedTls, TlsError> {
        let material = TlsMaterial::load(config, &self.inner.provider)?;
        let same_cas = *self.client_cas() == material.client_cas;
        let server_config = if same_cas {
            None
        } else {
            Some(Arc::new(server_config(
                &self.inner.provider,
                &self.inner.resolver,
                material.client_cas.as_deref(),
                material.client_cert_optional,
            )?))
        };
        Ok(PreparedTls {
            acceptor: self.clone(),
            key: material.key,
            client_cas: material.client_cas,
            server_config,
        })
    }

    /// [`TlsAcceptor::prepare`] and commit at once: new connections get the new certificate
    /// and client CAs; established connections are untouched. On error nothing changes.
    pub fn reload(&self, config: &TlsConfig) -> Result<(), TlsError> {
        self.prepare(config)?.commit();
        Ok(())
    }

    fn client_cas(&self) -> std::sync::MutexGuard<'_, Option<Vec<CertificateDer<'static>>>> {
        self.inner
            .client_cas
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether clients must present a certificate (a client CA is configured).
    pub fn requires_client_cert(&self) -> bool {
        self.client_cas().is_some()
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
) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?;
    let builder = match client_cas {
        Some(cas) => builder.with_client_cert_verifier(
            client_verifier(cas, provider, client_cert_optional)
                .map_err(|e| FieldError::new("tls.client_ca_file", e))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A TLS setup read and checked by [`TlsAcceptor::prepare`], not yet in use.
#[must_use = "nothing changes until it is committed"]
pub struct PreparedTls {
    acceptor: TlsAcceptor,
    key: Arc<CertifiedKey>,
    client_cas: Option<Vec<CertificateDer<'static>>>,
    /// A new server config, when the client CAs changed.
    server_config: Option<Arc<ServerConfig>>,
}

impl PreparedTls {
    /// Puts the setup in use: new connections get the new certificate (and client CAs).
    pub fn commit(self) {
        let inner = &self.acceptor.inner;
        let mut current_cas = self.acceptor.client_cas();
        inner.resolver.0.store(self.key);
        if let Some(server_config) = self.server_config {
            inner.config.store(server_config);
            *current_cas = self.client_cas;
        }
    }
}

impl fmt::Debug for PreparedTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedTls")
            .field("new_client_cas", &self.server_config.is_some())
            .finish_non_exhaustive()
    }
}

/// Serves whatever certificate was stored last.
#[derive(Debug)]
struct CertResolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}
