//! The `auth` section: who may call, and how Kubernetes service-account tokens are checked
//! (issuer, audience, where the signing keys come from). The JWKS document format lives here
//! too: the config reads a `jwks_file` with it, and the runtime reads what `jwks_url` serves.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
};
use reqwest::Url;
use serde::Deserialize;

use super::FieldError;
use crate::token::AccountName;

/// The audience a token must name when `auth.kubernetes.audience` is not set.
pub const DEFAULT_AUDIENCE: &str = "bace-token-broker";

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
    pub fn validate(self) -> Result<AuthConfig, FieldError> {
        let kubernetes = self.kubernetes.map(RawKubernetes::validate).transpose()?;
        let mut allow: BTreeMap<String, AllowedAccounts> = BTreeMap::new();
        for (i, rule) in self.allow.into_iter().enumerate() {
            let caller = rule.caller.trim();
            if caller.is_empty() {
                return Err(FieldError::new(
                    format!("auth.allow[{i}].caller"),
                    "must not be empty",
                ));
            }
            if rule.accounts.is_empty() {
                return Err(FieldError::new(
                    format!("auth.allow[{i}].accounts"),
                    "list at least one account, or \"*\" for all",
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
                    FieldError::new(
                        format!("auth.allow[{i}].accounts"),
                        format!("{account:?}: {e} (or \"*\" for all)"),
                    )
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
    fn validate(self) -> Result<KubernetesConfig, FieldError> {
        let err = |field: &str, problem: String| {
            FieldError::new(format!("auth.kubernetes.{field}"), problem)
        };
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

pub(super) fn read(path: PathBuf) -> Result<LoadedFile, String> {
    match super::read_file(&path) {
        Ok(contents) => Ok(LoadedFile { path, contents }),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

pub(crate) fn ca_certificates(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

// === JWKS documents ===

/// A usable key of a JWKS document.
pub(crate) struct ParsedKey {
    pub(crate) kid: Option<String>,
    pub(crate) decoding: DecodingKey,
    pub(crate) algorithms: Vec<Algorithm>,
}

/// Parses a JWKS document, keeping the keys usable for signatures (RSA, EC P-256/P-384,
/// Ed25519) and skipping the others. No usable key at all is an error.
pub(crate) fn parse_jwks(body: &[u8]) -> Result<Vec<ParsedKey>, String> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    // The position only: serde's message would quote a string of the document, and a JWKS
    // put in the wrong place may hold an HMAC or private key.
    let document: Document = serde_json::from_slice(body).map_err(|e| {
        let problem = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => "invalid JSON",
            serde_json::error::Category::Eof => "JSON ends early",
            serde_json::error::Category::Data => "expected {\"keys\": [...]}",
        };
        format!(
            "not a JWKS document: {problem} at line {} column {}",
            e.line(),
            e.column()
        )
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AuthConfig, String> {
        let raw: RawAuth = crate::config::from_yaml(yaml)?;
        raw.validate().map_err(|e| e.to_string())
    }

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","use":"sig",
        "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        {"kty":"oct","k":"c2VjcmV0","kid":"hmac"}]}"#;

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
}
