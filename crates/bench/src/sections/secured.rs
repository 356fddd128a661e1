//! S. Secured callers: GetToken with a Kubernetes service-account token, and GetToken over
//! mTLS, each against Health/Check on the same TLS listener (ABBA rounds, every answer checked).
//!
//! - Service-account token: h2load over `https://` with `authorization: Bearer <jwt>` (Health
//!   needs no identity; the header is sent to both, so both pay for carrying it).
//! - mTLS: h2load cannot present a client certificate, so a closed loop of tonic clients in the
//!   harness (CPU 1) drives both RPCs over mTLS connections. It may not saturate the broker:
//!   the table shows the broker's CPU use, and the figure to compare is the broker's CPU per
//!   call, which does not depend on saturation.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use bace_token_broker::proto::token_broker_service_client::TokenBrokerServiceClient;
use testkit::{
    Jwks, Kubernetes,
    pki::{self, Ca, SigningKey},
};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    LOAD_CPU,
    broker::BrokerProc,
    fixtures::{account_names, broker_config, start_fake, write_config},
    h2load::{H2Args, H2Run, Summary, h2load, others},
    opts::Opts,
    util::strs,
    wire::{Bodies, GET_TOKEN_PATH, HEALTH_PATH, get_request},
};

/// The caller identity of the client certificate.
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/caller";
/// Connections × calls in flight per connection of the tonic loop.
const LOOP_CONNECTIONS: usize = 8;
const LOOP_IN_FLIGHT: usize = 32;

/// Runs section S; `plain_ratio` is section A's GetToken / Health (no TLS, no auth), if run.
pub(crate) async fn run(
    opts: &Opts,
    md: &mut String,
    plain_ratio: Option<f64>,
) -> anyhow::Result<()> {
    println!("== S. Secured callers (TLS listener: service-account token, mTLS)");
    let dir = opts.work.join("secured");
    fs::create_dir_all(&dir)?;
    let write = |name: &str, text: &str| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.join(name);
        fs::write(&path, text)?;
        Ok(path)
    };
    let ca = Ca::new("bench CA");
    let server = ca.server(1);
    let client = ca.client_uri(CLIENT_ID);
    let key = SigningKey::es256("bench-key");
    let jwks = write("jwks.json", &key.jwks())?;
    // A projected token lives an hour by default (`sa_claims`' 10 minutes could end within a
    // long run).
    let mut sa = pki::sa_claims("bench", "caller");
    sa["exp"] = serde_json::json!(pki::now() + 3600);
    let sa_identity = "system:serviceaccount:bench:caller";
    let bearer = key.bearer(&sa);

    let names = account_names(100);
    let fake = start_fake(&names).await?;
    let health_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = broker_config(&fake, &names)
        .tls(
            &write("tls.crt", &server.cert_pem)?,
            &write("tls.key", &server.key_pem)?,
            Some(&write("ca.crt", &ca.pem())?),
        )
        .health_listen(health_addr)
        .metrics_listen(Some(metrics_addr))
        .kubernetes(Kubernetes::new(pki::ISSUER, Jwks::File(jwks)))
        .allow(sa_identity, &["*"])
        .allow(CLIENT_ID, &["*"]);
    let config = write_config(opts, "secured", &config)?;
    let broker = BrokerProc::spawn(opts, "secured", &config)?;
    broker
        .wait_ready_on(health_addr, Duration::from_secs(60))
        .await?;
    let bodies = Bodies::write(opts, &names[0])?;
    let account = names[0].clone();

    // One real call of each kind first: status OK, and the answers' frame sizes.
    let tls = pki::tls_channel(broker.addr, &ca, None).await?;
    let mtls = |n: usize| {
        let (ca, client) = (&ca, &client);
        async move {
            let mut channels = Vec::with_capacity(n);
            for _ in 0..n {
                channels.push(pki::tls_channel(broker.addr, ca, Some(client)).await?);
            }
            anyhow::Ok(channels)
        }
    };
    let get_frame = {
        let mut request = tonic::Request::new(get_request(&account));
        request
            .metadata_mut()
            .insert("authorization", bearer.parse()?);
        let token = TokenBrokerServiceClient::new(tls.clone())
            .get_token(request)
            .await
            .context("GetToken with a service-account token")?
            .into_inner();
        5 + prost::Message::encoded_len(&token) as u64
    };
    let health_frame = {
        let answer = HealthClient::new(tls)
            .check(HealthCheckRequest::default())
            .await
            .context("Health/Check over TLS")?
            .into_inner();
        5 + prost::Message::encoded_len(&answer) as u64
    };
    TokenBrokerServiceClient::new(mtls(1).await?.remove(0))
        .get_token(get_request(&account))
        .await
        .context("GetToken over mTLS")?;

    // Service-account token, h2load over TLS.
    let url = |path: &str| format!("https://127.0.0.1:{}{path}", broker.addr.port());
    let args = |secs: &str, body: &Path, path: &str| H2Args {
        args: strs(&["-c", "8", "-m", "32", "-D", secs, "-H"])
            .into_iter()
            .chain([
                format!("authorization: {bearer}"),
                "-d".into(),
                body.display().to_string(),
                url(path),
            ])
            .collect(),
    };
    h2load(
        opts,
        "secured-warm-health",
        args("1", &bodies.health, HEALTH_PATH),
        &broker,
    )
    .await?;
    h2load(
        opts,
        "secured-warm-get",
        args("1", &bodies.get_token, GET_TOKEN_PATH),
        &broker,
    )
    .await?;
    let secs = opts.secs.to_string();
    let (mut health, mut get) = (Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        for health_turn in [round % 2 == 0, round % 2 == 1] {
            if health_turn {
                let run = h2load(
                    opts,
                    &format!("secured-health-{round}"),
                    args(&secs, &bodies.health, HEALTH_PATH),
                    &broker,
                )
                .await?;
                run.check_data(health_frame, true)?;
                health.push(run);
            } else {
                let run = h2load(
                    opts,
                    &format!("secured-get-{round}"),
                    args(&secs, &bodies.get_token, GET_TOKEN_PATH),
                    &broker,
                )
                .await?;
                run.check_data(get_frame, true)?;
                get.push(run);
            }
        }
        let (h, g) = (&health[round], &get[round]);
        println!(
            "   round {round} (service-account token): Health {:.0} req/s, GetToken {:.0} req/s",
            h.rps, g.rps
        );
    }

    // The token runs were answered from the cache of verified tokens: its counts so far.
    let (hits, misses) = token_cache_counts(metrics_addr)?;

    // mTLS, a tonic closed loop.
    let channels = mtls(LOOP_CONNECTIONS).await?;
    let duration = Duration::from_secs(u64::from(opts.secs));
    loop_run(
        &broker,
        &channels,
        Rpc::Health,
        Duration::from_secs(1),
        &account,
    )
    .await?;
    loop_run(
        &broker,
        &channels,
        Rpc::GetToken,
        Duration::from_secs(1),
        &account,
    )
    .await?;
    let (mut loop_health, mut loop_get) = (Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        for health_turn in [round % 2 == 0, round % 2 == 1] {
            let rpc = if health_turn {
                Rpc::Health
            } else {
                Rpc::GetToken
            };
            let run = loop_run(&broker, &channels, rpc, duration, &account).await?;
            if health_turn {
                loop_health.push(run);
            } else {
                loop_get.push(run);
            }
        }
        let (h, g) = (&loop_health[round], &loop_get[round]);
        println!(
            "   round {round} (mTLS): Health {:.0} req/s, GetToken {:.0} req/s",
            h.rps, g.rps
        );
    }
    broker.stop()?;
    fake.shutdown();

    let (h, g) = (Summary::of(&health), Summary::of(&get));
    let paired = paired_ratio(health.iter().map(|r| r.rps), get.iter().map(|r| r.rps));
    let (lh, lg) = (LoopSummary::of(&loop_health), LoopSummary::of(&loop_get));
    let loop_paired = paired_ratio(
        loop_health.iter().map(|r| r.rps),
        loop_get.iter().map(|r| r.rps),
    );
    let _ = writeln!(
        md,
        "## S. Secured callers on one TLS listener ({} interleaved rounds in ABBA order, median)\n",
        opts.rounds
    );
    let _ = writeln!(
        md,
        "Broker with TLS (client certificates optional), `auth.kubernetes` (a `jwks_file` with one ES256 key) and an allow list; {} accounts. \
         Every answer checked (h2load: all 2xx and DATA bytes = requests × expected frame; tonic loop: every call OK).\n",
        names.len()
    );
    let _ = writeln!(
        md,
        "| Caller | Load | Health/Check req/s | GetToken req/s | **GetToken / Health** (median of per-round ratios) | broker CPU / req, Health / GetToken | broker CPU use | CPU 0 busy with others |\n|---|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| service-account token (`authorization: Bearer`) | h2load -c 8 -m 32 | {:.0} | {:.0} | **{paired:.3}** | {:.1} µs / {:.1} µs ({:.3}) | {} | {} |",
        h.rps,
        g.rps,
        h.cpu_us,
        g.cpu_us,
        h.cpu_us / g.cpu_us,
        broker_use(&health, &get),
        others(&get)
    );
    let _ = writeln!(
        md,
        "| mTLS (client certificate, identity `{CLIENT_ID}`) | tonic loop, {LOOP_CONNECTIONS} connections × {LOOP_IN_FLIGHT} in flight | {:.0} | {:.0} | **{loop_paired:.3}** | {:.1} µs / {:.1} µs ({:.3}) | {:.0}% / {:.0}% | – |\n",
        lh.rps,
        lg.rps,
        lh.cpu_us,
        lg.cpu_us,
        lh.cpu_us / lg.cpu_us,
        lh.broker_pct,
        lg.broker_pct
    );
    let plain = plain_ratio.map_or("section A not run".to_owned(), |r| format!("{r:.3}"));
    let _ = writeln!(
        md,
        "Target: ≥ 0.9 for both. Plain (no TLS, no auth, section A): {plain}. With the tonic loop the broker may not be saturated (its CPU use is below 100%): compare the CPU per call. \
         The token was verified {misses} time(s) and answered from the cache of verified tokens {hits} times over the h2load runs (`bace_broker_auth_token_cache_total`).\n"
    );
    let _ = writeln!(md, "Commands (rounds alternate; CPU {LOAD_CPU}):\n```");
    let _ = writeln!(md, "{}", redact(&health[0].command, &bearer));
    let _ = writeln!(md, "{}", redact(&get[0].command, &bearer));
    let _ = writeln!(md, "```\n");
    Ok(())
}

/// `bace_broker_auth_token_cache_total` (hits, misses) from the broker's `/metrics`.
fn token_cache_counts(metrics: SocketAddr) -> anyhow::Result<(u64, u64)> {
    let mut stream = TcpStream::connect(metrics)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let count = |result: &str| {
        let key = format!("bace_broker_auth_token_cache_total{{result=\"{result}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(&key).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    };
    Ok((count("hit"), count("miss")))
}

/// The token is a bench-made test credential, but a summary is no place for one.
fn redact(command: &str, bearer: &str) -> String {
    command.replace(bearer, "Bearer <service-account token>")
}

fn paired_ratio(base: impl Iterator<Item = f64>, other: impl Iterator<Item = f64>) -> f64 {
    let mut ratios: Vec<f64> = base.zip(other).map(|(b, o)| o / b).collect();
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    ratios.get(ratios.len() / 2).copied().unwrap_or(0.0)
}

fn broker_use(health: &[H2Run], get: &[H2Run]) -> String {
    let median = |runs: &[H2Run]| {
        let mut v: Vec<f64> = runs.iter().map(|r| r.broker_pct).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    };
    format!("{:.0}% / {:.0}%", median(health), median(get))
}

#[derive(Clone, Copy)]
enum Rpc {
    Health,
    GetToken,
}

struct LoopRun {
    rps: f64,
    cpu_us: f64,
    broker_pct: f64,
}

struct LoopSummary {
    rps: f64,
    cpu_us: f64,
    broker_pct: f64,
}

impl LoopSummary {
    fn of(runs: &[LoopRun]) -> Self {
        let median = |f: fn(&LoopRun) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            v[v.len() / 2]
        };
        Self {
            rps: median(|r| r.rps),
            cpu_us: median(|r| r.cpu_us),
            broker_pct: median(|r| r.broker_pct),
        }
    }
}

/// `LOOP_IN_FLIGHT` callers per channel call `rpc` back to back for `duration`; every call must
/// succeed.
async fn loop_run(
    broker: &BrokerProc,
    channels: &[Channel],
    rpc: Rpc,
    duration: Duration,
    account: &str,
) -> anyhow::Result<LoopRun> {
    let done = Arc::new(AtomicU64::new(0));
    let (cpu0, t0) = (broker.cpu_ticks()?, Instant::now());
    let deadline = t0 + duration;
    let mut callers = tokio::task::JoinSet::new();
    for channel in channels {
        for _ in 0..LOOP_IN_FLIGHT {
            let (channel, done, account) = (channel.clone(), done.clone(), account.to_owned());
            callers.spawn(async move {
                let mut broker = TokenBrokerServiceClient::new(channel.clone());
                let mut health = HealthClient::new(channel);
                while Instant::now() < deadline {
                    match rpc {
                        Rpc::Health => {
                            health.check(HealthCheckRequest::default()).await?;
                        }
                        Rpc::GetToken => {
                            broker.get_token(get_request(&account)).await?;
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            });
        }
    }
    while let Some(result) = callers.join_next().await {
        result??;
    }
    let (cpu1, elapsed) = (broker.cpu_ticks()?, t0.elapsed().as_secs_f64());
    let calls = done.load(Ordering::Relaxed);
    ensure!(calls > 0, "no call completed");
    Ok(LoopRun {
        rps: calls as f64 / elapsed,
        cpu_us: (cpu1 - cpu0) as f64 * 10_000.0 / calls as f64,
        broker_pct: (cpu1 - cpu0) as f64 / elapsed,
    })
}
