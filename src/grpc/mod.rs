//! The gRPC adapter: turns `TokenBrokerService` requests into [`Broker`] calls.
//!
//! - this file: the service, and the admission of each call through [`Authorizer`];
//! - `status`: the one place where errors become `tonic::Status`es;
//! - `convert`: proto messages from broker values, request fields into broker arguments;
//! - `encode`: [`GetTokenReply`], the GetToken answer written straight from the token;
//! - `metrics`: the calls it counts ([`CallCounts`]), and the handling of each: every RPC is
//!   timed from the start of its handler (admission included) to its status.

mod convert;
mod encode;
mod metrics;
mod status;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tracing::debug;

use self::{
    convert::outcome_to_proto,
    metrics::Handling,
    status::{denied_status, no_longer_allowed},
};
pub(crate) use self::{
    convert::{min_validity, status_to_proto, token_to_proto},
    metrics::{Rpc, RpcHandling},
};
pub use self::{
    encode::GetTokenReply,
    metrics::{CallCount, CallCounts},
    status::code_name,
};
use crate::{
    auth::Authorizer,
    broker::{Broker, TokenStream},
    proto::{self, token_broker_service_server::TokenBrokerService},
    tls::TlsConnInfo,
    token::{AccountName, MAX_ACCOUNT_NAME_LEN, Token},
};

/// The `bace.tokenbroker.v1.TokenBrokerService` implementation.
#[derive(Clone)]
pub struct TokenBrokerApi {
    broker: Broker,
    auth: Option<Authorizer>,
    calls: Arc<CallCounts>,
}

impl TokenBrokerApi {
    /// Serves `broker`; with `auth`, every call needs an identity allowed the account it names.
    pub fn new(broker: Broker, auth: Option<Authorizer>) -> Self {
        metrics::calibrate_clock();
        Self {
            broker,
            auth,
            calls: Arc::default(),
        }
    }

    /// What this service counts (shared by its clones).
    pub fn calls(&self) -> Arc<CallCounts> {
        self.calls.clone()
    }

    /// Checks the caller of `request` (when auth is on): its identity, and, with `account`,
    /// that it may use that account. The check comes before any account lookup, so callers
    /// cannot learn which accounts exist. Returns the identity.
    async fn admit<T>(
        &self,
        rpc: &'static str,
        request: &Request<T>,
        account: Option<&str>,
    ) -> Result<Option<Arc<str>>, Status> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        // The client certificate's identity, read once at the connection's handshake.
        let peer_identity = request
            .extensions()
            .get::<TlsConnInfo>()
            .and_then(|info| info.identity.as_ref());
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match auth.admit(rpc, authorization, peer_identity, account).await {
            Ok(identity) => Ok(Some(identity)),
            Err(denied) => Err(denied_status(denied, account.map(bounded).as_deref())),
        }
    }

    /// Runs the unary call `call` of `rpc`, timed and counted by its status.
    async fn handle<T>(
        &self,
        rpc: Rpc,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let handling = Handling::start(&*self.calls, rpc);
        let result = call.await;
        handling.end_with(&result);
        result
    }

    /// The metrics label of a requested account: configured ones by name, others lumped
    /// (`None`).
    fn account_label(&self, account: &str, token: Option<&Token>) -> Option<AccountName> {
        match token {
            Some(t) => Some(t.account().clone()),
            None => self.broker.account_name(account),
        }
    }
}

/// Caller input cut to the longest account name, for logs.
fn bounded(account: &str) -> String {
    account.chars().take(MAX_ACCOUNT_NAME_LEN).collect()
}

/// Logs a failed call (at debug: callers see the status; the broker logs upstream trouble
/// itself) without echoing unbounded caller input.
fn log_failure(rpc: &'static str, account: &str, status: &Status) {
    let account = bounded(account);
    debug!(rpc, ?account, code = ?status.code(), message = status.message(), "call failed");
}

// The RPCs' handlers; the service's methods below time and count them.
impl TokenBrokerApi {
    async fn answer_get_token(
        &self,
        request: Request<proto::GetTokenRequest>,
    ) -> Result<Response<GetTokenReply>, Status> {
        self.admit("GetToken", &request, Some(&request.get_ref().account))
            .await?;
        let request = request.into_inner();
        let result: Result<Arc<Token>, Status> = async {
            let min = min_validity(request.min_validity)?;
            Ok(self.broker.get_token(&request.account, min).await?)
        }
        .await;
        // Tokens served are counted by the broker (per account, off the label map).
        if let Err(status) = &result {
            log_failure("GetToken", &request.account, status);
            self.calls.get_token_failed(
                self.account_label(&request.account, None),
                code_name(status.code()),
            );
        }
        Ok(Response::new(GetTokenReply::new(result?)))
    }

    async fn answer_invalidate(
        &self,
        request: Request<proto::InvalidateRequest>,
    ) -> Result<Response<proto::InvalidateResponse>, Status> {
        self.admit("Invalidate", &request, Some(&request.get_ref().account))
            .await?;
        let request = request.into_inner();
        let result = self
            .broker
            .invalidate(&request.account, &request.access_token)
            .await
            .map_err(Status::from);
        let outcome = match &result {
            Ok(answer) => answer.outcome.as_str(),
            Err(status) => {
                log_failure("Invalidate", &request.account, status);
                code_name(status.code())
            }
        };
        let token = result.as_ref().ok().map(|a| &*a.token);
        self.calls
            .invalidated(self.account_label(&request.account, token), outcome);
        let answer = result?;
        Ok(Response::new(proto::InvalidateResponse {
            invalidated: answer.invalidated(),
            token: Some(token_to_proto(&answer.token)),
            outcome: outcome_to_proto(answer.outcome) as i32,
        }))
    }

    /// Admits a watcher: its token stream, and the recheck of its caller's right.
    async fn admit_watcher(
        &self,
        request: Request<proto::WatchTokenRequest>,
    ) -> Result<(TokenStream, Option<Recheck>), Status> {
        let identity = self
            .admit("WatchToken", &request, Some(&request.get_ref().account))
            .await?;
        let account = request.into_inner().account;
        let watch = self.broker.watch(&account).inspect_err(|e| {
            log_failure("WatchToken", &account, &Status::from(e.clone()));
        })?;
        // The allow list may change while the stream is open: check again before each send.
        let recheck = match (&self.auth, identity) {
            (Some(auth), Some(identity)) => Some(Recheck {
                auth: auth.clone(),
                identity,
                account,
            }),
            _ => None,
        };
        Ok((watch.into_stream(), recheck))
    }

    async fn answer_list_accounts(
        &self,
        request: Request<proto::ListAccountsRequest>,
    ) -> Result<Response<proto::ListAccountsResponse>, Status> {
        let identity = self.admit("ListAccounts", &request, None).await?;
        let visible = |account: &str| match (&self.auth, &identity) {
            (Some(auth), Some(id)) => auth.authorize(id, account),
            _ => true,
        };
        let accounts = self
            .broker
            .status()
            .iter()
            .filter(|s| visible(s.account.as_str()))
            .map(status_to_proto)
            .collect();
        let store = self.broker.store().map(|store| proto::StoreStatus {
            state: match store.is_up() {
                None => proto::StoreState::Connecting,
                Some(true) => proto::StoreState::Up,
                Some(false) => proto::StoreState::Down,
            } as i32,
            key_prefix: store.prefix().to_owned(),
        });
        Ok(Response::new(proto::ListAccountsResponse {
            accounts,
            store,
        }))
    }
}

#[tonic::async_trait]
impl TokenBrokerService for TokenBrokerApi {
    async fn get_token(
        &self,
        request: Request<proto::GetTokenRequest>,
    ) -> Result<Response<GetTokenReply>, Status> {
        self.handle(Rpc::GetToken, self.answer_get_token(request))
            .await
    }

    async fn invalidate(
        &self,
        request: Request<proto::InvalidateRequest>,
    ) -> Result<Response<proto::InvalidateResponse>, Status> {
        self.handle(Rpc::Invalidate, self.answer_invalidate(request))
            .await
    }

    type WatchTokenStream = WatchResponses;

    /// A stream is handled when it ends: with its error, with OK when the broker drains, as
    /// CANCELLED when its caller goes away first (see `grpc::metrics::Handling`); its handling time is its
    /// lifetime. A refused watcher is handled at once, with the refusal's code.
    async fn watch_token(
        &self,
        request: Request<proto::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let mut handling = Handling::start(self.calls.clone(), Rpc::WatchToken);
        match self.admit_watcher(request).await {
            Ok((tokens, recheck)) => Ok(Response::new(WatchResponses {
                tokens: Some(tokens),
                recheck,
                handling,
            })),
            Err(status) => {
                handling.end(status.code());
                Err(status)
            }
        }
    }

    async fn list_accounts(
        &self,
        request: Request<proto::ListAccountsRequest>,
    ) -> Result<Response<proto::ListAccountsResponse>, Status> {
        self.handle(Rpc::ListAccounts, self.answer_list_accounts(request))
            .await
    }
}

/// The WatchToken stream: the broker's [`TokenStream`] in proto form. No task and no channel
/// per watcher: tonic polls it directly. Ends after an error (the account was removed, or the
/// caller may no longer use it) and when the broker drains.
pub struct WatchResponses {
    /// `None` once the stream ended: the watcher goes as soon as it is done with.
    tokens: Option<TokenStream>,
    recheck: Option<Recheck>,
    /// The call, handled when the stream ends (or is dropped: CANCELLED).
    handling: Handling<Arc<CallCounts>>,
}

/// A caller's right to the watched account, checked again before each token.
struct Recheck {
    auth: Authorizer,
    identity: Arc<str>,
    account: String,
}

impl Stream for WatchResponses {
    type Item = Result<proto::WatchTokenResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(tokens) = self.tokens.as_mut() else {
            return Poll::Ready(None);
        };
        let next = std::task::ready!(Pin::new(tokens).poll_next(cx));
        let allowed = |r: &Recheck| r.auth.authorize(&r.identity, &r.account);
        let message = match next {
            Some(Ok(_)) if !self.recheck.as_ref().is_none_or(allowed) => Err(no_longer_allowed()),
            Some(Ok(token)) => Ok(proto::WatchTokenResponse {
                token: Some(token_to_proto(&token)),
            }),
            Some(Err(error)) => Err(Status::from(error)),
            None => {
                self.tokens = None;
                self.handling.end(Code::Ok);
                return Poll::Ready(None);
            }
        };
        if let Err(status) = &message {
            self.tokens = None;
            self.handling.end(status.code());
        }
        Poll::Ready(Some(message))
    }
}
