//! Upgrading meshkeep keeps the cache: a store file and a cache export written by the build
//! before store schema 2 (HTTPRoute rules without `retry`) are read by this one. The fixtures
//! in tests/fixtures/schema1 were written by that build from the example manifests plus an
//! HTTPRoute with timeouts, so these are the old bytes, not a re-encoding of them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::meshkeep;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema1").join(name)
}

fn json(output: &Output) -> serde_json::Value {
    let text = || format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{}", text());
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text()))
}

/// A box's directory with a config whose state directory is `state` and whose manifest folder
/// does not exist (the box is offline: the cache is all it has).
fn offline_box() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nstate_dir = {:?}\n[upstream.local]\npath = {:?}\n",
            dir.path().join("state").display().to_string(),
            dir.path().join("absent").display().to_string()
        ),
    )
    .unwrap();
    (dir, config.display().to_string())
}

/// What the example manifests leave in the store, as `cache show` counts it.
fn assert_example_objects(dir: &Path, config: &str) {
    let shown = json(&meshkeep(dir, &["-c", config, "cache", "show", "-o", "json"], &[]));
    assert!(shown["store_quarantined"].is_null(), "{shown}");
    let objects = &shown["sources"][0]["objects"];
    for (kind, count) in [("Service", 3), ("EndpointSlice", 3), ("Pod", 2), ("HTTPRoute", 2), ("TrafficSplit", 1)] {
        assert_eq!(objects[kind], count, "{kind} in {shown}");
    }
    let web = json(&meshkeep(dir, &["-c", config, "resolve", "web.shop", "-o", "json"], &[]));
    assert_eq!(web["result"], "found", "{web}");
}

#[test]
fn a_store_from_schema_1_is_migrated_in_place_and_keeps_every_object() {
    let (dir, config) = offline_box();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let gunzip = Command::new("gzip").arg("-dc").arg(fixture("store.redb.gz")).output().expect("run gzip");
    assert!(gunzip.status.success());
    std::fs::write(state.join("store.redb"), gunzip.stdout).unwrap();

    assert_example_objects(dir.path(), &config);
    // Opened again, now in the current schema.
    assert_example_objects(dir.path(), &config);
    let names: Vec<String> =
        std::fs::read_dir(&state).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains("corrupt")), "nothing quarantined: {names:?}");
}

#[test]
fn a_cache_export_from_schema_1_imports() {
    let (dir, config) = offline_box();
    let path = fixture("cache.mkc").display().to_string();
    let out = meshkeep(dir.path(), &["-c", &config, "cache", "import", &path], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_example_objects(dir.path(), &config);
}
