//! Who is calling, and may they have this account's token?
//!
//! A caller is known by its verified client certificate (the leaf's URI SAN, else its first
//! DNS SAN: [`tls::peer_identity`]) or, failing that, by a Kubernetes service-account token sent
//! as `authorization: Bearer <jwt>`, validated here against the cluster's signing keys (JWKS):
//! signature (RS*, PS*, ES256/384, EdDSA; never HMAC), `iss`, `aud`, and `exp`/`nbf` with
//! [`LEEWAY`]. A token's identity is `system:serviceaccount:<namespace>:<name>`. The allow list
//! maps identities to the accounts they may fetch (`*`: all).
//!
//! # Keys
//!
//! - `jwks_file`: read with the config; a reload re-reads it.
//! - `jwks_url`: fetched on first use; again in the background once older than
//!   [`JWKS_MAX_AGE`] (the keys in hand keep working meanwhile); and on a token whose `kid` is
//!   unknown, at most once per `kid` per [`REFETCH_WINDOW`] and at most
//!   [`MAX_FETCHES_PER_WINDOW`] fetches in all per window, so that tokens with made-up `kid`s
//!   cannot turn the broker into a load generator against the API server. Fetches are single
//!   flight and run in their own task: a caller that gives up does not cancel one. A failed
//!   fetch keeps the keys in hand.
//!
//! # Locking
//!
//! A request only `load()`s [`ArcSwap`]s (allow list, validator, key set) and clones the `Arc`
//! it needs out of the guard before any `.await`. The fetch bookkeeping sits in a std `Mutex`
//! held for a few instructions, never across an `.await`.
//!
//! A token is never logged, put into an error or kept after the check.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
};
use reqwest::Url;
use serde::Deserialize;
use tokio::{sync::watch, time::Instant};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tracing::{debug, info, warn};

use crate::{tls, token::AccountName};

/// The audience a token must name when `auth.kubernetes.audience` is not set.
pub const DEFAULT_AUDIENCE: &str = "bace-token-broker";
/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Keys fetched from `jwks_url` are refreshed (in the background) once this old.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(300);
/// The window of the JWKS fetch limits: one fetch per unknown `kid`, and
/// [`MAX_FETCHES_PER_WINDOW`] in all.
pub const REFETCH_WINDOW: Duration = Duration::from_secs(30);
/// JWKS fetches allowed in any [`REFETCH_WINDOW`], whatever triggers them.
pub const MAX_FETCHES_PER_WINDOW: usize = 3;
/// Budget of one JWKS fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// A bearer token longer than this is refused unparsed.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

// === Configuration ===

/// The `auth` section as written in the YAML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Accept Kubernetes service-account tokens.
    #[serde(default)]
    pub kubernetes: Option<RawKubernetes>,
    /// Who may fetch which accounts.
    #[serde(default)]
    pub allow: Vec<RawAllow>,
}

/// `auth.kubernetes` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKubernetes {
    /// Required. The `iss` tokens must carry (the cluster's service-account issuer).
    pub issuer: String,
    /// The JWKS endpoint (e.g. `https://kubernetes.default.svc/openid/v1/jwks`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A file holding the JWKS document (instead of `jwks_url`).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The audience tokens must name. Default `bace-token-broker`.
    #[serde(default)]
    pub audience: Option<String>,
    /// With `jwks_url`: PEM CA certificates to trust for it instead of the system roots (in a
    /// pod: `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// With `jwks_url`: a file holding a bearer token for the request, re-read on every fetch
    /// (in a pod: `/var/run/secrets/kubernetes.io/serviceaccount/token`; the API server serves
    /// its JWKS to authenticated service accounts only).
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
}

/// One `auth.allow` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllow {
    /// The caller identity: a URI or DNS SAN, or `system:serviceaccount:<namespace>:<name>`.
    pub caller: String,
    /// Account names, or `*` for every account.
    pub accounts: Vec<String>,
}

/// A validated `auth` section.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    /// How service-account tokens are checked; `None`: tokens are not accepted.
    pub kubernetes: Option<KubernetesConfig>,
    /// Caller identity to the accounts it may fetch. Entries naming one caller are merged.
    pub allow: BTreeMap<String, AllowedAccounts>,
}

/// The accounts one caller may fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedAccounts {
    /// Every account (`*`).
    All,
    /// These accounts.
    Only(BTreeSet<AccountName>),
}

impl AllowedAccounts {
    /// Whether `account` is among these.
    pub fn contains(&self, account: &str) -> bool {
        match self {
            AllowedAccounts::All => true,
            AllowedAccounts::Only(accounts) => accounts.contains(account),
        }
    }
}

/// Validated `auth.kubernetes`.
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesConfig {
    /// The `iss` tokens must carry.
    pub issuer: String,
    /// The audience tokens must name.
    pub audience: String,
    /// Where the signing keys come from.
    pub jwks: JwksSource,
}

/// Where the cluster's signing keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    /// Fetched over HTTP(S).
    Url {
        /// The JWKS endpoint.
        url: Url,
        /// CA certificates trusted for it instead of the system roots.
        ca_file: Option<LoadedFile>,
        /// File holding the bearer token sent with the request (read at each fetch).
        bearer_token_file: Option<PathBuf>,
    },
    /// Read from a file (with the config).
    File(LoadedFile),
}

/// A file and the contents it had when the config was read.
#[derive(Clone, PartialEq, Eq)]
pub struct LoadedFile {
    /// The file.
    pub path: PathBuf,
    /// Its contents.
    pub contents: Vec<u8>,
}

impl fmt::Debug for LoadedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedFile")
            .field("path", &self.path)
            .field("bytes", &self.contents.len())
            .finish()
    }
}

impl AuthConfig {
    /// The files this config was read from (to watch for live reload). The bearer token file
    /// is not among them: it is read at each fetch.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        let files = match self.kubernetes.as_ref().map(|k| &k.jwks) {
            Some(JwksSource::File(file)) => [Some(file), None],
            Some(JwksSource::Url { ca_file, .. }) => [ca_file.as_ref(), None],
            None => [None, None],
        };
        files.into_iter().flatten().map(|f| f.path.as_path())
    }
}

impl RawAuth {
    /// Checks the section and reads the files it names. The message names the field
    /// (`auth.kubernetes.jwks_file`, `auth.allow[2].accounts`...).
    pub fn validate(self) -> Result<AuthConfig, String> {
        let kubernetes = self.kubernetes.map(RawKubernetes::validate).transpose()?;
        let mut allow: BTreeMap<String, AllowedAccounts> = BTreeMap::new();
        for (i, rule) in self.allow.into_iter().enumerate() {
            let caller = rule.caller.trim();
            if caller.is_empty() {
                return Err(format!("auth.allow[{i}].caller: must not be empty"));
            }
            if rule.accounts.is_empty() {
                return Err(format!(
                    "auth.allow[{i}].accounts: list at least one account, or \"*\" for all"
                ));
            }
            let mut names = BTreeSet::new();
            let mut all = false;
            for account in &rule.accounts {
                if account == "*" {
                    all = true;
                    continue;
                }
                let name = AccountName::new(account).map_err(|e| {
                    format!("auth.allow[{i}].accounts: {account:?}: {e} (or \"*\" for all)")
                })?;
                names.insert(name);
            }
            let entry = allow
                .entry(caller.to_owned())
                .or_insert_with(|| AllowedAccounts::Only(BTreeSet::new()));
            match entry {
                AllowedAccounts::All => {}
                AllowedAccounts::Only(_) if all => *entry = AllowedAccounts::All,
                AllowedAccounts::Only(existing) => existing.extend(names),
            }
        }
        Ok(AuthConfig { kubernetes, allow })
    }
}

impl RawKubernetes {
    fn validate(self) -> Result<KubernetesConfig, String> {
        let err = |field: &str, problem: String| format!("auth.kubernetes.{field}: {problem}");
        let issuer = self.issuer.trim().to_owned();
        if issuer.is_empty() {
            return Err(err("issuer", "must not be empty".into()));
        }
        let audience = self
            .audience
            .unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned())
            .trim()
            .to_owned();
        if audience.is_empty() {
            return Err(err("audience", "must not be empty".into()));
        }
        let jwks = match (self.jwks_url, self.jwks_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "jwks_url",
                    "give either jwks_url or jwks_file, not both".into(),
                ));
            }
            (None, None) => return Err(err("jwks_url", "is required (or jwks_file)".into())),
            (Some(url), None) => {
                let parsed =
                    Url::parse(&url).map_err(|e| err("jwks_url", format!("{url:?}: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                    return Err(err(
                        "jwks_url",
                        format!("{url:?} is not an http(s) URL with a host"),
                    ));
                }
                let ca_file = match self.ca_file {
                    Some(path) => {
                        let file = read(path).map_err(|p| err("ca_file", p))?;
                        ca_certificates(&file.contents)
                            .map_err(|p| err("ca_file", format!("{}: {p}", file.path.display())))?;
                        Some(file)
                    }
                    None => None,
                };
                if let Some(path) = &self.bearer_token_file {
                    read(path.clone()).map_err(|p| err("bearer_token_file", p))?;
                }
                JwksSource::Url {
                    url: parsed,
                    ca_file,
                    bearer_token_file: self.bearer_token_file,
                }
            }
            (None, Some(path)) => {
                if self.ca_file.is_some() {
                    return Err(err("ca_file", "only applies with jwks_url".into()));
                }
                if self.bearer_token_file.is_some() {
                    return Err(err(
                        "bearer_token_file",
                        "only applies with jwks_url".into(),
                    ));
                }
                let file = read(path).map_err(|p| err("jwks_file", p))?;
                parse_jwks(&file.contents)
                    .map_err(|p| err("jwks_file", format!("{}: {p}", file.path.display())))?;
                JwksSource::File(file)
            }
        };
        Ok(KubernetesConfig {
            issuer,
            audience,
            jwks,
        })
    }
}

fn read(path: PathBuf) -> Result<LoadedFile, String> {
    match std::fs::read(&path) {
        Ok(contents) => Ok(LoadedFile { path, contents }),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn ca_certificates(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

// === Denied ===

/// Why a caller is turned away. [`Denied::reason`] is a short, bounded label for logs and the
/// `reason` label of the denial metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No identity, or not a valid one (gRPC `UNAUTHENTICATED`).
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// The identity may not have this account (gRPC `PERMISSION_DENIED`).
    #[error("permission denied")]
    PermissionDenied,
}

impl Denied {
    /// Neither a client certificate with a SAN nor an accepted bearer token.
    pub const NO_IDENTITY: Denied = Denied::Unauthenticated("no identity");
    /// The `authorization` value or the token is not well formed, or lacks a required claim.
    pub const MALFORMED_TOKEN: Denied = Denied::Unauthenticated("malformed token");
    /// The token's `exp` (plus leeway) has passed.
    pub const EXPIRED_TOKEN: Denied = Denied::Unauthenticated("expired token");
    /// The token's `nbf` (minus leeway) is still to come.
    pub const TOKEN_NOT_YET_VALID: Denied = Denied::Unauthenticated("token not yet valid");
    /// The token does not name the configured audience.
    pub const WRONG_AUDIENCE: Denied = Denied::Unauthenticated("wrong audience");
    /// The token's issuer is not the configured one.
    pub const WRONG_ISSUER: Denied = Denied::Unauthenticated("wrong issuer");
    /// The signature does not verify (or its algorithm does not fit the key).
    pub const BAD_SIGNATURE: Denied = Denied::Unauthenticated("bad signature");
    /// No key with the token's `kid`, even after a refetch.
    pub const UNKNOWN_KEY: Denied = Denied::Unauthenticated("unknown key");
    /// The keys of `jwks_url` could not be fetched yet (the warning log says why).
    pub const KEYS_UNAVAILABLE: Denied = Denied::Unauthenticated("keys unavailable");
    /// A valid token that names no service account.
    pub const NOT_A_SERVICE_ACCOUNT: Denied = Denied::Unauthenticated("not a service account");

    /// The short reason: one of the `Unauthenticated` reasons above, or `"not allowed"`.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Unauthenticated(reason) => reason,
            Denied::PermissionDenied => "not allowed",
        }
    }
}

// === impl Authorizer ===

/// Authenticates callers and applies the allow list. Cheap to clone; [`Authorizer::reload`]
/// swaps the config for every clone.
#[derive(Clone)]
pub struct Authorizer {
    state: Arc<ArcSwap<State>>,
}

struct State {
    allow: BTreeMap<String, AllowedAccounts>,
    kubernetes: Option<Arc<TokenValidator>>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.load();
        f.debug_struct("Authorizer")
            .field("callers", &state.allow.len())
            .field("kubernetes", &state.kubernetes.is_some())
            .finish()
    }
}

impl Authorizer {
    /// Builds an authorizer for `config`. Keys from `jwks_url` are fetched on first use.
    pub fn new(config: AuthConfig) -> Result<Self, String> {
        let state = State::new(config, None)?;
        Ok(Self {
            state: Arc::new(ArcSwap::from_pointee(state)),
        })
    }

    /// Swaps in a new allow list and key source. Keys already fetched from an unchanged
    /// `jwks_url` are kept; a `jwks_file` is taken as `config` read it. On error nothing
    /// changes.
    pub fn reload(&self, config: AuthConfig) -> Result<(), String> {
        let current = self.state.load_full();
        let state = State::new(config, current.kubernetes.as_ref())?;
        self.state.store(Arc::new(state));
        Ok(())
    }

    /// The caller's identity: the URI (else DNS) SAN of a verified client certificate, else
    /// the service account of a valid Kubernetes token in `authorization` (the value of the
    /// `authorization` metadata, `Bearer <jwt>`).
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<String, Denied> {
        if let Some(identity) = peer_certs.and_then(tls::peer_identity) {
            return Ok(identity);
        }
        let Some(value) = authorization else {
            return Err(Denied::NO_IDENTITY);
        };
        let token = bearer_token(value).ok_or(Denied::MALFORMED_TOKEN)?;
        // Clone the validator out of the guard: no guard is held across the await.
        let validator = self.state.load().kubernetes.clone();
        match validator {
            Some(validator) => validator.validate(token).await,
            None => Err(Denied::NO_IDENTITY),
        }
    }

    /// Whether `identity` may fetch `account`'s token.
    pub fn authorize(&self, identity: &str, account: &str) -> bool {
        self.state
            .load()
            .allow
            .get(identity)
            .is_some_and(|accounts| accounts.contains(account))
    }
}

impl State {
    fn new(config: AuthConfig, current: Option<&Arc<TokenValidator>>) -> Result<Self, String> {
        let kubernetes = match (config.kubernetes, current) {
            (Some(new), Some(current))
                if new == current.config && matches!(new.jwks, JwksSource::Url { .. }) =>
            {
                Some(current.clone())
            }
            (Some(new), _) => Some(Arc::new(TokenValidator::new(new)?)),
            (None, _) => None,
        };
        Ok(Self {
            allow: config.allow,
            kubernetes,
        })
    }
}

/// The token of an `authorization` value `Bearer <token>` (scheme case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

// === impl TokenValidator ===

/// Checks Kubernetes service-account tokens against one issuer's keys.
struct TokenValidator {
    config: KubernetesConfig,
    /// The keys in hand; replaced whole by a fetch.
    keys: ArcSwap<KeySet>,
    /// `None` for a `jwks_file`.
    fetcher: Option<Fetcher>,
}

struct Fetcher {
    client: reqwest::Client,
    url: Url,
    bearer_token_file: Option<PathBuf>,
    /// Single flight and rate limits. Never held across an `.await`.
    state: Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    /// The fetch under way: its task sends `true` when the new keys are stored.
    in_flight: Option<watch::Receiver<bool>>,
    /// Start times of the fetches in the last [`REFETCH_WINDOW`].
    recent: VecDeque<Instant>,
    /// `kid`s that triggered a fetch in the last [`REFETCH_WINDOW`] (at most
    /// [`MAX_FETCHES_PER_WINDOW`] entries, as only a fetch adds one).
    recent_kids: HashMap<String, Instant>,
}

/// One issuer's keys.
struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    all: Vec<Arc<Key>>,
    /// When they were fetched; `None`: never (the empty set of a `jwks_url` at start).
    fetched_at: Option<Instant>,
}

/// A verification key with the checks that go with it.
struct Key {
    decoding: DecodingKey,
    validation: Validation,
}

impl TokenValidator {
    fn new(config: KubernetesConfig) -> Result<Self, String> {
        let (keys, fetcher) = match &config.jwks {
            JwksSource::File(file) => {
                let keys = KeySet::new(parse_jwks(&file.contents)?, &config, None);
                (keys, None)
            }
            JwksSource::Url {
                url,
                ca_file,
                bearer_token_file,
            } => {
                let mut builder = reqwest::Client::builder()
                    .timeout(JWKS_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none());
                if let Some(file) = ca_file {
                    builder = builder.tls_certs_only(ca_certificates(&file.contents)?);
                }
                let client = builder
                    .build()
                    .map_err(|e| format!("auth.kubernetes.jwks_url: HTTP client: {e}"))?;
                let fetcher = Fetcher {
                    client,
                    url: url.clone(),
                    bearer_token_file: bearer_token_file.clone(),
                    state: Mutex::new(FetchState::default()),
                };
                (KeySet::empty(), Some(fetcher))
            }
        };
        Ok(Self {
            config,
            keys: ArcSwap::from_pointee(keys),
            fetcher,
        })
    }

    async fn validate(self: &Arc<Self>, token: &str) -> Result<String, Denied> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Denied::MALFORMED_TOKEN);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Denied::MALFORMED_TOKEN)?;
        let key = self.key(header.kid.as_deref()).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation)
            .map_err(|e| rejection(e.kind()))?;
        data.claims.identity()
    }

    /// The key for `kid`, fetching the JWKS when there is none yet, when it is old (in the
    /// background) or when `kid` is unknown (within the limits).
    async fn key(self: &Arc<Self>, kid: Option<&str>) -> Result<Arc<Key>, Denied> {
        let mut seen = self.keys.load_full();
        if self.fetcher.is_none() {
            return seen.find(kid).ok_or(Denied::UNKNOWN_KEY);
        }
        let mut just_fetched = false;
        match seen.fetched_at {
            None => {
                if let Some(done) = self.start_fetch(&seen, None) {
                    wait(done).await;
                }
                seen = self.keys.load_full();
                just_fetched = true;
            }
            Some(at) if at.elapsed() >= JWKS_MAX_AGE => {
                // Refresh in the background; the keys in hand answer this request.
                let _ = self.start_fetch(&seen, None);
            }
            Some(_) => {}
        }
        if let Some(key) = seen.find(kid) {
            return Ok(key);
        }
        if seen.fetched_at.is_none() {
            return Err(Denied::KEYS_UNAVAILABLE);
        }
        let Some(kid) = kid.filter(|_| !just_fetched) else {
            return Err(Denied::UNKNOWN_KEY);
        };
        if let Some(done) = self.start_fetch(&seen, Some(kid)) {
            wait(done).await;
        }
        self.keys.load().find(Some(kid)).ok_or(Denied::UNKNOWN_KEY)
    }

    /// Starts a JWKS fetch, or joins the one under way; returns what to wait on. `None`: no
    /// fetch, because newer keys than `seen` are in hand already or a limit applies.
    fn start_fetch(
        self: &Arc<Self>,
        seen: &Arc<KeySet>,
        kid: Option<&str>,
    ) -> Option<watch::Receiver<bool>> {
        let fetcher = self.fetcher.as_ref()?;
        let mut state = fetcher
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(in_flight) = &state.in_flight {
            // A closed channel means the task died without clearing the slot.
            if in_flight.has_changed().is_ok() {
                return Some(in_flight.clone());
            }
        }
        if !Arc::ptr_eq(&self.keys.load(), seen) {
            return None;
        }
        let now = Instant::now();
        while state
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= REFETCH_WINDOW)
        {
            state.recent.pop_front();
        }
        state
            .recent_kids
            .retain(|_, t| now.duration_since(*t) < REFETCH_WINDOW);
        if kid.is_some_and(|kid| state.recent_kids.contains_key(kid)) {
            debug!("unknown JWKS key id fetched for recently; not fetching again");
            return None;
        }
        if state.recent.len() >= MAX_FETCHES_PER_WINDOW {
            debug!(
                limit = MAX_FETCHES_PER_WINDOW,
                "JWKS fetch limit reached; not fetching"
            );
            return None;
        }
        state.recent.push_back(now);
        if let Some(kid) = kid {
            state.recent_kids.insert(kid.to_owned(), now);
        }
        let (done_tx, done_rx) = watch::channel(false);
        state.in_flight = Some(done_rx.clone());
        drop(state);

        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.fetch_and_store().await;
            if let Some(fetcher) = &this.fetcher {
                fetcher
                    .state
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .in_flight = None;
            }
            let _ = done_tx.send(true);
        });
        Some(done_rx)
    }

    async fn fetch_and_store(&self) {
        let Some(fetcher) = &self.fetcher else {
            return;
        };
        let keys = fetcher
            .fetch()
            .await
            .and_then(|body| parse_jwks(&body))
            .map(|keys| KeySet::new(keys, &self.config, Some(Instant::now())));
        match keys {
            Ok(keys) => {
                info!(url = %fetcher.url, keys = keys.all.len(), "JWKS fetched");
                self.keys.store(Arc::new(keys));
            }
            Err(error) => {
                warn!(url = %fetcher.url, %error, "JWKS fetch failed; keeping the keys in hand");
            }
        }
    }
}

async fn wait(mut done: watch::Receiver<bool>) {
    // An error means the fetch task is gone: stop waiting either way.
    let _ = done.wait_for(|done| *done).await;
}

impl Fetcher {
    async fn fetch(&self) -> Result<Vec<u8>, String> {
        let mut request = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(path) = &self.bearer_token_file {
            let token = tokio::fs::read_to_string(path).await.map_err(|e| {
                format!(
                    "cannot read auth.kubernetes.bearer_token_file {}: {e}",
                    path.display()
                )
            })?;
            request = request.bearer_auth(token.trim());
        }
        let mut response = request.send().await.map_err(|e| error_chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("answered HTTP {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("answer larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// === Keys ===

/// A usable key of a JWKS document.
struct ParsedKey {
    kid: Option<String>,
    decoding: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Parses a JWKS document, keeping the keys usable for signatures (RSA, EC P-256/P-384,
/// Ed25519) and skipping the others. No usable key at all is an error.
fn parse_jwks(body: &[u8]) -> Result<Vec<ParsedKey>, String> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let keys: Vec<ParsedKey> = document
        .keys
        .into_iter()
        .filter_map(|value| {
            let jwk: Jwk = serde_json::from_value(value).ok()?;
            if matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            ) {
                return None;
            }
            let algorithms = key_algorithms(&jwk)?;
            let decoding = DecodingKey::from_jwk(&jwk).ok()?;
            Some(ParsedKey {
                kid: jwk.common.key_id,
                decoding,
                algorithms,
            })
        })
        .collect();
    if keys.is_empty() {
        return Err("holds no usable signing key (RSA, EC P-256/P-384 or Ed25519)".into());
    }
    Ok(keys)
}

/// The algorithms a JWK may verify: its `alg` if given (and fitting the key type), else every
/// algorithm of its type. Symmetric keys get none.
fn key_algorithms(jwk: &Jwk) -> Option<Vec<Algorithm>> {
    use Algorithm::*;
    let fitting = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            vec![EdDSA]
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(fitting),
        Some(named) => {
            let named = Algorithm::from_str(&named.to_string()).ok()?;
            fitting.contains(&named).then(|| vec![named])
        }
    }
}

impl KeySet {
    fn empty() -> Self {
        Self {
            by_kid: HashMap::new(),
            all: Vec::new(),
            fetched_at: None,
        }
    }

    fn new(keys: Vec<ParsedKey>, config: &KubernetesConfig, fetched_at: Option<Instant>) -> Self {
        let mut set = Self::empty();
        set.fetched_at = fetched_at;
        for parsed in keys {
            let mut validation = Validation::new(parsed.algorithms[0]);
            validation.algorithms = parsed.algorithms;
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            validation.leeway = LEEWAY.as_secs();
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.validate_aud = true;
            validation.set_issuer(&[&config.issuer]);
            validation.set_audience(&[&config.audience]);
            let key = Arc::new(Key {
                decoding: parsed.decoding,
                validation,
            });
            if let Some(kid) = parsed.kid {
                set.by_kid.entry(kid).or_insert_with(|| key.clone());
            }
            set.all.push(key);
        }
        set
    }

    /// The key named `kid`; a token without `kid` uses the only key, if there is just one.
    fn find(&self, kid: Option<&str>) -> Option<Arc<Key>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned(),
            None if self.all.len() == 1 => self.all.first().cloned(),
            None => None,
        }
    }
}

/// The bounded reason for a failed `decode`.
fn rejection(kind: &ErrorKind) -> Denied {
    match kind {
        ErrorKind::ExpiredSignature => Denied::EXPIRED_TOKEN,
        ErrorKind::ImmatureSignature => Denied::TOKEN_NOT_YET_VALID,
        ErrorKind::InvalidAudience => Denied::WRONG_AUDIENCE,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Denied::WRONG_AUDIENCE,
        ErrorKind::InvalidIssuer => Denied::WRONG_ISSUER,
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => Denied::WRONG_ISSUER,
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => Denied::BAD_SIGNATURE,
        _ => Denied::MALFORMED_TOKEN,
    }
}

// === Claims ===

/// The claims that name the caller (the checked ones are read by `jsonwebtoken`).
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    serviceaccount: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: String,
}

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

impl Claims {
    /// `system:serviceaccount:<namespace>:<name>`, from the `kubernetes.io` claim, else `sub`.
    fn identity(self) -> Result<String, Denied> {
        if let Some(k8s) = self.kubernetes
            && let (Some(namespace), Some(account)) = (k8s.namespace, k8s.serviceaccount)
            && is_object_name(&namespace)
            && is_object_name(&account.name)
        {
            return Ok(format!(
                "{SERVICE_ACCOUNT_PREFIX}{namespace}:{}",
                account.name
            ));
        }
        let sub = self.sub.ok_or(Denied::NOT_A_SERVICE_ACCOUNT)?;
        match sub
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
        {
            Some((namespace, name)) if is_object_name(namespace) && is_object_name(name) => Ok(sub),
            _ => Err(Denied::NOT_A_SERVICE_ACCOUNT),
        }
    }
}

/// A Kubernetes object name (DNS subdomain): 1 to 253 of `[a-z0-9.-]`.
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AuthConfig, String> {
        let raw: RawAuth = crate::config::from_yaml(yaml)?;
        raw.validate()
    }

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","use":"sig",
        "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        {"kty":"oct","k":"c2VjcmV0","kid":"hmac"}]}"#;

    #[test]
    fn allow_list_merges_and_wildcards() {
        let c = parse(
            "allow:\n  - caller: a\n    accounts: [x, y]\n  - caller: a\n    accounts: [z]\n  - caller: b\n    accounts: [x, '*']\n  - caller: b\n    accounts: [y]\n",
        )
        .unwrap();
        assert!(c.kubernetes.is_none());
        let a = &c.allow["a"];
        assert!(a.contains("x") && a.contains("y") && a.contains("z") && !a.contains("w"));
        assert_eq!(c.allow["b"], AllowedAccounts::All);
        let auth = Authorizer::new(c).unwrap();
        assert!(auth.authorize("a", "z"));
        assert!(!auth.authorize("a", "w"));
        assert!(auth.authorize("b", "anything"));
        assert!(!auth.authorize("c", "x"));
        assert!(!auth.authorize("A", "x"));
    }

    #[test]
    fn jwks_file_is_read_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, JWKS).unwrap();
        let c = parse(&format!(
            "kubernetes:\n  issuer: https://k\n  jwks_file: {}\n",
            path.display()
        ))
        .unwrap();
        let k = c.kubernetes.as_ref().unwrap();
        assert_eq!(k.audience, DEFAULT_AUDIENCE);
        assert_eq!(c.files().collect::<Vec<_>>(), vec![path.as_path()]);
        let JwksSource::File(file) = &k.jwks else {
            panic!("{k:?}")
        };
        let keys = parse_jwks(&file.contents).unwrap();
        assert_eq!(keys.len(), 1, "the HMAC key is skipped");
        assert_eq!(keys[0].algorithms, vec![Algorithm::ES256]);
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let hmac_only = dir.path().join("hmac.json");
        std::fs::write(&hmac_only, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap();
        let cases: Vec<(String, &[&str])> = vec![
            ("bogus: 1".into(), &["unknown field `bogus`"]),
            (
                "kubernetes:\n  issuer: i\n  jwks_url: http://x\n  audiense: a".into(),
                &["unknown field `audiense`"],
            ),
            (
                "kubernetes:\n  jwks_url: http://x".into(),
                &["missing field `issuer`"],
            ),
            (
                "kubernetes:\n  issuer: ' '\n  jwks_url: http://x".into(),
                &["auth.kubernetes.issuer", "empty"],
            ),
            (
                "kubernetes:\n  issuer: i".into(),
                &["auth.kubernetes.jwks_url", "required"],
            ),
            (
                "kubernetes:\n  issuer: i\n  jwks_url: http://x\n  jwks_file: /y".into(),
                &["auth.kubernetes.jwks_url", "not both"],
            ),
            (
                "kubernetes:\n  issuer: i\n  jwks_url: ftp://x".into(),
                &["auth.kubernetes.jwks_url", "ftp://x"],
            ),
            (
                "kubernetes:\n  issuer: i\n  jwks_file: /nonexistent/jwks".into(),
                &["auth.kubernetes.jwks_file", "/nonexistent/jwks"],
            ),
            (
                format!(
                    "kubernetes:\n  issuer: i\n  jwks_file: {}",
                    hmac_only.display()
                ),
                &["auth.kubernetes.jwks_file", "no usable signing key"],
            ),
            (
                format!(
                    "kubernetes:\n  issuer: i\n  jwks_url: https://x\n  ca_file: {}",
                    hmac_only.display()
                ),
                &["auth.kubernetes.ca_file", "no PEM certificate"],
            ),
            (
                "kubernetes:\n  issuer: i\n  jwks_url: https://x\n  bearer_token_file: /nonexistent/t"
                    .into(),
                &["auth.kubernetes.bearer_token_file", "/nonexistent/t"],
            ),
            (
                format!(
                    "kubernetes:\n  issuer: i\n  jwks_file: {}\n  ca_file: /x",
                    hmac_only.display()
                ),
                &["auth.kubernetes.ca_file", "only applies with jwks_url"],
            ),
            (
                "kubernetes:\n  issuer: i\n  jwks_url: http://x\n  audience: ''".into(),
                &["auth.kubernetes.audience", "empty"],
            ),
            (
                "allow:\n  - caller: ''\n    accounts: [a]".into(),
                &["auth.allow[0].caller", "empty"],
            ),
            (
                "allow:\n  - caller: a\n    accounts: [a]\n  - caller: b\n    accounts: []".into(),
                &["auth.allow[1].accounts", "at least one"],
            ),
            (
                "allow:\n  - caller: a\n    accounts: ['a b']".into(),
                &["auth.allow[0].accounts", "\"a b\""],
            ),
            ("allow:\n  - caller: a".into(), &["missing field `accounts`"]),
        ];
        for (yaml, wants) in cases {
            let msg = parse(&yaml).unwrap_err();
            for want in wants {
                assert!(msg.contains(want), "{yaml:?}: {msg:?} lacks {want:?}");
            }
        }
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn identity_from_claims() {
        let claims = |json: &str| serde_json::from_str::<Claims>(json).unwrap().identity();
        assert_eq!(
            claims(
                r#"{"sub":"x","kubernetes.io":{"namespace":"ns","serviceaccount":{"name":"sa","uid":"u"}}}"#
            ),
            Ok("system:serviceaccount:ns:sa".into())
        );
        assert_eq!(
            claims(r#"{"sub":"system:serviceaccount:ns:sa"}"#),
            Ok("system:serviceaccount:ns:sa".into())
        );
        for bad in [
            r#"{"sub":"alice"}"#,
            r#"{"sub":"system:serviceaccount:ns"}"#,
            r#"{"sub":"system:serviceaccount:ns:a:b"}"#,
            r#"{"kubernetes.io":{"namespace":"n:s","serviceaccount":{"name":"sa"}}}"#,
            r#"{}"#,
        ] {
            assert_eq!(claims(bad), Err(Denied::NOT_A_SERVICE_ACCOUNT), "{bad}");
        }
    }

    #[tokio::test]
    async fn no_identity_without_cert_or_token() {
        let auth = Authorizer::new(parse("allow: []").unwrap()).unwrap();
        assert_eq!(
            auth.authenticate(None, None).await,
            Err(Denied::NO_IDENTITY)
        );
        assert_eq!(
            auth.authenticate(Some("Bearer a.b.c"), Some(&[])).await,
            Err(Denied::NO_IDENTITY),
            "tokens are not accepted without auth.kubernetes"
        );
        assert_eq!(
            auth.authenticate(Some("Basic x"), None).await,
            Err(Denied::MALFORMED_TOKEN)
        );
        assert_eq!(Denied::PermissionDenied.reason(), "not allowed");
        assert_eq!(Denied::EXPIRED_TOKEN.reason(), "expired token");
    }
}
