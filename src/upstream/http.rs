//! [`HttpUpstream`]: the password and refresh grants and the token check over HTTP(S), with
//! reqwest and rustls. Redirects are never followed; answers are read up to
//! [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES).

use chrono_tz::Tz;
use reqwest::{Url, header};
use std::time::SystemTime;

use tokio::time::Duration;

use super::{
    BoxFuture, Grant, Issued, MAX_BODY_BYTES, MAX_RETRY_AFTER, Upstream, UpstreamError,
    parse_answer,
};
use crate::{
    config::{AccountConfig, UpstreamConfig},
    token::Token,
};

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
        if status == 429 {
            let retry_after = retry_after(response.headers(), SystemTime::now());
            return Err(UpstreamError::RateLimited { retry_after });
        }
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

/// The delay a `Retry-After` header asks for: delay-seconds or an HTTP date (RFC 9110
/// 10.2.3), at most [`MAX_RETRY_AFTER`]; `None` when absent or unreadable.
pub(crate) fn retry_after(headers: &header::HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(delay.min(MAX_RETRY_AFTER))
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
                ("grant_type", Grant::Password.as_str()),
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
                ("grant_type", Grant::Refresh.as_str()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> header::HeaderMap {
        let mut h = header::HeaderMap::new();
        h.insert(header::RETRY_AFTER, value.parse().unwrap());
        h
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&headers("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(&headers(" 7 "), now),
            Some(Duration::from_secs(7))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            retry_after(&headers(&date), now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(retry_after(&headers(&past), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&headers("86400000"), now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&headers("-5"), now), None);
        assert_eq!(retry_after(&header::HeaderMap::new(), now), None);
    }
}
