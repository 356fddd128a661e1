//! The generated `bace.tokenbroker.v1` messages and the tonic client
//! ([`token_broker_service_client::TokenBrokerServiceClient`]), for callers that want the raw
//! API. Built from the broker's `proto/` by this crate's `build.rs`.
#![allow(missing_docs, unreachable_pub, clippy::all)]

tonic::include_proto!("bace.tokenbroker.v1");
