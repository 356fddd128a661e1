//! `BrokerAuthLayer` (tower) around hyper-util's HTTP client, against the real broker binary and
//! the fake BACE: the same scenarios as the reqwest middleware's, where they apply.

mod common;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use bace_token_broker_client::{BrokerAuthError, BrokerAuthLayer, BrokerClient, Error};
use bytes::Bytes;
use common::{
    ACCOUNT, api, assert_all_ok, fake, free_addr, guard, scene, together, verifying_scene,
};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Service, ServiceBuilder, ServiceExt};

/// An authorised HTTP client for bodies of type `B`, and the count of what it sends (retries
/// included).
fn service<B>(
    client: &BrokerClient,
) -> (
    impl Service<
        Request<B>,
        Response = http::Response<hyper::body::Incoming>,
        Error = BrokerAuthError<hyper_util::client::legacy::Error>,
        Future: Send,
    > + Clone
    + Send
    + 'static,
    Arc<AtomicUsize>,
)
where
    B: hyper::body::Body + bace_token_broker_client::ReplayBody + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let sends = Arc::new(AtomicUsize::new(0));
    let counter = sends.clone();
    let http = Client::builder(TokioExecutor::new()).build_http::<B>();
    let service = ServiceBuilder::new()
        .layer(BrokerAuthLayer::new(client.clone(), ACCOUNT))
        .map_request(move |r: Request<B>| {
            counter.fetch_add(1, Ordering::SeqCst);
            r
        })
        .service(http);
    (service, sends)
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_make_one_get_token() {
    let (fake, broker, client) = scene().await;
    let (svc, sends) = service::<Full<Bytes>>(&client);
    let url = api(&fake, "physical-device");

    // All 1,000 start together, so they overlap the one GetToken in flight.
    let statuses = together(1000, || {
        let call = svc.clone().oneshot(get(&url));
        async move { call.await.map(|r| r.status()) }
    })
    .await;
    assert_all_ok(&statuses);
    assert_eq!(broker.get_token_calls().await, 1);
    assert_eq!(sends.load(Ordering::SeqCst), 1000);
    let status = svc.clone().oneshot(get(&url)).await.unwrap().status();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(broker.get_token_calls().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_invalidated_once_and_the_request_retried_once() {
    let (fake, broker, client) = scene().await;
    let (svc, sends) = service::<Full<Bytes>>(&client);
    let url = api(&fake, "physical-device");

    let old = client.token(ACCOUNT).await.unwrap();
    fake.revoke(old.access_token());
    let request = Request::post(&url)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = guard(svc.oneshot(request)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        sends.load(Ordering::SeqCst),
        2,
        "the refused request and its retry"
    );
    assert_eq!(broker.invalidate_calls().await, 1);
    assert!(!client.cached(ACCOUNT).unwrap().same_token(&old));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_verify_url_a_permission_401_is_returned_without_a_retry() {
    let (fake, broker, client) = verifying_scene().await;
    let (svc, sends) = service::<Full<Bytes>>(&client);

    let response = guard(svc.oneshot(get(&api(&fake, "restricted"))))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("not allowed"));
    assert_eq!(sends.load(Ordering::SeqCst), 1, "no retry");
    assert_eq!(broker.invalidate_calls().await, 1);
    assert!(fake.is_valid(client.cached(ACCOUNT).unwrap().access_token()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_not_retried_but_the_token_is_reported() {
    let (fake, broker, client) = scene().await;
    let (svc, sends) = service::<BoxBody<Bytes, std::io::Error>>(&client);
    let url = api(&fake, "physical-device");

    let old = client.token(ACCOUNT).await.unwrap();
    fake.revoke(old.access_token());
    let frames = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(b"{}")))]);
    let request = Request::post(&url)
        .body(StreamBody::new(frames).boxed())
        .unwrap();
    let response = guard(svc.clone().oneshot(request)).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        sends.load(Ordering::SeqCst),
        1,
        "a stream cannot be sent twice"
    );
    assert_eq!(broker.invalidate_calls().await, 1);

    let empty = Request::get(&url)
        .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let status = svc.oneshot(empty).await.unwrap().status();
    assert_eq!(
        status,
        StatusCode::OK,
        "the next request carries the new token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_typed_error() {
    let fake = fake().await;
    let client = BrokerClient::new(format!("http://{}", free_addr())).unwrap();
    let (svc, sends) = service::<Full<Bytes>>(&client);
    let error = guard(svc.oneshot(get(&api(&fake, "physical-device"))))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            BrokerAuthError::Broker(Error::BrokerUnreachable { .. })
        ),
        "{error:?}"
    );
    assert_eq!(sends.load(Ordering::SeqCst), 0);
}
