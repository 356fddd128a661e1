//! Over-the-wire behaviour: a real tonic server and client in front of the fake BACE on
//! loopback, in real time. Synchronisation uses the fake's gate and call counters, never sleeps.

use std::{collections::HashSet, time::Duration};

use bace_token_broker::{READINESS_SERVICE, proto};
use fake_bace::{ErrorShape, Grant, RefreshStyle, Step};
use testkit::{BrokerConfig, BrokerServer, fake, fake_account, get, get_min, guard, user};
use tokio::task::JoinSet;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// Polls GetToken until the broker serves a token other than `old` (after an upstream call
/// the test saw arrive at the fake, so the wait is bounded by that call's completion).
async fn until_token_changes(broker: &BrokerServer, account: &str, old: &str) -> proto::Token {
    guard(async {
        loop {
            let token = broker.get(account).await.unwrap();
            if token.access_token != old {
                return token;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

#[tokio::test]
async fn serves_a_valid_token_from_a_form_post_password_grant() {
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    let token = broker.get("fleet-a").await.unwrap();
    assert_eq!(token.account, "fleet-a");
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(
        token.authorization,
        format!("Bearer {}", token.access_token)
    );
    assert!(fake.is_valid(&token.access_token));
    let expires = std::time::SystemTime::try_from(token.expires_at.unwrap()).unwrap();
    let fake_expires = fake.expires_at(&token.access_token).unwrap();
    let skew = expires
        .duration_since(fake_expires)
        .unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(5),
        "broker and BACE disagree on expiry by {skew:?}"
    );

    let request = fake
        .last_request(&user("fleet-a"), Grant::Password)
        .unwrap();
    assert_eq!(request.content_type, "application/x-www-form-urlencoded");
    assert_eq!(request.form["grant_type"], "password");
    assert_eq!(request.form["client_id"], "client-1");
    assert_eq!(request.form["client_secret"], "client-secret-X7");
    assert_eq!(request.form["username"], user("fleet-a"));
    assert_eq!(request.form["password"], "pw-fleet-a-Zq9");
    assert_eq!(request.bearer, None);

    // Cached: many more calls, still one login.
    for _ in 0..50 {
        assert_eq!(
            broker.get("fleet-a").await.unwrap().access_token,
            token.access_token
        );
    }
    assert_eq!(fake.total_calls(), 1);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_the_right_codes() {
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    let cases = [
        (
            "",
            Code::InvalidArgument,
            "invalid account name: account name is empty",
        ),
        ("a b", Code::InvalidArgument, "invalid account name"),
        (&*"x".repeat(200), Code::InvalidArgument, "longer than 128"),
        ("fleet-z", Code::NotFound, "unknown account \"fleet-z\""),
    ];
    for (account, code, message) in cases {
        let status = broker.get(account).await.unwrap_err();
        assert_eq!(status.code(), code, "{account:?}");
        assert!(
            status.message().contains(message),
            "{account:?}: {}",
            status.message()
        );
        let status = broker.invalidate(account, "").await.unwrap_err();
        assert_eq!(status.code(), code, "{account:?}");
    }
    let mut client = broker.client.clone();
    let status = client
        .get_token(proto::GetTokenRequest {
            account: "fleet-a".into(),
            min_validity: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("min_validity"));
    // Longer than any token can last: OUT_OF_RANGE without an upstream call.
    let before = fake.total_calls();
    let status = get_min(
        &mut client,
        "fleet-a",
        Some(Duration::from_secs(15 * 86_400)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(fake.total_calls(), before);
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_cold_callers_share_one_login() {
    let fake = fake(&["fleet-a"]).await;
    fake.hold();
    let broker = BrokerServer::start(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    // The warm-up login is held at BACE: every caller below finds the account cold.
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Password, 1)).await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(broker.new_client().await);
    }
    let mut callers = JoinSet::new();
    for i in 0..10_000 {
        let client = clients[i % clients.len()].clone();
        callers.spawn(get(client, "fleet-a"));
    }
    fake.release();
    let mut tokens = HashSet::new();
    while let Some(result) = guard(callers.join_next()).await {
        tokens.insert(result.unwrap().unwrap().access_token);
    }
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 1);
    assert_eq!(fake.total_calls(), 1);
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_accounts_times_fifty_callers_make_a_hundred_calls() {
    let names: Vec<String> = (0..100).map(|i| format!("fleet-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let fake = fake(&refs).await;
    fake.hold();
    let broker =
        BrokerServer::start(&BrokerConfig::for_fake(&fake, &refs).warmup_concurrency(100)).await;
    guard(fake.wait_for_total_calls(100)).await;
    let mut callers = JoinSet::new();
    for name in &names {
        for _ in 0..50 {
            let client = broker.client.clone();
            let name = name.clone();
            callers.spawn(async move { (get(client, &name).await, name) });
        }
    }
    fake.release();
    while let Some(joined) = guard(callers.join_next()).await {
        let (result, name) = joined.unwrap();
        assert_eq!(result.unwrap().account, name);
    }
    assert_eq!(fake.total_calls(), 100);
    for name in &names {
        assert_eq!(fake.calls(&user(name), Grant::Password), 1, "{name}");
    }
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn accounts_never_delay_each_other() {
    let fake = fake(&["slow", "fast"]).await;
    fake.script(&user("slow"), Grant::Password, [Step::Hang]);
    let broker = BrokerServer::start(&BrokerConfig::for_fake(&fake, &["slow", "fast"])).await;
    guard(fake.wait_for_calls(&user("slow"), Grant::Password, 1)).await;
    // "slow" hangs at BACE; "fast" is served all the same.
    let token = guard(broker.get("fast")).await.unwrap();
    assert!(fake.is_valid(&token.access_token));
    fake.shutdown();
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_first_caller_does_not_cancel_the_fetch() {
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    let first = broker.get("fleet-a").await.unwrap();
    fake.hold();
    // Two days of validity: more than the 24 h login token has, so callers need a refresh.
    let two_days = Some(Duration::from_secs(2 * 86_400));

    // Caller 1 starts the refresh and is dropped while BACE holds it.
    let mut client = broker.client.clone();
    let caller = tokio::spawn(async move { get_min(&mut client, "fleet-a", two_days).await });
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Refresh, 1)).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());

    // Caller 2 hits its deadline while the refresh is held.
    let mut client = broker.new_client().await;
    let mut request = tonic::Request::new(proto::GetTokenRequest {
        account: "fleet-a".into(),
        min_validity: two_days.map(|d| d.try_into().unwrap()),
    });
    request.set_timeout(Duration::from_millis(100));
    let status = client.get_token(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // Caller 3 joins the same refresh, which completes once BACE answers.
    let mut client = broker.client.clone();
    let third = tokio::spawn(async move { get_min(&mut client, "fleet-a", two_days).await });
    fake.release();
    let token = guard(third).await.unwrap().unwrap();
    assert_eq!(
        token.access_token, first.access_token,
        "BACE refresh extends the token"
    );
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Refresh), 1);
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 1);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_fetch_fails_every_waiter_at_once_with_one_call() {
    let fake = fake(&["fleet-a"]).await;
    fake.script(
        &user("fleet-a"),
        Grant::Password,
        [Step::Status(503, ErrorShape::Yii)],
    );
    fake.hold();
    let broker = BrokerServer::start(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Password, 1)).await;
    let mut callers = JoinSet::new();
    for _ in 0..100 {
        callers.spawn(get(broker.client.clone(), "fleet-a"));
    }
    fake.release();
    while let Some(result) = guard(callers.join_next()).await {
        let status = result.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "BACE is unavailable for account \"fleet-a\" (upstream error status)"
        );
    }
    // One upstream call; callers during the backoff got the error without another.
    assert_eq!(fake.total_calls(), 1);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn tokens_stay_valid_across_lifetimes_by_refreshing_not_logging_in() {
    let fake = fake(&[]).await;
    let mut account = fake_account("fleet-a");
    account.login_lifetime = Duration::from_secs(4);
    account.refresh_lifetime = Duration::from_secs(4);
    fake.add_account(account);
    let config = BrokerConfig::for_fake(&fake, &["fleet-a"])
        .lifetime_fraction(0.4)
        .expiry_margin(Duration::from_secs(1));
    let broker = BrokerServer::ready(&config).await;
    let first = broker.get("fleet-a").await.unwrap();
    // Several lifetimes' worth of refreshes (each extends the same token, BACE style).
    for n in 1..=4 {
        guard(fake.wait_for_calls(&user("fleet-a"), Grant::Refresh, n)).await;
        let token = broker.get("fleet-a").await.unwrap();
        assert!(fake.is_valid(&token.access_token), "refresh {n}");
        assert_eq!(
            token.access_token, first.access_token,
            "BACE refresh keeps the token"
        );
    }
    assert_eq!(
        fake.calls(&user("fleet-a"), Grant::Password),
        1,
        "refresh preferred over login"
    );
    let request = fake.last_request(&user("fleet-a"), Grant::Refresh).unwrap();
    assert_eq!(request.content_type, "application/x-www-form-urlencoded");
    assert_eq!(request.form["grant_type"], "refresh_token");
    assert_eq!(request.form["client_id"], "client-1");
    assert_eq!(request.form["client_secret"], "client-secret-X7");
    assert!(!request.form["refresh_token"].is_empty());
    assert_eq!(request.bearer.as_deref(), Some(first.access_token.as_str()));
    // Each refresh is planned when the one before it has landed: with 4 seen by BACE, at
    // least 3 have completed and been counted.
    let m = broker.scrape().await;
    let ok = |grant: &str| {
        m[&format!(
            "bace_broker_upstream_requests_total{{account=\"fleet-a\",grant=\"{grant}\",outcome=\"ok\"}}"
        )]
    };
    assert_eq!(ok("password"), 1.0);
    let refreshes = ok("refresh_token");
    assert!(
        (3.0..=fake.calls(&user("fleet-a"), Grant::Refresh) as f64).contains(&refreshes),
        "{refreshes}"
    );
    assert_eq!(
        m["bace_broker_get_token_total{account=\"fleet-a\",code=\"OK\"}"],
        5.0
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn oauth2_style_refresh_answers_rotate_the_token() {
    let fake = fake(&[]).await;
    for (name, as_string) in [("rot-num", false), ("rot-str", true)] {
        let mut account = fake_account(name);
        account.login_lifetime = Duration::from_secs(4);
        account.refresh_lifetime = Duration::from_secs(4);
        account.refresh_style = RefreshStyle::OAuth2 {
            rotate_refresh_token: !as_string,
            expires_in_as_string: as_string,
        };
        fake.add_account(account);
    }
    let config = BrokerConfig::for_fake(&fake, &["rot-num", "rot-str"])
        .lifetime_fraction(0.4)
        .expiry_margin(Duration::from_secs(1));
    let broker = BrokerServer::ready(&config).await;
    for name in ["rot-num", "rot-str"] {
        let first = broker.get(name).await.unwrap();
        let seen = fake.calls(&user(name), Grant::Refresh);
        guard(fake.wait_for_calls(&user(name), Grant::Refresh, seen + 1)).await;
        let now = until_token_changes(&broker, name, &first.access_token).await;
        assert!(fake.is_valid(&now.access_token), "{name}");
        assert!(
            !fake.is_valid(&first.access_token),
            "{name}: old token revoked by BACE"
        );
        assert_eq!(fake.calls(&user(name), Grant::Password), 1, "{name}");
    }
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_declined_refresh_falls_back_to_a_login() {
    let fake = fake(&[]).await;
    let mut account = fake_account("fleet-a");
    account.login_lifetime = Duration::from_secs(4);
    fake.add_account(account);
    fake.script(
        &user("fleet-a"),
        Grant::Refresh,
        [Step::Status(401, ErrorShape::Yii)],
    );
    let config = BrokerConfig::for_fake(&fake, &["fleet-a"])
        .lifetime_fraction(0.4)
        .expiry_margin(Duration::from_secs(1));
    let broker = BrokerServer::ready(&config).await;
    let first = broker.get("fleet-a").await.unwrap();
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Password, 2)).await;
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Refresh), 1);
    let token = until_token_changes(&broker, "fleet-a", &first.access_token).await;
    assert!(fake.is_valid(&token.access_token));
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_refresh_falls_back_to_a_login_when_a_caller_needs_a_token() {
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    let first = broker.get("fleet-a").await.unwrap();
    fake.script(
        &user("fleet-a"),
        Grant::Refresh,
        [Step::Status(500, ErrorShape::OAuth2)],
    );
    // Needs more than the 24 h login token has left: refresh (fails), then login.
    let mut client = broker.client.clone();
    let token = get_min(&mut client, "fleet-a", Some(Duration::from_secs(86_400)))
        .await
        .unwrap_err();
    // A fresh 24 h login token cannot satisfy 24 h + margin either: OUT_OF_RANGE, but the
    // account now holds a new token from the fallback login.
    assert_eq!(token.code(), Code::OutOfRange);
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Refresh), 1);
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 2);
    let now = broker.get("fleet-a").await.unwrap();
    assert_ne!(now.access_token, first.access_token);
    // Asking again: the fresh login token can be extended by a refresh (BACE: 14 days).
    let long = get_min(&mut client, "fleet-a", Some(Duration::from_secs(86_400)))
        .await
        .unwrap();
    assert_eq!(long.access_token, now.access_token);
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Refresh), 2);
    // Now cached.
    get_min(&mut client, "fleet-a", Some(Duration::from_secs(86_400)))
        .await
        .unwrap();
    assert_eq!(fake.total_calls(), 4);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn invalidate_replaces_the_current_token_once_and_respects_the_cooldown() {
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(
        &BrokerConfig::for_fake(&fake, &["fleet-a"]).invalidate_cooldown(Duration::from_secs(3600)),
    )
    .await;
    let old = broker.get("fleet-a").await.unwrap();
    fake.revoke(&old.access_token); // BACE answered the caller 401 with it.

    // Fifty callers report the same token at once: one login, all get the new token.
    fake.hold();
    let mut callers = broker.invalidations(50, "fleet-a", &old.access_token);
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Password, 2)).await;
    fake.release();
    let mut new_tokens = HashSet::new();
    while let Some(result) = guard(callers.join_next()).await {
        let answer = result.unwrap().unwrap();
        let token = answer.token.unwrap();
        assert!(answer.invalidated || token.access_token != old.access_token);
        new_tokens.insert(token.access_token);
    }
    assert_eq!(new_tokens.len(), 1);
    let new = new_tokens.into_iter().next().unwrap();
    assert_ne!(new, old.access_token);
    assert!(fake.is_valid(&new));
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 2);

    // The old token again: already replaced, no upstream call.
    let answer = broker
        .invalidate("fleet-a", &old.access_token)
        .await
        .unwrap();
    assert!(!answer.invalidated);
    assert_eq!(answer.token.unwrap().access_token, new);
    // The new token, within the cooldown: not invalidated, current token, no call.
    let answer = broker.invalidate("fleet-a", &new).await.unwrap();
    assert!(!answer.invalidated);
    assert_eq!(answer.token.unwrap().access_token, new);
    let answer = broker.invalidate("fleet-a", "").await.unwrap();
    assert!(!answer.invalidated);
    assert_eq!(fake.total_calls(), 2);
    // GetToken serves the new token.
    assert_eq!(broker.get("fleet-a").await.unwrap().access_token, new);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn invalidate_with_an_empty_token_relogs_after_the_cooldown() {
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(
        &BrokerConfig::for_fake(&fake, &["fleet-a"]).invalidate_cooldown(Duration::ZERO),
    )
    .await;
    let first = broker.get("fleet-a").await.unwrap();
    let answer = broker.invalidate("fleet-a", "").await.unwrap();
    assert!(answer.invalidated);
    let second = answer.token.unwrap();
    assert_ne!(second.access_token, first.access_token);
    // No cooldown configured: the next report of the current token logs in again.
    let answer = broker
        .invalidate("fleet-a", &second.access_token)
        .await
        .unwrap();
    assert!(answer.invalidated);
    assert_ne!(answer.token.unwrap().access_token, second.access_token);
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 3);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn an_outage_keeps_serving_the_cached_token_and_fails_fast_without_one() {
    let fake = fake(&["fleet-a", "fleet-b"]).await;
    // fleet-b never gets a token: BACE hangs for it from the start.
    fake.script(&user("fleet-b"), Grant::Password, [Step::Hang]);
    let config = BrokerConfig::for_fake(&fake, &["fleet-a", "fleet-b"])
        .upstream_timeout(Duration::from_millis(300))
        .backoff_initial(Duration::from_secs(3600))
        .backoff_max(Duration::from_secs(3600));
    let broker = BrokerServer::ready(&config).await;
    let cached = broker.get("fleet-a").await.unwrap();
    fake.set_outage(Some(Step::Status(503, ErrorShape::Yii)));
    for _ in 0..20 {
        assert_eq!(
            broker.get("fleet-a").await.unwrap().access_token,
            cached.access_token
        );
    }
    // fleet-b: the warm-up login timed out; callers get UNAVAILABLE from the backoff at once.
    let calls = fake.calls(&user("fleet-b"), Grant::Password);
    let mut callers = JoinSet::new();
    for _ in 0..100 {
        callers.spawn(get(broker.client.clone(), "fleet-b"));
    }
    while let Some(result) = guard(callers.join_next()).await {
        let status = result.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "BACE is unavailable for account \"fleet-b\" (upstream timeout)"
        );
    }
    assert_eq!(
        fake.calls(&user("fleet-b"), Grant::Password),
        calls,
        "no call during the backoff"
    );
    assert_eq!(calls, 1);
    fake.shutdown();
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn rejected_credentials_fail_precondition_and_are_not_retried_soon() {
    let fake = fake(&["fleet-a", "fleet-b"]).await;
    fake.set_password(&user("fleet-a"), "changed-at-bace");
    let mut b = fake_account("fleet-b");
    b.error_shape = ErrorShape::OAuth2;
    b.password = "changed-too".into();
    fake.add_account(b);
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a", "fleet-b"])).await;
    for account in ["fleet-a", "fleet-b"] {
        for _ in 0..20 {
            let status = broker.get(account).await.unwrap_err();
            assert_eq!(status.code(), Code::FailedPrecondition, "{account}");
            assert!(
                status.message().contains(&format!("\"{account}\"")),
                "{}",
                status.message()
            );
            assert!(
                status.message().contains("rejected"),
                "{}",
                status.message()
            );
        }
        let status = broker.invalidate(account, "").await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            fake.calls(&user(account), Grant::Password),
            1,
            "{account}: one login only"
        );
    }
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_and_oversized_answers_are_clear_errors_and_recover() {
    let fake = fake(&["fleet-a"]).await;
    fake.script(
        &user("fleet-a"),
        Grant::Password,
        [
            Step::Malformed,
            Step::Oversized,
            Step::Body(200, r#"{"access_token": 42}"#.into()),
            Step::Body(200, r#"{"refreshed": true}"#.into()),
            Step::Body(200, r#"{"access_token": "abc", "expires_in": 0}"#.into()),
        ],
    );
    let config = BrokerConfig::for_fake(&fake, &["fleet-a"])
        .backoff_initial(Duration::from_millis(1))
        .backoff_max(Duration::from_millis(1));
    let broker = BrokerServer::ready(&config).await;
    // The background retries walk through the script; then the normal answer is accepted.
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Password, 6)).await;
    let token = guard(async {
        loop {
            match broker.get("fleet-a").await {
                Ok(token) => return token,
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable);
                    assert_eq!(
                        status.message(),
                        "BACE is unavailable for account \"fleet-a\" (invalid upstream answer)"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    })
    .await;
    assert!(fake.is_valid(&token.access_token));
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn health_liveness_from_start_readiness_after_warm_up_and_off_on_shutdown() {
    let fake = fake(&["fleet-a"]).await;
    fake.hold();
    let mut broker = BrokerServer::start(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Password, 1)).await;
    let mut health = broker.health.clone();
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let status = |r: tonic_health::pb::HealthCheckResponse| r.status;
    // Warm-up is held at BACE: alive, not ready.
    assert_eq!(
        status(health.check(check("")).await.unwrap().into_inner()),
        ServingStatus::Serving as i32
    );
    assert_eq!(
        status(
            health
                .check(check(READINESS_SERVICE))
                .await
                .unwrap()
                .into_inner()
        ),
        ServingStatus::NotServing as i32
    );
    fake.release();
    broker
        .wait_status(READINESS_SERVICE, ServingStatus::Serving)
        .await;

    // A call in flight during shutdown completes (drain); readiness goes NOT_SERVING first.
    let mut watch = health
        .watch(check(READINESS_SERVICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    fake.hold();
    let mut client = broker.client.clone();
    let in_flight = tokio::spawn(async move {
        get_min(
            &mut client,
            "fleet-a",
            Some(Duration::from_secs(2 * 86_400)),
        )
        .await
    });
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Refresh, 1)).await;
    broker.begin_stop();
    assert_eq!(
        guard(watch.message()).await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    fake.release();
    let token = guard(in_flight).await.unwrap().unwrap();
    assert!(fake.is_valid(&token.access_token));
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    let mut client = ServerReflectionClient::new(testkit::channel(broker.addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&READINESS_SERVICE.to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_count_calls_upstream_requests_waiters_and_token_state() {
    let fake = fake(&["fleet-a", "fleet-b", "fleet-c"]).await;
    fake.set_password(&user("fleet-b"), "rotated");
    let config = BrokerConfig::for_fake(&fake, &["fleet-a", "fleet-b", "fleet-c"])
        .invalidate_cooldown(Duration::from_secs(3600));
    let broker = BrokerServer::ready(&config).await;
    // fleet-c's token is invalidated while BACE holds the new login: callers join that login.
    fake.hold();
    let client = broker.client.clone();
    let invalidation = tokio::spawn(async move {
        let mut client = client;
        client
            .invalidate(proto::InvalidateRequest {
                account: "fleet-c".into(),
                access_token: String::new(),
            })
            .await
    });
    guard(fake.wait_for_calls(&user("fleet-c"), Grant::Password, 2)).await;
    let mut callers = JoinSet::new();
    for _ in 0..10 {
        callers.spawn(get(broker.client.clone(), "fleet-c"));
    }
    let waiters = "bace_broker_singleflight_waiters_total{account=\"fleet-c\"}";
    guard(async {
        while broker.scrape().await.get(waiters).copied().unwrap_or(0.0) < 10.0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    fake.release();
    while let Some(r) = guard(callers.join_next()).await {
        r.unwrap().unwrap();
    }
    assert!(
        guard(invalidation)
            .await
            .unwrap()
            .unwrap()
            .into_inner()
            .invalidated
    );

    for _ in 0..5 {
        broker.get("fleet-a").await.unwrap();
    }
    for _ in 0..2 {
        broker.get("nope").await.unwrap_err();
    }
    broker.get("").await.unwrap_err();
    broker.get("fleet-b").await.unwrap_err();
    let old = broker.get("fleet-a").await.unwrap().access_token;
    assert!(
        broker
            .invalidate("fleet-a", &old)
            .await
            .unwrap()
            .invalidated
    );
    let new = broker.get("fleet-a").await.unwrap().access_token;
    assert!(
        !broker
            .invalidate("fleet-a", &old)
            .await
            .unwrap()
            .invalidated
    );
    assert!(
        !broker
            .invalidate("fleet-a", &new)
            .await
            .unwrap()
            .invalidated
    );

    let m = broker.scrape().await;
    let at = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("no sample {k}"));
    assert_eq!(
        at("bace_broker_get_token_total{account=\"fleet-a\",code=\"OK\"}"),
        7.0
    );
    assert_eq!(
        at("bace_broker_get_token_total{account=\"fleet-c\",code=\"OK\"}"),
        10.0
    );
    assert_eq!(
        at("bace_broker_get_token_total{account=\"(unknown)\",code=\"NOT_FOUND\"}"),
        2.0
    );
    assert_eq!(
        at("bace_broker_get_token_total{account=\"(unknown)\",code=\"INVALID_ARGUMENT\"}"),
        1.0
    );
    assert_eq!(
        at("bace_broker_get_token_total{account=\"fleet-b\",code=\"FAILED_PRECONDITION\"}"),
        1.0
    );
    assert_eq!(
        at("bace_broker_invalidate_total{account=\"fleet-a\",outcome=\"invalidated\"}"),
        1.0
    );
    assert_eq!(
        at("bace_broker_invalidate_total{account=\"fleet-a\",outcome=\"already_replaced\"}"),
        1.0
    );
    assert_eq!(
        at("bace_broker_invalidate_total{account=\"fleet-a\",outcome=\"cooldown\"}"),
        1.0
    );
    let up = |a: &str, g: &str, o: &str| {
        at(&format!(
            "bace_broker_upstream_requests_total{{account=\"{a}\",grant=\"{g}\",outcome=\"{o}\"}}"
        ))
    };
    assert_eq!(up("fleet-a", "password", "ok"), 2.0);
    assert_eq!(up("fleet-b", "password", "rejected"), 1.0);
    assert_eq!(up("fleet-c", "password", "ok"), 2.0);
    assert_eq!(
        at("bace_broker_invalidate_total{account=\"fleet-c\",outcome=\"invalidated\"}"),
        1.0
    );
    assert_eq!(
        at("bace_broker_upstream_request_duration_seconds_count{grant=\"password\"}"),
        fake.calls(&user("fleet-a"), Grant::Password) as f64
            + fake.calls(&user("fleet-b"), Grant::Password) as f64
            + fake.calls(&user("fleet-c"), Grant::Password) as f64
    );
    assert_eq!(at(waiters), 10.0);
    assert_eq!(at("bace_broker_token_valid{account=\"fleet-a\"}"), 1.0);
    assert_eq!(at("bace_broker_token_valid{account=\"fleet-b\"}"), 0.0);
    assert!(!m.contains_key("bace_broker_token_expiry_timestamp_seconds{account=\"fleet-b\"}"));
    let expiry = at("bace_broker_token_expiry_timestamp_seconds{account=\"fleet-a\"}");
    let bace_expiry = fake
        .expires_at(&new)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expiry - bace_expiry).abs() < 5.0,
        "{expiry} vs {bace_expiry}"
    );
    broker.stop().await.unwrap();
}
