//! How the client reaches the broker: the endpoint, TLS (CA, client certificate and key) and the
//! caller's service-account token, re-read when the kubelet rotates the file. The same options
//! as the broker's CLI (`--addr`, `--ca-file`, `--cert-file`, `--key-file`, `--token-file`, and
//! the same `BACE_BROKER_*` environment variables).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

use crate::{BrokerClient, Error};

/// Default address of a local broker, as the CLI's.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// Settings of a [`BrokerClient`]; from [`BrokerClient::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct BrokerClientBuilder {
    addr: String,
    ca_file: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    token_file: Option<PathBuf>,
    domain_name: Option<String>,
    pub(crate) settings: Settings,
}

/// What the client does with its connection, once built.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub(crate) margin: Duration,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) token_file_check: Duration,
    pub(crate) watch_backoff: (Duration, Duration),
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            margin: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            token_file_check: Duration::from_secs(10),
            watch_backoff: (Duration::from_millis(100), Duration::from_secs(10)),
        }
    }
}

impl BrokerClientBuilder {
    pub(crate) fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            ca_file: None,
            identity: None,
            token_file: None,
            domain_name: None,
            settings: Settings::default(),
        }
    }

    /// The CLI's environment: `BACE_BROKER_ADDR` (default [`DEFAULT_ADDR`]),
    /// `BACE_BROKER_CA_FILE`, `BACE_BROKER_CERT_FILE` with `BACE_BROKER_KEY_FILE`, and
    /// `BACE_BROKER_TOKEN_FILE`. Unset or empty variables are not used.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let addr = var("BACE_BROKER_ADDR")
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_else(|| DEFAULT_ADDR.to_owned());
        let mut b = Self::new(addr);
        b.ca_file = var("BACE_BROKER_CA_FILE").map(PathBuf::from);
        if let (Some(cert), Some(key)) = (var("BACE_BROKER_CERT_FILE"), var("BACE_BROKER_KEY_FILE"))
        {
            b.identity = Some((cert.into(), key.into()));
        }
        b.token_file = var("BACE_BROKER_TOKEN_FILE").map(PathBuf::from);
        b
    }

    /// CA certificate (PEM) to verify the broker's certificate with. Needs an `https://`
    /// address.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Client certificate and key (PEM) for mTLS. Needs an `https://` address.
    pub fn identity_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// The name the broker's certificate must carry, when it differs from the address's host
    /// (e.g. connecting to an IP address).
    pub fn tls_domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    /// A file holding the caller's bearer token (a projected Kubernetes service-account
    /// token), sent as `authorization: Bearer <token>` on every call to the broker.
    ///
    /// The kubelet rewrites the file when it rotates the token. The client checks the file's
    /// metadata (modification time, size, inode) at most once per
    /// [`token_file_check`](Self::token_file_check) and re-reads it only when that changed;
    /// calls in between cost no disk access. After the broker answers `UNAUTHENTICATED`, the next
    /// call checks at once. The file must be readable when the client is built.
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    /// How often, at most, the token file's metadata is checked. Default: 10 s.
    pub fn token_file_check(mut self, every: Duration) -> Self {
        self.settings.token_file_check = every;
        self
    }

    /// A cached token is handed out while it stays valid for more than this margin (plus the
    /// caller's `min_validity`); after that the next call asks the broker, for a token valid
    /// beyond this margin too (see
    /// [`token_with_min_validity`](crate::BrokerClient::token_with_min_validity)). A margin
    /// longer than BACE tokens last makes every call reach the broker. Default: 30 s.
    pub fn margin(mut self, margin: Duration) -> Self {
        self.settings.margin = margin;
        self
    }

    /// Deadline of each unary call to the broker (also sent to it as `grpc-timeout`).
    /// Default: 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// Deadline of establishing a connection. Default: 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Backoff of [`TokenWatch`](crate::TokenWatch) reconnections: the first delay, doubled
    /// after each failed attempt up to `max`, with jitter. Default: 100 ms to 10 s.
    pub fn watch_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.settings.watch_backoff = (initial, max.max(initial));
        self
    }

    /// Reads the TLS material and the token file and builds the client. The connection is
    /// made lazily, at the first call (so a broker that is down is reported by the calls, as
    /// [`Error::BrokerUnreachable`]). Must be called inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid address, TLS options with a plain `http://` address,
    /// an unreadable or unusable file.
    pub fn build(self) -> Result<BrokerClient, Error> {
        let addr = &self.addr;
        let s = self.settings;
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| Error::Config(format!("invalid address {addr:?}: {e}")))?
            .connect_timeout(s.connect_timeout)
            .timeout(s.timeout)
            // A broker that vanished without closing the connection (a killed node) is noticed
            // by open WatchToken streams too.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let tls = self.ca_file.is_some() || self.identity.is_some() || self.domain_name.is_some();
        if tls && !addr.starts_with("https://") {
            return Err(Error::Config(format!(
                "a CA file or client certificate needs an https:// address, not {addr:?}"
            )));
        }
        if addr.starts_with("https://") {
            let mut config = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &self.ca_file {
                config = config.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let Some((cert, key)) = &self.identity {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &self.domain_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| Error::Config(format!("TLS setup: {e}")))?;
        }
        let caller = match &self.token_file {
            Some(path) => Some(Arc::new(TokenFile::open(path, s.token_file_check)?)),
            None => None,
        };
        Ok(BrokerClient::from_parts(
            endpoint.connect_lazy(),
            CallerToken(caller),
            s,
        ))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
}

/// Adds the caller's service-account token, if any, to every call to the broker.
#[derive(Clone, Default)]
pub(crate) struct CallerToken(Option<Arc<TokenFile>>);

impl CallerToken {
    /// The broker refused the caller's identity: look at the file again on the next call.
    pub(crate) fn refused(&self) {
        if let Some(file) = &self.0 {
            file.check_soon();
        }
    }
}

impl tonic::service::Interceptor for CallerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(file) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", file.value(Instant::now()));
        }
        Ok(request)
    }
}

/// A token file and the header value made of its last good content.
pub(crate) struct TokenFile {
    path: PathBuf,
    every: Duration,
    /// The state of the last check. A std `Mutex`: held for a comparison and a clone, and for a
    /// `stat` (plus a read of a small file when it changed) at most once per `every`; never
    /// across an `.await`.
    state: Mutex<FileState>,
}

struct FileState {
    next_check: Instant,
    stamp: Stamp,
    value: MetadataValue<Ascii>,
}

/// What tells a rewritten file: the kubelet swaps a symlink to a new file (new inode), an
/// editor or a test may rewrite in place (new mtime, maybe new size).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        }
    }
}

impl TokenFile {
    pub(crate) fn open(path: &Path, every: Duration) -> Result<Self, Error> {
        let (stamp, value) = Self::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            every,
            state: Mutex::new(FileState {
                next_check: Instant::now() + every,
                stamp,
                value,
            }),
        })
    }

    fn load(path: &Path) -> Result<(Stamp, MetadataValue<Ascii>), Error> {
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::Config(format!("cannot read {shown}: {e}")))?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {shown}: {e}")))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(Error::Config(format!("{shown} is empty")));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Config(format!("{shown} does not hold a usable token")))?;
        value.set_sensitive(true);
        Ok((Stamp::of(&meta), value))
    }

    /// The header value, re-read first if the check is due and the file changed. A file that
    /// cannot be read (the kubelet's swap in progress, say) keeps the last good value.
    pub(crate) fn value(&self, now: Instant) -> MetadataValue<Ascii> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now >= state.next_check {
            state.next_check = now + self.every;
            let changed = std::fs::metadata(&self.path)
                .map(|m| Stamp::of(&m) != state.stamp)
                .unwrap_or(true);
            if changed {
                match Self::load(&self.path) {
                    Ok((stamp, value)) => {
                        tracing::debug!(path = %self.path.display(), "token file re-read");
                        state.stamp = stamp;
                        state.value = value;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "token file unusable; keeping the last good token")
                    }
                }
            }
        }
        state.value.clone()
    }

    fn check_soon(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.next_check = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(file: &TokenFile) -> String {
        file.value(Instant::now()).to_str().unwrap().to_owned()
    }

    /// Rotation is seen once the check is due, and not before (no disk access in between).
    #[tokio::test(start_paused = true)]
    async fn the_token_file_is_reread_after_the_interval_when_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let file = TokenFile::open(&path, Duration::from_secs(10)).unwrap();
        assert_eq!(header(&file), "Bearer first");

        // The kubelet's way: a new file moved into place.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second-token").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(header(&file), "Bearer first", "checked before the interval");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(header(&file), "Bearer second-token");

        // Unreadable for a moment: the last good token stays.
        std::fs::remove_file(&path).unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(header(&file), "Bearer second-token");

        // A refusal makes the next call look at once.
        std::fs::write(&path, "third").unwrap();
        file.check_soon();
        assert_eq!(header(&file), "Bearer third");
    }

    #[test]
    fn unusable_files_are_config_errors_without_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert!(matches!(
            TokenFile::open(&path, Duration::ZERO),
            Err(Error::Config(_))
        ));
        std::fs::write(&path, "secret\u{7}value").unwrap();
        let e = TokenFile::open(&path, Duration::ZERO).err().unwrap();
        assert!(!e.to_string().contains("secret"), "{e}");
        std::fs::write(&path, "  \n").unwrap();
        assert!(TokenFile::open(&path, Duration::ZERO).is_err());
    }

    #[tokio::test]
    async fn tls_options_need_https() {
        let e = BrokerClientBuilder::new("http://127.0.0.1:1")
            .ca_file("/nonexistent")
            .build()
            .err()
            .unwrap();
        assert!(e.to_string().contains("https://"), "{e}");
        let e = BrokerClientBuilder::new("https://127.0.0.1:1")
            .ca_file("/nonexistent/ca.pem")
            .build()
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let e = BrokerClientBuilder::new("not a uri").build().err().unwrap();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
    }
}
