//! Entry points for fuzzing: thin wrappers over the parsers that take bytes from clients, peers
//! and files, each calling the production code path (nothing is re-implemented here).
//!
//! The cargo-fuzz targets in `fuzz/` and `tests/fuzz_seeds.rs` call them. A wrapper returns what
//! the real code decided, so tests can check it, and panics only when an invariant of that code
//! is broken: that is what the fuzzer looks for. Nothing here does I/O; the async parsers are
//! polled to completion over in-memory bytes, and the DNS server never forwards (no upstreams).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use hickory_proto::op::{Message, MessageType};
use http::{HeaderMap, HeaderValue, Version};

use crate::config::DnsConfig;
use crate::discovery::Settings;
use crate::dns::{Server, Transport};
use crate::model::{
    self, Endpoint, EndpointPort, Kind, Object, ObjectRef, Protocol as L4, ServicePort, SourceId, TargetPort,
};
use crate::proxy::detect::Protocol;
use crate::proxy::http::{ORIGINAL_VERSION_HEADER, TARGET_PORT_HEADER};
use crate::proxy::transport::Header;
use crate::store::{Snapshot, SourceView};
use crate::upstream::local::IdentityObjectNames;

/// The file name configuration errors are reported under.
pub const CONFIG_FILE: &str = "fuzz.toml";
/// The file name manifest errors are reported under.
pub const MANIFEST_FILE: &str = "site/fuzz.yaml";
/// The largest UDP answer the DNS server sends (the EDNS payload it offers).
const DNS_UDP_MAX: usize = 1232;

/// The proxy's protocol detection on a client's first bytes ([`crate::proxy::detect::detect`]):
/// `None` while more bytes are needed to decide.
pub fn detect(bytes: &[u8]) -> Option<Protocol> {
    crate::proxy::detect::detect(bytes)
}

/// What box A's HTTP/1.1 server made of a complete request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http1Request {
    pub method: String,
    pub target: String,
    pub version: Version,
    /// The body's length, or `None` for a chunked body.
    pub length: Option<u64>,
    pub keep_alive: bool,
    /// Bytes left after the head (the body, or the next request).
    pub rest: usize,
}

/// Box A's HTTP/1.1 server on a request head at the start of `bytes`
/// ([`crate::proxy::http1::server::parse_request`]): the request, the status it is refused
/// with, or `None` while the head is incomplete.
///
/// # Panics
///
/// When a refusal is not 400, 431 or 501, or an accepted head breaks what the framing rules
/// promise: a chunked request without Content-Length, one Host on HTTP/1.1, a length that is the
/// request's Content-Length.
pub fn http1_request(bytes: &[u8]) -> Result<Option<Http1Request>, u16> {
    use crate::proxy::http1::server::{BodyFraming, parse_request};
    let mut buf = bytes::BytesMut::from(bytes);
    let head = match parse_request(&mut buf) {
        Ok(head) => head,
        Err(rejection) => {
            let status = rejection.status.as_u16();
            assert!(matches!(status, 400 | 431 | 501), "refused with {status}");
            return Err(status);
        }
    };
    let Some(head) = head else { return Ok(None) };
    let headers = &head.parts.headers;
    let declared = headers.get(http::header::CONTENT_LENGTH).map(|v| v.to_str().map(str::to_owned));
    let length = match head.body {
        BodyFraming::Chunked => {
            assert!(declared.is_none(), "a chunked request kept its Content-Length");
            None
        }
        BodyFraming::Length(length) => {
            if let Some(Ok(declared)) = declared {
                let first = declared.split(',').next().map(str::trim);
                assert_eq!(first.and_then(|d| d.parse().ok()), Some(length), "the length is not the request's");
            }
            Some(length)
        }
    };
    if head.parts.version == Version::HTTP_11 {
        assert_eq!(headers.get_all(http::header::HOST).iter().count(), 1, "an HTTP/1.1 request without one Host");
    }
    Ok(Some(Http1Request {
        method: head.parts.method.to_string(),
        target: head.parts.uri.to_string(),
        version: head.parts.version,
        length,
        keep_alive: head.keep_alive,
        rest: buf.len(),
    }))
}

/// What [`transport_header`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportParse {
    /// The transport header at the start of the bytes, or why it was refused.
    pub header: Result<Header, String>,
    /// The target port restored from the marker headers: the marker's, else the transport
    /// header's, else 80.
    pub port: u16,
    /// The client's HTTP version restored from the marker headers.
    pub version: Version,
}

/// What box B's inbound port reads from box A: the transport header at the start of `bytes`
/// ([`Header::read`]), then, for an HTTP request, the marker headers that restore the target port
/// and the original version (`proxy::http::take_markers`). The bytes after the header
/// are the marker values: the target port up to the first newline, the version after it.
///
/// # Panics
///
/// When a header that was read does not encode back to the bytes it was read from, or the
/// markers leave port 0 or stay on the request.
pub fn transport_header(bytes: &[u8]) -> TransportParse {
    let mut rest = bytes;
    let header = futures::executor::block_on(Header::read(&mut rest)).map_err(|e| e.to_string());
    if let Ok(header) = &header {
        let consumed = bytes.len() - rest.len();
        assert_eq!(header.encode().as_slice(), &bytes[..consumed], "a header encodes back to the bytes read");
    }

    let (port_value, version_value) = match rest.iter().position(|b| *b == b'\n') {
        Some(newline) => (&rest[..newline], Some(&rest[newline + 1..])),
        None => (rest, None),
    };
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(port_value) {
        headers.insert(TARGET_PORT_HEADER, value);
    }
    if let Some(Ok(value)) = version_value.map(HeaderValue::from_bytes) {
        headers.insert(ORIGINAL_VERSION_HEADER, value);
    }
    headers.insert(http::header::HOST, HeaderValue::from_static("api.shop.svc.cluster.local"));
    let default_port = header.as_ref().map_or(80, |h| h.target_port);
    let (port, version) = crate::proxy::http::take_markers(&mut headers, default_port);
    assert_ne!(port, 0, "port 0 is never a target");
    assert!(
        !headers.contains_key(TARGET_PORT_HEADER) && !headers.contains_key(ORIGINAL_VERSION_HEADER),
        "the markers are taken off the request"
    );
    assert!(headers.contains_key(http::header::HOST), "other headers stay");
    TransportParse { header, port, version }
}

/// The DNS server's answer to one UDP message (`dns::Server::handle`) from a fixed snapshot: in
/// `shop`, `web` (ClusterIPs 10.96.0.10 and fd00::10, ports `http` 80/TCP and `dns` 53/UDP),
/// `db` (headless: `db-0` 10.1.0.2 ready, `db-1` 10.1.0.3 not ready, 10.1.0.4 ready without a
/// hostname) and `idle` (ClusterIP 10.96.0.11); cluster domain `cluster.local`, TTL 5 s, short
/// names on, no upstream resolvers (other names are refused). `None`: nothing to answer to.
///
/// The same message is also answered as if it came over TCP.
///
/// # Panics
///
/// When an answer does not parse as a DNS response with the query's ID, a UDP answer is larger
/// than the payload the server offers, or UDP and TCP disagree on whether to answer.
pub fn dns(bytes: &[u8]) -> Option<Vec<u8>> {
    let server = dns_server();
    let udp = futures::executor::block_on(server.handle(bytes, Transport::Udp));
    let tcp = futures::executor::block_on(server.handle(bytes, Transport::Tcp));
    assert_eq!(udp.is_some(), tcp.is_some(), "UDP and TCP agree on whether to answer");
    for (wire, transport) in [(&udp, "UDP"), (&tcp, "TCP")] {
        let Some(wire) = wire else { continue };
        let message = match Message::from_vec(wire) {
            Ok(message) => message,
            Err(e) => panic!("the {transport} answer does not parse: {e}"),
        };
        assert_eq!(message.metadata.message_type, MessageType::Response, "{transport} answers are responses");
        if let [high, low, ..] = bytes {
            assert_eq!(message.metadata.id, u16::from_be_bytes([*high, *low]), "{transport} answers carry the ID");
        }
        let limit = if transport == "UDP" { DNS_UDP_MAX } else { usize::from(u16::MAX) };
        assert!(wire.len() <= limit, "a {transport} answer of {} bytes", wire.len());
    }
    udp
}

fn dns_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let settings = Settings {
            cluster_domain: "cluster.local".into(),
            link_modes: BTreeMap::new(),
            trust_domain: "cluster.local".into(),
            control_plane_namespace: "linkerd".into(),
        };
        // The sender is dropped: the receiver keeps the last snapshot.
        let (_publisher, snapshots) = tokio::sync::watch::channel(Arc::new(dns_snapshot()));
        Server::new(&DnsConfig::default(), settings, snapshots)
    })
}

/// The snapshot of [`dns`] (the one `src/dns/answer/tests.rs` uses).
fn dns_snapshot() -> Snapshot {
    let mut view = SourceView::default();
    view.set_kind(
        Kind::Service,
        vec![
            dns_service(
                "web",
                vec![
                    IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10)),
                ],
            ),
            dns_service("db", vec![]),
            dns_service("idle", vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11))]),
        ],
    );
    view.set_kind(
        Kind::EndpointSlice,
        vec![
            dns_slice("web", &[(Ipv4Addr::new(10, 1, 0, 1), None, true)]),
            dns_slice(
                "db",
                &[
                    (Ipv4Addr::new(10, 1, 0, 2), Some("db-0"), true),
                    (Ipv4Addr::new(10, 1, 0, 3), Some("db-1"), false),
                    (Ipv4Addr::new(10, 1, 0, 4), None, true),
                ],
            ),
        ],
    );
    view.set_kind(Kind::Pod, Vec::new());
    Snapshot::from_sources([(SourceId::Local, view)])
}

/// A service in `shop` with ports `http` (80/TCP, to the named port) and `dns` (53/UDP);
/// headless without ClusterIPs.
pub(crate) fn dns_service(name: &str, cluster_ips: Vec<IpAddr>) -> Object {
    Object::Service(model::Service {
        meta: ObjectRef::new("shop", name),
        headless: cluster_ips.is_empty(),
        cluster_ips,
        ports: vec![
            ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: TargetPort::Name("http".into()),
                protocol: L4::Tcp,
                app_protocol: None,
            },
            ServicePort {
                name: Some("dns".into()),
                port: 53,
                target_port: TargetPort::Number(5353),
                protocol: L4::Udp,
                app_protocol: None,
            },
        ],
        external_name: None,
        topology_aware: false,
        opaque_ports: vec![],
    })
}

/// A slice of `service` with endpoints (address, hostname, ready) on ports `http` 8080 and
/// `dns` 5353.
pub(crate) fn dns_slice(service: &str, endpoints: &[(Ipv4Addr, Option<&str>, bool)]) -> Object {
    Object::EndpointSlice(model::EndpointSlice {
        meta: ObjectRef::new("shop", format!("{service}-1")),
        service: service.into(),
        ports: vec![
            EndpointPort { name: Some("http".into()), port: 8080, protocol: L4::Tcp, app_protocol: None },
            EndpointPort { name: Some("dns".into()), port: 5353, protocol: L4::Udp, app_protocol: None },
        ],
        endpoints: endpoints
            .iter()
            .map(|(ip, hostname, ready)| Endpoint {
                addresses: vec![IpAddr::V4(*ip)],
                ready: *ready,
                serving: *ready,
                terminating: false,
                hostname: hostname.map(Into::into),
                node_name: None,
                zone: None,
                hints_for_zones: vec![],
                pod: None,
            })
            .collect(),
    })
}

/// One configuration file's text through the config parser with its file, line and key errors
/// (`config::parse_file`, what `config::Source::load` runs on each file), reported as
/// [`CONFIG_FILE`]. `Err` holds the error as the operator would see it.
///
/// # Panics
///
/// When an error does not name the file.
pub fn config(text: &str) -> Result<(), String> {
    match crate::config::parse_file(Path::new(CONFIG_FILE), text) {
        Ok(_table) => Ok(()),
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with(&format!("{CONFIG_FILE}:")), "the error names the file: {message}");
            Err(message)
        }
    }
}

/// One manifest file's text (YAML, multi-document) through the local source's parser and the
/// conversion into model objects ([`crate::upstream::local::parse_file`]), reported as
/// [`MANIFEST_FILE`]: the kinds of the objects, in file order, or the located error.
///
/// # Panics
///
/// When an error does not name the file.
pub fn manifests(text: &str) -> Result<Vec<Kind>, String> {
    let names = IdentityObjectNames::default();
    match crate::upstream::local::parse_file(Path::new(MANIFEST_FILE), text, &names) {
        Ok(objects) => Ok(objects.iter().map(Object::kind).collect()),
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with(MANIFEST_FILE), "the error names the file: {message}");
            Err(message)
        }
    }
}
