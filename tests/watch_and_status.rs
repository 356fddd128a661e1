//! WatchToken, ListAccounts (and `status`), and verified Invalidate, over the wire against
//! the fake BACE.

use std::time::Duration;

use bace_token_broker::proto;
use fake_bace::{ErrorShape, FakeBace, Grant, Step};
use testkit::{BrokerConfig, BrokerServer, fake, fake_account, get_min, guard, user};
use tokio::task::JoinSet;
use tonic::Code;

async fn next_token(stream: &mut tonic::Streaming<proto::WatchTokenResponse>) -> proto::Token {
    guard(stream.message())
        .await
        .expect("stream ok")
        .expect("stream open")
        .token
        .expect("token")
}

fn expiry(t: &proto::Token) -> std::time::SystemTime {
    t.expires_at.unwrap().try_into().unwrap()
}

#[tokio::test]
async fn watch_sends_the_current_token_then_each_refresh() {
    let fake = fake(&[]).await;
    let mut account = fake_account("fleet-a");
    account.login_lifetime = Duration::from_secs(4);
    account.refresh_lifetime = Duration::from_secs(4);
    fake.add_account(account);
    let config = BrokerConfig::for_fake(&fake, &["fleet-a"])
        .lifetime_fraction(0.4)
        .expiry_margin(Duration::from_secs(1));
    let broker = BrokerServer::ready(&config).await;
    let current = broker.get("fleet-a").await.unwrap();
    let mut stream = broker.watch("fleet-a").await;
    let first = next_token(&mut stream).await;
    assert_eq!(first.access_token, current.access_token);
    // Each refresh (BACE extends the same token) arrives as a new expiry.
    let mut last = first;
    for _ in 0..2 {
        let next = next_token(&mut stream).await;
        assert_eq!(next.access_token, last.access_token);
        assert!(expiry(&next) > expiry(&last));
        assert!(fake.is_valid(&next.access_token));
        last = next;
    }
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 1);

    // Bad requests.
    let mut client = broker.new_client().await;
    let status = client
        .watch_token(proto::WatchTokenRequest {
            account: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .watch_token(proto::WatchTokenRequest { account: "".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_cold_account_is_sent_its_first_token_after_the_login() {
    let fake = fake(&["fleet-a"]).await;
    fake.script(
        &user("fleet-a"),
        Grant::Password,
        [Step::Status(503, ErrorShape::Yii)],
    );
    let config = BrokerConfig::for_fake(&fake, &["fleet-a"])
        .backoff_initial(Duration::from_secs(3600))
        .backoff_max(Duration::from_secs(3600))
        .invalidate_cooldown(Duration::ZERO);
    let broker = BrokerServer::ready(&config).await;
    assert_eq!(
        broker.get("fleet-a").await.unwrap_err().code(),
        Code::Unavailable
    );
    let mut stream = broker.watch("fleet-a").await;
    // No token: the stream waits. A forced login (Invalidate) brings one.
    let answer = broker.invalidate("fleet-a", "").await.unwrap();
    let token = next_token(&mut stream).await;
    assert_eq!(token.access_token, answer.token.unwrap().access_token);
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_watchers_see_a_rotation_without_upstream_calls_and_leave_nothing() {
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    let old = broker.get("fleet-a").await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(broker.new_client().await);
    }
    let mut watchers = JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(5000);
    for i in 0..5000 {
        let mut client = clients[i % clients.len()].clone();
        let ready = ready_tx.clone();
        watchers.spawn(async move {
            let mut stream = client
                .watch_token(proto::WatchTokenRequest {
                    account: "fleet-a".into(),
                })
                .await
                .unwrap()
                .into_inner();
            let first = stream.message().await.unwrap().unwrap().token.unwrap();
            ready.send(()).await.unwrap();
            let second = stream.message().await.unwrap().unwrap().token.unwrap();
            (first.access_token, second.access_token)
        });
    }
    for _ in 0..5000 {
        guard(ready_rx.recv()).await.unwrap();
    }
    let gauge = "bace_broker_watchers{account=\"fleet-a\"}";
    assert_eq!(broker.scrape().await[gauge], 5000.0);
    let calls = fake.total_calls();
    let answer = broker
        .invalidate("fleet-a", &old.access_token)
        .await
        .unwrap();
    let new = answer.token.unwrap().access_token;
    while let Some(result) = guard(watchers.join_next()).await {
        let (first, second) = result.unwrap();
        assert_eq!(first, old.access_token);
        assert_eq!(second, new);
    }
    assert_eq!(
        fake.total_calls(),
        calls + 1,
        "only the invalidation's login"
    );
    // Every watcher is gone: nothing is left subscribed.
    drop(clients);
    guard(async {
        while broker.scrape().await[gauge] != 0.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn watchers_end_cleanly_on_shutdown() {
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    let mut stream = broker.watch("fleet-a").await;
    next_token(&mut stream).await;
    let stopped = tokio::spawn(broker.stop());
    assert!(
        guard(stream.message()).await.unwrap().is_none(),
        "stream ends with OK"
    );
    guard(stopped).await.unwrap().unwrap();
}

fn state_of(list: &proto::ListAccountsResponse, account: &str) -> proto::AccountStatus {
    list.accounts
        .iter()
        .find(|a| a.account == account)
        .cloned()
        .unwrap_or_else(|| panic!("{account} not listed"))
}

async fn list(broker: &BrokerServer) -> proto::ListAccountsResponse {
    broker
        .client
        .clone()
        .list_accounts(proto::ListAccountsRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn list_accounts_reflects_each_state() {
    let fake = fake(&["healthy", "degraded", "down", "rejected", "busy"]).await;
    fake.set_password(&user("rejected"), "changed");
    fake.script(
        &user("down"),
        Grant::Password,
        [Step::Status(503, ErrorShape::Yii)],
    );
    let names = ["healthy", "degraded", "down", "rejected", "busy"];
    let config = BrokerConfig::for_fake(&fake, &names)
        .backoff_initial(Duration::from_secs(3600))
        .backoff_max(Duration::from_secs(3600));
    let broker = BrokerServer::ready(&config).await;
    // "degraded": its refresh fails (a caller asking for two days makes the broker try).
    fake.script(
        &user("degraded"),
        Grant::Refresh,
        [Step::Status(503, ErrorShape::Yii)],
    );
    fake.script(
        &user("degraded"),
        Grant::Password,
        [Step::Status(503, ErrorShape::Yii)],
    );
    let mut client = broker.client.clone();
    let status = get_min(
        &mut client,
        "degraded",
        Some(Duration::from_secs(2 * 86_400)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    // "busy": a login in progress, held at BACE.
    fake.hold();
    let b = broker.client.clone();
    let busy = tokio::spawn(async move {
        let mut b = b;
        b.invalidate(proto::InvalidateRequest {
            account: "busy".into(),
            access_token: String::new(),
        })
        .await
    });
    guard(fake.wait_for_calls(&user("busy"), Grant::Password, 2)).await;

    let l = list(&broker).await;
    let names_listed: Vec<&str> = l.accounts.iter().map(|a| a.account.as_str()).collect();
    assert_eq!(
        names_listed,
        ["busy", "degraded", "down", "healthy", "rejected"]
    );
    use proto::AccountState as S;
    let healthy = state_of(&l, "healthy");
    assert_eq!(healthy.state, S::Ready as i32);
    assert_eq!(healthy.consecutive_failures, 0);
    assert!(healthy.last_error.is_empty());
    assert!(healthy.expires_at.is_some() && healthy.next_refresh_at.is_some());
    assert!(healthy.last_success_at.is_some());
    let survives = Duration::try_from(healthy.survives_outage_for.unwrap()).unwrap();
    assert!(survives > Duration::from_secs(86_000) && survives <= Duration::from_secs(86_400));

    let degraded = state_of(&l, "degraded");
    assert_eq!(degraded.state, S::Degraded as i32, "{degraded:?}");
    assert_eq!(degraded.consecutive_failures, 1);
    assert_eq!(degraded.last_error, "upstream error status");
    assert!(degraded.survives_outage_for.unwrap().seconds > 0);

    let down = state_of(&l, "down");
    assert_eq!(down.state, S::Failing as i32);
    assert_eq!(down.last_error, "upstream error status");
    assert_eq!(down.survives_outage_for.unwrap().seconds, 0);
    assert!(down.expires_at.is_none() && down.last_success_at.is_none());

    let rejected = state_of(&l, "rejected");
    assert_eq!(rejected.state, S::Rejected as i32);
    assert_eq!(rejected.last_error, "credentials rejected");
    assert!(
        rejected.next_refresh_at.is_some(),
        "the long backoff's retry is planned"
    );

    assert_eq!(state_of(&l, "busy").state, S::Refreshing as i32);

    // The same figures as metrics.
    let m = broker.scrape().await;
    let state = |a: &str, s: &str| {
        m[&format!("bace_broker_account_state{{account=\"{a}\",state=\"{s}\"}}")]
    };
    assert_eq!(state("healthy", "ready"), 1.0);
    assert_eq!(state("healthy", "failing"), 0.0);
    assert_eq!(state("degraded", "degraded"), 1.0);
    assert_eq!(state("down", "failing"), 1.0);
    assert_eq!(state("rejected", "rejected"), 1.0);
    assert_eq!(state("busy", "refreshing"), 1.0);
    assert_eq!(
        m["bace_broker_survives_outage_seconds{account=\"down\"}"],
        0.0
    );
    assert!(m["bace_broker_survives_outage_seconds{account=\"healthy\"}"] > 86_000.0);

    // The status command renders it.
    let table = bace_token_broker::status_table(&l.accounts, std::time::SystemTime::now());
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ACCOUNT") && lines[0].contains("SURVIVES OUTAGE"));
    assert!(lines.iter().any(|l| l.starts_with("rejected")
        && l.contains("REJECTED")
        && l.contains("credentials rejected")));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("healthy") && l.contains("READY") && l.contains("in 23h"))
    );

    fake.release();
    guard(busy).await.unwrap().unwrap();
    broker.stop().await.unwrap();
}

/// A broker for fleet-a that verifies reported tokens at the fake's API, with no cooldown.
async fn with_verify_url() -> (FakeBace, BrokerServer) {
    let fake = fake(&["fleet-a"]).await;
    let config = BrokerConfig::for_fake(&fake, &["fleet-a"])
        .verify_url(fake.api_url())
        .invalidate_cooldown(Duration::ZERO);
    let broker = BrokerServer::ready(&config).await;
    (fake, broker)
}

#[tokio::test]
async fn invalidate_verifies_the_token_first_when_a_verify_url_is_set() {
    let (fake, broker) = with_verify_url().await;
    let token = broker.get("fleet-a").await.unwrap();

    // BACE accepts the token: the caller's 401 was a permission problem. Twenty callers, one
    // check, no login.
    let mut callers = broker.invalidations(20, "fleet-a", &token.access_token);
    while let Some(answer) = guard(callers.join_next()).await {
        let answer = answer.unwrap().unwrap();
        assert!(!answer.invalidated);
        assert_eq!(answer.outcome, proto::InvalidateOutcome::TokenValid as i32);
        assert_eq!(answer.token.unwrap().access_token, token.access_token);
    }
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 1);
    let m = broker.scrape().await;
    let verify = |o: &str| {
        m.get(&format!("bace_broker_upstream_requests_total{{account=\"fleet-a\",grant=\"verify\",outcome=\"{o}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    assert!(verify("ok") >= 1.0 && verify("ok") <= 20.0);
    assert_eq!(
        m["bace_broker_invalidate_total{account=\"fleet-a\",outcome=\"token_valid\"}"],
        20.0
    );

    // BACE refuses it: invalidated, new login.
    fake.revoke(&token.access_token);
    let answer = broker
        .invalidate("fleet-a", &token.access_token)
        .await
        .unwrap();
    assert!(answer.invalidated);
    assert_eq!(answer.outcome, proto::InvalidateOutcome::Invalidated as i32);
    let new = answer.token.unwrap().access_token;
    assert_ne!(new, token.access_token);
    assert!(fake.is_valid(&new));
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 2);
    // The old token again: already replaced, no check, no login.
    let answer = broker
        .invalidate("fleet-a", &token.access_token)
        .await
        .unwrap();
    assert_eq!(
        answer.outcome,
        proto::InvalidateOutcome::AlreadyReplaced as i32
    );
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 2);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_verified_invalidation_respects_the_rejected_credentials_backoff() {
    let (fake, broker) = with_verify_url().await;
    let token = broker.get("fleet-a").await.unwrap();
    // The password changes at BACE and the token is revoked: the first report verifies (401),
    // logs in and is rejected; later reports wait out the backoff without any login.
    fake.set_password(&user("fleet-a"), "rotated");
    fake.revoke(&token.access_token);
    for _ in 0..5 {
        let status = broker.invalidate("fleet-a", "").await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
    }
    assert_eq!(
        fake.calls(&user("fleet-a"), Grant::Password),
        2,
        "one rejected login only"
    );
    let listed = list(&broker).await;
    assert_eq!(
        state_of(&listed, "fleet-a").state,
        proto::AccountState::Rejected as i32
    );
    broker.stop().await.unwrap();
}
