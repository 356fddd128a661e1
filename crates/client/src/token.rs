//! The values the client hands out: [`Token`] (redacting `Debug`) and what an invalidation did.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::{Error, proto};

/// A BACE access token from the broker. Cheap to clone (one `Arc`).
///
/// `Debug` prints the account and the expiry, never the token: `Token { account: "fleet-a",
/// access_token: "...", expires_at: ... }`.
#[derive(Clone)]
pub struct Token(Arc<Inner>);

struct Inner {
    account: Box<str>,
    access_token: SecretString,
    /// `Bearer <access_token>`, marked sensitive (HTTP/2 encoders never index it). Cloned into
    /// every request: a `HeaderValue` clone is a reference-count increment.
    authorization: HeaderValue,
    expires_at: SystemTime,
    /// `expires_at` on the local monotonic clock, fixed when the answer arrived, so the cache
    /// check is one clock reading (and pausable in tests).
    valid_until: Instant,
}

impl Token {
    /// A token from the broker's answer. The broker always sets `expires_at`; a token without
    /// one, or one that cannot go in an HTTP header, is a protocol error.
    pub(crate) fn from_proto(token: proto::Token) -> Result<Self, Error> {
        let expires_at = token
            .expires_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .ok_or_else(|| Error::protocol("the broker answered a token without expires_at"))?;
        if token.access_token.is_empty() {
            return Err(Error::protocol("the broker answered an empty token"));
        }
        let authorization = if token.authorization.is_empty() {
            format!("Bearer {}", token.access_token)
        } else {
            token.authorization
        };
        let mut authorization = HeaderValue::try_from(authorization)
            .map_err(|_| Error::protocol("the broker answered a token unfit for a header"))?;
        authorization.set_sensitive(true);
        let left = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Ok(Token(Arc::new(Inner {
            account: token.account.into_boxed_str(),
            access_token: SecretString::from(token.access_token),
            authorization,
            expires_at,
            valid_until: Instant::now() + left,
        })))
    }

    /// The account the token belongs to.
    pub fn account(&self) -> &str {
        &self.0.account
    }

    /// The opaque access token. Secret: never log it.
    pub fn access_token(&self) -> &str {
        self.0.access_token.expose_secret()
    }

    /// The value of the HTTP `Authorization` header, `Bearer <access_token>`, marked
    /// sensitive.
    pub fn authorization(&self) -> &HeaderValue {
        &self.0.authorization
    }

    /// When BACE stops accepting the token, as the broker said.
    pub fn expires_at(&self) -> SystemTime {
        self.0.expires_at
    }

    /// How long the token stays valid from now (zero once expired), on the monotonic clock.
    pub fn valid_for(&self) -> Duration {
        self.0.valid_until.saturating_duration_since(Instant::now())
    }

    /// Whether the token stays valid for more than `left` after `now`.
    pub(crate) fn lasts_beyond(&self, now: Instant, left: Duration) -> bool {
        now.checked_add(left)
            .is_some_and(|bar| self.0.valid_until > bar)
    }

    /// Whether both hold the same access token.
    pub fn same_token(&self, other: &Token) -> bool {
        self.access_token() == other.access_token()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("account", &self.0.account)
            .field("access_token", &"...")
            .field("expires_at", &self.0.expires_at)
            .finish()
    }
}

/// What the broker did with a reported token (`InvalidateOutcome` in the proto).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidateOutcome {
    /// The reported token was dropped and replaced by a new login: retry with the new token.
    Invalidated,
    /// The reported token had already been replaced: retry with the returned token.
    AlreadyReplaced,
    /// BACE accepts the reported token (the broker checked it at `upstream.verify_url`): the
    /// 401 came from a missing permission. Do not retry.
    TokenValid,
    /// The account was invalidated moments ago (the broker's cooldown): use the returned token.
    Cooldown,
    /// Not said (an older broker); see [`Invalidated::invalidated`].
    Unspecified,
}

impl InvalidateOutcome {
    fn from_proto(outcome: i32) -> Self {
        match proto::InvalidateOutcome::try_from(outcome) {
            Ok(proto::InvalidateOutcome::Invalidated) => Self::Invalidated,
            Ok(proto::InvalidateOutcome::AlreadyReplaced) => Self::AlreadyReplaced,
            Ok(proto::InvalidateOutcome::TokenValid) => Self::TokenValid,
            Ok(proto::InvalidateOutcome::Cooldown) => Self::Cooldown,
            Ok(proto::InvalidateOutcome::Unspecified) | Err(_) => Self::Unspecified,
        }
    }
}

/// The answer to [`BrokerClient::invalidate`](crate::BrokerClient::invalidate).
#[derive(Clone, Debug)]
pub struct Invalidated {
    /// What the broker did.
    pub outcome: InvalidateOutcome,
    /// Whether this call caused (or joined) a new login.
    pub invalidated: bool,
    /// The token to use from now on.
    pub token: Token,
}

impl Invalidated {
    pub(crate) fn from_proto(answer: proto::InvalidateResponse) -> Result<Self, Error> {
        let token = answer
            .token
            .ok_or_else(|| Error::protocol("the broker answered Invalidate without a token"))?;
        Ok(Self {
            outcome: InvalidateOutcome::from_proto(answer.outcome),
            invalidated: answer.invalidated,
            token: Token::from_proto(token)?,
        })
    }

    /// Whether a request that got 401 with the reported token should be sent again with
    /// [`Invalidated::token`]: not when BACE accepts the reported token (a permission problem),
    /// nor when the broker handed back the very token that failed.
    pub fn retry_with(&self, reported: &str) -> Option<&Token> {
        let pointless =
            self.outcome == InvalidateOutcome::TokenValid || self.token.access_token() == reported;
        (!pointless).then_some(&self.token)
    }
}

#[cfg(test)]
pub(crate) fn test_token(account: &str, access: &str, lifetime: Duration) -> Token {
    Token::from_proto(proto::Token {
        account: account.into(),
        access_token: access.into(),
        token_type: "Bearer".into(),
        expires_at: Some((SystemTime::now() + lifetime).into()),
        authorization: format!("Bearer {access}"),
    })
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_token() {
        let t = test_token("fleet-a", "sekrit-token-value", Duration::from_secs(60));
        let debug = format!("{t:?}");
        assert!(!debug.contains("sekrit"), "{debug}");
        assert!(debug.contains("fleet-a"), "{debug}");
        assert!(t.authorization().is_sensitive());
        assert_eq!(t.authorization(), "Bearer sekrit-token-value");
    }

    #[test]
    fn answers_without_expiry_or_unfit_for_a_header_are_errors() {
        let base = proto::Token {
            account: "a".into(),
            access_token: "t".into(),
            token_type: "Bearer".into(),
            expires_at: None,
            authorization: String::new(),
        };
        assert!(Token::from_proto(base.clone()).is_err());
        let bad = proto::Token {
            access_token: "line\nbreak".into(),
            expires_at: Some(SystemTime::now().into()),
            ..base.clone()
        };
        let e = Token::from_proto(bad).unwrap_err();
        assert!(!e.to_string().contains("line"), "{e}");
        let no_header = proto::Token {
            expires_at: Some(SystemTime::now().into()),
            ..base
        };
        assert_eq!(
            Token::from_proto(no_header).unwrap().authorization(),
            "Bearer t"
        );
    }

    #[test]
    fn retry_only_with_another_token_and_not_on_token_valid() {
        let new = test_token("a", "new", Duration::from_secs(60));
        let answer = |outcome| Invalidated {
            outcome,
            invalidated: false,
            token: new.clone(),
        };
        assert!(
            answer(InvalidateOutcome::Invalidated)
                .retry_with("old")
                .is_some()
        );
        assert!(
            answer(InvalidateOutcome::AlreadyReplaced)
                .retry_with("old")
                .is_some()
        );
        assert!(
            answer(InvalidateOutcome::Cooldown)
                .retry_with("old")
                .is_some()
        );
        assert!(
            answer(InvalidateOutcome::TokenValid)
                .retry_with("old")
                .is_none()
        );
        assert!(
            answer(InvalidateOutcome::Cooldown)
                .retry_with("new")
                .is_none()
        );
    }
}
