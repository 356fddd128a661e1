//! What the broker counts about its own work, in plain types: no registry, no exporter.
//! [`telemetry`](crate::telemetry) reads these at scrape time.
//!
//! The common outcomes are counted per account in the slot ([`AccountCounters`]): a label-map
//! entry per account and outcome costs ~100 bytes, which 100,000 accounts turn into tens of
//! megabytes, and a map lookup would sit on the GetToken hot path. The rest (failed upstream
//! requests, token checks) are rare and go to a map keyed by account, call and outcome.

use std::{
    collections::HashSet,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{
    counts::{Counts, DurationHistogram, HistogramSnapshot, LatencyHistogram},
    token::AccountName,
    upstream::{Call, Grant},
};

/// An account's counts of its common outcomes, kept in its slot.
#[derive(Debug, Default)]
pub(crate) struct AccountCounters {
    served: AtomicU64,
    logins: AtomicU64,
    refreshes: AtomicU64,
}

/// A reading of an account's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountCounts {
    /// GetToken calls answered with a token.
    pub served: u64,
    /// Password grants that succeeded.
    pub logins: u64,
    /// Refresh grants that succeeded.
    pub refreshes: u64,
}

impl AccountCounters {
    /// Counts a token handed to a caller.
    pub(crate) fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts.
    pub(crate) fn snapshot(&self) -> AccountCounts {
        AccountCounts {
            served: self.served.load(Ordering::Relaxed),
            logins: self.logins.load(Ordering::Relaxed),
            refreshes: self.refreshes.load(Ordering::Relaxed),
        }
    }

    /// Adds `old`'s counts (the slot this one replaces), so counters stay monotonic.
    pub(crate) fn carry_over(&self, old: &AccountCounters) {
        let old = old.snapshot();
        self.served.fetch_add(old.served, Ordering::Relaxed);
        self.logins.fetch_add(old.logins, Ordering::Relaxed);
        self.refreshes.fetch_add(old.refreshes, Ordering::Relaxed);
    }
}

/// The outcome label of a successful upstream request.
pub(crate) const OK: &str = "ok";

/// The broker's counts that are not per slot. Cheap to share (`Arc` inside the broker).
#[derive(Debug, Default)]
pub(crate) struct BrokerMetrics {
    /// Upstream requests by account, call and outcome, except successful password and refresh
    /// grants (those are in [`AccountCounters`]).
    upstream: Counts<(AccountName, Call, &'static str)>,
    /// Duration of token endpoint requests, by grant.
    durations: [DurationHistogram; 2],
    /// Callers that joined a fetch already in flight, by account. A map, not a slot field:
    /// eight more bytes would push every slot's allocation into the next jemalloc size class
    /// (256 → 320 bytes), and joins only happen while a fetch runs.
    joined: Counts<AccountName>,
    /// Reconcile corrections with the store, by kind (`adopted`, `written_back`).
    reconciled: Counts<&'static str>,
    /// How long a new token took from the replica that stored it to this one.
    propagation: LatencyHistogram,
}

/// One series of upstream requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCount {
    /// The account.
    pub account: AccountName,
    /// The request.
    pub call: Call,
    /// `ok`, or the failure class (`rejected`, `upstream timeout`, ...).
    pub outcome: &'static str,
    /// How many.
    pub count: u64,
}

impl BrokerMetrics {
    /// Counts one request to BACE for the account whose counters are `counters`.
    pub(crate) fn upstream_request(
        &self,
        counters: &AccountCounters,
        account: &AccountName,
        call: Call,
        outcome: &'static str,
    ) {
        match (call, outcome) {
            (Call::Grant(Grant::Password), OK) => {
                counters.logins.fetch_add(1, Ordering::Relaxed);
            }
            (Call::Grant(Grant::Refresh), OK) => {
                counters.refreshes.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.upstream.inc((account.clone(), call, outcome)),
        }
    }

    /// Records how long a token endpoint request took.
    pub(crate) fn upstream_duration(&self, grant: Grant, took: std::time::Duration) {
        self.durations[grant_index(grant)].observe(took);
    }

    /// The upstream request series kept here (see [`BrokerMetrics::upstream`]).
    pub(crate) fn upstream_counts(&self) -> Vec<UpstreamCount> {
        self.upstream
            .snapshot()
            .into_iter()
            .map(|((account, call, outcome), count)| UpstreamCount {
                account,
                call,
                outcome,
                count,
            })
            .collect()
    }

    /// Drops the series of accounts no longer configured (a reload removed them), so names
    /// that come and go do not pile up.
    pub(crate) fn forget(&self, removed: &HashSet<AccountName>) {
        if removed.is_empty() {
            return;
        }
        self.upstream
            .retain(|(account, _, _)| !removed.contains(account));
        self.joined.retain(|account| !removed.contains(account));
    }

    /// Counts a caller of `account` that joined a fetch in flight.
    pub(crate) fn joined(&self, account: &AccountName) {
        self.joined.inc(account.clone());
    }

    /// Callers that joined a fetch in flight, by account.
    pub(crate) fn joins(&self) -> Vec<(AccountName, u64)> {
        self.joined.snapshot()
    }

    /// Counts `n` reconcile corrections of `kind`.
    pub(crate) fn reconciled(&self, kind: &'static str, n: u64) {
        if n > 0 {
            self.reconciled.add(kind, n);
        }
    }

    /// Reconcile corrections by kind.
    pub(crate) fn reconciles(&self) -> Vec<(&'static str, u64)> {
        self.reconciled.snapshot()
    }

    /// Records the propagation delay of a token another replica stored.
    pub(crate) fn propagated(&self, delay: std::time::Duration) {
        self.propagation.observe(delay);
    }

    /// The propagation delay histogram.
    pub(crate) fn propagation(&self) -> HistogramSnapshot {
        self.propagation.snapshot()
    }

    /// The request duration histogram of each grant.
    pub(crate) fn upstream_durations(&self) -> [(Grant, HistogramSnapshot); 2] {
        Grant::ALL.map(|g| (g, self.durations[grant_index(g)].snapshot()))
    }
}

/// The place of `grant`'s histogram.
fn grant_index(grant: Grant) -> usize {
    match grant {
        Grant::Password => 0,
        Grant::Refresh => 1,
    }
}
