use std::collections::BTreeMap;

use super::*;
use crate::identity::manager::{CertificateStatus, IdentityStatus};
use crate::status::{ProcessInfo, SnapshotStatus, SourceStatus};

const NOW: u64 = 1_800_000_000;

fn source(state: &str, error: Option<&str>, synced: bool) -> SourceStatus {
    SourceStatus {
        source: "link/east".into(),
        state: state.into(),
        last_contact: Some(NOW - 5),
        last_full_sync: synced.then_some(NOW - 60),
        last_error: error.map(str::to_owned),
        last_error_at: error.map(|_| NOW - 5),
        imported_at: None,
        objects: BTreeMap::new(),
        unknown_kinds: Vec::new(),
        resource_versions: BTreeMap::new(),
    }
}

fn healthy() -> Status {
    Status {
        version: "test".into(),
        now: NOW,
        process: ProcessInfo { node: "edge-1".into(), ready: true, ..ProcessInfo::default() },
        snapshot: SnapshotStatus { generation: 3, age_seconds: Some(60), objects: 10 },
        sources: vec![source("connected", None, true)],
        identity: Some(IdentityStatus {
            issuer_not_after: Some(NOW + 86400 * 300),
            clock_ok: true,
            certificates: vec![CertificateStatus {
                identity: "web.shop.serviceaccount.identity.linkerd.cluster.local".into(),
                spiffe_id: "spiffe://cluster.local/ns/shop/sa/web".into(),
                not_before: NOW - 60,
                not_after: NOW + 3600,
                renew_at: NOW + 1800,
                proxy: true,
            }],
            ..IdentityStatus::default()
        }),
    }
}

fn levels(status: &Status) -> Vec<(String, Level)> {
    assess(status).into_iter().filter(|f| f.level != Level::Pass).map(|f| (f.check, f.level)).collect()
}

#[test]
fn a_healthy_box_has_only_passes() {
    assert_eq!(levels(&healthy()), vec![]);
    assert_eq!(overall(&assess(&healthy())), Level::Pass);
}

#[test]
fn each_broken_precondition_is_named() {
    type Breaks = Box<dyn Fn(&mut Status)>;
    let cases: Vec<(&str, Breaks, &str, Level)> = vec![
        (
            "not ready",
            Box::new(|s| {
                s.process.ready = false;
                s.process.pending = vec!["listeners".into()];
            }),
            "listeners",
            Level::Fail,
        ),
        (
            "link down after a sync",
            Box::new(|s| s.sources[0] = source("disconnected", Some("connection refused"), true)),
            "source link/east",
            Level::Fail,
        ),
        (
            "link never synced",
            Box::new(|s| s.sources[0] = source("unknown", None, false)),
            "source link/east",
            Level::Fail,
        ),
        ("clock behind", Box::new(|s| s.identity.as_mut().unwrap().clock_ok = false), "clock", Level::Fail),
        (
            "issuer expiring",
            Box::new(|s| s.identity.as_mut().unwrap().issuer_expiring_soon = true),
            "issuer",
            Level::Warn,
        ),
        (
            "issuer expired",
            Box::new(|s| s.identity.as_mut().unwrap().issuer_not_after = Some(NOW - 1)),
            "issuer",
            Level::Fail,
        ),
        ("no issuer", Box::new(|s| s.identity.as_mut().unwrap().issuer_not_after = None), "issuer", Level::Fail),
        ("stale cache", Box::new(|s| s.snapshot.age_seconds = Some(86400)), "cache", Level::Warn),
        (
            "quarantined store",
            Box::new(|s| s.process.store_quarantined = Some("store.redb.corrupt-1".into())),
            "store",
            Level::Warn,
        ),
    ];
    for (what, breaks, check, level) in cases {
        let mut status = healthy();
        breaks(&mut status);
        let found = levels(&status);
        assert!(
            found.iter().any(|(c, l)| c == check && *l == level),
            "{what}: expected {check} {level:?}, got {found:?}"
        );
    }
}

#[test]
fn refused_credentials_get_an_rbac_hint() {
    let mut status = healthy();
    status.sources[0] = source("disconnected", Some("ApiError: Forbidden (403)"), true);
    let finding = assess(&status).into_iter().find(|f| f.check == "source link/east").unwrap();
    assert!(finding.hint.contains("RBAC"), "{finding:?}");
}

#[test]
fn tables_align_columns() {
    let text = table(
        &["A", "LONGER", "N"],
        &[vec!["x".into(), "y".into(), "1".into()], vec!["xyz".into(), "".into(), "100".into()]],
        2,
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "A    LONGER    N");
    assert_eq!(lines[1], "x    y         1");
    assert_eq!(lines[2], "xyz          100");
}
