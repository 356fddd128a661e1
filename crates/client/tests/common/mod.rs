//! Test equipment: the real broker binary as a child process in front of the in-process fake
//! BACE, its call counts read from `/metrics`, the usual scene of the three with a client, calls
//! released together, and a free-port helper.
//!
//! Every wait on the child process is a bounded poll (readiness on the health service, counts on
//! `/metrics`); nothing sleeps to synchronise.
#![allow(dead_code, unreachable_pub)]

use std::{
    future::Future,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use bace_token_broker_client::BrokerClient;

use fake_bace::FakeBace;
use testkit::BrokerConfig;

/// The account every test uses.
pub const ACCOUNT: &str = "fleet-a";
/// Budget for waits on the child process (a hang guard, not a timing assertion).
pub const WITHIN: Duration = Duration::from_secs(60);

/// The broker binary, built by `cargo build --workspace --bins` (scripts/test-all does).
pub fn broker_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let bin = target.join("debug").join("bace-token-broker");
    assert!(
        bin.is_file(),
        "the broker binary {} is missing: run `cargo build -p bace-token-broker --bins` \
         (scripts/test-all builds every binary before the tests)",
        bin.display()
    );
    bin
}

/// A loopback address that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
}

/// Awaits `f`, failing the test if it hangs.
pub async fn guard<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(WITHIN, f).await.expect("hang guard")
}

/// The fake BACE with the test account.
pub async fn fake() -> FakeBace {
    testkit::fake(&[ACCOUNT]).await
}

/// The broker binary, running. Killed on drop.
pub struct Broker {
    child: Option<Child>,
    config: PathBuf,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub url: String,
    /// Where readiness is asked: the gRPC port, or the plaintext health port with TLS.
    health_url: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Writes `config` and starts the broker on its `listen`, `metrics_listen` and (with TLS)
    /// `health_listen` addresses (which `config` must name); waits until it is ready.
    pub async fn start(
        config: &BrokerConfig,
        addr: SocketAddr,
        metrics: SocketAddr,
        health: Option<SocketAddr>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.yaml");
        std::fs::write(&path, config.to_yaml()).unwrap();
        let mut broker = Self {
            child: None,
            config: path,
            addr,
            metrics,
            url: format!("http://{addr}"),
            health_url: format!("http://{}", health.unwrap_or(addr)),
            _dir: dir,
        };
        broker.spawn().await;
        broker
    }

    /// A broker for `fake`'s account; `tune` adjusts the config.
    pub async fn for_fake(
        fake: &FakeBace,
        tune: impl FnOnce(BrokerConfig) -> BrokerConfig,
    ) -> Self {
        let addr = free_addr();
        let metrics = free_addr();
        let config = tune(
            BrokerConfig::for_fake(fake, &[ACCOUNT])
                .listen(addr)
                .metrics_listen(Some(metrics)),
        );
        Self::start(&config, addr, metrics, None).await
    }

    /// A broker for `fake`'s account with TLS settings from `tune`, and a plaintext health port.
    pub async fn for_fake_tls(
        fake: &FakeBace,
        tune: impl FnOnce(BrokerConfig) -> BrokerConfig,
    ) -> Self {
        let (addr, metrics, health) = (free_addr(), free_addr(), free_addr());
        let config = tune(
            BrokerConfig::for_fake(fake, &[ACCOUNT])
                .listen(addr)
                .metrics_listen(Some(metrics))
                .health_listen(health),
        );
        Self::start(&config, addr, metrics, Some(health)).await
    }

    async fn spawn(&mut self) {
        let log = self.config.with_extension("log");
        let child = Command::new(broker_bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env_remove("BACE_BROKER_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn the broker");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the broker exited with {status}:\n{}", self.logs());
            }
            if testkit::is_ready(&self.health_url).await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broker is not ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The broker's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default()
    }

    /// Kills the process (SIGKILL: no drain, connections just break) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again with the same config and ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// `metric{...}` samples whose labels contain every one of `labels`, summed.
    pub async fn metric(&self, metric: &str, labels: &[&str]) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .expect("scrape")
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    }

    /// Calls of `method` the broker has received.
    pub async fn calls(&self, method: &str) -> u64 {
        let label = format!("grpc_method=\"{method}\"");
        self.metric("grpc_server_started_total", &[&label]).await as u64
    }

    /// GetToken calls received.
    pub async fn get_token_calls(&self) -> u64 {
        self.calls("GetToken").await
    }

    /// Invalidate calls received.
    pub async fn invalidate_calls(&self) -> u64 {
        self.calls("Invalidate").await
    }

    /// Open WatchToken streams.
    pub async fn open_watches(&self) -> u64 {
        let started = self.calls("WatchToken").await;
        let handled = self
            .metric("grpc_server_handled_total", &["grpc_method=\"WatchToken\""])
            .await as u64;
        started - handled
    }

    /// Polls [`Broker::open_watches`] until it is `n` (bounded).
    pub async fn wait_open_watches(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let open = self.open_watches().await;
            if open == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{open} WatchToken streams open, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The fake BACE's API URL for `path` (`physical-device`: 200 for a valid token, 401 else;
/// `restricted`: 401 for every token).
pub fn api(fake: &FakeBace, path: &str) -> String {
    format!("{}/api/v2/{path}", fake.base_url())
}

/// The usual scene: the fake BACE, the broker binary in front of it with the test kit's
/// defaults, and a client of the broker.
pub async fn scene() -> (FakeBace, Broker, BrokerClient) {
    tuned_scene(|_, c| c).await
}

/// The scene with the broker's `upstream.verify_url` set to the fake's [`api`]
/// `physical-device` (a 401 there means the token is bad; elsewhere, a missing permission).
pub async fn verifying_scene() -> (FakeBace, Broker, BrokerClient) {
    tuned_scene(|fake, c| c.verify_url(api(fake, "physical-device"))).await
}

/// The scene with the broker's config adjusted by `tune`, given the fake.
pub async fn tuned_scene(
    tune: impl FnOnce(&FakeBace, BrokerConfig) -> BrokerConfig,
) -> (FakeBace, Broker, BrokerClient) {
    let fake = fake().await;
    let broker = Broker::for_fake(&fake, |c| tune(&fake, c)).await;
    let client = BrokerClient::new(&broker.url).unwrap();
    (fake, broker, client)
}

/// Runs `n` calls made by `call` in their own tasks, released together (a barrier) so that they
/// overlap; their outputs, once all are done (bounded by the hang guard).
pub async fn together<F, T>(n: usize, call: impl Fn() -> F) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (call, start) = (call(), start.clone());
        calls.spawn(async move {
            start.wait().await;
            call.await
        });
    }
    guard(calls.join_all()).await
}

/// Every call of [`together`] got an answer, and every answer was 200.
pub fn assert_all_ok<E: std::fmt::Debug>(statuses: &[Result<http::StatusCode, E>]) {
    for status in statuses {
        assert_eq!(*status.as_ref().unwrap(), http::StatusCode::OK);
    }
}
