//! Box A's HTTP/1.1 server on a client's request head.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshkeep::fuzzing::http1_request(data);
});
