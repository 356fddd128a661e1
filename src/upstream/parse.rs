//! Reading BACE's answers: the token endpoint's answer shapes (OAuth2 token, BACE's refresh
//! answer, OAuth2 and Yii errors) and the `expires` text of a refresh answer. Pure functions of
//! the bytes: never a panic, whatever BACE sends.

use std::time::SystemTime;

use chrono::{DateTime, LocalResult, NaiveDateTime, Offset, TimeDelta, TimeZone, Utc};
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
        429 => return Err(UpstreamError::RateLimited { retry_after: None }),
        408 | 500..=599 => return Err(UpstreamError::Status { status }),
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
/// Returns `None` when the text is not of that form. A local time that names one instant is
/// that instant. Around a DST change the rule is: **the earliest instant the text can mean**,
/// so that a token is never taken to live longer than BACE may have meant:
///
/// - in a fold (the clock went back: `2026-10-25 02:30` happens twice in Europe/Amsterdam),
///   the first of the two instants (`00:30Z`, not `01:30Z`);
/// - in a gap (the clock jumped over it: `2026-03-29 02:30` never happens in
///   Europe/Amsterdam), the time read with the offset in force after the jump, which is the
///   earlier of the two readings (`00:30Z`, i.e. 01:30 local: the gap's length before it).
pub(crate) fn parse_bace_expires(text: &str, tz: Tz) -> Option<SystemTime> {
    let naive = NaiveDateTime::parse_from_str(text.trim(), bace_wire::EXPIRES_FORMAT).ok()?;
    local_to_utc(naive, tz).map(SystemTime::from)
}

/// The earliest instant the local time `naive` in `tz` can mean (see [`parse_bace_expires`]).
fn local_to_utc(naive: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => Some(t.to_utc()),
        LocalResult::Ambiguous(first, second) => Some(first.to_utc().min(second.to_utc())),
        // A gap: read `naive` with the offsets in force a day before and a day after it (no
        // zone changes its offset twice within a day), and take the earlier instant.
        LocalResult::None => [-1, 1]
            .into_iter()
            .filter_map(|days| {
                let probe = naive.checked_add_signed(TimeDelta::days(days))?;
                let offset = tz.offset_from_utc_datetime(&probe).fix().local_minus_utc();
                naive.checked_sub_signed(TimeDelta::seconds(offset.into()))
            })
            .min()
            .map(|utc| utc.and_utc()),
    }
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
        for s in [408, 500, 502, 503, 504] {
            let e = parse(s, "{}").err().unwrap();
            assert_eq!(e, UpstreamError::Status { status: s });
            assert!(e.is_transient());
        }
        let e = parse(429, "{}").err().unwrap();
        assert_eq!(e, UpstreamError::RateLimited { retry_after: None });
        assert!(e.is_transient());
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

    fn utc(t: SystemTime) -> String {
        chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()
    }

    #[test]
    fn bace_expires_around_dst_changes_is_the_earliest_instant_meant() {
        // Gap: 2026-03-29 02:00 CET jumps to 03:00 CEST; 02:30 never happens. Read with CEST
        // (+2): 00:30Z, which is 01:30 CET, an hour before the text.
        assert_eq!(
            parse_bace_expires("2026-03-29 02:30:00", AMS)
                .map(utc)
                .unwrap(),
            "2026-03-29T00:30:00+00:00"
        );
        assert_eq!(
            parse_bace_expires("2026-03-29 02:00:00", AMS)
                .map(utc)
                .unwrap(),
            "2026-03-29T00:00:00+00:00"
        );
        // Either side of the gap: the one instant each names.
        assert_eq!(
            parse_bace_expires("2026-03-29 01:59:59", AMS)
                .map(utc)
                .unwrap(),
            "2026-03-29T00:59:59+00:00"
        );
        assert_eq!(
            parse_bace_expires("2026-03-29 03:00:00", AMS)
                .map(utc)
                .unwrap(),
            "2026-03-29T01:00:00+00:00"
        );
        // Fold: 2026-10-25 03:00 CEST goes back to 02:00 CET; 02:30 happens at 00:30Z (CEST)
        // and at 01:30Z (CET): the first.
        assert_eq!(
            parse_bace_expires("2026-10-25 02:30:00", AMS)
                .map(utc)
                .unwrap(),
            "2026-10-25T00:30:00+00:00"
        );
        assert_eq!(
            parse_bace_expires("2026-10-25 03:00:00", AMS)
                .map(utc)
                .unwrap(),
            "2026-10-25T02:00:00+00:00"
        );
        // A zone whose gap is not an hour (Lord Howe: 30 minutes), and one that skipped a
        // whole day (Samoa, 2011-12-30).
        let lord_howe: Tz = "Australia/Lord_Howe".parse().unwrap();
        assert_eq!(
            parse_bace_expires("2026-10-04 02:15:00", lord_howe)
                .map(utc)
                .unwrap(),
            "2026-10-03T15:15:00+00:00"
        );
        let apia: Tz = "Pacific/Apia".parse().unwrap();
        let skipped = parse_bace_expires("2011-12-30 12:00:00", apia).unwrap();
        let next_day = parse_bace_expires("2011-12-31 00:00:00", apia).unwrap();
        assert!(skipped < next_day);
        // A leap second (chrono reads `:60` in any minute) is the second after `:59` (found
        // by the bace_expires fuzz target: chrono shows it as `:59` plus a second of nanos).
        assert_eq!(
            parse_bace_expires("2016-12-31 23:59:60", chrono_tz::UTC)
                .map(utc)
                .unwrap(),
            "2017-01-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_bace_expires("2026-01-01 00:00:60", AMS)
                .map(utc)
                .unwrap(),
            "2025-12-31T23:01:00+00:00"
        );
        // The boundaries of the format: no panic, an instant or nothing.
        for text in [
            "0000-01-01 00:00:00",
            "9999-12-31 23:59:59",
            "+262142-12-31 23:59:59",
            "-262143-01-01 00:00:00",
            "2026-02-29 00:00:00",
            "2026-01-01 24:00:00",
            "2026-01-01 23:59:60",
        ] {
            let _ = parse_bace_expires(text, AMS);
            let _ = parse_bace_expires(text, apia);
        }
    }

    mod properties {
        use chrono::{NaiveDateTime, TimeZone};
        use proptest::prelude::*;

        use super::*;

        /// Zones with DST of every kind: hour gaps (north and south), a half-hour one, none.
        const ZONES: [&str; 6] = [
            "Europe/Amsterdam",
            "America/New_York",
            "Australia/Sydney",
            "Australia/Lord_Howe",
            "Pacific/Apia",
            "UTC",
        ];

        fn zone() -> impl Strategy<Value = Tz> {
            proptest::sample::select(&ZONES[..]).prop_map(|z| z.parse::<Tz>().unwrap())
        }

        /// 1970 to 2100, to the second.
        fn instant() -> impl Strategy<Value = i64> {
            0i64..4_102_444_800
        }

        proptest! {
            #![proptest_config(crate::proptest_config())]

            /// An instant written as BACE writes it, in the zone, reads back as itself, or as
            /// the earlier instant with the same local time when it falls in a fold.
            #[test]
            fn written_instants_read_back(tz in zone(), secs in instant()) {
                let at = chrono::DateTime::from_timestamp(secs, 0).unwrap();
                let text = at.with_timezone(&tz).format(bace_wire::EXPIRES_FORMAT).to_string();
                let read = chrono::DateTime::<chrono::Utc>::from(parse_bace_expires(&text, tz).unwrap());
                prop_assert!(read <= at, "{text}: {read} after {at}");
                prop_assert_eq!(read.with_timezone(&tz).naive_local(), at.with_timezone(&tz).naive_local());
                if read != at {
                    // Only in a fold: both instants show the same local time.
                    prop_assert!(tz.from_local_datetime(&at.with_timezone(&tz).naive_local()).single().is_none());
                }
            }

            /// Any local time reads as an instant (gap included), never later than any instant
            /// it can mean, and at most the zone's jump away from the text.
            #[test]
            fn every_local_time_reads_as_its_earliest_instant(tz in zone(), secs in instant()) {
                let naive: NaiveDateTime = chrono::DateTime::from_timestamp(secs, 0).unwrap().naive_utc();
                let text = naive.format(bace_wire::EXPIRES_FORMAT).to_string();
                let read = chrono::DateTime::<chrono::Utc>::from(parse_bace_expires(&text, tz).unwrap());
                match tz.from_local_datetime(&naive) {
                    chrono::LocalResult::Single(t) => prop_assert_eq!(read, t.to_utc()),
                    chrono::LocalResult::Ambiguous(a, b) => prop_assert_eq!(read, a.to_utc().min(b.to_utc())),
                    chrono::LocalResult::None => {
                        // In a gap: before the first instant after it, and shown as a local
                        // time before the text by no more than a day.
                        let shown = read.with_timezone(&tz).naive_local();
                        prop_assert!(shown < naive);
                        prop_assert!(naive - shown <= chrono::TimeDelta::days(1));
                    }
                }
            }

            /// Arbitrary text never panics; what is not the format reads as nothing.
            #[test]
            fn arbitrary_text_never_panics(tz in zone(), text in "\\PC{0,40}") {
                let read = parse_bace_expires(&text, tz);
                if NaiveDateTime::parse_from_str(text.trim(), bace_wire::EXPIRES_FORMAT).is_err() {
                    prop_assert_eq!(read, None);
                }
            }

            /// Text close to the format (digits and separators in its places) never panics.
            #[test]
            fn near_format_text_never_panics(
                tz in zone(),
                text in "[+-]?[0-9]{1,7}-[0-9]{1,3}-[0-9]{1,3} [0-9]{1,3}:[0-9]{1,3}:[0-9]{1,3}",
            ) {
                let _ = parse_bace_expires(&text, tz);
            }
        }
    }
}
