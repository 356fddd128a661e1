//! Several replicas as one broker: how the core uses the shared [`Store`] (Redis).
//!
//! Without a store nothing here runs. With one:
//!
//! - **a fetch** ([`Inner::fetch_shared`]) takes the account's lease first. The holder reads
//!   the record again (the previous holder may have just written a token, or a backoff), calls
//!   BACE inside [`Store::hold`], writes the token with the next version (the version is the
//!   fence), announces it, records a failure as the shared backoff, and releases the lease
//!   ([`Inner::settle_shared`]). A replica that finds the lease held waits for the holder's
//!   token (its announcement, or a read every [`HOLDER_POLL`]) and adopts it. A Redis error
//!   means "unknown", never "absent": the fetch runs locally, as without a store, and the
//!   token is written back by the next reconcile;
//! - **announcements** of other replicas' tokens are adopted as they arrive
//!   ([`Broker::sync_with_store`]), and every account is **reconciled** with the store after
//!   each (re)subscription and every [`RECONCILE_INTERVAL`]: adopt a newer stored version (or
//!   the stored token of the same version: replicas that fetched on their own while Redis was
//!   down converge on one), write back what this replica holds where the store has less;
//! - **warm-up** reads every account's record first and logs in only for the rest
//!   ([`Inner::warm_from_store`]);
//! - **Invalidate** is decided once for all replicas ([`Inner::invalidate_shared`]).

use std::{
    sync::Arc,
    time::{Duration as StdDuration, SystemTime},
};

use tokio::{
    sync::broadcast,
    time::{Duration, Instant, sleep, timeout_at},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Broker, BrokerError, Inner, InvalidateOutcome,
    flight::{FetchKind, Fetched, Landed, Trigger},
    slot::Slot,
};
use crate::{
    store::{
        Acquired, Backoff, BackoffKind, Head, Invalidation as StoreVerdict, Lease, Record, Store,
        StoreEvent, Stored, Written,
    },
    token::{AccountName, Fingerprint, Token},
    upstream::UpstreamError,
};

/// How often every account is compared with the store, besides after each (re)subscription.
pub(super) const RECONCILE_INTERVAL: Duration = Duration::from_secs(30);

/// How soon a reconcile that found Redis not answering is tried again.
pub(super) const RECONCILE_RETRY: Duration = Duration::from_secs(2);

/// How often a replica waiting for another's fetch reads the record (announcements usually
/// wake it first).
pub(super) const HOLDER_POLL: Duration = Duration::from_millis(500);

/// What a flight asks of [`Inner::fetch_shared`].
pub(super) struct FlightPlan<'a> {
    /// The flight's generation (see `SlotState::generation`).
    pub(super) generation: u32,
    pub(super) kind: FetchKind,
    pub(super) trigger: Trigger,
    /// The budget of its upstream requests.
    pub(super) deadline: Instant,
    /// Cancelled when an invalidation replaces the flight.
    pub(super) superseded: &'a CancellationToken,
}

/// What a shared fetch hands back to its flight besides the fetch itself.
pub(super) struct SharedFetch {
    pub(super) fetched: Fetched,
    /// The store version of the token fetched or adopted (`None`: no token).
    pub(super) version: Option<u64>,
    /// The lease, held until the outcome is settled ([`Inner::settle_shared`]).
    pub(super) lease: Option<Lease>,
    /// Whether a shared backoff was set when the fetch started (to clear after a success).
    pub(super) saw_backoff: bool,
}

impl SharedFetch {
    fn local(fetched: Fetched, version: Option<u64>) -> Self {
        Self {
            fetched,
            version,
            lease: None,
            saw_backoff: false,
        }
    }
}

/// What an invalidation does given the store's verdict.
pub(super) enum SharedVerdict {
    /// Replace the reported token (this replica logs in): no local cooldown check, the store
    /// decided.
    Replace,
    /// Another replica replaces it: drop it here too and wait for that replica's token, as a
    /// caller would (honouring the shared backoff should its login fail).
    Follow(Fingerprint),
    /// Answer this outcome with the current token (after adopting the stored one, if newer).
    Keep(InvalidateOutcome),
    /// The store cannot decide (no record, or Redis down): the local rules apply.
    Local,
}

impl Inner {
    /// A fetch through the account's lease (see the module documentation).
    pub(super) async fn fetch_shared(
        &self,
        store: &Store,
        slot: &Arc<Slot>,
        flight: FlightPlan<'_>,
    ) -> SharedFetch {
        let FlightPlan {
            generation,
            mut kind,
            trigger,
            deadline,
            superseded,
        } = flight;
        let name = &slot.account.name;
        // However long other holders take (a fetch, and a login after it), a waiting caller
        // hears back within this.
        let give_up = deadline + self.policy.upstream_timeout * 2 + store.lease_duration();
        let mut adopted = self.adopted.subscribe();
        let mut waited = false;
        // The version this flight started from: a token newer than it, however it came in
        // (an announcement the sync task adopted, a read), ends the flight.
        let known = slot.lock().version;
        loop {
            let fresh = {
                let state = slot.lock();
                if state.generation != generation {
                    // An invalidation superseded this flight while it waited: stop here (its
                    // result is dropped), the new flight does the work.
                    return SharedFetch::local(Fetched::failed(UpstreamError::Timeout), None);
                }
                if state.version > known
                    && let Some(token) = slot
                        .token
                        .servable(Instant::now(), self.policy.refresh.expiry_margin)
                {
                    return SharedFetch::local(Fetched::Adopted(token), Some(state.version));
                }
                state.fresh_credentials
            };
            let mut lease = match store.acquire_lease(name).await {
                Ok(Acquired::Acquired(lease)) => lease,
                Ok(Acquired::Held { expires_in }) => {
                    waited = true;
                    let ends = Instant::now() + expires_in.unwrap_or(HOLDER_POLL);
                    let waited_for = tokio::select! {
                        found = self.await_holder(store, slot, known, ends.min(give_up), &mut adopted) => found,
                        // The loop's first check ends the flight.
                        () = superseded.cancelled() => continue,
                    };
                    if let Some((token, version)) = waited_for {
                        return SharedFetch::local(Fetched::Adopted(token), Some(version));
                    }
                    if Instant::now() >= give_up {
                        warn!(
                            "another replica holds the fetch lease and no token came; giving up for now"
                        );
                        let fetched = Fetched::failed(UpstreamError::Timeout);
                        return SharedFetch::local(fetched, None);
                    }
                    continue;
                }
                Err(error) => {
                    debug!(%error, "store unavailable; fetching locally");
                    let deadline = fresh_deadline(waited, deadline, self.policy.upstream_timeout);
                    let fetched = self.fetch(slot, generation, kind, trigger, deadline).await;
                    // Not written: a version above the known one, for the reconcile's
                    // write-back.
                    let version = fetched.token().map(|_| known + 1);
                    return SharedFetch::local(fetched, version);
                }
            };
            // The previous holder may have written a token, or a backoff, just before
            // releasing.
            let mut base = known;
            if let Ok(stored) = store.read(name).await {
                base = base.max(stored.version().unwrap_or(0));
                if let Stored::Token(record) = stored {
                    if record.version > known && self.adoptable(&record) {
                        release(store, lease).await;
                        return SharedFetch::local(
                            Fetched::Adopted(record.token),
                            Some(record.version),
                        );
                    }
                    if record.invalidated {
                        // Another replica invalidated it (and may have stopped before its
                        // login): no refresh of that token.
                        if let FetchKind::Refresh(token) = &kind
                            && token.fingerprint() == record.token.fingerprint()
                        {
                            kind = FetchKind::Login;
                        }
                    }
                }
            }
            let (backoffs, saw_backoff) = if fresh {
                // Backoffs earned with the old credentials do not hold the new ones back.
                (Default::default(), true)
            } else {
                let backoffs = store.backoffs(name).await.unwrap_or_default();
                (
                    backoffs,
                    backoffs.transient.is_some() || backoffs.rejected.is_some(),
                )
            };
            let now_wall = SystemTime::now();
            {
                // Another replica's failures count here too, even after their backoff ended,
                // so that the next backoff grows from them.
                let mut state = slot.lock();
                if let Some(b) = backoffs.rejected {
                    let failing = state.failing();
                    failing.rejections = failing.rejections.max(b.attempts);
                }
                if let Some(b) = backoffs.transient {
                    let failing = state.failing();
                    failing.failures = failing.failures.max(b.attempts);
                }
            }
            let rejected = backoffs.rejected.filter(|b| b.until > now_wall);
            let transient = backoffs
                .transient
                .filter(|b| b.until > now_wall && trigger != Trigger::Forced);
            if let Some((backoff, is_rejected)) = rejected
                .map(|b| (b, true))
                .or(transient.map(|b| (b, false)))
            {
                release(store, lease).await;
                let error = if is_rejected {
                    BrokerError::CredentialsRejected {
                        account: name.clone(),
                    }
                } else {
                    BrokerError::Unavailable {
                        account: name.clone(),
                        reason: "backing off",
                    }
                };
                debug!(
                    rejected = is_rejected,
                    "honouring another replica's backoff"
                );
                let fetched = Fetched::BackingOff {
                    error,
                    until: to_instant(backoff.until),
                    attempts: backoff.attempts,
                    rejected: is_rejected,
                };
                return SharedFetch::local(fetched, None);
            }
            if slot.lock().generation != generation || slot.is_retired() {
                // Superseded while it read the store, or the account's credentials changed
                // (a reload): no call with this flight's view.
                release(store, lease).await;
                return SharedFetch::local(Fetched::failed(UpstreamError::Timeout), None);
            }
            // A fetch that waited for another replica gets a budget of its own.
            let deadline = fresh_deadline(waited, deadline, self.policy.upstream_timeout);
            let (fetched, version) = store
                .hold(&mut lease, async {
                    let fetched = tokio::select! {
                        fetched = self.fetch(slot, generation, kind, trigger, deadline) => fetched,
                        // Abandoned for the invalidation's fetch (checked below).
                        () = superseded.cancelled() => Fetched::failed(UpstreamError::Timeout),
                    };
                    if slot.lock().generation != generation || slot.is_retired() {
                        // An invalidation superseded this fetch: its token is not written
                        // (it may be the reported one, extended by a refresh). Or a reload
                        // replaced the account: a token of the old credentials is not shared.
                        return (fetched, None);
                    }
                    match fetched.token() {
                        Some(token) => {
                            self.write(store, slot, generation, token, base, fetched)
                                .await
                        }
                        None => (fetched, None),
                    }
                })
                .await
                .0;
            return SharedFetch {
                fetched,
                version,
                lease: Some(lease),
                saw_backoff,
            };
        }
    }

    /// Waits for the lease holder's token: an announcement this replica adopted, or a read of
    /// the record at growing intervals (up to [`HOLDER_POLL`]). `None` once the lease is free
    /// (the holder released it without a new token, or vanished) or `until` passed: the
    /// caller takes the lease itself.
    async fn await_holder(
        &self,
        store: &Store,
        slot: &Slot,
        known: u64,
        until: Instant,
        adopted: &mut broadcast::Receiver<(AccountName, u64)>,
    ) -> Option<(Arc<Token>, u64)> {
        let name = &slot.account.name;
        let mut poll = Duration::from_millis(20);
        loop {
            let next = (Instant::now() + poll).min(until);
            poll = (poll * 2).min(HOLDER_POLL);
            let woken = timeout_at(next, async {
                loop {
                    match adopted.recv().await {
                        Ok((account, _)) if account == *name => return,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            })
            .await
            .is_ok();
            if woken {
                // The announcement's token, adopted by the sync task.
                let state = slot.lock();
                if state.version > known
                    && let Some(token) = slot
                        .token
                        .servable(Instant::now(), self.policy.refresh.expiry_margin)
                {
                    return Some((token, state.version));
                }
            }
            if let Ok(Stored::Token(record)) = store.read(name).await
                && record.version > known
                && self.adoptable(&record)
            {
                return Some((record.token, record.version));
            }
            if Instant::now() >= until || matches!(store.lease_left(name).await, Ok(None)) {
                return None;
            }
        }
    }

    /// Writes a fetched token as version `base + 1`, announces it, and returns what the
    /// flight installs: the fetched token with its version, or, when another replica wrote a
    /// newer one meanwhile (a lost lease), that one (ours is dropped: the version is the
    /// fence). When Redis fails, the token keeps `base + 1` unwritten, for the reconcile.
    ///
    /// A token another replica invalidated meanwhile (this was a refresh of it) is not
    /// written: this replica holds the lease, so it replaces it with a login, once.
    async fn write(
        &self,
        store: &Store,
        slot: &Arc<Slot>,
        generation: u32,
        token: Arc<Token>,
        base: u64,
        fetched: Fetched,
    ) -> (Fetched, Option<u64>) {
        let name = &slot.account.name;
        let (mut fetched, mut token) = (fetched, token);
        let mut version = base + 1;
        let mut logged_in = matches!(&fetched, Fetched::Granted { grant, .. } if *grant == crate::upstream::Grant::Password);
        for _ in 0..4 {
            let written = if matches!(fetched, Fetched::Verified(_)) {
                store.write_verified(&token, version).await
            } else {
                store.write(&token, version).await
            };
            match written {
                Ok(Written::Stored { version }) => {
                    // Known before the announcement comes back, so the sync task does not
                    // take this replica's own token for another's (unless the flight was
                    // superseded meanwhile: then its token is not installed).
                    {
                        let mut state = slot.lock();
                        if state.generation == generation {
                            state.version = state.version.max(version);
                        }
                    }
                    if let Err(error) = store.announce(name, version).await {
                        debug!(%error, "announcement failed; the others reconcile");
                    }
                    return (fetched, Some(version));
                }
                Ok(Written::Conflict { stored }) => match store.read(name).await {
                    Ok(Stored::Token(record))
                        if record.token.fingerprint() != token.fingerprint()
                            && self.adoptable(&record) =>
                    {
                        info!(
                            version = record.version,
                            "another replica stored a newer token meanwhile; using it"
                        );
                        return (Fetched::Adopted(record.token), Some(record.version));
                    }
                    Ok(Stored::Token(record))
                        if record.invalidated
                            && record.token.fingerprint() == token.fingerprint()
                            && !logged_in =>
                    {
                        info!(
                            "the token was invalidated by another replica while it was refreshed; logging in"
                        );
                        logged_in = true;
                        let deadline = Instant::now() + self.policy.upstream_timeout;
                        fetched = self
                            .fetch(
                                slot,
                                generation,
                                FetchKind::Login,
                                Trigger::Forced,
                                deadline,
                            )
                            .await;
                        match fetched.token() {
                            Some(t) if slot.lock().generation == generation => token = t,
                            _ => return (fetched, None),
                        }
                        version = record.version + 1;
                    }
                    // Unreadable, expired, or older: supersede it.
                    Ok(other) => version = other.version().unwrap_or(stored).max(stored) + 1,
                    Err(_) => return (fetched, Some(stored + 1)),
                },
                Err(error) => {
                    debug!(%error, "cannot store the token; the reconcile writes it back");
                    return (fetched, Some(version));
                }
            }
        }
        (fetched, Some(version))
    }

    /// Records the outcome of a fetch that held the lease (the shared backoff after a failure,
    /// its end after a success) and releases the lease.
    pub(super) async fn settle_shared(
        &self,
        store: &Store,
        slot: &Slot,
        landed: &Landed,
        lease: Lease,
        saw_backoff: bool,
    ) {
        let name = &slot.account.name;
        match landed {
            // A reload replaced the account meanwhile: what the old credentials earned is
            // not shared.
            _ if slot.is_retired() => {}
            Landed::Done(Err(error)) => {
                let backoff = {
                    let state = slot.lock();
                    state.failing.as_deref().and_then(|f| {
                        let until = f.retry_at?;
                        let rejected = matches!(error, BrokerError::CredentialsRejected { .. });
                        let attempts = if rejected { f.rejections } else { f.failures };
                        Some((rejected, until, attempts))
                    })
                };
                if let Some((rejected, until, attempts)) = backoff {
                    let kind = if rejected {
                        BackoffKind::Rejected
                    } else {
                        BackoffKind::Transient
                    };
                    let left = until.saturating_duration_since(Instant::now());
                    let backoff = Backoff {
                        until: SystemTime::now() + left,
                        attempts,
                    };
                    // Kept beyond its end, so that the next backoff grows from its count.
                    let keep = left * 2 + self.policy.refresh.backoff_max;
                    if let Err(error) = store.set_backoff(name, kind, backoff, keep).await {
                        debug!(%error, "cannot share the backoff");
                    }
                }
            }
            Landed::Done(Ok(_)) | Landed::Verified(_) if saw_backoff => {
                for kind in [BackoffKind::Transient, BackoffKind::Rejected] {
                    let _ = store.clear_backoff(name, kind).await;
                }
            }
            _ => {}
        }
        release(store, lease).await;
    }

    /// Whether a stored record may be served: not invalidated, and valid beyond the margin.
    fn adoptable(&self, record: &Record) -> bool {
        !record.invalidated
            && record
                .token
                .valid_for(Instant::now(), self.policy.refresh.expiry_margin)
    }

    /// Installs `record` in `slot` if it is newer than what the slot holds (or, with
    /// `same_version_too`, of the same version but another token) and servable. Returns
    /// whether it did.
    fn adopt(&self, slot: &Arc<Slot>, record: Record, same_version_too: bool) -> bool {
        if !self.adoptable(&record) || slot.is_retired() {
            return false;
        }
        let mut state = slot.lock();
        let newer = record.version > state.version
            || (same_version_too
                && record.version == state.version
                && slot
                    .token
                    .current()
                    .is_none_or(|t| t.fingerprint() != record.token.fingerprint()));
        if !newer {
            return false;
        }
        slot.install(&mut state, self, record.token, record.version);
        drop(state);
        let _ = self
            .adopted
            .send((slot.account.name.clone(), record.version));
        true
    }

    /// Reads every account's record and adopts the servable ones; the versions of the others
    /// are noted (a login writes above them). Returns how many were adopted; `Err`: Redis did
    /// not answer (the warm-up logs in as without a store).
    pub(super) async fn warm_from_store(
        &self,
        store: &Store,
        slots: &[Arc<Slot>],
    ) -> Result<usize, crate::store::StoreError> {
        let names: Vec<AccountName> = slots.iter().map(|s| s.account.name.clone()).collect();
        let stored = store.read_many(&names).await?;
        let mut adopted = 0;
        for (slot, stored) in slots.iter().zip(stored) {
            let version = stored.version().unwrap_or(0);
            if let Stored::Token(record) = stored
                && self.adopt(slot, record, false)
            {
                adopted += 1;
                continue;
            }
            let mut state = slot.lock();
            state.version = state.version.max(version);
        }
        Ok(adopted)
    }
}

impl Broker {
    /// Compares every account with the store: adopts newer stored tokens, writes back what
    /// this replica holds where the store has less, drops a token another replica invalidated
    /// (and fetches its replacement). Counts each correction. `false`: Redis stopped answering
    /// (try again soon).
    async fn reconcile(&self, store: &Store) -> bool {
        let inner = &self.inner;
        let slots: Vec<Arc<Slot>> = inner.accounts.iter().map(|e| e.value().clone()).collect();
        let names: Vec<AccountName> = slots.iter().map(|s| s.account.name.clone()).collect();
        let heads = match store.heads(&names).await {
            Ok(heads) => heads,
            Err(error) => {
                debug!(%error, "reconcile skipped: Redis does not answer");
                return false;
            }
        };
        let (mut adopted, mut written) = (0u64, 0u64);
        for (slot, head) in slots.iter().zip(heads) {
            if inner.stop.is_cancelled() {
                return true;
            }
            let (version, current) = {
                let state = slot.lock();
                (state.version, slot.token.current())
            };
            let margin = inner.policy.refresh.expiry_margin;
            let servable = current.filter(|t| t.valid_for(Instant::now(), margin));
            match (&head, servable) {
                // The store holds this very token: nothing to do.
                (Some(head), Some(token))
                    if head.version == version
                        && head.fingerprint == token.fingerprint().to_hex()
                        && !head.invalidated => {}
                // Another replica invalidated the token this one serves, and its replacement
                // is not in yet (its login failed, or it stopped): stop serving it, fetch.
                (Some(head), Some(token))
                    if head.invalidated && head.fingerprint == token.fingerprint().to_hex() =>
                {
                    {
                        let mut state = slot.lock();
                        if slot
                            .token
                            .current()
                            .is_some_and(|t| Arc::ptr_eq(&t, &token))
                        {
                            info!(account = %slot.account.name, "token invalidated by another replica; fetching its replacement");
                            state.replaced = Some(token.fingerprint());
                            state.version = state.version.max(head.version);
                            slot.token.publish(None);
                        }
                    }
                    self.obtain_in_background(slot.account.name.clone());
                }
                // Newer, or the same version of another token: adopt the stored one.
                (Some(head), _) if head.version >= version && !head.invalidated => {
                    if head.version == version && version == 0 {
                        continue;
                    }
                    match store.read(&slot.account.name).await {
                        Ok(Stored::Token(record)) => {
                            adopted += u64::from(inner.adopt(slot, record, true));
                        }
                        Ok(_) => {}
                        Err(_) => return false,
                    }
                }
                // The store has less than this replica holds (it restarted empty, or missed
                // a write while down): write it back.
                (head, Some(token)) if head.as_ref().is_none_or(|h| h.version < version) => {
                    match inner.write_back(store, slot, &token, head.as_ref()).await {
                        Ok(stored) => written += u64::from(stored),
                        Err(_) => return false,
                    }
                }
                _ => {}
            }
        }
        inner.metrics.reconciled("adopted", adopted);
        inner.metrics.reconciled("written_back", written);
        if adopted + written > 0 {
            info!(adopted, written_back = written, "reconciled with the store");
        }
        true
    }
}

impl Inner {
    /// Writes `token` back under the version this replica holds it at (at least one above the
    /// stored one), and announces it. On a conflict the next reconcile (or announcement)
    /// decides.
    async fn write_back(
        &self,
        store: &Store,
        slot: &Arc<Slot>,
        token: &Arc<Token>,
        head: Option<&Head>,
    ) -> Result<bool, crate::store::StoreError> {
        let version = {
            let state = slot.lock();
            state.version.max(head.map_or(0, |h| h.version) + 1).max(1)
        };
        match store.write(token, version).await? {
            Written::Stored { version } => {
                {
                    let mut state = slot.lock();
                    if slot.token.current().is_some_and(|t| Arc::ptr_eq(&t, token)) {
                        state.version = state.version.max(version);
                    }
                }
                let _ = store.announce(&slot.account.name, version).await;
                Ok(true)
            }
            // Another replica wrote back first (Redis came back empty): take its token, so
            // that the replicas agree now rather than at the next reconcile.
            Written::Conflict { .. } => {
                if let Stored::Token(record) = store.read(&slot.account.name).await? {
                    self.adopt(slot, record, true);
                }
                Ok(false)
            }
        }
    }

    /// The store's verdict on an invalidation of `reported` (`None`: the current token).
    pub(super) async fn invalidate_shared(
        &self,
        store: &Store,
        slot: &Arc<Slot>,
        reported: Option<Fingerprint>,
    ) -> SharedVerdict {
        let Some(reported) = reported.or_else(|| slot.token.current().map(|t| t.fingerprint()))
        else {
            return SharedVerdict::Local;
        };
        let name = &slot.account.name;
        let cooldown = self.policy.invalidate_cooldown;
        match store.invalidate(name, reported, cooldown).await {
            Ok(StoreVerdict::Invalidated { .. }) => SharedVerdict::Replace,
            Ok(StoreVerdict::AlreadyInvalidated { .. }) => SharedVerdict::Follow(reported),
            Ok(StoreVerdict::Replaced { version }) => {
                let known = slot.lock().version;
                if version > known
                    && let Ok(Stored::Token(record)) = store.read(name).await
                {
                    self.adopt(slot, record, false);
                }
                let current_is_reported = slot
                    .token
                    .current()
                    .is_some_and(|t| t.fingerprint() == reported);
                if current_is_reported {
                    // The store holds an older token than this replica's: local rules.
                    SharedVerdict::Local
                } else {
                    SharedVerdict::Keep(InvalidateOutcome::AlreadyReplaced)
                }
            }
            Ok(StoreVerdict::Cooldown { .. }) => SharedVerdict::Keep(InvalidateOutcome::Cooldown),
            Ok(StoreVerdict::Absent) => SharedVerdict::Local,
            Err(error) => {
                debug!(%error, "invalidation decided locally: Redis does not answer");
                SharedVerdict::Local
            }
        }
    }

    /// Another replica replaces the reported token: stop serving it here (the next caller
    /// waits for the replacement, through the lease).
    pub(super) fn follow(&self, slot: &Slot, reported: Fingerprint) {
        let mut state = slot.lock();
        if let Some(token) = slot.token.current()
            && reported == token.fingerprint()
        {
            state.replaced = Some(token.fingerprint());
            slot.token.publish(None);
        }
    }

    /// Adopts the token another replica announced, if newer than this replica's.
    async fn on_announced(
        &self,
        store: &Store,
        account: &AccountName,
        version: u64,
        sent_at: Option<SystemTime>,
    ) {
        let Some(slot) = self.accounts.get(account).map(|e| Arc::clone(e.value())) else {
            return;
        };
        if slot.lock().version >= version {
            return;
        }
        if let Ok(Stored::Token(record)) = store.read(account).await
            && self.adopt(&slot, record, false)
        {
            if let Some(delay) = sent_at.and_then(|at| SystemTime::now().duration_since(at).ok()) {
                self.metrics.propagated(delay);
            }
            debug!(%account, version, "adopted another replica's token");
        }
    }
}

impl Broker {
    /// Keeps this replica in step with the store until the broker shuts down: adopts the
    /// tokens other replicas announce, reconciles after every (re)subscription and every
    /// 30 s. Returns at once without a store. Run it as a task of its own.
    pub async fn sync_with_store(self) {
        let Some(store) = self.inner.store.clone() else {
            return;
        };
        let mut subscription = match store.subscribe() {
            Ok(subscription) => subscription,
            Err(error) => {
                warn!(%error, "cannot subscribe to the store's announcements; reconciling periodically only");
                loop {
                    tokio::select! {
                        _ = self.inner.stop.cancelled() => return,
                        () = sleep(RECONCILE_INTERVAL) => {
                            self.reconcile(&store).await;
                        }
                    }
                }
            }
        };
        let mut next_reconcile = Instant::now() + RECONCILE_INTERVAL;
        let reconciled_at = |ok: bool| {
            Instant::now()
                + if ok {
                    RECONCILE_INTERVAL
                } else {
                    RECONCILE_RETRY
                }
        };
        loop {
            tokio::select! {
                biased;
                _ = self.inner.stop.cancelled() => return,
                event = subscription.next() => match event {
                    StoreEvent::Connected => {
                        next_reconcile = reconciled_at(self.reconcile(&store).await);
                    }
                    StoreEvent::Disconnected { .. } => {}
                    StoreEvent::Announced(a) => {
                        self.inner.on_announced(&store, &a.account, a.version, a.sent_at).await;
                    }
                },
                () = tokio::time::sleep_until(next_reconcile) => {
                    next_reconcile = reconciled_at(self.reconcile(&store).await);
                }
            }
        }
    }
}

/// The budget of a fetch: the flight's, unless it waited for another replica first (then a
/// budget of its own from now).
fn fresh_deadline(waited: bool, deadline: Instant, timeout: Duration) -> Instant {
    if waited {
        Instant::now() + timeout
    } else {
        deadline
    }
}

/// Releases a lease; a failure only means it expires by itself.
async fn release(store: &Store, lease: Lease) {
    if let Err(error) = store.release(lease).await {
        debug!(%error, "lease not released; it expires by itself");
    }
}

/// The instant of a wall-clock time, on this process's clock.
fn to_instant(at: SystemTime) -> Instant {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(StdDuration::ZERO);
    Instant::now() + left
}
