//! The connection to Redis and every operation on it.
//!
//! One [`ConnectionManager`] (RESP3, multiplexed: concurrent operations share one connection)
//! carries the commands; the subscription has its own (see `events`), so that a killed
//! subscriber connection never fails a command in flight. The manager reconnects by itself
//! after a dropped connection, but does not retry the command that failed on it, and its
//! connect could hang: every operation here runs under `store.redis.timeout`
//! ([`Store::run`]), and a failure is a [`StoreError`], never an absent answer.
//!
//! Compare-and-set operations are Lua scripts (`EVALSHA`, falling back to `EVAL` after a
//! Redis restart emptied the script cache): portable across Redis and Valkey versions.

use std::{
    collections::HashSet,
    fmt,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::{
    Client, ProtocolVersion, RedisError, RedisResult, Script, TlsCertificates,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use secrecy::ExposeSecret;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{
    MAX_VERSION, Record, StoreError, Stored, Unreadable,
    crypto::{Keyring, OpenError},
    metrics::{Event, StoreCounts, StoreMetrics},
    record,
};
use crate::{
    config::RedisConfig,
    token::{AccountName, Fingerprint, Token},
};

/// Accounts read per pipelined round trip by [`Store::read_many`] and [`Store::versions`].
pub const READ_BATCH: usize = 256;

/// How long a token record stays in Redis after its token expires: long enough to keep the
/// account's version (the fence) across a long outage of every replica.
pub const RECORD_LINGER: Duration = Duration::from_secs(7 * 86_400);

/// A handle to the shared store. Cheap to clone; every clone shares one connection and one
/// set of counts.
#[derive(Clone)]
pub struct Store {
    pub(super) shared: Arc<Shared>,
}

pub(super) struct Shared {
    /// The command connection.
    conn: ConnectionManager,
    /// The client the subscription's connection is made from, and its reconnection policy.
    pub(super) client: Client,
    pub(super) manager_config: ConnectionManagerConfig,
    /// `store.redis.key_prefix`.
    pub(super) prefix: String,
    keyring: Keyring,
    /// Budget of each operation.
    pub(super) timeout: Duration,
    /// Lease duration.
    pub(super) lease: Duration,
    pub(super) metrics: StoreMetrics,
    /// Key ids and accounts whose unreadable records were logged already (log once each).
    logged: Mutex<HashSet<String>>,
    /// [`UNKNOWN`], [`UP`] or [`DOWN`]: how the last operation went.
    health: AtomicU8,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        f.debug_struct("Store")
            .field("prefix", &s.prefix)
            .field("keys", &s.keyring)
            .field("timeout", &s.timeout)
            .field("lease", &s.lease)
            .finish_non_exhaustive()
    }
}

/// The result of [`Store::write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored as this version.
    Stored {
        /// The version written.
        version: u64,
    },
    /// Refused: the store holds this version, the same or newer (the fence).
    Conflict {
        /// The stored version.
        stored: u64,
    },
}

/// The result of [`Store::invalidate`], decided atomically in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// The stored token was the reported one: it is marked invalid and the cooldown started.
    /// The caller replaces it (a login, through the lease).
    Invalidated {
        /// The invalidated version.
        version: u64,
    },
    /// The reported token was already invalidated (by another replica, most likely): its
    /// replacement is under way.
    AlreadyInvalidated {
        /// The invalidated version.
        version: u64,
    },
    /// The store holds another token than the reported one (a newer one, as a rule).
    Replaced {
        /// The stored version.
        version: u64,
    },
    /// The reported token is the stored one, but the account was invalidated within the
    /// cooldown: keep it.
    Cooldown {
        /// The stored version.
        version: u64,
    },
    /// No token is stored.
    Absent,
}

/// The head of a stored record: what a reconcile compares without opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The stored version.
    pub version: u64,
    /// The stored token's fingerprint, hex ([`Fingerprint::to_hex`]); empty if missing.
    pub fingerprint: String,
    /// Whether a replica invalidated it.
    pub invalidated: bool,
}

/// Which backoff of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackoffKind {
    /// After transient failures (timeouts, 5xx): short, growing.
    Transient,
    /// After BACE rejected the credentials: long, growing.
    Rejected,
}

impl BackoffKind {
    fn key_part(self) -> &'static str {
        match self {
            BackoffKind::Transient => "backoff:transient",
            BackoffKind::Rejected => "backoff:rejected",
        }
    }
}

/// A backoff as the store keeps it (wall-clock: it is shared between processes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// No attempt before this instant.
    pub until: SystemTime,
    /// Consecutive failures (or rejections) so far.
    pub attempts: u32,
}

/// An account's shared backoffs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backoffs {
    /// After transient failures, if one is set.
    pub transient: Option<Backoff>,
    /// After rejected credentials, if one is set.
    pub rejected: Option<Backoff>,
}

/// Writes a token if the stored version is lower or absent (a record whose version is not a
/// number counts as absent: it can never be read, so it must not block every write), and the
/// stored token is not this very token invalidated (a refresh that ran while another replica
/// invalidated it must not bring it back), unless ARGV[5] is '1' (BACE verified it).
/// KEYS[1] record; ARGV: version, fingerprint, sealed record, TTL ms, verified.
/// Returns {1, version} when written, {0, stored version} when refused.
const WRITE: &str = r"
local stored = tonumber(redis.call('HGET', KEYS[1], 'v') or '')
if stored and stored >= tonumber(ARGV[1]) then
  return {0, stored}
end
if stored and ARGV[5] ~= '1' and redis.call('HGET', KEYS[1], 'inv')
    and redis.call('HGET', KEYS[1], 'fp') == ARGV[2] then
  return {0, stored}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'fp', ARGV[2], 'r', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, tonumber(ARGV[1])}
";

/// Marks the stored token invalid if it is the reported one and no cooldown runs.
/// KEYS[1] record, KEYS[2] cooldown; ARGV: fingerprint, cooldown ms.
const INVALIDATE: &str = r"
local rec = redis.call('HMGET', KEYS[1], 'v', 'fp', 'inv')
local v = tonumber(rec[1] or '')
if not v then return {'absent', 0} end
if rec[2] ~= ARGV[1] then return {'replaced', v} end
if rec[3] then return {'already', v} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cooldown', v} end
redis.call('HSET', KEYS[1], 'inv', '1')
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {'invalidated', v}
";

/// Sets a backoff to the later `until` and the higher count of the stored one and this one,
/// kept for the longer of the two times to live. KEYS[1] backoff; ARGV: until (Unix ms),
/// attempts, TTL ms.
const SET_BACKOFF: &str = r"
local till, attempts, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cur = redis.call('GET', KEYS[1])
if cur then
  local u, a = string.match(cur, '^(%d+) (%d+)$')
  if u then
    till = math.max(till, tonumber(u))
    attempts = math.max(attempts, tonumber(a))
    ttl = math.max(ttl, redis.call('PTTL', KEYS[1]))
  end
end
redis.call('SET', KEYS[1], string.format('%d %d', till, attempts), 'PX', ttl)
return 1
";

/// Extends a lease if the caller still holds it. KEYS[1] lease; ARGV: holder, ms.
pub(super) const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes a lease if the caller holds it. KEYS[1] lease; ARGV: holder.
pub(super) const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The fields of a record, in the order [`Store::read`] asks for them.
const FIELDS: [&str; 4] = ["v", "fp", "inv", "r"];

impl Store {
    /// A store for `config`. Does not connect: the first operation does (within its
    /// timeout), so a replica starts while Redis is unreachable.
    pub fn new(config: &RedisConfig) -> Result<Self, StoreError> {
        let client = client(config)?;
        let manager_config = manager_config(config);
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                .map_err(|e| setup_error(&e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                conn: manager,
                client,
                manager_config,
                prefix: config.key_prefix.clone(),
                keyring: Keyring::new(&config.keys),
                timeout: config.timeout,
                lease: config.lease,
                metrics: StoreMetrics::default(),
                logged: Mutex::new(HashSet::new()),
                health: AtomicU8::new(UNKNOWN),
            }),
        })
    }

    /// The store's counts so far.
    pub fn counts(&self) -> StoreCounts {
        self.shared.metrics.snapshot()
    }

    /// The key prefix (`store.redis.key_prefix`).
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// The lease duration (`store.redis.lease`).
    pub fn lease_duration(&self) -> Duration {
        self.shared.lease
    }

    /// The id of the key new records are sealed with.
    pub fn sealing_key_id(&self) -> &str {
        self.shared.keyring.sealing_id()
    }

    /// `P:{kind}:{account}`.
    pub(super) fn key(&self, kind: &str, account: &str) -> String {
        format!("{}:{kind}:{account}", self.shared.prefix)
    }

    /// The announce channel, `P:announce`.
    pub(super) fn channel(&self) -> String {
        format!("{}:announce", self.shared.prefix)
    }

    /// Runs one operation on the command connection under the timeout, and counts it.
    pub(super) async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = self.shared.conn.clone();
        let result = bounded(op, self.shared.timeout, f(conn)).await;
        self.record(op, result.as_ref().map(drop));
        result
    }

    /// Counts an operation's outcome and notes whether Redis answered (see
    /// [`Store::is_up`]); logs once per change.
    pub(super) fn record(&self, op: &'static str, outcome: Result<(), &StoreError>) {
        self.shared
            .metrics
            .op(op, outcome.map_or_else(StoreError::class, |()| "ok"));
        // An answer Redis gave but this broker did not expect (one odd record, say) says
        // nothing about Redis being there: only a timeout, no connection or a refusal (no
        // authentication, a read-only replica, out of memory) marks the store down.
        let answered = matches!(outcome, Ok(()) | Err(StoreError::Protocol { .. }));
        let now = if answered { UP } else { DOWN };
        let before = self.shared.health.swap(now, Ordering::Relaxed);
        if before != now {
            match outcome {
                Err(error) if !answered => {
                    warn!(%error, "store is down: Redis does not answer as it should")
                }
                _ => info!(prefix = %self.shared.prefix, "store is up: Redis answers"),
            }
        }
    }

    /// Whether the last Redis operation (any of this store's, the subscription's health checks
    /// included) succeeded; `None` before the first. For status and `bace_broker_store_up`.
    pub fn is_up(&self) -> Option<bool> {
        match self.shared.health.load(Ordering::Relaxed) {
            UP => Some(true),
            DOWN => Some(false),
            _ => None,
        }
    }

    /// Checks that Redis answers (`PING`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", |mut c| async move {
            redis::cmd("PING").query_async::<()>(&mut c).await
        })
        .await
    }

    // === Token records ===

    /// What the store holds for `account`.
    pub async fn read(&self, account: &AccountName) -> Result<Stored, StoreError> {
        let key = self.key("token", account.as_str());
        let fields: Vec<Option<Vec<u8>>> = self
            .run("read", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&FIELDS[..])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(self.decode(account, fields, Instant::now(), SystemTime::now()))
    }

    /// What the store holds for each of `accounts`, in order: one pipelined round trip per
    /// [`READ_BATCH`] accounts, each under the timeout. Any failing batch fails the call.
    pub async fn read_many(&self, accounts: &[AccountName]) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::with_capacity(accounts.len());
        for batch in accounts.chunks(READ_BATCH) {
            let mut pipe = redis::pipe();
            for account in batch {
                pipe.cmd("HMGET")
                    .arg(self.key("token", account.as_str()))
                    .arg(&FIELDS[..]);
            }
            let rows: Vec<Vec<Option<Vec<u8>>>> = self
                .run("read_many", |mut c| async move {
                    pipe.query_async(&mut c).await
                })
                .await?;
            if rows.len() != batch.len() {
                return Err(StoreError::Protocol {
                    op: "read_many",
                    reason: "wrong number of replies",
                });
            }
            let (now, wall) = (Instant::now(), SystemTime::now());
            out.extend(
                batch
                    .iter()
                    .zip(rows)
                    .map(|(account, fields)| self.decode(account, fields, now, wall)),
            );
        }
        Ok(out)
    }

    /// The stored version of each of `accounts`, in order (`None`: absent), without reading
    /// the records.
    pub async fn versions(&self, accounts: &[AccountName]) -> Result<Vec<Option<u64>>, StoreError> {
        let heads = self.heads(accounts).await?;
        Ok(heads.into_iter().map(|h| h.map(|h| h.version)).collect())
    }

    /// The stored version and fingerprint of each of `accounts`, in order (`None`: absent),
    /// without reading the records: the cheap half of a reconcile (one pipelined round trip
    /// per [`READ_BATCH`] accounts).
    pub async fn heads(&self, accounts: &[AccountName]) -> Result<Vec<Option<Head>>, StoreError> {
        let mut out = Vec::with_capacity(accounts.len());
        for batch in accounts.chunks(READ_BATCH) {
            let mut pipe = redis::pipe();
            for account in batch {
                pipe.cmd("HMGET")
                    .arg(self.key("token", account.as_str()))
                    .arg(&["v", "fp", "inv"][..]);
            }
            let rows: Vec<(Option<String>, Option<String>, Option<String>)> = self
                .run(
                    "versions",
                    |mut c| async move { pipe.query_async(&mut c).await },
                )
                .await?;
            if rows.len() != batch.len() {
                return Err(StoreError::Protocol {
                    op: "versions",
                    reason: "wrong number of replies",
                });
            }
            out.extend(rows.into_iter().map(|(v, fp, inv)| {
                Some(Head {
                    version: v?.parse().ok()?,
                    fingerprint: fp.unwrap_or_default(),
                    invalidated: inv.is_some(),
                })
            }));
        }
        Ok(out)
    }

    /// Writes `token` as `version` of its account, if the store holds no version as high
    /// (compare-and-set in one script: the version is the fence, so a replica that lost its
    /// lease can never overwrite a newer token). The record expires [`RECORD_LINGER`] after the
    /// token does. `version` must be in `1..=`[`MAX_VERSION`].
    ///
    /// A token that is the stored one, invalidated, is refused ([`Written::Conflict`]) whatever
    /// the version: see [`Store::write_verified`].
    pub async fn write(&self, token: &Token, version: u64) -> Result<Written, StoreError> {
        self.write_as(token, version, false).await
    }

    /// [`Store::write`] of a token BACE accepted after it was reported (and so invalidated):
    /// the invalidated record may be replaced by the same token.
    pub async fn write_verified(&self, token: &Token, version: u64) -> Result<Written, StoreError> {
        self.write_as(token, version, true).await
    }

    async fn write_as(
        &self,
        token: &Token,
        version: u64,
        verified: bool,
    ) -> Result<Written, StoreError> {
        if !(1..=MAX_VERSION).contains(&version) {
            return Err(StoreError::Protocol {
                op: "write",
                reason: "version out of range",
            });
        }
        let account = token.account().as_str();
        let sealed = {
            let plain = record::encode(token);
            self.shared
                .keyring
                .seal(&self.shared.prefix, account, version, &plain)
        };
        let left = token
            .expires_at_wall()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let ttl = millis(left + RECORD_LINGER);
        let key = self.key("token", account);
        let fingerprint = token.fingerprint().to_hex();
        let (written, stored): (i64, u64) = self
            .run("write", |mut c| async move {
                Script::new(WRITE)
                    .key(&key)
                    .arg(version)
                    .arg(fingerprint)
                    .arg(sealed)
                    .arg(ttl)
                    .arg(if verified { "1" } else { "0" })
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if written == 1 {
            Ok(Written::Stored { version })
        } else {
            self.shared.metrics.count(Event::VersionConflict);
            Ok(Written::Conflict { stored })
        }
    }

    /// Tells the other replicas that `account` has a token of `version` (at most once: a
    /// subscriber that is reconnecting misses it, hence the reconcile). The message carries
    /// the send time, for the propagation delay ([`Announcement::sent_at`]).
    ///
    /// [`Announcement::sent_at`]: super::Announcement::sent_at
    pub async fn announce(&self, account: &AccountName, version: u64) -> Result<(), StoreError> {
        let channel = self.channel();
        let sent_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, millis);
        let message = format!("{version} {account} {sent_at}");
        self.run("announce", |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(drop)
    }

    /// Marks the stored token of `account` invalid if it is the one `reported` and the
    /// account's invalidation cooldown is not running, and starts the cooldown — one atomic
    /// decision for every replica (see [`Invalidation`]).
    pub async fn invalidate(
        &self,
        account: &AccountName,
        reported: Fingerprint,
        cooldown: Duration,
    ) -> Result<Invalidation, StoreError> {
        let record = self.key("token", account.as_str());
        let cooldown_key = self.key("cooldown", account.as_str());
        let (verdict, version): (String, u64) = self
            .run("invalidate", |mut c| async move {
                Script::new(INVALIDATE)
                    .key(&record)
                    .key(&cooldown_key)
                    .arg(reported.to_hex())
                    .arg(millis(cooldown).max(1))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match verdict.as_str() {
            "invalidated" => Invalidation::Invalidated { version },
            "already" => Invalidation::AlreadyInvalidated { version },
            "replaced" => Invalidation::Replaced { version },
            "cooldown" => Invalidation::Cooldown { version },
            "absent" => Invalidation::Absent,
            _ => {
                return Err(StoreError::Protocol {
                    op: "invalidate",
                    reason: "unknown verdict",
                });
            }
        })
    }

    // === Failure state ===

    /// Sets `account`'s backoff of `kind`; Redis forgets it after `keep` (at least until
    /// `backoff.until`; longer keeps the attempt count for the next backoff to grow from).
    /// Never shrinks what another replica set: the later `until` and the higher count win
    /// (one script).
    pub async fn set_backoff(
        &self,
        account: &AccountName,
        kind: BackoffKind,
        backoff: Backoff,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let key = self.key(kind.key_part(), account.as_str());
        let until = backoff.until.duration_since(UNIX_EPOCH).map_or(0, millis);
        let left = backoff
            .until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let ttl = millis(keep.max(left)).max(1);
        self.run("backoff_write", |mut c| async move {
            Script::new(SET_BACKOFF)
                .key(key)
                .arg(until)
                .arg(backoff.attempts)
                .arg(ttl)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(drop)
    }

    /// Forgets `account`'s backoff of `kind` (after a success).
    pub async fn clear_backoff(
        &self,
        account: &AccountName,
        kind: BackoffKind,
    ) -> Result<(), StoreError> {
        let key = self.key(kind.key_part(), account.as_str());
        self.run("backoff_write", |mut c| async move {
            redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
        })
        .await
    }

    /// `account`'s backoffs, as any replica set them.
    pub async fn backoffs(&self, account: &AccountName) -> Result<Backoffs, StoreError> {
        let keys = [
            self.key(BackoffKind::Transient.key_part(), account.as_str()),
            self.key(BackoffKind::Rejected.key_part(), account.as_str()),
        ];
        let values: Vec<Option<String>> = self
            .run("backoff_read", |mut c| async move {
                redis::cmd("MGET").arg(&keys[..]).query_async(&mut c).await
            })
            .await?;
        let parse = |v: &Option<String>| {
            let (until, attempts) = v.as_deref()?.split_once(' ')?;
            Some(Backoff {
                until: UNIX_EPOCH + Duration::from_millis(until.parse().ok()?),
                attempts: attempts.parse().ok()?,
            })
        };
        Ok(Backoffs {
            transient: values.first().and_then(parse),
            rejected: values.get(1).and_then(parse),
        })
    }

    // === Decoding ===

    /// Turns the fields of a record into what the store holds; unreadable records are counted
    /// and logged (once per key id, once per account).
    fn decode(
        &self,
        account: &AccountName,
        fields: Vec<Option<Vec<u8>>>,
        now: Instant,
        now_wall: SystemTime,
    ) -> Stored {
        let mut fields = fields.into_iter();
        let mut next = || fields.next().flatten();
        let (version, fingerprint, invalidated, sealed) = (next(), next(), next(), next());
        let Some(version) = version else {
            return Stored::Absent;
        };
        let version = std::str::from_utf8(&version)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        let opened = match (version, &sealed) {
            (Some(version), Some(sealed)) => self
                .shared
                .keyring
                .open(&self.shared.prefix, account.as_str(), version, sealed)
                .and_then(|plain| {
                    record::decode(account, &plain, now, now_wall).map_err(|_| OpenError::Tampered)
                }),
            _ => Err(OpenError::Tampered),
        };
        let token = match opened {
            Ok(token)
                if fingerprint.as_deref() == Some(token.fingerprint().to_hex().as_bytes()) =>
            {
                token
            }
            Ok(_) => return self.unreadable(account, version, Err(OpenError::Tampered)),
            Err(e) => return self.unreadable(account, version, Err(e)),
        };
        Stored::Token(Record {
            version: version.expect("a record that opened has a version"),
            token: Arc::new(token),
            invalidated: invalidated.is_some(),
        })
    }

    fn unreadable(
        &self,
        account: &AccountName,
        version: Option<u64>,
        error: Result<(), OpenError>,
    ) -> Stored {
        let error = error.expect_err("called with an error");
        let (reason, event, once_key) = match &error {
            OpenError::UnknownKey(id) => (
                Unreadable::UnknownKey,
                Event::UnknownKey,
                format!("key {id}"),
            ),
            OpenError::Tampered | OpenError::Format(_) => (
                Unreadable::Tampered,
                Event::Tampered,
                format!("account {account}"),
            ),
        };
        self.shared.metrics.count(event);
        let first = self
            .shared
            .logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(once_key);
        if first {
            warn!(%account, ?version, %error, "stored token record cannot be read; treated as absent (logged once per key id or account)");
        }
        Stored::Unreadable { version, reason }
    }
}

/// Awaits `fut` within `timeout`, mapping its error.
pub(super) async fn bounded<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl Future<Output = RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(map_error(op, &e, timeout)),
        Err(_) => Err(StoreError::Timeout { op, after: timeout }),
    }
}

fn map_error(op: &'static str, e: &RedisError, timeout: Duration) -> StoreError {
    use redis::ErrorKind;
    if e.is_timeout() {
        return StoreError::Timeout { op, after: timeout };
    }
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        return StoreError::Unreachable {
            op,
            reason: e.to_string(),
        };
    }
    match e.kind() {
        ErrorKind::Server(_) | ErrorKind::AuthenticationFailed | ErrorKind::Extension => {
            StoreError::Refused {
                op,
                reason: e.to_string(),
            }
        }
        // Conversion errors quote the reply (sealed records among them): not shown.
        ErrorKind::UnexpectedReturnType | ErrorKind::Parse => StoreError::Protocol {
            op,
            reason: "reply of an unexpected type",
        },
        _ => StoreError::Unreachable {
            op,
            reason: e.to_string(),
        },
    }
}

pub(super) fn setup_error(e: &RedisError) -> StoreError {
    StoreError::Unreachable {
        op: "connect",
        reason: e.to_string(),
    }
}

/// The client of `config`: RESP3, user and password, TLS with the CA file.
fn client(config: &RedisConfig) -> Result<Client, StoreError> {
    use redis::IntoConnectionInfo;
    let info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| setup_error(&e))?;
    let mut settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password.expose_secret());
    }
    let info = info.set_redis_settings(settings);
    match &config.ca_pem {
        Some(ca) => Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            },
        ),
        None => Client::open(info),
    }
    .map_err(|e| setup_error(&e))
}

/// Reconnection policy shared by both connections: each attempt bounded by the timeout, few
/// quick retries (the operation's own timeout bounds the wait anyway; the next operation
/// tries again).
fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.timeout))
        .set_response_timeout(Some(config.timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(config.timeout)
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
