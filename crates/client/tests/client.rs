//! `BrokerClient` against the real broker binary and the fake BACE: the shared GetToken and its
//! shared error, `min_validity`, WatchToken handles (rotation, broker restart, stopping when
//! dropped), TLS with a client certificate, and a service-account token file that rotates.

mod common;

use std::time::Duration;

use bace_token_broker_client::{BrokerClient, Error, InvalidateOutcome, Token};
use common::{ACCOUNT, Broker, fake, guard, scene, together};
use testkit::pki;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_call_and_its_error() {
    let (_fake, broker, client) = scene().await;

    let results = together(200, || {
        let client = client.clone();
        async move { client.token("no-such-account").await }
    })
    .await;
    for result in results {
        let error = result.unwrap_err();
        assert!(matches!(error, Error::UnknownAccount { .. }), "{error:?}");
        assert!(!error.is_retryable());
    }
    assert_eq!(broker.get_token_calls().await, 1);
    // Errors are not cached.
    assert!(client.token("no-such-account").await.is_err());
    assert_eq!(broker.get_token_calls().await, 2);
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
    let (_fake, broker, client) = scene().await;
    let mut watch = client.watch(ACCOUNT);
    let copy = watch.clone();
    guard(watch.token()).await.unwrap();
    broker.wait_open_watches(1).await;
    drop(watch);
    assert!(copy.current().is_some());
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

    // A service-account token, checked at every call (the margin makes every call ask).
    let token_file = write(
        "sa-token",
        &signer.sign(&pki::sa_claims("ingest", "exporter")),
    );
    let sa = BrokerClient::builder(&https)
        .ca_file(&ca_file)
        .tls_domain_name("localhost")
        .token_file(&token_file)
        .token_file_check(Duration::ZERO)
        .margin(Duration::from_secs(25 * 3600))
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
