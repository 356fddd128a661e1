//! A typed builder of broker configs: the one place tests, benchmarks and probes write the
//! broker's YAML. [`BrokerConfig::to_yaml`] gives the text (for a file the binary reads),
//! [`BrokerConfig::build`] parses it into a [`Config`] (so every config a test uses went through
//! the same parser as production).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bace_token_broker::{Config, ConfigError};

/// One account of a [`BrokerConfig`].
#[derive(Debug, Clone)]
pub struct Account {
    name: String,
    client_id: String,
    client_secret: Secret,
    username: String,
    password: Secret,
    token_url: Option<String>,
}

#[derive(Debug, Clone)]
enum Secret {
    Inline(String),
    File(PathBuf),
}

impl Account {
    /// An account with inline credentials.
    pub fn new(
        name: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            client_id: client_id.into(),
            client_secret: Secret::Inline(client_secret.into()),
            username: username.into(),
            password: Secret::Inline(password.into()),
            token_url: None,
        }
    }

    /// The account the test harness uses for `name` against the fake: user
    /// `<name>@example.com`, password `pw-<name>-Zq9`, client `client-1`/`client-secret-X7`
    /// (see [`crate::fake_account`]).
    pub fn standard(name: &str) -> Self {
        Self::new(
            name,
            crate::CLIENT_ID,
            crate::CLIENT_SECRET,
            crate::user(name),
            crate::password(name),
        )
    }

    /// Its own token endpoint (`token_url` of the account).
    pub fn token_url(mut self, url: impl Into<String>) -> Self {
        self.token_url = Some(url.into());
        self
    }

    /// The password read from a file (`password_file`).
    pub fn password_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.password = Secret::File(path.into());
        self
    }

    /// The client secret read from a file (`client_secret_file`).
    pub fn client_secret_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.client_secret = Secret::File(path.into());
        self
    }
}

/// `auth.kubernetes`.
#[derive(Debug, Clone)]
pub struct Kubernetes {
    /// `issuer`.
    pub issuer: String,
    /// `jwks_url` or `jwks_file`.
    pub jwks: Jwks,
    /// `audience`, if set.
    pub audience: Option<String>,
    /// `ca_file`, if set.
    pub ca_file: Option<PathBuf>,
    /// `bearer_token_file`, if set.
    pub bearer_token_file: Option<PathBuf>,
}

/// Where `auth.kubernetes` reads keys.
#[derive(Debug, Clone)]
pub enum Jwks {
    /// `jwks_url`.
    Url(String),
    /// `jwks_file`.
    File(PathBuf),
}

impl Kubernetes {
    /// Keys from `jwks`, for tokens of `issuer`.
    pub fn new(issuer: impl Into<String>, jwks: Jwks) -> Self {
        Self {
            issuer: issuer.into(),
            jwks,
            audience: None,
            ca_file: None,
            bearer_token_file: None,
        }
    }
}

/// A `store.redis` section (the Redis store replicas share). Keys left unset are absent from
/// the YAML (the broker's defaults apply).
#[derive(Debug, Clone)]
pub struct RedisStore {
    url: String,
    encryption_key_file: PathBuf,
    username: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    key_prefix: Option<String>,
    timeout: Option<Duration>,
    lease: Option<Duration>,
}

impl RedisStore {
    /// Redis at `url`, records sealed with the keys of `encryption_key_file` (see
    /// [`RedisStore::write_key_file`]).
    pub fn new(url: impl Into<String>, encryption_key_file: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            encryption_key_file: encryption_key_file.into(),
            username: None,
            password_file: None,
            ca_file: None,
            key_prefix: None,
            timeout: None,
            lease: None,
        }
    }

    /// Writes a key file at `path` with one fresh random key per id, the first encrypting.
    pub fn write_key_file(path: &Path, ids: &[&str]) {
        let lines: Vec<String> = ids
            .iter()
            .map(|id| {
                bace_token_broker::config::generate_key_line(id)
                    .unwrap_or_else(|e| panic!("key id {id:?}: {e}"))
            })
            .collect();
        std::fs::write(path, lines.join("\n") + "\n").expect("write the key file");
    }

    /// `username`.
    pub fn username(mut self, user: impl Into<String>) -> Self {
        self.username = Some(user.into());
        self
    }

    /// `password_file`.
    pub fn password_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.password_file = Some(path.into());
        self
    }

    /// `ca_file`.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// `key_prefix`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = Some(prefix.into());
        self
    }

    /// `timeout`.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// `lease`.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = Some(d);
        self
    }
}

/// A broker config under construction. Keys left unset are absent from the YAML (the broker's
/// defaults apply).
#[derive(Debug, Clone, Default)]
pub struct BrokerConfig {
    listen: Option<SocketAddr>,
    metrics_listen: Option<Option<SocketAddr>>,
    health_listen: Option<SocketAddr>,
    token_url: Option<String>,
    upstream_timeout: Option<Duration>,
    verify_url: Option<String>,
    expires_timezone: Option<String>,
    refresh: Vec<(&'static str, String)>,
    invalidate_cooldown: Option<Duration>,
    shutdown_grace: Option<Duration>,
    warmup_concurrency: Option<usize>,
    tls: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    kubernetes: Option<Kubernetes>,
    allow: Option<Vec<(String, Vec<String>)>>,
    store: Option<RedisStore>,
    accounts: Vec<Account>,
}

impl BrokerConfig {
    /// An empty config: add accounts.
    pub fn new() -> Self {
        Self::default()
    }

    /// [`Account::standard`] accounts for `names`, each with the fake's `token_url`.
    pub fn for_fake(fake: &fake_bace::FakeBace, names: &[&str]) -> Self {
        let url = fake.token_url();
        names.iter().fold(Self::new(), |c, name| {
            c.account(Account::standard(name).token_url(url.clone()))
        })
    }

    /// Adds an account.
    pub fn account(mut self, account: Account) -> Self {
        self.accounts.push(account);
        self
    }

    /// `listen`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// `metrics_listen` (`None`: off).
    pub fn metrics_listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    /// `health_listen`.
    pub fn health_listen(mut self, addr: SocketAddr) -> Self {
        self.health_listen = Some(addr);
        self
    }

    /// `upstream.token_url`.
    pub fn token_url(mut self, url: impl Into<String>) -> Self {
        self.token_url = Some(url.into());
        self
    }

    /// `upstream.timeout`.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.upstream_timeout = Some(timeout);
        self
    }

    /// `upstream.verify_url`.
    pub fn verify_url(mut self, url: impl Into<String>) -> Self {
        self.verify_url = Some(url.into());
        self
    }

    /// `upstream.expires_timezone`.
    pub fn expires_timezone(mut self, zone: impl Into<String>) -> Self {
        self.expires_timezone = Some(zone.into());
        self
    }

    /// `refresh.lifetime_fraction`.
    pub fn lifetime_fraction(self, fraction: f64) -> Self {
        self.refresh_key("lifetime_fraction", fraction.to_string())
    }

    /// `refresh.expiry_margin`.
    pub fn expiry_margin(self, d: Duration) -> Self {
        self.refresh_key("expiry_margin", duration(d))
    }

    /// `refresh.refreshed_lifetime`.
    pub fn refreshed_lifetime(self, d: Duration) -> Self {
        self.refresh_key("refreshed_lifetime", duration(d))
    }

    /// `refresh.backoff_initial`.
    pub fn backoff_initial(self, d: Duration) -> Self {
        self.refresh_key("backoff_initial", duration(d))
    }

    /// `refresh.backoff_max`.
    pub fn backoff_max(self, d: Duration) -> Self {
        self.refresh_key("backoff_max", duration(d))
    }

    /// `refresh.rejected_backoff`.
    pub fn rejected_backoff(self, d: Duration) -> Self {
        self.refresh_key("rejected_backoff", duration(d))
    }

    fn refresh_key(mut self, key: &'static str, value: String) -> Self {
        self.refresh.retain(|(k, _)| *k != key);
        self.refresh.push((key, value));
        self
    }

    /// `invalidate_cooldown`.
    pub fn invalidate_cooldown(mut self, d: Duration) -> Self {
        self.invalidate_cooldown = Some(d);
        self
    }

    /// `shutdown_grace`.
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = Some(d);
        self
    }

    /// `warmup_concurrency`.
    pub fn warmup_concurrency(mut self, n: usize) -> Self {
        self.warmup_concurrency = Some(n);
        self
    }

    /// `tls` with these files.
    pub fn tls(mut self, cert: &Path, key: &Path, client_ca: Option<&Path>) -> Self {
        self.tls = Some((cert.into(), key.into(), client_ca.map(Into::into)));
        self
    }

    /// `auth.kubernetes`.
    pub fn kubernetes(mut self, kubernetes: Kubernetes) -> Self {
        self.kubernetes = Some(kubernetes);
        self
    }

    /// An `auth.allow` entry (turns `auth` on).
    pub fn allow(mut self, caller: impl Into<String>, accounts: &[&str]) -> Self {
        let accounts = accounts.iter().map(|a| (*a).to_owned()).collect();
        self.allow
            .get_or_insert_with(Vec::new)
            .push((caller.into(), accounts));
        self
    }

    /// `store.redis`: replicas share their tokens through Redis.
    pub fn store(mut self, store: RedisStore) -> Self {
        self.store = Some(store);
        self
    }

    /// The YAML text.
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let mut line = |text: String| {
            y.push_str(&text);
            y.push('\n');
        };
        if let Some(a) = self.listen {
            line(format!("listen: {}", quote(&a.to_string())));
        }
        match self.metrics_listen {
            Some(Some(a)) => line(format!("metrics_listen: {}", quote(&a.to_string()))),
            Some(None) => line("metrics_listen: \"\"".into()),
            None => {}
        }
        if let Some(a) = self.health_listen {
            line(format!("health_listen: {}", quote(&a.to_string())));
        }
        let upstream = [
            ("token_url", self.token_url.as_deref().map(quote)),
            ("timeout", self.upstream_timeout.map(duration)),
            ("verify_url", self.verify_url.as_deref().map(quote)),
            (
                "expires_timezone",
                self.expires_timezone.as_deref().map(quote),
            ),
        ];
        section(&mut line, "upstream", &upstream);
        let refresh: Vec<(&str, Option<String>)> = self
            .refresh
            .iter()
            .map(|(k, v)| (*k, Some(v.clone())))
            .collect();
        section(&mut line, "refresh", &refresh);
        if let Some(d) = self.invalidate_cooldown {
            line(format!("invalidate_cooldown: {}", duration(d)));
        }
        if let Some(d) = self.shutdown_grace {
            line(format!("shutdown_grace: {}", duration(d)));
        }
        if let Some(n) = self.warmup_concurrency {
            line(format!("warmup_concurrency: {n}"));
        }
        if let Some((cert, key, ca)) = &self.tls {
            line("tls:".into());
            line(format!("  cert_file: {}", path(cert)));
            line(format!("  key_file: {}", path(key)));
            if let Some(ca) = ca {
                line(format!("  client_ca_file: {}", path(ca)));
            }
        }
        if self.kubernetes.is_some() || self.allow.is_some() {
            line("auth:".into());
            if let Some(k) = &self.kubernetes {
                line("  kubernetes:".into());
                line(format!("    issuer: {}", quote(&k.issuer)));
                match &k.jwks {
                    Jwks::Url(url) => line(format!("    jwks_url: {}", quote(url))),
                    Jwks::File(file) => line(format!("    jwks_file: {}", path(file))),
                }
                if let Some(a) = &k.audience {
                    line(format!("    audience: {}", quote(a)));
                }
                if let Some(f) = &k.ca_file {
                    line(format!("    ca_file: {}", path(f)));
                }
                if let Some(f) = &k.bearer_token_file {
                    line(format!("    bearer_token_file: {}", path(f)));
                }
            }
            match &self.allow {
                Some(rules) => {
                    line("  allow:".into());
                    for (caller, accounts) in rules {
                        line(format!("    - caller: {}", quote(caller)));
                        let list: Vec<String> = accounts.iter().map(|a| quote(a)).collect();
                        line(format!("      accounts: [{}]", list.join(", ")));
                    }
                }
                None => line("  allow: []".into()),
            }
        }
        if let Some(r) = &self.store {
            line("store:".into());
            line("  redis:".into());
            line(format!("    url: {}", quote(&r.url)));
            line(format!(
                "    encryption_key_file: {}",
                path(&r.encryption_key_file)
            ));
            if let Some(u) = &r.username {
                line(format!("    username: {}", quote(u)));
            }
            if let Some(p) = &r.password_file {
                line(format!("    password_file: {}", path(p)));
            }
            if let Some(p) = &r.ca_file {
                line(format!("    ca_file: {}", path(p)));
            }
            if let Some(p) = &r.key_prefix {
                line(format!("    key_prefix: {}", quote(p)));
            }
            if let Some(d) = r.timeout {
                line(format!("    timeout: {}", duration(d)));
            }
            if let Some(d) = r.lease {
                line(format!("    lease: {}", duration(d)));
            }
        }
        // One flow mapping per account: a config of 100,000 accounts stays compact (the
        // memory benchmark parses one).
        line("accounts:".into());
        for a in &self.accounts {
            let mut fields = vec![format!("client_id: {}", quote(&a.client_id))];
            fields.push(match &a.client_secret {
                Secret::Inline(s) => format!("client_secret: {}", quote(s)),
                Secret::File(p) => format!("client_secret_file: {}", path(p)),
            });
            fields.push(format!("username: {}", quote(&a.username)));
            fields.push(match &a.password {
                Secret::Inline(s) => format!("password: {}", quote(s)),
                Secret::File(p) => format!("password_file: {}", path(p)),
            });
            if let Some(url) = &a.token_url {
                fields.push(format!("token_url: {}", quote(url)));
            }
            line(format!("  {}: {{{}}}", quote(&a.name), fields.join(", ")));
        }
        y
    }

    /// The config, parsed and validated as the broker would.
    pub fn try_build(&self) -> Result<Config, ConfigError> {
        Config::parse(&self.to_yaml())
    }

    /// [`BrokerConfig::try_build`], panicking (naming the problem) on an invalid config.
    pub fn build(&self) -> Config {
        self.try_build()
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{}", self.to_yaml()))
    }

    /// Writes the YAML to `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let file = dir.join(name);
        std::fs::write(&file, self.to_yaml()).expect("write the config file");
        file
    }
}

fn section(line: &mut impl FnMut(String), name: &str, keys: &[(&str, Option<String>)]) {
    if keys.iter().all(|(_, v)| v.is_none()) {
        return;
    }
    line(format!("{name}:"));
    for (key, value) in keys {
        if let Some(value) = value {
            line(format!("  {key}: {value}"));
        }
    }
}

/// A YAML scalar for `text`: plain when it is a simple word (`fleet-a`, `cid`, `pw-1`) and
/// cannot read as anything but a string, double-quoted otherwise (so configs of 100,000
/// accounts stay the size hand-written ones have).
fn quote(text: &str) -> String {
    let plain = text.starts_with(|c: char| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !matches!(
            text.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n" | "inf" | "nan"
        );
    if plain {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path(p: &Path) -> String {
    quote(&p.display().to_string())
}

/// A duration as the broker reads it (`1h 30m`, `250ms`).
fn duration(d: Duration) -> String {
    quote(&humantime::format_duration(d).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_reaches_the_config() {
        let config = BrokerConfig::new()
            .listen("127.0.0.1:7000".parse().unwrap())
            .metrics_listen(None)
            .token_url("http://127.0.0.1:9/oauth2/token")
            .upstream_timeout(Duration::from_millis(1500))
            .verify_url("http://127.0.0.1:9/api")
            .expires_timezone("UTC")
            .lifetime_fraction(0.5)
            .expiry_margin(Duration::from_secs(3))
            .refreshed_lifetime(Duration::from_secs(3600))
            .backoff_initial(Duration::from_millis(250))
            .backoff_max(Duration::from_secs(90))
            .rejected_backoff(Duration::from_secs(7))
            .invalidate_cooldown(Duration::ZERO)
            .shutdown_grace(Duration::from_secs(2))
            .warmup_concurrency(3)
            .account(Account::new("a", "c", "s\"\\", "yes", "p: #x"))
            .account(Account::new("b", "c", "1e3", "u@example.com", "~"))
            .build();
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.upstream.timeout, Duration::from_millis(1500));
        assert_eq!(config.upstream.verify_url.unwrap().path(), "/api");
        assert_eq!(config.refresh.lifetime_fraction, 0.5);
        assert_eq!(config.refresh.expiry_margin, Duration::from_secs(3));
        assert_eq!(config.refresh.refreshed_lifetime, Duration::from_secs(3600));
        assert_eq!(config.refresh.backoff_initial, Duration::from_millis(250));
        assert_eq!(config.refresh.backoff_max, Duration::from_secs(90));
        assert_eq!(config.refresh.rejected_backoff, Duration::from_secs(7));
        assert_eq!(config.invalidate_cooldown, Duration::ZERO);
        assert_eq!(config.shutdown_grace, Duration::from_secs(2));
        assert_eq!(config.warmup_concurrency, 3);
        let a = &config.accounts["a"];
        assert_eq!(a.credentials.expose_client_secret(), "s\"\\");
        assert_eq!(a.credentials.username(), "yes");
        assert_eq!(a.credentials.expose_password(), "p: #x");
        let b = &config.accounts["b"];
        assert_eq!(b.credentials.expose_client_secret(), "1e3");
        assert_eq!(b.credentials.username(), "u@example.com");
        assert_eq!(b.credentials.expose_password(), "~");
    }

    #[test]
    fn every_store_key_reaches_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, pw, ca) = (
            dir.path().join("keys"),
            dir.path().join("pw"),
            dir.path().join("ca.pem"),
        );
        RedisStore::write_key_file(&keys, &["new", "old"]);
        std::fs::write(&pw, "redis-pw\n").unwrap();
        std::fs::write(&ca, crate::pki::Ca::new("ca").pem()).unwrap();
        let store = RedisStore::new("rediss://redis.example:6380/2", &keys)
            .username("broker")
            .password_file(&pw)
            .ca_file(&ca)
            .key_prefix("team-a")
            .timeout(Duration::from_millis(250))
            .lease(Duration::from_secs(5));
        let config = BrokerConfig::new()
            .store(store)
            .account(Account::standard("a"))
            .build();
        let r = config.store.unwrap().redis;
        assert_eq!(r.url.as_str(), "rediss://redis.example:6380/2");
        assert_eq!(r.username.as_deref(), Some("broker"));
        assert!(r.password.is_some() && r.ca_pem.is_some());
        assert_eq!(r.key_prefix, "team-a");
        assert_eq!(r.timeout, Duration::from_millis(250));
        assert_eq!(r.lease, Duration::from_secs(5));
        let ids: Vec<&str> = r.keys.iter().map(|k| k.id()).collect();
        assert_eq!(ids, ["new", "old"]);
    }
}
