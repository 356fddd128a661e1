//! [`BrokerClient`]: tokens from a local cache, one shared call per account, Invalidate and
//! WatchToken.

use std::{sync::Arc, time::Duration};

use dashmap::DashMap;
use tokio::time::Instant;
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use crate::{
    BrokerClientBuilder, Error, Invalidated, Token, TokenWatch,
    cache::{Joined, Slot},
    connect::{CallerToken, Settings},
    proto::{self, token_broker_service_client::TokenBrokerServiceClient},
};

pub(crate) type Rpc = TokenBrokerServiceClient<InterceptedService<Channel, CallerToken>>;

/// A client of the BACE token broker. Cheap to clone; clones share the connection and the
/// token cache.
///
/// - [`token`](Self::token) answers from a local cache while the cached token stays valid for
///   more than the [margin](BrokerClientBuilder::margin); otherwise it asks the broker, and
///   concurrent callers for one account share that one call (its result, success or error, goes
///   to all of them; a caller that gives up does not cancel it for the others).
/// - [`invalidate`](Self::invalidate) reports a token BACE refused and returns the token to use.
/// - [`watch`](Self::watch) keeps an account's current token up to date over `WatchToken`.
///
/// ```no_run
/// # async fn demo() -> Result<(), bace_token_broker_client::Error> {
/// use bace_token_broker_client::BrokerClient;
///
/// let client = BrokerClient::builder("https://token-broker:50051")
///     .ca_file("/etc/broker/ca.crt")
///     .token_file("/var/run/secrets/broker/token")
///     .build()?;
/// let token = client.token("fleet-a").await?;
/// println!("valid for {:?}", token.valid_for());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BrokerClient {
    inner: Arc<Inner>,
}

struct Inner {
    rpc: Rpc,
    caller: CallerToken,
    settings: Settings,
    /// One slot per account asked for. DashMap: lookups from many tasks at once without one
    /// global lock. The guard is dropped before any `.await` (the slot's `Arc` is cloned out).
    slots: DashMap<Box<str>, Arc<Slot>>,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerClient")
            .field("accounts", &self.inner.slots.len())
            .field("margin", &self.inner.settings.margin)
            .finish_non_exhaustive()
    }
}

impl BrokerClient {
    /// Settings for a client of the broker at `addr` (`http://host:port`, or `https://` for
    /// TLS).
    pub fn builder(addr: impl Into<String>) -> BrokerClientBuilder {
        BrokerClientBuilder::new(addr)
    }

    /// A client of the broker at `addr` with the default settings. Connects at the first call.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid address.
    pub fn new(addr: impl Into<String>) -> Result<Self, Error> {
        Self::builder(addr).build()
    }

    pub(crate) fn from_parts(channel: Channel, caller: CallerToken, settings: Settings) -> Self {
        let rpc = TokenBrokerServiceClient::with_interceptor(channel, caller.clone())
            .max_decoding_message_size(1024 * 1024);
        Self {
            inner: Arc::new(Inner {
                rpc,
                caller,
                settings,
                slots: DashMap::new(),
            }),
        }
    }

    /// A valid token for `account`: the cached one while it stays valid for more than the
    /// margin, else one from the broker (`GetToken`), shared with every concurrent caller.
    ///
    /// # Errors
    ///
    /// What the broker answered, as [`Error`]; [`Error::BrokerUnreachable`] when it cannot be
    /// reached.
    pub async fn token(&self, account: &str) -> Result<Token, Error> {
        self.token_with_min_validity(account, Duration::ZERO).await
    }

    /// A token for `account` that stays valid for at least `min_validity` beyond the margin.
    /// The broker is asked for the margin plus `min_validity` (refreshing first if it must), so
    /// the answer can be cached; concurrent callers that need no more than an earlier caller
    /// join its call.
    ///
    /// If the broker answers `OUT_OF_RANGE` to that (the margin plus `min_validity` is longer
    /// than any BACE token lasts), the client asks once more for `min_validity` alone and
    /// returns that answer: a token valid for at least `min_validity`, which the cache cannot
    /// keep (every such call reaches the broker).
    ///
    /// # Errors
    ///
    /// As [`token`](Self::token); [`Error::OutOfRange`] when no BACE token lasts
    /// `min_validity`.
    pub async fn token_with_min_validity(
        &self,
        account: &str,
        min_validity: Duration,
    ) -> Result<Token, Error> {
        match self.fresh(account, min_validity) {
            Some(token) => Ok(token),
            None => self.fetch(account, min_validity).await,
        }
    }

    /// The cached token if it stays valid for more than the margin plus `min_validity`: one map
    /// lookup, one lock-free load, one clock reading. Synchronous, so callers on a hot path
    /// (the middleware) keep the slow path's future out of theirs.
    pub(crate) fn fresh(&self, account: &str, min_validity: Duration) -> Option<Token> {
        let left = self.inner.settings.margin.saturating_add(min_validity);
        self.inner
            .slots
            .get(account)
            .and_then(|slot| slot.fresh(Instant::now(), left))
    }

    /// The slow path: join or start the account's GetToken.
    pub(crate) async fn fetch(
        &self,
        account: &str,
        min_validity: Duration,
    ) -> Result<Token, Error> {
        let slot = self.slot(account);
        let call = match slot.join_fetch(self.inner.settings.margin, min_validity, || {
            Box::pin(get_token(
                self.inner.rpc.clone(),
                self.inner.caller.clone(),
                account.to_owned(),
                (self.inner.settings.margin, min_validity),
                self.inner.settings.timeout,
            ))
        }) {
            Joined::Cached(token) => return Ok(token),
            Joined::Wait(call) => call,
        };
        call.await
    }

    /// The token last received for `account` (by any call or by a watch), if any, whatever
    /// its remaining validity. No call to the broker.
    pub fn cached(&self, account: &str) -> Option<Token> {
        self.inner.slots.get(account).and_then(|s| s.current())
    }

    /// Reports that BACE answered 401 to `access_token` of `account`, and returns what the
    /// broker did and the token to use from now on (which also replaces the cached one).
    ///
    /// Concurrent reports of the same token share one call. See [`Invalidated::retry_with`]
    /// for whether to send the refused request again.
    ///
    /// # Errors
    ///
    /// As [`token`](Self::token).
    pub async fn invalidate(
        &self,
        account: &str,
        access_token: &str,
    ) -> Result<Invalidated, Error> {
        let slot = self.slot(account);
        let call = slot.join_invalidation(access_token, || {
            let mut rpc = self.inner.rpc.clone();
            let caller = self.inner.caller.clone();
            let mut request = tonic::Request::new(proto::InvalidateRequest {
                account: account.to_owned(),
                access_token: access_token.to_owned(),
            });
            request.set_timeout(self.inner.settings.timeout);
            Box::pin(async move {
                let answer = rpc
                    .invalidate(request)
                    .await
                    .map_err(|s| failed(&caller, s))?;
                Invalidated::from_proto(answer.into_inner())
            })
        });
        call.await
    }

    /// A handle on `account`'s current token, kept up to date by a `WatchToken` stream that
    /// reconnects with backoff when it breaks. The stream runs in a task of its own, which
    /// ends when the last clone of the handle is dropped. Tokens it receives also refresh this
    /// client's cache.
    pub fn watch(&self, account: &str) -> TokenWatch {
        TokenWatch::spawn(
            self.inner.rpc.clone(),
            self.inner.caller.clone(),
            self.slot(account),
            account.to_owned(),
            self.inner.settings.watch_backoff,
        )
    }

    fn slot(&self, account: &str) -> Arc<Slot> {
        if let Some(slot) = self.inner.slots.get(account) {
            return Arc::clone(&slot);
        }
        Arc::clone(&self.inner.slots.entry(account.into()).or_default())
    }
}

/// GetToken for the margin plus `min_validity`; after `OUT_OF_RANGE`, for `min_validity` alone.
async fn get_token(
    rpc: Rpc,
    caller: CallerToken,
    account: String,
    (margin, min_validity): (Duration, Duration),
    timeout: Duration,
) -> Result<Token, Error> {
    let cacheable = margin.saturating_add(min_validity);
    let first = get_token_once(rpc.clone(), &caller, account.clone(), cacheable, timeout).await;
    match first {
        Err(Error::OutOfRange { .. }) if cacheable != min_validity => {
            get_token_once(rpc, &caller, account, min_validity, timeout).await
        }
        other => other,
    }
}

async fn get_token_once(
    mut rpc: Rpc,
    caller: &CallerToken,
    account: String,
    min_validity: Duration,
    timeout: Duration,
) -> Result<Token, Error> {
    let min_validity = (!min_validity.is_zero())
        .then(|| prost_types::Duration::try_from(min_validity))
        .transpose()
        .map_err(|_| Error::OutOfRange {
            message: "min_validity is too long".into(),
        })?;
    let mut request = tonic::Request::new(proto::GetTokenRequest {
        account,
        min_validity,
    });
    request.set_timeout(timeout);
    let answer = rpc
        .get_token(request)
        .await
        .map_err(|s| failed(caller, s))?;
    let token = answer
        .into_inner()
        .token
        .ok_or_else(|| Error::protocol("the broker answered GetToken without a token"))?;
    Token::from_proto(token)
}

/// The error of a failed call; a refused identity makes the next call re-check the token file.
pub(crate) fn failed(caller: &CallerToken, status: tonic::Status) -> Error {
    let error = Error::from(status);
    if matches!(error, Error::Unauthenticated { .. }) {
        caller.refused();
    }
    error
}
