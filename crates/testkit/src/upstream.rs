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
use secrecy::SecretString;
use tokio::time::{Duration, Instant};

const DAY: Duration = Duration::from_secs(86_400);

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
#[derive(Default)]
pub struct ScriptedUpstream {
    script: Mutex<HashMap<(String, Grant), VecDeque<Answer>>>,
    outage: Mutex<Option<Answer>>,
    log: Mutex<Vec<(Instant, String, Grant)>>,
    issued: Mutex<u64>,
    lifetimes: Mutex<HashMap<String, Duration>>,
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
                expires: Some(SystemTime::now() + 14 * DAY),
            },
        })
    }
}

impl Upstream for ScriptedUpstream {
    fn login<'a>(&'a self, a: &'a AccountConfig) -> BoxFuture<'a, Result<Issued, UpstreamError>> {
        Box::pin(self.answer(a.name.as_str(), Grant::Password))
    }

    fn refresh<'a>(
        &'a self,
        a: &'a AccountConfig,
        _: &'a Token,
    ) -> BoxFuture<'a, Result<Issued, UpstreamError>> {
        Box::pin(self.answer(a.name.as_str(), Grant::Refresh))
    }
}
