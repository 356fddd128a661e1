//! The broker's domain values: validated account names and BACE tokens.
//!
//! A [`Token`] holds its secrets in [`SecretString`]s; its `Debug` shows only the account, a short
//! [`Fingerprint`] and the expiry, so a token can be logged, put in an error or printed in a panic
//! without leaking. Expiry is kept twice: as a pausable [`tokio::time::Instant`] for every
//! decision, and as a wall-clock [`SystemTime`] for the wire.

use std::{borrow::Borrow, fmt, sync::Arc, time::SystemTime};

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::time::{Duration, Instant};

/// Longest account name accepted, in bytes.
pub const MAX_ACCOUNT_NAME_LEN: usize = 128;

/// An account name: 1 to 128 ASCII letters, digits, `.`, `_` or `-`.
///
/// Cheap to clone (an `Arc<str>`), usable as a map key and borrowable as `&str` for lookups.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountName(Arc<str>);

/// Why a string is not an [`AccountName`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccountNameError {
    /// The name is empty.
    #[error("account name is empty")]
    Empty,
    /// The name is longer than [`MAX_ACCOUNT_NAME_LEN`].
    #[error("account name is longer than {MAX_ACCOUNT_NAME_LEN} bytes")]
    TooLong,
    /// The name holds a character outside `[A-Za-z0-9._-]`.
    #[error("account name may only hold ASCII letters, digits, '.', '_' and '-'")]
    BadCharacter,
}

impl AccountName {
    /// Checks `name` against the naming rule without allocating.
    pub fn validate(name: &str) -> Result<(), AccountNameError> {
        if name.is_empty() {
            return Err(AccountNameError::Empty);
        }
        if name.len() > MAX_ACCOUNT_NAME_LEN {
            return Err(AccountNameError::TooLong);
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(AccountNameError::BadCharacter);
        }
        Ok(())
    }

    /// Validates and wraps `name`.
    pub fn new(name: &str) -> Result<Self, AccountNameError> {
        Self::validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for AccountName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The first 8 bytes of a token value's SHA-256: compares tokens without keeping them (two
/// different tokens share one with a chance of 2⁻⁶⁴), and its first four bytes (`Display`)
/// name a token in logs without revealing it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 8]);

impl Fingerprint {
    /// Fingerprints a token value.
    pub fn of(value: &str) -> Self {
        let digest = Sha256::digest(value.as_bytes());
        let mut prefix = [0; 8];
        prefix.copy_from_slice(&digest[..8]);
        Self(prefix)
    }
}

impl Fingerprint {
    /// The 8 bytes, for storing beside a token (a shared store compares them).
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }

    /// The 8 bytes as 16 lowercase hex digits.
    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// The `Authorization` scheme prefix of a token.
const BEARER: &str = "Bearer ";

/// A BACE access token held by the broker, with its refresh token and expiry.
///
/// The secrets live in one allocation, `"Bearer <access><refresh>"`: the authorization value
/// (built once, so serving a token costs no formatting), the access token and the refresh
/// token are slices of it. With 100,000 accounts every byte per token counts.
pub struct Token {
    account: AccountName,
    secrets: SecretString,
    /// Where the access token ends in `secrets` (the refresh token, if any, follows).
    access_end: u32,
    /// Whether BACE gave a refresh token.
    has_refresh: bool,
    /// Obtained or extended by a refresh grant (not a login).
    refreshed: bool,
    fingerprint: Fingerprint,
    obtained_at: Instant,
    expires_at: Instant,
    expires_at_wall: SystemTime,
}

impl Token {
    /// A token obtained now (`now`, `now_wall`) that BACE accepts for `lifetime`.
    pub fn new(
        account: AccountName,
        access: SecretString,
        refresh: Option<SecretString>,
        lifetime: Duration,
        now: Instant,
        now_wall: SystemTime,
    ) -> Self {
        let access = access.expose_secret();
        let refresh = refresh.as_ref().map(ExposeSecret::expose_secret);
        let mut secrets =
            String::with_capacity(BEARER.len() + access.len() + refresh.map_or(0, str::len));
        secrets.push_str(BEARER);
        secrets.push_str(access);
        secrets.push_str(refresh.unwrap_or_default());
        let access_end = u32::try_from(BEARER.len() + access.len())
            .expect("token answers are capped far below 4 GiB");
        Self {
            account,
            secrets: SecretString::from(secrets),
            access_end,
            has_refresh: refresh.is_some(),
            refreshed: false,
            fingerprint: Fingerprint::of(access),
            obtained_at: now,
            expires_at: now + lifetime,
            expires_at_wall: now_wall + lifetime,
        }
    }

    /// A token another process obtained at `obtained_wall`, valid until `expires_wall` (both
    /// wall-clock, as a shared store keeps them), mapped onto this process's clock: `now` is
    /// `now_wall`. When this process's clock cannot go back to `obtained_wall` (a monotonic
    /// clock younger than the token), the token counts as obtained now with what is left of
    /// its life.
    #[allow(clippy::too_many_arguments)]
    pub fn restored(
        account: AccountName,
        access: SecretString,
        refresh: Option<SecretString>,
        refreshed: bool,
        obtained_wall: SystemTime,
        expires_wall: SystemTime,
        now: Instant,
        now_wall: SystemTime,
    ) -> Self {
        let left = expires_wall
            .duration_since(now_wall)
            .unwrap_or(Duration::ZERO);
        let age = now_wall
            .duration_since(obtained_wall)
            .unwrap_or(Duration::ZERO);
        let mut token = Self::new(account, access, refresh, left, now, now_wall);
        if let Some(obtained_at) = now.checked_sub(age) {
            token.obtained_at = obtained_at;
        }
        token.refreshed = refreshed;
        token
    }

    /// Marks a token as the answer to a refresh grant.
    pub fn from_refresh(mut self) -> Self {
        self.refreshed = true;
        self
    }

    /// Whether a refresh grant (not a login) obtained or last extended this token.
    pub fn is_refreshed(&self) -> bool {
        self.refreshed
    }

    /// The same access and refresh token with a new lifetime counted from `now`
    /// (BACE's refresh answer extends the token it was called with).
    pub fn extended(&self, lifetime: Duration, now: Instant, now_wall: SystemTime) -> Self {
        Self {
            account: self.account.clone(),
            secrets: self.secrets.clone(),
            access_end: self.access_end,
            has_refresh: self.has_refresh,
            refreshed: true,
            fingerprint: self.fingerprint,
            obtained_at: now,
            expires_at: now + lifetime,
            expires_at_wall: now_wall + lifetime,
        }
    }

    /// The account this token belongs to.
    pub fn account(&self) -> &AccountName {
        &self.account
    }

    /// The access token. Secret: never log it.
    pub fn expose_access(&self) -> &str {
        &self.secrets.expose_secret()[BEARER.len()..self.access_end as usize]
    }

    /// `"Bearer <access token>"`. Secret: never log it.
    pub fn expose_authorization(&self) -> &str {
        &self.secrets.expose_secret()[..self.access_end as usize]
    }

    /// The refresh token, when BACE gave one. Secret: never log it.
    pub fn expose_refresh(&self) -> Option<&str> {
        self.has_refresh
            .then(|| &self.secrets.expose_secret()[self.access_end as usize..])
    }

    /// A loggable name for the access token.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// When the broker obtained (or last extended) this token.
    pub fn obtained_at(&self) -> Instant {
        self.obtained_at
    }

    /// When BACE stops accepting the token.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// [`Token::expires_at`] in wall-clock time, for the wire.
    pub fn expires_at_wall(&self) -> SystemTime {
        self.expires_at_wall
    }

    /// The lifetime BACE granted when the token was obtained or extended.
    pub fn lifetime(&self) -> Duration {
        self.expires_at - self.obtained_at
    }

    /// Whether the token stays valid for at least `needed` after `now`.
    pub fn valid_for(&self, now: Instant, needed: Duration) -> bool {
        now.checked_add(needed).is_some_and(|t| t < self.expires_at)
    }

    /// Whether `value` is this token's access token.
    pub fn is(&self, value: &str) -> bool {
        Fingerprint::of(value) == self.fingerprint
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("account", &self.account)
            .field("fingerprint", &self.fingerprint)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names() {
        assert!(AccountName::new("fleet-a.prod_1").is_ok());
        assert_eq!(AccountName::new(""), Err(AccountNameError::Empty));
        assert_eq!(AccountName::new("a b"), Err(AccountNameError::BadCharacter));
        assert_eq!(AccountName::new("ä"), Err(AccountNameError::BadCharacter));
        assert_eq!(AccountName::new("a/b"), Err(AccountNameError::BadCharacter));
        assert!(AccountName::new(&"a".repeat(128)).is_ok());
        assert_eq!(
            AccountName::new(&"a".repeat(129)),
            Err(AccountNameError::TooLong)
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let t = Token::new(
            AccountName::new("fleet-a").unwrap(),
            SecretString::from("access-SECRET-1"),
            Some(SecretString::from("refresh-SECRET-2")),
            Duration::from_secs(60),
            Instant::now(),
            SystemTime::now(),
        );
        let shown = format!("{t:?} {:?}", t.fingerprint());
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains(&t.fingerprint().to_string()));
        assert_eq!(t.fingerprint().to_string().len(), 8);
        assert!(t.is("access-SECRET-1"));
        assert!(!t.is("access-SECRET-2"));
        assert_eq!(t.expose_authorization(), "Bearer access-SECRET-1");
        assert_eq!(t.expose_access(), "access-SECRET-1");
        assert_eq!(t.expose_refresh(), Some("refresh-SECRET-2"));
        let extended = t.extended(Duration::from_secs(90), Instant::now(), SystemTime::now());
        assert_eq!(extended.expose_access(), "access-SECRET-1");
        assert_eq!(extended.expose_refresh(), Some("refresh-SECRET-2"));
        assert!(extended.is_refreshed() && extended.fingerprint() == t.fingerprint());
    }

    #[test]
    fn without_a_refresh_token() {
        let t = Token::new(
            AccountName::new("a").unwrap(),
            SecretString::from("abc"),
            None,
            Duration::from_secs(60),
            Instant::now(),
            SystemTime::now(),
        );
        assert_eq!(t.expose_access(), "abc");
        assert_eq!(t.expose_authorization(), "Bearer abc");
        assert_eq!(t.expose_refresh(), None);
        let empty = Token::new(
            AccountName::new("a").unwrap(),
            SecretString::from("abc"),
            Some(SecretString::from("")),
            Duration::from_secs(60),
            Instant::now(),
            SystemTime::now(),
        );
        assert_eq!(empty.expose_refresh(), Some(""));
    }

    #[test]
    fn restored_tokens_keep_their_age_and_expiry() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let t = Token::restored(
            AccountName::new("a").unwrap(),
            SecretString::from("x"),
            Some(SecretString::from("r")),
            true,
            wall - Duration::from_secs(30),
            wall + Duration::from_secs(60),
            now,
            wall,
        );
        assert!(t.is_refreshed());
        assert_eq!(t.expires_at(), now + Duration::from_secs(60));
        assert_eq!(t.expires_at_wall(), wall + Duration::from_secs(60));
        if let Some(obtained) = now.checked_sub(Duration::from_secs(30)) {
            assert_eq!(t.obtained_at(), obtained);
            assert_eq!(t.lifetime(), Duration::from_secs(90));
        }
        let expired = Token::restored(
            AccountName::new("a").unwrap(),
            SecretString::from("x"),
            None,
            false,
            wall - Duration::from_secs(90),
            wall - Duration::from_secs(60),
            now,
            wall,
        );
        assert!(!expired.valid_for(now, Duration::ZERO));
    }

    #[test]
    fn validity() {
        let now = Instant::now();
        let t = Token::new(
            AccountName::new("a").unwrap(),
            SecretString::from("x"),
            None,
            Duration::from_secs(60),
            now,
            SystemTime::now(),
        );
        assert!(t.valid_for(now, Duration::from_secs(59)));
        assert!(!t.valid_for(now, Duration::from_secs(60)));
        assert!(!t.valid_for(now + Duration::from_secs(61), Duration::ZERO));
        assert!(!t.valid_for(now, Duration::MAX));
        assert_eq!(t.lifetime(), Duration::from_secs(60));
    }
}
