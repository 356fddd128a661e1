//! One account: its name, its credentials and its token endpoint; the account's YAML and
//! its validation (secrets inline or from files).

use std::{fmt, path::PathBuf, sync::Arc};

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, schema::parse_url};
use crate::token::AccountName;

/// One BACE account.
#[derive(Clone)]
pub struct AccountConfig {
    /// The account's name in the broker.
    pub name: AccountName,
    /// What BACE needs for a login.
    pub credentials: Credentials,
    /// This account's token endpoint (shared with every account that uses the default).
    pub token_url: Arc<Url>,
}

/// An account's BACE credentials: OAuth2 client id and secret, BACE user name and password.
///
/// All four live in one redacting allocation (the broker holds 100,000 of these at a time);
/// `Debug` shows the client id and user name only.
#[derive(Clone)]
pub struct Credentials {
    /// `client_id`, `username`, `client_secret`, `password`, one after the other.
    packed: SecretString,
    /// Where the first three end in `packed`.
    ends: [u32; 3],
}

impl Credentials {
    /// Credentials of these four values.
    pub fn new(client_id: &str, client_secret: &str, username: &str, password: &str) -> Self {
        let parts = [client_id, username, client_secret, password];
        let mut packed = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        let mut ends = [0u32; 3];
        for (i, part) in parts.iter().enumerate() {
            packed.push_str(part);
            if let Some(end) = ends.get_mut(i) {
                *end = u32::try_from(packed.len()).expect("credentials are far below 4 GiB");
            }
        }
        Self {
            packed: SecretString::from(packed),
            ends,
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self.ends.get(i).map_or(usize::MAX, |e| *e as usize);
        let packed = self.packed.expose_secret();
        &packed[start..end.min(packed.len())]
    }

    /// OAuth2 client id.
    pub fn client_id(&self) -> &str {
        self.part(0)
    }

    /// BACE user name (usually an e-mail address).
    pub fn username(&self) -> &str {
        self.part(1)
    }

    /// OAuth2 client secret. Secret: never log it.
    pub fn expose_client_secret(&self) -> &str {
        self.part(2)
    }

    /// BACE password. Secret: never log it.
    pub fn expose_password(&self) -> &str {
        self.part(3)
    }
}

impl PartialEq for Credentials {
    fn eq(&self, other: &Self) -> bool {
        self.ends == other.ends && self.packed.expose_secret() == other.packed.expose_secret()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id())
            .field("username", &self.username())
            .finish_non_exhaustive()
    }
}

impl AccountConfig {
    /// An account called `name` logging in with `credentials` at `token_url`.
    pub fn new(name: AccountName, credentials: Credentials, token_url: Url) -> Self {
        Self {
            name,
            credentials,
            token_url: Arc::new(token_url),
        }
    }
}

/// Same credentials and endpoint: a reload keeps the account's token.
impl PartialEq for AccountConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.credentials == other.credentials
            && self.token_url == other.token_url
    }
}

impl fmt::Debug for AccountConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountConfig")
            .field("name", &self.name)
            .field("client_id", &self.credentials.client_id())
            .field("username", &self.credentials.username())
            .field("token_url", &self.token_url.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    client_id: Option<String>,
    client_secret: Option<String>,
    pub(super) client_secret_file: Option<PathBuf>,
    username: Option<String>,
    password: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    token_url: Option<String>,
}

impl RawAccount {
    pub(super) fn validate(
        self,
        name: &str,
        default_url: &Arc<Url>,
    ) -> Result<AccountConfig, ConfigError> {
        let err = |field: &'static str, problem: String| ConfigError::Account {
            path: None,
            account: name.to_owned(),
            field,
            problem,
        };
        let account = AccountName::new(name).map_err(|e| err("name", e.to_string()))?;
        let required = |value: Option<String>, field: &'static str| match value {
            Some(v) if !v.trim().is_empty() => Ok(v),
            Some(_) => Err(err(field, "must not be empty".into())),
            None => Err(err(field, "is required".into())),
        };
        let client_id = required(self.client_id, "client_id")?;
        let username = required(self.username, "username")?;
        let client_secret = secret(
            self.client_secret,
            self.client_secret_file,
            ("client_secret", "client_secret_file"),
        )
        .map_err(|(field, problem)| err(field, problem))?;
        let password = secret(
            self.password,
            self.password_file,
            ("password", "password_file"),
        )
        .map_err(|(field, problem)| err(field, problem))?;
        let token_url = match self.token_url {
            Some(url) => Arc::new(parse_url(&url).map_err(|p| err("token_url", p))?),
            None => Arc::clone(default_url),
        };
        Ok(AccountConfig {
            name: account,
            credentials: Credentials::new(
                &client_id,
                client_secret.expose_secret(),
                &username,
                password.expose_secret(),
            ),
            token_url,
        })
    }
}

/// Resolves a secret given inline or as a file (exactly one of the two). A file is read now and
/// loses one trailing newline.
fn secret(
    inline: Option<String>,
    file: Option<PathBuf>,
    (inline_field, file_field): (&'static str, &'static str),
) -> Result<SecretString, (&'static str, String)> {
    let value = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err((
                inline_field,
                format!("give either {inline_field} or {file_field}, not both"),
            ));
        }
        (None, None) => {
            return Err((inline_field, format!("is required (or {file_field})")));
        }
        (Some(v), None) => {
            if v.is_empty() {
                return Err((inline_field, "must not be empty".into()));
            }
            return Ok(SecretString::from(v));
        }
        (None, Some(path)) => super::read_file(&path)
            .and_then(|bytes| {
                String::from_utf8(bytes).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")
                })
            })
            .map_err(|e| (file_field, format!("cannot read {}: {e}", path.display())))
            .map(|text| (text, path))?,
    };
    let (mut text, path) = value;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err((file_field, format!("{} is empty", path.display())));
    }
    Ok(SecretString::from(text))
}
