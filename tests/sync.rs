//! Upstream sync and the crash-safe store, end to end: the real daemon, the real kube client,
//! and a fake API server speaking the list/watch protocol on loopback.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::cluster::{ips, link_config, shop_cluster};
use support::fake_kube::{FakeKube, Fault};
use support::objects::{endpoint_slice, pod, service};
use support::{Daemon, endpoint_ips, meshkeep};

const SYNC: Duration = Duration::from_secs(30);

fn start_with(config: &str) -> Daemon {
    Daemon::start(config)
}

#[test]
fn initial_sync_then_adds_updates_and_deletes_flow_through() {
    let kube = shop_cluster();
    let daemon = start_with(&link_config("east", &kube, "federated"));
    // Kinds sync independently: the endpoint's identity needs the pods listed too.
    daemon.wait_for("api.shop synced with its identity", SYNC, |d| {
        let lookup = d.resolve("api.shop.svc.cluster.local");
        endpoint_ips(&lookup) == Some(vec!["10.1.0.1".into()])
            && lookup["endpoints"][0]["identity"] == "api.shop.serviceaccount.identity.linkerd.cluster.local"
    });

    kube.apply(pod("shop", "api-2", "10.1.0.2", "api"));
    kube.apply(endpoint_slice("shop", "api", "a", &[("10.1.0.1", "api-1"), ("10.1.0.2", "api-2")]));
    daemon.wait_for("second endpoint", SYNC, |d| ips(d, "api.shop").is_some_and(|ips| ips.len() == 2));

    kube.apply(service("shop", "cart", "10.96.0.12", 80));
    daemon.wait_for("new service", SYNC, |d| d.resolve("cart.shop")["result"] == "found");

    kube.delete("v1", "Service", "shop", "cart");
    daemon.wait_for("deleted service", SYNC, |d| d.resolve("cart.shop")["result"] == "not_found");

    // The kube client really listed with pages and watched with bookmarks from the list's version.
    let requests = kube.requests();
    assert!(requests.iter().any(|r| r.path == "/api/v1/services" && r.query.contains_key("limit")), "{requests:?}");
    assert!(
        requests.iter().any(|r| r.is_watch() && r.query.get("allowWatchBookmarks").map(String::as_str) == Some("true")),
        "{requests:?}"
    );
}

#[test]
fn relist_after_410_gone_drops_what_was_deleted_meanwhile() {
    let kube = shop_cluster();
    kube.apply(service("shop", "old", "10.96.0.13", 80));
    let daemon = start_with(&link_config("east", &kube, "federated"));
    daemon.wait_for("old.shop synced", SYNC, |d| d.resolve("old.shop")["result"] == "found");

    kube.down();
    kube.delete("v1", "Service", "shop", "old");
    kube.compact();
    kube.up();
    daemon.wait_for("relist removes old.shop", Duration::from_secs(60), |d| {
        d.resolve("old.shop")["result"] == "not_found"
    });
    assert_eq!(ips(&daemon, "api.shop"), Some(vec!["10.1.0.1".into()]), "the rest survives the relist");
}

#[test]
fn link_down_keeps_serving_and_reports_disconnected() {
    let kube = shop_cluster();
    let daemon = start_with(&link_config("east", &kube, "federated"));
    daemon.wait_for("synced", SYNC, |d| ips(d, "api.shop").is_some());
    kube.down();
    daemon.wait_for("link reported down", Duration::from_secs(60), |d| {
        d.status()["sources"][0]["state"] == "disconnected"
    });
    assert_eq!(ips(&daemon, "api.shop"), Some(vec!["10.1.0.1".into()]));
    let status = daemon.status();
    assert!(status["sources"][0]["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{status}");
    assert_eq!(daemon.get("/ready").0, 200, "ready means serving from the snapshot, connected or not");
    // Every watch keeps failing to connect meanwhile: the store says so once, kube not per request.
    std::thread::sleep(Duration::from_secs(3));
    let log = daemon.log();
    assert_eq!(log.matches("source unreachable").count(), 1, "{log}");
    let kube_errors = log.lines().filter(|l| l.contains("ERROR") && l.contains("kube_client")).count();
    assert_eq!(kube_errors, 0, "kube's per-request error lines are in the log:\n{log}");
}

#[test]
fn restart_while_cut_off_serves_the_same_answers_from_disk() {
    let kube = shop_cluster();
    let mut daemon = start_with(&link_config("east", &kube, "federated"));
    // Kinds sync independently: wait for the pods too, so the answer carries the identity.
    daemon.wait_for("synced with the identity", SYNC, |d| {
        d.resolve("api.shop")["endpoints"][0]["identity"] == "api.shop.serviceaccount.identity.linkerd.cluster.local"
    });
    let before = daemon.resolve("api.shop");
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());

    kube.down();
    // With the daemon stopped, the CLI reads the store file.
    let config = daemon.config_path().expect("config").display().to_string();
    let offline = meshkeep(
        daemon.path(),
        &["-c", &config, "resolve", "api.shop", "-o", "json"],
        &[("MESHKEEP_ADMIN_LISTEN", &daemon.admin.to_string())],
    );
    assert!(offline.status.success(), "{}", String::from_utf8_lossy(&offline.stderr));
    let offline: serde_json::Value = serde_json::from_slice(&offline.stdout).expect("json");
    assert_eq!(offline, before, "the CLI reads the same answer from the store file");

    daemon.respawn();
    daemon.wait_ready();
    assert_eq!(daemon.resolve("api.shop"), before, "same answer after a restart with the link down");
}

#[test]
fn one_link_down_leaves_the_other_links_data_alone() {
    let east = shop_cluster();
    let west = FakeKube::start();
    west.apply(service("shop", "cart", "10.97.0.5", 80));
    let config = format!("{}{}", link_config("east", &east, "mirror"), link_config("west", &west, "mirror"));
    let daemon = start_with(&config);
    daemon.wait_for("both synced", SYNC, |d| {
        d.resolve("api-east.shop")["result"] == "found" && d.resolve("cart-west.shop")["result"] == "found"
    });
    east.down();
    west.apply(service("shop", "orders", "10.97.0.6", 80));
    daemon.wait_for("west keeps syncing", SYNC, |d| d.resolve("orders-west.shop")["result"] == "found");
    assert_eq!(daemon.resolve("api-east.shop")["result"], "found", "east's data stays while east is down");
    assert_eq!(daemon.resolve("api.shop")["result"], "found", "mirror links also fill the plain name");
}

#[test]
fn a_missing_crd_is_reported_as_absent_not_fatal() {
    let kube = shop_cluster();
    kube.set_served("trafficsplits", false);
    let daemon = start_with(&link_config("east", &kube, "federated"));
    daemon.wait_for("synced", SYNC, |d| {
        let status = d.status();
        status["sources"][0]["objects"].get("TrafficSplit") == Some(&serde_json::json!(0))
            && status["sources"][0]["unknown_kinds"].as_array().is_some_and(|k| k.is_empty())
    });
    assert_eq!(ips(&daemon, "api.shop"), Some(vec!["10.1.0.1".into()]));
}

#[test]
fn server_errors_are_reported_and_the_cache_keeps_serving() {
    let kube = shop_cluster();
    let mut daemon = start_with(&link_config("east", &kube, "federated"));
    daemon.wait_for("synced", SYNC, |d| ips(d, "api.shop").is_some());
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(15));

    // On restart every list fails in a different hostile way; the store still answers.
    kube.fault("/services", Fault::Status(500), 3);
    kube.fault("/endpointslices", Fault::Malformed, 3);
    kube.fault("/pods", Fault::Truncate, 3);
    kube.fault("/secrets", Fault::Status(403), 3);
    kube.fault("/configmaps", Fault::Status(401), 3);
    daemon.respawn();
    daemon.wait_ready();
    assert_eq!(ips(&daemon, "api.shop"), Some(vec!["10.1.0.1".into()]));
    daemon.wait_for("errors reported", SYNC, |d| d.status()["sources"][0]["last_error"].is_string());
    // Once the faults are used up the link recovers and syncs again.
    kube.apply(service("shop", "later", "10.96.0.20", 80));
    daemon.wait_for("recovered", Duration::from_secs(90), |d| d.resolve("later.shop")["result"] == "found");
}

#[test]
fn kill_9_during_large_syncs_never_leaves_a_half_applied_relist() {
    // The cluster flips between 3000 and 2000 services while the daemon is dead, so the daemon
    // learns each change only through a full relist. Killed at any moment, its store must hold
    // the old set or the new one, never a mix.
    const LARGE: usize = 3000;
    const SMALL: usize = 2000;
    let name = |i: usize| format!("svc-{i}");
    let ip = |i: usize| format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
    let kube = FakeKube::start();
    for i in 0..LARGE {
        kube.apply(service("bulk", &name(i), &ip(i), 80));
    }
    let rounds: usize = std::env::var("MESHKEEP_KILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let mut daemon = Daemon::builder().config(&link_config("east", &kube, "federated")).spawn();
    let config = daemon.config_path().expect("config").display().to_string();
    let (mut previous, mut current) = (None, LARGE);
    let mut outcomes = [0usize; 3]; // unknown, previous set, current set
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(50 + ((round * 137) % 700) as u64));
        daemon.kill9();
        if !daemon.state_dir().join("store.redb").exists() {
            outcomes[0] += 1; // killed before the store was created: nothing to check yet
            daemon.respawn();
            continue;
        }
        let output = meshkeep(
            daemon.path(),
            &["-c", &config, "cache", "show", "-o", "json"],
            &[("MESHKEEP_ADMIN_LISTEN", "127.0.0.1:1")],
        );
        assert!(
            output.status.success(),
            "round {round}: store does not open: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status json");
        assert!(status["store_quarantined"].is_null(), "round {round}: store was damaged: {status}");
        match status["sources"][0]["objects"].get("Service").and_then(|c| c.as_u64()) {
            None => outcomes[0] += 1,
            Some(count) if Some(count as usize) == previous => outcomes[1] += 1,
            Some(count) if count as usize == current => outcomes[2] += 1,
            Some(count) => panic!(
                "round {round}: {count} services stored; a relist was half-applied (expected {previous:?} or {current})"
            ),
        }
        // Change the cluster while the daemon is dead.
        previous = Some(current);
        if current == LARGE {
            for i in SMALL..LARGE {
                kube.delete("v1", "Service", "bulk", &name(i));
            }
            current = SMALL;
        } else {
            for i in SMALL..LARGE {
                kube.apply(service("bulk", &name(i), &ip(i), 80));
            }
            current = LARGE;
        }
        daemon.respawn();
    }
    eprintln!(
        "kill -9 rounds: {} before any sync, {} with the previous set, {} with the new set",
        outcomes[0], outcomes[1], outcomes[2]
    );
    daemon.wait_ready();
    daemon.wait_for("full sync after the kills", Duration::from_secs(60), |d| {
        d.status()["sources"][0]["objects"]["Service"] == serde_json::json!(current)
    });
}

#[test]
fn a_corrupt_store_is_quarantined_and_the_daemon_resyncs() {
    let kube = shop_cluster();
    let mut daemon = start_with(&link_config("east", &kube, "federated"));
    daemon.wait_for("synced", SYNC, |d| ips(d, "api.shop").is_some());
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(15));

    let store = daemon.state_dir().join("store.redb");
    let mut bytes = std::fs::read(&store).expect("store file");
    for byte in bytes.iter_mut().take(4096) {
        *byte ^= 0x5a;
    }
    std::fs::write(&store, bytes).expect("damage store");

    daemon.respawn();
    daemon.wait_ready();
    let status = daemon.status();
    assert!(status["store_quarantined"].as_str().is_some_and(|q| q.contains("corrupt")), "{status}");
    let kept = std::fs::read_dir(daemon.state_dir())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("store.redb.corrupt-"));
    assert!(kept, "the damaged file must be kept for inspection");
    daemon.wait_for("resynced", SYNC, |d| ips(d, "api.shop").is_some());
}

#[test]
fn local_manifests_edited_while_running_and_bad_files_keep_their_last_good_version() {
    let manifests = tempfile::tempdir().unwrap();
    let write = |name: &str, docs: &[serde_json::Value]| {
        let text: Vec<String> = docs.iter().map(|d| serde_json::to_string(d).unwrap()).collect();
        std::fs::write(manifests.path().join(name), text.join("\n---\n")).unwrap();
    };
    write(
        "shop.yaml",
        &[service("shop", "web", "10.96.0.10", 80), endpoint_slice("shop", "web", "a", &[("127.0.0.1", "web-0")])],
    );
    let config =
        format!("[upstream.local]\npath = {:?}\npoll_interval = \"200ms\"\n", manifests.path().display().to_string());
    let daemon = Daemon::start(&config);
    daemon.wait_for("web.shop loaded", SYNC, |d| ips(d, "web.shop") == Some(vec!["127.0.0.1".into()]));

    write("more.yaml", &[service("shop", "api", "10.96.0.11", 80)]);
    daemon.wait_for("new file picked up", SYNC, |d| d.resolve("api.shop")["result"] == "found");

    std::fs::write(manifests.path().join("shop.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: [broken\n")
        .unwrap();
    daemon.wait_for("error reported", SYNC, |d| {
        d.status()["sources"][0]["last_error"].as_str().is_some_and(|e| e.contains("shop.yaml:"))
    });
    assert_eq!(ips(&daemon, "web.shop"), Some(vec!["127.0.0.1".into()]), "the last good version stays in force");

    std::fs::remove_file(manifests.path().join("more.yaml")).unwrap();
    daemon.wait_for("removed file's objects dropped", SYNC, |d| d.resolve("api.shop")["result"] == "not_found");
}

#[test]
fn cache_export_and_import_carry_a_snapshot_to_a_box_that_was_never_online() {
    let kube = shop_cluster();
    let mut online = start_with(&link_config("east", &kube, "federated"));
    online.wait_for("synced", SYNC, |d| ips(d, "api.shop").is_some());
    online.signal(Signal::SIGTERM);
    online.wait_exit(Duration::from_secs(15));
    let config = online.config_path().unwrap().display().to_string();
    let export = online.path().join("site.cache");
    let out = meshkeep(online.path(), &["-c", &config, "cache", "export", export.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A fresh box with the same link configuration whose upstream is unreachable.
    kube.down();
    let mut offline = Daemon::builder().config(&link_config("east", &kube, "federated")).spawn();
    offline.wait_ready();
    offline.signal(Signal::SIGTERM);
    offline.wait_exit(Duration::from_secs(15));
    let offline_config = offline.config_path().unwrap().display().to_string();

    let mut damaged = std::fs::read(&export).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 1;
    let damaged_path = offline.path().join("damaged.cache");
    std::fs::write(&damaged_path, damaged).unwrap();
    let out =
        meshkeep(offline.path(), &["-c", &offline_config, "cache", "import", damaged_path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"), "{}", String::from_utf8_lossy(&out.stderr));

    let out = meshkeep(offline.path(), &["-c", &offline_config, "cache", "import", export.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    offline.respawn();
    offline.wait_ready();
    assert_eq!(ips(&offline, "api.shop"), Some(vec!["10.1.0.1".into()]));
}

#[test]
fn a_link_limited_to_namespaces_sees_only_those() {
    let kube = shop_cluster();
    kube.apply(service("other", "hidden", "10.96.1.1", 80));
    let config = format!("{}namespaces = [\"shop\"]\n", link_config("east", &kube, "federated"));
    let daemon = start_with(&config);
    daemon.wait_for("shop synced", SYNC, |d| ips(d, "api.shop").is_some());
    assert_eq!(daemon.resolve("hidden.other")["result"], "not_found");
    let requests = kube.requests();
    assert!(requests.iter().any(|r| r.path == "/api/v1/namespaces/shop/services"), "{requests:?}");
    assert!(!requests.iter().any(|r| r.path == "/api/v1/services"), "must not list all namespaces: {requests:?}");
}

#[test]
fn a_link_by_server_url_and_token_file_authenticates() {
    let kube = shop_cluster();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, support::fake_kube::TOKEN).unwrap();
    let config = format!(
        "[upstream.links.east]\nserver = {:?}\ntoken_file = {:?}\nmode = \"federated\"\n",
        kube.url(),
        token.display().to_string()
    );
    let daemon = start_with(&config);
    daemon.wait_for("synced with the token", SYNC, |d| ips(d, "api.shop").is_some());

    // A wrong token is refused by the server: reported, and nothing is invented.
    let bad = tempfile::tempdir().unwrap();
    let bad_token = bad.path().join("token");
    std::fs::write(&bad_token, "wrong").unwrap();
    let config = format!(
        "[upstream.links.east]\nserver = {:?}\ntoken_file = {:?}\nmode = \"federated\"\n",
        kube.url(),
        bad_token.display().to_string()
    );
    let refused = start_with(&config);
    refused.wait_for("401 reported", SYNC, |d| {
        d.status()["sources"][0]["last_error"].as_str().is_some_and(|e| e.contains("401") || e.contains("Unauthorized"))
    });
    assert_eq!(refused.resolve("api.shop")["result"], "unknown");
}
