//! The load of the soak: callers looping on GetToken (random `min_validity`) and Invalidate
//! (1 % of calls), WatchToken streams opening and closing, and the check of every token served
//! against what the fake BACE knows of it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use bace_token_broker::proto::{
    self, GetTokenRequest, InvalidateRequest, WatchTokenRequest,
    token_broker_service_client::TokenBrokerServiceClient,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{sync::watch, task::JoinSet};
use tonic::{Code, transport::Channel};

use crate::{
    fleet::{POLICY, SoakAccount},
    procs::FakeProc,
};

/// What callers see, counted.
#[derive(Default)]
pub(crate) struct Tally {
    /// Calls by RPC and answer code.
    pub(crate) codes: BTreeMap<(&'static str, String), u64>,
    /// Tokens checked (answers of GetToken and Invalidate, WatchToken messages).
    pub(crate) checked: u64,
    /// Tokens the fake says were expired (or unknown) when the caller received them.
    pub(crate) expired: Vec<String>,
    /// Tokens the fake did not issue.
    pub(crate) unknown: u64,
    /// Tokens whose `expires_at`, as the broker says, misses the caller's `min_validity` plus
    /// the expiry margin (counted from when the call was sent).
    pub(crate) short_claim: Vec<String>,
    /// Tokens that, by the fake's expiry, did not stay valid for the caller's `min_validity`
    /// from when the call was sent.
    pub(crate) short_truth: Vec<String>,
    /// Largest amount by which the broker's `expires_at` was later than the fake's expiry (at
    /// the lookup, which can follow a refresh that moved the expiry up to 1 s earlier).
    pub(crate) max_overstatement: Option<(Duration, String)>,
    /// Smallest time a served token had left by the fake's clock when it arrived.
    pub(crate) min_left: Option<(Duration, String)>,
    /// Lookups at the fake (the rest were answered from the expiry cache).
    pub(crate) lookups: u64,
    /// WatchToken streams opened.
    pub(crate) streams: u64,
}

/// Shared state of the load tasks.
#[derive(Clone)]
pub(crate) struct Load {
    pub(crate) fake: Arc<FakeProc>,
    /// The accounts configured now (the reloader changes it).
    pub(crate) active: Arc<RwLock<Vec<SoakAccount>>>,
    pub(crate) tally: Arc<Mutex<Tally>>,
    /// Last known fake expiry of each token. Nearly a lower bound: the soak's accounts have one
    /// lifetime for logins and refreshes, so a token's expiry at the fake moves later, except
    /// that a BACE-style refresh within a second of the login can move it up to 1 s earlier
    /// (the fake rounds `expires` down to the second). The cache answers only for tokens with
    /// more than the expiry margin (3 s) left, so that second cannot hide an expired token.
    expiries: Arc<Mutex<HashMap<String, SystemTime>>>,
    /// The last token served per account (what Invalidate reports).
    last: Arc<Mutex<HashMap<String, String>>>,
    stop: watch::Receiver<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Load {
    pub(crate) fn new(
        fake: Arc<FakeProc>,
        active: Arc<RwLock<Vec<SoakAccount>>>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            fake,
            active,
            tally: Arc::default(),
            expiries: Arc::default(),
            last: Arc::default(),
            stop,
        }
    }

    /// Starts `callers` callers and `watchers` watchers on `channels` (shared round-robin).
    pub(crate) fn spawn(
        &self,
        tasks: &mut JoinSet<()>,
        channels: &[Channel],
        callers: usize,
        watchers: usize,
        seed: u64,
    ) {
        for i in 0..callers {
            let client = TokenBrokerServiceClient::new(channels[i % channels.len()].clone());
            let rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
            tasks.spawn(self.clone().caller(client, rng));
        }
        for i in 0..watchers {
            let client = TokenBrokerServiceClient::new(channels[i % channels.len()].clone());
            let rng = StdRng::seed_from_u64(!seed ^ (i as u64).wrapping_mul(0x85eb_ca6b));
            tasks.spawn(self.clone().watcher(client, rng));
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn pick(&self, rng: &mut StdRng) -> Option<String> {
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        (!active.is_empty()).then(|| active[rng.random_range(0..active.len())].name.clone())
    }

    fn count(&self, rpc: &'static str, code: Code) {
        *lock(&self.tally)
            .codes
            .entry((rpc, format!("{code:?}")))
            .or_default() += 1;
    }

    async fn caller(self, mut client: TokenBrokerServiceClient<Channel>, mut rng: StdRng) {
        while !self.stopped() {
            let Some(account) = self.pick(&mut rng) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let sent = SystemTime::now();
            if rng.random_bool(0.01) {
                let reported = lock(&self.last).get(&account).cloned().unwrap_or_default();
                let mut request = tonic::Request::new(InvalidateRequest {
                    account: account.clone(),
                    access_token: reported,
                });
                request.set_timeout(Duration::from_secs(30));
                match client.invalidate(request).await {
                    Ok(answer) => {
                        self.count("Invalidate", Code::Ok);
                        if let Some(token) = answer.into_inner().token {
                            self.check("Invalidate", &account, &token, sent, Duration::ZERO)
                                .await;
                        }
                    }
                    Err(status) => self.count("Invalidate", status.code()),
                }
            } else {
                // Half the calls ask for nothing more than the margin; the others for up to
                // 15 s more, which tokens of 5–20 s meet only some of the time.
                let min_validity = if rng.random_bool(0.5) {
                    Duration::ZERO
                } else {
                    Duration::from_millis(rng.random_range(0..15_000))
                };
                let mut request = tonic::Request::new(GetTokenRequest {
                    account: account.clone(),
                    min_validity: (!min_validity.is_zero()).then(|| prost_types::Duration {
                        seconds: min_validity.as_secs() as i64,
                        nanos: min_validity.subsec_nanos() as i32,
                    }),
                });
                request.set_timeout(Duration::from_secs(30));
                match client.get_token(request).await {
                    Ok(answer) => {
                        self.count("GetToken", Code::Ok);
                        if let Some(token) = answer.into_inner().token {
                            self.check("GetToken", &account, &token, sent, min_validity)
                                .await;
                        }
                    }
                    Err(status) => self.count("GetToken", status.code()),
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await;
        }
    }

    async fn watcher(self, mut client: TokenBrokerServiceClient<Channel>, mut rng: StdRng) {
        while !self.stopped() {
            let Some(account) = self.pick(&mut rng) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let open_for = Duration::from_millis(rng.random_range(1_000..20_000));
            lock(&self.tally).streams += 1;
            let stream = client
                .watch_token(WatchTokenRequest {
                    account: account.clone(),
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(status) => {
                    self.count("WatchToken", status.code());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let deadline = tokio::time::Instant::now() + open_for;
            let mut stop = self.stop.clone();
            let code = loop {
                let sent = SystemTime::now();
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break Code::Ok,
                    // The stop flag only ever turns true.
                    _ = stop.changed() => break Code::Ok,
                    message = stream.message() => match message {
                        Ok(Some(m)) => {
                            if let Some(token) = m.token {
                                self.check("WatchToken", &account, &token, sent, Duration::ZERO).await;
                            }
                        }
                        // The stream ended (e.g. the account was removed by a reload).
                        Ok(None) => break Code::Ok,
                        Err(status) => break status.code(),
                    },
                }
            };
            // Dropping the stream closes it.
            drop(stream);
            self.count("WatchToken", code);
        }
    }

    /// Checks one token a caller received: `sent` is when the call was made (for a stream,
    /// when the soak began waiting for the message), `min_validity` what it asked for.
    async fn check(
        &self,
        rpc: &'static str,
        account: &str,
        token: &proto::Token,
        sent: SystemTime,
        min_validity: Duration,
    ) {
        let received = SystemTime::now();
        let claimed = token
            .expires_at
            .as_ref()
            .and_then(|t| {
                SystemTime::UNIX_EPOCH.checked_add(Duration::new(
                    u64::try_from(t.seconds).ok()?,
                    u32::try_from(t.nanos).ok()?,
                ))
            })
            .unwrap_or(SystemTime::UNIX_EPOCH);
        lock(&self.last).insert(account.to_owned(), token.access_token.clone());
        let wanted = sent + min_validity;
        // The broker's own claim: margin + min_validity from when the call was sent. 250 ms of
        // slack for its conversion of a monotonic deadline into wall-clock `expires_at`.
        let short_claim = claimed + Duration::from_millis(250) < wanted + POLICY.expiry_margin;

        let cached = lock(&self.expiries).get(&token.access_token).copied();
        // The cache answers only for tokens far from their end: one within the expiry margin of
        // its cached expiry is looked up again, so the least time left is measured, not a
        // stale lower bound.
        let fresh =
            !matches!(cached, Some(e) if e > received + POLICY.expiry_margin && e >= wanted);
        let truth = match cached {
            Some(e) if !fresh => Some(e),
            _ => match self.fake.token_expiry(&token.access_token).await {
                Ok(Some(e)) => {
                    let mut expiries = lock(&self.expiries);
                    let slot = expiries.entry(token.access_token.clone()).or_insert(e);
                    *slot = (*slot).max(e);
                    lock(&self.tally).lookups += 1;
                    Some(*slot)
                }
                Ok(None) => None,
                Err(error) => {
                    eprintln!("soak: token lookup at the fake failed: {error:#}");
                    return;
                }
            },
        };

        let mut tally = lock(&self.tally);
        tally.checked += 1;
        let what = |why: &str| {
            format!(
                "{rpc} {account}: {why} (min_validity {min_validity:?}, expires_at {:.3} s after \
                 the call was sent)",
                claimed
                    .duration_since(sent)
                    .unwrap_or_default()
                    .as_secs_f64()
            )
        };
        if short_claim {
            tally
                .short_claim
                .push(what("expires_at short of min_validity + margin"));
        }
        let Some(truth) = truth else {
            tally.unknown += 1;
            tally.expired.push(what("a token the fake did not issue"));
            return;
        };
        match truth.duration_since(received) {
            Ok(left) if !left.is_zero() => {
                if tally.min_left.as_ref().is_none_or(|m| left < m.0) {
                    tally.min_left = Some((left, what("least time left")));
                }
            }
            _ => tally
                .expired
                .push(what("expired at the fake when received")),
        }
        if truth < wanted {
            tally
                .short_truth
                .push(what("by the fake's expiry, shorter than min_validity"));
        }
        // Only against a fresh lookup: a cached expiry may predate a refresh the broker knows.
        if let (true, Ok(over)) = (fresh, claimed.duration_since(truth))
            && tally.max_overstatement.as_ref().is_none_or(|m| over > m.0)
        {
            tally.max_overstatement = Some((over, what("largest overstatement")));
        }
    }
}
