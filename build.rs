//! Records the build time, a floor below which the clock cannot be right (identity::clock), and
//! gives the static builds' linker the order of their code (link/hot-text.ld).

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let time = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(now);
    println!("cargo:rustc-env=MESHKEEP_BUILD_UNIX_TIME={time}");

    // The functions a box runs, together at the start of its code: an idle box then has a few
    // MiB less of the binary resident (scripts/hot-text.py). Only for the static musl builds,
    // the ones that ship; their linkers (zig's lld, or GNU ld under `cross`) take the script's
    // INSERT form, which adds one output section and keeps the default layout otherwise.
    println!("cargo:rerun-if-changed=link/hot-text.ld");
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl") {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("link/hot-text.ld");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    }
}
