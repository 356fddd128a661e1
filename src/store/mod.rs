//! The store replicas share through Redis (or Valkey): per-account fetch leases, the current
//! token of each account (encrypted, versioned), announcements of new tokens, and the shared
//! failure state (backoff, invalidation cooldown). A [`Store`] is a cheap-to-clone handle; the
//! in-memory broker (no `store` in the config) does not build one.
//!
//! # Rooms
//!
//! - this file: the [`Store`] handle, its errors and answers, and the contract below;
//! - `redis`: the connection and every Redis operation (commands, Lua scripts, pipelines);
//! - `lease`: [`Lease`], and [`Store::hold`], which renews a lease while a future runs;
//! - `events`: [`Subscription`], the announcements and the (re)connections of the
//!   subscription;
//! - `crypto`: AES-256-GCM sealing with the key ring of `store.redis.encryption_key_file`;
//! - `record`: what a token record holds before encryption;
//! - `metrics`: the store's counts ([`StoreCounts`]), plain types.
//!
//! # Keys in Redis
//!
//! Every key starts with `store.redis.key_prefix` (`P` below, default `bace-broker`):
//!
//! | key                              | type   | holds                                            |
//! |----------------------------------|--------|--------------------------------------------------|
//! | `P:token:{account}`              | hash   | `v` version, `fp` fingerprint (16 hex), `r` sealed record, `inv` set once invalidated; expires [`RECORD_LINGER`] after the token |
//! | `P:lease:{account}`              | string | the holder's random id; `PX` = `store.redis.lease` |
//! | `P:backoff:transient:{account}`  | string | `"<until, Unix ms> <failures>"`, with a TTL     |
//! | `P:backoff:rejected:{account}`   | string | `"<until, Unix ms> <rejections>"`, with a TTL   |
//! | `P:cooldown:{account}`           | string | the invalidated fingerprint; `PX` = the cooldown |
//! | channel `P:announce`             | pub/sub| `"<version> <account> <sent at, Unix ms>"` per new token |
//!
//! No credential is ever written; access and refresh tokens only inside `r`, sealed.
//!
//! # Errors are never "absent"
//!
//! Every operation is bounded by `store.redis.timeout` (connecting included) and fails with a
//! [`StoreError`] ([`StoreErrorKind::Timeout`], `Unreachable`, `Refused`, `Protocol`) when
//! Redis does not answer as it should. "No token" is only ever [`Stored::Absent`], an answer
//! from Redis. A record Redis holds but this replica cannot read (an unknown key id, a
//! tampered or moved record) is [`Stored::Unreadable`]: no token to serve, counted, logged
//! (once per key id or account), with its version when that is readable so that a new write
//! can supersede it.
//!
//! # What the broker does with it (the wiring is `broker::shared`)
//!
//! The seam is `broker::slot::TokenCell::publish` and the single flight (`broker::flight`);
//! `broker::shared` implements this contract:
//!
//! 1. **Start**: `Store::new(&config.store.redis)` (connects lazily; never blocks the start),
//!    then `store.subscribe()` and a task that loops on [`Subscription::next`]. Warm-up:
//!    [`Store::read_many`] of every account (pipelined in batches of [`READ_BATCH`]); adopt
//!    each [`Stored::Token`] whose token is still servable and not `invalidated`; log in only
//!    for the rest. An `Err` from the store means "unknown": fall back to today's local
//!    warm-up, never treat it as "no token".
//! 2. **A fetch** (in `Inner::start_flight`'s task): [`Store::acquire_lease`]. `Acquired`:
//!    read the record once more (another replica may have just written a newer version:
//!    adopt it and release), else run the upstream fetch inside [`Store::hold`], then
//!    [`Store::write`] the token with `version = last known version + 1`, [`Store::announce`]
//!    it, publish it locally, and [`Store::release`] the lease. `Held` (another replica
//!    fetches): wait for its announcement of a newer version for this account (or poll
//!    [`Store::read`] at a fraction of the lease) until the lease expires; then try again.
//!    `Err` (Redis down): fetch locally as today (own single flight and backoff).
//! 3. **Written::Conflict { stored }**: another replica wrote a newer (or equal) version: read
//!    it, adopt it if readable, drop ours (it was a login or refresh BACE already counted; the
//!    version is the fence).
//! 4. **Announcements** ([`StoreEvent::Announced`]): when `version` is newer than the slot's,
//!    [`Store::read`] and publish it (watchers see it through the same `TokenCell`).
//! 5. **Reconcile** on [`StoreEvent::Connected`] (first subscription and every
//!    re-subscription: announcements may have been lost) and periodically:
//!    [`Store::versions`] of every account; adopt newer stored versions; where the store has
//!    nothing newer than what the replica holds (Redis restarted empty, or lost the key),
//!    [`Store::write`] back what it holds (version + 1 of the stored one, or its own).
//! 6. **Invalidate**: [`Store::invalidate`] with the reported fingerprint and the cooldown:
//!    `Invalidated` → this replica forces the login (through the lease, as a fetch);
//!    `AlreadyInvalidated` → another replica does: wait as in 2; `Replaced` → the store holds
//!    a newer token: adopt it (`AlreadyReplaced`); `Cooldown` → keep; `Absent` → local rules.
//! 7. **Failure state**: after a failed fetch, [`Store::set_backoff`] (transient or
//!    rejected, with the attempt count); before starting one, [`Store::backoffs`]: a
//!    backoff another replica set is honoured as if it were local.
//! 8. **Status and metrics**: [`Store::is_up`] (how the last operation went, the
//!    subscription's 2-second health checks included; one log line per change) for
//!    `bace_broker_store_up` and `ListAccounts`/`status`; [`Store::counts`] for the counters
//!    (operations by outcome, leases acquired / contended / lost, version conflicts,
//!    unreadable records, announcements, (re)subscriptions).

mod crypto;
mod events;
mod lease;
mod metrics;
mod record;
mod redis;

use std::{sync::Arc, time::Duration};

pub use self::{
    events::{Announcement, StoreEvent, Subscription},
    lease::{Acquired, Lease, LeaseKept},
    metrics::StoreCounts,
    redis::{
        Backoff, BackoffKind, Backoffs, Head, Invalidation, READ_BATCH, RECORD_LINGER, Written,
    },
};
use crate::token::Token;

/// Why a store operation failed. Never means "absent": see the module documentation.
/// `Display` never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Redis did not answer within `store.redis.timeout` (a paused or overloaded server, a
    /// connection that hangs).
    #[error("Redis did not answer {op} within {after:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The budget it had.
        after: Duration,
    },
    /// No connection to Redis (refused, dropped, TLS or DNS failure).
    #[error("Redis is unreachable ({op}): {reason}")]
    Unreachable {
        /// The operation.
        op: &'static str,
        /// What the client said.
        reason: String,
    },
    /// Redis answered with an error (authentication, permissions, out of memory, read-only
    /// replica, script error).
    #[error("Redis refused {op}: {reason}")]
    Refused {
        /// The operation.
        op: &'static str,
        /// Redis's error.
        reason: String,
    },
    /// Redis answered something this broker does not understand.
    #[error("unexpected answer from Redis to {op}: {reason}")]
    Protocol {
        /// The operation.
        op: &'static str,
        /// What was wrong with it.
        reason: &'static str,
    },
}

/// The class of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    /// [`StoreError::Timeout`].
    Timeout,
    /// [`StoreError::Unreachable`].
    Unreachable,
    /// [`StoreError::Refused`].
    Refused,
    /// [`StoreError::Protocol`].
    Protocol,
}

impl StoreError {
    /// The class of the error.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::Timeout { .. } => StoreErrorKind::Timeout,
            StoreError::Unreachable { .. } => StoreErrorKind::Unreachable,
            StoreError::Refused { .. } => StoreErrorKind::Refused,
            StoreError::Protocol { .. } => StoreErrorKind::Protocol,
        }
    }

    /// A short class for metrics and logs.
    pub fn class(&self) -> &'static str {
        match self.kind() {
            StoreErrorKind::Timeout => "timeout",
            StoreErrorKind::Unreachable => "unreachable",
            StoreErrorKind::Refused => "refused",
            StoreErrorKind::Protocol => "protocol",
        }
    }
}

/// What Redis holds for an account.
#[derive(Debug, Clone)]
pub enum Stored {
    /// Nothing: no replica wrote a token (or it expired, or Redis restarted empty).
    Absent,
    /// A token this replica can read.
    Token(Record),
    /// A record this replica cannot read: treat as absent (nothing to serve), but a write must
    /// carry a newer version than `version` to replace it.
    Unreadable {
        /// Its version, when readable.
        version: Option<u64>,
        /// Why it cannot be read.
        reason: Unreadable,
    },
}

impl Stored {
    /// The stored version, if any is readable.
    pub fn version(&self) -> Option<u64> {
        match self {
            Stored::Absent => None,
            Stored::Token(record) => Some(record.version),
            Stored::Unreadable { version, .. } => *version,
        }
    }

    /// The readable record, if any.
    pub fn record(self) -> Option<Record> {
        match self {
            Stored::Token(record) => Some(record),
            _ => None,
        }
    }
}

/// Why a stored record cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// Sealed with a key id not in this replica's key file.
    UnknownKey,
    /// Changed, truncated, moved to another account or version, or of an unknown format.
    Tampered,
}

/// A token as the store holds it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its version: each new token of an account gets a higher one.
    pub version: u64,
    /// The token, its times mapped onto this process's clock.
    pub token: Arc<Token>,
    /// Whether a replica invalidated it ([`Store::invalidate`]): not to be served; a login
    /// is (or will be) under way.
    pub invalidated: bool,
}

/// The highest version the store accepts (versions are compared as Lua numbers, exact up to
/// 2^53).
pub const MAX_VERSION: u64 = 1 << 53;

pub use self::redis::Store;
