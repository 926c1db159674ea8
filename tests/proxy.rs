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
    let dirs = tempfile::tempdir().unwrap();
    let identity = shared_issuer(dirs.path());
    let backend = echo_server();
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
