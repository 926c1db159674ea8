//! Conversion from Kubernetes objects (typed or wire) into meshkeep's model. Pure functions.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::wire;
use crate::model::{self, Kind, ObjectRef};

/// An object that cannot be represented: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {message}")]
pub struct Invalid {
    pub kind: Kind,
    pub object: String,
    pub message: String,
}

/// Linkerd's annotation listing ports whose traffic is not protocol-detected.
const OPAQUE_PORTS_ANNOTATION: &str = "config.linkerd.io/opaque-ports";
const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

struct Ctx {
    kind: Kind,
    object: String,
}

impl Ctx {
    fn new(kind: Kind, meta: &ObjectMeta) -> Self {
        let object = format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or("<unnamed>")
        );
        Self { kind, object }
    }

    fn invalid(&self, message: impl Into<String>) -> Invalid {
        Invalid { kind: self.kind, object: self.object.clone(), message: message.into() }
    }

    fn object_ref(&self, meta: &ObjectMeta) -> Result<ObjectRef, Invalid> {
        let name =
            meta.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| self.invalid("metadata.name is missing"))?;
        Ok(ObjectRef::new(meta.namespace.as_deref().unwrap_or("default"), name))
    }

    fn port(&self, field: &str, value: i64) -> Result<u16, Invalid> {
        u16::try_from(value)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| self.invalid(format!("{field}: {value} is not a port (1-65535)")))
    }

    fn ip(&self, field: &str, value: &str) -> Result<IpAddr, Invalid> {
        value.parse().map_err(|_| self.invalid(format!("{field}: {value:?} is not an IP address")))
    }

    fn weight(&self, field: &str, value: i64) -> Result<u32, Invalid> {
        u32::try_from(value).map_err(|_| self.invalid(format!("{field}: weight {value} must be 0 or more")))
    }
}

fn protocol(value: Option<&str>) -> model::Protocol {
    match value {
        Some("UDP") => model::Protocol::Udp,
        Some("SCTP") => model::Protocol::Sctp,
        _ => model::Protocol::Tcp,
    }
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Parses Linkerd's opaque-ports list: "3306,5432" or ranges "4000-4002".
fn opaque_ports(ctx: &Ctx, value: &str) -> Result<Vec<u16>, Invalid> {
    let mut ports = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || ctx.invalid(format!("{OPAQUE_PORTS_ANNOTATION}: {part:?} is not a port or port range"));
        let (low, high) = part.split_once('-').unwrap_or((part, part));
        let low: u16 = low.trim().parse().map_err(|_| bad())?;
        let high: u16 = high.trim().parse().map_err(|_| bad())?;
        if low == 0 || high < low || usize::from(high - low) > 1024 {
            return Err(bad());
        }
        ports.extend(low..=high);
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

pub fn service(svc: &core::Service) -> Result<model::Service, Invalid> {
    let ctx = Ctx::new(Kind::Service, &svc.metadata);
    let meta = ctx.object_ref(&svc.metadata)?;
    let spec = svc.spec.clone().unwrap_or_default();
    let mut raw_ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if raw_ips.is_empty() {
        raw_ips.extend(spec.cluster_ip.clone());
    }
    let headless = raw_ips.iter().any(|ip| ip == "None");
    let cluster_ips = raw_ips
        .iter()
        .filter(|ip| *ip != "None" && !ip.is_empty())
        .map(|ip| ctx.ip("spec.clusterIPs", ip))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = spec
        .ports
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let port = ctx.port("spec.ports.port", i64::from(p.port))?;
            let target_port = match &p.target_port {
                None => model::TargetPort::Number(port),
                Some(IntOrString::Int(n)) => {
                    model::TargetPort::Number(ctx.port("spec.ports.targetPort", i64::from(*n))?)
                }
                Some(IntOrString::String(name)) => match name.parse::<u16>() {
                    Ok(n) if n != 0 => model::TargetPort::Number(n),
                    _ => model::TargetPort::Name(name.into()),
                },
            };
            Ok(model::ServicePort {
                name: p.name.as_deref().filter(|n| !n.is_empty()).map(Into::into),
                port,
                target_port,
                protocol: protocol(p.protocol.as_deref()),
                app_protocol: p.app_protocol.as_deref().map(Into::into),
            })
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    let topology_aware = matches!(annotation(&svc.metadata, TOPOLOGY_MODE_ANNOTATION), Some(m) if !m.eq_ignore_ascii_case("disabled"))
        || matches!(annotation(&svc.metadata, TOPOLOGY_HINTS_ANNOTATION), Some(m) if m.eq_ignore_ascii_case("auto"));
    let opaque_ports = match annotation(&svc.metadata, OPAQUE_PORTS_ANNOTATION) {
        Some(list) => opaque_ports(&ctx, list)?,
        None => Vec::new(),
    };
    let external_name = (spec.type_.as_deref() == Some("ExternalName")).then(|| spec.external_name.clone()).flatten();
    Ok(model::Service { meta, cluster_ips, headless, ports, external_name, topology_aware, opaque_ports })
}

/// Converts an EndpointSlice. FQDN slices (deprecated upstream) carry no IPs and are skipped.
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<Option<model::EndpointSlice>, Invalid> {
    let ctx = Ctx::new(Kind::EndpointSlice, &slice.metadata);
    let meta = ctx.object_ref(&slice.metadata)?;
    if slice.address_type == "FQDN" {
        return Ok(None);
    }
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .map(model::Name::new)
        .ok_or_else(|| ctx.invalid(format!("label {SERVICE_NAME_LABEL} is missing")))?;
    let ports = slice
        .ports
        .clone()
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.port.map(|port| (p, port)))
        .map(|(p, port)| {
            Ok(model::EndpointPort {
                name: p.name.as_deref().filter(|n| !n.is_empty()).map(Into::into),
                port: ctx.port("ports.port", i64::from(port))?,
                protocol: protocol(p.protocol.as_deref()),
                app_protocol: p.app_protocol.as_deref().map(Into::into),
            })
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    let endpoints = slice
        .endpoints
        .iter()
        .map(|e| {
            let conditions = e.conditions.clone().unwrap_or_default();
            // Per the API: a nil ready condition means ready; serving follows ready when unset.
            let ready = conditions.ready.unwrap_or(true);
            let pod = e.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| {
                Some(ObjectRef::new(r.namespace.as_deref().unwrap_or(&meta.namespace), r.name.as_deref()?))
            });
            Ok(model::Endpoint {
                addresses: e.addresses.iter().map(|a| ctx.ip("endpoints.addresses", a)).collect::<Result<_, _>>()?,
                ready,
                serving: conditions.serving.unwrap_or(ready),
                terminating: conditions.terminating.unwrap_or(false),
                hostname: e.hostname.as_deref().map(Into::into),
                node_name: e.node_name.as_deref().map(Into::into),
                zone: e.zone.as_deref().map(Into::into),
                hints_for_zones: e
                    .hints
                    .as_ref()
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|zones| zones.iter().map(|z| z.name.as_str().into()).collect())
                    .unwrap_or_default(),
                pod,
            })
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    Ok(Some(model::EndpointSlice { meta, service, ports, endpoints }))
}

pub fn pod(pod: &wire::Pod) -> Result<model::Pod, Invalid> {
    let ctx = Ctx::new(Kind::Pod, &pod.metadata);
    let meta = ctx.object_ref(&pod.metadata)?;
    let mut raw: Vec<&str> = pod.status.pod_ips.iter().flatten().map(|p| p.ip.as_str()).collect();
    if raw.is_empty() {
        raw.extend(pod.status.pod_ip.as_deref());
    }
    let ips = raw.into_iter().map(|ip| ctx.ip("status.podIPs", ip)).collect::<Result<_, _>>()?;
    let service_account = pod
        .spec
        .service_account_name
        .as_deref()
        .or(pod.spec.service_account.as_deref())
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default")
        .into();
    Ok(model::Pod {
        meta,
        ips,
        service_account,
        node_name: pod.spec.node_name.as_deref().map(Into::into),
        labels: pod.metadata.labels.clone().unwrap_or_default().into_iter().collect(),
    })
}

pub fn traffic_split(split: &wire::TrafficSplit) -> Result<model::TrafficSplit, Invalid> {
    let ctx = Ctx::new(Kind::TrafficSplit, &split.metadata);
    let meta = ctx.object_ref(&split.metadata)?;
    let backends = split
        .spec
        .backends
        .iter()
        .map(|b| {
            Ok(model::WeightedBackend {
                service: b.service.clone(),
                weight: ctx.weight("spec.backends.weight", b.weight)?,
            })
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    let matches = split
        .spec
        .matches
        .iter()
        .map(|m| route_ref(&ctx, &m.kind, &m.name, &[]))
        .collect::<Result<Vec<_>, Invalid>>()?;
    Ok(model::TrafficSplit { meta, service: split.spec.service.clone(), backends, matches })
}

fn route_ref(ctx: &Ctx, kind: &str, name: &str, matches: &[String]) -> Result<model::RouteRef, Invalid> {
    let kind = match kind {
        "HTTPRouteGroup" => Kind::HttpRouteGroup,
        "TCPRoute" => Kind::TcpRoute,
        other => return Err(ctx.invalid(format!("unsupported route kind {other:?} (HTTPRouteGroup or TCPRoute)"))),
    };
    Ok(model::RouteRef { kind, name: name.to_owned(), matches: matches.to_vec() })
}

pub fn traffic_target(target: &wire::TrafficTarget) -> Result<model::TrafficTarget, Invalid> {
    let ctx = Ctx::new(Kind::TrafficTarget, &target.metadata);
    let meta = ctx.object_ref(&target.metadata)?;
    let account = |field: &str, b: &wire::IdentityBinding| -> Result<model::ServiceAccountRef, Invalid> {
        if b.kind != "ServiceAccount" {
            return Err(ctx.invalid(format!("{field}.kind: {:?} is not ServiceAccount", b.kind)));
        }
        Ok(model::ServiceAccountRef {
            namespace: b.namespace.clone().unwrap_or_else(|| meta.namespace.to_string()),
            name: b.name.clone(),
            port: b.port.map(|p| ctx.port(&format!("{field}.port"), p)).transpose()?,
        })
    };
    let destination = account("spec.destination", &target.spec.destination)?;
    let sources = target.spec.sources.iter().map(|s| account("spec.sources", s)).collect::<Result<Vec<_>, _>>()?;
    let rules = target
        .spec
        .rules
        .iter()
        .map(|r| route_ref(&ctx, &r.kind, &r.name, &r.matches))
        .collect::<Result<Vec<_>, Invalid>>()?;
    Ok(model::TrafficTarget { meta, destination, rules, sources })
}

pub fn http_route_group(group: &wire::HttpRouteGroup) -> Result<model::HttpRouteGroup, Invalid> {
    let ctx = Ctx::new(Kind::HttpRouteGroup, &group.metadata);
    let meta = ctx.object_ref(&group.metadata)?;
    let matches = group
        .spec
        .matches
        .iter()
        .map(|m| model::HttpMatch {
            name: m.name.clone(),
            methods: m.methods.iter().map(|x| x.to_ascii_uppercase()).collect(),
            path_regex: m.path_regex.clone(),
            headers: m.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect::<BTreeMap<_, _>>(),
        })
        .collect();
    Ok(model::HttpRouteGroup { meta, matches })
}

pub fn tcp_route(route: &wire::TcpRoute) -> Result<model::TcpRoute, Invalid> {
    let ctx = Ctx::new(Kind::TcpRoute, &route.metadata);
    let meta = ctx.object_ref(&route.metadata)?;
    let ports =
        route.spec.matches.ports.iter().map(|p| ctx.port("spec.matches.ports", *p)).collect::<Result<_, _>>()?;
    Ok(model::TcpRoute { meta, ports })
}

pub fn http_route(route: &wire::HttpRoute) -> Result<model::HttpRoute, Invalid> {
    let ctx = Ctx::new(Kind::HttpRoute, &route.metadata);
    let meta = ctx.object_ref(&route.metadata)?;
    let parents = route
        .spec
        .parent_refs
        .iter()
        .map(|p| {
            Ok(model::ParentRef {
                group: p.group.clone().unwrap_or_else(|| "gateway.networking.k8s.io".to_owned()),
                kind: p.kind.clone().unwrap_or_else(|| "Gateway".to_owned()),
                namespace: p.namespace.clone().unwrap_or_else(|| meta.namespace.to_string()),
                name: p.name.clone(),
                port: p.port.map(|x| ctx.port("spec.parentRefs.port", x)).transpose()?,
            })
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    let rules = route
        .spec
        .rules
        .iter()
        .map(|rule| {
            let matches = rule
                .matches
                .iter()
                .map(|m| {
                    let path = match &m.path {
                        None => None,
                        Some(p) => {
                            let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
                            Some(match p.type_.as_deref().unwrap_or("PathPrefix") {
                                "Exact" => model::PathMatch::Exact(value),
                                "PathPrefix" => model::PathMatch::Prefix(value),
                                "RegularExpression" => model::PathMatch::Regex(value),
                                other => return Err(ctx.invalid(format!("unsupported path match type {other:?}"))),
                            })
                        }
                    };
                    let headers = m
                        .headers
                        .iter()
                        .map(|h| {
                            let regex = match h.type_.as_deref().unwrap_or("Exact") {
                                "Exact" => false,
                                "RegularExpression" => true,
                                other => return Err(ctx.invalid(format!("unsupported header match type {other:?}"))),
                            };
                            Ok(model::HeaderMatch { name: h.name.to_ascii_lowercase(), value: h.value.clone(), regex })
                        })
                        .collect::<Result<Vec<_>, Invalid>>()?;
                    Ok(model::HttpRouteMatch { path, method: m.method.clone(), headers })
                })
                .collect::<Result<Vec<_>, Invalid>>()?;
            let backends = rule
                .backend_refs
                .iter()
                .filter(|b| {
                    b.kind.as_deref().unwrap_or("Service") == "Service" && b.group.as_deref().unwrap_or("").is_empty()
                })
                .map(|b| {
                    Ok(model::BackendRef {
                        namespace: b.namespace.clone().unwrap_or_else(|| meta.namespace.to_string()),
                        name: b.name.clone(),
                        port: b.port.map(|p| ctx.port("backendRefs.port", p)).transpose()?,
                        weight: ctx.weight("backendRefs.weight", b.weight.unwrap_or(1))?,
                    })
                })
                .collect::<Result<Vec<_>, Invalid>>()?;
            let timeout = |field: &str, value: &Option<String>| -> Result<Option<u64>, Invalid> {
                value
                    .as_deref()
                    .map(|v| {
                        gateway_duration_ms(v).ok_or_else(|| ctx.invalid(format!("{field}: {v:?} is not a duration")))
                    })
                    .transpose()
            };
            let timeouts = rule.timeouts.as_ref();
            let retry = rule
                .retry
                .as_ref()
                .map(|r| -> Result<model::RouteRetry, Invalid> {
                    let codes = r
                        .codes
                        .iter()
                        .map(|&code| match u16::try_from(code) {
                            Ok(code @ 400..=599) => Ok(code),
                            _ => Err(ctx.invalid(format!("retry.codes: {code} is not a status from 400 to 599"))),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let attempts = r
                        .attempts
                        .map(|n| {
                            u32::try_from(n).map_err(|_| ctx.invalid(format!("retry.attempts: {n} is not a count")))
                        })
                        .transpose()?;
                    Ok(model::RouteRetry { codes, attempts, backoff_ms: timeout("retry.backoff", &r.backoff)? })
                })
                .transpose()?;
            Ok(model::HttpRouteRule {
                matches,
                backends,
                request_timeout_ms: timeout("timeouts.request", &timeouts.and_then(|t| t.request.clone()))?,
                backend_request_timeout_ms: timeout(
                    "timeouts.backendRequest",
                    &timeouts.and_then(|t| t.backend_request.clone()),
                )?,
                retry,
            })
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    Ok(model::HttpRoute { meta, parents, hostnames: route.spec.hostnames.clone(), rules })
}

/// Parses a Gateway API duration (GEP-2257): one to four `<number><unit>` parts, units h, m, s, ms.
pub fn gateway_duration_ms(value: &str) -> Option<u64> {
    let mut rest = value;
    let mut total: u64 = 0;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).filter(|&n| n > 0 && n <= 5)?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total += n * unit_ms;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

/// The issuer Secret: `tls.crt`, `tls.key` and optionally `ca.crt`, from `data` or `stringData`.
pub fn identity_issuer(secret: &core::Secret) -> Result<model::IdentityIssuer, Invalid> {
    let ctx = Ctx::new(Kind::IdentityIssuer, &secret.metadata);
    let meta = ctx.object_ref(&secret.metadata)?;
    let field = |key: &str| -> Result<Option<String>, Invalid> {
        if let Some(value) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
            return Ok(Some(value.clone()));
        }
        match secret.data.as_ref().and_then(|d| d.get(key)) {
            Some(bytes) => String::from_utf8(bytes.0.clone())
                .map(Some)
                .map_err(|_| ctx.invalid(format!("data[{key:?}] is not PEM text"))),
            None => Ok(None),
        }
    };
    let certificate_pem = field("tls.crt")?.ok_or_else(|| ctx.invalid("tls.crt is missing"))?;
    let private_key_pem = field("tls.key")?.ok_or_else(|| ctx.invalid("tls.key is missing"))?;
    Ok(model::IdentityIssuer { meta, certificate_pem, private_key_pem, ca_pem: field("ca.crt")? })
}

/// The trust-roots ConfigMap, key `ca-bundle.crt`.
pub fn trust_roots(config_map: &core::ConfigMap) -> Result<model::TrustRoots, Invalid> {
    let ctx = Ctx::new(Kind::TrustRoots, &config_map.metadata);
    let meta = ctx.object_ref(&config_map.metadata)?;
    let pem = config_map
        .data
        .as_ref()
        .and_then(|d| d.get("ca-bundle.crt"))
        .cloned()
        .ok_or_else(|| ctx.invalid("data[\"ca-bundle.crt\"] is missing"))?;
    Ok(model::TrustRoots { meta, pem })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).expect("valid test object")
    }

    #[test]
    fn services_keep_ips_ports_and_annotations() {
        let svc: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "api", "namespace": "shop", "annotations": {
                "config.linkerd.io/opaque-ports": "5432, 4000-4002",
                "service.kubernetes.io/topology-mode": "Auto"}},
            "spec": {"clusterIP": "10.0.0.5", "clusterIPs": ["10.0.0.5", "fd00::5"],
                "ports": [{"name": "http", "port": 80, "targetPort": "web"}, {"port": 5432, "targetPort": 15432}]}
        }));
        let svc = service(&svc).expect("converts");
        assert_eq!(svc.meta, ObjectRef::new("shop", "api"));
        assert_eq!(svc.cluster_ips, ["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        assert!(!svc.headless && svc.topology_aware);
        assert_eq!(svc.opaque_ports, [4000, 4001, 4002, 5432]);
        assert_eq!(svc.ports[0].target_port, model::TargetPort::Name("web".into()));
        assert_eq!(svc.ports[1].target_port, model::TargetPort::Number(15432));
    }

    #[test]
    fn headless_services_have_no_ips() {
        let svc: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop"}, "spec": {"clusterIP": "None"}}));
        let svc = service(&svc).expect("converts");
        assert!(svc.headless && svc.cluster_ips.is_empty());
    }

    #[test]
    fn bad_fields_are_reported_with_the_object() {
        let svc: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "x", "namespace": "n"}, "spec": {"clusterIP": "10.0.0.300"}}));
        let err = service(&svc).expect_err("bad ip").to_string();
        assert!(err.contains("Service n/x") && err.contains("10.0.0.300"), "{err}");
        let svc: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "x", "namespace": "n"}, "spec": {"ports": [{"port": 70000}]}}));
        assert!(service(&svc).is_err());
    }

    #[test]
    fn endpoint_slices_follow_api_condition_defaults() {
        let slice: discovery::EndpointSlice = from_json(serde_json::json!({
            "metadata": {"name": "api-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "nodeName": "n1", "zone": "z1",
                 "hints": {"forZones": [{"name": "z1"}]},
                 "targetRef": {"kind": "Pod", "name": "api-1", "namespace": "shop"}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "terminating": true}}
            ]
        }));
        let slice = endpoint_slice(&slice).expect("converts").expect("not FQDN");
        assert_eq!(slice.service, "api");
        assert!(slice.endpoints[0].ready && slice.endpoints[0].serving);
        assert_eq!(slice.endpoints[0].hints_for_zones, ["z1"]);
        assert_eq!(slice.endpoints[0].pod, Some(ObjectRef::new("shop", "api-1")));
        assert!(!slice.endpoints[1].ready && !slice.endpoints[1].serving && slice.endpoints[1].terminating);
    }

    #[test]
    fn pods_keep_only_identity_fields() {
        let pod: wire::Pod = from_json(serde_json::json!({
            "metadata": {"name": "api-1", "namespace": "shop", "labels": {"app": "api"}},
            "spec": {"serviceAccountName": "api-sa", "nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"podIP": "10.1.0.1", "podIPs": [{"ip": "10.1.0.1"}, {"ip": "fd00::1"}], "phase": "Running"}
        }));
        let pod = super::pod(&pod).expect("converts");
        assert_eq!(pod.service_account, "api-sa");
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.labels.get("app"), Some("api"));
    }

    #[test]
    fn http_routes_apply_gateway_defaults() {
        let route: wire::HttpRoute = from_json(serde_json::json!({
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "core", "kind": "Service", "name": "api", "port": 80}],
                "rules": [{"matches": [{"path": {"value": "/v2"}, "headers": [{"name": "X-Canary", "value": "1"}]}],
                           "backendRefs": [{"name": "api-v2", "port": 80, "weight": 10}, {"name": "api", "port": 80}],
                           "timeouts": {"request": "1m30s", "backendRequest": "500ms"}}]}
        }));
        let route = http_route(&route).expect("converts");
        let rule = &route.rules[0];
        assert_eq!(rule.matches[0].path, Some(model::PathMatch::Prefix("/v2".into())));
        assert_eq!(rule.matches[0].headers[0].name, "x-canary");
        assert_eq!(rule.backends[1].weight, 1, "weight defaults to 1");
        assert_eq!(rule.request_timeout_ms, Some(90_000));
        assert_eq!(rule.backend_request_timeout_ms, Some(500));
    }

    #[test]
    fn http_route_retries_follow_gep_1731() {
        let with_retry = |retry: serde_json::Value| -> wire::HttpRoute {
            from_json(serde_json::json!({
                "metadata": {"name": "r", "namespace": "shop"},
                "spec": {"rules": [{"backendRefs": [{"name": "api", "port": 80}], "retry": retry}]}
            }))
        };
        let route = http_route(&with_retry(serde_json::json!({"codes": [500, 503], "attempts": 3, "backoff": "20ms"})))
            .expect("converts");
        assert_eq!(
            route.rules[0].retry,
            Some(model::RouteRetry { codes: vec![500, 503], attempts: Some(3), backoff_ms: Some(20) })
        );
        let bare = http_route(&with_retry(serde_json::json!({}))).expect("converts");
        assert_eq!(bare.rules[0].retry, Some(model::RouteRetry::default()), "an empty retry still marks the rule");
        for bad in [
            serde_json::json!({"codes": [200]}),
            serde_json::json!({"codes": [600]}),
            serde_json::json!({"attempts": -1}),
            serde_json::json!({"backoff": "soon"}),
        ] {
            let err = http_route(&with_retry(bad.clone())).expect_err("refused");
            assert!(err.to_string().contains("retry."), "{bad}: {err}");
        }
    }

    #[test]
    fn gateway_durations_follow_gep_2257() {
        assert_eq!(gateway_duration_ms("1h"), Some(3_600_000));
        assert_eq!(gateway_duration_ms("2m5s250ms"), Some(125_250));
        assert_eq!(gateway_duration_ms("0s"), Some(0));
        for bad in ["", "1", "1.5s", "1d", "123456s", "1s1s1s1s1s"] {
            assert_eq!(gateway_duration_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn traffic_targets_require_service_accounts() {
        let target: wire::TrafficTarget = from_json(serde_json::json!({
            "metadata": {"name": "t", "namespace": "shop"},
            "spec": {"destination": {"kind": "ServiceAccount", "name": "api"},
                     "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes", "matches": ["read"]}],
                     "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "shop"}]}
        }));
        let target = traffic_target(&target).expect("converts");
        assert_eq!(target.destination.namespace, "shop");
        assert_eq!(target.rules[0].matches, ["read"]);
        let bad: wire::TrafficTarget = from_json(serde_json::json!({
            "metadata": {"name": "t", "namespace": "shop"},
            "spec": {"destination": {"kind": "Group", "name": "api"}}
        }));
        assert!(traffic_target(&bad).is_err());
    }

    #[test]
    fn issuer_secret_needs_certificate_and_key() {
        let secret: core::Secret = from_json(serde_json::json!({
            "metadata": {"name": "linkerd-identity-issuer", "namespace": "linkerd"},
            "data": {"tls.crt": "Q0VSVA==", "tls.key": "S0VZ"}
        }));
        let issuer = identity_issuer(&secret).expect("converts");
        assert_eq!((issuer.certificate_pem.as_str(), issuer.private_key_pem.as_str()), ("CERT", "KEY"));
        let secret: core::Secret = from_json(serde_json::json!({
            "metadata": {"name": "linkerd-identity-issuer", "namespace": "linkerd"}, "data": {"tls.crt": "Q0VSVA=="}
        }));
        assert!(identity_issuer(&secret).unwrap_err().to_string().contains("tls.key"));
    }
}
