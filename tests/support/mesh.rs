//! Two boxes on loopback for proxy tests: box A (127.0.0.1) has an explicit listener for
//! `echo.shop:80`, whose one endpoint is box B (127.0.0.2); both share an issuer. Also the
//! backends and clients the proxy tests use.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, SystemTime};

use meshkeep::identity::ca::standalone;

use super::{Daemon, free_addr};

/// A TCP echo server on 127.0.0.1 that echoes until the client half-closes, then closes.
pub fn echo_server() -> SocketAddr {
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

/// A free port on 127.0.0.2 (box B's address), outside the ephemeral range: tests running side
/// by side bind backends there with port 0, and one once got the port a box B was about to bind.
pub fn free_port_on_b() -> u16 {
    super::free_port_on([127, 0, 0, 2], false).port()
}

/// Issuer files both boxes share: the same trust domain.
pub fn shared_issuer(dir: &Path) -> String {
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
pub fn manifests(dir: &Path, backend_port: u16, sa: Option<&str>) {
    manifests_speaking(dir, backend_port, sa, None);
}

/// [`manifests`], with `appProtocol: app_protocol` on the service port when it is given.
pub fn manifests_speaking(dir: &Path, backend_port: u16, sa: Option<&str>, app_protocol: Option<&str>) {
    let app_protocol = app_protocol.map(|name| format!(", appProtocol: {name}")).unwrap_or_default();
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
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: shop}}\nspec: {{clusterIP: 10.96.0.50, ports: [{{name: tcp, port: 80, targetPort: {backend_port}{app_protocol}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: echo-b, namespace: shop, labels: {{kubernetes.io/service-name: echo}}}}\naddressType: IPv4\nports: [{{name: tcp, port: {backend_port}}}]\nendpoints:\n  - addresses: [127.0.0.2]\n{target_ref}{pod}"
        ),
    )
    .unwrap();
}

pub struct Boxes {
    pub a: Daemon,
    pub b: Daemon,
    /// Box A's explicit listener for echo.shop:80.
    pub listener: SocketAddr,
    pub b_inbound: SocketAddr,
    pub dirs: tempfile::TempDir,
}

pub fn two_boxes(endpoint_sa: Option<&str>) -> Boxes {
    two_boxes_to(echo_server(), endpoint_sa)
}

pub fn two_boxes_to(backend: SocketAddr, endpoint_sa: Option<&str>) -> Boxes {
    two_boxes_with(backend, endpoint_sa, "")
}

/// Two boxes whose `[identity]` tables also get `identity_extra` (keys only).
pub fn two_boxes_with(backend: SocketAddr, endpoint_sa: Option<&str>, identity_extra: &str) -> Boxes {
    two_boxes_setup(backend, endpoint_sa, identity_extra, "")
}

/// Two boxes whose `[identity]` tables get `identity_extra` and `[proxy]` tables `proxy_extra`.
pub fn two_boxes_setup(
    backend: SocketAddr,
    endpoint_sa: Option<&str>,
    identity_extra: &str,
    proxy_extra: &str,
) -> Boxes {
    two_boxes_custom(backend, &Setup { endpoint_sa, identity_extra, proxy_extra, ..Setup::default() })
}

/// Everything two boxes can be set up with.
#[derive(Clone, Copy)]
pub struct Setup<'a> {
    /// The service account of the pod behind box B's endpoint (None: unmeshed).
    pub endpoint_sa: Option<&'a str>,
    /// Keys for both boxes' `[identity]` tables.
    pub identity_extra: &'a str,
    /// Keys for both boxes' `[proxy]` tables.
    pub proxy_extra: &'a str,
    /// Whole tables appended to box B's configuration.
    pub b_extra: &'a str,
    /// Box A's own service account.
    pub a_service_account: &'a str,
    /// Whole tables appended to both boxes' configurations.
    pub tables: &'a str,
    /// How often box A reads its manifest folder: short, so that tests see changes soon.
    pub poll_interval: &'a str,
    /// The `appProtocol` of echo.shop's port, if any.
    pub app_protocol: Option<&'a str>,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Self {
            endpoint_sa: Some("echo"),
            identity_extra: "",
            proxy_extra: "",
            b_extra: "",
            a_service_account: "web",
            tables: "",
            poll_interval: "200ms",
            app_protocol: None,
        }
    }
}

pub fn two_boxes_custom(backend: SocketAddr, setup: &Setup<'_>) -> Boxes {
    let Setup {
        endpoint_sa,
        identity_extra,
        proxy_extra,
        b_extra,
        a_service_account,
        tables,
        poll_interval,
        app_protocol,
    } = *setup;
    let dirs = tempfile::tempdir().unwrap();
    let identity = format!("{}{identity_extra}", shared_issuer(dirs.path()));
    let b_inbound = SocketAddr::from(([127, 0, 0, 2], free_port_on_b()));
    let b = Daemon::builder()
        .config(&format!(
            "{identity}[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"echo\"\n[proxy]\n{proxy_extra}{b_extra}{tables}"
        ))
        .env("MESHKEEP_PROXY_INBOUND_LISTEN", b_inbound.to_string())
        .spawn();
    let listener = free_addr();
    manifests_speaking(&dirs.path().join("a-manifests"), backend.port(), endpoint_sa, app_protocol);
    let a_config = format!(
        "{identity}[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"{a_service_account}\"\n\
         [upstream.local]\npath = {:?}\npoll_interval = \"{poll_interval}\"\n\
         [proxy]\npeer_inbound_port = {}\n{proxy_extra}[[proxy.listeners]]\nlisten = \"{listener}\"\nservice = \"echo.shop\"\nport = 80\n{tables}",
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
    Boxes { a, b, listener, b_inbound, dirs }
}

/// Sends `payload` through `addr`, half-closes, and reads everything back.
pub fn round_trip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
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

pub fn metric(daemon: &Daemon, prefix: &str) -> f64 {
    let (_, text) = daemon.get("/metrics");
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// An HTTP backend (HTTP/1.1 and HTTP/2 prior knowledge) that streams the request body back
/// and reports the version and Host it saw and any `meshkeep-` header that leaked through;
/// `/status/N` answers N, `/grpc` answers gRPC-style (body, then `grpc-status` trailers).
pub fn http_backend() -> SocketAddr {
    http_backend_on(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// [`http_backend`] on a chosen address (bound by the calling thread, in its network namespace).
pub fn http_backend_on(addr: SocketAddr) -> SocketAddr {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                // As any real server: without it, HTTP/2's small frames wait on delayed ACKs.
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|request| async move {
                        Ok::<_, std::convert::Infallible>(backend_answer(request).await)
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                });
            }
        });
    });
    addr
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

async fn backend_answer(request: hyper::Request<hyper::body::Incoming>) -> hyper::Response<TestBody> {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let version = format!("{:?}", request.version());
    let host = request
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let status = request.uri().path().strip_prefix("/status/").and_then(|s| s.parse::<u16>().ok()).unwrap_or(200);
    let leaked: Vec<String> =
        request.headers().keys().filter(|k| k.as_str().starts_with("meshkeep-")).map(|k| k.to_string()).collect();
    let response = hyper::Response::builder()
        .status(status)
        .header("x-seen-version", version)
        .header("x-seen-host", host)
        .header("x-seen-authority", request.uri().authority().map(|a| a.to_string()).unwrap_or_default())
        .header("x-leaked", leaked.join(","));
    if request.uri().path() == "/grpc" {
        let received = request.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        trailers.insert("grpc-message", http::HeaderValue::from_str(&format!("received {received} bytes")).unwrap());
        let frames: Vec<Result<Frame<bytes::Bytes>, BoxError>> =
            vec![Ok(Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\x02hi"))), Ok(Frame::trailers(trailers))];
        let body = StreamBody::new(futures::stream::iter(frames)).boxed();
        return response.header("content-type", "application/grpc").body(body).unwrap();
    }
    response.body(request.into_body().map_err(Into::into).boxed()).unwrap()
}

/// Runs curl with `args`; returns (status line info, headers and body as text).
pub fn curl(args: &[&str]) -> String {
    let output = std::process::Command::new(super::require_tool("curl"))
        .args(["-sS", "--max-time", "30", "-D", "-"])
        .args(args)
        .output()
        .expect("curl");
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}
