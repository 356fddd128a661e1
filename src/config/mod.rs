//! The broker's configuration: the YAML schema, its defaults, and validation into a [`Config`]
//! whose every value is usable as is (secret files read, URLs parsed, zone resolved, TLS
//! material and JWKS documents parsed).
//!
//! Every error names the place it was found: the file, the account and the field.
//!
//! - this file: the validated [`Config`] and its errors;
//! - `schema`: the YAML as written (`Raw*`), its defaults and its validation;
//! - `account`: one account and its [`Credentials`];
//! - `auth`, `tls`, `store`: the schemas of the `auth`, `tls` and `store` sections, with what
//!   reading their files needs (PEM certificates and keys, JWKS documents, the store's key
//!   file), so that config depends on no runtime module;
//! - `yaml`: the streaming YAML reader.

mod account;
mod auth;
mod schema;
mod store;
mod tls;
mod yaml;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use chrono_tz::Tz;
use reqwest::Url;

pub use self::{
    account::{AccountConfig, Credentials},
    auth::{
        AllowedAccounts, AuthConfig, DEFAULT_AUDIENCE, JwksSource, KubernetesConfig, LoadedFile,
        RawAllow, RawAuth, RawKubernetes,
    },
    store::{
        DEFAULT_KEY_PREFIX, DEFAULT_STORE_LEASE, DEFAULT_STORE_TIMEOUT, KeyFileError, KeyIdError,
        MAX_KEY_ID_LEN, RawRedis, RawStore, RedisConfig, STORE_KEY_LEN, StoreConfig, StoreKey,
        StoreKeys, generate_key_line, validate_key_id,
    },
    tls::{RawTls, TlsConfig},
    yaml::from_yaml,
};
pub(crate) use self::{
    auth::{ParsedKey, ca_certificates, parse_jwks},
    tls::{TlsMaterial, client_verifier, provider as tls_provider},
};
use crate::token::AccountName;

/// A section field with an unusable value. The message names the field
/// (`auth.allow[2].accounts`, `tls.key_file`...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    /// The field, dotted.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

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
    /// The store shared by replicas (Redis); `None`: tokens live in this process's memory.
    pub store: Option<StoreConfig>,
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
    /// A config with the default of every key and these accounts, for programs that build
    /// their config in code (`serve --demo`, tests): set the fields to change after.
    pub fn new(accounts: impl IntoIterator<Item = AccountConfig>) -> Self {
        let mut config = schema::RawConfig::defaults()
            .validate_with(schema::Accounts::AddedLater)
            .unwrap_or_else(|e| unreachable!("the defaults are valid: {e}"));
        config.accounts = accounts.into_iter().map(|a| (a.name.clone(), a)).collect();
        config
    }

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
        // The store's connection, prefix, keys and timings are set up once at start.
        check("store", a.store == b.store);
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

/// The largest file the config may name (secret, certificate, key and JWKS files): the size
/// limit of a Kubernetes Secret. A path to something endless (`/dev/zero`, a log) is refused
/// after reading this much, never read into memory whole.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;

/// Reads a file the config names, of at most [`MAX_FILE_BYTES`].
pub(crate) fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut contents = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut contents)?;
    if contents.len() > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(contents)
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
        let raw: schema::RawConfig = from_yaml(text).map_err(|message| ConfigError::Syntax {
            path: None,
            message,
        })?;
        raw.validate()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    const MINIMAL: &str = "
accounts:
  fleet-a:
    client_id: cid
    client_secret: csecret
    username: ops@example.com
    password: pw
";

    #[test]
    fn a_config_built_in_code_has_the_defaults_of_a_file() {
        let parsed = Config::parse(MINIMAL).unwrap();
        let built = Config::new(parsed.accounts.values().cloned());
        assert!(built.restart_only_changes(&parsed).is_empty());
        assert_eq!(built.accounts, parsed.accounts);
        assert_eq!(built.upstream.token_url, parsed.upstream.token_url);
        assert_eq!(built.health_listen, parsed.health_listen);
    }

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

    #[test]
    fn the_store_section_and_its_defaults_need_a_restart_to_change() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
        let pw = dir.path().join("redis-pw");
        std::fs::write(&pw, "redis-SECRET\n").unwrap();
        let text = |extra: &str| {
            format!(
                "store:\n  redis:\n    url: redis://redis:6379/0\n    password_file: {}\n    encryption_key_file: {}\n{extra}{MINIMAL}",
                pw.display(),
                keys.display()
            )
        };
        let c = Config::parse(&text("")).unwrap();
        assert!(Config::parse(MINIMAL).unwrap().store.is_none());
        let r = &c.store.as_ref().unwrap().redis;
        assert_eq!(r.key_prefix, "bace-broker");
        assert_eq!(r.timeout, Duration::from_millis(500));
        assert_eq!(r.lease, secs(30));
        assert_eq!(r.username, None);
        assert!(!r.tls());
        assert_eq!(r.keys.encrypting().id(), "k1");
        assert!(c.secret_files.contains(&keys) && c.secret_files.contains(&pw));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("redis-SECRET") && !shown.contains("AAECAw"),
            "{shown}"
        );

        // A reload reads the section again: unchanged is no change; a changed key file,
        // password or setting needs a restart.
        assert!(
            c.restart_only_changes(&Config::parse(&text("")).unwrap())
                .is_empty()
        );
        let lease = Config::parse(&text("    lease: 10s\n")).unwrap();
        assert_eq!(c.restart_only_changes(&lease), vec!["store"]);
        std::fs::write(&pw, "redis-SECRET-2\n").unwrap();
        assert_eq!(
            c.restart_only_changes(&Config::parse(&text("")).unwrap()),
            vec!["store"]
        );
        std::fs::write(&pw, "redis-SECRET\n").unwrap();
        std::fs::write(&keys, "k2 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
        assert_eq!(
            c.restart_only_changes(&Config::parse(&text("")).unwrap()),
            vec!["store"]
        );
        assert_eq!(
            c.restart_only_changes(&Config::parse(MINIMAL).unwrap()),
            vec!["store"]
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
