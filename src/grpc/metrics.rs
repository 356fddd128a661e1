//! What the gRPC service counts itself: failed GetToken calls by code, and Invalidate calls by
//! outcome. (Tokens served are counted by the broker, per account.) Accounts are `None` when
//! the caller named one that is not configured: caller input never becomes a label.

use crate::{counts::Counts, token::AccountName};

/// The service's call counts. Shared (`Arc`) by the service's clones and telemetry.
#[derive(Debug, Default)]
pub struct CallCounts {
    get_token: Counts<(Option<AccountName>, &'static str)>,
    invalidate: Counts<(Option<AccountName>, &'static str)>,
}

/// One series: an account (`None`: not configured) and a code or outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallCount {
    /// The account asked for, if configured.
    pub account: Option<AccountName>,
    /// The gRPC code name (GetToken) or the outcome (Invalidate).
    pub label: &'static str,
    /// How many calls.
    pub count: u64,
}

impl CallCounts {
    pub(super) fn get_token_failed(&self, account: Option<AccountName>, code: &'static str) {
        self.get_token.inc((account, code));
    }

    pub(super) fn invalidated(&self, account: Option<AccountName>, outcome: &'static str) {
        self.invalidate.inc((account, outcome));
    }

    /// Failed GetToken calls by account and code.
    pub fn get_token_failures(&self) -> Vec<CallCount> {
        series(&self.get_token)
    }

    /// Invalidate calls by account and outcome (or code, when the call failed).
    pub fn invalidations(&self) -> Vec<CallCount> {
        series(&self.invalidate)
    }
}

fn series(counts: &Counts<(Option<AccountName>, &'static str)>) -> Vec<CallCount> {
    counts
        .snapshot()
        .into_iter()
        .map(|((account, label), count)| CallCount {
            account,
            label,
            count,
        })
        .collect()
}
