//! Announcements of new tokens, and the moments the broker must reconcile.
//!
//! The subscription has a connection of its own (RESP3 push messages on a
//! [`ConnectionManager`] with automatic re-subscription). Pub/sub is at most once: whatever is
//! published while the subscriber reconnects is lost, so [`Subscription::next`] reports every
//! (re)subscription as [`StoreEvent::Connected`] — the moment to reconcile — and every loss as
//! [`StoreEvent::Disconnected`]. Losses are seen at once when the connection drops (a
//! disconnection push), and within [`HEALTH_INTERVAL`] plus the timeout when Redis stops
//! answering (a `PING` health check). While down, the subscription retries every
//! [`RETRY_INTERVAL`] (the connection manager gives up after a few attempts of its own).

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use redis::{PushInfo, PushKind, Value, aio::ConnectionManager};
use tokio::{
    sync::mpsc,
    time::{Duration, Instant, sleep_until},
};
use tracing::{debug, info, warn};

use super::{
    Store, StoreError,
    metrics::Event,
    redis::{bounded, setup_error},
};
use crate::token::AccountName;

/// How often a live subscription checks that Redis answers.
pub(crate) const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How often a lost subscription tries again.
pub(crate) const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// What happened on the subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// Subscribed: the first time, or again after a loss. Announcements may have been
    /// missed: reconcile every account with the store now.
    Connected,
    /// The subscription is lost (the connection dropped, or Redis stopped answering): until
    /// [`StoreEvent::Connected`], announcements are missed. The store counts as down.
    Disconnected {
        /// Why, for logs.
        reason: String,
    },
    /// Another replica (or this one) stored a new token.
    Announced(Announcement),
}

/// A replica stored `version` of `account`'s token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The account.
    pub account: AccountName,
    /// The version stored.
    pub version: u64,
    /// When the announcing replica published it (its wall clock, millisecond precision), for
    /// the propagation delay; `None` from a sender that did not say.
    pub sent_at: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Never subscribed yet.
    Starting,
    Up,
    Down,
}

/// The store's announcements and connection changes, read with [`Subscription::next`]. Built
/// by [`Store::subscribe`]; does nothing until polled.
pub struct Subscription {
    store: Store,
    conn: ConnectionManager,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    channel: String,
    state: State,
    /// When to check (subscribe, or health-check) next.
    check_at: Instant,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A subscription to the announcements (its own connection, made when first polled).
    pub fn subscribe(&self) -> Result<Subscription, StoreError> {
        let (tx, pushes) = mpsc::unbounded_channel();
        let config = self
            .shared
            .manager_config
            .clone()
            .set_push_sender(tx)
            .set_automatic_resubscription();
        let conn = ConnectionManager::new_lazy_with_config(self.shared.client.clone(), config)
            .map_err(|e| setup_error(&e))?;
        Ok(Subscription {
            store: self.clone(),
            conn,
            pushes,
            channel: self.channel(),
            state: State::Starting,
            check_at: Instant::now(),
        })
    }
}

impl Subscription {
    /// The next event. Cancel-safe: dropping the future loses nothing but a check in progress.
    pub async fn next(&mut self) -> StoreEvent {
        loop {
            tokio::select! {
                biased;
                push = self.pushes.recv() => {
                    let Some(push) = push else {
                        // The connection manager is gone; cannot happen while `self.conn` lives.
                        std::future::pending::<()>().await;
                        continue;
                    };
                    if let Some(event) = self.on_push(push) {
                        return event;
                    }
                }
                () = sleep_until(self.check_at) => {
                    if let Some(event) = self.check().await {
                        return event;
                    }
                }
            }
        }
    }

    /// Whether the subscription is live.
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    fn on_push(&mut self, push: PushInfo) -> Option<StoreEvent> {
        match push.kind {
            PushKind::Disconnection => {
                self.check_at = Instant::now() + RETRY_INTERVAL;
                self.down("connection closed".into())
            }
            PushKind::Subscribe if self.state == State::Down => {
                // The connection manager reconnected and subscribed again.
                Some(self.up())
            }
            PushKind::Message => {
                let metrics = &self.store.shared.metrics;
                match parse_message(&self.channel, &push.data) {
                    Some(announcement) => {
                        metrics.count(Event::Announcement);
                        Some(StoreEvent::Announced(announcement))
                    }
                    None => {
                        metrics.count(Event::MalformedAnnouncement);
                        debug!("ignoring a malformed message on the announce channel");
                        None
                    }
                }
            }
            _ => None,
        }
    }

    /// Subscribes when not up; checks that Redis answers when up.
    async fn check(&mut self) -> Option<StoreEvent> {
        let timeout = self.store.shared.timeout;
        if self.state == State::Up {
            self.check_at = Instant::now() + HEALTH_INTERVAL;
            let mut conn = self.conn.clone();
            let pinged = bounded("ping", timeout, async move {
                redis::cmd("PING").query_async::<()>(&mut conn).await
            })
            .await;
            self.store.record("ping", pinged.as_ref().map(drop));
            return match pinged {
                Ok(()) => None,
                Err(error) => {
                    self.check_at = Instant::now() + RETRY_INTERVAL;
                    self.down(error.to_string())
                }
            };
        }
        // (Re)subscribe explicitly: the manager's own re-subscription after a reconnect is
        // best effort, and SUBSCRIBE to a channel already subscribed is harmless.
        self.check_at = Instant::now() + RETRY_INTERVAL;
        let mut conn = self.conn.clone();
        let channel = self.channel.clone();
        let subscribed = bounded("subscribe", timeout, async move {
            conn.subscribe(channel).await
        })
        .await;
        self.store
            .record("subscribe", subscribed.as_ref().map(drop));
        match subscribed {
            Ok(()) => Some(self.up()),
            Err(error) => self.down(error.to_string()),
        }
    }

    fn up(&mut self) -> StoreEvent {
        self.state = State::Up;
        self.check_at = Instant::now() + HEALTH_INTERVAL;
        self.store.shared.metrics.count(Event::Subscribed);
        info!(channel = %self.channel, "subscribed to store announcements");
        StoreEvent::Connected
    }

    /// Records a loss; an event only on a change (not for every failed retry).
    fn down(&mut self, reason: String) -> Option<StoreEvent> {
        if self.state == State::Down {
            debug!(%reason, "store subscription still down");
            return None;
        }
        self.state = State::Down;
        self.store.shared.metrics.count(Event::Disconnected);
        warn!(%reason, "store subscription lost; announcements are missed until it is back");
        Some(StoreEvent::Disconnected { reason })
    }
}

/// `[channel, "<version> <account> [<sent at, Unix ms>]"]` on our channel.
fn parse_message(channel: &str, data: &[Value]) -> Option<Announcement> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_owned),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let [on, payload] = data else { return None };
    if text(on)? != channel {
        return None;
    }
    let payload = text(payload)?;
    let mut parts = payload.split(' ');
    let (version, account, sent_at) = (parts.next()?, parts.next()?, parts.next());
    if parts.next().is_some() {
        return None;
    }
    let sent_at = match sent_at {
        Some(ms) => Some(UNIX_EPOCH + Duration::from_millis(ms.parse().ok()?)),
        None => None,
    };
    Some(Announcement {
        account: AccountName::new(account).ok()?,
        version: version.parse().ok()?,
        sent_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_parse_strictly() {
        let msg = |c: &str, p: &str| {
            vec![
                Value::BulkString(c.as_bytes().to_vec()),
                Value::BulkString(p.as_bytes().to_vec()),
            ]
        };
        assert_eq!(
            parse_message("p:announce", &msg("p:announce", "7 fleet-a")),
            Some(Announcement {
                account: AccountName::new("fleet-a").unwrap(),
                version: 7,
                sent_at: None,
            })
        );
        assert_eq!(
            parse_message("p:announce", &msg("p:announce", "7 fleet-a 1500"))
                .unwrap()
                .sent_at,
            Some(UNIX_EPOCH + Duration::from_millis(1500))
        );
        for bad in ["7", "x fleet-a", "7 a b", "7 a 1 2", "7 ", "-1 a", ""] {
            assert_eq!(
                parse_message("p:announce", &msg("p:announce", bad)),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(parse_message("p:announce", &msg("q:announce", "7 a")), None);
        assert_eq!(parse_message("p:announce", &[]), None);
    }
}
