//! Test certificates (rcgen) and Kubernetes-style service-account tokens (jsonwebtoken).
#![allow(dead_code, unreachable_pub)]

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde_json::{Value, json};
use tokio_rustls::rustls::pki_types::CertificateDer;

/// A certificate authority.
pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose, serial: u64) -> Leaf {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self, serial: u64) -> Leaf {
        self.leaf(
            vec![dns("localhost"), SanType::IpAddress([127, 0, 0, 1].into())],
            ExtendedKeyUsagePurpose::ServerAuth,
            serial,
        )
    }

    /// A client certificate with these SANs.
    pub fn client(&self, sans: Vec<SanType>) -> Leaf {
        self.leaf(sans, ExtendedKeyUsagePurpose::ClientAuth, 100)
    }

    /// A client certificate with a URI SAN (e.g. a SPIFFE ID).
    pub fn client_uri(&self, name: &str) -> Leaf {
        self.client(vec![uri(name)])
    }
}

pub fn dns(name: &str) -> SanType {
    SanType::DnsName(name.to_string().try_into().unwrap())
}

pub fn uri(uri: &str) -> SanType {
    SanType::URI(uri.to_string().try_into().unwrap())
}

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "bace-token-broker";

/// A signing key (ES256 or RS256) and its JWK.
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    /// A new P-256 key (ES256) named `kid`.
    pub fn es256(kid: &str) -> Self {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Self::new(
            kid,
            Algorithm::ES256,
            EncodingKey::from_ec_der(pair.serialized_der()),
        )
    }

    /// A new RSA key (RS256) named `kid`.
    pub fn rs256(kid: &str) -> Self {
        let pair = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let key = EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes()).unwrap();
        Self::new(kid, Algorithm::RS256, key)
    }

    fn new(kid: &str, alg: Algorithm, key: EncodingKey) -> Self {
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        Self {
            kid: kid.to_owned(),
            alg,
            key,
            jwk: serde_json::to_value(jwk).unwrap(),
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// Writes [`SigningKey::jwks`] to `dir/jwks.json` and returns its path.
    pub fn jwks_file(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("jwks.json");
        std::fs::write(&path, self.jwks()).expect("write the JWKS file");
        path
    }

    /// A JWKS document holding this key.
    pub fn jwks(&self) -> String {
        json!({ "keys": [self.jwk] }).to_string()
    }

    /// `claims`, signed: a compact JWT with this key's `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }

    /// `Bearer <signed claims>`.
    pub fn bearer(&self, claims: &Value) -> String {
        format!("Bearer {}", self.sign(claims))
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims of a projected service-account token for `namespace/name`, valid for 10 minutes.
pub fn sa_claims(namespace: &str, name: &str) -> Value {
    let now = now();
    json!({
        "iss": ISSUER,
        "aud": [AUDIENCE],
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": "p-1", "uid": "0b6a"},
            "serviceaccount": {"name": name, "uid": "9f3c"},
        },
    })
}

/// A TLS channel to `127.0.0.1:port` of `addr` (server name `localhost`) trusting `ca`, with
/// `identity` as the client certificate when given. Connects now, so handshake refusals show.
pub async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .expect("endpoint")
        .tls_config(tls)?
        .connect()
        .await
}
