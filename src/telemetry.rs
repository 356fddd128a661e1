//! Prometheus export: reads, at scrape time, what each module counts of its own work (the
//! broker's accounts and upstream requests, the gRPC service's calls and their handling, the
//! authorizer's denials, the reloader's outcomes) and serves it as `GET /metrics` (classic
//! Prometheus text format 0.0.4). Depends on those modules; none of them knows it exists.
//!
//! Label values are bounded: accounts come from the config (unknown or malformed names asked
//! for by callers are all `(unknown)`), codes, reasons, outcomes and RPCs are fixed sets.

use std::{borrow::Borrow, fmt, sync::Arc, time::SystemTime};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
        NoLabelSet,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    auth::Authorizer,
    broker::{AccountState, AccountStatus, Broker},
    counts::HistogramSnapshot,
    grpc::{CallCount, CallCounts, Rpc, RpcHandling},
    reload::ReloadCounts,
    store::Store,
    token::AccountName,
    upstream::{Call, Grant},
};

/// Everything `/metrics` reports on.
pub struct Sources {
    /// The broker: per-account state and counts, upstream requests.
    pub broker: Broker,
    /// The gRPC service's call counts.
    pub calls: Arc<CallCounts>,
    /// The authorizer, when auth is on (its denials).
    pub auth: Option<Authorizer>,
    /// Config reloads by outcome.
    pub reloads: Arc<ReloadCounts>,
}

impl Sources {
    /// A registry that reads these sources at each scrape.
    pub fn registry(self) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        registry
    }
}

/// An account label: a configured account, or `(unknown)` for names no account has.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AccountLabel(Option<AccountName>);

impl EncodeLabelValue for AccountLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        use fmt::Write;
        match &self.0 {
            Some(name) => encoder.write_str(name.as_str()),
            None => encoder.write_str("(unknown)"),
        }
    }
}

fn known(name: &AccountName) -> AccountLabel {
    AccountLabel(Some(name.clone()))
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    account: AccountLabel,
    code: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    account: AccountLabel,
    outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamLabels {
    account: AccountLabel,
    grant: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GrantLabels {
    grant: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AccountLabels {
    account: AccountLabel,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    account: AccountLabel,
    state: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    outcome: &'static str,
}

/// The labels of grpc-ecosystem's Prometheus interceptors, in their order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcCodeLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

fn rpc_labels(rpc: Rpc) -> RpcLabels {
    RpcLabels {
        grpc_type: rpc.kind(),
        grpc_service: Rpc::SERVICE,
        grpc_method: rpc.name(),
    }
}

fn rpc_code_labels(rpc: Rpc, grpc_code: &'static str) -> RpcCodeLabels {
    RpcCodeLabels {
        grpc_type: rpc.kind(),
        grpc_service: Rpc::SERVICE,
        grpc_method: rpc.name(),
        grpc_code,
    }
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sources")
    }
}

/// Whether a family without series is described (`# HELP`, `# TYPE`) or left out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Empty {
    /// Always described (the per-account families, computed at each scrape).
    Describe,
    /// Left out until it has a series (the event counts).
    Omit,
}

/// Encodes a counter family from `(labels, count)` pairs.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    empty: Empty,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), fmt::Error> {
    let mut series = series.into_iter().peekable();
    if empty == Empty::Omit && series.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, n) in series {
        ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes a gauge family from `(labels, value)` pairs.
fn gauges<L: EncodeLabelSet, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, V)>,
) -> Result<(), fmt::Error>
where
    ConstGauge<V>: EncodeMetric,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes a histogram family from `(labels, reading)` pairs; left out while it has none.
fn histograms<L: EncodeLabelSet, H: Borrow<HistogramSnapshot>>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, H)>,
) -> Result<(), fmt::Error> {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in series {
        let h = h.borrow();
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
    }
    Ok(())
}

fn call_series(calls: Vec<CallCount>) -> impl Iterator<Item = (AccountLabel, &'static str, u64)> {
    calls
        .into_iter()
        .map(|c| (AccountLabel(c.account), c.label, c.count))
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let e = &mut encoder;
        let accounts = self.broker.status();
        // The event counts first, then the per-account families (the order of earlier
        // releases).
        let label = |a: &AccountStatus| AccountLabels {
            account: known(&a.account),
        };

        counters(
            e,
            "bace_broker_invalidate",
            "Invalidate calls by account and outcome.",
            Empty::Omit,
            call_series(self.calls.invalidations())
                .map(|(account, outcome, n)| (OutcomeLabels { account, outcome }, n)),
        )?;

        histograms(
            e,
            "bace_broker_upstream_request_duration_seconds",
            "Duration of requests to BACE's token endpoint, by grant.",
            (self.broker.upstream_durations().into_iter())
                .filter(|(_, h)| h.count > 0)
                .map(|(grant, h)| {
                    let labels = GrantLabels {
                        grant: Call::Grant(grant).as_str(),
                    };
                    (labels, h)
                }),
        )?;
        counters(
            e,
            "bace_broker_singleflight_waiters",
            "Callers that joined a token fetch already in flight.",
            Empty::Omit,
            self.broker
                .singleflight_joins()
                .into_iter()
                .map(|(account, n)| {
                    (
                        AccountLabels {
                            account: known(&account),
                        },
                        n,
                    )
                }),
        )?;
        counters(
            e,
            "bace_broker_config_reloads",
            "Config reloads by outcome.",
            Empty::Omit,
            self.reloads
                .snapshot()
                .into_iter()
                .map(|(outcome, n)| (ReloadLabels { outcome }, n)),
        )?;
        counters(
            e,
            "bace_broker_auth_denied",
            "Calls refused for want of an identity or permission, by reason.",
            Empty::Omit,
            self.auth
                .iter()
                .flat_map(Authorizer::denials)
                .map(|(reason, n)| (ReasonLabels { reason }, n)),
        )?;
        counters(
            e,
            "bace_broker_auth_token_cache",
            "Service-account tokens answered from the cache of verified tokens (hit) or verified (miss).",
            Empty::Omit,
            self.auth
                .iter()
                .map(Authorizer::token_cache_counts)
                .flat_map(|c| [("hit", c.hits), ("miss", c.misses)])
                .filter(|(_, n)| *n > 0)
                .map(|(result, n)| (ResultLabels { result }, n)),
        )?;

        // Families computed from the accounts at each scrape (always described).
        // GetToken: the accounts' served counts (code OK), then the service's failures.
        let served = accounts.iter().filter(|a| a.counts.served > 0).map(|a| {
            let labels = CallLabels {
                account: known(&a.account),
                code: "OK",
            };
            (labels, a.counts.served)
        });
        let failed = call_series(self.calls.get_token_failures())
            .map(|(account, code, n)| (CallLabels { account, code }, n));
        counters(
            e,
            "bace_broker_get_token",
            "GetToken calls by account and gRPC code.",
            Empty::Describe,
            served.chain(failed),
        )?;
        // Upstream requests: the accounts' successful grants, then the rest.
        let ok = accounts.iter().flat_map(|a| {
            [
                (Grant::Password, a.counts.logins),
                (Grant::Refresh, a.counts.refreshes),
            ]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(grant, n)| {
                let labels = UpstreamLabels {
                    account: known(&a.account),
                    grant: grant.as_str(),
                    outcome: "ok",
                };
                (labels, n)
            })
        });
        let rest = self.broker.upstream_counts().into_iter().map(|u| {
            let labels = UpstreamLabels {
                account: known(&u.account),
                grant: u.call.as_str(),
                outcome: u.outcome,
            };
            (labels, u.count)
        });
        counters(
            e,
            "bace_broker_upstream_requests",
            "Requests to BACE's token endpoint by account, grant and outcome.",
            Empty::Describe,
            ok.chain(rest),
        )?;
        // Per-account gauges.
        gauges(
            e,
            "bace_broker_token_valid",
            "1 while the account holds a token that is served (valid beyond the expiry margin).",
            accounts
                .iter()
                .map(|a| (label(a), i64::from(!a.survives_outage_for.is_zero()))),
        )?;
        gauges(
            e,
            "bace_broker_token_expiry_timestamp_seconds",
            "When the account's current token expires (Unix time); absent without a token.",
            accounts.iter().filter_map(|a| {
                let at = a.expires_at?;
                let seconds = at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                Some((label(a), seconds))
            }),
        )?;
        gauges(
            e,
            "bace_broker_survives_outage_seconds",
            "How long callers stay served if BACE stays down from now.",
            accounts
                .iter()
                .map(|a| (label(a), a.survives_outage_for.as_secs_f64())),
        )?;
        gauges(
            e,
            "bace_broker_watchers",
            "WatchToken streams open on the account.",
            accounts.iter().map(|a| (label(a), a.watchers as i64)),
        )?;
        gauges(
            e,
            "bace_broker_account_state",
            "1 for the account's current state (ready, refreshing, degraded, failing, rejected).",
            accounts.iter().flat_map(|a| {
                AccountState::ALL.into_iter().map(move |s| {
                    let labels = StateLabels {
                        account: known(&a.account),
                        state: s.as_str(),
                    };
                    (labels, i64::from(a.state == s))
                })
            }),
        )?;
        if let Some(store) = self.broker.store() {
            self.store(e, store)?;
        }
        grpc_server(e, &self.calls.handling())
    }
}

impl Sources {
    /// The shared store's families (only with a `store` configured).
    fn store(&self, e: &mut DescriptorEncoder, store: &Store) -> Result<(), fmt::Error> {
        let counts = store.counts();
        gauges(
            e,
            "bace_broker_store_up",
            "1 while the shared store (Redis) answers; 0 while it does not, or before the first answer.",
            [(NoLabels {}, i64::from(store.is_up() == Some(true)))],
        )?;
        counters(
            e,
            "bace_broker_store_operations",
            "Operations on the shared store by operation and outcome (ok, or the error class).",
            Empty::Describe,
            counts
                .operations
                .iter()
                .map(|(op, outcome, n)| (StoreOpLabels { op, outcome }, *n)),
        )?;
        counters(
            e,
            "bace_broker_store_leases",
            "Fetch leases by result: acquired, contended (another replica held it), lost (it ended before the fetch did).",
            Empty::Describe,
            [
                ("acquired", counts.leases_acquired),
                ("contended", counts.leases_contended),
                ("lost", counts.leases_lost),
            ]
            .map(|(result, n)| (ResultLabels { result }, n)),
        )?;
        counters(
            e,
            "bace_broker_store_version_conflicts",
            "Token writes refused because the store held the same or a newer version.",
            Empty::Describe,
            [(NoLabels {}, counts.version_conflicts)],
        )?;
        counters(
            e,
            "bace_broker_store_unreadable_records",
            "Stored records this replica could not read, by reason (unknown_key, tampered).",
            Empty::Describe,
            [
                ("unknown_key", counts.unknown_key_records),
                ("tampered", counts.tampered_records),
            ]
            .map(|(reason, n)| (ReasonLabels { reason }, n)),
        )?;
        counters(
            e,
            "bace_broker_store_reconcile_corrections",
            "Accounts a reconcile corrected, by kind (adopted: took the store's newer token; written_back: wrote this replica's token).",
            Empty::Describe,
            self.broker
                .store_reconciles()
                .into_iter()
                .map(|(result, n)| (ResultLabels { result }, n)),
        )?;
        counters(
            e,
            "bace_broker_store_announcements",
            "Announcements of new tokens received from the store's channel.",
            Empty::Describe,
            [(NoLabels {}, counts.announcements_received)],
        )?;
        counters(
            e,
            "bace_broker_store_subscriptions",
            "Subscriptions to the announcement channel (the first, and each after a loss).",
            Empty::Describe,
            [(NoLabels {}, counts.subscriptions)],
        )?;
        histograms(
            e,
            "bace_broker_store_propagation_seconds",
            "From another replica storing a new token to this replica serving it (wall clocks of both).",
            [(NoLabels {}, self.broker.store_propagation())],
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NoLabels {}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StoreOpLabels {
    op: &'static str,
    outcome: &'static str,
}

/// The gRPC server's families, named, labelled and described as grpc-ecosystem's Prometheus
/// interceptors (go-grpc-prometheus, go-grpc-middleware's providers/prometheus) do, so their
/// dashboards and alerts apply. Started and handled are described from the first scrape, with
/// a zero for every RPC and every code, as the interceptors' `InitializeMetrics` does: a
/// code's first call then shows in `increase()`, and started − handled (the calls in
/// progress) is defined before any call. The handling histogram (labelled by code too, which
/// theirs is not: a failure's latency is not a success's) has the series with calls only.
fn grpc_server(e: &mut DescriptorEncoder, handling: &[RpcHandling]) -> Result<(), fmt::Error> {
    counters(
        e,
        "grpc_server_started",
        "Total number of RPCs started on the server.",
        Empty::Describe,
        handling.iter().map(|h| (rpc_labels(h.rpc), h.started)),
    )?;
    let handled = || {
        handling.iter().flat_map(|h| {
            (h.handled.iter()).map(move |(code, reading)| (rpc_code_labels(h.rpc, code), reading))
        })
    };
    counters(
        e,
        "grpc_server_handled",
        "Total number of RPCs completed on the server, regardless of success or failure.",
        Empty::Describe,
        handled().map(|(labels, reading)| (labels, reading.count)),
    )?;
    histograms(
        e,
        "grpc_server_handling_seconds",
        "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
        handled().filter(|(_, reading)| reading.count > 0),
    )
}

/// Serves `GET /metrics` from `registry` on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new(registry));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut body, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
