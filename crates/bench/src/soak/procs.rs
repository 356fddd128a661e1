//! The two child processes of the soak: the fake BACE (`fake-bace`, driven over its `/_fake/`
//! endpoints) and the broker (`bace-token-broker serve`), and what the soak reads of them
//! (`/proc/PID`, logs, exit status).

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File},
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail, ensure};
use bace_token_broker::{
    READINESS_SERVICE, proto::token_broker_service_client::TokenBrokerServiceClient,
};
use fake_bace::Chaos;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A free loopback port (bound, then released for the child to take).
pub(crate) fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The fake BACE as a child process. Its stdin is a pipe: when the soak dies, the fake stops.
pub(crate) struct FakeProc {
    child: Child,
    _stdin: ChildStdin,
    pub(crate) base_url: String,
    pub(crate) token_url: String,
    http: reqwest::Client,
}

impl FakeProc {
    pub(crate) fn spawn(bin: &Path, accounts: &Path, log: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .arg("--accounts")
            .arg(accounts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take().context("fake stdin")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("fake stdout")?).read_line(&mut line)?;
        let urls: Value = serde_json::from_str(&line).with_context(|| {
            format!("fake-bace did not announce its URLs; see {}", log.display())
        })?;
        let url = |k: &str| urls[k].as_str().map(str::to_owned).context("fake URL");
        Ok(Self {
            base_url: url("base_url")?,
            token_url: url("token_url")?,
            child,
            _stdin: stdin,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }

    async fn get_json(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.bytes().await?;
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// The fake's expiry of `token`, if it issued it.
    pub(crate) async fn token_expiry(&self, token: &str) -> anyhow::Result<Option<SystemTime>> {
        let (status, body) = self.get_json(&format!("/_fake/tokens/{token}")).await?;
        if status == 404 {
            return Ok(None);
        }
        let ms = body["expires_at_ms"]
            .as_u64()
            .with_context(|| format!("/_fake/tokens answered {status} {body}"))?;
        Ok(Some(UNIX_EPOCH + Duration::from_millis(ms)))
    }

    /// Token requests per username (both grants added up), and the total.
    pub(crate) async fn calls(&self) -> anyhow::Result<(HashMap<String, u64>, u64)> {
        let (_, body) = self.get_json("/_fake/calls").await?;
        let mut per = HashMap::new();
        for grant in ["password", "refresh_token"] {
            for (user, n) in body[grant].as_object().into_iter().flatten() {
                *per.entry(user.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
        Ok((per, body["total"].as_u64().unwrap_or(0)))
    }

    /// The faults chaos injected so far.
    pub(crate) async fn faults(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let (_, body) = self.get_json("/_fake/chaos").await?;
        Ok(body["faults"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
            .collect())
    }

    pub(crate) async fn set_chaos(&self, chaos: Option<&Chaos>) -> anyhow::Result<()> {
        let url = format!("{}/_fake/chaos", self.base_url);
        let response = match chaos {
            Some(c) => self.http.post(url).body(c.to_json().to_string()).send(),
            None => self.http.delete(url).send(),
        }
        .await?;
        ensure!(
            response.status().is_success(),
            "/_fake/chaos answered {}",
            response.status()
        );
        Ok(())
    }

    /// Stops the fake (SIGTERM) and checks it exited 0.
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        stop_child(&mut self.child, "fake-bace")
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}

/// The broker as a child process.
pub(crate) struct BrokerProc {
    child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) log: PathBuf,
}

impl BrokerProc {
    pub(crate) fn spawn(
        bin: &Path,
        config: &Path,
        addr: SocketAddr,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let out = File::create(log)?;
        let child = Command::new(bin)
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            // Failures are logged at warn: under chaos, info would be most of the broker's work.
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            child,
            addr,
            log: log.to_owned(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the broker has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the broker exited ({status}); see {}", self.log.display());
        }
        Ok(())
    }

    pub(crate) async fn channel(&self) -> anyhow::Result<Channel> {
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))?
            .connect_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match endpoint.connect().await {
                Ok(channel) => return Ok(channel),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "cannot connect to the broker ({e}); see {}",
                        self.log.display()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub(crate) async fn client(&self) -> anyhow::Result<TokenBrokerServiceClient<Channel>> {
        Ok(TokenBrokerServiceClient::new(self.channel().await?))
    }

    /// Waits until the readiness service says SERVING (the warm-up ran).
    pub(crate) async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut health = HealthClient::new(self.channel().await?);
        loop {
            self.check_alive()?;
            let status = health
                .check(HealthCheckRequest {
                    service: READINESS_SERVICE.into(),
                })
                .await
                .map(|r| r.into_inner().status);
            if status.ok() == Some(ServingStatus::Serving as i32) {
                return Ok(start.elapsed());
            }
            ensure!(
                start.elapsed() < limit,
                "broker not ready after {limit:?}; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends SIGHUP (reload the config).
    pub(crate) fn reload(&self) -> anyhow::Result<()> {
        signal(self.pid(), "-HUP")
    }

    /// Resident memory (KiB) and open file descriptors now.
    pub(crate) fn sample(&self) -> anyhow::Result<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS in /proc/PID/status")?;
        let fds = fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count() as u64;
        Ok((rss, fds))
    }

    /// Stops the broker (SIGTERM) and checks it exited 0.
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        stop_child(&mut self.child, "the broker")
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}

/// Lines of `log` that tell of a panic (Rust's panic message, or a tracing event about one).
pub(crate) fn panics_in(log: &Path) -> anyhow::Result<Vec<String>> {
    let file = File::open(log)?;
    let mut found = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        if line.contains("panicked")
            || (line.contains("panic") && line.contains("\"level\":\"ERROR\""))
        {
            found.push(line.chars().take(300).collect());
        }
    }
    Ok(found)
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill {sig} {pid} failed");
    Ok(())
}

/// Kills `child` if it still runs (a run that ends early leaves no process behind).
fn kill_if_running(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn stop_child(child: &mut Child, what: &str) -> anyhow::Result<()> {
    if let Some(status) = child.try_wait()? {
        bail!("{what} had already exited ({status})");
    }
    signal(child.id(), "-TERM")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            ensure!(
                status.success(),
                "{what} exited with {status} after SIGTERM"
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what} did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
