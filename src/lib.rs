//! `bace-token-broker`: one valid BACE IoT OAuth2 token per account, shared by every internal
//! caller over gRPC.
//!
//! # Map
//!
//! Dependencies run down this list: a module imports only modules below it, so the core never
//! imports an adapter and no module imports one that imports it.
//!
//! Entry points:
//! - `cli`: the command line (`serve`, `get`, `invalidate`, `status`, `check-config`,
//!   `gen-store-key`).
//! - `demo` (feature `demo`, on by default): `serve --demo`: the fake BACE, demo accounts and
//!   a little traffic.
//! - `app`: builds every part, then runs the servers; owns the one shutdown sequence.
//!
//! Adapters around the core:
//! - `telemetry`: the Prometheus registry and `GET /metrics`, reading what each module counts
//!   of its own work (nothing depends on it).
//! - `reload`: live reload on SIGHUP and on changes of the config and secret files; prepares
//!   every section, then applies all or nothing.
//! - `grpc`: the tonic service; the one place where errors become `tonic::Status`es; the
//!   direct GetToken encoder ([`GetTokenReply`]).
//! - `auth`: caller identity (client-certificate SAN, Kubernetes service-account token, the
//!   cache of verified tokens), the allow list, the admission of a request ([`Authorizer`]).
//! - `tls`: server TLS with live certificate rotation; the accept stream ([`TlsAcceptor`]).
//!
//! The core:
//! - `broker`: per-account token state, single flight, the refresh schedule, invalidation,
//!   watchers, status and its own counts ([`Broker`]). No transport, registry or exporter type;
//!   where a token lives is one type (`broker::slot::TokenCell`), the seam for a shared store.
//! - `upstream`: the core's port to BACE (the [`Upstream`] trait, answers and errors) and the
//!   one implementation that speaks HTTP ([`HttpUpstream`]).
//! - `store`: what replicas share through Redis ([`Store`]): per-account fetch leases, the
//!   encrypted and versioned token records, announcements of new tokens, the shared backoff
//!   and invalidation cooldown, with its own counts. Built only with a `store` section.
//!
//! Below everything:
//! - [`config`]: the YAML schema of every section, defaults and validation; reads secret
//!   files, TLS material and JWKS documents. Depends on no runtime module.
//! - `token`: the domain values: account names, tokens (redacting `Debug`), fingerprints.
//! - `counts`: the plain counters modules keep of their own work.
//! - [`proto`]: the generated `bace.tokenbroker.v1` types and stubs.
//! - `fuzzing` (feature `fuzzing`, hidden): the private parsers the fuzz targets in `fuzz/`
//!   call; every other parser is fuzzed through the public API.
//!
//! Test equipment lives outside the product: `crates/fake-bace` (a fake BACE on loopback,
//! also behind `serve --demo`), `crates/testkit` (the in-process harness, test PKI, the typed
//! config builder, in-process upstreams; dev-only), `crates/bace-wire` (what the broker's
//! client and the fake both speak), `crates/bench` (the benchmark suite).
#![forbid(unsafe_code)]

mod app;
mod auth;
mod broker;
mod cli;
pub mod config;
mod counts;
#[cfg(feature = "demo")]
mod demo;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod grpc;
mod reload;
mod store;
mod telemetry;
mod tls;
mod token;
mod upstream;

pub use crate::{
    app::{Listeners, READINESS_SERVICE, serve, serve_with, shutdown_signal},
    auth::{
        AuthError, Authorizer, Denied, MAX_CACHED_TOKEN_BYTES, PreparedAuth, TOKEN_CACHE_CAPACITY,
        TOKEN_CACHE_TTL, TokenCacheCounts,
    },
    broker::{
        AccountCounts, AccountState, AccountStatus, Broker, BrokerError, InvalidateOutcome,
        Invalidated, Refresher, Reloaded, TokenStream, TokenWatch, UpstreamCount, WarmUp,
    },
    cli::{Cli, run, status_table},
    config::{AccountConfig, Config, ConfigError, Credentials},
    grpc::{CallCount, CallCounts, GetTokenReply, TokenBrokerApi, WatchResponses, code_name},
    reload::{DEBOUNCE, ReloadCounts, Reloader},
    store::{
        Acquired, Announcement, Backoff, BackoffKind, Backoffs, Head, Invalidation, Lease,
        LeaseKept, MAX_VERSION, READ_BATCH, RECORD_LINGER, Record, Store, StoreCounts, StoreError,
        StoreErrorKind, StoreEvent, Stored, Subscription, Unreadable, Written,
    },
    telemetry::Sources as TelemetrySources,
    tls::{
        HANDSHAKE_TIMEOUT, PreparedTls, TlsAcceptor, TlsConn, TlsConnInfo, TlsError, incoming,
        peer_identity,
    },
    token::{AccountName, AccountNameError, Fingerprint, MAX_ACCOUNT_NAME_LEN, Token},
    upstream::{
        BoxFuture, Call, Grant, HttpUpstream, Issued, MAX_BODY_BYTES, MAX_RETRY_AFTER, Upstream,
        UpstreamError, parse_answer,
    },
};

/// The property tests' config: 256 cases from a fixed seed, so the normal test run is
/// deterministic; `PROPTEST_CASES` and `PROPTEST_RNG_SEED` explore further.
#[cfg(test)]
fn proptest_config() -> proptest::test_runner::Config {
    let mut config = proptest::test_runner::Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 256;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = proptest::test_runner::RngSeed::Fixed(0x00b4_ce5e);
    }
    config
}

/// Generated protobuf types and gRPC stubs for `bace.tokenbroker.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("bace.tokenbroker.v1");
    // The server, answering GetToken with `crate::grpc::GetTokenReply` (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/server/bace.tokenbroker.v1.rs"));

    /// The encoded descriptor set of `proto/`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/token_broker_descriptor.bin"));
}
