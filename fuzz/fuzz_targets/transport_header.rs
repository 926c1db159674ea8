//! The proxy-to-proxy transport header, then the HTTP marker headers, as the inbound port reads
//! them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshkeep::fuzzing::transport_header(data);
});
