//! Traffic management end to end with real backends on loopback addresses: the balancer
//! avoids a slow endpoint, ejects a failing one and lets it back, retries hide intermittent
//! failures for GETs and not for POSTs, a route marked retryable retries POSTs on its codes,
//! the budget caps retries in an outage, a 90/10 split
//! holds, topology prefers the box's zone, timeouts answer 504; and authorization between two
//! boxes by TrafficTarget, changed live.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::mesh::*;
use support::{Daemon, free_addr};

/// How a test backend answers.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    delay: Duration,
    /// Answer 500 to every request whose number (from 1) is a multiple of this.
    fail_every: Option<u64>,
}

/// An HTTP/1.1 backend on `ip:port` counting what it serves.
struct Backend {
    hits: Arc<AtomicU64>,
    mode: Arc<Mutex<Mode>>,
}

impl Backend {
    fn start(ip: [u8; 4], port: u16, mode: Mode) -> Backend {
        let listener = TcpListener::bind(SocketAddr::from((ip, port))).expect("bind backend");
        let (hits, mode) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(mode)));
        let backend = Backend { hits: Arc::clone(&hits), mode: Arc::clone(&mode) };
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (hits, mode) = (Arc::clone(&hits), Arc::clone(&mode));
                std::thread::spawn(move || serve(stream, &hits, &mode));
            }
        });
        backend
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

/// Keep-alive HTTP/1.1: reads heads (and content-length or chunked bodies), answers each.
fn serve(mut stream: TcpStream, hits: &AtomicU64, mode: &Mutex<Mode>) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let chunked = head.lines().any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        // A chunked body (without trailers) ends with the zero-length chunk.
        let body_end = |buf: &[u8]| match chunked {
            true => buf[end + 4..].windows(5).position(|w| w == b"0\r\n\r\n").map(|at| end + 4 + at + 5),
            false => (buf.len() >= end + 4 + length).then_some(end + 4 + length),
        };
        let consumed = loop {
            if let Some(consumed) = body_end(&buf) {
                break consumed;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..consumed);
        let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
        let mode = *mode.lock().unwrap();
        std::thread::sleep(mode.delay);
        let status = if mode.fail_every.is_some_and(|every| n.is_multiple_of(every)) {
            "500 Internal Server Error"
        } else {
            "200 OK"
        };
        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nok");
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// A port free on every one of these loopback addresses.
fn common_port(ips: &[[u8; 4]]) -> u16 {
    loop {
        let port = TcpListener::bind(SocketAddr::from((ips[0], 0))).unwrap().local_addr().unwrap().port();
        if ips.iter().all(|ip| TcpListener::bind(SocketAddr::from((*ip, port))).is_ok()) {
            return port;
        }
    }
}

/// Endpoint: (last octet of 127.0.0.x, zone, ready).
fn service_yaml(name: &str, cluster_ip: &str, port: u16, endpoints: &[(u8, &str, bool)]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(last, zone, ready)| {
            format!("  - {{addresses: [127.0.0.{last}], zone: {zone}, nodeName: node-{last}, conditions: {{ready: {ready}}}}}\n")
        })
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: {cluster_ip}, ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n{endpoints}"
    )
}

/// A daemon whose explicit listener serves `web.shop` (it names no port: the service's only one,
/// 80), with `manifests` and `extra` config.
fn daemon(dir: &Path, manifests: &str, extra: &str) -> (Daemon, SocketAddr) {
    std::fs::create_dir_all(dir.join("m")).unwrap();
    std::fs::write(dir.join("m/site.yaml"), manifests).unwrap();
    let listener = free_addr();
    let daemon = Daemon::start(&format!(
        "[upstream.local]\npath = {:?}\npoll_interval = \"200ms\"\n[[proxy.listeners]]\nlisten = \"{listener}\"\nservice = \"web.shop\"\n{extra}",
        dir.join("m").display().to_string()
    ));
    daemon.wait_for("web.shop known", Duration::from_secs(30), |d| d.resolve("web.shop")["result"] == "found");
    (daemon, listener)
}

/// Sends `count` requests on one keep-alive connection; returns the status codes.
fn requests(addr: SocketAddr, method: &str, count: usize) -> Vec<u16> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.set_nodelay(true).unwrap();
    let body = if method == "POST" { "content-length: 4\r\n\r\ndata" } else { "\r\n" };
    let request = format!("{method} /work HTTP/1.1\r\nhost: web.shop\r\n{body}");
    let mut statuses = Vec::with_capacity(count);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..count {
        // One write per request: split writes would wait on delayed ACKs (Nagle).
        stream.write_all(request.as_bytes()).unwrap();
        // Read one response: head, then its content-length body.
        let (status, total) = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    break (status, end + 4 + length);
                }
            }
            let n = stream.read(&mut chunk).expect("read a response");
            assert!(n > 0, "the proxy closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        };
        buf.drain(..total);
        statuses.push(status);
    }
    statuses
}

/// `clients` keep-alive connections sending `each` requests at the same time.
fn parallel(addr: SocketAddr, method: &'static str, clients: usize, each: usize) -> Vec<u16> {
    let threads: Vec<_> = (0..clients).map(|_| std::thread::spawn(move || requests(addr, method, each))).collect();
    threads.into_iter().flat_map(|t| t.join().expect("client thread")).collect()
}

#[test]
fn a_slow_endpoint_receives_little_traffic() {
    let ips = [[127, 0, 0, 2], [127, 0, 0, 3]];
    let port = common_port(&ips);
    // Slow enough to stand out from the proxy's own latency even under qemu-user emulation.
    let slow = Backend::start(ips[0], port, Mode { delay: Duration::from_millis(150), ..Mode::default() });
    let fast = Backend::start(ips[1], port, Mode::default());
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, listener) =
        daemon(dir.path(), &service_yaml("web", "10.96.1.1", port, &[(2, "z", true), (3, "z", true)]), "");
    let statuses = requests(listener, "GET", 200);
    assert!(statuses.iter().all(|s| *s == 200));
    let share = slow.hits() as f64 / (slow.hits() + fast.hits()) as f64;
    assert!(
        share < 0.15,
        "the 150 ms endpoint got {:.0}% ({} of {})",
        share * 100.0,
        slow.hits(),
        slow.hits() + fast.hits()
    );
}

#[test]
fn a_failing_endpoint_is_ejected_and_comes_back() {
    let ips = [[127, 0, 0, 2], [127, 0, 0, 3]];
    let port = common_port(&ips);
    // A few milliseconds each, so requests overlap and both endpoints get traffic.
    let delay = Duration::from_millis(3);
    let failing = Backend::start(ips[0], port, Mode { fail_every: Some(1), delay });
    let healthy = Backend::start(ips[1], port, Mode { delay, ..Mode::default() });
    let dir = tempfile::tempdir().unwrap();
    let (daemon, listener) = daemon(
        dir.path(),
        &service_yaml("web", "10.96.1.1", port, &[(2, "z", true), (3, "z", true)]),
        "[traffic]\nretries = false\nejection_backoff_min = \"3s\"\nejection_jitter = 0.0\n",
    );
    let statuses = parallel(listener, "POST", 4, 10);
    let failures = statuses.iter().filter(|s| **s == 500).count();
    // Seven in a row eject it; at most the three others in flight at that moment follow.
    assert!((7..=10).contains(&failures), "the failing endpoint saw {failures} requests");
    assert_eq!(failing.hits(), failures as u64);
    let endpoints = String::from_utf8_lossy(&daemon.cli(&["endpoints", "web.shop"]).stdout).into_owned();
    assert!(endpoints.contains("ejected"), "{endpoints}");

    failing.set(Mode { delay, ..Mode::default() });
    std::thread::sleep(Duration::from_millis(3300));
    let before = failing.hits();
    let statuses = parallel(listener, "POST", 4, 50);
    assert!(statuses.iter().all(|s| *s == 200));
    assert!(
        failing.hits() > before + 20,
        "the recovered endpoint is back in rotation ({} more)",
        failing.hits() - before
    );
    assert!(healthy.hits() > 0);
}

#[test]
fn retries_hide_intermittent_failures_for_gets_but_not_posts() {
    let port = common_port(&[[127, 0, 0, 2]]);
    let backend = Backend::start([127, 0, 0, 2], port, Mode { fail_every: Some(3), ..Mode::default() });
    let dir = tempfile::tempdir().unwrap();
    let (daemon, listener) = daemon(
        dir.path(),
        &service_yaml("web", "10.96.1.1", port, &[(2, "z", true)]),
        "[traffic]\nfailure_accrual = 100\n",
    );
    let gets = requests(listener, "GET", 60);
    assert!(gets.iter().all(|s| *s == 200), "every GET succeeded: {gets:?}");
    assert!(backend.hits() > 60, "retries reached the backend");
    let posts = requests(listener, "POST", 60);
    let failed = posts.iter().filter(|s| **s == 500).count();
    assert!((15..=25).contains(&failed), "POSTs are not retried: {failed} of 60 failed");
    let (_, metrics) = daemon.get("/metrics");
    assert!(
        metrics.contains("meshkeep_retries_total{authority=\"web.shop.svc.cluster.local:80\",result=\"retried\"}"),
        "{metrics}"
    );
}

#[test]
fn a_route_marked_retryable_retries_posts_on_its_codes_after_its_backoff() {
    let port = common_port(&[[127, 0, 0, 2]]);
    let backend = Backend::start([127, 0, 0, 2], port, Mode { fail_every: Some(3), ..Mode::default() });
    let route = |codes: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web-retry, namespace: shop}}\nspec:\n  parentRefs: [{{group: core, kind: Service, name: web, port: 80}}]\n  rules:\n    - matches: [{{path: {{type: PathPrefix, value: /work}}}}]\n      backendRefs: [{{name: web, port: 80}}]\n      retry: {{codes: [{codes}], attempts: 2, backoff: 50ms}}\n"
        )
    };
    let service = service_yaml("web", "10.96.1.1", port, &[(2, "z", true)]);
    let dir = tempfile::tempdir().unwrap();
    let (daemon, listener) =
        daemon(dir.path(), &format!("{service}{}", route("503")), "[traffic]\nfailure_accrual = 100\n");
    // 500 is not among the route's codes: neither POSTs nor GETs are retried.
    for method in ["POST", "GET"] {
        let failed = requests(listener, method, 30).iter().filter(|s| **s == 500).count();
        assert!((8..=12).contains(&failed), "{method}: {failed} of 30 failed");
    }
    assert_eq!(backend.hits(), 60);

    std::fs::write(dir.path().join("m/site.yaml"), format!("{service}{}", route("500, 503"))).unwrap();
    // The new route is in force once three POSTs in a row succeed (under the old one every
    // third failed); a new snapshot alone does not say so (source metadata changes it too).
    daemon.wait_for("the route retries 500", Duration::from_secs(60), |_| {
        requests(listener, "POST", 3).iter().all(|s| *s == 200)
    });
    let (hits, started) = (backend.hits(), Instant::now());
    let posts = requests(listener, "POST", 60);
    assert!(posts.iter().all(|s| *s == 200), "every POST succeeded: {posts:?}");
    assert!(backend.hits() >= hits + 60 + 19, "about 20 retries reached the backend: {}", backend.hits() - hits);
    assert!(started.elapsed() >= Duration::from_millis(19 * 50), "each retry waited the route's 50 ms backoff");

    // Bodies of unknown length (chunked) are kept for replay too, up to the limit.
    for _ in 0..9 {
        let chunked = curl(&[
            "--http1.1",
            "-H",
            "Host: web.shop",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "a chunked body",
            &format!("http://{listener}/work"),
        ]);
        assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    }

    // A path no rule of the route matches is refused with 404, and counted like any answer.
    let refused = curl(&["--http1.1", "-H", "Host: web.shop", &format!("http://{listener}/elsewhere")]);
    assert!(refused.starts_with("HTTP/1.1 404"), "{refused}");
    let (_, metrics) = daemon.get("/metrics");
    let counted = "response_total{direction=\"outbound\",authority=\"web.shop.svc.cluster.local:80\",tls=\"no_identity\",status_code=\"404\",classification=\"success\"} 1";
    assert!(metrics.lines().any(|l| l.starts_with(counted)), "{metrics}");
}

#[test]
fn the_budget_caps_retries_in_a_full_outage() {
    let port = common_port(&[[127, 0, 0, 2]]);
    let backend = Backend::start([127, 0, 0, 2], port, Mode { fail_every: Some(1), ..Mode::default() });
    let dir = tempfile::tempdir().unwrap();
    let (daemon, listener) = daemon(
        dir.path(),
        &service_yaml("web", "10.96.1.1", port, &[(2, "z", true)]),
        "[traffic]\nfailure_accrual = 100000\nretry_budget_min_per_second = 1\nretry_budget_window = \"10s\"\nretry_budget_ratio = 0.2\n",
    );
    let started = Instant::now();
    let statuses = requests(listener, "GET", 100);
    assert!(started.elapsed() < Duration::from_secs(10), "the test must stay inside one budget window");
    assert!(statuses.iter().all(|s| *s == 500));
    // 100 tries, plus 20 % of them, plus 1/s over the 10 s window.
    let hits = backend.hits();
    assert!((101..=130).contains(&hits), "{hits} backend hits for 100 requests");
    let (_, metrics) = daemon.get("/metrics");
    assert!(metrics.contains("result=\"budget_exhausted\""), "{metrics}");
}

#[test]
fn a_90_10_split_holds_over_thousands_of_requests() {
    let ips = [[127, 0, 0, 2], [127, 0, 0, 3]];
    let port = common_port(&ips);
    let v1 = Backend::start(ips[0], port, Mode::default());
    let v2 = Backend::start(ips[1], port, Mode::default());
    let manifests = format!(
        "{}{}---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: web-canary, namespace: shop}}\nspec:\n  service: web\n  backends:\n    - {{service: web, weight: 90}}\n    - {{service: web-v2, weight: 10}}\n",
        service_yaml("web", "10.96.1.1", port, &[(2, "z", true)]),
        service_yaml("web-v2", "10.96.1.2", port, &[(3, "z", true)])
    );
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, listener) = daemon(dir.path(), &manifests, "");
    let total = 3000;
    let statuses = requests(listener, "GET", total);
    assert!(statuses.iter().all(|s| *s == 200));
    let share = v2.hits() as f64 / total as f64;
    // Binomial(3000, 0.1): standard deviation 0.55 %; 3 % is over five of them.
    assert!((0.07..=0.13).contains(&share), "v2 got {:.1}% (v1 {}, v2 {})", share * 100.0, v1.hits(), v2.hits());
}

#[test]
fn the_same_zone_is_preferred_and_the_fallback_works() {
    let ips = [[127, 0, 0, 2], [127, 0, 0, 3]];
    let port = common_port(&ips);
    let near = Backend::start(ips[0], port, Mode::default());
    let far = Backend::start(ips[1], port, Mode::default());
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, listener) = daemon(
        dir.path(),
        &service_yaml("web", "10.96.1.1", port, &[(2, "zone-a", true), (3, "zone-b", true)]),
        "[node]\nname = \"edge-1\"\nzone = \"zone-a\"\n",
    );
    assert!(requests(listener, "GET", 50).iter().all(|s| *s == 200));
    assert_eq!((near.hits(), far.hits()), (50, 0), "all to the same zone");

    // The near endpoint stops being ready: traffic falls back to the other zone.
    std::fs::write(
        dir.path().join("m/site.yaml"),
        service_yaml("web", "10.96.1.1", port, &[(2, "zone-a", false), (3, "zone-b", true)]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(requests(listener, "GET", 20).iter().all(|s| *s == 200));
    assert_eq!(far.hits(), 20, "fallback to the other zone");
}

#[test]
fn a_slow_response_times_out_with_504() {
    let port = common_port(&[[127, 0, 0, 2]]);
    let _backend = Backend::start([127, 0, 0, 2], port, Mode { delay: Duration::from_secs(3), ..Mode::default() });
    let dir = tempfile::tempdir().unwrap();
    let (daemon, listener) = daemon(
        dir.path(),
        &service_yaml("web", "10.96.1.1", port, &[(2, "z", true)]),
        "[traffic]\nretries = false\n[traffic.services.\"web.shop\"]\nresponse_timeout = \"300ms\"\n",
    );
    let started = Instant::now();
    assert_eq!(requests(listener, "GET", 1), vec![504]);
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());
    let (_, metrics) = daemon.get("/metrics");
    assert!(metrics.contains("status_code=\"504\""), "{metrics}");
}

/// Policy for box B: `web` may GET /allowed... with the Host curl sends (box A's listener; it
/// crosses as :authority alone, and box B must have it back before authorizing), over HTTP;
/// TCP on no port.
fn policy(dir: &Path, sources: &[&str]) {
    let sources: String =
        sources.iter().map(|s| format!("    - {{kind: ServiceAccount, name: {s}, namespace: shop}}\n")).collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("policy.yaml"),
        format!(
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {{name: echo-routes, namespace: shop}}\nspec:\n  matches:\n    - {{name: allowed, methods: [GET], pathRegex: \"/allowed(/.*)?\", headers: {{host: '127.0.0.1:[0-9]+'}}}}\n---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: echo-readers, namespace: shop}}\nspec:\n  destination: {{kind: ServiceAccount, name: echo, namespace: shop}}\n  rules:\n    - {{kind: HTTPRouteGroup, name: echo-routes, matches: [allowed]}}\n  sources:\n{sources}"
        ),
    )
    .unwrap();
}

/// Box B's configuration for reading its policy from `dir`, as often as the tests' boxes do.
fn policy_source(dir: &Path) -> String {
    format!("[upstream.local]\npath = {:?}\npoll_interval = \"200ms\"\n", dir.display().to_string())
}

#[test]
fn traffic_targets_authorize_by_identity_and_changes_apply_live() {
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("b-policy");
    policy(&policy_dir, &["web"]);
    let b_extra = policy_source(&policy_dir);
    // Box A runs as `other`, whom the policy does not list.
    let boxes =
        two_boxes_custom(http_backend(), &Setup { b_extra: &b_extra, a_service_account: "other", ..Setup::default() });
    boxes.b.wait_for("policy loaded", Duration::from_secs(30), |d| {
        d.status()["sources"].as_array().is_some_and(|s| s.iter().any(|s| s["objects"]["TrafficTarget"] == 1))
    });
    let url = |path: &str| format!("http://{}{path}", boxes.listener);
    let denied = curl(&["--http1.1", &url("/allowed/1")]);
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(denied.contains("meshkeep-error: forbidden"), "a short reason header\n{denied}");
    // Opaque TCP from A is closed (no TCPRoute allows anything).
    let tcp = round_trip(boxes.listener, b"\x00\x01 not http at all").unwrap_or_default();
    assert!(tcp.is_empty(), "the TCP connection must be closed");

    // Allow `other` too, in the manifests; no restart.
    policy(&policy_dir, &["web", "other"]);
    boxes.b.wait_for("the new policy allows other", Duration::from_secs(30), |_| {
        curl(&["--http1.1", &url("/allowed/1")]).starts_with("HTTP/1.1 200")
    });
    let outside = curl(&["--http1.1", &url("/secret")]);
    assert!(outside.starts_with("HTTP/1.1 403"), "only the routes the target names\n{outside}");
    let other_host = curl(&["--http1.1", "-H", "Host: echo.shop", &url("/allowed/1")]);
    assert!(other_host.starts_with("HTTP/1.1 403"), "the route's host match holds\n{other_host}");
    let (_, metrics) = boxes.b.get("/metrics");
    assert!(metrics.contains("inbound_http_authz_allow_total{target_port="), "{metrics}");
    assert!(metrics.contains("inbound_http_authz_deny_total{target_port="), "{metrics}");
    assert!(metrics.contains("inbound_tcp_authz_deny_total{target_port="), "{metrics}");
}

/// Under the default policy box B keeps a peer connection's verdict for its next requests; a
/// TrafficTarget that appears must still apply to them at once (the requests of several curls
/// share box A's one connection to B).
#[test]
fn a_verdict_kept_for_a_peer_connection_gives_way_to_a_new_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("b-policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    let b_extra = policy_source(&policy_dir);
    let boxes =
        two_boxes_custom(http_backend(), &Setup { b_extra: &b_extra, a_service_account: "other", ..Setup::default() });
    let url = |path: &str| format!("http://{}{path}", boxes.listener);
    // Until box B has read its (empty) folder, its TrafficTargets are unknown and it denies.
    boxes.b.wait_for("no TrafficTarget: the default policy lets `other` in", Duration::from_secs(30), |_| {
        curl(&["--http1.1", &url("/allowed/1")]).starts_with("HTTP/1.1 200")
    });
    let allowed_by_default = || {
        let (_, metrics) = boxes.b.get("/metrics");
        metrics
            .lines()
            .find(|l| l.starts_with("inbound_http_authz_allow_total{") && l.contains("authz=\"default:"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    let before = allowed_by_default().unwrap_or(0);
    for _ in 0..3 {
        let allowed = curl(&["--http1.1", &url("/allowed/1")]);
        assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    }
    assert_eq!(allowed_by_default(), Some(before + 3), "each request is counted, kept verdict or not");
    let inbound = metric(&boxes.b, "tcp_open_total{direction=\"inbound\"");
    assert_eq!(inbound, 1.0, "the requests of every curl share box A's one connection to box B");

    // A policy that lists only `web`: `other`'s next request on the same connection is denied.
    policy(&policy_dir, &["web"]);
    boxes.b.wait_for("the new policy denies other", Duration::from_secs(30), |_| {
        curl(&["--http1.1", &url("/allowed/1")]).starts_with("HTTP/1.1 403")
    });
}

#[test]
fn an_http_route_chooses_by_header_and_its_timeout_answers_504() {
    let ips = [[127, 0, 0, 2], [127, 0, 0, 3]];
    let port = common_port(&ips);
    let stable = Backend::start(ips[0], port, Mode::default());
    let canary = Backend::start(ips[1], port, Mode { delay: Duration::from_secs(2), ..Mode::default() });
    let route = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-canary, namespace: shop}\nspec:\n  parentRefs: [{group: core, kind: Service, name: web, port: 80}]\n  rules:\n    - matches: [{headers: [{name: x-canary, value: \"1\"}]}]\n      backendRefs: [{name: web-v2, port: 80}]\n      timeouts: {request: 300ms}\n    - backendRefs: [{name: web, port: 80}]\n";
    let manifests = format!(
        "{}{}{route}",
        service_yaml("web", "10.96.1.1", port, &[(2, "z", true)]),
        service_yaml("web-v2", "10.96.1.2", port, &[(3, "z", true)])
    );
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, listener) = daemon(dir.path(), &manifests, "");
    let plain = curl(&["--http1.1", "-H", "Host: web.shop", &format!("http://{listener}/")]);
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    assert_eq!((stable.hits(), canary.hits()), (1, 0));
    let started = Instant::now();
    let slow = curl(&["--http1.1", "-H", "Host: web.shop", "-H", "x-canary: 1", &format!("http://{listener}/")]);
    assert!(slow.starts_with("HTTP/1.1 504"), "{slow}");
    assert!(started.elapsed() < Duration::from_millis(1500), "the rule's 300 ms, not the backend's 2 s");
    assert_eq!(canary.hits(), 1, "the header chose the canary, and its timeout left no time to retry");
}
