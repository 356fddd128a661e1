//! Compiles `proto/` with protox (a pure-Rust protobuf compiler: no system `protoc`) and
//! generates the tonic server and client, plus the descriptor set that reflection serves.
//!
//! Two passes: the messages and the client, then the server alone, with `GetTokenResponse`
//! mapped to `crate::grpc::GetTokenReply` (the same bytes on the wire, encoded straight from
//! the broker's token without building the message: GetToken is the hot path).

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/bace/tokenbroker/v1/token_broker.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("token_broker_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds.clone())?;
    let server = out.join("server");
    std::fs::create_dir_all(&server)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .out_dir(&server)
        .extern_path(".bace.tokenbroker.v1", "crate::proto")
        .extern_path(
            ".bace.tokenbroker.v1.GetTokenResponse",
            "crate::grpc::GetTokenReply",
        )
        .compile_fds(fds)?;
    Ok(())
}
