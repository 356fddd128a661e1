//! What goes over the wire to the broker: the gRPC paths h2load calls, the GetToken request,
//! and the request bodies h2load sends.

use std::{fs, path::PathBuf};

use bace_token_broker::proto;
use prost::Message;
use tonic_health::pb::HealthCheckRequest;

use crate::opts::Opts;

pub(crate) const GET_TOKEN_PATH: &str = "/bace.tokenbroker.v1.TokenBrokerService/GetToken";
pub(crate) const HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";

pub(crate) fn get_request(account: &str) -> proto::GetTokenRequest {
    proto::GetTokenRequest {
        account: account.to_owned(),
        min_validity: None,
    }
}

/// One length-prefixed gRPC message: flag 0, big-endian u32 length, protobuf bytes.
fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The request bodies h2load sends (`-d FILE`), in the work directory.
pub(crate) struct Bodies {
    pub(crate) get_token: PathBuf,
    pub(crate) health: PathBuf,
}

impl Bodies {
    pub(crate) fn write(opts: &Opts, account: &str) -> anyhow::Result<Self> {
        let get_token = opts.work.join("get_token.body");
        let health = opts.work.join("health.body");
        fs::write(&get_token, grpc_frame(&get_request(account)))?;
        fs::write(
            &health,
            grpc_frame(&HealthCheckRequest {
                service: String::new(),
            }),
        )?;
        Ok(Self { get_token, health })
    }
}
