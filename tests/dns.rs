//! The DNS server with dig: mesh names from the cache (A, AAAA, SRV, headless, NXDOMAIN vs
//! NODATA vs SERVFAIL), truncation and TCP, forwarding with a cache, and answers after a
//! restart while the upstream cluster is down.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::fake_kube::FakeKube;
use support::objects::{endpoint_slice, pod, service};
use support::{Daemon, require_tool};

/// Runs dig against `server`; returns its full output.
fn dig(server: SocketAddr, args: &[&str]) -> String {
    let output = std::process::Command::new(require_tool("dig"))
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=3", "+tries=1"])
        .args(args)
        .output()
        .expect("dig");
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn short(server: SocketAddr, args: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> =
        dig(server, &[args, &["+short"]].concat()).lines().map(str::to_owned).filter(|l| !l.is_empty()).collect();
    lines.sort();
    lines
}

fn status(output: &str) -> &str {
    output.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("none")
}

/// Manifests: web (dual-stack ClusterIP, named port), db (headless, two ready endpoints with
/// hostnames and one not ready), big (headless, 80 endpoints), idle (headless, none ready).
fn manifests(dir: &std::path::Path) {
    let endpoint = |ip: String, hostname: Option<&str>, ready: bool| {
        let host = hostname.map(|h| format!("hostname: {h}, ")).unwrap_or_default();
        format!("  - {{addresses: [{ip}], {host}conditions: {{ready: {ready}}}}}\n")
    };
    let headless = |name: &str, endpoints: String| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: None, ports: [{{name: pg, port: 5432, protocol: TCP}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: pg, port: 5432, protocol: TCP}}]\nendpoints:\n{endpoints}"
        )
    };
    let mut text = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], ipFamilies: [IPv4, IPv6], ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]}\n",
    );
    text += &headless(
        "db",
        [
            endpoint("10.1.0.2".into(), Some("db-0"), true),
            endpoint("10.1.0.3".into(), Some("db-1"), true),
            endpoint("10.1.0.9".into(), Some("db-2"), false),
        ]
        .concat(),
    );
    text += &headless("big", (0..80).map(|i| endpoint(format!("10.2.0.{i}"), None, true)).collect());
    text += &headless("idle", endpoint("10.3.0.1".into(), Some("idle-0"), false));
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("shop.yaml"), text).unwrap();
}

fn daemon_with(extra: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    manifests(&dir.path().join("m"));
    let daemon =
        Daemon::start(&format!("[upstream.local]\npath = {:?}\n{extra}", dir.path().join("m").display().to_string()));
    daemon.wait_for("web.shop known", Duration::from_secs(30), |d| d.resolve("web.shop")["result"] == "found");
    (daemon, dir)
}

#[test]
fn mesh_names_answer_every_record_type() {
    let (daemon, _dir) = daemon_with("");
    let dns = daemon.dns;
    assert_eq!(short(dns, &["web.shop.svc.cluster.local", "A"]), vec!["10.96.0.10"]);
    assert_eq!(short(dns, &["web.shop.svc.cluster.local", "AAAA"]), vec!["fd00::10"]);
    assert_eq!(short(dns, &["web.shop", "A"]), vec!["10.96.0.10"], "short names");
    assert_eq!(
        short(dns, &["_http._tcp.web.shop.svc.cluster.local", "SRV"]),
        vec!["0 100 80 web.shop.svc.cluster.local."]
    );
    assert_eq!(short(dns, &["db.shop.svc.cluster.local", "A"]), vec!["10.1.0.2", "10.1.0.3"], "ready endpoints only");
    assert_eq!(short(dns, &["db-1.db.shop.svc.cluster.local", "A"]), vec!["10.1.0.3"]);
    assert_eq!(
        short(dns, &["_pg._tcp.db.shop.svc.cluster.local", "SRV"]),
        vec!["0 100 5432 db-0.db.shop.svc.cluster.local.", "0 100 5432 db-1.db.shop.svc.cluster.local."]
    );

    let full = dig(dns, &["web.shop.svc.cluster.local", "A"]);
    assert!(full.contains("flags: qr aa rd"), "authoritative\n{full}");

    let missing = dig(dns, &["nope.shop.svc.cluster.local", "A"]);
    assert_eq!(status(&missing), "NXDOMAIN", "{missing}");
    assert!(missing.contains("SOA"), "negative answers carry the SOA\n{missing}");
    let idle = dig(dns, &["idle.shop.svc.cluster.local", "A"]);
    assert_eq!(status(&idle), "NOERROR", "exists without ready endpoints: not NXDOMAIN\n{idle}");
    assert!(idle.contains("ANSWER: 0"), "{idle}");
    let other = dig(dns, &["example.com", "A"]);
    assert_eq!(status(&other), "REFUSED", "no upstreams configured\n{other}");

    let (_, metrics) = daemon.get("/metrics");
    assert!(
        metrics.contains("meshkeep_dns_queries_total{type=\"A\",rcode=\"NXDOMAIN\",answered_by=\"mesh\"} 1"),
        "{metrics}"
    );
}

#[test]
fn large_answers_are_truncated_over_udp_and_complete_over_tcp() {
    let (daemon, _dir) = daemon_with("");
    let udp_only = dig(daemon.dns, &["big.shop.svc.cluster.local", "A", "+ignore", "+noedns"]);
    assert!(udp_only.contains(" tc"), "80 addresses do not fit 512 bytes: TC is set\n{udp_only}");
    // dig retries over TCP by itself after TC; +tcp asks over TCP from the start.
    assert_eq!(short(daemon.dns, &["big.shop.svc.cluster.local", "A"]).len(), 80);
    assert_eq!(short(daemon.dns, &["big.shop.svc.cluster.local", "A", "+tcp"]).len(), 80);
    assert_eq!(short(daemon.dns, &["web.shop.svc.cluster.local", "A", "+tcp"]), vec!["10.96.0.10"]);
}

/// A resolver on loopback that answers every A question with 192.0.2.7 (TTL 60) and counts
/// the questions it was asked.
fn fake_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    use hickory_proto::op::{Message, Metadata};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
            answer.metadata = Metadata::response_from_request(&query.metadata);
            answer.metadata.recursion_available = true;
            for question in &query.queries {
                answer.add_query(question.clone());
                let record = Record::from_rdata(question.name().clone(), 60, RData::A(A::new(192, 0, 2, 7)));
                answer.add_answer(record);
            }
            let _ = socket.send_to(&answer.to_vec().unwrap(), peer);
        }
    });
    (addr, asked)
}

#[test]
fn other_names_are_forwarded_in_order_and_cached() {
    let (upstream, asked) = fake_upstream();
    // The first upstream never answers (nothing listens there): the second one does.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (daemon, _dir) = daemon_with(&format!(
        "[dns]\nupstreams = [\"{}\", \"{upstream}\"]\nupstream_timeout = \"300ms\"\n",
        silent.local_addr().unwrap()
    ));
    assert_eq!(short(daemon.dns, &["www.example.com", "A"]), vec!["192.0.2.7"]);
    assert_eq!(short(daemon.dns, &["WWW.example.com", "A"]), vec!["192.0.2.7"], "from the cache");
    assert_eq!(asked.load(Ordering::SeqCst), 1, "the second question was answered from the cache");
    let full = dig(daemon.dns, &["www.example.com", "A"]);
    assert!(full.contains(" ra"), "recursion is available\n{full}");
    // Mesh names never leave the box.
    assert_eq!(short(daemon.dns, &["web.shop.svc.cluster.local", "A"]), vec!["10.96.0.10"]);
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    let (_, metrics) = daemon.get("/metrics");
    assert!(metrics.contains("meshkeep_dns_forwarded_total{result=\"cached\"} 2"), "{metrics}");
}

#[test]
fn unknown_is_servfail_and_the_cache_answers_after_a_restart_while_the_cluster_is_down() {
    let kube = FakeKube::start();
    kube.apply(service("shop", "api", "10.96.0.11", 80));
    kube.apply(pod("shop", "api-1", "10.1.0.1", "api"));
    kube.apply(endpoint_slice("shop", "api", "a", &[("10.1.0.1", "api-1")]));
    let config_dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(config_dir.path());
    let link =
        format!("[upstream.links.east]\nkubeconfig = {:?}\nmode = \"federated\"\n", kubeconfig.display().to_string());

    // Before the first sync the cache cannot know: SERVFAIL, never NXDOMAIN.
    kube.down();
    let mut daemon = Daemon::start(&link);
    let unknown = dig(daemon.dns, &["nope.shop.svc.cluster.local", "A"]);
    assert_eq!(status(&unknown), "SERVFAIL", "{unknown}");

    kube.up();
    daemon.wait_for("api.shop synced", Duration::from_secs(30), |d| d.resolve("api.shop")["result"] == "found");
    assert_eq!(short(daemon.dns, &["api.shop.svc.cluster.local", "A"]), vec!["10.96.0.11"]);

    // The backhoe: the cluster is gone, then the power (after the store's 100 ms flush
    // interval has committed the sync: a power cut loses at most that much).
    kube.down();
    std::thread::sleep(Duration::from_millis(500));
    daemon.kill9();
    daemon.respawn();
    daemon.wait_ready();
    assert_eq!(short(daemon.dns, &["api.shop.svc.cluster.local", "A"]), vec!["10.96.0.11"]);
    let missing = dig(daemon.dns, &["nope.shop.svc.cluster.local", "A"]);
    assert_eq!(status(&missing), "NXDOMAIN", "the cached listing still says what does not exist\n{missing}");
}
