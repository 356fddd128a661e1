//! [`TokenWatch`]: an account's current token, kept up to date by a `WatchToken` stream.
//!
//! One task per handle (and its clones) owns the stream. It publishes on a `watch` channel and
//! exits when every receiver is gone (`Sender::closed`), so dropping the last handle stops it.
//! When the stream breaks (the broker restarts, the connection drops) or cannot start, the task
//! reconnects after a capped exponential backoff with jitter, reset by every message received.

use std::{sync::Arc, time::Duration};

use rand::Rng;
use tokio::sync::watch;

use crate::{
    Error, Token,
    cache::Slot,
    client::{Rpc, failed},
    connect::CallerToken,
    proto,
};

/// A handle on an account's current token, from [`BrokerClient::watch`](crate::BrokerClient::watch).
///
/// Cheap to clone; the background stream stops when the last clone is dropped.
///
/// ```no_run
/// # async fn demo(client: bace_token_broker_client::BrokerClient)
/// #     -> Result<(), bace_token_broker_client::Error> {
/// let mut watch = client.watch("fleet-a");
/// let token = watch.token().await?; // waits for the first token
/// loop {
///     let next = watch.changed().await?; // a new token, or a new expiry
///     println!("{next:?}");
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct TokenWatch {
    rx: watch::Receiver<State>,
    /// The `State::tokens` and `State::errors` this handle has reported through `changed`.
    seen: (u64, u64),
}

/// What the stream last told.
#[derive(Clone, Debug, Default)]
struct State {
    token: Option<Token>,
    /// The last failure, cleared by the next message.
    error: Option<Error>,
    /// Streams opened so far (1 once connected the first time).
    connections: u64,
    /// Tokens received so far.
    tokens: u64,
    /// Failures so far.
    errors: u64,
}

impl TokenWatch {
    pub(crate) fn spawn(
        rpc: Rpc,
        caller: CallerToken,
        slot: Arc<Slot>,
        account: String,
        backoff: (Duration, Duration),
    ) -> Self {
        let (tx, rx) = watch::channel(State::default());
        let task = Task {
            rpc,
            caller,
            slot,
            account,
            backoff,
            delivered: false,
        };
        tokio::spawn(task.run(tx));
        Self { rx, seen: (0, 0) }
    }

    /// The latest token received, if it has not expired.
    pub fn current(&self) -> Option<Token> {
        self.rx
            .borrow()
            .token
            .clone()
            .filter(|t| !t.valid_for().is_zero())
    }

    /// The last failure of the stream, if it has not received a token since.
    pub fn last_error(&self) -> Option<Error> {
        self.rx.borrow().error.clone()
    }

    /// How many times the stream has been opened (1 after the first connection; each
    /// reconnection adds one).
    pub fn connections(&self) -> u64 {
        self.rx.borrow().connections
    }

    /// The current token, waiting for one if there is none yet (or it expired).
    ///
    /// # Errors
    ///
    /// The stream's last failure while there is no valid token (e.g. [`Error::UnknownAccount`],
    /// [`Error::BrokerUnreachable`]); the watch keeps retrying in the background.
    pub async fn token(&mut self) -> Result<Token, Error> {
        let state = self
            .rx
            .wait_for(|s| valid(s).is_some() || s.error.is_some())
            .await
            .map_err(|_| ended())?;
        match valid(&state) {
            Some(token) => Ok(token),
            None => Err(state.error.clone().unwrap_or_else(ended)),
        }
    }

    /// Waits for the next token (a new token, or the same with a new expiry) after the last
    /// one this handle's `changed` returned, and returns it. The first call returns the first
    /// token received (at once if it has arrived).
    ///
    /// # Errors
    ///
    /// A failure of the stream, reported once per failure (the watch keeps retrying).
    pub async fn changed(&mut self) -> Result<Token, Error> {
        loop {
            let state = self.rx.borrow_and_update().clone();
            if state.errors != self.seen.1 {
                self.seen.1 = state.errors;
                if let Some(e) = state.error {
                    return Err(e);
                }
            }
            if state.tokens != self.seen.0 {
                self.seen.0 = state.tokens;
                if let Some(token) = state.token {
                    return Ok(token);
                }
            }
            self.rx.changed().await.map_err(|_| ended())?;
        }
    }

    /// Waits until the stream has been opened `n` times in all (`connections() >= n`).
    pub async fn wait_connections(&mut self, n: u64) {
        let _ = self.rx.wait_for(|s| s.connections >= n).await;
    }
}

fn valid(state: &State) -> Option<Token> {
    state.token.clone().filter(|t| !t.valid_for().is_zero())
}

fn ended() -> Error {
    Error::Broker {
        code: tonic::Code::Cancelled,
        message: "the watch task ended".into(),
    }
}

/// The background side of a [`TokenWatch`].
struct Task {
    rpc: Rpc,
    caller: CallerToken,
    slot: Arc<Slot>,
    account: String,
    backoff: (Duration, Duration),
    /// Whether the current stream delivered a token (then the backoff starts over).
    delivered: bool,
}

impl Task {
    /// Runs until every receiver of `tx` is gone.
    async fn run(mut self, tx: watch::Sender<State>) {
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                () = tx.closed() => return,
                received = self.stream(&tx) => {
                    if self.delivered {
                        // A stream that worked and broke: reconnect soon.
                        failures = 0;
                        self.delivered = false;
                    }
                    if let Err(error) = received {
                        tracing::debug!(account = %self.account, %error, "token watch broken");
                        tx.send_modify(|s| {
                            s.error = Some(error);
                            s.errors += 1;
                        });
                    }
                }
            }
            let delay = backoff(self.backoff, failures);
            failures = failures.saturating_add(1);
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One stream, until it ends (`Ok` when the broker ended it cleanly, on shutdown). Sets
    /// `delivered` when a token arrives.
    async fn stream(&mut self, tx: &watch::Sender<State>) -> Result<(), Error> {
        let request = proto::WatchTokenRequest {
            account: self.account.clone(),
        };
        let mut stream = self
            .rpc
            .watch_token(request)
            .await
            .map_err(|s| failed(&self.caller, s))?
            .into_inner();
        tx.send_modify(|s| s.connections += 1);
        while let Some(message) = stream
            .message()
            .await
            .map_err(|s| failed(&self.caller, s))?
        {
            let token = message
                .token
                .ok_or_else(|| Error::protocol("WatchToken answered without a token"))
                .and_then(Token::from_proto)?;
            self.slot.store(&token);
            self.delivered = true;
            tx.send_modify(|s| {
                s.token = Some(token);
                s.tokens += 1;
                s.error = None;
            });
        }
        Ok(())
    }
}

/// The delay before reconnection attempt `failures` (0 after a working stream): `initial`
/// doubled per failure, capped at `max`, then between half and all of it (jitter, so many
/// clients of a restarted broker do not come back at once).
fn backoff((initial, max): (Duration, Duration), failures: u32) -> Duration {
    let full = initial
        .saturating_mul(2u32.saturating_pow(failures.min(20)))
        .min(max);
    let half = full / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let b = (Duration::from_millis(100), Duration::from_secs(10));
        for (failures, full) in [(0, 100), (1, 200), (3, 800), (7, 10_000), (40, 10_000)] {
            let full = Duration::from_millis(full);
            for _ in 0..50 {
                let d = backoff(b, failures);
                assert!(d >= full / 2 && d <= full, "{failures}: {d:?}");
            }
        }
        assert_eq!(backoff((Duration::ZERO, Duration::ZERO), 5), Duration::ZERO);
    }
}
