//! The issuer's signing keys: fetching the JWKS from `jwks_url` (bounded, with a bearer token
//! read at each fetch) and the key set built from it. The document format itself is read by
//! [`crate::config`]'s JWKS parser (a `jwks_file` is read with the config).

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use jsonwebtoken::{DecodingKey, Validation};
use reqwest::Url;
use tokio::{sync::watch, time::Instant};

use super::{LEEWAY, MAX_JWKS_BYTES};
use crate::config::{KubernetesConfig, ParsedKey};

pub(super) struct Fetcher {
    pub(super) client: reqwest::Client,
    pub(super) url: Url,
    pub(super) bearer_token_file: Option<PathBuf>,
    /// Single flight and rate limits. Never held across an `.await`.
    pub(super) state: Mutex<FetchState>,
}

#[derive(Default)]
pub(super) struct FetchState {
    /// The fetch under way: its task sends `true` when the new keys are stored.
    pub(super) in_flight: Option<watch::Receiver<bool>>,
    /// Start times of the fetches in the last [`REFETCH_WINDOW`].
    pub(super) recent: VecDeque<Instant>,
    /// `kid`s that triggered a fetch in the last [`REFETCH_WINDOW`] (at most
    /// [`MAX_FETCHES_PER_WINDOW`] entries, as only a fetch adds one).
    pub(super) recent_kids: HashMap<String, Instant>,
}

/// One issuer's keys.
pub(super) struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    pub(super) all: Vec<Arc<Key>>,
    /// When they were fetched; `None`: never (the empty set of a `jwks_url` at start).
    pub(super) fetched_at: Option<Instant>,
    /// Unique to this set (in the process): the verified-token cache answers only for tokens
    /// verified under the set in use.
    pub(super) generation: u64,
    /// The document fetched from `jwks_url` (public keys only), to tell an unchanged one.
    pub(super) document: Option<Vec<u8>>,
}

/// A verification key with the checks that go with it.
pub(super) struct Key {
    pub(super) decoding: DecodingKey,
    pub(super) validation: Validation,
    /// The [`KeySet::generation`] of the set it belongs to.
    pub(super) generation: u64,
}

/// The last [`KeySet::generation`] handed out.
static GENERATION: AtomicU64 = AtomicU64::new(0);

impl KeySet {
    pub(super) fn empty() -> Self {
        Self {
            by_kid: HashMap::new(),
            all: Vec::new(),
            fetched_at: None,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed) + 1,
            document: None,
        }
    }

    /// These keys, fetched again at `fetched_at` from the same document: the same generation.
    pub(super) fn refetched(&self, fetched_at: Instant) -> Self {
        Self {
            by_kid: self.by_kid.clone(),
            all: self.all.clone(),
            fetched_at: Some(fetched_at),
            generation: self.generation,
            document: self.document.clone(),
        }
    }

    /// Records the document these keys came from.
    pub(super) fn with_document(mut self, document: Vec<u8>) -> Self {
        self.document = Some(document);
        self
    }

    pub(super) fn new(
        keys: Vec<ParsedKey>,
        config: &KubernetesConfig,
        fetched_at: Option<Instant>,
    ) -> Self {
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
                generation: set.generation,
            });
            if let Some(kid) = parsed.kid {
                set.by_kid.entry(kid).or_insert_with(|| key.clone());
            }
            set.all.push(key);
        }
        set
    }

    /// The key named `kid`; a token without `kid` uses the only key, if there is just one.
    pub(super) fn find(&self, kid: Option<&str>) -> Option<Arc<Key>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned(),
            None if self.all.len() == 1 => self.all.first().cloned(),
            None => None,
        }
    }
}

/// Why a JWKS fetch brought no keys (logged; the keys in hand stay).
#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    /// The bearer token file could not be read.
    #[error("cannot read auth.kubernetes.bearer_token_file {}: {source}", path.display())]
    BearerToken {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No answer (with the cause chain, never a token).
    #[error("{0}")]
    Transport(String),
    /// An answer other than 2xx.
    #[error("answered HTTP {0}")]
    Status(reqwest::StatusCode),
    /// An answer past [`MAX_JWKS_BYTES`].
    #[error("answer larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    /// An answer that is not a usable JWKS document.
    #[error("{0}")]
    Document(String),
}

impl Fetcher {
    pub(super) async fn fetch(&self) -> Result<Vec<u8>, FetchError> {
        let mut request = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(path) = &self.bearer_token_file {
            // Read at each fetch (the kubelet rotates it), bounded like every file the config
            // names; off the runtime's threads, as tokio's own file reads are.
            let file = path.clone();
            let token = tokio::task::spawn_blocking(move || crate::config::read_file(&file))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .and_then(|bytes| String::from_utf8(bytes).map_err(std::io::Error::other))
                .map_err(|source| FetchError::BearerToken {
                    path: path.clone(),
                    source,
                })?;
            request = request.bearer_auth(token.trim());
        }
        let transport = |e: reqwest::Error| FetchError::Transport(error_chain(&e));
        let mut response = request.send().await.map_err(transport)?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
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
