//! In-process upstreams: the broker core without HTTP.
//!
//! - [`InstantUpstream`]: answers every login and refresh at once with a new token (benchmarks
//!   of the broker alone, the memory probe).
//! - [`ScriptedUpstream`]: an in-memory BACE whose answers tests script per account and grant,
//!   logging every call with its (paused) time: the broker core's tests run in paused time,
//!   where reqwest cannot.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

use bace_token_broker::{AccountConfig, BoxFuture, Grant, Issued, Token, Upstream, UpstreamError};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::{Duration, Instant};

const DAY: Duration = Duration::from_secs(86_400);

/// How long [`ScriptedUpstream`]'s refresh answers extend a token (BACE's 14 days).
pub const REFRESH_EXTENDS: Duration = Duration::from_secs(14 * 86_400);

/// Every login and refresh answers at once with a new token of 40 hex characters (as BACE's)
/// and a new refresh token, valid 24 hours.
#[derive(Debug, Default, Clone, Copy)]
pub struct InstantUpstream;

impl Upstream for InstantUpstream {
    fn login<'a>(&'a self, _: &'a AccountConfig) -> BoxFuture<'a, Result<Issued, UpstreamError>> {
        Box::pin(async {
            Ok(Issued::Token {
                access: SecretString::from(new_token()),
                refresh: Some(SecretString::from(new_token())),
                lifetime: Some(DAY),
            })
        })
    }

    fn refresh<'a>(
        &'a self,
        account: &'a AccountConfig,
        _: &'a Token,
    ) -> BoxFuture<'a, Result<Issued, UpstreamError>> {
        self.login(account)
    }
}

/// 40 random lowercase hex characters.
fn new_token() -> String {
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A scripted answer of [`ScriptedUpstream`].
#[derive(Clone, Debug)]
pub enum Answer {
    /// Fail with this error.
    Fail(UpstreamError),
    /// Never answer.
    Hang,
    /// Answer normally after this long.
    Delay(Duration),
}

/// An in-memory BACE: logins issue 24 h tokens (per account lifetimes can be set), refreshes
/// extend by 14 days (BACE style), unless scripted otherwise; every call is logged with its
/// (paused) time.
///
/// Besides the call log, it keeps a [`CallRecord`] per request (when it started and ended, with
/// which password, what it answered or whether the broker dropped it), the requests in flight
/// per account and the most there ever were, and when each token it issued really expires:
/// what a model-based test checks the broker against.
#[derive(Default)]
pub struct ScriptedUpstream {
    script: Mutex<HashMap<(String, Grant), VecDeque<Answer>>>,
    outage: Mutex<Option<Answer>>,
    log: Mutex<Vec<(Instant, String, Grant)>>,
    issued: Mutex<u64>,
    lifetimes: Mutex<HashMap<String, Duration>>,
    records: Mutex<Vec<CallRecord>>,
    /// Requests in flight per account, and the most ever seen at once.
    in_flight: Mutex<HashMap<String, (usize, usize)>>,
    /// When each access token issued (or last extended) stops being accepted.
    expiries: Mutex<HashMap<String, Instant>>,
}

/// One request [`ScriptedUpstream`] received, and what became of it.
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// The account.
    pub account: String,
    /// The password of the account's config that made the request (tells a reloaded account's
    /// requests from its predecessor's).
    pub password: String,
    /// The grant.
    pub grant: Grant,
    /// When the request arrived.
    pub started: Instant,
    /// When it was answered or dropped (`None` while in flight).
    pub ended: Option<Instant>,
    /// What it answered.
    pub outcome: CallOutcome,
    /// When the token it issued or extended stops being accepted (as of its answer). A login's
    /// `expires_in` counts from when the request arrived (BACE issued the token at once, however
    /// slow the answer); a refresh's absolute `expires` is set when it answers.
    pub expires: Option<Instant>,
}

/// What became of a request to [`ScriptedUpstream`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// Not answered yet.
    Pending,
    /// Answered with a token: the access token a login issued, or the one a refresh extended.
    Issued(String),
    /// Answered with this error.
    Failed(UpstreamError),
    /// The broker stopped waiting before an answer (its timeout, or it gave the fetch up).
    Dropped,
}

/// Ends a request's record when its future completes or is dropped.
struct InFlight<'a> {
    upstream: &'a ScriptedUpstream,
    account: String,
    index: usize,
    outcome: CallOutcome,
    expires: Option<Instant>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let outcome = std::mem::replace(&mut self.outcome, CallOutcome::Dropped);
        let record = &mut lock(&self.upstream.records)[self.index];
        record.ended = Some(Instant::now());
        record.outcome = outcome;
        record.expires = self.expires;
        if let Some((now, _)) = lock(&self.upstream.in_flight).get_mut(&self.account) {
            *now -= 1;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ScriptedUpstream {
    /// Appends answers for `account`'s `grant` requests, used first in first out.
    pub fn script(&self, account: &str, grant: Grant, answers: impl IntoIterator<Item = Answer>) {
        lock(&self.script)
            .entry((account.into(), grant))
            .or_default()
            .extend(answers);
    }

    /// Forgets every scripted answer not used yet.
    pub fn clear_script(&self) {
        lock(&self.script).clear();
    }

    /// While `Some`, every request answers so (scripts wait).
    pub fn outage(&self, answer: Option<Answer>) {
        *lock(&self.outage) = answer;
    }

    /// The lifetime of `account`'s login tokens (default 24 h).
    pub fn set_login_lifetime(&self, account: &str, lifetime: Duration) {
        lock(&self.lifetimes).insert(account.into(), lifetime);
    }

    /// When `account`'s `grant` requests arrived.
    pub fn calls(&self, account: &str, grant: Grant) -> Vec<Instant> {
        lock(&self.log)
            .iter()
            .filter(|(_, a, g)| a == account && *g == grant)
            .map(|(t, _, _)| *t)
            .collect()
    }

    /// Every request so far.
    pub fn total(&self) -> usize {
        lock(&self.log).len()
    }

    /// Every request so far, in the order they arrived, with what became of it.
    pub fn records(&self) -> Vec<CallRecord> {
        lock(&self.records).clone()
    }

    /// `account`'s requests in flight now.
    pub fn in_flight(&self, account: &str) -> usize {
        lock(&self.in_flight).get(account).map_or(0, |c| c.0)
    }

    /// The most requests of `account` ever in flight at once.
    pub fn max_in_flight(&self, account: &str) -> usize {
        lock(&self.in_flight).get(account).map_or(0, |c| c.1)
    }

    /// When the token with `access` stops being accepted, if this upstream issued it.
    pub fn expiry_of(&self, access: &str) -> Option<Instant> {
        lock(&self.expiries).get(access).copied()
    }

    /// Records a request's start: the guard records its end.
    fn start(&self, account: &str, password: &str, grant: Grant) -> InFlight<'_> {
        let now = Instant::now();
        let index = {
            let mut records = lock(&self.records);
            records.push(CallRecord {
                account: account.into(),
                password: password.into(),
                grant,
                started: now,
                ended: None,
                outcome: CallOutcome::Pending,
                expires: None,
            });
            records.len() - 1
        };
        let mut in_flight = lock(&self.in_flight);
        let (current, most) = in_flight.entry(account.into()).or_default();
        *current += 1;
        *most = (*most).max(*current);
        InFlight {
            upstream: self,
            account: account.into(),
            index,
            outcome: CallOutcome::Dropped,
            expires: None,
        }
    }

    /// [`ScriptedUpstream::answer`] with its [`CallRecord`]; `refreshed` is the access token a
    /// refresh was made with.
    async fn recorded(
        &self,
        account: &AccountConfig,
        grant: Grant,
        refreshed: Option<&str>,
    ) -> Result<Issued, UpstreamError> {
        let name = account.name.as_str();
        let sent = Instant::now();
        let mut guard = self.start(name, account.credentials.expose_password(), grant);
        let answer = self.answer(name, grant).await;
        let now = Instant::now();
        guard.outcome = match (&answer, refreshed) {
            (Err(e), _) => CallOutcome::Failed(e.clone()),
            (
                Ok(Issued::Token {
                    access, lifetime, ..
                }),
                _,
            ) => {
                // The worst case for the broker: BACE issued the token (and started its
                // `expires_in`) the moment the request arrived, and the answer was slow.
                let access = access.expose_secret().to_owned();
                let expires = sent + lifetime.unwrap_or(DAY);
                lock(&self.expiries).insert(access.clone(), expires);
                guard.expires = Some(expires);
                CallOutcome::Issued(access)
            }
            (Ok(Issued::Extended { .. }), Some(access)) => {
                lock(&self.expiries).insert(access.to_owned(), now + REFRESH_EXTENDS);
                guard.expires = Some(now + REFRESH_EXTENDS);
                CallOutcome::Issued(access.to_owned())
            }
            (Ok(Issued::Extended { .. }), None) => CallOutcome::Issued(String::new()),
        };
        answer
    }

    async fn answer(&self, account: &str, grant: Grant) -> Result<Issued, UpstreamError> {
        lock(&self.log).push((Instant::now(), account.into(), grant));
        let scripted = lock(&self.outage).clone().or_else(|| {
            lock(&self.script)
                .get_mut(&(account.into(), grant))
                .and_then(VecDeque::pop_front)
        });
        match scripted {
            Some(Answer::Fail(e)) => return Err(e),
            Some(Answer::Hang) => std::future::pending().await,
            Some(Answer::Delay(d)) => tokio::time::sleep(d).await,
            None => {}
        }
        Ok(match grant {
            Grant::Password => {
                let n = {
                    let mut issued = lock(&self.issued);
                    *issued += 1;
                    *issued
                };
                let lifetime = lock(&self.lifetimes).get(account).copied().unwrap_or(DAY);
                Issued::Token {
                    access: SecretString::from(format!("access-{account}-{n}")),
                    refresh: Some(SecretString::from(format!("refresh-{account}-{n}"))),
                    lifetime: Some(lifetime),
                }
            }
            Grant::Refresh => Issued::Extended {
                expires: Some(SystemTime::now() + REFRESH_EXTENDS),
            },
        })
    }
}

impl Upstream for ScriptedUpstream {
    fn login<'a>(&'a self, a: &'a AccountConfig) -> BoxFuture<'a, Result<Issued, UpstreamError>> {
        Box::pin(self.recorded(a, Grant::Password, None))
    }

    fn refresh<'a>(
        &'a self,
        a: &'a AccountConfig,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Issued, UpstreamError>> {
        Box::pin(self.recorded(a, Grant::Refresh, Some(token.expose_access())))
    }
}
