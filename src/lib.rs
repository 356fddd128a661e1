//! `bace-token-broker`: one valid BACE IoT OAuth2 token per account, shared by every internal
//! caller over gRPC.
//!
//! # Map
//!
//! - [`token`]: the domain values: account names, tokens (redacting `Debug`), fingerprints.
//! - [`config`]: the YAML schema, defaults and validation; reads secret files.
//! - [`policy`]: pure timing rules: refresh point, backoff, BACE's `expires` parsing.
//! - [`upstream`]: the only module that speaks HTTP to BACE; the [`upstream::Upstream`] trait.
//! - [`broker`]: per-account token state, single flight, refresh schedule, invalidation.
//!   Knows nothing of gRPC.
//! - [`tls`]: server TLS with live certificate rotation; the mTLS accept stream.
//! - [`auth`]: caller identity (client-certificate SAN, Kubernetes service-account token) and
//!   the per-account allow list.
//! - [`service`]: the gRPC adapter; the one place where errors become `tonic::Status`.
//! - [`metrics`]: Prometheus counters, per-account gauges and the `/metrics` endpoint.
//! - [`reload`]: live reload on SIGHUP and on changes of the config and secret files.
//! - [`app`]: wires everything into a server with health, reflection and graceful shutdown.
//! - [`fake`]: a scriptable fake of BACE's token endpoint on loopback (tests and `--demo`).
//! - [`demo`]: `serve --demo`: the fake, demo accounts and a little traffic to watch.
//! - [`cli`]: the command line (`serve`, `get`, `invalidate`, `check-config`).
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fake;
pub mod metrics;
pub mod policy;
pub mod reload;
pub mod service;
pub mod tls;
pub mod token;
pub mod upstream;

/// Generated protobuf types and gRPC stubs for `bace.tokenbroker.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("bace.tokenbroker.v1");
    // The server, answering GetToken with `crate::service::GetTokenReply` (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/server/bace.tokenbroker.v1.rs"));

    /// The encoded descriptor set of `proto/`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/token_broker_descriptor.bin"));
}
