//! `serve --demo`: an embedded fake BACE on loopback, three demo accounts with short token
//! lifetimes, and a little traffic, so a newcomer watches logins, refreshes, a fallback from a
//! failed refresh to a login, and single flight happen in the logs.
//!
//! Accounts: `demo-fleet-a` and `demo-fleet-b` (BACE-style refresh answers: the token is
//! extended in place), `demo-fleet-c` (standard OAuth2 refresh: a new token each time; it gets
//! the traffic bursts).
//!
//! The fake is test equipment (`crates/fake-bace`), compiled in only with the `demo` feature
//! (on by default; the container image is built without it).

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context;
use reqwest::Url;
use tracing::{info, warn};

use fake_bace::{ErrorShape, FakeAccount, FakeBace, FakeOptions, Grant, RefreshStyle, Step};

use crate::{
    app,
    config::{AccountConfig, Config, Credentials},
    proto::{self, token_broker_service_client::TokenBrokerServiceClient},
    token::AccountName,
};

/// Callers in each demo burst.
const BURST: usize = 40;
/// Time between bursts.
const BURST_EVERY: Duration = Duration::from_secs(8);

/// Runs the demo until `shutdown` resolves.
pub(crate) async fn run(
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let fake = FakeBace::start(FakeOptions::default())
        .await
        .context("starting the fake BACE")?;
    let accounts = [
        ("demo-fleet-a", RefreshStyle::Bace, 45, 90),
        ("demo-fleet-b", RefreshStyle::Bace, 60, 120),
        (
            "demo-fleet-c",
            RefreshStyle::OAuth2 {
                rotate_refresh_token: true,
                expires_in_as_string: false,
            },
            30,
            40,
        ),
    ];
    let token_url = fake.token_url().parse().context("the fake's token URL")?;
    let mut demo_accounts = Vec::new();
    for (name, style, login, refreshed) in accounts {
        let (username, password) = (format!("{name}@example.com"), format!("{name}-password"));
        let mut account = FakeAccount::new(
            username.as_str(),
            password.as_str(),
            "demo-client",
            "demo-secret",
        );
        account.refresh_style = style;
        account.login_lifetime = Duration::from_secs(login);
        account.refresh_lifetime = Duration::from_secs(refreshed);
        fake.add_account(account);
        demo_accounts.push(AccountConfig::new(
            AccountName::new(name).context("demo account name")?,
            Credentials::new("demo-client", "demo-secret", &username, &password),
            Url::clone(&token_url),
        ));
    }
    let mut config = Config::new(demo_accounts);
    config.listen = listen;
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.upstream.token_url = token_url;
    config.upstream.timeout = Duration::from_secs(5);
    config.refresh.lifetime_fraction = 0.6;
    config.refresh.expiry_margin = Duration::from_secs(2);
    config.refresh.backoff_initial = Duration::from_millis(500);
    config.refresh.backoff_max = Duration::from_secs(5);
    config.refresh.rejected_backoff = Duration::from_secs(30);
    let listeners = app::Listeners::bind(&config).await?;
    let addr = listeners.grpc.local_addr()?;
    info!(fake_bace = %fake.token_url(), "demo: fake BACE running; accounts demo-fleet-a, demo-fleet-b, demo-fleet-c");
    let traffic = tokio::spawn(traffic(addr, fake.clone()));
    let result = app::serve(config, listeners, shutdown).await;
    traffic.abort();
    fake.shutdown();
    result
}

/// Every [`BURST_EVERY`], [`BURST`] concurrent callers ask for a `demo-fleet-c` token that
/// must stay valid 30 s: most bursts need a refresh, and all callers share one upstream call.
/// Every third burst, BACE fails the refresh once, and the broker falls back to a login.
async fn traffic(addr: SocketAddr, fake: FakeBace) {
    let ip = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        addr.ip().to_string()
    };
    let url = format!("http://{ip}:{}", addr.port());
    let mut client = loop {
        match TokenBrokerServiceClient::connect(url.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let _ = client
        .get_token(proto::GetTokenRequest {
            account: "demo-fleet-c".into(),
            min_validity: None,
        })
        .await;
    let user = "demo-fleet-c@example.com";
    for round in 1u64.. {
        tokio::time::sleep(BURST_EVERY).await;
        if round % 3 == 0 {
            fake.script(user, Grant::Refresh, [Step::Status(503, ErrorShape::Yii)]);
        }
        let before = fake.total_calls();
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..BURST {
            let mut client = client.clone();
            calls.spawn(async move {
                client
                    .get_token(proto::GetTokenRequest {
                        account: "demo-fleet-c".into(),
                        min_validity: Some(prost_types::Duration {
                            seconds: 30,
                            nanos: 0,
                        }),
                    })
                    .await
            });
        }
        let mut ok = 0;
        while let Some(done) = calls.join_next().await {
            match done {
                Ok(Ok(_)) => ok += 1,
                Ok(Err(status)) => {
                    warn!(code = ?status.code(), message = status.message(), "demo caller failed")
                }
                Err(_) => {}
            }
        }
        let upstream_calls = fake.total_calls() - before;
        info!(
            callers = BURST,
            ok, upstream_calls, "demo burst on demo-fleet-c done"
        );
    }
}
