//! BACE's `expires` text (`YYYY-MM-DD HH:MM:SS`, local time) in zones with every kind of DST.
//!
//! Input: one byte choosing the zone, then the text.
//! Checks: no panic; an instant read is the earliest the local time can mean: shown in the
//! zone it is the text's local time (or, in a DST gap, up to a day before it); a leap second
//! (`:60`, which chrono reads anywhere) is the second after `:59`.
#![no_main]

use bace_token_broker::fuzzing::parse_bace_expires;
use chrono::{NaiveDateTime, TimeZone};
use chrono_tz::Tz;
use libfuzzer_sys::fuzz_target;

const ZONES: [Tz; 6] = [
    chrono_tz::Europe::Amsterdam,
    chrono_tz::America::New_York,
    chrono_tz::Australia::Lord_Howe,
    chrono_tz::Pacific::Apia,
    chrono_tz::Asia::Kolkata,
    chrono_tz::UTC,
];

fuzz_target!(|data: &[u8]| {
    let Some((zone, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let tz = ZONES[usize::from(*zone) % ZONES.len()];
    let read = parse_bace_expires(text, tz);
    let naive = NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%d %H:%M:%S");
    match (read, naive) {
        (Some(_), Err(_)) => panic!("{text:?} read though not in the format"),
        (None, Ok(naive)) => {
            // Only at the very ends of chrono's range.
            assert!(
                naive.and_utc().timestamp().abs() > 8_000_000_000_000,
                "{text:?} in the format but not read"
            );
        }
        (Some(read), Ok(naive)) => {
            // Compared as `SystemTime`s: a leap second (`:60`) is the second after `:59`.
            let instant = |t: chrono::DateTime<Tz>| std::time::SystemTime::from(t);
            let at = chrono::DateTime::<chrono::Utc>::from(read);
            let shown = at.with_timezone(&tz).naive_local();
            match tz.from_local_datetime(&naive) {
                chrono::LocalResult::Single(t) => assert_eq!(read, instant(t), "{text:?}"),
                chrono::LocalResult::Ambiguous(a, b) => {
                    assert_eq!(read, instant(a.min(b)), "{text:?}")
                }
                chrono::LocalResult::None => {
                    assert!(shown < naive, "{text:?}: {shown}");
                    assert!(
                        naive - shown <= chrono::TimeDelta::days(1),
                        "{text:?}: {shown}"
                    );
                }
            }
        }
        (None, Err(_)) => {}
    }
});
