//! A real broker server on loopback in front of the fake BACE, and real tonic clients for it.

use std::{net::SocketAddr, time::Duration};

use bace_token_broker::{
    Config, Listeners, READINESS_SERVICE,
    proto::{self, token_broker_service_client::TokenBrokerServiceClient},
};
use fake_bace::{FakeAccount, FakeBace, FakeOptions};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Guard against hangs only (never a timing assertion).
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// Awaits `f`, failing the test if it hangs past [`HANG_GUARD`].
pub async fn guard<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(HANG_GUARD, f)
        .await
        .expect("hang guard")
}

/// Whether the broker behind `url` (`http://host:port` of its gRPC or health port) is ready:
/// its health service says `SERVING` for [`READINESS_SERVICE`]. Not listening yet, or any other
/// failure to ask, is "not ready" (for polling a broker process that is starting).
pub async fn is_ready(url: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_owned()) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: READINESS_SERVICE.into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

/// The fake BACE user of a test account.
pub fn user(account: &str) -> String {
    format!("{account}@example.com")
}

/// A fake BACE account for `account`, with its own password.
pub fn fake_account(account: &str) -> FakeAccount {
    FakeAccount::new(
        user(account),
        crate::password(account),
        crate::CLIENT_ID,
        crate::CLIENT_SECRET,
    )
}

/// Starts a fake BACE holding `accounts`.
pub async fn fake(accounts: &[&str]) -> FakeBace {
    let fake = FakeBace::start(FakeOptions::default())
        .await
        .expect("fake BACE");
    for a in accounts {
        fake.add_account(fake_account(a));
    }
    fake
}

/// A running broker.
pub struct BrokerServer {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub client: TokenBrokerServiceClient<Channel>,
    pub health: HealthClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<anyhow::Result<()>>,
}

impl BrokerServer {
    /// Starts a broker with `config` on 127.0.0.1:0 and connects to it, without waiting for
    /// readiness.
    pub async fn start(config: &crate::BrokerConfig) -> Self {
        Self::start_config(config.build()).await
    }

    /// Starts a broker for `config` (from [`Config::load`] to have live reload).
    pub async fn start_config(config: Config) -> Self {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let listeners = Listeners {
            grpc,
            metrics: Some(metrics),
            health: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(bace_token_broker::serve(config, listeners, async {
            let _ = stopped.await;
        }));
        let channel = channel(addr).await;
        Self {
            addr,
            metrics_addr,
            client: TokenBrokerServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            stop: Some(stop),
            server,
        }
    }

    /// Starts a broker and waits until it reports ready (warm-up done).
    pub async fn ready(config: &crate::BrokerConfig) -> Self {
        let broker = Self::start(config).await;
        broker
            .wait_status(READINESS_SERVICE, ServingStatus::Serving)
            .await;
        broker
    }

    /// Waits (through Health/Watch) until `service` reports `want`.
    pub async fn wait_status(&self, service: &str, want: ServingStatus) {
        let mut health = self.health.clone();
        let wait = async {
            let mut stream = health
                .watch(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health watch")
                .into_inner();
            while let Some(msg) = stream.message().await.expect("health stream") {
                if msg.status == want as i32 {
                    return;
                }
            }
            panic!("health stream ended before {service:?} was {want:?}");
        };
        tokio::time::timeout(HANG_GUARD, wait)
            .await
            .expect("health status in time");
    }

    /// Scrapes `/metrics`: every sample line as `name{labels}` → value.
    pub async fn scrape(&self) -> std::collections::HashMap<String, f64> {
        scrape(self.metrics_addr).await
    }

    /// A new client on its own connection.
    pub async fn new_client(&self) -> TokenBrokerServiceClient<Channel> {
        TokenBrokerServiceClient::new(channel(self.addr).await)
    }

    /// A WatchToken stream of `account`, on a connection of its own.
    pub async fn watch(&self, account: &str) -> tonic::Streaming<proto::WatchTokenResponse> {
        self.new_client()
            .await
            .watch_token(proto::WatchTokenRequest {
                account: account.into(),
            })
            .await
            .expect("watch")
            .into_inner()
    }

    /// GetToken with no minimum validity.
    pub async fn get(&self, account: &str) -> Result<proto::Token, tonic::Status> {
        get(self.client.clone(), account).await
    }

    /// Invalidate.
    pub async fn invalidate(
        &self,
        account: &str,
        token: &str,
    ) -> Result<proto::InvalidateResponse, tonic::Status> {
        self.client
            .clone()
            .invalidate(proto::InvalidateRequest {
                account: account.into(),
                access_token: token.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// `n` concurrent Invalidate calls, each reporting `token` for `account`.
    pub fn invalidations(
        &self,
        n: usize,
        account: &str,
        token: &str,
    ) -> tokio::task::JoinSet<Result<proto::InvalidateResponse, tonic::Status>> {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..n {
            let mut client = self.client.clone();
            let request = proto::InvalidateRequest {
                account: account.into(),
                access_token: token.into(),
            };
            calls.spawn(async move { client.invalidate(request).await.map(|r| r.into_inner()) });
        }
        calls
    }

    /// Triggers shutdown and returns how the server ended.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for the server to end; its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.begin_stop();
        tokio::time::timeout(HANG_GUARD, self.server)
            .await
            .expect("server stops in time")
            .expect("server task")
    }
}

/// GetToken on `client`.
pub async fn get(
    mut client: TokenBrokerServiceClient<Channel>,
    account: &str,
) -> Result<proto::Token, tonic::Status> {
    get_min(&mut client, account, None).await
}

/// GetToken with a minimum validity.
pub async fn get_min(
    client: &mut TokenBrokerServiceClient<Channel>,
    account: &str,
    min_validity: Option<Duration>,
) -> Result<proto::Token, tonic::Status> {
    client
        .get_token(proto::GetTokenRequest {
            account: account.into(),
            min_validity: min_validity.map(|d| d.try_into().unwrap()),
        })
        .await
        .map(|r| r.into_inner().token.expect("token set on OK"))
}

/// Scrapes the `/metrics` of `metrics_addr`: every sample line as `name{labels}` → value.
pub async fn scrape(metrics_addr: SocketAddr) -> std::collections::HashMap<String, f64> {
    let response = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .expect("scrape");
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    // Well-formed exposition: each metric family described once, each series once.
    let mut families = std::collections::HashSet::new();
    for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(families.insert(l.to_owned()), "described twice: {l}");
    }
    for l in text.lines().filter(|l| l.starts_with("# HELP ")) {
        assert!(l.ends_with('.'), "help without a full stop: {l}");
    }
    let mut samples = std::collections::HashMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = l.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().expect("sample value");
        assert!(
            samples.insert(name.to_owned(), value).is_none(),
            "series twice: {name}"
        );
    }
    samples
}

/// A lazily connected channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to broker")
}
