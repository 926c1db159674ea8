//! The proxy's protocol detection on a client's first bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshkeep::fuzzing::detect(data);
});
