//! Caller identity with real components: mTLS through `incoming` with certificates made
//! here (rcgen, `testkit::pki`), a tonic server and client; Kubernetes service-account tokens signed here and
//! checked against a JWKS served by a loopback fake that counts its requests, or read from a
//! file; the cache of verified tokens, seen through its hit and miss counts. Real time (paused
//! time for the cache's deadlines), loopback only, no fixed sleeps.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::get,
};
use bace_token_broker::{
    Authorizer, Denied, HANDSHAKE_TIMEOUT, MAX_CACHED_TOKEN_BYTES, TOKEN_CACHE_CAPACITY,
    TOKEN_CACHE_TTL, TlsAcceptor, TlsConn, TlsConnInfo, TokenCacheCounts,
    config::{MAX_FILE_BYTES, RawAuth, RawTls, TlsConfig},
    incoming, peer_identity,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::SanType;
use serde_json::{Value, json};
use testkit::{
    guard,
    pki::{self, AUDIENCE, Ca, ISSUER, Leaf, SigningKey, dns, now, sa_claims as claims, uri},
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinSet,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        crypto::aws_lc_rs,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    },
};
use tokio_stream::StreamExt as _;
use tonic::{
    Code, Request, Status,
    service::interceptor::InterceptedService,
    transport::{Channel, server::Connected},
};
use tonic_health::{
    pb::{HealthCheckRequest, health_client::HealthClient},
    server::HealthReporter,
};
use x509_parser::prelude::{FromDer, X509Certificate};

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/ingest/sa/worker";

// === Certificates: testkit::pki ===

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes `server` (and the client CA) to fixed names in `dir` and validates the config.
fn tls_files(dir: &Path, server: &Leaf, client_ca: Option<&Ca>) -> TlsConfig {
    RawTls {
        cert_file: write(dir, "tls.crt", &server.cert_pem),
        key_file: write(dir, "tls.key", &server.key_pem),
        client_ca_file: client_ca.map(|ca| write(dir, "ca.crt", &ca.pem())),
    }
    .validate()
    .unwrap()
}

// === A TLS server and clients ===

/// tonic's health service behind `incoming`, with an interceptor that records each
/// request's [`TlsConnInfo`] and refuses requests without a certificate identity.
struct TestServer {
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    seen: Arc<Mutex<Vec<TlsConnInfo>>>,
    _health: HealthReporter,
    _stop: oneshot::Sender<()>,
}

impl TestServer {
    async fn start(config: &TlsConfig) -> Self {
        let acceptor = TlsAcceptor::new(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (health, health_service) = tonic_health::server::health_reporter();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let service = InterceptedService::new(health_service, move |request: Request<()>| {
            let info = request
                .extensions()
                .get::<TlsConnInfo>()
                .cloned()
                .ok_or_else(|| Status::internal("no TlsConnInfo"))?;
            let known = info.peer_identity().is_some();
            record.lock().unwrap().push(info);
            if known {
                Ok(request)
            } else {
                Err(Status::unauthenticated("no identity"))
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming(listener, acceptor.clone()), async {
                    let _ = stopped.await;
                }),
        );
        Self {
            addr,
            acceptor,
            seen,
            _health: health,
            _stop: stop,
        }
    }

    fn last_seen(&self) -> TlsConnInfo {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }

    fn requests_seen(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

#[derive(Debug)]
enum Failure {
    /// No connection (TLS refused by either side); the text is for failure messages.
    Transport(#[allow(dead_code)] String),
    /// Connected, and the call failed with this code.
    Status(Code),
}

async fn connect(
    addr: SocketAddr,
    trust: &Ca,
    identity: Option<&Leaf>,
) -> Result<HealthClient<Channel>, Failure> {
    let channel = pki::tls_channel(addr, trust, identity)
        .await
        .map_err(|e| Failure::Transport(format!("{e:?}")))?;
    Ok(HealthClient::new(channel))
}

async fn check(client: &mut HealthClient<Channel>) -> Result<(), Failure> {
    match client.check(HealthCheckRequest::default()).await {
        Ok(_) => Ok(()),
        // TLS 1.3: a refused client certificate surfaces on the first call.
        Err(status) if status.code() == Code::Unavailable || status.code() == Code::Unknown => {
            Err(Failure::Transport(format!("{status:?}")))
        }
        Err(status) => Err(Failure::Status(status.code())),
    }
}

/// A new connection and one health check on it.
async fn call(addr: SocketAddr, trust: &Ca, identity: Option<&Leaf>) -> Result<(), Failure> {
    guard(async {
        let mut client = connect(addr, trust, identity).await?;
        check(&mut client).await
    })
    .await
}

/// The leaf certificate the server presents to a new connection (raw rustls client).
async fn served_certificate(
    addr: SocketAddr,
    trust: &[&Ca],
    identity: &Leaf,
) -> CertificateDer<'static> {
    let mut roots = RootCertStore::empty();
    for ca in trust {
        roots.add(ca.issuer.der().clone()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![identity.der.clone()],
            PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = guard(
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn issuer_of(cert: &CertificateDer<'_>) -> String {
    X509Certificate::from_der(cert)
        .unwrap()
        .1
        .issuer()
        .to_string()
}

// === mTLS ===

#[tokio::test]
async fn client_certificates_name_the_caller() {
    let (server_ca, clients) = (Ca::new("server-ca"), Ca::new("clients-ca"));
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start(&tls_files(dir.path(), &server_ca.server(1), Some(&clients))).await;
    let auth = authorizer(&format!(
        "allow:\n  - caller: {SPIFFE_ID}\n    accounts: [fleet-a]\n  - caller: exporter.reports.svc\n    accounts: ['*']\n"
    ));

    // A DNS SAN listed first does not win over the URI SAN.
    let spiffe = clients.client(vec![dns("worker.ingest.svc"), uri(SPIFFE_ID)]);
    // Two requests on one connection see the identity read at its handshake: one parse.
    let mut client = guard(connect(server.addr, &server_ca, Some(&spiffe)))
        .await
        .unwrap();
    guard(check(&mut client)).await.unwrap();
    let first = server.last_seen();
    guard(check(&mut client)).await.unwrap();
    let info = server.last_seen();
    assert!(info.remote_addr.ip().is_loopback());
    assert_eq!(info.identity.as_deref(), Some(SPIFFE_ID));
    assert!(Arc::ptr_eq(
        first.identity.as_ref().unwrap(),
        info.identity.as_ref().unwrap()
    ));
    assert_eq!(info.peer_identity().as_deref(), Some(SPIFFE_ID));
    let certs = info.peer_certs.clone().unwrap();
    // A verified certificate wins over whatever bearer value comes with it.
    let identity = auth
        .authenticate(Some("Bearer not-a-jwt"), Some(&certs))
        .await
        .unwrap();
    assert_eq!(identity, SPIFFE_ID);
    assert!(auth.authorize(&identity, "fleet-a"));
    assert!(!auth.authorize(&identity, "fleet-b"));

    let exporter = clients.client(vec![dns("exporter.reports.svc")]);
    call(server.addr, &server_ca, Some(&exporter))
        .await
        .unwrap();
    let certs = server.last_seen().peer_certs.unwrap();
    let identity = auth.authenticate(None, Some(&certs)).await.unwrap();
    assert_eq!(identity, "exporter.reports.svc");
    assert!(auth.authorize(&identity, "fleet-a") && auth.authorize(&identity, "anything"));

    // A certificate with neither a URI nor a DNS SAN names nobody.
    let ip_only = clients.client(vec![SanType::IpAddress([10, 0, 0, 1].into())]);
    match call(server.addr, &server_ca, Some(&ip_only)).await {
        Err(Failure::Status(Code::Unauthenticated)) => {}
        other => panic!("{other:?}"),
    }
    let seen = server.last_seen();
    assert_eq!(seen.identity, None);
    let certs = seen.peer_certs.unwrap();
    assert_eq!(peer_identity(&certs), None);
    assert_eq!(
        auth.authenticate(None, Some(&certs)).await,
        Err(Denied::NO_IDENTITY)
    );
}

#[tokio::test]
async fn wrong_ca_and_missing_client_certificate_are_refused() {
    let (server_ca, clients, rogue_ca) = (
        Ca::new("server-ca"),
        Ca::new("clients-ca"),
        Ca::new("rogue-ca"),
    );
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start(&tls_files(dir.path(), &server_ca.server(1), Some(&clients))).await;
    let good = clients.client(vec![uri(SPIFFE_ID)]);
    let rogue = rogue_ca.client(vec![uri(SPIFFE_ID)]);

    for (case, trust, identity) in [
        ("client cert from another CA", &server_ca, Some(&rogue)),
        ("no client cert", &server_ca, None),
        ("server cert from an untrusted CA", &rogue_ca, Some(&good)),
    ] {
        match call(server.addr, trust, identity).await {
            Err(Failure::Transport(_)) => {}
            other => panic!("{case}: {other:?}"),
        }
    }
    assert_eq!(
        server.requests_seen(),
        0,
        "no refused client got a request in"
    );
    call(server.addr, &server_ca, Some(&good)).await.unwrap();
    assert_eq!(server.requests_seen(), 1);
}

#[tokio::test]
async fn without_a_client_ca_no_certificate_is_asked_for() {
    let (server_ca, clients) = (Ca::new("server-ca"), Ca::new("clients-ca"));
    let dir = tempfile::tempdir().unwrap();
    let config = tls_files(dir.path(), &server_ca.server(1), None);
    let server = TestServer::start(&config).await;
    assert!(!server.acceptor.requires_client_cert());
    let good = clients.client(vec![uri(SPIFFE_ID)]);
    for identity in [None, Some(&good)] {
        match call(server.addr, &server_ca, identity).await {
            Err(Failure::Status(Code::Unauthenticated)) => {}
            other => panic!("{other:?}"),
        }
        assert!(server.last_seen().peer_certs.is_none());
        assert!(server.last_seen().identity.is_none());
    }
}

#[tokio::test]
async fn the_certificate_identity_is_read_at_the_handshake_and_the_allow_list_per_call() {
    let (server_ca, clients) = (Ca::new("server-ca"), Ca::new("clients-ca"));
    let dir = tempfile::tempdir().unwrap();
    let config = tls_files(dir.path(), &server_ca.server(1), Some(&clients));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut conns = Box::pin(incoming(listener, TlsAcceptor::new(&config).unwrap()));
    let spiffe = clients.client(vec![uri(SPIFFE_ID)]);

    // The connection comes out of the accept stream with its identity: no request yet.
    let trust = [&server_ca];
    let (conn, _) =
        guard(async { tokio::join!(conns.next(), served_certificate(addr, &trust, &spiffe)) })
            .await;
    let conn: TlsConn = conn.unwrap().unwrap();
    let info = conn.info();
    assert_eq!(info.identity.as_deref(), Some(SPIFFE_ID));
    // What each request gets is a clone: the same identity, not parsed again.
    let per_request = conn.connect_info();
    assert!(Arc::ptr_eq(
        info.identity.as_ref().unwrap(),
        per_request.identity.as_ref().unwrap()
    ));

    // Admission takes that identity and applies the allow list in use at each call.
    let allow =
        |accounts: &str| format!("allow:\n  - caller: {SPIFFE_ID}\n    accounts: {accounts}\n");
    let auth = authorizer(&allow("[fleet-a]"));
    let identity = per_request.identity.as_ref();
    let admit = |account: &'static str| auth.admit("GetToken", None, identity, Some(account));
    let admitted = admit("fleet-a").await.expect("admitted");
    assert!(
        Arc::ptr_eq(&admitted, identity.unwrap()),
        "the connection's identity itself, not a copy"
    );
    assert_eq!(admit("fleet-b").await, Err(Denied::PermissionDenied));
    let config = |yaml: &str| {
        bace_token_broker::config::from_yaml::<RawAuth>(yaml)
            .unwrap()
            .validate()
            .unwrap()
    };
    auth.reload(config(&allow("[fleet-b]"))).unwrap();
    assert_eq!(admit("fleet-a").await, Err(Denied::PermissionDenied));
    assert_eq!(admit("fleet-b").await.as_deref(), Ok(SPIFFE_ID));
    // The certificate wins over a bearer value, which is not even looked at.
    assert_eq!(
        auth.admit(
            "GetToken",
            Some("Bearer not-a-jwt"),
            identity,
            Some("fleet-b")
        )
        .await
        .as_deref(),
        Ok(SPIFFE_ID)
    );
    // Without one, the call needs a token.
    assert_eq!(
        auth.admit("GetToken", None, None, Some("fleet-b")).await,
        Err(Denied::NO_IDENTITY)
    );
    assert_eq!(auth.token_cache_counts(), TokenCacheCounts::default());
    let denied: u64 = auth.denials().iter().map(|(_, n)| n).sum();
    assert_eq!(denied, 3);
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_the_others() {
    let (server_ca, clients) = (Ca::new("server-ca"), Ca::new("clients-ca"));
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start(&tls_files(dir.path(), &server_ca.server(1), Some(&clients))).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Half a ClientHello record header, then nothing.
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    silent.push(half);

    // Well within the handshake timeout: only concurrent handshakes make this.
    let good = clients.client(vec![uri(SPIFFE_ID)]);
    let budget = HANDSHAKE_TIMEOUT / 2;
    tokio::time::timeout(budget, call(server.addr, &server_ca, Some(&good)))
        .await
        .expect("a good client waited for silent ones")
        .unwrap();
    drop(silent);
}

#[tokio::test]
async fn rotation_serves_new_connections_and_keeps_old_ones() {
    let (ca1, ca2) = (Ca::new("server-ca-1"), Ca::new("server-ca-2"));
    let (clients1, clients2) = (Ca::new("clients-ca-1"), Ca::new("clients-ca-2"));
    let dir = tempfile::tempdir().unwrap();
    let first = ca1.server(1);
    let config = tls_files(dir.path(), &first, Some(&clients1));
    let server = TestServer::start(&config).await;
    let client1 = clients1.client(vec![uri(SPIFFE_ID)]);
    let client2 = clients2.client(vec![uri(SPIFFE_ID)]);

    let mut old = guard(connect(server.addr, &ca1, Some(&client1)))
        .await
        .unwrap();
    guard(check(&mut old)).await.unwrap();
    let old_remote = server.last_seen().remote_addr;
    let served = served_certificate(server.addr, &[&ca1, &ca2], &client1).await;
    assert_eq!(served, first.der);

    // The server certificate rotates to one from another CA.
    let second = ca2.server(2);
    assert_eq!(tls_files(dir.path(), &second, Some(&clients1)), config);
    server.acceptor.reload(&config).unwrap();
    let served = served_certificate(server.addr, &[&ca1, &ca2], &client1).await;
    assert_eq!(served, second.der);
    assert!(
        issuer_of(&served).contains("server-ca-2"),
        "{}",
        issuer_of(&served)
    );
    assert!(matches!(
        call(server.addr, &ca1, Some(&client1)).await,
        Err(Failure::Transport(_))
    ));
    call(server.addr, &ca2, Some(&client1)).await.unwrap();
    guard(check(&mut old)).await.unwrap();
    assert_eq!(
        server.last_seen().remote_addr,
        old_remote,
        "the old connection still serves"
    );

    // The client CA rotates.
    tls_files(dir.path(), &second, Some(&clients2));
    server.acceptor.reload(&config).unwrap();
    assert!(matches!(
        call(server.addr, &ca2, Some(&client1)).await,
        Err(Failure::Transport(_))
    ));
    call(server.addr, &ca2, Some(&client2)).await.unwrap();
    guard(check(&mut old)).await.unwrap();
    assert_eq!(server.last_seen().remote_addr, old_remote);

    // A failed reload changes nothing.
    std::fs::write(&config.key_file, first.key_pem.as_bytes()).unwrap();
    let error = server.acceptor.reload(&config).unwrap_err().to_string();
    assert!(error.contains("tls.key_file"), "{error}");
    let served = served_certificate(server.addr, &[&ca2], &client2).await;
    assert_eq!(served, second.der);
}

#[test]
fn tls_config_errors_name_the_field() {
    let ca = Ca::new("ca");
    let (a, b) = (ca.server(1), ca.server(2));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = |cert: &Path, key: &Path, client_ca: Option<&Path>| RawTls {
        cert_file: cert.to_owned(),
        key_file: key.to_owned(),
        client_ca_file: client_ca.map(Path::to_owned),
    };
    let (cert, key) = (
        write(d, "a.crt", &a.cert_pem),
        write(d, "a.key", &a.key_pem),
    );
    let other_key = write(d, "b.key", &b.key_pem);
    let garbage = write(d, "garbage", "not PEM at all\n");
    let missing = d.join("missing.crt");
    let cases: Vec<(RawTls, &[&str])> = vec![
        (raw(&missing, &key, None), &["tls.cert_file", "missing.crt"]),
        (
            raw(&garbage, &key, None),
            &["tls.cert_file", "no PEM certificate"],
        ),
        (raw(&cert, &garbage, None), &["tls.key_file", "garbage"]),
        (
            raw(&cert, &other_key, None),
            &["tls.key_file", "does not fit"],
        ),
        (raw(&cert, &key, Some(&garbage)), &["tls.client_ca_file"]),
        (
            raw(&cert, &key, Some(&missing)),
            &["tls.client_ca_file", "missing.crt"],
        ),
    ];
    for (raw, wants) in cases {
        let msg = raw.clone().validate().unwrap_err().to_string();
        for want in wants {
            assert!(msg.contains(want), "{raw:?}: {msg:?} lacks {want:?}");
        }
    }
    let ok = raw(&cert, &key, Some(&write(d, "ca.crt", &ca.pem())))
        .validate()
        .unwrap();
    assert_eq!(ok.files().count(), 3);
    let yaml = "cert_file: /a\nkey_file: /b\nca_file: /c\n";
    let msg = bace_token_broker::config::from_yaml::<RawTls>(yaml)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("unknown field `ca_file`"), "{msg}");
}

// === Kubernetes service-account tokens ===

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

/// A JWKS endpoint on loopback that counts requests and can be slowed down.
#[derive(Clone, Default)]
struct JwksFake {
    keys: Arc<Mutex<Vec<Value>>>,
    requests: Arc<AtomicUsize>,
    authorization: Arc<Mutex<Option<String>>>,
    delay: Arc<Mutex<Duration>>,
    /// Answer 503 instead of the keys.
    down: Arc<AtomicBool>,
}

impl JwksFake {
    async fn start(keys: &[&SigningKey]) -> (Self, String) {
        async fn jwks(
            State(fake): State<JwksFake>,
            headers: HeaderMap,
        ) -> Result<Json<Value>, StatusCode> {
            fake.requests.fetch_add(1, Ordering::SeqCst);
            *fake.authorization.lock().unwrap() = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let delay = *fake.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            if fake.down.load(Ordering::SeqCst) {
                return Err(StatusCode::SERVICE_UNAVAILABLE);
            }
            let keys = fake.keys.lock().unwrap().clone();
            Ok(Json(json!({ "keys": keys })))
        }
        let fake = Self::default();
        fake.publish(keys);
        let app = Router::new()
            .route("/openid/v1/jwks", get(jwks))
            .with_state(fake.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (fake, format!("http://{addr}/openid/v1/jwks"))
    }

    fn publish(&self, keys: &[&SigningKey]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| k.jwk().clone()).collect();
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn authorizer(yaml: &str) -> Authorizer {
    let raw: RawAuth = bace_token_broker::config::from_yaml(yaml).unwrap();
    Authorizer::new(raw.validate().unwrap()).unwrap()
}

fn url_authorizer(url: &str) -> Authorizer {
    authorizer(&format!(
        "kubernetes:\n  issuer: {ISSUER}\n  jwks_url: {url}\nallow: []\n"
    ))
}

#[tokio::test]
async fn an_oversized_bearer_token_file_fails_the_fetch_not_the_broker() {
    // The file is read at each fetch (the kubelet rotates it), bounded like every file the
    // config names: one that grew past the limit after the start fails the fetch.
    let key = SigningKey::es256("k1");
    let (fake, url) = JwksFake::start(&[&key]).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = write(dir.path(), "token", "broker-own-token\n");
    let auth = authorizer(&format!(
        "kubernetes:\n  issuer: {ISSUER}\n  jwks_url: {url}\n  audience: {AUDIENCE}\n  bearer_token_file: {}\n",
        token_file.display()
    ));
    std::fs::write(&token_file, "t".repeat(MAX_FILE_BYTES + 1)).unwrap();
    let bearer = key.bearer(&claims("reports", "exporter"));
    assert_eq!(
        guard(auth.authenticate(Some(&bearer), None)).await,
        Err(Denied::KEYS_UNAVAILABLE)
    );
    assert_eq!(
        fake.requests(),
        0,
        "no fetch without the broker's own token"
    );
    std::fs::write(&token_file, "broker-own-token\n").unwrap();
    assert!(guard(auth.authenticate(Some(&bearer), None)).await.is_ok());
}

#[tokio::test]
async fn valid_tokens_name_the_service_account() {
    let (es, rs) = (SigningKey::es256("es"), SigningKey::rs256("rs"));
    let (fake, url) = JwksFake::start(&[&es, &rs]).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = write(dir.path(), "token", "broker-own-token\n");
    let auth = authorizer(&format!(
        "kubernetes:\n  issuer: {ISSUER}\n  jwks_url: {url}\n  audience: {AUDIENCE}\n  bearer_token_file: {}\n",
        token_file.display()
    ));
    let identity = "system:serviceaccount:reports:exporter";
    for key in [&es, &rs] {
        let bearer = key.bearer(&claims("reports", "exporter"));
        assert_eq!(
            guard(auth.authenticate(Some(&bearer), None))
                .await
                .as_deref(),
            Ok(identity)
        );
    }
    // `sub` alone names the account too, and `aud` may be a plain string.
    let sub_only = with(
        without(claims("reports", "exporter"), "kubernetes.io"),
        "aud",
        json!(AUDIENCE),
    );
    assert_eq!(
        auth.authenticate(Some(&es.bearer(&sub_only)), None)
            .await
            .as_deref(),
        Ok(identity)
    );
    // Within the leeway.
    let base = claims("reports", "exporter");
    for (claim, value) in [("exp", now() - 10), ("nbf", now() + 10)] {
        let bearer = es.bearer(&with(base.clone(), claim, json!(value)));
        assert!(
            auth.authenticate(Some(&bearer), None).await.is_ok(),
            "{claim}"
        );
    }
    assert_eq!(fake.requests(), 1, "one fetch serves every known kid");
    assert_eq!(
        fake.authorization.lock().unwrap().as_deref(),
        Some("Bearer broker-own-token")
    );
}

#[tokio::test]
async fn invalid_tokens_are_refused_with_their_reason() {
    let key = SigningKey::es256("k1");
    let impostor = SigningKey::es256("k1");
    let (fake, url) = JwksFake::start(&[&key]).await;
    let auth = url_authorizer(&url);
    let base = claims("ns", "name");
    let tampered = {
        let good = key.sign(&base);
        let other = key.sign(&claims("ns", "admin"));
        let (g, o): (Vec<&str>, Vec<&str>) =
            (good.split('.').collect(), other.split('.').collect());
        format!("Bearer {}.{}.{}", g[0], o[1], g[2])
    };
    let hmac = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let token =
            jsonwebtoken::encode(&header, &base, &EncodingKey::from_secret(b"guess").unwrap())
                .unwrap();
        format!("Bearer {token}")
    };
    let cases: Vec<(&str, String, Denied)> = vec![
        (
            "expired",
            key.bearer(&with(base.clone(), "exp", json!(now() - 120))),
            Denied::EXPIRED_TOKEN,
        ),
        (
            "not yet valid",
            key.bearer(&with(base.clone(), "nbf", json!(now() + 120))),
            Denied::TOKEN_NOT_YET_VALID,
        ),
        (
            "wrong audience",
            key.bearer(&with(
                base.clone(),
                "aud",
                json!(["https://kubernetes.default.svc"]),
            )),
            Denied::WRONG_AUDIENCE,
        ),
        (
            "no audience",
            key.bearer(&without(base.clone(), "aud")),
            Denied::WRONG_AUDIENCE,
        ),
        (
            "wrong issuer",
            key.bearer(&with(base.clone(), "iss", json!("https://elsewhere"))),
            Denied::WRONG_ISSUER,
        ),
        (
            "no expiry",
            key.bearer(&without(base.clone(), "exp")),
            Denied::MALFORMED_TOKEN,
        ),
        (
            "signed by another key",
            impostor.bearer(&base),
            Denied::BAD_SIGNATURE,
        ),
        ("tampered payload", tampered, Denied::BAD_SIGNATURE),
        (
            "HMAC with the kid of an EC key",
            hmac,
            Denied::BAD_SIGNATURE,
        ),
        (
            "not a service account",
            key.bearer(&with(
                without(base.clone(), "kubernetes.io"),
                "sub",
                json!("alice"),
            )),
            Denied::NOT_A_SERVICE_ACCOUNT,
        ),
        (
            "not a JWT",
            "Bearer not.a.jwt".into(),
            Denied::MALFORMED_TOKEN,
        ),
        (
            "not bearer",
            "Basic dXNlcjpwdw==".into(),
            Denied::MALFORMED_TOKEN,
        ),
    ];
    for (case, bearer, want) in cases {
        let got = guard(auth.authenticate(Some(&bearer), None)).await;
        assert_eq!(got, Err(want), "{case}");
        // The reason is all a denial carries: no part of the token.
        let shown = format!("{:?} {}", got, got.as_ref().unwrap_err());
        assert!(!shown.contains(&bearer[7..]), "{case}: {shown}");
    }
    assert_eq!(
        auth.authenticate(None, None).await,
        Err(Denied::NO_IDENTITY)
    );
    assert_eq!(fake.requests(), 1, "only known kids were used");
}

#[tokio::test]
async fn unknown_kid_refetches_once_within_the_limits() {
    let [a, b, c, d] = ["a", "b", "c", "d"].map(SigningKey::es256);
    let (fake, url) = JwksFake::start(&[&a]).await;
    let auth = url_authorizer(&url);
    let base = claims("ns", "name");
    let authenticate = |key: &SigningKey| {
        let bearer = key.bearer(&base);
        let auth = auth.clone();
        async move { guard(auth.authenticate(Some(&bearer), None)).await }
    };

    assert!(authenticate(&a).await.is_ok());
    assert_eq!(fake.requests(), 1, "first use fetches");

    // A kid nobody published: one refetch, then refused; again within the window: no fetch
    // (although the overall budget would allow one).
    assert_eq!(authenticate(&c).await, Err(Denied::UNKNOWN_KEY));
    assert_eq!(fake.requests(), 2);
    assert_eq!(authenticate(&c).await, Err(Denied::UNKNOWN_KEY));
    assert_eq!(fake.requests(), 2);

    // A key published after the last fetch: one refetch, then valid.
    fake.publish(&[&a, &b]);
    assert!(authenticate(&b).await.is_ok());
    assert_eq!(fake.requests(), 3);
    assert!(authenticate(&b).await.is_ok());
    assert_eq!(fake.requests(), 3);

    // Another new kid: the overall budget of the window is spent, so no fetch.
    fake.publish(&[&a, &b, &c, &d]);
    assert_eq!(authenticate(&d).await, Err(Denied::UNKNOWN_KEY));
    assert_eq!(fake.requests(), 3);
    assert!(authenticate(&a).await.is_ok());
    assert_eq!(fake.requests(), 3);
}

#[tokio::test]
async fn keys_unavailable_until_the_jwks_answers() {
    let a = SigningKey::es256("a");
    let (fake, url) = JwksFake::start(&[&a]).await;
    fake.down.store(true, Ordering::SeqCst);
    let auth = url_authorizer(&url);
    let bearer = a.bearer(&claims("ns", "name"));
    assert_eq!(
        guard(auth.authenticate(Some(&bearer), None)).await,
        Err(Denied::KEYS_UNAVAILABLE)
    );
    assert_eq!(fake.requests(), 1);
    fake.down.store(false, Ordering::SeqCst);
    assert!(guard(auth.authenticate(Some(&bearer), None)).await.is_ok());
    assert_eq!(fake.requests(), 2);
}

#[tokio::test]
async fn concurrent_callers_share_one_fetch_that_survives_them() {
    let (a, b) = (SigningKey::es256("a"), SigningKey::es256("b"));
    let (fake, url) = JwksFake::start(&[&a]).await;
    *fake.delay.lock().unwrap() = Duration::from_millis(200);
    let auth = url_authorizer(&url);
    let base = claims("ns", "name");

    // A caller that gives up during the first fetch does not cancel it.
    let bearer = a.bearer(&base);
    let gave_up = tokio::time::timeout(
        Duration::from_millis(20),
        auth.authenticate(Some(&bearer), None),
    )
    .await;
    assert!(gave_up.is_err());

    let all_at_once = |key: &SigningKey| {
        let mut tasks = JoinSet::new();
        for _ in 0..50 {
            let (auth, bearer) = (auth.clone(), key.bearer(&base));
            tasks.spawn(async move { auth.authenticate(Some(&bearer), None).await });
        }
        guard(tasks.join_all())
    };
    for result in all_at_once(&a).await {
        assert_eq!(result.as_deref(), Ok("system:serviceaccount:ns:name"));
    }
    assert_eq!(fake.requests(), 1);

    fake.publish(&[&a, &b]);
    for result in all_at_once(&b).await {
        assert!(result.is_ok(), "{result:?}");
    }
    assert_eq!(fake.requests(), 2);
}

#[tokio::test]
async fn jwks_file_and_allow_list_reload() {
    let (a, b) = (SigningKey::es256("a"), SigningKey::rs256("b"));
    let dir = tempfile::tempdir().unwrap();
    let jwks = |keys: &[&SigningKey]| {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk().clone()).collect();
        write(
            dir.path(),
            "jwks.json",
            &json!({ "keys": keys }).to_string(),
        )
    };
    let path = jwks(&[&a]);
    let yaml = |worker_accounts: &str| {
        format!(
            "kubernetes:\n  issuer: {ISSUER}\n  jwks_file: {}\nallow:\n  - caller: system:serviceaccount:reports:exporter\n    accounts: ['*']\n  - caller: system:serviceaccount:ingest:worker\n    accounts: {worker_accounts}\n",
            path.display()
        )
    };
    let config = |yaml: &str| {
        bace_token_broker::config::from_yaml::<RawAuth>(yaml)
            .unwrap()
            .validate()
    };
    let auth = Authorizer::new(config(&yaml("[fleet-a]")).unwrap()).unwrap();
    let exporter = claims("reports", "exporter");
    let worker = claims("ingest", "worker");

    let id = auth
        .authenticate(Some(&a.bearer(&exporter)), None)
        .await
        .unwrap();
    assert!(auth.authorize(&id, "fleet-a") && auth.authorize(&id, "fleet-b"));
    let id = auth
        .authenticate(Some(&a.bearer(&worker)), None)
        .await
        .unwrap();
    assert_eq!(id, "system:serviceaccount:ingest:worker");
    assert!(auth.authorize(&id, "fleet-a"));
    assert!(!auth.authorize(&id, "fleet-b"));
    assert!(!auth.authorize("system:serviceaccount:ingest:other", "fleet-a"));
    assert_eq!(
        auth.authenticate(Some(&b.bearer(&worker)), None).await,
        Err(Denied::UNKNOWN_KEY)
    );

    // New keys on disk and a new allow list.
    jwks(&[&b]);
    auth.reload(config(&yaml("[fleet-b]")).unwrap()).unwrap();
    assert_eq!(
        auth.authenticate(Some(&a.bearer(&worker)), None).await,
        Err(Denied::UNKNOWN_KEY)
    );
    let id = auth
        .authenticate(Some(&b.bearer(&worker)), None)
        .await
        .unwrap();
    assert!(!auth.authorize(&id, "fleet-a"));
    assert!(auth.authorize(&id, "fleet-b"));

    // A broken file is refused at validation and the authorizer keeps what it has.
    std::fs::write(&path, "{\"keys\": []}").unwrap();
    let error = config(&yaml("[fleet-b]")).unwrap_err().to_string();
    assert!(error.contains("auth.kubernetes.jwks_file"), "{error}");
    assert!(
        auth.authenticate(Some(&b.bearer(&worker)), None)
            .await
            .is_ok()
    );
}

// === The cache of verified tokens ===

const WORKER_SA: &str = "system:serviceaccount:ingest:worker";

/// An authorizer reading its keys from `dir/jwks.json`: `keys(...)` writes that file,
/// `yaml(accounts)` is the `auth` section allowing the worker `accounts`.
struct FileAuth {
    dir: tempfile::TempDir,
}

impl FileAuth {
    fn new(keys: &[&SigningKey]) -> Self {
        let this = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        this.keys(keys);
        this
    }

    fn keys(&self, keys: &[&SigningKey]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk().clone()).collect();
        write(
            self.dir.path(),
            "jwks.json",
            &json!({ "keys": keys }).to_string(),
        );
    }

    fn config(&self, worker_accounts: &str) -> bace_token_broker::config::AuthConfig {
        let yaml = format!(
            "kubernetes:\n  issuer: {ISSUER}\n  jwks_file: {}\nallow:\n  - caller: {WORKER_SA}\n    accounts: {worker_accounts}\n",
            self.dir.path().join("jwks.json").display()
        );
        bace_token_broker::config::from_yaml::<RawAuth>(&yaml)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn authorizer(&self, worker_accounts: &str) -> Authorizer {
        Authorizer::new(self.config(worker_accounts)).unwrap()
    }
}

fn counts(hits: u64, misses: u64) -> TokenCacheCounts {
    TokenCacheCounts { hits, misses }
}

#[tokio::test]
async fn a_verified_token_is_then_answered_from_the_cache() {
    let key = SigningKey::es256("k1");
    let files = FileAuth::new(&[&key]);
    let auth = files.authorizer("[fleet-a]");
    let bearer = key.bearer(&claims("ingest", "worker"));
    let admit = |account: &'static str| auth.admit("GetToken", Some(&bearer), None, Some(account));

    assert_eq!(admit("fleet-a").await.as_deref(), Ok(WORKER_SA));
    assert_eq!(auth.token_cache_counts(), counts(0, 1), "verified once");
    assert_eq!(auth.cached_tokens(), 1);
    for _ in 0..10 {
        assert_eq!(admit("fleet-a").await.as_deref(), Ok(WORKER_SA));
    }
    assert_eq!(
        auth.authenticate(Some(&bearer), None).await.as_deref(),
        Ok(WORKER_SA)
    );
    assert_eq!(auth.token_cache_counts(), counts(11, 1));
    assert_eq!(auth.cached_tokens(), 1);

    // Another token of the same caller is another entry.
    let again = key.bearer(&with(claims("ingest", "worker"), "jti", json!("2")));
    assert_eq!(
        auth.authenticate(Some(&again), None).await.as_deref(),
        Ok(WORKER_SA)
    );
    assert_eq!(auth.token_cache_counts(), counts(11, 2));
    assert_eq!(auth.cached_tokens(), 2);

    // A token with the same claims signed by another key (same kid) is no hit.
    let impostor = SigningKey::es256("k1").bearer(&claims("ingest", "worker"));
    for _ in 0..3 {
        assert_eq!(
            auth.authenticate(Some(&impostor), None).await,
            Err(Denied::BAD_SIGNATURE)
        );
    }
    assert_eq!(auth.token_cache_counts(), counts(11, 5));
    assert_eq!(auth.cached_tokens(), 2);
}

#[tokio::test]
async fn an_allow_list_reload_applies_to_cached_identities_at_once() {
    let key = SigningKey::es256("k1");
    let files = FileAuth::new(&[&key]);
    let auth = files.authorizer("[fleet-a]");
    let bearer = key.bearer(&claims("ingest", "worker"));
    let admit = |account: &'static str| auth.admit("GetToken", Some(&bearer), None, Some(account));

    assert_eq!(admit("fleet-a").await.as_deref(), Ok(WORKER_SA));
    assert_eq!(admit("fleet-b").await, Err(Denied::PermissionDenied));
    assert_eq!(auth.token_cache_counts(), counts(1, 1));

    // Only the allow list changes: the keys and the cached identity stay...
    auth.reload(files.config("[fleet-b]")).unwrap();
    assert_eq!(auth.cached_tokens(), 1);
    // ...and the new list applies to it at the next call.
    assert_eq!(admit("fleet-a").await, Err(Denied::PermissionDenied));
    assert_eq!(admit("fleet-b").await.as_deref(), Ok(WORKER_SA));
    auth.reload(files.config("[fleet-c]")).unwrap();
    assert_eq!(admit("fleet-b").await, Err(Denied::PermissionDenied));
    assert_eq!(
        auth.token_cache_counts(),
        counts(4, 1),
        "every call after the first was a hit"
    );
}

#[tokio::test]
async fn a_rotated_out_key_stops_its_tokens_at_once() {
    // A `jwks_file` without the key: the reload brings new keys and an empty cache.
    let (a, b) = (SigningKey::es256("a"), SigningKey::es256("b"));
    let files = FileAuth::new(&[&a, &b]);
    let auth = files.authorizer("['*']");
    let by_a = a.bearer(&claims("ingest", "worker"));
    let by_b = b.bearer(&claims("ingest", "worker"));
    for _ in 0..2 {
        assert!(auth.authenticate(Some(&by_a), None).await.is_ok());
    }
    assert_eq!(auth.token_cache_counts(), counts(1, 1));
    files.keys(&[&b]);
    auth.reload(files.config("['*']")).unwrap();
    assert_eq!(auth.cached_tokens(), 0);
    assert_eq!(
        auth.authenticate(Some(&by_a), None).await,
        Err(Denied::UNKNOWN_KEY)
    );
    assert!(auth.authenticate(Some(&by_b), None).await.is_ok());

    // A `jwks_url` whose keys change under a validator that stays: the key-set generation.
    let (fake, url) = JwksFake::start(&[&a]).await;
    let auth = url_authorizer(&url);
    for _ in 0..2 {
        assert!(guard(auth.authenticate(Some(&by_a), None)).await.is_ok());
    }
    assert_eq!(auth.token_cache_counts(), counts(1, 1));
    // The issuer rotates to b; a token of b's makes the broker fetch the new keys.
    fake.publish(&[&b]);
    assert!(guard(auth.authenticate(Some(&by_b), None)).await.is_ok());
    assert_eq!(fake.requests(), 2);
    assert_eq!(auth.cached_tokens(), 1, "a's entry went with a's keys");
    assert_eq!(
        guard(auth.authenticate(Some(&by_a), None)).await,
        Err(Denied::UNKNOWN_KEY)
    );
    assert_eq!(auth.token_cache_counts(), counts(1, 3));
    // a's kid made the broker look once more (within the limits). The document had not
    // changed: the key set keeps its generation, and b's token its entry.
    assert_eq!(fake.requests(), 3);
    assert_eq!(auth.cached_tokens(), 1);
    for _ in 0..2 {
        assert!(guard(auth.authenticate(Some(&by_b), None)).await.is_ok());
    }
    assert_eq!(auth.token_cache_counts(), counts(3, 3));
}

#[tokio::test]
async fn unknown_kids_do_not_empty_the_cache_while_the_keys_stay() {
    // Tokens naming keys the issuer does not have make the broker fetch the JWKS (within the
    // limits); an unchanged answer must not cost every caller a signature check.
    let key = SigningKey::es256("k1");
    let (fake, url) = JwksFake::start(&[&key]).await;
    let auth = url_authorizer(&url);
    let good = key.bearer(&claims("ingest", "worker"));
    assert!(guard(auth.authenticate(Some(&good), None)).await.is_ok());
    for n in 0..5 {
        let stranger = SigningKey::es256(&format!("unknown-{n}"));
        let bad = stranger.bearer(&claims("ingest", "worker"));
        assert_eq!(
            guard(auth.authenticate(Some(&bad), None)).await,
            Err(Denied::UNKNOWN_KEY)
        );
    }
    assert!(fake.requests() > 1, "the unknown kids made the broker look");
    assert_eq!(auth.cached_tokens(), 1);
    let before = auth.token_cache_counts();
    assert!(guard(auth.authenticate(Some(&good), None)).await.is_ok());
    assert_eq!(
        auth.token_cache_counts().hits,
        before.hits + 1,
        "still cached"
    );
}

#[tokio::test]
async fn a_flood_of_bad_tokens_leaves_the_cache_empty() {
    let key = SigningKey::es256("k1");
    let impostor = SigningKey::es256("k1");
    let files = FileAuth::new(&[&key]);
    let auth = files.authorizer("['*']");
    let base = claims("ingest", "worker");
    let mut refused = 0;
    for n in 0..200 {
        let jti = |claims: Value| with(claims, "jti", json!(n));
        let cases = [
            (impostor.bearer(&jti(base.clone())), Denied::BAD_SIGNATURE),
            (
                key.bearer(&jti(with(base.clone(), "exp", json!(now() - 120)))),
                Denied::EXPIRED_TOKEN,
            ),
            (
                key.bearer(&jti(with(base.clone(), "aud", json!(["someone-else"])))),
                Denied::WRONG_AUDIENCE,
            ),
            (format!("Bearer not.a.jwt{n}"), Denied::MALFORMED_TOKEN),
        ];
        for (bearer, want) in cases {
            // Twice: a refusal is not remembered either way.
            for _ in 0..2 {
                assert_eq!(auth.authenticate(Some(&bearer), None).await, Err(want));
                refused += 1;
            }
        }
    }
    assert_eq!(auth.cached_tokens(), 0);
    assert_eq!(auth.token_cache_counts(), counts(0, refused));

    // Past the size limit: refused unhashed, no lookup.
    let huge = format!("Bearer {}", "a".repeat(16 * 1024 + 1));
    assert_eq!(
        auth.authenticate(Some(&huge), None).await,
        Err(Denied::MALFORMED_TOKEN)
    );
    assert_eq!(auth.token_cache_counts(), counts(0, refused));
    // A valid token longer than the cache takes: verified each time, never cached.
    let padded = key.bearer(&with(
        base.clone(),
        "pad",
        json!("p".repeat(MAX_CACHED_TOKEN_BYTES)),
    ));
    for _ in 0..2 {
        assert_eq!(
            auth.authenticate(Some(&padded), None).await.as_deref(),
            Ok(WORKER_SA)
        );
    }
    assert_eq!(auth.cached_tokens(), 0);
    assert_eq!(auth.token_cache_counts(), counts(0, refused + 2));
}

#[tokio::test]
async fn a_flood_of_valid_tokens_keeps_the_cache_at_its_capacity() {
    let key = SigningKey::es256("k1");
    let files = FileAuth::new(&[&key]);
    let auth = files.authorizer("['*']");
    let flood = TOKEN_CACHE_CAPACITY + 100;
    // Signed once each (ECDSA signatures differ at every signing).
    let tokens: Vec<String> = (0..flood)
        .map(|n| key.bearer(&with(claims("ingest", "worker"), "jti", json!(n))))
        .collect();
    let token = |n: usize| &tokens[n];
    for n in 0..flood {
        assert!(auth.authenticate(Some(token(n)), None).await.is_ok());
        assert!(auth.cached_tokens() <= TOKEN_CACHE_CAPACITY);
    }
    assert_eq!(auth.cached_tokens(), TOKEN_CACHE_CAPACITY);
    assert_eq!(auth.token_cache_counts(), counts(0, flood as u64));
    // The most recent are kept, the least recent went.
    assert!(
        auth.authenticate(Some(token(flood - 1)), None)
            .await
            .is_ok()
    );
    assert_eq!(auth.token_cache_counts().hits, 1);
    assert!(auth.authenticate(Some(token(0)), None).await.is_ok());
    assert_eq!(auth.token_cache_counts(), counts(1, flood as u64 + 1));
    assert_eq!(auth.cached_tokens(), TOKEN_CACHE_CAPACITY);
}

/// `jsonwebtoken` checks `exp` against the wall clock, which paused time does not move: the
/// cache's deadline shows in its counts (a miss is a verification, which still succeeds).
#[tokio::test(start_paused = true)]
async fn cached_tokens_expire_on_time() {
    let key = SigningKey::es256("k1");
    let files = FileAuth::new(&[&key]);
    let auth = files.authorizer("['*']");
    let step = Duration::from_millis(10);
    let check = |bearer: String| {
        let auth = auth.clone();
        async move {
            let before = auth.token_cache_counts();
            assert!(auth.authenticate(Some(&bearer), None).await.is_ok());
            let after = auth.token_cache_counts();
            after.hits > before.hits
        }
    };

    // Long-lived: trusted for the TTL after its verification.
    let long = key.bearer(&claims("ingest", "worker"));
    assert!(!check(long.clone()).await, "verified");
    tokio::time::advance(TOKEN_CACHE_TTL - step).await;
    assert!(check(long.clone()).await, "just before the TTL");
    tokio::time::advance(step).await;
    assert!(!check(long.clone()).await, "at the TTL: verified again");
    assert!(check(long.clone()).await, "and cached again");

    // Expiring in 5 s: trusted until exp plus the leeway (34 to 35 s from now, as the
    // verification reads exp against the wall clock in whole seconds).
    let short = key.bearer(&with(claims("ingest", "worker"), "exp", json!(now() + 5)));
    assert!(!check(short.clone()).await);
    tokio::time::advance(Duration::from_secs(33)).await;
    assert!(check(short.clone()).await, "before exp + leeway");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!check(short.clone()).await, "past exp + leeway");
    assert_eq!(auth.cached_tokens(), 2);
}
