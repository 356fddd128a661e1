//! The broker core: one token slot per account, single-flight fetches, the refresh schedule
//! and invalidation. Knows nothing of gRPC; speaks to BACE only through [`Upstream`].
//!
//! # Concurrency
//!
//! Accounts live in a [`DashMap`] of `Arc<Slot>`: a lookup clones the slot's `Arc` out and
//! drops the map guard at once, so **no DashMap guard is ever held across an `.await`** (that
//! can deadlock the runtime) and accounts never wait on each other.
//!
//! In a slot, the current token sits in an [`ArcSwapOption`]: serving a cached token is one
//! lock-free load, so readers never wait for a refresh while their token is valid. Everything
//! else about the slot (the flight in progress, backoff, cooldown) is under a std [`Mutex`]
//! held only for short, synchronous sections, never across an `.await`.
//!
//! # Single flight
//!
//! When a token must be obtained, the first caller *spawns* the fetch as a task of its own and
//! everyone (that caller included) waits on its [`watch`] channel. Callers that give up drop
//! only their receiver; the fetch goes on for the others and its result, success or error,
//! reaches every waiter at once. After a failure the slot backs off: callers in the backoff
//! window get the last error without any upstream call, so BACE sees one attempt per backoff
//! step however many callers wait.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
    time::{Duration, Instant, timeout_at},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    config::{AccountConfig, Config, RefreshConfig},
    metrics::{AccountCounters, AccountCounts, AccountLabel, AccountLabels, GrantLabels, Metrics},
    policy,
    token::{AccountName, AccountNameError, Fingerprint, Token},
    upstream::{GrantType, Issued, Upstream, UpstreamError},
};

/// What a broker operation can fail with. `Display` is short and safe to show callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The account name is empty or malformed.
    #[error("invalid account name: {0}")]
    InvalidAccountName(AccountNameError),
    /// No such account is configured.
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    /// No token BACE hands out can satisfy the requested validity.
    #[error("no token for account {account:?} stays valid that long (min_validity too long)")]
    ValidityOutOfRange {
        /// The account.
        account: AccountName,
    },
    /// BACE rejected the account's credentials; logins wait out a long backoff.
    #[error(
        "BACE rejected the credentials of account {account:?}; the next login waits for a backoff"
    )]
    CredentialsRejected {
        /// The account.
        account: AccountName,
    },
    /// BACE could not give a token and no valid one is cached.
    #[error("BACE is unavailable for account {account:?} ({reason})")]
    Unavailable {
        /// The account.
        account: AccountName,
        /// A short class of the failure.
        reason: &'static str,
    },
    /// The broker is stopping.
    #[error("the broker is shutting down")]
    ShuttingDown,
}

impl BrokerError {
    /// A short class for status views and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            BrokerError::InvalidAccountName(_) => "invalid account name",
            BrokerError::UnknownAccount(_) => "unknown account",
            BrokerError::ValidityOutOfRange { .. } => "min_validity out of range",
            BrokerError::CredentialsRejected { .. } => "credentials rejected",
            BrokerError::Unavailable { reason, .. } => reason,
            BrokerError::ShuttingDown => "shutting down",
        }
    }
}

/// The result of [`Broker::invalidate`].
#[derive(Debug, Clone)]
pub struct Invalidated {
    /// What the broker did with the reported token.
    pub outcome: InvalidateOutcome,
    /// The token to use from now on.
    pub token: Arc<Token>,
}

impl Invalidated {
    /// Whether the reported token was dropped and replaced by a new login.
    pub fn invalidated(&self) -> bool {
        self.outcome == InvalidateOutcome::Invalidated
    }
}

/// What an invalidation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidateOutcome {
    /// The reported token was dropped and replaced by a login (or this call joined that login).
    Invalidated,
    /// The reported token is not the current one: it was already replaced.
    AlreadyReplaced,
    /// BACE accepts the reported token (checked at `upstream.verify_url`): kept.
    TokenValid,
    /// The current token was reported within the invalidate cooldown: kept.
    Cooldown,
}

impl InvalidateOutcome {
    /// A short name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidateOutcome::Invalidated => "invalidated",
            InvalidateOutcome::AlreadyReplaced => "already_replaced",
            InvalidateOutcome::TokenValid => "token_valid",
            InvalidateOutcome::Cooldown => "cooldown",
        }
    }
}

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

/// A watcher of one account's token: yields the current valid token, then each new token or
/// new expiry; never an expired token. Holds a `watch` receiver, so thousands of watchers cost
/// a few hundred bytes each and no upstream call. Follows the account across reloads that
/// change its credentials.
pub struct TokenWatch {
    broker: Broker,
    slot: Arc<Slot>,
    receiver: watch::Receiver<Option<Arc<Token>>>,
    /// What was yielded last (token and expiry), to yield changes only.
    last: Option<(Fingerprint, Instant)>,
}

impl TokenWatch {
    /// The next token to hand out. `None` when the broker stops; an error when the account
    /// was removed from the configuration.
    pub async fn next(&mut self) -> Option<Result<Arc<Token>, BrokerError>> {
        let stop = self.broker.inner.draining.clone();
        let margin = self.broker.inner.policy.refresh.expiry_margin;
        loop {
            if self.slot.is_retired() {
                // A reload replaced or removed the account: follow it, or end.
                match self.broker.inner.slot(self.slot.account.name.as_str()) {
                    Ok(slot) => {
                        self.receiver = slot.subscribe();
                        self.slot = slot;
                    }
                    Err(error) => return Some(Err(error)),
                }
            }
            let current = self.receiver.borrow_and_update().clone();
            if let Some(token) = current.filter(|t| t.valid_for(Instant::now(), margin)) {
                let seen = Some((token.fingerprint(), token.expires_at()));
                if self.last != seen {
                    self.last = seen;
                    return Some(Ok(token));
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                changed = self.receiver.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    }
}

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
}

/// The timing rules the broker applies, from [`Config`].
#[derive(Debug, Clone)]
pub struct Policy {
    /// Refresh schedule, margins and backoff.
    pub refresh: RefreshConfig,
    /// Budget of one fetch (all its upstream requests together).
    pub upstream_timeout: Duration,
    /// At most one forced re-login per account in this window.
    pub invalidate_cooldown: Duration,
    /// Accounts fetched at once during warm-up.
    pub warmup_concurrency: usize,
    /// Where a reported token is checked before it is invalidated, if anywhere.
    pub verify_url: Option<reqwest::Url>,
}

impl Policy {
    /// The policy a config describes.
    pub fn from_config(config: &Config) -> Self {
        Self {
            refresh: config.refresh.clone(),
            upstream_timeout: config.upstream.timeout,
            invalidate_cooldown: config.invalidate_cooldown,
            warmup_concurrency: config.warmup_concurrency,
            verify_url: config.upstream.verify_url.clone(),
        }
    }
}

/// A cheap-to-clone handle to the broker.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    accounts: DashMap<AccountName, Arc<Slot>>,
    upstream: Arc<dyn Upstream>,
    policy: Policy,
    metrics: Metrics,
    /// Tells the [`Refresher`] when an account is next due.
    schedule: mpsc::UnboundedSender<Plan>,
    /// Fetch tasks; waited for on shutdown.
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Cancelled when shutdown begins: watch streams end so the server can drain.
    draining: CancellationToken,
}

/// One account: its configuration, its current token and its fetch state.
struct Slot {
    account: AccountConfig,
    /// The token served to callers; `None` before the first login and after an invalidation.
    current: ArcSwapOption<Token>,
    /// The same token, for watchers (changed together with `current`). Created by the first
    /// watcher: most accounts are never watched, and a channel costs ~400 bytes.
    watch: std::sync::OnceLock<watch::Sender<Option<Arc<Token>>>>,
    /// Set when a reload replaced or removed this slot.
    retired: std::sync::atomic::AtomicBool,
    /// The account's success counts (carried over when a reload replaces the slot).
    counters: AccountCounters,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// The fetch in progress, if any.
    flight: Option<Flight>,
    /// Bumped for every new flight; a flight whose generation is stale (an invalidation
    /// replaced it) does not install its token.
    generation: u64,
    /// The run of failed fetches since the last success, if any. Boxed: with 100,000
    /// accounts, most of them fine, each slot carries only this pointer.
    failing: Option<Box<Failing>>,
    /// When the last forced re-login (Invalidate) started.
    last_forced_at: Option<Instant>,
    /// The token the last forced re-login replaced.
    replaced: Option<Fingerprint>,
    /// A token whose refresh BACE declined: go straight to a login for it.
    refresh_declined: Option<Fingerprint>,
    /// When the slot is next due for a refresh or retry: its latest plan (see [`Refresher`]).
    next_due: Option<Instant>,
    /// When the last fetch succeeded.
    last_success_at: Option<SystemTime>,
}

/// An account's failed fetches since its last success, and the backoff they set.
#[derive(Default)]
struct Failing {
    /// No new fetch before this instant (backoff), unless a forced re-login.
    retry_at: Option<Instant>,
    /// What callers get during the backoff when no valid token is cached.
    last_error: Option<BrokerError>,
    /// Consecutive transient failures.
    failures: u32,
    /// Consecutive credential rejections.
    rejections: u32,
}

/// What a fetch hands its waiters.
#[derive(Clone)]
enum Landed {
    /// The fetch's result.
    Done(Result<Arc<Token>, BrokerError>),
    /// An invalidation replaced the fetch before it ended: look again.
    Superseded,
}

/// A fetch in progress that callers can join.
#[derive(Clone)]
struct Flight {
    result: watch::Receiver<Option<Landed>>,
    /// Callers that joined after the first one.
    joined: Arc<AtomicU64>,
    /// Started by an invalidation (a forced re-login).
    forced: bool,
}

impl Flight {
    fn join(&self) -> Self {
        self.joined.fetch_add(1, Ordering::Relaxed);
        self.clone()
    }

    async fn wait(mut self) -> Landed {
        match self.result.wait_for(Option::is_some).await {
            Ok(landed) => landed.clone().unwrap_or(Landed::Superseded),
            // The fetch task ended without a result: shutdown (or a bug, which the task's
            // guard has already recorded as a failure).
            Err(_) => Landed::Done(Err(BrokerError::ShuttingDown)),
        }
    }
}

/// What a fetch does first.
enum FetchKind {
    /// Refresh grant with this token; password grant if that fails (see [`Inner::fetch`]).
    Refresh(Arc<Token>),
    /// Password grant.
    Login,
    /// Ask `upstream.verify_url` whether BACE accepts this token; a password grant if not.
    Verify(Arc<Token>, reqwest::Url),
}

enum Acquired {
    Ready(Arc<Token>),
    Wait(Flight),
}

impl Broker {
    /// Builds a broker for `config`'s accounts and the [`Refresher`] that keeps their tokens
    /// fresh. Nothing is spawned here: run the refresher (e.g. `tokio::spawn(refresher.run())`)
    /// and [`Broker::warm_up`] when ready.
    pub fn new(
        config: &Config,
        upstream: Arc<dyn Upstream>,
        metrics: Metrics,
    ) -> (Self, Refresher) {
        let (schedule, due) = mpsc::unbounded_channel();
        let accounts = config
            .accounts
            .values()
            .map(|a| (a.name.clone(), Arc::new(Slot::new(a.clone()))))
            .collect();
        let stop = CancellationToken::new();
        let broker = Broker {
            inner: Arc::new(Inner {
                accounts,
                upstream,
                policy: Policy::from_config(config),
                metrics,
                schedule,
                tasks: TaskTracker::new(),
                stop: stop.clone(),
                draining: stop.child_token(),
            }),
        };
        let refresher = Refresher {
            broker: broker.clone(),
            plans: due,
            queue: BinaryHeap::new(),
            stop,
        };
        (broker, refresher)
    }

    /// A valid token for `account`, valid for at least the expiry margin plus `min_validity`,
    /// handed to a caller (counted as served, see [`AccountCounters`]).
    ///
    /// Answers from the cache when it can (no lock, no await); otherwise joins or starts the
    /// account's single fetch.
    pub async fn get_token(
        &self,
        account: &str,
        min_validity: Duration,
    ) -> Result<Arc<Token>, BrokerError> {
        let slot = self.inner.slot(account)?;
        let token = self.obtain(&slot, min_validity).await?;
        slot.counters.served();
        Ok(token)
    }

    /// [`Broker::get_token`] for the broker's own needs (warm-up, reloads, watchers,
    /// invalidations): not counted as served.
    async fn obtain_named(
        &self,
        account: &str,
        min_validity: Duration,
    ) -> Result<Arc<Token>, BrokerError> {
        let slot = self.inner.slot(account)?;
        self.obtain(&slot, min_validity).await
    }

    async fn obtain(
        &self,
        slot: &Arc<Slot>,
        min_validity: Duration,
    ) -> Result<Arc<Token>, BrokerError> {
        let needed = self
            .inner
            .policy
            .refresh
            .expiry_margin
            .saturating_add(min_validity);
        if let Some(token) = slot.servable(Instant::now(), needed) {
            return Ok(token);
        }
        if needed >= self.inner.policy.refresh.refreshed_lifetime {
            return Err(slot.out_of_range());
        }
        // A fetch an invalidation supersedes is abandoned for the one that replaced it; an
        // invalidation storm cannot keep a caller here longer than a few fetches.
        for _ in 0..4 {
            let token = match self.inner.acquire(slot, needed)? {
                Acquired::Ready(token) => return Ok(token),
                Acquired::Wait(flight) => match flight.wait().await {
                    Landed::Done(result) => result?,
                    Landed::Superseded => continue,
                },
            };
            return if token.valid_for(Instant::now(), needed) {
                Ok(token)
            } else {
                Err(slot.out_of_range())
            };
        }
        Err(BrokerError::Unavailable {
            account: slot.account.name.clone(),
            reason: "token replaced repeatedly while waiting",
        })
    }

    /// Reports that BACE refused `access_token` (empty: whatever token is current).
    ///
    /// The current token is dropped and replaced by a password login (one login however many
    /// callers report it, at most one per cooldown); an older token is answered with the
    /// current one, without an upstream call.
    pub async fn invalidate(
        &self,
        account: &str,
        access_token: &str,
    ) -> Result<Invalidated, BrokerError> {
        let slot = self.inner.slot(account)?;
        let reported = (!access_token.is_empty()).then(|| Fingerprint::of(access_token));
        let before = slot.current.load_full().map(|t| t.fingerprint());
        let outcome = match self.inner.invalidate(&slot, reported)? {
            Ok(flight) => match flight.wait().await {
                Landed::Done(result) => {
                    let token = result?;
                    // A verified token comes back unchanged: BACE accepts it.
                    let outcome = if self.inner.policy.verify_url.is_some()
                        && before == Some(token.fingerprint())
                    {
                        InvalidateOutcome::TokenValid
                    } else {
                        InvalidateOutcome::Invalidated
                    };
                    return Ok(Invalidated { outcome, token });
                }
                // Replaced by a later login: that one's token is the answer.
                Landed::Superseded => InvalidateOutcome::Invalidated,
            },
            Err(outcome) => outcome,
        };
        Ok(Invalidated {
            outcome,
            token: self.obtain_named(account, Duration::ZERO).await?,
        })
    }

    /// Obtains a token for every account, `warmup_concurrency` at a time, and returns once
    /// each has succeeded or failed (failed accounts retry in the background).
    pub async fn warm_up(&self) -> WarmUp {
        let names: Vec<AccountName> = self
            .inner
            .accounts
            .iter()
            .map(|e| e.key().clone())
            .collect();
        let limit = self.inner.policy.warmup_concurrency.max(1);
        let mut report = WarmUp {
            ready: 0,
            failed: 0,
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
            let slot = Slot::new(account.clone());
            if let Some(old) = &old {
                // Retired before the swap, so none of its plans runs with the old credentials
                // (its watchers are woken after the swap: they move to the new slot). Its
                // counts go to the new slot before anyone can read that one: no series drops.
                old.retired.store(true, Ordering::Release);
                slot.counters.carry_over(&old.counters);
            }
            inner.accounts.insert(name.clone(), Arc::new(slot));
            if let Some(old) = old {
                old.wake_watchers();
            }
            let broker = self.clone();
            let name = name.clone();
            inner.tasks.spawn(async move {
                let _ = broker.obtain_named(name.as_str(), Duration::ZERO).await;
            });
        }
        report
    }

    /// The configured account called `name`, if any.
    pub fn account_name(&self, name: &str) -> Option<AccountName> {
        self.inner.accounts.get(name).map(|e| e.key().clone())
    }

    /// Every account's status, sorted by account.
    pub fn status(&self) -> Vec<AccountStatus> {
        let slots: Vec<Arc<Slot>> = self
            .inner
            .accounts
            .iter()
            .map(|e| e.value().clone())
            .collect();
        let margin = self.inner.policy.refresh.expiry_margin;
        let mut accounts: Vec<AccountStatus> = slots.iter().map(|s| s.status(margin)).collect();
        accounts.sort_by(|a, b| a.account.cmp(&b.account));
        accounts
    }

    /// Watches `account`'s token (see [`TokenWatch`]). When the account holds no valid token,
    /// a fetch is started (or joined) so the watcher need not wait for the next retry.
    pub fn watch(&self, account: &str) -> Result<TokenWatch, BrokerError> {
        let slot = self.inner.slot(account)?;
        let receiver = slot.subscribe();
        if slot
            .servable(Instant::now(), self.inner.policy.refresh.expiry_margin)
            .is_none()
        {
            let broker = self.clone();
            let name = slot.account.name.clone();
            self.inner.tasks.spawn(async move {
                let _ = broker.obtain_named(name.as_str(), Duration::ZERO).await;
            });
        }
        Ok(TokenWatch {
            broker: self.clone(),
            slot,
            receiver,
            last: None,
        })
    }

    /// Ends every [`TokenWatch`] (the first step of a shutdown: streams must end for the
    /// server to drain). Fetches and refreshes go on until [`Broker::shutdown`].
    pub fn drain(&self) {
        self.inner.draining.cancel();
    }

    /// The metrics this broker records.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Stops background work: the refresher ends, fetches in progress are abandoned and their
    /// waiters get [`BrokerError::ShuttingDown`]. Returns once every fetch task has ended.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

// === impl Inner ===

impl Inner {
    fn slot(&self, account: &str) -> Result<Arc<Slot>, BrokerError> {
        AccountName::validate(account).map_err(BrokerError::InvalidAccountName)?;
        // Clone the Arc out; the map guard drops at the end of this statement.
        self.accounts
            .get(account)
            .map(|entry| Arc::clone(entry.value()))
            .ok_or_else(|| BrokerError::UnknownAccount(account.to_owned()))
    }

    /// Under the slot lock: the cached token if it became good enough meanwhile, else the
    /// flight to wait on (joined or started), else the error of the current backoff.
    fn acquire(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        needed: Duration,
    ) -> Result<Acquired, BrokerError> {
        let now = Instant::now();
        let mut state = slot.lock();
        let current = slot.current.load_full();
        if let Some(token) = current.as_ref().filter(|t| t.valid_for(now, needed)) {
            return Ok(Acquired::Ready(token.clone()));
        }
        if let Some(flight) = &state.flight {
            return Ok(Acquired::Wait(self.join(slot, flight)));
        }
        if let Some(error) = state.backing_off(now) {
            return Err(error);
        }
        let margin = self.policy.refresh.expiry_margin;
        let kind = self.fetch_kind(current.clone(), &state, now);
        if let Some(token) = &current {
            // A token just obtained that still misses the caller's bar would not be helped by
            // the same kind of fetch again; refusing here keeps such callers from hammering
            // BACE. (A fresh login token may still be extended by a refresh.)
            let fresh = token.valid_for(now, margin) && now < token.obtained_at() + margin;
            if fresh && (token.is_refreshed() || matches!(kind, FetchKind::Login)) {
                return Err(slot.out_of_range());
            }
        }
        // A caller waits for this fetch: any failed refresh falls back to a login.
        let urgent = true;
        Ok(Acquired::Wait(
            self.start_flight(slot, &mut state, kind, urgent, false),
        ))
    }

    /// Refresh when there is a token that BACE may still extend, else log in.
    fn fetch_kind(
        &self,
        current: Option<Arc<Token>>,
        state: &SlotState,
        now: Instant,
    ) -> FetchKind {
        match current {
            Some(token)
                if token.expose_refresh().is_some()
                    && now < token.expires_at()
                    && state.refresh_declined != Some(token.fingerprint()) =>
            {
                FetchKind::Refresh(token)
            }
            _ => FetchKind::Login,
        }
    }

    /// Decides what an invalidation does: `Ok(flight)`, the reported token is (being) replaced
    /// by that login; `Err(outcome)`, nothing to replace, answer the current token.
    #[allow(clippy::type_complexity)]
    fn invalidate(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        reported: Option<Fingerprint>,
    ) -> Result<Result<Flight, InvalidateOutcome>, BrokerError> {
        let now = Instant::now();
        let mut state = slot.lock();
        let current = slot.current.load_full();
        let forced = state.flight.as_ref().filter(|f| f.forced).cloned();
        let is_current = match (reported, &current) {
            (None, _) => true,
            (Some(fp), Some(token)) => fp == token.fingerprint(),
            (Some(_), None) => false,
        };
        if !is_current {
            // Another caller is already replacing this very token: share its login.
            return Ok(match forced {
                Some(f) if reported.is_some() && reported == state.replaced => {
                    Ok(self.join(slot, &f))
                }
                _ => Err(InvalidateOutcome::AlreadyReplaced),
            });
        }
        // A forced login for this very token, or, with no token to drop, whatever fetch runs
        // (a login): share it rather than start a second login.
        let running = forced.or_else(|| state.flight.clone().filter(|_| current.is_none()));
        if let Some(flight) = running {
            return Ok(Ok(self.join(slot, &flight)));
        }
        if state
            .last_forced_at
            .is_some_and(|at| now < at + self.policy.invalidate_cooldown)
        {
            debug!(account = %slot.account.name, "invalidation within cooldown; keeping the current token");
            return Ok(Err(InvalidateOutcome::Cooldown));
        }
        // Rejected credentials: no login before their backoff ends, verified or not.
        if let Some(error @ BrokerError::CredentialsRejected { .. }) = state.backing_off(now) {
            if let Some(token) = &current {
                state.replaced = Some(token.fingerprint());
                slot.set_current(None);
            }
            return Err(error);
        }
        let servable = current
            .as_ref()
            .filter(|t| t.valid_for(now, self.policy.refresh.expiry_margin));
        if let (Some(url), Some(token)) = (&self.policy.verify_url, servable) {
            // Keep serving the token until BACE says whether it is bad (BACE also answers 401
            // for endpoints the account may not use). A token no longer servable is replaced
            // without asking.
            info!(account = %slot.account.name, fingerprint = %token.fingerprint(), "token reported by a caller; verifying it");
            state.replaced = Some(token.fingerprint());
            state.last_forced_at = Some(now);
            let kind = FetchKind::Verify(token.clone(), url.clone());
            return Ok(Ok(self.start_flight(slot, &mut state, kind, true, true)));
        }
        if let Some(token) = current {
            info!(account = %slot.account.name, fingerprint = %token.fingerprint(), "token invalidated by a caller; logging in again");
            state.replaced = Some(token.fingerprint());
            slot.set_current(None);
        }
        // Rejected credentials: no login before their backoff ends (the token is dropped all
        // the same: BACE refused it). A transient backoff does not hold back a forced login:
        // the cooldown already bounds those.
        if let Some(error @ BrokerError::CredentialsRejected { .. }) = state.backing_off(now) {
            return Err(error);
        }
        state.last_forced_at = Some(now);
        Ok(Ok(self.start_flight(
            slot,
            &mut state,
            FetchKind::Login,
            true,
            true,
        )))
    }

    /// Joins `flight` as one more waiter.
    fn join(&self, slot: &Slot, flight: &Flight) -> Flight {
        self.metrics
            .singleflight_waiters
            .get_or_create(&AccountLabels {
                account: AccountLabel::Known(slot.account.name.clone()),
            })
            .inc();
        flight.join()
    }

    /// Spawns a fetch for `slot` and records it as the slot's flight. Called with the slot lock
    /// held (spawning does not block).
    fn start_flight(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        state: &mut MutexGuard<'_, SlotState>,
        kind: FetchKind,
        urgent: bool,
        forced: bool,
    ) -> Flight {
        let (tx, rx) = watch::channel(None);
        state.generation += 1;
        let generation = state.generation;
        let flight = Flight {
            result: rx,
            joined: Arc::new(AtomicU64::new(0)),
            forced,
        };
        state.flight = Some(flight.clone());
        let joined = flight.joined.clone();
        let inner = Arc::clone(self);
        let slot = Arc::clone(slot);
        let span = info_span!("fetch", account = %slot.account.name);
        self.tasks.spawn(
            async move {
                // Should this task end without completing (a panic), the guard clears the
                // flight and schedules a retry, so the account cannot stay stuck.
                let mut guard = FlightGuard {
                    inner: &inner,
                    slot: &slot,
                    generation,
                    armed: true,
                };
                let deadline = Instant::now() + inner.policy.upstream_timeout;
                let outcome = tokio::select! {
                    biased;
                    _ = inner.stop.cancelled() => None,
                    outcome = inner.fetch(&slot, generation, kind, urgent, deadline) => Some(outcome),
                };
                guard.armed = false;
                let Some(outcome) = outcome else {
                    let _ = tx.send(Some(Landed::Done(Err(BrokerError::ShuttingDown))));
                    return;
                };
                let joined = joined.load(Ordering::Relaxed);
                let landed = slot.complete(generation, outcome, &inner, joined);
                let _ = tx.send(Some(landed));
            }
            .instrument(span),
        );
        flight
    }

    /// Obtains a token: refresh grant first when there is a token to refresh; a password login
    /// when that is declined, or fails while callers wait (`urgent`). A background refresh that
    /// fails transiently is not followed by a login: the token is still good, and the retry
    /// comes after a backoff. All requests together stay within `deadline`.
    async fn fetch(
        &self,
        slot: &Slot,
        generation: u64,
        kind: FetchKind,
        urgent: bool,
        deadline: Instant,
    ) -> Fetched {
        let account = &slot.account;
        let mut declined = None;
        if let FetchKind::Verify(token, url) = &kind {
            // Half the budget at most: the login that may follow needs the rest.
            let now = Instant::now();
            let verify_deadline = now + deadline.saturating_duration_since(now) / 2;
            let verdict = timeout_at(verify_deadline, self.upstream.verify(url, token))
                .await
                .unwrap_or(Err(UpstreamError::Timeout));
            let outcome = match &verdict {
                Ok(true) => "ok",
                Ok(false) => "rejected",
                Err(e) => e.class(),
            };
            self.metrics.upstream_request(
                &slot.counters,
                &account.name,
                GrantType::Verify,
                outcome,
            );
            match verdict {
                Ok(true) => {
                    info!(fingerprint = %token.fingerprint(), "BACE accepts the reported token: the caller's 401 was a permission problem; token kept");
                    return Fetched {
                        grant: GrantType::Verify,
                        result: Ok(token.clone()),
                        refresh_declined: None,
                    };
                }
                Ok(false) => {
                    info!(fingerprint = %token.fingerprint(), "BACE refuses the reported token; logging in again")
                }
                Err(error) => warn!(%error, "cannot verify the reported token; logging in again"),
            }
            slot.set_current(None);
        }
        if let FetchKind::Refresh(token) = kind {
            // When callers wait, leave the login fallback half of the budget.
            let refresh_deadline = if urgent {
                let now = Instant::now();
                now + deadline.saturating_duration_since(now) / 2
            } else {
                deadline
            };
            let answer = self
                .call(
                    slot,
                    GrantType::Refresh,
                    refresh_deadline,
                    self.upstream.refresh(account, &token),
                )
                .await
                .and_then(|issued| self.accept(account, issued, Some(&token)));
            match answer {
                Ok(token) => {
                    return Fetched {
                        grant: GrantType::Refresh,
                        result: Ok(token),
                        refresh_declined: None,
                    };
                }
                Err(error) if error.is_transient() && !urgent => {
                    warn!(%error, "refresh failed; retrying after a backoff while the token is valid");
                    return Fetched {
                        grant: GrantType::Refresh,
                        result: Err(error),
                        refresh_declined: None,
                    };
                }
                Err(error) if slot.lock().generation != generation => {
                    // An invalidation replaced this fetch meanwhile; its login is under way.
                    return Fetched {
                        grant: GrantType::Refresh,
                        result: Err(error),
                        refresh_declined: None,
                    };
                }
                Err(error) => {
                    warn!(%error, "refresh failed; falling back to a password login");
                    if !error.is_transient() {
                        declined = Some(token.fingerprint());
                    }
                }
            }
        }
        let result = self
            .call(
                slot,
                GrantType::Password,
                deadline,
                self.upstream.login(account),
            )
            .await
            .and_then(|issued| self.accept(account, issued, None));
        Fetched {
            grant: GrantType::Password,
            result,
            refresh_declined: declined,
        }
    }

    /// One upstream request, bounded by `deadline`, timed and counted.
    async fn call(
        &self,
        slot: &Slot,
        grant: GrantType,
        deadline: Instant,
        request: impl Future<Output = Result<Issued, UpstreamError>>,
    ) -> Result<Issued, UpstreamError> {
        let started = Instant::now();
        let answer = timeout_at(deadline, request)
            .await
            .unwrap_or(Err(UpstreamError::Timeout));
        let m = &self.metrics;
        m.upstream_duration
            .get_or_create(&GrantLabels {
                grant: grant.as_str(),
            })
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &answer {
            Ok(_) => "ok",
            Err(e) => e.class(),
        };
        m.upstream_request(&slot.counters, &slot.account.name, grant, outcome);
        answer
    }

    /// Turns an upstream answer into the token to store. `prior` is the token a refresh was
    /// made with.
    fn accept(
        &self,
        account: &AccountConfig,
        issued: Issued,
        prior: Option<&Arc<Token>>,
    ) -> Result<Arc<Token>, UpstreamError> {
        let (now, now_wall) = (Instant::now(), SystemTime::now());
        let policy = &self.policy.refresh;
        let token = match (issued, prior) {
            (
                Issued::Token {
                    access,
                    refresh,
                    lifetime,
                },
                prior,
            ) => {
                let lifetime = lifetime.unwrap_or(if prior.is_some() {
                    policy.refreshed_lifetime
                } else {
                    policy::DEFAULT_LOGIN_LIFETIME
                });
                let refresh = refresh.or_else(|| {
                    prior.and_then(|p| p.expose_refresh().map(secrecy::SecretString::from))
                });
                let token = Token::new(
                    account.name.clone(),
                    access,
                    refresh,
                    lifetime,
                    now,
                    now_wall,
                );
                if prior.is_some() {
                    token.from_refresh()
                } else {
                    token
                }
            }
            (Issued::Extended { expires }, Some(prior)) => {
                let lifetime = policy::refreshed_lifetime(expires, now_wall, policy.refreshed_lifetime)
                    .unwrap_or_else(|fallback| {
                        warn!(
                            fallback = %humantime::format_duration(fallback),
                            "refresh answer has no usable future \"expires\"; assuming the refreshed lifetime"
                        );
                        fallback
                    });
                prior.extended(lifetime, now, now_wall)
            }
            (Issued::Extended { .. }, None) => {
                return Err(UpstreamError::InvalidAnswer(
                    "refresh answer to a password grant",
                ));
            }
        };
        if token.lifetime() <= policy.expiry_margin {
            return Err(UpstreamError::InvalidAnswer(
                "token expires within the expiry margin",
            ));
        }
        Ok(Arc::new(token))
    }

    /// Runs the refresh or retry planned for `slot` at `at` (from the [`Refresher`]), if that
    /// plan is still the slot's latest and the slot is still the account's (a reload may have
    /// removed or replaced it).
    fn refresh_due(self: &Arc<Self>, slot: &Arc<Slot>, at: Instant) {
        if slot.is_retired() {
            return;
        }
        let now = Instant::now();
        let mut state = slot.lock();
        if state.next_due != Some(at) || state.flight.is_some() {
            // Planned again since (that plan comes due in its turn), or a fetch runs (its
            // completion plans the next refresh).
            return;
        }
        if let Some(retry_at) = state.retry_at().filter(|r| *r > now) {
            slot.plan(&mut state, self, retry_at);
            return;
        }
        let current = slot.current.load_full();
        let urgent = !current
            .as_ref()
            .is_some_and(|t| t.valid_for(now, self.policy.refresh.expiry_margin));
        let kind = self.fetch_kind(current, &state, now);
        self.start_flight(slot, &mut state, kind, urgent, false);
    }
}

/// Clears a flight whose task ended without completing it (see [`Inner::start_flight`]).
struct FlightGuard<'a> {
    inner: &'a Arc<Inner>,
    slot: &'a Arc<Slot>,
    generation: u64,
    armed: bool,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if !self.armed || self.inner.stop.is_cancelled() {
            return;
        }
        let mut state = self.slot.lock();
        if state.generation != self.generation {
            return;
        }
        tracing::error!(account = %self.slot.account.name, "token fetch ended abnormally; retrying after a backoff");
        state.flight = None;
        let retry_at = Instant::now() + self.inner.policy.refresh.backoff_max;
        state.failing().retry_at = Some(retry_at);
        self.slot.plan(&mut state, self.inner, retry_at);
    }
}

/// What one fetch produced.
struct Fetched {
    grant: GrantType,
    result: Result<Arc<Token>, UpstreamError>,
    /// The token whose refresh BACE declined during this fetch.
    refresh_declined: Option<Fingerprint>,
}

// === impl Slot ===

impl Slot {
    fn new(account: AccountConfig) -> Self {
        Self {
            account,
            current: ArcSwapOption::empty(),
            watch: std::sync::OnceLock::new(),
            retired: std::sync::atomic::AtomicBool::new(false),
            counters: AccountCounters::default(),
            state: Mutex::new(SlotState::default()),
        }
    }

    /// Marks the slot as no longer the account's (a reload replaced or removed it) and wakes
    /// its watchers so they move on.
    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake_watchers();
    }

    /// Wakes the slot's watchers (they look again at the slot and its token).
    fn wake_watchers(&self) {
        if let Some(watch) = self.watch.get() {
            watch.send_modify(|_| {});
        }
    }

    /// A receiver of the current token and its changes (creating the channel on first use).
    fn subscribe(&self) -> watch::Receiver<Option<Arc<Token>>> {
        let watch = self
            .watch
            .get_or_init(|| watch::Sender::new(self.current.load_full()));
        // A token stored while the channel was being created may have missed it: catch up.
        // (`set_current` stores first and then sends, so whichever runs last is right.)
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

    /// Replaces the current token, for readers and watchers.
    fn set_current(&self, token: Option<Arc<Token>>) {
        self.current.store(token.clone());
        if let Some(watch) = self.watch.get() {
            watch.send_replace(token);
        }
    }

    fn status(&self, margin: Duration) -> AccountStatus {
        let (now, now_wall) = (Instant::now(), SystemTime::now());
        let to_wall = |at: Instant| now_wall + at.saturating_duration_since(now);
        let state = self.lock();
        let token = self.current.load_full();
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
            watchers: self.watch.get().map_or(0, |w| w.receiver_count()),
            counts: self.counters.snapshot(),
        }
    }

    /// Whether a reload removed or replaced this slot.
    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than refusing service: recover the guard.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached token if it stays valid for `needed`: one lock-free load.
    fn servable(&self, now: Instant, needed: Duration) -> Option<Arc<Token>> {
        let guard = self.current.load();
        match &*guard {
            Some(token) if token.valid_for(now, needed) => Some(Arc::clone(token)),
            _ => None,
        }
    }

    fn out_of_range(&self) -> BrokerError {
        BrokerError::ValidityOutOfRange {
            account: self.account.name.clone(),
        }
    }

    /// Records a finished fetch: installs the token or the backoff, logs, plans the next
    /// refresh or retry (under the lock, so plans reach the refresher in order), and returns
    /// what waiters get.
    fn complete(
        self: &Arc<Self>,
        generation: u64,
        fetched: Fetched,
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
                grant = fetched.grant.as_str(),
                "fetch superseded by an invalidation"
            );
            return Landed::Superseded;
        }
        state.flight = None;
        if fetched.refresh_declined.is_some() {
            state.refresh_declined = fetched.refresh_declined;
        }
        let grant = fetched.grant.as_str();
        if let (GrantType::Verify, Ok(token)) = (fetched.grant, &fetched.result) {
            // BACE accepts the reported token: nothing about the account changed.
            debug!(fingerprint = %token.fingerprint(), waiters = joined + 1, "reported token verified");
            // Its plan still waits in the refresher, unless it came due while this fetch ran
            // (and was skipped for it): then plan it again.
            if let Some(next) = state.next_due.filter(|at| *at <= now) {
                self.plan(&mut state, inner, next);
            }
            return Landed::Done(Ok(token.clone()));
        }
        match fetched.result {
            Ok(token) => {
                let delay = policy::refresh_delay(
                    token.lifetime(),
                    r.lifetime_fraction,
                    r.expiry_margin,
                    jitter(),
                );
                info!(
                    grant,
                    fingerprint = %token.fingerprint(),
                    expires_in = %humantime::format_duration(token.lifetime()),
                    refresh_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())),
                    waiters = joined + 1,
                    "token obtained"
                );
                self.set_current(Some(token.clone()));
                state.last_success_at = Some(SystemTime::now());
                state.failing = None;
                self.plan(&mut state, inner, token.obtained_at() + delay);
                Landed::Done(Ok(token))
            }
            Err(error) => {
                let rejected = fetched.grant == GrantType::Password && !error.is_transient();
                let failing = state.failing();
                let (broker_error, wait) = if rejected {
                    failing.rejections += 1;
                    let wait = policy::rejected_backoff(failing.rejections, r.rejected_backoff);
                    let e = BrokerError::CredentialsRejected {
                        account: self.account.name.clone(),
                    };
                    (e, wait)
                } else {
                    failing.failures += 1;
                    let wait = policy::backoff(
                        failing.failures,
                        r.backoff_initial,
                        r.backoff_max,
                        rand::random(),
                    );
                    let e = BrokerError::Unavailable {
                        account: self.account.name.clone(),
                        reason: error.class(),
                    };
                    (e, wait)
                };
                warn!(
                    grant,
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
                if let Some(token) = self.current.load_full() {
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

    /// Records and sends the instant the slot is next due.
    fn plan(self: &Arc<Self>, state: &mut SlotState, inner: &Inner, at: Instant) {
        state.next_due = Some(at);
        let _ = inner.schedule.send(Plan {
            at,
            slot: Arc::downgrade(self),
        });
    }
}

impl SlotState {
    /// The error to answer while in a backoff window, if in one.
    fn backing_off(&self, now: Instant) -> Option<BrokerError> {
        let failing = self.failing.as_deref()?;
        match (&failing.retry_at, &failing.last_error) {
            (Some(at), Some(error)) if now < *at => Some(error.clone()),
            _ => None,
        }
    }

    /// When the backoff ends, if one is set.
    fn retry_at(&self) -> Option<Instant> {
        self.failing.as_ref().and_then(|f| f.retry_at)
    }

    /// The failure record, started by the first failure.
    fn failing(&mut self) -> &mut Failing {
        self.failing.get_or_insert_default()
    }
}

fn jitter() -> f64 {
    rand::random::<f64>() * 2.0 - 1.0
}

// === Refresher ===

/// The background task that refreshes each token when due and retries failed fetches: one
/// timer queue for all accounts, owned by one task, stopped by [`Broker::shutdown`].
///
/// The queue is a binary heap of [`Plan`]s (24 bytes each). A slot planned again before its
/// plan comes due (an on-demand fetch, an invalidation) leaves the older plan in the heap;
/// [`Inner::refresh_due`] ignores it when it comes up (the slot's `next_due` moved on). Such
/// leftovers, and plans of slots a reload retired, are dropped by a compaction once they exceed
/// a quarter of the accounts (at least [`QUEUE_SLACK`]). Due plans are run in batches of
/// [`DUE_BATCH`], so a burst of them (after a suspend, say) does not hold up the task.
pub struct Refresher {
    broker: Broker,
    plans: mpsc::UnboundedReceiver<Plan>,
    queue: BinaryHeap<Reverse<Plan>>,
    stop: CancellationToken,
}

/// The longest the refresher sleeps without looking at its queue.
const MAX_TIMER: Duration = Duration::from_secs(86_400);

/// Leftover plans tolerated in the queue (beyond one per account) before a compaction, at least.
const QUEUE_SLACK: usize = 1024;

/// Due plans run per turn of the refresher's loop.
const DUE_BATCH: usize = 1024;

/// A slot due for a refresh or retry at an instant. A slot a reload removed or replaced is not
/// kept alive by its plans (a `Weak`), and is skipped when they come due.
struct Plan {
    at: Instant,
    slot: Weak<Slot>,
}

// Plans compare by instant alone: that is the heap's order (two plans of one instant are equal
// to it, whatever their slots).
impl PartialEq for Plan {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Plan {}

impl PartialOrd for Plan {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Plan {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

impl Refresher {
    /// Runs until the broker shuts down.
    pub async fn run(mut self) {
        let timer = tokio::time::sleep(MAX_TIMER);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = &mut timer => {
                    let now = Instant::now();
                    for _ in 0..DUE_BATCH {
                        let Some(Reverse(plan)) = self
                            .queue
                            .peek_mut()
                            .filter(|p| p.0.at <= now)
                            .map(std::collections::binary_heap::PeekMut::pop)
                        else {
                            break;
                        };
                        if let Some(slot) = plan.slot.upgrade() {
                            self.broker.inner.refresh_due(&slot, plan.at);
                        }
                    }
                    // Wake for the earliest plan (at once if more are due), at least daily.
                    let next = self.queue.peek().map_or(now + MAX_TIMER, |p| p.0.at);
                    timer.as_mut().reset(next.min(now + MAX_TIMER));
                }
                plan = self.plans.recv() => {
                    let Some(plan) = plan else { break };
                    if plan.at < timer.deadline() {
                        timer.as_mut().reset(plan.at);
                    }
                    self.queue.push(Reverse(plan));
                    self.compact();
                }
            }
        }
        debug!("refresher stopped");
    }

    /// Drops plans that no longer count (their slot is gone or was planned again) once they
    /// outnumber the accounts.
    fn compact(&mut self) {
        let accounts = self.broker.inner.accounts.len();
        if self.queue.len() <= accounts + (accounts / 4).max(QUEUE_SLACK) {
            return;
        }
        let before = self.queue.len();
        self.queue.retain(|Reverse(plan)| {
            plan.slot
                .upgrade()
                .is_some_and(|slot| !slot.is_retired() && slot.lock().next_due == Some(plan.at))
        });
        debug!(before, after = self.queue.len(), "refresh queue compacted");
    }
}
