//! A `GetTokenRequest` as it arrives on the wire (protobuf), then the request checks the
//! service makes before asking the broker: `min_validity` and the account name.
//!
//! Checks: no panic; `min_validity` is taken exactly when it is a well-formed, non-negative
//! `google.protobuf.Duration` (nanos in 0..=999,999,999, seconds in 0..=315,576,000,000), and
//! then at its exact value; refused with INVALID_ARGUMENT and a short message otherwise.
#![no_main]

use bace_token_broker::{AccountName, fuzzing::min_validity, proto::GetTokenRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = GetTokenRequest::decode(data) else {
        return;
    };
    let _ = AccountName::validate(&request.account);
    let result = min_validity(request.min_validity);
    match request.min_validity {
        None => assert_eq!(result.unwrap(), std::time::Duration::ZERO),
        Some(prost_types::Duration { seconds, nanos }) => {
            let valid =
                (0..=315_576_000_000).contains(&seconds) && (0..=999_999_999).contains(&nanos);
            match result {
                Ok(d) => {
                    assert!(valid, "{seconds} s {nanos} ns accepted");
                    assert_eq!(d.as_secs(), seconds as u64);
                    assert_eq!(d.subsec_nanos(), nanos as u32);
                }
                Err(status) => {
                    assert!(!valid, "{seconds} s {nanos} ns refused");
                    assert_eq!(status.code(), tonic::Code::InvalidArgument);
                    assert!(status.message().starts_with("min_validity "));
                    assert!(status.message().len() < 120);
                }
            }
        }
    }
    // What decodes re-encodes to the same message.
    let again = GetTokenRequest::decode(request.encode_to_vec().as_slice()).unwrap();
    assert_eq!(again, request);
});
