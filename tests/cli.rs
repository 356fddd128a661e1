//! Binary-level tests: the `bace-token-broker` executable run as a child process, for
//! `check-config`, `gen-store-key`, `serve` (with a config and with `--demo`), `get` and
//! `invalidate`.
//!
//! Every wait is bounded: readiness is polled on the gRPC health service, exits are polled with
//! a deadline, and upstream calls are awaited on the in-process fake BACE.

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use fake_bace::{FakeAccount, FakeBace, FakeOptions, Grant};
use testkit::{Account, BrokerConfig};

const BIN: &str = env!("CARGO_BIN_EXE_bace-token-broker");
/// Budget for a server to become ready.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Budget for a server to exit after SIGTERM, or after a bad config.
const EXIT_WITHIN: Duration = Duration::from_secs(15);

// === Helpers ===

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// The binary, with no broker settings inherited from the environment.
fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("BACE_BROKER_CONFIG")
        .env_remove("BACE_BROKER_ADDR")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs the binary to completion with `args`, feeding `stdin`.
fn run(args: &[&str], stdin: &str) -> Output {
    run_with(command().args(args), stdin)
}

fn run_with(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the binary");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for the binary")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "expected success, got {}; stderr: {}",
        out.status,
        stderr(&out)
    );
    stdout(&out)
}

/// Asserts failure and returns stderr.
fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure; stdout: {}",
        stdout(&out)
    );
    stderr(&out)
}

/// Polls `child` until it exits, for at most `within`.
fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `serve` child process whose stdout and stderr go to files in `dir`. Killed on drop.
struct Server {
    child: Child,
    addr: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Server {
    /// Starts `serve ARGS --listen 127.0.0.1:PORT` with `envs`.
    fn spawn(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let stdout = dir.join("server.stdout");
        let stderr = dir.join("server.stderr");
        let child = command()
            .arg("serve")
            .args(args)
            .args(["--listen", &listen])
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("stdout file"))
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn serve");
        Self {
            child,
            addr: format!("http://{listen}"),
            stdout,
            stderr,
        }
    }

    /// Polls the readiness service until SERVING; panics (with the server's logs) if the
    /// process exits or [`READY_WITHIN`] passes first.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("server exited with {status} before ready:\n{}", self.logs());
            }
            if testkit::is_ready(&self.addr).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server not ready within {READY_WITHIN:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a client command against this server.
    fn cli(&self, args: &[&str], stdin: &str) -> Output {
        run_with(command().args(args).args(["--addr", &self.addr]), stdin)
    }

    /// Sends SIGTERM and waits for the exit status.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let kill = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -TERM {pid} failed");
        wait_exit(&mut self.child, EXIT_WITHIN)
    }

    /// Everything the server wrote so far, stdout then stderr.
    fn logs(&self) -> String {
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        format!("{}{}", read(&self.stdout), read(&self.stderr))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line of output, stripped of its newline.
fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

// === check-config ===

/// A config with one account, `fleet-a`, whose account block is `account` (indented by four).
fn config_with_account(account: &str) -> String {
    format!("accounts:\n  fleet-a:\n{account}")
}

const GOOD_ACCOUNT: &str = "    client_id: cid\n    client_secret: csecret\n    username: ops@example.com\n    password: pw\n";

/// The account of [`GOOD_ACCOUNT`], named `name`, for [`BrokerConfig`].
fn good_account(name: &str) -> Account {
    Account::new(name, "cid", "csecret", "ops@example.com", "pw")
}

fn check_config(dir: &Path, yaml: &str) -> Output {
    let path = dir.join("config.yaml");
    fs::write(&path, yaml).expect("write config");
    run(
        &["check-config", "--config", path.to_str().expect("utf-8")],
        "",
    )
}

#[test]
fn check_config_accepts_a_good_config_with_secret_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("client_secret");
    let password = dir.path().join("password");
    fs::write(&secret, "csecret\n").expect("write");
    fs::write(&password, "pw\n").expect("write");
    let config = BrokerConfig::new()
        .listen(SocketAddr::from(([127, 0, 0, 1], 6000)))
        .token_url("http://127.0.0.1:1/oauth2/token")
        .upstream_timeout(Duration::from_secs(2))
        .expires_timezone("UTC")
        .lifetime_fraction(0.5)
        .expiry_margin(Duration::from_secs(60))
        .refreshed_lifetime(Duration::from_secs(7 * 24 * 3600))
        .invalidate_cooldown(Duration::from_secs(30))
        .account(
            good_account("fleet-a")
                .client_secret_file(&secret)
                .password_file(&password),
        )
        .account(good_account("fleet-b"));
    let out = ok(check_config(dir.path(), &config.to_yaml()));
    assert!(
        out.contains("fleet-a") && out.contains("fleet-b"),
        "stdout names the accounts: {out}"
    );
}

#[test]
fn check_config_reads_the_path_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = BrokerConfig::new()
        .account(good_account("fleet-a"))
        .write(dir.path(), "config.yaml");
    let out = ok(run_with(
        command()
            .arg("check-config")
            .env("BACE_BROKER_CONFIG", &path),
        "",
    ));
    assert!(out.contains("fleet-a"), "stdout: {out}");

    // The variable really is what is read: a bad file named by it fails.
    fs::write(&path, "accounts: {}\n").expect("write config");
    let err = fails(run_with(
        command()
            .arg("check-config")
            .env("BACE_BROKER_CONFIG", &path),
        "",
    ));
    assert!(err.contains("accounts"), "stderr: {err}");
}

#[test]
fn check_config_rejects_bad_configs_naming_account_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing_file = dir.path().join("no-such-password");
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "missing password",
            config_with_account(
                "    client_id: cid\n    client_secret: csecret\n    username: u\n",
            ),
            &["fleet-a", "password", "required"],
        ),
        (
            "password and password_file",
            config_with_account(&format!(
                "{GOOD_ACCOUNT}    password_file: {}\n",
                missing_file.display()
            )),
            &["fleet-a", "password", "not both"],
        ),
        (
            "unreadable password_file",
            config_with_account(&format!(
                "    client_id: cid\n    client_secret: csecret\n    username: u\n    password_file: {}\n",
                missing_file.display()
            )),
            &["fleet-a", "password_file", "no-such-password"],
        ),
        (
            "unknown key in an account",
            config_with_account(
                "    client_id: cid\n    client_secret: csecret\n    username: u\n    pasword: pw\n",
            ),
            &["fleet-a", "pasword"],
        ),
        (
            "bad duration",
            format!(
                "upstream:\n  timeout: soon\n{}",
                config_with_account(GOOD_ACCOUNT)
            ),
            &["upstream.timeout", "soon"],
        ),
        (
            "bad top-level duration",
            format!(
                "invalidate_cooldown: soon\n{}",
                config_with_account(GOOD_ACCOUNT)
            ),
            &["invalidate_cooldown", "soon"],
        ),
        (
            "bad account name",
            format!("accounts:\n  \"bad name!\":\n{GOOD_ACCOUNT}"),
            &["bad name!", "name"],
        ),
        (
            "bad timezone",
            format!(
                "upstream:\n  expires_timezone: Mars/Olympus\n{}",
                config_with_account(GOOD_ACCOUNT)
            ),
            &["upstream.expires_timezone", "Mars/Olympus"],
        ),
        (
            "unknown top-level key",
            format!(
                "listen_address: 127.0.0.1:1\n{}",
                config_with_account(GOOD_ACCOUNT)
            ),
            &["listen_address"],
        ),
    ];
    // Every case runs; the failures are reported together.
    let mut wrong = Vec::new();
    for (case, yaml, expected) in cases {
        let out = check_config(dir.path(), &yaml);
        let err = stderr(&out);
        if out.status.success() {
            wrong.push(format!("{case}: accepted"));
        } else if let Some(needle) = expected.iter().find(|n| !err.contains(*n)) {
            wrong.push(format!("{case}: no {needle:?} in: {}", err.trim_end()));
        } else if err.trim_end().lines().count() != 1 {
            wrong.push(format!("{case}: not one line: {err}"));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn check_config_rejects_a_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.yaml");
    let err = fails(run(
        &["check-config", "--config", path.to_str().expect("utf-8")],
        "",
    ));
    assert!(
        err.contains("cannot read config file") && err.contains("absent.yaml"),
        "stderr: {err}"
    );
}

// === gen-store-key and the store section ===

/// The `store.redis` section of a config, with `extra` lines (indented by four).
fn store_section(key_file: &Path, extra: &str) -> String {
    format!(
        "store:\n  redis:\n    url: redis://127.0.0.1:6379/0\n    encryption_key_file: {}\n{extra}",
        key_file.display()
    )
}

#[test]
fn gen_store_key_prints_a_line_check_config_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = ok(run(&["gen-store-key", "--id", "2027-01"], ""));
    let second = ok(run(&["gen-store-key"], ""));
    let (id, key) = first.trim_end().split_once(' ').expect("<id> <key>");
    assert_eq!(id, "2027-01");
    assert_eq!(key.len(), 44, "base64 of 32 bytes: {key}");
    let (default_id, other_key) = second.trim_end().split_once(' ').expect("<id> <key>");
    assert!(
        default_id.len() > 8 && default_id.starts_with("20"),
        "dated default id: {default_id}"
    );
    assert_ne!(key, other_key, "a new random key each time");

    // Rotation: the new line first, the old one after; check-config reads the file.
    let keys = dir.path().join("keys");
    fs::write(&keys, format!("{second}{first}")).expect("write keys");
    let config = format!(
        "{}{}",
        store_section(&keys, "    key_prefix: team-a\n"),
        config_with_account(GOOD_ACCOUNT)
    );
    let out = ok(check_config(dir.path(), &config));
    assert!(
        out.contains("redis://127.0.0.1:6379/0")
            && out.contains("2 encryption key(s)")
            && out.contains(&format!("sealed with {default_id:?}")),
        "stdout: {out}"
    );
    assert!(
        !out.contains(key) && !out.contains(other_key),
        "stdout shows a key: {out}"
    );
}

#[test]
fn gen_store_key_refuses_a_bad_id() {
    for id in ["two words", "", "a/b"] {
        let err = fails(run(&["gen-store-key", "--id", id], ""));
        assert!(
            err.contains("--id") && err.contains("key id"),
            "{id:?}: {err}"
        );
    }
}

#[test]
fn check_config_refuses_bad_store_settings_without_showing_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("keys");
    fs::write(&good, "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").expect("write");
    let bad = dir.path().join("bad-keys");
    fs::write(
        &bad,
        "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\nk2 U0VDUkVULWtleQ==\n",
    )
    .expect("write");
    let missing = dir.path().join("missing-keys");
    let cases: Vec<(String, &[&str])> = vec![
        (
            store_section(&bad, ""),
            &["store.redis.encryption_key_file", "line 2", "32 bytes"],
        ),
        (
            store_section(&missing, ""),
            &[
                "store.redis.encryption_key_file",
                "cannot read",
                "missing-keys",
            ],
        ),
        (
            "store:\n  redis:\n    url: redis://127.0.0.1:6379\n".to_owned(),
            &[
                "store.redis.encryption_key_file",
                "is required",
                "gen-store-key",
            ],
        ),
        (
            store_section(&good, "").replace("redis://127.0.0.1", "redis://:SECRET-pw@127.0.0.1"),
            &["store.redis.url", "holds a password"],
        ),
        (
            store_section(&good, "    ca_file: /etc/ssl/ca.pem\n"),
            &["store.redis.ca_file", "rediss://"],
        ),
        (
            store_section(&good, "    lease: 1s\n"),
            &["store.redis.lease", "three times"],
        ),
        (
            store_section(&good, "    tls: true\n"),
            &["unknown field `tls`"],
        ),
    ];
    for (store, wants) in cases {
        let err = fails(check_config(
            dir.path(),
            &format!("{store}{}", config_with_account(GOOD_ACCOUNT)),
        ));
        for want in wants {
            assert!(err.contains(want), "{store:?}: {err:?} lacks {want:?}");
        }
        assert!(
            !err.contains("SECRET") && !err.contains("U0VDUkVU") && !err.contains("AAECAw"),
            "{err}"
        );
    }
}

// === serve ===

#[test]
fn serve_with_a_bad_config_exits_quickly_with_the_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    fs::write(
        &path,
        config_with_account("    client_id: cid\n    client_secret: csecret\n    username: u\n"),
    )
    .expect("write config");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = command()
        .args(["serve", "--config", path.to_str().expect("utf-8")])
        .args(["--listen", &listen])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let status = wait_exit(&mut child, EXIT_WITHIN);
    assert!(!status.success(), "serve with a bad config must fail");
    let out = child.wait_with_output().expect("output");
    let err = stderr(&out);
    assert!(
        err.contains("fleet-a") && err.contains("password"),
        "stderr names account and field: {err}"
    );
}

/// Credentials of a fake BACE account, and whether the config gives them as files.
struct TestAccount {
    name: &'static str,
    username: &'static str,
    password: &'static str,
    client_secret: &'static str,
    from_files: bool,
}

const ACCOUNTS: [TestAccount; 2] = [
    TestAccount {
        name: "fleet-a",
        username: "ops-a@example.com",
        password: "pw-a-Zq83kd0s",
        client_secret: "cs-a-Lm29xv7p",
        from_files: true,
    },
    TestAccount {
        name: "fleet-b",
        username: "ops-b@example.com",
        password: "pw-b-Rt61hw4n",
        client_secret: "cs-b-Yc05jf8e",
        from_files: false,
    },
];

/// A fake BACE holding [`ACCOUNTS`].
fn fake_with_accounts(rt: &tokio::runtime::Runtime) -> FakeBace {
    let fake = rt
        .block_on(FakeBace::start(FakeOptions::default()))
        .expect("fake BACE");
    for a in &ACCOUNTS {
        fake.add_account(FakeAccount::new(
            a.username,
            a.password,
            format!("cid-{}", a.name),
            a.client_secret,
        ));
    }
    fake
}

/// Writes a config for [`ACCOUNTS`] against `fake` (file secrets with a trailing newline);
/// returns its path and the metrics port it names.
fn write_config(dir: &Path, fake: &FakeBace) -> (PathBuf, u16) {
    let metrics_port = free_port();
    let mut config = BrokerConfig::new()
        .metrics_listen(Some(SocketAddr::from(([127, 0, 0, 1], metrics_port))))
        .token_url(fake.token_url())
        .upstream_timeout(Duration::from_secs(5))
        .shutdown_grace(Duration::from_secs(5));
    for a in &ACCOUNTS {
        let mut account = Account::new(
            a.name,
            format!("cid-{}", a.name),
            a.client_secret,
            a.username,
            a.password,
        );
        if a.from_files {
            let secret = dir.join(format!("{}.client_secret", a.name));
            let password = dir.join(format!("{}.password", a.name));
            fs::write(&secret, format!("{}\n", a.client_secret)).expect("write");
            fs::write(&password, format!("{}\n", a.password)).expect("write");
            account = account.client_secret_file(secret).password_file(password);
        }
        config = config.account(account);
    }
    (config.write(dir, "config.yaml"), metrics_port)
}

#[test]
fn full_run_get_invalidate_sigterm_json_logs_and_no_secrets() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let fake = fake_with_accounts(&rt);
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = write_config(dir.path(), &fake);
    let mut server = Server::spawn(
        dir.path(),
        &[
            "--config",
            config.to_str().expect("utf-8"),
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "trace")],
    );
    rt.block_on(server.wait_ready());
    let user = ACCOUNTS[0].username;
    // Warm-up logged every account in once (secret files stripped of their newline, or the
    // fake would have refused them).
    assert_eq!(fake.calls(user, Grant::Password), 1);
    assert_eq!(fake.calls(ACCOUNTS[1].username, Grant::Password), 1);

    // get: the token, then the header line; no upstream call.
    let token = ok(server.cli(&["get", "fleet-a"], ""))
        .trim_end()
        .to_owned();
    assert!(fake.is_valid(&token), "get prints a valid token: {token:?}");
    let header = ok(server.cli(&["get", "fleet-a", "--header"], ""));
    assert_eq!(
        first_line(&header),
        format!("Authorization: Bearer {token}")
    );
    let token_b = ok(server.cli(&["get", "fleet-b"], ""))
        .trim_end()
        .to_owned();
    assert!(fake.is_valid(&token_b) && token_b != token);
    assert_eq!(fake.calls(user, Grant::Password), 1);

    // get: errors carry the code and the message.
    let err = fails(server.cli(&["get", "nope"], ""));
    assert!(
        err.contains("NotFound") && err.contains("unknown account \"nope\""),
        "stderr: {err}"
    );
    for bad in ["", "bad name!"] {
        let err = fails(server.cli(&["get", bad], ""));
        assert!(
            err.contains("InvalidArgument") && err.contains("invalid account name"),
            "get {bad:?}: stderr: {err}"
        );
    }

    // invalidate the current token: a new login, a new valid token.
    let new_token = ok(server.cli(&["invalidate", "fleet-a", "--token", &token], ""))
        .trim_end()
        .to_owned();
    assert_ne!(new_token, token);
    assert!(fake.is_valid(&new_token));
    assert_eq!(fake.calls(user, Grant::Password), 2);

    // invalidate the old token again, read from stdin: the current one, no upstream call.
    let total = fake.total_calls();
    let current = ok(server.cli(
        &["invalidate", "fleet-a", "--token", "-"],
        &format!("{token}\n"),
    ))
    .trim_end()
    .to_owned();
    assert_eq!(current, new_token);
    assert_eq!(fake.calls(user, Grant::Password), 2);
    assert_eq!(fake.total_calls(), total);

    // SIGTERM: a clean exit.
    let status = server.terminate();
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        server.logs()
    );

    // JSON logs, one object per line.
    let logs = server.logs();
    let mut objects = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(value.is_object(), "not a JSON object: {line}");
        objects += 1;
    }
    assert!(
        logs.contains("broker listening") && objects > 0,
        "logs:\n{logs}"
    );

    // No secret anywhere, even at trace.
    let mut secrets: Vec<(&str, &str)> = vec![
        ("access token", &token),
        ("access token", &token_b),
        ("access token", &new_token),
    ];
    for a in &ACCOUNTS {
        secrets.push(("password", a.password));
        secrets.push(("client secret", a.client_secret));
    }
    for (what, secret) in secrets {
        if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
            panic!("a {what} appears in the server's output: {line}");
        }
    }
    rt.block_on(async { fake.shutdown() });
}

#[test]
fn get_without_a_server_cannot_connect() {
    let addr = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let err = fails(run(&["get", "fleet-a", "--addr", &addr], ""));
    assert!(err.contains("cannot connect"), "stderr: {err}");
    assert!(started.elapsed() < EXIT_WITHIN);
}

#[test]
fn serve_demo_serves_demo_accounts_and_stops_on_sigterm() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::spawn(dir.path(), &["--demo"], &[]);
    rt.block_on(server.wait_ready());
    let token = ok(server.cli(&["get", "demo-fleet-a"], ""));
    let token = token.trim_end();
    assert!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "a bare token: {token:?}"
    );
    let header = ok(server.cli(&["get", "demo-fleet-a", "--header"], ""));
    assert_eq!(
        first_line(&header),
        format!("Authorization: Bearer {token}")
    );
    let status = server.terminate();
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        server.logs()
    );
}

#[test]
fn sighup_reloads_the_config() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let fake = fake_with_accounts(&rt);
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, metrics_port) = write_config(dir.path(), &fake);
    let mut server = Server::spawn(
        dir.path(),
        &["--config", config.to_str().expect("utf-8")],
        &[],
    );
    rt.block_on(server.wait_ready());
    let scrape = || {
        rt.block_on(async {
            reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
                .await
                .expect("scrape")
                .text()
                .await
                .expect("body")
        })
    };
    let unchanged = "bace_broker_config_reloads_total{outcome=\"unchanged\"} 1";
    assert!(!scrape().contains(unchanged));
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    // Nothing changed on disk, so only the signal can have caused this reload.
    let deadline = Instant::now() + READY_WITHIN;
    while !scrape().contains(unchanged) {
        assert!(
            Instant::now() < deadline,
            "no reload after SIGHUP:\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.logs().contains("SIGHUP received"));
    assert_eq!(
        fake.calls(ACCOUNTS[0].username, Grant::Password),
        1,
        "no new login"
    );
    assert!(server.terminate().success());
}
