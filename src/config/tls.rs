//! The `tls` section: the server certificate and key, and the client CAs of mTLS. Validation
//! reads and parses the files ([`TlsMaterial`]), so a bad certificate or key is refused when the
//! config is read; the runtime (`crate::tls`) builds its acceptor from the same material.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use tokio_rustls::rustls::{
    RootCertStore,
    crypto::{CryptoProvider, aws_lc_rs},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
};

use super::FieldError;

/// The `tls` section as written in the YAML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM file with the server certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file with the CA certificates client certificates must chain to. Set: every client
    /// must present a certificate from one of them (mTLS). Unset: no client certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// A validated `tls` section: the files exist and hold a usable certificate, key and CAs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key.
    pub key_file: PathBuf,
    /// PEM file with the client CA certificates; `None`: no client certificates.
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client may connect without a certificate (set when callers may identify
    /// themselves with a service-account token instead; not a YAML key).
    pub client_cert_optional: bool,
}

impl RawTls {
    /// Reads and parses the files, so that a bad certificate or key is refused at load time.
    /// The message names the field (`tls.cert_file`, `tls.key_file`, `tls.client_ca_file`).
    pub fn validate(self) -> Result<TlsConfig, FieldError> {
        let config = TlsConfig {
            cert_file: self.cert_file,
            key_file: self.key_file,
            client_ca_file: self.client_ca_file,
            client_cert_optional: false,
        };
        TlsMaterial::load(&config, &provider())?;
        Ok(config)
    }
}

impl TlsConfig {
    /// The files this config reads (to watch for live reload).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [&self.cert_file, &self.key_file]
            .into_iter()
            .chain(&self.client_ca_file)
            .map(PathBuf::as_path)
    }
}

/// The crypto provider of every TLS setup: aws-lc-rs.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// What the files of a [`TlsConfig`] hold, parsed.
pub(crate) struct TlsMaterial {
    pub(crate) key: Arc<CertifiedKey>,
    /// The client CA certificates, as read (compared on reload).
    pub(crate) client_cas: Option<Vec<CertificateDer<'static>>>,
    pub(crate) client_cert_optional: bool,
}

impl TlsMaterial {
    /// Reads and parses the files of `config`; the error names the field.
    pub(crate) fn load(
        config: &TlsConfig,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, FieldError> {
        let chain = read_certs(&config.cert_file, "tls.cert_file")?;
        let key_bytes = read_file(&config.key_file, "tls.key_file")?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
            FieldError::new(
                "tls.key_file",
                format!(
                    "{} holds no usable PEM private key: {e}",
                    config.key_file.display()
                ),
            )
        })?;
        let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            FieldError::new(
                "tls.key_file",
                format!(
                    "{} does not fit the certificate in tls.cert_file: {e}",
                    config.key_file.display()
                ),
            )
        })?;
        let client_cas = match &config.client_ca_file {
            Some(path) => {
                let cas = read_certs(path, "tls.client_ca_file")?;
                // Build once now: a CA the verifier cannot use is a config error, not a
                // handshake failure later.
                client_verifier(&cas, provider, config.client_cert_optional).map_err(|e| {
                    FieldError::new("tls.client_ca_file", format!("{}: {e}", path.display()))
                })?;
                Some(cas)
            }
            None => None,
        };
        Ok(Self {
            key: Arc::new(key),
            client_cas,
            client_cert_optional: config.client_cert_optional,
        })
    }
}

fn read_file(path: &Path, field: &str) -> Result<Vec<u8>, FieldError> {
    super::read_file(path)
        .map_err(|e| FieldError::new(field, format!("cannot read {}: {e}", path.display())))
}

fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, FieldError> {
    let bytes = read_file(path, field)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FieldError::new(field, format!("{} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(FieldError::new(
            field,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// The verifier of client certificates chaining to `cas`.
pub(crate) fn client_verifier(
    cas: &[CertificateDer<'static>],
    provider: &Arc<CryptoProvider>,
    optional: bool,
) -> Result<Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca.clone())
            .map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    // A certificate, when presented, is always verified; without one the caller must
    // authenticate otherwise (the broker's auth layer refuses calls without an identity).
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder.build().map_err(|e| e.to_string())
}
