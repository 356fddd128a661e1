//! What the gRPC service counts itself:
//!
//! - failed GetToken calls by account and code, and Invalidate calls by account and outcome
//!   (tokens served are counted by the broker, per account). Accounts are `None` when the
//!   caller named one that is not configured: caller input never becomes a label;
//! - the handling of every call, by RPC and gRPC code, as grpc-ecosystem's Prometheus
//!   interceptors count it: calls started, and for each call handled its duration (the
//!   handled count is the histogram's count). A [`Handling`] times one call from the start
//!   of its handler to its status. Fixed arrays of atomics, indexed by RPC and code: no lock
//!   and no map lookup on the hot path, two clock readings and three atomic additions a call.
//!   The clock is `quanta`'s (the CPU's time-stamp counter, calibrated once against the
//!   monotonic clock): a reading costs about half of `std::time::Instant::now` on the
//!   machines measured, where a cached GetToken is served in a few microseconds in all, so
//!   the two readings are a visible part of it (`grpc-load --only A` in the bench).

use std::{
    ops::Deref,
    sync::atomic::{AtomicU64, Ordering},
};

use quanta::Instant;

use tonic::{Code, Status};

use super::status::code_name;
use crate::{
    counts::{Counts, HistogramSnapshot, LatencyHistogram},
    proto::token_broker_service_server::SERVICE_NAME,
    token::AccountName,
};

/// The service's call counts. Shared (`Arc`) by the service's clones and telemetry.
#[derive(Debug, Default)]
pub struct CallCounts {
    get_token: Counts<(Option<AccountName>, &'static str)>,
    invalidate: Counts<(Option<AccountName>, &'static str)>,
    /// Per RPC (`Rpc as usize`).
    handling: [RpcCells; Rpc::ALL.len()],
}

/// One series: an account (`None`: not configured) and a code or outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallCount {
    /// The account asked for, if configured.
    pub account: Option<AccountName>,
    /// The gRPC code name (GetToken) or the outcome (Invalidate).
    pub label: &'static str,
    /// How many calls.
    pub count: u64,
}

impl CallCounts {
    pub(super) fn get_token_failed(&self, account: Option<AccountName>, code: &'static str) {
        self.get_token.inc((account, code));
    }

    pub(super) fn invalidated(&self, account: Option<AccountName>, outcome: &'static str) {
        self.invalidate.inc((account, outcome));
    }

    /// Drops the series of accounts a reload removed (calls for them from now on count as
    /// `(unknown)`), so names that come and go do not pile up.
    pub fn forget(&self, removed: &[AccountName]) {
        if removed.is_empty() {
            return;
        }
        let removed: std::collections::HashSet<&AccountName> = removed.iter().collect();
        let keep = |(account, _): &(Option<AccountName>, &'static str)| {
            account.as_ref().is_none_or(|a| !removed.contains(a))
        };
        self.get_token.retain(keep);
        self.invalidate.retain(keep);
    }

    /// Failed GetToken calls by account and code.
    pub fn get_token_failures(&self) -> Vec<CallCount> {
        series(&self.get_token)
    }

    /// Invalidate calls by account and outcome (or code, when the call failed).
    pub fn invalidations(&self) -> Vec<CallCount> {
        series(&self.invalidate)
    }

    /// The handling of each RPC: calls started, and the handled calls' durations by code.
    /// The handled calls are read before the started ones, so no reading has more handled
    /// than started.
    pub(crate) fn handling(&self) -> Vec<RpcHandling> {
        let mut by_rpc: Vec<RpcHandling> = Rpc::ALL
            .into_iter()
            .map(|rpc| RpcHandling {
                rpc,
                started: 0,
                handled: self.handling[rpc as usize]
                    .handled
                    .iter()
                    .enumerate()
                    .map(|(code, h)| (code_name(Code::from_i32(code as i32)), h.snapshot()))
                    .collect(),
            })
            .collect();
        for reading in &mut by_rpc {
            reading.started = self.handling[reading.rpc as usize]
                .started
                .load(Ordering::Relaxed);
        }
        by_rpc
    }
}

fn series(counts: &Counts<(Option<AccountName>, &'static str)>) -> Vec<CallCount> {
    counts
        .snapshot()
        .into_iter()
        .map(|((account, label), count)| CallCount {
            account,
            label,
            count,
        })
        .collect()
}

/// The gRPC codes, `0..=16` (`Code as usize`; see `code_name`).
const CODES: usize = 17;

/// The RPCs of `TokenBrokerService`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rpc {
    GetToken,
    Invalidate,
    WatchToken,
    ListAccounts,
}

impl Rpc {
    /// The service's full name (`grpc_service`).
    pub(crate) const SERVICE: &'static str = SERVICE_NAME;

    /// Every RPC, in `Rpc as usize` order.
    pub(crate) const ALL: [Rpc; 4] = [
        Rpc::GetToken,
        Rpc::Invalidate,
        Rpc::WatchToken,
        Rpc::ListAccounts,
    ];

    /// The method's name in the service (`grpc_method`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Rpc::GetToken => "GetToken",
            Rpc::Invalidate => "Invalidate",
            Rpc::WatchToken => "WatchToken",
            Rpc::ListAccounts => "ListAccounts",
        }
    }

    /// The kind of call (`grpc_type`, as grpc-ecosystem's interceptors name it).
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Rpc::WatchToken => "server_stream",
            Rpc::GetToken | Rpc::Invalidate | Rpc::ListAccounts => "unary",
        }
    }
}

/// The cells of one RPC.
#[derive(Debug, Default)]
struct RpcCells {
    started: AtomicU64,
    /// Per code (`Code as usize`): the durations of the calls handled with it.
    handled: [LatencyHistogram; CODES],
}

/// A reading of one RPC's handling.
#[derive(Debug, Clone)]
pub(crate) struct RpcHandling {
    pub(crate) rpc: Rpc,
    /// Calls started.
    pub(crate) started: u64,
    /// Every code (in code order), with the durations of the calls handled with it; their
    /// counts are the calls handled.
    pub(crate) handled: Vec<(&'static str, HistogramSnapshot)>,
}

/// One call being handled: counted as started when made, then handled once, with its code
/// and the time since it started ([`Handling::end`]). A call dropped before that (its
/// caller went away or its deadline passed, and tonic dropped the handler or the stream) is
/// handled as `CANCELLED`, the status grpc-go reports for it, so started − handled is the
/// calls in progress. `C` is `&CallCounts` for a unary call, an `Arc` for a stream (which
/// outlives its handler).
#[derive(Debug)]
pub(super) struct Handling<C: Deref<Target = CallCounts>> {
    counts: C,
    rpc: Rpc,
    start: Instant,
    open: bool,
}

/// Calibrates the clock of [`Handling`] now (it calibrates on first use otherwise, which takes
/// a few milliseconds), so that no call pays for it.
pub(super) fn calibrate_clock() {
    let _ = Instant::now();
}

impl<C: Deref<Target = CallCounts>> Handling<C> {
    /// A call of `rpc` starts.
    pub(super) fn start(counts: C, rpc: Rpc) -> Self {
        counts.handling[rpc as usize]
            .started
            .fetch_add(1, Ordering::Relaxed);
        Self {
            counts,
            rpc,
            start: Instant::now(),
            open: true,
        }
    }

    /// The call ends with `code` (the first end counts; later ones are ignored).
    pub(super) fn end(&mut self, code: Code) {
        if std::mem::take(&mut self.open) {
            let elapsed = self.start.elapsed();
            self.counts.handling[self.rpc as usize].handled[code as usize].observe(elapsed);
        }
    }

    /// The call ends with the status of `result`.
    pub(super) fn end_with<T>(mut self, result: &Result<T, Status>) {
        self.end(result.as_ref().map_or_else(Status::code, |_| Code::Ok));
    }
}

impl<C: Deref<Target = CallCounts>> Drop for Handling<C> {
    fn drop(&mut self) {
        self.end(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    /// `(started, handled by code name)` of `rpc`, codes with calls only.
    fn reading(counts: &CallCounts, rpc: Rpc) -> (u64, Vec<(&'static str, u64)>) {
        let r = counts
            .handling()
            .into_iter()
            .find(|r| r.rpc == rpc)
            .unwrap();
        let handled = r
            .handled
            .iter()
            .filter(|(_, h)| h.count > 0)
            .map(|(code, h)| (*code, h.count))
            .collect();
        (r.started, handled)
    }

    #[test]
    fn rpcs_and_codes_index_their_cells() {
        for (i, rpc) in Rpc::ALL.into_iter().enumerate() {
            assert_eq!(rpc as usize, i);
        }
        assert_eq!(Rpc::SERVICE, "bace.tokenbroker.v1.TokenBrokerService");
        let names = Rpc::ALL.map(Rpc::name);
        assert_eq!(
            names,
            ["GetToken", "Invalidate", "WatchToken", "ListAccounts"]
        );
        let kinds = Rpc::ALL.map(Rpc::kind);
        assert_eq!(kinds, ["unary", "unary", "server_stream", "unary"]);
        // Every code has its cell, in code order, and the reading names them all.
        for i in 0..CODES {
            assert_eq!(Code::from_i32(i as i32) as usize, i);
        }
        assert_eq!(Code::from_i32(CODES as i32), Code::Unknown, "17 codes");
        let counts = CallCounts::default();
        for rpc in Rpc::ALL {
            for i in 0..CODES {
                let code = Code::from_i32(i as i32);
                Handling::start(&counts, rpc).end(code);
            }
        }
        for r in counts.handling() {
            assert_eq!(r.started, CODES as u64);
            let names: Vec<&str> = r.handled.iter().map(|(c, _)| *c).collect();
            assert_eq!(names.len(), CODES);
            assert_eq!(names[0], "OK");
            assert_eq!(names[5], "NOT_FOUND");
            assert_eq!(names[16], "UNAUTHENTICATED");
            assert!(r.handled.iter().all(|(_, h)| h.count == 1));
        }
    }

    #[test]
    fn a_call_is_started_then_handled_once_with_its_code() {
        let counts = CallCounts::default();
        let mut call = Handling::start(&counts, Rpc::Invalidate);
        assert_eq!(reading(&counts, Rpc::Invalidate), (1, vec![]));
        call.end(Code::NotFound);
        call.end(Code::Ok);
        drop(call);
        assert_eq!(
            reading(&counts, Rpc::Invalidate),
            (1, vec![("NOT_FOUND", 1)])
        );

        Handling::start(&counts, Rpc::GetToken).end_with(&Ok::<_, Status>(()));
        let failed: Result<(), Status> = Err(Status::invalid_argument("no"));
        Handling::start(&counts, Rpc::GetToken).end_with(&failed);
        assert_eq!(
            reading(&counts, Rpc::GetToken),
            (2, vec![("OK", 1), ("INVALID_ARGUMENT", 1)])
        );
        assert_eq!(reading(&counts, Rpc::ListAccounts), (0, vec![]));
    }

    #[test]
    fn a_call_dropped_before_its_end_is_cancelled() {
        let counts = Arc::new(CallCounts::default());
        let stream = Handling::start(counts.clone(), Rpc::WatchToken);
        assert_eq!(reading(&counts, Rpc::WatchToken), (1, vec![]));
        drop(stream);
        assert_eq!(
            reading(&counts, Rpc::WatchToken),
            (1, vec![("CANCELLED", 1)])
        );
    }

    #[test]
    fn the_handling_time_is_from_start_to_end() {
        let counts = CallCounts::default();
        let mut call = Handling::start(&counts, Rpc::GetToken);
        std::thread::sleep(Duration::from_millis(2));
        call.end(Code::Unavailable);
        let r = counts.handling().remove(0);
        let (_, h) = r.handled[Code::Unavailable as usize].clone();
        assert_eq!(h.count, 1);
        assert!(h.sum >= 0.002, "{}", h.sum);
        // Nothing below 2 ms.
        let below: u64 = (h.buckets.iter())
            .filter(|(le, _)| *le < 0.002)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(below, 0);
    }
}
