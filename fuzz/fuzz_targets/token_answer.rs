//! BACE's answers to the token endpoint (`parse_answer`): any status, any body.
//!
//! Input: two bytes of HTTP status (big-endian, taken modulo 600), then the body.
//! Checks: no panic; a token is usable as a header value; an error's text is short, has no
//! control characters and holds no token the body carried.
#![no_main]

use bace_token_broker::{Issued, MAX_BODY_BYTES, UpstreamError, parse_answer};
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;

/// Whether `value` is token-like enough that finding it in an error means it was copied there:
/// 8 or more characters, letters and digits, no space. The errors' own words (`access_token`,
/// `rejected by BACE (HTTP 401`, `Status { status: 503 }`) never are; without this the fuzzer,
/// which learns the strings the target compares, makes tokens of them.
fn looks_like_a_token(value: &str) -> bool {
    value.len() >= 8
        && value.bytes().any(|b| b.is_ascii_digit())
        && value.bytes().any(|b| b.is_ascii_alphabetic())
        && !value.chars().any(char::is_whitespace)
}

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = u16::from_be_bytes(*status) % 600;
    // The HTTP client never hands over more than this.
    if body.len() > MAX_BODY_BYTES {
        return;
    }
    match parse_answer(status, body, chrono_tz::Europe::Amsterdam) {
        Ok(Issued::Token {
            access, refresh, ..
        }) => {
            assert!((200..300).contains(&status));
            for token in std::iter::once(&access).chain(&refresh) {
                let token = token.expose_secret();
                assert!(!token.is_empty() && token.len() <= 4096);
                assert!(token.bytes().all(|b| b.is_ascii_graphic()), "{token:?}");
            }
        }
        Ok(Issued::Extended { .. }) => assert!((200..300).contains(&status)),
        Err(error) => {
            let display = error.to_string();
            let debug = format!("{error:?}");
            if let UpstreamError::Rejected {
                error: Some(text), ..
            } = &error
            {
                assert!(text.chars().count() <= 161, "{text:?}");
                assert!(!text.chars().any(char::is_control), "{text:?}");
            }
            // No token of the body in the error (unless BACE also put it in its error text,
            // which is BACE's message, kept for the logs).
            if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
                let error_text: String = ["error", "error_description", "name", "message"]
                    .iter()
                    .filter_map(|k| map.get(*k).and_then(|v| v.as_str()))
                    .collect();
                for key in ["access_token", "refresh_token"] {
                    if let Some(serde_json::Value::String(token)) = map.get(key)
                        && looks_like_a_token(token)
                        && !error_text.contains(token.as_str())
                    {
                        assert!(!display.contains(token.as_str()), "{display}");
                        assert!(!debug.contains(token.as_str()), "{debug}");
                    }
                }
            }
        }
    }
});
