//! The background task that refreshes each token when due and retries failed fetches.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::{Arc, Weak},
};

use tokio::{
    sync::mpsc,
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    Broker, Inner,
    flight::{FetchKind, Trigger},
    slot::Slot,
};

/// The background task that refreshes each token when due and retries failed fetches: one
/// timer queue for all accounts, owned by one task, stopped by [`Broker::shutdown`].
///
/// The queue is a binary heap of `Plan`s (24 bytes each). A slot planned again before its
/// plan comes due (an on-demand fetch, an invalidation) leaves the older plan in the heap;
/// `Inner::refresh_due` ignores it when it comes up (the slot's `next_due` moved on). Such
/// leftovers, and plans of slots a reload retired, are dropped by a compaction once they exceed
/// a quarter of the accounts (at least `QUEUE_SLACK`). Due plans are run in batches of
/// `DUE_BATCH`, so a burst of them (after a suspend, say) does not hold up the task.
pub struct Refresher {
    broker: Broker,
    plans: mpsc::UnboundedReceiver<Plan>,
    queue: BinaryHeap<Reverse<Plan>>,
    stop: CancellationToken,
}

/// The longest the refresher sleeps without looking at its queue.
const MAX_TIMER: Duration = Duration::from_secs(86_400);

/// Leftover plans tolerated in the queue (beyond one per account) before a compaction, at least.
const QUEUE_SLACK: usize = 1024;

/// Due plans run per turn of the refresher's loop.
const DUE_BATCH: usize = 1024;

/// A slot due for a refresh or retry at an instant. A slot a reload removed or replaced is not
/// kept alive by its plans (a `Weak`), and is skipped when they come due.
pub(super) struct Plan {
    pub(super) at: Instant,
    pub(super) slot: Weak<Slot>,
}

// Plans compare by instant alone: that is the heap's order (two plans of one instant are equal
// to it, whatever their slots).
impl PartialEq for Plan {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Plan {}

impl PartialOrd for Plan {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Plan {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

impl Refresher {
    pub(super) fn new(
        broker: Broker,
        plans: mpsc::UnboundedReceiver<Plan>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            broker,
            plans,
            queue: BinaryHeap::new(),
            stop,
        }
    }

    /// Runs until the broker shuts down.
    pub async fn run(mut self) {
        let timer = tokio::time::sleep(MAX_TIMER);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = &mut timer => {
                    let now = Instant::now();
                    for _ in 0..DUE_BATCH {
                        let Some(Reverse(plan)) = self
                            .queue
                            .peek_mut()
                            .filter(|p| p.0.at <= now)
                            .map(std::collections::binary_heap::PeekMut::pop)
                        else {
                            break;
                        };
                        if let Some(slot) = plan.slot.upgrade() {
                            self.broker.inner.refresh_due(&slot, plan.at);
                        }
                    }
                    // Wake for the earliest plan (at once if more are due), at least daily.
                    let next = self.queue.peek().map_or(now + MAX_TIMER, |p| p.0.at);
                    timer.as_mut().reset(next.min(now + MAX_TIMER));
                }
                plan = self.plans.recv() => {
                    let Some(plan) = plan else { break };
                    if plan.at < timer.deadline() {
                        timer.as_mut().reset(plan.at);
                    }
                    self.queue.push(Reverse(plan));
                    self.compact();
                }
            }
        }
        debug!("refresher stopped");
    }

    /// Drops plans that no longer count (their slot is gone or was planned again) once they
    /// outnumber the accounts.
    fn compact(&mut self) {
        let accounts = self.broker.inner.accounts.len();
        if self.queue.len() <= accounts + (accounts / 4).max(QUEUE_SLACK) {
            return;
        }
        let before = self.queue.len();
        self.queue.retain(|Reverse(plan)| {
            plan.slot
                .upgrade()
                .is_some_and(|slot| !slot.is_retired() && slot.lock().next_due == Some(plan.at))
        });
        debug!(before, after = self.queue.len(), "refresh queue compacted");
    }
}

impl Inner {
    /// Runs the refresh or retry planned for `slot` at `at` (from the [`Refresher`]), if that
    /// plan is still the slot's latest and the slot is still the account's (a reload may have
    /// removed or replaced it).
    fn refresh_due(self: &Arc<Self>, slot: &Arc<Slot>, at: Instant) {
        if slot.is_retired() {
            return;
        }
        let now = Instant::now();
        let mut state = slot.lock();
        if state.next_due != Some(at) || state.flight.is_some() {
            // Planned again since (that plan comes due in its turn), or a fetch runs (its
            // completion plans the next refresh).
            return;
        }
        if let Some(retry_at) = state.retry_at().filter(|r| *r > now) {
            slot.plan(&mut state, self, retry_at);
            return;
        }
        let current = slot.token.current();
        let servable = current
            .as_ref()
            .is_some_and(|t| t.valid_for(now, self.policy.refresh.expiry_margin));
        let trigger = if servable {
            Trigger::Ahead
        } else {
            Trigger::Overdue
        };
        let kind = FetchKind::for_token(current, &state, now);
        self.start_flight(slot, &mut state, kind, trigger);
    }
}
