//! Live heap per account at each stage of a broker's start: config parse, `Broker::new`, the
//! config's accounts dropped, warm-up (every account holding a token).
//!
//! `cargo run --release -p bench --example memory_probe [ACCOUNTS]` (default 100,000). Counts
//! the bytes requested from the allocator on one thread (a current-thread runtime; the upstream
//! is an in-process [`InstantUpstream`] that mints 40-character tokens like BACE's), so the
//! figures exclude allocator size classes and fragmentation: `scripts/bench --only B` measures
//! the resident size of the real server (and runs this probe for its summary). The accounts are
//! those of the harness (`acct-N`, see crates/bench/src/fixtures.rs).
use std::{sync::Arc, time::Duration};

use bace_token_broker::{Broker, Config};
use testkit::{Account, BrokerConfig, InstantUpstream};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |s| s.parse().unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let yaml = (0..n)
        .fold(
            BrokerConfig::new().token_url("http://127.0.0.1:1/oauth2/token"),
            |config, i| {
                let name = format!("acct-{i}");
                config.account(Account::new(
                    &name,
                    "cid",
                    "csecret",
                    format!("{name}@example.com"),
                    format!("pw-{name}"),
                ))
            },
        )
        .to_yaml();
    let per = |b: i64| b as f64 / n as f64;
    let mut total = 0i64;
    let mut line = |stage: &str, bytes: i64, extra: String| {
        total += bytes;
        println!("{stage:<36} {:>+6.0} B/account{extra}", per(bytes));
    };
    let mut config = None;
    let m = allocation_counter::measure(|| config = Some(Config::parse(&yaml).unwrap()));
    let mut config = config.unwrap();
    line(
        "config parsed",
        m.bytes_current,
        format!(" (peak during the parse: {:.0})", per(m.bytes_max as i64)),
    );
    let mut made = None;
    let m = allocation_counter::measure(|| {
        made = Some(Broker::new(&config, Arc::new(InstantUpstream)));
    });
    let (broker, refresher) = made.unwrap();
    line("Broker::new (slots)", m.bytes_current, String::new());
    let m = allocation_counter::measure(|| config.accounts.clear());
    line("config's accounts dropped", m.bytes_current, String::new());
    let m = allocation_counter::measure(|| {
        rt.block_on(async {
            tokio::spawn(refresher.run());
            let w = broker.warm_up().await;
            assert_eq!(w.ready, n);
            tokio::time::sleep(Duration::from_millis(100)).await;
        })
    });
    line(
        "warm-up (every account has a token)",
        m.bytes_current,
        String::new(),
    );
    println!("{:<36} {:>6.0} B/account live", "total", per(total));
    std::mem::forget((config, broker));
}
