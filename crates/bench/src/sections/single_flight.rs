//! C. Single flight under load: with the fake BACE's gate closed, N cold callers on one
//! account, then M accounts cold at once; the upstream calls counted by the fake.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context, ensure};
use fake_bace::FakeBace;

use crate::{
    broker::BrokerProc,
    fixtures::{account_names, broker_config, start_fake, write_config},
    opts::Opts,
    util::mark,
    wire::get_request,
};

pub(crate) async fn run(opts: &Opts, md: &mut String) -> anyhow::Result<()> {
    println!("== C. Single flight");
    let _ = writeln!(md, "## C. Single flight under load\n");
    let _ = writeln!(
        md,
        "| Case | Callers | Upstream calls | Expected | Waiters on the flight(s) (broker log) | All calls OK |\n|---|---|---|---|---|---|"
    );

    // (i) N cold callers on one account.
    let n = opts.flight_callers;
    let names = account_names(1);
    let fake = start_fake(&names).await?;
    fake.hold();
    let config = write_config(opts, "flight-one", &broker_config(&fake, &names))?;
    let broker = BrokerProc::spawn(opts, "flight-one", &config)?;
    fake.wait_for_total_calls(1).await; // the warm-up login, held at the gate
    let targets: Vec<String> = (0..n).map(|_| names[0].clone()).collect();
    let outcome = cold_callers(&broker, &fake, &targets, 50).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = fake.total_calls();
    let waiters = broker.flight_waiters()?;
    broker.stop()?;
    fake.shutdown();
    println!("   (i) {n} callers: {calls} upstream call(s), waiters {waiters:?}");
    let _ = writeln!(
        md,
        "| (i) N cold callers, 1 account | {n} over 50 connections | **{calls}** | 1{} | {} | {}/{} |",
        mark(calls == 1),
        waiters.iter().sum::<u64>(),
        outcome.ok,
        n
    );

    // (ii) M accounts cold at once, several callers each.
    let m = opts.flight_accounts;
    let per = 5;
    let names = account_names(m);
    let fake = start_fake(&names).await?;
    fake.hold();
    let config = write_config(opts, "flight-many", &broker_config(&fake, &names))?;
    let broker = BrokerProc::spawn(opts, "flight-many", &config)?;
    let targets: Vec<String> = (0..per).flat_map(|_| names.iter().cloned()).collect();
    // Released once every account has its one login waiting at the gate.
    let outcome = cold_callers_until(&broker, &fake, &targets, 50, m as u64).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = fake.total_calls();
    let waiters = broker.flight_waiters()?;
    broker.stop()?;
    fake.shutdown();
    println!("   (ii) {m} accounts: {calls} upstream call(s)");
    let _ = writeln!(
        md,
        "| (ii) M accounts cold at once | {} ({per} per account) + warm-up | **{calls}** | {m}{} | {} over {} flights | {}/{} |",
        targets.len(),
        mark(calls == m as u64),
        waiters.iter().sum::<u64>(),
        waiters.len(),
        outcome.ok,
        targets.len()
    );
    let _ = writeln!(
        md,
        "\nMethod: fake BACE gate closed (`FakeBace::hold`) before the broker starts, so the warm-up logins wait upstream; \
         tonic callers are fired over 50 connections, the gate opens 2 s after the last call is sent (i) / once all M logins \
         are at the gate (ii), then upstream calls are counted by the fake. \"Waiters\" is the sum of `waiters` in the \
         broker's `token obtained` log lines (callers + warm-up that shared each flight).\n"
    );
    Ok(())
}

struct CallerOutcome {
    ok: usize,
}

/// Fires one call per target over `conns` connections while the gate is closed, waits 2 s,
/// opens the gate and collects the answers.
async fn cold_callers(
    broker: &BrokerProc,
    fake: &FakeBace,
    targets: &[String],
    conns: usize,
) -> anyhow::Result<CallerOutcome> {
    cold_callers_until(broker, fake, targets, conns, 0).await
}

/// [`cold_callers`], opening the gate only once `at_gate` upstream calls are waiting at it.
async fn cold_callers_until(
    broker: &BrokerProc,
    fake: &FakeBace,
    targets: &[String],
    conns: usize,
    at_gate: u64,
) -> anyhow::Result<CallerOutcome> {
    let mut clients = Vec::new();
    for _ in 0..conns {
        clients.push(broker.client().await?);
    }
    let mut calls = tokio::task::JoinSet::new();
    for (i, name) in targets.iter().enumerate() {
        let mut c = clients[i % conns].clone();
        let req = get_request(name);
        calls.spawn(async move { c.get_token(req).await });
    }
    tokio::time::timeout(Duration::from_secs(60), fake.wait_for_total_calls(at_gate))
        .await
        .context("upstream calls never reached the gate")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        calls.try_join_next().is_none(),
        "a call finished while the gate was closed"
    );
    fake.release();
    let mut ok = 0;
    while let Some(r) = calls.join_next().await {
        match r? {
            Ok(_) => ok += 1,
            Err(status) => eprintln!("   call failed: {status:?}"),
        }
    }
    Ok(CallerOutcome { ok })
}
