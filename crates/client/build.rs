//! Compiles the broker's API (`../../proto`) with protox (a pure-Rust protobuf compiler: no
//! system `protoc`) into the messages and the tonic client. The server stubs are not generated:
//! this crate is what callers depend on, and it shares no code with the broker.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../proto";
    let proto = "../../proto/bace/tokenbroker/v1/token_broker.proto";
    println!("cargo:rerun-if-changed={root}");
    let fds = protox::compile([proto], [root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
