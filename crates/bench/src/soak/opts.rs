//! The soak's command line.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};

pub(crate) struct Opts {
    /// Length of the chaos phase.
    pub(crate) chaos: Duration,
    pub(crate) seed: u64,
    pub(crate) accounts: usize,
    pub(crate) callers: usize,
    pub(crate) watchers: usize,
    /// Accounts removed and added by each reload.
    pub(crate) churn: usize,
    pub(crate) broker_bin: PathBuf,
    pub(crate) fake_bin: PathBuf,
    pub(crate) work: PathBuf,
}

pub(crate) const USAGE: &str = "usage: soak [MINUTES] [--seed N] [--accounts N] [--callers N] \
[--watchers N] [--churn N] [--broker-bin FILE] [--fake-bin FILE] [--work DIR]";

impl Opts {
    pub(crate) fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut opts = Opts {
            chaos: Duration::from_secs(60),
            seed: 1,
            accounts: 1000,
            callers: 200,
            watchers: 20,
            churn: 50,
            broker_bin: "target/release/bace-token-broker".into(),
            fake_bin: "target/release/fake-bace".into(),
            work: "target/soak-work".into(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .with_context(|| format!("{arg} needs a value\n{USAGE}"))
            };
            match arg.as_str() {
                "--seed" => opts.seed = value()?.parse()?,
                "--accounts" => opts.accounts = value()?.parse()?,
                "--callers" => opts.callers = value()?.parse()?,
                "--watchers" => opts.watchers = value()?.parse()?,
                "--churn" => opts.churn = value()?.parse()?,
                "--broker-bin" => opts.broker_bin = value()?.into(),
                "--fake-bin" => opts.fake_bin = value()?.into(),
                "--work" => opts.work = value()?.into(),
                "-h" | "--help" => bail!("{USAGE}"),
                minutes if !minutes.starts_with('-') => {
                    let m: f64 = minutes
                        .parse()
                        .with_context(|| format!("MINUTES: {minutes:?}\n{USAGE}"))?;
                    if !(m > 0.0 && m <= 24.0 * 60.0) {
                        bail!("MINUTES must be in (0, 1440]");
                    }
                    opts.chaos = Duration::from_secs_f64(m * 60.0);
                }
                other => bail!("unknown option {other}\n{USAGE}"),
            }
        }
        Ok(opts)
    }

    /// Reloads during the chaos phase: one a minute, the first 30 s in (so a one-minute run
    /// has one).
    pub(crate) fn reloads(&self) -> usize {
        let secs = self.chaos.as_secs();
        if secs <= 30 {
            0
        } else {
            ((secs - 31) / 60 + 1) as usize
        }
    }

    /// When reload `k` (from 0) happens, from the start of the chaos phase.
    pub(crate) fn reload_at(k: usize) -> Duration {
        Duration::from_secs(30 + 60 * k as u64)
    }

    /// The start of the window in which memory and descriptors must be flat: after the first
    /// minute of chaos, or after the first third of a shorter run.
    pub(crate) fn settle(&self) -> Duration {
        (self.chaos / 3).min(Duration::from_secs(60))
    }
}
