//! The proxy between two boxes on loopback: box A's outbound carries a client's TCP over mTLS to
//! box B's inbound, which hands it to B's local backend.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::mesh::*;
use support::{Daemon, free_addr};

#[test]
fn tcp_crosses_two_boxes_over_mtls_with_both_identities_recorded() {
    let boxes = two_boxes(Some("echo"));
    let back = round_trip(boxes.listener, b"hello through the mesh").expect("round trip");
    assert_eq!(back, b"hello through the mesh");

    // A large payload arrives intact, in both directions, with half-close.
    let payload: Vec<u8> = (0..8 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let back = round_trip(boxes.listener, &payload).expect("large round trip");
    assert!(back == payload, "8 MiB came back altered ({} bytes)", back.len());

    let outbound = metric(
        &boxes.a,
        "tcp_open_total{direction=\"outbound\",tls=\"true\",target=\"echo.shop.svc.cluster.local:80\",identity=\"echo.shop.serviceaccount.identity.linkerd.cluster.local\"}",
    );
    assert!(outbound >= 2.0, "box A counted {outbound} mTLS connections");
    let inbound = metric(&boxes.b, "tcp_open_total{direction=\"inbound\",tls=\"true\"");
    assert!(inbound >= 2.0, "box B counted {inbound}");
    let (_, b_metrics) = boxes.b.get("/metrics");
    assert!(
        b_metrics.contains("identity=\"web.shop.serviceaccount.identity.linkerd.cluster.local\""),
        "B sees A's identity\n{b_metrics}"
    );
    let written = metric(&boxes.a, "tcp_write_bytes_total{direction=\"outbound\"");
    assert!(written >= payload.len() as f64, "bytes counted: {written}");
}

#[test]
fn a_peer_with_the_wrong_identity_is_refused() {
    // A expects the endpoint to be `impostor`, but B proves `echo`.
    let boxes = two_boxes(Some("impostor"));
    let back = round_trip(boxes.listener, b"secret").unwrap_or_default();
    assert!(back.is_empty(), "nothing may reach a peer with the wrong identity");
    boxes.a.wait_for("TLS failure counted", Duration::from_secs(10), |d| {
        metric(d, "meshkeep_proxy_errors_total{direction=\"outbound\",reason=\"tls\"}") >= 1.0
    });
}

#[test]
fn plaintext_to_the_inbound_port_is_refused() {
    let boxes = two_boxes(Some("echo"));
    let back = round_trip(boxes.b_inbound, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_or_default();
    assert!(back.is_empty());
    boxes.b.wait_for("refusal counted", Duration::from_secs(10), |d| {
        metric(d, "meshkeep_proxy_errors_total{direction=\"inbound\",reason=\"refused\"}") >= 1.0
    });
}

#[test]
fn an_unmeshed_endpoint_is_reached_directly() {
    // No pod behind the endpoint, so no identity: the proxy connects straight to
    // 127.0.0.2:<port>, where this echo server listens.
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf);
            let _ = stream.write_all(&buf);
        }
    });
    let dirs = tempfile::tempdir().unwrap();
    manifests(&dirs.path().join("m"), port, None);
    let listen = free_addr();
    let daemon = Daemon::start(&format!(
        "[upstream.local]\npath = {:?}\npoll_interval = \"200ms\"\n[[proxy.listeners]]\nlisten = \"{listen}\"\nservice = \"echo.shop\"\nport = 80\n",
        dirs.path().join("m").display().to_string()
    ));
    daemon.wait_for("echo.shop known", Duration::from_secs(30), |d| d.resolve("echo.shop")["result"] == "found");
    assert_eq!(round_trip(listen, b"plain").unwrap(), b"plain");
    assert!(metric(&daemon, "tcp_open_total{direction=\"outbound\",tls=\"no_identity\"") >= 1.0);
}

/// An HTTP/1.1 server that answers every request with its name, then closes.
fn named_backend(name: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let answer =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}", name.len());
                let _ = stream.write_all(answer.as_bytes());
            });
        }
    });
    addr
}

#[test]
fn one_peer_connection_carries_requests_for_several_target_ports() {
    // Box A opens one HTTP/2 connection to box B's pod, for the first request's target port; a
    // request through it for another port of the same pod must still reach that port.
    let other = named_backend("other");
    let boxes = two_boxes_to(http_backend(), Some("echo"));
    let port = other.port();
    std::fs::write(
        boxes.dirs.path().join("a-manifests/other.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: shop}}\nspec: {{clusterIP: 10.96.0.51, ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: other-b, namespace: shop, labels: {{kubernetes.io/service-name: other}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n  - addresses: [127.0.0.2]\n    targetRef: {{kind: Pod, namespace: shop, name: echo-0}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: echo-other, namespace: shop}}\nspec:\n  parentRefs: [{{group: core, kind: Service, name: echo, port: 80}}]\n  rules:\n    - matches: [{{path: {{type: PathPrefix, value: /other}}}}]\n      backendRefs: [{{name: other, port: 80}}]\n    - backendRefs: [{{name: echo, port: 80}}]\n"
        ),
    )
    .unwrap();
    boxes.a.wait_for("other.shop known", Duration::from_secs(30), |d| d.resolve("other.shop")["result"] == "found");
    let url = |path: &str| format!("http://{}{path}", boxes.listener);
    // The route is in force once /other answers as `other` (the snapshot may come in parts); if
    // box B took it to the connection's first port instead, echo answers it and this times out.
    // Box A sends the Host header as :authority alone; box B gives it back (else the backend
    // would see box B's own Host: the backend's address).
    let seen_host = format!("x-seen-host: {}\r\n", boxes.listener);
    let first = curl(&["--http1.1", &url("/hello")]);
    assert!(first.contains(&seen_host), "the first request opens the connection, to echo's port\n{first}");
    boxes.a.wait_for("/other answered by the backend on other's port", Duration::from_secs(30), |_| {
        curl(&["--http1.1", &url("/other")]).ends_with("\r\n\r\nother")
    });
    for _ in 0..3 {
        let echo = curl(&["--http1.1", &url("/hello")]);
        assert!(echo.contains(&seen_host) && echo.contains("x-leaked: \r\n"), "{echo}");
        let other = curl(&["--http1.1", &url("/other/x")]);
        assert!(other.ends_with("\r\n\r\nother"), "{other}");
    }
    let connections = metric(&boxes.b, "tcp_open_total{direction=\"inbound\"");
    assert_eq!(connections, 1.0, "box A carried every request over one connection");
}

#[test]
fn a_box_without_a_certificate_answers_meshed_requests_at_once() {
    // No issuer and no standalone one: this box never has a certificate, so it cannot reach an endpoint behind a
    // meshed pod. The client hears so at once: trying again could not help.
    let dirs = tempfile::tempdir().unwrap();
    manifests(&dirs.path().join("m"), free_addr().port(), Some("echo"));
    let listen = free_addr();
    let daemon = Daemon::start(&format!(
        "[identity]\nstandalone = false\n[upstream.local]\npath = {:?}\npoll_interval = \"200ms\"\n[[proxy.listeners]]\nlisten = \"{listen}\"\nservice = \"echo.shop\"\nport = 80\n",
        dirs.path().join("m").display().to_string()
    ));
    daemon.wait_for("echo.shop known", Duration::from_secs(30), |d| d.resolve("echo.shop")["result"] == "found");
    for _ in 0..3 {
        let answer = curl(&["--http1.1", "-H", "Host: echo.shop", &format!("http://{listen}/")]);
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        assert!(answer.contains("meshkeep-error: no proxy certificate yet"), "{answer}");
    }
    let errors = metric(&daemon, "meshkeep_proxy_errors_total{direction=\"outbound\",reason=\"no_certificate\"}");
    assert_eq!(errors, 3.0, "one try per request");
    assert_eq!(metric(&daemon, "meshkeep_retries_total"), 0.0, "no retries");
}

#[test]
fn http1_and_http2_cross_two_boxes_and_are_counted() {
    let boxes = two_boxes_to(http_backend(), Some("echo"));
    let url = format!("http://{}/hello", boxes.listener);

    // A client's own markers are not taken for box A's (port 1 would fail: nothing listens).
    let (version, port) = ("meshkeep-original-version: HTTP/2", "meshkeep-target-port: 1");
    let http1 = curl(&[
        "--http1.1",
        "-H",
        "Host: echo.shop",
        "-H",
        version,
        "-H",
        port,
        "--data-binary",
        "ping over http/1.1",
        &url,
    ]);
    assert!(http1.starts_with("HTTP/1.1 200"), "{http1}");
    assert!(http1.contains("x-seen-version: HTTP/1.1"), "the backend gets the client's version back\n{http1}");
    assert!(http1.contains("x-seen-host: echo.shop"), "{http1}");
    assert!(http1.contains("x-leaked: \r\n"), "meshkeep's own headers must not reach the backend\n{http1}");
    assert!(http1.ends_with("ping over http/1.1"), "{http1}");

    let http2 = curl(&["--http2-prior-knowledge", "--data-binary", "ping over h2", &url]);
    assert!(http2.starts_with("HTTP/2 200"), "{http2}");
    assert!(http2.contains("x-seen-version: HTTP/2.0"), "{http2}");
    assert!(http2.ends_with("ping over h2"), "{http2}");

    // A chunked upload of 3 MiB arrives intact.
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("upload.bin");
    let payload: Vec<u8> = (0..3 * 1024 * 1024).map(|i: u32| b'a' + (i % 26) as u8).collect();
    std::fs::write(&upload, &payload).unwrap();
    let output = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "--http1.1", "-H", "Transfer-Encoding: chunked", "--data-binary"])
        .arg(format!("@{}", upload.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(output.stdout == payload, "chunked upload came back with {} bytes", output.stdout.len());

    let failing = curl(&["--http1.1", &format!("http://{}/status/503", boxes.listener)]);
    assert!(failing.starts_with("HTTP/1.1 503"), "{failing}");

    let requests = metric(
        &boxes.a,
        "request_total{direction=\"outbound\",authority=\"echo.shop.svc.cluster.local:80\",tls=\"true\"}",
    );
    assert_eq!(requests, 4.0, "box A counted every request");
    let failures = metric(
        &boxes.a,
        "response_total{direction=\"outbound\",authority=\"echo.shop.svc.cluster.local:80\",tls=\"true\",status_code=\"503\",classification=\"failure\"}",
    );
    assert_eq!(failures, 1.0);
    let inbound = metric(&boxes.b, "request_total{direction=\"inbound\"");
    // The 503 to a GET was tried three times (two retries) before box A gave up.
    assert_eq!(inbound, 6.0, "box B counted them too, and the retries");
    let retried =
        metric(&boxes.a, "meshkeep_retries_total{authority=\"echo.shop.svc.cluster.local:80\",result=\"retried\"}");
    assert_eq!(retried, 2.0);
    let (_, text) = boxes.a.get("/metrics");
    assert!(text.contains("response_latency_ms_bucket{"), "{text}");
}

/// Asks with `ask` until the answer contains `wanted` (the box reads its manifests every 200 ms).
fn answer_with(wanted: &str, ask: impl Fn() -> String) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let answer = ask();
        if answer.contains(wanted) || std::time::Instant::now() > deadline {
            assert!(answer.contains(wanted), "no answer with {wanted:?} in 15 s; the last:\n{answer}");
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_service_ports_app_protocol_chooses_the_http_its_endpoints_are_spoken_to_in() {
    // Meshed: box B speaks it to the workload.
    let backend = http_backend();
    let boxes = two_boxes_to(backend, Some("echo"));
    let dir = boxes.dirs.path().join("a-manifests");
    let speaking = |app| manifests_speaking(&dir, backend.port(), Some("echo"), Some(app));
    let url = format!("http://{}/v", boxes.listener);
    let h2 = || curl(&["--http2-prior-knowledge", &url]);
    let h1 = || curl(&["--http1.1", "-H", "Host: echo.shop", &url]);
    let answer = h2();
    assert!(answer.contains("x-seen-version: HTTP/2.0"), "without appProtocol, the client's version\n{answer}");
    // An HTTP/1.1 list of equal lengths is one length across the HTTP/2 hop (h2 refuses lists).
    let mut stream = TcpStream::connect(boxes.listener).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let listed = "POST /v HTTP/1.1\r\nHost: echo.shop\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello";
    stream.write_all(listed.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");

    speaking("http");
    let answer = answer_with("x-seen-version: HTTP/1.1", h2);
    assert!(answer.starts_with("HTTP/2 200"), "{answer}");
    assert!(answer.contains(&format!("x-seen-host: {}\r\n", boxes.listener)), "Host from :authority\n{answer}");
    let answer = h1();
    assert!(answer.contains("x-seen-version: HTTP/1.1") && answer.contains("x-seen-host: echo.shop"), "{answer}");

    speaking("kubernetes.io/h2c");
    let answer = answer_with("x-seen-version: HTTP/2.0", h1);
    // The Host header went as :authority, and no Host header contradicts it.
    let seen = "x-seen-host: echo.shop\r\nx-seen-authority: echo.shop\r\n";
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains(seen), "{answer}");
    assert!(answer.contains("x-leaked: \r\n"), "{answer}");

    // Unmeshed: box A speaks it to the endpoint itself.
    let backend = http_backend_on(std::net::SocketAddr::from(([127, 0, 0, 2], 0)));
    let dirs = tempfile::tempdir().unwrap();
    let dir = dirs.path().join("m");
    manifests_speaking(&dir, backend.port(), None, Some("http"));
    let listen = free_addr();
    let _daemon = Daemon::start(&format!(
        "[upstream.local]\npath = {:?}\npoll_interval = \"200ms\"\n[[proxy.listeners]]\nlisten = \"{listen}\"\nservice = \"echo.shop\"\nport = 80\n",
        dir.display().to_string()
    ));
    let url = format!("http://{listen}/v");
    let answer = answer_with("x-seen-version: HTTP/1.1", || curl(&["--http2-prior-knowledge", &url]));
    assert!(answer.contains(&format!("x-seen-host: {listen}\r\n")), "{answer}");
    manifests_speaking(&dir, backend.port(), None, Some("grpc"));
    let answer = answer_with("x-seen-version: HTTP/2.0", || curl(&["--http1.1", &url]));
    assert!(answer.contains(&format!("x-seen-host: {listen}\r\nx-seen-authority: {listen}\r\n")), "{answer}");
}

#[test]
fn boxes_with_one_worker_carry_http() {
    // One worker: a current-thread runtime (blocking work still has its own pool).
    let setup = Setup { tables: "[runtime]\nworkers = 1\n", ..Setup::default() };
    let boxes = two_boxes_custom(http_backend(), &setup);
    let (_, metrics) = boxes.a.get("/metrics");
    assert!(metrics.contains("meshkeep_runtime_workers 1\n"), "{metrics}");
    let url = format!("http://{}/one", boxes.listener);
    for _ in 0..20 {
        let http1 = curl(&["--http1.1", "-H", "Host: echo.shop", "--data-binary", "one thread", &url]);
        assert!(http1.starts_with("HTTP/1.1 200") && http1.ends_with("one thread"), "{http1}");
        let http2 = curl(&["--http2-prior-knowledge", "--data-binary", "one thread", &url]);
        assert!(http2.starts_with("HTTP/2 200") && http2.ends_with("one thread"), "{http2}");
    }
    let inbound = metric(&boxes.b, "request_total{direction=\"inbound\"");
    assert_eq!(inbound, 40.0, "box B served every request");
}

#[test]
fn certificate_rotation_keeps_established_connections_and_new_ones_use_the_new_certificate() {
    let boxes = two_boxes_with(echo_server(), Some("echo"), "certificate_lifetime = \"4s\"\nclock_skew = \"0s\"\n");
    let mut stream = TcpStream::connect(boxes.listener).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let echo = |stream: &mut TcpStream, text: &[u8]| {
        stream.write_all(text).unwrap();
        let mut buf = vec![0u8; text.len()];
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(buf, text);
    };
    echo(&mut stream, b"before rotation");
    let rotations = |d: &Daemon| d.log().matches("proxy: TLS identity in use").count();
    boxes.a.wait_for("A rotated twice", Duration::from_secs(30), |d| rotations(d) >= 3);
    boxes.b.wait_for("B rotated twice", Duration::from_secs(30), |d| rotations(d) >= 3);
    echo(&mut stream, b"after rotation, same connection");
    assert_eq!(round_trip(boxes.listener, b"a new connection").unwrap(), b"a new connection");
}

/// An HTTP/1.1 backend written by hand, answering `200 ok` to each request head. It counts the
/// connections it accepts and, given `per_connection`, closes each connection after that many
/// responses without announcing it (as a server whose keep-alive timeout has just run out).
fn counting_backend(per_connection: Option<usize>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    counting_listener(move |stream| {
        std::thread::spawn(move || {
            let mut stream = stream;
            let mut answered = 0;
            let mut pending = Vec::new();
            let mut buf = [0u8; 4096];
            while per_connection.is_none_or(|limit| answered < limit) {
                let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                    continue;
                };
                pending.drain(..end + 4);
                if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").is_err() {
                    return;
                }
                answered += 1;
            }
        });
    })
}

/// Listens on loopback, counting the connections it accepts and handing each to `handle`.
fn counting_listener(handle: impl Fn(TcpStream) + Send + 'static) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            handle(stream);
        }
    });
    (addr, accepted)
}

#[test]
fn box_b_keeps_connections_to_its_backend_alive_and_drops_the_ones_it_closed() {
    let (backend, accepted) = counting_backend(None);
    let boxes = two_boxes_to(backend, Some("echo"));
    let url = format!("http://{}/kept", boxes.listener);
    for _ in 0..20 {
        let response = curl(&["--http1.1", "-H", "Host: echo.shop", &url]);
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("ok"), "{response}");
    }
    let opened = accepted.load(Ordering::SeqCst);
    assert!(opened <= 2, "20 requests one after another took {opened} backend connections");

    // A backend that closes every connection after one response: none of them is used again,
    // and every request is answered.
    let (backend, accepted) = counting_backend(Some(1));
    let boxes = two_boxes_to(backend, Some("echo"));
    let url = format!("http://{}/closed", boxes.listener);
    for _ in 0..20 {
        let response = curl(&["--http1.1", "-H", "Host: echo.shop", &url]);
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("ok"), "{response}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 20, "a connection per response");
    let inbound = metric(&boxes.b, "request_total{direction=\"inbound\"");
    assert_eq!(inbound, 20.0, "no request failed and was retried");
}

/// Reads one HTTP/1.1 response whose body is `ok` (the counting backend's), or what came before
/// the connection ended.
fn read_ok_response(stream: &mut TcpStream) -> String {
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !response.ends_with(b"\r\n\r\nok") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn a_keep_alive_client_idle_between_requests_keeps_its_connection() {
    // Only `http_idle_timeout` (90 s by default) closes a client's idle connection; the request
    // head deadline runs only while a head is arriving. (hyper's own head timeout, 30 s from
    // the end of the last response, used to close this one.)
    let (backend, _) = counting_backend(None);
    let boxes = two_boxes_to(backend, Some("echo"));
    let mut client = TcpStream::connect(boxes.listener).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for round in 0..2 {
        client.write_all(b"GET /idle HTTP/1.1\r\nHost: echo.shop\r\n\r\n").expect("the connection is open");
        let response = read_ok_response(&mut client);
        assert!(response.starts_with("HTTP/1.1 200"), "request {round} on the connection: {response:?}");
        if round == 0 {
            std::thread::sleep(Duration::from_secs(33));
        }
    }
}

/// Forwards connections to `backend`, counting them.
fn counting_forwarder(backend: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    counting_listener(move |client| {
        let Ok(server) = TcpStream::connect(backend) else { return };
        let _ = (client.set_nodelay(true), server.set_nodelay(true));
        for (mut from, mut to) in [
            (client.try_clone().unwrap(), server.try_clone().unwrap()),
            (server.try_clone().unwrap(), client.try_clone().unwrap()),
        ] {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        }
    })
}

#[test]
fn concurrent_http2_requests_share_one_backend_connection() {
    // 20 streams at once from a cold box B: one of them opens the HTTP/2 connection to the
    // backend and the others wait for it, then share it.
    let (backend, accepted) = counting_forwarder(http_backend());
    let boxes = two_boxes_to(backend, Some("echo"));
    let url = format!("http://{}/together", boxes.listener);
    let mut args = vec!["--http2-prior-knowledge", "--parallel", "--parallel-immediate", "--parallel-max", "20"];
    args.extend(std::iter::repeat_n(url.as_str(), 20));
    let output = curl(&args);
    assert_eq!(output.matches("HTTP/2 200").count(), 20, "{output}");
    let opened = accepted.load(Ordering::SeqCst);
    assert_eq!(opened, 1, "20 concurrent HTTP/2 requests opened {opened} backend connections");
}
