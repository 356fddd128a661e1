//! Property tests of every parser of outside input, through the public API: BACE's answers
//! (`parse_answer`, both answer shapes and both error shapes), account names, the YAML config
//! with secret files (`Config::parse`), the `authorization` metadata with service-account tokens
//! and JWKS documents (`Authorizer`); then `min_validity` and the answer size limit over the
//! wire. The properties of the private parsers sit next to them (`expires` in
//! `upstream::parse`, `min_validity` in `grpc::convert`). `fuzz/` fuzzes the same parsers.
//!
//! Each property states one of: never a panic on arbitrary input; a valid input generated from
//! a model reads back as the model's value; an invalid input is a clear error; no error or
//! `Debug` output holds a secret of the input.

use std::{collections::BTreeMap, sync::LazyLock, time::Duration};

use bace_token_broker::{
    AccountName, AccountNameError, Authorizer, Config, Denied, HttpUpstream, Issued,
    MAX_ACCOUNT_NAME_LEN, MAX_BODY_BYTES, Upstream, UpstreamError,
    config::{AuthConfig, JwksSource, KubernetesConfig, LoadedFile, MAX_FILE_BYTES},
    parse_answer, proto,
};
use chrono_tz::Tz;
use fake_bace::{Grant, Step};
use proptest::{prelude::*, sample::select};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use testkit::{
    BrokerConfig, BrokerServer, fake,
    pki::{AUDIENCE, ISSUER, SigningKey, now, sa_claims},
    user,
};
use tonic::Code;

const AMS: Tz = chrono_tz::Europe::Amsterdam;

/// 256 cases per property (a few seconds each) from a fixed seed, so the normal test run is
/// deterministic; `PROPTEST_CASES` and `PROPTEST_RNG_SEED` explore further.
fn cases() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 256;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = proptest::test_runner::RngSeed::Fixed(0x00b4_ce5e);
    }
    config
}

/// A secret-like value (token, password, key): long and random enough that finding it in a
/// text means it was copied there.
fn secret() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]{24,40}".prop_map(|s| format!("SeCrEt{s}"))
}

/// A token as BACE may issue it: visible ASCII, no space.
fn token_text() -> impl Strategy<Value = String> {
    "[!-~]{1,80}"
}

fn assert_no_secret(error: &dyn std::fmt::Debug, display: &str, secret: &str) {
    let debug = format!("{error:?}");
    assert!(
        !display.contains(secret),
        "Display echoes a secret: {display}"
    );
    assert!(!debug.contains(secret), "Debug echoes a secret: {debug}");
}

// === BACE's answers ===

/// `expires_in` as an answer may carry it, and the lifetime it means.
#[derive(Debug, Clone)]
enum ExpiresIn {
    Absent,
    Null,
    Number(u32),
    Fraction(u32, u16),
    Text(u32),
    Negative(u32),
}

impl ExpiresIn {
    fn json(&self) -> Option<Value> {
        match *self {
            ExpiresIn::Absent => None,
            ExpiresIn::Null => Some(Value::Null),
            ExpiresIn::Number(n) => Some(json!(n)),
            ExpiresIn::Fraction(n, f) => Some(json!(f64::from(n) + f64::from(f) / 1000.0)),
            ExpiresIn::Text(n) => Some(json!(format!(" {n} "))),
            ExpiresIn::Negative(n) => Some(json!(-i64::from(n) - 1)),
        }
    }

    fn lifetime(&self) -> Option<Duration> {
        match *self {
            ExpiresIn::Absent | ExpiresIn::Null => None,
            ExpiresIn::Number(n) | ExpiresIn::Text(n) => Some(Duration::from_secs(n.into())),
            ExpiresIn::Fraction(n, f) => Some(Duration::from_secs_f64(
                f64::from(n) + f64::from(f) / 1000.0,
            )),
            ExpiresIn::Negative(_) => Some(Duration::ZERO),
        }
    }
}

fn expires_in() -> impl Strategy<Value = ExpiresIn> {
    prop_oneof![
        Just(ExpiresIn::Absent),
        Just(ExpiresIn::Null),
        any::<u32>().prop_map(ExpiresIn::Number),
        (0..100_000_000u32, 0..1000u16).prop_map(|(n, f)| ExpiresIn::Fraction(n, f)),
        any::<u32>().prop_map(ExpiresIn::Text),
        any::<u32>().prop_map(ExpiresIn::Negative),
    ]
}

/// Any JSON value, a few levels deep, with the answer shapes' keys among the object keys.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        select(
            &[
                "access_token",
                "refresh_token",
                "expires_in",
                "refreshed",
                "expires",
                "error",
                "error_description",
                "name",
                "message",
                "token_type",
            ][..]
        )
        .prop_map(str::to_owned),
        "\\PC{0,8}",
    ]
    .boxed();
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An HTTP status BACE may answer with, or any other.
fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        select(
            &[
                200u16, 201, 204, 302, 400, 401, 403, 404, 408, 429, 500, 502, 503
            ][..]
        ),
        0..1000u16,
    ]
}

/// The error text kept for the logs: control characters dropped, 160 characters at most.
fn shortened(joined: &str) -> String {
    let mut short: String = joined
        .chars()
        .filter(|c| !c.is_control())
        .take(160)
        .collect();
    if short.len() < joined.len() {
        short.push('…');
    }
    short
}

/// 4xx statuses that mean "rejected" (not 408 and 429).
fn rejecting_status() -> impl Strategy<Value = u16> {
    (400..500u16).prop_filter("transient", |s| *s != 408 && *s != 429)
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn answers_never_panic_on_arbitrary_bytes(
        status in status(),
        body in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        if parse_answer(status, &body, AMS).is_ok() {
            prop_assert!((200..300).contains(&status));
        }
    }

    #[test]
    fn answers_never_panic_on_arbitrary_json(status in status(), value in json_value()) {
        let body = serde_json::to_vec(&value).unwrap();
        match parse_answer(status, &body, AMS) {
            Ok(Issued::Token { access, refresh, .. }) => {
                for token in std::iter::once(&access).chain(&refresh) {
                    let token = token.expose_secret();
                    prop_assert!(!token.is_empty() && token.len() <= 4096);
                    prop_assert!(token.bytes().all(|b| b.is_ascii_graphic()));
                }
            }
            Ok(Issued::Extended { .. }) => prop_assert!((200..300).contains(&status)),
            Err(_) => {}
        }
    }

    /// The password grant answer, and a standard OAuth2 refresh answer, of any tokens and any
    /// form of `expires_in`.
    #[test]
    fn token_answers_read_back(
        access in token_text(),
        refresh in prop::option::of(prop::option::of(token_text())),
        expires in expires_in(),
        extras in any::<bool>(),
    ) {
        let mut body = serde_json::Map::new();
        body.insert("access_token".into(), json!(access));
        match &refresh {
            None => {}
            Some(None) => { body.insert("refresh_token".into(), Value::Null); }
            Some(Some(r)) => { body.insert("refresh_token".into(), json!(r)); }
        }
        if let Some(e) = expires.json() {
            body.insert("expires_in".into(), e);
        }
        if extras {
            body.insert("token_type".into(), json!("Bearer"));
            body.insert("scope".into(), Value::Null);
        }
        let body = serde_json::to_vec(&body).unwrap();
        let Ok(Issued::Token { access: got, refresh: got_refresh, lifetime }) =
            parse_answer(200, &body, AMS)
        else {
            panic!("not a token: {}", String::from_utf8_lossy(&body));
        };
        prop_assert_eq!(got.expose_secret(), access.as_str());
        prop_assert_eq!(
            got_refresh.as_ref().map(|r| r.expose_secret().to_owned()),
            refresh.flatten()
        );
        // Past ten years is ten years.
        let cap = Duration::from_secs(10 * 365 * 86_400);
        prop_assert_eq!(lifetime, expires.lifetime().map(|l| l.min(cap)));
    }

    /// BACE's refresh answer: `expires` written by BACE in its zone reads back as that instant
    /// (the earlier one when the local time happens twice); an unreadable one as none.
    #[test]
    fn bace_refresh_answers_read_back(secs in 0i64..4_102_444_800, junk in "\\PC{0,30}") {
        let at = chrono::DateTime::from_timestamp(secs, 0).unwrap();
        let text = at.with_timezone(&AMS).format("%Y-%m-%d %H:%M:%S").to_string();
        let body = json!({"refreshed": true, "expires": text}).to_string();
        let Ok(Issued::Extended { expires: Some(read) }) = parse_answer(200, body.as_bytes(), AMS)
        else {
            panic!("not an extension: {body}");
        };
        let read = chrono::DateTime::<chrono::Utc>::from(read);
        prop_assert!(read <= at && at - read <= chrono::TimeDelta::hours(1));
        prop_assert_eq!(read.with_timezone(&AMS).format("%Y-%m-%d %H:%M:%S").to_string(), text);

        let body = json!({"refreshed": true, "expires": junk}).to_string();
        let readable = chrono::NaiveDateTime::parse_from_str(junk.trim(), "%Y-%m-%d %H:%M:%S").is_ok();
        match parse_answer(200, body.as_bytes(), AMS) {
            Ok(Issued::Extended { expires }) => prop_assert_eq!(expires.is_some(), readable),
            _ => panic!("not an extension: {body}"),
        }
    }

    /// Yii's error shape (what BACE sends) with any 4xx: rejected, with `name: message`.
    #[test]
    fn yii_errors_are_rejections_with_their_text(
        status in rejecting_status(),
        name in "\\PC{0,40}",
        message in "\\PC{0,300}",
    ) {
        let body = json!({"name": name, "message": message, "code": 0, "status": status});
        let error = parse_answer(status, body.to_string().as_bytes(), AMS).err().unwrap();
        prop_assert_eq!(
            &error,
            &UpstreamError::Rejected { status, error: Some(shortened(&format!("{name}: {message}"))) }
        );
        prop_assert!(!error.is_transient());
        prop_assert_eq!(error.class(), "rejected");
    }

    /// OAuth2's error shape with any 4xx, with or without a description.
    #[test]
    fn oauth2_errors_are_rejections_with_their_text(
        status in rejecting_status(),
        code in "[a-z_]{1,30}",
        description in prop::option::of("\\PC{0,300}"),
    ) {
        let mut body = json!({"error": code});
        if let Some(d) = &description {
            body["error_description"] = json!(d);
        }
        let error = parse_answer(status, body.to_string().as_bytes(), AMS).err().unwrap();
        let joined = match &description {
            Some(d) => format!("{code}: {d}"),
            None => code.clone(),
        };
        prop_assert_eq!(error, UpstreamError::Rejected { status, error: Some(shortened(&joined)) });
    }

    /// 408, 429 and 5xx are transient whatever the body says (even a token).
    #[test]
    fn transient_statuses_whatever_the_body(
        status in prop_oneof![Just(408u16), Just(429u16), 500..600u16],
        value in json_value(),
    ) {
        let body = serde_json::to_vec(&value).unwrap();
        let error = parse_answer(status, &body, AMS).err().unwrap();
        if status == 429 {
            // The HTTP client adds the Retry-After header's delay; the body has none.
            prop_assert_eq!(&error, &UpstreamError::RateLimited { retry_after: None });
        } else {
            prop_assert_eq!(&error, &UpstreamError::Status { status });
        }
        prop_assert!(error.is_transient());
    }

    /// Answers that carry a token but cannot be used: the error holds neither token.
    #[test]
    fn answer_errors_never_echo_tokens(access in secret(), refresh in secret(), kind in 0..8usize) {
        let (status, body) = match kind {
            0 => (200, json!({"access_token": access, "refresh_token": refresh, "expires_in": "soon"}).to_string()),
            1 => (200, json!({"access_token": format!("{access} {refresh}")}).to_string()),
            2 => (200, json!({"access_token": access, "refresh_token": [refresh]}).to_string()),
            3 => (200, format!(r#"{{"access_token": "{access}", "refresh_token": "{refresh}""#)),
            4 => (400, json!({"access_token": access, "refresh_token": refresh}).to_string()),
            5 => (503, json!({"access_token": access, "refresh_token": refresh}).to_string()),
            6 => (200, json!({"access_token": access.repeat(200), "refresh_token": refresh}).to_string()),
            _ => (302, json!({"access_token": access, "refresh_token": refresh}).to_string()),
        };
        let error = parse_answer(status, body.as_bytes(), AMS).err().unwrap();
        let display = error.to_string();
        assert_no_secret(&error, &display, &access);
        assert_no_secret(&error, &display, &refresh);
    }
}

// === Account names ===

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn valid_account_names_read_back(name in "[A-Za-z0-9._-]{1,128}") {
        let account = AccountName::new(&name).unwrap();
        prop_assert_eq!(account.as_str(), name.as_str());
        prop_assert_eq!(account.to_string(), name);
    }

    /// Any string: accepted exactly under the rule; the error says which rule, and never
    /// quotes the name.
    #[test]
    fn account_names_follow_the_rule(name in prop_oneof!["\\PC{0,140}", "[A-Za-z0-9._-]{120,140}", "[ -~]{0,20}"]) {
        let expected = if name.is_empty() {
            Err(AccountNameError::Empty)
        } else if name.len() > MAX_ACCOUNT_NAME_LEN {
            Err(AccountNameError::TooLong)
        } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            Err(AccountNameError::BadCharacter)
        } else {
            Ok(())
        };
        prop_assert_eq!(AccountName::validate(&name), expected);
        prop_assert_eq!(AccountName::new(&name).map(|a| a.to_string()), expected.map(|()| name.clone()));
        if let Err(e) = expected && name.len() > 3 {
            prop_assert!(!e.to_string().contains(&name));
        }
    }
}

// === The YAML config with secret files ===

/// How a secret is given: inline, or in a file ending with one of the line ends a file may
/// have (the reader drops one).
#[derive(Debug, Clone)]
enum Given {
    Inline,
    File(&'static str),
}

#[derive(Debug, Clone)]
struct ModelAccount {
    name: String,
    client_id: String,
    username: String,
    client_secret: (String, Given),
    password: (String, Given),
}

fn given() -> impl Strategy<Value = Given> {
    prop_oneof![
        Just(Given::Inline),
        select(&["", "\n", "\r\n"][..]).prop_map(Given::File)
    ]
}

/// A secret with characters YAML cares about (quotes, `#`, `:`, spaces, non-ASCII).
fn yaml_secret() -> impl Strategy<Value = String> {
    ("[A-Za-z0-9]{20}", "[ -~àé€😀]{0,20}").prop_map(|(a, b)| format!("SeCrEt{a}{b}"))
}

fn model_accounts() -> impl Strategy<Value = Vec<ModelAccount>> {
    prop::collection::btree_map(
        "[a-z0-9][a-z0-9._-]{0,30}",
        (
            "[a-z0-9@.:/_-]{1,30}",
            "[a-z0-9@.+ _-]{0,30}[a-z0-9]",
            (yaml_secret(), given()),
            (yaml_secret(), given()),
        ),
        1..4,
    )
    .prop_map(|accounts| {
        accounts
            .into_iter()
            .map(
                |(name, (client_id, username, client_secret, password))| ModelAccount {
                    name,
                    client_id,
                    username,
                    client_secret,
                    password,
                },
            )
            .collect()
    })
}

/// The YAML of `accounts` (secrets in files under `dir` where the model says so), double-quoted
/// scalars written as JSON strings (a JSON string is a YAML double-quoted scalar).
fn config_yaml(accounts: &[ModelAccount], dir: &std::path::Path) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let mut yaml = String::from("upstream:\n  expires_timezone: Europe/Amsterdam\naccounts:\n");
    for (i, a) in accounts.iter().enumerate() {
        yaml.push_str(&format!(
            "  {}:\n    client_id: {}\n    username: {}\n",
            q(&a.name),
            q(&a.client_id),
            q(&a.username)
        ));
        for (key, (value, given)) in [
            ("client_secret", &a.client_secret),
            ("password", &a.password),
        ] {
            match given {
                Given::Inline => yaml.push_str(&format!("    {key}: {}\n", q(value))),
                Given::File(end) => {
                    let path = dir.join(format!("{key}-{i}"));
                    std::fs::write(&path, format!("{value}{end}")).unwrap();
                    yaml.push_str(&format!("    {key}_file: {}\n", q(path.to_str().unwrap())));
                }
            }
        }
    }
    yaml
}

/// One thing wrong with an otherwise valid config, and a word its error must hold.
#[derive(Debug, Clone, Copy)]
enum Fault {
    UnknownKeyAfterSecret,
    DuplicateSecret,
    SecretAsSequence,
    SecretAsMapping,
    UnterminatedQuote,
    BothInlineAndFile,
    MissingFile,
    EmptyFile,
    TabIndent,
    BadAccountName,
}

impl Fault {
    const ALL: [Fault; 10] = [
        Fault::UnknownKeyAfterSecret,
        Fault::DuplicateSecret,
        Fault::SecretAsSequence,
        Fault::SecretAsMapping,
        Fault::UnterminatedQuote,
        Fault::BothInlineAndFile,
        Fault::MissingFile,
        Fault::EmptyFile,
        Fault::TabIndent,
        Fault::BadAccountName,
    ];

    /// The account's YAML with the fault, and a word the error must hold.
    fn apply(self, secret: &str, dir: &std::path::Path) -> (String, &'static str) {
        let q = |s: &str| serde_json::to_string(s).unwrap();
        // The secret is the client secret; the faults are in the password.
        let head = format!(
            "  fleet-a:\n    client_id: c\n    client_secret: {}\n    username: u\n",
            q(secret)
        );
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let (account, word) = match self {
            Fault::UnknownKeyAfterSecret => (
                format!("{head}    password: {}\n    pasword: x\n", q(secret)),
                "pasword",
            ),
            Fault::DuplicateSecret => (
                format!(
                    "{head}    password: {}\n    password: {}\n",
                    q(secret),
                    q(secret)
                ),
                "duplicate",
            ),
            Fault::SecretAsSequence => {
                (format!("{head}    password: [{}]\n", q(secret)), "password")
            }
            Fault::SecretAsMapping => (
                format!("{head}    password: {{{}: {}}}\n", q(secret), q(secret)),
                "password",
            ),
            // The password is the secret without the characters that would end the quote.
            Fault::UnterminatedQuote => (
                format!("{head}    password: \"{}\n", unquotable(secret)),
                "line",
            ),
            Fault::BothInlineAndFile => (
                format!(
                    "{head}    password: {}\n    password_file: {}\n",
                    q(secret),
                    q(empty.to_str().unwrap())
                ),
                "not both",
            ),
            Fault::MissingFile => (
                format!("{head}    password_file: /nonexistent/pw\n"),
                "cannot read",
            ),
            Fault::EmptyFile => (
                format!("{head}    password_file: {}\n", q(empty.to_str().unwrap())),
                "is empty",
            ),
            Fault::TabIndent => (format!("{head}\tpassword: {}\n", q(secret)), "line"),
            Fault::BadAccountName => (
                format!(
                    "  \"fleet a\":\n    client_id: c\n    client_secret: {}\n    username: u\n    password: {}\n",
                    q(secret),
                    q(secret)
                ),
                "fleet a",
            ),
        };
        (format!("accounts:\n{account}"), word)
    }
}

/// `secret` without `"` and `\`: as written in a double-quoted YAML scalar, it does not end it.
fn unquotable(secret: &str) -> String {
    secret.replace(['"', '\\'], "")
}

proptest! {
    #![proptest_config(cases())]

    /// A config written from a model, secrets inline or in files, reads back as the model;
    /// neither its `Debug` nor its accounts' show a secret.
    #[test]
    fn configs_read_back_and_hide_their_secrets(accounts in model_accounts()) {
        let dir = tempfile::tempdir().unwrap();
        let yaml = config_yaml(&accounts, dir.path());
        let config = Config::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        prop_assert_eq!(config.accounts.len(), accounts.len());
        let debug = format!("{config:?}");
        for a in &accounts {
            let got = &config.accounts[a.name.as_str()];
            let c = &got.credentials;
            prop_assert_eq!(c.client_id(), a.client_id.as_str());
            prop_assert_eq!(c.username(), a.username.as_str());
            prop_assert_eq!(c.expose_client_secret(), a.client_secret.0.as_str());
            prop_assert_eq!(c.expose_password(), a.password.0.as_str());
            for secret in [&a.client_secret.0, &a.password.0] {
                prop_assert!(!debug.contains(secret.as_str()), "{}", debug);
            }
        }
    }

    /// A config with one fault is refused with an error that says where, and quotes no secret.
    #[test]
    fn config_errors_are_clear_and_hide_secrets(
        secret in yaml_secret(),
        fault in select(&Fault::ALL[..]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (yaml, word) = fault.apply(&secret, dir.path());
        let error = Config::parse(&yaml).err().unwrap_or_else(|| panic!("accepted:\n{yaml}"));
        let message = error.to_string();
        prop_assert!(message.contains(word), "{:?}: {} lacks {:?}", fault, message, word);
        assert_no_secret(&error, &message, &secret);
        assert_no_secret(&error, &message, &unquotable(&secret));
    }

    #[test]
    fn arbitrary_config_text_never_panics(text in prop_oneof![
        "\\PC{0,300}",
        "(accounts:|\n|  |a:|[:{}\\[\\],&*!|>'\"#-]| |[a-z_]{1,12}|[0-9]{1,4}[smhd]?){0,60}",
    ]) {
        let _ = Config::parse(&text);
    }
}

// === Service-account tokens, the `authorization` metadata and JWKS documents ===

/// The keys of the cluster (ES256 `k1`, RS256 `r1`) and a key it does not know (`k1` too).
struct Keys {
    es: SigningKey,
    rs: SigningKey,
    stranger: SigningKey,
    runtime: tokio::runtime::Runtime,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    es: SigningKey::es256("k1"),
    rs: SigningKey::rs256("r1"),
    stranger: SigningKey::es256("k1"),
    runtime: tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap(),
});

fn authorizer(jwks: Vec<u8>) -> Result<Authorizer, bace_token_broker::AuthError> {
    Authorizer::new(AuthConfig {
        kubernetes: Some(KubernetesConfig {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            jwks: JwksSource::File(LoadedFile {
                path: "jwks.json".into(),
                contents: jwks,
            }),
        }),
        allow: BTreeMap::new(),
    })
}

static CLUSTER: LazyLock<Authorizer> = LazyLock::new(|| {
    let jwks = json!({"keys": [KEYS.es.jwk(), KEYS.rs.jwk()]}).to_string();
    authorizer(jwks.into_bytes()).unwrap()
});

fn authenticate(authorization: Option<&str>) -> Result<String, Denied> {
    KEYS.runtime
        .block_on(CLUSTER.authenticate(authorization, None))
}

/// What is wrong with a token (or nothing), and the answer it must get.
#[derive(Debug, Clone, Copy)]
enum TokenCase {
    Valid,
    ValidRsa,
    SubjectOnly,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
    NotAServiceAccount,
    UnknownKid,
    ForeignKey,
    SwappedClaims,
    TamperedSignature,
    AlgNone,
    Oversized,
}

impl TokenCase {
    const ALL: [TokenCase; 14] = [
        TokenCase::Valid,
        TokenCase::ValidRsa,
        TokenCase::SubjectOnly,
        TokenCase::Expired,
        TokenCase::NotYetValid,
        TokenCase::WrongAudience,
        TokenCase::WrongIssuer,
        TokenCase::NotAServiceAccount,
        TokenCase::UnknownKid,
        TokenCase::ForeignKey,
        TokenCase::SwappedClaims,
        TokenCase::TamperedSignature,
        TokenCase::AlgNone,
        TokenCase::Oversized,
    ];

    /// The token, and the answer it must get.
    fn token(self, namespace: &str, name: &str) -> (String, Result<String, Denied>) {
        let identity = Ok(format!("system:serviceaccount:{namespace}:{name}"));
        let claims = sa_claims(namespace, name);
        let with = |key: &str, value: Value| {
            let mut c = claims.clone();
            c[key] = value;
            c
        };
        let b64 = |v: &Value| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let keys = &*KEYS;
        match self {
            TokenCase::Valid => (keys.es.sign(&claims), identity),
            TokenCase::ValidRsa => (keys.rs.sign(&claims), identity),
            TokenCase::SubjectOnly => {
                let mut c = claims.clone();
                c.as_object_mut().unwrap().remove("kubernetes.io");
                (keys.es.sign(&c), identity)
            }
            TokenCase::Expired => (
                keys.es.sign(&with("exp", json!(now() - 120))),
                Err(Denied::EXPIRED_TOKEN),
            ),
            TokenCase::NotYetValid => (
                keys.es.sign(&with("nbf", json!(now() + 600))),
                Err(Denied::TOKEN_NOT_YET_VALID),
            ),
            TokenCase::WrongAudience => (
                keys.es.sign(&with("aud", json!(["someone-else"]))),
                Err(Denied::WRONG_AUDIENCE),
            ),
            TokenCase::WrongIssuer => (
                keys.es.sign(&with("iss", json!("https://evil.example"))),
                Err(Denied::WRONG_ISSUER),
            ),
            TokenCase::NotAServiceAccount => {
                let mut c = with("sub", json!(format!("user:{name}")));
                c.as_object_mut().unwrap().remove("kubernetes.io");
                (keys.es.sign(&c), Err(Denied::NOT_A_SERVICE_ACCOUNT))
            }
            TokenCase::UnknownKid => (
                SigningKey::es256("k9").sign(&claims),
                Err(Denied::UNKNOWN_KEY),
            ),
            TokenCase::ForeignKey => (keys.stranger.sign(&claims), Err(Denied::BAD_SIGNATURE)),
            TokenCase::SwappedClaims => {
                let token = keys.es.sign(&claims);
                let parts: Vec<&str> = token.split('.').collect();
                let other = b64(&sa_claims("kube-system", "admin"));
                (
                    format!("{}.{other}.{}", parts[0], parts[2]),
                    Err(Denied::BAD_SIGNATURE),
                )
            }
            TokenCase::TamperedSignature => {
                // One character of the signature changed (not the last: its spare bits
                // would make the base64 invalid).
                let mut token = keys.es.sign(&claims).into_bytes();
                let at = token.len() - 10;
                token[at] = if token[at] == b'A' { b'B' } else { b'A' };
                (
                    String::from_utf8(token).unwrap(),
                    Err(Denied::BAD_SIGNATURE),
                )
            }
            TokenCase::AlgNone => (
                format!(
                    "{}.{}.",
                    b64(&json!({"alg": "none", "kid": "k1"})),
                    b64(&claims)
                ),
                Err(Denied::MALFORMED_TOKEN),
            ),
            TokenCase::Oversized => {
                let padded = with("padding", json!("x".repeat(20_000)));
                (keys.es.sign(&padded), Err(Denied::MALFORMED_TOKEN))
            }
        }
    }
}

/// A Kubernetes object name.
fn object_name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?"
}

/// The ways a caller may write `Bearer <token>` that the broker accepts.
fn bearer(token: &str, style: usize) -> String {
    match style % 4 {
        0 => format!("Bearer {token}"),
        1 => format!("bearer {token}"),
        2 => format!("BEARER  {token} "),
        _ => format!("\tBearer   {token}\t"),
    }
}

proptest! {
    #![proptest_config(cases())]

    /// Tokens of a model (valid, or with one thing wrong) get the model's answer, however the
    /// scheme is written.
    #[test]
    fn service_account_tokens_get_the_expected_answer(
        case in select(&TokenCase::ALL[..]),
        namespace in object_name(),
        name in object_name(),
        style in 0..4usize,
    ) {
        let (token, expected) = case.token(&namespace, &name);
        prop_assert_eq!(authenticate(Some(&bearer(&token, style))), expected, "{:?}", case);
        // Any other scheme, or none: the token is not even read.
        prop_assert_eq!(authenticate(Some(&format!("Basic {token}"))), Err(Denied::MALFORMED_TOKEN));
        prop_assert_eq!(authenticate(Some(&token)), Err(Denied::MALFORMED_TOKEN));
        prop_assert_eq!(authenticate(None), Err(Denied::NO_IDENTITY));
    }

    /// Arbitrary `authorization` values and token-shaped ones never panic and never get an
    /// identity; the refusal is a fixed reason, never the value.
    #[test]
    fn arbitrary_authorization_values_are_refused(value in prop_oneof![
        "\\PC{0,200}",
        "Bearer [A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,90}",
        "(Bearer|bearer|Basic|) {0,3}[A-Za-z0-9._~+/=-]{0,100}",
    ]) {
        let denied = authenticate(Some(&value)).unwrap_err();
        prop_assert!(matches!(denied, Denied::Unauthenticated(_)));
        if value.len() > 10 {
            prop_assert!(!denied.to_string().contains(value.trim()));
        }
    }

    /// JWKS documents of a model: the authorizer is built exactly when one key is usable, and
    /// then verifies that key's tokens; a refused document's error quotes none of its secrets.
    #[test]
    fn jwks_documents_of_usable_and_unusable_keys(
        entries in prop::collection::vec(0..8usize, 0..5),
        hmac in secret(),
    ) {
        let keys = &*KEYS;
        let mut usable_es = false;
        let list: Vec<Value> = entries.iter().map(|entry| match entry {
            0 => { usable_es = true; keys.es.jwk().clone() }
            1 => keys.rs.jwk().clone(),
            2 => json!({"kty": "oct", "k": hmac, "kid": "k1"}),
            3 => { let mut k = keys.es.jwk().clone(); k["use"] = json!("enc"); k }
            4 => { let mut k = keys.es.jwk().clone(); k["crv"] = json!("P-521"); k }
            5 => { let mut k = keys.es.jwk().clone(); k["alg"] = json!("RS256"); k }
            6 => { let mut k = keys.es.jwk().clone(); k["x"] = json!("not base64!"); k }
            _ => json!({"kty": "XYZ", "secret": hmac}),
        }).collect();
        let usable = entries.iter().any(|e| *e <= 1);
        match authorizer(json!({"keys": list}).to_string().into_bytes()) {
            Ok(auth) => {
                prop_assert!(usable);
                let token = keys.es.bearer(&sa_claims("ns", "sa"));
                let got = keys.runtime.block_on(auth.authenticate(Some(&token), None));
                // The unusable keys named `k1` are skipped: the usable one decides.
                if usable_es {
                    prop_assert_eq!(got, Ok("system:serviceaccount:ns:sa".to_owned()));
                } else {
                    prop_assert!(got.is_err());
                }
            }
            Err(error) => {
                prop_assert!(!usable);
                let message = error.to_string();
                prop_assert!(message.contains("auth.kubernetes.jwks_file"), "{}", message);
                assert_no_secret(&error, &message, &hmac);
            }
        }
    }

    /// Documents that are not a JWKS: a clear error that quotes none of their strings.
    #[test]
    fn malformed_jwks_documents_quote_nothing(hmac in secret(), shape in 0..7usize) {
        let document = match shape {
            0 => json!({"keys": hmac}).to_string(),
            1 => json!([hmac]).to_string(),
            2 => json!(hmac).to_string(),
            3 => json!({"keys": [hmac]}).to_string(),
            4 => format!(r#"{{"keys": [{{"kty": "oct", "k": "{hmac}""#),
            5 => json!({"kid": hmac}).to_string(),
            _ => json!({"keys": {"k": hmac}}).to_string(),
        };
        let error = authorizer(document.into_bytes()).err().unwrap();
        let message = error.to_string();
        prop_assert!(message.starts_with("auth.kubernetes.jwks_file: "), "{}", message);
        assert_no_secret(&error, &message, &hmac);
    }

    #[test]
    fn arbitrary_jwks_bytes_never_panic(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        json_value().prop_map(|v| json!({"keys": [v]}).to_string().into_bytes()),
    ]) {
        let _ = authorizer(bytes);
    }
}

// === Over the wire ===

/// `min_validity` as sent: malformed or negative durations are INVALID_ARGUMENT before any
/// upstream call (a mixed-sign one was taken for a duration once); a well-formed one past any
/// token's life is OUT_OF_RANGE.
#[tokio::test]
async fn min_validity_is_checked_as_sent() {
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    let mut client = broker.client.clone();
    let calls = fake.total_calls();
    let cases: [(i64, i32, Code, &str); 12] = [
        (1, -5, Code::InvalidArgument, "not a well-formed duration"),
        (-1, 5, Code::InvalidArgument, "not a well-formed duration"),
        (
            0,
            1_000_000_000,
            Code::InvalidArgument,
            "not a well-formed duration",
        ),
        (
            0,
            -1_000_000_000,
            Code::InvalidArgument,
            "not a well-formed duration",
        ),
        (
            0,
            i32::MAX,
            Code::InvalidArgument,
            "not a well-formed duration",
        ),
        (
            315_576_000_001,
            0,
            Code::InvalidArgument,
            "not a well-formed duration",
        ),
        (
            i64::MAX,
            999_999_999,
            Code::InvalidArgument,
            "not a well-formed duration",
        ),
        (
            i64::MIN,
            0,
            Code::InvalidArgument,
            "not a well-formed duration",
        ),
        (-1, -5, Code::InvalidArgument, "must not be negative"),
        (0, -5, Code::InvalidArgument, "must not be negative"),
        (
            315_576_000_000,
            999_999_999,
            Code::OutOfRange,
            "min_validity too long",
        ),
        (15 * 86_400, 0, Code::OutOfRange, "min_validity too long"),
    ];
    for (seconds, nanos, code, message) in cases {
        let status = client
            .get_token(proto::GetTokenRequest {
                account: "fleet-a".into(),
                min_validity: Some(prost_types::Duration { seconds, nanos }),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{seconds} s {nanos} ns: {status:?}");
        assert!(
            status.message().contains(message),
            "{seconds} s {nanos} ns: {}",
            status.message()
        );
    }
    assert_eq!(
        fake.total_calls(),
        calls,
        "no upstream call for a refused request"
    );
    // Well-formed ones are served.
    for (seconds, nanos) in [(0, 0), (0, 5), (1, 999_999_999), (3600, 0)] {
        let token = client
            .get_token(proto::GetTokenRequest {
                account: "fleet-a".into(),
                min_validity: Some(prost_types::Duration { seconds, nanos }),
            })
            .await
            .unwrap();
        assert!(token.into_inner().token.is_some());
    }
    broker.stop().await.unwrap();
}

/// The HTTP client reads an answer up to [`MAX_BODY_BYTES`] and refuses one byte more.
#[tokio::test]
async fn answers_are_read_up_to_the_size_limit() {
    let fake = fake(&["fleet-a"]).await;
    let config = BrokerConfig::for_fake(&fake, &["fleet-a"]).build();
    let upstream = HttpUpstream::new(&config.upstream).unwrap();
    let account = &config.accounts["fleet-a"];
    let body = |len: usize| {
        let head = r#"{"access_token":"a-token","expires_in":3600,"pad":""#;
        let tail = r#""}"#;
        format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
    };
    fake.script(
        &user("fleet-a"),
        Grant::Password,
        [
            Step::Body(200, body(MAX_BODY_BYTES)),
            Step::Body(200, body(MAX_BODY_BYTES + 1)),
        ],
    );
    let Ok(Issued::Token { access, .. }) = upstream.login(account).await else {
        panic!("a body of exactly the limit is read");
    };
    assert_eq!(access.expose_secret(), "a-token");
    let error = upstream.login(account).await.err().unwrap();
    assert_eq!(
        error,
        UpstreamError::InvalidAnswer("answer larger than 64 KiB")
    );
}

/// Files the config names are read up to [`MAX_FILE_BYTES`]: a path to something endless is a
/// clear error, not a broker that runs out of memory.
#[test]
fn files_the_config_names_are_read_up_to_a_limit() {
    let dir = tempfile::tempdir().unwrap();
    let at_limit = dir.path().join("at-limit");
    let over = dir.path().join("over");
    std::fs::write(&at_limit, "p".repeat(MAX_FILE_BYTES)).unwrap();
    std::fs::write(&over, "p".repeat(MAX_FILE_BYTES + 1)).unwrap();
    let config = |password_file: &std::path::Path| {
        Config::parse(&format!(
            "accounts:\n  a:\n    client_id: c\n    client_secret: s\n    username: u\n    password_file: {}\n",
            password_file.display()
        ))
    };
    let parsed = config(&at_limit).unwrap();
    assert_eq!(
        parsed.accounts["a"].credentials.expose_password().len(),
        MAX_FILE_BYTES
    );
    for path in [over.as_path(), std::path::Path::new("/dev/zero")] {
        let message = config(path).unwrap_err().to_string();
        assert!(
            message.contains("password_file") && message.contains("larger than 1048576 bytes"),
            "{message}"
        );
    }
    let jwks = Config::parse(
        "auth:\n  kubernetes:\n    issuer: i\n    jwks_file: /dev/zero\naccounts:\n  a: {client_id: c, client_secret: s, username: u, password: p}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        jwks.contains("auth.kubernetes.jwks_file") && jwks.contains("larger than"),
        "{jwks}"
    );
    // The store's files too (password, CA, encryption keys).
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("k1 {}\n", "A".repeat(43) + "=")).unwrap();
    for (field, line) in [
        ("password_file", "password_file: /dev/zero"),
        ("encryption_key_file", "encryption_key_file: /dev/zero"),
        ("ca_file", "ca_file: /dev/zero"),
    ] {
        let url = if field == "ca_file" {
            "rediss://127.0.0.1:6379"
        } else {
            "redis://127.0.0.1:6379"
        };
        let key_file = if field == "encryption_key_file" {
            String::new()
        } else {
            format!("\n    encryption_key_file: {}", keys.display())
        };
        let store = Config::parse(&format!(
            "store:\n  redis:\n    url: {url}\n    {line}{key_file}\naccounts:\n  a: {{client_id: c, client_secret: s, username: u, password: p}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            store.contains(&format!("store.redis.{field}")) && store.contains("larger than"),
            "{store}"
        );
    }
}
