//! The broker core in paused time, with a scripted in-memory upstream: refresh schedules over
//! days of simulated time, backoff steps, credential throttling, cooldowns and shutdown.

use std::sync::Arc;

use bace_token_broker::{Broker, BrokerError, Grant, InvalidateOutcome, UpstreamError};
use testkit::{Account, Answer, BrokerConfig, ScriptedUpstream};
use tokio::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
const MARGIN: Duration = Duration::from_secs(10);

/// The account `name` of these tests (the scripted upstream never looks at its credentials).
fn account(name: &str, password: &str) -> Account {
    Account::new(name, "c", "s", format!("u-{name}"), password)
        .token_url("http://127.0.0.1:9/oauth2/token")
}

/// A config for `accounts`.
fn config(accounts: &[&str]) -> BrokerConfig {
    accounts.iter().fold(BrokerConfig::new(), |config, a| {
        config.account(account(a, "p"))
    })
}

/// A broker with its refresher running, warmed up.
async fn start(config: BrokerConfig) -> (Broker, Arc<ScriptedUpstream>) {
    start_with(config, Arc::new(ScriptedUpstream::default())).await
}

async fn start_with(
    config: BrokerConfig,
    upstream: Arc<ScriptedUpstream>,
) -> (Broker, Arc<ScriptedUpstream>) {
    let (broker, refresher) = Broker::new(&config.build(), upstream.clone());
    tokio::spawn(refresher.run());
    broker.warm_up().await;
    (broker, upstream)
}

/// Whether `elapsed` is the default refresh point of a token living `lifetime`: 0.6 of it,
/// give or take the ±5 % jitter.
fn at_refresh_point(elapsed: Duration, lifetime: Duration) -> bool {
    elapsed >= lifetime.mul_f64(0.57) && elapsed <= lifetime.mul_f64(0.63)
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn tokens_stay_valid_for_sixty_days_by_refreshing_at_the_lifetime_fraction() {
    let (broker, bace) = start(config(&["fleet-a"])).await;
    let first = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    for _ in 0..(60 * 24) {
        tokio::time::sleep(HOUR).await;
        let token = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
        assert!(token.valid_for(Instant::now(), MARGIN));
        assert_eq!(
            token.fingerprint(),
            first.fingerprint(),
            "refreshes extend the same token"
        );
    }
    assert_eq!(
        bace.calls("fleet-a", Grant::Password).len(),
        1,
        "one login in 60 days"
    );
    let refreshes = bace.calls("fleet-a", Grant::Refresh);
    // First refresh at 0.6 of the 24 h login token, then every 0.6 of 14 days, ±5 % jitter.
    let first_refresh = refreshes[0] - bace.calls("fleet-a", Grant::Password)[0];
    assert!(at_refresh_point(first_refresh, DAY), "{first_refresh:?}");
    for gap in gaps(&refreshes) {
        let lifetime = 14 * DAY;
        assert!(at_refresh_point(gap, lifetime), "{gap:?}");
    }
    assert!(
        (7..=8).contains(&refreshes.len()),
        "{} refreshes",
        refreshes.len()
    );
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn refresh_times_of_accounts_warmed_together_are_spread_by_jitter() {
    let names: Vec<String> = (0..50).map(|i| format!("fleet-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (broker, bace) = start(config(&refs)).await;
    tokio::time::sleep(DAY).await;
    let mut firsts: Vec<Instant> = refs
        .iter()
        .map(|a| bace.calls(a, Grant::Refresh)[0])
        .collect();
    firsts.sort();
    firsts.dedup();
    assert!(
        firsts.len() > 40,
        "refreshes not spread: {} distinct instants",
        firsts.len()
    );
    let spread = *firsts.last().unwrap() - firsts[0];
    assert!(
        spread > Duration::from_secs(600) && spread <= DAY.mul_f64(0.06),
        "{spread:?}"
    );
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_outage_is_retried_with_capped_backoff_one_call_per_step_however_many_callers() {
    let config = config(&["fleet-a"])
        .backoff_initial(Duration::from_secs(1))
        .backoff_max(Duration::from_secs(60));
    let (broker, bace) = start(config).await;
    let token = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    bace.outage(Some(Answer::Fail(UpstreamError::Status { status: 503 })));
    // Refreshes fail from the start (retried with backoff for hours); watch the last ten
    // minutes the token is served and ten minutes after, with 100 callers every second.
    let last_good = token.expires_at() - MARGIN;
    let window_start = last_good - Duration::from_secs(600);
    tokio::time::sleep_until(window_start).await;
    let mut served = 0u32;
    let mut unavailable = 0u32;
    while Instant::now() < last_good + Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let b = broker.clone();
                tokio::spawn(async move { b.get_token("fleet-a", Duration::ZERO).await })
            })
            .collect();
        for c in callers {
            match c.await.unwrap() {
                Ok(t) => {
                    assert!(t.valid_for(Instant::now(), MARGIN));
                    served += 1;
                }
                Err(BrokerError::Unavailable { reason, .. }) => {
                    assert_eq!(reason, "upstream error status");
                    unavailable += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert!(
        served > 0 && unavailable > 0,
        "{served} served, {unavailable} failed"
    );
    // One backoff step is one attempt (a refresh, and a login fallback once the token is no
    // longer served: both in the same instant). Steps grow to the 60 s cap and never come
    // closer than half the initial step, however many callers wait. The steps: the times of
    // every request (all fleet-a's), but the warm-up login.
    let mut steps: Vec<Instant> = Grant::ALL
        .into_iter()
        .flat_map(|grant| bace.calls("fleet-a", grant))
        .collect();
    steps.sort();
    steps.remove(0);
    steps.dedup();
    let in_window = steps.iter().filter(|t| **t >= window_start).count();
    assert!(
        in_window <= 20 * 60 / 30 + 2,
        "{in_window} steps in 20 minutes"
    );
    let g = gaps(&steps);
    assert!(g.iter().all(|g| *g >= Duration::from_millis(500)), "{g:?}");
    assert!(g.iter().all(|g| *g <= Duration::from_secs(60)), "{g:?}");
    assert!(
        g[..4].windows(2).all(|w| w[1] > w[0] / 2),
        "backoff grows: {:?}",
        &g[..4]
    );
    // Upstream back: the next step recovers, callers are served again.
    bace.outage(None);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(broker.get_token("fleet-a", Duration::ZERO).await.is_ok());
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_background_refresh_is_retried_before_the_token_stops_being_served() {
    let config = config(&["fleet-a"])
        .backoff_initial(Duration::from_secs(600))
        .backoff_max(HOUR);
    let (broker, bace) = start(config).await;
    let token = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    // Every refresh fails until 30 minutes before the token expires.
    bace.outage(Some(Answer::Fail(UpstreamError::Timeout)));
    tokio::time::sleep_until(token.expires_at() - Duration::from_secs(1800)).await;
    bace.outage(None);
    tokio::time::sleep(Duration::from_secs(1790)).await;
    let now = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    assert_eq!(now.fingerprint(), token.fingerprint());
    assert!(
        now.expires_at() > token.expires_at() + DAY,
        "extended by a refresh"
    );
    assert_eq!(
        bace.calls("fleet-a", Grant::Password).len(),
        1,
        "no login needed"
    );
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn rejected_credentials_wait_out_a_long_doubling_backoff() {
    let bace = Arc::new(ScriptedUpstream::default());
    let rejected = Answer::Fail(UpstreamError::Rejected {
        status: 401,
        error: None,
    });
    bace.script("fleet-a", Grant::Password, std::iter::repeat_n(rejected, 3));
    let config = config(&["fleet-a"]).rejected_backoff(Duration::from_secs(300));
    let (broker, bace) = start_with(config, bace).await;
    for _ in 0..(4 * 60) {
        let e = broker
            .get_token("fleet-a", Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(e, BrokerError::CredentialsRejected { .. }), "{e}");
        assert!(broker.invalidate("fleet-a", "").await.is_err());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        bace.calls("fleet-a", Grant::Password).len(),
        1,
        "no login inside 5 min"
    );
    // Background retries at 5 min, then 10 min later; the third rejection's backoff is 20 min.
    tokio::time::sleep(Duration::from_secs(60 + 600 + 60)).await;
    let logins = bace.calls("fleet-a", Grant::Password);
    assert_eq!(logins.len(), 3);
    assert_eq!(
        gaps(&logins),
        vec![Duration::from_secs(300), Duration::from_secs(600)]
    );
    tokio::time::sleep(Duration::from_secs(1200)).await;
    assert_eq!(bace.calls("fleet-a", Grant::Password).len(), 4);
    assert!(
        broker.get_token("fleet-a", Duration::ZERO).await.is_ok(),
        "fixed at BACE"
    );
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn min_validity_refreshes_first_and_is_bounded() {
    let (broker, bace) = start(config(&["fleet-a"])).await;
    tokio::time::sleep(HOUR).await;
    // 23 h 59 m 55 s + margin is more than the 24 h token has left: one refresh.
    let t = broker
        .get_token("fleet-a", DAY - Duration::from_secs(5))
        .await
        .unwrap();
    assert!(t.valid_for(Instant::now(), DAY));
    assert_eq!(bace.calls("fleet-a", Grant::Refresh).len(), 1);
    // 14 days is the most any token can last: out of range without a call.
    let e = broker.get_token("fleet-a", 14 * DAY).await.unwrap_err();
    assert!(matches!(e, BrokerError::ValidityOutOfRange { .. }));
    // Five seconds later the token has 5 s less than 14 days: a bar just under 14 days is not
    // met, but the token was just refreshed and another refresh would not help: no call.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let bar = 14 * DAY - Duration::from_secs(12);
    let e = broker.get_token("fleet-a", bar).await.unwrap_err();
    assert!(matches!(e, BrokerError::ValidityOutOfRange { .. }), "{e}");
    assert_eq!(bace.total(), 2);
    // Once the token is older than the expiry margin, the same bar is met by a refresh.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let t = broker.get_token("fleet-a", bar).await.unwrap();
    assert!(t.valid_for(Instant::now(), bar));
    assert_eq!(bace.calls("fleet-a", Grant::Refresh).len(), 2);
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn invalidate_cooldown_allows_one_forced_login_per_window() {
    let (broker, bace) =
        start(config(&["fleet-a"]).invalidate_cooldown(Duration::from_secs(10))).await;
    let t1 = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    let r = broker.invalidate("fleet-a", "").await.unwrap();
    assert!(r.invalidated());
    assert_ne!(r.token.fingerprint(), t1.fingerprint());
    tokio::time::sleep(Duration::from_secs(9)).await;
    let r2 = broker.invalidate("fleet-a", "").await.unwrap();
    assert_eq!(r2.outcome, InvalidateOutcome::Cooldown);
    assert_eq!(r2.token.fingerprint(), r.token.fingerprint());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r3 = broker.invalidate("fleet-a", "").await.unwrap();
    assert!(r3.invalidated());
    assert_eq!(bace.calls("fleet-a", Grant::Password).len(), 3);
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_invalidation_during_a_refresh_wins() {
    let (broker, bace) = start(config(&["fleet-a"])).await;
    let old = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    bace.script("fleet-a", Grant::Refresh, [Answer::Hang]);
    // A refresh for a long min_validity hangs at BACE (until the 10 s timeout)...
    let b = broker.clone();
    let refreshing = tokio::spawn(async move { b.get_token("fleet-a", 2 * DAY).await });
    while bace.calls("fleet-a", Grant::Refresh).is_empty() {
        tokio::task::yield_now().await;
    }
    // ...when a caller reports the token: a login replaces it, and the stale refresh, when it
    // ends, does not reinstall the old token.
    let r = broker.invalidate("fleet-a", "").await.unwrap();
    assert!(r.invalidated());
    assert_ne!(r.token.fingerprint(), old.fingerprint());
    // The superseded refresh's caller is not handed the invalidated token: it looks again and
    // gets the new one (extended by a refresh to meet its two days).
    let got = refreshing.await.unwrap().unwrap();
    assert_eq!(got.fingerprint(), r.token.fingerprint());
    assert!(got.valid_for(Instant::now(), 2 * DAY));
    let now = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    assert_eq!(now.fingerprint(), r.token.fingerprint());
    assert_eq!(bace.calls("fleet-a", Grant::Password).len(), 2);
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_waiting_fetches() {
    let bace = Arc::new(ScriptedUpstream::default());
    bace.script("fleet-a", Grant::Password, [Answer::Hang]);
    let config = config(&["fleet-a"]).upstream_timeout(HOUR).build();
    let (broker, refresher) = Broker::new(&config, bace.clone());
    let refresher = tokio::spawn(refresher.run());
    let b = broker.clone();
    let waiter = tokio::spawn(async move { b.get_token("fleet-a", Duration::ZERO).await });
    while bace.total() == 0 {
        tokio::task::yield_now().await;
    }
    broker.shutdown().await;
    assert_eq!(
        waiter.await.unwrap().unwrap_err(),
        BrokerError::ShuttingDown
    );
    refresher.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn very_long_lifetimes_do_not_stop_the_refresher() {
    let bace = Arc::new(ScriptedUpstream::default());
    bace.set_login_lifetime("forever", Duration::from_secs(10 * 365 * 86_400));
    let (broker, bace) = start_with(config(&["forever", "daily"]), bace).await;
    // Both accounts keep being served and refreshed for days: the 10-year token's timer did
    // not take the refresher down (tokio timers refuse deadlines beyond ~2 years).
    tokio::time::sleep(3 * DAY).await;
    assert_eq!(bace.calls("daily", Grant::Refresh).len(), 1);
    assert!(bace.calls("forever", Grant::Refresh).is_empty());
    assert!(broker.get_token("forever", Duration::ZERO).await.is_ok());
    assert!(broker.get_token("daily", Duration::ZERO).await.is_ok());
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_invalidation_during_the_first_login_joins_it() {
    let bace = Arc::new(ScriptedUpstream::default());
    bace.script(
        "fleet-a",
        Grant::Password,
        [Answer::Delay(Duration::from_secs(2))],
    );
    let (broker, refresher) = Broker::new(&config(&["fleet-a"]).build(), bace.clone());
    tokio::spawn(refresher.run());
    let b = broker.clone();
    let first = tokio::spawn(async move { b.get_token("fleet-a", Duration::ZERO).await });
    while bace.total() == 0 {
        tokio::task::yield_now().await;
    }
    let r = broker.invalidate("fleet-a", "").await.unwrap();
    assert!(r.invalidated());
    assert_eq!(
        r.token.fingerprint(),
        first.await.unwrap().unwrap().fingerprint()
    );
    assert_eq!(
        bace.calls("fleet-a", Grant::Password).len(),
        1,
        "one login, not two"
    );
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hanging_refresh_endpoint_leaves_time_for_the_login_fallback() {
    let bace = Arc::new(ScriptedUpstream::default());
    bace.script(
        "fleet-a",
        Grant::Refresh,
        std::iter::repeat_n(Answer::Hang, 100_000),
    );
    let config = config(&["fleet-a"]).upstream_timeout(Duration::from_secs(10));
    let (broker, bace) = start_with(config, bace).await;
    let token = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    // Every refresh hangs until its deadline. Callers arriving through the token's last
    // servable moment and after are always served: the last refresh attempt comes early
    // enough, and the one callers wait for leaves the login half of its budget.
    tokio::time::sleep_until(token.expires_at() - Duration::from_secs(60)).await;
    for _ in 0..120 {
        let t = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
        assert!(t.valid_for(Instant::now(), MARGIN));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        bace.calls("fleet-a", Grant::Password).len(),
        2,
        "one fallback login"
    );
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn slots_planned_again_refresh_once_on_their_latest_plan_even_after_compaction() {
    // Each invalidation logs in again and plans the next refresh anew, leaving the older plan
    // in the refresher's queue. 1,100 of them (fleet-b) outnumber the queue's slack, so it is
    // compacted on the way: fleet-a's plan, never replaced, must survive that, and no stale
    // plan of fleet-b may fire.
    let (broker, bace) =
        start(config(&["fleet-a", "fleet-b"]).invalidate_cooldown(Duration::from_secs(1))).await;
    for _ in 0..1100 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let answer = broker.invalidate("fleet-b", "").await.unwrap();
        assert_eq!(answer.outcome, InvalidateOutcome::Invalidated);
    }
    assert_eq!(bace.calls("fleet-b", Grant::Password).len(), 1101);
    for _ in 0..(2 * 24) {
        tokio::time::sleep(HOUR).await;
        for account in ["fleet-a", "fleet-b"] {
            let token = broker.get_token(account, Duration::ZERO).await.unwrap();
            assert!(token.valid_for(Instant::now(), MARGIN));
        }
    }
    for account in ["fleet-a", "fleet-b"] {
        let last_login = *bace.calls(account, Grant::Password).last().unwrap();
        let refreshes = bace.calls(account, Grant::Refresh);
        assert_eq!(
            refreshes.len(),
            1,
            "{account}: one refresh, from the latest plan"
        );
        let after = refreshes[0] - last_login;
        assert!(at_refresh_point(after, DAY), "{account}: {after:?}");
    }
    assert_eq!(bace.calls("fleet-a", Grant::Password).len(), 1);
    assert_eq!(bace.calls("fleet-b", Grant::Password).len(), 1101);
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_slot_replaced_by_a_reload_never_refreshes_on_its_old_plan() {
    let (broker, bace) = start(config(&["fleet-a"])).await;
    let old_login = bace.calls("fleet-a", Grant::Password)[0];
    tokio::time::sleep(6 * HOUR).await;
    // A watcher that is not polled keeps the old slot alive (it moves on when next polled).
    let _watch = broker.watch("fleet-a").unwrap();
    // New credentials: a new slot logs in now; the old slot's plan (at ~14.4 h) stays queued.
    let rotated = BrokerConfig::new().account(account("fleet-a", "rotated"));
    let report = broker.apply(&rotated.build());
    assert_eq!(report.changed.len(), 1);
    let token = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    let new_login = *bace.calls("fleet-a", Grant::Password).last().unwrap();
    assert!(new_login > old_login);
    for _ in 0..(2 * 24) {
        tokio::time::sleep(HOUR).await;
        let t = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
        assert!(t.valid_for(Instant::now(), MARGIN));
        assert_eq!(t.fingerprint(), token.fingerprint());
    }
    let refreshes = bace.calls("fleet-a", Grant::Refresh);
    assert_eq!(refreshes.len(), 1, "only the new slot's plan runs");
    let after = refreshes[0] - new_login;
    assert!(
        at_refresh_point(after, DAY),
        "{after:?} after the new login"
    );
    assert_eq!(bace.calls("fleet-a", Grant::Password).len(), 2);
    broker.shutdown().await;
}

/// BACE issues a token somewhere during the request, so `expires_in` counts from when the request
/// was sent, not from the answer: a slow answer must not stretch the token (the chaos soak found
/// tokens taken to live up to 0.7 s longer than BACE said, the request's duration).
#[tokio::test(start_paused = true)]
async fn a_relative_lifetime_counts_from_when_the_request_was_sent() {
    let bace = Arc::new(ScriptedUpstream::default());
    bace.set_login_lifetime("fleet-a", HOUR);
    let slow = Duration::from_secs(5);
    bace.script("fleet-a", Grant::Password, [Answer::Delay(slow)]);
    let (broker, bace) = start_with(config(&["fleet-a"]), bace).await;
    let token = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    let sent = bace.calls("fleet-a", Grant::Password)[0];
    assert_eq!(token.expires_at(), sent + HOUR, "not {:?} later", slow);
    broker.shutdown().await;
}

/// A 429 with `Retry-After` holds the next attempt back for as long as BACE asked, even beyond
/// the backoff's own step; one without it backs off as any transient failure.
#[tokio::test(start_paused = true)]
async fn a_rate_limited_login_waits_as_long_as_bace_asked() {
    let config = config(&["fleet-a"])
        .backoff_initial(Duration::from_secs(1))
        .backoff_max(Duration::from_secs(60));
    let upstream = Arc::new(ScriptedUpstream::default());
    let asked = Duration::from_secs(300);
    upstream.script(
        "fleet-a",
        Grant::Password,
        [
            Answer::Fail(UpstreamError::RateLimited {
                retry_after: Some(asked),
            }),
            Answer::Fail(UpstreamError::RateLimited { retry_after: None }),
        ],
    );
    let (broker, bace) = start_with(config, upstream).await;
    let first = bace.calls("fleet-a", Grant::Password)[0];
    let e = broker
        .get_token("fleet-a", Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            BrokerError::Unavailable {
                reason: "rate limited",
                ..
            }
        ),
        "{e}"
    );
    // Callers keep asking; the refresher retries when the backoff ends.
    for _ in 0..400 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = broker.get_token("fleet-a", Duration::ZERO).await;
        if bace.calls("fleet-a", Grant::Password).len() >= 3 {
            break;
        }
    }
    let calls = bace.calls("fleet-a", Grant::Password);
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(
        calls[1] - first >= asked,
        "retried after {:?}",
        calls[1] - first
    );
    // No Retry-After: the second failure's step (1-2 s), not 300 s again.
    assert!(
        calls[2] - calls[1] <= Duration::from_secs(2),
        "{:?}",
        calls[2] - calls[1]
    );
    assert!(broker.get_token("fleet-a", Duration::ZERO).await.is_ok());
    broker.shutdown().await;
}

/// What counts is the time left when the answer arrives: a login answered so slowly that its
/// token has no more than the expiry margin left is refused, even by the paths that hand out a
/// fresh token (an Invalidate's login), and the next login after the backoff serves again.
#[tokio::test(start_paused = true)]
async fn a_token_arriving_within_the_margin_is_not_handed_out() {
    let bace = Arc::new(ScriptedUpstream::default());
    bace.set_login_lifetime("fleet-a", Duration::from_secs(30));
    let config = config(&["fleet-a"]).upstream_timeout(Duration::from_secs(60));
    let (broker, bace) = start_with(config, bace).await;
    let old = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    // 30 s of life, 21 s of it spent on the way (within the 60 s timeout): 9 s left, within
    // the 10 s margin.
    let slow = Duration::from_secs(21);
    bace.script("fleet-a", Grant::Password, [Answer::Delay(slow)]);
    let refused = broker.invalidate("fleet-a", old.expose_access()).await;
    assert!(
        matches!(
            refused,
            Err(BrokerError::Unavailable {
                reason: "invalid upstream answer",
                ..
            })
        ),
        "{refused:?}"
    );
    let logins = bace.calls("fleet-a", Grant::Password);
    assert_eq!(logins.len(), 2);
    // Served again once the backoff allows a login (a normal answer now).
    tokio::time::sleep(Duration::from_secs(120)).await;
    let token = broker.get_token("fleet-a", Duration::ZERO).await.unwrap();
    assert!(token.valid_for(Instant::now(), MARGIN));
    assert!(!token.is(old.expose_access()));
    broker.shutdown().await;
}
