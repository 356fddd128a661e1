//! Small helpers: argument lists, units, marks, `/proc/stat`, quiet commands.

use std::{fs, process::Command};

use anyhow::{Context, ensure};

pub(crate) fn strs(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

pub(crate) fn us(micros: u64) -> String {
    if micros >= 10_000 {
        format!("{:.1} ms", micros as f64 / 1000.0)
    } else {
        format!("{micros} µs")
    }
}

pub(crate) fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

pub(crate) fn mark(ok: bool) -> &'static str {
    if ok { " ✓" } else { " ✗" }
}

/// Busy (non-idle) time of one CPU so far, in clock ticks (1/100 s), from `/proc/stat`.
pub(crate) fn cpu_busy_ticks(cpu: &str) -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| {
            l.strip_prefix("cpu")
                .and_then(|r| r.split_whitespace().next())
                == Some(cpu)
        })
        .context("cpu line in /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    ensure!(f.len() >= 8, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    Ok(f[0] + f[1] + f[2] + f[5] + f[6] + f[7])
}

pub(crate) fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
