use std::time::Duration;

use super::*;
use crate::model::{self, Object};

fn service(ns: &str, name: &str, ip: &str) -> Object {
    Object::Service(model::Service {
        meta: ObjectRef::new(ns, name),
        cluster_ips: vec![ip.parse().expect("ip")],
        headless: false,
        ports: vec![],
        external_name: None,
        topology_aware: false,
        opaque_ports: vec![],
    })
}

/// Runs a writer over `updates` until it has applied them all and committed, and returns the
/// last published snapshot.
async fn run_updates(dir: &Path, updates: Vec<Update>) -> Arc<Snapshot> {
    let opened = open(dir, Duration::from_secs(3600)).expect("open store");
    let (signal, watch) = drain::channel();
    let writer = tokio::spawn(opened.writer.run(watch));
    for update in updates {
        opened.updates.send(update).await.expect("send");
    }
    // The drain makes the writer take what is queued, commit and stop.
    tokio::time::timeout(Duration::from_secs(10), signal.drain()).await.expect("writer drains");
    writer.await.expect("writer task");
    opened.snapshots.borrow().clone()
}

fn link(name: &str) -> SourceId {
    SourceId::Link(name.into())
}

#[tokio::test]
async fn a_relist_survives_a_restart_and_unknown_kinds_stay_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let updates = vec![Update::Replace {
        source: link("east"),
        kind: Kind::Service,
        objects: vec![service("shop", "api", "10.0.0.1"), service("shop", "web", "10.0.0.2")],
        resource_version: Some("42".into()),
        namespace: None,
        complete: true,
    }];
    let live = run_updates(dir.path(), updates).await;
    assert_eq!(live.objects(&link("east"), Kind::Service).map(|o| o.len()), Some(2));

    let (reloaded, _, size) = read(dir.path()).expect("read store");
    assert!(size > 0);
    let view = reloaded.source(&link("east")).expect("source persisted");
    assert_eq!(view.objects(Kind::Service).map(|o| o.len()), Some(2));
    assert_eq!(view.meta.resource_versions.get(&Kind::Service).map(String::as_str), Some("42"));
    assert!(view.objects(Kind::EndpointSlice).is_none(), "never-listed kind must be unknown, not empty");
}

#[tokio::test]
async fn incremental_changes_are_persisted_and_relist_drops_what_disappeared() {
    let dir = tempfile::tempdir().unwrap();
    let east = link("east");
    run_updates(
        dir.path(),
        vec![
            Update::Replace {
                source: east.clone(),
                kind: Kind::Service,
                objects: vec![service("shop", "api", "10.0.0.1"), service("shop", "old", "10.0.0.9")],
                resource_version: None,
                namespace: None,
                complete: true,
            },
            Update::Apply { source: east.clone(), object: service("shop", "new", "10.0.0.3"), resource_version: None },
            Update::Delete {
                source: east.clone(),
                kind: Kind::Service,
                key: ObjectRef::new("shop", "api"),
                resource_version: None,
            },
        ],
    )
    .await;
    let (snapshot, ..) = read(dir.path()).unwrap();
    let names: Vec<_> = snapshot.objects(&east, Kind::Service).unwrap().keys().map(|k| k.name.clone()).collect();
    assert_eq!(names, ["new", "old"]);

    run_updates(
        dir.path(),
        vec![Update::Replace {
            source: east.clone(),
            kind: Kind::Service,
            objects: vec![service("shop", "new", "10.0.0.3")],
            resource_version: None,
            namespace: None,
            complete: true,
        }],
    )
    .await;
    let (snapshot, ..) = read(dir.path()).unwrap();
    let names: Vec<_> = snapshot.objects(&east, Kind::Service).unwrap().keys().map(|k| k.name.clone()).collect();
    assert_eq!(names, ["new"], "the relist must delete objects it no longer lists");
}

#[tokio::test]
async fn one_failing_source_keeps_its_data_and_others_are_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = run_updates(
        dir.path(),
        vec![
            Update::Replace {
                source: link("a"),
                kind: Kind::Service,
                objects: vec![service("x", "s", "10.0.0.1")],
                resource_version: None,
                namespace: None,
                complete: true,
            },
            Update::Replace {
                source: link("b"),
                kind: Kind::Service,
                objects: vec![service("x", "t", "10.0.0.2")],
                resource_version: None,
                namespace: None,
                complete: true,
            },
            Update::Failed { source: link("a"), message: "connection refused".into() },
        ],
    )
    .await;
    let a = snapshot.source(&link("a")).unwrap();
    assert_eq!(a.meta.state, LinkState::Disconnected);
    assert_eq!(a.count(Kind::Service), 1);
    assert_eq!(snapshot.source(&link("b")).unwrap().count(Kind::Service), 1);
}

#[tokio::test]
async fn absent_kinds_are_known_empty_and_forgotten_sources_vanish() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = run_updates(
        dir.path(),
        vec![
            Update::Absent { source: link("a"), kind: Kind::TrafficSplit },
            Update::Replace {
                source: link("gone"),
                kind: Kind::Service,
                objects: vec![service("x", "s", "10.0.0.1")],
                resource_version: None,
                namespace: None,
                complete: true,
            },
            Update::Forget { source: link("gone") },
        ],
    )
    .await;
    assert_eq!(snapshot.objects(&link("a"), Kind::TrafficSplit).map(|o| o.len()), Some(0));
    assert!(snapshot.source(&link("gone")).is_none());
    let (persisted, ..) = read(dir.path()).unwrap();
    assert!(persisted.source(&link("gone")).is_none());
    assert!(persisted.source(&link("a")).unwrap().is_known(Kind::TrafficSplit));
}

#[test]
fn a_damaged_file_is_moved_aside_and_the_store_starts_unknown() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), b"this is not a redb file, it is garbage".repeat(200)).unwrap();
    let opened = open(dir.path(), Duration::from_secs(1)).expect("open recovers");
    let quarantined = opened.quarantined.expect("quarantined");
    assert!(quarantined.moved_to.exists(), "damaged file must be kept for inspection");
    assert!(opened.snapshots.borrow().sources().next().is_none());
    assert!(dir.path().join(FILE_NAME).exists(), "a fresh store replaces it");
}

#[test]
fn a_store_from_a_newer_meshkeep_is_refused_not_reset() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), Duration::from_secs(1)).expect("create"));
    file::set_schema_version(&dir.path().join(FILE_NAME), SCHEMA_VERSION + 1);
    let err = open(dir.path(), Duration::from_secs(1)).expect_err("newer schema refused");
    assert!(matches!(err, Error::NewerSchema { .. }), "{err}");
    assert!(!dir.path().read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("corrupt")));
}

#[test]
fn the_store_file_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), Duration::from_secs(1)).expect("create"));
    let mode = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "store holds the issuer key: mode {mode:o}");
}

#[tokio::test]
async fn repeated_contact_does_not_write_the_disk_each_time() {
    let dir = tempfile::tempdir().unwrap();
    let opened = open(dir.path(), Duration::from_millis(20)).expect("open store");
    let commits = opened.writer.metrics().commits.clone();
    let (signal, watch) = drain::channel();
    let writer = tokio::spawn(opened.writer.run(watch));
    let east = link("east");
    let settle = || tokio::time::sleep(Duration::from_millis(120));

    opened.updates.send(Update::Contact { source: east.clone() }).await.expect("send");
    settle().await;
    let after_first = commits.get();
    assert!(after_first >= 1, "the first contact (a change of state) is written");

    for _ in 0..5 {
        opened.updates.send(Update::Contact { source: east.clone() }).await.expect("send");
        settle().await;
    }
    assert_eq!(commits.get(), after_first, "contact alone within a minute is not written again");
    let state = opened.snapshots.borrow().source(&east).map(|v| v.meta.state);
    assert_eq!(state, Some(LinkState::Connected));

    opened.updates.send(Update::Failed { source: east.clone(), message: "gone".into() }).await.expect("send");
    settle().await;
    let after_failure = commits.get();
    opened.updates.send(Update::Contact { source: east.clone() }).await.expect("send");
    settle().await;
    assert!(commits.get() > after_failure, "reconnecting (a change of state) is written at once");

    tokio::time::timeout(Duration::from_secs(10), signal.drain()).await.expect("writer drains");
    writer.await.expect("writer task");
}

#[tokio::test]
async fn a_source_s_contact_keeps_the_index_and_a_changed_service_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let opened = open(dir.path(), Duration::from_secs(3600)).expect("open store");
    let (signal, watch) = drain::channel();
    let writer = tokio::spawn(opened.writer.run(watch));
    let east = link("east");
    let mut snapshots = opened.snapshots.clone();
    let mut publish = async |update: Update| {
        snapshots.borrow_and_update();
        opened.updates.send(update).await.expect("send");
        tokio::time::timeout(Duration::from_secs(10), snapshots.changed()).await.expect("published").expect("writer");
        snapshots.borrow_and_update().clone()
    };
    let services = |objects| Update::Replace {
        source: east.clone(),
        kind: Kind::Service,
        objects,
        resource_version: None,
        namespace: None,
        complete: true,
    };
    let ip = |ip: &str| ip.parse().expect("ip");
    let listed = publish(services(vec![service("shop", "api", "10.0.0.1")])).await;
    let index: *const SourceIndex = listed.source(&east).expect("east").index();

    let contacted = publish(Update::Contact { source: east.clone() }).await;
    assert!(contacted.generation() > listed.generation());
    assert!(std::ptr::eq(contacted.source(&east).expect("east").index(), index), "contact keeps the index");
    let failed = publish(Update::Failed { source: east.clone(), message: "gone".into() }).await;
    assert!(std::ptr::eq(failed.source(&east).expect("east").index(), index), "so does a failure");

    let applied = publish(Update::Apply {
        source: east.clone(),
        object: service("shop", "web", "10.0.0.2"),
        resource_version: None,
    })
    .await;
    let rebuilt = applied.source(&east).expect("east").index();
    assert!(!std::ptr::eq(rebuilt, index), "a new service drops the index");
    assert_eq!(rebuilt.services_with_ip(ip("10.0.0.2")).count(), 1, "and the next one knows it");
    assert_eq!(listed.source(&east).expect("east").index().services_with_ip(ip("10.0.0.2")).count(), 0);

    tokio::time::timeout(Duration::from_secs(10), signal.drain()).await.expect("writer drains");
    writer.await.expect("writer task");
}
