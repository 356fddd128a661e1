//! The broker's configuration: the YAML schema, its defaults, and validation into a [`Config`]
//! whose every value is usable as is (secret files read, URLs parsed, zone resolved).
//!
//! Every error names the place it was found: the file, the account and the field.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use chrono_tz::Tz;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::{
    auth::{AuthConfig, RawAuth},
    tls::{RawTls, TlsConfig},
    token::AccountName,
};

/// A validated broker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Address of the Prometheus endpoint (`GET /metrics`); `None` turns it off.
    pub metrics_listen: Option<SocketAddr>,
    /// Plaintext health-only address, served when `tls` is on (Kubernetes' gRPC probes do
    /// not speak TLS).
    pub health_listen: SocketAddr,
    /// Server TLS (and client certificates), if on.
    pub tls: Option<TlsConfig>,
    /// Caller identity and per-account authorization, if on.
    pub auth: Option<AuthConfig>,
    /// How BACE is reached.
    pub upstream: UpstreamConfig,
    /// When and how tokens are refreshed and failures retried.
    pub refresh: RefreshConfig,
    /// At most one forced re-login per account in this window.
    pub invalidate_cooldown: Duration,
    /// How long in-flight RPCs may take to drain on shutdown.
    pub shutdown_grace: Duration,
    /// How many accounts log in at once during warm-up.
    pub warmup_concurrency: usize,
    /// The accounts, by name.
    pub accounts: BTreeMap<AccountName, AccountConfig>,
    /// The file this config was loaded from, if any (watched for live reload).
    pub path: Option<PathBuf>,
    /// The secret files the accounts read (watched for live reload).
    pub secret_files: Vec<PathBuf>,
}

impl Config {
    /// The keys outside `accounts` whose values differ from `other`'s: a live reload does not
    /// apply them (they need a restart).
    pub fn restart_only_changes(&self, other: &Config) -> Vec<&'static str> {
        let (a, b) = (self, other);
        let mut changed = Vec::new();
        let mut check = |key: &'static str, same: bool| {
            if !same {
                changed.push(key);
            }
        };
        check("listen", a.listen == b.listen);
        check("metrics_listen", a.metrics_listen == b.metrics_listen);
        check("upstream.timeout", a.upstream.timeout == b.upstream.timeout);
        check(
            "upstream.verify_url",
            a.upstream.verify_url == b.upstream.verify_url,
        );
        check(
            "upstream.expires_timezone",
            a.upstream.expires_timezone == b.upstream.expires_timezone,
        );
        check("refresh", a.refresh == b.refresh);
        check(
            "invalidate_cooldown",
            a.invalidate_cooldown == b.invalidate_cooldown,
        );
        check("shutdown_grace", a.shutdown_grace == b.shutdown_grace);
        check("health_listen", a.health_listen == b.health_listen);
        check("tls (turned on or off)", a.tls.is_some() == b.tls.is_some());
        check(
            "auth (turned on or off)",
            a.auth.is_some() == b.auth.is_some(),
        );
        check(
            "warmup_concurrency",
            a.warmup_concurrency == b.warmup_concurrency,
        );
        changed
    }
}

/// How BACE is reached.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Default token endpoint for every account.
    pub token_url: Url,
    /// Budget for one upstream exchange (connect, send, answer).
    pub timeout: Duration,
    /// Zone of the `expires` string in BACE's refresh answer.
    pub expires_timezone: Tz,
    /// A cheap authenticated BACE endpoint where Invalidate checks a reported token first.
    pub verify_url: Option<Url>,
}

/// Refresh and retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshConfig {
    /// Refresh once this share of a token's lifetime has passed (plus a small jitter).
    pub lifetime_fraction: f64,
    /// A token counts as expired this long before its stated expiry.
    pub expiry_margin: Duration,
    /// Lifetime assumed after a refresh whose answer gives none we trust; also the cap on it.
    pub refreshed_lifetime: Duration,
    /// First retry delay after a transient upstream failure.
    pub backoff_initial: Duration,
    /// Longest retry delay after transient upstream failures.
    pub backoff_max: Duration,
    /// Wait before retrying a login whose credentials BACE rejected (doubles up to 8x).
    pub rejected_backoff: Duration,
}

/// One BACE account.
#[derive(Clone)]
pub struct AccountConfig {
    /// The account's name in the broker.
    pub name: AccountName,
    /// What BACE needs for a login.
    pub credentials: Credentials,
    /// This account's token endpoint (shared with every account that uses the default).
    pub token_url: Arc<Url>,
}

/// An account's BACE credentials: OAuth2 client id and secret, BACE user name and password.
///
/// All four live in one redacting allocation (the broker holds 100,000 of these at a time);
/// `Debug` shows the client id and user name only.
#[derive(Clone)]
pub struct Credentials {
    /// `client_id`, `username`, `client_secret`, `password`, one after the other.
    packed: SecretString,
    /// Where the first three end in `packed`.
    ends: [u32; 3],
}

impl Credentials {
    /// Credentials of these four values.
    pub fn new(client_id: &str, client_secret: &str, username: &str, password: &str) -> Self {
        let parts = [client_id, username, client_secret, password];
        let mut packed = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        let mut ends = [0u32; 3];
        for (i, part) in parts.iter().enumerate() {
            packed.push_str(part);
            if let Some(end) = ends.get_mut(i) {
                *end = u32::try_from(packed.len()).expect("credentials are far below 4 GiB");
            }
        }
        Self {
            packed: SecretString::from(packed),
            ends,
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self.ends.get(i).map_or(usize::MAX, |e| *e as usize);
        let packed = self.packed.expose_secret();
        &packed[start..end.min(packed.len())]
    }

    /// OAuth2 client id.
    pub fn client_id(&self) -> &str {
        self.part(0)
    }

    /// BACE user name (usually an e-mail address).
    pub fn username(&self) -> &str {
        self.part(1)
    }

    /// OAuth2 client secret. Secret: never log it.
    pub fn expose_client_secret(&self) -> &str {
        self.part(2)
    }

    /// BACE password. Secret: never log it.
    pub fn expose_password(&self) -> &str {
        self.part(3)
    }
}

impl PartialEq for Credentials {
    fn eq(&self, other: &Self) -> bool {
        self.ends == other.ends && self.packed.expose_secret() == other.packed.expose_secret()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id())
            .field("username", &self.username())
            .finish_non_exhaustive()
    }
}

/// Same credentials and endpoint: a reload keeps the account's token.
impl PartialEq for AccountConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.credentials == other.credentials
            && self.token_url == other.token_url
    }
}

impl fmt::Debug for AccountConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountConfig")
            .field("name", &self.name)
            .field("client_id", &self.credentials.client_id())
            .field("username", &self.credentials.username())
            .field("token_url", &self.token_url.as_str())
            .finish_non_exhaustive()
    }
}

/// Why a configuration was refused. The message names the file, account and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML did not match the schema (unknown key, wrong type, bad duration...).
    #[error("{}{message}", origin(.path))]
    Syntax {
        /// The config file, when there is one.
        path: Option<PathBuf>,
        /// The parser's message, with the key path and line.
        message: String,
    },
    /// A top-level field has an unusable value.
    #[error("{}field {field:?}: {problem}", origin(.path))]
    Field {
        /// The config file, when there is one.
        path: Option<PathBuf>,
        /// The field, dotted (`upstream.timeout`).
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// An account's field has an unusable value.
    #[error("{}account {account:?}, field {field:?}: {problem}", origin(.path))]
    Account {
        /// The config file, when there is one.
        path: Option<PathBuf>,
        /// The account as written in the file.
        account: String,
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

fn origin(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

impl Config {
    /// Reads, parses and validates the config file at `path`, reading the secret files it names.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|e| e.in_file(path))?;
        config.path = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates YAML text; relative secret file paths are taken as they are.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = from_yaml(text).map_err(|message| ConfigError::Syntax {
            path: None,
            message,
        })?;
        raw.validate()
    }
}

/// Deserializes YAML `text`. Streamed: serde-saphyr builds no document tree, so a config of
/// 100,000 accounts peaks at about twice its final size while parsing (serde_norway held every
/// event of the document: ~15×). Errors name the key path (`accounts.fleet-a.password: ...`) and the
/// line, never show the source line (it may hold a secret). Duplicate keys are refused and
/// `!include` is off. The node and event budgets scale with the input (every node takes input
/// bytes), so any config that fits in memory parses; alias expansion keeps the library's limits.
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut budget = serde_saphyr::Budget::default();
    let scale = text.len().saturating_add(1024);
    budget.max_nodes = budget.max_nodes.max(scale);
    budget.max_events = budget.max_events.max(scale);
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(scale);
    budget.max_inclusion_depth = 0;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    let mut failed_at = None;
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        let mut track = serde_path_to_error::Track::new();
        T::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
            .inspect_err(|_| failed_at = Some(track.path()))
    })
    .map_err(|e| match failed_at.map(|p| p.to_string()) {
        Some(path) if path != "." => format!("{path}: {e}"),
        _ => e.to_string(),
    })
}

impl ConfigError {
    fn in_file(mut self, file: &Path) -> Self {
        match &mut self {
            ConfigError::Read { .. } => {}
            ConfigError::Syntax { path, .. }
            | ConfigError::Field { path, .. }
            | ConfigError::Account { path, .. } => *path = Some(file.to_owned()),
        }
        self
    }
}

// === The YAML schema ===

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 50051))
}
fn default_health_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 50052))
}
fn default_metrics_listen() -> Option<String> {
    Some("0.0.0.0:9090".into())
}
fn default_token_url() -> String {
    "https://dashboard.bace-iot.com/oauth2/token".into()
}
fn default_timezone() -> String {
    "Europe/Amsterdam".into()
}
const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default = "default_metrics_listen")]
    metrics_listen: Option<String>,
    #[serde(default = "default_health_listen")]
    health_listen: SocketAddr,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    auth: Option<RawAuth>,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default = "RawConfig::cooldown", deserialize_with = "duration")]
    invalidate_cooldown: Duration,
    #[serde(default = "RawConfig::grace", deserialize_with = "duration")]
    shutdown_grace: Duration,
    #[serde(default = "RawConfig::warmup")]
    warmup_concurrency: usize,
    accounts: BTreeMap<String, RawAccount>,
}

impl RawConfig {
    fn cooldown() -> Duration {
        secs(10)
    }
    fn grace() -> Duration {
        secs(10)
    }
    fn warmup() -> usize {
        32
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    #[serde(default = "default_token_url")]
    token_url: String,
    #[serde(default = "RawUpstream::timeout", deserialize_with = "duration")]
    timeout: Duration,
    #[serde(default = "default_timezone")]
    expires_timezone: String,
    #[serde(default)]
    verify_url: Option<String>,
}

impl RawUpstream {
    fn timeout() -> Duration {
        secs(10)
    }
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            token_url: default_token_url(),
            timeout: Self::timeout(),
            expires_timezone: default_timezone(),
            verify_url: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRefresh {
    lifetime_fraction: f64,
    #[serde(deserialize_with = "duration")]
    expiry_margin: Duration,
    #[serde(deserialize_with = "duration")]
    refreshed_lifetime: Duration,
    #[serde(deserialize_with = "duration")]
    backoff_initial: Duration,
    #[serde(deserialize_with = "duration")]
    backoff_max: Duration,
    #[serde(deserialize_with = "duration")]
    rejected_backoff: Duration,
}

impl Default for RawRefresh {
    fn default() -> Self {
        Self {
            lifetime_fraction: 0.6,
            expiry_margin: secs(10),
            refreshed_lifetime: secs(14 * 86_400),
            backoff_initial: secs(1),
            backoff_max: secs(60),
            rejected_backoff: secs(300),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    token_url: Option<String>,
}

/// The longest duration any key accepts (keeps every deadline computation far from overflow).
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Deserializes a humantime duration (`10s`, `5m`, `14d`, `1h 30m`). Parsing inside the visitor
/// lets the YAML error carry the field's path and line.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Humantime;
    impl serde::de::Visitor<'_> for Humantime {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as 10s, 5m or 14d")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            let d = humantime::parse_duration(text)
                .map_err(|e| E::custom(format!("invalid duration {text:?}: {e}")))?;
            if d > MAX_DURATION {
                return Err(E::custom(format!("duration {text:?} is longer than 365d")));
            }
            Ok(d)
        }
    }
    d.deserialize_str(Humantime)
}

// === Validation ===

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let field = |field: &'static str, problem: String| ConfigError::Field {
            path: None,
            field,
            problem,
        };
        let token_url =
            parse_url(&self.upstream.token_url).map_err(|p| field("upstream.token_url", p))?;
        let verify_url = match self.upstream.verify_url.as_deref() {
            None | Some("") => None,
            Some(url) => Some(parse_url(url).map_err(|p| field("upstream.verify_url", p))?),
        };
        if self.upstream.timeout.is_zero() {
            return Err(field("upstream.timeout", "must be more than 0s".into()));
        }
        let expires_timezone: Tz = self.upstream.expires_timezone.parse().map_err(|_| {
            field(
                "upstream.expires_timezone",
                format!(
                    "unknown time zone {:?} (use an IANA name such as Europe/Amsterdam)",
                    self.upstream.expires_timezone
                ),
            )
        })?;
        let r = &self.refresh;
        if !(r.lifetime_fraction > 0.0 && r.lifetime_fraction < 1.0) {
            return Err(field(
                "refresh.lifetime_fraction",
                format!(
                    "must be between 0 and 1 (exclusive), got {}",
                    r.lifetime_fraction
                ),
            ));
        }
        if r.refreshed_lifetime <= r.expiry_margin {
            return Err(field(
                "refresh.refreshed_lifetime",
                "must be longer than refresh.expiry_margin".into(),
            ));
        }
        if r.backoff_initial.is_zero() {
            return Err(field(
                "refresh.backoff_initial",
                "must be more than 0s".into(),
            ));
        }
        if r.backoff_max < r.backoff_initial {
            return Err(field(
                "refresh.backoff_max",
                "must not be shorter than refresh.backoff_initial".into(),
            ));
        }
        if r.rejected_backoff.is_zero() {
            return Err(field(
                "refresh.rejected_backoff",
                "must be more than 0s".into(),
            ));
        }
        if self.warmup_concurrency == 0 {
            return Err(field("warmup_concurrency", "must be at least 1".into()));
        }
        let metrics_listen = match self.metrics_listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(addr) => Some(addr.parse().map_err(|_| {
                field(
                    "metrics_listen",
                    format!("{addr:?} is not an address such as 0.0.0.0:9090 (empty or null: off)"),
                )
            })?),
        };
        let mut tls = self
            .tls
            .map(RawTls::validate)
            .transpose()
            .map_err(|problem| field("tls", problem))?;
        let auth = self
            .auth
            .map(RawAuth::validate)
            .transpose()
            .map_err(|problem| field("auth", problem))?;
        // Both ways of identifying callers on one port: with service-account tokens configured,
        // a client certificate is optional (and verified when presented).
        if let (Some(tls), Some(auth)) = (tls.as_mut(), &auth) {
            tls.client_cert_optional = auth.kubernetes.is_some();
        }
        if let Some(auth) = &auth {
            let client_certs = tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
            if auth.kubernetes.is_none() && !client_certs {
                return Err(field(
                    "auth",
                    "no caller could ever be identified: configure auth.kubernetes or tls.client_ca_file".into(),
                ));
            }
        }
        if self.accounts.is_empty() {
            return Err(field("accounts", "at least one account is required".into()));
        }
        let mut accounts = BTreeMap::new();
        let mut secret_files: Vec<PathBuf> = tls
            .iter()
            .flat_map(|t| t.files())
            .chain(auth.iter().flat_map(|a| a.files()))
            .map(Path::to_path_buf)
            .collect();
        let shared_url = Arc::new(token_url.clone());
        for (name, raw) in self.accounts {
            secret_files.extend(
                raw.client_secret_file
                    .iter()
                    .chain(&raw.password_file)
                    .cloned(),
            );
            let account = raw.validate(&name, &shared_url)?;
            accounts.insert(account.name.clone(), account);
        }
        Ok(Config {
            listen: self.listen,
            metrics_listen,
            health_listen: self.health_listen,
            tls,
            auth,
            upstream: UpstreamConfig {
                token_url,
                timeout: self.upstream.timeout,
                expires_timezone,
                verify_url,
            },
            refresh: RefreshConfig {
                lifetime_fraction: r.lifetime_fraction,
                expiry_margin: r.expiry_margin,
                refreshed_lifetime: r.refreshed_lifetime,
                backoff_initial: r.backoff_initial,
                backoff_max: r.backoff_max,
                rejected_backoff: r.rejected_backoff,
            },
            invalidate_cooldown: self.invalidate_cooldown,
            shutdown_grace: self.shutdown_grace,
            warmup_concurrency: self.warmup_concurrency,
            accounts,
            path: None,
            secret_files,
        })
    }
}

impl RawAccount {
    fn validate(self, name: &str, default_url: &Arc<Url>) -> Result<AccountConfig, ConfigError> {
        let err = |field: &'static str, problem: String| ConfigError::Account {
            path: None,
            account: name.to_owned(),
            field,
            problem,
        };
        let account = AccountName::new(name).map_err(|e| err("name", e.to_string()))?;
        let required = |value: Option<String>, field: &'static str| match value {
            Some(v) if !v.trim().is_empty() => Ok(v),
            Some(_) => Err(err(field, "must not be empty".into())),
            None => Err(err(field, "is required".into())),
        };
        let client_id = required(self.client_id, "client_id")?;
        let username = required(self.username, "username")?;
        let client_secret = secret(
            self.client_secret,
            self.client_secret_file,
            ("client_secret", "client_secret_file"),
        )
        .map_err(|(field, problem)| err(field, problem))?;
        let password = secret(
            self.password,
            self.password_file,
            ("password", "password_file"),
        )
        .map_err(|(field, problem)| err(field, problem))?;
        let token_url = match self.token_url {
            Some(url) => Arc::new(parse_url(&url).map_err(|p| err("token_url", p))?),
            None => Arc::clone(default_url),
        };
        Ok(AccountConfig {
            name: account,
            credentials: Credentials::new(
                &client_id,
                client_secret.expose_secret(),
                &username,
                password.expose_secret(),
            ),
            token_url,
        })
    }
}

/// Resolves a secret given inline or as a file (exactly one of the two). A file is read now and
/// loses one trailing newline.
fn secret(
    inline: Option<String>,
    file: Option<PathBuf>,
    (inline_field, file_field): (&'static str, &'static str),
) -> Result<SecretString, (&'static str, String)> {
    let value = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err((
                inline_field,
                format!("give either {inline_field} or {file_field}, not both"),
            ));
        }
        (None, None) => {
            return Err((inline_field, format!("is required (or {file_field})")));
        }
        (Some(v), None) => {
            if v.is_empty() {
                return Err((inline_field, "must not be empty".into()));
            }
            return Ok(SecretString::from(v));
        }
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| (file_field, format!("cannot read {}: {e}", path.display())))
            .map(|text| (text, path))?,
    };
    let (mut text, path) = value;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err((file_field, format!("{} is empty", path.display())));
    }
    Ok(SecretString::from(text))
}

fn parse_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("invalid URL {text:?}: {e}"))?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(url),
        _ => Err(format!("{text:?} is not an http(s) URL with a host")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
accounts:
  fleet-a:
    client_id: cid
    client_secret: csecret
    username: ops@example.com
    password: pw
";

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
        for off in [
            "metrics_listen: \"\"\n",
            "metrics_listen:\n",
            "metrics_listen: null\n",
        ] {
            let c = Config::parse(&format!("{off}{MINIMAL}")).unwrap();
            assert_eq!(c.metrics_listen, None, "{off}");
        }
        assert_eq!(
            c.upstream.token_url.as_str(),
            "https://dashboard.bace-iot.com/oauth2/token"
        );
        assert_eq!(c.upstream.timeout, secs(10));
        assert_eq!(c.upstream.expires_timezone, chrono_tz::Europe::Amsterdam);
        assert_eq!(c.refresh.lifetime_fraction, 0.6);
        assert_eq!(c.refresh.expiry_margin, secs(10));
        assert_eq!(c.refresh.refreshed_lifetime, secs(14 * 86_400));
        assert_eq!(c.invalidate_cooldown, secs(10));
        let a = &c.accounts["fleet-a"];
        assert_eq!(a.credentials.client_id(), "cid");
        assert_eq!(a.credentials.username(), "ops@example.com");
        assert_eq!(a.credentials.expose_password(), "pw");
        assert_eq!(*a.token_url, c.upstream.token_url);
    }

    #[test]
    fn full_config_and_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        let cs = dir.path().join("cs");
        std::fs::write(&pw, "hunter2\n").unwrap();
        std::fs::write(&cs, "s3cret\r\n").unwrap();
        let text = format!(
            "
listen: 127.0.0.1:6000
upstream:
  token_url: http://localhost:8080/oauth2/token
  timeout: 2s
  expires_timezone: UTC
refresh:
  lifetime_fraction: 0.5
  expiry_margin: 1m
  refreshed_lifetime: 7d
invalidate_cooldown: 30s
accounts:
  fleet-a:
    client_id: cid
    client_secret_file: {}
    username: u
    password_file: {}
    token_url: https://other.example/oauth2/token
",
            cs.display(),
            pw.display()
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.upstream.timeout, secs(2));
        assert_eq!(c.refresh.expiry_margin, secs(60));
        assert_eq!(c.refresh.refreshed_lifetime, secs(7 * 86_400));
        assert_eq!(c.invalidate_cooldown, secs(30));
        let a = &c.accounts["fleet-a"];
        assert_eq!(a.credentials.expose_password(), "hunter2");
        assert_eq!(a.credentials.expose_client_secret(), "s3cret");
        assert_eq!(a.token_url.as_str(), "https://other.example/oauth2/token");
        assert_eq!(c.secret_files, vec![cs.clone(), pw.clone()]);
        let mut other = c.clone();
        assert!(c.restart_only_changes(&other).is_empty());
        other.refresh.expiry_margin = secs(1);
        other.listen = "127.0.0.1:1".parse().unwrap();
        assert_eq!(c.restart_only_changes(&other), vec!["listen", "refresh"]);
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("s3cret"),
            "{debug}"
        );
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn large_configs_fit_the_parser_budget() {
        // 25,000 accounts make ~300,000 YAML nodes, past serde-saphyr's default budget of
        // 250,000: the budget scales with the input.
        let mut yaml = String::from("accounts:\n");
        for i in 0..25_000 {
            yaml.push_str(&format!(
                "  a{i}: {{client_id: c, client_secret: s, username: u{i}, password: p}}\n"
            ));
        }
        assert_eq!(Config::parse(&yaml).unwrap().accounts.len(), 25_000);
    }

    #[test]
    fn yaml_errors_name_the_key_path_and_never_echo_the_source() {
        let base = "accounts:\n  a:\n    client_id: c\n    client_secret: s\n    username: u\n";
        let cases: [(String, &[&str]); 4] = [
            (
                format!("{base}    password: \"hunter2-SECRET\"\n    pasword: x\n"),
                &["accounts.a.pasword", "unknown field `pasword`", "line 7"],
            ),
            (format!("{base}    password: \"hunter2-SECRET\n"), &["line"]),
            (
                format!("{base}    password: p\n  a:\n    client_id: c\n"),
                &["duplicate", "a"],
            ),
            (
                format!("{base}    password: p\n    password: hunter2-SECRET\n"),
                &["duplicate", "password"],
            ),
        ];
        for (yaml, wanted) in &cases {
            let msg = Config::parse(yaml).unwrap_err().to_string();
            for w in *wanted {
                assert!(msg.contains(w), "{msg:?} lacks {w:?}");
            }
            assert!(!msg.contains("SECRET"), "{msg:?} echoes a secret");
        }
    }

    #[test]
    fn errors_name_account_and_field() {
        let cases: &[(&str, &[&str])] = &[
            ("accounts: {}", &["accounts", "at least one"]),
            ("listen: 1\naccounts: {}", &["listen"]),
            ("bogus: 1\naccounts: {}", &["unknown field `bogus`"]),
            (
                "accounts:\n  a:\n    client_id: c\n    client_secret: s\n    username: u\n    password: p\n    pasword: x",
                &["unknown field `pasword`"],
            ),
            (
                "accounts:\n  a:\n    client_secret: s\n    username: u\n    password: p",
                &["account \"a\"", "\"client_id\"", "required"],
            ),
            (
                "accounts:\n  a:\n    client_id: c\n    client_secret: s\n    username: ' '\n    password: p",
                &["account \"a\"", "\"username\"", "empty"],
            ),
            (
                "accounts:\n  a:\n    client_id: c\n    username: u\n    password: p",
                &["account \"a\"", "\"client_secret\"", "client_secret_file"],
            ),
            (
                "accounts:\n  a:\n    client_id: c\n    client_secret: s\n    username: u\n    password: p\n    password_file: /x",
                &["account \"a\"", "\"password\"", "not both"],
            ),
            (
                "accounts:\n  a:\n    client_id: c\n    client_secret: s\n    username: u\n    password_file: /nonexistent/pw",
                &["account \"a\"", "\"password_file\"", "/nonexistent/pw"],
            ),
            (
                "accounts:\n  'a b':\n    client_id: c\n    client_secret: s\n    username: u\n    password: p",
                &["account \"a b\"", "\"name\""],
            ),
            (
                "accounts:\n  a:\n    client_id: c\n    client_secret: s\n    username: u\n    password: p\n    token_url: ftp://x/y",
                &["account \"a\"", "\"token_url\""],
            ),
            (
                "upstream:\n  timeout: soon\naccounts: {}",
                &["upstream.timeout", "invalid duration \"soon\""],
            ),
            (
                "invalidate_cooldown: 5 parsecs\naccounts: {}",
                &["invalidate_cooldown", "invalid duration"],
            ),
            (
                "refresh:\n  refreshed_lifetime: 30000000000y\naccounts: {}",
                &["refresh.refreshed_lifetime", "longer than 365d"],
            ),
            (
                "upstream:\n  timeout: 0s\naccounts: {}",
                &["upstream.timeout"],
            ),
            (
                "upstream:\n  expires_timezone: Mars/Olympus\naccounts: {}",
                &["upstream.expires_timezone", "Mars/Olympus"],
            ),
            (
                "refresh:\n  lifetime_fraction: 1.5\naccounts: {}",
                &["refresh.lifetime_fraction"],
            ),
            (
                "refresh:\n  refreshed_lifetime: 5s\naccounts: {}",
                &["refresh.refreshed_lifetime"],
            ),
            (
                "upstream:\n  token_url: nope\naccounts: {}",
                &["upstream.token_url"],
            ),
            (
                "metrics_listen: nine\naccounts: {}",
                &["metrics_listen", "nine"],
            ),
            (
                "auth:\n  allow: [{caller: \"spiffe://x/y\", accounts: [a]}]\naccounts: {}",
                &["\"auth\"", "no caller could ever be identified"],
            ),
        ];
        for (text, wants) in cases {
            let msg = err(text);
            for want in *wants {
                assert!(msg.contains(want), "{text:?}: {msg:?} lacks {want:?}");
            }
        }
    }

    #[test]
    fn empty_secret_file_and_file_path_in_message() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "\n").unwrap();
        let text = format!(
            "accounts:\n  a:\n    client_id: c\n    client_secret: s\n    username: u\n    password_file: {}",
            pw.display()
        );
        let msg = err(&text);
        assert!(
            msg.contains("\"password_file\"") && msg.contains("is empty"),
            "{msg}"
        );

        let cfg = dir.path().join("broker.yaml");
        std::fs::write(&cfg, "accounts: {}").unwrap();
        let msg = Config::load(&cfg).unwrap_err().to_string();
        assert!(msg.starts_with(&format!("{}: ", cfg.display())), "{msg}");
        let msg = Config::load(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cannot read config file"), "{msg}");
    }
}
