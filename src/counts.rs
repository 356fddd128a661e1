//! Plain counters: each module owns the counts of what it does ([`Counts`] by a label key,
//! [`DurationHistogram`], [`LatencyHistogram`]), and [`telemetry`](crate::telemetry) reads
//! them at scrape time. No module but telemetry knows how they are exported.

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
        self.add(key, 1);
    }

    /// Adds `n` to `key`'s count.
    pub(crate) fn add(&self, key: K, n: u64) {
        *self.lock().entry(key).or_default() += n;
    }

    /// Drops the counts whose key `keep` refuses (the series of accounts a reload removed).
    pub(crate) fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        self.lock().retain(|k, _| keep(k));
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

/// Upper bounds (nanoseconds) of [`DurationHistogram`]'s buckets: 5 ms doubling to ~20 s.
pub(crate) const DURATION_BOUNDS_NANOS: [u64; 13] = {
    let mut bounds = [5_000_000; 13];
    let mut i = 1;
    while i < bounds.len() {
        bounds[i] = bounds[i - 1] * 2;
        i += 1;
    }
    bounds
};

/// A histogram of durations over [`DURATION_BOUNDS_NANOS`] (plus `+Inf`), lock-free.
#[derive(Debug, Default)]
pub(crate) struct DurationHistogram(Buckets<{ DURATION_BOUNDS_NANOS.len() + 1 }>);

/// A reading of a [`DurationHistogram`] or a [`LatencyHistogram`].
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
        self.0.observe(&DURATION_BOUNDS_NANOS, d);
    }

    /// The current reading (bounds in seconds).
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        self.0.snapshot(&DURATION_BOUNDS_NANOS)
    }
}

/// Upper bounds (nanoseconds) of [`LatencyHistogram`]'s buckets: a 1-2-5 series from 100 ns
/// to 50 s, three buckets a decade.
///
/// Why this layout: it has to resolve the two ends of one call's time. A GetToken answered
/// from the cache is handled in a few hundred nanoseconds (the in-process cache hit is
/// ~100-200 ns; release builds serving the demo put 38 calls of 41 under 1 µs), more with an
/// auth check, so the first bucket is 100 ns: a 10 µs or 25 µs first bucket would hold the
/// whole cache path, and its quantiles would only say "less than that". A caller waiting on
/// a login waits up to the upstream timeout (10 s by default), twice when a refresh and then
/// a login time out, so the series goes on to 50 s; only streams (WatchToken) live longer.
/// Bounds at most 2.5x apart give `histogram_quantile` the resolution of a doubling series,
/// and every bound is a round figure (`le="0.005"`, `le="0.1"`, `le="1"`), so an SLO
/// threshold is a bucket. Integer nanoseconds: a call's bucket is found with integer
/// comparisons from the smallest bound up (three or four for the cache path).
pub(crate) const LATENCY_BOUNDS_NANOS: [u64; 27] = {
    const NS: u64 = 1;
    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    [
        100 * NS,
        200 * NS,
        500 * NS,
        US,
        2 * US,
        5 * US,
        10 * US,
        20 * US,
        50 * US,
        100 * US,
        200 * US,
        500 * US,
        MS,
        2 * MS,
        5 * MS,
        10 * MS,
        20 * MS,
        50 * MS,
        100 * MS,
        200 * MS,
        500 * MS,
        S,
        2 * S,
        5 * S,
        10 * S,
        20 * S,
        50 * S,
    ]
};

/// A histogram of durations over [`LATENCY_BOUNDS_NANOS`] (plus `+Inf`), lock-free: the time
/// calls take, from a cache hit to upstream waits.
#[derive(Debug, Default)]
pub(crate) struct LatencyHistogram(Buckets<{ LATENCY_BOUNDS_NANOS.len() + 1 }>);

impl LatencyHistogram {
    /// Records one duration.
    pub(crate) fn observe(&self, d: Duration) {
        self.0.observe(&LATENCY_BOUNDS_NANOS, d);
    }

    /// The current reading (bounds in seconds).
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        self.0.snapshot(&LATENCY_BOUNDS_NANOS)
    }
}

/// The bucket of `nanos` among `bounds`: the first bound it does not exceed (the last,
/// `+Inf`, past them all). Integer comparisons from the smallest bound up.
fn bucket_of(bounds: &[u64], nanos: u64) -> usize {
    bounds
        .iter()
        .position(|bound| nanos <= *bound)
        .unwrap_or(bounds.len())
}

/// `d` in nanoseconds (`u64::MAX` past 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Per-bucket (not cumulative) counts, the last `+Inf`, and the sum of the observations in
/// nanoseconds: the cells of both histograms, whose bounds (`N - 1` of them, integer
/// nanoseconds) each histogram passes in.
///
/// A bucket is incremented with `Release` and read with `Acquire`: whatever happened before
/// an observation (a call counted as started, say) is seen by a reader that sees it.
#[derive(Debug)]
struct Buckets<const N: usize> {
    counts: [AtomicU64; N],
    sum_nanos: AtomicU64,
}

impl<const N: usize> Default for Buckets<N> {
    fn default() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; N],
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Buckets<N> {
    fn observe(&self, bounds: &[u64], d: Duration) {
        let nanos = nanos(d);
        self.counts[bucket_of(bounds, nanos)].fetch_add(1, Ordering::Release);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The reading, with `bounds` as the upper bounds, in seconds: `n / 1e9` rounds to the
    /// nearest `f64`, as the literal `n`e-9 would, so the `le` labels are exact.
    fn snapshot(&self, bounds: &[u64]) -> HistogramSnapshot {
        let bounds = bounds.iter().map(|n| *n as f64 / 1e9);
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .collect();
        let bounds = bounds.chain([f64::INFINITY]);
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
        assert_eq!(DURATION_BOUNDS_NANOS[0], 5_000_000);
        for pair in DURATION_BOUNDS_NANOS.windows(2) {
            assert_eq!(pair[1], 2 * pair[0]);
        }
        // The labels are those of earlier releases (prometheus-client's exponential buckets).
        let le: Vec<f64> = DurationHistogram::default()
            .snapshot()
            .buckets
            .iter()
            .map(|(b, _)| *b)
            .collect();
        assert_eq!(
            le,
            [
                0.005,
                0.01,
                0.02,
                0.04,
                0.08,
                0.16,
                0.32,
                0.64,
                1.28,
                2.56,
                5.12,
                10.24,
                20.48,
                f64::INFINITY
            ]
        );
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
    fn latency_bounds_are_a_one_two_five_series_from_100_ns_to_50_s() {
        assert_eq!(LATENCY_BOUNDS_NANOS[0], 100);
        assert_eq!(
            LATENCY_BOUNDS_NANOS[LATENCY_BOUNDS_NANOS.len() - 1],
            50_000_000_000
        );
        for (i, pair) in LATENCY_BOUNDS_NANOS.windows(2).enumerate() {
            let ratio = pair[1] as f64 / pair[0] as f64;
            // 1 → 2 → 5 → 10: doubling, then 2.5x, then doubling.
            let want = if i % 3 == 1 { 2.5 } else { 2.0 };
            assert!((ratio - want).abs() < 1e-9, "{} → {}", pair[0], pair[1]);
        }
        // The exported bounds are the round decimal figures.
        let s = LatencyHistogram::default().snapshot();
        let le: Vec<f64> = s.buckets.iter().map(|(b, _)| *b).collect();
        assert_eq!(le[..4], [0.0000001, 0.0000002, 0.0000005, 0.000001]);
        assert_eq!(le[12..16], [0.001, 0.002, 0.005, 0.01]);
        assert_eq!(le[18..22], [0.1, 0.2, 0.5, 1.0]);
        assert_eq!(le[24..], [10.0, 20.0, 50.0, f64::INFINITY]);
        assert_eq!(s.count, 0);
        assert_eq!(s.sum, 0.0);
    }

    #[test]
    fn latency_buckets_are_inclusive_upper_bounds() {
        let d = Duration::from_nanos;
        let bucket = |d: Duration| bucket_of(&LATENCY_BOUNDS_NANOS, nanos(d));
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(d(1)), 0);
        assert_eq!(bucket(d(100)), 0);
        assert_eq!(bucket(d(101)), 1);
        for (i, bound) in LATENCY_BOUNDS_NANOS.iter().enumerate() {
            assert_eq!(bucket(d(*bound)), i);
            assert_eq!(bucket(d(bound + 1)), i + 1);
            assert_eq!(bucket(d(bound - 1)), i);
        }
        let inf = LATENCY_BOUNDS_NANOS.len();
        assert_eq!(bucket(Duration::from_secs(50) + d(1)), inf);
        assert_eq!(bucket(Duration::MAX), inf);

        let h = LatencyHistogram::default();
        h.observe(d(300)); // the cache path
        h.observe(d(800));
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(12)); // a wait on BACE
        h.observe(Duration::from_secs(3600)); // a stream
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        let at = |le: f64| s.buckets.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!(at(0.0000005), 1);
        assert_eq!(at(0.000001), 1);
        assert_eq!(at(0.000005), 1);
        assert_eq!(at(0.01), 1);
        assert_eq!(at(20.0), 1);
        assert_eq!(at(f64::INFINITY), 1);
        assert_eq!(s.buckets.iter().map(|(_, n)| n).sum::<u64>(), 6);
        assert!((s.sum - 3_612.007_004_1).abs() < 1e-9, "{}", s.sum);
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
