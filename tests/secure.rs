//! Caller identity and per-account authorization over the wire: a real broker with mTLS and
//! with Kubernetes service-account tokens, real tonic clients, the fake BACE.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bace_token_broker::{Config, Listeners, READINESS_SERVICE, proto};
use fake_bace::Grant;
use testkit::{
    BrokerConfig, Jwks, Kubernetes, fake, guard,
    pki::{self, Ca, Leaf, SigningKey, sa_claims},
    user,
};
use tokio::sync::oneshot;
use tonic::{
    Code, Request,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const WORKER: &str = "spiffe://cluster.local/ns/ingest/sa/worker";
const STRANGER: &str = "spiffe://cluster.local/ns/other/sa/x";

struct Secure {
    grpc: SocketAddr,
    health: Option<SocketAddr>,
    metrics: SocketAddr,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(config: Config) -> Secure {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health = match config.tls {
        Some(_) => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        None => None,
    };
    let addrs = (
        grpc.local_addr().unwrap(),
        health.as_ref().map(|h| h.local_addr().unwrap()),
        metrics.local_addr().unwrap(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = Listeners {
        grpc,
        metrics: Some(metrics),
        health,
    };
    let server = tokio::spawn(bace_token_broker::serve(config, listeners, async {
        let _ = stopped.await;
    }));
    Secure {
        grpc: addrs.0,
        health: addrs.1,
        metrics: addrs.2,
        stop,
        server,
    }
}

impl Secure {
    async fn stop(self) {
        let _ = self.stop.send(());
        guard(self.server).await.unwrap().unwrap();
    }

    async fn metric(&self, key: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

async fn tls_client(
    addr: SocketAddr,
    ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<
    proto::token_broker_service_client::TokenBrokerServiceClient<Channel>,
    tonic::transport::Error,
> {
    let channel = pki::tls_channel(addr, ca, identity).await?;
    Ok(proto::token_broker_service_client::TokenBrokerServiceClient::new(channel))
}

/// Writes `text` to `dir/name`; the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn get(account: &str) -> proto::GetTokenRequest {
    proto::GetTokenRequest {
        account: account.into(),
        min_validity: None,
    }
}

async fn wait_ready(addr: SocketAddr) {
    guard(async {
        loop {
            if let Ok(channel) = Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
            {
                let ready = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: READINESS_SERVICE.into(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32);
                if ready {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn mtls_callers_get_only_the_accounts_they_are_allowed() {
    let fake = fake(&["fleet-a", "fleet-b"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, other_ca) = (Ca::new("broker CA"), Ca::new("someone else"));
    let server = ca.server(1);
    let write = |name: &str, text: &str| write(dir.path(), name, text);
    let config = BrokerConfig::for_fake(&fake, &["fleet-a", "fleet-b"])
        .tls(
            &write("tls.crt", &server.cert_pem),
            &write("tls.key", &server.key_pem),
            Some(&write("ca.crt", &ca.pem())),
        )
        .allow(WORKER, &["fleet-a"]);
    let broker = start(config.build()).await;
    // Probes use the plaintext health port: no certificate needed there.
    wait_ready(broker.health.unwrap()).await;

    let worker = ca.client_uri(WORKER);
    let mut client = tls_client(broker.grpc, &ca, Some(&worker)).await.unwrap();
    let token = client
        .get_token(get("fleet-a"))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert!(fake.is_valid(&token.access_token));
    for account in ["fleet-b", "no-such-account", ""] {
        let status = client.get_token(get(account)).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{account:?}: no enumeration"
        );
    }
    let status = client
        .invalidate(proto::InvalidateRequest {
            account: "fleet-b".into(),
            access_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let listed = client
        .list_accounts(proto::ListAccountsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = listed.accounts.iter().map(|a| a.account.as_str()).collect();
    assert_eq!(names, ["fleet-a"]);
    let mut watch = client
        .watch_token(proto::WatchTokenRequest {
            account: "fleet-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(guard(watch.message()).await.unwrap().is_some());
    let status = client
        .watch_token(proto::WatchTokenRequest {
            account: "fleet-b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Another identity from the right CA: nothing allowed.
    let mut stranger = tls_client(broker.grpc, &ca, Some(&ca.client_uri(STRANGER)))
        .await
        .unwrap();
    assert_eq!(
        stranger.get_token(get("fleet-a")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // No client certificate, or one from another CA: the TLS handshake refuses it.
    for identity in [None, Some(other_ca.client_uri(WORKER))] {
        let refused = match tls_client(broker.grpc, &ca, identity.as_ref()).await {
            Err(_) => true,
            Ok(mut c) => c
                .get_token(get("fleet-a"))
                .await
                .is_err_and(|s| s.code() != Code::PermissionDenied),
        };
        assert!(refused);
    }
    // Health and reflection need no identity on the TLS port either.
    let channel = pki::tls_channel(broker.grpc, &ca, Some(&worker))
        .await
        .unwrap();
    assert!(
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .is_ok()
    );

    assert_eq!(
        broker
            .metric("bace_broker_auth_denied_total{reason=\"not allowed\"}")
            .await,
        6.0
    );
    assert_eq!(fake.calls(&user("fleet-b"), Grant::Password), 1);
    broker.stop().await;
}

#[tokio::test]
async fn service_account_tokens_identify_callers() {
    let fake = fake(&["fleet-a", "fleet-b"]).await;
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::es256("k1");
    let config = BrokerConfig::for_fake(&fake, &["fleet-a", "fleet-b"])
        .kubernetes(Kubernetes::new(
            pki::ISSUER,
            Jwks::File(key.jwks_file(dir.path())),
        ))
        .allow("system:serviceaccount:reports:exporter", &["*"])
        .allow("system:serviceaccount:ingest:worker", &["fleet-b"]);
    let broker = start(config.build()).await;
    wait_ready(broker.grpc).await;
    let channel = Endpoint::from_shared(format!("http://{}", broker.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = proto::token_broker_service_client::TokenBrokerServiceClient::new(channel);
    let with = |bearer: Option<String>, account: &str| {
        let mut request = Request::new(get(account));
        if let Some(b) = bearer {
            request
                .metadata_mut()
                .insert("authorization", b.parse().unwrap());
        }
        request
    };
    let exporter = key.bearer(&sa_claims("reports", "exporter"));
    for account in ["fleet-a", "fleet-b"] {
        let token = client
            .get_token(with(Some(exporter.clone()), account))
            .await
            .unwrap();
        assert!(fake.is_valid(&token.into_inner().token.unwrap().access_token));
    }
    // "*" may see that an account does not exist.
    let status = client
        .get_token(with(Some(exporter.clone()), "nope"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let worker = key.bearer(&sa_claims("ingest", "worker"));
    assert!(
        client
            .get_token(with(Some(worker.clone()), "fleet-b"))
            .await
            .is_ok()
    );
    let status = client
        .get_token(with(Some(worker), "fleet-a"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut expired = sa_claims("reports", "exporter");
    expired["exp"] = serde_json::json!(expired["iat"].as_i64().unwrap() - 3600);
    let mut wrong_aud = sa_claims("reports", "exporter");
    wrong_aud["aud"] = serde_json::json!(["someone-else"]);
    let cases = [
        (None, "unauthenticated: no identity"),
        (Some(key.bearer(&expired)), "unauthenticated: expired token"),
        (
            Some(key.bearer(&wrong_aud)),
            "unauthenticated: wrong audience",
        ),
        (
            Some(SigningKey::es256("k1").bearer(&sa_claims("reports", "exporter"))),
            "unauthenticated: bad signature",
        ),
        (
            Some("Bearer not-a-jwt".to_owned()),
            "unauthenticated: malformed token",
        ),
    ];
    for (bearer, message) in cases {
        let status = client.get_token(with(bearer, "fleet-a")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{message}");
        assert_eq!(status.message(), message);
        assert!(!status.message().contains("eyJ"), "no token in the message");
    }
    assert_eq!(
        broker
            .metric("bace_broker_auth_denied_total{reason=\"expired token\"}")
            .await,
        1.0
    );
    // Each token that verified was verified once, then answered from the cache (the exporter's
    // twice, the worker's once); each refused token was verified, and none was cached.
    let cache = |result: &str| format!("bace_broker_auth_token_cache_total{{result=\"{result}\"}}");
    assert_eq!(broker.metric(&cache("hit")).await, 3.0);
    assert_eq!(broker.metric(&cache("miss")).await, 6.0);

    broker.stop().await;
}

#[tokio::test]
async fn allow_list_and_server_certificate_reload_live() {
    let fake = fake(&["fleet-a"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, next_ca) = (Ca::new("broker CA"), Ca::new("next broker CA"));
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        let tmp = dir.path().join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    };
    let server = ca.server(1);
    let (cert, key_file) = (
        write("tls.crt", &server.cert_pem),
        write("tls.key", &server.key_pem),
    );
    let client_ca = write("ca.crt", &ca.pem());
    let config = |allowed: &str| {
        let config = BrokerConfig::for_fake(&fake, &["fleet-a"])
            .tls(&cert, &key_file, Some(&client_ca))
            .allow(WORKER, &[allowed]);
        write("config.yaml", &config.to_yaml())
    };
    let path = config("none-yet");
    let broker = start(Config::load(&path).unwrap()).await;
    wait_ready(broker.health.unwrap()).await;
    let worker = ca.client_uri(WORKER);
    let mut client = tls_client(broker.grpc, &ca, Some(&worker)).await.unwrap();
    assert_eq!(
        client.get_token(get("fleet-a")).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // The allow list changes: the same connection is now allowed.
    config("fleet-a");
    guard(async {
        while broker
            .metric("bace_broker_config_reloads_total{outcome=\"unchanged\"}")
            .await
            < 1.0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(client.get_token(get("fleet-a")).await.is_ok());

    // The server certificate rotates (to one from another CA): new connections get it, the
    // open one keeps working.
    assert!(
        tls_client(broker.grpc, &next_ca, Some(&worker))
            .await
            .is_err()
    );
    let rotated = next_ca.server(2);
    write("tls.key", &rotated.key_pem);
    write("tls.crt", &rotated.cert_pem);
    guard(async {
        loop {
            if let Ok(mut c) = tls_client(broker.grpc, &next_ca, Some(&worker)).await
                && c.get_token(get("fleet-a")).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        client.get_token(get("fleet-a")).await.is_ok(),
        "the old connection still works"
    );
    broker.stop().await;
}

#[tokio::test]
async fn certificates_and_service_account_tokens_work_together_on_one_port() {
    let fake = fake(&["fleet-a"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("broker CA");
    let server = ca.server(1);
    let key = SigningKey::es256("k1");
    let write = |name: &str, text: &str| write(dir.path(), name, text);
    let config = BrokerConfig::for_fake(&fake, &["fleet-a"])
        .tls(
            &write("tls.crt", &server.cert_pem),
            &write("tls.key", &server.key_pem),
            Some(&write("ca.crt", &ca.pem())),
        )
        .kubernetes(Kubernetes::new(
            pki::ISSUER,
            Jwks::File(write("jwks.json", &key.jwks())),
        ))
        .allow(WORKER, &["fleet-a"])
        .allow("system:serviceaccount:reports:exporter", &["fleet-a"]);
    let broker = start(config.build()).await;
    wait_ready(broker.health.unwrap()).await;
    // A client certificate identifies the caller...
    let mut with_cert = tls_client(broker.grpc, &ca, Some(&ca.client_uri(WORKER)))
        .await
        .unwrap();
    assert!(with_cert.get_token(get("fleet-a")).await.is_ok());
    // ...or, without one, a service-account token does; with neither: UNAUTHENTICATED.
    let mut without_cert = tls_client(broker.grpc, &ca, None).await.unwrap();
    let mut request = Request::new(get("fleet-a"));
    let bearer = key.bearer(&sa_claims("reports", "exporter"));
    request
        .metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    assert!(without_cert.get_token(request).await.is_ok());
    let status = without_cert.get_token(get("fleet-a")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // A certificate from another CA is still refused in the handshake.
    let rogue = Ca::new("rogue").client_uri(WORKER);
    let refused = match tls_client(broker.grpc, &ca, Some(&rogue)).await {
        Err(_) => true,
        Ok(mut c) => c
            .get_token(get("fleet-a"))
            .await
            .is_err_and(|s| s.code() != Code::Unauthenticated),
    };
    assert!(refused);
    broker.stop().await;
}
