//! JWKS documents (`auth.kubernetes.jwks_file`, or what `jwks_url` serves): the parser, and
//! the real `Authorizer` built from the document.
//!
//! Checks: no panic; the parser and the authorizer agree on whether the document is usable;
//! an error is short and quotes no string of the document (a JWKS may hold an HMAC or
//! private key by mistake).
#![no_main]

use std::collections::BTreeMap;

use bace_token_broker::{
    Authorizer,
    config::{AuthConfig, JwksSource, KubernetesConfig, LoadedFile},
    fuzzing::parse_jwks,
};
use libfuzzer_sys::fuzz_target;

/// The fixed words of the errors (a document string among them is no quote).
const FIXED: &str = "auth.kubernetes.jwks_file: not a JWKS document: invalid JSON JSON ends early \
    expected {\"keys\": [...]} at line column holds no usable signing key (RSA, EC P-256/P-384 \
    or Ed25519)";

fn strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| {
            out.push(k.clone());
            strings(v, out)
        }),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse_jwks(data);
    let config = AuthConfig {
        kubernetes: Some(KubernetesConfig {
            issuer: "https://issuer".into(),
            audience: "bace-token-broker".into(),
            jwks: JwksSource::File(LoadedFile {
                path: "fuzz-jwks.json".into(),
                contents: data.to_vec(),
            }),
        }),
        allow: BTreeMap::new(),
    };
    let built = Authorizer::new(config);
    match (&parsed, &built) {
        (Ok(keys), Ok(_)) => assert!(*keys > 0),
        (Err(_), Err(_)) => {}
        _ => panic!("parser {parsed:?} and authorizer disagree"),
    }
    if let (Err(message), Err(error)) = (&parsed, &built) {
        let display = error.to_string();
        assert!(message.len() < 200, "{message}");
        let mut found = Vec::new();
        if let Ok(document) = serde_json::from_slice::<serde_json::Value>(data) {
            strings(&document, &mut found);
        }
        for s in found
            .iter()
            .filter(|s| s.len() >= 8 && !FIXED.contains(s.as_str()))
        {
            assert!(!message.contains(s.as_str()), "{message:?} quotes {s:?}");
            assert!(!display.contains(s.as_str()), "{display:?} quotes {s:?}");
        }
    }
});
