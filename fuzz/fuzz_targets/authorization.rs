//! The `authorization` metadata of a call and the service-account token in it, checked by the
//! real `Authorizer` against a real key (ES256, `kid` `k1`, from a JWKS held in memory).
//!
//! Input, one of:
//! - `signed\n<header JSON>\n<claims JSON>`: a token of that header and those claims, signed
//!   with the key (so the fuzzer reaches the claim checks behind the signature);
//! - anything else: the `authorization` value as sent.
//!
//! Checks: no panic; only a signed token gets an identity, and that identity is
//! `system:serviceaccount:<namespace>:<name>` of Kubernetes object names.
#![no_main]

use std::{collections::BTreeMap, sync::LazyLock};

use bace_token_broker::{
    Authorizer,
    config::{AuthConfig, JwksSource, KubernetesConfig, LoadedFile},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, jwk::Jwk};
use libfuzzer_sys::fuzz_target;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "bace-token-broker";

struct Setup {
    runtime: tokio::runtime::Runtime,
    authorizer: Authorizer,
    key: EncodingKey,
}

static SETUP: LazyLock<Setup> = LazyLock::new(|| {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = EncodingKey::from_ec_der(pair.serialized_der());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
    let config = AuthConfig {
        kubernetes: Some(KubernetesConfig {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            jwks: JwksSource::File(LoadedFile {
                path: "fuzz-jwks.json".into(),
                contents: jwks.into_bytes(),
            }),
        }),
        allow: BTreeMap::new(),
    };
    Setup {
        runtime: tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap(),
        authorizer: Authorizer::new(config).unwrap(),
        key,
    }
});

fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fuzz_target!(|data: &[u8]| {
    let setup = &*SETUP;
    let (value, signed) = match data.strip_prefix(b"signed\n") {
        Some(rest) => {
            let (header, claims) = match rest.iter().position(|b| *b == b'\n') {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (rest, &b""[..]),
            };
            let message = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(claims)
            );
            let signature =
                jsonwebtoken::crypto::sign(message.as_bytes(), &setup.key, Algorithm::ES256)
                    .unwrap();
            (format!("Bearer {message}.{signature}"), true)
        }
        None => match std::str::from_utf8(data) {
            Ok(text) => (text.to_owned(), false),
            Err(_) => return,
        },
    };
    let result = setup
        .runtime
        .block_on(setup.authorizer.authenticate(Some(&value), None));
    match result {
        Ok(identity) => {
            assert!(signed, "an identity for an unsigned value: {value:?}");
            let rest = identity
                .strip_prefix("system:serviceaccount:")
                .unwrap_or_else(|| panic!("{identity:?}"));
            let (namespace, name) = rest
                .split_once(':')
                .unwrap_or_else(|| panic!("{identity:?}"));
            assert!(
                is_object_name(namespace) && is_object_name(name),
                "{identity:?}"
            );
        }
        // A fixed, short reason (a `&'static str`: it carries nothing of the token).
        Err(denied) => assert!(denied.reason().len() < 32),
    }
});
