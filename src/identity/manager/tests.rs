use std::sync::{Arc, Mutex};

use super::*;
use crate::identity::clock::build_time;

/// A clock the test moves by hand.
#[derive(Clone)]
struct FakeClock(Arc<Mutex<SystemTime>>);

impl FakeClock {
    fn at(time: SystemTime) -> Self {
        Self(Arc::new(Mutex::new(time)))
    }
    fn set(&self, time: SystemTime) {
        *self.0.lock().unwrap() = time;
    }
    fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap();
        *now += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

const DAY: Duration = Duration::from_secs(86400);

fn settings() -> Settings {
    Settings {
        trust_domain: "cluster.local".into(),
        control_plane_namespace: "linkerd".into(),
        lifetime: DAY,
        renew_fraction: 0.7,
        skew: Duration::from_secs(60),
        issuer_files: None,
        standalone: true,
        issuer_sources: Vec::new(),
        standalone_lifetime: 365 * DAY,
        proxy: Some(IdentityName::new("edge", "meshkeep", "cluster.local", "linkerd")),
        workloads: vec![],
        issuer_expiry_warning: 30 * DAY,
    }
}

fn start() -> SystemTime {
    build_time() + DAY
}

#[test]
fn a_month_offline_rotates_on_time_with_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(start());
    let mut manager = Manager::open(settings(), dir.path(), clock.clone()).unwrap();
    manager.select_issuer(&Snapshot::default());
    manager.tick();
    let first = manager.proxy_certificate().expect("issued at start").info.clone();
    let mut rotations = 0;
    let mut last_not_before = first.not_before;
    for _ in 0..(30 * 24 * 4) {
        clock.advance(Duration::from_secs(900));
        manager.tick();
        let now = clock.now();
        let leaf = manager.proxy_certificate().expect("always a certificate");
        assert!(leaf.info.is_valid_at(now), "gap at {}", fmt_time(now));
        if leaf.info.not_before != last_not_before {
            rotations += 1;
            let age = now.duration_since(last_not_before).unwrap();
            assert!(
                age >= DAY.mul_f64(0.69) && age <= DAY.mul_f64(0.72) + Duration::from_secs(960),
                "rotated after {age:?}"
            );
            last_not_before = leaf.info.not_before;
        }
    }
    assert!((40..=45).contains(&rotations), "{rotations} rotations in 30 days at 70 % of 24 h");
}

#[test]
fn a_failed_renewal_keeps_the_current_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(start());
    let mut manager = Manager::open(settings(), dir.path(), clock.clone()).unwrap();
    manager.select_issuer(&Snapshot::default());
    manager.tick();
    let current = manager.proxy_certificate().unwrap().info.clone();

    // The certificate cache cannot be written (as with a full or failing disk): a directory
    // stands where the file must go.
    let name = settings().proxy.unwrap();
    let path = dir.path().join("leaves").join(format!("{}.json", name.dns_name()));
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir_all(path.join("blocker")).unwrap();

    clock.advance(DAY.mul_f64(0.8));
    manager.tick();
    let status = manager.status();
    assert!(status.renewal_failures_total >= 1, "{status:?}");
    assert!(status.last_error.as_deref().unwrap_or("").contains("stays in use"), "{status:?}");
    assert_eq!(manager.proxy_certificate().unwrap().info, current, "the valid certificate is kept");
    assert!(current.is_valid_at(clock.now()));

    // Once writing works again, the next attempt renews.
    std::fs::remove_dir_all(&path).unwrap();
    clock.advance(Duration::from_secs(30));
    manager.tick();
    assert_ne!(manager.proxy_certificate().unwrap().info, current);
}

#[test]
fn a_clock_in_1970_issues_nothing_until_it_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(std::time::UNIX_EPOCH + Duration::from_secs(3600));
    let mut manager = Manager::open(settings(), dir.path(), clock.clone()).unwrap();
    manager.select_issuer(&Snapshot::default());
    manager.tick();
    assert!(manager.proxy_certificate().is_none());
    let status = manager.status();
    assert!(!status.clock_ok && status.last_error.as_deref().unwrap_or("").contains("behind"), "{status:?}");

    clock.set(start());
    manager.tick();
    assert!(manager.proxy_certificate().is_some(), "issuance resumes once the clock is sane");
    assert!(manager.status().clock_ok);
}

#[test]
fn certificates_and_the_issuer_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(start());
    let mut manager = Manager::open(settings(), dir.path(), clock.clone()).unwrap();
    manager.select_issuer(&Snapshot::default());
    manager.tick();
    let leaf = manager.proxy_certificate().unwrap().info.clone();
    let issuer = manager.status().issuer_subject;
    drop(manager);

    clock.advance(Duration::from_secs(3600));
    let mut reopened = Manager::open(settings(), dir.path(), clock.clone()).unwrap();
    reopened.select_issuer(&Snapshot::default());
    reopened.tick();
    assert_eq!(reopened.proxy_certificate().unwrap().info, leaf, "not reissued: still fresh");
    assert_eq!(reopened.status().issuer_subject, issuer, "the same standalone issuer, not a new one");
}

#[test]
fn a_new_issuer_from_a_source_replaces_the_old_one_without_a_restart() {
    use crate::model::{IdentityIssuer, ObjectRef, TrustRoots};
    use crate::store::SourceView;
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(start());
    let mut manager = Manager::open(settings(), dir.path(), clock.clone()).unwrap();
    manager.select_issuer(&Snapshot::default());
    manager.tick();
    let old_leaf = manager.proxy_certificate().unwrap().chain.clone();

    let upstream = ca::standalone("cluster.local", clock.now(), 365 * DAY).unwrap();
    let mut view = SourceView::default();
    view.set_kind(
        Kind::IdentityIssuer,
        [Object::IdentityIssuer(IdentityIssuer {
            meta: ObjectRef::new("linkerd", "linkerd-identity-issuer"),
            certificate_pem: upstream.certificate.clone(),
            private_key_pem: upstream.private_key.clone(),
            ca_pem: None,
        })],
    );
    view.set_kind(
        Kind::TrustRoots,
        [Object::TrustRoots(TrustRoots {
            meta: ObjectRef::new("linkerd", "roots"),
            pem: upstream.trust_anchors.clone(),
        })],
    );
    let snapshot = Snapshot::from_sources([(SourceId::Link("east".into()), view)]);
    manager.select_issuer(&snapshot);
    assert_eq!(manager.status().issuer_origin, Some(IssuerOrigin::Source { source: "link/east".into() }));
    manager.tick();
    // Peers that follow the new trust may not accept the old issuer's certificate: renewed now.
    let renewed = manager.proxy_certificate().unwrap();
    assert_ne!(renewed.chain, old_leaf, "a certificate from the replaced issuer is renewed at once");
    assert_eq!(
        renewed.chain[1],
        ca::certificates_from_pem(&upstream.certificate).unwrap()[0],
        "signed by the new issuer"
    );
    assert_eq!(renewed.trust_anchors_pem(), ca::pem_of(&ca::certificates_from_pem(&upstream.trust_anchors).unwrap()));
}

#[test]
fn a_box_with_a_link_waits_for_the_clusters_issuer_instead_of_creating_its_own() {
    use crate::store::SourceView;
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(start());
    let east = SourceId::Link("east".into());
    let settings = Settings { issuer_sources: vec![east.clone()], ..settings() };
    let mut manager = Manager::open(settings, dir.path(), clock.clone()).unwrap();
    // The link has not listed its Secrets yet (or cannot reach the cluster).
    manager.select_issuer(&Snapshot::default());
    manager.tick();
    assert!(manager.proxy_certificate().is_none(), "no standalone root while the cluster's issuer may still come");
    assert!(manager.status().last_error.is_some_and(|e| e.contains("waiting for the identity issuer from link/east")));

    // Listed, and the cluster has none: only then is the box its own trust domain.
    let mut view = SourceView::default();
    view.set_kind(Kind::IdentityIssuer, []);
    manager.select_issuer(&Snapshot::from_sources([(east, view)]));
    manager.tick();
    assert!(manager.proxy_certificate().is_some());
    assert_eq!(manager.status().issuer_origin, Some(IssuerOrigin::Standalone));
}

#[test]
fn workload_files_are_switched_as_one_generation() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("web-certs");
    let mut s = settings();
    s.workloads = vec![Workload {
        uid: 1234,
        name: IdentityName::new("shop", "web", "cluster.local", "linkerd"),
        directory: Some(out.clone()),
    }];
    let clock = FakeClock::at(start());
    let mut manager = Manager::open(s, &dir.path().join("identity"), clock.clone()).unwrap();
    manager.select_issuer(&Snapshot::default());
    manager.tick();
    let first = std::fs::read_to_string(out.join("tls.crt")).unwrap();
    clock.advance(DAY);
    manager.tick();
    let second = std::fs::read_to_string(out.join("tls.crt")).unwrap();
    assert_ne!(first, second, "renewed certificate written");
    let key = std::fs::read_to_string(out.join("tls.key")).unwrap();
    let leaf = manager.certificate(&IdentityName::new("shop", "web", "cluster.local", "linkerd")).unwrap();
    assert_eq!(key, leaf.key_pem, "key and certificate come from the same generation");
    let generations = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir() && e.file_name().to_string_lossy().starts_with("..") && e.file_name() != "..data")
        .count();
    assert!(generations <= 2, "old generations are cleaned up: {generations}");
}
