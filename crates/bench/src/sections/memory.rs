//! B. Memory: the broker's resident size with 1 and N (100,000) accounts all holding tokens,
//! 1 s after ready and after a trickle of calls; the peak of a live reload and of parsing the
//! config alone; the live heap per account by stage (the memory probe,
//! crates/bench/examples/memory_probe.rs).

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use bace_token_broker::READINESS_SERVICE;

use crate::{
    BROKER_CPU,
    broker::{BrokerProc, Memory},
    fixtures::{account_names, broker_config, start_fake, write_config},
    opts::Opts,
    util::mb,
    wire::get_request,
};

/// How long the memory section trickles GetToken calls before the settled reading.
const SETTLE: Duration = Duration::from_secs(12);

struct MemoryRow {
    accounts: usize,
    ready: Memory,
    settled: Memory,
    /// After a SIGHUP reload of the unchanged file (peak counter reset just before).
    reload: anyhow::Result<Memory>,
    ready_after: Duration,
    logins: u64,
    sampled: usize,
    config_bytes: u64,
    parse_peak_kb: Option<u64>,
}

pub(crate) async fn run(opts: &Opts, md: &mut String) -> anyhow::Result<()> {
    println!("== B. Memory");
    let mut rows = Vec::new();
    for n in [1usize, opts.memory_accounts] {
        println!("   {n} account(s)...");
        let names = account_names(n);
        let fake = start_fake(&names).await?;
        let config = write_config(
            opts,
            &format!("memory-{n}"),
            &broker_config(&fake, &names).warmup_concurrency(64),
        )?;
        let config_bytes = fs::metadata(&config)?.len();
        let parse_peak_kb = config_parse_peak(opts, &config);
        let t0 = Instant::now();
        let broker = BrokerProc::spawn(opts, &format!("memory-{n}"), &config)?;
        broker.wait_ready(Duration::from_secs(300)).await?;
        let ready_after = t0.elapsed();
        // Every account holds a token: one password grant each...
        let logins: u64 = fake.total_calls();
        ensure!(
            logins >= n as u64,
            "{n} accounts but only {logins} upstream calls"
        );
        // ...and sampled GetToken calls are served from the cache (no new upstream call).
        let client = broker.client().await?;
        let sample: Vec<&String> = (0..n.min(1000)).map(|i| &names[(i * 7919) % n]).collect();
        let mut calls = tokio::task::JoinSet::new();
        for name in &sample {
            let mut c = client.clone();
            let name = (*name).clone();
            calls.spawn(async move { c.get_token(get_request(&name)).await });
        }
        while let Some(r) = calls.join_next().await {
            r?.context("sampled GetToken")?;
        }
        ensure!(
            fake.total_calls() == logins,
            "sampled GetToken calls reached BACE"
        );
        // Let the allocator settle, then read the resident size.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ready_mem = broker.memory()?;
        // Then a trickle of GetToken calls, as a broker in service sees: the allocator
        // returns the pages the start freed (jemalloc purges with a 10 s decay, driven by
        // allocation activity; an idle process keeps them).
        let trickle_until = Instant::now() + SETTLE;
        let mut trickled = 0usize;
        while Instant::now() < trickle_until {
            let name = &names[(trickled * 104_729) % n];
            client.clone().get_token(get_request(name)).await?;
            trickled += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let settled = broker.memory()?;
        ensure!(
            fake.total_calls() == logins,
            "trickled GetToken calls reached BACE"
        );
        // A live reload parses the whole file again while the accounts are held: its peak,
        // from a reset peak counter (`clear_refs` 5), is what a memory limit must allow.
        let reload = broker.reload_peak().await;
        broker.stop()?;
        fake.shutdown();
        rows.push(MemoryRow {
            accounts: n,
            ready: ready_mem,
            settled,
            reload,
            ready_after,
            logins,
            sampled: sample.len(),
            config_bytes,
            parse_peak_kb,
        });
    }
    let (base, big) = (&rows[0], &rows[1]);
    let n = big.accounts;
    let per_account =
        |f: fn(&MemoryRow) -> u64| (f(big) as f64 - f(base) as f64) * 1024.0 / n as f64;
    let at_ready = per_account(|r| r.ready.rss_kb);
    let at_settled = per_account(|r| r.settled.rss_kb);
    let _ = writeln!(md, "## B. Memory (VmRSS of the broker process)\n");
    let _ = writeln!(
        md,
        "| Accounts | VmRSS, 1 s after ready | VmRSS, settled ({} s of GetToken trickle) | VmHWM (peak) at start | peak during a live reload (SIGHUP) | `check-config` alone, peak RSS | start → ready | upstream logins | GetToken sampled (cached) | config file |\n|---|---|---|---|---|---|---|---|---|---|",
        SETTLE.as_secs()
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} | {} | {:.1} s | {} | {} OK | {:.1} MB |",
            r.accounts,
            mb(r.ready.rss_kb),
            mb(r.settled.rss_kb),
            mb(r.settled.hwm_kb.max(r.ready.hwm_kb)),
            match &r.reload {
                Ok(m) => format!("{:.1} MiB", mb(m.hwm_kb)),
                Err(e) => format!("n/a ({e})"),
            },
            r.parse_peak_kb.map_or("n/a".to_owned(), |k| format!(
                "{:.1} MiB",
                k as f64 / 1024.0
            )),
            r.ready_after.as_secs_f64(),
            r.logins,
            r.sampled,
            r.config_bytes as f64 / 1e6
        );
    }
    let _ = writeln!(
        md,
        "\n**{n} accounts: {:.1} MiB resident 1 s after ready** (target < 100 MB; 1 MiB = 1.048 MB{}); \
         **{at_ready:.0} bytes per account** = (RSS₁₀₀ₖ − RSS₁) / {n}. Settled: {:.1} MiB, {at_settled:.0} bytes per account. \
         A live reload parses the whole config again while the accounts are held: its peak is the one to size a memory limit for.\n",
        mb(big.ready.rss_kb),
        if mb(big.ready.rss_kb) * 1.048_576 < 100.0 {
            " ✓"
        } else {
            " ✗"
        },
        mb(big.settled.rss_kb),
    );
    let _ = writeln!(
        md,
        "Command: `taskset -c {BROKER_CPU} {} serve --config {}/config/memory-N.yaml --listen 127.0.0.1:PORT` \
         (warmup_concurrency 64), ready = health `{READINESS_SERVICE}` SERVING, then `grep -E 'VmRSS|VmHWM' /proc/PID/status`. \
         Parse alone: `/usr/bin/time -f %M {} check-config --config memory-N.yaml`.\n",
        opts.broker_bin.display(),
        opts.work.display(),
        opts.broker_bin.display()
    );
    match memory_probe(opts, n) {
        Ok(probe) => {
            let _ = writeln!(
                md,
                "Live heap per account, by stage (bytes requested from the allocator, no size classes or fragmentation; \
                 `cargo run --release -p bench --example memory_probe {n}`):\n```\n{}```\n",
                probe
            );
        }
        Err(e) => println!("   memory probe skipped: {e:#}"),
    }
    Ok(())
}

/// Runs the memory probe (`cargo build --release -p bench --example memory_probe`, next to the
/// broker in `target/release/examples/`) for `accounts` and returns its report.
fn memory_probe(opts: &Opts, accounts: usize) -> anyhow::Result<String> {
    let bin = opts
        .broker_bin
        .parent()
        .context("broker binary directory")?
        .join("examples/memory_probe");
    let out = Command::new(&bin)
        .arg(accounts.to_string())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(out.status.success(), "{} failed", bin.display());
    Ok(String::from_utf8(out.stdout)?)
}

/// Peak resident size (kB) of `bace-token-broker check-config` on `config`: what loading
/// the YAML alone costs. `None` without GNU time (`/usr/bin/time`).
fn config_parse_peak(opts: &Opts, config: &Path) -> Option<u64> {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "maxrss=%M"])
        .arg(&opts.broker_bin)
        .args(["check-config", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("maxrss="))?
        .trim()
        .parse()
        .ok()
}
