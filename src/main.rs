//! The `bace-token-broker` binary: see [`bace_token_broker::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    bace_token_broker::cli::run(bace_token_broker::cli::Cli::parse())
}
