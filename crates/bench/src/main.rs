//! `grpc-load`: the over-the-wire benchmark harness of bace-token-broker: gRPC throughput and
//! latency (h2load), the same for secured callers (TLS with service-account tokens or client
//! certificates), memory with 100,000 accounts, and single flight under load. Run it through
//! `scripts/bench`, which builds the release broker and the memory probe first and adds the
//! criterion cache-hit figures; directly:
//!
//! ```text
//! cargo build --release --bins
//! cargo build --release -p bench --example memory_probe
//! cargo run --release -p bench --bin grpc-load -- [--only cache,A,S,B,C] [--rounds N] [--secs N]
//!     [--memory-accounts N] [--cache-hit-log FILE] [--out FILE] [--broker-bin FILE] [--work DIR]
//! ```
//!
//! Layout: this process is the harness. It pins itself to CPU 1, runs the fake BACE
//! ([`fake_bace::FakeBace`]) in-process, writes broker configs ([`testkit::BrokerConfig`]),
//! starts `target/release/bace-token-broker serve` as a child pinned to CPU 0 (`taskset -c 0`)
//! and drives it with `h2load` pinned to CPU 1 and with tonic clients. Every figure comes with
//! the command that produced it; the summary is printed and written to
//! `target/bench-summary.md`.
//!
//! Modules: `opts` (the command line), `broker` (the broker child process), `h2load` (h2load
//! runs and their parsing), `wire` (gRPC paths and request bodies), `fixtures` (the fake's
//! accounts and the broker configs), `sections` (one module per section of the summary),
//! `summary` (the markdown document around the sections), `util` (small helpers).

use std::{fs, process::Command};

use anyhow::ensure;

mod broker;
mod fixtures;
mod h2load;
mod opts;
mod sections;
mod summary;
mod util;
mod wire;

use crate::{opts::Opts, util::run_quiet};

/// CPU of the broker; the harness, the fake and h2load share the other.
const BROKER_CPU: &str = "0";
const LOAD_CPU: &str = "1";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = Opts::parse(&args)?;
    ensure!(
        opts.broker_bin.exists(),
        "{} not found: run `cargo build --release --bins` first",
        opts.broker_bin.display()
    );
    for tool in ["h2load", "taskset"] {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} not found (apt-get install nghttp2-client util-linux)"
        );
    }
    // Pin this process (and so the runtime threads created below) to the load CPU.
    run_quiet(Command::new("taskset").args([
        "-p",
        "-c",
        LOAD_CPU,
        &std::process::id().to_string(),
    ]))?;
    let _ = fs::remove_dir_all(&opts.work);
    fs::create_dir_all(&opts.work)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let summary = runtime.block_on(summary::run(&opts))?;
    if let Some(dir) = opts.out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&opts.out, &summary)?;
    println!("\n{summary}");
    println!("(written to {})", opts.out.display());
    Ok(())
}
