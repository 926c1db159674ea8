//! The proxy between two boxes on loopback: box A's outbound carries a client's TCP over mTLS to
//! box B's inbound, which hands it to B's local backend.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, SystemTime};

use meshkeep::identity::ca::standalone;
use support::{Daemon, free_addr};

/// A TCP echo server on 127.0.0.1 that echoes until the client half-closes, then closes.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 65536];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// A free port on 127.0.0.2 (box B's address).
fn free_port_on_b() -> u16 {
    TcpListener::bind("127.0.0.2:0").expect("127.0.0.2 is loopback").local_addr().unwrap().port()
}

/// Issuer files both boxes share: the same trust domain.
fn shared_issuer(dir: &Path) -> String {
    let material = standalone("cluster.local", SystemTime::now(), Duration::from_secs(86400)).expect("issuer");
    std::fs::write(dir.join("issuer.crt"), &material.certificate).unwrap();
    std::fs::write(dir.join("issuer.key"), &material.private_key).unwrap();
    std::fs::write(dir.join("ca.crt"), &material.trust_anchors).unwrap();
    format!(
        "[identity]\nissuer_certificate = {:?}\nissuer_key = {:?}\ntrust_anchors = {:?}\n",
        dir.join("issuer.crt").display().to_string(),
        dir.join("issuer.key").display().to_string(),
        dir.join("ca.crt").display().to_string()
    )
}

/// Manifests for box A: service echo.shop whose one endpoint is box B (127.0.0.2), run by a
/// pod with service account `sa` (meshed unless `sa` is None).
fn manifests(dir: &Path, backend_port: u16, sa: Option<&str>) {
    let target_ref = if sa.is_some() { "    targetRef: {kind: Pod, namespace: shop, name: echo-0}\n" } else { "" };
    let pod = match sa {
        Some(sa) => format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: echo-0, namespace: shop, labels: {{meshkeep.io/meshed: \"true\"}}}}\nspec: {{serviceAccountName: {sa}, containers: [{{name: echo, image: e}}]}}\nstatus: {{podIP: 127.0.0.2}}\n"
        ),
        None => String::new(),
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("echo.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: shop}}\nspec: {{clusterIP: 10.96.0.50, ports: [{{name: tcp, port: 80, targetPort: {backend_port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: echo-b, namespace: shop, labels: {{kubernetes.io/service-name: echo}}}}\naddressType: IPv4\nports: [{{name: tcp, port: {backend_port}}}]\nendpoints:\n  - addresses: [127.0.0.2]\n{target_ref}{pod}"
        ),
    )
    .unwrap();
}

struct Boxes {
    a: Daemon,
    b: Daemon,
    /// Box A's explicit listener for echo.shop:80.
    listener: SocketAddr,
    b_inbound: SocketAddr,
    _dirs: tempfile::TempDir,
}

fn two_boxes(endpoint_sa: Option<&str>) -> Boxes {
    two_boxes_to(echo_server(), endpoint_sa)
}

fn two_boxes_to(backend: SocketAddr, endpoint_sa: Option<&str>) -> Boxes {
    two_boxes_with(backend, endpoint_sa, "")
}

/// Two boxes whose `[identity]` tables also get `identity_extra` (keys only).
fn two_boxes_with(backend: SocketAddr, endpoint_sa: Option<&str>, identity_extra: &str) -> Boxes {
    let dirs = tempfile::tempdir().unwrap();
    let identity = format!("{}{identity_extra}", shared_issuer(dirs.path()));
    let b_inbound = SocketAddr::from(([127, 0, 0, 2], free_port_on_b()));
    let b = Daemon::builder()
        .config(&format!("{identity}[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"echo\"\n"))
        .env("MESHKEEP_PROXY_INBOUND_LISTEN", b_inbound.to_string())
        .spawn();
    let listener = free_addr();
    manifests(&dirs.path().join("a-manifests"), backend.port(), endpoint_sa);
    let a_config = format!(
        "{identity}[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"web\"\n\
         [upstream.local]\npath = {:?}\npoll_interval = \"200ms\"\n\
         [proxy]\npeer_inbound_port = {}\n[[proxy.listeners]]\nlisten = \"{listener}\"\nservice = \"echo.shop\"\nport = 80\n",
        dirs.path().join("a-manifests").display().to_string(),
        b_inbound.port()
    );
    let a = Daemon::builder().config(&a_config).spawn();
    let (mut a, mut b) = (a, b);
    a.wait_ready();
    b.wait_ready();
    for daemon in [&a, &b] {
        daemon
            .wait_for("proxy certificate", Duration::from_secs(60), |d| d.log().contains("proxy: TLS identity in use"));
    }
    a.wait_for("echo.shop known", Duration::from_secs(30), |d| d.resolve("echo.shop")["result"] == "found");
    Boxes { a, b, listener, b_inbound, _dirs: dirs }
}

/// Sends `payload` through `addr`, half-closes, and reads everything back.
fn round_trip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let writer = {
        let mut stream = stream.try_clone()?;
        let payload = payload.to_vec();
        std::thread::spawn(move || {
            let result = stream.write_all(&payload);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            result
        })
    };
    let mut back = Vec::new();
    stream.read_to_end(&mut back)?;
    writer.join().expect("writer thread")?;
    Ok(back)
}

fn metric(daemon: &Daemon, prefix: &str) -> f64 {
    let (_, text) = daemon.get("/metrics");
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

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

/// An HTTP backend (HTTP/1.1 and HTTP/2 prior knowledge) that echoes the request body and
/// reports the version and Host it saw; `/status/N` answers N.
fn http_backend() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|request: hyper::Request<Incoming>| async move {
                        let version = format!("{:?}", request.version());
                        let host = request
                            .headers()
                            .get("host")
                            .and_then(|h| h.to_str().ok())
                            .map(str::to_owned)
                            .or_else(|| request.uri().authority().map(|a| a.to_string()))
                            .unwrap_or_default();
                        let status = request
                            .uri()
                            .path()
                            .strip_prefix("/status/")
                            .and_then(|s| s.parse::<u16>().ok())
                            .unwrap_or(200);
                        let leaked: Vec<String> = request
                            .headers()
                            .keys()
                            .filter(|k| k.as_str().starts_with("meshkeep-"))
                            .map(|k| k.to_string())
                            .collect();
                        let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let response = hyper::Response::builder()
                            .status(status)
                            .header("x-seen-version", version)
                            .header("x-seen-host", host)
                            .header("x-leaked", leaked.join(","))
                            .body(Full::new(body))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                });
            }
        });
    });
    addr
}

/// Runs curl with `args`; returns (status line info, headers and body as text).
fn curl(args: &[&str]) -> String {
    let output = std::process::Command::new(support::require_tool("curl"))
        .args(["-sS", "--max-time", "30", "-D", "-"])
        .args(args)
        .output()
        .expect("curl");
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn http1_and_http2_cross_two_boxes_and_are_counted() {
    let boxes = two_boxes_to(http_backend(), Some("echo"));
    let url = format!("http://{}/hello", boxes.listener);

    let http1 = curl(&["--http1.1", "-H", "Host: echo.shop", "--data-binary", "ping over http/1.1", &url]);
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
    assert_eq!(inbound, 4.0, "box B counted them too");
    let (_, text) = boxes.a.get("/metrics");
    assert!(text.contains("response_latency_ms_bucket{"), "{text}");
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
