//! One fetch of an account's token, shared by every caller that waits for it.
//!
//! The fetch runs as a task of its own ([`Inner::start_flight`]), not inside the first caller's
//! future: a caller that gives up drops only its receiver, and the fetch goes on for the others.
//! Its result reaches every waiter at once through a `watch` channel. A fetch is a refresh grant
//! (falling back to a login), a login, or a check of a reported token followed by a login if
//! BACE refuses it, all within one budget.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use secrecy::SecretString;
use tokio::{
    sync::watch,
    time::{Instant, timeout_at},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::{
    BrokerError, Inner, schedule,
    shared::{FlightPlan, SharedFetch},
    slot::Slot,
    slot::SlotState,
};
use crate::{
    config::AccountConfig,
    token::{Fingerprint, Token},
    upstream::{Call, Grant, Issued, UpstreamError},
};

/// What a fetch hands its waiters.
#[derive(Clone)]
pub(super) enum Landed {
    /// The result of a grant (or of a check followed by a login).
    Done(Result<Arc<Token>, BrokerError>),
    /// BACE accepts the token an invalidation reported: it stays the account's token.
    Verified(Arc<Token>),
    /// An invalidation replaced the fetch before it ended: look again.
    Superseded,
}

/// Why a fetch runs; decides how hard it tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    /// A caller waits for it.
    Caller,
    /// The refresher, ahead of expiry: the token is still served, so a refresh that fails
    /// transiently is retried after a backoff rather than followed by a login.
    Ahead,
    /// The refresher, with no servable token left: as pressing as a waiting caller.
    Overdue,
    /// An invalidation: a forced re-login (or a check of the reported token first). Further
    /// invalidations of the same token join it.
    Forced,
}

impl Trigger {
    /// Whether someone needs a token now: a refresh that fails falls back to a login at once,
    /// and leaves that login half of the budget.
    fn is_pressing(self) -> bool {
        !matches!(self, Trigger::Ahead)
    }
}

/// A fetch in progress that callers can join.
#[derive(Clone)]
pub(super) struct Flight {
    result: watch::Receiver<Option<Landed>>,
    /// Callers that joined after the first one, and the fetch's cancellation (one allocation:
    /// a flight lives in every slot's state).
    shared: Arc<Shared>,
    trigger: Trigger,
}

struct Shared {
    joined: AtomicU64,
    /// Cancelled when an invalidation replaces this fetch: its request is abandoned, so an
    /// account never has two requests out at once.
    superseded: CancellationToken,
}

impl Flight {
    /// Why this fetch runs.
    pub(super) fn trigger(&self) -> Trigger {
        self.trigger
    }

    pub(super) fn join(&self) -> Self {
        self.shared.joined.fetch_add(1, Ordering::Relaxed);
        self.clone()
    }

    pub(super) async fn wait(mut self) -> Landed {
        match self.result.wait_for(Option::is_some).await {
            Ok(landed) => landed.clone().unwrap_or(Landed::Superseded),
            // The fetch task ended without a result: shutdown (or a bug, which the task's
            // guard has already recorded as a failure).
            Err(_) => Landed::Done(Err(BrokerError::ShuttingDown)),
        }
    }
}

/// What a fetch does first.
pub(super) enum FetchKind {
    /// Refresh grant with this token; password grant if that fails (see [`Inner::fetch`]).
    Refresh(Arc<Token>),
    /// Password grant.
    Login,
    /// Ask `upstream.verify_url` whether BACE accepts this token; a password grant if not.
    Verify(Arc<Token>, reqwest::Url),
}

impl FetchKind {
    /// Refresh when there is a token that BACE may still extend, else log in.
    pub(super) fn for_token(current: Option<Arc<Token>>, state: &SlotState, now: Instant) -> Self {
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
}

/// What one fetch produced.
pub(super) enum Fetched {
    /// BACE accepts the reported token (a [`FetchKind::Verify`] that needed no login).
    Verified(Arc<Token>),
    /// The last grant the fetch made, and its result.
    Granted {
        grant: Grant,
        result: Result<Arc<Token>, UpstreamError>,
        /// The token whose refresh BACE declined during this fetch.
        refresh_declined: Option<Fingerprint>,
    },
    /// Another replica's token, read from the store (no upstream call).
    Adopted(Arc<Token>),
    /// A backoff another replica set (the shared failure state): no upstream call before
    /// `until`.
    BackingOff {
        error: BrokerError,
        until: Instant,
        /// The failures (or rejections) behind it, so the next backoff grows from there.
        attempts: u32,
        rejected: bool,
    },
}

impl Fetched {
    /// What the fetch did last, for logs.
    pub(super) fn what(&self) -> &'static str {
        match self {
            Fetched::Verified(_) => Call::Verify.as_str(),
            Fetched::Granted { grant, .. } => grant.as_str(),
            Fetched::Adopted(_) => "store",
            Fetched::BackingOff { .. } => "shared backoff",
        }
    }

    /// A fetch that failed before any grant (a password grant's failure, for the backoff).
    pub(super) fn failed(error: UpstreamError) -> Self {
        Fetched::granted(Grant::Password, Err(error))
    }

    /// The token it produced, if any.
    pub(super) fn token(&self) -> Option<Arc<Token>> {
        match self {
            Fetched::Verified(token) | Fetched::Adopted(token) => Some(token.clone()),
            Fetched::Granted {
                result: Ok(token), ..
            } => Some(token.clone()),
            _ => None,
        }
    }

    fn granted(grant: Grant, result: Result<Arc<Token>, UpstreamError>) -> Self {
        Fetched::Granted {
            grant,
            result,
            refresh_declined: None,
        }
    }
}

impl Inner {
    /// Spawns a fetch for `slot` and records it as the slot's flight. Called with the slot lock
    /// held (spawning does not block).
    pub(super) fn start_flight(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        kind: FetchKind,
        trigger: Trigger,
    ) -> Flight {
        let (tx, rx) = watch::channel(None);
        state.generation = state.generation.wrapping_add(1);
        let generation = state.generation;
        let flight = Flight {
            result: rx,
            shared: Arc::new(Shared {
                joined: AtomicU64::new(0),
                superseded: CancellationToken::new(),
            }),
            trigger,
        };
        // Only an invalidation starts a fetch while another runs: that one is abandoned.
        if let Some(replaced) = state.flight.replace(flight.clone()) {
            replaced.shared.superseded.cancel();
        }
        let shared = flight.shared.clone();
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
                let fetch = async {
                    match &inner.store {
                        Some(store) => {
                            let plan = FlightPlan {
                                generation,
                                kind,
                                trigger,
                                deadline,
                                superseded: &shared.superseded,
                            };
                            inner.fetch_shared(store, &slot, plan).await
                        }
                        None => SharedFetch {
                            fetched: inner
                                .fetch(&slot, generation, kind, trigger, deadline)
                                .await,
                            version: None,
                            lease: None,
                            saw_backoff: false,
                        },
                    }
                };
                let outcome = tokio::select! {
                    biased;
                    _ = inner.stop.cancelled() => None,
                    // With a store, the shared fetch ends itself (and releases the lease it
                    // may hold: dropped, the lease would hold the new flight back).
                    _ = shared.superseded.cancelled(), if inner.store.is_none() => {
                        guard.armed = false;
                        let _ = tx.send(Some(Landed::Superseded));
                        return;
                    }
                    outcome = fetch => Some(outcome),
                };
                guard.armed = false;
                let Some(outcome) = outcome else {
                    let _ = tx.send(Some(Landed::Done(Err(BrokerError::ShuttingDown))));
                    return;
                };
                let joined = shared.joined.load(Ordering::Relaxed);
                let landed =
                    slot.complete(generation, outcome.fetched, outcome.version, &inner, joined);
                let _ = tx.send(Some(landed.clone()));
                // The lease is released once the outcome is shared (after the waiters got
                // theirs): the next holder finds the token, or the backoff.
                if let (Some(store), Some(lease)) = (&inner.store, outcome.lease) {
                    inner
                        .settle_shared(store, &slot, &landed, lease, outcome.saw_backoff)
                        .await;
                }
            }
            .instrument(span),
        );
        flight
    }

    /// Obtains a token: refresh grant first when there is a token to refresh; a password login
    /// when that is declined, or fails while someone needs the token now (a pressing
    /// [`Trigger`]). A refresh ahead of expiry that fails transiently is not followed by a
    /// login: the token is still good, and the retry comes after a backoff. All requests
    /// together stay within `deadline`.
    pub(super) async fn fetch(
        &self,
        slot: &Slot,
        generation: u32,
        kind: FetchKind,
        trigger: Trigger,
        deadline: Instant,
    ) -> Fetched {
        let account = &slot.account;
        let mut declined = None;
        if let FetchKind::Verify(token, url) = &kind {
            // Half the budget at most: the login that may follow needs the rest.
            let verdict = timeout_at(halfway(deadline), self.upstream.verify(url, token))
                .await
                .unwrap_or(Err(UpstreamError::Timeout));
            let outcome = match &verdict {
                Ok(true) => "ok",
                Ok(false) => "rejected",
                Err(e) => e.class(),
            };
            self.metrics
                .upstream_request(&slot.counters, &account.name, Call::Verify, outcome);
            match verdict {
                Ok(true) => {
                    info!(fingerprint = %token.fingerprint(), "BACE accepts the reported token: the caller's 401 was a permission problem; token kept");
                    return Fetched::Verified(token.clone());
                }
                Ok(false) => {
                    info!(fingerprint = %token.fingerprint(), "BACE refuses the reported token; logging in again")
                }
                Err(error) => warn!(%error, "cannot verify the reported token; logging in again"),
            }
            slot.token.publish(None);
        }
        if let FetchKind::Refresh(token) = kind {
            // When someone waits, leave the login fallback half of the budget.
            let refresh_deadline = if trigger.is_pressing() {
                halfway(deadline)
            } else {
                deadline
            };
            let sent = (Instant::now(), SystemTime::now());
            let answer = self
                .call(
                    slot,
                    Grant::Refresh,
                    refresh_deadline,
                    self.upstream.refresh(account, &token),
                )
                .await
                .and_then(|issued| self.accept(account, issued, Some(&token), sent));
            match answer {
                Ok(token) => return Fetched::granted(Grant::Refresh, Ok(token)),
                Err(error) if error.is_transient() && !trigger.is_pressing() => {
                    warn!(%error, "refresh failed; retrying after a backoff while the token is valid");
                    return Fetched::granted(Grant::Refresh, Err(error));
                }
                Err(error) if slot.lock().generation != generation => {
                    // An invalidation replaced this fetch meanwhile; its login is under way.
                    return Fetched::granted(Grant::Refresh, Err(error));
                }
                Err(error) => {
                    warn!(%error, "refresh failed; falling back to a password login");
                    if !error.is_transient() {
                        declined = Some(token.fingerprint());
                    }
                }
            }
        }
        let sent = (Instant::now(), SystemTime::now());
        let result = self
            .call(
                slot,
                Grant::Password,
                deadline,
                self.upstream.login(account),
            )
            .await
            .and_then(|issued| self.accept(account, issued, None, sent));
        Fetched::Granted {
            grant: Grant::Password,
            result,
            refresh_declined: declined,
        }
    }

    /// One token endpoint request, bounded by `deadline`, timed and counted.
    async fn call(
        &self,
        slot: &Slot,
        grant: Grant,
        deadline: Instant,
        request: impl Future<Output = Result<Issued, UpstreamError>>,
    ) -> Result<Issued, UpstreamError> {
        let started = Instant::now();
        let answer = timeout_at(deadline, request)
            .await
            .unwrap_or(Err(UpstreamError::Timeout));
        self.metrics.upstream_duration(grant, started.elapsed());
        let outcome = match &answer {
            Ok(_) => "ok",
            Err(e) => e.class(),
        };
        self.metrics.upstream_request(
            &slot.counters,
            &slot.account.name,
            Call::Grant(grant),
            outcome,
        );
        answer
    }

    /// Turns an upstream answer into the token to store. `prior` is the token a refresh was
    /// made with; `sent` is when the request went out. A relative lifetime (`expires_in`)
    /// counts from `sent`: BACE issued the token somewhere between then and now, so counting
    /// from the answer would stretch the token by the request's duration. A token that arrives
    /// with no more than the expiry margin left is refused (an invalid answer: backoff).
    fn accept(
        &self,
        account: &AccountConfig,
        issued: Issued,
        prior: Option<&Arc<Token>>,
        sent: (Instant, SystemTime),
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
                    schedule::DEFAULT_LOGIN_LIFETIME
                });
                let refresh = refresh
                    .or_else(|| prior.and_then(|p| p.expose_refresh().map(SecretString::from)));
                let token = Token::new(
                    account.name.clone(),
                    access,
                    refresh,
                    lifetime,
                    sent.0,
                    sent.1,
                );
                if prior.is_some() {
                    token.from_refresh()
                } else {
                    token
                }
            }
            (Issued::Extended { expires }, Some(prior)) => {
                let lifetime = schedule::refreshed_lifetime(expires, now_wall, policy.refreshed_lifetime)
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
        // What is left when the answer arrives, not the lifetime BACE granted: a slow answer
        // may bring a token that can no longer be served, and no path may hand it out.
        if !token.valid_for(now, policy.expiry_margin) {
            return Err(UpstreamError::InvalidAnswer(
                "token arrived with no more than the expiry margin left",
            ));
        }
        Ok(Arc::new(token))
    }
}

/// Halfway from now to `deadline`.
fn halfway(deadline: Instant) -> Instant {
    let now = Instant::now();
    now + deadline.saturating_duration_since(now) / 2
}

/// Clears a flight whose task ended without completing it (see [`Inner::start_flight`]).
struct FlightGuard<'a> {
    inner: &'a Arc<Inner>,
    slot: &'a Arc<Slot>,
    generation: u32,
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
