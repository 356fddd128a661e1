//! What operators see of an account: its state, expiry, next refresh and recent failures.

use std::time::SystemTime;

use tokio::time::{Duration, Instant};

use super::{BrokerError, metrics::AccountCounts, slot::Slot};
use crate::token::AccountName;

/// An account's health, for ListAccounts, `status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountState {
    /// A valid token; the last fetch succeeded.
    Ready,
    /// A fetch is in progress.
    Refreshing,
    /// A valid token, but refreshing it fails.
    Degraded,
    /// No valid token.
    Failing,
    /// BACE rejected the credentials.
    Rejected,
}

impl AccountState {
    /// Every state, for gauges.
    pub const ALL: [AccountState; 5] = [
        AccountState::Ready,
        AccountState::Refreshing,
        AccountState::Degraded,
        AccountState::Failing,
        AccountState::Rejected,
    ];

    /// Lower-case name, for metrics and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountState::Ready => "ready",
            AccountState::Refreshing => "refreshing",
            AccountState::Degraded => "degraded",
            AccountState::Failing => "failing",
            AccountState::Rejected => "rejected",
        }
    }
}

/// What an operator needs to know about one account. Never a secret or a token.
#[derive(Debug, Clone)]
pub struct AccountStatus {
    /// The account.
    pub account: AccountName,
    /// Its state.
    pub state: AccountState,
    /// When the current token expires, if there is one.
    pub expires_at: Option<SystemTime>,
    /// When the next refresh or retry is planned, if one is.
    pub next_refresh_at: Option<SystemTime>,
    /// How long callers stay served if BACE stays down from now.
    pub survives_outage_for: Duration,
    /// Failed fetches since the last success.
    pub consecutive_failures: u32,
    /// A short class of the last failure, if the last fetch failed.
    pub last_error: Option<&'static str>,
    /// When the last fetch succeeded.
    pub last_success_at: Option<SystemTime>,
    /// WatchToken streams open on the account.
    pub watchers: usize,
    /// Its success counts.
    pub counts: AccountCounts,
}

impl Slot {
    pub(super) fn status(&self, margin: Duration) -> AccountStatus {
        let (now, now_wall) = (Instant::now(), SystemTime::now());
        let to_wall = |at: Instant| now_wall + at.saturating_duration_since(now);
        let state = self.lock();
        let token = self.token.current();
        let servable_until = token
            .as_ref()
            .and_then(|t| t.expires_at().checked_sub(margin));
        let survives =
            servable_until.map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        let failing = state.failing.as_deref();
        let last_error = failing.and_then(|f| f.last_error.as_ref());
        let rejected = matches!(last_error, Some(BrokerError::CredentialsRejected { .. }));
        let kind = if state.flight.is_some() {
            AccountState::Refreshing
        } else if rejected {
            AccountState::Rejected
        } else if survives.is_zero() {
            AccountState::Failing
        } else if failing.is_some_and(|f| f.failures > 0) {
            AccountState::Degraded
        } else {
            AccountState::Ready
        };
        AccountStatus {
            account: self.account.name.clone(),
            state: kind,
            expires_at: token.map(|t| t.expires_at_wall()),
            next_refresh_at: state.next_due.filter(|at| *at > now).map(to_wall),
            survives_outage_for: survives,
            consecutive_failures: failing.map_or(0, |f| f.failures + f.rejections),
            last_error: last_error.map(BrokerError::class),
            last_success_at: state.last_success_at,
            watchers: self.token.watchers(),
            counts: self.counters.snapshot(),
        }
    }
}
