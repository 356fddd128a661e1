//! The parsers of outside input that the fuzz targets in `fuzz/` call and that are not public
//! API (feature `fuzzing`; hidden from the docs; not for any other use).
//!
//! The other parsers are fuzzed through the public API: [`crate::parse_answer`] (BACE's
//! answers), [`crate::Config::parse`] (the YAML config), [`crate::Authorizer`] (the
//! `authorization` metadata, service-account tokens and JWKS documents) and
//! [`crate::AccountName::new`]. This module adds only thin wrappers, so the fuzzed code is the
//! product's own.

use std::time::{Duration, SystemTime};

use chrono_tz::Tz;

/// The check of `GetTokenRequest.min_validity` (see the gRPC service).
pub fn min_validity(d: Option<prost_types::Duration>) -> Result<Duration, tonic::Status> {
    crate::grpc::min_validity(d)
}

/// BACE's `expires` text read in `tz` (see [`crate::parse_answer`]).
pub fn parse_bace_expires(text: &str, tz: Tz) -> Option<SystemTime> {
    crate::upstream::parse_bace_expires(text, tz)
}

/// A JWKS document (`auth.kubernetes.jwks_file`, or what `jwks_url` serves): the number of
/// usable signing keys, or why there is none.
pub fn parse_jwks(body: &[u8]) -> Result<usize, String> {
    crate::config::parse_jwks(body).map(|keys| keys.len())
}
