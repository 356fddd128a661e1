//! The `bace-token-broker` binary: parse the command line, run it (see [`bace_token_broker::Cli`]).

use std::process::ExitCode;

use clap::Parser;

/// jemalloc returns freed memory to the system (glibc's malloc keeps the peak of parsing a
/// large config for good) and fragments less under many small, long-lived allocations.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    bace_token_broker::run(bace_token_broker::Cli::parse())
}
