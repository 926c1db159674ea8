use std::collections::BTreeMap;

use super::*;
use crate::model::{Kind, Object, SourceId};
use crate::store::SourceView;

fn zone() -> Zone {
    Zone {
        settings: Settings {
            cluster_domain: "cluster.local".into(),
            link_modes: BTreeMap::new(),
            trust_domain: "cluster.local".into(),
            control_plane_namespace: "linkerd".into(),
        },
        ttl: 5,
        short_names: true,
    }
}

/// The DNS fuzz target's service and slice builders, with addresses as text.
fn service(name: &str, cluster_ips: &[&str]) -> Object {
    crate::fuzzing::dns_service(name, cluster_ips.iter().map(|ip| ip.parse().unwrap()).collect())
}

/// A slice for `service` with endpoints (address, hostname, ready).
fn slice(service: &str, endpoints: &[(&str, Option<&str>, bool)]) -> Object {
    let endpoints: Vec<_> =
        endpoints.iter().map(|(ip, hostname, ready)| (ip.parse().unwrap(), *hostname, *ready)).collect();
    crate::fuzzing::dns_slice(service, &endpoints)
}

/// A snapshot with: web (ClusterIP v4+v6, one ready endpoint), db (headless: db-0 ready,
/// db-1 not ready, one without hostname), idle (no endpoints at all).
fn snapshot(with_slices: bool) -> Snapshot {
    let mut view = SourceView::default();
    view.set_kind(
        Kind::Service,
        vec![service("web", &["10.96.0.10", "fd00::10"]), service("db", &[]), service("idle", &["10.96.0.11"])],
    );
    if with_slices {
        view.set_kind(
            Kind::EndpointSlice,
            vec![
                slice("web", &[("10.1.0.1", None, true)]),
                slice(
                    "db",
                    &[("10.1.0.2", Some("db-0"), true), ("10.1.0.3", Some("db-1"), false), ("10.1.0.4", None, true)],
                ),
            ],
        );
    }
    view.set_kind(Kind::Pod, Vec::new());
    Snapshot::from_sources([(SourceId::Local, view)])
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).unwrap()
}

fn answer(snapshot: &Snapshot, qname: &str, qtype: RecordType) -> Answer {
    match zone().decide(snapshot, &name(qname), qtype) {
        Decision::Answer(answer) => *answer,
        Decision::Forward => panic!("{qname} {qtype} was forwarded"),
    }
}

fn data(answer: &Answer) -> Vec<String> {
    answer.answers.iter().map(|r| r.data.to_string()).collect()
}

#[test]
fn service_names_answer_their_cluster_ips_by_family() {
    let s = snapshot(true);
    let a = answer(&s, "web.shop.svc.cluster.local.", RecordType::A);
    assert_eq!((a.code, data(&a)), (ResponseCode::NoError, vec!["10.96.0.10".to_owned()]));
    assert_eq!(a.answers[0].name, name("web.shop.svc.cluster.local."), "owner is the name asked");
    assert_eq!(a.answers[0].ttl, 5);
    let aaaa = answer(&s, "WEB.shop.svc.Cluster.Local.", RecordType::AAAA);
    assert_eq!(data(&aaaa), vec!["fd00::10".to_owned()], "names are case-insensitive");
    assert_eq!(aaaa.answers[0].name, name("WEB.shop.svc.Cluster.Local."), "the asker's case is kept");
    let txt = answer(&s, "web.shop.svc.cluster.local.", RecordType::TXT);
    assert_eq!((txt.code, txt.answers.len()), (ResponseCode::NoError, 0), "NODATA for other types");
    assert!(txt.authority.is_some(), "NODATA carries the SOA for negative caching");
}

#[test]
fn missing_names_are_nxdomain_only_when_the_cache_knows() {
    let s = snapshot(true);
    for missing in ["nope.shop.svc.cluster.local.", "a.b.c.d.e.svc.cluster.local.", "x.pod.cluster.local."] {
        let a = answer(&s, missing, RecordType::A);
        assert_eq!(a.code, ResponseCode::NXDomain, "{missing}");
        assert!(a.authority.is_some());
    }
    // Nothing listed yet: the cache cannot tell, so SERVFAIL, never a false NXDOMAIN.
    let empty = Snapshot::from_sources([(SourceId::Local, SourceView::default())]);
    let a = answer(&empty, "nope.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(a.code, ResponseCode::ServFail);
}

#[test]
fn headless_services_answer_ready_endpoints_and_per_endpoint_names() {
    let s = snapshot(true);
    let a = answer(&s, "db.shop.svc.cluster.local.", RecordType::A);
    let mut ips = data(&a);
    ips.sort();
    assert_eq!(ips, vec!["10.1.0.2", "10.1.0.4"], "ready endpoints only");
    let one = answer(&s, "db-0.db.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(data(&one), vec!["10.1.0.2"]);
    let dashed = answer(&s, "10-1-0-4.db.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(data(&dashed), vec!["10.1.0.4"]);
    let missing = answer(&s, "db-9.db.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(missing.code, ResponseCode::NXDomain);
    // Endpoints never listed: unknown, not empty.
    let unlisted = snapshot(false);
    assert_eq!(answer(&unlisted, "db.shop.svc.cluster.local.", RecordType::A).code, ResponseCode::ServFail);
}

#[test]
fn a_service_without_ready_endpoints_exists() {
    let s = snapshot(true);
    // ClusterIP service without endpoints: still its ClusterIP (kube-proxy semantics).
    assert_eq!(data(&answer(&s, "idle.shop.svc.cluster.local.", RecordType::A)), vec!["10.96.0.11"]);
    let mut headless_empty = SourceView::default();
    headless_empty.set_kind(Kind::Service, vec![service("db", &[])]);
    headless_empty.set_kind(Kind::EndpointSlice, vec![slice("db", &[("10.1.0.3", Some("db-1"), false)])]);
    headless_empty.set_kind(Kind::Pod, Vec::new());
    let s = Snapshot::from_sources([(SourceId::Local, headless_empty)]);
    let a = answer(&s, "db.shop.svc.cluster.local.", RecordType::A);
    assert_eq!((a.code, a.answers.len()), (ResponseCode::NoError, 0), "NOERROR without records, not NXDOMAIN");
}

#[test]
fn srv_records_for_named_ports() {
    let s = snapshot(true);
    let http = answer(&s, "_http._tcp.web.shop.svc.cluster.local.", RecordType::SRV);
    assert_eq!(data(&http), vec!["0 100 80 web.shop.svc.cluster.local."]);
    let udp = answer(&s, "_dns._udp.web.shop.svc.cluster.local.", RecordType::SRV);
    assert_eq!(data(&udp), vec!["0 100 53 web.shop.svc.cluster.local."]);
    let wrong_protocol = answer(&s, "_http._udp.web.shop.svc.cluster.local.", RecordType::SRV);
    assert_eq!(wrong_protocol.code, ResponseCode::NXDomain);
    let all = answer(&s, "web.shop.svc.cluster.local.", RecordType::SRV);
    assert_eq!(all.answers.len(), 2, "SRV on the service name lists every port");

    let headless = answer(&s, "_http._tcp.db.shop.svc.cluster.local.", RecordType::SRV);
    let mut targets = data(&headless);
    targets.sort();
    assert_eq!(
        targets,
        vec!["0 100 8080 10-1-0-4.db.shop.svc.cluster.local.", "0 100 8080 db-0.db.shop.svc.cluster.local."]
    );
    assert_eq!(headless.additionals.len(), 2, "the targets' addresses come along");
}

#[test]
fn short_names_are_answered_only_when_they_exist() {
    let s = snapshot(true);
    assert_eq!(data(&answer(&s, "web.shop.", RecordType::A)), vec!["10.96.0.10"]);
    assert_eq!(data(&answer(&s, "web.shop.svc.", RecordType::A)), vec!["10.96.0.10"]);
    let zone = zone();
    assert_eq!(zone.decide(&s, &name("www.example."), RecordType::A), Decision::Forward, "not ours: upstream");
    assert_eq!(zone.decide(&s, &name("example.com."), RecordType::A), Decision::Forward);
    let strict = Zone { short_names: false, ..zone };
    assert_eq!(strict.decide(&s, &name("web.shop."), RecordType::A), Decision::Forward);
}

#[test]
fn a_short_name_in_a_known_namespace_is_servfail_while_a_link_has_not_listed_services() {
    let mut s_view = SourceView::default();
    s_view.set_kind(Kind::Service, vec![service("web", &["10.96.0.10"])]);
    s_view.set_kind(Kind::EndpointSlice, Vec::new());
    let s = Snapshot::from_sources([(SourceId::Local, s_view), (SourceId::Link("east".into()), SourceView::default())]);
    let mut zone = zone();
    zone.settings.link_modes.insert("east".into(), crate::config::LinkMode::Federated);
    let decide = |q: &str| zone.decide(&s, &name(q), RecordType::A);
    assert!(matches!(decide("api.shop."), Decision::Answer(a) if a.code == ResponseCode::ServFail), "east may hold it");
    assert!(matches!(decide("web.shop."), Decision::Answer(a) if a.code == ResponseCode::NoError));
    assert_eq!(decide("example.com."), Decision::Forward, "no namespace com: someone else's name");
}

#[test]
fn the_zone_apex_has_an_soa() {
    let s = snapshot(true);
    let soa = answer(&s, "cluster.local.", RecordType::SOA);
    assert_eq!(soa.answers.len(), 1);
    assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
    assert_eq!(answer(&s, "svc.cluster.local.", RecordType::A).code, ResponseCode::NoError);
    assert_eq!(answer(&s, "shop.svc.cluster.local.", RecordType::A).code, ResponseCode::NoError);
}
