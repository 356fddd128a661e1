//! Several replicas as one broker: three broker processes (the real binary), one private
//! redis-server and the fake BACE on loopback. Each test counts what BACE saw.
//!
//! No test waits for a fixed time: they wait for a condition (a token served, a call counted)
//! under the hang guard, and bound counts, never durations.

use std::{collections::HashSet, path::Path, time::Duration};

use bace_token_broker::proto;
use testkit::{
    BrokerConfig, RedisServer, RedisStore, Replica, fake_account,
    fake_bace::{FakeBace, Grant},
    guard, user,
};

const BIN: &str = env!("CARGO_BIN_EXE_bace-token-broker");

struct Cluster {
    dir: tempfile::TempDir,
    redis: RedisServer,
    fake: FakeBace,
    config: BrokerConfig,
    replicas: Vec<Replica>,
}

/// The store section every replica shares: short timeout and lease, so a lost holder is
/// replaced within seconds.
fn store_of(redis: &RedisServer, keys: &Path) -> RedisStore {
    RedisStore::new(redis.url(), keys)
        .timeout(Duration::from_millis(500))
        .lease(Duration::from_millis(1500))
}

impl Cluster {
    /// The fake with `accounts`, a Redis, and the config of the replicas (not started).
    async fn new(accounts: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start();
        let fake = testkit::fake(accounts).await;
        let keys = dir.path().join("keys");
        RedisStore::write_key_file(&keys, &["k1"]);
        let config = BrokerConfig::for_fake(&fake, accounts)
            .store(store_of(&redis, &keys))
            .invalidate_cooldown(Duration::from_millis(200));
        Self {
            dir,
            redis,
            fake,
            config,
            replicas: Vec::new(),
        }
    }

    /// Starts `n` more replicas with the current config (at once), and waits until all are
    /// ready.
    async fn start(&mut self, n: usize) {
        let first = self.replicas.len();
        for i in first..first + n {
            let name = format!("r{}", i + 1);
            let replica = Replica::start(Path::new(BIN), self.dir.path(), &name, &self.config);
            self.replicas.push(replica);
        }
        for replica in &mut self.replicas[first..] {
            replica.wait_ready().await;
        }
    }

    fn logins(&self, account: &str) -> u64 {
        self.fake.calls(&user(account), Grant::Password)
    }

    fn refreshes(&self, account: &str) -> u64 {
        self.fake.calls(&user(account), Grant::Refresh)
    }

    /// Every replica's log, for failure messages.
    fn logs(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("===== {} =====\n{}", r.name, r.logs()))
            .collect()
    }

    /// The token each replica serves for `account`.
    async fn tokens(&self, account: &str) -> Vec<String> {
        let mut tokens = Vec::new();
        for r in &self.replicas {
            let token = r
                .get(account)
                .await
                .unwrap_or_else(|e| panic!("{} GetToken {account}: {e}\n{}", r.name, self.logs()));
            tokens.push(token.access_token);
        }
        tokens
    }

    /// Waits until every replica serves `want` for `account` (under the hang guard).
    async fn converge_on(&self, account: &str, want: &str) {
        let converged = tokio::time::timeout(testkit::HANG_GUARD, async {
            loop {
                if self.tokens(account).await.iter().all(|t| t == want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if converged.is_err() {
            panic!(
                "replicas serve {:?}, not all {want:?}\n{}",
                self.tokens(account).await,
                self.logs()
            );
        }
    }

    /// Waits until the replicas serve one token for `account`; returns it.
    async fn converged(&self, account: &str) -> String {
        let converged = tokio::time::timeout(testkit::HANG_GUARD, async {
            loop {
                let tokens = self.tokens(account).await;
                if tokens.iter().all(|t| *t == tokens[0]) {
                    return tokens[0].clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        converged.unwrap_or_else(|_| panic!("replicas never agreed\n{}", self.logs()))
    }
}

/// `bace-token-broker status` against `replica`.
fn status(replica: &Replica) -> String {
    let out = std::process::Command::new(BIN)
        .args(["status", "--addr", &replica.url()])
        .output()
        .expect("run status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn invalidate(replica: &Replica, account: &str, token: &str) -> proto::InvalidateResponse {
    replica
        .client()
        .await
        .invalidate(proto::InvalidateRequest {
            account: account.into(),
            access_token: token.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{} Invalidate: {e}\n{}", replica.name, replica.logs()))
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_starting_together_log_in_once_per_account_and_serve_one_token() {
    let accounts = ["acme", "globex", "initech", "umbrella"];
    let mut c = Cluster::new(&accounts).await;
    // Time for 300 channels to connect while the logins wait.
    c.config = c.config.clone().upstream_timeout(Duration::from_secs(30));
    // BACE holds every answer: the replicas start, their warm-ups meet at the leases, and 300
    // callers arrive while no replica has a token yet.
    c.fake.hold();
    for i in 1..=3 {
        let name = format!("r{i}");
        c.replicas.push(Replica::start(
            Path::new(BIN),
            c.dir.path(),
            &name,
            &c.config,
        ));
    }
    guard(c.fake.wait_for_total_calls(accounts.len() as u64)).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let replica = &c.replicas[i % 3];
        let client = loop {
            // The replica may not listen yet.
            match tonic::transport::Endpoint::from_shared(replica.url())
                .unwrap()
                .connect()
                .await
            {
                Ok(channel) => {
                    break proto::token_broker_service_client::TokenBrokerServiceClient::new(
                        channel,
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let account = accounts[i % accounts.len()];
        calls.spawn(async move { (account, testkit::get(client, account).await) });
    }
    // Every caller is in (counted by its replica) before BACE answers.
    for r in &c.replicas {
        guard(async {
            loop {
                let m = r.scrape().await;
                let started = m
                    .get("grpc_server_started_total{grpc_type=\"unary\",grpc_service=\"bace.tokenbroker.v1.TokenBrokerService\",grpc_method=\"GetToken\"}")
                    .copied()
                    .unwrap_or(0.0);
                if started >= 100.0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    c.fake.release();
    let mut served: std::collections::HashMap<&str, HashSet<String>> = Default::default();
    while let Some(done) = guard(calls.join_next()).await {
        let (account, token) = done.unwrap();
        let token = token.unwrap_or_else(|e| panic!("GetToken: {e}"));
        served
            .entry(account)
            .or_default()
            .insert(token.access_token);
    }
    for account in accounts {
        assert_eq!(
            c.logins(account),
            1,
            "{account}: one login for the cluster\n{}",
            c.logs()
        );
        assert_eq!(
            served[account].len(),
            1,
            "{account}: one token on every replica"
        );
    }
    // Two of the three replicas took their tokens from the store.
    let mut from_store = 0.0;
    for r in &c.replicas {
        let m = r.scrape().await;
        assert_eq!(m["bace_broker_store_up"], 1.0, "{}", r.name);
        from_store += m
            .get("bace_broker_store_leases_total{result=\"contended\"}")
            .copied()
            .unwrap_or(0.0);
    }
    assert!(
        from_store >= 1.0,
        "no replica ever waited for another's lease"
    );

    // ListAccounts says the store is in use and up.
    let list = c.replicas[0]
        .client()
        .await
        .list_accounts(proto::ListAccountsRequest {})
        .await
        .unwrap()
        .into_inner();
    let store = list.store.expect("store status");
    assert_eq!(store.state, proto::StoreState::Up as i32);
    assert_eq!(store.key_prefix, "bace-broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refreshes_over_several_cycles_are_one_replicas_worth() {
    let accounts = ["acme", "globex"];
    let mut c = Cluster::new(&accounts).await;
    for a in accounts {
        let mut account = fake_account(a);
        account.login_lifetime = Duration::from_secs(4);
        account.refresh_lifetime = Duration::from_secs(4);
        c.fake.add_account(account);
    }
    // Refresh at half of 4 s (±5 %), so a cycle is about 2 s.
    c.config = c
        .config
        .clone()
        .expiry_margin(Duration::from_millis(500))
        .lifetime_fraction(0.5)
        .refreshed_lifetime(Duration::from_secs(4));
    c.start(3).await;
    // One replica refreshes each token once per cycle (~2 s). Three replicas refreshing on
    // their own would each refresh it within their ±5 % jitter of the same plan: two or three
    // refreshes of one account within ~0.2 s. Watch the counts for four cycles: each new
    // refresh must come alone, well after the previous one.
    let mut last: Vec<(u64, Option<std::time::Instant>)> =
        accounts.iter().map(|a| (c.refreshes(a), None)).collect();
    let mut cycles = 0;
    guard(async {
        while cycles < 4 * accounts.len() {
            for (i, a) in accounts.iter().enumerate() {
                let n = c.refreshes(a);
                if n == last[i].0 {
                    continue;
                }
                assert_eq!(
                    n,
                    last[i].0 + 1,
                    "{a}: refreshes came together\n{}",
                    c.logs()
                );
                let now = std::time::Instant::now();
                if let Some(before) = last[i].1 {
                    assert!(
                        now - before > Duration::from_millis(500),
                        "{a}: two refreshes {:?} apart\n{}",
                        now - before,
                        c.logs()
                    );
                }
                last[i] = (n, Some(now));
                cycles += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut tokens = HashSet::new();
    for a in accounts {
        assert_eq!(
            c.logins(a),
            1,
            "{a}: refreshed, never logged in again\n{}",
            c.logs()
        );
        tokens.insert(c.converged(a).await);
    }
    assert_eq!(tokens.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_on_one_replica_reaches_the_others_and_their_watchers() {
    let mut c = Cluster::new(&["acme"]).await;
    c.start(3).await;
    let old = c.converged("acme").await;
    let mut watchers = Vec::new();
    for r in &c.replicas[1..] {
        let mut stream = r
            .client()
            .await
            .watch_token(proto::WatchTokenRequest {
                account: "acme".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = guard(stream.message()).await.unwrap().unwrap();
        assert_eq!(first.token.unwrap().access_token, old);
        watchers.push(stream);
    }

    // Three replicas get the same report while BACE holds the login: one login for all.
    c.fake.hold();
    let reports = async {
        tokio::join!(
            invalidate(&c.replicas[0], "acme", &old),
            invalidate(&c.replicas[1], "acme", &old),
            invalidate(&c.replicas[2], "acme", &old),
        )
    };
    // Released once all three have the store's verdict: one replica's login is at BACE, the
    // two others wait for its lease.
    let contended = |m: &std::collections::HashMap<String, f64>| m["bace_broker_store_leases_total{result=\"contended\"}"];
    let mut before = 0.0;
    for r in &c.replicas {
        before += contended(&r.scrape().await);
    }
    let release = async {
        guard(c.fake.wait_for_calls(&user("acme"), Grant::Password, 2)).await;
        guard(async {
            loop {
                let mut now = 0.0;
                for r in &c.replicas {
                    now += contended(&r.scrape().await);
                }
                if now >= before + 2.0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        c.fake.release();
    };
    let ((a, b, d), ()) = tokio::join!(reports, release);
    assert_eq!(
        c.logins("acme"),
        2,
        "one login for three reports\n{}",
        c.logs()
    );
    let new = a.token.unwrap().access_token;
    assert_ne!(new, old);
    for answer in [&b, &d] {
        assert_eq!(answer.token.as_ref().unwrap().access_token, new);
        assert_eq!(answer.outcome, proto::InvalidateOutcome::Invalidated as i32);
    }
    c.converge_on("acme", &new).await;
    for stream in &mut watchers {
        let next = guard(stream.message()).await.unwrap().unwrap();
        assert_eq!(
            next.token.unwrap().access_token,
            new,
            "watcher sees the new token"
        );
    }
    // A late report of the old token is answered with the new one, without a login.
    let late = invalidate(&c.replicas[2], "acme", &old).await;
    assert_eq!(
        late.outcome,
        proto::InvalidateOutcome::AlreadyReplaced as i32
    );
    assert_eq!(late.token.unwrap().access_token, new);
    assert_eq!(c.logins("acme"), 2);
    // After the cooldown, a report on r1 alone: r2 and r3 learn of the new token from its
    // announcement (and time it).
    tokio::time::sleep(Duration::from_millis(250)).await;
    let key = "bace_broker_store_propagation_seconds_count";
    let mut timed = Vec::new();
    for r in &c.replicas[1..] {
        timed.push(r.scrape().await.get(key).copied().unwrap_or(0.0));
    }
    let third = invalidate(&c.replicas[0], "acme", &new).await;
    assert_eq!(third.outcome, proto::InvalidateOutcome::Invalidated as i32);
    let third = third.token.unwrap().access_token;
    c.converge_on("acme", &third).await;
    assert_eq!(c.logins("acme"), 3);
    for (r, before) in c.replicas[1..].iter().zip(timed) {
        let m = r.scrape().await;
        assert_eq!(m[key], before + 1.0, "{}", r.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_restarted_one_by_one_or_all_at_once_make_no_upstream_call() {
    let accounts = ["acme", "globex", "initech"];
    let mut c = Cluster::new(&accounts).await;
    c.start(3).await;
    let tokens: Vec<String> = {
        let mut t = Vec::new();
        for a in accounts {
            t.push(c.converged(a).await);
        }
        t
    };
    let calls = c.fake.total_calls();
    assert_eq!(calls, 3);
    // A rolling restart...
    for i in 0..3 {
        c.replicas[i].terminate();
        c.replicas[i].restart();
        c.replicas[i].wait_ready().await;
    }
    // ...and all at once.
    for r in &mut c.replicas {
        r.terminate();
    }
    for r in &mut c.replicas {
        r.restart();
    }
    for r in &mut c.replicas {
        r.wait_ready().await;
    }
    assert_eq!(
        c.fake.total_calls(),
        calls,
        "no upstream call\n{}",
        c.logs()
    );
    for (a, token) in accounts.iter().zip(&tokens) {
        c.converge_on(a, token).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_holder_killed_mid_login_is_replaced_after_its_lease() {
    let mut c = Cluster::new(&["acme"]).await;
    // A lease longer than a fetch's budget (as the defaults, 30 s and 10 s): the replica that
    // waited out the lease still has a budget for its own login.
    let keys = c.dir.path().join("keys");
    c.config = c
        .config
        .clone()
        .upstream_timeout(Duration::from_secs(1))
        .store(
            RedisStore::new(c.redis.url(), keys)
                .timeout(Duration::from_millis(500))
                .lease(Duration::from_secs(3)),
        );
    c.fake.hold();
    let mut holder = Replica::start(Path::new(BIN), c.dir.path(), "holder", &c.config);
    // The holder's login reached BACE (and hangs there).
    guard(c.fake.wait_for_calls(&user("acme"), Grant::Password, 1)).await;
    let mut other = Replica::start(Path::new(BIN), c.dir.path(), "other", &c.config);
    holder.kill();
    c.fake.release();
    other.wait_ready().await;
    let token = other.get("acme").await.expect("a token after the lease");
    assert!(
        !other.logs().contains("token fetch failed"),
        "the fetch after the lease failed\n{}",
        other.logs()
    );
    assert!(c.fake.is_valid(&token.access_token));
    assert_eq!(
        c.logins("acme"),
        2,
        "the killed holder's login and one more\n{}",
        other.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_credentials_are_tried_no_more_often_than_by_one_replica() {
    let mut c = Cluster::new(&["acme"]).await;
    c.fake.set_password(&user("acme"), "another password");
    c.config = c
        .config
        .clone()
        .rejected_backoff(Duration::from_millis(1500));
    c.start(3).await;
    // Callers keep asking on every replica. One replica tries again after its backoff (1.5 s,
    // then 3 s: doubling, no jitter); three on their own would each try when their own
    // backoff ends: attempts milliseconds apart. Watch two more attempts come, one at a time
    // and seconds apart. (Delays on a loaded machine only make the gaps longer.)
    let callers = async {
        loop {
            for r in &c.replicas {
                let e = r.get("acme").await.expect_err("rejected");
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let attempts = async {
        let mut seen = c.logins("acme");
        let mut times = Vec::new();
        while times.len() < 2 {
            let n = c.logins("acme");
            if n != seen {
                assert_eq!(n, seen + 1, "attempts came together\n{}", c.logs());
                times.push(std::time::Instant::now());
                seen = n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        times
    };
    let times = tokio::select! {
        () = callers => unreachable!(),
        times = guard(attempts) => times,
    };
    assert!(
        times[1] - times[0] > Duration::from_millis(1000),
        "attempts {:?} apart\n{}",
        times[1] - times[0],
        c.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_credentials_log_in_again_rather_than_adopt_the_old_token() {
    let mut c = Cluster::new(&["acme"]).await;
    c.start(2).await;
    let old = c.converged("acme").await;
    // The password changes at BACE and in the config of both replicas (a Secret update).
    c.fake.set_password(&user("acme"), "the new password");
    let keys = c.dir.path().join("keys");
    let config = BrokerConfig::new()
        .account(
            testkit::Account::new(
                "acme",
                testkit::CLIENT_ID,
                testkit::CLIENT_SECRET,
                user("acme"),
                "the new password",
            )
            .token_url(c.fake.token_url()),
        )
        .store(store_of(&c.redis, &keys))
        .invalidate_cooldown(Duration::from_millis(200));
    for r in &c.replicas {
        r.rewrite_config(&config);
    }
    // A replica logs in with the new credentials (neither keeps the old token, nor takes it
    // from the store), and they end on one token: the first replica's login, or each its own
    // then one of them (a replica that reloads late may find the new token already stored).
    let relogged = tokio::time::timeout(
        testkit::HANG_GUARD,
        c.fake.wait_for_calls(&user("acme"), Grant::Password, 2),
    )
    .await;
    assert!(relogged.is_ok(), "no new logins\n{}", c.logs());
    let new = c.converged("acme").await;
    assert_ne!(new, old);
    assert!(c.fake.is_valid(&new));
    assert!(c.logins("acme") <= 3, "{}", c.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_replacing_a_hanging_refresh_does_not_wait_for_its_lease() {
    let mut c = Cluster::new(&["acme"]).await;
    // A lease far longer than the hang guard: were the abandoned refresh's lease kept until
    // it expired, the forced login would wait for it, and the test would hang.
    let keys = c.dir.path().join("keys");
    c.config = c
        .config
        .clone()
        .upstream_timeout(Duration::from_secs(100))
        .store(
            RedisStore::new(c.redis.url(), keys)
                .timeout(Duration::from_millis(500))
                .lease(Duration::from_secs(300)),
        );
    c.start(1).await;
    let old = c.converged("acme").await;
    c.fake.script(
        &user("acme"),
        Grant::Refresh,
        [testkit::fake_bace::Step::Hang],
    );
    // A caller that needs more than the login token has left starts a refresh: it hangs.
    let mut client = c.replicas[0].client().await;
    let caller = tokio::spawn(async move {
        testkit::get_min(&mut client, "acme", Some(Duration::from_secs(86_500))).await
    });
    guard(c.fake.wait_for_calls(&user("acme"), Grant::Refresh, 1)).await;
    let answer = tokio::time::timeout(
        testkit::HANG_GUARD,
        invalidate(&c.replicas[0], "acme", &old),
    )
    .await
    .unwrap_or_else(|_| panic!("Invalidate hangs\n{}", c.logs()));
    assert_eq!(answer.outcome, proto::InvalidateOutcome::Invalidated as i32);
    let new = answer.token.unwrap().access_token;
    assert_ne!(new, old);
    assert_eq!(guard(caller).await.unwrap().unwrap().access_token, new);
    assert_eq!(c.logins("acme"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_is_readable_in_redis() {
    let mut c = Cluster::new(&["acme", "globex"]).await;
    c.start(2).await;
    let mut secrets = vec![testkit::CLIENT_SECRET.to_owned()];
    for a in ["acme", "globex"] {
        secrets.push(testkit::password(a));
        let token = c.converged(a).await;
        secrets.push(token.clone());
        secrets.push(c.fake.refresh_token_of(&token).expect("refresh token"));
    }
    let dump = c.redis.dump_all();
    assert!(!dump.is_empty());
    for (key, value) in &dump {
        for secret in &secrets {
            let hay = [key.as_bytes(), value.as_slice()].concat();
            assert!(
                !hay.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret is readable under {key}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_is_not_an_outage_and_an_empty_redis_is_refilled() {
    let mut c = Cluster::new(&["acme", "globex"]).await;
    c.start(3).await;
    let acme = c.converged("acme").await;
    let globex = c.converged("globex").await;
    assert!(
        status(&c.replicas[0]).starts_with("store: redis, key prefix \"bace-broker\", up\n"),
        "{}",
        status(&c.replicas[0])
    );
    c.redis.stop();
    // Every replica keeps serving what it holds (answered from memory: the hot path never
    // touches Redis) and stays ready.
    c.converge_on("acme", &acme).await;
    for r in &c.replicas {
        assert!(testkit::is_ready(&r.url()).await);
    }
    // A replica that learns the token is bad replaces it on its own meanwhile.
    let answer = invalidate(&c.replicas[0], "acme", &acme).await;
    let replaced = answer.token.unwrap().access_token;
    assert_ne!(replaced, acme);
    assert_eq!(c.logins("acme"), 2);
    // The store is reported down.
    let down = tokio::time::timeout(testkit::HANG_GUARD, async {
        loop {
            let m = c.replicas[1].scrape().await;
            if m["bace_broker_store_up"] == 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(down.is_ok(), "store reported down");
    assert!(status(&c.replicas[1]).contains(", DOWN ("));

    // Redis comes back empty: the replicas write back what they hold and converge, with no
    // login (the replaced token is the newest: it wins).
    c.redis.restart();
    c.converge_on("acme", &replaced).await;
    c.converge_on("globex", &globex).await;
    assert_eq!(c.logins("acme"), 2, "{}", c.logs());
    assert_eq!(c.logins("globex"), 1, "{}", c.logs());
    let dump = c.redis.dump_all();
    assert!(dump.iter().any(|(k, _)| k == "bace-broker:token:acme"));
    assert!(dump.iter().any(|(k, _)| k == "bace-broker:token:globex"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_started_while_redis_is_down_works_alone_and_joins_when_it_appears() {
    let mut c = Cluster::new(&["acme"]).await;
    c.redis.stop();
    c.start(1).await;
    let own = c.replicas[0].get("acme").await.unwrap().access_token;
    assert_eq!(c.logins("acme"), 1);
    c.redis.restart();
    // It writes its token back once Redis answers; a replica started then takes it from
    // there.
    guard(async {
        while !c
            .redis
            .dump_all()
            .iter()
            .any(|(k, _)| k == "bace-broker:token:acme")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    c.start(1).await;
    c.converge_on("acme", &own).await;
    assert_eq!(c.logins("acme"), 1, "{}", c.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_announcements_are_made_up_by_the_reconcile() {
    let mut c = Cluster::new(&["acme"]).await;
    c.start(2).await;
    let old = c.converged("acme").await;
    // A replica that stored a new token and died before announcing it: written here with the
    // store's own client, no announcement.
    let store = bace_token_broker::Store::new(&c.config.build().store.unwrap().redis).unwrap();
    let account = bace_token_broker::AccountName::new("acme").unwrap();
    let version = guard(store.versions(std::slice::from_ref(&account)))
        .await
        .unwrap()[0]
        .unwrap();
    let unannounced = bace_token_broker::Token::new(
        account,
        secrecy::SecretString::from("unannounced-token-0000000000000000000000".to_owned()),
        None,
        Duration::from_secs(3600),
        tokio::time::Instant::now(),
        std::time::SystemTime::now(),
    );
    let key = "bace_broker_store_reconcile_corrections_total{result=\"adopted\"}";
    let mut before = Vec::new();
    for r in &c.replicas {
        before.push(r.scrape().await.get(key).copied().unwrap_or(0.0));
    }
    let written = guard(store.write(&unannounced, version + 1)).await.unwrap();
    assert_eq!(
        written,
        bace_token_broker::Written::Stored {
            version: version + 1
        }
    );
    assert_eq!(c.tokens("acme").await, [old.clone(), old]);
    // The subscribers lose their connection; they reconcile when they are back.
    c.redis.kill_pubsub_clients();
    c.converge_on("acme", unannounced.expose_access()).await;
    for r in &c.replicas {
        let m = r.scrape().await;
        assert_eq!(
            m["bace_broker_store_reconcile_corrections_total{result=\"adopted\"}"], 1.0,
            "{}",
            r.name
        );
    }
    assert_eq!(c.logins("acme"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_under_a_wrong_or_rotated_key_or_moved_are_never_served() {
    let mut c = Cluster::new(&["acme", "globex"]).await;
    c.start(1).await;
    let acme = c.converged("acme").await;

    // Rotated: a replica whose key file has a new first key and the old one after it reads
    // the stored tokens (no login).
    let rotated = c.dir.path().join("rotated");
    let old_line = std::fs::read_to_string(c.dir.path().join("keys")).unwrap();
    let new_line = bace_token_broker::config::generate_key_line("k2").unwrap();
    std::fs::write(&rotated, format!("{new_line}\n{old_line}")).unwrap();
    let rotated_config = c.config.clone().store(store_of(&c.redis, &rotated));
    let mut r2 = Replica::start(Path::new(BIN), c.dir.path(), "rotated", &rotated_config);
    r2.wait_ready().await;
    assert_eq!(r2.get("acme").await.unwrap().access_token, acme);
    assert_eq!(c.logins("acme"), 1);

    // Moved: globex's record copied over acme's (same key, other account) is tampered.
    c.redis.cmd::<()>(&[
        "COPY",
        "bace-broker:token:globex",
        "bace-broker:token:acme",
        "REPLACE",
    ]);
    let mut r4 = Replica::start(Path::new(BIN), c.dir.path(), "moved", &c.config);
    r4.wait_ready().await;
    let served = r4.get("acme").await.unwrap().access_token;
    assert!(c.fake.is_valid(&served));
    assert_eq!(
        c.fake.issued_to(&served).as_deref(),
        Some(user("acme").as_str())
    );
    let m = r4.scrape().await;
    assert!(
        m["bace_broker_store_unreadable_records_total{reason=\"tampered\"}"] >= 1.0,
        "{}",
        r4.logs()
    );
    // Wrong: a replica with none of the keys cannot read them: it logs in itself, counts
    // the records, and serves its own token.
    let wrong = c.dir.path().join("wrong");
    RedisStore::write_key_file(&wrong, &["k9"]);
    let wrong_config = c.config.clone().store(store_of(&c.redis, &wrong));
    let mut r3 = Replica::start(Path::new(BIN), c.dir.path(), "wrong", &wrong_config);
    r3.wait_ready().await;
    let own = r3.get("acme").await.unwrap().access_token;
    assert!(c.fake.is_valid(&own));
    let m = r3.scrape().await;
    assert!(m["bace_broker_store_unreadable_records_total{reason=\"unknown_key\"}"] >= 1.0);

    drop((r2, r3, r4));
}
