//! What the store counts of its own work, in plain types: no registry, no exporter.
//! [`telemetry`](crate::telemetry) will read a [`StoreCounts`] snapshot at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::counts::Counts;

/// The store's counters (shared by every clone of a [`Store`](super::Store)).
#[derive(Debug, Default)]
pub(crate) struct StoreMetrics {
    /// Redis operations by operation and outcome (`ok` or [`StoreError::class`]).
    ///
    /// [`StoreError::class`]: super::StoreError::class
    ops: Counts<(&'static str, &'static str)>,
    leases_acquired: AtomicU64,
    leases_contended: AtomicU64,
    leases_lost: AtomicU64,
    version_conflicts: AtomicU64,
    unknown_key_records: AtomicU64,
    tampered_records: AtomicU64,
    announcements_received: AtomicU64,
    malformed_announcements: AtomicU64,
    subscriptions: AtomicU64,
    disconnections: AtomicU64,
}

/// A reading of the store's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Redis operations by operation (`lease_acquire`, `read`, `write`...) and outcome (`ok`,
    /// `timeout`, `unreachable`, `refused`, `protocol`).
    pub operations: Vec<(&'static str, &'static str, u64)>,
    /// Leases this replica acquired.
    pub leases_acquired: u64,
    /// Lease acquisitions that found another holder.
    pub leases_contended: u64,
    /// Leases lost while held (another holder, or expired while renewals failed).
    pub leases_lost: u64,
    /// Writes refused because the store held the same or a newer version.
    pub version_conflicts: u64,
    /// Records sealed with a key id this replica does not have (treated as absent).
    pub unknown_key_records: u64,
    /// Records that failed to authenticate or parse (treated as absent).
    pub tampered_records: u64,
    /// Announcements received from Redis.
    pub announcements_received: u64,
    /// Messages on the announce channel that were not announcements (ignored).
    pub malformed_announcements: u64,
    /// Times the subscription was (re)established: each is a moment to reconcile.
    pub subscriptions: u64,
    /// Times the subscription was found lost (disconnect or unanswered health check).
    pub disconnections: u64,
}

/// Which counter to add one to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    LeaseAcquired,
    LeaseContended,
    LeaseLost,
    VersionConflict,
    UnknownKey,
    Tampered,
    Announcement,
    MalformedAnnouncement,
    Subscribed,
    Disconnected,
}

impl StoreMetrics {
    /// Counts one operation's outcome.
    pub(crate) fn op(&self, op: &'static str, outcome: &'static str) {
        self.ops.inc((op, outcome));
    }

    /// Counts one event.
    pub(crate) fn count(&self, event: Event) {
        let counter = match event {
            Event::LeaseAcquired => &self.leases_acquired,
            Event::LeaseContended => &self.leases_contended,
            Event::LeaseLost => &self.leases_lost,
            Event::VersionConflict => &self.version_conflicts,
            Event::UnknownKey => &self.unknown_key_records,
            Event::Tampered => &self.tampered_records,
            Event::Announcement => &self.announcements_received,
            Event::MalformedAnnouncement => &self.malformed_announcements,
            Event::Subscribed => &self.subscriptions,
            Event::Disconnected => &self.disconnections,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts; operations sorted.
    pub(crate) fn snapshot(&self) -> StoreCounts {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut operations: Vec<_> = self
            .ops
            .snapshot()
            .into_iter()
            .map(|((op, outcome), n)| (op, outcome, n))
            .collect();
        operations.sort_unstable();
        StoreCounts {
            operations,
            leases_acquired: load(&self.leases_acquired),
            leases_contended: load(&self.leases_contended),
            leases_lost: load(&self.leases_lost),
            version_conflicts: load(&self.version_conflicts),
            unknown_key_records: load(&self.unknown_key_records),
            tampered_records: load(&self.tampered_records),
            announcements_received: load(&self.announcements_received),
            malformed_announcements: load(&self.malformed_announcements),
            subscriptions: load(&self.subscriptions),
            disconnections: load(&self.disconnections),
        }
    }
}

impl StoreCounts {
    /// Operations `op` ended with `outcome`.
    pub fn operations(&self, op: &str, outcome: &str) -> u64 {
        self.operations
            .iter()
            .filter(|(o, r, _)| *o == op && *r == outcome)
            .map(|(_, _, n)| n)
            .sum()
    }
}
