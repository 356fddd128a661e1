//! The command line of the harness.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

pub(crate) struct Opts {
    pub(crate) broker_bin: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) out: PathBuf,
    pub(crate) cache_hit_log: Option<PathBuf>,
    pub(crate) only: String,
    /// Interleaved rounds per measured pair.
    pub(crate) rounds: usize,
    /// Seconds measured per h2load run.
    pub(crate) secs: u32,
    pub(crate) memory_accounts: usize,
    pub(crate) flight_callers: usize,
    pub(crate) flight_accounts: usize,
    /// Section A with the Redis store on (a private redis-server).
    pub(crate) store: bool,
    /// With `store`: Redis stopped once the broker is ready (measured while it is down).
    pub(crate) store_down: bool,
    /// Accounts of the warm-restart measurement (section R).
    pub(crate) restart_accounts: usize,
    /// Invalidations of the propagation measurement (section R).
    pub(crate) propagations: usize,
}

impl Opts {
    /// Defaults: the workspace's target directory (`CARGO_TARGET_DIR` when set) holds the
    /// release broker, the work directory `bench-work/` and the summary `bench-summary.md`.
    pub(crate) fn parse(args: &[String]) -> anyhow::Result<Self> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        let mut opts = Opts {
            broker_bin: target.join("release/bace-token-broker"),
            work: target.join("bench-work"),
            out: target.join("bench-summary.md"),
            cache_hit_log: None,
            only: "cache,A,S,B,C,R".into(),
            rounds: 24,
            secs: 3,
            memory_accounts: 100_000,
            flight_callers: 10_000,
            flight_accounts: 1_000,
            store: false,
            store_down: false,
            restart_accounts: 10_000,
            propagations: 200,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().cloned().context(format!("{arg} needs a value"));
            match arg.as_str() {
                "--broker-bin" => opts.broker_bin = value()?.into(),
                "--work" => opts.work = value()?.into(),
                "--out" => opts.out = value()?.into(),
                "--cache-hit-log" => opts.cache_hit_log = Some(value()?.into()),
                "--only" => opts.only = value()?,
                "--rounds" => opts.rounds = value()?.parse()?,
                "--secs" => opts.secs = value()?.parse()?,
                "--memory-accounts" => opts.memory_accounts = value()?.parse()?,
                "--store" => opts.store = true,
                "--store-down" => {
                    opts.store = true;
                    opts.store_down = true;
                }
                "--restart-accounts" => opts.restart_accounts = value()?.parse()?,
                "--propagations" => opts.propagations = value()?.parse()?,
                other => bail!("unknown argument {other:?}"),
            }
        }
        Ok(opts)
    }

    pub(crate) fn wants(&self, section: &str) -> bool {
        self.only.split(',').any(|s| s.trim() == section)
    }
}

/// The workspace root: this crate lives in `crates/bench`.
fn workspace_root() -> &'static Path {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.ancestors().nth(2).unwrap_or(manifest)
}
