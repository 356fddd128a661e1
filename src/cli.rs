//! The command line: `serve` (with `--demo`), the `get` and `invalidate` clients,
//! `check-config` and `gen-store-key`. Every command returns an exit code; errors go to
//! stderr as one line.

use std::{io::Read, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::{EnvFilter, fmt};

use crate::{
    app,
    config::Config,
    proto::{self, token_broker_service_client::TokenBrokerServiceClient},
};

/// Default address of a local broker, for the client commands.
pub(crate) const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

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
        /// How to reach the broker.
        #[command(flatten)]
        conn: Connection,
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
        /// How to reach the broker.
        #[command(flatten)]
        conn: Connection,
    },
    /// Print the state of every account of a running broker.
    Status {
        /// How to reach the broker.
        #[command(flatten)]
        conn: Connection,
    },
    /// Validate a config file and the secret files it names.
    CheckConfig {
        /// Config file (YAML).
        #[arg(long, env = "BACE_BROKER_CONFIG")]
        config: PathBuf,
    },
    /// Print a new line for `store.redis.encryption_key_file`: `<key-id> <base64 of 32 random
    /// bytes>`. Put it first in the file to encrypt with it (older lines still decrypt).
    GenStoreKey {
        /// The key id (ASCII letters, digits, `.`, `_`, `-`; default: today's date and a
        /// random suffix, e.g. `20261201-3fa9c2`).
        #[arg(long)]
        id: Option<String>,
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
                conn,
                header,
                min_validity,
            } => get(&conn, account, header, min_validity).await,
            Command::Invalidate {
                account,
                token,
                conn,
            } => invalidate(&conn, account, token).await,
            Command::Status { conn } => status(&conn).await,
            Command::CheckConfig { config } => check_config(&config),
            Command::GenStoreKey { id } => gen_store_key(id),
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
        return serve_demo(listen).await;
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

#[cfg(feature = "demo")]
async fn serve_demo(listen: SocketAddr) -> Result<(), String> {
    crate::demo::run(listen, app::shutdown_signal())
        .await
        .map_err(|e| format!("{e:#}"))
}

#[cfg(not(feature = "demo"))]
async fn serve_demo(_listen: SocketAddr) -> Result<(), String> {
    Err("this build has no demo (it was built without the `demo` feature)".into())
}

fn check_config(path: &std::path::Path) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    println!("{}", config_summary(&config));
    Ok(())
}

fn gen_store_key(id: Option<String>) -> Result<(), String> {
    let id = id.unwrap_or_else(|| {
        format!(
            "{}-{:06x}",
            chrono::Utc::now().format("%Y%m%d"),
            rand::random::<u32>() & 0xff_ffff
        )
    });
    let line = crate::config::generate_key_line(&id).map_err(|e| format!("--id {id:?}: {e}"))?;
    println!("{line}");
    Ok(())
}

/// How many accounts a valid config has, and their names (the first 20 of large configs).
fn config_summary(config: &Config) -> String {
    const SHOWN: usize = 20;
    let n = config.accounts.len();
    let mut names: Vec<&str> = config
        .accounts
        .keys()
        .take(SHOWN)
        .map(|a| a.as_str())
        .collect();
    let more = format!("and {} more", n.saturating_sub(SHOWN));
    if n > SHOWN {
        names.push(&more);
    }
    let mut summary = format!("config OK: {n} account(s): {}", names.join(", "));
    if let Some(store) = &config.store {
        let r = &store.redis;
        summary.push_str(&format!(
            "\nstore: {} (key prefix {:?}, {} encryption key(s), new records sealed with {:?})",
            r.url,
            r.key_prefix,
            r.keys.iter().count(),
            r.keys.encrypting().id()
        ));
    }
    summary
}

/// How the client commands reach the broker.
#[derive(Debug, Args)]
pub struct Connection {
    /// Broker address (`https://` for TLS).
    #[arg(long, env = "BACE_BROKER_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// CA certificate (PEM) to verify the broker's certificate with (TLS).
    #[arg(long, env = "BACE_BROKER_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; needs `--key-file`.
    #[arg(long, env = "BACE_BROKER_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, env = "BACE_BROKER_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// File holding a bearer token (e.g. a projected Kubernetes service-account token), sent
    /// as `authorization: Bearer <token>`.
    #[arg(long, env = "BACE_BROKER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// Adds the caller's bearer token to every request.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = TokenBrokerServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

async fn connect(conn: &Connection) -> Result<Client, String> {
    let addr = &conn.addr;
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .map_err(|e| format!("invalid address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let tls_options = conn.ca_file.is_some() || conn.cert_file.is_some();
    if tls_options && !addr.starts_with("https://") {
        return Err(format!(
            "--ca-file and --cert-file need an https:// address, not {addr:?}"
        ));
    }
    if addr.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &conn.ca_file {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&conn.cert_file, &conn.key_file) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS setup: {e}"))?;
    }
    let bearer = match &conn.token_file {
        Some(path) => {
            let token = read(path)?;
            let value = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| format!("{} does not hold a usable token", path.display()))?;
            Some(value)
        }
        None => None,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    Ok(TokenBrokerServiceClient::with_interceptor(
        channel,
        Bearer(bearer),
    ))
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
    conn: &Connection,
    account: String,
    header: bool,
    min_validity: Option<Duration>,
) -> Result<(), String> {
    let mut client = connect(conn).await?;
    let request = proto::GetTokenRequest {
        account,
        min_validity: min_validity
            .map(|d| prost_types::Duration::try_from(d).map_err(|e| e.to_string()))
            .transpose()?,
    };
    let response = client.get_token(request).await.map_err(status_error)?;
    print_token(response.into_inner().token, header)
}

async fn invalidate(
    conn: &Connection,
    account: String,
    token: Option<String>,
) -> Result<(), String> {
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
    let mut client = connect(conn).await?;
    let response = client
        .invalidate(proto::InvalidateRequest {
            account,
            access_token,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let outcome = proto::InvalidateOutcome::try_from(response.outcome)
        .unwrap_or(proto::InvalidateOutcome::Unspecified);
    eprintln!(
        "{}",
        match outcome {
            proto::InvalidateOutcome::Invalidated => "invalidated: logged in again",
            proto::InvalidateOutcome::AlreadyReplaced =>
                "not invalidated: that token was already replaced; current token",
            proto::InvalidateOutcome::TokenValid =>
                "not invalidated: BACE accepts the token (a 401 means a missing permission)",
            proto::InvalidateOutcome::Cooldown =>
                "not invalidated: invalidated moments ago (cooldown); current token",
            proto::InvalidateOutcome::Unspecified if response.invalidated => "invalidated",
            proto::InvalidateOutcome::Unspecified => "not invalidated; current token",
        }
    );
    print_token(response.token, false)
}

async fn status(conn: &Connection) -> Result<(), String> {
    let mut client = connect(conn).await?;
    let response = client
        .list_accounts(proto::ListAccountsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if let Some(store) = &response.store {
        println!("{}", store_line(store));
    }
    print!(
        "{}",
        status_table(&response.accounts, std::time::SystemTime::now())
    );
    Ok(())
}

/// One line about the shared store, above the accounts.
fn store_line(store: &proto::StoreStatus) -> String {
    let state = match proto::StoreState::try_from(store.state) {
        Ok(proto::StoreState::Up) => "up",
        Ok(proto::StoreState::Down) => {
            "DOWN (serving what this replica holds, fetching on its own)"
        }
        Ok(proto::StoreState::Connecting) => "connecting",
        _ => "unknown",
    };
    format!("store: redis, key prefix {:?}, {state}", store.key_prefix)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_config_lists_at_most_twenty_accounts() {
        let yaml = |n: usize| {
            let mut y = String::from("accounts:\n");
            for i in 0..n {
                y.push_str(&format!(
                    "  a{i:02}: {{client_id: c, client_secret: s, username: u, password: p}}\n"
                ));
            }
            Config::parse(&y).unwrap()
        };
        assert_eq!(
            config_summary(&yaml(2)),
            "config OK: 2 account(s): a00, a01"
        );
        let big = config_summary(&yaml(25));
        assert!(
            big.starts_with("config OK: 25 account(s): a00, a01,"),
            "{big}"
        );
        assert!(big.ends_with("a19, and 5 more"), "{big}");
    }
}
