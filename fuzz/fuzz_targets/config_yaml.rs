//! The YAML config (`Config::parse`), with the secret, JWKS and TLS files it may name.
//!
//! The target runs in a directory holding `pw.txt`, `cs.txt` (secrets), `empty.txt`,
//! `jwks.json` (a real JWKS), `ca.pem`, `cert.pem` and `key.pem` (a real test PKI), so seeds
//! name them by relative path.
//!
//! Checks: no panic; an error never quotes a `password` or `client_secret` given inline
//! (as far as a line-based reading finds them); a parsed config's credentials print neither
//! secret.
#![no_main]

use std::sync::Once;

use bace_token_broker::Config;
use jsonwebtoken::{Algorithm, EncodingKey, jwk::Jwk};
use libfuzzer_sys::fuzz_target;

/// The contents of the secret files, as the seeds' secrets: long enough to spot.
const FILE_PASSWORD: &str = "hunter2-from-file";
const FILE_CLIENT_SECRET: &str = "s3cret-from-file";

static SETUP: Once = Once::new();

/// Writes `contents` to `dir/name` through a rename, so a run started alongside never reads
/// half a file.
fn put(dir: &std::path::Path, name: &str, contents: impl AsRef<[u8]>) {
    let part = dir.join(format!("{name}.{}", std::process::id()));
    std::fs::write(&part, contents).unwrap();
    std::fs::rename(&part, dir.join(name)).unwrap();
}

fn setup() {
    // One directory for every run (not one per process, left behind by each).
    let dir = std::env::temp_dir().join("bace-token-broker-fuzz-config");
    std::fs::create_dir_all(&dir).unwrap();
    put(&dir, "pw.txt", format!("{FILE_PASSWORD}\n"));
    put(&dir, "cs.txt", format!("{FILE_CLIENT_SECRET}\r\n"));
    put(&dir, "empty.txt", "\n");
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = EncodingKey::from_ec_der(pair.serialized_der());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    put(
        &dir,
        "jwks.json",
        serde_json::json!({ "keys": [jwk] }).to_string(),
    );
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &*ca)
        .unwrap();
    put(&dir, "ca.pem", ca.pem());
    put(&dir, "cert.pem", leaf.pem());
    put(&dir, "key.pem", leaf_key.serialize_pem());
    std::env::set_current_dir(&dir).unwrap();
}

/// The inline `password` and `client_secret` values of `text`: read from the document when it
/// is well-formed YAML (a field error, such as a bad URL, comes only from such a text), else
/// from the `password:` and `client_secret:` lines (a syntax error).
fn inline_secrets(text: &str) -> Vec<String> {
    if let Ok(document) = serde_saphyr::from_str::<serde_json::Value>(text) {
        let accounts = document.get("accounts").and_then(|a| a.as_object());
        return accounts
            .into_iter()
            .flat_map(|accounts| accounts.values())
            .flat_map(|account| ["password", "client_secret"].map(|k| account.get(k)))
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
    }
    text.lines()
        .filter_map(|line| {
            // `key: value` (a colon without a space after it is part of a key or value).
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|key| (key, "")))?;
            let key = key.trim().trim_start_matches(['-', '{', ' ']);
            matches!(key, "password" | "client_secret").then_some(value)
        })
        .map(|value| {
            let value = value.trim().trim_end_matches([',', '}']);
            value.trim_matches(['"', '\'']).to_owned()
        })
        .collect()
}

/// Whether `value` is secret-like enough that finding it in an error means it was copied
/// there: 8 or more characters, letters and digits, no space. The errors' own words
/// (`expected mapping start at line 1`) never are; without this the fuzzer, which learns the
/// strings the target compares, writes passwords of them.
fn looks_like_a_secret(value: &str) -> bool {
    value.len() >= 8
        && value.bytes().any(|b| b.is_ascii_digit())
        && value.bytes().any(|b| b.is_ascii_alphabetic())
        && !value.chars().any(char::is_whitespace)
}

fuzz_target!(|data: &[u8]| {
    SETUP.call_once(setup);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            for account in config.accounts.values() {
                let c = &account.credentials;
                let shown = format!("{:?} {:?}", account, c);
                for secret in [c.expose_password(), c.expose_client_secret()] {
                    if looks_like_a_secret(secret)
                        && !c.client_id().contains(secret)
                        && !c.username().contains(secret)
                        && !account.name.as_str().contains(secret)
                        && !account.token_url.as_str().contains(secret)
                    {
                        assert!(!shown.contains(secret), "{shown}");
                    }
                }
            }
        }
        Err(error) => {
            let message = error.to_string();
            for secret in inline_secrets(text) {
                // A secret that is also written elsewhere in the text may be quoted for that.
                if looks_like_a_secret(&secret) && text.matches(secret.as_str()).count() == 1 {
                    assert!(
                        !message.contains(secret.as_str()),
                        "{message:?} quotes {secret:?}"
                    );
                }
            }
            for secret in [FILE_PASSWORD, FILE_CLIENT_SECRET] {
                if !text.contains(secret) {
                    assert!(!message.contains(secret), "{message:?}");
                }
            }
        }
    }
});
