use std::collections::BTreeMap;

use http::HeaderMap;

use super::authz::{self, DefaultPolicy, Destination};
use super::routes::{self, Backend};
use super::*;
use crate::discovery::Settings;
use crate::model::{
    BackendRef, HeaderMatch, HttpMatch, HttpRoute, HttpRouteGroup, HttpRouteMatch, HttpRouteRule, ObjectRef, ParentRef,
    PathMatch, RouteRef, RouteRetry, ServiceAccountRef, SourceId, TcpRoute, TrafficSplit, TrafficTarget,
    WeightedBackend,
};
use crate::store::SourceView;

fn snapshot(objects: Vec<Object>) -> Snapshot {
    let mut by_kind: BTreeMap<Kind, Vec<Object>> = BTreeMap::new();
    for object in objects {
        by_kind.entry(object.kind()).or_default().push(object);
    }
    let mut view = SourceView::default();
    for (kind, objects) in by_kind {
        view.set_kind(kind, objects);
    }
    Snapshot::from_sources([(SourceId::Local, view)])
}

fn request<'a>(method: &'a str, path: &'a str, headers: &'a HeaderMap) -> RequestInfo<'a> {
    RequestInfo { method, path, headers, host: None }
}

fn route(name: &str, rules: Vec<HttpRouteRule>) -> Object {
    Object::HttpRoute(HttpRoute {
        meta: ObjectRef::new("shop", name),
        parents: vec![ParentRef {
            group: "core".into(),
            kind: "Service".into(),
            namespace: "shop".into(),
            name: "api".into(),
            port: Some(80),
        }],
        hostnames: vec![],
        rules,
    })
}

fn rule(matches: Vec<HttpRouteMatch>, backends: &[(&str, u32)]) -> HttpRouteRule {
    HttpRouteRule {
        matches,
        backends: backends
            .iter()
            .map(|(name, weight)| BackendRef {
                namespace: "shop".into(),
                name: (*name).into(),
                port: Some(80),
                weight: *weight,
            })
            .collect(),
        request_timeout_ms: Some(1500),
        backend_request_timeout_ms: None,
        retry: None,
    }
}

fn path(m: PathMatch) -> HttpRouteMatch {
    HttpRouteMatch { path: Some(m), method: None, headers: vec![] }
}

fn names(choice: &routes::Choice) -> Vec<(&str, u32)> {
    choice.backends.iter().map(|b| (b.service.as_str(), b.weight)).collect()
}

fn choose(s: &Snapshot, method: &str, p: &str, headers: &HeaderMap) -> routes::Choice {
    let existing = ["api", "api-v2", "api-v3"];
    routes::choose(s, "shop", "api", 80, &request(method, p, headers), |_, name| existing.contains(&name))
}

#[test]
fn http_route_rules_follow_gateway_precedence() {
    let header = HttpRouteMatch {
        path: None,
        method: None,
        headers: vec![HeaderMatch { name: "x-canary".into(), value: "1".into(), regex: false }],
    };
    let s = snapshot(vec![route(
        "api",
        vec![
            rule(vec![path(PathMatch::Prefix("/".into()))], &[("api", 1)]),
            rule(vec![path(PathMatch::Prefix("/products".into()))], &[("api-v2", 1)]),
            rule(vec![path(PathMatch::Exact("/products/special".into()))], &[("api-v3", 1)]),
            rule(vec![header], &[("api-v3", 1)]),
            rule(
                vec![HttpRouteMatch {
                    path: Some(PathMatch::Prefix("/products".into())),
                    method: Some("POST".into()),
                    headers: vec![],
                }],
                &[("api", 7)],
            ),
        ],
    )]);
    let none = HeaderMap::new();
    let mut canary = HeaderMap::new();
    canary.insert("x-canary", "1".parse().unwrap());
    let cases = [
        ("GET", "/", &none, vec![("api", 1)]),
        ("GET", "/products/1", &none, vec![("api-v2", 1)]),
        ("GET", "/productsx", &none, vec![("api", 1)]), // prefixes match whole segments
        ("GET", "/products/special", &none, vec![("api-v3", 1)]), // exact beats any prefix
        ("POST", "/products/1", &none, vec![("api", 7)]), // a method beats the same prefix without one
        ("GET", "/other", &canary, vec![("api-v3", 1)]), // headers count on the same path
    ];
    for (method, p, headers, expected) in cases {
        let choice = choose(&s, method, p, headers);
        assert_eq!(names(&choice), expected, "{method} {p}");
        assert_eq!(choice.request_timeout, Some(std::time::Duration::from_millis(1500)));
    }
}

#[test]
fn a_rule_marked_retryable_carries_its_retry_to_the_choice() {
    let retry = RouteRetry { codes: vec![503], attempts: Some(3), backoff_ms: Some(20) };
    let s = snapshot(vec![route(
        "api",
        vec![
            rule(vec![path(PathMatch::Prefix("/".into()))], &[("api", 1)]),
            HttpRouteRule {
                retry: Some(retry.clone()),
                ..rule(vec![path(PathMatch::Prefix("/orders".into()))], &[("api-v2", 1)])
            },
        ],
    )]);
    let none = HeaderMap::new();
    let cases = [("POST", "/orders/1", Some(retry)), ("POST", "/", None), ("GET", "/ordersx", None)];
    for (method, p, expected) in cases {
        assert_eq!(choose(&s, method, p, &none).retry, expected, "{method} {p}");
    }
}

#[test]
fn a_zero_timeout_means_none() {
    let s = snapshot(vec![route(
        "api",
        vec![HttpRouteRule {
            request_timeout_ms: Some(0),
            backend_request_timeout_ms: Some(0),
            ..rule(vec![path(PathMatch::Prefix("/".into()))], &[("api", 1)])
        }],
    )]);
    let choice = choose(&s, "GET", "/", &HeaderMap::new());
    assert_eq!((choice.request_timeout, choice.backend_timeout), (None, None));
}

#[test]
fn http_routes_refuse_what_no_rule_matches_and_drop_missing_backends() {
    let s = snapshot(vec![route(
        "api",
        vec![
            rule(vec![path(PathMatch::Prefix("/v1".into()))], &[("api", 50), ("gone", 50)]),
            rule(vec![path(PathMatch::Prefix("/v9".into()))], &[("gone", 1)]),
        ],
    )]);
    let none = HeaderMap::new();
    assert_eq!(names(&choose(&s, "GET", "/v1/x", &none)), vec![("api", 50)], "the missing backend is dropped");
    assert_eq!(choose(&s, "GET", "/v9", &none).refusal, Some(500), "no backend exists");
    assert_eq!(choose(&s, "GET", "/elsewhere", &none).refusal, Some(404), "no rule matches");
}

fn split(backends: &[(&str, u32)], matches: Vec<RouteRef>) -> Object {
    Object::TrafficSplit(TrafficSplit {
        meta: ObjectRef::new("shop", "api-split"),
        service: "api".into(),
        backends: backends.iter().map(|(s, w)| WeightedBackend { service: (*s).into(), weight: *w }).collect(),
        matches,
    })
}

fn route_group(name: &str, matches: Vec<HttpMatch>) -> Object {
    Object::HttpRouteGroup(HttpRouteGroup { meta: ObjectRef::new("shop", name), matches })
}

fn smi(name: &str, methods: &[&str], path_regex: Option<&str>) -> HttpMatch {
    HttpMatch {
        name: name.into(),
        methods: methods.iter().map(|m| (*m).to_owned()).collect(),
        path_regex: path_regex.map(str::to_owned),
        headers: BTreeMap::new(),
    }
}

#[test]
fn traffic_splits_weigh_existing_backends_and_respect_their_matches() {
    let none = HeaderMap::new();
    let s = snapshot(vec![split(&[("api", 90), ("api-v2", 10), ("missing", 50)], vec![])]);
    let choice = choose(&s, "GET", "/", &none);
    assert_eq!(names(&choice), vec![("api", 90), ("api-v2", 10)]);
    assert_eq!(choice.by, "TrafficSplit shop/api-split");

    let all_missing = snapshot(vec![split(&[("missing", 1)], vec![])]);
    assert_eq!(names(&choose(&all_missing, "GET", "/", &none)), vec![("api", 1)], "falls back to the service");

    let reads = RouteRef { kind: Kind::HttpRouteGroup, name: "reads".into(), matches: vec![] };
    let s = snapshot(vec![
        split(&[("api-v2", 1)], vec![reads]),
        route_group("reads", vec![smi("get", &["GET"], Some("/products(/.*)?"))]),
    ]);
    assert_eq!(names(&choose(&s, "GET", "/products/4", &none)), vec![("api-v2", 1)]);
    assert_eq!(choose(&s, "POST", "/products/4", &none).by, "default", "the split does not apply");

    // An HTTPRoute attached to the service takes precedence over a split.
    let s = snapshot(vec![split(&[("api-v2", 1)], vec![]), route("api", vec![rule(vec![], &[("api-v3", 1)])])]);
    assert_eq!(names(&choose(&s, "GET", "/", &none)), vec![("api-v3", 1)]);
}

#[test]
fn routing_is_skipped_only_for_services_no_route_or_split_names() {
    let none = HeaderMap::new();
    let api = |s: &Snapshot| routes::any_for(s, "shop", "api");
    let plain = snapshot(vec![split(&[("api-v2", 1)], vec![])]);
    assert!(!routes::any_for(&plain, "shop", "api-v2"), "a split's backend is not routed itself");
    assert!(!routes::any_for(&plain, "other", "api"), "nor the same name in another namespace");
    assert!(api(&plain), "a TrafficSplit names the service");
    let default_for = |s: &Snapshot, namespace: &str, service: &str| {
        routes::choose(s, namespace, service, 80, &request("GET", "/", &none), |_, _| true).by
    };
    assert_eq!(default_for(&plain, "shop", "api-v2"), "default");
    assert_eq!(default_for(&plain, "other", "api"), "default");
    assert!(api(&snapshot(vec![route("r", vec![rule(vec![], &[("api-v2", 1)])])])), "an HTTPRoute attaches to it");
    let mut other_port = route("r", vec![rule(vec![], &[("api-v2", 1)])]);
    if let Object::HttpRoute(r) = &mut other_port {
        r.parents[0].port = Some(81);
    }
    assert!(api(&snapshot(vec![other_port])), "on any port: choose decides by port");
    // Where nothing names the service, choose sends everything to it: skipping it changes nothing.
    let empty = snapshot(vec![]);
    assert!(!api(&empty));
    let choice = choose(&empty, "GET", "/", &none);
    assert_eq!((names(&choice), choice.by.as_ref(), &choice.retry), (vec![("api", 1)], "default", &None));
    assert_eq!((choice.request_timeout, choice.backend_timeout), (None, None));
}

#[test]
fn weighted_picks_are_proportional() {
    let choice = routes::Choice {
        by: "t".into(),
        backends: vec![
            Backend { namespace: "shop".into(), service: "a".into(), port: None, weight: 90 },
            Backend { namespace: "shop".into(), service: "b".into(), port: None, weight: 10 },
        ],
        refusal: None,
        request_timeout: None,
        backend_timeout: None,
        retry: None,
    };
    let picks: Vec<&str> =
        (0..1000u32).map(|i| choice.pick(i.wrapping_mul(4_294_967)).unwrap().service.as_str()).collect();
    let b = picks.iter().filter(|s| **s == "b").count();
    assert!((90..=110).contains(&b), "{b} of 1000 went to the 10% backend");
    assert_eq!(choice.pick(0).unwrap().service, "a");
    assert_eq!(choice.pick(u32::MAX).unwrap().service, "b");
}

fn settings() -> Settings {
    Settings {
        cluster_domain: "cluster.local".into(),
        link_modes: BTreeMap::new(),
        trust_domain: "cluster.local".into(),
        control_plane_namespace: "linkerd".into(),
    }
}

fn target(name: &str, sources: &[&str], rules: Vec<RouteRef>) -> Object {
    Object::TrafficTarget(TrafficTarget {
        meta: ObjectRef::new("shop", name),
        destination: ServiceAccountRef { namespace: "shop".into(), name: "api".into(), port: None },
        rules,
        sources: sources
            .iter()
            .map(|s| ServiceAccountRef { namespace: "shop".into(), name: (*s).into(), port: None })
            .collect(),
    })
}

fn id(sa: &str) -> String {
    settings().identity_name("shop", sa)
}

#[test]
fn traffic_targets_allow_listed_identities_for_their_routes() {
    let reads = RouteRef { kind: Kind::HttpRouteGroup, name: "api-routes".into(), matches: vec!["read".into()] };
    let tcp = RouteRef { kind: Kind::TcpRoute, name: "db-port".into(), matches: vec![] };
    let s = snapshot(vec![
        target("web-reads", &["web"], vec![reads]),
        target("batch-tcp", &["batch"], vec![tcp]),
        route_group(
            "api-routes",
            vec![smi("read", &["GET", "HEAD"], Some("/products(/.*)?")), smi("write", &["POST"], None)],
        ),
        Object::TcpRoute(TcpRoute { meta: ObjectRef::new("shop", "db-port"), ports: vec![5432] }),
    ]);
    let headers = HeaderMap::new();
    let dest = |port| Destination { namespace: "shop", service_account: "api", port };
    let check = |client: Option<&str>, req: Option<RequestInfo<'_>>, port: u16| {
        authz::authorize(&s, &settings(), dest(port), client, req.as_ref(), DefaultPolicy::AllAuthenticated)
    };
    let (web, batch, other) = (id("web"), id("batch"), id("other"));
    let cases = [
        ("web reads", check(Some(&web), Some(request("GET", "/products/1", &headers)), 80), true),
        (
            "web writes (not in the named match)",
            check(Some(&web), Some(request("POST", "/products", &headers)), 80),
            false,
        ),
        ("web, other path", check(Some(&web), Some(request("GET", "/admin", &headers)), 80), false),
        ("web, opaque TCP", check(Some(&web), None, 80), false),
        ("other identity", check(Some(&other), Some(request("GET", "/products/1", &headers)), 80), false),
        ("plaintext", check(None, Some(request("GET", "/products/1", &headers)), 80), false),
        ("batch TCP on its port", check(Some(&batch), None, 5432), true),
        ("batch TCP on another port", check(Some(&batch), None, 80), false),
        ("batch HTTP on its TCP port", check(Some(&batch), Some(request("POST", "/x", &headers)), 5432), true),
    ];
    for (what, verdict, allowed) in cases {
        assert_eq!(verdict.allowed, allowed, "{what}: {verdict:?}");
        if !allowed {
            assert!(verdict.reason.is_some(), "{what}: a denial says why");
        }
        // A TrafficTarget's rules decided (HTTP and TCP alike): the verdict holds for its
        // request alone. Without an identity they were never reached.
        assert_eq!(verdict.per_request, what != "plaintext", "{what}: {verdict:?}");
    }
}

#[test]
fn the_default_policy_applies_when_no_traffic_target_selects_the_workload() {
    let s = snapshot(vec![target("elsewhere", &["web"], vec![])]);
    let dest = Destination { namespace: "shop", service_account: "other-workload", port: 80 };
    let web = id("web");
    let cases = [
        (DefaultPolicy::AllAuthenticated, Some(web.as_str()), true),
        (DefaultPolicy::AllAuthenticated, None, false),
        (DefaultPolicy::AllUnauthenticated, None, true),
        (DefaultPolicy::Deny, Some(web.as_str()), false),
        (DefaultPolicy::Audit, None, true),
    ];
    for (policy, client, allowed) in cases {
        let verdict = authz::authorize(&s, &settings(), dest, client, None, policy);
        assert_eq!(verdict.allowed, allowed, "{policy:?} {client:?}");
        assert!(verdict.by.starts_with("default:"), "{verdict:?}");
        assert!(!verdict.per_request, "the default policy holds for every request: {verdict:?}");
    }
    let audit = authz::authorize(&s, &settings(), dest, None, None, DefaultPolicy::Audit);
    assert!(audit.reason.is_some(), "audit records what it would have denied");
}

#[test]
fn regular_expressions_match_whole_values_and_bad_ones_never_match() {
    assert!(full_match("/products(/.*)?", "/products"));
    assert!(full_match("/products(/.*)?", "/products/7"));
    assert!(!full_match("/products(/.*)?", "/x/products"));
    assert!(!full_match("(unclosed", "(unclosed"));
}

#[test]
fn authorization_is_denied_while_a_source_has_not_listed_its_traffic_targets() {
    let mut unlisted = SourceView::default();
    unlisted.set_kind(Kind::Service, Vec::new());
    let s = Snapshot::from_sources([(SourceId::Local, unlisted)]);
    let dest = Destination { namespace: "shop", service_account: "api", port: 80 };
    let web = id("web");
    let verdict = authz::authorize(&s, &settings(), dest, Some(&web), None, DefaultPolicy::AllUnauthenticated);
    assert!(!verdict.allowed, "unknown policy is not the default policy: {verdict:?}");
    assert_eq!(verdict.by, "unknown");
}

#[test]
fn an_smi_host_match_reads_the_authority_of_a_request_without_a_host_header() {
    let mut by_host = smi("by-host", &[], None);
    by_host.headers.insert("host".into(), "echo\\.shop(:80)?".into());
    let none = HeaderMap::new();
    // HTTP/2 names the host in :authority alone.
    let h2 = |host| RequestInfo { method: "GET", path: "/", headers: &none, host: Some(host) };
    assert!(smi_match(&by_host, &h2("echo.shop")));
    assert!(!smi_match(&by_host, &h2("other.shop")));
    // A Host header, when there is one, is what counts.
    let mut headers = HeaderMap::new();
    headers.insert("host", http::HeaderValue::from_static("other.shop"));
    let h1 = RequestInfo { method: "GET", path: "/", headers: &headers, host: Some("echo.shop") };
    assert!(!smi_match(&by_host, &h1));
}
