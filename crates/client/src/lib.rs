//! A client of the BACE token broker (`bace.tokenbroker.v1.TokenBrokerService`): fetch, cache
//! and the 401 dance, done once.
//!
//! - [`BrokerClient`]: built from an endpoint with the CLI's connection options (TLS CA, client
//!   certificate and key, a service-account token file re-read when the kubelet rotates it).
//!   [`token`](BrokerClient::token) answers from a local cache while the token has more than a
//!   margin left (default 30 s); otherwise one `GetToken` call, asking for a token valid beyond
//!   the margin so that it can be cached, serves every concurrent caller of the account.
//!   [`invalidate`](BrokerClient::invalidate) reports a refused token;
//!   [`watch`](BrokerClient::watch) follows an account's token over `WatchToken`.
//! - [`BrokerAuthMiddleware`] (`reqwest-middleware`, feature `reqwest-middleware`) and
//!   [`BrokerAuthLayer`] (`tower`, feature `tower`; both on by default) set `Authorization` on
//!   every request and perform the 401 dance: on a 401 from BACE (the origin the token was
//!   sent to, not another one reached by a redirect), report the token with
//!   `Invalidate`; if the broker says BACE accepts that token (`TOKEN_VALID`, with
//!   `upstream.verify_url` configured: the account lacks a permission), hand the 401 back;
//!   otherwise send the request once more with the new token, if its body can be replayed.
//!   Never a second retry.
//! - [`Error`]: one variant per row of the broker's status table, with
//!   [`is_retryable`](Error::is_retryable). No error, `Debug` or log line carries a token.
//!
//! # Example
//!
//! A BACE API call through the middleware (here against the fake BACE and a broker in the same
//! process, which the hidden lines start):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let fake = testkit::fake(&["fleet-a"]).await;
//! # let broker = testkit::BrokerServer::ready(&testkit::BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
//! # let broker_addr = format!("http://{}", broker.addr);
//! # let api_url = fake.api_url();
//! use bace_token_broker_client::{BrokerAuthMiddleware, BrokerClient};
//!
//! let broker = BrokerClient::new(broker_addr)?; // e.g. "http://token-broker:50051"
//! let http = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(BrokerAuthMiddleware::new(broker.clone(), "fleet-a"))
//!     .build();
//! let response = http.get(&api_url).send().await?;
//! assert_eq!(response.status(), 200);
//!
//! // The token itself, from the cache (the request above fetched it).
//! let token = broker.token("fleet-a").await?;
//! assert!(token.authorization().to_str()?.starts_with("Bearer "));
//! # Ok(()) }
//! ```
//!
//! Errors carry the broker's meaning:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let fake = testkit::fake(&["fleet-a"]).await;
//! # let broker = testkit::BrokerServer::ready(&testkit::BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
//! # let broker_addr = format!("http://{}", broker.addr);
//! use bace_token_broker_client::{BrokerClient, Error};
//!
//! let broker = BrokerClient::new(broker_addr)?;
//! match broker.token("no-such-account").await {
//!     Err(Error::UnknownAccount { .. }) => {} // fix the name or the broker's config
//!     Err(e) if e.is_retryable() => {}       // back off and try again
//!     other => panic!("{other:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! # Map
//!
//! - `connect`: [`BrokerClientBuilder`], TLS, the caller's token file.
//! - `client`: [`BrokerClient`].
//! - `cache`: an account's slot: the cached token (lock-free reads) and the shared calls.
//! - `watch`: [`TokenWatch`] and the task that owns its stream.
//! - `http`: the 401 dance; `http::reqwest` ([`BrokerAuthMiddleware`]) and `http::tower`
//!   ([`BrokerAuthLayer`], [`ReplayBody`]).
//! - `token`: [`Token`] (redacting `Debug`), [`Invalidated`], [`InvalidateOutcome`].
//! - `error`: [`Error`].
//! - [`proto`]: the generated messages and tonic client (this crate's own `build.rs`, from the
//!   broker's `proto/`; it shares no code with the broker).
//!
//! Everything needs a tokio runtime: calls to the broker run as tasks of their own (so a caller
//! that gives up never cancels a call others wait for).
#![forbid(unsafe_code)]

mod cache;
mod client;
mod connect;
mod error;
#[cfg(any(feature = "reqwest-middleware", feature = "tower"))]
mod http;
pub mod proto;
mod token;
mod watch;

#[cfg(feature = "reqwest-middleware")]
pub use crate::http::reqwest::BrokerAuthMiddleware;
#[cfg(feature = "tower")]
pub use crate::http::tower::{BrokerAuth, BrokerAuthError, BrokerAuthLayer, ReplayBody};
pub use crate::{
    client::BrokerClient,
    connect::{BrokerClientBuilder, DEFAULT_ADDR},
    error::Error,
    token::{InvalidateOutcome, Invalidated, Token},
    watch::TokenWatch,
};
