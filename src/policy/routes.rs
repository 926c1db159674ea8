//! Where an HTTP request for a service goes: the HTTPRoute rule that matches it (Gateway API
//! precedence), else the service's TrafficSplit, else the service itself; then one backend
//! chosen by weight among those that exist.

use std::borrow::Cow;
use std::time::Duration;

use super::{RequestInfo, full_match, indexed, named, smi_match};
use crate::model::{HttpRoute, HttpRouteMatch, Kind, Name, Object, ObjectRef, PathMatch, RouteRetry, TrafficSplit};
use crate::store::Snapshot;

/// A weighted backend service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub namespace: Name,
    pub service: Name,
    /// The port on the backend service; `None` keeps the request's port.
    pub port: Option<u16>,
    pub weight: u32,
}

/// The routing decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// What decided: `HTTPRoute shop/name rule 0`, `TrafficSplit shop/name` or `default`.
    pub by: Cow<'static, str>,
    /// Backends that exist, with weights; empty when an HTTPRoute applies but no rule matches
    /// (404) or none of the rule's backends exists (500).
    pub backends: Vec<Backend>,
    /// Why `backends` is empty, as the HTTP status to answer with.
    pub refusal: Option<u16>,
    /// `timeouts.request` of the rule.
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest` of the rule (each try).
    pub backend_timeout: Option<Duration>,
    /// `retry` of the rule: it marks the requests retryable.
    pub retry: Option<RouteRetry>,
}

impl Choice {
    fn to(by: impl Into<Cow<'static, str>>, backends: Vec<Backend>) -> Self {
        Self { by: by.into(), backends, refusal: None, request_timeout: None, backend_timeout: None, retry: None }
    }

    /// The backend for a uniformly random `roll` in `0..u32::MAX` (weights need not sum to
    /// anything in particular).
    pub fn pick(&self, roll: u32) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = u64::from(roll) * total / (u64::from(u32::MAX) + 1);
        for backend in &self.backends {
            if point < u64::from(backend.weight) {
                return Some(backend);
            }
            point -= u64::from(backend.weight);
        }
        self.backends.last()
    }
}

/// How specific a matching rule is, by Gateway API precedence: exact path, then longer path
/// prefix, then a method, then more headers; earlier routes (by namespace and name) and
/// earlier rules win ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Specificity {
    exact: bool,
    path_len: usize,
    method: bool,
    headers: usize,
}

/// Whether an HTTPRoute or a TrafficSplit names `service` in `namespace`, on any port. When none
/// does, [`choose`] sends every request to the service itself, so a caller may skip it.
pub fn any_for(snapshot: &Snapshot, namespace: &str, service: &str) -> bool {
    let target = ObjectRef::new(namespace, service);
    routes_of(snapshot, &target).next().is_some() || splits_of(snapshot, &target).next().is_some()
}

/// The HTTPRoutes with `target` as a parent, on any port.
fn routes_of<'s>(snapshot: &'s Snapshot, target: &'s ObjectRef) -> impl Iterator<Item = &'s HttpRoute> + 's {
    indexed(snapshot, Kind::HttpRoute, |index| index.routes_with_parent(target)).filter_map(|o| match o {
        Object::HttpRoute(r) => Some(r),
        _ => None,
    })
}

/// The TrafficSplits whose root service is `target`.
fn splits_of<'s>(snapshot: &'s Snapshot, target: &'s ObjectRef) -> impl Iterator<Item = &'s TrafficSplit> + 's {
    indexed(snapshot, Kind::TrafficSplit, |index| index.splits_of(target)).filter_map(|o| match o {
        Object::TrafficSplit(s) => Some(s),
        _ => None,
    })
}

/// Routes a request for `service` in `namespace` on `port`. `exists(namespace, service)` says
/// whether a backend service is known; missing backends are dropped.
pub fn choose(
    snapshot: &Snapshot,
    namespace: &str,
    service: &str,
    port: u16,
    request: &RequestInfo<'_>,
    exists: impl Fn(&str, &str) -> bool,
) -> Choice {
    let target = ObjectRef::new(namespace, service);
    let routes: Vec<&HttpRoute> =
        routes_of(snapshot, &target).filter(|r| attaches(r, namespace, service, port)).collect();
    if !routes.is_empty() {
        return from_http_routes(&routes, namespace, service, request, exists);
    }
    for split in splits_of(snapshot, &target) {
        if split_applies(snapshot, split, request) {
            let backends: Vec<Backend> = split
                .backends
                .iter()
                .filter(|b| b.weight > 0 && exists(namespace, &b.service))
                .map(|b| Backend {
                    namespace: namespace.into(),
                    service: b.service.as_str().into(),
                    port: None,
                    weight: b.weight,
                })
                .collect();
            // A split whose backends are all missing leaves the service as it is.
            if !backends.is_empty() {
                return Choice::to(format!("TrafficSplit {}/{}", split.meta.namespace, split.meta.name), backends);
            }
        }
    }
    Choice::to("default", vec![Backend { namespace: namespace.into(), service: service.into(), port: None, weight: 1 }])
}

/// An HTTPRoute attaches to a Service parent (group "" or "core") of that name and namespace,
/// on its port if the parent names one.
fn attaches(route: &HttpRoute, namespace: &str, service: &str, port: u16) -> bool {
    route.parents.iter().any(|p| {
        p.kind == "Service"
            && (p.group.is_empty() || p.group == "core")
            && p.namespace == namespace
            && p.name == service
            && p.port.is_none_or(|p| p == port)
    })
}

fn from_http_routes(
    routes: &[&HttpRoute],
    namespace: &str,
    service: &str,
    request: &RequestInfo<'_>,
    exists: impl Fn(&str, &str) -> bool,
) -> Choice {
    let mut best: Option<(Specificity, usize, usize)> = None;
    for (route_index, route) in routes.iter().enumerate() {
        for (rule_index, rule) in route.rules.iter().enumerate() {
            let specificity = if rule.matches.is_empty() {
                Some(Specificity { exact: false, path_len: 1, method: false, headers: 0 })
            } else {
                rule.matches.iter().filter_map(|m| matches(m, request)).max()
            };
            let Some(specificity) = specificity else { continue };
            // Strictly greater: ties keep the earlier route and rule.
            if best.is_none_or(|(b, _, _)| specificity > b) {
                best = Some((specificity, route_index, rule_index));
            }
        }
    }
    let Some((_, route_index, rule_index)) = best else {
        let mut choice = Choice::to(format!("HTTPRoute for {service}.{namespace}: no rule matches"), Vec::new());
        choice.refusal = Some(404);
        return choice;
    };
    let (route, rule) = (routes[route_index], &routes[route_index].rules[rule_index]);
    let by = format!("HTTPRoute {}/{} rule {rule_index}", route.meta.namespace, route.meta.name);
    let mut choice = if rule.backends.is_empty() {
        // No backendRefs: the request goes to the parent service itself.
        Choice::to(by, vec![Backend { namespace: namespace.into(), service: service.into(), port: None, weight: 1 }])
    } else {
        let backends: Vec<Backend> = rule
            .backends
            .iter()
            .filter(|b| b.weight > 0 && exists(&b.namespace, &b.name))
            .map(|b| Backend {
                namespace: b.namespace.as_str().into(),
                service: b.name.as_str().into(),
                port: b.port,
                weight: b.weight,
            })
            .collect();
        let refusal = backends.is_empty().then_some(500);
        Choice { refusal, ..Choice::to(by, backends) }
    };
    // Gateway API: a zero duration disables the timeout.
    let timeout = |ms: Option<u64>| ms.filter(|&ms| ms > 0).map(Duration::from_millis);
    choice.request_timeout = timeout(rule.request_timeout_ms);
    choice.backend_timeout = timeout(rule.backend_request_timeout_ms);
    choice.retry.clone_from(&rule.retry);
    choice
}

/// The specificity of a match that accepts the request, or `None`.
fn matches(m: &HttpRouteMatch, request: &RequestInfo<'_>) -> Option<Specificity> {
    let (exact, path_len) = match &m.path {
        None => (false, 1),
        Some(PathMatch::Exact(p)) => (request.path == p).then_some((true, p.len()))?,
        Some(PathMatch::Prefix(p)) => prefix_matches(p, request.path).then_some((false, p.len()))?,
        Some(PathMatch::Regex(p)) => full_match(p, request.path).then_some((false, p.len()))?,
    };
    if m.method.as_deref().is_some_and(|method| !method.eq_ignore_ascii_case(request.method)) {
        return None;
    }
    for header in &m.headers {
        let ok = request.headers.get_all(header.name.as_str()).iter().any(|v| {
            v.to_str().is_ok_and(|v| if header.regex { full_match(&header.value, v) } else { v == header.value })
        });
        if !ok {
            return None;
        }
    }
    Some(Specificity { exact, path_len, method: m.method.is_some(), headers: m.headers.len() })
}

/// Gateway API prefixes match whole path segments: `/api` matches `/api` and `/api/x`, not
/// `/apis`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// A TrafficSplit with HTTPRouteGroup matches applies only to requests one of them accepts.
fn split_applies(snapshot: &Snapshot, split: &TrafficSplit, request: &RequestInfo<'_>) -> bool {
    if split.matches.is_empty() {
        return true;
    }
    split.matches.iter().any(|reference| {
        let key = ObjectRef::new(&split.meta.namespace, &reference.name);
        named(snapshot, Kind::HttpRouteGroup, &key).any(|o| match o {
            Object::HttpRouteGroup(group) => group
                .matches
                .iter()
                .filter(|m| reference.matches.is_empty() || reference.matches.contains(&m.name))
                .any(|m| smi_match(m, request)),
            _ => false,
        })
    })
}
