//! The `store` section: where replicas share their tokens (Redis or Valkey), and the keys
//! that encrypt what they write there. Validation reads the password, CA and key files, so a
//! missing or malformed one stops the start (and `check-config`) with an error naming the
//! field; the runtime (`crate::store`) connects with what is validated here.
//!
//! `store` absent: tokens live in memory only (one replica). `store` cannot change on a live
//! reload: a changed section (or a changed password, CA or key file) is reported as a
//! restart-only change and the running store stays.
//!
//! # Key file
//!
//! `encryption_key_file` holds one key per line, `<key-id> <base64 of 32 random bytes>`
//! (`bace-token-broker gen-store-key` prints one). The first key encrypts every write; every key
//! decrypts. Blank lines and lines starting with `#` are skipped. Key ids are 1 to
//! [`MAX_KEY_ID_LEN`] ASCII letters, digits, `.`, `_` or `-`, and unique in the file. Errors name
//! the line number, never its content.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::Deserialize;

use super::{FieldError, schema::duration};

/// Default `store.redis.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "bace-broker";
/// Default `store.redis.timeout`: the budget of each Redis operation.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default `store.redis.lease`: how long a replica holds an account's fetch lease unrenewed.
pub const DEFAULT_STORE_LEASE: Duration = Duration::from_secs(30);
/// Longest key id in a key file, in bytes.
pub const MAX_KEY_ID_LEN: usize = 64;
/// Longest key prefix, in bytes.
const MAX_KEY_PREFIX_LEN: usize = 128;
/// Bytes of an encryption key (AES-256).
pub const STORE_KEY_LEN: usize = 32;

/// The `store` section as written in the YAML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// The Redis (or Valkey) server.
    pub redis: RawRedis,
}

/// `store.redis` as written in the YAML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// `redis://host:port/db` or `rediss://` for TLS; no user or password in it.
    pub url: String,
    /// ACL user name, if any.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password, if any.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA certificates the server's certificate chains to (`rediss://` only).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Prefix of every key the broker writes.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// The key file (see the module documentation). Required.
    pub encryption_key_file: Option<PathBuf>,
    /// Budget of each Redis operation, connecting included.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Lease of an account's fetch, renewed while the fetch runs.
    #[serde(default = "default_lease", deserialize_with = "duration")]
    pub lease: Duration,
}

fn default_prefix() -> String {
    DEFAULT_KEY_PREFIX.into()
}
fn default_timeout() -> Duration {
    DEFAULT_STORE_TIMEOUT
}
fn default_lease() -> Duration {
    DEFAULT_STORE_LEASE
}

/// A validated `store` section.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// The Redis (or Valkey) server and how the broker uses it.
    pub redis: RedisConfig,
}

/// A validated `store.redis`: the URL is usable, and the files were read.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://` or `rediss://`, with host, port and database; never a password.
    pub url: Url,
    /// ACL user name, if any.
    pub username: Option<String>,
    /// The password read from `password_file`, if any.
    pub password: Option<SecretString>,
    /// The file the password came from.
    pub password_file: Option<PathBuf>,
    /// The CA file, if any (`rediss://` only).
    pub ca_file: Option<PathBuf>,
    /// The PEM certificates read from `ca_file`.
    pub ca_pem: Option<Vec<u8>>,
    /// Prefix of every key the broker writes (`{key_prefix}:...`).
    pub key_prefix: String,
    /// The key file.
    pub encryption_key_file: PathBuf,
    /// The keys read from it, the encrypting one first.
    pub keys: StoreKeys,
    /// Budget of each Redis operation, connecting included.
    pub timeout: Duration,
    /// Lease of an account's fetch.
    pub lease: Duration,
}

impl RedisConfig {
    /// Whether the connection uses TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        self.url.scheme() == "rediss"
    }

    /// The files this section reads (watched for live reload, which reports their change as
    /// needing a restart).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.password_file
            .iter()
            .chain(&self.ca_file)
            .chain([&self.encryption_key_file])
            .map(PathBuf::as_path)
    }
}

impl PartialEq for RedisConfig {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self, other);
        let password = match (&a.password, &b.password) {
            (Some(x), Some(y)) => x.expose_secret() == y.expose_secret(),
            (None, None) => true,
            _ => false,
        };
        a.url == b.url
            && a.username == b.username
            && password
            && a.password_file == b.password_file
            && a.ca_file == b.ca_file
            && a.ca_pem == b.ca_pem
            && a.key_prefix == b.key_prefix
            && a.encryption_key_file == b.encryption_key_file
            && a.keys == b.keys
            && a.timeout == b.timeout
            && a.lease == b.lease
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_str())
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("key_prefix", &self.key_prefix)
            .field("encryption_key_file", &self.encryption_key_file)
            .field("keys", &self.keys)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl RawStore {
    /// Validates the section, reading its files. The error names the field
    /// (`store.redis.url`, `store.redis.encryption_key_file`...).
    pub fn validate(self) -> Result<StoreConfig, FieldError> {
        Ok(StoreConfig {
            redis: self.redis.validate()?,
        })
    }
}

impl RawRedis {
    fn validate(self) -> Result<RedisConfig, FieldError> {
        let url = parse_redis_url(&self.url)?;
        let username = match self.username {
            Some(u) if u.trim().is_empty() => {
                return Err(FieldError::new(
                    "store.redis.username",
                    "must not be empty (leave it out for the default user)",
                ));
            }
            Some(u) if u.chars().any(char::is_whitespace) => {
                return Err(FieldError::new(
                    "store.redis.username",
                    "must not contain whitespace",
                ));
            }
            other => other,
        };
        let password = match &self.password_file {
            Some(path) => Some(read_password(path)?),
            None => None,
        };
        let ca_pem = match &self.ca_file {
            Some(path) if url.scheme() != "rediss" => {
                return Err(FieldError::new(
                    "store.redis.ca_file",
                    format!("{} is only used with a rediss:// URL (TLS)", path.display()),
                ));
            }
            Some(path) => Some(read_ca(path)?),
            None => None,
        };
        let prefix = &self.key_prefix;
        if prefix.is_empty()
            || prefix.len() > MAX_KEY_PREFIX_LEN
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'{' | b'}' | b'*' | b'?' | b'['))
        {
            return Err(FieldError::new(
                "store.redis.key_prefix",
                format!(
                    "must be 1 to {MAX_KEY_PREFIX_LEN} printable ASCII characters without \
                     whitespace, braces or glob characters (*?[), got {prefix:?}"
                ),
            ));
        }
        let Some(key_file) = self.encryption_key_file else {
            return Err(FieldError::new(
                "store.redis.encryption_key_file",
                "is required (generate a key with `bace-token-broker gen-store-key`)",
            ));
        };
        let keys = StoreKeys::load(&key_file)?;
        if self.timeout.is_zero() {
            return Err(FieldError::new(
                "store.redis.timeout",
                "must be more than 0s",
            ));
        }
        if self.lease < Duration::from_secs(1) || self.lease < self.timeout * 3 {
            return Err(FieldError::new(
                "store.redis.lease",
                "must be at least 1s and at least three times store.redis.timeout (it is \
                 renewed at a third of its life, each renewal taking up to the timeout)",
            ));
        }
        Ok(RedisConfig {
            url,
            username,
            password,
            password_file: self.password_file,
            ca_file: self.ca_file,
            ca_pem,
            key_prefix: self.key_prefix,
            encryption_key_file: key_file,
            keys,
            timeout: self.timeout,
            lease: self.lease,
        })
    }
}

/// Parses `store.redis.url`. Never echoes a URL that may hold a password.
fn parse_redis_url(text: &str) -> Result<Url, FieldError> {
    const FIELD: &str = "store.redis.url";
    // The parser's message never quotes its input; the input itself is not shown, since an
    // unparsable URL may still carry a password.
    let url =
        Url::parse(text).map_err(|e| FieldError::new(FIELD, format!("is not a valid URL: {e}")))?;
    if url.password().is_some() {
        return Err(FieldError::new(
            FIELD,
            "holds a password: put it in a file named by store.redis.password_file (the URL is \
             not shown here)",
        ));
    }
    if !url.username().is_empty() {
        return Err(FieldError::new(
            FIELD,
            format!(
                "holds a user name ({:?}): set it as store.redis.username",
                url.username()
            ),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        // Not shown: a query may carry a password.
        return Err(FieldError::new(
            FIELD,
            "has a query or fragment (the URL is not shown here); use the store.redis keys for \
             settings",
        ));
    }
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(FieldError::new(
            FIELD,
            format!(
                "{text:?} must start with redis:// or rediss:// (TLS); unix sockets and other \
                 schemes are not supported"
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FieldError::new(FIELD, format!("{text:?} has no host")));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err(FieldError::new(
            FIELD,
            format!("{text:?}: the path must be a database number such as /0"),
        ));
    }
    Ok(url)
}

fn read_password(path: &Path) -> Result<SecretString, FieldError> {
    const FIELD: &str = "store.redis.password_file";
    let bytes = super::read_file(path)
        .map_err(|e| FieldError::new(FIELD, format!("cannot read {}: {e}", path.display())))?;
    let mut text = String::from_utf8(bytes)
        .map_err(|_| FieldError::new(FIELD, format!("{} is not UTF-8 text", path.display())))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(FieldError::new(
            FIELD,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(SecretString::from(text))
}

fn read_ca(path: &Path) -> Result<Vec<u8>, FieldError> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    const FIELD: &str = "store.redis.ca_file";
    let pem = super::read_file(path)
        .map_err(|e| FieldError::new(FIELD, format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FieldError::new(FIELD, format!("{} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(FieldError::new(
            FIELD,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(pem)
}

// === Keys ===

/// The encryption keys of the store, the encrypting one first; every one decrypts.
#[derive(Clone, PartialEq)]
pub struct StoreKeys(Vec<StoreKey>);

/// One encryption key and its id.
#[derive(Clone)]
pub struct StoreKey {
    id: String,
    material: std::sync::Arc<SecretBox<[u8; STORE_KEY_LEN]>>,
}

impl StoreKey {
    /// The key's id (written beside every record it encrypts).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The 32 key bytes. Secret: never log them.
    pub fn expose(&self) -> &[u8; STORE_KEY_LEN] {
        self.material.expose_secret()
    }
}

impl PartialEq for StoreKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.expose() == other.expose()
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({:?})", self.id)
    }
}

impl fmt::Debug for StoreKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

/// Why a key file or key id is unusable. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The file holds no key.
    #[error("holds no key (one line per key: `<key-id> <base64 of 32 bytes>`)")]
    Empty,
    /// A line is not `<key-id> <base64>`.
    #[error("line {line}: expected `<key-id> <base64 of 32 bytes>` separated by one space")]
    Shape {
        /// 1-based line number.
        line: usize,
    },
    /// A key id breaks the naming rule.
    #[error("line {line}: {problem}")]
    BadId {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: KeyIdError,
    },
    /// A key is not base64 of exactly 32 bytes.
    #[error("line {line}: the key is not standard base64 of exactly 32 bytes")]
    BadKey {
        /// 1-based line number.
        line: usize,
    },
    /// Two lines use one id.
    #[error("line {line}: key id {id:?} is already used on line {first}")]
    DuplicateId {
        /// 1-based line number of the second use.
        line: usize,
        /// 1-based line number of the first use.
        first: usize,
        /// The id.
        id: String,
    },
}

/// Why a string is not a key id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyIdError {
    /// Empty.
    #[error("key id is empty")]
    Empty,
    /// Longer than [`MAX_KEY_ID_LEN`].
    #[error("key id is longer than {MAX_KEY_ID_LEN} bytes")]
    TooLong,
    /// A character outside `[A-Za-z0-9._-]`.
    #[error("key id may only hold ASCII letters, digits, '.', '_' and '-'")]
    BadCharacter,
}

/// Checks a key id: 1 to [`MAX_KEY_ID_LEN`] ASCII letters, digits, `.`, `_` or `-`.
pub fn validate_key_id(id: &str) -> Result<(), KeyIdError> {
    if id.is_empty() {
        return Err(KeyIdError::Empty);
    }
    if id.len() > MAX_KEY_ID_LEN {
        return Err(KeyIdError::TooLong);
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(KeyIdError::BadCharacter);
    }
    Ok(())
}

impl StoreKeys {
    /// Reads and parses a key file; the error names `store.redis.encryption_key_file`, the
    /// file and the line.
    pub fn load(path: &Path) -> Result<Self, FieldError> {
        const FIELD: &str = "store.redis.encryption_key_file";
        let text = super::read_file(path)
            .map_err(|e| FieldError::new(FIELD, format!("cannot read {}: {e}", path.display())))?;
        // Not `read_to_string`: its error would not say where, and the text is secret.
        let text = secrecy::zeroize::Zeroizing::new(text);
        let text = std::str::from_utf8(&text)
            .map_err(|_| FieldError::new(FIELD, format!("{} is not UTF-8 text", path.display())))?;
        Self::parse(text).map_err(|e| FieldError::new(FIELD, format!("{}: {e}", path.display())))
    }

    /// Parses the text of a key file.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let mut keys: Vec<(usize, StoreKey)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let mut parts = trimmed.split([' ', '\t']).filter(|p| !p.is_empty());
            let (Some(id), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(KeyFileError::Shape { line });
            };
            validate_key_id(id).map_err(|problem| KeyFileError::BadId { line, problem })?;
            if let Some((first, _)) = keys.iter().find(|(_, k)| k.id == id) {
                return Err(KeyFileError::DuplicateId {
                    line,
                    first: *first,
                    id: id.to_owned(),
                });
            }
            let decoded = secrecy::zeroize::Zeroizing::new(
                BASE64
                    .decode(key)
                    .map_err(|_| KeyFileError::BadKey { line })?,
            );
            let material: [u8; STORE_KEY_LEN] = decoded
                .as_slice()
                .try_into()
                .map_err(|_| KeyFileError::BadKey { line })?;
            keys.push((
                line,
                StoreKey {
                    id: id.to_owned(),
                    material: std::sync::Arc::new(SecretBox::new(Box::new(material))),
                },
            ));
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty);
        }
        Ok(Self(keys.into_iter().map(|(_, k)| k).collect()))
    }

    /// The key that encrypts (the file's first).
    pub fn encrypting(&self) -> &StoreKey {
        &self.0[0]
    }

    /// Every key, the encrypting one first.
    pub fn iter(&self) -> impl Iterator<Item = &StoreKey> {
        self.0.iter()
    }
}

/// A new key-file line, `<id> <base64 of 32 random bytes>` (no newline), from the operating
/// system's random source. `id` is checked against the key-id rule.
pub fn generate_key_line(id: &str) -> Result<String, KeyIdError> {
    validate_key_id(id)?;
    let mut key = secrecy::zeroize::Zeroizing::new([0u8; STORE_KEY_LEN]);
    rand::fill(&mut key[..]);
    Ok(format!("{id} {}", BASE64.encode(&key[..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn key_files() {
        let keys =
            StoreKeys::parse(&format!("# rotated 2026-12\nnew {KEY_A}\n\nold\t{KEY_A}\n")).unwrap();
        let ids: Vec<&str> = keys.iter().map(StoreKey::id).collect();
        assert_eq!(ids, ["new", "old"]);
        assert_eq!(keys.encrypting().id(), "new");
        assert_eq!(keys.encrypting().expose()[31], 31);
        let shown = format!("{keys:?}");
        assert!(!shown.contains(KEY_A) && shown.contains("new"), "{shown}");
    }

    #[test]
    fn key_file_errors_name_the_line_and_never_the_key() {
        let secretish = "c2VjcmV0LWtleS1tYXRlcmlhbC1TRUNSRVQtMTIzNA==";
        let cases: &[(String, KeyFileError)] = &[
            (String::new(), KeyFileError::Empty),
            ("# only a comment\n\n".into(), KeyFileError::Empty),
            (
                format!("k1 {KEY_A}\n{secretish}\n"),
                KeyFileError::Shape { line: 2 },
            ),
            (
                format!("k1 {KEY_A} extra-{secretish}"),
                KeyFileError::Shape { line: 1 },
            ),
            (format!("k1 {secretish}"), KeyFileError::BadKey { line: 1 }),
            (
                "k1 not*base64*SECRET".into(),
                KeyFileError::BadKey { line: 1 },
            ),
            (
                format!("k/1 {KEY_A}"),
                KeyFileError::BadId {
                    line: 1,
                    problem: KeyIdError::BadCharacter,
                },
            ),
            (
                format!("k1 {KEY_A}\n\nk1 {KEY_A}"),
                KeyFileError::DuplicateId {
                    line: 3,
                    first: 1,
                    id: "k1".into(),
                },
            ),
        ];
        for (text, want) in cases {
            let got = StoreKeys::parse(text).unwrap_err();
            assert_eq!(&got, want, "{text:?}");
            let shown = got.to_string();
            assert!(
                !shown.contains("SECRET") && !shown.contains(KEY_A) && !shown.contains(secretish),
                "{shown}"
            );
        }
    }

    #[test]
    fn generated_lines_parse_and_differ() {
        let a = generate_key_line("k-2026.12_01").unwrap();
        let b = generate_key_line("k-2026.12_01").unwrap();
        assert_ne!(a, b);
        let keys = StoreKeys::parse(&a).unwrap();
        assert_eq!(keys.encrypting().id(), "k-2026.12_01");
        assert_eq!(generate_key_line("a b"), Err(KeyIdError::BadCharacter));
        assert_eq!(generate_key_line(""), Err(KeyIdError::Empty));
        assert_eq!(generate_key_line(&"x".repeat(65)), Err(KeyIdError::TooLong));
    }

    #[test]
    fn urls() {
        for ok in [
            "redis://redis-master:6379/0",
            "rediss://redis.example:6380",
            "redis://[::1]:6379/15",
        ] {
            parse_redis_url(ok).unwrap();
        }
        let cases = [
            ("redis://:hunter2-SECRET@host:6379", "holds a password"),
            ("redis://user:hunter2-SECRET@host:6379", "holds a password"),
            ("redis://user@host:6379", "store.redis.username"),
            ("http://host:6379", "redis:// or rediss://"),
            ("unix:///tmp/redis.sock", "redis:// or rediss://"),
            ("redis://host:6379/zero", "database number"),
            ("redis://host:6379/0?password=x", "query"),
            ("redis host SECRET", "not a valid URL"),
        ];
        for (url, want) in cases {
            let msg = parse_redis_url(url).unwrap_err().to_string();
            assert!(msg.starts_with("store.redis.url: "), "{msg}");
            assert!(msg.contains(want), "{url}: {msg}");
            assert!(!msg.contains("SECRET"), "{url}: {msg}");
        }
    }
}
