//! The caller identity in a verified client certificate.

use tokio_rustls::rustls::pki_types::CertificateDer;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// The caller identity in a client certificate chain: the leaf's first URI SAN (e.g. a SPIFFE
/// ID), else its first DNS SAN. `None` for an empty chain, an unparsable leaf or a leaf with
/// neither.
///
/// The chain must already be verified (as [`TlsConnInfo::peer_certs`](super::TlsConnInfo::peer_certs) is).
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<String> {
    let leaf = certs.first()?;
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let uri = names.iter().find_map(|name| match name {
        GeneralName::URI(uri) if !uri.is_empty() => Some(*uri),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) if !dns.is_empty() => Some(*dns),
            _ => None,
        })
    };
    uri.or_else(dns).map(str::to_owned)
}
