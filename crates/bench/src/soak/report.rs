//! The soak's figures and checks: the bounds it holds the broker to (derived here), the
//! least-squares slope of memory and descriptors, and the table it prints.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    time::{Duration, Instant},
};

use bace_token_broker::proto::{AccountState, AccountStatus};

use crate::{fleet::POLICY, fleet::username, load::Tally, opts::Opts};

/// When an account was configured.
pub(crate) struct Presence {
    pub(crate) added: Instant,
    pub(crate) removed: Option<Instant>,
}

impl Presence {
    pub(crate) fn new(added: Instant) -> Self {
        Self {
            added,
            removed: None,
        }
    }
}

/// One sample of the broker process.
pub(crate) struct Sample {
    /// Since the chaos began.
    pub(crate) at: Duration,
    pub(crate) rss_kb: u64,
    pub(crate) fds: u64,
}

/// The broker's floor between two refreshes of one token (`schedule::MIN_REFRESH_DELAY`).
const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);

/// Upper bound on the token requests the broker may make for one account configured for
/// `present` (from being added, or the broker's start, to the end of the soak), under the
/// soak's [`POLICY`]. Derived from the rules the broker documents, not from timing:
///
/// - One fetch at a time per account (single flight); a fetch makes at most **2** token
///   requests (a refresh, then the login it falls back to when BACE declines the refresh or a
///   caller waits; the HTTP client does not retry).
/// - Successes `S`: after a successful fetch the next starts no sooner than the token's
///   scheduled refresh (at least `MIN_REFRESH_DELAY`, 1 s, after it was obtained) or than a
///   caller's `min_validity` can ask for one (only once the token is no longer fresh, the
///   expiry margin, 3 s), except a forced login by Invalidate (at most one per
///   `invalidate_cooldown`, 10 s, plus one). So `S <= 1 + T/1 s + (T/10 s + 1)`.
/// - Fetches `N`: every fetch after the first starts after a gap of at least half of
///   `backoff_initial` (0.5 s, the smallest jittered backoff after a failure, and less than the
///   1 s after a success), except the early retries the broker makes so that a still-good
///   token is refreshed before it stops being served (at most two per token obtained: one aimed
///   at `timeout x 2` before the end of its servable life, one at the end) and the forced
///   logins. So `N <= 1 + T/0.5 s + 2 S + (T/10 s + 1)`.
///
/// The bound is `2 N`. It is loose (about 9 requests a second per account where the soak sees
/// well under one), but it is a guarantee: a broker that loops on a failing account (a retry
/// storm, a backoff not applied, a fetch per caller) exceeds it within seconds.
pub(crate) fn upstream_bound(present: Duration) -> u64 {
    let t = present.as_secs_f64();
    let forced = t / POLICY.invalidate_cooldown.as_secs_f64() + 1.0;
    let successes = 1.0 + t / MIN_REFRESH_DELAY.as_secs_f64() + forced;
    let gap = POLICY.backoff_initial.as_secs_f64() / 2.0;
    let fetches = 1.0 + t / gap + 2.0 * successes + forced;
    (2.0 * fetches).ceil() as u64
}

/// How long after the chaos stops every account must be healthy again.
///
/// When the chaos stops, an account that is not healthy is in a fetch (it ends within
/// `upstream.timeout`, 3 s: a hang drawn before the end lasts that long) or waits for a retry
/// planned at most `backoff_max` (10 s) ahead; the retry then meets a well-behaved fake and
/// succeeds within one more `upstream.timeout`. So 3 + 10 + 3 = 16 s, doubled, plus 30 s for
/// a loaded 2-core machine (1,000 fetches at once, the broker at the lowest priority):
/// 62 s. The soak waits twice that before giving up, to report the figure either way.
pub(crate) fn recovery_bound() -> Duration {
    (POLICY.upstream_timeout * 2 + POLICY.backoff_max) * 2 + Duration::from_secs(30)
}

/// An account is healthy when READY, or REFRESHING with a good token and no failure since its
/// last success (with 1,000 tokens of 5–20 s, some refresh at any instant).
pub(crate) fn healthy(status: &AccountStatus) -> bool {
    match AccountState::try_from(status.state) {
        Ok(AccountState::Ready) => true,
        Ok(AccountState::Refreshing) => {
            status.consecutive_failures == 0
                && status
                    .survives_outage_for
                    .as_ref()
                    .is_some_and(|d| d.seconds > 0 || d.nanos > 0)
        }
        _ => false,
    }
}

/// Least-squares slope of `(x, y)` in y per x, or `None` with fewer than 3 points.
pub(crate) fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 3 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// A flatness verdict: the fitted growth over the window (slope x window) against an
/// allowance of `floor` or `share` of the mean, whichever is larger. The allowance absorbs
/// noise (allocator caches, connections opened by hangs and retries), not a leak: a leak
/// grows with the number of failures, which is thousands a minute here.
pub(crate) struct Flat {
    pub(crate) slope_per_min: f64,
    pub(crate) growth: f64,
    pub(crate) allowance: f64,
    pub(crate) first: f64,
    pub(crate) last: f64,
    pub(crate) peak: f64,
}

pub(crate) fn flat(points: &[(f64, f64)], floor: f64, share: f64) -> Option<Flat> {
    let s = slope(points)?;
    let window = points.last()?.0 - points.first()?.0;
    let mean = points.iter().map(|p| p.1).sum::<f64>() / points.len() as f64;
    Some(Flat {
        slope_per_min: s * 60.0,
        growth: s * window,
        allowance: floor.max(share * mean),
        first: points.first()?.1,
        last: points.last()?.1,
        peak: points.iter().map(|p| p.1).fold(f64::MIN, f64::max),
    })
}

/// Everything the soak measured.
pub(crate) struct Report<'a> {
    pub(crate) opts: &'a Opts,
    pub(crate) warmup: Duration,
    pub(crate) samples: Vec<Sample>,
    pub(crate) tally: Tally,
    pub(crate) presence: HashMap<String, Presence>,
    pub(crate) end: Instant,
    /// Token requests per username.
    pub(crate) calls: HashMap<String, u64>,
    pub(crate) total_calls: u64,
    pub(crate) faults: BTreeMap<String, u64>,
    pub(crate) recovery: Result<Duration, String>,
    pub(crate) reload_errors: u64,
    pub(crate) reloads: usize,
    pub(crate) broker_stop: Option<String>,
    pub(crate) fake_stop: Option<String>,
    pub(crate) panics: Vec<String>,
}

/// RPC codes a caller may see in the soak.
const EXPECTED_CODES: [&str; 4] = ["Ok", "Unavailable", "OutOfRange", "NotFound"];

impl Report<'_> {
    /// The summary, and whether every check passed.
    pub(crate) fn render(&self) -> (String, bool) {
        let mut failures: Vec<String> = Vec::new();
        let mut out = String::new();
        let o = self.opts;
        let _ = writeln!(
            out,
            "## Soak: {:.1} min of chaos, {} accounts ({} reloads of -{}/+{}), {} callers, {} watchers, seed {}\n",
            o.chaos.as_secs_f64() / 60.0,
            o.accounts,
            self.reloads,
            o.churn,
            o.churn,
            o.callers,
            o.watchers,
            o.seed
        );
        let _ = writeln!(
            out,
            "| Check | Figure | Bound | |\n| --- | --- | --- | --- |"
        );
        let mut row = |name: &str, figure: String, bound: String, ok: bool| {
            let _ = writeln!(
                out,
                "| {name} | {figure} | {bound} | {} |",
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                failures.push(format!("{name}: {figure} (bound: {bound})"));
            }
        };

        // Tokens.
        let t = &self.tally;
        row(
            "Expired or unknown tokens served",
            format!(
                "{} of {} checked ({} lookups at the fake); least time left on arrival {}",
                t.expired.len(),
                t.checked,
                t.lookups,
                t.min_left.as_ref().map_or("-".into(), |(d, what)| format!(
                    "{:.2} s ({what})",
                    d.as_secs_f64()
                ))
            ),
            "0".into(),
            t.expired.is_empty() && t.checked > 0,
        );
        row(
            "Tokens short of min_validity (by the fake's expiry)",
            format!(
                "{}; broker's expires_at later than the fake's by at most {}",
                t.short_truth.len(),
                t.max_overstatement
                    .as_ref()
                    .map_or("0 ms".into(), |(d, what)| format!(
                        "{} ms ({what})",
                        d.as_millis()
                    ))
            ),
            "0".into(),
            t.short_truth.is_empty(),
        );
        row(
            "Tokens short of min_validity + margin (by the broker's expires_at)",
            t.short_claim.len().to_string(),
            "0".into(),
            t.short_claim.is_empty(),
        );

        // Calls and codes.
        let mut by_rpc: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut unexpected = Vec::new();
        for ((rpc, code), n) in &t.codes {
            by_rpc.entry(rpc).or_default().push(format!("{code} {n}"));
            if !EXPECTED_CODES.contains(&code.as_str()) {
                unexpected.push(format!("{rpc} {code} x{n}"));
            }
        }
        let calls: Vec<String> = by_rpc
            .iter()
            .map(|(rpc, codes)| format!("{rpc}: {}", codes.join(", ")))
            .collect();
        row(
            "RPC answers (code count)",
            format!("{}; {} watch streams opened", calls.join("; "), t.streams),
            format!("codes in {EXPECTED_CODES:?}"),
            unexpected.is_empty(),
        );

        // Panics and exits.
        let exits: Vec<String> = [("broker", &self.broker_stop), ("fake", &self.fake_stop)]
            .iter()
            .filter_map(|(who, e)| e.as_ref().map(|e| format!("{who}: {e}")))
            .collect();
        row(
            "Panics; exit on SIGTERM",
            format!(
                "{} panic lines; {}",
                self.panics.len(),
                if exits.is_empty() {
                    "both exited 0".to_owned()
                } else {
                    exits.join("; ")
                }
            ),
            "0; exit 0".into(),
            self.panics.is_empty() && exits.is_empty(),
        );
        row(
            "Reloads (SIGHUP) sent",
            format!("{} ({} failed to signal)", self.reloads, self.reload_errors),
            "-".into(),
            self.reload_errors == 0,
        );

        // Upstream calls per account.
        let mut ratios: Vec<(f64, u64, u64, &str)> = self
            .presence
            .iter()
            .map(|(name, p)| {
                let until = p.removed.unwrap_or(self.end);
                let bound = upstream_bound(until.saturating_duration_since(p.added));
                let n = self.calls.get(&username(name)).copied().unwrap_or(0);
                (n as f64 / bound as f64, n, bound, name.as_str())
            })
            .collect();
        ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut counts: Vec<u64> = ratios.iter().map(|r| r.1).collect();
        counts.sort_unstable();
        let pct = |q: f64| {
            counts
                .get(((counts.len() as f64 - 1.0) * q) as usize)
                .copied()
        };
        let worst = ratios.last();
        let secs = self
            .samples
            .last()
            .map_or(1.0, |s| s.at.as_secs_f64())
            .max(1.0);
        row(
            "Upstream calls per account",
            format!(
                "median {}, p99 {}, max {}; worst against its bound {} ({} of {}); total {} ({:.0}/s)",
                pct(0.5).unwrap_or(0),
                pct(0.99).unwrap_or(0),
                counts.last().copied().unwrap_or(0),
                worst.map_or("-", |w| w.3),
                worst.map_or(0, |w| w.1),
                worst.map_or(0, |w| w.2),
                self.total_calls,
                self.total_calls as f64 / (secs + self.warmup.as_secs_f64())
            ),
            "each within its bound (2 N, see report::upstream_bound)".into(),
            worst.is_none_or(|w| w.1 <= w.2),
        );
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        row(
            "Faults injected by the fake",
            faults.join(", "),
            "-".into(),
            true,
        );

        // Memory and descriptors after the settling window.
        let settle = o.settle();
        let window: Vec<&Sample> = self.samples.iter().filter(|s| s.at >= settle).collect();
        let points = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
            window.iter().map(|s| (s.at.as_secs_f64(), f(s))).collect()
        };
        let rss = flat(&points(|s| s.rss_kb as f64 / 1024.0), 8.0, 0.10);
        let fds = flat(&points(|s| s.fds as f64), 64.0, 0.5);
        let from = format!(
            "from {:.0} s to {:.0} s, {} samples",
            settle.as_secs_f64(),
            window.last().map_or(0.0, |s| s.at.as_secs_f64()),
            window.len()
        );
        // (row name, name without samples, reading, unit, decimals of the levels)
        let flat_rows = [
            (
                "Resident memory after the first minute",
                "Resident memory",
                rss,
                " MiB",
                1,
            ),
            (
                "Open file descriptors after the first minute",
                "File descriptors",
                fds,
                "",
                0,
            ),
        ];
        for (name, without, reading, unit, p) in flat_rows {
            match reading {
                Some(f) => row(
                    name,
                    format!(
                        "{:.p$} -> {:.p$}{unit} (peak {:.p$}); slope {:+.2}{unit}/min, fitted growth {:+.1}{unit} ({from})",
                        f.first, f.last, f.peak, f.slope_per_min, f.growth
                    ),
                    format!("growth <= {:.p$}{unit}", f.allowance),
                    f.growth <= f.allowance,
                ),
                None => row(without, "too few samples".into(), "-".into(), false),
            }
        }

        // Recovery.
        let bound = recovery_bound();
        match &self.recovery {
            Ok(d) => row(
                "All accounts healthy after the chaos stopped",
                format!("{:.1} s", d.as_secs_f64()),
                format!("{:.0} s", bound.as_secs_f64()),
                *d <= bound,
            ),
            Err(e) => row(
                "All accounts healthy after the chaos stopped",
                e.clone(),
                format!("{:.0} s", bound.as_secs_f64()),
                false,
            ),
        }
        let _ = writeln!(
            out,
            "\nBroker: warm-up {:.1} s; expiry margin {:?}, upstream timeout {:?}, backoff {:?}..{:?}, invalidate cooldown {:?}.",
            self.warmup.as_secs_f64(),
            POLICY.expiry_margin,
            POLICY.upstream_timeout,
            POLICY.backoff_initial,
            POLICY.backoff_max,
            POLICY.invalidate_cooldown
        );
        let examples: Vec<&String> = t
            .expired
            .iter()
            .chain(&t.short_truth)
            .chain(&t.short_claim)
            .chain(&self.panics)
            .take(10)
            .collect();
        if !examples.is_empty() {
            let _ = writeln!(out, "\nFirst findings:");
            for e in examples {
                let _ = writeln!(out, "- {e}");
            }
        }
        let ok = failures.is_empty();
        let _ = writeln!(
            out,
            "\n{}",
            if ok {
                "soak: every check passed".to_owned()
            } else {
                format!("soak: FAILED: {}", failures.join("; "))
            }
        );
        (out, ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 1.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        let flat_noise: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64, if i % 2 == 0 { 5.0 } else { 6.0 }))
            .collect();
        assert!(slope(&flat_noise).unwrap().abs() < 0.1);
        assert_eq!(slope(&line[..2]), None);
    }

    #[test]
    fn upstream_bound_grows_with_presence() {
        // A minute: S <= 1 + 60 + 7 = 68; N <= 1 + 120 + 136 + 7 = 264; 2 N = 528.
        assert_eq!(upstream_bound(Duration::from_secs(60)), 528);
        assert!(upstream_bound(Duration::ZERO) >= 2);
    }
}
