//! Broker processes: several replicas of one broker (the release or debug binary), each with its
//! own config file, ports and log, for the multi-process store tests, the bench and the demo.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use bace_token_broker::proto::{self, token_broker_service_client::TokenBrokerServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::BrokerConfig;

/// Budget for a replica to become ready (a guard against hangs, not a timing assertion).
pub const REPLICA_READY_WITHIN: Duration = Duration::from_secs(60);

/// A free loopback port (bound and released: a race with other processes is possible but
/// harmless in tests, which pick ports this way everywhere).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One broker process.
pub struct Replica {
    /// A name for messages (`r1`, ...).
    pub name: String,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its metrics address.
    pub metrics_addr: SocketAddr,
    child: Option<Child>,
    rust_log: String,
}

impl Replica {
    /// Writes `config` (with fresh loopback ports) to `dir/NAME.yaml` and starts `bin serve`
    /// on it, logging (JSON) to `dir/NAME.log`. Does not wait for readiness.
    pub fn start(bin: &Path, dir: &Path, name: &str, config: &BrokerConfig) -> Self {
        Self::start_logging(bin, dir, name, config, "info,bace_token_broker=debug")
    }

    /// [`Replica::start`] with its own `RUST_LOG` filter.
    pub fn start_logging(
        bin: &Path,
        dir: &Path,
        name: &str,
        config: &BrokerConfig,
        rust_log: &str,
    ) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = config
            .clone()
            .listen(addr)
            .metrics_listen(Some(metrics_addr))
            .write(dir, &format!("{name}.yaml"));
        let mut replica = Self {
            name: name.to_owned(),
            bin: bin.to_owned(),
            config,
            log: dir.join(format!("{name}.log")),
            addr,
            metrics_addr,
            child: None,
            rust_log: rust_log.to_owned(),
        };
        replica.spawn(false);
        replica
    }

    fn spawn(&mut self, append: bool) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&self.log)
            .expect("replica log file");
        let child = Command::new(&self.bin)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Replaces its config file with `config` (its ports kept), atomically: the running
    /// process reloads it.
    pub fn rewrite_config(&self, config: &BrokerConfig) {
        let yaml = config
            .clone()
            .listen(self.addr)
            .metrics_listen(Some(self.metrics_addr))
            .to_yaml();
        let tmp = self.config.with_extension("tmp");
        fs::write(&tmp, yaml).expect("write the config");
        fs::rename(&tmp, &self.config).expect("replace the config");
    }

    /// `http://ADDR` of its gRPC port.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its readiness service says SERVING; panics with its log if it exits or
    /// [`REPLICA_READY_WITHIN`] passes.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + REPLICA_READY_WITHIN;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().expect("try_wait")
            {
                panic!(
                    "replica {} exited with {status} before ready:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if crate::is_ready(&self.url()).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} not ready within {REPLICA_READY_WITHIN:?}:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A new client of its gRPC port.
    pub async fn client(&self) -> TokenBrokerServiceClient<Channel> {
        TokenBrokerServiceClient::new(crate::channel(self.addr).await)
    }

    /// GetToken for `account`.
    pub async fn get(&self, account: &str) -> Result<proto::Token, tonic::Status> {
        crate::get(self.client().await, account).await
    }

    /// Its `/metrics`, as `series → value`.
    pub async fn scrape(&self) -> std::collections::HashMap<String, f64> {
        crate::scrape(self.metrics_addr).await
    }

    /// Sends SIGTERM and waits for the exit; panics if it fails.
    pub fn terminate(&mut self) {
        self.signal_and_wait("TERM");
    }

    /// Sends SIGKILL and waits for the exit.
    pub fn kill(&mut self) {
        self.signal_and_wait("KILL");
    }

    fn signal_and_wait(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
            let status = child.wait().expect("wait for the replica");
            if signal == "TERM" {
                assert!(
                    status.success(),
                    "replica {} exited with {status} after SIGTERM:\n{}",
                    self.name,
                    self.logs()
                );
            }
        }
    }

    /// Starts it again (same config, ports and log, appended).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "replica {} is running", self.name);
        self.spawn(true);
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
