//! Who is calling, and may they have this account's token?
//!
//! A caller is known by its verified client certificate (the leaf's URI SAN, else its first
//! DNS SAN: [`peer_identity`]) or, failing that, by a Kubernetes service-account token sent
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
//! A request only `load()`s `ArcSwap`s (allow list, validator, key set) and clones the `Arc`
//! it needs out of the guard before any `.await`. The fetch bookkeeping sits in a std `Mutex`
//! held for a few instructions, never across an `.await`.
//!
//! A token is never logged, put into an error or kept after the check; a token that verified is
//! remembered by its SHA-256 digest only (see `cache`).
//!
//! # Cost per call
//!
//! A client certificate's identity is read once per connection, at the TLS handshake
//! ([`TlsConnInfo::identity`](crate::tls::TlsConnInfo::identity)), and handed to
//! [`Authorizer::admit`]. A service-account token is verified once, then answered from the
//! validator's cache of verified tokens (bounded, until the token's `exp` and at most
//! [`TOKEN_CACHE_TTL`], only under the keys that verified it): a digest and a lookup per call.
//! The allow list is applied at every call.
//!
//! # Rooms
//!
//! - this file: [`Authorizer`] and the admission of a request ([`Authorizer::admit`]);
//! - `allow`: the allow list;
//! - `jwt`: service-account token checks;
//! - `cache`: verified tokens, by digest;
//! - `jwks`: the issuer's keys, fetched or read.
//!
//! The `auth` section's schema lives in [`crate::config`].

mod allow;
mod cache;
mod jwks;
mod jwt;

use std::{fmt, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tracing::warn;

pub use self::cache::{MAX_CACHED_TOKEN_BYTES, TOKEN_CACHE_CAPACITY, TOKEN_CACHE_TTL};
use self::{allow::AllowList, cache::Lookups, jwt::TokenValidator};
use crate::{
    config::{AuthConfig, FieldError},
    counts::Counts,
    tls::peer_identity,
    token::MAX_ACCOUNT_NAME_LEN,
};

/// Clock skew allowed on `exp` and `nbf`.
pub(crate) const LEEWAY: Duration = Duration::from_secs(30);
/// Keys fetched from `jwks_url` are refreshed (in the background) once this old.
pub(crate) const JWKS_MAX_AGE: Duration = Duration::from_secs(300);
/// The window of the JWKS fetch limits: one fetch per unknown `kid`, and
/// [`MAX_FETCHES_PER_WINDOW`] in all.
pub(crate) const REFETCH_WINDOW: Duration = Duration::from_secs(30);
/// JWKS fetches allowed in any [`REFETCH_WINDOW`], whatever triggers them.
pub(crate) const MAX_FETCHES_PER_WINDOW: usize = 3;
/// Budget of one JWKS fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// A bearer token longer than this is refused unparsed.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why an `auth` section cannot be put to use.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A key source of `auth.kubernetes` holds nothing usable.
    #[error(transparent)]
    Jwks(FieldError),
    /// The HTTP client for `auth.kubernetes.jwks_url` cannot be built (its CA certificates).
    #[error("auth.kubernetes.jwks_url: HTTP client: {0}")]
    HttpClient(reqwest::Error),
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

/// Authenticates callers and applies the allow list. Cheap to clone; a reload swaps the config
/// for every clone.
#[derive(Clone)]
pub struct Authorizer {
    state: Arc<ArcSwap<State>>,
    /// Calls refused, by [`Denied::reason`] (across reloads).
    denials: Arc<Counts<&'static str>>,
    /// Service-account tokens answered from the cache or verified (across reloads).
    token_cache: Arc<Lookups>,
}

/// How service-account tokens were checked so far ([`Authorizer::token_cache_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCacheCounts {
    /// Answered from the cache of verified tokens.
    pub hits: u64,
    /// Verified (the token was not in the cache, or its entry no longer answered).
    pub misses: u64,
}

struct State {
    allow: AllowList,
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

/// An `auth` section read and checked by [`Authorizer::prepare`], not yet in use.
#[must_use = "nothing changes until it is committed"]
pub struct PreparedAuth {
    authorizer: Authorizer,
    state: State,
}

impl fmt::Debug for PreparedAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedAuth")
            .field("callers", &self.state.allow.len())
            .finish_non_exhaustive()
    }
}

impl PreparedAuth {
    /// Puts the new allow list and key source in use, for every clone of the authorizer.
    pub fn commit(self) {
        self.authorizer.state.store(Arc::new(self.state));
    }
}

impl Authorizer {
    /// Builds an authorizer for `config`. Keys from `jwks_url` are fetched on first use.
    pub fn new(config: AuthConfig) -> Result<Self, AuthError> {
        let state = State::new(config, None)?;
        Ok(Self {
            state: Arc::new(ArcSwap::from_pointee(state)),
            denials: Arc::default(),
            token_cache: Arc::default(),
        })
    }

    /// Prepares a new allow list and key source without putting them in use:
    /// [`PreparedAuth::commit`] does. An unchanged `auth.kubernetes` (for a `jwks_file`: the
    /// same contents) keeps its keys (fetched from a `jwks_url` or not) and its cache of
    /// verified tokens; a changed one starts afresh, a `jwks_file` taken as `config` read it.
    pub fn prepare(&self, config: AuthConfig) -> Result<PreparedAuth, AuthError> {
        let current = self.state.load_full();
        Ok(PreparedAuth {
            authorizer: self.clone(),
            state: State::new(config, current.kubernetes.as_ref())?,
        })
    }

    /// [`Authorizer::prepare`] and commit at once. On error nothing changes.
    pub fn reload(&self, config: AuthConfig) -> Result<(), AuthError> {
        self.prepare(config)?.commit();
        Ok(())
    }

    /// Admits a call of `rpc`: its caller's identity and, with `account`, the caller's right to
    /// that account (the allow list in use now). The identity is `peer_identity`, the one of
    /// the connection's verified client certificate
    /// ([`TlsConnInfo::identity`](crate::TlsConnInfo::identity), read at the handshake), else
    /// the service account of a valid token in `authorization` (as in
    /// [`Authorizer::authenticate`]). A denial is logged (with the caller, when known, and the
    /// account cut to the longest account name) and counted by reason.
    pub async fn admit(
        &self,
        rpc: &'static str,
        authorization: Option<&str>,
        peer_identity: Option<&Arc<str>>,
        account: Option<&str>,
    ) -> Result<Arc<str>, Denied> {
        let identity = match peer_identity {
            Some(identity) => Ok(identity.clone()),
            None => self.authenticate_token(authorization).await,
        };
        let (caller, denied) = match identity {
            Err(denied) => (None, denied),
            Ok(identity) => match account {
                Some(account) if !self.authorize(&identity, account) => {
                    (Some(identity), Denied::PermissionDenied)
                }
                _ => return Ok(identity),
            },
        };
        let account: Option<String> =
            account.map(|a| a.chars().take(MAX_ACCOUNT_NAME_LEN).collect());
        warn!(
            rpc,
            caller = caller.as_deref(),
            ?account,
            reason = denied.reason(),
            "call denied"
        );
        self.denials.inc(denied.reason());
        Err(denied)
    }

    /// The caller's identity: the URI (else DNS) SAN of a verified client certificate, else
    /// the service account of a valid Kubernetes token in `authorization` (the value of the
    /// `authorization` metadata, `Bearer <jwt>`).
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<String, Denied> {
        if let Some(identity) = peer_certs.and_then(peer_identity) {
            return Ok(identity);
        }
        self.authenticate_token(authorization)
            .await
            .map(|identity| identity.to_string())
    }

    /// The service account of a valid Kubernetes token in `authorization`.
    async fn authenticate_token(&self, authorization: Option<&str>) -> Result<Arc<str>, Denied> {
        let Some(value) = authorization else {
            return Err(Denied::NO_IDENTITY);
        };
        let token = bearer_token(value).ok_or(Denied::MALFORMED_TOKEN)?;
        // Clone the validator out of the guard: no guard is held across the await.
        let validator = self.state.load().kubernetes.clone();
        match validator {
            Some(validator) => validator.validate(token, &self.token_cache).await,
            None => Err(Denied::NO_IDENTITY),
        }
    }

    /// Whether `identity` may fetch `account`'s token (the allow list in use now).
    pub fn authorize(&self, identity: &str, account: &str) -> bool {
        self.state.load().allow.permits(identity, account)
    }

    /// Calls refused so far, by reason.
    pub fn denials(&self) -> Vec<(&'static str, u64)> {
        self.denials.snapshot()
    }

    /// Service-account tokens answered from the cache of verified tokens, and verified, so far
    /// (across reloads).
    pub fn token_cache_counts(&self) -> TokenCacheCounts {
        let (hits, misses) = self.token_cache.get();
        TokenCacheCounts { hits, misses }
    }

    /// Verified tokens held in the cache now (at most [`TOKEN_CACHE_CAPACITY`]; 0 without
    /// `auth.kubernetes`).
    pub fn cached_tokens(&self) -> usize {
        self.state
            .load()
            .kubernetes
            .as_ref()
            .map_or(0, |validator| validator.cached_tokens())
    }
}

impl State {
    fn new(config: AuthConfig, current: Option<&Arc<TokenValidator>>) -> Result<Self, AuthError> {
        let kubernetes = match (config.kubernetes, current) {
            // The same issuer, audience and key source (a `jwks_file` with the same contents):
            // the same keys, and the tokens verified under them stay verified.
            (Some(new), Some(current)) if new == current.config => Some(current.clone()),
            (Some(new), _) => Some(Arc::new(TokenValidator::new(new)?)),
            (None, _) => None,
        };
        Ok(Self {
            allow: AllowList::new(config.allow),
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

#[cfg(test)]
mod tests {
    use super::{jwt::Claims, *};
    use crate::config::{AllowedAccounts, RawAuth};

    fn parse(yaml: &str) -> AuthConfig {
        let raw: RawAuth = crate::config::from_yaml(yaml).unwrap();
        raw.validate().unwrap()
    }

    #[test]
    fn allow_list_merges_and_wildcards() {
        let c = parse(
            "allow:\n  - caller: a\n    accounts: [x, y]\n  - caller: a\n    accounts: [z]\n  - caller: b\n    accounts: [x, '*']\n  - caller: b\n    accounts: [y]\n",
        );
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
        let auth = Authorizer::new(parse("allow: []")).unwrap();
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
