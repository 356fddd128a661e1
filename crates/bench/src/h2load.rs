//! h2load runs against the broker: the command (pinned to the load CPU), its summary and
//! latency log parsed, the broker's CPU time and the noise on its CPU measured around it;
//! medians over rounds.

use std::{collections::BTreeMap, fs, process::Command, time::Instant};

use anyhow::{Context, ensure};

use crate::{
    BROKER_CPU, LOAD_CPU,
    broker::BrokerProc,
    opts::Opts,
    util::{cpu_busy_ticks, strs},
};

/// The load arguments of one h2load run (connections, streams, duration, body, URL).
#[derive(Clone)]
pub(crate) struct H2Args {
    pub(crate) args: Vec<String>,
}

pub(crate) struct H2Run {
    pub(crate) command: String,
    pub(crate) rps: f64,
    done: u64,
    data_bytes: u64,
    pub(crate) p50: u64,
    pub(crate) p99: u64,
    p999: u64,
    pub(crate) max: u64,
    /// Broker CPU time per request (µs).
    cpu_us: f64,
    /// Share of CPU 0 used by processes other than the broker during the run (%).
    pub(crate) others_pct: f64,
    /// The broker's CPU use during the run (% of one CPU): ~100 when the server is the
    /// bottleneck.
    pub(crate) broker_pct: f64,
}

impl H2Run {
    /// Every response carried one message of `frame` bytes (exactly, or on average within a few
    /// bytes when the token's expiry changes during the run).
    pub(crate) fn check_data(&self, frame: u64, exact: bool) -> anyhow::Result<()> {
        if exact {
            ensure!(
                self.data_bytes == self.done * frame,
                "{} responses carried {} DATA bytes, expected {} × {frame}: some calls failed",
                self.done,
                self.data_bytes,
                self.done
            );
        } else {
            let avg = self.data_bytes as f64 / self.done.max(1) as f64;
            ensure!(
                (avg - frame as f64).abs() <= 6.0,
                "average response {avg:.1} bytes, expected about {frame}: some calls failed"
            );
        }
        Ok(())
    }
}

/// Runs h2load (`name` names its logs in the work directory) and checks that every request
/// succeeded.
pub(crate) async fn h2load(
    opts: &Opts,
    name: &str,
    args: H2Args,
    broker: &BrokerProc,
) -> anyhow::Result<H2Run> {
    let log = opts.work.join(format!("h2load-{name}.tsv"));
    let mut argv = strs(&["-c", LOAD_CPU, "h2load"]);
    argv.extend(args.args);
    argv.extend(strs(&[
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]));
    let command = format!(
        "taskset {}",
        argv.iter()
            .map(|a| if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.clone()
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
    argv.push(format!("--log-file={}", log.display()));
    let (cpu0, busy0, t0) = (
        broker.cpu_ticks()?,
        cpu_busy_ticks(BROKER_CPU)?,
        Instant::now(),
    );
    let output =
        tokio::task::spawn_blocking(move || Command::new("taskset").args(&argv).output()).await??;
    let (cpu1, busy1, elapsed) = (
        broker.cpu_ticks()?,
        cpu_busy_ticks(BROKER_CPU)?,
        t0.elapsed().as_secs_f64(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    fs::write(opts.work.join(format!("h2load-{name}.out")), &stdout)?;
    ensure!(
        output.status.success(),
        "h2load failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats = parse_h2load(&stdout).with_context(|| format!("h2load output:\n{stdout}"))?;
    ensure!(
        stats.done > 0
            && stats.succeeded == stats.done
            && stats.status_2xx == stats.done
            && stats.failed + stats.errored + stats.timeout == 0,
        "h2load {name}: not every request succeeded:\n{stdout}"
    );
    let mut lat: Vec<u64> = fs::read_to_string(&log)?
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    ensure!(!lat.is_empty(), "empty h2load log {}", log.display());
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    Ok(H2Run {
        command,
        rps: stats.rps,
        done: stats.done,
        data_bytes: stats.data_bytes,
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        max: *lat.last().unwrap_or(&0),
        cpu_us: (cpu1 - cpu0) as f64 * 10_000.0 / stats.done as f64,
        others_pct: (busy1 - busy0).saturating_sub(cpu1 - cpu0) as f64 / elapsed,
        broker_pct: (cpu1 - cpu0) as f64 / elapsed,
    })
}

#[derive(Default, Debug)]
struct H2Stats {
    rps: f64,
    done: u64,
    succeeded: u64,
    failed: u64,
    errored: u64,
    timeout: u64,
    status_2xx: u64,
    data_bytes: u64,
}

/// Parses h2load's summary:
///
/// ```text
/// finished in 5.00s, 61234.40 req/s, 9.10MB/s
/// requests: 306172 total, 306428 started, 306172 done, 306172 succeeded, 0 failed, 0 errored, 0 timeout
/// status codes: 306172 2xx, 0 3xx, 0 4xx, 0 5xx
/// traffic: 45.58MB (47792474) total, 1.17MB (1224688) headers (space savings 96.02%), 40.30MB (42255736) data
/// ```
fn parse_h2load(out: &str) -> anyhow::Result<H2Stats> {
    let mut s = H2Stats::default();
    let counts = |line: &str| -> BTreeMap<String, u64> {
        line.split(',')
            .filter_map(|part| {
                let mut w = part.split_whitespace();
                let n = w.next()?.parse().ok()?;
                Some((w.next()?.to_owned(), n))
            })
            .collect()
    };
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            s.rps = rest
                .split(',')
                .nth(1)
                .and_then(|p| p.trim().strip_suffix(" req/s"))
                .context("req/s")?
                .parse()?;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            let c = counts(rest);
            let get = |k: &str| c.get(k).copied().context(format!("requests: {k}"));
            s.done = get("done")?;
            s.succeeded = get("succeeded")?;
            s.failed = get("failed")?;
            s.errored = get("errored")?;
            s.timeout = get("timeout")?;
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            s.status_2xx = counts(rest).get("2xx").copied().context("2xx")?;
        } else if let Some(rest) = line.strip_prefix("traffic: ") {
            let data = rest.rsplit(',').next().context("traffic data")?;
            s.data_bytes = data
                .split_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .context("traffic data bytes")?
                .0
                .parse()?;
        }
    }
    ensure!(s.done > 0, "no summary found");
    Ok(s)
}

/// Medians over rounds.
pub(crate) struct Summary {
    pub(crate) rps: f64,
    pub(crate) per_round: String,
    pub(crate) p50: u64,
    pub(crate) p99: u64,
    pub(crate) p999: u64,
    pub(crate) cpu_us: f64,
}

impl Summary {
    pub(crate) fn of(runs: &[H2Run]) -> Self {
        fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            v[v.len() / 2]
        }
        Self {
            rps: median(runs.iter().map(|r| r.rps).collect()),
            per_round: runs
                .iter()
                .map(|r| format!("{:.0}", r.rps))
                .collect::<Vec<_>>()
                .join(" / "),
            p50: median(runs.iter().map(|r| r.p50).collect()),
            p99: median(runs.iter().map(|r| r.p99).collect()),
            p999: median(runs.iter().map(|r| r.p999).collect()),
            cpu_us: median(runs.iter().map(|r| r.cpu_us).collect()),
        }
    }
}

/// The per-round share of CPU 0 (the broker's) used by other processes: the noise indicator.
pub(crate) fn others(runs: &[H2Run]) -> String {
    runs.iter()
        .map(|r| format!("{:.0}%", r.others_pct))
        .collect::<Vec<_>>()
        .join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_summary() {
        let out = "\
starting benchmark...
finished in 5.00s, 61234.40 req/s, 9.10MB/s
requests: 306172 total, 306428 started, 306172 done, 306172 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 306172 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 45.58MB (47792474) total, 1.17MB (1224688) headers (space savings 96.02%), 40.30MB (42255736) data
";
        let s = parse_h2load(out).unwrap();
        assert_eq!(s.rps, 61234.40);
        assert_eq!(
            (s.done, s.succeeded, s.status_2xx),
            (306172, 306172, 306172)
        );
        assert_eq!((s.failed, s.errored, s.timeout), (0, 0, 0));
        assert_eq!(s.data_bytes, 42255736);
    }

    #[test]
    fn rejects_output_without_a_summary() {
        assert!(parse_h2load("h2load: connection refused\n").is_err());
    }
}
