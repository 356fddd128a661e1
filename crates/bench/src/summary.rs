//! The markdown summary: the machine, the sections asked for (in order), the harness's time.

use std::{fmt::Write as _, fs, time::Instant};

use crate::{BROKER_CPU, LOAD_CPU, opts::Opts, sections};

/// Runs the sections `opts` asks for and returns the summary.
pub(crate) async fn run(opts: &Opts) -> anyhow::Result<String> {
    let started = Instant::now();
    let mut md = String::new();
    let _ = writeln!(md, "# bace-token-broker benchmark summary\n");
    let _ = writeln!(
        md,
        "Machine: {} CPU(s), {}; broker pinned to CPU {BROKER_CPU}, h2load + harness + fake BACE to CPU {LOAD_CPU}. \
         Broker: `{}` (release). Ratios are against baselines measured in the same run.\n",
        fs::read_to_string("/proc/cpuinfo").map_or(0, |c| c
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count()),
        cpu_model(),
        opts.broker_bin.display()
    );
    let mut get_token_rps = None;
    let mut plain_ratio = None;
    if opts.wants("cache") {
        sections::cache_hit::write(opts, &mut md)?;
    }
    if opts.wants("A") {
        let (rps, ratio) = sections::throughput::run(opts, &mut md).await?;
        get_token_rps = Some(rps);
        plain_ratio = Some(ratio);
    }
    if opts.wants("S") {
        sections::secured::run(opts, &mut md, plain_ratio).await?;
    }
    if opts.wants("B") {
        sections::memory::run(opts, &mut md).await?;
    }
    if opts.wants("C") {
        sections::single_flight::run(opts, &mut md).await?;
        sections::refresh_latency::run(opts, &mut md, get_token_rps).await?;
    }
    if opts.wants("R") {
        sections::replicas::run(opts, &mut md).await?;
    }
    let _ = writeln!(
        md,
        "\nHarness time: {:.0} s. Raw logs (broker, h2load): `{}`.",
        started.elapsed().as_secs_f64(),
        opts.work.display()
    );
    Ok(md)
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
