//! One multi-document YAML file of the local manifest folder, into model objects or a located
//! error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshkeep::fuzzing::manifests(&String::from_utf8_lossy(data));
});
