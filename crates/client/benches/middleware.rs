//! What the auth middleware adds to a request when the token is cached: no RPC, and (target)
//! under a microsecond.
//!
//! Each stack ends in a terminal that answers 200 at once without any network, so the timing
//! is the middleware's own work: the cache read, `Authorization`, the copy kept for a possible
//! retry, the status check. Measured against the same stack without the auth middleware, in
//! the same run:
//!
//! - `token/cached`: `BrokerClient::token` answered from the cache.
//! - `reqwest/baseline`, `reqwest/pass_on_layer`, `reqwest/with_auth`:
//!   `ClientWithMiddleware::execute` of a GET; the pass-on layer only calls `next` (what any
//!   reqwest-middleware layer costs: a boxed future, the request moved along).
//! - `tower/baseline`, `tower/with_auth`: `Service::call` of a GET with a `Full` body.
//!
//! The token is fetched once from a broker in process (testkit) in front of the fake BACE; the
//! bench checks through the broker's `/metrics` that nothing else called GetToken, and prints
//! the added time per request as the median of paired rounds (A then B, alternating).
//!
//! Run: `cargo bench -p bace-token-broker-client --bench middleware`.

#![allow(missing_docs)]

use std::{
    convert::Infallible,
    hint::black_box,
    pin::pin,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bace_token_broker_client::{BrokerAuthLayer, BrokerAuthMiddleware, BrokerClient};
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Extensions;
use http_body_util::Full;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use tower::{Layer, Service, service_fn};

const ACCOUNT: &str = "fleet-a";

/// Polls a future that must complete without waiting (every path here is synchronous once the
/// token is cached).
fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the cached path awaited"),
    }
}

/// A middleware that only passes the request on: what any reqwest-middleware layer costs
/// (a boxed future, the request moved along).
struct PassOn;

#[async_trait::async_trait]
impl Middleware for PassOn {
    async fn handle(
        &self,
        req: reqwest::Request,
        ext: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        next.run(req, ext).await
    }
}

/// The end of the reqwest stack: 200, no network.
struct Terminal;

#[async_trait::async_trait]
impl Middleware for Terminal {
    async fn handle(
        &self,
        req: reqwest::Request,
        _: &mut Extensions,
        _: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        black_box(req.headers().len());
        Ok(reqwest::Response::from(http::Response::new("")))
    }
}

type Req = http::Request<Full<Bytes>>;

fn terminal(req: Req) -> std::future::Ready<Result<http::Response<()>, Infallible>> {
    black_box(req.headers().len());
    std::future::ready(Ok(http::Response::new(())))
}

fn request() -> Req {
    http::Request::get("http://bace.example/api/v2/physical-device")
        .body(Full::default())
        .unwrap()
}

struct Stacks {
    client: BrokerClient,
    reqwest_base: ClientWithMiddleware,
    reqwest_pass_on: ClientWithMiddleware,
    reqwest_auth: ClientWithMiddleware,
    get: reqwest::Request,
}

impl Stacks {
    fn reqwest(&self, http: &ClientWithMiddleware) {
        let response = now(http.execute(self.get.try_clone().unwrap())).unwrap();
        assert_eq!(response.status(), 200);
    }
}

fn tower_call<S>(svc: &mut S)
where
    S: Service<Req, Response = http::Response<()>>,
    S::Error: std::fmt::Debug,
{
    let response = now(svc.call(request())).unwrap();
    assert_eq!(response.status(), 200);
}

/// Median over `rounds` of (B − A) per call, each round timing `n` calls of A then of B.
fn added(rounds: usize, n: u32, mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration) {
    let mut base = Vec::new();
    let mut diff = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        (0..n).for_each(|_| a());
        let ta = t.elapsed() / n;
        let t = Instant::now();
        (0..n).for_each(|_| b());
        let tb = t.elapsed() / n;
        base.push(ta);
        diff.push(tb.saturating_sub(ta));
    }
    base.sort();
    diff.sort();
    (base[rounds / 2], diff[rounds / 2])
}

fn middleware(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let fake = rt.block_on(testkit::fake(&[ACCOUNT]));
    let broker = rt.block_on(testkit::BrokerServer::ready(
        &testkit::BrokerConfig::for_fake(&fake, &[ACCOUNT]),
    ));
    let client = BrokerClient::new(format!("http://{}", broker.addr)).unwrap();
    rt.block_on(client.token(ACCOUNT)).unwrap();

    let http = reqwest::Client::new();
    let stacks = Stacks {
        client: client.clone(),
        reqwest_base: ClientBuilder::new(http.clone()).with(Terminal).build(),
        reqwest_pass_on: ClientBuilder::new(http.clone())
            .with(PassOn)
            .with(Terminal)
            .build(),
        reqwest_auth: ClientBuilder::new(http.clone())
            .with(BrokerAuthMiddleware::new(client.clone(), ACCOUNT))
            .with(Terminal)
            .build(),
        get: http
            .get("http://bace.example/api/v2/physical-device")
            .build()
            .unwrap(),
    };
    let mut tower_base = service_fn(terminal);
    let mut tower_auth = BrokerAuthLayer::new(client.clone(), ACCOUNT).layer(service_fn(terminal));

    let mut group = c.benchmark_group("token");
    group.bench_function("cached", |b| {
        b.iter(|| black_box(now(stacks.client.token(black_box(ACCOUNT))).unwrap()))
    });
    group.finish();
    let mut group = c.benchmark_group("reqwest");
    group.bench_function("baseline", |b| {
        b.iter(|| stacks.reqwest(&stacks.reqwest_base))
    });
    group.bench_function("pass_on_layer", |b| {
        b.iter(|| stacks.reqwest(&stacks.reqwest_pass_on))
    });
    group.bench_function("with_auth", |b| {
        b.iter(|| stacks.reqwest(&stacks.reqwest_auth))
    });
    group.finish();
    let mut group = c.benchmark_group("tower");
    group.bench_function("baseline", |b| b.iter(|| tower_call(&mut tower_base)));
    group.bench_function("with_auth", |b| b.iter(|| tower_call(&mut tower_auth)));
    group.finish();

    let benching = std::env::args().any(|a| a == "--bench");
    if benching {
        let (rb, ra) = added(
            15,
            20_000,
            || stacks.reqwest(&stacks.reqwest_base),
            || stacks.reqwest(&stacks.reqwest_auth),
        );
        let (_, own) = added(
            15,
            20_000,
            || stacks.reqwest(&stacks.reqwest_pass_on),
            || stacks.reqwest(&stacks.reqwest_auth),
        );
        let mut tb = service_fn(terminal);
        let mut ta = BrokerAuthLayer::new(client.clone(), ACCOUNT).layer(service_fn(terminal));
        let (tbase, tadd) = added(15, 20_000, || tower_call(&mut tb), || tower_call(&mut ta));
        println!(
            "added per request by the auth middleware (median of 15 paired rounds): \
             reqwest {ra:?} (baseline stack {rb:?}; {own:?} more than a pass-on layer), \
             tower {tadd:?} (baseline {tbase:?})"
        );
    }

    // The token was fetched once, before the measurements: a cached token costs no RPC.
    let samples = rt.block_on(broker.scrape());
    let get_token: f64 = samples
        .iter()
        .filter(|(k, _)| {
            k.starts_with("grpc_server_started_total{") && k.contains("grpc_method=\"GetToken\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(get_token, 1.0, "GetToken calls during the bench");
    if benching {
        println!("GetToken calls to the broker during the whole bench: {get_token}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = middleware
}
criterion_main!(benches);
