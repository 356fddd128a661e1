//! The only module that speaks HTTP to BACE: the password and refresh grants of
//! `POST /oauth2/token`, and the parsing of every answer shape BACE (or a standard OAuth2
//! server) gives. The broker sees the [`Upstream`] trait, so its tests can script answers
//! without sockets and run in paused time.

use std::{future::Future, pin::Pin, time::SystemTime};

use chrono_tz::Tz;
use reqwest::{Url, header};
use secrecy::SecretString;
use serde::Deserialize;
use tokio::time::Duration;

use crate::{config::AccountConfig, config::UpstreamConfig, policy, token::Token};

/// Largest answer body read from BACE; a token answer is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A boxed, sendable future (keeps [`Upstream`] object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which request to BACE: a grant of the token endpoint, or a token check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantType {
    /// `grant_type=password`: a new token from the account's credentials.
    Password,
    /// `grant_type=refresh_token`: extends (or replaces) the current token.
    Refresh,
    /// `GET upstream.verify_url` with the token: does BACE accept it?
    Verify,
}

impl GrantType {
    /// The grant's name, as in `grant_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::Password => "password",
            GrantType::Refresh => "refresh_token",
            GrantType::Verify => "verify",
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
    /// A 5xx, 408 or 429 answer.
    #[error("BACE answered HTTP {status}")]
    Status {
        /// HTTP status.
        status: u16,
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
            UpstreamError::Status { status: 429 } => "rate limited",
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

/// [`Upstream`] over HTTP(S) with reqwest and rustls.
#[derive(Clone)]
pub struct HttpUpstream {
    client: reqwest::Client,
    expires_timezone: Tz,
}

impl HttpUpstream {
    /// A client with the configured timeout; redirects are not followed (a redirected POST
    /// would carry credentials to another place).
    pub fn new(config: &UpstreamConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("bace-token-broker/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            client,
            expires_timezone: config.expires_timezone,
        })
    }

    async fn post(
        &self,
        url: &Url,
        form: &[(&str, &str)],
        bearer: Option<&str>,
    ) -> Result<Issued, UpstreamError> {
        let mut request = self
            .client
            .post(url.clone())
            .header(header::ACCEPT, "application/json")
            .form(form);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(UpstreamError::InvalidAnswer("answer larger than 64 KiB"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_answer(status, &body, self.expires_timezone)
    }
}

fn transport_error(e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        return UpstreamError::Timeout;
    }
    // The cause chain (connection refused, DNS, TLS...), without the URL.
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    UpstreamError::Transport(text)
}

impl Upstream for HttpUpstream {
    fn login<'a>(
        &'a self,
        account: &'a AccountConfig,
    ) -> BoxFuture<'a, Result<Issued, UpstreamError>> {
        Box::pin(async move {
            let c = &account.credentials;
            let form = [
                ("grant_type", GrantType::Password.as_str()),
                ("client_id", c.client_id()),
                ("client_secret", c.expose_client_secret()),
                ("username", c.username()),
                ("password", c.expose_password()),
            ];
            self.post(&account.token_url, &form, None).await
        })
    }

    fn refresh<'a>(
        &'a self,
        account: &'a AccountConfig,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Issued, UpstreamError>> {
        Box::pin(async move {
            let Some(refresh) = token.expose_refresh() else {
                return Err(UpstreamError::InvalidAnswer("no refresh token was issued"));
            };
            let c = &account.credentials;
            let form = [
                ("grant_type", GrantType::Refresh.as_str()),
                ("refresh_token", refresh),
                ("client_id", c.client_id()),
                ("client_secret", c.expose_client_secret()),
            ];
            self.post(&account.token_url, &form, Some(token.expose_access()))
                .await
        })
    }

    fn verify<'a>(
        &'a self,
        url: &'a Url,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<bool, UpstreamError>> {
        Box::pin(async move {
            let response = self
                .client
                .get(url.clone())
                .header(header::ACCEPT, "application/json")
                .bearer_auth(token.expose_access())
                .send()
                .await
                .map_err(transport_error)?;
            match response.status().as_u16() {
                // 403: the token authenticated, it merely lacks a permission.
                200..=299 | 403 => Ok(true),
                401 => Ok(false),
                status => Err(UpstreamError::Status { status }),
            }
        })
    }
}

// === Answer parsing ===

/// The union of the answer shapes: OAuth2 token, BACE refresh, OAuth2 error, BACE/Yii error.
#[derive(Deserialize)]
struct Answer {
    access_token: Option<serde_json::Value>,
    refresh_token: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
    refreshed: Option<serde_json::Value>,
    expires: Option<serde_json::Value>,
    // OAuth2 errors.
    error: Option<serde_json::Value>,
    error_description: Option<serde_json::Value>,
    // Yii errors.
    name: Option<serde_json::Value>,
    message: Option<serde_json::Value>,
}

/// Turns an HTTP status and body into an [`Issued`] or an [`UpstreamError`]. Never panics,
/// whatever the bytes.
pub fn parse_answer(status: u16, body: &[u8], tz: Tz) -> Result<Issued, UpstreamError> {
    let answer: Option<Answer> = serde_json::from_slice(body).ok();
    match status {
        200..=299 => {}
        408 | 429 | 500..=599 => return Err(UpstreamError::Status { status }),
        300..=399 => return Err(UpstreamError::InvalidAnswer("unexpected redirect")),
        _ => {
            return Err(UpstreamError::Rejected {
                status,
                error: answer.as_ref().and_then(error_text),
            });
        }
    }
    let answer = answer.ok_or(UpstreamError::InvalidAnswer("answer is not a JSON object"))?;
    if let Some(refreshed) = &answer.refreshed {
        if refreshed.as_bool() != Some(true) {
            return Err(UpstreamError::Rejected {
                status,
                error: Some("refreshed is not true".into()),
            });
        }
        let expires = answer
            .expires
            .as_ref()
            .and_then(|e| e.as_str())
            .and_then(|e| policy::parse_bace_expires(e, tz));
        return Ok(Issued::Extended { expires });
    }
    let access = match &answer.access_token {
        Some(serde_json::Value::String(s)) if is_token_text(s) => SecretString::from(s.as_str()),
        Some(_) => {
            return Err(UpstreamError::InvalidAnswer(
                "access_token is not a usable string",
            ));
        }
        None => {
            return Err(UpstreamError::InvalidAnswer(
                "answer has neither access_token nor refreshed",
            ));
        }
    };
    let refresh = match &answer.refresh_token {
        Some(serde_json::Value::String(s)) if is_token_text(s) => {
            Some(SecretString::from(s.as_str()))
        }
        None | Some(serde_json::Value::Null) => None,
        Some(_) => {
            return Err(UpstreamError::InvalidAnswer(
                "refresh_token is not a usable string",
            ));
        }
    };
    let lifetime = match &answer.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(parse_expires_in(v).ok_or(UpstreamError::InvalidAnswer(
            "expires_in is not a number of seconds",
        ))?),
    };
    Ok(Issued::Token {
        access,
        refresh,
        lifetime,
    })
}

/// `expires_in` as a JSON number or a string of one; negative counts as zero.
fn parse_expires_in(v: &serde_json::Value) -> Option<Duration> {
    let secs = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    if !secs.is_finite() {
        return None;
    }
    Duration::try_from_secs_f64(secs.clamp(0.0, 10.0 * 365.0 * 86_400.0)).ok()
}

/// A token must fit an HTTP header: visible ASCII, no spaces, not empty, not huge.
fn is_token_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= 4096 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// The error code and description of either error shape, shortened for logs.
fn error_text(a: &Answer) -> Option<String> {
    let text =
        |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v.as_str()).map(str::to_owned);
    let (code, description) = match text(&a.error) {
        Some(code) => (Some(code), text(&a.error_description)),
        None => (text(&a.name), text(&a.message)),
    };
    let joined = match (code, description) {
        (Some(c), Some(d)) => format!("{c}: {d}"),
        (Some(c), None) => c,
        (None, Some(d)) => d,
        (None, None) => return None,
    };
    let mut short: String = joined
        .chars()
        .filter(|c| !c.is_control())
        .take(160)
        .collect();
    if short.len() < joined.len() {
        short.push('…');
    }
    Some(short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const AMS: Tz = chrono_tz::Europe::Amsterdam;

    fn parse(status: u16, body: &str) -> Result<Issued, UpstreamError> {
        parse_answer(status, body.as_bytes(), AMS)
    }

    #[test]
    fn password_grant_answer() {
        let body = r#"{"access_token":"8a0b","expires_in":86400,"token_type":"Bearer","scope":null,"refresh_token":"1281"}"#;
        let Ok(Issued::Token {
            access,
            refresh,
            lifetime,
        }) = parse(200, body)
        else {
            panic!("not a token");
        };
        assert_eq!(access.expose_secret(), "8a0b");
        assert_eq!(refresh.unwrap().expose_secret(), "1281");
        assert_eq!(lifetime, Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn expires_in_as_string_float_or_missing() {
        for (v, want) in [
            ("\"3600\"", Some(3600.0)),
            ("3600.5", Some(3600.5)),
            ("-5", Some(0.0)),
            ("null", None),
        ] {
            let body = format!(r#"{{"access_token":"a","expires_in":{v}}}"#);
            let Ok(Issued::Token {
                lifetime, refresh, ..
            }) = parse(200, &body)
            else {
                panic!("{v}");
            };
            assert_eq!(lifetime, want.map(Duration::from_secs_f64), "{v}");
            assert!(refresh.is_none());
        }
        assert!(matches!(
            parse(200, r#"{"access_token":"a","expires_in":"soon"}"#),
            Err(UpstreamError::InvalidAnswer(_))
        ));
    }

    #[test]
    fn bace_refresh_answer() {
        let Ok(Issued::Extended { expires }) = parse(
            200,
            r#"{"refreshed": true, "expires": "2022-04-04 14:19:49"}"#,
        ) else {
            panic!();
        };
        assert_eq!(
            expires,
            policy::parse_bace_expires("2022-04-04 14:19:49", AMS)
        );
        let Ok(Issued::Extended { expires }) = parse(200, r#"{"refreshed": true, "expires": 12}"#)
        else {
            panic!();
        };
        assert_eq!(expires, None);
        assert!(matches!(
            parse(200, r#"{"refreshed": false}"#),
            Err(UpstreamError::Rejected { status: 200, .. })
        ));
    }

    #[test]
    fn error_bodies_of_both_shapes() {
        let e = parse(
            400,
            r#"{"error":"invalid_grant","error_description":"bad password"}"#,
        )
        .err()
        .unwrap();
        assert_eq!(
            e,
            UpstreamError::Rejected {
                status: 400,
                error: Some("invalid_grant: bad password".into())
            }
        );
        let e = parse(
            401,
            r#"{"name":"Unauthorized","message":"Your request was made with invalid credentials.","code":0,"status":401}"#,
        )
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "rejected by BACE (HTTP 401: Unauthorized: Your request was made with invalid credentials.)"
        );
        assert!(!e.is_transient());
        let e = parse(403, "<html>nope</html>").err().unwrap();
        assert_eq!(
            e,
            UpstreamError::Rejected {
                status: 403,
                error: None
            }
        );
        let long = format!(
            r#"{{"error":"x","error_description":"{}"}}"#,
            "y".repeat(1000)
        );
        let Err(UpstreamError::Rejected {
            error: Some(text), ..
        }) = parse(400, &long)
        else {
            panic!();
        };
        assert!(text.chars().count() <= 161);
    }

    #[test]
    fn transient_statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            let e = parse(s, "{}").err().unwrap();
            assert_eq!(e, UpstreamError::Status { status: s });
            assert!(e.is_transient());
        }
        assert_eq!(parse(429, "").err().unwrap().class(), "rate limited");
        assert!(matches!(
            parse(302, ""),
            Err(UpstreamError::InvalidAnswer(_))
        ));
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for body in [
            "",
            "{",
            "null",
            "[]",
            "42",
            r#"{"access_token": ""}"#,
            r#"{"access_token": "has space"}"#,
            r#"{"access_token": 12}"#,
            r#"{"access_token": "a", "refresh_token": 5}"#,
            r#"{"token_type": "Bearer"}"#,
            "\u{0}\u{1}binary",
        ] {
            let e = parse(200, body)
                .err()
                .unwrap_or_else(|| panic!("{body:?} accepted"));
            assert!(
                e.is_transient() || matches!(e, UpstreamError::Rejected { .. }),
                "{body:?}"
            );
        }
        // Arbitrary bytes never panic.
        let bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        assert!(parse_answer(200, &bytes, AMS).is_err());
        assert!(parse_answer(500, &bytes, AMS).is_err());
        assert!(parse_answer(401, &bytes, AMS).is_err());
    }
}
