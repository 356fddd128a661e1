//! Plain counters: each module owns the counts of what it does ([`Counts`] by a label key,
//! [`DurationHistogram`]), and [`telemetry`](crate::telemetry) reads them at scrape
//! time. No module but telemetry knows how they are exported.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Counts by a label key (a bounded set: keys come from config or fixed lists). Off the hot
/// paths: a std `Mutex` held for one map update, never across an `.await`.
#[derive(Debug)]
pub(crate) struct Counts<K>(Mutex<HashMap<K, u64>>);

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq + Clone> Counts<K> {
    /// Adds one to `key`'s count.
    pub(crate) fn inc(&self, key: K) {
        *self.lock().entry(key).or_default() += 1;
    }

    /// Every key seen, with its count.
    pub(crate) fn snapshot(&self) -> Vec<(K, u64)> {
        self.lock().iter().map(|(k, n)| (k.clone(), *n)).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, u64>> {
        // A panic mid-update leaves a count off by one at worst.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Upper bounds (seconds) of [`DurationHistogram`]'s buckets: 5 ms doubling to ~20 s.
pub(crate) const DURATION_BOUNDS: [f64; 13] = [
    0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
];

/// A histogram of durations over [`DURATION_BOUNDS`] (plus `+Inf`), lock-free.
#[derive(Debug, Default)]
pub(crate) struct DurationHistogram {
    /// Per-bucket (not cumulative) counts; the last is `+Inf`.
    buckets: [AtomicU64; DURATION_BOUNDS.len() + 1],
    /// Sum of the observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

/// A reading of a [`DurationHistogram`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HistogramSnapshot {
    /// Per-bucket counts, paired with their upper bound (`f64::INFINITY` last).
    pub(crate) buckets: Vec<(f64, u64)>,
    /// Observations.
    pub(crate) count: u64,
    /// Their sum, in seconds.
    pub(crate) sum: f64,
}

impl DurationHistogram {
    /// Records one duration.
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BOUNDS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(DURATION_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The current reading.
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let bounds = DURATION_BOUNDS.iter().copied().chain([f64::INFINITY]);
        HistogramSnapshot {
            count: counts.iter().sum(),
            buckets: bounds.zip(counts).collect(),
            sum: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)).as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_double_from_five_milliseconds() {
        for pair in DURATION_BOUNDS.windows(2) {
            assert!((pair[1] / pair[0] - 2.0).abs() < 1e-9);
        }
    }

    #[test]
    fn histogram_buckets_are_inclusive_upper_bounds() {
        let h = DurationHistogram::default();
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(6));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.005, 1));
        assert_eq!(s.buckets[1], (0.01, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((s.sum - 60.011).abs() < 1e-9);
    }

    #[test]
    fn counts_by_key() {
        let c = Counts::default();
        c.inc("a");
        c.inc("a");
        c.inc("b");
        let mut s = c.snapshot();
        s.sort();
        assert_eq!(s, vec![("a", 2), ("b", 1)]);
    }
}
