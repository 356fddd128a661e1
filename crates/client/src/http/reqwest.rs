//! [`BrokerAuthMiddleware`] for `reqwest-middleware`.

use std::sync::Arc;

use http::{Extensions, StatusCode, header::AUTHORIZATION};
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use crate::BrokerClient;

/// A `reqwest-middleware` middleware that authorises every request with a token of one
/// account and performs the 401 dance (see the crate docs).
///
/// Only a 401 from the origin the request (and its token) was sent to counts: reqwest follows
/// redirects below the middleware and drops `Authorization` when one leads to another origin,
/// so a 401 from there is returned untouched and the token is not reported.
///
/// A retry needs a request that can be sent twice: `reqwest::Request::try_clone` must
/// succeed, which it does for every body but a stream (`Body::wrap_stream`). A streamed
/// request that gets a 401 is still reported to the broker (so the next request carries the new
/// token), and its 401 is returned.
///
/// Errors from the broker before the request is sent (no token) are
/// `reqwest_middleware::Error::Middleware` wrapping an [`Error`](crate::Error): get it back
/// with `downcast_ref`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use bace_token_broker_client::{BrokerAuthMiddleware, BrokerClient};
///
/// let broker = BrokerClient::new("http://token-broker:50051")?;
/// let http = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(BrokerAuthMiddleware::new(broker, "fleet-a"))
///     .build();
/// let devices = http
///     .get("https://api.bace-iot.com/api/v2/physical-device")
///     .send()
///     .await?;
/// match devices.error_for_status() {
///     Ok(_) => {}
///     Err(e) => eprintln!("BACE refused: {e}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct BrokerAuthMiddleware {
    client: BrokerClient,
    account: Arc<str>,
}

impl BrokerAuthMiddleware {
    /// Authorises requests with tokens of `account` from `client`.
    pub fn new(client: BrokerClient, account: impl Into<Arc<str>>) -> Self {
        Self {
            client,
            account: account.into(),
        }
    }
}

#[async_trait::async_trait]
impl Middleware for BrokerAuthMiddleware {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let token = super::token(&self.client, &self.account)
            .await
            .map_err(reqwest_middleware::Error::middleware)?;
        // The copy for a retry is taken before the header goes in (one entry less to copy).
        let replay = request.try_clone();
        request
            .headers_mut()
            .insert(AUTHORIZATION, token.authorization().clone());
        let origin = request.url().origin();
        let response = next.clone().run(request, extensions).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        // reqwest follows redirects below the middleware and drops `Authorization` on the way
        // to another origin: a 401 from there says nothing about the token.
        if response.url().origin() != origin {
            tracing::debug!(account = %self.account, "401 from another origin after a redirect; token kept");
            return Ok(response);
        }
        // Boxed: the cold path's future stays out of the hot path's.
        let retry = Box::pin(super::retry_token(&self.client, &self.account, &token)).await;
        let Some(new) = retry else {
            return Ok(response);
        };
        let Some(mut replay) = replay else {
            tracing::debug!(account = %self.account, "not retried: the request body is a stream");
            return Ok(response);
        };
        replay
            .headers_mut()
            .insert(AUTHORIZATION, new.authorization().clone());
        drop(response);
        next.run(replay, extensions).await
    }
}
