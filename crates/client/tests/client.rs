//! `BrokerClient` against the real broker binary and the fake BACE: the shared GetToken and its
//! shared error, `min_validity`, WatchToken handles (rotation, broker restart, stopping when
//! dropped), TLS with a client certificate, and a service-account token file that rotates.

mod common;

use std::time::Duration;

use bace_token_broker_client::{BrokerClient, Error, InvalidateOutcome, Token};
use common::{ACCOUNT, Broker, fake, guard, scene};
use testkit::{
    fake_bace::{ErrorShape, Step},
    pki,
};

/// Every caller joins while the one GetToken is held (the broker's refresh waits at the fake's
/// gate); released, the refresh fails and all 200 get that one error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_call_and_its_error() {
    let fake = fake().await;
    let broker = Broker::for_fake(&fake, |c| c).await;
    let client = BrokerClient::new(&broker.url).unwrap();
    // More than the broker's 24 h login: it must refresh, and BACE is down.
    let two_days = Duration::from_secs(48 * 3600);
    fake.set_outage(Some(Step::Status(503, ErrorShape::default())));
    fake.hold();

    let (joined, mut joins) = tokio::sync::mpsc::unbounded_channel();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (client, joined) = (client.clone(), joined.clone());
        calls.spawn(async move {
            // The first poll joins the account's call (or starts it).
            let mut call = std::pin::pin!(client.token_with_min_validity(ACCOUNT, two_days));
            assert!(futures_util::poll!(call.as_mut()).is_pending());
            joined.send(()).unwrap();
            call.await
        });
    }
    for _ in 0..200 {
        guard(joins.recv()).await.unwrap();
    }
    fake.release();
    let results = guard(calls.join_all()).await;
    let first = results[0].clone().unwrap_err();
    assert!(
        matches!(first, Error::UpstreamUnavailable { .. }),
        "{first:?}"
    );
    for result in results {
        assert_eq!(result.unwrap_err(), first);
    }
    assert_eq!(broker.get_token_calls().await, 1);
    // Errors are not cached.
    assert!(
        client
            .token_with_min_validity(ACCOUNT, two_days)
            .await
            .is_err()
    );
    assert_eq!(broker.get_token_calls().await, 2);
}

/// The broker is asked for the margin too, so the answer can be cached; a margin longer than
/// any token lasts is dropped after the broker's OUT_OF_RANGE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_is_asked_for_a_token_valid_beyond_the_margin() {
    let fake = fake().await;
    let broker = Broker::for_fake(&fake, |c| c).await;
    let day = Duration::from_secs(24 * 3600);
    // The broker holds a 24 h login (its warm-up): not enough for a margin of a day.
    let client = BrokerClient::builder(&broker.url)
        .margin(day)
        .build()
        .unwrap();
    let token = client.token(ACCOUNT).await.unwrap();
    assert!(token.valid_for() > day, "{:?}", token.valid_for());
    assert_eq!(broker.get_token_calls().await, 1);
    assert!(client.token(ACCOUNT).await.unwrap().same_token(&token));
    assert_eq!(broker.get_token_calls().await, 1);

    let longer = BrokerClient::builder(&broker.url)
        .margin(400 * day)
        .build()
        .unwrap();
    assert!(longer.token(ACCOUNT).await.unwrap().same_token(&token));
    assert_eq!(
        broker.get_token_calls().await,
        3,
        "out of range, then without the margin"
    );
    let error = longer
        .token_with_min_validity(ACCOUNT, 400 * day)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::OutOfRange { .. }), "{error:?}");
}

/// A redirect to another origin answering 401: reqwest did not send the token there, so it is
/// not reported and stays in use.
#[cfg(feature = "reqwest-middleware")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_from_another_origin_after_a_redirect_keeps_the_token() {
    use bace_token_broker_client::BrokerAuthMiddleware;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers each connection on `listener` with `response`, once per request.
    async fn serve(listener: tokio::net::TcpListener, response: String) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let response = response.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    }
    let listen = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let (redirecting, refusing) = (listen().await.unwrap(), listen().await.unwrap());
    let target = format!("http://{}/api/v2/elsewhere", refusing.local_addr().unwrap());
    let start = format!("http://{}/api/v2/moved", redirecting.local_addr().unwrap());
    tokio::spawn(serve(
        redirecting,
        format!(
            "HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    ));
    tokio::spawn(serve(
        refusing,
        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    ));

    let fake = fake().await;
    let broker = Broker::for_fake(&fake, |c| c).await;
    let client = BrokerClient::new(&broker.url).unwrap();
    let http = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(BrokerAuthMiddleware::new(client.clone(), ACCOUNT))
        .build();
    let response = guard(http.get(&start).send()).await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(response.url().as_str(), target);
    assert_eq!(broker.invalidate_calls().await, 0);
    let token = client.cached(ACCOUNT).unwrap();
    assert!(fake.is_valid(token.access_token()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_validity_beyond_the_cached_token_asks_the_broker() {
    let (_fake, broker, client) = scene().await;

    let first = client.token(ACCOUNT).await.unwrap(); // a 24 h login
    let hour = Duration::from_secs(3600);
    let cached = client
        .token_with_min_validity(ACCOUNT, 23 * hour)
        .await
        .unwrap();
    assert!(cached.same_token(&first));
    assert_eq!(broker.get_token_calls().await, 1);

    // More than the login lasts: the broker refreshes (BACE extends it to 14 days).
    let longer = client
        .token_with_min_validity(ACCOUNT, 25 * hour)
        .await
        .unwrap();
    assert_eq!(broker.get_token_calls().await, 2);
    assert!(longer.valid_for() > 25 * hour);
    // ... and that answer is cached for the next caller.
    client
        .token_with_min_validity(ACCOUNT, 25 * hour)
        .await
        .unwrap();
    assert_eq!(broker.get_token_calls().await, 2);

    let error = client
        .token_with_min_validity(ACCOUNT, 400 * 24 * hour)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::OutOfRange { .. }), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_returns_the_outcome_and_the_new_token() {
    let (_fake, broker, client) = scene().await;

    let old = client.token(ACCOUNT).await.unwrap();
    let answer = client
        .invalidate(ACCOUNT, old.access_token())
        .await
        .unwrap();
    assert_eq!(answer.outcome, InvalidateOutcome::Invalidated);
    assert!(answer.invalidated);
    assert!(!answer.token.same_token(&old));
    assert!(answer.retry_with(old.access_token()).is_some());
    // The cache holds the new token: no GetToken.
    assert!(
        client
            .token(ACCOUNT)
            .await
            .unwrap()
            .same_token(&answer.token)
    );
    assert_eq!(broker.get_token_calls().await, 1);

    let again = client
        .invalidate(ACCOUNT, old.access_token())
        .await
        .unwrap();
    assert_eq!(again.outcome, InvalidateOutcome::AlreadyReplaced);
    assert!(again.token.same_token(&answer.token));
    assert!(format!("{again:?}").contains("..."));
    assert!(!format!("{again:?}").contains(answer.token.access_token()));
}

/// Waits for the watch to hand out a token other than `old`.
async fn next_other(watch: &mut bace_token_broker_client::TokenWatch, old: &Token) -> Token {
    guard(async {
        loop {
            if let Ok(token) = watch.changed().await
                && !token.same_token(old)
            {
                return token;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_follows_a_rotation_and_survives_a_broker_restart() {
    let fake = fake().await;
    let mut broker = Broker::for_fake(&fake, |c| c).await;
    let client = BrokerClient::builder(&broker.url)
        .watch_backoff(Duration::from_millis(20), Duration::from_millis(500))
        .build()
        .unwrap();
    let mut watch = client.watch(ACCOUNT);
    let first = guard(watch.token()).await.unwrap();
    assert!(fake.is_valid(first.access_token()));
    assert_eq!(watch.connections(), 1);

    // A rotation: the token is replaced (here by an invalidation) and the watch follows.
    client
        .invalidate(ACCOUNT, first.access_token())
        .await
        .unwrap();
    let second = next_other(&mut watch, &first).await;
    assert!(fake.is_valid(second.access_token()));

    // The broker dies; a new one logs in again: the watch reconnects and follows.
    broker.restart().await;
    let third = next_other(&mut watch, &second).await;
    assert!(fake.is_valid(third.access_token()));
    assert!(watch.connections() >= 2);
    assert!(watch.current().unwrap().same_token(&third));
    // What a watch receives also feeds the client's cache.
    assert!(client.cached(ACCOUNT).unwrap().same_token(&third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_stream_stops_when_the_last_handle_is_dropped() {
    let (fake, broker, client) = scene().await;
    let mut watch = client.watch(ACCOUNT);
    let mut copy = watch.clone();
    guard(watch.token()).await.unwrap();
    broker.wait_open_watches(1).await;
    let first = watch.current().unwrap();
    drop(watch);
    // The stream goes on for the remaining clone: it follows a rotation.
    client
        .invalidate(ACCOUNT, first.access_token())
        .await
        .unwrap();
    let second = next_other(&mut copy, &first).await;
    assert!(fake.is_valid(second.access_token()));
    broker.wait_open_watches(1).await;
    drop(copy);
    broker.wait_open_watches(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_an_unknown_account_reports_the_error() {
    let (_fake, _broker, client) = scene().await;
    let mut watch = client.watch("no-such-account");
    let error = guard(watch.token()).await.unwrap_err();
    assert!(matches!(error, Error::UnknownAccount { .. }), "{error:?}");
}

/// TLS with a client certificate (mTLS) and with a service-account token whose file rotates:
/// the same options as the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_and_a_rotating_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca = pki::Ca::new("test CA");
    let server = ca.server(1);
    let ca_file = write("ca.pem", &ca.pem());
    let cert = write("server.pem", &server.cert_pem);
    let key = write("server.key", &server.key_pem);
    let worker = ca.client_uri("spiffe://cluster.local/ns/ingest/sa/worker");
    let worker_cert = write("worker.pem", &worker.cert_pem);
    let worker_key = write("worker.key", &worker.key_pem);
    let signer = pki::SigningKey::es256("k1");
    let jwks = signer.jwks_file(dir.path());
    let mut kubernetes = testkit::Kubernetes::new(pki::ISSUER, testkit::Jwks::File(jwks));
    kubernetes.audience = Some(pki::AUDIENCE.into());

    let fake = fake().await;
    let broker = Broker::for_fake_tls(&fake, |c| {
        c.tls(&cert, &key, Some(&ca_file))
            .kubernetes(kubernetes)
            .allow("spiffe://cluster.local/ns/ingest/sa/worker", &[ACCOUNT])
            .allow("system:serviceaccount:ingest:exporter", &[ACCOUNT])
    })
    .await;
    let https = format!("https://127.0.0.1:{}", broker.addr.port());

    let mtls = BrokerClient::builder(&https)
        .ca_file(&ca_file)
        .identity_files(&worker_cert, &worker_key)
        .tls_domain_name("localhost")
        .build()
        .unwrap();
    mtls.token(ACCOUNT).await.unwrap();

    // A service-account token, checked at every call (a margin longer than any token lasts
    // makes every call ask).
    let token_file = write(
        "sa-token",
        &signer.sign(&pki::sa_claims("ingest", "exporter")),
    );
    let sa = BrokerClient::builder(&https)
        .ca_file(&ca_file)
        .tls_domain_name("localhost")
        .token_file(&token_file)
        .token_file_check(Duration::ZERO)
        .margin(Duration::from_secs(400 * 24 * 3600))
        .build()
        .unwrap();
    sa.token(ACCOUNT).await.unwrap();
    // Rotated to a token of a caller not allowed the account: the new file is what is sent.
    let rotate = |claims| {
        let next = dir.path().join("sa-token.new");
        std::fs::write(&next, signer.sign(&claims)).unwrap();
        std::fs::rename(&next, &token_file).unwrap();
    };
    rotate(pki::sa_claims("ingest", "stranger"));
    let error = sa.token(ACCOUNT).await.unwrap_err();
    assert!(matches!(error, Error::PermissionDenied { .. }), "{error:?}");
    rotate(pki::sa_claims("ingest", "exporter"));
    sa.token(ACCOUNT).await.unwrap();

    // No identity at all: refused, and the error says so without a secret.
    let anonymous = BrokerClient::builder(&https)
        .ca_file(&ca_file)
        .tls_domain_name("localhost")
        .build()
        .unwrap();
    let error = anonymous.token(ACCOUNT).await.unwrap_err();
    assert!(matches!(error, Error::Unauthenticated { .. }), "{error:?}");
}
