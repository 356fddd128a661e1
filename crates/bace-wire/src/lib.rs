//! What BACE's OAuth2 token endpoint (`POST /oauth2/token`) speaks, as far as both sides of it
//! need to agree: the broker's HTTP client and the fake BACE its tests and demo run. Keeping
//! these in one place means the two cannot drift apart.
//!
//! The upstream document is BACE's authentication guide: a password grant issues a token (24 h),
//! a refresh grant with the token as Bearer extends it and answers
//! `{"refreshed": true, "expires": "YYYY-MM-DD HH:MM:SS"}` in BACE's local time.
#![forbid(unsafe_code)]

use std::fmt;

/// The path of the token endpoint.
pub const TOKEN_PATH: &str = "/oauth2/token";

/// The `strftime` format of `expires` in BACE's refresh answer (local time, no zone).
pub const EXPIRES_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// The zone BACE writes `expires` in, unless configured otherwise.
pub const DEFAULT_EXPIRES_TIMEZONE: &str = "Europe/Amsterdam";

/// The two grants of the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Grant {
    /// `grant_type=password`: a new token from the account's credentials.
    Password,
    /// `grant_type=refresh_token`: extends (or replaces) the current token.
    Refresh,
}

impl Grant {
    /// Both grants.
    pub const ALL: [Grant; 2] = [Grant::Password, Grant::Refresh];

    /// The `grant_type` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Grant::Password => "password",
            Grant::Refresh => "refresh_token",
        }
    }

    /// The grant a `grant_type` value names, if any.
    pub fn from_grant_type(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == value)
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_type_values_round_trip() {
        for grant in Grant::ALL {
            assert_eq!(Grant::from_grant_type(grant.as_str()), Some(grant));
        }
        assert_eq!(Grant::from_grant_type("client_credentials"), None);
        assert_eq!(Grant::Password.to_string(), "password");
        assert_eq!(Grant::Refresh.to_string(), "refresh_token");
    }
}
