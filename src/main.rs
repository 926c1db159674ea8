//! The `meshkeep` binary: sets process-wide defaults and hands over to the CLI.

use std::process::ExitCode;

use clap::Parser;

// musl's allocator serialises threads on one lock; mimalloc does not (see ARCHITECTURE.md).
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// Byte comparison a word at a time, in place of compiler_rt's byte at a time (src/bytes_cmp.rs).
#[cfg(target_env = "musl")]
mod byte_comparison {
    use std::ffi::c_int;

    /// # Safety
    ///
    /// C's: `a` and `b` each point to `n` readable bytes.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> c_int {
        // SAFETY: the caller keeps C's contract, which is the function's.
        unsafe { meshkeep::bytes_cmp::bcmp(a, b, n) }
    }

    /// # Safety
    ///
    /// As `bcmp`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> c_int {
        // SAFETY: as in `bcmp`.
        unsafe { meshkeep::bytes_cmp::memcmp(a, b, n) }
    }
}

fn main() -> ExitCode {
    // ring is the only provider compiled in (aws-lc does not build for armv7 musl). Installing
    // fails only if a provider is already installed, which nothing before this line can do.
    let _ = rustls::crypto::ring::default_provider().install_default();
    meshkeep::cli::main(meshkeep::cli::Cli::parse())
}
