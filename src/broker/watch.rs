//! Watching an account's token: [`TokenWatch`] waits for the next token to hand out, and
//! [`TokenStream`] is the same as a `Stream`.
//!
//! Neither spawns a task or makes a channel of its own: a watcher is a `watch::Receiver` on the
//! account's [`TokenCell`](super::slot::TokenCell) (created by the first watcher) plus, for the
//! stream, one reusable boxed future, as tonic-health's `WatchStream` does. Thousands of watchers
//! cost a few hundred bytes each and no upstream call.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{sync::watch, time::Instant};
use tokio_stream::Stream;
use tokio_util::sync::ReusableBoxFuture;

use super::{Broker, BrokerError, slot::Slot};
use crate::token::{Fingerprint, Token};

/// A watcher of one account's token: yields the current valid token, then each new token or
/// new expiry; never an expired token. Follows the account across reloads that change its
/// credentials.
pub struct TokenWatch {
    broker: Broker,
    slot: Arc<Slot>,
    receiver: watch::Receiver<Option<Arc<Token>>>,
    /// What was yielded last (token and expiry), to yield changes only.
    last: Option<(Fingerprint, Instant)>,
}

impl TokenWatch {
    pub(super) fn new(
        broker: Broker,
        slot: Arc<Slot>,
        receiver: watch::Receiver<Option<Arc<Token>>>,
    ) -> Self {
        Self {
            broker,
            slot,
            receiver,
            last: None,
        }
    }

    /// The next token to hand out. `None` when the broker stops; an error when the account
    /// was removed from the configuration.
    pub async fn next(&mut self) -> Next {
        let stop = self.broker.inner.draining.clone();
        let margin = self.broker.inner.policy.refresh.expiry_margin;
        loop {
            if self.slot.is_retired() {
                // A reload replaced or removed the account: follow it, or end.
                match self.broker.inner.slot(self.slot.account.name.as_str()) {
                    Ok(slot) => {
                        self.receiver = slot.token.subscribe();
                        self.slot = slot;
                    }
                    Err(error) => return Some(Err(error)),
                }
            }
            let current = self.receiver.borrow_and_update().clone();
            if let Some(token) = current.filter(|t| t.valid_for(Instant::now(), margin)) {
                let seen = Some((token.fingerprint(), token.expires_at()));
                if self.last != seen {
                    self.last = seen;
                    return Some(Ok(token));
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                changed = self.receiver.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// This watcher as a `Stream`; it ends after an error.
    pub fn into_stream(self) -> TokenStream {
        TokenStream {
            next: ReusableBoxFuture::new(next_owned(self)),
            done: false,
        }
    }
}

/// What [`TokenWatch::next`] yields.
type Next = Option<Result<Arc<Token>, BrokerError>>;

/// Waits for the next token and hands the watcher back, so its future can be reused.
async fn next_owned(mut watch: TokenWatch) -> (Next, TokenWatch) {
    let next = watch.next().await;
    (next, watch)
}

/// [`TokenWatch`] as a `Stream` of tokens: ends when the broker stops, and after yielding an
/// error (the account was removed).
pub struct TokenStream {
    next: ReusableBoxFuture<'static, (Next, TokenWatch)>,
    done: bool,
}

impl Stream for TokenStream {
    type Item = Result<Arc<Token>, BrokerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let (item, watch) = std::task::ready!(self.next.poll(cx));
        match &item {
            Some(Ok(_)) => self.next.set(next_owned(watch)),
            Some(Err(_)) | None => self.done = true,
        }
        Poll::Ready(item)
    }
}
