//! The allow list: which caller identities may fetch which accounts.

use std::collections::BTreeMap;

use crate::config::AllowedAccounts;

/// Caller identity to the accounts it may fetch.
pub(super) struct AllowList(BTreeMap<String, AllowedAccounts>);

impl AllowList {
    pub(super) fn new(allow: BTreeMap<String, AllowedAccounts>) -> Self {
        Self(allow)
    }

    /// Whether `identity` may fetch `account`'s token. Identities match exactly.
    pub(super) fn permits(&self, identity: &str, account: &str) -> bool {
        self.0
            .get(identity)
            .is_some_and(|accounts| accounts.contains(account))
    }

    /// Callers named.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}
