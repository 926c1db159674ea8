use super::*;
use crate::model::{self, Protocol, TargetPort};
use crate::store::SourceView;

fn settings(links: &[(&str, LinkMode)]) -> Settings {
    Settings {
        cluster_domain: "cluster.local".into(),
        link_modes: links.iter().map(|(n, m)| ((*n).to_owned(), *m)).collect(),
        trust_domain: "cluster.local".into(),
        control_plane_namespace: "linkerd".into(),
    }
}

fn service(ns: &str, name: &str, ip: &str) -> Object {
    Object::Service(model::Service {
        meta: ObjectRef::new(ns, name),
        cluster_ips: vec![ip.parse().unwrap()],
        headless: false,
        ports: vec![ServicePort {
            name: Some("http".into()),
            port: 80,
            target_port: TargetPort::Number(8080),
            protocol: Protocol::Tcp,
            app_protocol: None,
        }],
        external_name: None,
        topology_aware: false,
        opaque_ports: vec![],
    })
}

fn slice(ns: &str, svc: &str, ips_and_pods: &[(&str, Option<&str>)]) -> Object {
    Object::EndpointSlice(model::EndpointSlice {
        meta: ObjectRef::new(ns, format!("{svc}-abc")),
        service: svc.into(),
        ports: vec![EndpointPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
            app_protocol: None,
        }],
        endpoints: ips_and_pods
            .iter()
            .map(|(ip, pod)| Endpoint {
                addresses: vec![ip.parse().unwrap()],
                ready: true,
                serving: true,
                terminating: false,
                hostname: None,
                node_name: Some("n1".into()),
                zone: Some("z1".into()),
                hints_for_zones: vec![],
                pod: pod.map(|p| ObjectRef::new(ns, p)),
            })
            .collect(),
    })
}

fn pod(ns: &str, name: &str, sa: &str, meshed: bool) -> Object {
    let labels = meshed.then(|| ("linkerd.io/control-plane-ns".to_owned(), "linkerd".to_owned())).into_iter().collect();
    Object::Pod(model::Pod {
        meta: ObjectRef::new(ns, name),
        ips: vec![],
        service_account: sa.into(),
        node_name: None,
        labels,
    })
}

fn view(services: Vec<Object>, slices: Option<Vec<Object>>, pods: Vec<Object>) -> SourceView {
    let mut view = SourceView::default();
    view.set_kind(Kind::Service, services);
    if let Some(slices) = slices {
        view.set_kind(Kind::EndpointSlice, slices);
    }
    view.set_kind(Kind::Pod, pods);
    view
}

fn found(lookup: Lookup) -> Resolved {
    match lookup {
        Lookup::Found(resolved) => resolved,
        other => panic!("expected a service, got {other:?}"),
    }
}

#[test]
fn names_parse_in_every_accepted_form() {
    for name in ["api.shop", "api.shop.svc", "api.shop.svc.cluster.local", "API.Shop.svc.cluster.local."] {
        assert_eq!(parse_name(name, "cluster.local"), Some(("api".into(), "shop".into())), "{name}");
    }
    for name in ["api", "a.b.c", "api.shop.svc.other.domain", ".shop", "a_b.shop"] {
        assert_eq!(parse_name(name, "cluster.local"), None, "{name}");
    }
}

#[test]
fn local_services_resolve_with_identities_only_for_meshed_pods() {
    let snapshot = Snapshot::from_sources([(
        SourceId::Local,
        view(
            vec![service("shop", "api", "10.0.0.1")],
            Some(vec![slice("shop", "api", &[("10.1.0.1", Some("api-1")), ("10.1.0.2", Some("api-2"))])]),
            vec![pod("shop", "api-1", "api-sa", true), pod("shop", "api-2", "api-sa", false)],
        ),
    )]);
    let resolved = found(resolve_name(&snapshot, &settings(&[]), "api.shop.svc.cluster.local"));
    assert_eq!(resolved.cluster_ips, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
    let endpoints = resolved.endpoints.expect("endpoints known");
    assert_eq!(endpoints[0].identity.as_deref(), Some("api-sa.shop.serviceaccount.identity.linkerd.cluster.local"));
    assert_eq!(endpoints[1].identity, None);
    assert_eq!(resolve_name(&snapshot, &settings(&[]), "nope.shop"), Lookup::NotFound);
}

#[test]
fn never_listed_kinds_answer_unknown_not_empty() {
    let mut unsynced = SourceView::default();
    unsynced.meta.synced_kinds.clear();
    let snapshot = Snapshot::from_sources([(SourceId::Link("east".into()), unsynced)]);
    let lookup = resolve_name(&snapshot, &settings(&[("east", LinkMode::Federated)]), "api.shop");
    assert!(matches!(lookup, Lookup::Unknown { .. }), "{lookup:?}");

    let snapshot =
        Snapshot::from_sources([(SourceId::Local, view(vec![service("shop", "api", "10.0.0.1")], None, vec![]))]);
    let resolved = found(resolve_name(&snapshot, &settings(&[]), "api.shop"));
    assert_eq!(resolved.endpoints, None, "endpoints never listed must be unknown");
}

#[test]
fn mirror_links_serve_suffixed_names_and_federated_links_merge() {
    let east =
        view(vec![service("shop", "api", "10.9.0.1")], Some(vec![slice("shop", "api", &[("10.9.1.1", None)])]), vec![]);
    let west =
        view(vec![service("shop", "api", "10.8.0.1")], Some(vec![slice("shop", "api", &[("10.8.1.1", None)])]), vec![]);
    let local =
        view(vec![service("shop", "api", "10.0.0.1")], Some(vec![slice("shop", "api", &[("10.1.0.1", None)])]), vec![]);
    let snapshot = Snapshot::from_sources([
        (SourceId::Local, local),
        (SourceId::Link("east".into()), east),
        (SourceId::Link("west".into()), west),
    ]);
    let settings = settings(&[("east", LinkMode::Mirror), ("west", LinkMode::Federated)]);

    let mirrored = found(resolve_name(&snapshot, &settings, "api-east.shop"));
    assert_eq!(mirrored.cluster_ips, ["10.9.0.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(mirrored.fqdn, "api-east.shop.svc.cluster.local");

    let merged = found(resolve_name(&snapshot, &settings, "api.shop"));
    let addresses: Vec<_> = merged.endpoints.unwrap().iter().map(|e| e.addresses[0].to_string()).collect();
    assert_eq!(addresses, ["10.1.0.1", "10.8.1.1"], "local and federated endpoints, not the mirror link's");
}

#[test]
fn mirror_links_fill_in_plain_names_nobody_else_has() {
    let east = view(vec![service("shop", "cart", "10.9.0.2")], Some(vec![]), vec![]);
    let snapshot = Snapshot::from_sources([(SourceId::Link("east".into()), east)]);
    let resolved = found(resolve_name(&snapshot, &settings(&[("east", LinkMode::Mirror)]), "cart.shop"));
    assert_eq!(resolved.backings[0].source, "link/east");
}

#[test]
fn addresses_resolve_by_cluster_ip_or_endpoint_ip() {
    let snapshot = Snapshot::from_sources([(
        SourceId::Local,
        view(
            vec![service("shop", "api", "10.0.0.1")],
            Some(vec![slice("shop", "api", &[("10.1.0.1", None), ("10.1.0.2", None)])]),
            vec![],
        ),
    )]);
    let settings = settings(&[]);
    let by_vip = found(resolve_addr(&snapshot, &settings, "10.0.0.1:80".parse().unwrap()));
    assert_eq!(by_vip.endpoints.unwrap().len(), 2);
    assert_eq!(resolve_addr(&snapshot, &settings, "10.0.0.1:81".parse().unwrap()), Lookup::NotFound);
    let by_endpoint = found(resolve_addr(&snapshot, &settings, "10.1.0.2:8080".parse().unwrap()));
    assert_eq!(by_endpoint.name, "api");
    assert_eq!(by_endpoint.endpoints.unwrap().len(), 1);
}

#[test]
fn lookups_follow_changes_to_a_view_whose_index_was_built() {
    let settings = settings(&[]);
    let resolve = |view: &SourceView, addr: &str| {
        let snapshot = Snapshot::from_sources([(SourceId::Local, view.clone())]);
        resolve_addr(&snapshot, &settings, addr.parse().unwrap())
    };
    let mut view = view(vec![service("shop", "api", "10.0.0.1")], Some(vec![]), vec![]);
    assert_eq!(
        view.index().services_with_ip("10.0.0.1".parse().unwrap()).collect::<Vec<_>>(),
        [&ObjectRef::new("shop", "api")]
    );
    // Changed in place after the index was built (the store's writer owns its views once no
    // snapshot shares them): the old index must not answer.
    view.set_kind(Kind::Service, vec![service("shop", "web", "10.0.0.1"), service("shop", "db", "10.0.0.2")]);
    assert_eq!(
        view.index().services_with_ip("10.0.0.1".parse().unwrap()).collect::<Vec<_>>(),
        [&ObjectRef::new("shop", "web")]
    );
    assert_eq!(found(resolve(&view, "10.0.0.2:80")).name, "db");
    view.set_kind(Kind::EndpointSlice, vec![slice("shop", "db", &[("10.1.0.9", None)])]);
    assert_eq!(found(resolve(&view, "10.1.0.9:8080")).name, "db");
    assert_eq!(found(resolve(&view, "10.0.0.2:80")).endpoints.unwrap().len(), 1);
}

#[test]
fn a_service_gets_only_its_own_slices_among_many_in_its_namespace() {
    let services: Vec<Object> = (0..50).map(|i| service("shop", &format!("svc{i}"), &format!("10.0.0.{i}"))).collect();
    let slices: Vec<Object> =
        (0..50).map(|i| slice("shop", &format!("svc{i}"), &[(&format!("10.1.0.{i}"), None)])).collect();
    let snapshot = Snapshot::from_sources([(SourceId::Local, view(services, Some(slices), vec![]))]);
    let settings = settings(&[]);
    for i in [0, 7, 49] {
        let resolved = found(resolve_name(&snapshot, &settings, &format!("svc{i}.shop")));
        let endpoints = resolved.endpoints.unwrap();
        assert_eq!(endpoints.len(), 1, "svc{i}");
        assert_eq!(endpoints[0].addresses, vec![format!("10.1.0.{i}").parse::<IpAddr>().unwrap()]);
        let by_endpoint = found(resolve_addr(&snapshot, &settings, format!("10.1.0.{i}:8080").parse().unwrap()));
        assert_eq!(by_endpoint.name, format!("svc{i}"));
    }
}

#[test]
fn an_address_in_two_slices_belongs_to_the_first_slice_by_key() {
    // Slice names sort the other way round from their services' names.
    let named = |object: Object, name: &str| match object {
        Object::EndpointSlice(mut slice) => {
            slice.meta.name = name.into();
            Object::EndpointSlice(slice)
        }
        other => other,
    };
    let slices = vec![
        named(slice("shop", "alpha", &[("10.1.0.5", None)]), "zz-alpha"),
        named(slice("shop", "omega", &[("10.1.0.5", None), ("10.1.0.6", None)]), "aa-omega"),
    ];
    let services = vec![service("shop", "alpha", "10.0.0.1"), service("shop", "omega", "10.0.0.2")];
    let snapshot = Snapshot::from_sources([(SourceId::Local, view(services, Some(slices), vec![]))]);
    let resolved = found(resolve_addr(&snapshot, &settings(&[]), "10.1.0.5:8080".parse().unwrap()));
    assert_eq!(resolved.name, "omega");
    let alpha = found(resolve_name(&snapshot, &settings(&[]), "alpha.shop"));
    assert_eq!(alpha.endpoints.unwrap().len(), 1);
}
