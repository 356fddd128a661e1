//! Test equipment of bace-token-broker, kept out of the product (dev-dependency only):
//!
//! - `harness`: a real broker server on loopback in front of the fake BACE, real tonic clients,
//!   the readiness check of a broker process (`is_ready`), and the hang guard;
//! - `config`: [`BrokerConfig`], the typed builder that writes every test's broker YAML;
//! - `pki`: test certificates (rcgen) and Kubernetes-style service-account tokens;
//! - `upstream`: in-process upstreams ([`InstantUpstream`], [`ScriptedUpstream`]);
//! - `replica`: [`Replica`], a broker process (several make a cluster on one Redis);
//! - `redis_server`: [`RedisServer`], a private `redis-server` per test (stop, restart, pause,
//!   killing subscribers, dumping every key).
//!
//! The fake BACE itself is `fake-bace` (also used by the broker's demo).
#![forbid(unsafe_code)]
#![allow(missing_docs)]

pub mod config;
mod harness;
pub mod pki;
mod redis_server;
mod replica;
pub mod upstream;

pub use fake_bace;

pub use self::{
    config::{Account, BrokerConfig, Jwks, Kubernetes, RedisStore},
    harness::*,
    redis_server::{RedisServer, RedisTls},
    replica::{REPLICA_READY_WITHIN, Replica, free_port},
    upstream::{Answer, CallOutcome, CallRecord, InstantUpstream, ScriptedUpstream},
};

/// The OAuth2 client id of the harness's accounts.
pub const CLIENT_ID: &str = "client-1";
/// The OAuth2 client secret of the harness's accounts.
pub const CLIENT_SECRET: &str = "client-secret-X7";

/// The password of the harness's account `account`.
pub fn password(account: &str) -> String {
    format!("pw-{account}-Zq9")
}
