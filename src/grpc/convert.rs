//! Between the wire and the broker: proto messages from broker values, and request fields
//! checked into broker arguments.

use tokio::time::Duration;
use tonic::Status;

use crate::{
    broker::{AccountState, AccountStatus, InvalidateOutcome},
    proto,
    token::Token,
};

/// The wire form of a token.
pub(crate) fn token_to_proto(token: &Token) -> proto::Token {
    proto::Token {
        account: token.account().as_str().to_owned(),
        access_token: token.expose_access().to_owned(),
        token_type: "Bearer".to_owned(),
        expires_at: Some(prost_types::Timestamp::from(token.expires_at_wall())),
        authorization: token.expose_authorization().to_owned(),
    }
}

/// `min_validity` as a duration: unset is zero; negative or malformed is INVALID_ARGUMENT.
pub(super) fn min_validity(d: Option<prost_types::Duration>) -> Result<Duration, Status> {
    let Some(d) = d else {
        return Ok(Duration::ZERO);
    };
    Duration::try_from(d).map_err(|_| {
        Status::invalid_argument("min_validity must be a non-negative, well-formed duration")
    })
}

pub(super) fn outcome_to_proto(outcome: InvalidateOutcome) -> proto::InvalidateOutcome {
    match outcome {
        InvalidateOutcome::Invalidated => proto::InvalidateOutcome::Invalidated,
        InvalidateOutcome::AlreadyReplaced => proto::InvalidateOutcome::AlreadyReplaced,
        InvalidateOutcome::TokenValid => proto::InvalidateOutcome::TokenValid,
        InvalidateOutcome::Cooldown => proto::InvalidateOutcome::Cooldown,
    }
}

/// The wire form of an account's status.
pub(crate) fn status_to_proto(s: &AccountStatus) -> proto::AccountStatus {
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
    use tonic::Code;

    use super::*;

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
