//! A. gRPC throughput and latency: GetToken against Health/Check (the baseline) over HTTP/2,
//! in interleaved rounds (ABBA order), every response checked.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Context;

use crate::{
    LOAD_CPU,
    broker::BrokerProc,
    fixtures::{account_names, broker_config, start_fake, store_config, write_config},
    h2load::{H2Args, Summary, h2load, others},
    opts::Opts,
    util::{strs, us},
    wire::{Bodies, GET_TOKEN_PATH, HEALTH_PATH},
};

/// Runs section A and returns GetToken's median throughput (req/s) and the median of the
/// per-round GetToken / Health ratios.
pub(crate) async fn run(opts: &Opts, md: &mut String) -> anyhow::Result<(f64, f64)> {
    println!("== A. gRPC throughput and latency (h2load)");
    let names = account_names(1000);
    let fake = start_fake(&names).await?;
    // With --store: the same broker, one replica on a private Redis (the hot path must not
    // touch it).
    let mut redis = opts.store.then(testkit::RedisServer::start);
    let mut config = broker_config(&fake, &names);
    if let Some(redis) = &redis {
        config = config.store(store_config(opts, redis)?);
    }
    let config = write_config(opts, "throughput", &config)?;
    let broker = BrokerProc::spawn(opts, "throughput", &config)?;
    broker.wait_ready(Duration::from_secs(60)).await?;
    if opts.store_down
        && let Some(redis) = &mut redis
    {
        // Measured with Redis gone: the replica serves what it holds.
        redis.stop();
    }
    let bodies = Bodies::write(opts, &names[0])?;
    let expected = broker.check_unary(&names[0]).await?;

    let base = ["-c", "8", "-m", "32"];
    let url = |path: &str| format!("http://{}{path}", broker.addr);
    let warm = |body: &Path, path: &str| H2Args {
        args: strs(&base)
            .into_iter()
            .chain(strs(&["-D", "1"]))
            .chain(["-d".into(), body.display().to_string(), url(path)])
            .collect(),
    };
    // Warm the server (connections, allocator) without recording.
    h2load(
        opts,
        "warm-health",
        warm(&bodies.health, HEALTH_PATH),
        &broker,
    )
    .await?;
    h2load(
        opts,
        "warm-get",
        warm(&bodies.get_token, GET_TOKEN_PATH),
        &broker,
    )
    .await?;

    let secs = opts.secs.to_string();
    let timed = |body: &Path, path: &str| H2Args {
        args: strs(&base)
            .into_iter()
            .chain(strs(&["-D", &secs]))
            .chain(["-d".into(), body.display().to_string(), url(path)])
            .collect(),
    };
    let mut health = Vec::new();
    let mut get = Vec::new();
    for round in 0..opts.rounds {
        // ABBA order (Health first in even rounds, GetToken first in odd ones): a machine
        // that slows down or speeds up during the run favours neither.
        let mut h = None;
        let mut g = None;
        for health_turn in [round % 2 == 0, round % 2 == 1] {
            if health_turn {
                let run = h2load(
                    opts,
                    &format!("health-{round}"),
                    timed(&bodies.health, HEALTH_PATH),
                    &broker,
                )
                .await?;
                run.check_data(expected.health_frame, true)?;
                h = Some(run);
            } else {
                let run = h2load(
                    opts,
                    &format!("get-{round}"),
                    timed(&bodies.get_token, GET_TOKEN_PATH),
                    &broker,
                )
                .await?;
                run.check_data(expected.get_token_frame, true)?;
                g = Some(run);
            }
        }
        let (h, g) = (h.context("health run")?, g.context("GetToken run")?);
        println!(
            "   round {round}: Health {:.0} req/s, GetToken {:.0} req/s",
            h.rps, g.rps
        );
        health.push(h);
        get.push(g);
    }
    let logins = fake.total_calls();
    broker.stop()?;
    fake.shutdown();

    let h = Summary::of(&health);
    let g = Summary::of(&get);
    let ratio = g.rps / h.rps;
    let _ = writeln!(
        md,
        "## A. gRPC throughput and latency (h2load, {} interleaved rounds in ABBA order, median){}\n",
        opts.rounds,
        match (opts.store, opts.store_down) {
            (true, true) => ", Redis store configured and stopped",
            (true, false) => ", Redis store on",
            _ => "",
        }
    );
    let _ = writeln!(
        md,
        "Broker with {} accounts (all warm, {logins} upstream logins in total), unary calls over HTTP/2; \
         every response checked (all 2xx, DATA bytes = requests × expected gRPC frame; one tonic call per RPC verified status OK first).\n",
        names.len()
    );
    let _ = writeln!(
        md,
        "| RPC | req/s (median) | per round | p50 | p99 | broker CPU / req | broker CPU use | CPU 0 busy with others |\n|---|---|---|---|---|---|---|---|"
    );
    for (name, s, runs) in [
        ("Health/Check (baseline)", &h, &health),
        ("GetToken", &g, &get),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {} | {} | {} | {:.1} µs | {:.0}% | {} |",
            s.rps,
            s.per_round,
            us(s.p50),
            us(s.p99),
            s.cpu_us,
            runs.iter().map(|r| r.broker_pct).sum::<f64>() / runs.len() as f64,
            others(runs)
        );
    }
    let mut ratios: Vec<f64> = health
        .iter()
        .zip(&get)
        .map(|(h, g)| g.rps / h.rps)
        .collect();
    let paired: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    ratios.sort_by(f64::total_cmp);
    let paired_median = ratios[ratios.len() / 2];
    // The pairs ran back to back (ABBA), so each per-round ratio sees one state of the
    // machine; their median is the headline, robust to rounds a noisy neighbour spoiled.
    let _ = writeln!(
        md,
        "\n**GetToken / Health throughput: {paired_median:.3}** (median of the {} per-round ratios; target ≥ 0.95{}; per round: {}; \
         ratio of the medians: {ratio:.3}; broker CPU per request, Health / GetToken: {:.3}). \
         Latencies are under saturation (8 connections × 32 streams in flight), so they mostly measure queueing. \
         \"CPU 0 busy with others\" is the share of the broker's CPU taken by other processes during each run \
         (this machine is shared): rounds where it is high are slower.\n",
        paired.len(),
        if paired_median >= 0.95 {
            " ✓"
        } else {
            " ✗"
        },
        paired.join(" / "),
        h.cpu_us / g.cpu_us
    );
    let _ = writeln!(md, "Commands (rounds alternate; CPU {LOAD_CPU}):\n```");
    let _ = writeln!(md, "{}", health[0].command);
    let _ = writeln!(md, "{}", get[0].command);
    let _ = writeln!(md, "```\n");
    Ok((g.rps, paired_median))
}
