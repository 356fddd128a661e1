//! HTTP integration: the 401 dance, once, for [`BrokerAuthMiddleware`](crate::BrokerAuthMiddleware)
//! (reqwest-middleware) and [`BrokerAuthLayer`](crate::BrokerAuthLayer) (tower).
//!
//! Per request: set `Authorization` from [`BrokerClient::token`] (a cache read). If BACE
//! answers 401, report the token used with `Invalidate`, then:
//! - outcome `TOKEN_VALID` (the broker checked the token at `upstream.verify_url` and BACE
//!   accepts it: the account lacks a permission): hand back the 401 untouched;
//! - the broker returned the very token that failed: hand back the 401 (retrying is pointless);
//! - otherwise send the request again, exactly once, with the returned token, if it can be
//!   replayed; if not, hand back the 401 (the next request uses the new token).
//!
//! The answer to the retry is returned whatever it is: never a second Invalidate, never a loop.
//! If Invalidate itself fails, the 401 is handed back and the failure logged.

#[cfg(feature = "reqwest-middleware")]
pub(crate) mod reqwest;
#[cfg(feature = "tower")]
pub(crate) mod tower;

use std::time::Duration;

use crate::{BrokerClient, Error, Token};

/// The token for a request: the cached one, or (boxed, so the middleware's own future stays
/// small on the hot path) the shared fetch.
async fn token(client: &BrokerClient, account: &str) -> Result<Token, Error> {
    match client.fresh(account, Duration::ZERO) {
        Some(token) => Ok(token),
        None => Box::pin(client.fetch(account, Duration::ZERO)).await,
    }
}

/// After a 401 to a request sent with `used`: the token to send it again with, if any.
async fn retry_token(client: &BrokerClient, account: &str, used: &Token) -> Option<Token> {
    match client.invalidate(account, used.access_token()).await {
        Ok(answer) => {
            let retry = answer.retry_with(used.access_token()).cloned();
            tracing::debug!(
                account,
                outcome = ?answer.outcome,
                retry = retry.is_some(),
                "BACE answered 401; token reported"
            );
            retry
        }
        Err(error) => {
            tracing::warn!(account, %error, "BACE answered 401 and Invalidate failed; returning the 401");
            None
        }
    }
}
