//! Account names (`AccountName::new`), as callers send them in every request.
//!
//! Checks: no panic; accepted exactly when 1 to 128 of `A-Za-z0-9._-`, and then unchanged;
//! the error names the rule (a fixed text: it carries nothing of the input).
#![no_main]

use bace_token_broker::{AccountName, AccountNameError, MAX_ACCOUNT_NAME_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|name: &str| {
    let valid = !name.is_empty()
        && name.len() <= MAX_ACCOUNT_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    match AccountName::new(name) {
        Ok(account) => {
            assert!(valid, "{name:?} accepted");
            assert_eq!(account.as_str(), name);
            assert_eq!(account.to_string(), name);
            assert_eq!(AccountName::validate(name), Ok(()));
        }
        Err(error) => {
            assert!(!valid, "{name:?} refused: {error}");
            assert_eq!(AccountName::validate(name), Err(error));
            let expected = if name.is_empty() {
                AccountNameError::Empty
            } else if name.len() > MAX_ACCOUNT_NAME_LEN {
                AccountNameError::TooLong
            } else {
                AccountNameError::BadCharacter
            };
            assert_eq!(error, expected, "{name:?}");
        }
    }
});
