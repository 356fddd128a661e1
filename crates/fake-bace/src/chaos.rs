//! Chaos mode: random faults on token requests, drawn from a seeded RNG, plus periodic outages.
//!
//! Off by default. [`FakeBace::set_chaos`](crate::FakeBace::set_chaos), `POST /_fake/chaos` and
//! the binary's `--chaos JSON` turn it on with a [`Chaos`]; `DELETE /_fake/chaos` turns it off.
//! Only token requests see faults; the API and introspection endpoints never do. Chaos applies
//! after the gate, the outage step and scripted steps, so tests that script answers are
//! unaffected unless they turn chaos on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// What chaos mode does: a probability per fault (each request draws at most one fault; the
/// probabilities must add up to at most 1) and a schedule of outages.
#[derive(Clone, Debug, PartialEq)]
pub struct Chaos {
    /// Seed of the RNG that picks faults; the same seed and request order give the same faults.
    pub seed: u64,
    /// Probability of a 500, 502 or 503 (Yii-shaped error body).
    pub server_error: f64,
    /// Probability of a 429 with `Retry-After: 1` to `5` (seconds).
    pub too_many_requests: f64,
    /// Probability of a latency spike: a delay of up to [`Chaos::max_latency`], then a normal
    /// answer.
    pub latency: f64,
    /// Longest latency spike.
    pub max_latency: Duration,
    /// Probability of a hang: no answer until the client gives up (or the fake shuts down).
    pub hang: f64,
    /// Probability of a connection dropped mid-answer: the answer's body fails at once, so the
    /// server closes the connection without a complete answer.
    pub reset: f64,
    /// Probability of a malformed answer (truncated JSON, HTML, an empty body, wrong types).
    pub malformed: f64,
    /// First outage starts this long after chaos is turned on.
    pub outage_after: Duration,
    /// An outage starts every this long after the first; zero: only one outage.
    pub outage_every: Duration,
    /// Length of an outage (every token request answers 503); zero: no outages.
    pub outage_for: Duration,
}

impl Default for Chaos {
    /// No fault at all (every probability zero, no outage), seed 0, spikes up to 2 s.
    fn default() -> Self {
        Self {
            seed: 0,
            server_error: 0.0,
            too_many_requests: 0.0,
            latency: 0.0,
            max_latency: Duration::from_secs(2),
            hang: 0.0,
            reset: 0.0,
            malformed: 0.0,
            outage_after: Duration::ZERO,
            outage_every: Duration::ZERO,
            outage_for: Duration::ZERO,
        }
    }
}

/// The names of the probability fields, in the order faults are drawn.
const FAULTS: [&str; 6] = [
    "server_error",
    "too_many_requests",
    "latency",
    "hang",
    "reset",
    "malformed",
];

/// The malformed answers chaos picks from: (status, content type, body).
const MALFORMED: [(u16, &str, &str); 5] = [
    (200, "application/json", "{\"access_token\": "),
    (
        200,
        "text/html",
        "<html><body>502 Bad Gateway</body></html>",
    ),
    (200, "application/json", ""),
    (
        200,
        "application/json",
        "{\"access_token\": 42, \"expires_in\": \"soon\"}",
    ),
    (
        502,
        "text/plain",
        "upstream connect error or disconnect/reset before headers",
    ),
];

impl Chaos {
    /// The probabilities in [`FAULTS`] order.
    fn probabilities(&self) -> [f64; 6] {
        [
            self.server_error,
            self.too_many_requests,
            self.latency,
            self.hang,
            self.reset,
            self.malformed,
        ]
    }

    /// Reads a chaos config from JSON: an object with any of the fields of [`Chaos`] (durations
    /// as seconds, fractions allowed, e.g. `"max_latency_secs": 2.5`); missing fields keep their
    /// [`Default`]. Unknown fields, probabilities outside `[0, 1]` or adding up to more than 1 are
    /// errors.
    ///
    /// # Errors
    ///
    /// A message naming the offending field.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        let object = value.as_object().ok_or("chaos: expected a JSON object")?;
        let mut chaos = Chaos::default();
        for (key, v) in object {
            let number = || {
                v.as_f64()
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .ok_or(format!("chaos: {key} must be a number >= 0"))
            };
            let secs = || number().map(Duration::from_secs_f64);
            match key.as_str() {
                "seed" => chaos.seed = v.as_u64().ok_or("chaos: seed must be an integer >= 0")?,
                "server_error" => chaos.server_error = number()?,
                "too_many_requests" => chaos.too_many_requests = number()?,
                "latency" => chaos.latency = number()?,
                "max_latency_secs" => chaos.max_latency = secs()?,
                "hang" => chaos.hang = number()?,
                "reset" => chaos.reset = number()?,
                "malformed" => chaos.malformed = number()?,
                "outage_after_secs" => chaos.outage_after = secs()?,
                "outage_every_secs" => chaos.outage_every = secs()?,
                "outage_for_secs" => chaos.outage_for = secs()?,
                _ => return Err(format!("chaos: unknown field {key:?}")),
            }
        }
        let probabilities = chaos.probabilities();
        if let Some((name, _)) = FAULTS.iter().zip(probabilities).find(|(_, p)| *p > 1.0) {
            return Err(format!("chaos: {name} must be at most 1"));
        }
        if probabilities.iter().sum::<f64>() > 1.0 + 1e-9 {
            return Err("chaos: the fault probabilities add up to more than 1".to_owned());
        }
        Ok(chaos)
    }

    /// The config as JSON, in the shape [`Chaos::from_json`] reads.
    pub fn to_json(&self) -> Value {
        json!({
            "seed": self.seed,
            "server_error": self.server_error,
            "too_many_requests": self.too_many_requests,
            "latency": self.latency,
            "max_latency_secs": self.max_latency.as_secs_f64(),
            "hang": self.hang,
            "reset": self.reset,
            "malformed": self.malformed,
            "outage_after_secs": self.outage_after.as_secs_f64(),
            "outage_every_secs": self.outage_every.as_secs_f64(),
            "outage_for_secs": self.outage_for.as_secs_f64(),
        })
    }

    /// Whether `elapsed` (since chaos was turned on) falls in an outage.
    fn in_outage(&self, elapsed: Duration) -> bool {
        if self.outage_for.is_zero() || elapsed < self.outage_after {
            return false;
        }
        let since = elapsed - self.outage_after;
        let into = if self.outage_every.is_zero() {
            since
        } else {
            Duration::from_nanos((since.as_nanos() % self.outage_every.as_nanos().max(1)) as u64)
        };
        into < self.outage_for
    }
}

/// A fault chaos picked for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Answer this 5xx status.
    ServerError(u16),
    /// Answer 429 with `Retry-After` of this many seconds.
    TooManyRequests(u64),
    /// Wait this long, then answer normally.
    Latency(Duration),
    /// Never answer.
    Hang,
    /// Send the headers, then fail the body.
    Reset,
    /// Answer [`MALFORMED`]`[i]`.
    Malformed(usize),
    /// 503: the fake is in an outage.
    Outage,
}

impl Fault {
    /// The name the fault is counted under.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Fault::ServerError(_) => "server_error",
            Fault::TooManyRequests(_) => "too_many_requests",
            Fault::Latency(_) => "latency",
            Fault::Hang => "hang",
            Fault::Reset => "reset",
            Fault::Malformed(_) => "malformed",
            Fault::Outage => "outage",
        }
    }

    /// Status, content type and body of a [`Fault::Malformed`] answer.
    pub(crate) fn malformed(i: usize) -> (u16, &'static str, &'static str) {
        MALFORMED[i % MALFORMED.len()]
    }
}

/// Chaos in force: its config, RNG and clock.
pub(crate) struct ChaosState {
    config: Chaos,
    rng: StdRng,
    since: Instant,
}

impl ChaosState {
    pub(crate) fn new(config: Chaos) -> Self {
        Self {
            rng: StdRng::seed_from_u64(config.seed),
            config,
            since: Instant::now(),
        }
    }

    pub(crate) fn config(&self) -> &Chaos {
        &self.config
    }

    /// The fault for the next request, if any.
    pub(crate) fn draw(&mut self) -> Option<Fault> {
        if self.config.in_outage(self.since.elapsed()) {
            return Some(Fault::Outage);
        }
        let mut r: f64 = self.rng.random();
        for (i, p) in self.config.probabilities().into_iter().enumerate() {
            if r < p {
                return Some(self.fault(i));
            }
            r -= p;
        }
        None
    }

    fn fault(&mut self, i: usize) -> Fault {
        match FAULTS[i] {
            "server_error" => Fault::ServerError([500, 502, 503][self.rng.random_range(0..3)]),
            "too_many_requests" => Fault::TooManyRequests(self.rng.random_range(1..=5)),
            "latency" => {
                let max = self.config.max_latency.as_secs_f64();
                Fault::Latency(Duration::from_secs_f64(self.rng.random_range(0.0..=max)))
            }
            "hang" => Fault::Hang,
            "reset" => Fault::Reset,
            _ => Fault::Malformed(self.rng.random_range(0..MALFORMED.len())),
        }
    }
}

/// Faults injected so far, by name (kept across turning chaos off and on).
pub(crate) type FaultCounts = BTreeMap<&'static str, u64>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_rejects_bad_fields() {
        let chaos = Chaos {
            seed: 7,
            server_error: 0.1,
            hang: 0.05,
            outage_after: Duration::from_secs(20),
            outage_every: Duration::from_secs(150),
            outage_for: Duration::from_secs(30),
            ..Chaos::default()
        };
        assert_eq!(Chaos::from_json(&chaos.to_json()), Ok(chaos));
        assert!(Chaos::from_json(&json!({"hnag": 0.1})).is_err());
        assert!(Chaos::from_json(&json!({"hang": 1.5})).is_err());
        assert!(Chaos::from_json(&json!({"hang": -0.1})).is_err());
        assert!(Chaos::from_json(&json!({"hang": 0.6, "reset": 0.6})).is_err());
        assert_eq!(Chaos::from_json(&json!({})), Ok(Chaos::default()));
    }

    #[test]
    fn outages_follow_the_schedule() {
        let s = Duration::from_secs;
        let chaos = Chaos {
            outage_after: s(20),
            outage_every: s(150),
            outage_for: s(30),
            ..Chaos::default()
        };
        for (at, down) in [(0, false), (19, false), (20, true), (49, true), (50, false)] {
            assert_eq!(chaos.in_outage(s(at)), down, "at {at}s");
        }
        for (at, down) in [(169, false), (170, true), (199, true), (200, false)] {
            assert_eq!(chaos.in_outage(s(at)), down, "at {at}s");
        }
        let once = Chaos {
            outage_every: Duration::ZERO,
            ..chaos
        };
        assert!(once.in_outage(s(49)) && !once.in_outage(s(50)) && !once.in_outage(s(170)));
        assert!(!Chaos::default().in_outage(s(10)));
    }

    #[test]
    fn same_seed_same_faults_in_proportion() {
        let chaos = Chaos {
            seed: 42,
            server_error: 0.2,
            malformed: 0.1,
            ..Chaos::default()
        };
        let draws = |c: &Chaos| {
            let mut state = ChaosState::new(c.clone());
            (0..10_000).map(|_| state.draw()).collect::<Vec<_>>()
        };
        let first = draws(&chaos);
        assert_eq!(first, draws(&chaos));
        let count = |name: &str| first.iter().flatten().filter(|f| f.name() == name).count();
        assert!((1_700..2_300).contains(&count("server_error")));
        assert!((700..1_300).contains(&count("malformed")));
        assert_eq!(count("hang"), 0);
        assert_eq!(
            first.iter().filter(|f| f.is_none()).count()
                + count("server_error")
                + count("malformed"),
            10_000
        );
    }
}
