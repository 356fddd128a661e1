//! The command line: `serve` (with `--demo`), the `get` and `invalidate` clients, and
//! `check-config`. Every command returns an exit code; errors go to stderr as one line.

use std::{io::Read, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::{EnvFilter, fmt};

use crate::{
    app,
    config::Config,
    proto::{self, token_broker_service_client::TokenBrokerServiceClient},
};

/// Default address of a local broker, for the client commands.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// BACE token broker: one valid BACE token per account, shared over gRPC.
#[derive(Debug, Parser)]
#[command(name = "bace-token-broker", version, about)]
pub struct Cli {
    /// Log format (level via RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve {
        /// Config file (YAML).
        #[arg(long, env = "BACE_BROKER_CONFIG", required_unless_present = "demo")]
        config: Option<PathBuf>,
        /// Listen address, overriding the config's `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Run with an embedded fake BACE and demo accounts; no credentials needed.
        #[arg(long)]
        demo: bool,
    },
    /// Print a token from a running broker.
    Get {
        /// The account.
        account: String,
        /// Broker address.
        #[arg(long, env = "BACE_BROKER_ADDR", default_value = DEFAULT_ADDR)]
        addr: String,
        /// Print an `Authorization: Bearer ...` header line instead of the bare token.
        #[arg(long)]
        header: bool,
        /// The token must stay valid at least this long (e.g. `5m`).
        #[arg(long, value_parser = humantime::parse_duration)]
        min_validity: Option<Duration>,
    },
    /// Report a token BACE refused, and print the token to use from now on.
    Invalidate {
        /// The account.
        account: String,
        /// The refused token (`-` reads it from stdin; omitted: whatever token is current).
        #[arg(long)]
        token: Option<String>,
        /// Broker address.
        #[arg(long, env = "BACE_BROKER_ADDR", default_value = DEFAULT_ADDR)]
        addr: String,
    },
    /// Print the state of every account of a running broker.
    Status {
        /// Broker address.
        #[arg(long, env = "BACE_BROKER_ADDR", default_value = DEFAULT_ADDR)]
        addr: String,
    },
    /// Validate a config file and the secret files it names.
    CheckConfig {
        /// Config file (YAML).
        #[arg(long, env = "BACE_BROKER_CONFIG")]
        config: PathBuf,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let serving = matches!(cli.command, Command::Serve { .. });
    init_logging(cli.log_format, serving);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve {
                config,
                listen,
                demo,
            } => serve(config, listen, demo).await,
            Command::Get {
                account,
                addr,
                header,
                min_validity,
            } => get(&addr, account, header, min_validity).await,
            Command::Invalidate {
                account,
                token,
                addr,
            } => invalidate(&addr, account, token).await,
            Command::Status { addr } => status(&addr).await,
            Command::CheckConfig { config } => check_config(&config),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn init_logging(format: LogFormat, serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

async fn serve(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    demo: bool,
) -> Result<(), String> {
    if demo {
        let listen = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
        return crate::demo::run(listen, app::shutdown_signal())
            .await
            .map_err(|e| format!("{e:#}"));
    }
    let path = config.ok_or("--config or BACE_BROKER_CONFIG is required")?;
    let mut config = Config::load(&path).map_err(|e| e.to_string())?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    let listeners = app::Listeners::bind(&config)
        .await
        .map_err(|e| format!("{e:#}"))?;
    app::serve(config, listeners, app::shutdown_signal())
        .await
        .map_err(|e| format!("{e:#}"))
}

fn check_config(path: &std::path::Path) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let names: Vec<&str> = config.accounts.keys().map(|a| a.as_str()).collect();
    println!(
        "config OK: {} account(s): {}",
        names.len(),
        names.join(", ")
    );
    Ok(())
}

async fn connect(
    addr: &str,
) -> Result<TokenBrokerServiceClient<tonic::transport::Channel>, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .map_err(|e| format!("invalid address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    Ok(TokenBrokerServiceClient::new(channel))
}

fn status_error(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn print_token(token: Option<proto::Token>, header: bool) -> Result<(), String> {
    let token = token.ok_or("the broker answered without a token")?;
    if header {
        println!("Authorization: {}", token.authorization);
    } else {
        println!("{}", token.access_token);
    }
    Ok(())
}

async fn get(
    addr: &str,
    account: String,
    header: bool,
    min_validity: Option<Duration>,
) -> Result<(), String> {
    let mut client = connect(addr).await?;
    let request = proto::GetTokenRequest {
        account,
        min_validity: min_validity
            .map(|d| prost_types::Duration::try_from(d).map_err(|e| e.to_string()))
            .transpose()?,
    };
    let response = client.get_token(request).await.map_err(status_error)?;
    print_token(response.into_inner().token, header)
}

async fn invalidate(addr: &str, account: String, token: Option<String>) -> Result<(), String> {
    let access_token = match token.as_deref() {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read the token from stdin: {e}"))?;
            text.trim().to_owned()
        }
        Some(t) => t.to_owned(),
        None => String::new(),
    };
    let mut client = connect(addr).await?;
    let response = client
        .invalidate(proto::InvalidateRequest {
            account,
            access_token,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    eprintln!(
        "{}",
        if response.invalidated {
            "invalidated: logged in again"
        } else {
            "not invalidated (already replaced, or within the cooldown): current token"
        }
    );
    print_token(response.token, false)
}

async fn status(addr: &str) -> Result<(), String> {
    let mut client = connect(addr).await?;
    let accounts = client
        .list_accounts(proto::ListAccountsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .accounts;
    print!("{}", status_table(&accounts, std::time::SystemTime::now()));
    Ok(())
}

/// Renders account statuses as an aligned table; times relative to `now`.
pub fn status_table(accounts: &[proto::AccountStatus], now: std::time::SystemTime) -> String {
    let until = |t: &Option<prost_types::Timestamp>| match (*t).map(std::time::SystemTime::try_from)
    {
        Some(Ok(at)) => match at.duration_since(now) {
            Ok(d) => format!("in {}", short(d)),
            Err(e) => format!("{} ago", short(e.duration())),
        },
        _ => "-".to_owned(),
    };
    let mut rows = vec![[
        "ACCOUNT".to_owned(),
        "STATE".to_owned(),
        "EXPIRES".to_owned(),
        "NEXT REFRESH".to_owned(),
        "SURVIVES OUTAGE".to_owned(),
        "FAILURES".to_owned(),
        "LAST SUCCESS".to_owned(),
        "LAST ERROR".to_owned(),
    ]];
    for a in accounts {
        let state = proto::AccountState::try_from(a.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("ACCOUNT_STATE_")
                    .to_owned()
            })
            .unwrap_or_else(|_| a.state.to_string());
        let survives = a
            .survives_outage_for
            .and_then(|d| Duration::try_from(d).ok())
            .map_or("-".to_owned(), short);
        rows.push([
            a.account.clone(),
            state,
            until(&a.expires_at),
            until(&a.next_refresh_at),
            survives,
            a.consecutive_failures.to_string(),
            until(&a.last_success_at),
            if a.last_error.is_empty() {
                "-".to_owned()
            } else {
                a.last_error.clone()
            },
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A duration rounded to whole seconds (minutes above an hour), humantime style.
fn short(d: Duration) -> String {
    let secs = d.as_secs();
    let rounded = if secs >= 3600 { secs - secs % 60 } else { secs };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}
