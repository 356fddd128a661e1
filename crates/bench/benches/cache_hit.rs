//! In-process cache hit: `Broker::get_token` on an account holding a valid token, and the
//! same plus encoding the gRPC response (`GetTokenReply`, into a reused buffer as tonic's
//! encoder does). Target: ≤ 1 µs median, and no allocation beyond the response (counted and
//! printed before the timings: none at all).
//!
//! Run: `cargo bench -p bench --bench cache_hit` (`scripts/bench` runs it first).

use std::{
    hint::black_box,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bace_token_broker::{Broker, GetTokenReply};
use criterion::{Criterion, criterion_main};
use prost::Message;
use testkit::{Account, BrokerConfig, InstantUpstream};
use tokio::time::Duration;

/// Polls a future that must complete without waiting (the cached path never awaits).
fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the cached path awaited"),
    }
}

fn broker(rt: &tokio::runtime::Runtime) -> Broker {
    let config = (0..1000)
        .fold(
            BrokerConfig::new().token_url("http://127.0.0.1:9/oauth2/token"),
            |config, i| {
                config.account(Account::new(
                    format!("fleet-{i}"),
                    "c",
                    "s",
                    format!("u{i}"),
                    "p",
                ))
            },
        )
        .build();
    let (broker, _refresher) = Broker::new(&config, Arc::new(InstantUpstream));
    let report = rt.block_on(broker.warm_up());
    assert_eq!(report.failed, 0);
    broker
}

fn cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let broker = broker(&rt);

    let hit = allocation_counter::measure(|| {
        for _ in 0..1000 {
            black_box(now(broker.get_token("fleet-500", Duration::ZERO)).unwrap());
        }
    });
    let mut buf = Vec::with_capacity(8192);
    let respond = |buf: &mut Vec<u8>| {
        buf.clear();
        let token = now(broker.get_token(black_box("fleet-500"), Duration::ZERO)).unwrap();
        GetTokenReply::new(token).encode(buf).unwrap();
        black_box(&buf);
    };
    let response = allocation_counter::measure(|| {
        for _ in 0..1000 {
            respond(&mut buf);
        }
    });
    // Deterministic, so checked even when the bench runs as a test.
    assert_eq!(hit.count_total, 0, "a cache hit allocates");
    assert_eq!(response.count_total, 0, "encoding the response allocates");
    if std::env::args().any(|a| a == "--bench") {
        println!(
            "allocations per call: cache hit {:.2}, cache hit + response encoded {:.2}",
            hit.count_total as f64 / 1000.0,
            response.count_total as f64 / 1000.0
        );
    }

    let mut group = c.benchmark_group("cache_hit");
    group.bench_function("get_token", |b| {
        b.iter(|| now(broker.get_token(black_box("fleet-500"), Duration::ZERO)).unwrap())
    });
    group.bench_function("get_token_and_response", |b| b.iter(|| respond(&mut buf)));
    group.finish();
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::cache_hit);
}
use group::benches;
criterion_main!(benches);
