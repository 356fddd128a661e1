//! The gRPC adapter: turns `TokenBrokerService` requests into [`Broker`] calls, and is the one
//! place where broker errors become [`tonic::Status`]es (short, stable messages; never an
//! upstream body or a token).

use std::sync::Arc;

use secrecy::ExposeSecret;
use tokio::time::Duration;
use tonic::{Code, Request, Response, Status};
use tracing::debug;

use crate::{
    broker::{Broker, BrokerError},
    proto::{self, token_broker_service_server::TokenBrokerService},
    token::Token,
};

/// The `bace.tokenbroker.v1.TokenBrokerService` implementation.
#[derive(Clone)]
pub struct TokenBrokerApi {
    broker: Broker,
}

impl TokenBrokerApi {
    /// Serves `broker`.
    pub fn new(broker: Broker) -> Self {
        Self { broker }
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
        access_token: token.access().expose_secret().to_owned(),
        token_type: "Bearer".to_owned(),
        expires_at: Some(prost_types::Timestamp::from(token.expires_at_wall())),
        authorization: token.authorization().expose_secret().to_owned(),
    }
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
    debug!(rpc, %account, code = ?status.code(), message = status.message(), "call failed");
}

#[tonic::async_trait]
impl TokenBrokerService for TokenBrokerApi {
    async fn get_token(
        &self,
        request: Request<proto::GetTokenRequest>,
    ) -> Result<Response<proto::GetTokenResponse>, Status> {
        let request = request.into_inner();
        let result = async {
            let min = min_validity(request.min_validity)?;
            let token: Arc<Token> = self.broker.get_token(&request.account, min).await?;
            Ok(proto::GetTokenResponse {
                token: Some(token_to_proto(&token)),
            })
        }
        .await;
        result
            .map(Response::new)
            .inspect_err(|s| log_failure("GetToken", &request.account, s))
    }

    async fn invalidate(
        &self,
        request: Request<proto::InvalidateRequest>,
    ) -> Result<Response<proto::InvalidateResponse>, Status> {
        let request = request.into_inner();
        let result = self
            .broker
            .invalidate(&request.account, &request.access_token)
            .await
            .map(|outcome| proto::InvalidateResponse {
                invalidated: outcome.invalidated,
                token: Some(token_to_proto(&outcome.token)),
            })
            .map_err(Status::from);
        result
            .map(Response::new)
            .inspect_err(|s| log_failure("Invalidate", &request.account, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{AccountName, AccountNameError};

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
