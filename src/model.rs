//! Plain data for everything meshkeep learns from its sources: services, endpoints, workload
//! identities, routing and authorization policy, and the identity issuer. No I/O.
//!
//! Architecture Invariant: these types know nothing of Kubernetes client types; `upstream`
//! converts into them. They are stored with a non-self-describing encoding, so they use no
//! `skip_serializing_if`, `flatten` or `untagged`; a change to them bumps the store's schema.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A name, label or other short string of the synced objects. Most are under 24 bytes and are
/// held inline, without an allocation of their own: at tens of thousands of pods and endpoints
/// that is most of the store's memory (BENCHMARKS.md, "Idle memory"). Encoded like `String`.
pub type Name = compact_str::CompactString;

/// Where objects come from: the local manifest folder or a named upstream cluster link.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SourceId {
    Local,
    Link(String),
}

impl SourceId {
    /// The link name, for sources that are links.
    pub fn link(&self) -> Option<&str> {
        match self {
            SourceId::Local => None,
            SourceId::Link(name) => Some(name),
        }
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceId::Local => f.write_str("local"),
            SourceId::Link(name) => write!(f, "link/{name}"),
        }
    }
}

impl std::str::FromStr for SourceId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(SourceId::Local),
            _ => s
                .strip_prefix("link/")
                .filter(|name| !name.is_empty())
                .map(|name| SourceId::Link(name.to_owned()))
                .ok_or_else(|| format!("not a source: {s:?} (expected \"local\" or \"link/NAME\")")),
        }
    }
}

/// The kinds of object a source provides. Each kind of each source syncs independently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    TrafficSplit,
    TrafficTarget,
    HttpRouteGroup,
    TcpRoute,
    HttpRoute,
    IdentityIssuer,
    TrustRoots,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::TrafficSplit,
        Kind::TrafficTarget,
        Kind::HttpRouteGroup,
        Kind::TcpRoute,
        Kind::HttpRoute,
        Kind::IdentityIssuer,
        Kind::TrustRoots,
    ];

    /// A stable name, used in store keys, metrics and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::TrafficSplit => "TrafficSplit",
            Kind::TrafficTarget => "TrafficTarget",
            Kind::HttpRouteGroup => "HTTPRouteGroup",
            Kind::TcpRoute => "TCPRoute",
            Kind::HttpRoute => "HTTPRoute",
            Kind::IdentityIssuer => "IdentityIssuer",
            Kind::TrustRoots => "TrustRoots",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespaced name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: Name,
    pub name: Name,
}

impl ObjectRef {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        Self { namespace: Name::new(namespace), name: Name::new(name) }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One object of any kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    TrafficSplit(TrafficSplit),
    TrafficTarget(TrafficTarget),
    HttpRouteGroup(HttpRouteGroup),
    TcpRoute(TcpRoute),
    HttpRoute(HttpRoute),
    IdentityIssuer(IdentityIssuer),
    TrustRoots(TrustRoots),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::TrafficSplit(_) => Kind::TrafficSplit,
            Object::TrafficTarget(_) => Kind::TrafficTarget,
            Object::HttpRouteGroup(_) => Kind::HttpRouteGroup,
            Object::TcpRoute(_) => Kind::TcpRoute,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::IdentityIssuer(_) => Kind::IdentityIssuer,
            Object::TrustRoots(_) => Kind::TrustRoots,
        }
    }

    pub fn object_ref(&self) -> &ObjectRef {
        match self {
            Object::Service(o) => &o.meta,
            Object::EndpointSlice(o) => &o.meta,
            Object::Pod(o) => &o.meta,
            Object::TrafficSplit(o) => &o.meta,
            Object::TrafficTarget(o) => &o.meta,
            Object::HttpRouteGroup(o) => &o.meta,
            Object::TcpRoute(o) => &o.meta,
            Object::HttpRoute(o) => &o.meta,
            Object::IdentityIssuer(o) => &o.meta,
            Object::TrustRoots(o) => &o.meta,
        }
    }
}

/// A Service: a stable name and virtual IPs in front of endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub meta: ObjectRef,
    /// ClusterIPs (IPv4 and/or IPv6); empty for a headless service.
    pub cluster_ips: Vec<IpAddr>,
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    /// For `type: ExternalName`, the name it aliases.
    pub external_name: Option<String>,
    /// Topology-aware routing was asked for (`service.kubernetes.io/topology-mode: Auto` or
    /// the older `topology-aware-hints` annotation).
    pub topology_aware: bool,
    /// Ports whose traffic must not be protocol-detected (`config.linkerd.io/opaque-ports`).
    pub opaque_ports: Vec<u16>,
}

/// Layer-4 protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: Option<Name>,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
    pub app_protocol: Option<Name>,
}

/// Where a service port sends traffic on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPort {
    Number(u16),
    /// A named container port, resolved through the EndpointSlice's ports.
    Name(Name),
}

/// A slice of a service's endpoints (discovery.k8s.io/v1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSlice {
    pub meta: ObjectRef,
    /// The service this slice belongs to (label `kubernetes.io/service-name`).
    pub service: Name,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPort {
    pub name: Option<Name>,
    pub port: u16,
    pub protocol: Protocol,
    pub app_protocol: Option<Name>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// Conditions: ready (serving and not terminating), serving, terminating.
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub hostname: Option<Name>,
    pub node_name: Option<Name>,
    pub zone: Option<Name>,
    /// Topology hints: the zones that should consume this endpoint.
    pub hints_for_zones: Vec<Name>,
    /// The pod behind this endpoint, if its targetRef names one.
    pub pod: Option<ObjectRef>,
}

/// A pod, reduced to what identity and topology need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub meta: ObjectRef,
    pub ips: Vec<IpAddr>,
    pub service_account: Name,
    pub node_name: Option<Name>,
    pub labels: Labels,
}

/// Labels as a sorted list: most pods carry a handful, and a map node per pod would cost
/// hundreds of bytes each at 100,000 pods.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels(Vec<(Name, Name)>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|i| self.0[i].1.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl<K: Into<Name>, V: Into<Name>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut labels: Vec<(Name, Name)> = iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        labels.sort();
        labels.dedup_by(|a, b| a.0 == b.0);
        labels.shrink_to_fit();
        Self(labels)
    }
}

/// SMI TrafficSplit (split.smi-spec.io/v1alpha4): weights over backend services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSplit {
    pub meta: ObjectRef,
    /// The root service whose traffic is split.
    pub service: String,
    pub backends: Vec<WeightedBackend>,
    /// HTTPRouteGroup matches that select which requests this split applies to.
    pub matches: Vec<RouteRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightedBackend {
    pub service: String,
    pub weight: u32,
}

/// A reference to a route object and, optionally, named matches inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRef {
    pub kind: Kind,
    pub name: String,
    pub matches: Vec<String>,
}

/// SMI TrafficTarget (access.smi-spec.io/v1alpha3): which identities may reach a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficTarget {
    pub meta: ObjectRef,
    pub destination: ServiceAccountRef,
    pub rules: Vec<RouteRef>,
    pub sources: Vec<ServiceAccountRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
}

/// SMI HTTPRouteGroup (specs.smi-spec.io/v1alpha4): named HTTP matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRouteGroup {
    pub meta: ObjectRef,
    pub matches: Vec<HttpMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpMatch {
    pub name: String,
    /// Upper-case methods; `*` or empty means any.
    pub methods: Vec<String>,
    pub path_regex: Option<String>,
    /// Header name (lower case) to a regular expression its value must match.
    pub headers: BTreeMap<String, String>,
}

/// SMI TCPRoute (specs.smi-spec.io/v1alpha4): a set of ports; empty means all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRoute {
    pub meta: ObjectRef,
    pub ports: Vec<u16>,
}

/// Gateway API HTTPRoute (gateway.networking.k8s.io/v1), attached to Services for mesh routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRoute {
    pub meta: ObjectRef,
    pub parents: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// `Service` (mesh) or `Gateway`; group is "" for Service.
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRouteRule {
    /// Any one match selects the rule; no matches means "everything" (path prefix /).
    pub matches: Vec<HttpRouteMatch>,
    pub backends: Vec<BackendRef>,
    /// Whole-request timeout in milliseconds (`timeouts.request`).
    pub request_timeout_ms: Option<u64>,
    /// Per-try timeout in milliseconds (`timeouts.backendRequest`).
    pub backend_request_timeout_ms: Option<u64>,
    /// The rule's `retry`: its requests are retryable whatever their method.
    pub retry: Option<RouteRetry>,
}

/// Gateway API `HTTPRouteRule.retry` (GEP-1731, standard channel since v1.7).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRetry {
    /// Statuses that are retried; empty means every 5xx. Connection errors and per-try
    /// timeouts are always retried.
    pub codes: Vec<u16>,
    /// Retries on top of the first try; `None` keeps the service's `max_retries`.
    pub attempts: Option<u32>,
    /// The least time between tries, in milliseconds.
    pub backoff_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRouteMatch {
    pub path: Option<PathMatch>,
    pub method: Option<String>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// Lower-case header name.
    pub name: String,
    pub value: String,
    pub regex: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRef {
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
    pub weight: u32,
}

/// The identity issuer: certificate and key that sign workload certificates, and the trust
/// anchors they chain to (Linkerd's `linkerd-identity-issuer` Secret: tls.crt, tls.key, ca.crt).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityIssuer {
    pub meta: ObjectRef,
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub ca_pem: Option<String>,
}

impl fmt::Debug for IdentityIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("IdentityIssuer")
            .field("meta", &self.meta)
            .field("certificate_pem_bytes", &self.certificate_pem.len())
            .field("private_key_pem", &"<redacted>")
            .field("ca_pem_bytes", &self.ca_pem.as_ref().map(String::len))
            .finish()
    }
}

/// Trust anchors (Linkerd's `linkerd-identity-trust-roots` ConfigMap, key `ca-bundle.crt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRoots {
    pub meta: ObjectRef,
    pub pem: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ids_round_trip_through_text() {
        for id in [SourceId::Local, SourceId::Link("east".into())] {
            assert_eq!(id.to_string().parse::<SourceId>(), Ok(id));
        }
        assert!("link/".parse::<SourceId>().is_err());
        assert!("east".parse::<SourceId>().is_err());
    }

    #[test]
    fn kinds_have_unique_stable_names() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
        }
        let mut names: Vec<_> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), Kind::ALL.len());
    }

    #[test]
    fn issuer_debug_output_never_contains_the_key() {
        let issuer = IdentityIssuer {
            meta: ObjectRef::new("linkerd", "linkerd-identity-issuer"),
            certificate_pem: "CERT".into(),
            private_key_pem: "-----BEGIN PRIVATE KEY-----SECRET".into(),
            ca_pem: None,
        };
        let text = format!("{issuer:?}");
        assert!(!text.contains("SECRET"), "{text}");
    }
}
