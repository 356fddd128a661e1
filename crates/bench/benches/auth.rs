//! In-process admission costs: what `Authorizer::admit` pays per call for a client certificate
//! (the identity read at the handshake; against it, the certificate parse every call made
//! before) and for a service-account token (RS256, the Kubernetes default: answered from the
//! cache of verified tokens; against it, verified, as every call was before the cache).
//! Allocations per call are counted and printed first.
//!
//! Run: `cargo bench -p bench --bench auth`.

use std::{
    hint::black_box,
    pin::pin,
    task::{Context, Poll, Waker},
};

use bace_token_broker::{
    Authorizer, TOKEN_CACHE_CAPACITY,
    config::{RawAuth, from_yaml},
    peer_identity,
};
use criterion::{Criterion, criterion_main};
use testkit::pki::{Ca, ISSUER, SigningKey, sa_claims};

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/bench/sa/load";
const CALLER: &str = "system:serviceaccount:bench:load";

/// Polls a future that must complete without waiting (admission with a `jwks_file` never
/// awaits).
fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("admission awaited"),
    }
}

fn authorizer(key: &SigningKey) -> Authorizer {
    let jwks = std::env::temp_dir().join(format!("bench-auth-{}.jwks.json", std::process::id()));
    std::fs::write(&jwks, key.jwks()).unwrap();
    let yaml = format!(
        "kubernetes:\n  issuer: {ISSUER}\n  jwks_file: {}\nallow:\n  - caller: {CALLER}\n    accounts: [fleet-a]\n  - caller: {SPIFFE_ID}\n    accounts: [fleet-a]\n",
        jwks.display()
    );
    let config = from_yaml::<RawAuth>(&yaml).unwrap().validate().unwrap();
    let _ = std::fs::remove_file(&jwks);
    Authorizer::new(config).unwrap()
}

fn auth(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let key = SigningKey::rs256("bench");
    let auth = authorizer(&key);
    let certs = [Ca::new("bench CA").client_uri(SPIFFE_ID).der];
    let identity: std::sync::Arc<str> = peer_identity(&certs).unwrap().into();
    let bearer = key.bearer(&sa_claims("bench", "load"));
    // Run as a test (`cargo test --all-targets`), each function runs once: a short cycle.
    let bench = std::env::args().any(|a| a == "--bench");
    // One more distinct token than the cache holds, used in turn: every use is a miss.
    let cycle_len = if bench { TOKEN_CACHE_CAPACITY + 1 } else { 2 };
    let cycle: Vec<String> = (0..cycle_len)
        .map(|n| {
            let mut claims = sa_claims("bench", "load");
            claims["jti"] = serde_json::json!(n);
            key.bearer(&claims)
        })
        .collect();
    let mut next = 0;
    let mut verified = || {
        next = (next + 1) % cycle.len();
        now(auth.admit("GetToken", Some(&cycle[next]), None, Some("fleet-a"))).unwrap()
    };
    let by_cert = || now(auth.admit("GetToken", None, Some(&identity), Some("fleet-a"))).unwrap();
    let by_token = || now(auth.admit("GetToken", Some(&bearer), None, Some("fleet-a"))).unwrap();
    for _ in 0..cycle.len() {
        verified();
    }
    // Verified once (after the cycle, which would have evicted it), then cached.
    assert_eq!(&*by_token(), CALLER);
    let before = auth.token_cache_counts();
    let allocations = |f: &mut dyn FnMut()| {
        allocation_counter::measure(|| {
            for _ in 0..1000 {
                f();
            }
        })
        .count_total as f64
            / 1000.0
    };
    let cert_allocs = allocations(&mut || {
        black_box(by_cert());
    });
    let token_allocs = allocations(&mut || {
        black_box(by_token());
    });
    let counts = auth.token_cache_counts();
    assert_eq!(counts.hits - before.hits, 1000, "the same token hits");
    if bench {
        println!(
            "allocations per admitted call: certificate {cert_allocs:.2}, cached token {token_allocs:.2}"
        );
    }

    let mut group = c.benchmark_group("auth");
    group.bench_function("certificate_parse_per_call_before", |b| {
        b.iter(|| peer_identity(black_box(&certs)))
    });
    group.bench_function("admit_certificate_identity", |b| b.iter(by_cert));
    group.bench_function("admit_token_cached", |b| b.iter(by_token));
    group.bench_function("admit_token_verified", |b| b.iter(&mut verified));
    group.finish();
    if bench {
        let counts = auth.token_cache_counts();
        assert!(counts.misses > 2 * cycle.len() as u64, "the cycle missed");
    }
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::auth);
}
use group::benches;
criterion_main!(benches);
