//! C (iii). GetToken's latency at a fixed request rate while refreshes run (4 s tokens), against
//! the same broker in a steady phase (20 s tokens, no refresh due), in interleaved rounds.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::ensure;
use fake_bace::{FakeBace, Grant};

use crate::{
    LOAD_CPU,
    broker::BrokerProc,
    fixtures::{account_names, broker_config, fake_account, start_fake, user, write_config},
    h2load::{H2Args, Summary, h2load, others},
    opts::Opts,
    util::{strs, us},
    wire::{Bodies, GET_TOKEN_PATH},
};

/// Lifetime of the fake's tokens while refreshes churn, and between (steady phases).
const CHURN_LIFETIME: Duration = Duration::from_secs(4);
const STEADY_LIFETIME: Duration = Duration::from_secs(20);

pub(crate) async fn run(
    opts: &Opts,
    md: &mut String,
    get_token_rps: Option<f64>,
) -> anyhow::Result<()> {
    println!("== C(iii). GetToken latency while refreshes run vs steady state");
    const ACCOUNTS: usize = 200;
    let names = account_names(ACCOUNTS);
    let set_lifetime = |fake: &FakeBace, lifetime: Duration| {
        for n in &names {
            let mut a = fake_account(n);
            a.login_lifetime = lifetime;
            a.refresh_lifetime = lifetime;
            fake.add_account(a);
        }
    };
    let fake = start_fake(&[]).await?;
    set_lifetime(&fake, CHURN_LIFETIME);
    let config = write_config(
        opts,
        "refresh",
        &broker_config(&fake, &names)
            .lifetime_fraction(0.5)
            .expiry_margin(Duration::from_secs(1)),
    )?;
    let broker = BrokerProc::spawn(opts, "refresh", &config)?;
    broker.wait_ready(Duration::from_secs(60)).await?;
    let bodies = Bodies::write(opts, &names[0])?;
    let expected = broker.check_unary(&names[0]).await?;
    let refreshes = |fake: &FakeBace| -> Vec<u64> {
        names
            .iter()
            .map(|n| fake.calls(&user(n), Grant::Refresh))
            .collect()
    };
    let logins = |fake: &FakeBace| -> u64 {
        names
            .iter()
            .map(|n| fake.calls(&user(n), Grant::Password))
            .sum()
    };
    // Resolves once every account made a refresh since `base` (so it holds a token of the
    // lifetime the fake hands out now).
    let all_refreshed = |fake: &FakeBace, base: Vec<u64>| {
        let fake = fake.clone();
        let refreshes = &refreshes;
        async move {
            let deadline = Instant::now() + Duration::from_secs(40);
            loop {
                if refreshes(&fake)
                    .iter()
                    .zip(&base)
                    .all(|(now, then)| now > then)
                {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return Ok(());
                }
                ensure!(
                    Instant::now() < deadline,
                    "accounts did not refresh within 40 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    all_refreshed(&fake, refreshes(&fake)).await?;
    let logins_after_warm_up = logins(&fake);

    // A fixed request rate well below capacity, so the latencies measure service time rather
    // than queueing: 20 connections, one call in flight on each (h2load's --rps with several
    // streams per connection sends in bursts that add ~10 ms).
    let total_rps = (get_token_rps.unwrap_or(20_000.0) * 0.5).clamp(1000.0, 10_000.0);
    let conns = 20;
    let per_conn = (total_rps / conns as f64).round() as u64;
    let secs = opts.secs.to_string();
    let args = H2Args {
        args: strs(&[
            "-c",
            &conns.to_string(),
            "-m",
            "1",
            "--rps",
            &per_conn.to_string(),
            "-D",
            &secs,
        ])
        .into_iter()
        .chain([
            "-d".into(),
            bodies.get_token.display().to_string(),
            format!("http://{}{GET_TOKEN_PATH}", broker.addr),
        ])
        .collect(),
    };

    // Rounds alternate: refreshing (4 s tokens), then steady (every account switched to a 20 s
    // token, whose refresh is ~10 s away: a quiet window for the measurement), then back.
    let mut churn = Vec::new();
    let mut steady = Vec::new();
    let (mut churn_refreshes, mut churn_secs, mut quiet_calls) = (0u64, 0f64, 0u64);
    for round in 0..opts.rounds {
        let before: u64 = refreshes(&fake).iter().sum();
        let t = Instant::now();
        let run = h2load(opts, &format!("churn-{round}"), args.clone(), &broker).await?;
        churn_secs += t.elapsed().as_secs_f64();
        churn_refreshes += refreshes(&fake).iter().sum::<u64>() - before;
        run.check_data(expected.get_token_frame, false)?;

        // Every account's next refresh (within ~2 s) yields a 20 s token; then refreshes stop
        // for ~10 s. (Counting refreshes per account would race: one counted on arrival just
        // before the switch may still be answered with a 20 s token.)
        set_lifetime(&fake, STEADY_LIFETIME);
        quiet(&fake).await?;
        let quiet_from = fake.total_calls();
        let run2 = h2load(opts, &format!("steady-{round}"), args.clone(), &broker).await?;
        quiet_calls += fake.total_calls() - quiet_from;
        run2.check_data(expected.get_token_frame, false)?;
        println!(
            "   round {round}: p99 refreshing {} / steady {} (CPU 0 busy with others: {:.0}% / {:.0}%)",
            us(run.p99),
            us(run2.p99),
            run.others_pct,
            run2.others_pct
        );
        churn.push(run);
        steady.push(run2);

        set_lifetime(&fake, CHURN_LIFETIME);
        if round + 1 < opts.rounds {
            // Every account back on 4 s tokens, refreshing every ~2 s.
            all_refreshed(&fake, refreshes(&fake)).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let extra_logins = logins(&fake) - logins_after_warm_up;
    broker.stop()?;
    fake.shutdown();

    let c = Summary::of(&churn);
    let s = Summary::of(&steady);
    let _ = writeln!(
        md,
        "\n### C (iii). GetToken latency while refreshes run vs steady state ({} interleaved rounds, median)\n",
        opts.rounds
    );
    let _ = writeln!(
        md,
        "{ACCOUNTS} accounts, `lifetime_fraction: 0.5`, `expiry_margin: 1s`. Refreshing phase: fake tokens live 4 s \
         → **{:.0} refreshes/s** during the load ({extra_logins} password logins after warm-up: refresh preferred). \
         Steady phase: the same broker right after every account got a 20 s token, so no refresh is due \
         (**{quiet_calls} upstream calls during the steady runs**, expected 0). Load: GetToken on `{}` (itself refreshing) at a \
         fixed {} req/s (10k or half the capacity measured in A, whichever is lower).\n",
        churn_refreshes as f64 / churn_secs,
        names[0],
        per_conn * conns as u64
    );
    let _ = writeln!(
        md,
        "| Phase | achieved req/s | p50 | p99 (median) | p99 per round | p99.9 | max | broker CPU / req | CPU 0 busy with others |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (name, s, runs) in [
        ("refreshing", &c, &churn),
        ("steady (baseline)", &s, &steady),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {} | {} | {} | {} | {} | {:.1} µs | {} |",
            s.rps,
            us(s.p50),
            us(s.p99),
            runs.iter()
                .map(|r| us(r.p99))
                .collect::<Vec<_>>()
                .join(" / "),
            us(s.p999),
            us(runs.iter().map(|r| r.max).max().unwrap_or(0)),
            s.cpu_us,
            others(runs),
        );
    }
    let ratio = c.p99 as f64 / s.p99 as f64;
    let _ = writeln!(
        md,
        "\n**p99 refreshing / steady: {ratio:.2}** (target: equal within noise; compare with the spread of \
         p99 across rounds of the same phase).\n",
    );
    let _ = writeln!(
        md,
        "Command (CPU {LOAD_CPU}):\n```\n{}\n```",
        churn[0].command
    );
    Ok(())
}

/// Resolves once the fake saw no upstream call for 1 s, at least 2.5 s from now.
async fn quiet(fake: &FakeBace) -> anyhow::Result<()> {
    let start = Instant::now();
    let (mut last, mut since) = (fake.total_calls(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = fake.total_calls();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(1)
            && start.elapsed() >= Duration::from_millis(2500)
        {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "refreshes did not stop within 30 s"
        );
    }
}
