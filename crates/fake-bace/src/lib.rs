//! A scriptable fake of BACE's OAuth2 token endpoint, served on loopback.
//!
//! This crate owns [`FakeBace`]: a small axum server that speaks the token protocol described in
//! BACE's authentication doc (`POST /oauth2/token` with a password or a refresh grant, plus one
//! two API endpoints: `GET|POST /api/v2/physical-device`, `200 []` for a valid token and `401`
//! otherwise, and `GET|POST /api/v2/restricted`, `401` for every token, as for an account that
//! lacks a permission). The integration tests and `serve --demo` use it in place of the real BACE.
//!
//! What it models:
//!
//! - **Password grant**: a form with `client_id`, `client_secret`, `grant_type=password`,
//!   `username` and `password` issues a fresh access token (valid for the account's
//!   [`FakeAccount::login_lifetime`]) and a refresh token bound to it.
//! - **Refresh grant**: `Authorization: Bearer <access token>` plus a form with `refresh_token`,
//!   `client_secret`, `client_id` and `grant_type=refresh_token`. Depending on the account's
//!   [`RefreshStyle`], BACE-style (the same access token is extended and the answer is
//!   `{"refreshed": true, "expires": "YYYY-MM-DD HH:MM:SS"}` in local time) or standard OAuth2
//!   style (a new access token replaces the old one).
//! - **Errors** in BACE's Yii shape (`{"name","message","code","status"}`) or the OAuth2 shape
//!   (`{"error","error_description"}`), see [`ErrorShape`].
//!
//! What tests can control: scripted answers per account and grant ([`FakeBace::script`]), a global
//! outage ([`FakeBace::set_outage`]), a gate that holds every token request
//! ([`FakeBace::hold`]/[`FakeBace::release`]), call counters with async waiters
//! ([`FakeBace::wait_for_calls`]), the last request received per account and grant
//! ([`FakeBace::last_request`]) and direct access to the token table ([`FakeBace::is_valid`],
//! [`FakeBace::expires_at`], [`FakeBace::revoke`]).
//!
//! **Introspection** for tests that drive the fake from outside the process (the `fake-bace`
//! binary below), under `/_fake/`, which BACE does not have. These requests are not token
//! requests: they are neither counted nor recorded.
//!
//! - `GET /_fake/tokens/{access_token}`: `200 {"username": "...", "valid": true, "revoked": false,
//!   "expires_at": UNIX_SECONDS}` for a token the fake issued (what [`FakeBace::issued_to`],
//!   [`FakeBace::is_valid`] and [`FakeBace::expires_at`] say), else `404` with an OAuth2-shaped
//!   error (`unknown_token`).
//! - `POST /_fake/revoke/{access_token}`: revokes a token ([`FakeBace::revoke`]): `204`, or `404`
//!   for a token the fake did not issue.
//! - `GET /_fake/calls`: `200 {"total": N, "password": {USERNAME: N, ...}, "refresh_token":
//!   {USERNAME: N, ...}}`, the counts of [`FakeBace::total_calls`] and [`FakeBace::calls`] (keyed
//!   by `grant_type`; a refresh counts under the owner of its Bearer token, `""` when unknown).
//! - `GET /_fake/chaos`: `200 {"enabled": BOOL, "config": CHAOS or null, "faults": {NAME: N}}`;
//!   `POST /_fake/chaos` with a [`Chaos`] as JSON turns chaos mode on (`204`, or `400` for a bad
//!   config); `DELETE /_fake/chaos` turns it off (`204`). The tokens answer also carries
//!   `expires_at_ms` (milliseconds since the epoch).
//!
//! **Chaos mode** ([`Chaos`], [`FakeBace::set_chaos`]): each token request may draw one random
//! fault from a seeded RNG (5xx, 429 with `Retry-After`, a latency spike, a hang, a connection
//! dropped mid-answer, a malformed answer), and outages (every request 503) come on a schedule.
//! Off by default; applied after scripted steps.
//!
//! Processing order of one token request: it is counted and recorded on arrival, then waits at the
//! gate (if held), then the outage step (if any) or else the next scripted step for its
//! (account, grant) applies, then it is processed normally.
//!
//! Wall-clock time (`SystemTime`) is used throughout: token expiry here is what BACE tells the
//! client, not a schedule, and tests that need expiry use a zero lifetime rather than paused time.
//!
//! Test equipment, not product: the broker's tests and benchmarks use it, and the broker's
//! `serve --demo` brings it in through the default-on cargo feature `demo`.
//!
//! # The `fake-bace` binary
//!
//! `src/main.rs` runs the fake as a process, for tests in other languages (the Python tests in
//! `tests/python` use it through `testkit.FakeBaceProcess`). Built by `cargo build --workspace
//! --bins` (or `-p fake-bace`) as `target/debug/fake-bace`.
//!
//! ```text
//! fake-bace [--listen ADDR] [--account USERNAME:PASSWORD:CLIENT_ID:CLIENT_SECRET]...
//!           [--accounts FILE] [--expires-timezone TZ] [--chaos JSON] [--ignore-stdin]
//! ```
//!
//! - `--listen`: address to bind, default `127.0.0.1:0` (a free loopback port).
//! - `--account` (repeatable): an account with the default lifetimes, refresh style and error
//!   shape. Split at the first three colons, so only the client secret may contain `:`.
//! - `--accounts FILE`: a JSON file `{"accounts": [ACCOUNT, ...]}`, where an account is
//!   `{"username", "password", "client_id", "client_secret"}` (strings) plus, optionally,
//!   `"login_lifetime_secs"` and `"refresh_lifetime_secs"` (numbers), `"refresh_style"`
//!   (`"bace"`, the default; `"oauth2"`, a new access token on refresh; `"oauth2-rotate"`, a new
//!   refresh token too) and `"error_shape"` (`"yii"`, the default, or `"oauth2"`). Unknown fields
//!   are an error. Accounts from both options are added; a later username replaces an earlier one.
//! - `--expires-timezone`: time zone of `expires` in BACE-style refresh answers (default
//!   `Europe/Amsterdam`).
//! - `--chaos JSON`: chaos mode from the start, with the settings of [`Chaos::from_json`].
//!
//! Once listening it prints one JSON line on stdout, `{"base_url": "http://127.0.0.1:PORT",
//! "token_url": "http://127.0.0.1:PORT/oauth2/token", "api_url":
//! "http://127.0.0.1:PORT/api/v2/physical-device"}`, then serves until SIGTERM, SIGINT or the end
//! of its stdin (a parent that dies closes the pipe, so the fake never outlives it), and exits 0.
//! `--ignore-stdin` stops on the signals only: needed when stdin is `/dev/null` (e.g. `fake-bace &`
//! in a script), where the fake would otherwise stop at once. Errors (bad options, an address in
//! use) go to stderr with exit status 2 (usage) or 1. Scripting ([`Step`]), outages and the gate
//! are not reachable from the command line; the introspection endpoints above are.
#![forbid(unsafe_code)]

mod chaos;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use chrono_tz::Tz;
use rand::RngCore;
use serde_json::{Value, json};
use tokio::sync::watch;

pub use bace_wire::Grant;
pub use chaos::Chaos;

use chaos::{ChaosState, Fault, FaultCounts};

/// Size of the body sent for [`Step::Oversized`]: 8 MiB.
const OVERSIZED_LEN: usize = 8 * 1024 * 1024;

/// Longest lifetime the fake will add to "now"; keeps time arithmetic far from overflow.
const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The message BACE (Yii) gives with a 401.
const YII_UNAUTHORIZED: &str = "Your request was made with invalid credentials.";
const YII_NOT_ALLOWED: &str = "You are not allowed to perform this action.";

const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

// === Public types ===

/// Where and how the fake serves.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Time zone used to format `expires` in BACE-style refresh answers. Default:
    /// `Europe/Amsterdam`, like the real BACE.
    pub expires_timezone: Tz,
    /// Address to bind. Default: `127.0.0.1:0` (any free loopback port).
    pub addr: SocketAddr,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            expires_timezone: bace_wire::DEFAULT_EXPIRES_TIMEZONE
                .parse()
                .unwrap_or(chrono_tz::Europe::Amsterdam),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// One BACE account known to the fake.
#[derive(Clone, PartialEq, Eq)]
pub struct FakeAccount {
    /// BACE username (normally an e-mail address); the account's key in the fake.
    pub username: String,
    /// Password the password grant must present.
    pub password: String,
    /// OAuth2 client id both grants must present.
    pub client_id: String,
    /// OAuth2 client secret both grants must present.
    pub client_secret: String,
    /// Lifetime of a token issued by the password grant. Default: 24 hours.
    pub login_lifetime: Duration,
    /// Lifetime of a token after a successful refresh. Default: 14 days.
    pub refresh_lifetime: Duration,
    /// How a successful refresh answers. Default: [`RefreshStyle::Bace`].
    pub refresh_style: RefreshStyle,
    /// Shape of a rejected password grant. Default: [`ErrorShape::Yii`].
    pub error_shape: ErrorShape,
}

/// How the fake answers a successful refresh grant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RefreshStyle {
    /// BACE's documented behaviour: the same access token is extended to now + refresh lifetime;
    /// the answer is `{"refreshed": true, "expires": "YYYY-MM-DD HH:MM:SS"}` in the fake's
    /// [`FakeOptions::expires_timezone`].
    #[default]
    Bace,
    /// Standard OAuth2: a new access token is issued (the old one is revoked) and the answer looks
    /// like the password grant's.
    OAuth2 {
        /// Issue a new refresh token too (returned in the answer). When false the answer has no
        /// `refresh_token` and the old refresh token stays bound to the new access token.
        rotate_refresh_token: bool,
        /// Send `expires_in` as a JSON string (`"1209600"`) instead of a number.
        expires_in_as_string: bool,
    },
}

/// Shape of an error body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorShape {
    /// BACE's Yii shape: `{"name":"Unauthorized","message":"...","code":0,"status":401}`;
    /// rejected credentials answer 401.
    #[default]
    Yii,
    /// The OAuth2 shape: `{"error":"...","error_description":"..."}`; rejected credentials answer
    /// 400 `invalid_grant`.
    OAuth2,
}

/// A scripted answer, consumed first-in first-out per (username, grant) before normal processing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Answer that HTTP status with an error body of that shape.
    Status(u16, ErrorShape),
    /// 200 with a truncated JSON body: `{"access_token": `.
    Malformed,
    /// 200 with an 8 MiB body that starts as valid JSON (`{"access_token":"aaaa...`).
    Oversized,
    /// Never answer, until the client gives up or the fake shuts down (then 503).
    Hang,
    /// Wait this long, then process the request normally.
    Delay(Duration),
    /// 200 `{"refreshed": false}`.
    RefreshedFalse,
    /// Exactly this status and raw body, with `Content-Type: application/json`.
    Body(u16, String),
}

/// What the fake received in one token request.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The `Content-Type` header as sent (empty when absent).
    pub content_type: String,
    /// The fields of the body: parsed as a URL-encoded form, or as a flat JSON object when the
    /// content type is `application/json` (so a wrong encoding is still visible to tests).
    pub form: BTreeMap<String, String>,
    /// The token of an `Authorization: Bearer` header, if any.
    pub bearer: Option<String>,
}

/// Handle to a running fake BACE. Cheap to clone; all clones share one server.
///
/// Dropping the handles does not stop the server; [`FakeBace::shutdown`] does.
#[derive(Clone)]
pub struct FakeBace {
    inner: Arc<Inner>,
}

// === Internal state ===

/// Shared by the handles and the server's handlers.
struct Inner {
    addr: SocketAddr,
    expires_timezone: Tz,
    /// Accounts, tokens, scripts, records. A std `Mutex` because every critical section is short
    /// and synchronous: the guard is never held across an `.await`.
    state: Mutex<State>,
    /// Call counters, published on a watch channel so waiters wake on every new call without
    /// polling. Counters live only here (not in `state`), so there is no lock ordering to mind.
    calls: watch::Sender<CallCounts>,
    /// `true` while [`FakeBace::hold`] is in force.
    held: watch::Sender<bool>,
    /// Becomes `true` once on [`FakeBace::shutdown`].
    shutdown: watch::Sender<bool>,
    /// Chaos mode, when on, and the faults it injected so far. Its own lock, never held with
    /// `state`'s (and, like it, never across an `.await`).
    chaos: Mutex<(Option<ChaosState>, FaultCounts)>,
}

#[derive(Default)]
struct State {
    accounts: HashMap<String, FakeAccount>,
    tokens: HashMap<String, TokenRecord>,
    scripts: HashMap<(String, Grant), VecDeque<Step>>,
    outage: Option<Step>,
    last_requests: HashMap<(String, Grant), RecordedRequest>,
}

struct TokenRecord {
    username: String,
    refresh_token: String,
    expires_at: SystemTime,
    revoked: bool,
}

impl TokenRecord {
    fn is_valid_at(&self, now: SystemTime) -> bool {
        !self.revoked && now < self.expires_at
    }
}

#[derive(Default)]
struct CallCounts {
    total: u64,
    per: HashMap<Grant, HashMap<String, u64>>,
}

impl CallCounts {
    fn get(&self, username: &str, grant: Grant) -> u64 {
        self.per
            .get(&grant)
            .and_then(|m| m.get(username))
            .copied()
            .unwrap_or(0)
    }
}

// === impl FakeAccount ===

impl FakeAccount {
    /// An account with the default lifetimes (24 h login, 14 d refresh), BACE refresh style and
    /// Yii error shape.
    pub fn new(
        username: impl Into<String>,
        password: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            login_lifetime: Duration::from_secs(24 * 3600),
            refresh_lifetime: Duration::from_secs(14 * 24 * 3600),
            refresh_style: RefreshStyle::default(),
            error_shape: ErrorShape::default(),
        }
    }

    fn client_matches(&self, client_id: &str, client_secret: &str) -> bool {
        self.client_id == client_id && self.client_secret == client_secret
    }
}

impl fmt::Debug for FakeAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeAccount")
            .field("username", &self.username)
            .field("password", &"...")
            .field("client_id", &self.client_id)
            .field("client_secret", &"...")
            .field("login_lifetime", &self.login_lifetime)
            .field("refresh_lifetime", &self.refresh_lifetime)
            .field("refresh_style", &self.refresh_style)
            .field("error_shape", &self.error_shape)
            .finish()
    }
}

// === impl RecordedRequest ===

impl fmt::Debug for RecordedRequest {
    /// Field names and harmless values only: passwords, secrets and tokens print as `"..."`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let form: BTreeMap<&str, &str> = self
            .form
            .iter()
            .map(|(k, v)| {
                let shown = match k.as_str() {
                    "client_id" | "grant_type" | "username" => v.as_str(),
                    _ => "...",
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("RecordedRequest")
            .field("content_type", &self.content_type)
            .field("form", &form)
            .field("bearer", &self.bearer.as_ref().map(|_| "..."))
            .finish()
    }
}

// === impl FakeBace ===

impl FakeBace {
    /// Binds `opts.addr`, spawns the server on the current tokio runtime and returns its handle.
    ///
    /// # Errors
    ///
    /// Fails when the address cannot be bound.
    pub async fn start(opts: FakeOptions) -> std::io::Result<FakeBace> {
        let listener = tokio::net::TcpListener::bind(opts.addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            addr,
            expires_timezone: opts.expires_timezone,
            state: Mutex::new(State::default()),
            calls: watch::Sender::new(CallCounts::default()),
            held: watch::Sender::new(false),
            shutdown: watch::Sender::new(false),
            chaos: Mutex::new((None, FaultCounts::new())),
        });

        let app = Router::new()
            .route(bace_wire::TOKEN_PATH, post(token_endpoint))
            .route(
                "/api/v2/physical-device",
                get(physical_device).post(physical_device),
            )
            .route("/api/v2/restricted", get(restricted).post(restricted))
            .route("/_fake/tokens/{access_token}", get(fake_token_info))
            .route("/_fake/revoke/{access_token}", post(fake_revoke))
            .route("/_fake/calls", get(fake_calls))
            .route(
                "/_fake/chaos",
                get(fake_chaos_get)
                    .post(fake_chaos_post)
                    .delete(fake_chaos_delete),
            )
            .fallback(not_found)
            .with_state(inner.clone());

        let mut stop = inner.shutdown.subscribe();
        let signal = async move {
            let _ = stop.wait_for(|down| *down).await;
        };
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
            {
                tracing::warn!(%error, "fake BACE server stopped");
            }
        });
        tracing::debug!(%addr, "fake BACE listening");
        Ok(FakeBace { inner })
    }

    /// The address the server is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Base URL of the server, e.g. `http://127.0.0.1:PORT` (the introspection endpoints are
    /// under `/_fake/`, see the crate docs).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Full URL of the token endpoint, e.g. `http://127.0.0.1:PORT/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}{}", self.inner.addr, bace_wire::TOKEN_PATH)
    }

    /// Full URL of the authenticated API endpoint, e.g.
    /// `http://127.0.0.1:PORT/api/v2/physical-device`.
    pub fn api_url(&self) -> String {
        format!("http://{}/api/v2/physical-device", self.inner.addr)
    }

    /// Adds an account, replacing any account with the same username (tokens already issued stay).
    pub fn add_account(&self, account: FakeAccount) {
        self.inner
            .lock()
            .accounts
            .insert(account.username.clone(), account);
    }

    /// Changes the password of an existing account; does nothing for an unknown username.
    pub fn set_password(&self, username: &str, password: &str) {
        if let Some(account) = self.inner.lock().accounts.get_mut(username) {
            password.clone_into(&mut account.password);
        }
    }

    /// Appends scripted answers for `username`'s `grant` requests. For a refresh, the username is
    /// that of the account owning the Bearer token (`""` when the token is unknown).
    pub fn script(&self, username: &str, grant: Grant, steps: impl IntoIterator<Item = Step>) {
        self.inner
            .lock()
            .scripts
            .entry((username.to_owned(), grant))
            .or_default()
            .extend(steps);
    }

    /// While `Some`, every token request (any account, any grant) answers with that step instead
    /// of scripts and normal processing. Requests are still counted and recorded.
    pub fn set_outage(&self, step: Option<Step>) {
        self.inner.lock().outage = step;
    }

    /// Turns chaos mode on with `chaos` (a fresh RNG from its seed; its outage schedule starts
    /// now), or off with `None`. See [`Chaos`].
    pub fn set_chaos(&self, chaos: Option<Chaos>) {
        self.inner.lock_chaos().0 = chaos.map(ChaosState::new);
    }

    /// The faults chaos mode injected so far, by name (`server_error`, `too_many_requests`,
    /// `latency`, `hang`, `reset`, `malformed`, `outage`).
    pub fn chaos_faults(&self) -> BTreeMap<String, u64> {
        self.inner
            .lock_chaos()
            .1
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect()
    }

    /// Closes the gate: from now on each token request is counted, then waits until
    /// [`FakeBace::release`] (or shutdown).
    pub fn hold(&self) {
        self.inner.held.send_replace(true);
    }

    /// Opens the gate: held and future token requests go through.
    pub fn release(&self) {
        self.inner.held.send_replace(false);
    }

    /// Number of token requests that reached the fake for `username` and `grant`.
    ///
    /// A password grant counts under its `username` field, a refresh under the account owning its
    /// Bearer token (`""` when the token is unknown or absent). Requests without a known
    /// `grant_type` count only in [`FakeBace::total_calls`].
    pub fn calls(&self, username: &str, grant: Grant) -> u64 {
        self.inner.calls.borrow().get(username, grant)
    }

    /// Number of token requests that reached the fake, whatever their account or grant.
    pub fn total_calls(&self) -> u64 {
        self.inner.calls.borrow().total
    }

    /// Resolves once `calls(username, grant) >= n`.
    pub async fn wait_for_calls(&self, username: &str, grant: Grant, n: u64) {
        let mut rx = self.inner.calls.subscribe();
        // The sender lives in `inner`, which we hold: this cannot fail.
        let _ = rx.wait_for(|c| c.get(username, grant) >= n).await;
    }

    /// Resolves once `total_calls() >= n`.
    pub async fn wait_for_total_calls(&self, n: u64) {
        let mut rx = self.inner.calls.subscribe();
        let _ = rx.wait_for(|c| c.total >= n).await;
    }

    /// The last token request received for `username` and `grant` (keyed like
    /// [`FakeBace::calls`]).
    pub fn last_request(&self, username: &str, grant: Grant) -> Option<RecordedRequest> {
        self.inner
            .lock()
            .last_requests
            .get(&(username.to_owned(), grant))
            .cloned()
    }

    /// Whether `access_token` was issued by the fake, is not revoked and has not expired.
    pub fn is_valid(&self, access_token: &str) -> bool {
        self.inner.token_is_valid(access_token)
    }

    /// The username of the account the fake issued `access_token` to, if it issued it (valid or
    /// not).
    pub fn issued_to(&self, access_token: &str) -> Option<String> {
        self.inner
            .lock()
            .tokens
            .get(access_token)
            .map(|t| t.username.clone())
    }

    /// The refresh token bound to `access_token`, if the fake issued it.
    pub fn refresh_token_of(&self, access_token: &str) -> Option<String> {
        self.inner
            .lock()
            .tokens
            .get(access_token)
            .map(|t| t.refresh_token.clone())
    }

    /// When `access_token` expires (or expired), if the fake issued it.
    pub fn expires_at(&self, access_token: &str) -> Option<SystemTime> {
        self.inner
            .lock()
            .tokens
            .get(access_token)
            .map(|t| t.expires_at)
    }

    /// Revokes `access_token`: it is no longer valid for the API or for a refresh.
    pub fn revoke(&self, access_token: &str) {
        if let Some(token) = self.inner.lock().tokens.get_mut(access_token) {
            token.revoked = true;
        }
    }

    /// Stops the server: no new connections, held and hanging requests are answered (hanging ones
    /// with 503), in-flight requests finish. Does not wait; idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

impl fmt::Debug for FakeBace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeBace")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

// === impl Inner ===

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_chaos(&self) -> MutexGuard<'_, (Option<ChaosState>, FaultCounts)> {
        self.chaos.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The chaos fault for this request, if chaos is on and draws one (counted).
    fn chaos_fault(&self) -> Option<Fault> {
        let mut chaos = self.lock_chaos();
        let fault = chaos.0.as_mut()?.draw()?;
        *chaos.1.entry(fault.name()).or_default() += 1;
        Some(fault)
    }

    /// Applies a chaos fault; `None` means "go on with normal processing".
    async fn apply_fault(&self, fault: Fault) -> Option<Response> {
        match fault {
            Fault::ServerError(status) => {
                Some(yii_error(status_code(status), "chaos: server error"))
            }
            Fault::TooManyRequests(secs) => {
                let mut response = yii_error(StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded.");
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
                Some(response)
            }
            Fault::Latency(delay) => self.apply_step(Step::Delay(delay)).await,
            Fault::Hang => self.apply_step(Step::Hang).await,
            Fault::Reset => Some(broken_answer()),
            Fault::Malformed(i) => {
                let (status, content_type, body) = Fault::malformed(i);
                Some(
                    (
                        status_code(status),
                        [(header::CONTENT_TYPE, content_type)],
                        body,
                    )
                        .into_response(),
                )
            }
            Fault::Outage => Some(yii_error(StatusCode::SERVICE_UNAVAILABLE, "chaos: outage")),
        }
    }

    fn token_is_valid(&self, access_token: &str) -> bool {
        let now = SystemTime::now();
        self.lock()
            .tokens
            .get(access_token)
            .is_some_and(|t| t.is_valid_at(now))
    }

    async fn wait_shutdown(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|down| *down).await;
    }

    /// Waits while the gate is held; shutdown opens it too.
    async fn pass_gate(&self) {
        let mut held = self.held.subscribe();
        tokio::select! {
            _ = held.wait_for(|held| !*held) => {}
            () = self.wait_shutdown() => {}
        }
    }

    /// Counts and records a token request on arrival; returns the (username, grant) it counts for.
    fn arrive(&self, request: RecordedRequest) -> (String, Option<Grant>) {
        let grant = request
            .form
            .get("grant_type")
            .and_then(|g| Grant::from_grant_type(g));
        let username = {
            let mut state = self.lock();
            let username = match grant {
                Some(Grant::Password) => request.form.get("username").cloned().unwrap_or_default(),
                Some(Grant::Refresh) => request
                    .bearer
                    .as_ref()
                    .and_then(|b| state.tokens.get(b))
                    .map(|t| t.username.clone())
                    .unwrap_or_default(),
                None => String::new(),
            };
            if let Some(grant) = grant {
                state
                    .last_requests
                    .insert((username.clone(), grant), request);
            }
            username
        };
        // Published after the record is stored, so a woken waiter can read it.
        self.calls.send_modify(|c| {
            c.total += 1;
            if let Some(grant) = grant {
                *c.per
                    .entry(grant)
                    .or_default()
                    .entry(username.clone())
                    .or_default() += 1;
            }
        });
        (username, grant)
    }

    /// The outage step, else the next scripted step for this request.
    fn next_step(&self, username: &str, grant: Option<Grant>) -> Option<Step> {
        let mut state = self.lock();
        if let Some(step) = &state.outage {
            return Some(step.clone());
        }
        let grant = grant?;
        state
            .scripts
            .get_mut(&(username.to_owned(), grant))
            .and_then(VecDeque::pop_front)
    }

    /// Applies a step; `None` means "go on with normal processing".
    async fn apply_step(&self, step: Step) -> Option<Response> {
        match step {
            Step::Status(status, shape) => {
                Some(shaped_error(status_code(status), shape, "scripted failure"))
            }
            Step::Malformed => Some(raw_json(StatusCode::OK, "{\"access_token\": ".to_owned())),
            Step::Oversized => Some(raw_json(StatusCode::OK, oversized_body())),
            Step::Hang => {
                self.wait_shutdown().await;
                Some(yii_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The fake BACE is shutting down.",
                ))
            }
            Step::Delay(delay) => {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = self.wait_shutdown() => {}
                }
                None
            }
            Step::RefreshedFalse => Some(json_response(
                StatusCode::OK,
                &json!({ "refreshed": false }),
            )),
            Step::Body(status, body) => Some(raw_json(status_code(status), body)),
        }
    }

    fn password_grant(&self, form: &BTreeMap<String, String>) -> Response {
        let fields = match required(
            form,
            &["client_id", "client_secret", "username", "password"],
        ) {
            Ok(fields) => fields,
            Err(name) => return missing_field(name),
        };
        let [client_id, client_secret, username, password] = fields;
        let now = SystemTime::now();

        let mut state = self.lock();
        let Some(account) = state.accounts.get(username) else {
            return yii_error(StatusCode::UNAUTHORIZED, YII_UNAUTHORIZED);
        };
        if account.password != password || !account.client_matches(client_id, client_secret) {
            return match account.error_shape {
                ErrorShape::Yii => yii_error(StatusCode::UNAUTHORIZED, YII_UNAUTHORIZED),
                ErrorShape::OAuth2 => oauth2_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid username and password combination",
                ),
            };
        }
        let lifetime = account.login_lifetime;
        let access_token = new_token();
        let refresh_token = new_token();
        state.tokens.insert(
            access_token.clone(),
            TokenRecord {
                username: username.to_owned(),
                refresh_token: refresh_token.clone(),
                expires_at: later(now, lifetime),
                revoked: false,
            },
        );
        drop(state);

        json_response(
            StatusCode::OK,
            &token_answer(
                &access_token,
                json!(lifetime.as_secs()),
                Some(&refresh_token),
            ),
        )
    }

    fn refresh_grant(&self, bearer: Option<&str>, form: &BTreeMap<String, String>) -> Response {
        let fields = match required(form, &["refresh_token", "client_id", "client_secret"]) {
            Ok(fields) => fields,
            Err(name) => return missing_field(name),
        };
        let [refresh_token, client_id, client_secret] = fields;
        let unauthorized = || yii_error(StatusCode::UNAUTHORIZED, YII_UNAUTHORIZED);
        let Some(access_token) = bearer else {
            return unauthorized();
        };
        let now = SystemTime::now();

        let mut guard = self.lock();
        let State {
            accounts, tokens, ..
        } = &mut *guard;
        let Some(record) = tokens.get_mut(access_token) else {
            return unauthorized();
        };
        if !record.is_valid_at(now) || record.refresh_token != refresh_token {
            return unauthorized();
        }
        let Some(account) = accounts.get(&record.username) else {
            return unauthorized();
        };
        if !account.client_matches(client_id, client_secret) {
            return unauthorized();
        }
        let lifetime = account.refresh_lifetime;
        let style = account.refresh_style;

        match style {
            RefreshStyle::Bace => {
                // BACE reports whole seconds; store exactly what the client is told.
                let expires_at = truncate_to_secs(later(now, lifetime));
                record.expires_at = expires_at;
                drop(guard);
                let Some(expires) = format_expires(expires_at, self.expires_timezone) else {
                    return yii_error(StatusCode::INTERNAL_SERVER_ERROR, "Expiry out of range.");
                };
                json_response(
                    StatusCode::OK,
                    &json!({ "refreshed": true, "expires": expires }),
                )
            }
            RefreshStyle::OAuth2 {
                rotate_refresh_token,
                expires_in_as_string,
            } => {
                record.revoked = true;
                let username = record.username.clone();
                let refresh_token = if rotate_refresh_token {
                    new_token()
                } else {
                    record.refresh_token.clone()
                };
                let access_token = new_token();
                tokens.insert(
                    access_token.clone(),
                    TokenRecord {
                        username,
                        refresh_token: refresh_token.clone(),
                        expires_at: later(now, lifetime),
                        revoked: false,
                    },
                );
                drop(guard);
                let expires_in = if expires_in_as_string {
                    json!(lifetime.as_secs().to_string())
                } else {
                    json!(lifetime.as_secs())
                };
                json_response(
                    StatusCode::OK,
                    &token_answer(
                        &access_token,
                        expires_in,
                        rotate_refresh_token.then_some(refresh_token.as_str()),
                    ),
                )
            }
        }
    }
}

// === Handlers ===

async fn token_endpoint(
    AxumState(inner): AxumState<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bearer = bearer_token(&headers).map(str::to_owned);
    let is_form = media_type(&content_type) == FORM_CONTENT_TYPE;
    let form = if media_type(&content_type) == "application/json" {
        parse_json_fields(&body)
    } else {
        parse_form(&body)
    };

    let (username, grant) = inner.arrive(RecordedRequest {
        content_type,
        form: form.clone(),
        bearer: bearer.clone(),
    });
    tracing::debug!(account = %username, ?grant, "fake BACE token request");

    inner.pass_gate().await;
    if let Some(step) = inner.next_step(&username, grant)
        && let Some(response) = inner.apply_step(step).await
    {
        return response;
    }
    if let Some(fault) = inner.chaos_fault()
        && let Some(response) = inner.apply_fault(fault).await
    {
        return response;
    }

    if !is_form {
        return oauth2_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body must be application/x-www-form-urlencoded",
        );
    }
    match (grant, form.get("grant_type")) {
        (Some(Grant::Password), _) => inner.password_grant(&form),
        (Some(Grant::Refresh), _) => inner.refresh_grant(bearer.as_deref(), &form),
        (None, Some(_)) => oauth2_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The authorization grant type is not supported by the authorization server",
        ),
        (None, None) => oauth2_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The grant type was not specified in the request",
        ),
    }
}

/// `GET|POST /api/v2/physical-device`: `200 []` for a valid token, else `401`.
///
/// Both API handlers take the whole request body before answering, as a web server in front of
/// BACE does: a response sent while a client still streams its body makes the server close the
/// connection with unread data, and the client's read of the answer can then fail with a reset.
async fn physical_device(
    AxumState(inner): AxumState<Arc<Inner>>,
    headers: HeaderMap,
    _body: Bytes,
) -> Response {
    if_valid_token(&inner, &headers, || {
        json_response(StatusCode::OK, &Value::Array(Vec::new()))
    })
}

/// `GET|POST /api/v2/restricted`: an endpoint the accounts may not use. `401` for every request,
/// valid token or not, as BACE answers an account that lacks a permission (the client libraries'
/// "the token is fine, do not retry" case). A valid token gets its own message.
async fn restricted(
    AxumState(inner): AxumState<Arc<Inner>>,
    headers: HeaderMap,
    _body: Bytes,
) -> Response {
    if_valid_token(&inner, &headers, || {
        yii_error(StatusCode::UNAUTHORIZED, YII_NOT_ALLOWED)
    })
}

/// `answer()` for a request whose Bearer token is valid, else BACE's 401.
fn if_valid_token(
    inner: &Inner,
    headers: &HeaderMap,
    answer: impl FnOnce() -> Response,
) -> Response {
    match bearer_token(headers) {
        Some(token) if inner.token_is_valid(token) => answer(),
        _ => yii_error(StatusCode::UNAUTHORIZED, YII_UNAUTHORIZED),
    }
}

/// `POST /_fake/revoke/{access_token}`: [`FakeBace::revoke`] from outside the process; `204`, or
/// `404` for a token the fake did not issue.
async fn fake_revoke(
    AxumState(inner): AxumState<Arc<Inner>>,
    Path(access_token): Path<String>,
) -> Response {
    match inner.lock().tokens.get_mut(&access_token) {
        Some(token) => {
            token.revoked = true;
            StatusCode::NO_CONTENT.into_response()
        }
        None => unknown_token(),
    }
}

/// `GET /_fake/tokens/{access_token}`: what the fake knows of a token (introspection, not BACE).
async fn fake_token_info(
    AxumState(inner): AxumState<Arc<Inner>>,
    Path(access_token): Path<String>,
) -> Response {
    let now = SystemTime::now();
    let info = inner.lock().tokens.get(&access_token).map(|t| {
        json!({
            "username": t.username,
            "valid": t.is_valid_at(now),
            "revoked": t.revoked,
            "expires_at": t.expires_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "expires_at_ms": t.expires_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        })
    });
    match info {
        Some(info) => json_response(StatusCode::OK, &info),
        None => unknown_token(),
    }
}

/// `GET /_fake/calls`: the token request counts (introspection, not BACE).
async fn fake_calls(AxumState(inner): AxumState<Arc<Inner>>) -> Response {
    let body = {
        let calls = inner.calls.borrow();
        let mut body = serde_json::Map::new();
        body.insert("total".to_owned(), json!(calls.total));
        for grant in Grant::ALL {
            let per: serde_json::Map<String, Value> = calls
                .per
                .get(&grant)
                .into_iter()
                .flatten()
                .map(|(username, n)| (username.clone(), json!(n)))
                .collect();
            body.insert(grant.as_str().to_owned(), Value::Object(per));
        }
        Value::Object(body)
    };
    json_response(StatusCode::OK, &body)
}

/// `GET /_fake/chaos`: `{"enabled": bool, "config": CHAOS or null, "faults": {NAME: N}}`.
async fn fake_chaos_get(AxumState(inner): AxumState<Arc<Inner>>) -> Response {
    let body = {
        let chaos = inner.lock_chaos();
        json!({
            "enabled": chaos.0.is_some(),
            "config": chaos.0.as_ref().map(|c| c.config().to_json()),
            "faults": chaos.1,
        })
    };
    json_response(StatusCode::OK, &body)
}

/// `POST /_fake/chaos` with a [`Chaos`] as JSON: chaos on (`204`), or `400` for a bad config.
async fn fake_chaos_post(AxumState(inner): AxumState<Arc<Inner>>, body: Bytes) -> Response {
    let parsed = serde_json::from_slice::<Value>(&body)
        .map_err(|e| format!("chaos: {e}"))
        .and_then(|v| Chaos::from_json(&v));
    match parsed {
        Ok(chaos) => {
            inner.lock_chaos().0 = Some(ChaosState::new(chaos));
            StatusCode::NO_CONTENT.into_response()
        }
        Err(message) => oauth2_error(StatusCode::BAD_REQUEST, "invalid_request", &message),
    }
}

/// `DELETE /_fake/chaos`: chaos off (`204`); the fault counts stay.
async fn fake_chaos_delete(AxumState(inner): AxumState<Arc<Inner>>) -> Response {
    inner.lock_chaos().0 = None;
    StatusCode::NO_CONTENT.into_response()
}

/// The introspection endpoints' answer for a token the fake did not issue.
fn unknown_token() -> Response {
    oauth2_error(
        StatusCode::NOT_FOUND,
        "unknown_token",
        "The fake BACE did not issue this access token",
    )
}

async fn not_found() -> Response {
    yii_error(StatusCode::NOT_FOUND, "Page not found.")
}

// === Helpers ===

/// The required fields, in order, or the name of the first missing one.
/// An empty value counts as missing (like Yii's `required` validator).
fn required<'a, 'n, const N: usize>(
    form: &'a BTreeMap<String, String>,
    names: &[&'n str; N],
) -> Result<[&'a str; N], &'n str> {
    let mut out = [""; N];
    for (slot, name) in out.iter_mut().zip(names) {
        match form.get(*name).map(String::as_str) {
            Some(value) if !value.is_empty() => *slot = value,
            _ => return Err(name),
        }
    }
    Ok(out)
}

/// 400 `invalid_request` for a missing form field.
fn missing_field(name: &str) -> Response {
    oauth2_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &format!("The request is missing the required parameter \"{name}\""),
    )
}

fn token_answer(access_token: &str, expires_in: Value, refresh_token: Option<&str>) -> Value {
    let mut answer = json!({
        "access_token": access_token,
        "expires_in": expires_in,
        "token_type": "Bearer",
        "scope": null,
    });
    if let (Some(refresh_token), Some(map)) = (refresh_token, answer.as_object_mut()) {
        map.insert("refresh_token".to_owned(), json!(refresh_token));
    }
    answer
}

/// 40 random lowercase hex characters, like BACE's tokens.
fn new_token() -> String {
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn later(now: SystemTime, lifetime: Duration) -> SystemTime {
    now + lifetime.min(MAX_LIFETIME)
}

fn truncate_to_secs(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// `YYYY-MM-DD HH:MM:SS` in `tz`, BACE's `expires` format.
fn format_expires(t: SystemTime, tz: Tz) -> Option<String> {
    let secs = i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()?;
    let utc = chrono::DateTime::from_timestamp(secs, 0)?;
    Some(
        utc.with_timezone(&tz)
            .format(bace_wire::EXPIRES_FORMAT)
            .to_string(),
    )
}

fn oversized_body() -> String {
    let prefix = "{\"access_token\":\"";
    let mut body = String::with_capacity(OVERSIZED_LEN);
    body.push_str(prefix);
    body.push_str(&"a".repeat(OVERSIZED_LEN - prefix.len()));
    body
}

/// A 200 whose body fails at once: hyper closes the connection without a complete answer (the
/// client sees an incomplete message or a body error).
fn broken_answer() -> Response {
    struct Broken;
    impl http_body::Body for Broken {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "chaos: connection dropped",
            ))))
        }
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::new(Broken),
    )
        .into_response()
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn raw_json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body,
    )
        .into_response()
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    raw_json(status, value.to_string())
}

fn yii_error(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        &json!({
            "name": status.canonical_reason().unwrap_or("Error"),
            "message": message,
            "code": 0,
            "status": status.as_u16(),
        }),
    )
}

fn oauth2_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({ "error": error, "error_description": description }),
    )
}

fn shaped_error(status: StatusCode, shape: ErrorShape, message: &str) -> Response {
    match shape {
        ErrorShape::Yii => yii_error(status, message),
        ErrorShape::OAuth2 => {
            let error = match status.as_u16() {
                401 => "invalid_client",
                403 => "access_denied",
                503 => "temporarily_unavailable",
                s if s >= 500 => "server_error",
                _ => "invalid_request",
            };
            oauth2_error(status, error, message)
        }
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The media type of a `Content-Type` value, lowercased, without parameters.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Parses `application/x-www-form-urlencoded` leniently (like browsers and `form_urlencoded`):
/// `+` is a space, bad percent escapes are kept literally, invalid UTF-8 is replaced. When a field
/// repeats, the last value wins.
fn parse_form(body: &[u8]) -> BTreeMap<String, String> {
    body.split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut parts = pair.splitn(2, |b| *b == b'=');
            let key = parts.next().unwrap_or_default();
            let value = parts.next().unwrap_or_default();
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(input: &[u8]) -> String {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while let Some(&b) = input.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let escaped = input
                    .get(i + 1)
                    .zip(input.get(i + 2))
                    .and_then(|(h, l)| Some(hex(*h)? << 4 | hex(*l)?));
                if let Some(decoded) = escaped {
                    out.push(decoded);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The fields of a flat JSON object (non-string scalars as their JSON text); empty otherwise.
fn parse_json_fields(body: &[u8]) -> BTreeMap<String, String> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return BTreeMap::new();
    };
    map.into_iter()
        .filter_map(|(k, v)| match v {
            Value::String(s) => Some((k, s)),
            Value::Null | Value::Array(_) | Value::Object(_) => None,
            other => Some((k, other.to_string())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "alice@example.com";
    const PASS: &str = "pw-alice";
    const CID: &str = "client-1";
    const CSECRET: &str = "secret-1";

    fn account() -> FakeAccount {
        FakeAccount::new(USER, PASS, CID, CSECRET)
    }

    async fn start_with(account: FakeAccount) -> FakeBace {
        let fake = FakeBace::start(FakeOptions::default())
            .await
            .expect("fake starts");
        fake.add_account(account);
        fake
    }

    fn client() -> reqwest::Client {
        reqwest::Client::new()
    }

    async fn send(req: reqwest::RequestBuilder) -> (u16, String) {
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body read"))
    }

    fn parse(body: &str) -> Value {
        serde_json::from_str(body).expect("JSON body")
    }

    async fn login_as(fake: &FakeBace, user: &str, pass: &str) -> (u16, Value) {
        let req = client().post(fake.token_url()).form(&[
            ("client_id", CID),
            ("client_secret", CSECRET),
            ("grant_type", "password"),
            ("username", user),
            ("password", pass),
        ]);
        let (status, body) = send(req).await;
        (status, parse(&body))
    }

    async fn login(fake: &FakeBace) -> (String, String) {
        let (status, body) = login_as(fake, USER, PASS).await;
        assert_eq!(status, 200, "{body}");
        (
            body["access_token"]
                .as_str()
                .expect("access_token")
                .to_owned(),
            body["refresh_token"]
                .as_str()
                .expect("refresh_token")
                .to_owned(),
        )
    }

    async fn refresh(fake: &FakeBace, access: &str, refresh: &str) -> (u16, Value) {
        let req = client().post(fake.token_url()).bearer_auth(access).form(&[
            ("refresh_token", refresh),
            ("client_secret", CSECRET),
            ("client_id", CID),
            ("grant_type", "refresh_token"),
        ]);
        let (status, body) = send(req).await;
        (status, parse(&body))
    }

    fn assert_yii_401(body: &Value) {
        assert_eq!(body["name"], "Unauthorized");
        assert_eq!(body["status"], 401);
        assert_eq!(body["code"], 0);
        assert!(body["message"].is_string());
    }

    fn is_hex40(s: &str) -> bool {
        s.len() == 40
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    #[tokio::test]
    async fn login_then_bace_refresh_extends_same_token() {
        let fake = start_with(account()).await;
        let before = SystemTime::now();
        let (status, body) = login_as(&fake, USER, PASS).await;
        assert_eq!(status, 200);
        let access = body["access_token"].as_str().expect("access_token");
        let refresh_token = body["refresh_token"].as_str().expect("refresh_token");
        assert!(is_hex40(access) && is_hex40(refresh_token));
        assert_eq!(body["expires_in"], 86_400);
        assert_eq!(body["token_type"], "Bearer");
        assert!(body.get("scope").is_some_and(Value::is_null));
        assert!(fake.is_valid(access));
        let exp = fake.expires_at(access).expect("issued");
        assert!(exp >= before + Duration::from_secs(86_400));
        assert!(exp <= SystemTime::now() + Duration::from_secs(86_400));

        let (status, body) = refresh(&fake, access, refresh_token).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["refreshed"], true);
        let exp = fake.expires_at(access).expect("still issued");
        assert!(exp + Duration::from_secs(1) >= before + Duration::from_secs(14 * 86_400));
        assert!(fake.is_valid(access));
        // Formatted in Amsterdam time (never equal to UTC: the offset is +1 or +2 hours).
        let expires = body["expires"].as_str().expect("expires string");
        let secs = exp
            .duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        let utc = chrono::DateTime::from_timestamp(i64::try_from(secs).expect("fits"), 0)
            .expect("in range");
        let amsterdam = utc.with_timezone(&chrono_tz::Europe::Amsterdam);
        assert_eq!(expires, amsterdam.format("%Y-%m-%d %H:%M:%S").to_string());
        assert_ne!(expires, utc.format("%Y-%m-%d %H:%M:%S").to_string());
        assert_eq!(fake.calls(USER, Grant::Password), 1);
        assert_eq!(fake.calls(USER, Grant::Refresh), 1);
        assert_eq!(fake.total_calls(), 2);

        // The authenticated API accepts the token.
        let (status, body) = send(client().get(fake.api_url()).bearer_auth(access)).await;
        assert_eq!((status, body.as_str()), (200, "[]"));
        fake.shutdown();
    }

    #[tokio::test]
    async fn oauth2_refresh_rotates() {
        let mut acct = account();
        acct.refresh_style = RefreshStyle::OAuth2 {
            rotate_refresh_token: true,
            expires_in_as_string: true,
        };
        let fake = start_with(acct).await;
        let (access, refresh_token) = login(&fake).await;
        let (status, body) = refresh(&fake, &access, &refresh_token).await;
        assert_eq!(status, 200, "{body}");
        let new_access = body["access_token"].as_str().expect("new token");
        let new_refresh = body["refresh_token"].as_str().expect("rotated");
        assert!(is_hex40(new_access) && new_access != access);
        assert!(is_hex40(new_refresh) && new_refresh != refresh_token);
        assert_eq!(body["expires_in"], "1209600");
        assert!(!fake.is_valid(&access));
        assert!(fake.is_valid(new_access));
        // The old pair is dead; the new pair works.
        let (status, body) = refresh(&fake, &access, &refresh_token).await;
        assert_eq!(status, 401);
        assert_yii_401(&body);
        let (status, _) = refresh(&fake, new_access, new_refresh).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn oauth2_refresh_without_rotation_keeps_refresh_token() {
        let mut acct = account();
        acct.refresh_style = RefreshStyle::OAuth2 {
            rotate_refresh_token: false,
            expires_in_as_string: false,
        };
        let fake = start_with(acct).await;
        let (access, refresh_token) = login(&fake).await;
        let (status, body) = refresh(&fake, &access, &refresh_token).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("refresh_token").is_none());
        assert_eq!(body["expires_in"], 1_209_600);
        let new_access = body["access_token"].as_str().expect("new token");
        let (status, _) = refresh(&fake, new_access, &refresh_token).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn bad_credentials_answer_yii_401() {
        let fake = start_with(account()).await;
        let (status, body) = login_as(&fake, USER, "wrong").await;
        assert_eq!(status, 401);
        assert_yii_401(&body);
        let (status, body) = login_as(&fake, "nobody@example.com", PASS).await;
        assert_eq!(status, 401);
        assert_yii_401(&body);
        assert_eq!(fake.calls("nobody@example.com", Grant::Password), 1);

        fake.set_password(USER, "new-pw");
        assert_eq!(login_as(&fake, USER, PASS).await.0, 401);
        assert_eq!(login_as(&fake, USER, "new-pw").await.0, 200);
    }

    #[tokio::test]
    async fn oauth2_error_shape_answers_400_invalid_grant() {
        let mut acct = account();
        acct.error_shape = ErrorShape::OAuth2;
        let fake = start_with(acct).await;
        let (status, body) = login_as(&fake, USER, "wrong").await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        assert!(body["error_description"].is_string());
    }

    #[tokio::test]
    async fn missing_field_and_wrong_content_type_are_invalid_request() {
        let fake = start_with(account()).await;
        let req = client().post(fake.token_url()).form(&[
            ("client_id", CID),
            ("grant_type", "password"),
            ("username", USER),
            ("password", PASS),
        ]);
        let (status, body) = send(req).await;
        assert_eq!(status, 400);
        assert_eq!(parse(&body)["error"], "invalid_request");

        let req = client()
            .post(fake.token_url())
            .header("content-type", "application/json")
            .body(
                json!({
                    "client_id": CID, "client_secret": CSECRET, "grant_type": "password",
                    "username": USER, "password": PASS,
                })
                .to_string(),
            );
        let (status, body) = send(req).await;
        assert_eq!(status, 400);
        assert_eq!(parse(&body)["error"], "invalid_request");
        // Still counted and recorded under the account, so tests can see what was sent.
        let recorded = fake.last_request(USER, Grant::Password).expect("recorded");
        assert_eq!(recorded.content_type, "application/json");
        assert_eq!(fake.calls(USER, Grant::Password), 2);

        let (status, body) = send(client().get(format!("http://{}/nope", fake.addr()))).await;
        assert_eq!(status, 404);
        assert_eq!(parse(&body)["status"], 404);
    }

    #[tokio::test]
    async fn api_endpoints_answer_by_token_and_revoke_over_http() {
        let fake = start_with(account()).await;
        let (access, _) = login(&fake).await;
        let device = format!("{}/api/v2/physical-device", fake.base_url());
        let restricted = format!("{}/api/v2/restricted", fake.base_url());

        let (status, body) = send(client().get(&device).bearer_auth(&access)).await;
        assert_eq!((status, body.as_str()), (200, "[]"));
        let (status, _) = send(client().post(&device).bearer_auth(&access).body("x")).await;
        assert_eq!(status, 200, "POST is served too");

        // A valid token on the restricted endpoint: 401, with the permission message.
        let (status, body) = send(client().get(&restricted).bearer_auth(&access)).await;
        assert_eq!(status, 401);
        assert_eq!(parse(&body)["message"], YII_NOT_ALLOWED);
        assert_eq!(fake.total_calls(), 1, "API requests are not token requests");

        let revoke = |token: &str| format!("{}/_fake/revoke/{token}", fake.base_url());
        let (status, _) = send(client().post(revoke(&access))).await;
        assert_eq!(status, 204);
        assert!(!fake.is_valid(&access));
        let (status, body) = send(client().get(&device).bearer_auth(&access)).await;
        assert_eq!(status, 401);
        assert_yii_401(&parse(&body));
        let (status, body) = send(client().get(&restricted).bearer_auth(&access)).await;
        assert_eq!(
            (status, parse(&body)["message"].as_str()),
            (401, Some(YII_UNAUTHORIZED))
        );
        let (status, _) = send(client().post(revoke("not-issued"))).await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn expired_token_is_invalid_and_cannot_refresh() {
        let mut acct = account();
        acct.login_lifetime = Duration::ZERO;
        let fake = start_with(acct).await;
        let (access, refresh_token) = login(&fake).await;
        assert!(!fake.is_valid(&access));
        let (status, body) = refresh(&fake, &access, &refresh_token).await;
        assert_eq!(status, 401);
        assert_yii_401(&body);
        assert_eq!(fake.calls(USER, Grant::Refresh), 1);
    }

    #[tokio::test]
    async fn script_is_consumed_in_order_then_normal() {
        let fake = start_with(account()).await;
        fake.script(
            USER,
            Grant::Password,
            [
                Step::Status(503, ErrorShape::Yii),
                Step::Malformed,
                Step::Body(418, "{\"x\":1}".to_owned()),
                Step::Oversized,
                Step::Delay(Duration::from_millis(5)),
            ],
        );
        let form = [
            ("client_id", CID),
            ("client_secret", CSECRET),
            ("grant_type", "password"),
            ("username", USER),
            ("password", PASS),
        ];
        let post = || client().post(fake.token_url()).form(&form);

        let (status, body) = send(post()).await;
        assert_eq!(status, 503);
        assert_eq!(parse(&body)["status"], 503);
        assert_eq!(send(post()).await, (200, "{\"access_token\": ".to_owned()));
        assert_eq!(send(post()).await, (418, "{\"x\":1}".to_owned()));
        let (status, body) = send(post()).await;
        assert_eq!(status, 200);
        assert_eq!(body.len(), OVERSIZED_LEN);
        assert!(body.starts_with("{\"access_token\":\"aaaa"));
        // Delay, then normal processing; then the script is empty: normal again.
        assert_eq!(send(post()).await.0, 200);
        assert_eq!(send(post()).await.0, 200);
        assert_eq!(fake.calls(USER, Grant::Password), 6);

        // A refresh script is keyed by the account owning the Bearer token.
        let (access, refresh_token) = login(&fake).await;
        fake.script(USER, Grant::Refresh, [Step::RefreshedFalse]);
        let (status, body) = refresh(&fake, &access, &refresh_token).await;
        assert_eq!((status, body), (200, json!({ "refreshed": false })));
        assert_eq!(
            refresh(&fake, &access, &refresh_token).await.1["refreshed"],
            true
        );
    }

    #[tokio::test]
    async fn chaos_mode_injects_faults_over_http_and_turns_off() {
        let fake = start_with(account()).await;
        let chaos_url = format!("{}/_fake/chaos", fake.base_url());
        // Every request a 429: the answer carries Retry-After.
        let (status, _) = send(
            client()
                .post(&chaos_url)
                .body(json!({"seed": 3, "too_many_requests": 1.0}).to_string()),
        )
        .await;
        assert_eq!(status, 204);
        let resp = login_request(&fake).send().await.expect("sent");
        assert_eq!(resp.status().as_u16(), 429);
        let retry_after: u64 = resp.headers()[header::RETRY_AFTER]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!((1..=5).contains(&retry_after));

        // Every connection dropped mid-answer: the client gets no complete answer.
        fake.set_chaos(Some(Chaos {
            reset: 1.0,
            ..Chaos::default()
        }));
        let answer = client()
            .post(fake.token_url())
            .form(&[("grant_type", "password")])
            .send()
            .await;
        let failed = match answer {
            Err(_) => true,
            Ok(resp) => resp.bytes().await.is_err(),
        };
        assert!(failed, "a dropped connection must fail the request");

        // Malformed answers are not token answers.
        fake.set_chaos(Some(Chaos {
            malformed: 1.0,
            ..Chaos::default()
        }));
        for _ in 0..5 {
            let (_, body) = login_as_raw(&fake).await;
            assert!(
                serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["access_token"].as_str().map(str::to_owned))
                    .is_none(),
                "{body}"
            );
        }

        // An outage from the start answers 503 to everyone; the API is never faulted.
        fake.set_chaos(Some(Chaos {
            outage_for: Duration::from_secs(60),
            ..Chaos::default()
        }));
        assert_eq!(login_as(&fake, USER, PASS).await.0, 503);
        let (status, _) = send(client().get(fake.api_url())).await;
        assert_eq!(status, 401, "the API answers as usual");

        let (status, body) = send(client().get(&chaos_url)).await;
        let body = parse(&body);
        assert_eq!(status, 200);
        assert_eq!(body["enabled"], json!(true));
        assert_eq!(body["faults"]["too_many_requests"], json!(1));
        assert_eq!(body["faults"]["reset"], json!(1));
        assert_eq!(body["faults"]["malformed"], json!(5));
        assert_eq!(body["faults"]["outage"], json!(1));
        assert_eq!(fake.chaos_faults()["outage"], 1);

        let (status, _) = send(client().delete(&chaos_url)).await;
        assert_eq!(status, 204);
        assert_eq!(login_as(&fake, USER, PASS).await.0, 200);
        let (status, body) = send(client().get(&chaos_url)).await;
        assert_eq!(
            (status, parse(&body)["enabled"].clone()),
            (200, json!(false))
        );
        let (status, _) = send(client().post(&chaos_url).body("{\"hang\": 2}")).await;
        assert_eq!(status, 400);
    }

    /// The test account's password grant request.
    fn login_request(fake: &FakeBace) -> reqwest::RequestBuilder {
        client().post(fake.token_url()).form(&[
            ("client_id", CID),
            ("client_secret", CSECRET),
            ("grant_type", "password"),
            ("username", USER),
            ("password", PASS),
        ])
    }

    async fn login_as_raw(fake: &FakeBace) -> (u16, String) {
        send(login_request(fake)).await
    }

    #[tokio::test]
    async fn outage_answers_every_request_and_still_counts() {
        let fake = start_with(account()).await;
        let (access, refresh_token) = login(&fake).await;
        fake.set_outage(Some(Step::Status(503, ErrorShape::OAuth2)));
        let (status, body) = login_as(&fake, USER, PASS).await;
        assert_eq!(
            (status, &body["error"]),
            (503, &json!("temporarily_unavailable"))
        );
        assert_eq!(refresh(&fake, &access, &refresh_token).await.0, 503);
        let (status, _) = login_as(&fake, "other", "x").await;
        assert_eq!(status, 503);
        assert_eq!(fake.calls(USER, Grant::Password), 2);
        assert_eq!(fake.calls(USER, Grant::Refresh), 1);
        assert_eq!(fake.total_calls(), 4);
        fake.set_outage(None);
        assert_eq!(login_as(&fake, USER, PASS).await.0, 200);
    }

    #[tokio::test]
    async fn hang_ends_at_client_timeout_or_shutdown() {
        let fake = start_with(account()).await;
        fake.set_outage(Some(Step::Hang));
        let form = [
            ("client_id", CID),
            ("client_secret", CSECRET),
            ("grant_type", "password"),
            ("username", USER),
            ("password", PASS),
        ];
        let err = client()
            .post(fake.token_url())
            .timeout(Duration::from_millis(200))
            .form(&form)
            .send()
            .await
            .expect_err("hangs");
        assert!(err.is_timeout());

        let pending = tokio::spawn({
            let url = fake.token_url();
            async move { client().post(url).form(&form).send().await }
        });
        fake.wait_for_calls(USER, Grant::Password, 2).await;
        fake.shutdown();
        let resp = pending.await.expect("task").expect("answered");
        assert_eq!(resp.status().as_u16(), 503);
    }

    #[tokio::test]
    async fn hold_counts_then_waits_for_release() {
        let fake = start_with(account()).await;
        fake.hold();
        let task = tokio::spawn({
            let fake = fake.clone();
            async move { login_as(&fake, USER, PASS).await }
        });
        fake.wait_for_calls(USER, Grant::Password, 1).await;
        fake.wait_for_total_calls(1).await;
        assert!(!task.is_finished());
        assert!(fake.last_request(USER, Grant::Password).is_some());
        fake.release();
        let (status, _) = task.await.expect("task");
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn revoked_token_is_rejected() {
        let fake = start_with(account()).await;
        let (access, refresh_token) = login(&fake).await;
        assert!(fake.is_valid(&access));
        fake.revoke(&access);
        assert!(!fake.is_valid(&access));
        let (status, body) = send(client().get(fake.api_url()).bearer_auth(&access)).await;
        assert_eq!(status, 401);
        assert_yii_401(&parse(&body));
        let (status, body) = refresh(&fake, &access, &refresh_token).await;
        assert_eq!(status, 401);
        assert_yii_401(&body);
        let (status, _) = send(client().get(fake.api_url())).await;
        assert_eq!(status, 401);
    }

    #[tokio::test]
    async fn last_request_records_form_and_bearer() {
        let fake = start_with(account()).await;
        assert!(fake.last_request(USER, Grant::Password).is_none());
        let (access, refresh_token) = login(&fake).await;
        let recorded = fake.last_request(USER, Grant::Password).expect("recorded");
        assert_eq!(recorded.content_type, "application/x-www-form-urlencoded");
        assert_eq!(recorded.bearer, None);
        let expected: BTreeMap<String, String> = [
            ("client_id", CID),
            ("client_secret", CSECRET),
            ("grant_type", "password"),
            ("username", USER),
            ("password", PASS),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(recorded.form, expected);
        // Debug hides secrets.
        let shown = format!("{recorded:?}");
        assert!(!shown.contains(PASS) && !shown.contains(CSECRET));

        refresh(&fake, &access, &refresh_token).await;
        let recorded = fake.last_request(USER, Grant::Refresh).expect("recorded");
        assert_eq!(recorded.bearer.as_deref(), Some(access.as_str()));
        assert_eq!(recorded.form.get("refresh_token"), Some(&refresh_token));

        // An unknown Bearer counts under "".
        refresh(&fake, "not-a-token", &refresh_token).await;
        assert_eq!(fake.calls("", Grant::Refresh), 1);
        assert!(fake.last_request("", Grant::Refresh).is_some());
    }

    #[tokio::test]
    async fn introspection_reports_tokens_and_calls_without_counting() {
        let mut acct = account();
        acct.refresh_style = RefreshStyle::OAuth2 {
            rotate_refresh_token: true,
            expires_in_as_string: false,
        };
        let fake = start_with(acct).await;
        let get = |path: String| {
            let url = format!("{}{path}", fake.base_url());
            async move {
                let (status, body) = send(client().get(url)).await;
                (status, parse(&body))
            }
        };

        let (status, body) = get("/_fake/calls".to_owned()).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({ "total": 0, "password": {}, "refresh_token": {} })
        );

        let (access, refresh_token) = login(&fake).await;
        assert_eq!(fake.issued_to(&access).as_deref(), Some(USER));
        let (status, body) = get(format!("/_fake/tokens/{access}")).await;
        assert_eq!(status, 200);
        assert_eq!(body["username"], USER);
        assert_eq!(body["valid"], true);
        assert_eq!(body["revoked"], false);
        let exp = fake.expires_at(&access).expect("issued");
        let exp_secs = exp
            .duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        assert_eq!(body["expires_at"], exp_secs);
        let exp_ms = exp
            .duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_millis() as u64;
        assert_eq!(body["expires_at_ms"], exp_ms);

        // A rotated-out token is still known (and says so); a new one belongs to the same account.
        let (_, answer) = refresh(&fake, &access, &refresh_token).await;
        let new_access = answer["access_token"].as_str().expect("new token");
        let (status, body) = get(format!("/_fake/tokens/{access}")).await;
        assert_eq!(status, 200);
        assert_eq!(body["valid"], false);
        assert_eq!(body["revoked"], true);
        let (_, body) = get(format!("/_fake/tokens/{new_access}")).await;
        assert_eq!(body["username"], USER);
        assert_eq!(body["valid"], true);

        // Unknown tokens: 404 here, `None` on the handle.
        let (status, body) = get("/_fake/tokens/not-a-token".to_owned()).await;
        assert_eq!((status, &body["error"]), (404, &json!("unknown_token")));
        assert_eq!(fake.issued_to("not-a-token"), None);

        // Counts as the handle reports them; the introspection requests were not counted.
        login_as(&fake, "nobody@example.com", PASS).await;
        refresh(&fake, "not-a-token", &refresh_token).await;
        let (status, body) = get("/_fake/calls".to_owned()).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({
                "total": 4,
                "password": { USER: 1, "nobody@example.com": 1 },
                "refresh_token": { USER: 1, "": 1 },
            })
        );
        assert_eq!(fake.total_calls(), 4);
        fake.shutdown();
    }

    #[test]
    fn form_parsing_decodes() {
        let form = parse_form(b"a=b+c&d=%41%zz&e&f=1=2&a=last");
        assert_eq!(form.get("a").map(String::as_str), Some("last"));
        assert_eq!(form.get("d").map(String::as_str), Some("A%zz"));
        assert_eq!(form.get("e").map(String::as_str), Some(""));
        assert_eq!(form.get("f").map(String::as_str), Some("1=2"));
        assert_eq!(
            parse_form(b"x=b+c").get("x").map(String::as_str),
            Some("b c")
        );
    }
}
