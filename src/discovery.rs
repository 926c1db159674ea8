//! Lookups over a snapshot: which service a name or address means, its endpoints, and the
//! identities behind them. No I/O.
//!
//! Architecture Invariant: a lookup that depends on a kind that has never been listed in a
//! source answers `Unknown`, never `NotFound` or "no endpoints".

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::config::{Config, LinkMode};
use crate::model::{Endpoint, EndpointPort, Kind, Name, Object, ObjectRef, ServicePort, SourceId};
use crate::store::Snapshot;

/// Labels that mark a pod as meshed (its identity can be asked for with mTLS).
const MESHED_LABELS: [&str; 2] = ["linkerd.io/control-plane-ns", "meshkeep.io/meshed"];

/// What discovery needs from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub cluster_domain: String,
    pub link_modes: BTreeMap<String, LinkMode>,
    pub trust_domain: String,
    pub control_plane_namespace: String,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            cluster_domain: config.discovery.cluster_domain.trim_end_matches('.').to_ascii_lowercase(),
            link_modes: config.upstream.links.iter().map(|(name, link)| (name.to_string(), link.mode)).collect(),
            trust_domain: config.identity.trust_domain.clone(),
            control_plane_namespace: config.identity.control_plane_namespace.clone(),
        }
    }

    /// Linkerd's identity name for a service account.
    pub fn identity_name(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "{service_account}.{namespace}.serviceaccount.identity.{}.{}",
            self.control_plane_namespace, self.trust_domain
        )
    }
}

/// The answer to a lookup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Lookup {
    /// A source that could define it has never completed a sync.
    Unknown {
        reason: String,
    },
    /// No known source has it.
    NotFound,
    Found(Resolved),
}

/// A resolved service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub namespace: String,
    /// The name as served (for a mirrored service, `<service>-<link>`).
    pub name: String,
    /// The fully qualified DNS name.
    pub fqdn: String,
    pub backings: Vec<Backing>,
    pub cluster_ips: Vec<IpAddr>,
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    /// `None` when the endpoints of some backing source are unknown.
    pub endpoints: Option<Vec<ResolvedEndpoint>>,
}

impl Resolved {
    /// `name.ns.svc.<domain>:port`: how the proxy names the service on a port (the metrics
    /// label, the balancer's and the retry budget's key).
    pub fn authority(&self, port: u16) -> String {
        format!("{}:{port}", self.fqdn)
    }
}

/// Which source's service backs a resolved name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backing {
    pub source: String,
    pub service: ObjectRef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedEndpoint {
    pub source: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<EndpointPort>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub hostname: Option<String>,
    pub hints_for_zones: Vec<String>,
    pub pod: Option<ObjectRef>,
    /// The workload's identity name when it is meshed; `None` means plain TCP.
    pub identity: Option<String>,
}

/// Splits a mesh name into service and namespace: `svc.ns`, `svc.ns.svc` or
/// `svc.ns.svc.<cluster domain>` (case-insensitive, trailing dot allowed).
pub fn parse_name(name: &str, cluster_domain: &str) -> Option<(String, String)> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let rest =
        name.strip_suffix(&format!(".svc.{cluster_domain}")).or_else(|| name.strip_suffix(".svc")).unwrap_or(&name);
    let (service, namespace) = rest.split_once('.')?;
    let label_ok =
        |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (label_ok(service) && label_ok(namespace)).then(|| (service.to_owned(), namespace.to_owned()))
}

/// Looks up a mesh name.
pub fn resolve_name(snapshot: &Snapshot, settings: &Settings, name: &str) -> Lookup {
    let Some((service, namespace)) = parse_name(name, &settings.cluster_domain) else {
        return Lookup::NotFound;
    };
    let mut unknown = Vec::new();
    let mut found = Vec::new();
    let mut look = |source: &SourceId, service_name: &str, found: &mut Vec<(SourceId, ObjectRef)>| match snapshot
        .objects(source, Kind::Service)
    {
        None => {
            if snapshot.source(source).is_some() || source != &SourceId::Local {
                unknown.push(format!("{source} has not listed services yet"));
            }
        }
        Some(services) => {
            let key = ObjectRef::new(&namespace, service_name);
            if services.contains_key(&key) {
                found.push((source.clone(), key));
            }
        }
    };

    // Plain name: the local source and federated links.
    if snapshot.source(&SourceId::Local).is_some() {
        look(&SourceId::Local, &service, &mut found);
    }
    for (link, mode) in &settings.link_modes {
        if *mode == LinkMode::Federated {
            look(&SourceId::Link(link.clone()), &service, &mut found);
        }
    }
    // Mirrored name: `<service>-<link>` of a mirror-mode link.
    if found.is_empty() {
        for (link, mode) in &settings.link_modes {
            if *mode != LinkMode::Mirror {
                continue;
            }
            if let Some(base) = service.strip_suffix(&format!("-{link}")) {
                look(&SourceId::Link(link.clone()), base, &mut found);
            }
        }
    }
    // Plain-name fallback to mirror-mode links, in link name order (first one wins).
    if found.is_empty() {
        for (link, mode) in &settings.link_modes {
            if *mode == LinkMode::Mirror {
                let mut here = Vec::new();
                look(&SourceId::Link(link.clone()), &service, &mut here);
                if let Some(first) = here.into_iter().next() {
                    found.push(first);
                    break;
                }
            }
        }
    }
    if found.is_empty() {
        return if unknown.is_empty() { Lookup::NotFound } else { Lookup::Unknown { reason: unknown.join("; ") } };
    }
    Lookup::Found(assemble(snapshot, settings, &namespace, &service, &found, None))
}

/// Looks up an address: a service's cluster IP and port, or an endpoint's IP.
pub fn resolve_addr(snapshot: &Snapshot, settings: &Settings, addr: SocketAddr) -> Lookup {
    let mut unknown = Vec::new();
    for (source, view) in snapshot.sources() {
        let Some(services) = view.objects(Kind::Service) else {
            unknown.push(format!("{source} has not listed services yet"));
            continue;
        };
        for key in view.index().services_with_ip(addr.ip()) {
            let Some(Object::Service(svc)) = services.get(key) else { continue };
            if addr.port() == 0 || svc.ports.iter().any(|p| p.port == addr.port()) {
                let name = served_name(settings, source, &svc.meta.name);
                let found = [(source.clone(), svc.meta.clone())];
                return Lookup::Found(assemble(snapshot, settings, &svc.meta.namespace, &name, &found, None));
            }
        }
    }
    for (source, view) in snapshot.sources() {
        let Some(slices) = view.objects(Kind::EndpointSlice) else {
            unknown.push(format!("{source} has not listed endpoints yet"));
            continue;
        };
        let slice = view.index().slice_with_ip(addr.ip()).and_then(|key| slices.get(key));
        if let Some(Object::EndpointSlice(slice)) = slice {
            let name = served_name(settings, source, &slice.service);
            let service = ObjectRef::new(&slice.meta.namespace, &slice.service);
            let found = [(source.clone(), service)];
            return Lookup::Found(assemble(snapshot, settings, &slice.meta.namespace, &name, &found, Some(addr.ip())));
        }
    }
    if unknown.is_empty() { Lookup::NotFound } else { Lookup::Unknown { reason: unknown.join("; ") } }
}

/// The name a source's service is served under.
fn served_name(settings: &Settings, source: &SourceId, service: &str) -> String {
    match source.link() {
        Some(link) if settings.link_modes.get(link) == Some(&LinkMode::Mirror) => format!("{service}-{link}"),
        _ => service.to_owned(),
    }
}

fn assemble(
    snapshot: &Snapshot,
    settings: &Settings,
    namespace: &str,
    name: &str,
    found: &[(SourceId, ObjectRef)],
    only_ip: Option<IpAddr>,
) -> Resolved {
    let mut resolved = Resolved {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        fqdn: format!("{name}.{namespace}.svc.{}", settings.cluster_domain),
        backings: Vec::new(),
        cluster_ips: Vec::new(),
        headless: false,
        ports: Vec::new(),
        endpoints: Some(Vec::new()),
    };
    for (source, key) in found {
        resolved.backings.push(Backing { source: source.to_string(), service: key.clone() });
        if let Some(Object::Service(svc)) = snapshot.objects(source, Kind::Service).and_then(|s| s.get(key)) {
            for ip in &svc.cluster_ips {
                if !resolved.cluster_ips.contains(ip) {
                    resolved.cluster_ips.push(*ip);
                }
            }
            resolved.headless |= svc.headless;
            for port in &svc.ports {
                if !resolved.ports.iter().any(|p| p.port == port.port && p.protocol == port.protocol) {
                    resolved.ports.push(port.clone());
                }
            }
        }
        match endpoints(snapshot, settings, source, key) {
            Some(mut list) => {
                if let Some(ip) = only_ip {
                    list.retain(|e| e.addresses.contains(&ip));
                }
                if let Some(all) = resolved.endpoints.as_mut() {
                    all.extend(list);
                }
            }
            None => resolved.endpoints = None,
        }
    }
    resolved
}

/// A service's endpoints in one source, with identities; `None` when endpoints are unknown.
fn endpoints(
    snapshot: &Snapshot,
    settings: &Settings,
    source: &SourceId,
    service: &ObjectRef,
) -> Option<Vec<ResolvedEndpoint>> {
    let view = snapshot.source(source)?;
    let slices = view.objects(Kind::EndpointSlice)?;
    let pods = view.objects(Kind::Pod);
    let mut out = Vec::new();
    for key in view.index().slices_of(service) {
        let Some(Object::EndpointSlice(slice)) = slices.get(key) else { continue };
        for endpoint in &slice.endpoints {
            out.push(resolve_endpoint(settings, source, &slice.ports, endpoint, pods));
        }
    }
    Some(out)
}

fn resolve_endpoint(
    settings: &Settings,
    source: &SourceId,
    ports: &[EndpointPort],
    endpoint: &Endpoint,
    pods: Option<&crate::store::Objects>,
) -> ResolvedEndpoint {
    let pod = endpoint.pod.as_ref().and_then(|r| match pods?.get(r) {
        Some(Object::Pod(pod)) => Some(pod),
        _ => None,
    });
    let identity = pod
        .filter(|p| MESHED_LABELS.iter().any(|l| p.labels.get(l).is_some_and(|v| !v.is_empty() && v != "false")))
        .map(|p| settings.identity_name(&p.meta.namespace, &p.service_account));
    ResolvedEndpoint {
        source: source.to_string(),
        addresses: endpoint.addresses.clone(),
        ports: ports.to_vec(),
        ready: endpoint.ready,
        serving: endpoint.serving,
        terminating: endpoint.terminating,
        node: endpoint.node_name.as_ref().or_else(|| pod.and_then(|p| p.node_name.as_ref())).map(Name::to_string),
        zone: endpoint.zone.as_ref().map(Name::to_string),
        hostname: endpoint.hostname.as_ref().map(Name::to_string),
        hints_for_zones: endpoint.hints_for_zones.iter().map(Name::to_string).collect(),
        pod: endpoint.pod.clone(),
        identity,
    }
}

#[cfg(test)]
mod tests;
