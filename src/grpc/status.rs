//! The one place where errors become [`tonic::Status`]es: a fixed code per cause, short and
//! stable messages, never an upstream body or a token.

use tonic::{Code, Status};

use crate::{auth::Denied, broker::BrokerError};

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

/// The status of a denied call; `account` is the (bounded) account the caller asked for.
pub(super) fn denied_status(denied: Denied, account: Option<&str>) -> Status {
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

/// A broker that lost an account mid-stream, or a caller that lost the right to it.
pub(super) fn no_longer_allowed() -> Status {
    Status::permission_denied("caller may no longer use this account")
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
    fn every_denial_has_its_code_and_a_short_message() {
        let cases = [
            (
                denied_status(Denied::NO_IDENTITY, None),
                Code::Unauthenticated,
                "unauthenticated: no identity",
            ),
            (
                denied_status(Denied::EXPIRED_TOKEN, Some("fleet-a")),
                Code::Unauthenticated,
                "unauthenticated: expired token",
            ),
            (
                denied_status(Denied::PermissionDenied, Some("fleet-a")),
                Code::PermissionDenied,
                "caller may not use account \"fleet-a\"",
            ),
            (
                denied_status(Denied::PermissionDenied, None),
                Code::PermissionDenied,
                "caller may not use this account",
            ),
        ];
        for (status, code, message) in cases {
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }
}
