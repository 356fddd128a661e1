//! Encryption at rest: AES-256-GCM (aws-lc-rs) with a fresh random 96-bit nonce for every write,
//! and associated data that binds a record to its key prefix, account and version.
//!
//! A sealed record:
//!
//! ```text
//! offset  size  field
//! 0       1     envelope format (1)
//! 1       1     key id length k
//! 2       k     key id (the key that sealed it)
//! 2+k     12    nonce
//! 14+k    rest  ciphertext, then the 16-byte tag
//! ```
//!
//! The associated data is `"bace-token-broker/store/1" 0 prefix 0 account 0 version(8, BE)
//! envelope-format`: a record copied under another account's key, given another version, or
//! read under another prefix fails to open, as does any changed byte.

use std::{collections::HashMap, fmt};

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use secrecy::zeroize::Zeroizing;

use crate::config::StoreKeys;

/// The envelope format written today.
const ENVELOPE: u8 = 1;
/// The AES-GCM tag length.
const TAG_LEN: usize = 16;
/// Bytes a sealed record adds to its plaintext, besides the key id.
pub(crate) const OVERHEAD: usize = 2 + NONCE_LEN + TAG_LEN;
/// Labels the associated data (a domain separator).
const DOMAIN: &[u8] = b"bace-token-broker/store/1\0";

/// Why a sealed record does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OpenError {
    /// Sealed with a key this broker does not have (rotated out, or another key file).
    #[error("sealed with unknown key id {0:?}")]
    UnknownKey(String),
    /// Changed, truncated, or moved to another account, version or prefix.
    #[error(
        "record does not authenticate (tampered, truncated, or moved to another account or version)"
    )]
    Tampered,
    /// An envelope format this broker does not know.
    #[error("unknown envelope format {0}")]
    Format(u8),
}

/// The store's keys, ready to seal (with the first) and open (with any).
pub(crate) struct Keyring {
    /// The id of the sealing key.
    sealing: String,
    keys: HashMap<String, RandomizedNonceKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Keyring")
            .field("sealing", &self.sealing)
            .field("ids", &ids)
            .finish()
    }
}

impl Keyring {
    pub(crate) fn new(keys: &StoreKeys) -> Self {
        Self {
            sealing: keys.encrypting().id().to_owned(),
            keys: keys
                .iter()
                .map(|k| {
                    let key = RandomizedNonceKey::new(&AES_256_GCM, k.expose())
                        .expect("a 32-byte key is a valid AES-256 key");
                    (k.id().to_owned(), key)
                })
                .collect(),
        }
    }

    /// The id of the key new records are sealed with.
    pub(crate) fn sealing_id(&self) -> &str {
        &self.sealing
    }

    /// Seals `plain` for `account` at `version` under `prefix`.
    pub(crate) fn seal(&self, prefix: &str, account: &str, version: u64, plain: &[u8]) -> Vec<u8> {
        let key = &self.keys[&self.sealing];
        let id = self.sealing.as_bytes();
        let mut body = Zeroizing::new(Vec::with_capacity(plain.len() + TAG_LEN));
        body.extend_from_slice(plain);
        let nonce = key
            .seal_in_place_append_tag(Aad::from(aad(prefix, account, version)), &mut *body)
            .expect("AES-GCM sealing of a small buffer cannot fail");
        let mut out = Vec::with_capacity(OVERHEAD + id.len() + plain.len());
        out.push(ENVELOPE);
        out.push(u8::try_from(id.len()).expect("key ids are at most 64 bytes"));
        out.extend_from_slice(id);
        out.extend_from_slice(nonce.as_ref());
        // The body is ciphertext now: no secret left in it.
        out.extend_from_slice(&body);
        out
    }

    /// Opens a sealed record of `account` at `version` under `prefix`: the plaintext (zeroed
    /// on drop).
    pub(crate) fn open(
        &self,
        prefix: &str,
        account: &str,
        version: u64,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let (&format, rest) = sealed.split_first().ok_or(OpenError::Tampered)?;
        if format != ENVELOPE {
            return Err(OpenError::Format(format));
        }
        let (&id_len, rest) = rest.split_first().ok_or(OpenError::Tampered)?;
        let id_len = usize::from(id_len);
        if rest.len() < id_len + NONCE_LEN + TAG_LEN {
            return Err(OpenError::Tampered);
        }
        let (id, rest) = rest.split_at(id_len);
        let id = std::str::from_utf8(id).map_err(|_| OpenError::Tampered)?;
        let key = self
            .keys
            .get(id)
            .ok_or_else(|| OpenError::UnknownKey(printable(id)))?;
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Tampered)?;
        let mut buffer = Zeroizing::new(body.to_vec());
        let plain_len = key
            .open_in_place(nonce, Aad::from(aad(prefix, account, version)), &mut buffer)
            .map_err(|_| OpenError::Tampered)?
            .len();
        buffer.truncate(plain_len);
        Ok(buffer)
    }
}

/// The associated data of a record.
fn aad(prefix: &str, account: &str, version: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(DOMAIN.len() + prefix.len() + account.len() + 11);
    aad.extend_from_slice(DOMAIN);
    aad.extend_from_slice(prefix.as_bytes());
    aad.push(0);
    aad.extend_from_slice(account.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad.push(ENVELOPE);
    aad
}

/// A key id read from Redis, safe to log: what a key file could hold, else a placeholder.
fn printable(id: &str) -> String {
    if crate::config::validate_key_id(id).is_ok() {
        id.to_owned()
    } else {
        "(malformed)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Keyring {
        Keyring::new(&StoreKeys::parse(text).unwrap())
    }

    const A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const B: &str = "HxscGxoZGBcWFRQTEhEQDw4NDAsKCQgHBgUEAwIBAAA=";

    #[test]
    fn seal_then_open_with_the_same_binding() {
        let ring = keys(&format!("k1 {A}\nk0 {B}"));
        assert_eq!(ring.sealing_id(), "k1");
        let sealed = ring.seal("p", "fleet-a", 7, b"secret-plaintext");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            &ring.open("p", "fleet-a", 7, &sealed).unwrap()[..],
            b"secret-plaintext"
        );
        // A fresh nonce each time: the same plaintext never seals the same way twice.
        assert_ne!(sealed, ring.seal("p", "fleet-a", 7, b"secret-plaintext"));
    }

    #[test]
    fn another_account_version_prefix_or_byte_does_not_open() {
        let ring = keys(&format!("k1 {A}"));
        let sealed = ring.seal("p", "fleet-a", 7, b"x");
        for (prefix, account, version) in [
            ("p", "fleet-b", 7),
            ("p", "fleet-a", 8),
            ("q", "fleet-a", 7),
        ] {
            assert_eq!(
                ring.open(prefix, account, version, &sealed),
                Err(OpenError::Tampered)
            );
        }
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(ring.open("p", "fleet-a", 7, &bad).is_err(), "byte {i}");
        }
        for cut in 0..sealed.len() {
            assert!(ring.open("p", "fleet-a", 7, &sealed[..cut]).is_err());
        }
    }

    #[test]
    fn rotation_and_unknown_keys() {
        let old = keys(&format!("k0 {B}"));
        let rotated = keys(&format!("k1 {A}\nk0 {B}"));
        let sealed_old = old.seal("p", "a", 1, b"x");
        assert_eq!(&rotated.open("p", "a", 1, &sealed_old).unwrap()[..], b"x");
        let sealed_new = rotated.seal("p", "a", 2, b"y");
        assert_eq!(
            old.open("p", "a", 2, &sealed_new),
            Err(OpenError::UnknownKey("k1".into()))
        );
        // A key of the same id but other bytes: does not authenticate.
        let impostor = keys(&format!("k1 {B}"));
        assert_eq!(
            impostor.open("p", "a", 2, &sealed_new),
            Err(OpenError::Tampered)
        );
    }
}
