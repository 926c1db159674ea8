//! One DNS message to the mesh DNS server, answered from a fixed snapshot; every answer must
//! parse back as a DNS response (checked in `meshkeep::fuzzing::dns`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshkeep::fuzzing::dns(data);
});
