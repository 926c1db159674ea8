//! What a mesh name answers: a pure function of the question and the snapshot, no I/O.
//!
//! Names under `svc.<cluster domain>` are ours: a service's ClusterIPs (or, headless, its ready
//! endpoints), per-endpoint names of headless services, and SRV records for ports. A name that
//! no source has is NXDOMAIN, but only when every source that could have it has listed its
//! services; otherwise SERVFAIL (the cache cannot say), never a false NXDOMAIN. A name that
//! exists with no ready endpoint is NOERROR with no records.

use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::discovery::{self, Lookup, Resolved, ResolvedEndpoint, Settings};
use crate::model::Protocol;
use crate::store::Snapshot;

/// How the mesh zone is answered.
#[derive(Debug, Clone)]
pub struct Zone {
    pub settings: Settings,
    /// TTL of answers and the SOA minimum (negative caching).
    pub ttl: u32,
    /// Answer `svc.ns` and `svc.ns.svc` when such a service exists.
    pub short_names: bool,
}

/// The decision for one question.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Answered from the snapshot.
    Answer(Box<Answer>),
    /// Not a mesh name: for the upstream resolvers (or refused without any).
    Forward,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    /// Addresses of SRV targets.
    pub additionals: Vec<Record>,
    /// The zone's SOA, for negative answers (NXDOMAIN and NOERROR without records).
    pub authority: Option<Box<Record>>,
}

impl Zone {
    fn domain(&self) -> &str {
        &self.settings.cluster_domain
    }

    /// The decision for `qname` (as asked) and `qtype`.
    pub fn decide(&self, snapshot: &Snapshot, qname: &Name, qtype: RecordType) -> Decision {
        let lower = qname.to_lowercase().to_ascii();
        let name = lower.trim_end_matches('.');
        let domain = self.domain();
        let in_zone = if name == domain { Some("") } else { name.strip_suffix(&format!(".{domain}")) };
        let Some(rest) = in_zone else {
            return self.short_name(snapshot, qname, qtype, name);
        };
        let Some(under_svc) = rest.strip_suffix(".svc") else {
            // The apex, `svc.<domain>`, and other names in the zone.
            return Decision::Answer(Box::new(match rest {
                "" if qtype == RecordType::SOA => self.positive(vec![self.soa()]),
                "" | "svc" => self.negative(ResponseCode::NoError),
                _ => self.negative(ResponseCode::NXDomain),
            }));
        };
        let labels: Vec<&str> = under_svc.split('.').collect();
        Decision::Answer(Box::new(match labels.as_slice() {
            // A namespace: it may exist; never claim it does not.
            [_namespace] => self.negative(ResponseCode::NoError),
            [service, namespace] => self.service(snapshot, qname, qtype, service, namespace),
            [port, protocol, service, namespace] if port.starts_with('_') && protocol.starts_with('_') => {
                self.port(snapshot, qname, qtype, &port[1..], &protocol[1..], service, namespace)
            }
            [host, service, namespace] => self.endpoint_name(snapshot, qname, qtype, host, service, namespace),
            _ => self.negative(ResponseCode::NXDomain),
        }))
    }

    /// `svc.ns` and `svc.ns.svc`: answered when the service exists; SERVFAIL when a source that
    /// has not listed its services could hold it and the namespace is one the cache knows (an
    /// upstream resolver would answer a false NXDOMAIN); otherwise the name is someone else's
    /// and goes upstream.
    fn short_name(&self, snapshot: &Snapshot, qname: &Name, qtype: RecordType, name: &str) -> Decision {
        if !self.short_names {
            return Decision::Forward;
        }
        let labels: Vec<&str> = name.split('.').collect();
        let (service, namespace) = match labels.as_slice() {
            [service, namespace] | [service, namespace, "svc"] => (*service, *namespace),
            _ => return Decision::Forward,
        };
        match self.lookup(snapshot, service, namespace) {
            Lookup::Found(resolved) => Decision::Answer(Box::new(self.addresses(qname, qtype, &resolved))),
            Lookup::Unknown { .. } if namespace_known(snapshot, namespace) => {
                Decision::Answer(Box::new(self.negative(ResponseCode::ServFail)))
            }
            Lookup::NotFound | Lookup::Unknown { .. } => Decision::Forward,
        }
    }

    fn lookup(&self, snapshot: &Snapshot, service: &str, namespace: &str) -> Lookup {
        discovery::resolve_name(snapshot, &self.settings, &format!("{service}.{namespace}"))
    }

    /// The service, or the negative answer for a name under it: NXDOMAIN when the cache knows
    /// it does not exist, SERVFAIL when it cannot know.
    fn found(&self, snapshot: &Snapshot, service: &str, ns: &str) -> Result<Resolved, Answer> {
        match self.lookup(snapshot, service, ns) {
            Lookup::Found(resolved) => Ok(resolved),
            Lookup::NotFound => Err(self.negative(ResponseCode::NXDomain)),
            Lookup::Unknown { .. } => Err(self.negative(ResponseCode::ServFail)),
        }
    }

    fn service(&self, snapshot: &Snapshot, qname: &Name, qtype: RecordType, service: &str, ns: &str) -> Answer {
        match self.found(snapshot, service, ns) {
            Ok(resolved) if qtype == RecordType::SRV => self.srv(qname, &resolved, |_| true),
            Ok(resolved) => self.addresses(qname, qtype, &resolved),
            Err(negative) => negative,
        }
    }

    /// `_port._protocol.svc.ns.svc.<domain>`.
    #[allow(clippy::too_many_arguments)]
    fn port(
        &self,
        snapshot: &Snapshot,
        qname: &Name,
        qtype: RecordType,
        port: &str,
        protocol: &str,
        service: &str,
        ns: &str,
    ) -> Answer {
        let resolved = match self.found(snapshot, service, ns) {
            Ok(resolved) => resolved,
            Err(negative) => return negative,
        };
        let matches =
            |p: &crate::model::ServicePort| p.name.as_deref() == Some(port) && protocol_name(p.protocol) == protocol;
        if !resolved.ports.iter().any(matches) {
            return self.negative(ResponseCode::NXDomain);
        }
        if qtype != RecordType::SRV && qtype != RecordType::ANY {
            return self.negative(ResponseCode::NoError);
        }
        self.srv(qname, &resolved, matches)
    }

    /// `<hostname or dashed IP>.svc.ns.svc.<domain>`: one endpoint of a headless service.
    fn endpoint_name(
        &self,
        snapshot: &Snapshot,
        qname: &Name,
        qtype: RecordType,
        host: &str,
        service: &str,
        ns: &str,
    ) -> Answer {
        let resolved = match self.found(snapshot, service, ns) {
            Ok(resolved) => resolved,
            Err(negative) => return negative,
        };
        let Some(endpoints) = resolved.endpoints.as_ref().filter(|_| resolved.headless) else {
            return self.negative(if resolved.headless { ResponseCode::ServFail } else { ResponseCode::NXDomain });
        };
        let addresses: Vec<IpAddr> = endpoints
            .iter()
            .filter(|e| endpoint_label(e).as_deref() == Some(host))
            .flat_map(|e| e.addresses.iter().copied())
            .collect();
        if addresses.is_empty() {
            return self.negative(ResponseCode::NXDomain);
        }
        self.address_records(qname, qtype, &addresses)
    }

    /// A and AAAA of a service: its ClusterIPs, or a headless service's ready endpoints.
    fn addresses(&self, qname: &Name, qtype: RecordType, resolved: &Resolved) -> Answer {
        if !resolved.headless {
            return self.address_records(qname, qtype, &resolved.cluster_ips);
        }
        let Some(endpoints) = &resolved.endpoints else {
            return self.negative(ResponseCode::ServFail);
        };
        let ready: Vec<IpAddr> =
            endpoints.iter().filter(|e| e.ready).flat_map(|e| e.addresses.iter().copied()).collect();
        self.address_records(qname, qtype, &ready)
    }

    fn address_records(&self, qname: &Name, qtype: RecordType, addresses: &[IpAddr]) -> Answer {
        let records: Vec<Record> = addresses
            .iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|data| Record::from_rdata(qname.clone(), self.ttl, data))
            .collect();
        self.positive(records)
    }

    /// SRV records for the service's ports that `wanted` accepts: one per port pointing at
    /// the service name, or for a headless service one per ready endpoint and port, with the
    /// endpoints' addresses as additional records.
    fn srv(&self, qname: &Name, resolved: &Resolved, wanted: impl Fn(&crate::model::ServicePort) -> bool) -> Answer {
        let fqdn = |host: Option<&str>| {
            let text = match host {
                Some(host) => format!("{host}.{}.{}.svc.{}.", resolved.name, resolved.namespace, self.domain()),
                None => format!("{}.{}.svc.{}.", resolved.name, resolved.namespace, self.domain()),
            };
            Name::from_ascii(&text).ok()
        };
        let mut answer = self.positive(Vec::new());
        for port in resolved.ports.iter().filter(|p| wanted(p)) {
            if !resolved.headless {
                if let Some(target) = fqdn(None) {
                    let data = RData::SRV(SRV::new(0, 100, port.port, target));
                    answer.answers.push(Record::from_rdata(qname.clone(), self.ttl, data));
                }
                continue;
            }
            let Some(endpoints) = &resolved.endpoints else {
                return self.negative(ResponseCode::ServFail);
            };
            for endpoint in endpoints.iter().filter(|e| e.ready) {
                let (Some(label), Some(target_port)) = (endpoint_label(endpoint), endpoint_port(endpoint, port)) else {
                    continue;
                };
                let Some(target) = fqdn(Some(&label)) else { continue };
                let data = RData::SRV(SRV::new(0, 100, target_port, target.clone()));
                answer.answers.push(Record::from_rdata(qname.clone(), self.ttl, data));
                answer.additionals.extend(self.address_records(&target, RecordType::ANY, &endpoint.addresses).answers);
            }
        }
        answer.authority = answer.answers.is_empty().then(|| Box::new(self.soa()));
        answer
    }

    fn positive(&self, answers: Vec<Record>) -> Answer {
        let authority = answers.is_empty().then(|| Box::new(self.soa()));
        Answer { code: ResponseCode::NoError, answers, additionals: Vec::new(), authority }
    }

    fn negative(&self, code: ResponseCode) -> Answer {
        let authority = (code != ResponseCode::ServFail).then(|| Box::new(self.soa()));
        Answer { code, answers: Vec::new(), additionals: Vec::new(), authority }
    }

    /// The zone's SOA; its minimum (and TTL) is the negative-caching time.
    pub fn soa(&self) -> Record {
        let zone = Name::from_ascii(format!("{}.", self.domain())).unwrap_or_else(|_| Name::root());
        let host =
            |label: &str| Name::from_ascii(format!("{label}.{}.", self.domain())).unwrap_or_else(|_| Name::root());
        let soa = SOA::new(host("ns.dns"), host("hostmaster"), 1, 7200, 1800, 86400, self.ttl);
        Record::from_rdata(zone, self.ttl, RData::SOA(soa))
    }
}

/// The DNS label of an endpoint: its hostname, or its first address with dashes (10-0-0-1).
fn endpoint_label(endpoint: &ResolvedEndpoint) -> Option<String> {
    if let Some(hostname) = &endpoint.hostname {
        return Some(hostname.to_ascii_lowercase());
    }
    endpoint.addresses.first().map(|ip| ip.to_string().replace(['.', ':'], "-"))
}

/// The endpoint's port for a service port: by name, else the service's numeric target.
fn endpoint_port(endpoint: &ResolvedEndpoint, port: &crate::model::ServicePort) -> Option<u16> {
    match &port.name {
        Some(name) => endpoint.ports.iter().find(|p| p.name.as_deref() == Some(name.as_str())).map(|p| p.port),
        None => endpoint.ports.first().map(|p| p.port),
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// Whether any source lists a service in `namespace`.
fn namespace_known(snapshot: &Snapshot, namespace: &str) -> bool {
    let first = crate::model::ObjectRef::new(namespace, "");
    snapshot.sources().any(|(source, _)| {
        snapshot
            .objects(source, crate::model::Kind::Service)
            .is_some_and(|services| services.range(&first..).next().is_some_and(|(key, _)| key.namespace == namespace))
    })
}

#[cfg(test)]
mod tests;
