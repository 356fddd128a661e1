//! The gRPC server's own metrics over the wire, as grpc-ecosystem's Prometheus interceptors
//! export them: `grpc_server_started_total`, `grpc_server_handled_total` and the
//! `grpc_server_handling_seconds` histogram, per RPC and code. A real broker and real tonic
//! clients in front of the fake BACE; waits on counters and the fake's gate, never on sleeps.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use bace_token_broker::{Config, READINESS_SERVICE, code_name, proto};
use fake_bace::Grant;
use testkit::{
    BrokerConfig, BrokerServer, Jwks, Kubernetes, fake, guard,
    pki::{self, SigningKey, sa_claims},
    user,
};
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICE: &str = "bace.tokenbroker.v1.TokenBrokerService";

/// One RPC of the service: `grpc_method` and `grpc_type`.
#[derive(Debug, Clone, Copy)]
struct Method(&'static str, &'static str);

const GET_TOKEN: Method = Method("GetToken", "unary");
const INVALIDATE: Method = Method("Invalidate", "unary");
const WATCH_TOKEN: Method = Method("WatchToken", "server_stream");
const LIST_ACCOUNTS: Method = Method("ListAccounts", "unary");
const METHODS: [Method; 4] = [GET_TOKEN, INVALIDATE, WATCH_TOKEN, LIST_ACCOUNTS];

/// The buckets of a handling-time series: 27 bounds and `+Inf`.
const BUCKETS: usize = 28;

impl Method {
    fn labels(self) -> String {
        let Method(name, kind) = self;
        format!("grpc_type=\"{kind}\",grpc_service=\"{SERVICE}\",grpc_method=\"{name}\"")
    }

    fn code_labels(self, code: &str) -> String {
        format!("{},grpc_code=\"{code}\"", self.labels())
    }
}

/// The 17 gRPC codes' names, in code order.
fn codes() -> impl Iterator<Item = &'static str> {
    (0..17).map(|i| code_name(Code::from_i32(i)))
}

/// One scrape of `/metrics` (every sample, checked well-formed by the harness).
struct Metrics(HashMap<String, f64>);

impl Metrics {
    async fn scrape(broker: &BrokerServer) -> Self {
        Self(broker.scrape().await)
    }

    fn get(&self, key: &str) -> f64 {
        *self.0.get(key).unwrap_or_else(|| panic!("no sample {key}"))
    }

    fn started(&self, m: Method) -> f64 {
        self.get(&format!("grpc_server_started_total{{{}}}", m.labels()))
    }

    fn handled(&self, m: Method, code: &str) -> f64 {
        self.get(&format!(
            "grpc_server_handled_total{{{}}}",
            m.code_labels(code)
        ))
    }

    /// Calls of `m` started and not yet handled.
    fn in_progress(&self, m: Method) -> f64 {
        self.started(m) - codes().map(|c| self.handled(m, c)).sum::<f64>()
    }

    /// The codes `m` was handled with, in code order, with their counts.
    fn handled_codes(&self, m: Method) -> Vec<(&'static str, u64)> {
        codes()
            .map(|c| (c, self.handled(m, c) as u64))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The handling histogram agrees with the handled counts: a series for each RPC and code
    /// with calls (and none for the others), its `_count` the handled calls, its buckets
    /// cumulative and non-decreasing up to `+Inf` = `_count`. Returns `(le, cumulative)` of
    /// each series, by `(method, code)`.
    fn check_histograms(&self) -> HashMap<(&'static str, &'static str), Vec<(f64, f64)>> {
        let mut series = HashMap::new();
        let mut samples = 0;
        for m in METHODS {
            for code in codes() {
                let labels = m.code_labels(code);
                let handled = self.handled(m, code);
                let count = format!("grpc_server_handling_seconds_count{{{labels}}}");
                if handled == 0.0 {
                    assert!(!self.0.contains_key(&count), "{count} without calls");
                    continue;
                }
                assert_eq!(self.get(&count), handled, "{count}");
                let sum = self.get(&format!("grpc_server_handling_seconds_sum{{{labels}}}"));
                assert!(sum >= 0.0, "{labels}: sum {sum}");
                let prefix = format!("grpc_server_handling_seconds_bucket{{{labels},le=\"");
                let mut buckets: Vec<(f64, f64)> = (self.0.iter())
                    .filter_map(|(k, v)| {
                        let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                        let le = match le {
                            "+Inf" => f64::INFINITY,
                            le => le.parse().expect("le"),
                        };
                        Some((le, *v))
                    })
                    .collect();
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                assert_eq!(buckets.len(), BUCKETS, "{labels}");
                assert_eq!(buckets[0].0, 0.0000001, "from 100 ns");
                assert_eq!(buckets[BUCKETS - 2].0, 50.0, "to fifty seconds");
                assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
                assert_eq!(buckets[BUCKETS - 1], (f64::INFINITY, handled));
                samples += BUCKETS + 2;
                series.insert((m.0, code), buckets);
            }
        }
        let all = (self.0.keys())
            .filter(|k| k.starts_with("grpc_server_handling_seconds"))
            .count();
        assert_eq!(all, samples, "no other handling series");
        series
    }
}

/// The exposition text itself (for the descriptors).
async fn exposition(broker: &BrokerServer) -> String {
    reqwest::get(format!("http://{}/metrics", broker.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn next_token(stream: &mut tonic::Streaming<proto::WatchTokenResponse>) {
    let message = guard(stream.message()).await.expect("stream ok");
    assert!(message.expect("stream open").token.is_some());
}

/// Waits until a scrape satisfies `done`; that scrape.
async fn until(broker: &BrokerServer, done: impl Fn(&Metrics) -> bool) -> Metrics {
    guard(async {
        loop {
            let m = Metrics::scrape(broker).await;
            if done(&m) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Writes `text` to `path` by rename, as a config update lands.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn every_call_is_counted_and_timed_by_method_and_code() {
    let fake = fake(&["fleet-a", "fleet-b"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    write_atomically(
        &path,
        &BrokerConfig::for_fake(&fake, &["fleet-a", "fleet-b"]).to_yaml(),
    );
    let broker = BrokerServer::start_config(Config::load(&path).unwrap()).await;
    broker
        .wait_status(READINESS_SERVICE, ServingStatus::Serving)
        .await;

    // Before any call: started and handled are described, at zero for every RPC and code (so
    // `increase()` sees each code's first call); the histogram has no series yet.
    let text = exposition(&broker).await;
    for (family, kind, help) in [
        (
            "grpc_server_started_total",
            "counter",
            "Total number of RPCs started on the server.",
        ),
        (
            "grpc_server_handled_total",
            "counter",
            "Total number of RPCs completed on the server, regardless of success or failure.",
        ),
    ] {
        let described = format!("# HELP {family} {help}\n# TYPE {family} {kind}\n");
        assert!(text.contains(&described), "{family} described:\n{text}");
    }
    assert!(!text.contains("grpc_server_handling_seconds"));
    let m = Metrics::scrape(&broker).await;
    for method in METHODS {
        assert_eq!(m.started(method), 0.0);
        assert!(m.handled_codes(method).is_empty());
        assert_eq!(codes().filter(|c| m.handled(method, c) == 0.0).count(), 17);
    }
    m.check_histograms();

    // Unary calls: OK, NOT_FOUND, INVALID_ARGUMENT.
    for _ in 0..5 {
        broker.get("fleet-a").await.unwrap();
    }
    let status = broker.get("nope").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = broker.get("").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    broker.invalidate("fleet-a", "").await.unwrap();
    let listed = broker
        .client
        .clone()
        .list_accounts(proto::ListAccountsRequest {})
        .await
        .unwrap();
    assert_eq!(listed.into_inner().accounts.len(), 2);

    // Streams: one refused, two open.
    let status = broker
        .client
        .clone()
        .watch_token(proto::WatchTokenRequest { account: "".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut left = broker.watch("fleet-a").await;
    next_token(&mut left).await;
    let mut removed = broker.watch("fleet-b").await;
    next_token(&mut removed).await;

    // While they are open, started − handled is the open streams.
    let m = Metrics::scrape(&broker).await;
    assert_eq!(m.started(WATCH_TOKEN), 3.0);
    assert_eq!(m.handled_codes(WATCH_TOKEN), [("INVALID_ARGUMENT", 1)]);
    assert_eq!(m.in_progress(WATCH_TOKEN), 2.0);
    let watchers =
        |m: &Metrics, a: &str| m.get(&format!("bace_broker_watchers{{account=\"{a}\"}}"));
    assert_eq!(watchers(&m, "fleet-a") + watchers(&m, "fleet-b"), 2.0);
    for method in [GET_TOKEN, INVALIDATE, LIST_ACCOUNTS] {
        assert_eq!(m.in_progress(method), 0.0, "{method:?}");
    }
    m.check_histograms();

    // The client goes away: CANCELLED (once the broker sees the stream reset).
    drop(left);
    let m = until(&broker, |m| m.in_progress(WATCH_TOKEN) == 1.0).await;
    assert_eq!(m.handled(WATCH_TOKEN, "CANCELLED"), 1.0);

    // fleet-b is removed from the config: its stream ends with NOT_FOUND.
    write_atomically(
        &path,
        &BrokerConfig::for_fake(&fake, &["fleet-a"]).to_yaml(),
    );
    let status = guard(removed.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let m = Metrics::scrape(&broker).await;
    let expected = [
        (
            GET_TOKEN,
            7.0,
            vec![("OK", 5), ("INVALID_ARGUMENT", 1), ("NOT_FOUND", 1)],
        ),
        (INVALIDATE, 1.0, vec![("OK", 1)]),
        (
            WATCH_TOKEN,
            3.0,
            vec![("CANCELLED", 1), ("INVALID_ARGUMENT", 1), ("NOT_FOUND", 1)],
        ),
        (LIST_ACCOUNTS, 1.0, vec![("OK", 1)]),
    ];
    for (method, started, handled) in expected {
        assert_eq!(m.started(method), started, "{method:?}");
        assert_eq!(m.handled_codes(method), handled, "{method:?}");
        assert_eq!(m.in_progress(method), 0.0, "{method:?}");
    }
    // The GetToken counts agree with the per-account family.
    assert_eq!(
        m.get("bace_broker_get_token_total{account=\"fleet-a\",code=\"OK\"}"),
        m.handled(GET_TOKEN, "OK")
    );
    let series = m.check_histograms();
    assert_eq!(series.len(), 8);
    let text = exposition(&broker).await;
    let help = "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.";
    let described = format!(
        "# HELP grpc_server_handling_seconds {help}\n# TYPE grpc_server_handling_seconds histogram\n"
    );
    assert!(text.contains(&described), "{text}");
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_call_waiting_on_bace_is_in_progress_then_timed_and_a_drained_stream_ends_ok() {
    let fake = fake(&["fleet-a"]).await;
    let config = BrokerConfig::for_fake(&fake, &["fleet-a"])
        .invalidate_cooldown(Duration::ZERO)
        .upstream_timeout(Duration::from_secs(120))
        .shutdown_grace(Duration::from_secs(120));
    let mut broker = BrokerServer::ready(&config).await;
    let mut stream = broker.watch("fleet-a").await;
    next_token(&mut stream).await;

    // An Invalidate forces a login, held at BACE: the call is in progress.
    fake.hold();
    let mut invalidation = broker.invalidations(1, "fleet-a", "");
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Password, 2)).await;
    let held = Instant::now();
    let m = Metrics::scrape(&broker).await;
    assert_eq!(m.in_progress(INVALIDATE), 1.0);
    assert_eq!(m.in_progress(WATCH_TOKEN), 1.0);
    assert!(m.handled_codes(INVALIDATE).is_empty());

    // BACE answers: the call is handled, and its time (at least as long as it was held) is
    // in the buckets above that.
    let waited = held.elapsed().as_secs_f64();
    fake.release();
    guard(invalidation.join_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    next_token(&mut stream).await; // the new login's token
    let m = Metrics::scrape(&broker).await;
    assert_eq!(m.handled_codes(INVALIDATE), [("OK", 1)]);
    let series = m.check_histograms();
    let buckets = &series[&("Invalidate", "OK")];
    let below = buckets.iter().rfind(|(le, _)| *le < waited);
    assert_eq!(
        below.map_or(0.0, |(_, n)| *n),
        0.0,
        "{waited} s: {buckets:?}"
    );
    let labels = INVALIDATE.code_labels("OK");
    let sum = m.get(&format!("grpc_server_handling_seconds_sum{{{labels}}}"));
    assert!(sum >= waited, "{sum} < {waited}");

    // Another held call keeps the server (and /metrics) up through the drain: shutdown
    // begins, the broker drains, the stream ends with OK.
    fake.hold();
    let mut invalidation = broker.invalidations(1, "fleet-a", "");
    guard(fake.wait_for_calls(&user("fleet-a"), Grant::Password, 3)).await;
    broker.begin_stop();
    assert!(guard(stream.message()).await.unwrap().is_none());
    let m = Metrics::scrape(&broker).await;
    assert_eq!(m.handled_codes(WATCH_TOKEN), [("OK", 1)]);
    assert_eq!(m.in_progress(WATCH_TOKEN), 0.0);
    assert_eq!(m.in_progress(INVALIDATE), 1.0);
    m.check_histograms();
    fake.release();
    guard(invalidation.join_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn refused_calls_are_started_and_handled_with_their_code() {
    let fake = fake(&["fleet-a", "fleet-b"]).await;
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::es256("k1");
    let config = BrokerConfig::for_fake(&fake, &["fleet-a", "fleet-b"])
        .kubernetes(Kubernetes::new(
            pki::ISSUER,
            Jwks::File(key.jwks_file(dir.path())),
        ))
        .allow("system:serviceaccount:ingest:worker", &["fleet-b"]);
    let broker = BrokerServer::ready(&config).await;
    let worker = key.bearer(&sa_claims("ingest", "worker"));
    let with = |bearer: Option<&str>, account: &str| {
        let mut request = Request::new(proto::GetTokenRequest {
            account: account.into(),
            min_validity: None,
        });
        if let Some(b) = bearer {
            let value = b.parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        request
    };
    let mut client = broker.client.clone();
    let status = client.get_token(with(None, "fleet-a")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = (client
        .get_token(with(Some(worker.as_str()), "fleet-a"))
        .await)
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    client
        .get_token(with(Some(worker.as_str()), "fleet-b"))
        .await
        .unwrap();
    let mut watch = Request::new(proto::WatchTokenRequest {
        account: "fleet-a".into(),
    });
    let value = worker.parse().unwrap();
    watch.metadata_mut().insert("authorization", value);
    let status = client.watch_token(watch).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = (client.list_accounts(proto::ListAccountsRequest {}).await).unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let m = Metrics::scrape(&broker).await;
    let expected = [
        (
            GET_TOKEN,
            vec![("OK", 1), ("PERMISSION_DENIED", 1), ("UNAUTHENTICATED", 1)],
        ),
        (INVALIDATE, vec![]),
        (WATCH_TOKEN, vec![("PERMISSION_DENIED", 1)]),
        (LIST_ACCOUNTS, vec![("UNAUTHENTICATED", 1)]),
    ];
    for (method, handled) in expected {
        let calls: u64 = handled.iter().map(|(_, n)| n).sum();
        assert_eq!(m.handled_codes(method), handled, "{method:?}");
        assert_eq!(m.started(method), calls as f64, "{method:?}");
    }
    m.check_histograms();
    broker.stop().await.unwrap();
}
