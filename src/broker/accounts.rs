//! The account table as a whole: warming every account up, and applying a reloaded config
//! (accounts added, removed, or changed).

use std::sync::Arc;

use tokio::{task::JoinSet, time::Duration};
use tracing::{info, warn};

use super::{Broker, slot::Slot};
use crate::{config::Config, token::AccountName};

/// What [`Broker::apply`] did, by account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Accounts new in the config: added and warming up.
    pub added: Vec<AccountName>,
    /// Accounts gone from the config: dropped.
    pub removed: Vec<AccountName>,
    /// Accounts whose credentials or token URL changed: logging in again.
    pub changed: Vec<AccountName>,
    /// Accounts that stay as they were, tokens and all.
    pub unchanged: Vec<AccountName>,
}

impl Reloaded {
    /// Whether any account was added, removed or changed.
    pub fn any_change(&self) -> bool {
        !(self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty())
    }
}

/// What a warm-up did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmUp {
    /// Accounts that hold a valid token.
    pub ready: usize,
    /// Accounts whose first fetch failed (they keep retrying in the background).
    pub failed: usize,
    /// Of the ready accounts, those whose token came from the store (no upstream call).
    pub from_store: usize,
}

impl Broker {
    /// Obtains a token for every account, `warmup_concurrency` at a time, and returns once
    /// each has succeeded or failed (failed accounts retry in the background). With a store,
    /// the tokens it holds come first: only the other accounts log in.
    pub async fn warm_up(&self) -> WarmUp {
        let slots: Vec<Arc<Slot>> = self
            .inner
            .accounts
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        let mut from_store = 0;
        if let Some(store) = &self.inner.store {
            match self.inner.warm_from_store(store, &slots).await {
                Ok(adopted) => {
                    info!(
                        adopted,
                        accounts = slots.len(),
                        "tokens read from the store"
                    );
                    from_store = adopted;
                }
                Err(error) => {
                    warn!(%error, "cannot read tokens from the store; logging in as a single replica would")
                }
            }
        }
        let names: Vec<AccountName> = slots.iter().map(|s| s.account.name.clone()).collect();
        drop(slots);
        let limit = self.inner.policy.warmup_concurrency.max(1);
        let mut report = WarmUp {
            ready: 0,
            failed: 0,
            from_store,
        };
        let mut tally = |ok: bool| {
            if ok {
                report.ready += 1
            } else {
                report.failed += 1
            }
        };
        let mut running = JoinSet::new();
        for name in names {
            while running.len() >= limit {
                if let Some(done) = running.join_next().await {
                    tally(matches!(done, Ok(true)));
                }
            }
            let broker = self.clone();
            running.spawn(async move {
                broker
                    .obtain_named(name.as_str(), Duration::ZERO)
                    .await
                    .is_ok()
            });
        }
        while let Some(done) = running.join_next().await {
            tally(matches!(done, Ok(true)));
        }
        report
    }

    /// Applies a reloaded configuration's accounts: new accounts are added and warmed, removed
    /// ones dropped (their refresh stops), accounts whose credentials or token URL changed get
    /// a fresh slot and log in again; unchanged accounts keep their tokens untouched.
    pub fn apply(&self, config: &Config) -> Reloaded {
        let inner = &self.inner;
        let mut report = Reloaded::default();
        inner.accounts.retain(|name, slot| {
            let keep = config.accounts.contains_key(name);
            if !keep {
                report.removed.push(name.clone());
                slot.retire();
            }
            keep
        });
        for (name, account) in &config.accounts {
            let old = inner.accounts.get(name).map(|e| Arc::clone(e.value()));
            match &old {
                Some(slot) if slot.account == *account => {
                    report.unchanged.push(name.clone());
                    continue;
                }
                Some(_) => report.changed.push(name.clone()),
                None => report.added.push(name.clone()),
            }
            let slot = match &old {
                Some(old) => Slot::with_fresh_credentials(account.clone(), old.lock().version),
                None => Slot::new(account.clone()),
            };
            if let Some(old) = &old {
                // Retired before the swap, so none of its plans runs with the old credentials
                // (its watchers are woken after the swap: they move to the new slot). Its
                // counts go to the new slot before anyone can read that one: no series drops.
                old.mark_retired();
                slot.counters.carry_over(&old.counters);
            }
            inner.accounts.insert(name.clone(), Arc::new(slot));
            if let Some(old) = old {
                old.token.wake_watchers();
            }
            self.obtain_in_background(name.clone());
        }
        inner
            .metrics
            .forget(&report.removed.iter().cloned().collect());
        report
    }
}
