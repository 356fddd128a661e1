//! The YAML as written: every key, its default, and the validation into a [`Config`].

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
use serde::{Deserialize, Deserializer};

use super::{
    Config, ConfigError, RefreshConfig, UpstreamConfig, account::RawAccount, auth::RawAuth,
    store::RawStore, tls::RawTls,
};

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
    bace_wire::DEFAULT_EXPIRES_TIMEZONE.into()
}
const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Whether a config must name accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Accounts {
    /// A config file: at least one account.
    Required,
    /// A config built in code, whose accounts are added after.
    AddedLater,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
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
    store: Option<RawStore>,
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

/// The longest duration any key accepts (keeps every deadline computation far from overflow).
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Deserializes a humantime duration (`10s`, `5m`, `14d`, `1h 30m`). Parsing inside the visitor
/// lets the YAML error carry the field's path and line.
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
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

impl RawConfig {
    /// The defaults of every key, and no accounts.
    pub(super) fn defaults() -> Self {
        Self {
            listen: default_listen(),
            metrics_listen: default_metrics_listen(),
            health_listen: default_health_listen(),
            tls: None,
            auth: None,
            store: None,
            upstream: RawUpstream::default(),
            refresh: RawRefresh::default(),
            invalidate_cooldown: Self::cooldown(),
            shutdown_grace: Self::grace(),
            warmup_concurrency: Self::warmup(),
            accounts: BTreeMap::new(),
        }
    }

    /// Validates a config as read from a file: at least one account.
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        self.validate_with(Accounts::Required)
    }

    pub(super) fn validate_with(self, accounts_rule: Accounts) -> Result<Config, ConfigError> {
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
            .map_err(|problem| field("tls", problem.to_string()))?;
        let auth = self
            .auth
            .map(RawAuth::validate)
            .transpose()
            .map_err(|problem| field("auth", problem.to_string()))?;
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
        let store = self
            .store
            .map(RawStore::validate)
            .transpose()
            .map_err(|problem| field("store", problem.to_string()))?;
        if self.accounts.is_empty() && accounts_rule == Accounts::Required {
            return Err(field("accounts", "at least one account is required".into()));
        }
        let mut accounts = BTreeMap::new();
        let mut secret_files: Vec<PathBuf> = tls
            .iter()
            .flat_map(|t| t.files())
            .chain(auth.iter().flat_map(|a| a.files()))
            .chain(store.iter().flat_map(|s| s.redis.files()))
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
            store,
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

pub(super) fn parse_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("invalid URL {text:?}: {e}"))?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(url),
        _ => Err(format!("{text:?} is not an http(s) URL with a host")),
    }
}
