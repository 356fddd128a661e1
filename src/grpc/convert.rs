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

/// The largest `seconds` of a well-formed `google.protobuf.Duration` (10,000 years), as
/// `duration.proto` defines it.
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// `min_validity` as a duration: unset is zero; negative or malformed is INVALID_ARGUMENT.
///
/// Well-formed is what `duration.proto` says: `nanos` within ±999,999,999 and of the sign of
/// `seconds` (or zero), `seconds` within ±315,576,000,000. The check is made here, on the
/// fields as sent: prost's conversion normalizes first, so it would take `seconds: 1,
/// nanos: -5` for 0.999999995 s and `nanos: 2e9` for 2 s.
pub(crate) fn min_validity(d: Option<prost_types::Duration>) -> Result<Duration, Status> {
    let Some(prost_types::Duration { seconds, nanos }) = d else {
        return Ok(Duration::ZERO);
    };
    let malformed = !(-999_999_999..=999_999_999).contains(&nanos)
        || !(-MAX_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&seconds)
        || (seconds > 0 && nanos < 0)
        || (seconds < 0 && nanos > 0);
    if malformed {
        return Err(Status::invalid_argument(
            "min_validity is not a well-formed duration",
        ));
    }
    match (u64::try_from(seconds), u32::try_from(nanos)) {
        (Ok(seconds), Ok(nanos)) => Ok(Duration::new(seconds, nanos)),
        _ => Err(Status::invalid_argument(
            "min_validity must not be negative",
        )),
    }
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
    use proptest::prelude::*;
    use tonic::Code;

    use super::*;

    #[test]
    fn min_validity_rules() {
        assert_eq!(min_validity(None).unwrap(), Duration::ZERO);
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        let ok = [
            (0, 0, Duration::ZERO),
            (30, 0, Duration::from_secs(30)),
            (0, 5, Duration::from_nanos(5)),
            (1, 999_999_999, Duration::new(1, 999_999_999)),
            (
                MAX_DURATION_SECONDS,
                999_999_999,
                Duration::new(315_576_000_000, 999_999_999),
            ),
        ];
        for (seconds, nanos, want) in ok {
            assert_eq!(
                min_validity(d(seconds, nanos)).unwrap(),
                want,
                "{seconds} {nanos}"
            );
        }
        let refused = [
            // Negative.
            (-1, 0, "must not be negative"),
            (0, -5, "must not be negative"),
            (-1, -5, "must not be negative"),
            (-MAX_DURATION_SECONDS, -999_999_999, "must not be negative"),
            // Mixed signs (prost would normalize these into a duration).
            (1, -5, "not a well-formed duration"),
            (-1, 5, "not a well-formed duration"),
            // Nanos out of range.
            (0, 1_000_000_000, "not a well-formed duration"),
            (0, i32::MAX, "not a well-formed duration"),
            (0, -1_000_000_000, "not a well-formed duration"),
            (0, i32::MIN, "not a well-formed duration"),
            // Seconds past 10,000 years.
            (MAX_DURATION_SECONDS + 1, 0, "not a well-formed duration"),
            (i64::MAX, 999_999_999, "not a well-formed duration"),
            (i64::MIN, 0, "not a well-formed duration"),
        ];
        for (seconds, nanos, message) in refused {
            let status = min_validity(d(seconds, nanos)).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{seconds} {nanos}");
            assert!(
                status.message().contains(message),
                "{seconds} {nanos}: {status:?}"
            );
            assert!(status.message().starts_with("min_validity "));
        }
    }

    proptest! {
        #![proptest_config(crate::proptest_config())]

        /// Every well-formed, non-negative duration is taken at its exact value.
        #[test]
        fn min_validity_takes_well_formed_durations(
            seconds in 0..=MAX_DURATION_SECONDS,
            nanos in 0..=999_999_999i32,
        ) {
            let got = min_validity(Some(prost_types::Duration { seconds, nanos })).unwrap();
            prop_assert_eq!(got, Duration::new(seconds as u64, nanos as u32));
        }

        /// Any pair of fields: accepted exactly when well-formed and non-negative, and then
        /// as `seconds + nanos`; never a panic.
        #[test]
        fn min_validity_accepts_exactly_the_well_formed(seconds: i64, nanos: i32) {
            let result = min_validity(Some(prost_types::Duration { seconds, nanos }));
            let valid = (0..=MAX_DURATION_SECONDS).contains(&seconds)
                && (0..=999_999_999).contains(&nanos);
            match result {
                Ok(d) => {
                    prop_assert!(valid);
                    prop_assert_eq!(d.as_secs() as i64, seconds);
                    prop_assert_eq!(d.subsec_nanos() as i32, nanos);
                }
                Err(status) => {
                    prop_assert!(!valid);
                    prop_assert_eq!(status.code(), Code::InvalidArgument);
                    prop_assert!(status.message().len() < 120);
                }
            }
        }
    }
}
