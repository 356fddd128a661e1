//! [`GetTokenReply`]: the GetToken answer written straight from the broker's token.

use std::sync::Arc;

use crate::token::Token;

/// The GetToken answer, encoded straight from the broker's token.
///
/// On the wire it is `GetTokenResponse { token: Some(token_to_proto(token)) }`, byte for byte
/// (tested), but serving it builds no message: no copies of the account, the access token and
/// the authorization value per call, just their bytes written into the response buffer.
/// GetToken is the hot path. Encode-only: decoding skips every field (clients decode
/// `proto::GetTokenResponse`).
#[derive(Default)]
pub struct GetTokenReply(Option<Arc<Token>>);

impl GetTokenReply {
    /// The answer carrying `token`.
    pub fn new(token: Arc<Token>) -> Self {
        Self(Some(token))
    }

    /// Token type of every token (field 3).
    const TOKEN_TYPE: &str = "Bearer";

    fn expires_at(token: &Token) -> prost_types::Timestamp {
        prost_types::Timestamp::from(token.expires_at_wall())
    }

    /// The encoded length of the `Token` message (without its key and length).
    fn token_len(token: &Token) -> usize {
        use prost::encoding::message;
        str_field_len(1, token.account().as_str())
            + str_field_len(2, token.expose_access())
            + str_field_len(3, Self::TOKEN_TYPE)
            + message::encoded_len(4, &Self::expires_at(token))
            + str_field_len(5, token.expose_authorization())
    }
}

impl prost::Message for GetTokenReply {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        use prost::encoding::{WireType, encode_key, encode_varint, message};
        let Some(token) = &self.0 else { return };
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(Self::token_len(token) as u64, buf);
        put_str_field(1, token.account().as_str(), buf);
        put_str_field(2, token.expose_access(), buf);
        put_str_field(3, Self::TOKEN_TYPE, buf);
        message::encode(4, &Self::expires_at(token), buf);
        put_str_field(5, token.expose_authorization(), buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.as_deref().map_or(0, |token| {
            let len = Self::token_len(token);
            prost::encoding::key_len(1) + prost::encoding::encoded_len_varint(len as u64) + len
        })
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

impl std::fmt::Debug for GetTokenReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token's own Debug redacts its secrets.
        f.debug_tuple("GetTokenReply").field(&self.0).finish()
    }
}

/// Length of a proto3 `string` field (absent when empty).
fn str_field_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        return 0;
    }
    prost::encoding::key_len(tag)
        + prost::encoding::encoded_len_varint(value.len() as u64)
        + value.len()
}

/// Writes a proto3 `string` field (nothing when empty).
fn put_str_field(tag: u32, value: &str, buf: &mut impl prost::bytes::BufMut) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    if value.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value.as_bytes());
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use prost::Message;
    use secrecy::SecretString;
    use tokio::time::Duration;

    use super::*;
    use crate::{grpc::convert::token_to_proto, proto, token::AccountName};

    #[test]
    fn get_token_reply_encodes_exactly_as_the_generated_message() {
        let times = [
            UNIX_EPOCH,                                      // zero timestamp fields
            UNIX_EPOCH + Duration::from_secs(1_800_000_000), // whole seconds
            SystemTime::now(),                               // with nanoseconds
        ];
        let names = ["a", "fleet-a", &"n".repeat(128)];
        // Lengths around the one-byte varint limit (127) and beyond.
        let accesses = [
            "x".to_owned(),
            "8a0b".repeat(10),
            "t".repeat(120),
            "u".repeat(300),
        ];
        for (i, access) in accesses.iter().enumerate() {
            for (j, name) in names.iter().enumerate() {
                let now = tokio::time::Instant::now();
                let lifetime = Duration::from_secs(86_400);
                let wall = times[(i + j) % times.len()];
                let refresh = (i % 2 == 0).then(|| SecretString::from("r".repeat(40)));
                let token = Arc::new(Token::new(
                    AccountName::new(name).unwrap(),
                    SecretString::from(access.clone()),
                    refresh,
                    lifetime,
                    now,
                    wall,
                ));
                let expected = proto::GetTokenResponse {
                    token: Some(token_to_proto(&token)),
                }
                .encode_to_vec();
                let reply = GetTokenReply::new(token.clone());
                assert_eq!(reply.encode_to_vec(), expected, "{name} / {}", access.len());
                assert_eq!(reply.encoded_len(), expected.len());
                let decoded = proto::GetTokenResponse::decode(&*reply.encode_to_vec()).unwrap();
                assert_eq!(decoded.token.unwrap().access_token, *access);
                if access.len() >= 40 {
                    assert!(!format!("{reply:?}").contains(access.as_str()));
                }
            }
        }
        let mut reply = GetTokenReply::default();
        assert!(reply.encode_to_vec().is_empty());
        reply.clear();
        assert_eq!(reply.encoded_len(), 0);
    }
}
