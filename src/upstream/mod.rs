//! The broker's side of BACE: the [`Upstream`] trait the broker core calls, the answers and
//! errors it gets back, and the one implementation that speaks HTTP ([`HttpUpstream`]).
//!
//! - `http`: the reqwest client (rustls): the password and refresh grants of
//!   `POST /oauth2/token` and the token check at `upstream.verify_url`.
//! - `parse`: every answer shape BACE (or a standard OAuth2 server) gives, and BACE's
//!   `expires` text; pure functions, never a panic whatever the bytes.
//!
//! The broker sees only the trait, so its tests script answers without sockets and run in
//! paused time.

mod http;
mod parse;

use std::{future::Future, pin::Pin, time::SystemTime};

use reqwest::Url;
use secrecy::SecretString;
use tokio::time::Duration;

pub use bace_wire::Grant;

#[cfg(feature = "fuzzing")]
pub(crate) use self::parse::parse_bace_expires;
pub use self::{http::HttpUpstream, parse::parse_answer};
use crate::{config::AccountConfig, token::Token};

/// Largest answer body read from BACE; a token answer is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A boxed, sendable future (keeps [`Upstream`] object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A request the broker makes to BACE: a grant of the token endpoint, or a token check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Call {
    /// `POST` to the token endpoint with this grant.
    Grant(Grant),
    /// `GET upstream.verify_url` with the token: does BACE accept it?
    Verify,
}

impl Call {
    /// The `grant` label of metrics: the `grant_type` value, or `verify`.
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Grant(grant) => grant.as_str(),
            Call::Verify => "verify",
        }
    }
}

/// A successful answer of the token endpoint.
pub enum Issued {
    /// A (new) access token, as the password grant and standard OAuth2 refreshes answer.
    Token {
        /// The access token.
        access: SecretString,
        /// The refresh token, if the answer carried one.
        refresh: Option<SecretString>,
        /// `expires_in`, if the answer carried a readable one.
        lifetime: Option<Duration>,
    },
    /// BACE's refresh answer `{"refreshed": true, "expires": "..."}`: the token used for the
    /// call stays and is valid until `expires` (`None` when absent or unreadable).
    Extended {
        /// The new expiry, parsed in the configured zone.
        expires: Option<SystemTime>,
    },
}

/// The longest `Retry-After` the broker honours (a longer one is taken as this): a wrong header
/// must not stop an account for days. While a token is still good, its refresh is retried in
/// time whatever the header says.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Why an upstream exchange failed. `Display` is short and never holds a secret; the error
/// text BACE sent, if any, is kept apart in [`UpstreamError::Rejected`] for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// A 4xx answer (other than 408 and 429), or a refresh BACE declined.
    #[error("rejected by BACE (HTTP {status}{})", detail(.error))]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The error code and description from the body, shortened; for logs.
        error: Option<String>,
    },
    /// A 5xx or 408 answer.
    #[error("BACE answered HTTP {status}")]
    Status {
        /// HTTP status.
        status: u16,
    },
    /// A 429 answer: BACE asks to slow down, for `retry_after` if it said how long
    /// (`Retry-After`, capped at [`MAX_RETRY_AFTER`]). The next attempt waits at least that.
    #[error("BACE answered HTTP 429 (rate limited)")]
    RateLimited {
        /// How long BACE asked to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// No answer within the upstream timeout.
    #[error("upstream timeout")]
    Timeout,
    /// The connection could not be made or broke (with the cause, for logs; never a URL).
    #[error("cannot reach BACE: {0}")]
    Transport(String),
    /// A 2xx answer the broker cannot use.
    #[error("invalid answer from BACE: {0}")]
    InvalidAnswer(&'static str),
}

fn detail(error: &Option<String>) -> String {
    error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

impl UpstreamError {
    /// Whether trying again later may succeed without any change to credentials or tokens.
    pub fn is_transient(&self) -> bool {
        !matches!(self, UpstreamError::Rejected { .. })
    }

    /// A short, stable class for status messages and metrics (no upstream text).
    pub fn class(&self) -> &'static str {
        match self {
            UpstreamError::Rejected { .. } => "rejected",
            UpstreamError::Status { status: 429 } | UpstreamError::RateLimited { .. } => {
                "rate limited"
            }
            UpstreamError::Status { .. } => "upstream error status",
            UpstreamError::Timeout => "upstream timeout",
            UpstreamError::Transport(_) => "connection failed",
            UpstreamError::InvalidAnswer(_) => "invalid upstream answer",
        }
    }
}

/// BACE's token endpoint, as the broker uses it.
pub trait Upstream: Send + Sync + 'static {
    /// Password grant for `account`.
    fn login<'a>(
        &'a self,
        account: &'a AccountConfig,
    ) -> BoxFuture<'a, Result<Issued, UpstreamError>>;

    /// Refresh grant for `account`, with `token` as the Bearer and its refresh token.
    fn refresh<'a>(
        &'a self,
        account: &'a AccountConfig,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Issued, UpstreamError>>;

    /// Whether BACE accepts `token` at `url` (an authenticated GET): `Ok(true)` for 2xx and
    /// 403 (authenticated, not permitted), `Ok(false)` for 401. The default cannot tell and says no.
    fn verify<'a>(
        &'a self,
        url: &'a Url,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<bool, UpstreamError>> {
        let _ = (url, token);
        Box::pin(async { Ok(false) })
    }
}
