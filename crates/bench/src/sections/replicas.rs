//! R. Several replicas on one Redis: how fast a new token reaches the other replicas
//! (Invalidate on one, the new token on the others' WatchToken streams), a warm restart of many
//! accounts from Redis beside a cold start, and what the store costs Redis (commands and bytes
//! per account and per new token).

use std::{
    collections::HashMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use bace_token_broker::proto;
use testkit::{RedisServer, Replica};

use crate::{
    fixtures::{account_names, broker_config, start_fake, store_config},
    opts::Opts,
};

pub(crate) async fn run(opts: &Opts, md: &mut String) -> anyhow::Result<()> {
    println!("== R. Several replicas on one Redis");
    let _ = writeln!(md, "## R. Several replicas on one Redis\n");
    propagation(opts, md).await?;
    restart(opts, md).await?;
    Ok(())
}

/// Invalidate on r1, the new token on r2's and r3's watch streams.
async fn propagation(opts: &Opts, md: &mut String) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let names = account_names(1);
    let account = names[0].clone();
    let fake = start_fake(&names).await?;
    let config = broker_config(&fake, &names)
        .store(store_config(opts, &redis)?)
        .invalidate_cooldown(Duration::from_millis(1));
    let dir = opts.work.join("replicas");
    std::fs::create_dir_all(&dir)?;
    let mut replicas: Vec<Replica> = (1..=3)
        .map(|i| Replica::start_logging(&opts.broker_bin, &dir, &format!("r{i}"), &config, "warn"))
        .collect();
    for r in &mut replicas {
        r.wait_ready().await;
    }
    let mut streams = Vec::new();
    for r in &replicas[1..] {
        let mut stream = r
            .client()
            .await
            .watch_token(proto::WatchTokenRequest {
                account: account.clone(),
            })
            .await?
            .into_inner();
        stream.message().await?.context("first watch message")?;
        streams.push(stream);
    }
    let mut r1 = replicas[0].client().await;
    let before = commands(&redis);
    let (mut reached, mut answered) = (Vec::new(), Vec::new());
    for _ in 0..opts.propagations {
        // Past the 1 ms invalidation cooldown of the last round (a round can be shorter).
        tokio::time::sleep(Duration::from_millis(3)).await;
        let current = r1
            .get_token(proto::GetTokenRequest {
                account: account.clone(),
                min_validity: None,
            })
            .await?
            .into_inner()
            .token
            .context("token")?
            .access_token;
        let started = Instant::now();
        let answer = r1
            .invalidate(proto::InvalidateRequest {
                account: account.clone(),
                access_token: current,
            })
            .await?
            .into_inner();
        ensure!(
            answer.outcome == proto::InvalidateOutcome::Invalidated as i32,
            "round {}: Invalidate answered {:?}",
            answered.len(),
            answer.outcome
        );
        let new = answer.token.context("token")?.access_token;
        answered.push(started.elapsed());
        let mut last = Duration::ZERO;
        for stream in &mut streams {
            loop {
                let message = tokio::time::timeout(Duration::from_secs(30), stream.message())
                    .await
                    .with_context(|| {
                        format!(
                            "round {}: a watcher never saw the new token",
                            answered.len()
                        )
                    })??
                    .context("watch ended")?;
                if message.token.is_some_and(|t| t.access_token == new) {
                    break;
                }
            }
            last = last.max(started.elapsed());
        }
        reached.push(last);
    }
    let after = commands(&redis);
    let n = opts.propagations;
    let logins = fake.total_calls();
    ensure!(
        logins == 1 + n as u64,
        "{logins} logins for {n} invalidations"
    );
    drop(streams);
    for r in &mut replicas {
        r.terminate();
    }
    let per_token = (after.values().sum::<u64>() - before.values().sum::<u64>()) as f64 / n as f64;
    let mut by_command: Vec<(String, f64)> = after
        .iter()
        .map(|(c, a)| {
            (
                c.clone(),
                (a - before.get(c).copied().unwrap_or(0)) as f64 / n as f64,
            )
        })
        .filter(|(_, x)| *x > 0.0)
        .collect();
    by_command.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (p50, p99) = quantiles(&mut reached);
    let (a50, a99) = quantiles(&mut answered);
    println!(
        "   propagation p50 {p50:?} p99 {p99:?}; Invalidate p50 {a50:?}; {per_token:.1} Redis commands per new token"
    );
    let _ = writeln!(
        md,
        "Three replicas (release build, one account), {n} rounds of: Invalidate on r1 (a login at the fake \
         BACE, the write, the announcement), until the new token arrived on the WatchToken streams of r2 and r3.\n"
    );
    let _ = writeln!(md, "| | p50 | p99 |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| Invalidate on r1 → new token on both other replicas' watchers | {} | {} |",
        ms(p50),
        ms(p99)
    );
    let _ = writeln!(
        md,
        "| Invalidate on r1 answered (the login and the write included) | {} | {} |\n",
        ms(a50),
        ms(a99)
    );
    let _ = writeln!(
        md,
        "Redis commands per new token, all three replicas together: **{per_token:.1}** ({}); BACE calls: {logins} (one per new token).\n",
        by_command
            .iter()
            .map(|(c, x)| format!("{c} {x:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    fake.shutdown();
    Ok(())
}

/// A cold start of many accounts, then the same replica restarted warm from Redis.
async fn restart(opts: &Opts, md: &mut String) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let m = opts.restart_accounts;
    let names = account_names(m);
    let fake = start_fake(&names).await?;
    let config = broker_config(&fake, &names).store(store_config(opts, &redis)?);
    let dir = opts.work.join("restart");
    std::fs::create_dir_all(&dir)?;
    let memory_before = used_memory(&redis);
    let started = Instant::now();
    let mut replica = Replica::start_logging(&opts.broker_bin, &dir, "restart", &config, "warn");
    replica.wait_ready().await;
    let cold = started.elapsed();
    let cold_calls = fake.total_calls();
    let bytes = (used_memory(&redis) - memory_before) as f64 / m as f64;
    replica.terminate();
    let before = commands(&redis);
    let started = Instant::now();
    replica.restart();
    replica.wait_ready().await;
    let warm = started.elapsed();
    let warm_calls = fake.total_calls() - cold_calls;
    let after = commands(&redis);
    replica.terminate();
    let warm_commands =
        (after.values().sum::<u64>() - before.values().sum::<u64>()) as f64 / m as f64;
    println!(
        "   {m} accounts: cold {cold:?} ({cold_calls} calls), warm {warm:?} ({warm_calls} calls)"
    );
    let _ = writeln!(
        md,
        "One replica with {m} accounts (release build), started on an empty Redis, stopped (SIGTERM) and started again. \
         Time from the process start to readiness (warm-up done), measured by polling the readiness service.\n"
    );
    let _ = writeln!(
        md,
        "| Start | Time to ready | Calls to BACE |\n|---|---|---|\n| Cold (empty Redis) | {:.2} s | {cold_calls} |\n| Warm (from Redis) | {:.2} s | **{warm_calls}** (target 0) |\n",
        cold.as_secs_f64(),
        warm.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "Redis per account: {bytes:.0} bytes of `used_memory` (one record, 40-byte tokens); a warm start reads it with \
         {warm_commands:.3} commands per account (pipelined `HMGET`s, 256 a round trip, plus the subscription's and \
         the reconcile's).\n"
    );
    fake.shutdown();
    Ok(())
}

/// `INFO commandstats`: calls by command.
fn commands(redis: &RedisServer) -> HashMap<String, u64> {
    let info: String = redis.cmd(&["INFO", "commandstats"]);
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            // The bench's own INFO calls are not the broker's.
            if name == "info" {
                return None;
            }
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// `used_memory` of `INFO memory`.
fn used_memory(redis: &RedisServer) -> i64 {
    let info: String = redis.cmd(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
        .unwrap_or(0)
}

fn quantiles(v: &mut [Duration]) -> (Duration, Duration) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (at(0.5), at(0.99))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
