//! The sections of the summary, each measuring one thing and writing its part of the markdown:
//!
//! - `cache_hit`: the criterion cache-hit figures (run by `scripts/bench` before the harness);
//! - `throughput` (A): gRPC throughput and latency, GetToken against Health/Check;
//! - `secured` (S): the same pair over TLS with a service-account token, and with a client
//!   certificate (mTLS);
//! - `memory` (B): the broker's resident size with 1 and 100,000 accounts, and the memory probe;
//! - `single_flight` (C): upstream calls for N cold callers on one account, M cold accounts;
//! - `refresh_latency` (C iii): GetToken's p99 while refreshes run against steady state;
//! - `replicas` (R): three replicas on one Redis: propagation, warm restart, Redis costs
//!   (section A with `--store` gives the GetToken / Health ratio with the store on).

pub(crate) mod cache_hit;
pub(crate) mod memory;
pub(crate) mod refresh_latency;
pub(crate) mod replicas;
pub(crate) mod secured;
pub(crate) mod single_flight;
pub(crate) mod throughput;
