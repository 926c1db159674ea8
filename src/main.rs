//! The `meshkeep` binary: sets process-wide defaults and hands over to the CLI.

use std::process::ExitCode;

use clap::Parser;

// musl's allocator serialises threads on one lock; mimalloc does not (see ARCHITECTURE.md).
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // ring is the only provider compiled in (aws-lc does not build for armv7 musl). Installing
    // fails only if a provider is already installed, which nothing before this line can do.
    let _ = rustls::crypto::ring::default_provider().install_default();
    meshkeep::cli::main(meshkeep::cli::Cli::parse())
}
