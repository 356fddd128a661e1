//! The broker core: one token slot per account, single-flight fetches, the refresh schedule
//! and invalidation. Speaks to BACE only through [`Upstream`]; knows no transport (no tonic,
//! axum or prometheus type), no registry and no exporter: adapters import it, never the reverse.
//!
//! # Rooms
//!
//! - this file: the [`Broker`] API, its errors, and the rules that span the rooms (what a caller
//!   gets, what an invalidation does);
//! - `accounts`: the account table: warm-up and applying a reloaded config;
//! - `slot`: one account's state, and the [`TokenCell`](slot::TokenCell) where its token lives;
//! - `flight`: one fetch, shared by every caller that waits for it;
//! - `shared`: several replicas as one broker, through the shared [`Store`] (Redis): leases
//!   around fetches, adopting other replicas' tokens, reconcile, shared invalidation;
//! - `refresher`: the one background task that refreshes and retries when due;
//! - `schedule`: when to refresh and how long to back off (pure functions);
//! - `watch`: [`TokenWatch`], a stream of an account's tokens;
//! - `status`: [`AccountStatus`], what operators see;
//! - `metrics`: the counts the broker keeps about its own work (plain types).
//!
//! # Concurrency
//!
//! Accounts live in a [`DashMap`] of `Arc<Slot>`: a lookup clones the slot's `Arc` out and
//! drops the map guard at once, so **no DashMap guard is ever held across an `.await`** (that
//! can deadlock the runtime) and accounts never wait on each other.
//!
//! In a slot, the current token sits in a [`TokenCell`](slot::TokenCell) (an `ArcSwapOption`):
//! serving a cached token is one lock-free load, so readers never wait for a refresh while their
//! token is valid. Everything else about the slot (the flight in progress, backoff, cooldown) is
//! under a std `Mutex` held only for short, synchronous sections, never across an `.await`.
//!
//! # Single flight
//!
//! When a token must be obtained, the first caller *spawns* the fetch as a task of its own and
//! everyone (that caller included) waits on its `watch` channel. Callers that give up drop
//! only their receiver; the fetch goes on for the others and its result, success or error,
//! reaches every waiter at once. After a failure the slot backs off: callers in the backoff
//! window get the last error without any upstream call, so BACE sees one attempt per backoff
//! step however many callers wait.

mod accounts;
mod flight;
mod metrics;
mod refresher;
mod schedule;
mod shared;
mod slot;
mod status;
mod watch;

use std::sync::Arc;

use dashmap::DashMap;
use tokio::{
    sync::{broadcast, mpsc},
    time::{Duration, Instant},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info};

pub use self::{
    accounts::{Reloaded, WarmUp},
    metrics::{AccountCounts, UpstreamCount},
    refresher::Refresher,
    status::{AccountState, AccountStatus},
    watch::{TokenStream, TokenWatch},
};
use self::{
    flight::{FetchKind, Flight, Landed, Trigger},
    metrics::BrokerMetrics,
    refresher::Plan,
    shared::SharedVerdict,
    slot::Slot,
};
use crate::{
    config::{Config, RefreshConfig},
    counts::HistogramSnapshot,
    store::Store,
    token::{AccountName, AccountNameError, Fingerprint, Token},
    upstream::{Grant, Upstream},
};

/// Adoptions a waiting fetch may miss before it reads the store instead.
const ADOPTED_BACKLOG: usize = 1024;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// What an invalidation does, decided under the slot lock.
enum Invalidation {
    /// The reported token is (being) replaced by this fetch: wait for it.
    Replace(Flight),
    /// Nothing to replace: answer the current token with this outcome.
    Keep(InvalidateOutcome),
}

/// The timing rules the broker applies, from [`Config`].
#[derive(Debug, Clone)]
struct Policy {
    /// Refresh schedule, margins and backoff.
    refresh: RefreshConfig,
    /// Budget of one fetch (all its upstream requests together).
    upstream_timeout: Duration,
    /// At most one forced re-login per account in this window.
    invalidate_cooldown: Duration,
    /// Accounts fetched at once during warm-up.
    warmup_concurrency: usize,
    /// Where a reported token is checked before it is invalidated, if anywhere.
    verify_url: Option<reqwest::Url>,
}

impl Policy {
    fn from_config(config: &Config) -> Self {
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
    /// The accounts. A DashMap: lookups on every call from many threads, rare writes (reloads).
    accounts: DashMap<AccountName, Arc<Slot>>,
    upstream: Arc<dyn Upstream>,
    policy: Policy,
    metrics: BrokerMetrics,
    /// Tells the [`Refresher`] when an account is next due.
    schedule: mpsc::UnboundedSender<Plan>,
    /// Fetch tasks; waited for on shutdown.
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Cancelled when shutdown begins: watch streams end so the server can drain.
    draining: CancellationToken,
    /// The store replicas share, if configured (see `shared`).
    store: Option<Store>,
    /// Tokens adopted from the store, by account and version: wakes fetches that wait for
    /// another replica's.
    adopted: broadcast::Sender<(AccountName, u64)>,
}

impl Broker {
    /// Builds a broker for `config`'s accounts and the [`Refresher`] that keeps their tokens
    /// fresh. Nothing is spawned here: run the refresher (e.g. `tokio::spawn(refresher.run())`)
    /// and [`Broker::warm_up`] when ready.
    pub fn new(config: &Config, upstream: Arc<dyn Upstream>) -> (Self, Refresher) {
        Self::with_store(config, upstream, None)
    }

    /// [`Broker::new`] for one replica of several sharing `store` (see [`Store`]); run
    /// [`Broker::sync_with_store`] beside the refresher.
    pub fn with_store(
        config: &Config,
        upstream: Arc<dyn Upstream>,
        store: Option<Store>,
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
                metrics: BrokerMetrics::default(),
                schedule,
                tasks: TaskTracker::new(),
                stop: stop.clone(),
                draining: stop.child_token(),
                store,
                adopted: broadcast::channel(ADOPTED_BACKLOG).0,
            }),
        };
        let refresher = Refresher::new(broker.clone(), due, stop);
        (broker, refresher)
    }

    /// A valid token for `account`, valid for at least the expiry margin plus `min_validity`,
    /// handed to a caller (counted as served, see [`AccountCounts::served`]).
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

    /// Starts (or joins) a fetch of `account`'s token in the background, as the broker's own
    /// need (a reloaded account, a watcher of an account without a token).
    fn obtain_in_background(&self, account: AccountName) {
        let broker = self.clone();
        self.inner.tasks.spawn(async move {
            let _ = broker.obtain_named(account.as_str(), Duration::ZERO).await;
        });
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
        if let Some(token) = slot.token.servable(Instant::now(), needed) {
            return Ok(token);
        }
        if needed >= self.inner.policy.refresh.refreshed_lifetime {
            return Err(slot.out_of_range());
        }
        // A fetch an invalidation supersedes is abandoned for the one that replaced it; an
        // invalidation storm cannot keep a caller here longer than a few fetches.
        let mut looked_again = false;
        for _ in 0..4 {
            let (flight, joined) = match self.inner.acquire(slot, needed)? {
                Acquired::Ready(token) => return Ok(token),
                Acquired::Joined(flight) => (flight, true),
                Acquired::Started(flight) => (flight, false),
            };
            let token = match flight.wait().await {
                Landed::Done(result) => result?,
                Landed::Verified(token) => token,
                Landed::Superseded => continue,
            };
            if token.valid_for(Instant::now(), needed) {
                return Ok(token);
            }
            // A fetch this caller started landed what BACE gives now: out of range (asking
            // again may refresh the fresh token). One started for someone else's need (a
            // login, a lower bar) says nothing about this caller's: it looks once more, and
            // `acquire` starts the refresh or refuses when none can help.
            if !joined || looked_again {
                return Err(slot.out_of_range());
            }
            looked_again = true;
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
    /// current one, without an upstream call. With `upstream.verify_url`, BACE is asked first
    /// whether it accepts the token; a token it accepts is kept ([`InvalidateOutcome::TokenValid`]).
    pub async fn invalidate(
        &self,
        account: &str,
        access_token: &str,
    ) -> Result<Invalidated, BrokerError> {
        let slot = self.inner.slot(account)?;
        let reported = (!access_token.is_empty()).then(|| Fingerprint::of(access_token));
        let decided = match &self.inner.store {
            Some(store) => match self.inner.invalidate_shared(store, &slot, reported).await {
                SharedVerdict::Keep(outcome) => {
                    return Ok(Invalidated {
                        outcome,
                        token: self.obtain_named(account, Duration::ZERO).await?,
                    });
                }
                SharedVerdict::Follow(reported) => {
                    self.inner.follow(&slot, reported);
                    return Ok(Invalidated {
                        outcome: InvalidateOutcome::Invalidated,
                        token: self.obtain_named(account, Duration::ZERO).await?,
                    });
                }
                SharedVerdict::Replace => true,
                SharedVerdict::Local => false,
            },
            None => false,
        };
        let outcome = match self.inner.invalidate(&slot, reported, decided)? {
            Invalidation::Replace(flight) => match flight.wait().await {
                Landed::Done(result) => {
                    return Ok(Invalidated {
                        outcome: InvalidateOutcome::Invalidated,
                        token: result?,
                    });
                }
                Landed::Verified(token) => {
                    return Ok(Invalidated {
                        outcome: InvalidateOutcome::TokenValid,
                        token,
                    });
                }
                // Replaced by a later login: that one's token is the answer.
                Landed::Superseded => InvalidateOutcome::Invalidated,
            },
            Invalidation::Keep(outcome) => outcome,
        };
        Ok(Invalidated {
            outcome,
            token: self.obtain_named(account, Duration::ZERO).await?,
        })
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

    /// Requests to BACE by account, call and outcome that are not in the accounts'
    /// [`AccountCounts`] (those count successful password and refresh grants).
    pub fn upstream_counts(&self) -> Vec<UpstreamCount> {
        self.inner.metrics.upstream_counts()
    }

    /// Callers that joined a fetch already in flight, by account (single flight at work).
    pub fn singleflight_joins(&self) -> Vec<(AccountName, u64)> {
        self.inner.metrics.joins()
    }

    /// The store this replica shares with the others, if configured.
    pub fn store(&self) -> Option<&Store> {
        self.inner.store.as_ref()
    }

    /// Reconcile corrections with the store, by kind (`adopted`, `written_back`).
    pub fn store_reconciles(&self) -> Vec<(&'static str, u64)> {
        self.inner.metrics.reconciles()
    }

    /// How long new tokens took from the replica that stored them to this one.
    pub(crate) fn store_propagation(&self) -> HistogramSnapshot {
        self.inner.metrics.propagation()
    }

    /// How long token endpoint requests took, by grant.
    pub(crate) fn upstream_durations(&self) -> [(Grant, HistogramSnapshot); 2] {
        self.inner.metrics.upstream_durations()
    }

    /// Watches `account`'s token (see [`TokenWatch`]). When the account holds no valid token,
    /// a fetch is started (or joined) so the watcher need not wait for the next retry.
    pub fn watch(&self, account: &str) -> Result<TokenWatch, BrokerError> {
        let slot = self.inner.slot(account)?;
        let receiver = slot.token.subscribe();
        if slot
            .token
            .servable(Instant::now(), self.inner.policy.refresh.expiry_margin)
            .is_none()
        {
            self.obtain_in_background(slot.account.name.clone());
        }
        Ok(TokenWatch::new(self.clone(), slot, receiver))
    }

    /// Ends every [`TokenWatch`] (the first step of a shutdown: streams must end for the
    /// server to drain). Fetches and refreshes go on until [`Broker::shutdown`].
    pub fn drain(&self) {
        self.inner.draining.cancel();
    }

    /// Stops background work: the refresher ends, fetches in progress are abandoned and their
    /// waiters get [`BrokerError::ShuttingDown`]. Returns once every fetch task has ended.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// What [`Inner::acquire`] found.
enum Acquired {
    /// The cached token is good enough.
    Ready(Arc<Token>),
    /// Wait for this fetch, started by someone else.
    Joined(Flight),
    /// Wait for this fetch, started for this caller.
    Started(Flight),
}

// === impl Inner ===

impl Inner {
    /// Joins `flight` of `slot` as one more waiter (counted).
    fn join(&self, slot: &Slot, flight: &Flight) -> Flight {
        self.metrics.joined(&slot.account.name);
        flight.join()
    }

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
        let current = slot.token.current();
        if let Some(token) = current.as_ref().filter(|t| t.valid_for(now, needed)) {
            return Ok(Acquired::Ready(token.clone()));
        }
        if let Some(flight) = &state.flight {
            return Ok(Acquired::Joined(self.join(slot, flight)));
        }
        if let Some(error) = state.backing_off(now) {
            return Err(error);
        }
        let margin = self.policy.refresh.expiry_margin;
        let kind = FetchKind::for_token(current.clone(), &state, now);
        if let Some(token) = &current {
            // A token just obtained that still misses the caller's bar would not be helped by
            // the same kind of fetch again; refusing here keeps such callers from hammering
            // BACE. (A fresh login token may still be extended by a refresh.)
            let fresh = token.valid_for(now, margin) && now < token.obtained_at() + margin;
            if fresh && (token.is_refreshed() || matches!(kind, FetchKind::Login)) {
                return Err(slot.out_of_range());
            }
        }
        Ok(Acquired::Started(self.start_flight(
            slot,
            &mut state,
            kind,
            Trigger::Caller,
        )))
    }

    /// Decides what an invalidation of `reported` (`None`: the current token) does. `decided`:
    /// the store already decided to replace it (for every replica): no local cooldown.
    fn invalidate(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        reported: Option<Fingerprint>,
        decided: bool,
    ) -> Result<Invalidation, BrokerError> {
        let now = Instant::now();
        let mut state = slot.lock();
        let current = slot.token.current();
        let forced = state
            .flight
            .as_ref()
            .filter(|f| f.trigger() == Trigger::Forced)
            .cloned();
        let is_current = match (reported, &current) {
            (None, _) => true,
            (Some(fp), Some(token)) => fp == token.fingerprint(),
            (Some(_), None) => false,
        };
        if !is_current {
            // Another caller is already replacing this very token: share its login.
            return Ok(match forced {
                Some(f) if reported.is_some() && reported == state.replaced => {
                    Invalidation::Replace(self.join(slot, &f))
                }
                _ => Invalidation::Keep(InvalidateOutcome::AlreadyReplaced),
            });
        }
        // A forced login for this very token, or, with no token to drop, whatever fetch runs
        // (a login): share it rather than start a second login.
        let running = forced.or_else(|| state.flight.clone().filter(|_| current.is_none()));
        if let Some(flight) = running {
            return Ok(Invalidation::Replace(self.join(slot, &flight)));
        }
        if !decided
            && state
                .last_forced_at
                .is_some_and(|at| now < at + self.policy.invalidate_cooldown)
        {
            debug!(account = %slot.account.name, "invalidation within cooldown; keeping the current token");
            return Ok(Invalidation::Keep(InvalidateOutcome::Cooldown));
        }
        // Rejected credentials: no login before their backoff ends, verified or not.
        if let Some(error @ BrokerError::CredentialsRejected { .. }) = state.backing_off(now) {
            if let Some(token) = &current {
                state.replaced = Some(token.fingerprint());
                slot.token.publish(None);
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
            return Ok(Invalidation::Replace(self.start_flight(
                slot,
                &mut state,
                kind,
                Trigger::Forced,
            )));
        }
        if let Some(token) = current {
            info!(account = %slot.account.name, fingerprint = %token.fingerprint(), "token invalidated by a caller; logging in again");
            state.replaced = Some(token.fingerprint());
            slot.token.publish(None);
        }
        state.last_forced_at = Some(now);
        Ok(Invalidation::Replace(self.start_flight(
            slot,
            &mut state,
            FetchKind::Login,
            Trigger::Forced,
        )))
    }
}
