//! When to refresh and how long to back off: pure functions of their inputs (jitter is passed
//! in), so every edge is unit-tested without clocks or randomness.

use std::time::SystemTime;

use tokio::time::Duration;

/// Share of the jittered refresh point that may move: ±5 % of the scheduled delay, so tokens
/// obtained together (warm-up) do not all refresh in the same instant.
pub(crate) const REFRESH_JITTER: f64 = 0.05;

/// Refreshes are never scheduled sooner than this after a token was obtained, whatever its
/// lifetime, so a pathological upstream cannot make the broker spin.
pub(crate) const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);

/// The lifetime assumed for a password-grant answer without `expires_in` (BACE documents 24 h).
pub(crate) const DEFAULT_LOGIN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How long after obtaining a token with `lifetime` the broker refreshes it.
///
/// `fraction` of the lifetime, moved by `jitter` (in `[-1, 1]`, scaled to ±[`REFRESH_JITTER`]),
/// and never later than the point where the token stops being served (`lifetime - margin`).
/// Tokens too short-lived to be served at all are refreshed after [`MIN_REFRESH_DELAY`].
pub(crate) fn refresh_delay(
    lifetime: Duration,
    fraction: f64,
    margin: Duration,
    jitter: f64,
) -> Duration {
    let servable = lifetime.saturating_sub(margin);
    let factor = fraction * (1.0 + REFRESH_JITTER * jitter.clamp(-1.0, 1.0));
    let planned = lifetime.mul_f64(factor.clamp(0.0, 1.0));
    // Leave a little of the servable window for the refresh itself to complete.
    let latest = servable.mul_f64(0.95);
    planned.min(latest).max(MIN_REFRESH_DELAY)
}

/// Capped exponential backoff with "equal jitter": after `failures` consecutive failures
/// (1 for the first), wait between half and all of `initial * 2^(failures-1)`, capped at `max`.
/// `jitter` in `[0, 1]` picks the point in that range.
pub(crate) fn backoff(failures: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let full = initial.saturating_mul(1u32 << exp.min(31)).min(max);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Backoff after BACE rejected an account's credentials: `base`, doubling with each further
/// rejection, capped at eight times `base`. No jitter needed: one account, one timer.
pub(crate) fn rejected_backoff(rejections: u32, base: Duration) -> Duration {
    let exp = rejections.saturating_sub(1).min(3);
    base.saturating_mul(1 << exp)
}

/// The lifetime to grant a token that BACE says it extended until `expires` (if it said so in a
/// form we could read), measured from `now`: the earlier of that instant and `now + cap`.
///
/// `Err` carries the fallback lifetime (`cap`) when `expires` is missing, unreadable or not in the
/// future; the caller logs a warning.
pub(crate) fn refreshed_lifetime(
    expires: Option<SystemTime>,
    now: SystemTime,
    cap: Duration,
) -> Result<Duration, Duration> {
    match expires.map(|e| e.duration_since(now)) {
        Some(Ok(left)) if !left.is_zero() => Ok(left.min(cap)),
        _ => Err(cap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn refresh_at_fraction_with_bounded_jitter() {
        let day = S(86_400);
        assert_eq!(refresh_delay(day, 0.6, S(10), 0.0), day.mul_f64(0.6));
        let early = refresh_delay(day, 0.6, S(10), -1.0);
        let late = refresh_delay(day, 0.6, S(10), 1.0);
        assert_eq!(early, day.mul_f64(0.6 * 0.95));
        assert_eq!(late, day.mul_f64(0.6 * 1.05));
        // Out-of-range jitter is clamped.
        assert_eq!(refresh_delay(day, 0.6, S(10), 7.0), late);
    }

    #[test]
    fn refresh_never_after_the_token_stops_being_served() {
        // fraction 0.99 of 100 s would be 99 s, but the token is served only until 90 s.
        let d = refresh_delay(S(100), 0.99, S(10), 0.0);
        assert!(d < S(90), "{d:?}");
        assert_eq!(d, S(90).mul_f64(0.95));
    }

    #[test]
    fn refresh_edges() {
        // Already unservable (lifetime below margin) and zero lifetime: minimum delay, no spin.
        assert_eq!(refresh_delay(S(5), 0.6, S(10), 0.0), MIN_REFRESH_DELAY);
        assert_eq!(
            refresh_delay(Duration::ZERO, 0.6, S(10), 0.0),
            MIN_REFRESH_DELAY
        );
        // Huge lifetime: no overflow.
        let huge = refresh_delay(S(u64::MAX / 4), 0.6, S(10), 1.0);
        assert!(huge > S(u64::MAX / 8));
        // 14 days.
        let d = refresh_delay(S(14 * 86_400), 0.6, S(10), 0.0);
        assert_eq!(d, S(14 * 86_400).mul_f64(0.6));
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let (i, m) = (S(1), S(60));
        assert_eq!(backoff(1, i, m, 1.0), S(1));
        assert_eq!(backoff(1, i, m, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(2, i, m, 1.0), S(2));
        assert_eq!(backoff(4, i, m, 1.0), S(8));
        assert_eq!(backoff(7, i, m, 1.0), S(60));
        assert_eq!(backoff(u32::MAX, i, m, 1.0), S(60));
        assert_eq!(backoff(u32::MAX, i, m, 0.0), S(30));
        assert_eq!(backoff(0, i, m, 1.0), S(1));
    }

    #[test]
    fn rejected_backoff_doubles_to_eight_times() {
        let b = S(300);
        assert_eq!(rejected_backoff(1, b), S(300));
        assert_eq!(rejected_backoff(2, b), S(600));
        assert_eq!(rejected_backoff(4, b), S(2400));
        assert_eq!(rejected_backoff(100, b), S(2400));
    }

    #[test]
    fn refreshed_lifetime_is_the_earlier_of_answer_and_cap() {
        let now = SystemTime::UNIX_EPOCH + S(1_000_000);
        let cap = S(14 * 86_400);
        assert_eq!(
            refreshed_lifetime(Some(now + S(3600)), now, cap),
            Ok(S(3600))
        );
        assert_eq!(
            refreshed_lifetime(Some(now + S(30 * 86_400)), now, cap),
            Ok(cap)
        );
        assert_eq!(refreshed_lifetime(Some(now), now, cap), Err(cap));
        assert_eq!(refreshed_lifetime(Some(now - S(5)), now, cap), Err(cap));
        assert_eq!(refreshed_lifetime(None, now, cap), Err(cap));
    }
}
