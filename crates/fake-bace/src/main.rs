//! `fake-bace`: the fake BACE of the `fake-bace` crate as a process, for tests in other languages.
//!
//! Starts [`FakeBace`] on `--listen` (default `127.0.0.1:0`), adds the accounts given with
//! `--account` and `--accounts FILE`, prints one JSON line with its URLs on stdout, then serves
//! until SIGTERM, SIGINT or the end of stdin. The crate docs describe the options, the accounts
//! file and the introspection endpoints.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use chrono_tz::Tz;
use clap::Parser;
use fake_bace::{Chaos, ErrorShape, FakeAccount, FakeBace, FakeOptions, RefreshStyle};
use serde::Deserialize;
use tokio::sync::oneshot;

/// A fake of BACE's OAuth2 token endpoint on loopback (test equipment).
#[derive(Debug, Parser)]
#[command(name = "fake-bace", version)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// An account, USERNAME:PASSWORD:CLIENT_ID:CLIENT_SECRET (split at the first three colons),
    /// with the default lifetimes, refresh style and error shape. Repeatable.
    #[arg(long = "account", value_name = "USERNAME:PASSWORD:CLIENT_ID:CLIENT_SECRET", value_parser = parse_account)]
    accounts: Vec<FakeAccount>,
    /// A JSON file of accounts: {"accounts": [{"username", "password", "client_id",
    /// "client_secret", optional "login_lifetime_secs", "refresh_lifetime_secs",
    /// "refresh_style" ("bace", "oauth2", "oauth2-rotate"), "error_shape" ("yii", "oauth2")}]}.
    #[arg(long = "accounts", value_name = "FILE")]
    accounts_file: Option<PathBuf>,
    /// Time zone of `expires` in BACE-style refresh answers (default: Europe/Amsterdam).
    #[arg(long, value_name = "TZ", value_parser = parse_tz)]
    expires_timezone: Option<Tz>,
    /// Chaos mode from the start: a JSON object of chaos settings (see `fake_bace::Chaos`,
    /// e.g. `{"seed": 1, "server_error": 0.05, "hang": 0.01}`); `/_fake/chaos` changes it later.
    #[arg(long, value_name = "JSON", value_parser = parse_chaos)]
    chaos: Option<Chaos>,
    /// Stop on SIGTERM/SIGINT only, not at the end of stdin (for a stdin of /dev/null).
    #[arg(long)]
    ignore_stdin: bool,
}

/// The accounts file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    accounts: Vec<AccountEntry>,
}

/// One account of the accounts file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountEntry {
    username: String,
    password: String,
    client_id: String,
    client_secret: String,
    login_lifetime_secs: Option<u64>,
    refresh_lifetime_secs: Option<u64>,
    #[serde(default)]
    refresh_style: RefreshStyleName,
    #[serde(default)]
    error_shape: ErrorShapeName,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RefreshStyleName {
    #[default]
    Bace,
    #[serde(rename = "oauth2")]
    OAuth2,
    #[serde(rename = "oauth2-rotate")]
    OAuth2Rotate,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ErrorShapeName {
    #[default]
    Yii,
    #[serde(rename = "oauth2")]
    OAuth2,
}

impl From<AccountEntry> for FakeAccount {
    fn from(entry: AccountEntry) -> Self {
        let mut account = FakeAccount::new(
            entry.username,
            entry.password,
            entry.client_id,
            entry.client_secret,
        );
        if let Some(secs) = entry.login_lifetime_secs {
            account.login_lifetime = Duration::from_secs(secs);
        }
        if let Some(secs) = entry.refresh_lifetime_secs {
            account.refresh_lifetime = Duration::from_secs(secs);
        }
        account.refresh_style = match entry.refresh_style {
            RefreshStyleName::Bace => RefreshStyle::Bace,
            RefreshStyleName::OAuth2 | RefreshStyleName::OAuth2Rotate => RefreshStyle::OAuth2 {
                rotate_refresh_token: matches!(entry.refresh_style, RefreshStyleName::OAuth2Rotate),
                expires_in_as_string: false,
            },
        };
        account.error_shape = match entry.error_shape {
            ErrorShapeName::Yii => ErrorShape::Yii,
            ErrorShapeName::OAuth2 => ErrorShape::OAuth2,
        };
        account
    }
}

fn parse_account(value: &str) -> Result<FakeAccount, String> {
    let mut parts = value.splitn(4, ':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(username), Some(password), Some(client_id), Some(client_secret))
            if !username.is_empty() =>
        {
            Ok(FakeAccount::new(
                username,
                password,
                client_id,
                client_secret,
            ))
        }
        _ => Err("expected USERNAME:PASSWORD:CLIENT_ID:CLIENT_SECRET".to_owned()),
    }
}

fn parse_chaos(value: &str) -> Result<Chaos, String> {
    let json = serde_json::from_str(value).map_err(|e| format!("chaos: {e}"))?;
    Chaos::from_json(&json)
}

fn parse_tz(value: &str) -> Result<Tz, String> {
    value
        .parse()
        .map_err(|_| format!("unknown time zone {value:?}"))
}

fn read_accounts_file(path: &Path) -> Result<Vec<FakeAccount>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: AccountsFile =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(file.accounts.into_iter().map(FakeAccount::from).collect())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed here, before the caller announces
/// the address, so an early signal cannot kill the process with its default action.
fn stop_signal() -> std::io::Result<impl Future<Output = &'static str>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        })
    }
}

/// Resolves at the end of stdin (or when reading it fails). A plain thread, not tokio's stdin:
/// its blocking read cannot be cancelled and would hold up the runtime's shutdown.
fn stdin_closed() -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    rx
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fake-bace: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut accounts = args.accounts;
    if let Some(path) = &args.accounts_file {
        accounts.extend(read_accounts_file(path)?);
    }
    let stop = stop_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;

    let mut opts = FakeOptions {
        addr: args.listen,
        ..FakeOptions::default()
    };
    if let Some(tz) = args.expires_timezone {
        opts.expires_timezone = tz;
    }
    let fake = FakeBace::start(opts)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    for account in accounts {
        fake.add_account(account);
    }
    if args.chaos.is_some() {
        fake.set_chaos(args.chaos);
    }

    let line = serde_json::json!({
        "base_url": fake.base_url(),
        "token_url": fake.token_url(),
        "api_url": fake.api_url(),
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    drop(stdout);

    let stdin = async {
        if args.ignore_stdin {
            std::future::pending::<()>().await;
        }
        let _ = stdin_closed().await;
    };
    let why = tokio::select! {
        why = stop => why,
        () = stdin => "end of stdin",
    };
    eprintln!("fake-bace: {why}; stopping");
    fake.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_option_splits_at_the_first_three_colons() {
        let account = parse_account("ops@x.example.com:pw:cid:se:cret").expect("parses");
        assert_eq!(
            account,
            FakeAccount::new("ops@x.example.com", "pw", "cid", "se:cret")
        );
        assert!(parse_account("ops@x.example.com:pw:cid").is_err());
        assert!(parse_account(":pw:cid:secret").is_err());
    }

    #[test]
    fn accounts_file_entries_set_the_optional_fields() {
        let file: AccountsFile = serde_json::from_str(
            r#"{"accounts": [
                {"username": "a", "password": "p", "client_id": "c", "client_secret": "s"},
                {"username": "b", "password": "p", "client_id": "c", "client_secret": "s",
                 "login_lifetime_secs": 60, "refresh_lifetime_secs": 120,
                 "refresh_style": "oauth2-rotate", "error_shape": "oauth2"}
            ]}"#,
        )
        .expect("parses");
        let [plain, custom]: [FakeAccount; 2] = file
            .accounts
            .into_iter()
            .map(FakeAccount::from)
            .collect::<Vec<_>>()
            .try_into()
            .expect("two accounts");
        assert_eq!(plain, FakeAccount::new("a", "p", "c", "s"));
        assert_eq!(custom.login_lifetime, Duration::from_secs(60));
        assert_eq!(custom.refresh_lifetime, Duration::from_secs(120));
        assert_eq!(
            custom.refresh_style,
            RefreshStyle::OAuth2 {
                rotate_refresh_token: true,
                expires_in_as_string: false,
            }
        );
        assert_eq!(custom.error_shape, ErrorShape::OAuth2);

        let typo = r#"{"accounts": [{"username": "a", "password": "p", "client_id": "c",
            "client_secret": "s", "refresh_styl": "oauth2"}]}"#;
        assert!(serde_json::from_str::<AccountsFile>(typo).is_err());
    }
}
