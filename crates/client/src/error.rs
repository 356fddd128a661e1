//! The one error type of the client, following the broker's status table (README, "Status codes
//! and what a caller should do").

use tonic::Code;

/// What went wrong when asking the broker for a token.
///
/// Each variant is one row of the broker's status table; [`Error::is_retryable`] says whether
/// trying again later can help. Messages come from the broker (short and stable, never a token)
/// or from the transport; no variant ever holds a token or a credential, so `Display` and
/// `Debug` are safe to log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `INVALID_ARGUMENT`: an empty or malformed account name, a negative `min_validity`.
    /// Fix the request.
    #[error("invalid request: {message}")]
    InvalidArgument {
        /// The broker's message.
        message: String,
    },
    /// `NOT_FOUND`: the account is not configured in the broker. Fix the account name or the
    /// broker's config.
    #[error("unknown account: {message}")]
    UnknownAccount {
        /// The broker's message.
        message: String,
    },
    /// `OUT_OF_RANGE`: `min_validity` is longer than any BACE token can last. Ask for less.
    #[error("min_validity out of range: {message}")]
    OutOfRange {
        /// The broker's message.
        message: String,
    },
    /// `FAILED_PRECONDITION`: BACE rejected the account's credentials. Retrying soon won't help;
    /// the credentials need fixing.
    #[error("BACE rejected the account's credentials: {message}")]
    CredentialsRejected {
        /// The broker's message.
        message: String,
    },
    /// `UNAVAILABLE` answered by the broker: BACE is unreachable or failing and the broker holds
    /// no valid token. Retry with backoff.
    #[error("BACE is unavailable and the broker has no valid token: {message}")]
    UpstreamUnavailable {
        /// The broker's message.
        message: String,
    },
    /// The broker itself could not be reached (connection refused, TLS failure, connection
    /// lost). Retry with backoff.
    #[error("the broker cannot be reached: {message}")]
    BrokerUnreachable {
        /// What the transport reported.
        message: String,
    },
    /// `DEADLINE_EXCEEDED` or `CANCELLED`: the call's deadline passed (tonic reports an expired
    /// deadline as `CANCELLED "Timeout expired"`). The broker's upstream call goes on; retry.
    #[error("the call timed out or was cancelled: {message}")]
    Timeout {
        /// The broker's or the transport's message.
        message: String,
    },
    /// `UNAUTHENTICATED`: the broker refused this caller's identity (no or an invalid client
    /// certificate or service-account token).
    #[error("the broker refused the caller's identity: {message}")]
    Unauthenticated {
        /// The broker's message (e.g. `expired token`).
        message: String,
    },
    /// `PERMISSION_DENIED`: this caller may not use the account (the broker answers the same
    /// for accounts that do not exist, so callers cannot enumerate them).
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// The broker's message.
        message: String,
    },
    /// Any other status, or an answer that breaks the API's contract (e.g. OK without a token).
    #[error("unexpected answer from the broker ({code:?}): {message}")]
    Broker {
        /// The gRPC status code.
        code: Code,
        /// The broker's message, or what was wrong with the answer.
        message: String,
    },
    /// The client's own configuration is unusable: a bad endpoint, an unreadable certificate,
    /// key or token file.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether trying again (with backoff) can succeed without anything being fixed:
    /// [`UpstreamUnavailable`](Error::UpstreamUnavailable),
    /// [`BrokerUnreachable`](Error::BrokerUnreachable), [`Timeout`](Error::Timeout), and
    /// unexpected `UNAVAILABLE`, `RESOURCE_EXHAUSTED` or `ABORTED` answers. Not `INTERNAL`: that
    /// code also stands for an answer that broke the API's contract, which asking again does
    /// not fix (the Python client agrees).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::UpstreamUnavailable { .. }
            | Error::BrokerUnreachable { .. }
            | Error::Timeout { .. } => true,
            Error::Broker { code, .. } => matches!(
                code,
                Code::Unavailable | Code::ResourceExhausted | Code::Aborted
            ),
            _ => false,
        }
    }

    /// The gRPC code the error stands for; `None` for [`Error::Config`] and
    /// [`Error::BrokerUnreachable`] (no answer from the broker).
    pub fn code(&self) -> Option<Code> {
        Some(match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::UnknownAccount { .. } => Code::NotFound,
            Error::OutOfRange { .. } => Code::OutOfRange,
            Error::CredentialsRejected { .. } => Code::FailedPrecondition,
            Error::UpstreamUnavailable { .. } => Code::Unavailable,
            Error::Timeout { .. } => Code::DeadlineExceeded,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::Broker { code, .. } => *code,
            Error::BrokerUnreachable { .. } | Error::Config(_) => return None,
        })
    }

    /// An answer that breaks the API's contract.
    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::Broker {
            code: Code::Internal,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            // A status the client made up from a transport error (no answer from the broker)
            // carries that error as its source.
            Code::Unavailable | Code::Unknown if std::error::Error::source(&status).is_some() => {
                Error::BrokerUnreachable {
                    message: chain(&status),
                }
            }
            Code::InvalidArgument => Error::InvalidArgument { message },
            Code::NotFound => Error::UnknownAccount { message },
            Code::OutOfRange => Error::OutOfRange { message },
            Code::FailedPrecondition => Error::CredentialsRejected { message },
            Code::Unavailable => Error::UpstreamUnavailable { message },
            Code::DeadlineExceeded | Code::Cancelled => Error::Timeout { message },
            Code::Unauthenticated => Error::Unauthenticated { message },
            Code::PermissionDenied => Error::PermissionDenied { message },
            code => Error::Broker { code, message },
        }
    }
}

/// The status message and its sources, `: `-separated (transport errors say little at the top).
fn chain(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row per status of the broker's table: the variant, retryable or not, the code back.
    #[test]
    fn statuses_map_to_the_table() {
        let cases = [
            (Code::InvalidArgument, "InvalidArgument", false),
            (Code::NotFound, "UnknownAccount", false),
            (Code::OutOfRange, "OutOfRange", false),
            (Code::FailedPrecondition, "CredentialsRejected", false),
            (Code::Unavailable, "UpstreamUnavailable", true),
            (Code::DeadlineExceeded, "Timeout", true),
            (Code::Cancelled, "Timeout", true),
            (Code::Unauthenticated, "Unauthenticated", false),
            (Code::PermissionDenied, "PermissionDenied", false),
            (Code::Internal, "Broker", false),
            (Code::ResourceExhausted, "Broker", true),
            (Code::Aborted, "Broker", true),
            (Code::Unimplemented, "Broker", false),
        ];
        for (code, variant, retryable) in cases {
            let e = Error::from(tonic::Status::new(code, "the message"));
            let debug = format!("{e:?}");
            assert!(debug.starts_with(variant), "{code:?} gave {debug}");
            assert_eq!(e.is_retryable(), retryable, "{code:?}");
            assert!(e.to_string().contains("the message"), "{e}");
            let back = e.code().unwrap();
            let same = back == code || (code == Code::Cancelled && back == Code::DeadlineExceeded);
            assert!(same, "{code:?} came back as {back:?}");
        }
    }

    #[test]
    fn a_transport_failure_is_broker_unreachable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = tonic::Status::from_error(Box::new(io));
        let e = Error::from(status);
        assert!(matches!(e, Error::BrokerUnreachable { .. }), "{e:?}");
        assert!(e.is_retryable());
        assert!(e.to_string().contains("refused"), "{e}");
        assert_eq!(e.code(), None);
    }

    #[test]
    fn a_protocol_error_is_not_retryable() {
        let e = Error::protocol("the broker answered GetToken without a token");
        assert_eq!(e.code(), Some(Code::Internal));
        assert!(!e.is_retryable());
    }
}
