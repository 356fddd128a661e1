//! The shared store against a real `redis-server` (one private server per test, from
//! `crates/testkit`): leases, fenced writes, encryption at rest, key rotation, the shared
//! failure state, announcements and reconnections, and errors that never look like "absent".
//!
//! Waits are bounded by the hang guard. Leases live in Redis's clock, so the lease tests let
//! real time pass (a few lease lifetimes of one to two seconds, renewals a third of a lease
//! apart); they assert who holds a lease, never how long anything took. Lease expiry is waited
//! for by polling Redis; timeouts are provoked with a paused (SIGSTOP) server.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use bace_token_broker::{
    AccountName, Acquired, Backoff, BackoffKind, Fingerprint, Invalidation, Lease, LeaseKept,
    READ_BATCH, Store, StoreErrorKind, StoreEvent, Stored, Token, Unreadable, Written,
    config::RedisConfig,
};
use secrecy::SecretString;
use testkit::{Account, BrokerConfig, RedisServer, RedisStore, guard};
use tokio::time::Instant;

const KEY_1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_2: &str = "HxscGxoZGBcWFRQTEhEQDw4NDAsKCQgHBgUEAwIBAAA=";

/// Settings of one replica's store; its key files go to a temporary folder of its own.
struct Setup<'a> {
    url: String,
    dir: tempfile::TempDir,
    /// Key ids of the key file, `k1` and `k2` (fixed keys, so replicas share them).
    keys: &'a str,
    timeout: Duration,
    lease: Duration,
    prefix: &'a str,
    username: Option<&'a str>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

impl<'a> Setup<'a> {
    fn new(redis: &RedisServer) -> Self {
        Self {
            url: redis.url(),
            dir: tempfile::tempdir().unwrap(),
            keys: "k1",
            // Generous: a loaded machine may take a while for a first connect (TLS included);
            // the tests of timeouts and leases set their own.
            timeout: Duration::from_secs(2),
            lease: Duration::from_secs(6),
            prefix: "bace-broker",
            username: None,
            password_file: None,
            ca_file: None,
        }
    }

    /// The `store.redis` section as the broker validates it, from a config file written with
    /// the test kit's builder.
    fn config(&self) -> RedisConfig {
        let key_file = self.dir.path().join(format!("keys-{}", rand_suffix()));
        let lines: Vec<String> = self
            .keys
            .split(',')
            .map(|id| match id {
                "k1" => format!("k1 {KEY_1}"),
                "k2" => format!("k2 {KEY_2}"),
                other => panic!("unknown test key {other}"),
            })
            .collect();
        std::fs::write(&key_file, lines.join("\n")).unwrap();
        let mut store = RedisStore::new(&self.url, key_file)
            .timeout(self.timeout)
            .lease(self.lease)
            .key_prefix(self.prefix);
        if let Some(user) = self.username {
            store = store.username(user);
        }
        if let Some(pw) = &self.password_file {
            store = store.password_file(pw);
        }
        if let Some(ca) = &self.ca_file {
            store = store.ca_file(ca);
        }
        let account = Account::new("a", "c", "client-SECRET-9", "u", "password-SECRET-7");
        BrokerConfig::new()
            .store(store)
            .account(account)
            .build()
            .store
            .expect("a store section")
            .redis
    }

    /// Leases of 1.5 s, renewed every half second, for the tests that outlive them.
    fn short_leases(redis: &RedisServer) -> Self {
        Self {
            lease: Duration::from_millis(1500),
            timeout: Duration::from_millis(500),
            ..Self::new(redis)
        }
    }

    /// Leases of 6 s renewed every 2 s (the smallest lease the config allows for a 2 s
    /// timeout), for the tests of renewals while work runs: 4 s to spare at each renewal, so a
    /// loaded machine stalling the test for a second does not lose the lease.
    fn renewed_leases(redis: &RedisServer) -> Self {
        Self {
            lease: Duration::from_secs(6),
            timeout: Duration::from_secs(2),
            ..Self::new(redis)
        }
    }

    /// Short timeouts (and leases) for the tests of a paused server.
    fn short_timeouts(redis: &RedisServer) -> Self {
        Self {
            timeout: Duration::from_millis(200),
            lease: Duration::from_secs(1),
            ..Self::new(redis)
        }
    }

    fn store(&self) -> Store {
        Store::new(&self.config()).unwrap()
    }

    /// Two replicas sharing the Redis and the keys.
    fn replicas(&self) -> (Store, Store) {
        (self.store(), self.store())
    }
}

fn rand_suffix() -> u64 {
    rand::random()
}

fn account(name: &str) -> AccountName {
    AccountName::new(name).unwrap()
}

fn token(account: &str, access: &str, refresh: Option<&str>) -> Token {
    Token::new(
        AccountName::new(account).unwrap(),
        SecretString::from(access.to_owned()),
        refresh.map(|r| SecretString::from(r.to_owned())),
        Duration::from_secs(3600),
        Instant::now(),
        SystemTime::now(),
    )
}

/// Writes an access token (no refresh token) of `account` with `version`.
async fn put(store: &Store, account: &str, access: &str, version: u64) -> Written {
    guard(store.write(&token(account, access, None), version))
        .await
        .unwrap()
}

/// What `store` holds for `name`.
async fn read(store: &Store, name: &str) -> Stored {
    guard(store.read(&account(name))).await.unwrap()
}

/// The readable record of `name`.
async fn get(store: &Store, name: &str) -> bace_token_broker::Record {
    record(read(store, name).await)
}

/// Reads `a` until the store answers again (after a restart or a resume).
async fn read_when_back(store: &Store, a: &AccountName) -> Stored {
    guard(async {
        loop {
            if let Ok(stored) = store.read(a).await {
                break stored;
            }
        }
    })
    .await
}

/// The store could not reach Redis: unreachable, or timed out while trying.
fn assert_unreachable(error: &bace_token_broker::StoreError) {
    assert!(
        matches!(
            error.kind(),
            StoreErrorKind::Unreachable | StoreErrorKind::Timeout
        ),
        "{error}"
    );
}

/// Takes the free lease of `a`.
async fn take_lease(store: &Store, a: &AccountName) -> Lease {
    match guard(store.acquire_lease(a)).await.unwrap() {
        Acquired::Acquired(lease) => lease,
        Acquired::Held { .. } => panic!("the lease of {a} is held"),
    }
}

fn record(stored: Stored) -> bace_token_broker::Record {
    match stored {
        Stored::Token(record) => record,
        other => panic!("expected a readable token, got {other:?}"),
    }
}

// === Leases ===

#[tokio::test]
async fn a_lease_has_one_holder_and_only_the_holder_releases_it() {
    let redis = RedisServer::start();
    let setup = Setup::new(&redis);
    let (one, two) = setup.replicas();
    let a = account("fleet-a");

    let lease = take_lease(&one, &a).await;
    match guard(two.acquire_lease(&a)).await.unwrap() {
        Acquired::Held { expires_in } => {
            assert!(expires_in.is_some_and(|d| d <= Duration::from_secs(6)));
        }
        Acquired::Acquired(_) => panic!("two holders of one lease"),
    }
    // Another account's lease is independent.
    assert!(matches!(
        guard(two.acquire_lease(&account("fleet-b"))).await.unwrap(),
        Acquired::Acquired(_)
    ));

    // A holder whose lease expired and was taken over cannot release the new holder's lease.
    let key = "bace-broker:lease:fleet-a";
    redis.cmd::<()>(&["DEL", key]);
    let theirs = take_lease(&two, &a).await;
    assert!(
        !guard(one.release(lease)).await.unwrap(),
        "not the holder any more"
    );
    assert_eq!(
        redis.cmd::<i64>(&["EXISTS", key]),
        1,
        "the other's lease stays"
    );
    assert!(guard(two.release(theirs)).await.unwrap());
    assert_eq!(redis.cmd::<i64>(&["EXISTS", key]), 0);

    let counts = one.counts();
    assert_eq!(counts.leases_acquired, 1);
    let counts = two.counts();
    assert_eq!((counts.leases_acquired, counts.leases_contended), (2, 1));
    assert_eq!(counts.operations("lease_acquire", "ok"), 3);
}

#[tokio::test]
async fn an_expired_lease_lets_the_other_replica_in() {
    let redis = RedisServer::start();
    let setup = Setup::short_leases(&redis);
    let (one, two) = setup.replicas();
    let a = account("fleet-a");
    let lease = take_lease(&one, &a).await;
    // Never renewed: Redis expires it, and the other replica gets it.
    let acquired = guard(async {
        loop {
            match two.acquire_lease(&a).await.unwrap() {
                Acquired::Acquired(l) => break l,
                Acquired::Held { expires_in } => {
                    tokio::time::sleep(expires_in.unwrap_or(Duration::from_millis(50))).await
                }
            }
        }
    })
    .await;
    let mut lease = lease;
    assert!(
        !guard(one.renew(&mut lease)).await.unwrap(),
        "the first holder's renewal must fail once another holds the lease"
    );
    assert!(guard(two.release(acquired)).await.unwrap());
}

#[tokio::test]
async fn holding_renews_the_lease_and_reports_its_loss() {
    let redis = RedisServer::start();
    let (one, two) = Setup::renewed_leases(&redis).replicas();
    let a = account("fleet-a");
    let mut lease = take_lease(&one, &a).await;
    // The work outlives the lease by half; the other replica keeps trying meanwhile.
    let started = Instant::now();
    let (attempts, kept) = guard(one.hold(&mut lease, async {
        let mut attempts = 0;
        while started.elapsed() < Duration::from_secs(9) {
            match two.acquire_lease(&a).await.unwrap() {
                Acquired::Held { .. } => attempts += 1,
                Acquired::Acquired(_) => panic!("the lease was taken while renewed"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        attempts
    }))
    .await;
    assert_eq!(kept, LeaseKept::Held);
    assert!(attempts > 5);
    assert!(guard(one.renew(&mut lease)).await.unwrap());

    // Taken away (deleted and taken by the other): the next renewal reports the loss, and the
    // work still runs to its end.
    redis.cmd::<()>(&["DEL", "bace-broker:lease:fleet-a"]);
    let _theirs = take_lease(&two, &a).await;
    let (output, kept) = guard(one.hold(&mut lease, async {
        // The first renewal is due 2 s after the last confirmation.
        tokio::time::sleep(Duration::from_secs(4)).await;
        "done"
    }))
    .await;
    assert_eq!((output, kept), ("done", LeaseKept::Lost));
    assert_eq!(one.counts().leases_lost, 1);
}

#[tokio::test]
async fn renewals_count_from_the_lease_s_last_confirmation_not_from_hold() {
    // Work between acquiring a lease and holding it (a second read of the record, a look at
    // the shared backoff) uses up part of the lease: the first renewal must not wait a whole
    // renewal period after `hold` starts, or it comes after the lease's end.
    let redis = RedisServer::start();
    let (one, two) = Setup::renewed_leases(&redis).replicas();
    let a = account("fleet-a");
    let mut lease = take_lease(&one, &a).await;
    // 4.5 s of the 6 s pass before `hold`: a renewal 2 s after `hold` starts would be 0.5 s
    // too late; one due 2 s after the acquisition is made at once, with 1.5 s to spare.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (taken, kept) = guard(one.hold(&mut lease, async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        matches!(two.acquire_lease(&a).await.unwrap(), Acquired::Acquired(_))
    }))
    .await;
    assert!(!taken, "the other replica got the lease while it was held");
    assert_eq!(kept, LeaseKept::Held);
    assert_eq!(one.counts().leases_lost, 0);
}

// === Records ===

#[tokio::test]
async fn writes_are_fenced_by_version() {
    let redis = RedisServer::start();
    let setup = Setup::new(&redis);
    let (one, two) = setup.replicas();
    let a = account("fleet-a");
    assert!(matches!(guard(one.read(&a)).await.unwrap(), Stored::Absent));

    let first = token("fleet-a", "access-v1", Some("refresh-v1"));
    assert_eq!(
        guard(one.write(&first, 1)).await.unwrap(),
        Written::Stored { version: 1 }
    );
    let newer = token("fleet-a", "access-v3", Some("refresh-v3"));
    assert_eq!(
        guard(two.write(&newer, 3)).await.unwrap(),
        Written::Stored { version: 3 }
    );
    // A replica that lost its lease comes back with version 2, or 3 again: refused.
    let late = token("fleet-a", "access-late", None);
    for version in [2, 3] {
        assert_eq!(
            guard(one.write(&late, version)).await.unwrap(),
            Written::Conflict { stored: 3 }
        );
    }
    let stored = record(guard(one.read(&a)).await.unwrap());
    assert_eq!(stored.version, 3);
    assert_eq!(stored.token.expose_access(), "access-v3");
    assert_eq!(one.counts().version_conflicts, 2);
    assert_eq!(
        guard(one.versions(&[a.clone(), account("other")]))
            .await
            .unwrap(),
        vec![Some(3), None]
    );
}

#[tokio::test]
async fn a_record_reads_back_whole_on_another_replica() {
    let redis = RedisServer::start();
    let setup = Setup::new(&redis);
    let (one, two) = setup.replicas();
    let original = token("fleet-a", "access-RT", Some("refresh-RT")).from_refresh();
    guard(one.write(&original, 7)).await.unwrap();
    let back = get(&two, "fleet-a").await;
    assert_eq!(back.version, 7);
    assert!(!back.invalidated);
    let t = &back.token;
    assert_eq!(t.account().as_str(), "fleet-a");
    assert_eq!(t.expose_access(), "access-RT");
    assert_eq!(t.expose_refresh(), Some("refresh-RT"));
    assert!(t.is_refreshed());
    assert_eq!(t.fingerprint(), original.fingerprint());
    let drift = t
        .expires_at_wall()
        .duration_since(original.expires_at_wall())
        .unwrap_or_else(|e| e.duration());
    assert!(drift < Duration::from_millis(5), "{drift:?}");
    assert!(t.valid_for(Instant::now(), Duration::from_secs(3500)));
}

#[tokio::test]
async fn read_many_reads_in_batches_and_in_order() {
    let redis = RedisServer::start();
    let store = Setup::new(&redis).store();
    let n = READ_BATCH * 2 + 3;
    let accounts: Vec<AccountName> = (0..n).map(|i| account(&format!("acc-{i}"))).collect();
    for (i, a) in accounts.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
        let t = token(a.as_str(), &format!("access-{i}"), None);
        guard(store.write(&t, i as u64 + 1)).await.unwrap();
    }
    let stored = guard(store.read_many(&accounts)).await.unwrap();
    assert_eq!(stored.len(), n);
    for (i, s) in stored.into_iter().enumerate() {
        if i % 3 == 0 {
            assert!(matches!(s, Stored::Absent), "{i}");
        } else {
            let r = record(s);
            assert_eq!(r.version, i as u64 + 1);
            assert_eq!(r.token.expose_access(), format!("access-{i}"));
            assert_eq!(r.token.account(), &accounts[i]);
        }
    }
    assert_eq!(store.counts().operations("read_many", "ok"), 3);
}

#[tokio::test]
async fn a_record_moved_to_another_account_or_version_is_rejected() {
    let redis = RedisServer::start();
    let store = Setup::new(&redis).store();
    put(&store, "fleet-a", "access-A", 5).await;
    put(&store, "fleet-b", "access-B", 9).await;

    // fleet-a's record copied over fleet-b's (a swap of records between accounts).
    redis.cmd::<()>(&[
        "COPY",
        "bace-broker:token:fleet-a",
        "bace-broker:token:fleet-b",
        "REPLACE",
    ]);
    match read(&store, "fleet-b").await {
        Stored::Unreadable { version, reason } => {
            assert_eq!((version, reason), (Some(5), Unreadable::Tampered));
        }
        other => panic!("a record moved to another account must not read: {other:?}"),
    }
    // fleet-a's record given another version.
    redis.cmd::<()>(&["HSET", "bace-broker:token:fleet-a", "v", "6"]);
    assert!(matches!(
        read(&store, "fleet-a").await,
        Stored::Unreadable {
            version: Some(6),
            reason: Unreadable::Tampered
        }
    ));
    // A flipped byte of the sealed record.
    put(&store, "fleet-c", "access-C", 1).await;
    let mut sealed: Vec<u8> = redis.cmd(&["HGET", "bace-broker:token:fleet-c", "r"]);
    let last = sealed.len() - 1;
    sealed[last] ^= 0x01;
    let mut conn = redis.connection();
    redis::cmd("HSET")
        .arg("bace-broker:token:fleet-c")
        .arg("r")
        .arg(sealed)
        .query::<()>(&mut conn)
        .unwrap();
    assert!(matches!(
        read(&store, "fleet-c").await,
        Stored::Unreadable {
            reason: Unreadable::Tampered,
            ..
        }
    ));
    // A fingerprint that does not match the sealed token.
    put(&store, "fleet-d", "access-D", 1).await;
    redis.cmd::<()>(&[
        "HSET",
        "bace-broker:token:fleet-d",
        "fp",
        "0000000000000000",
    ]);
    assert!(matches!(
        read(&store, "fleet-d").await,
        Stored::Unreadable {
            reason: Unreadable::Tampered,
            ..
        }
    ));
    assert_eq!(store.counts().tampered_records, 4);
    // Garbage: no panic, not readable.
    redis.cmd::<()>(&["HSET", "bace-broker:token:fleet-e", "v", "x", "r", "\u{1}"]);
    assert!(matches!(
        read(&store, "fleet-e").await,
        Stored::Unreadable { version: None, .. }
    ));
    // A write supersedes an unreadable record by version.
    assert_eq!(
        put(&store, "fleet-b", "access-B2", 6).await,
        Written::Stored { version: 6 }
    );
}

#[tokio::test]
async fn rotation_reads_old_records_and_writes_with_the_new_key() {
    let redis = RedisServer::start();
    let mut setup = Setup::new(&redis);
    setup.keys = "k1";
    let old = setup.store();
    put(&old, "fleet-a", "access-old", 1).await;

    // Rotation: a new first line; the old key stays for reading.
    setup.keys = "k2,k1";
    let rotated = setup.store();
    assert_eq!(rotated.sealing_key_id(), "k2");
    let r = get(&rotated, "fleet-a").await;
    assert_eq!(r.token.expose_access(), "access-old");
    put(&rotated, "fleet-a", "access-new", 2).await;
    let sealed: Vec<u8> = redis.cmd(&["HGET", "bace-broker:token:fleet-a", "r"]);
    assert_eq!(&sealed[1..4], b"\x02k2", "new writes name the new key");

    // A replica still on the old key file: the new record is absent to it, counted and logged
    // (never a crash), with its version known.
    match read(&old, "fleet-a").await {
        Stored::Unreadable { version, reason } => {
            assert_eq!((version, reason), (Some(2), Unreadable::UnknownKey));
        }
        other => panic!("expected an unknown key, got {other:?}"),
    }
    read(&old, "fleet-a").await;
    assert_eq!(old.counts().unknown_key_records, 2);

    // The old key dropped once everything was re-written: the new record still reads.
    setup.keys = "k2";
    let done = setup.store();
    let r = get(&done, "fleet-a").await;
    assert_eq!(r.token.expose_access(), "access-new");
}

#[tokio::test]
async fn redis_holds_no_token_or_password_in_clear() {
    let redis = RedisServer::start();
    let store = Setup::new(&redis).store();
    let secrets = [
        "ACCESS-Zk3q9-SECRET",
        "REFRESH-Yp2w8-SECRET",
        "password-SECRET-7",
        "client-SECRET-9",
    ];
    let t = token("fleet-a", secrets[0], Some(secrets[1]));
    guard(store.write(&t, 1)).await.unwrap();
    let _lease = take_lease(&store, &account("fleet-a")).await;
    guard(store.invalidate(
        &account("fleet-a"),
        t.fingerprint(),
        Duration::from_secs(10),
    ))
    .await
    .unwrap();
    guard(store.set_backoff(
        &account("fleet-a"),
        BackoffKind::Rejected,
        Backoff {
            until: SystemTime::now() + Duration::from_secs(60),
            attempts: 1,
        },
        Duration::from_secs(600),
    ))
    .await
    .unwrap();
    let dump = redis.dump_all();
    let keys: Vec<&str> = dump.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(dump.len(), 4, "{keys:?}");
    for (key, bytes) in &dump {
        assert!(key.starts_with("bace-broker:"), "{key}");
        for secret in secrets {
            for needle in [secret.as_bytes(), &secret.as_bytes()[..10]] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{key} holds {secret:?} in clear"
                );
            }
        }
    }
}

#[tokio::test]
async fn the_key_prefix_separates_brokers_sharing_one_redis() {
    let redis = RedisServer::start();
    let mut setup = Setup::new(&redis);
    setup.prefix = "team-1";
    let one = setup.store();
    setup.prefix = "team-2";
    let two = setup.store();
    put(&one, "fleet-a", "access-1", 1).await;
    assert!(matches!(read(&two, "fleet-a").await, Stored::Absent));
    // The same key file, but the prefix is bound into the record: copied across, it does not
    // read.
    redis.cmd::<()>(&["COPY", "team-1:token:fleet-a", "team-2:token:fleet-a"]);
    assert!(matches!(
        read(&two, "fleet-a").await,
        Stored::Unreadable {
            reason: Unreadable::Tampered,
            ..
        }
    ));
}

// === Invalidation and failure state ===

#[tokio::test]
async fn invalidation_is_decided_once_for_every_replica() {
    let redis = RedisServer::start();
    let setup = Setup::new(&redis);
    let (one, two) = setup.replicas();
    let a = account("fleet-a");
    let cooldown = Duration::from_secs(30);
    let t1 = token("fleet-a", "access-1", None);
    assert_eq!(
        guard(one.invalidate(&a, t1.fingerprint(), cooldown))
            .await
            .unwrap(),
        Invalidation::Absent
    );
    guard(one.write(&t1, 1)).await.unwrap();
    assert_eq!(
        guard(one.invalidate(&a, Fingerprint::of("some-older-token"), cooldown))
            .await
            .unwrap(),
        Invalidation::Replaced { version: 1 }
    );
    assert_eq!(
        guard(one.invalidate(&a, t1.fingerprint(), cooldown))
            .await
            .unwrap(),
        Invalidation::Invalidated { version: 1 }
    );
    // The same report on another replica: the replacement is already under way.
    assert_eq!(
        guard(two.invalidate(&a, t1.fingerprint(), cooldown))
            .await
            .unwrap(),
        Invalidation::AlreadyInvalidated { version: 1 }
    );
    assert!(record(guard(two.read(&a)).await.unwrap()).invalidated);

    // The new token clears the mark; a report of it within the cooldown keeps it.
    let t2 = token("fleet-a", "access-2", None);
    guard(one.write(&t2, 2)).await.unwrap();
    assert!(!record(guard(two.read(&a)).await.unwrap()).invalidated);
    assert_eq!(
        guard(two.invalidate(&a, t2.fingerprint(), cooldown))
            .await
            .unwrap(),
        Invalidation::Cooldown { version: 2 }
    );
    redis.cmd::<()>(&["DEL", "bace-broker:cooldown:fleet-a"]);
    assert_eq!(
        guard(two.invalidate(&a, t2.fingerprint(), cooldown))
            .await
            .unwrap(),
        Invalidation::Invalidated { version: 2 }
    );
    let ttl: i64 = redis.cmd(&["PTTL", "bace-broker:cooldown:fleet-a"]);
    assert!(ttl > 0 && ttl <= 30_000, "{ttl}");

    // The invalidated token cannot come back under a new version (a refresh of it that ran
    // meanwhile extends the same access token)...
    let t2_extended = token("fleet-a", "access-2", Some("refresh-2"));
    assert_eq!(
        guard(one.write(&t2_extended, 3)).await.unwrap(),
        Written::Conflict { stored: 2 }
    );
    assert!(record(guard(two.read(&a)).await.unwrap()).invalidated);
    // ...unless BACE verified it after the report.
    assert_eq!(
        guard(one.write_verified(&t2_extended, 3)).await.unwrap(),
        Written::Stored { version: 3 }
    );
    assert!(!record(guard(two.read(&a)).await.unwrap()).invalidated);
}

#[tokio::test]
async fn backoffs_are_shared_and_expire() {
    let redis = RedisServer::start();
    let setup = Setup::new(&redis);
    let (one, two) = setup.replicas();
    let a = account("fleet-a");
    assert_eq!(guard(two.backoffs(&a)).await.unwrap(), Default::default());
    let until = SystemTime::UNIX_EPOCH
        + Duration::from_millis(
            (SystemTime::now() + Duration::from_secs(300))
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
        );
    let rejected = Backoff { until, attempts: 3 };
    guard(one.set_backoff(
        &a,
        BackoffKind::Rejected,
        rejected,
        Duration::from_secs(3600),
    ))
    .await
    .unwrap();
    let transient = Backoff { until, attempts: 2 };
    guard(one.set_backoff(&a, BackoffKind::Transient, transient, Duration::ZERO))
        .await
        .unwrap();
    let seen = guard(two.backoffs(&a)).await.unwrap();
    assert_eq!(seen.rejected, Some(rejected));
    assert_eq!(seen.transient, Some(transient));
    let ttl: i64 = redis.cmd(&["PTTL", "bace-broker:backoff:rejected:fleet-a"]);
    assert!(ttl > 3_500_000, "kept for `keep`: {ttl}");
    let ttl: i64 = redis.cmd(&["PTTL", "bace-broker:backoff:transient:fleet-a"]);
    assert!(ttl > 0 && ttl <= 300_000, "kept until `until`: {ttl}");
    guard(two.clear_backoff(&a, BackoffKind::Transient))
        .await
        .unwrap();
    let seen = guard(one.backoffs(&a)).await.unwrap();
    assert_eq!((seen.transient, seen.rejected), (None, Some(rejected)));

    // A replica that failed fewer times, with a shorter backoff, does not shrink it.
    let shorter = Backoff {
        until: until - Duration::from_secs(200),
        attempts: 1,
    };
    guard(two.set_backoff(&a, BackoffKind::Rejected, shorter, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        guard(one.backoffs(&a)).await.unwrap().rejected,
        Some(rejected)
    );
    let ttl: i64 = redis.cmd(&["PTTL", "bace-broker:backoff:rejected:fleet-a"]);
    assert!(ttl > 3_500_000, "kept for the longer time: {ttl}");
    // A longer one, with more attempts, extends it.
    let longer = Backoff {
        until: until + Duration::from_secs(100),
        attempts: 4,
    };
    guard(two.set_backoff(&a, BackoffKind::Rejected, longer, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        guard(one.backoffs(&a)).await.unwrap().rejected,
        Some(longer)
    );
}

// === Errors are not "absent" ===

#[tokio::test]
async fn a_paused_redis_is_a_timeout_not_an_absent_token() {
    let mut redis = RedisServer::start();
    let setup = Setup::short_timeouts(&redis);
    let store = setup.store();
    let a = account("fleet-a");
    // The short timeout is for the paused server; before, retry what a loaded machine delays.
    let t = token("fleet-a", "access-1", None);
    guard(async { while store.write(&t, 1).await.is_err() {} }).await;
    assert_eq!(store.is_up(), Some(true));
    redis.pause();
    let error = guard(store.read(&a)).await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Timeout, "{error}");
    assert_eq!(store.is_up(), Some(false));
    let error = guard(store.read_many(std::slice::from_ref(&a)))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Timeout, "{error}");
    let error = guard(store.acquire_lease(&a)).await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Timeout, "{error}");
    // A fresh replica connecting to the frozen server: the connect is bounded too.
    let fresh = setup.store();
    assert_eq!(fresh.is_up(), None, "unknown before the first operation");
    let error = guard(fresh.read(&a)).await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Timeout, "{error}");
    redis.resume();
    let r = read_when_back(&store, &a).await;
    assert_eq!(record(r).version, 1);
    assert_eq!(store.is_up(), Some(true));
    assert!(store.counts().operations("read", "timeout") >= 1);
}

#[tokio::test]
async fn a_stopped_redis_is_unreachable_and_a_restarted_one_empty() {
    let mut redis = RedisServer::start();
    let store = Setup::new(&redis).store();
    let a = account("fleet-a");
    put(&store, "fleet-a", "access-1", 1).await;
    redis.stop();
    let error = guard(store.read(&a)).await.unwrap_err();
    assert_unreachable(&error);
    let error = guard(store.write(&token("fleet-a", "access-2", None), 2))
        .await
        .unwrap_err();
    assert!(error.kind() != StoreErrorKind::Refused, "{error}");
    redis.restart();
    let stored = read_when_back(&store, &a).await;
    assert!(matches!(stored, Stored::Absent), "restarted empty");
    // The scripts are loaded again after the restart emptied the script cache.
    assert_eq!(
        put(&store, "fleet-a", "access-2", 2).await,
        Written::Stored { version: 2 }
    );
}

#[tokio::test]
async fn passwords_and_acl_users_from_files() {
    let redis = RedisServer::start_with_password("redis-PW-SECRET");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, "redis-PW-SECRET\n").unwrap();
    // The default user, then the ACL user `broker`.
    for username in [None, Some("broker")] {
        let mut setup = Setup::new(&redis);
        setup.username = username;
        setup.password_file = Some(pw.clone());
        let config = setup.config();
        let shown = format!("{config:?}");
        assert!(!shown.contains("redis-PW-SECRET"), "{shown}");
        let store = Store::new(&config).unwrap();
        guard(store.ping()).await.unwrap();
        put(&store, "fleet-a", "access-1", 1).await;
        assert!(!format!("{store:?}").contains("redis-PW-SECRET"));

        // Without the password: refused, and the error shows no secret.
        setup.password_file = None;
        let error = guard(setup.store().ping()).await.unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Refused, "{error}");
        assert!(!error.to_string().contains("redis-PW-SECRET"), "{error}");
    }
    // A wrong password: refused, not echoed.
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "wrong-PW").unwrap();
    let mut setup = Setup::new(&redis);
    setup.password_file = Some(wrong);
    let error = guard(setup.store().ping()).await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Refused, "{error}");
    assert!(!error.to_string().contains("wrong-PW"), "{error}");
}

// === Announcements and reconnection ===

#[tokio::test]
async fn announcements_reach_subscribers_and_reconnects_are_reported() {
    let mut redis = RedisServer::start();
    let setup = Setup::new(&redis);
    let (one, two) = setup.replicas();
    let mut events = two.subscribe().unwrap();
    assert_eq!(guard(events.next()).await, StoreEvent::Connected);
    assert_eq!(redis.subscribers("bace-broker:announce"), 1);

    guard(one.announce(&account("fleet-a"), 42)).await.unwrap();
    match guard(events.next()).await {
        StoreEvent::Announced(a) => {
            assert_eq!((a.account.as_str(), a.version), ("fleet-a", 42));
            let sent = a.sent_at.expect("the send time");
            let age = SystemTime::now().duration_since(sent).unwrap_or_default();
            assert!(age < Duration::from_secs(60), "{age:?}");
        }
        other => panic!("expected the announcement, got {other:?}"),
    }
    // Something else on the channel is ignored.
    redis.cmd::<i64>(&["PUBLISH", "bace-broker:announce", "garbage"]);
    guard(one.announce(&account("fleet-b"), 1)).await.unwrap();
    assert!(
        matches!(guard(events.next()).await, StoreEvent::Announced(a) if a.account.as_str() == "fleet-b")
    );
    assert_eq!(two.counts().malformed_announcements, 1);

    // Announcements lost on a killed subscriber connection: reported, then re-subscribed.
    assert!(redis.kill_pubsub_clients() >= 1);
    assert!(matches!(
        guard(events.next()).await,
        StoreEvent::Disconnected { .. }
    ));
    assert_eq!(guard(events.next()).await, StoreEvent::Connected);
    guard(one.announce(&account("fleet-a"), 43)).await.unwrap();
    assert!(matches!(guard(events.next()).await, StoreEvent::Announced(a) if a.version == 43));

    // A restart of Redis: down, then back (subscribed again on the new server).
    redis.restart();
    assert!(matches!(
        guard(events.next()).await,
        StoreEvent::Disconnected { .. }
    ));
    assert_eq!(guard(events.next()).await, StoreEvent::Connected);
    assert_eq!(redis.subscribers("bace-broker:announce"), 1);
    let announced = guard(async {
        // The publishing replica's own connection reconnects on first use.
        loop {
            if one.announce(&account("fleet-c"), 7).await.is_ok() {
                break;
            }
        }
    });
    announced.await;
    assert!(matches!(guard(events.next()).await, StoreEvent::Announced(a) if a.version == 7));
    let counts = two.counts();
    assert_eq!((counts.subscriptions, counts.disconnections), (3, 2));
}

#[tokio::test]
async fn a_subscription_started_while_redis_is_down_joins_when_it_appears() {
    let mut redis = RedisServer::start();
    let store = Setup::new(&redis).store();
    redis.stop();
    let mut events = store.subscribe().unwrap();
    assert!(matches!(
        guard(events.next()).await,
        StoreEvent::Disconnected { .. }
    ));
    assert!(!events.is_up());
    redis.restart();
    assert_eq!(guard(events.next()).await, StoreEvent::Connected);
    assert!(events.is_up());
}

#[tokio::test]
async fn a_paused_redis_is_noticed_by_the_subscription() {
    let mut redis = RedisServer::start();
    let setup = Setup::short_timeouts(&redis);
    let store = setup.store();
    let mut events = store.subscribe().unwrap();
    // The short timeout is for the paused server; before, a loaded machine may miss it once.
    guard(async { while events.next().await != StoreEvent::Connected {} }).await;
    redis.pause();
    assert!(matches!(
        guard(events.next()).await,
        StoreEvent::Disconnected { .. }
    ));
    redis.resume();
    assert_eq!(guard(events.next()).await, StoreEvent::Connected);
}

// === TLS ===

#[tokio::test]
async fn rediss_with_the_ca_file_and_not_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = testkit::pki::Ca::new("redis test CA");
    let leaf = ca.server(1);
    let (ca_file, cert_file, key_file) = (
        dir.path().join("ca.pem"),
        dir.path().join("server.pem"),
        dir.path().join("server.key"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, &leaf.cert_pem).unwrap();
    std::fs::write(&key_file, &leaf.key_pem).unwrap();
    let redis = RedisServer::start_tls(testkit::RedisTls {
        cert_file,
        key_file,
        ca_file: ca_file.clone(),
    });
    assert!(redis.url().starts_with("rediss://localhost:"));
    let config = |ca: Option<&Path>| {
        let mut setup = Setup::new(&redis);
        setup.ca_file = ca.map(Path::to_path_buf);
        setup.config()
    };
    let with_ca = config(Some(&ca_file));
    let store = Store::new(&with_ca).unwrap();
    put(&store, "fleet-a", "access-TLS", 1).await;
    let r = get(&store, "fleet-a").await;
    assert_eq!(r.token.expose_access(), "access-TLS");
    let mut events = store.subscribe().unwrap();
    assert_eq!(guard(events.next()).await, StoreEvent::Connected);

    // The system roots do not know the test CA: the connection fails, as an error (not absent).
    let without = config(None);
    let store = Store::new(&without).unwrap();
    let error = guard(store.read(&account("fleet-a"))).await.unwrap_err();
    assert_unreachable(&error);
    // Another CA: refused the same way.
    let other = testkit::pki::Ca::new("other CA");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.pem()).unwrap();
    let store = Store::new(&config(Some(&other_file))).unwrap();
    assert!(guard(store.ping()).await.is_err());
}

/// The ACL the README gives operators is enough for every operation.
#[tokio::test]
async fn the_documented_acl_is_enough() {
    let redis = RedisServer::start_with_password("admin-PW");
    let dir = tempfile::tempdir().unwrap();
    let mut conn = redis::Client::open(format!("redis://:admin-PW@127.0.0.1:{}", redis.port()))
        .unwrap()
        .get_connection()
        .unwrap();
    // As in README.md, "Redis settings".
    redis::cmd("ACL")
        .arg(
            "SETUSER scoped on >scoped-PW ~bace-broker:* &bace-broker:announce -@all +get +set \
             +del +pexpire +pttl +hget +hmget +hset +exists +mget +publish +subscribe \
             +unsubscribe +ping +hello +eval +evalsha +script|load"
                .split(' ')
                .collect::<Vec<_>>(),
        )
        .query::<()>(&mut conn)
        .unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "scoped-PW").unwrap();
    let mut setup = Setup::new(&redis);
    setup.username = Some("scoped");
    setup.password_file = Some(pw);
    let store = setup.store();
    let a = account("fleet-a");
    let t = token("fleet-a", "access-1", Some("refresh-1"));
    let mut events = store.subscribe().unwrap();
    assert_eq!(guard(events.next()).await, StoreEvent::Connected);
    guard(store.ping()).await.unwrap();
    let mut lease = take_lease(&store, &a).await;
    assert!(guard(store.renew(&mut lease)).await.unwrap());
    assert_eq!(
        guard(store.write(&t, 1)).await.unwrap(),
        Written::Stored { version: 1 }
    );
    assert!(guard(store.release(lease)).await.unwrap());
    record(guard(store.read(&a)).await.unwrap());
    guard(store.read_many(std::slice::from_ref(&a)))
        .await
        .unwrap();
    guard(store.versions(std::slice::from_ref(&a)))
        .await
        .unwrap();
    guard(store.announce(&a, 1)).await.unwrap();
    assert!(matches!(
        guard(events.next()).await,
        StoreEvent::Announced(_)
    ));
    assert_eq!(
        guard(store.invalidate(&a, t.fingerprint(), Duration::from_secs(5)))
            .await
            .unwrap(),
        Invalidation::Invalidated { version: 1 }
    );
    let backoff = Backoff {
        until: SystemTime::now() + Duration::from_secs(5),
        attempts: 1,
    };
    guard(store.set_backoff(&a, BackoffKind::Transient, backoff, Duration::ZERO))
        .await
        .unwrap();
    guard(store.backoffs(&a)).await.unwrap();
    guard(store.clear_backoff(&a, BackoffKind::Transient))
        .await
        .unwrap();
    // ... and nothing outside the prefix.
    let mut other = Setup::new(&redis);
    other.username = Some("scoped");
    other.password_file = setup.password_file.clone();
    other.prefix = "other-broker";
    let error = guard(other.store().read(&a)).await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Refused, "{error}");
    // ... and no command that reaches past the prefix or wipes the server (this Redis may be
    // shared with other applications).
    let mut scoped = redis::Client::open(format!(
        "redis://scoped:scoped-PW@127.0.0.1:{}",
        redis.port()
    ))
    .unwrap()
    .get_connection()
    .unwrap();
    for command in [
        &["FLUSHALL"][..],
        &["FLUSHDB"],
        &["KEYS", "*"],
        &["SCRIPT", "FLUSH"],
        &["CONFIG", "GET", "*"],
    ] {
        let refused = redis::cmd(command[0])
            .arg(&command[1..])
            .query::<redis::Value>(&mut scoped);
        assert!(refused.is_err(), "{command:?} allowed");
    }
}

/// The broker runs store calls in spawned tasks: every future the store hands out is `Send`,
/// and the handles are `Send + Sync`.
#[tokio::test]
async fn store_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    fn shared<T: Send + Sync>() {}
    shared::<Store>();
    shared::<bace_token_broker::StoreError>();
    let redis = RedisServer::start();
    let store = Setup::new(&redis).store();
    let a = account("a");
    let t = token("a", "x", None);
    send(&store.read(&a));
    send(&store.read_many(std::slice::from_ref(&a)));
    send(&store.versions(std::slice::from_ref(&a)));
    send(&store.write(&t, 1));
    send(&store.announce(&a, 1));
    send(&store.invalidate(&a, t.fingerprint(), Duration::from_secs(1)));
    send(&store.backoffs(&a));
    send(&store.acquire_lease(&a));
    let mut lease = take_lease(&store, &a).await;
    send(&store.renew(&mut lease));
    send(&store.hold(&mut lease, async {}));
    send(&store.release(lease));
    let mut events = store.subscribe().unwrap();
    send(&events.next());
    send(&events);
}

/// Ten replicas race: one lease holder, and of ten writes of one version, one is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_get_one_lease_and_one_write() {
    let redis = RedisServer::start();
    let setup = Setup::new(&redis);
    let replicas: Vec<Store> = (0..10).map(|_| setup.store()).collect();
    for s in &replicas {
        guard(s.ping()).await.unwrap();
    }
    let a = account("fleet-a");
    let tasks: Vec<_> = replicas
        .iter()
        .cloned()
        .map(|s| {
            let a = a.clone();
            tokio::spawn(async move { s.acquire_lease(&a).await.unwrap() })
        })
        .collect();
    let mut holders = 0;
    for t in tasks {
        if let Acquired::Acquired(_) = guard(t).await.unwrap() {
            holders += 1;
        }
    }
    assert_eq!(holders, 1);

    let tasks: Vec<_> = replicas
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(async move {
                let t = token("fleet-a", &format!("access-{i}"), None);
                (i, s.write(&t, 1).await.unwrap())
            })
        })
        .collect();
    let mut stored = Vec::new();
    for t in tasks {
        let (i, written) = guard(t).await.unwrap();
        match written {
            Written::Stored { version } => stored.push((i, version)),
            Written::Conflict { stored } => assert_eq!(stored, 1),
        }
    }
    let [(winner, 1)] = stored[..] else {
        panic!("exactly one write of version 1: {stored:?}");
    };
    let r = record(guard(replicas[0].read(&a)).await.unwrap());
    assert_eq!(r.token.expose_access(), format!("access-{winner}"));
}

#[tokio::test]
async fn a_record_with_an_unreadable_version_is_superseded_and_the_store_stays_up() {
    // Someone (or an older broker) left a record whose version is not a number: it can never
    // be read, so a write must replace it, and one odd record says nothing about Redis.
    let redis = RedisServer::start();
    let store = Setup::new(&redis).store();
    let a = account("fleet-a");
    let _: () = redis.cmd(&["HSET", "bace-broker:token:fleet-a", "v", "not-a-number"]);
    let fresh = token("fleet-a", "access-v1", Some("refresh-v1"));
    assert_eq!(
        guard(store.write(&fresh, 1)).await.unwrap(),
        Written::Stored { version: 1 }
    );
    assert_eq!(record(guard(store.read(&a)).await.unwrap()).version, 1);

    let _: () = redis.cmd(&["HSET", "bace-broker:token:fleet-a", "v", "junk"]);
    let fingerprint = fresh.fingerprint();
    assert_eq!(
        guard(store.invalidate(&a, fingerprint, Duration::from_secs(10)))
            .await
            .unwrap(),
        Invalidation::Absent,
        "an unreadable version is no token to invalidate"
    );
    assert_eq!(
        guard(store.versions(std::slice::from_ref(&a)))
            .await
            .unwrap(),
        vec![None]
    );
    assert_eq!(store.is_up(), Some(true));
}
