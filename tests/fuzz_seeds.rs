//! The fuzz entry points (`meshkeep::fuzzing`, what the cargo-fuzz targets in `fuzz/` call) over
//! hand-written valid seeds with their expected results, over the seed files in
//! `fuzz/corpus/<target>/`, and over deterministic pseudo-random mutations of all of them, which
//! must not panic. `scripts/fuzz.sh` runs the real fuzzers.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use http::Version;
use meshkeep::fuzzing::{self, TransportParse};
use meshkeep::model::Kind;
use meshkeep::proxy::detect::{H2_PREFACE, Protocol};
use meshkeep::proxy::transport::Header;

/// Mutated inputs per target.
const MUTATIONS: usize = 20_000;

// ---- seeds ----

const HTTP1_GET: &[u8] =
    b"GET /products?page=2 HTTP/1.1\r\nHost: api.shop.svc.cluster.local\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
const HTTP1_POST: &[u8] =
    b"POST /orders HTTP/1.0\r\nHost: api.shop\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"item\": 42}\n";

const HTTP1_CHUNKED: &[u8] =
    b"POST /orders HTTP/1.1\r\nHost: api.shop\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

/// The HTTP/2 preface and the client's first SETTINGS frame (max streams 100, window 6 MiB).
fn h2_start() -> Vec<u8> {
    let settings: &[u8] = &[0, 0, 12, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100, 0, 4, 0, 0x60, 0, 0];
    [H2_PREFACE, settings].concat()
}

/// A TLS 1.3 ClientHello record naming `server_name`, offering h2 (no key share: a prefix of a
/// real handshake is all detection reads).
fn client_hello(server_name: &str) -> Vec<u8> {
    fn u16_len(n: usize) -> [u8; 2] {
        u16::try_from(n).expect("fits u16").to_be_bytes()
    }
    let name = server_name.as_bytes();
    let mut sni = u16_len(name.len() + 3).to_vec();
    sni.push(0); // host_name
    sni.extend_from_slice(&u16_len(name.len()));
    sni.extend_from_slice(name);
    let extensions: [(u16, Vec<u8>); 4] = [
        (0x0000, sni),
        (0x000a, vec![0, 2, 0, 0x1d]),        // supported_groups: x25519
        (0x002b, vec![2, 3, 4]),              // supported_versions: TLS 1.3
        (0x0010, b"\x00\x03\x02h2".to_vec()), // ALPN: h2
    ];
    let mut encoded = Vec::new();
    for (kind, data) in extensions {
        encoded.extend_from_slice(&kind.to_be_bytes());
        encoded.extend_from_slice(&u16_len(data.len()));
        encoded.extend_from_slice(&data);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&u16_len(encoded.len()));
    body.extend_from_slice(&encoded);
    let mut handshake = vec![1]; // client_hello
    handshake.extend_from_slice(&u32::try_from(body.len()).expect("fits u32").to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&u16_len(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}

fn header(target_port: u16, protocol: Protocol, authority: Option<&str>) -> Header {
    Header { target_port, protocol, authority: authority.map(str::to_owned) }
}

/// A transport header followed by marker values (`port\nversion`).
fn transport_seed(header: &Header, markers: &[u8]) -> Vec<u8> {
    [header.encode().as_slice(), markers].concat()
}

const DNS_ID: u16 = 0x4d4b;

fn dns_query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut message = Message::new(DNS_ID, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if edns {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        message.set_edns(edns);
    }
    message.to_vec().expect("encode")
}

const CONFIG: &str = r#"# A box on a shop floor.
[runtime]
workers = 2
drain_timeout = "10s"

[node]
zone = "site-a"

[admin]
listen = "127.0.0.1:4191"

[upstream.local]
path = "/etc/meshkeep/manifests"

[proxy]
outbound_listen = "127.0.0.1:4140"
inbound_listen = "0.0.0.0:4143"
opaque_ports = [25, 3306, 5432]

[dns]
listen = "127.0.0.1:4153"
ttl = "5s"
short_names = true
upstreams = ["192.0.2.53:53"]

[traffic]
retries = true
max_retries = 2

[traffic.services."api.shop"]
response_timeout = "2s"
retry_all_methods = false

[log]
filter = "meshkeep=debug,kube=warn"
"#;

const SHOP: &str = include_str!("../examples/site/shop.yaml");
const POLICY: &str = include_str!("../examples/site/policy.yaml");
const MIXED: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n\
     ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\n\
     ---\n\
     ---\napiVersion: v1\nkind: Secret\nmetadata: {name: linkerd-identity-issuer, namespace: linkerd}\nstringData: {tls.crt: C, tls.key: K}\n\
     ---\napiVersion: v1\nkind: Secret\nmetadata: {name: other, namespace: linkerd}\n";
const LIST: &str = "apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: db, namespace: shop}
    spec: {clusterIP: None, ports: [{name: pg, port: 5432, protocol: TCP}]}
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
    addressType: IPv4
    ports: [{name: pg, port: 5432, protocol: TCP}]
    endpoints:
      - {addresses: [10.1.0.2], hostname: db-0, conditions: {ready: true}}
      - {addresses: [10.1.0.3], hostname: db-1, conditions: {ready: false}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: linkerd-identity-trust-roots, namespace: linkerd}
data: {ca-bundle.crt: \"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\"}
";

// ---- the seeds, checked ----

#[test]
fn detect_classifies_the_seeds() {
    let (h2, hello) = (h2_start(), client_hello("api.shop.svc.cluster.local"));
    let cases: [(&[u8], Option<Protocol>); 7] = [
        (HTTP1_GET, Some(Protocol::Http1)),
        (HTTP1_POST, Some(Protocol::Http1)),
        (&h2, Some(Protocol::Http2)),
        (&hello, Some(Protocol::Tls)),
        (b"SSH-2.0-OpenSSH_9.2\r\n", Some(Protocol::Opaque)),
        (b"GET /products HTTP/1.1", None),
        (b"", None),
    ];
    for (bytes, expected) in cases {
        assert_eq!(fuzzing::detect(bytes), expected, "{}", bytes.escape_ascii());
    }
    run_corpus("detect", |bytes| {
        let _ = fuzzing::detect(bytes);
    });
}

#[test]
fn http1_request_reads_the_seeds() {
    let get = fuzzing::http1_request(HTTP1_GET).unwrap().unwrap();
    assert_eq!(
        (get.method.as_str(), get.target.as_str(), get.length, get.keep_alive, get.rest),
        ("GET", "/products?page=2", Some(0), true, 0)
    );
    let post = fuzzing::http1_request(HTTP1_POST).unwrap().unwrap();
    assert_eq!((post.version, post.length, post.keep_alive, post.rest), (Version::HTTP_10, Some(13), false, 13));
    let chunked = fuzzing::http1_request(HTTP1_CHUNKED).unwrap().unwrap();
    assert_eq!((chunked.length, chunked.rest), (None, 15));
    assert_eq!(fuzzing::http1_request(&HTTP1_GET[..40]), Ok(None));
    let smuggled = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(fuzzing::http1_request(smuggled), Err(400));
    run_corpus("http1_request", |bytes| {
        let _ = fuzzing::http1_request(bytes);
    });
}

#[test]
fn transport_header_reads_the_seeds() {
    let api = header(8080, Protocol::Http1, Some("api.shop.svc.cluster.local"));
    assert_eq!(
        fuzzing::transport_header(&transport_seed(&api, b"8081\nHTTP/1.0")),
        TransportParse { header: Ok(api), port: 8081, version: Version::HTTP_10 }
    );
    let h2 = header(9090, Protocol::Http2, Some("web.shop.svc.cluster.local:80"));
    assert_eq!(
        fuzzing::transport_header(&transport_seed(&h2, b"9091\nHTTP/2")),
        TransportParse { header: Ok(h2), port: 9091, version: Version::HTTP_2 }
    );
    // No markers: the header's port, HTTP/1.1.
    let opaque = header(5432, Protocol::Opaque, None);
    assert_eq!(
        fuzzing::transport_header(&opaque.encode()),
        TransportParse { header: Ok(opaque), port: 5432, version: Version::HTTP_11 }
    );
    // A bad port marker falls back to the header's port.
    let tls = header(443, Protocol::Tls, Some("db.shop.svc.cluster.local"));
    let parsed = fuzzing::transport_header(&transport_seed(&tls, b"0\nHTTP/1.1"));
    assert_eq!(parsed.header, Ok(tls));
    assert_eq!(parsed.port, 443);
    let plain = fuzzing::transport_header(b"GET / HTTP/1.1\r\n\r\n");
    assert!(plain.header.is_err_and(|e| e.contains("not a meshkeep transport header")));
    assert!(fuzzing::transport_header(b"MK1\x09\x00\x50\x00").header.is_err(), "unknown protocol");
    assert!(fuzzing::transport_header(b"MK1\x00\x00\x00\x00").header.is_err(), "port 0");
    assert!(fuzzing::transport_header(b"MK1\x00\x00\x50\x05ab").header.is_err(), "short authority");
    run_corpus("transport_header", |bytes| {
        let _ = fuzzing::transport_header(bytes);
    });
}

/// The answer to `query` (which has [`DNS_ID`]): its code, sorted answer data, and the message.
fn dns_answer(query: &[u8]) -> (ResponseCode, Vec<String>, Message) {
    let wire = fuzzing::dns(query).expect("an answer");
    let message = Message::from_vec(&wire).expect("the answer parses");
    assert_eq!(message.metadata.id, DNS_ID);
    let mut data: Vec<String> = message.answers.iter().map(|r| r.data.to_string()).collect();
    data.sort();
    (message.metadata.response_code, data, message)
}

#[test]
fn dns_answers_the_seeds() {
    let (code, data, message) = dns_answer(&dns_query("web.shop.svc.cluster.local.", RecordType::A, false));
    assert_eq!((code, data), (ResponseCode::NoError, vec!["10.96.0.10".to_owned()]));
    assert!(message.metadata.authoritative, "mesh answers are authoritative");
    let (code, data, message) = dns_answer(&dns_query("web.shop.svc.cluster.local.", RecordType::AAAA, true));
    assert_eq!((code, data), (ResponseCode::NoError, vec!["fd00::10".to_owned()]));
    assert!(message.edns.is_some(), "EDNS is answered with EDNS");
    let (_, data, _) = dns_answer(&dns_query("_http._tcp.web.shop.svc.cluster.local.", RecordType::SRV, false));
    assert_eq!(data, vec!["0 100 80 web.shop.svc.cluster.local.".to_owned()]);
    let (_, data, message) = dns_answer(&dns_query("_http._tcp.db.shop.svc.cluster.local.", RecordType::SRV, false));
    assert_eq!(
        data,
        vec!["0 100 8080 10-1-0-4.db.shop.svc.cluster.local.", "0 100 8080 db-0.db.shop.svc.cluster.local."]
    );
    assert_eq!(message.additionals.len(), 2, "the SRV targets' addresses come along");
    let (_, data, _) = dns_answer(&dns_query("db.shop.svc.cluster.local.", RecordType::A, true));
    assert_eq!(data, vec!["10.1.0.2", "10.1.0.4"], "ready endpoints of a headless service");
    let (_, data, _) = dns_answer(&dns_query("web.shop.", RecordType::A, false));
    assert_eq!(data, vec!["10.96.0.10"], "short names");
    let (code, data, message) = dns_answer(&dns_query("nope.shop.svc.cluster.local.", RecordType::A, false));
    assert_eq!((code, data.len(), message.authorities.len()), (ResponseCode::NXDomain, 0, 1), "NXDOMAIN with SOA");
    let (code, _, _) = dns_answer(&dns_query("example.com.", RecordType::A, false));
    assert_eq!(code, ResponseCode::Refused, "no upstreams: other names are refused");

    let garbage = fuzzing::dns(&[0x12, 0x34, 0xff]).expect("FORMERR to an ID");
    let formerr = Message::from_vec(&garbage).expect("parses");
    assert_eq!((formerr.metadata.id, formerr.metadata.response_code), (0x1234, ResponseCode::FormErr));
    assert_eq!(fuzzing::dns(&[0x12]), None, "no ID, no answer");
    run_corpus("dns", |bytes| {
        let _ = fuzzing::dns(bytes);
    });
}

#[test]
fn config_parses_the_seeds() {
    assert_eq!(fuzzing::config(CONFIG), Ok(()));
    assert_eq!(fuzzing::config(""), Ok(()));
    let err = fuzzing::config("[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").expect_err("unknown key");
    assert!(err.starts_with("fuzz.toml:3:1:") && err.contains("key `admin.lisen`"), "{err}");
    let err = fuzzing::config("[runtime]\n\nworkers = 0\n").expect_err("bad value");
    assert!(err.starts_with("fuzz.toml:3:") && err.contains("runtime.workers"), "{err}");
    let err = fuzzing::config("[admin]\nlisten = \n").expect_err("bad syntax");
    assert!(err.starts_with("fuzz.toml:2:"), "{err}");
    run_corpus("config", |bytes| {
        let _ = fuzzing::config(&String::from_utf8_lossy(bytes));
    });
}

#[test]
fn manifests_parse_the_seeds() {
    use Kind::*;
    assert_eq!(fuzzing::manifests(SHOP), Ok(vec![Service, EndpointSlice, Pod, Service, EndpointSlice, Pod]));
    assert_eq!(
        fuzzing::manifests(POLICY),
        Ok(vec![Service, EndpointSlice, TrafficSplit, HttpRoute, HttpRouteGroup, TrafficTarget])
    );
    assert_eq!(fuzzing::manifests(MIXED), Ok(vec![Service, IdentityIssuer]));
    assert_eq!(fuzzing::manifests(LIST), Ok(vec![Service, EndpointSlice, TrustRoots]));
    let err = fuzzing::manifests("apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n").expect_err("bad YAML");
    assert!(err.starts_with("site/fuzz.yaml:"), "{err}");
    let err = fuzzing::manifests(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x}\nspec: {clusterIP: not-an-ip}\n",
    )
    .expect_err("bad address");
    assert!(err.contains("document 2") && err.contains("x/b") && err.contains("not-an-ip"), "{err}");
    run_corpus("manifests", |bytes| {
        let _ = fuzzing::manifests(&String::from_utf8_lossy(bytes));
    });
}

// ---- mutations ----

#[test]
fn detect_survives_mutations() {
    let seeds = vec![
        HTTP1_GET.to_vec(),
        HTTP1_POST.to_vec(),
        h2_start(),
        client_hello("api.shop.svc.cluster.local"),
        b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
    ];
    mutate_and_run("detect", seeds, |bytes| {
        let _ = fuzzing::detect(bytes);
    });
}

#[test]
fn http1_request_survives_mutations() {
    let seeds = vec![HTTP1_GET.to_vec(), HTTP1_POST.to_vec(), HTTP1_CHUNKED.to_vec()];
    mutate_and_run("http1_request", seeds, |bytes| {
        let _ = fuzzing::http1_request(bytes);
    });
}

#[test]
fn transport_header_survives_mutations() {
    let seeds = vec![
        transport_seed(&header(8080, Protocol::Http1, Some("api.shop.svc.cluster.local")), b"8081\nHTTP/1.0"),
        transport_seed(&header(9090, Protocol::Http2, Some("web.shop.svc.cluster.local:80")), b"9091\nHTTP/2"),
        header(5432, Protocol::Opaque, None).encode(),
        header(443, Protocol::Tls, Some("db.shop.svc.cluster.local")).encode(),
    ];
    mutate_and_run("transport_header", seeds, |bytes| {
        let _ = fuzzing::transport_header(bytes);
    });
}

#[test]
fn dns_survives_mutations() {
    let seeds = vec![
        dns_query("web.shop.svc.cluster.local.", RecordType::A, false),
        dns_query("web.shop.svc.cluster.local.", RecordType::AAAA, true),
        dns_query("_http._tcp.web.shop.svc.cluster.local.", RecordType::SRV, false),
        dns_query("_http._tcp.db.shop.svc.cluster.local.", RecordType::SRV, true),
        dns_query("db-0.db.shop.svc.cluster.local.", RecordType::A, false),
        dns_query("web.shop.", RecordType::ANY, false),
        dns_query("cluster.local.", RecordType::SOA, true),
    ];
    mutate_and_run("dns", seeds, |bytes| {
        let _ = fuzzing::dns(bytes);
    });
}

#[test]
fn config_survives_mutations() {
    let seeds = vec![CONFIG.as_bytes().to_vec(), b"[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n".to_vec()];
    mutate_and_run("config", seeds, |bytes| {
        let _ = fuzzing::config(&String::from_utf8_lossy(bytes));
    });
}

#[test]
fn manifests_survive_mutations() {
    let seeds = [SHOP, POLICY, MIXED, LIST].map(|text| text.as_bytes().to_vec()).to_vec();
    mutate_and_run("manifests", seeds, |bytes| {
        let _ = fuzzing::manifests(&String::from_utf8_lossy(bytes));
    });
}

// ---- the harness ----

/// The committed seed files of a target (`fuzz/corpus/<target>/seed-*`), sorted by name. Files
/// libFuzzer added locally are left out, so every machine runs the same inputs.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("seed-")))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "{} has no seed files", dir.display());
    paths.iter().map(|path| std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).collect()
}

/// Runs `run` over every committed seed file of `target`.
fn run_corpus(target: &str, run: impl Fn(&[u8])) {
    for (index, bytes) in corpus(target).iter().enumerate() {
        check(target, &format!("corpus seed {index}"), bytes, &run);
    }
}

/// Runs `run` over [`MUTATIONS`] mutations of `seeds` and the target's seed files.
fn mutate_and_run(target: &str, mut seeds: Vec<Vec<u8>>, run: impl Fn(&[u8])) {
    seeds.extend(corpus(target));
    // Seeded by the target's name: deterministic, and different per target.
    let hash = target.bytes().fold(0x9e37_79b9_7f4a_7c15_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut rng = Rng(hash | 1);
    for i in 0..MUTATIONS {
        let seed = i % seeds.len();
        let input = mutate(&mut rng, &seeds[seed]);
        check(target, &format!("mutation {i} of seed {seed}"), &input, &run);
    }
}

/// Runs one input; a panic fails the test with the input, escaped, to reproduce it.
fn check(target: &str, what: &str, input: &[u8], run: &impl Fn(&[u8])) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| run(input))) {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!("{target}: {what} panicked: {message}\ninput: b\"{}\"", input.escape_ascii());
    }
}

/// xorshift64: a small deterministic generator (the state must not be 0).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }

    fn byte(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }
}

/// Bytes that often mean something to a parser.
const INTERESTING: &[u8] = b"\x00\x01\x7f\x80\xff\n\r\t :-,{}[]\"'#.*&!|>=@";

/// One to four of: flip a bit, overwrite a byte, truncate, duplicate a range, insert random
/// bytes, delete a range.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let len = bytes.len();
        match rng.below(6) {
            0 if len > 0 => {
                let at = rng.below(len);
                bytes[at] ^= 1u8 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                bytes[at] = if rng.below(2) == 0 { rng.byte() } else { INTERESTING[rng.below(INTERESTING.len())] };
            }
            2 => bytes.truncate(rng.below(len + 1)),
            3 if len > 0 => {
                let start = rng.below(len);
                let end = start + 1 + rng.below((len - start).min(64));
                let copy = bytes[start..end].to_vec();
                let at = rng.below(len + 1);
                bytes.splice(at..at, copy);
            }
            4 => {
                let at = rng.below(len + 1);
                let insert: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.byte()).collect();
                bytes.splice(at..at, insert);
            }
            5 if len > 0 => {
                let start = rng.below(len);
                let end = start + 1 + rng.below((len - start).min(16));
                bytes.drain(start..end);
            }
            _ => {}
        }
    }
    bytes
}
