//! One account: its configuration, the cell its token lives in, and its fetch state (flight,
//! backoff, cooldown), with what happens when a fetch completes.

use std::{
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

use arc_swap::ArcSwapOption;
use tokio::{
    sync::watch,
    time::{Duration, Instant},
};
use tracing::{debug, info, warn};

use super::{
    BrokerError, Inner,
    flight::{Fetched, Flight, Landed},
    metrics::AccountCounters,
    refresher::Plan,
    schedule,
};
use crate::{
    config::AccountConfig,
    token::{Fingerprint, Token},
    upstream::{Grant, UpstreamError},
};

/// Where an account's current token lives, and the one place it changes.
///
/// Today that is the process's memory: an [`ArcSwapOption`] that readers load without a lock,
/// and a `watch` channel for [`TokenWatch`](super::TokenWatch)es, created by the first watcher
/// (most accounts are never watched, and a channel costs ~400 bytes). Every token the broker
/// installs or drops goes through [`TokenCell::publish`], so a shared store (several replicas
/// serving one token) has one seam to hook into: write through on publish, and publish what
/// another replica announced.
#[derive(Default)]
pub(super) struct TokenCell {
    /// The token served to callers; `None` before the first login and after an invalidation.
    current: ArcSwapOption<Token>,
    /// The same token, for watchers (changed together with `current`).
    watch: OnceLock<watch::Sender<Option<Arc<Token>>>>,
}

impl TokenCell {
    /// The current token, if any (valid or not).
    pub(super) fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// The current token if it stays valid for `needed`: one lock-free load.
    pub(super) fn servable(&self, now: Instant, needed: Duration) -> Option<Arc<Token>> {
        let guard = self.current.load();
        match &*guard {
            Some(token) if token.valid_for(now, needed) => Some(Arc::clone(token)),
            _ => None,
        }
    }

    /// Replaces the current token, for readers and watchers.
    pub(super) fn publish(&self, token: Option<Arc<Token>>) {
        self.current.store(token.clone());
        if let Some(watch) = self.watch.get() {
            watch.send_replace(token);
        }
    }

    /// A receiver of the current token and its changes (creating the channel on first use).
    pub(super) fn subscribe(&self) -> watch::Receiver<Option<Arc<Token>>> {
        let watch = self
            .watch
            .get_or_init(|| watch::Sender::new(self.current.load_full()));
        // A token stored while the channel was being created may have missed it: catch up.
        // (`publish` stores first and then sends, so whichever runs last is right.)
        watch.send_if_modified(|seen| {
            let now = self.current.load_full();
            let same = match (&*seen, &now) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                *seen = now;
            }
            !same
        });
        watch.subscribe()
    }

    /// Wakes the watchers (they look again at the slot and its token).
    pub(super) fn wake_watchers(&self) {
        if let Some(watch) = self.watch.get() {
            watch.send_modify(|_| {});
        }
    }

    /// Open watchers.
    pub(super) fn watchers(&self) -> usize {
        self.watch.get().map_or(0, |w| w.receiver_count())
    }
}

/// One account.
pub(super) struct Slot {
    pub(super) account: AccountConfig,
    pub(super) token: TokenCell,
    /// Set when a reload replaced or removed this slot.
    retired: AtomicBool,
    /// The account's counts (carried over when a reload replaces the slot).
    pub(super) counters: AccountCounters,
    state: Mutex<SlotState>,
}

/// The part of a slot that changes together, under the slot's lock.
#[derive(Default)]
pub(super) struct SlotState {
    /// The fetch in progress, if any.
    pub(super) flight: Option<Flight>,
    /// Bumped (wrapping) for every new flight; a flight whose generation is stale (an
    /// invalidation replaced it) does not install its token. 32 bits, so that `version` fits
    /// in the slot's 256-byte allocation class.
    pub(super) generation: u32,
    /// The store version of the current token (or, without one, the last version this replica
    /// knows the store holds): a token written to the store gets a higher one. 0: none known;
    /// always 0 without a store.
    pub(super) version: u64,
    /// Set when a reload changed the account's credentials or token URL, until a token comes
    /// in: the backoffs shared in the store were earned with the old credentials and do not
    /// hold the new ones back. (The stored token is not adopted either: the slot starts at
    /// the old slot's version, and only a newer one, written since, is taken.)
    pub(super) fresh_credentials: bool,
    /// The run of failed fetches since the last success, if any. Boxed: with 100,000
    /// accounts, most of them fine, each slot carries only this pointer.
    pub(super) failing: Option<Box<Failing>>,
    /// When the last forced re-login (Invalidate) started.
    pub(super) last_forced_at: Option<Instant>,
    /// The token the last forced re-login replaced.
    pub(super) replaced: Option<Fingerprint>,
    /// A token whose refresh BACE declined: go straight to a login for it.
    pub(super) refresh_declined: Option<Fingerprint>,
    /// When the slot is next due for a refresh or retry: its latest plan (see
    /// [`Refresher`](super::Refresher)).
    pub(super) next_due: Option<Instant>,
    /// When the last fetch succeeded.
    pub(super) last_success_at: Option<SystemTime>,
}

/// An account's failed fetches since its last success, and the backoff they set.
#[derive(Default)]
pub(super) struct Failing {
    /// No new fetch before this instant (backoff), unless a forced re-login.
    pub(super) retry_at: Option<Instant>,
    /// What callers get during the backoff when no valid token is cached.
    pub(super) last_error: Option<BrokerError>,
    /// Consecutive transient failures.
    pub(super) failures: u32,
    /// Consecutive credential rejections.
    pub(super) rejections: u32,
}

// === impl Slot ===

impl Slot {
    pub(super) fn new(account: AccountConfig) -> Self {
        Self {
            account,
            token: TokenCell::default(),
            retired: AtomicBool::new(false),
            counters: AccountCounters::default(),
            state: Mutex::new(SlotState::default()),
        }
    }

    /// A slot for an account whose credentials or token URL a reload changed (see
    /// [`SlotState::fresh_credentials`]).
    pub(super) fn with_fresh_credentials(account: AccountConfig, version: u64) -> Self {
        let slot = Self::new(account);
        {
            let mut state = slot.lock();
            state.fresh_credentials = true;
            state.version = version;
        }
        slot
    }

    /// Marks the slot as no longer the account's (a reload replaced or removed it). Its
    /// watchers are not woken here: see [`Slot::retire`].
    pub(super) fn mark_retired(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Marks the slot as no longer the account's and wakes its watchers so they move on.
    pub(super) fn retire(&self) {
        self.mark_retired();
        self.token.wake_watchers();
    }

    /// Whether a reload removed or replaced this slot.
    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than refusing service: recover the guard.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn out_of_range(&self) -> BrokerError {
        BrokerError::ValidityOutOfRange {
            account: self.account.name.clone(),
        }
    }

    /// Records a finished fetch: installs the token or the backoff, logs, plans the next
    /// refresh or retry (under the lock, so plans reach the refresher in order), and returns
    /// what waiters get.
    pub(super) fn complete(
        self: &Arc<Self>,
        generation: u32,
        fetched: Fetched,
        version: Option<u64>,
        inner: &Inner,
        joined: u64,
    ) -> Landed {
        let now = Instant::now();
        let r = &inner.policy.refresh;
        let mut state = self.lock();
        if state.generation != generation {
            // An invalidation replaced this fetch: its token (likely the invalidated one) is
            // not installed, and its waiters look again.
            debug!(
                grant = fetched.what(),
                "fetch superseded by an invalidation"
            );
            return Landed::Superseded;
        }
        state.flight = None;
        let (grant, result) = match fetched {
            Fetched::Verified(token) => {
                // BACE accepts the reported token: nothing about the account changed (with a
                // store, it was written again under a new version).
                debug!(fingerprint = %token.fingerprint(), waiters = joined + 1, "reported token verified");
                if let Some(version) = version {
                    state.version = state.version.max(version);
                }
                // Its plan still waits in the refresher, unless it came due while this fetch
                // ran (and was skipped for it): then plan it again.
                if let Some(next) = state.next_due.filter(|at| *at <= now) {
                    self.plan(&mut state, inner, next);
                }
                return Landed::Verified(token);
            }
            // A token newer than the adopted one came in meanwhile (the sync task): keep it.
            Fetched::Adopted(_)
                if version.is_some_and(|v| v < state.version)
                    && let Some(current) =
                        self.token.servable(now, inner.policy.refresh.expiry_margin) =>
            {
                state.failing = None;
                return Landed::Done(Ok(current));
            }
            Fetched::Adopted(token) => {
                info!(
                    fingerprint = %token.fingerprint(),
                    version,
                    waiters = joined + 1,
                    "token from another replica (store)"
                );
                self.install(&mut state, inner, token.clone(), version.unwrap_or(0));
                return Landed::Done(Ok(token));
            }
            Fetched::BackingOff {
                error,
                until,
                attempts,
                rejected,
            } => {
                let failing = state.failing();
                if rejected {
                    failing.rejections = failing.rejections.max(attempts);
                } else {
                    failing.failures = failing.failures.max(attempts);
                }
                failing.retry_at = Some(until);
                failing.last_error = Some(error.clone());
                self.plan(&mut state, inner, until);
                return Landed::Done(Err(error));
            }
            Fetched::Granted {
                grant,
                result,
                refresh_declined,
            } => {
                if refresh_declined.is_some() {
                    state.refresh_declined = refresh_declined;
                }
                (grant, result)
            }
        };
        let grant_name = grant.as_str();
        match result {
            // Another replica's newer token was adopted while this fetch ran (its version is
            // the higher): keep serving that one.
            Ok(_)
                if version.is_some_and(|v| v < state.version)
                    && let Some(current) =
                        self.token.servable(now, inner.policy.refresh.expiry_margin) =>
            {
                debug!(
                    version,
                    stored = state.version,
                    "a newer token came in meanwhile; keeping it"
                );
                state.failing = None;
                Landed::Done(Ok(current))
            }
            Ok(token) => {
                info!(
                    grant = grant_name,
                    fingerprint = %token.fingerprint(),
                    expires_in = %humantime::format_duration(token.lifetime()),
                    version,
                    waiters = joined + 1,
                    "token obtained"
                );
                self.install(&mut state, inner, token.clone(), version.unwrap_or(0));
                Landed::Done(Ok(token))
            }
            Err(error) => {
                let rejected = grant == Grant::Password && !error.is_transient();
                let failing = state.failing();
                let (broker_error, wait) = if rejected {
                    failing.rejections += 1;
                    let wait = schedule::rejected_backoff(failing.rejections, r.rejected_backoff);
                    let e = BrokerError::CredentialsRejected {
                        account: self.account.name.clone(),
                    };
                    (e, wait)
                } else {
                    failing.failures += 1;
                    let mut wait = schedule::backoff(
                        failing.failures,
                        r.backoff_initial,
                        r.backoff_max,
                        rand::random(),
                    );
                    // BACE said how long to slow down: not before that.
                    if let UpstreamError::RateLimited {
                        retry_after: Some(asked),
                    } = &error
                    {
                        wait = wait.max(*asked);
                    }
                    let e = BrokerError::Unavailable {
                        account: self.account.name.clone(),
                        reason: error.class(),
                    };
                    (e, wait)
                };
                warn!(
                    grant = grant_name,
                    %error,
                    failures = failing.failures,
                    rejections = failing.rejections,
                    retry_in = %humantime::format_duration(Duration::from_millis(wait.as_millis() as u64)),
                    waiters = joined + 1,
                    "token fetch failed"
                );
                let mut retry_at = now + wait;
                // While a token is still good, make the last retry early enough that it, and
                // a login fallback after it, can finish before the token stops being served.
                if let Some(token) = self.token.current() {
                    let last_good = token
                        .expires_at()
                        .checked_sub(r.expiry_margin)
                        .unwrap_or(now);
                    if !rejected && last_good > now {
                        let last_try = last_good
                            .checked_sub(inner.policy.upstream_timeout * 2)
                            .filter(|t| *t > now)
                            .unwrap_or(last_good);
                        retry_at = retry_at.min(last_try);
                    }
                }
                let failing = state.failing();
                failing.retry_at = Some(retry_at);
                failing.last_error = Some(broker_error.clone());
                self.plan(&mut state, inner, retry_at);
                Landed::Done(Err(broker_error))
            }
        }
    }

    /// Installs a token that came in (fetched, or adopted from the store as `version`): serves
    /// it, ends the failure record, plans its refresh.
    pub(super) fn install(
        self: &Arc<Self>,
        state: &mut SlotState,
        inner: &Inner,
        token: Arc<Token>,
        version: u64,
    ) {
        let r = &inner.policy.refresh;
        let delay = schedule::refresh_delay(
            token.lifetime(),
            r.lifetime_fraction,
            r.expiry_margin,
            jitter(),
        );
        debug!(refresh_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())), "refresh planned");
        state.version = state.version.max(version);
        state.fresh_credentials = false;
        self.token.publish(Some(token.clone()));
        state.last_success_at = Some(SystemTime::now());
        state.failing = None;
        self.plan(state, inner, token.obtained_at() + delay);
    }

    /// Records and sends the instant the slot is next due.
    pub(super) fn plan(self: &Arc<Self>, state: &mut SlotState, inner: &Inner, at: Instant) {
        state.next_due = Some(at);
        let _ = inner.schedule.send(Plan {
            at,
            slot: Arc::downgrade(self),
        });
    }
}

impl SlotState {
    /// The error to answer while in a backoff window, if in one.
    pub(super) fn backing_off(&self, now: Instant) -> Option<BrokerError> {
        let failing = self.failing.as_deref()?;
        match (&failing.retry_at, &failing.last_error) {
            (Some(at), Some(error)) if now < *at => Some(error.clone()),
            _ => None,
        }
    }

    /// When the backoff ends, if one is set.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.failing.as_ref().and_then(|f| f.retry_at)
    }

    /// The failure record, started by the first failure.
    pub(super) fn failing(&mut self) -> &mut Failing {
        self.failing.get_or_insert_default()
    }
}

/// A uniform jitter in `[-1, 1]` for [`schedule::refresh_delay`].
fn jitter() -> f64 {
    rand::random::<f64>() * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With 100,000 accounts every byte of a slot counts 100,000 times, and jemalloc rounds an
    /// allocation up to its size class: an `Arc<Slot>` (two counts and the slot) must stay
    /// within the 256-byte class (the next is 320).
    #[test]
    fn a_slot_allocation_fits_the_256_byte_class() {
        let arc_counts = 2 * std::mem::size_of::<usize>();
        assert!(
            std::mem::size_of::<Slot>() + arc_counts <= 256,
            "Slot is {} bytes",
            std::mem::size_of::<Slot>()
        );
    }
}
