//! Per-account fetch leases: at most one replica calls BACE for an account at a time.
//!
//! A lease is `SET P:lease:{account} <holder> NX PX <lease>` with a random 128-bit holder id;
//! it is renewed (compare-and-`PEXPIRE`) and released (compare-and-`DEL`) only by its holder,
//! in Lua scripts. [`Store::hold`] renews it at a third of its life while a future runs. A
//! lease is a courtesy, not a guarantee (a paused holder can outlive it): the version of
//! [`Store::write`] is the fence that keeps a late holder from overwriting a newer token.

use std::{fmt, future::Future, pin::pin};

use redis::Script;
use tokio::time::{Duration, Instant, sleep_until};
use tracing::warn;

use super::{
    Store, StoreError,
    metrics::Event,
    redis::{RELEASE, RENEW, millis},
};
use crate::token::AccountName;

/// A lease this replica holds on an account's fetch. Not `Clone`: released once
/// ([`Store::release`]); dropped without release, it expires after the lease duration.
pub struct Lease {
    account: AccountName,
    key: String,
    holder: String,
    duration: Duration,
    /// When Redis last confirmed it (acquired or renewed).
    confirmed_at: Instant,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("account", &self.account)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The account it is on.
    pub fn account(&self) -> &AccountName {
        &self.account
    }

    /// When Redis last confirmed it (acquired or renewed); it lasts at least until this plus
    /// the lease duration.
    pub fn confirmed_at(&self) -> Instant {
        self.confirmed_at
    }

    /// When it ends unless renewed: its last confirmation plus the lease duration.
    fn ends_at(&self) -> Instant {
        self.confirmed_at + self.duration
    }
}

/// The result of [`Store::acquire_lease`].
#[derive(Debug)]
pub enum Acquired {
    /// This replica holds the lease.
    Acquired(Lease),
    /// Another holder has it, for at most this long (its remaining time to live).
    Held {
        /// Time left on the other holder's lease (`None`: unknown).
        expires_in: Option<Duration>,
    },
}

/// Whether a lease stayed held while [`Store::hold`]'s future ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKept {
    /// Every renewal succeeded (or there was no need for one).
    Held,
    /// Lost: a renewal found another holder or no lease, or renewals failed for a whole lease
    /// duration. Another replica may be fetching: the write's version fence decides.
    Lost,
}

impl Store {
    /// Tries to take `account`'s lease for `store.redis.lease`.
    pub async fn acquire_lease(&self, account: &AccountName) -> Result<Acquired, StoreError> {
        let key = self.key("lease", account.as_str());
        let holder = holder_id();
        let duration = self.shared.lease;
        let started = Instant::now();
        let (set, ttl): (Option<String>, i64) = self
            .run("lease_acquire", |mut c| {
                let (key, holder) = (key.clone(), holder.clone());
                async move {
                    redis::pipe()
                        .cmd("SET")
                        .arg(&key)
                        .arg(&holder)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis(duration))
                        .cmd("PTTL")
                        .arg(&key)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        if set.is_some() {
            self.shared.metrics.count(Event::LeaseAcquired);
            Ok(Acquired::Acquired(Lease {
                account: account.clone(),
                key,
                holder,
                duration,
                // Counted from before the request: the lease may have started any time after.
                confirmed_at: started,
            }))
        } else {
            self.shared.metrics.count(Event::LeaseContended);
            Ok(Acquired::Held {
                expires_in: u64::try_from(ttl).ok().map(Duration::from_millis),
            })
        }
    }

    /// How long `account`'s lease has left, whoever holds it (`None`: nobody holds it).
    pub async fn lease_left(&self, account: &AccountName) -> Result<Option<Duration>, StoreError> {
        let key = self.key("lease", account.as_str());
        let ttl: i64 = self
            .run("lease_check", |mut c| async move {
                redis::cmd("PTTL").arg(key).query_async(&mut c).await
            })
            .await?;
        Ok(u64::try_from(ttl).ok().map(Duration::from_millis))
    }

    /// Extends `lease` by the lease duration if this replica still holds it: `Ok(false)` when
    /// it does not (expired, or another replica took it).
    pub async fn renew(&self, lease: &mut Lease) -> Result<bool, StoreError> {
        let started = Instant::now();
        let (key, holder, duration) = (&lease.key, &lease.holder, lease.duration);
        let renewed: i64 = self
            .run("lease_renew", |mut c| async move {
                Script::new(RENEW)
                    .key(key)
                    .arg(holder)
                    .arg(millis(duration))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if renewed == 1 {
            lease.confirmed_at = started;
        }
        Ok(renewed == 1)
    }

    /// Gives `lease` up (only if this replica still holds it: another holder's lease is never
    /// deleted). `Ok(false)`: it was no longer held.
    pub async fn release(&self, lease: Lease) -> Result<bool, StoreError> {
        let released: i64 = self
            .run("lease_release", |mut c| async move {
                Script::new(RELEASE)
                    .key(&lease.key)
                    .arg(&lease.holder)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(released == 1)
    }

    /// Runs `work` to completion while renewing `lease` at a third of its duration, and says
    /// whether the lease stayed held. `work` is never cancelled: a lost lease is reported, and
    /// the caller's write, fenced by its version, decides whether its result still counts.
    /// Renewals run beside `work` (a slow renewal never delays it).
    ///
    /// Renewals are timed from the last confirmation of the lease (its acquisition included),
    /// not from the call: work done between acquiring and holding counts against the lease.
    /// A failed renewal is retried after half of what is left of the lease (at most a third
    /// of it), so that with `lease` at three times `store.redis.timeout` (the smallest the
    /// config allows) a slow renewal still leaves room for another before the lease ends.
    /// Work that ends after the lease's end without a renewal having confirmed it is reported
    /// as [`LeaseKept::Lost`], whatever the renewals were doing.
    pub async fn hold<F: Future>(&self, lease: &mut Lease, work: F) -> (F::Output, LeaseKept) {
        let mut work = pin!(work);
        let period = lease.duration / 3;
        let account = lease.account.clone();
        let finished = {
            let lease = &mut *lease;
            let renewing = async {
                let mut next = lease.confirmed_at + period;
                loop {
                    sleep_until(next).await;
                    match self.renew(lease).await {
                        Ok(true) => next = lease.confirmed_at + period,
                        Ok(false) => {
                            warn!(%account, "lease lost while fetching: another replica holds it or it expired");
                            return;
                        }
                        Err(error) if Instant::now() >= lease.ends_at() => {
                            warn!(%account, %error, "lease lost while fetching: renewals failed for a whole lease");
                            return;
                        }
                        Err(error) => {
                            warn!(%account, %error, "lease renewal failed; retrying");
                            let left = lease.ends_at().saturating_duration_since(Instant::now());
                            next = Instant::now() + (left / 2).min(period);
                        }
                    }
                }
            };
            tokio::select! {
                output = &mut work => Some(output),
                () = renewing => None,
            }
        };
        match finished {
            Some(output) if Instant::now() < lease.ends_at() => (output, LeaseKept::Held),
            Some(output) => {
                warn!(%account, "lease ended before the fetch did");
                self.shared.metrics.count(Event::LeaseLost);
                (output, LeaseKept::Lost)
            }
            None => {
                self.shared.metrics.count(Event::LeaseLost);
                (work.await, LeaseKept::Lost)
            }
        }
    }
}

/// A random 128-bit holder id, hex.
fn holder_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
