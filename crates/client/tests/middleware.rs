//! `BrokerAuthMiddleware` (reqwest-middleware) against the real broker binary and the fake
//! BACE: one GetToken for 1,000 concurrent requests, the 401 dance (revoked token, missing
//! permission with and without `upstream.verify_url`, a streamed body) and an unreachable
//! broker.

mod common;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use bace_token_broker_client::{BrokerAuthMiddleware, BrokerClient, Error};
use bytes::Bytes;
use common::{
    ACCOUNT, api, assert_all_ok, fake, free_addr, guard, scene, together, verifying_scene,
};
use http::Extensions;
use reqwest::{Request, Response, StatusCode};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};

/// Counts what reaches the network (below the auth middleware): one per send, retries too.
#[derive(Clone, Default)]
struct Sends(Arc<AtomicUsize>);

impl Sends {
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Middleware for Sends {
    async fn handle(
        &self,
        req: Request,
        ext: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        self.0.fetch_add(1, Ordering::SeqCst);
        next.run(req, ext).await
    }
}

/// An authorised HTTP client, and the count of what it sends (retries included).
fn http(client: &BrokerClient) -> (ClientWithMiddleware, Sends) {
    let sends = Sends::default();
    let http = ClientBuilder::new(reqwest::Client::new())
        .with(BrokerAuthMiddleware::new(client.clone(), ACCOUNT))
        .with(sends.clone())
        .build();
    (http, sends)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_make_one_get_token_then_none_until_the_margin() {
    let (fake, broker, client) = scene().await;
    let (http, sends) = http(&client);
    let url = api(&fake, "physical-device");

    // All 1,000 start together, so they overlap the one GetToken in flight.
    let statuses = together(1000, || {
        let request = http.get(&url);
        async move { request.send().await.map(|r| r.status()) }
    })
    .await;
    assert_all_ok(&statuses);
    assert_eq!(broker.get_token_calls().await, 1);
    assert_eq!(sends.get(), 1000);

    // Cached: no more calls while the token has more than the margin left.
    for _ in 0..10 {
        let status = http.get(&url).send().await.unwrap().status();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(broker.get_token_calls().await, 1);

    // A client whose margin exceeds the token's life asks at every request: the margin is
    // what ends the caching.
    let eager = BrokerClient::builder(&broker.url)
        .margin(std::time::Duration::from_secs(400 * 24 * 3600))
        .build()
        .unwrap();
    let eager_http = http_plain(&eager);
    for _ in 0..3 {
        assert_eq!(
            eager_http.get(&url).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
    // Each: OUT_OF_RANGE for the margin, then a token without it.
    assert_eq!(broker.get_token_calls().await, 7);
    assert_eq!(broker.invalidate_calls().await, 0);
}

fn http_plain(client: &BrokerClient) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(BrokerAuthMiddleware::new(client.clone(), ACCOUNT))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_invalidated_once_and_the_request_retried_once() {
    let (fake, broker, client) = scene().await;
    let (http, sends) = http(&client);
    let url = api(&fake, "physical-device");

    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    let old = client.cached(ACCOUNT).unwrap();
    fake.revoke(old.access_token());

    let response = guard(http.post(&url).body("{}").send()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        sends.get(),
        3,
        "the first request, the refused one, its retry"
    );
    assert_eq!(broker.invalidate_calls().await, 1);
    assert_eq!(broker.get_token_calls().await, 1);
    let new = client.cached(ACCOUNT).unwrap();
    assert!(!new.same_token(&old));
    assert!(fake.is_valid(new.access_token()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_verify_url_a_permission_401_is_returned_without_a_retry() {
    let (fake, broker, client) = verifying_scene().await;
    let (http, sends) = http(&client);

    let response = guard(http.get(api(&fake, "restricted")).send())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body = response.text().await.unwrap();
    assert!(
        body.contains("not allowed"),
        "BACE's own 401, untouched: {body}"
    );
    assert_eq!(sends.get(), 1, "no retry");
    assert_eq!(broker.invalidate_calls().await, 1);
    // The token was fine and is still the one in use.
    let token = client.cached(ACCOUNT).unwrap();
    assert!(fake.is_valid(token.access_token()));
    let status = http
        .get(api(&fake, "physical-device"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(broker.get_token_calls().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_verify_url_a_permission_401_is_retried_once_never_looped() {
    let (fake, broker, client) = scene().await;
    let (http, sends) = http(&client);

    let response = guard(http.get(api(&fake, "restricted")).send())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        sends.get(),
        2,
        "one retry with the new token, then the 401 handed back"
    );
    assert_eq!(broker.invalidate_calls().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_not_retried_but_the_token_is_reported() {
    let (fake, broker, client) = scene().await;
    let (http, sends) = http(&client);
    let url = api(&fake, "physical-device");

    let old = client.token(ACCOUNT).await.unwrap();
    fake.revoke(old.access_token());
    let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{}"))]);
    let response = guard(
        http.post(&url)
            .body(reqwest::Body::wrap_stream(chunks))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(sends.get(), 1, "a stream cannot be sent twice");
    assert_eq!(broker.invalidate_calls().await, 1);

    // The next request carries the new token.
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(broker.get_token_calls().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_typed_error() {
    let fake = fake().await;
    let client = BrokerClient::new(format!("http://{}", free_addr())).unwrap();
    let (http, sends) = http(&client);

    let error = guard(http.get(api(&fake, "physical-device")).send())
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(error) = error else {
        panic!("expected a middleware error, got {error:?}");
    };
    let error = error.downcast_ref::<Error>().expect("the client's Error");
    assert!(
        matches!(error, Error::BrokerUnreachable { .. }),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert_eq!(sends.get(), 0, "nothing sent without a token");

    let direct = client.token(ACCOUNT).await.unwrap_err();
    assert!(
        matches!(direct, Error::BrokerUnreachable { .. }),
        "{direct:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_invalidate_fails_the_401_is_returned_without_a_retry() {
    let (fake, mut broker, client) = scene().await;
    let (http, sends) = http(&client);
    let url = api(&fake, "physical-device");

    let old = client.token(ACCOUNT).await.unwrap();
    fake.revoke(old.access_token());
    broker.kill();
    let response = guard(http.get(&url).send()).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(sends.get(), 1);
}
