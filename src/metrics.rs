//! Prometheus metrics: the counters and histograms the broker and the gRPC service record,
//! the per-account gauges read from the broker at scrape time, and the `GET /metrics`
//! endpoint (classic Prometheus text format 0.0.4).
//!
//! Label values are bounded: accounts come from the config (unknown or malformed names asked
//! for by callers are all counted as `(unknown)`), codes and outcomes are fixed sets.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{
        MetricType,
        counter::ConstCounter,
        counter::Counter,
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    broker::{AccountState, AccountStatus, Broker},
    token::AccountName,
    upstream::GrantType,
};

/// An account's counts of its common outcomes, kept with the account rather than in a label
/// map: a map entry per account and outcome costs ~100 bytes, which 100,000 accounts turn into
/// tens of megabytes, and the map lookup would sit on the GetToken hot path. Exported as the
/// `code="OK"` series of `bace_broker_get_token_total` and the `outcome="ok"` series of
/// `bace_broker_upstream_requests_total` (password and refresh grants).
#[derive(Debug, Default)]
pub struct AccountCounters {
    served: AtomicU64,
    logins: AtomicU64,
    refreshes: AtomicU64,
}

/// A reading of [`AccountCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountCounts {
    /// GetToken calls answered with a token.
    pub served: u64,
    /// Password grants that succeeded.
    pub logins: u64,
    /// Refresh grants that succeeded.
    pub refreshes: u64,
}

impl AccountCounters {
    /// Counts a token handed to a caller.
    pub fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> AccountCounts {
        AccountCounts {
            served: self.served.load(Ordering::Relaxed),
            logins: self.logins.load(Ordering::Relaxed),
            refreshes: self.refreshes.load(Ordering::Relaxed),
        }
    }

    /// Adds `old`'s counts (the slot this one replaces), so counters stay monotonic.
    pub fn carry_over(&self, old: &AccountCounters) {
        let old = old.snapshot();
        self.served.fetch_add(old.served, Ordering::Relaxed);
        self.logins.fetch_add(old.logins, Ordering::Relaxed);
        self.refreshes.fetch_add(old.refreshes, Ordering::Relaxed);
    }
}

/// An account label: a configured account, or `(unknown)` for names no account has.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AccountLabel {
    /// A configured account.
    Known(AccountName),
    /// A name the caller sent that is not configured (or not valid).
    Unknown,
}

impl EncodeLabelValue for AccountLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        use fmt::Write;
        match self {
            AccountLabel::Known(name) => encoder.write_str(name.as_str()),
            AccountLabel::Unknown => encoder.write_str("(unknown)"),
        }
    }
}

/// `{account, code}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CallLabels {
    /// The account.
    pub account: AccountLabel,
    /// The gRPC status code name (`OK`, `NOT_FOUND`, ...).
    pub code: &'static str,
}

/// `{account, outcome}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The account.
    pub account: AccountLabel,
    /// What happened.
    pub outcome: &'static str,
}

/// `{account, grant, outcome}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The account.
    pub account: AccountLabel,
    /// `password`, `refresh_token` or `verify`.
    pub grant: &'static str,
    /// `ok`, or the failure class (`rejected`, `upstream timeout`, ...).
    pub outcome: &'static str,
}

/// `{grant}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GrantLabels {
    /// `password` or `refresh_token`.
    pub grant: &'static str,
}

/// `{account}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AccountLabels {
    /// The account.
    pub account: AccountLabel,
}

/// `{account, state}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabels {
    /// The account.
    pub account: AccountLabel,
    /// The state name.
    pub state: &'static str,
}

/// `{reason}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why (`no identity`, `expired token`, ..., `not allowed`).
    pub reason: &'static str,
}

/// `{outcome}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok`, `rejected` (invalid new config) or `unchanged`.
    pub outcome: &'static str,
}

/// The broker's counters and histograms. Cheap to clone; recording never blocks for long
/// (a read lock on a label map, a write lock only the first time a label set is seen).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// GetToken calls by account and status code, except `OK` (see [`AccountCounters`]).
    pub get_token: Family<CallLabels, Counter>,
    /// Invalidate calls by account and outcome.
    pub invalidate: Family<OutcomeLabels, Counter>,
    /// Requests to BACE's token endpoint by account, grant and outcome, except successful
    /// password and refresh grants (see [`AccountCounters`]); record with
    /// [`Metrics::upstream_request`].
    upstream_requests: Family<UpstreamLabels, Counter>,
    /// Duration of requests to BACE's token endpoint by grant.
    pub upstream_duration: Family<GrantLabels, Histogram, fn() -> Histogram>,
    /// Callers that joined a fetch already in flight.
    pub singleflight_waiters: Family<AccountLabels, Counter>,
    /// Config reloads by outcome.
    pub config_reloads: Family<ReloadLabels, Counter>,
    /// Calls refused for want of an identity or permission, by reason.
    pub auth_denied: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    // 5 ms .. ~20 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        Self {
            get_token: Family::default(),
            invalidate: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(duration_histogram),
            singleflight_waiters: Family::default(),
            config_reloads: Family::default(),
            auth_denied: Family::default(),
        }
    }

    /// A registry holding these metrics and `broker`'s per-account gauges.
    pub fn registry(&self, broker: Broker) -> Registry {
        let mut r = Registry::default();
        r.register(
            "bace_broker_invalidate",
            "Invalidate calls by account and outcome",
            self.invalidate.clone(),
        );
        r.register(
            "bace_broker_upstream_request_duration_seconds",
            "Duration of requests to BACE's token endpoint, by grant",
            self.upstream_duration.clone(),
        );
        r.register(
            "bace_broker_singleflight_waiters",
            "Callers that joined a token fetch already in flight",
            self.singleflight_waiters.clone(),
        );
        r.register(
            "bace_broker_config_reloads",
            "Config reloads by outcome",
            self.config_reloads.clone(),
        );
        r.register(
            "bace_broker_auth_denied",
            "Calls refused for want of an identity or permission, by reason",
            self.auth_denied.clone(),
        );
        r.register_collector(Box::new(AccountGauges(broker)));
        r
    }

    /// Counts one request to BACE's token endpoint for `account`.
    pub fn upstream_request(
        &self,
        counters: &AccountCounters,
        account: &AccountName,
        grant: GrantType,
        outcome: &'static str,
    ) {
        match (grant, outcome) {
            (GrantType::Password, "ok") => counters.logins.fetch_add(1, Ordering::Relaxed),
            (GrantType::Refresh, "ok") => counters.refreshes.fetch_add(1, Ordering::Relaxed),
            _ => self
                .upstream_requests
                .get_or_create(&UpstreamLabels {
                    account: AccountLabel::Known(account.clone()),
                    grant: grant.as_str(),
                    outcome,
                })
                .inc(),
        };
    }
}

/// Per-account gauges, computed from the broker's state at scrape time.
struct AccountGauges(Broker);

impl fmt::Debug for AccountGauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccountGauges")
    }
}

impl Collector for AccountGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let accounts = self.0.status();
        let metrics = self.0.metrics();
        let known = |a: &AccountStatus| AccountLabel::Known(a.account.clone());
        let label = |a: &AccountStatus| AccountLabels { account: known(a) };
        {
            // One metric family from two sources: the accounts' OK counts, then the map of
            // the other codes (disjoint label sets).
            let mut calls = encoder.encode_descriptor(
                "bace_broker_get_token",
                "GetToken calls by account and gRPC code.",
                None,
                MetricType::Counter,
            )?;
            for a in accounts.iter().filter(|a| a.counts.served > 0) {
                let labels = CallLabels {
                    account: known(a),
                    code: "OK",
                };
                ConstCounter::new(a.counts.served).encode(calls.encode_family(&labels)?)?;
            }
            metrics.get_token.encode(calls)?;
        }
        {
            let mut upstream = encoder.encode_descriptor(
                "bace_broker_upstream_requests",
                "Requests to BACE's token endpoint by account, grant and outcome.",
                None,
                MetricType::Counter,
            )?;
            for a in &accounts {
                for (grant, n) in [
                    (GrantType::Password, a.counts.logins),
                    (GrantType::Refresh, a.counts.refreshes),
                ] {
                    if n == 0 {
                        continue;
                    }
                    let labels = UpstreamLabels {
                        account: known(a),
                        grant: grant.as_str(),
                        outcome: "ok",
                    };
                    ConstCounter::new(n).encode(upstream.encode_family(&labels)?)?;
                }
            }
            metrics.upstream_requests.encode(upstream)?;
        }
        {
            let mut valid = encoder.encode_descriptor(
                "bace_broker_token_valid",
                "1 while the account holds a token that is served (valid beyond the expiry margin).",
                None,
                MetricType::Gauge,
            )?;
            for a in &accounts {
                let served = !a.survives_outage_for.is_zero();
                ConstGauge::new(i64::from(served)).encode(valid.encode_family(&label(a))?)?;
            }
        }
        {
            let mut expiry = encoder.encode_descriptor(
                "bace_broker_token_expiry_timestamp_seconds",
                "When the account's current token expires (Unix time); absent without a token.",
                None,
                MetricType::Gauge,
            )?;
            for a in &accounts {
                let Some(at) = a.expires_at else { continue };
                let seconds = at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                ConstGauge::new(seconds).encode(expiry.encode_family(&label(a))?)?;
            }
        }
        {
            let mut survives = encoder.encode_descriptor(
                "bace_broker_survives_outage_seconds",
                "How long callers stay served if BACE stays down from now.",
                None,
                MetricType::Gauge,
            )?;
            for a in &accounts {
                ConstGauge::new(a.survives_outage_for.as_secs_f64())
                    .encode(survives.encode_family(&label(a))?)?;
            }
        }
        {
            let mut watchers = encoder.encode_descriptor(
                "bace_broker_watchers",
                "WatchToken streams open on the account.",
                None,
                MetricType::Gauge,
            )?;
            for a in &accounts {
                ConstGauge::new(a.watchers as i64).encode(watchers.encode_family(&label(a))?)?;
            }
        }
        let mut state = encoder.encode_descriptor(
            "bace_broker_account_state",
            "1 for the account's current state (ready, refreshing, degraded, failing, rejected).",
            None,
            MetricType::Gauge,
        )?;
        for a in &accounts {
            for s in AccountState::ALL {
                let labels = StateLabels {
                    account: known(a),
                    state: s.as_str(),
                };
                ConstGauge::new(i64::from(a.state == s)).encode(state.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Serves `GET /metrics` from `registry` on `listener` until `shutdown` resolves.
pub async fn serve(
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
