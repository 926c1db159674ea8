//! One configuration file through the TOML parser with its file, line and key errors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshkeep::fuzzing::config(&String::from_utf8_lossy(data));
});
