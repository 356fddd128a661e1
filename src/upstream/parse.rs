//! Reading BACE's answers: the token endpoint's answer shapes (OAuth2 token, BACE's refresh
//! answer, OAuth2 and Yii errors) and the `expires` text of a refresh answer. Pure functions of
//! the bytes: never a panic, whatever BACE sends.

use std::time::SystemTime;

use chrono::{NaiveDateTime, TimeZone};
use chrono_tz::Tz;
use secrecy::SecretString;
use serde::Deserialize;
use tokio::time::Duration;

use super::{Issued, UpstreamError};

// === Answer parsing ===

/// The union of the answer shapes: OAuth2 token, BACE refresh, OAuth2 error, BACE/Yii error.
#[derive(Deserialize)]
struct Answer {
    access_token: Option<serde_json::Value>,
    refresh_token: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
    refreshed: Option<serde_json::Value>,
    expires: Option<serde_json::Value>,
    // OAuth2 errors.
    error: Option<serde_json::Value>,
    error_description: Option<serde_json::Value>,
    // Yii errors.
    name: Option<serde_json::Value>,
    message: Option<serde_json::Value>,
}

/// Turns an HTTP status and body into an [`Issued`] or an [`UpstreamError`]. Never panics,
/// whatever the bytes.
pub fn parse_answer(status: u16, body: &[u8], tz: Tz) -> Result<Issued, UpstreamError> {
    let answer: Option<Answer> = serde_json::from_slice(body).ok();
    match status {
        200..=299 => {}
        408 | 429 | 500..=599 => return Err(UpstreamError::Status { status }),
        300..=399 => return Err(UpstreamError::InvalidAnswer("unexpected redirect")),
        _ => {
            return Err(UpstreamError::Rejected {
                status,
                error: answer.as_ref().and_then(error_text),
            });
        }
    }
    let answer = answer.ok_or(UpstreamError::InvalidAnswer("answer is not a JSON object"))?;
    if let Some(refreshed) = &answer.refreshed {
        if refreshed.as_bool() != Some(true) {
            return Err(UpstreamError::Rejected {
                status,
                error: Some("refreshed is not true".into()),
            });
        }
        let expires = answer
            .expires
            .as_ref()
            .and_then(|e| e.as_str())
            .and_then(|e| parse_bace_expires(e, tz));
        return Ok(Issued::Extended { expires });
    }
    let access = match &answer.access_token {
        Some(serde_json::Value::String(s)) if is_token_text(s) => SecretString::from(s.as_str()),
        Some(_) => {
            return Err(UpstreamError::InvalidAnswer(
                "access_token is not a usable string",
            ));
        }
        None => {
            return Err(UpstreamError::InvalidAnswer(
                "answer has neither access_token nor refreshed",
            ));
        }
    };
    let refresh = match &answer.refresh_token {
        Some(serde_json::Value::String(s)) if is_token_text(s) => {
            Some(SecretString::from(s.as_str()))
        }
        None | Some(serde_json::Value::Null) => None,
        Some(_) => {
            return Err(UpstreamError::InvalidAnswer(
                "refresh_token is not a usable string",
            ));
        }
    };
    let lifetime = match &answer.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(parse_expires_in(v).ok_or(UpstreamError::InvalidAnswer(
            "expires_in is not a number of seconds",
        ))?),
    };
    Ok(Issued::Token {
        access,
        refresh,
        lifetime,
    })
}

/// `expires_in` as a JSON number or a string of one; negative counts as zero.
fn parse_expires_in(v: &serde_json::Value) -> Option<Duration> {
    let secs = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    if !secs.is_finite() {
        return None;
    }
    Duration::try_from_secs_f64(secs.clamp(0.0, 10.0 * 365.0 * 86_400.0)).ok()
}

/// A token must fit an HTTP header: visible ASCII, no spaces, not empty, not huge.
fn is_token_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= 4096 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// The error code and description of either error shape, shortened for logs.
fn error_text(a: &Answer) -> Option<String> {
    let text =
        |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v.as_str()).map(str::to_owned);
    let (code, description) = match text(&a.error) {
        Some(code) => (Some(code), text(&a.error_description)),
        None => (text(&a.name), text(&a.message)),
    };
    let joined = match (code, description) {
        (Some(c), Some(d)) => format!("{c}: {d}"),
        (Some(c), None) => c,
        (None, Some(d)) => d,
        (None, None) => return None,
    };
    let mut short: String = joined
        .chars()
        .filter(|c| !c.is_control())
        .take(160)
        .collect();
    if short.len() < joined.len() {
        short.push('…');
    }
    Some(short)
}

/// Parses BACE's refresh answer `expires` (`"YYYY-MM-DD HH:MM:SS"`, local time in `tz`).
///
/// Returns `None` when the text is not of that form or names a local time that does not exist
/// in `tz` (a DST gap). An ambiguous local time (DST fold) resolves to the earlier instant.
pub(crate) fn parse_bace_expires(text: &str, tz: Tz) -> Option<SystemTime> {
    let naive = NaiveDateTime::parse_from_str(text.trim(), bace_wire::EXPIRES_FORMAT).ok()?;
    let local = tz.from_local_datetime(&naive).earliest()?;
    Some(SystemTime::from(local.with_timezone(&chrono::Utc)))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    const AMS: Tz = chrono_tz::Europe::Amsterdam;

    fn parse(status: u16, body: &str) -> Result<Issued, UpstreamError> {
        parse_answer(status, body.as_bytes(), AMS)
    }

    #[test]
    fn password_grant_answer() {
        let body = r#"{"access_token":"8a0b","expires_in":86400,"token_type":"Bearer","scope":null,"refresh_token":"1281"}"#;
        let Ok(Issued::Token {
            access,
            refresh,
            lifetime,
        }) = parse(200, body)
        else {
            panic!("not a token");
        };
        assert_eq!(access.expose_secret(), "8a0b");
        assert_eq!(refresh.unwrap().expose_secret(), "1281");
        assert_eq!(lifetime, Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn expires_in_as_string_float_or_missing() {
        for (v, want) in [
            ("\"3600\"", Some(3600.0)),
            ("3600.5", Some(3600.5)),
            ("-5", Some(0.0)),
            ("null", None),
        ] {
            let body = format!(r#"{{"access_token":"a","expires_in":{v}}}"#);
            let Ok(Issued::Token {
                lifetime, refresh, ..
            }) = parse(200, &body)
            else {
                panic!("{v}");
            };
            assert_eq!(lifetime, want.map(Duration::from_secs_f64), "{v}");
            assert!(refresh.is_none());
        }
        assert!(matches!(
            parse(200, r#"{"access_token":"a","expires_in":"soon"}"#),
            Err(UpstreamError::InvalidAnswer(_))
        ));
    }

    #[test]
    fn bace_refresh_answer() {
        let Ok(Issued::Extended { expires }) = parse(
            200,
            r#"{"refreshed": true, "expires": "2022-04-04 14:19:49"}"#,
        ) else {
            panic!();
        };
        assert_eq!(expires, parse_bace_expires("2022-04-04 14:19:49", AMS));
        let Ok(Issued::Extended { expires }) = parse(200, r#"{"refreshed": true, "expires": 12}"#)
        else {
            panic!();
        };
        assert_eq!(expires, None);
        assert!(matches!(
            parse(200, r#"{"refreshed": false}"#),
            Err(UpstreamError::Rejected { status: 200, .. })
        ));
    }

    #[test]
    fn error_bodies_of_both_shapes() {
        let e = parse(
            400,
            r#"{"error":"invalid_grant","error_description":"bad password"}"#,
        )
        .err()
        .unwrap();
        assert_eq!(
            e,
            UpstreamError::Rejected {
                status: 400,
                error: Some("invalid_grant: bad password".into())
            }
        );
        let e = parse(
            401,
            r#"{"name":"Unauthorized","message":"Your request was made with invalid credentials.","code":0,"status":401}"#,
        )
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "rejected by BACE (HTTP 401: Unauthorized: Your request was made with invalid credentials.)"
        );
        assert!(!e.is_transient());
        let e = parse(403, "<html>nope</html>").err().unwrap();
        assert_eq!(
            e,
            UpstreamError::Rejected {
                status: 403,
                error: None
            }
        );
        let long = format!(
            r#"{{"error":"x","error_description":"{}"}}"#,
            "y".repeat(1000)
        );
        let Err(UpstreamError::Rejected {
            error: Some(text), ..
        }) = parse(400, &long)
        else {
            panic!();
        };
        assert!(text.chars().count() <= 161);
    }

    #[test]
    fn transient_statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            let e = parse(s, "{}").err().unwrap();
            assert_eq!(e, UpstreamError::Status { status: s });
            assert!(e.is_transient());
        }
        assert_eq!(parse(429, "").err().unwrap().class(), "rate limited");
        assert!(matches!(
            parse(302, ""),
            Err(UpstreamError::InvalidAnswer(_))
        ));
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for body in [
            "",
            "{",
            "null",
            "[]",
            "42",
            r#"{"access_token": ""}"#,
            r#"{"access_token": "has space"}"#,
            r#"{"access_token": 12}"#,
            r#"{"access_token": "a", "refresh_token": 5}"#,
            r#"{"token_type": "Bearer"}"#,
            "\u{0}\u{1}binary",
        ] {
            let e = parse(200, body)
                .err()
                .unwrap_or_else(|| panic!("{body:?} accepted"));
            assert!(
                e.is_transient() || matches!(e, UpstreamError::Rejected { .. }),
                "{body:?}"
            );
        }
        // Arbitrary bytes never panic.
        let bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        assert!(parse_answer(200, &bytes, AMS).is_err());
        assert!(parse_answer(500, &bytes, AMS).is_err());
        assert!(parse_answer(401, &bytes, AMS).is_err());
    }

    #[test]
    fn bace_expires_is_local_time_in_the_configured_zone() {
        let tz: Tz = "Europe/Amsterdam".parse().unwrap();
        // Summer: CEST = UTC+2.
        let t = parse_bace_expires("2022-04-04 14:19:49", tz).unwrap();
        let utc = chrono::DateTime::<chrono::Utc>::from(t);
        assert_eq!(utc.to_rfc3339(), "2022-04-04T12:19:49+00:00");
        // Winter: CET = UTC+1.
        let t = parse_bace_expires("2022-01-04 14:19:49", tz).unwrap();
        let utc = chrono::DateTime::<chrono::Utc>::from(t);
        assert_eq!(utc.to_rfc3339(), "2022-01-04T13:19:49+00:00");
        // UTC zone.
        let t = parse_bace_expires(" 2022-01-04 14:19:49 ", chrono_tz::UTC).unwrap();
        assert_eq!(
            chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339(),
            "2022-01-04T14:19:49+00:00"
        );
        // DST gap (02:30 does not exist on 2022-03-27 in Amsterdam) and garbage.
        assert_eq!(parse_bace_expires("2022-03-27 02:30:00", tz), None);
        for bad in [
            "",
            "tomorrow",
            "2022-04-04T14:19:49Z",
            "2022-13-04 14:19:49",
            "1649074789",
        ] {
            assert_eq!(parse_bace_expires(bad, tz), None, "{bad}");
        }
    }
}
