//! Kubernetes service-account tokens: the signature against the issuer's keys, the checked
//! claims (`iss`, `aud`, `exp`/`nbf` with [`LEEWAY`]) and the service account they name;
//! tokens verified once are answered from the validator's cache (`cache`) until their deadline.

use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use serde::Deserialize;
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use super::{
    AuthError, Denied, JWKS_MAX_AGE, JWKS_TIMEOUT, MAX_FETCHES_PER_WINDOW, MAX_TOKEN_BYTES,
    REFETCH_WINDOW,
    cache::{Lookups, MAX_CACHED_TOKEN_BYTES, TOKEN_CACHE_CAPACITY, TokenCache, deadline},
    jwks::{FetchError, FetchState, Fetcher, Key, KeySet},
};
use crate::config::{FieldError, JwksSource, KubernetesConfig, ca_certificates, parse_jwks};

/// Checks Kubernetes service-account tokens against one issuer's keys.
pub(super) struct TokenValidator {
    pub(super) config: KubernetesConfig,
    /// The keys in hand; replaced whole by a fetch.
    keys: ArcSwap<KeySet>,
    /// `None` for a `jwks_file`.
    fetcher: Option<Fetcher>,
    /// Tokens verified under `keys`, by digest. Its lock is taken for one lookup or insert,
    /// never across an `.await`, and never while the fetch state's lock is held.
    cache: TokenCache,
}

impl TokenValidator {
    pub(super) fn new(config: KubernetesConfig) -> Result<Self, AuthError> {
        let (keys, fetcher) = match &config.jwks {
            JwksSource::File(file) => {
                let parsed = parse_jwks(&file.contents).map_err(|problem| {
                    AuthError::Jwks(FieldError::new("auth.kubernetes.jwks_file", problem))
                })?;
                let keys = KeySet::new(parsed, &config, None);
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
                    let cas = ca_certificates(&file.contents).map_err(|problem| {
                        AuthError::Jwks(FieldError::new("auth.kubernetes.ca_file", problem))
                    })?;
                    builder = builder.tls_certs_only(cas);
                }
                let client = builder.build().map_err(AuthError::HttpClient)?;
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
            cache: TokenCache::new(TOKEN_CACHE_CAPACITY),
        })
    }

    /// The service account of `token`: from the cache when the token was verified under the
    /// keys in hand and its deadline is still to come (a hit), else by verifying it (a miss,
    /// remembered when it succeeds). Counted in `lookups`.
    pub(super) async fn validate(
        self: &Arc<Self>,
        token: &str,
        lookups: &Lookups,
    ) -> Result<Arc<str>, Denied> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Denied::MALFORMED_TOKEN);
        }
        let cache_key = (token.len() <= MAX_CACHED_TOKEN_BYTES).then(|| self.cache.key(token));
        if let Some(cache_key) = &cache_key {
            // The guard is dropped before any `.await`.
            let keys = self.keys.load();
            if let Some(identity) = self.cache.get(cache_key, keys.generation, Instant::now()) {
                lookups.hit();
                // Hits skip `key`: keep the keys of a `jwks_url` fresh from here too.
                self.refresh_when_old(&keys);
                return Ok(identity);
            }
        }
        lookups.miss();
        let header = jsonwebtoken::decode_header(token).map_err(|_| Denied::MALFORMED_TOKEN)?;
        let key = self.key(header.kid.as_deref()).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation)
            .map_err(|e| rejection(e.kind()))?;
        let exp = data.claims.exp;
        let identity: Arc<str> = data.claims.identity()?.into();
        if let Some(cache_key) = cache_key
            && let Some(until) = deadline(exp, Instant::now(), SystemTime::now())
        {
            // Under the generation of the key that verified it: if the keys changed meanwhile,
            // the entry never answers.
            self.cache
                .insert(cache_key, identity.clone(), until, key.generation);
        }
        Ok(identity)
    }

    /// Verified tokens held in the cache.
    pub(super) fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// The key for `kid`, fetching the JWKS when there is none yet, when it is old (in the
    /// background) or when `kid` is unknown (within the limits).
    /// Starts a background fetch of the keys once `seen` (fetched from `jwks_url`) is older
    /// than [`JWKS_MAX_AGE`]; the keys in hand answer meanwhile.
    fn refresh_when_old(self: &Arc<Self>, seen: &Arc<KeySet>) {
        if seen
            .fetched_at
            .is_some_and(|at| at.elapsed() >= JWKS_MAX_AGE)
        {
            let _ = self.start_fetch(seen, None);
        }
    }

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
            Some(_) => self.refresh_when_old(&seen),
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
        let now = Instant::now();
        let current = self.keys.load_full();
        // `None`: the same document as the keys in hand.
        let fetched = fetcher.fetch().await.and_then(|body| {
            if current.document.as_deref() == Some(&body[..]) {
                return Ok(None);
            }
            let keys = parse_jwks(&body).map_err(FetchError::Document)?;
            Ok(Some(
                KeySet::new(keys, &self.config, Some(now)).with_document(body),
            ))
        });
        match fetched {
            Ok(None) => {
                // The same keys. Keeping their generation keeps the cache of verified tokens,
                // which a routine refresh (every `JWKS_MAX_AGE`) would otherwise empty,
                // making every caller's next call a signature check.
                debug!(url = %fetcher.url, "JWKS fetched, unchanged");
                self.keys.store(Arc::new(current.refetched(now)));
            }
            Ok(Some(keys)) => {
                info!(url = %fetcher.url, keys = keys.all.len(), "JWKS fetched");
                self.keys.store(Arc::new(keys));
                // Entries of the old keys would miss anyway (their generation); free them now.
                self.cache.clear();
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

/// The claims that name the caller (the checked ones are read by `jsonwebtoken`), and `exp`
/// for the cache's deadline.
#[derive(Deserialize)]
pub(super) struct Claims {
    /// Checked by `jsonwebtoken` (required, numeric); read here for the cache.
    #[serde(default)]
    exp: Option<f64>,
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
    pub(super) fn identity(self) -> Result<String, Denied> {
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
