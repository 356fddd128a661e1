//! The broker under test: `bace-token-broker serve` as a child process pinned to the broker's
//! CPU, and what the harness reads of it (readiness, memory, CPU time, its log).

use std::{
    fs::{self, File},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bace_token_broker::{
    READINESS_SERVICE, proto::token_broker_service_client::TokenBrokerServiceClient,
};
use prost::Message;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{BROKER_CPU, opts::Opts, util::run_quiet, wire::get_request};

#[derive(Clone, Copy)]
pub(crate) struct Memory {
    pub(crate) rss_kb: u64,
    pub(crate) hwm_kb: u64,
}

/// Response frame sizes, from real tonic calls.
pub(crate) struct Expected {
    pub(crate) get_token_frame: u64,
    pub(crate) health_frame: u64,
}

pub(crate) struct BrokerProc {
    child: Child,
    pub(crate) addr: SocketAddr,
    log: PathBuf,
}

impl BrokerProc {
    pub(crate) fn spawn(opts: &Opts, name: &str, config: &Path) -> anyhow::Result<Self> {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        let log = opts.work.join(format!("broker-{name}.log"));
        let out = File::create(&log)?;
        let child = Command::new("taskset")
            .args(["-c", BROKER_CPU])
            .arg(&opts.broker_bin)
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .arg("--listen")
            .arg(addr.to_string())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the broker")?;
        Ok(Self { child, addr, log })
    }

    fn pid(&self) -> u32 {
        // `taskset CPU CMD` execs CMD: the child's pid is the broker's.
        self.child.id()
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        self.channel_to(self.addr).await
    }

    /// A plaintext channel to `addr`, one of the broker's ports.
    async fn channel_to(&self, addr: SocketAddr) -> anyhow::Result<Channel> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match endpoint.connect().await {
                Ok(ch) => return Ok(ch),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "cannot connect to the broker ({e}); see {}",
                        self.log.display()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub(crate) async fn client(&self) -> anyhow::Result<TokenBrokerServiceClient<Channel>> {
        Ok(TokenBrokerServiceClient::new(self.channel().await?))
    }

    pub(crate) async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        self.wait_ready_on(self.addr, limit).await
    }

    /// Waits for readiness as told by the plaintext health service on `addr` (the gRPC port,
    /// or `health_listen` when the gRPC port speaks TLS).
    pub(crate) async fn wait_ready_on(
        &self,
        addr: SocketAddr,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let mut health = HealthClient::new(self.channel_to(addr).await?);
        let deadline = Instant::now() + limit;
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: READINESS_SERVICE.into(),
                })
                .await
                .map(|r| r.into_inner().status);
            if status.as_ref().ok() == Some(&(ServingStatus::Serving as i32)) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "broker not ready after {limit:?}; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One real tonic call of each RPC: status OK, and the size of the response frames.
    pub(crate) async fn check_unary(&self, account: &str) -> anyhow::Result<Expected> {
        let channel = self.channel().await?;
        let token = TokenBrokerServiceClient::new(channel.clone())
            .get_token(get_request(account))
            .await
            .context("GetToken")?
            .into_inner();
        ensure!(token.token.is_some(), "GetToken answered without a token");
        let health = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .context("Health/Check")?
            .into_inner();
        ensure!(health.status == ServingStatus::Serving as i32);
        Ok(Expected {
            get_token_frame: 5 + token.encoded_len() as u64,
            health_frame: 5 + health.encoded_len() as u64,
        })
    }

    /// Resets the process's peak RSS counter, has it reload its (unchanged) config with
    /// SIGHUP, waits for the reload to be logged, and reads the memory figures.
    pub(crate) async fn reload_peak(&self) -> anyhow::Result<Memory> {
        fs::write(format!("/proc/{}/clear_refs", self.pid()), "5")
            .context("cannot reset the peak RSS counter")?;
        let before = fs::read_to_string(&self.log)?
            .matches("config reloaded")
            .count();
        run_quiet(Command::new("kill").args(["-HUP", &self.pid().to_string()]))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while fs::read_to_string(&self.log)?
            .matches("config reloaded")
            .count()
            == before
        {
            ensure!(Instant::now() < deadline, "no reload logged within 120 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.memory()
    }

    pub(crate) fn memory(&self) -> anyhow::Result<Memory> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .context(format!("{name} in /proc/PID/status"))
        };
        let (rss_kb, hwm_kb) = (field("VmRSS:")?, field("VmHWM:")?);
        Ok(Memory { rss_kb, hwm_kb })
    }

    /// User + system CPU time of the broker so far, in clock ticks (1/100 s).
    pub(crate) fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        let after = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields after the command: state is index 0; utime and stime are fields 14 and 15.
        Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
    }

    /// The `waiters` of every `token obtained` line in the broker's log.
    pub(crate) fn flight_waiters(&self) -> anyhow::Result<Vec<u64>> {
        let log = fs::read_to_string(&self.log)?;
        Ok(log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "token obtained")
            .filter_map(|v| v["waiters"].as_u64())
            .collect())
    }

    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        run_quiet(Command::new("kill").args(["-TERM", &self.pid().to_string()]))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "broker exited with {status}");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("broker did not stop within 20 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
