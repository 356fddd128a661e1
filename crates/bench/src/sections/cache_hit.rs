//! In-process cache hit: the criterion bench `cache_hit` (crates/bench/benches/cache_hit.rs),
//! run by `scripts/bench` before this harness; its medians and its allocation line.

use std::{fmt::Write as _, fs, path::Path};

use crate::opts::Opts;

pub(crate) fn write(opts: &Opts, md: &mut String) -> anyhow::Result<()> {
    let _ = writeln!(md, "## In-process cache hit (criterion)\n");
    let allocs = opts
        .cache_hit_log
        .as_ref()
        .and_then(|p| fs::read_to_string(p).ok())
        .and_then(|log| {
            log.lines()
                .find(|l| l.starts_with("allocations per call:"))
                .map(str::to_owned)
        });
    let criterion = opts
        .work
        .parent()
        .unwrap_or(Path::new("."))
        .join("criterion");
    let _ = writeln!(md, "| Benchmark | Median | Target |\n|---|---|---|");
    for name in ["get_token", "get_token_and_response"] {
        let file = criterion
            .join("cache_hit")
            .join(name)
            .join("new/estimates.json");
        let median = fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["median"]["point_estimate"].as_f64());
        let shown = median.map_or("(not run)".into(), |ns| format!("{ns:.1} ns"));
        let ok = median.map_or("", |ns| if ns <= 1000.0 { " ✓" } else { " ✗" });
        let _ = writeln!(md, "| `cache_hit/{name}` | {shown} | ≤ 1 µs{ok} |");
    }
    let _ = writeln!(
        md,
        "\n{}\n\nCommand: `cargo bench -p bench --bench cache_hit` (medians from `target/criterion/cache_hit/*/new/estimates.json`).\n",
        allocs.map_or(
            "Allocations: (cache_hit log not found)".into(),
            |a| format!("Allocations ({a}).")
        )
    );
    Ok(())
}
