//! `soak`: a chaos soak of bace-token-broker. Run it through `scripts/soak [MINUTES]`, which
//! builds the release binaries first; directly:
//!
//! ```text
//! cargo build --release -p bace-token-broker -p fake-bace -p bench --bins
//! target/release/soak [MINUTES] [--seed N] [--accounts N] [--callers N] [--watchers N]
//!     [--churn N] [--broker-bin FILE] [--fake-bin FILE] [--work DIR]
//! ```
//!
//! What it does: starts `fake-bace` with every account the run will use (token lifetimes of
//! 5–20 s) and the release broker with 1,000 of them (`--accounts`), waits for readiness, turns
//! the fake's chaos mode on (random 5xx, 429 with `Retry-After`, latency spikes, hangs,
//! connections dropped mid-answer, malformed answers, a 30-second outage 20 s in and then
//! every 150 s), and for MINUTES (default 1) runs 200 callers looping on GetToken with a random
//! `min_validity` and Invalidate on 1 % of calls, 20 WatchToken streams opening and closing, and
//! a reload (config rewritten, SIGHUP) every minute from 30 s in that removes 50 accounts and
//! adds 50 new ones. Every 2 s it samples the broker's resident memory and open descriptors
//! from `/proc/PID`. Then it stops the load and the chaos and polls ListAccounts until every
//! account is healthy again.
//!
//! What it asserts (exit status 1 and the failed checks listed when one fails):
//!
//! - **No expired token served**: each token a caller receives (GetToken, Invalidate,
//!   WatchToken) is looked up at the fake (`/_fake/tokens/{t}`, cached while far from expiry): it
//!   must be one the fake issued and not yet expired when it arrived. Also, by the fake's
//!   expiry and by the broker's own `expires_at`, it must stay valid for the caller's
//!   `min_validity` from when the call was sent (the broker adds its expiry margin on top).
//! - **No panic**: the broker stays up, its log has no panic, every RPC answers with an expected
//!   code (OK, UNAVAILABLE, OUT_OF_RANGE, or NOT_FOUND for an account a reload just removed),
//!   and it exits 0 on SIGTERM; the fake likewise.
//! - **Upstream calls per account within the bound** derived in [`report::upstream_bound`].
//! - **Memory and descriptors flat** after the first minute of chaos (the first third of a
//!   shorter run): the least-squares slope over that window, times the window, stays within an
//!   allowance ([`report::flat`]).
//! - **Recovery**: every account healthy again within the bound of [`report::recovery_bound`]
//!   once the chaos stops.
//!
//! The figures go to stdout and `WORK/summary.md` (default `target/soak-work/`), with the
//! broker's and the fake's logs.

use std::{
    collections::HashMap,
    fs,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use fake_bace::Chaos;
use tokio::{sync::watch, task::JoinSet};

mod fleet;
mod load;
mod opts;
mod procs;
mod report;

use crate::{
    fleet::{Fleet, SoakAccount},
    load::Load,
    opts::Opts,
    procs::{BrokerProc, FakeProc},
    report::{Presence, Report, Sample},
};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = Opts::parse(&args).and_then(|opts| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(&opts))
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("soak: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The chaos of the soak: roughly one token request in five gets a fault.
fn chaos(opts: &Opts) -> Chaos {
    Chaos {
        seed: opts.seed,
        server_error: 0.06,
        too_many_requests: 0.03,
        latency: 0.05,
        max_latency: Duration::from_secs(4),
        hang: 0.01,
        reset: 0.03,
        malformed: 0.03,
        outage_after: Duration::from_secs(20),
        outage_every: Duration::from_secs(150),
        outage_for: Duration::from_secs(30),
    }
}

async fn run(opts: &Opts) -> anyhow::Result<bool> {
    for bin in [&opts.broker_bin, &opts.fake_bin] {
        ensure!(
            bin.exists(),
            "{} not found: build the binaries first (scripts/soak does)",
            bin.display()
        );
    }
    let _ = fs::remove_dir_all(&opts.work);
    fs::create_dir_all(&opts.work)?;
    let mut fleet = Fleet::new(opts);
    let accounts_file = fleet.write_fake_accounts(&opts.work)?;
    let fake = Arc::new(FakeProc::spawn(
        &opts.fake_bin,
        &accounts_file,
        &opts.work.join("fake.log"),
    )?);

    let config = opts.work.join("broker.yaml");
    let (listen, metrics) = (procs::free_addr()?, procs::free_addr()?);
    let mut active: Vec<SoakAccount> = fleet.initial.clone();
    fleet::write_broker_config(&config, &fake.token_url, listen, metrics, &active)?;
    let mut broker = BrokerProc::spawn(
        &opts.broker_bin,
        &config,
        listen,
        &opts.work.join("broker.log"),
    )?;
    let start = Instant::now();
    let warmup = broker.wait_ready(Duration::from_secs(300)).await?;
    println!(
        "soak: broker ready with {} accounts in {:.1} s; chaos for {:.1} min",
        active.len(),
        warmup.as_secs_f64(),
        opts.chaos.as_secs_f64() / 60.0
    );

    let mut presence: HashMap<String, Presence> = active
        .iter()
        .map(|a| (a.name.clone(), Presence::new(start)))
        .collect();
    let shared = Arc::new(RwLock::new(active.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = Load::new(fake.clone(), shared.clone(), stop_rx);
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(broker.channel().await?);
    }

    fake.set_chaos(Some(&chaos(opts))).await?;
    let chaos_start = Instant::now();
    let mut tasks = JoinSet::new();
    load.spawn(
        &mut tasks,
        &channels,
        opts.callers,
        opts.watchers,
        opts.seed,
    );

    // The chaos phase: samples every 2 s, a reload a minute.
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_reload = 0;
    let mut reload_errors = 0;
    while chaos_start.elapsed() < opts.chaos {
        broker.check_alive()?;
        let (rss_kb, fds) = broker.sample()?;
        samples.push(Sample {
            at: chaos_start.elapsed(),
            rss_kb,
            fds,
        });
        // A line a minute, so a long run shows it is alive.
        if samples.len().is_multiple_of(30) {
            let checked = load.tally.lock().map_or(0, |t| t.checked);
            println!(
                "soak: {:.0} min: {:.1} MiB resident, {fds} descriptors, {checked} tokens checked",
                chaos_start.elapsed().as_secs_f64() / 60.0,
                rss_kb as f64 / 1024.0
            );
        }
        if next_reload < fleet.additions.len()
            && chaos_start.elapsed() >= Opts::reload_at(next_reload)
        {
            let removed = fleet.pick_removals(&active, opts.churn);
            let now = Instant::now();
            active.retain(|a| !removed.contains(&a.name));
            for name in &removed {
                if let Some(p) = presence.get_mut(name) {
                    p.removed = Some(now);
                }
            }
            for a in &fleet.additions[next_reload] {
                presence.insert(a.name.clone(), Presence::new(now));
                active.push(a.clone());
            }
            *shared
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = active.clone();
            fleet::write_broker_config(&config, &fake.token_url, listen, metrics, &active)?;
            if broker.reload().is_err() {
                reload_errors += 1;
            }
            next_reload += 1;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Chaos off, load off; then wait for every account to be healthy again.
    stop_tx.send_replace(true);
    fake.set_chaos(None).await?;
    let chaos_end = Instant::now();
    while tasks.join_next().await.is_some() {}
    let mut client = broker.client().await?;
    let bound = report::recovery_bound();
    let recovery = loop {
        let elapsed = chaos_end.elapsed();
        let statuses = client
            .list_accounts(bace_token_broker::proto::ListAccountsRequest {})
            .await
            .context("ListAccounts")?
            .into_inner()
            .accounts;
        let unhealthy = statuses.iter().filter(|s| !report::healthy(s)).count();
        let expected = statuses.len() == active.len();
        if unhealthy == 0 && expected {
            break Ok(elapsed);
        }
        if elapsed > bound * 2 {
            break Err(format!(
                "{unhealthy} of {} accounts still not healthy after {:.0} s",
                statuses.len(),
                elapsed.as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let end = Instant::now();
    let (calls, total_calls) = fake.calls().await?;
    let faults = fake.faults().await?;
    broker.check_alive()?;
    let broker_log = broker.log.clone();
    let broker_stop = broker.stop();
    let broker_panics = procs::panics_in(&broker_log)?;
    let tally = load.tally.clone();
    drop(load);
    let fake = Arc::try_unwrap(fake)
        .ok()
        .context("fake handle still shared")?;
    let fake_stop = fake.stop();
    let fake_panics = procs::panics_in(&opts.work.join("fake.log"))?;

    let tally = Arc::try_unwrap(tally)
        .ok()
        .context("tally still shared")?
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let report = Report {
        opts,
        warmup,
        samples,
        tally,
        presence,
        end,
        calls,
        total_calls,
        faults,
        recovery,
        reload_errors,
        reloads: next_reload,
        broker_stop: broker_stop.err().map(|e| format!("{e:#}")),
        fake_stop: fake_stop.err().map(|e| format!("{e:#}")),
        panics: broker_panics.into_iter().chain(fake_panics).collect(),
    };
    let (text, ok) = report.render();
    println!("\n{text}");
    fs::write(opts.work.join("summary.md"), &text)?;
    println!("(written to {})", opts.work.join("summary.md").display());
    Ok(ok)
}
