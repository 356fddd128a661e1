//! The gRPC adapter: turns `TokenBrokerService` requests into [`Broker`] calls, and is the one
//! place where broker errors become [`tonic::Status`]es (short, stable messages; never an
//! upstream body or a token).

use std::sync::Arc;

use tokio::time::Duration;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, warn};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    auth::{Authorizer, Denied},
    broker::{AccountState, AccountStatus, Broker, BrokerError, InvalidateOutcome},
    metrics::{AccountLabel, CallLabels, OutcomeLabels, ReasonLabels},
    proto::{self, token_broker_service_server::TokenBrokerService},
    tls::TlsConnInfo,
    token::Token,
};

/// The `bace.tokenbroker.v1.TokenBrokerService` implementation.
#[derive(Clone)]
pub struct TokenBrokerApi {
    broker: Broker,
    auth: Option<Authorizer>,
}

impl TokenBrokerApi {
    /// Serves `broker` (and records calls in its metrics); with `auth`, every call needs an
    /// identity allowed the account it names.
    pub fn new(broker: Broker, auth: Option<Authorizer>) -> Self {
        Self { broker, auth }
    }

    /// Checks the caller of `request` (when auth is on): its identity, and, with `account`,
    /// that it may use that account. The check comes before any account lookup, so callers
    /// cannot learn which accounts exist. Returns the identity.
    async fn admit<T>(
        &self,
        rpc: &'static str,
        request: &Request<T>,
        account: Option<&str>,
    ) -> Result<Option<String>, Status> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let certs = request
            .extensions()
            .get::<TlsConnInfo>()
            .and_then(|info| info.peer_certs.clone());
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let identity = auth
            .authenticate(authorization, certs.as_deref().map(Vec::as_slice))
            .await
            .map_err(|denied| self.deny(rpc, None, account, denied))?;
        if let Some(account) = account
            && !auth.authorize(&identity, account)
        {
            return Err(self.deny(
                rpc,
                Some(&identity),
                Some(account),
                Denied::PermissionDenied,
            ));
        }
        Ok(Some(identity))
    }

    fn deny(
        &self,
        rpc: &'static str,
        caller: Option<&str>,
        account: Option<&str>,
        denied: Denied,
    ) -> Status {
        let account: Option<String> =
            account.map(|a| a.chars().take(crate::token::MAX_ACCOUNT_NAME_LEN).collect());
        warn!(
            rpc,
            caller,
            ?account,
            reason = denied.reason(),
            "call denied"
        );
        self.broker
            .metrics()
            .auth_denied
            .get_or_create(&ReasonLabels {
                reason: denied.reason(),
            })
            .inc();
        match denied {
            Denied::Unauthenticated(reason) => {
                Status::unauthenticated(format!("unauthenticated: {reason}"))
            }
            Denied::PermissionDenied => Status::permission_denied(match account {
                Some(a) => format!("caller may not use account {a:?}"),
                None => "caller may not use this account".to_owned(),
            }),
        }
    }

    /// The metrics label of a requested account: configured ones by name, others lumped.
    fn account_label(&self, account: &str, token: Option<&Token>) -> AccountLabel {
        match token {
            Some(t) => AccountLabel::Known(t.account().clone()),
            None => self
                .broker
                .account_name(account)
                .map_or(AccountLabel::Unknown, AccountLabel::Known),
        }
    }
}

/// The canonical name of a gRPC code, for metrics.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        let code = match &error {
            BrokerError::InvalidAccountName(_) => Code::InvalidArgument,
            BrokerError::UnknownAccount(_) => Code::NotFound,
            BrokerError::ValidityOutOfRange { .. } => Code::OutOfRange,
            BrokerError::CredentialsRejected { .. } => Code::FailedPrecondition,
            BrokerError::Unavailable { .. } | BrokerError::ShuttingDown => Code::Unavailable,
        };
        Status::new(code, error.to_string())
    }
}

/// The wire form of a token.
pub fn token_to_proto(token: &Token) -> proto::Token {
    proto::Token {
        account: token.account().as_str().to_owned(),
        access_token: token.expose_access().to_owned(),
        token_type: "Bearer".to_owned(),
        expires_at: Some(prost_types::Timestamp::from(token.expires_at_wall())),
        authorization: token.expose_authorization().to_owned(),
    }
}

/// The GetToken answer, encoded straight from the broker's token.
///
/// On the wire it is `GetTokenResponse { token: Some(token_to_proto(token)) }`, byte for byte
/// (tested), but serving it builds no message: no copies of the account, the access token and
/// the authorization value per call, just their bytes written into the response buffer.
/// GetToken is the hot path. Encode-only: decoding skips every field (clients decode
/// [`proto::GetTokenResponse`]).
#[derive(Default)]
pub struct GetTokenReply(Option<Arc<Token>>);

impl GetTokenReply {
    /// The answer carrying `token`.
    pub fn new(token: Arc<Token>) -> Self {
        Self(Some(token))
    }

    /// Token type of every token (field 3).
    const TOKEN_TYPE: &str = "Bearer";

    fn expires_at(token: &Token) -> prost_types::Timestamp {
        prost_types::Timestamp::from(token.expires_at_wall())
    }

    /// The encoded length of the `Token` message (without its key and length).
    fn token_len(token: &Token) -> usize {
        use prost::encoding::message;
        str_field_len(1, token.account().as_str())
            + str_field_len(2, token.expose_access())
            + str_field_len(3, Self::TOKEN_TYPE)
            + message::encoded_len(4, &Self::expires_at(token))
            + str_field_len(5, token.expose_authorization())
    }
}

impl prost::Message for GetTokenReply {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        use prost::encoding::{WireType, encode_key, encode_varint, message};
        let Some(token) = &self.0 else { return };
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(Self::token_len(token) as u64, buf);
        put_str_field(1, token.account().as_str(), buf);
        put_str_field(2, token.expose_access(), buf);
        put_str_field(3, Self::TOKEN_TYPE, buf);
        message::encode(4, &Self::expires_at(token), buf);
        put_str_field(5, token.expose_authorization(), buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.as_deref().map_or(0, |token| {
            let len = Self::token_len(token);
            prost::encoding::key_len(1) + prost::encoding::encoded_len_varint(len as u64) + len
        })
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

impl std::fmt::Debug for GetTokenReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token's own Debug redacts its secrets.
        f.debug_tuple("GetTokenReply").field(&self.0).finish()
    }
}

/// Length of a proto3 `string` field (absent when empty).
fn str_field_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        return 0;
    }
    prost::encoding::key_len(tag)
        + prost::encoding::encoded_len_varint(value.len() as u64)
        + value.len()
}

/// Writes a proto3 `string` field (nothing when empty).
fn put_str_field(tag: u32, value: &str, buf: &mut impl prost::bytes::BufMut) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    if value.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value.as_bytes());
}

/// `min_validity` as a duration: unset is zero; negative or malformed is INVALID_ARGUMENT.
fn min_validity(d: Option<prost_types::Duration>) -> Result<Duration, Status> {
    let Some(d) = d else {
        return Ok(Duration::ZERO);
    };
    Duration::try_from(d).map_err(|_| {
        Status::invalid_argument("min_validity must be a non-negative, well-formed duration")
    })
}

/// Logs a failed call (at debug: callers see the status; the broker logs upstream trouble
/// itself) without echoing unbounded caller input.
fn log_failure(rpc: &'static str, account: &str, status: &Status) {
    let account: String = account
        .chars()
        .take(crate::token::MAX_ACCOUNT_NAME_LEN)
        .collect();
    debug!(rpc, ?account, code = ?status.code(), message = status.message(), "call failed");
}

#[tonic::async_trait]
impl TokenBrokerService for TokenBrokerApi {
    async fn get_token(
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
            self.broker
                .metrics()
                .get_token
                .get_or_create(&CallLabels {
                    account: self.account_label(&request.account, None),
                    code: code_name(status.code()),
                })
                .inc();
        }
        Ok(Response::new(GetTokenReply::new(result?)))
    }

    async fn invalidate(
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
        let account = self.account_label(&request.account, token);
        self.broker
            .metrics()
            .invalidate
            .get_or_create(&OutcomeLabels { account, outcome })
            .inc();
        let answer = result?;
        Ok(Response::new(proto::InvalidateResponse {
            invalidated: answer.invalidated(),
            token: Some(token_to_proto(&answer.token)),
            outcome: outcome_to_proto(answer.outcome) as i32,
        }))
    }

    type WatchTokenStream = ReceiverStream<Result<proto::WatchTokenResponse, Status>>;

    async fn watch_token(
        &self,
        request: Request<proto::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let identity = self
            .admit("WatchToken", &request, Some(&request.get_ref().account))
            .await?;
        let account = request.into_inner().account;
        // The allow list may change while the stream is open: check again before each send.
        let still_allowed = {
            let (auth, account) = (self.auth.clone(), account.clone());
            move || match (&auth, &identity) {
                (Some(auth), Some(id)) => auth.authorize(id, &account),
                _ => true,
            }
        };
        let mut watch = self.broker.watch(&account).inspect_err(|e| {
            log_failure("WatchToken", &account, &Status::from(e.clone()));
        })?;
        // One small task per watcher moves tokens from the broker's watch channel to the
        // stream; it ends when the caller goes away, the broker stops or the account is removed.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = watch.next() => next,
                    () = tx.closed() => return,
                };
                let message = match next {
                    Some(Ok(_)) if !still_allowed() => Err(Status::permission_denied(
                        "caller may no longer use this account",
                    )),
                    Some(Ok(token)) => Ok(proto::WatchTokenResponse {
                        token: Some(token_to_proto(&token)),
                    }),
                    Some(Err(error)) => Err(Status::from(error)),
                    None => return,
                };
                let last = message.is_err();
                if tx.send(message).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_accounts(
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
        Ok(Response::new(proto::ListAccountsResponse { accounts }))
    }
}

fn outcome_to_proto(outcome: InvalidateOutcome) -> proto::InvalidateOutcome {
    match outcome {
        InvalidateOutcome::Invalidated => proto::InvalidateOutcome::Invalidated,
        InvalidateOutcome::AlreadyReplaced => proto::InvalidateOutcome::AlreadyReplaced,
        InvalidateOutcome::TokenValid => proto::InvalidateOutcome::TokenValid,
        InvalidateOutcome::Cooldown => proto::InvalidateOutcome::Cooldown,
    }
}

/// The wire form of an account's status.
pub fn status_to_proto(s: &AccountStatus) -> proto::AccountStatus {
    let state = match s.state {
        AccountState::Ready => proto::AccountState::Ready,
        AccountState::Refreshing => proto::AccountState::Refreshing,
        AccountState::Degraded => proto::AccountState::Degraded,
        AccountState::Failing => proto::AccountState::Failing,
        AccountState::Rejected => proto::AccountState::Rejected,
    };
    proto::AccountStatus {
        account: s.account.to_string(),
        state: state as i32,
        expires_at: s.expires_at.map(prost_types::Timestamp::from),
        next_refresh_at: s.next_refresh_at.map(prost_types::Timestamp::from),
        survives_outage_for: prost_types::Duration::try_from(s.survives_outage_for).ok(),
        consecutive_failures: s.consecutive_failures,
        last_error: s.last_error.unwrap_or_default().to_owned(),
        last_success_at: s.last_success_at.map(prost_types::Timestamp::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{AccountName, AccountNameError};
    use prost::Message;
    use secrecy::SecretString;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn get_token_reply_encodes_exactly_as_the_generated_message() {
        let times = [
            UNIX_EPOCH,                                      // zero timestamp fields
            UNIX_EPOCH + Duration::from_secs(1_800_000_000), // whole seconds
            SystemTime::now(),                               // with nanoseconds
        ];
        let names = ["a", "fleet-a", &"n".repeat(128)];
        // Lengths around the one-byte varint limit (127) and beyond.
        let accesses = [
            "x".to_owned(),
            "8a0b".repeat(10),
            "t".repeat(120),
            "u".repeat(300),
        ];
        for (i, access) in accesses.iter().enumerate() {
            for (j, name) in names.iter().enumerate() {
                let now = tokio::time::Instant::now();
                let lifetime = Duration::from_secs(86_400);
                let wall = times[(i + j) % times.len()];
                let refresh = (i % 2 == 0).then(|| SecretString::from("r".repeat(40)));
                let token = Arc::new(Token::new(
                    AccountName::new(name).unwrap(),
                    SecretString::from(access.clone()),
                    refresh,
                    lifetime,
                    now,
                    wall,
                ));
                let expected = proto::GetTokenResponse {
                    token: Some(token_to_proto(&token)),
                }
                .encode_to_vec();
                let reply = GetTokenReply::new(token.clone());
                assert_eq!(reply.encode_to_vec(), expected, "{name} / {}", access.len());
                assert_eq!(reply.encoded_len(), expected.len());
                let decoded = proto::GetTokenResponse::decode(&*reply.encode_to_vec()).unwrap();
                assert_eq!(decoded.token.unwrap().access_token, *access);
                if access.len() >= 40 {
                    assert!(!format!("{reply:?}").contains(access.as_str()));
                }
            }
        }
        let mut reply = GetTokenReply::default();
        assert!(reply.encode_to_vec().is_empty());
        reply.clear();
        assert_eq!(reply.encoded_len(), 0);
    }

    #[test]
    fn every_broker_error_has_its_code_and_a_short_message() {
        let a = || AccountName::new("fleet-a").unwrap();
        let cases = [
            (
                BrokerError::InvalidAccountName(AccountNameError::Empty),
                Code::InvalidArgument,
                "invalid account name: account name is empty",
            ),
            (
                BrokerError::UnknownAccount("nope".into()),
                Code::NotFound,
                "unknown account \"nope\"",
            ),
            (
                BrokerError::ValidityOutOfRange { account: a() },
                Code::OutOfRange,
                "no token for account \"fleet-a\" stays valid that long (min_validity too long)",
            ),
            (
                BrokerError::CredentialsRejected { account: a() },
                Code::FailedPrecondition,
                "BACE rejected the credentials of account \"fleet-a\"; the next login waits for a backoff",
            ),
            (
                BrokerError::Unavailable {
                    account: a(),
                    reason: "upstream timeout",
                },
                Code::Unavailable,
                "BACE is unavailable for account \"fleet-a\" (upstream timeout)",
            ),
            (
                BrokerError::ShuttingDown,
                Code::Unavailable,
                "the broker is shutting down",
            ),
        ];
        for (error, code, message) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn min_validity_rules() {
        assert_eq!(min_validity(None).unwrap(), Duration::ZERO);
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(min_validity(d(30, 0)).unwrap(), Duration::from_secs(30));
        assert_eq!(
            min_validity(d(-1, 0)).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            min_validity(d(0, -5)).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
