//! What the store keeps of a token, before encryption: a compact, versioned binary form.
//!
//! ```text
//! offset  size  field
//! 0       1     format (1)
//! 1       1     flags: bit 0 a refresh token follows, bit 1 obtained or extended by a refresh
//! 2       8     obtained at, Unix milliseconds, big-endian
//! 10      8     expires at, Unix milliseconds, big-endian
//! 18      4     access token length n, big-endian
//! 22      n     access token (UTF-8)
//! 22+n    rest  refresh token (UTF-8), when flag bit 0 is set
//! ```
//!
//! The account and the version are not in it: they are the associated data of the encryption
//! (see `crypto`), so a record cannot be replayed for another account or version. Credentials
//! are never part of a record. Buffers holding plaintext are zeroed when dropped.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{SecretString, zeroize::Zeroizing};
use tokio::time::Instant;

use crate::token::{AccountName, Token};

/// The plaintext format written today.
const FORMAT: u8 = 1;
const HAS_REFRESH: u8 = 0b01;
const REFRESHED: u8 = 0b10;
const HEADER: usize = 22;

/// Why a decrypted plaintext is not a token record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    /// A format this broker does not know (written by a newer one).
    #[error("unknown record format {0}")]
    Format(u8),
    /// Too short, bad lengths or not UTF-8.
    #[error("malformed record")]
    Shape,
}

/// Serializes `token` (plaintext; zeroed on drop).
pub(crate) fn encode(token: &Token) -> Zeroizing<Vec<u8>> {
    let access = token.expose_access().as_bytes();
    let refresh = token.expose_refresh().map(str::as_bytes);
    let mut out = Zeroizing::new(Vec::with_capacity(
        HEADER + access.len() + refresh.map_or(0, <[u8]>::len) + super::crypto::OVERHEAD,
    ));
    let mut flags = 0;
    if refresh.is_some() {
        flags |= HAS_REFRESH;
    }
    if token.is_refreshed() {
        flags |= REFRESHED;
    }
    let expires = token.expires_at_wall();
    let obtained = expires.checked_sub(token.lifetime()).unwrap_or(expires);
    out.push(FORMAT);
    out.push(flags);
    out.extend_from_slice(&unix_millis(obtained).to_be_bytes());
    out.extend_from_slice(&unix_millis(expires).to_be_bytes());
    let len = u32::try_from(access.len()).expect("token answers are capped far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(access);
    out.extend_from_slice(refresh.unwrap_or_default());
    out
}

/// Rebuilds the token of `account` from a plaintext, its times mapped onto this process's clock
/// (`now`, `now_wall`).
pub(crate) fn decode(
    account: &AccountName,
    plain: &[u8],
    now: Instant,
    now_wall: SystemTime,
) -> Result<Token, Malformed> {
    let (&format, rest) = plain.split_first().ok_or(Malformed::Shape)?;
    if format != FORMAT {
        return Err(Malformed::Format(format));
    }
    if plain.len() < HEADER {
        return Err(Malformed::Shape);
    }
    let flags = rest[0];
    let millis = |at: usize| u64::from_be_bytes(plain[at..at + 8].try_into().expect("8 bytes"));
    let obtained = UNIX_EPOCH + Duration::from_millis(millis(2));
    let expires = UNIX_EPOCH + Duration::from_millis(millis(10));
    let len = u32::from_be_bytes(plain[18..22].try_into().expect("4 bytes")) as usize;
    let body = &plain[HEADER..];
    if body.len() < len || flags & !(HAS_REFRESH | REFRESHED) != 0 {
        return Err(Malformed::Shape);
    }
    let (access, refresh) = body.split_at(len);
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(|s| SecretString::from(s.to_owned()))
            .map_err(|_| Malformed::Shape)
    };
    let access = text(access)?;
    let refresh = if flags & HAS_REFRESH != 0 {
        Some(text(refresh)?)
    } else if refresh.is_empty() {
        None
    } else {
        return Err(Malformed::Shape);
    };
    if expires < obtained {
        return Err(Malformed::Shape);
    }
    Ok(Token::restored(
        account.clone(),
        access,
        refresh,
        flags & REFRESHED != 0,
        obtained,
        expires,
        now,
        now_wall,
    ))
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(refresh: Option<&str>) -> Token {
        Token::new(
            AccountName::new("fleet-a").unwrap(),
            SecretString::from("access-1"),
            refresh.map(|r| SecretString::from(r.to_owned())),
            Duration::from_secs(3600),
            Instant::now(),
            SystemTime::now(),
        )
    }

    #[test]
    fn round_trip_keeps_the_token_and_its_times() {
        let account = AccountName::new("fleet-a").unwrap();
        for original in [
            token(Some("refresh-1")),
            token(None),
            token(Some("")),
            token(Some("r")).from_refresh(),
        ] {
            let plain = encode(&original);
            let (now, wall) = (Instant::now(), SystemTime::now());
            let back = decode(&account, &plain, now, wall).unwrap();
            assert_eq!(back.expose_access(), original.expose_access());
            assert_eq!(back.expose_refresh(), original.expose_refresh());
            assert_eq!(back.is_refreshed(), original.is_refreshed());
            assert_eq!(back.fingerprint(), original.fingerprint());
            let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();
            assert_eq!(ms(back.expires_at_wall()), ms(original.expires_at_wall()));
            // About an hour left, counted on this process's clock.
            assert!(back.valid_for(now, Duration::from_secs(3500)));
            assert!(!back.valid_for(now, Duration::from_secs(3601)));
        }
    }

    #[test]
    fn malformed_plaintexts_are_errors_not_panics() {
        let account = AccountName::new("a").unwrap();
        let good = encode(&token(Some("r")));
        let (now, wall) = (Instant::now(), SystemTime::now());
        assert_eq!(
            decode(&account, &[], now, wall).unwrap_err(),
            Malformed::Shape
        );
        assert_eq!(
            decode(&account, &[9, 0, 0], now, wall).unwrap_err(),
            Malformed::Format(9)
        );
        for cut in 1..good.len() {
            let _ = decode(&account, &good[..cut], now, wall);
        }
        let mut long = good.to_vec();
        long[18..22].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode(&account, &long, now, wall).unwrap_err(),
            Malformed::Shape
        );
        let mut flags = good.to_vec();
        flags[1] = 0x80;
        assert_eq!(
            decode(&account, &flags, now, wall).unwrap_err(),
            Malformed::Shape
        );
    }
}
