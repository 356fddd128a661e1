//! A live reload is all or nothing: every section (TLS material, the auth section's keys and
//! allow list, the accounts) is prepared before any is applied, so a reload refused for one
//! section leaves the others as they were.

use std::{path::Path, sync::Arc};

use bace_token_broker::{
    Authorizer, Broker, CallCounts, Config, ReloadCounts, Reloader, TlsAcceptor,
};
use testkit::{
    Account, BrokerConfig, InstantUpstream, Jwks, Kubernetes,
    pki::{Ca, Leaf},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, RootCertStore, pki_types::ServerName},
};

/// A PEM block that parses as PEM but holds no certificate: the config's check (PEM with at
/// least one `CERTIFICATE` block) accepts it; building the JWKS client refuses it.
const NOT_A_CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The config: TLS with `server`'s certificate, auth with service-account tokens whose keys
/// come from a `jwks_url` trusted through `jwks_ca`, and `caller` allowed every account.
fn broker_config(dir: &Path, server: &Leaf, jwks_ca: &str, caller: &str) -> BrokerConfig {
    let cert = write(dir, "tls.crt", &server.cert_pem);
    let key = write(dir, "tls.key", &server.key_pem);
    let mut kubernetes = Kubernetes::new(
        testkit::pki::ISSUER,
        Jwks::Url("https://127.0.0.1:9/openid/v1/jwks".into()),
    );
    kubernetes.ca_file = Some(write(dir, "jwks-ca.crt", jwks_ca));
    BrokerConfig::new()
        .tls(&cert, &key, None)
        .kubernetes(kubernetes)
        .allow(caller, &["*"])
        .account(Account::standard("fleet-a").token_url("http://127.0.0.1:9/oauth2/token"))
}

/// Which of `leaves` `acceptor` serves to a new connection (its index).
async fn served(acceptor: &TlsAcceptor, ca: &Ca, leaves: [&Leaf; 2]) -> usize {
    let der = served_certificate(acceptor, ca).await;
    leaves
        .iter()
        .position(|leaf| leaf.der.as_ref() == der.as_slice())
        .expect("one of the test's certificates")
}

/// The leaf certificate `acceptor` serves to a new connection.
async fn served_certificate(acceptor: &TlsAcceptor, ca: &Ca) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.map(|_| ())
        })
    };
    let mut roots = RootCertStore::empty();
    roots.add(ca.issuer.der().clone()).unwrap();
    let mut client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    server.await.unwrap().unwrap();
    leaf
}

#[tokio::test]
async fn a_reload_refused_for_its_auth_section_changes_no_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("reload CA");
    let (first, second) = (ca.server(1), ca.server(2));
    let path = broker_config(dir.path(), &first, &ca.pem(), "system:serviceaccount:a:old")
        .write(dir.path(), "config.yaml");
    let config = Config::load(&path).unwrap();
    let acceptor = TlsAcceptor::new(config.tls.as_ref().unwrap()).unwrap();
    let authorizer = Authorizer::new(config.auth.clone().unwrap()).unwrap();
    let (broker, _refresher) = Broker::new(&config, Arc::new(InstantUpstream));
    let counts = Arc::new(ReloadCounts::default());
    let mut reloader = Reloader::new(
        config,
        broker.clone(),
        Some(acceptor.clone()),
        Some(authorizer.clone()),
        counts.clone(),
        Arc::new(CallCounts::default()),
    )
    .expect("a config from a file reloads");
    let leaves = [&first, &second];
    assert_eq!(served(&acceptor, &ca, leaves).await, 0);

    // A new certificate (good) and a JWKS CA that cannot be used (refused when the auth
    // section is put to use, after the whole config validated).
    broker_config(
        dir.path(),
        &second,
        NOT_A_CERTIFICATE,
        "system:serviceaccount:a:new",
    )
    .write(dir.path(), "config.yaml");
    Config::load(&path).expect("the new config validates");
    reloader.reload();

    assert_eq!(counts.snapshot(), vec![("rejected", 1)]);
    assert_eq!(
        served(&acceptor, &ca, leaves).await,
        0,
        "a rejected reload must not change the served certificate"
    );
    assert!(authorizer.authorize("system:serviceaccount:a:old", "fleet-a"));
    assert!(!authorizer.authorize("system:serviceaccount:a:new", "fleet-a"));

    // Fixed, the same reload applies every section.
    broker_config(
        dir.path(),
        &second,
        &ca.pem(),
        "system:serviceaccount:a:new",
    )
    .write(dir.path(), "config.yaml");
    reloader.reload();
    assert_eq!(served(&acceptor, &ca, leaves).await, 1);
    assert!(authorizer.authorize("system:serviceaccount:a:new", "fleet-a"));
    assert!(!authorizer.authorize("system:serviceaccount:a:old", "fleet-a"));
    let mut outcomes = counts.snapshot();
    outcomes.sort();
    assert_eq!(outcomes, vec![("rejected", 1), ("unchanged", 1)]);
    broker.shutdown().await;
}
