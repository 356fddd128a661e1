//! [`HttpUpstream`]: the password and refresh grants and the token check over HTTP(S), with
//! reqwest and rustls. Redirects are never followed; answers are read up to
//! [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES).

use chrono_tz::Tz;
use reqwest::{Url, header};
use tokio::time::Duration;

use super::{BoxFuture, Grant, Issued, MAX_BODY_BYTES, Upstream, UpstreamError, parse_answer};
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
