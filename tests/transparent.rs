//! Transparent mode in a network namespace this test creates: with `meshkeep redirect install`
//! in force, a plain `curl http://<ClusterIP>` from an ordinary user reaches the backend through
//! box A's outbound, mTLS, and box B's inbound, and so does a request to an unknown address whose
//! Host header names the service. Needs root (namespaces, nftables).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use meshkeep::identity::ca::standalone;
use support::mesh::metric;
use support::netns::Lab;
use support::{Daemon, meshkeep, require_tool};

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// Moves this test's thread into a new, private network namespace (unshare affects only the
/// calling thread); the processes it spawns live there too, and it vanishes with them.
fn enter_new_netns() -> bool {
    if !nix::unistd::getuid().is_root() {
        support::skip("transparent-mode test needs root (network namespaces, nftables)");
        return false;
    }
    if std::env::var_os("MESHKEEP_UNDER_QEMU_USER").is_some() {
        // qemu-user answers getsockopt(SO_ORIGINAL_DST) with ENOPROTOOPT, so an emulated daemon
        // cannot learn where a redirected connection was going. The native run covers this.
        support::skip(
            "transparent-mode test cannot run under qemu-user (SO_ORIGINAL_DST is not emulated); the native run covers it",
        );
        return false;
    }
    for tool in ["ip", "nft", "setpriv", "curl", "python3"] {
        require_tool(tool);
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare the network namespace");
    run("ip", &["link", "set", "lo", "up"]);
    // ClusterIPs need a route (with a loopback source) before the redirect rule rewrites them.
    run("ip", &["route", "add", "10.96.0.0/12", "dev", "lo", "src", "127.0.0.1"]);
    true
}

struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn curl_to_a_cluster_ip_goes_through_both_proxies() {
    if !enter_new_netns() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    // The backend on "box B": a real HTTP server.
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("marker.txt"), "served by the backend behind box B\n").unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _backend = Backend(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
                site.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python http.server"),
    );

    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the backend did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let material = standalone("cluster.local", SystemTime::now(), Duration::from_secs(86400)).unwrap();
    for (file, text) in [
        ("issuer.crt", &material.certificate),
        ("issuer.key", &material.private_key),
        ("ca.crt", &material.trust_anchors),
    ] {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let identity = format!(
        "[identity]\nissuer_certificate = {:?}\nissuer_key = {:?}\ntrust_anchors = {:?}\n",
        dir.path().join("issuer.crt").display().to_string(),
        dir.path().join("issuer.key").display().to_string(),
        dir.path().join("ca.crt").display().to_string()
    );
    let b_inbound = SocketAddr::from(([127, 0, 0, 2], 4143));
    let mut b = Daemon::builder()
        .config(&format!("{identity}[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"web\"\n"))
        .env("MESHKEEP_PROXY_INBOUND_LISTEN", b_inbound.to_string())
        .spawn();

    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("web.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{clusterIP: 10.96.0.50, ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-b, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n  - addresses: [127.0.0.2]\n    targetRef: {{kind: Pod, namespace: shop, name: web-0}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: web-0, namespace: shop, labels: {{meshkeep.io/meshed: \"true\"}}}}\nspec: {{serviceAccountName: web, containers: [{{name: web, image: w}}]}}\nstatus: {{podIP: 127.0.0.2}}\n"
        ),
    )
    .unwrap();
    let a_config = format!(
        "{identity}[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"client\"\n\
         [upstream.local]\npath = {:?}\npoll_interval = \"200ms\"\n\
         [redirect]\noutbound_cidrs = [\"10.96.0.0/12\"]\nproxy_user = \"{}\"\n",
        manifests.display().to_string(),
        nix::unistd::getuid().as_raw()
    );
    let mut a = Daemon::builder()
        .config(&a_config)
        .env("MESHKEEP_PROXY_OUTBOUND_LISTEN", "127.0.0.1:4140")
        .env("MESHKEEP_PROXY_INBOUND_LISTEN", "127.0.0.1:4143")
        .spawn();
    a.wait_ready();
    b.wait_ready();
    for daemon in [&a, &b] {
        daemon
            .wait_for("proxy certificate", Duration::from_secs(60), |d| d.log().contains("proxy: TLS identity in use"));
    }
    a.wait_for("web.shop known", Duration::from_secs(30), |d| d.resolve("web.shop")["result"] == "found");

    let config = a.config_path().unwrap().display().to_string();
    let installed = meshkeep(a.path(), &["-c", &config, "redirect", "install"], &[]);
    assert!(installed.status.success(), "{}", String::from_utf8_lossy(&installed.stderr));

    // An ordinary user's curl, unaware of the mesh.
    let curl = |extra: &[&str]| {
        let curl = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-sS", "--max-time", "20"])
            .args(extra)
            .output()
            .expect("curl");
        format!("{}{}", String::from_utf8_lossy(&curl.stdout), String::from_utf8_lossy(&curl.stderr))
    };
    let by_ip = curl(&["http://10.96.0.50/marker.txt"]);
    assert!(by_ip.contains("served by the backend behind box B"), "curl: {by_ip}\nA:\n{}\nB:\n{}", a.log(), b.log());
    // An address the mesh does not know, with a Host header naming a mesh service: the name wins.
    let by_host = curl(&["-H", "Host: web.shop", "http://10.96.0.99/marker.txt"]);
    assert!(by_host.contains("served by the backend behind box B"), "curl: {by_host}\nA:\n{}", a.log());

    let (_, metrics) = a.get("/metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "request_total{direction=\"outbound\",authority=\"web.shop.svc.cluster.local:80\",tls=\"true\"} 2"
        )),
        "{metrics}"
    );

    // An address the mesh does not know is reached as it is: a 5xx to an idempotent request is
    // not retried (python's http.server answers DELETE with 501 and logs each request).
    run("ip", &["addr", "add", "10.96.0.99/32", "dev", "lo"]);
    let log = dir.path().join("unknown.log");
    let _unknown = Backend(
        Command::new("python3")
            .args(["-m", "http.server", "8099", "--bind", "10.96.0.99", "--directory", site.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("python http.server"),
    );
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("10.96.0.99", 8099)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the unknown server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let unknown = curl(&["-i", "-X", "DELETE", "http://10.96.0.99:8099/marker.txt"]);
    assert!(unknown.contains(" 501 "), "curl: {unknown}\nA:\n{}", a.log());
    let tries = std::fs::read_to_string(&log).unwrap().matches("\"DELETE /marker.txt").count();
    assert_eq!(tries, 1, "forwarded once, not retried");

    let removed = meshkeep(a.path(), &["-c", &config, "redirect", "remove"], &[]);
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    let tables = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("meshkeep"), "table left behind");
}

#[test]
fn a_redirected_plaintext_client_hears_a_server_that_speaks_first() {
    if !Lab::available("the inbound redirect test") {
        return;
    }
    let lab = Lab::create(1);
    let host = &lab.hosts[0];
    const PORT: u16 = 3306;
    // The workload on the box's loopback speaks first, as MySQL and SMTP servers do, then echoes.
    lab.within(host, || {
        let listener = TcpListener::bind(("127.0.0.1", PORT)).expect("the workload's port");
        std::thread::spawn(move || {
            // One client; then the thread ends, and with it the last hold on the namespace.
            for mut stream in listener.incoming().flatten().take(1) {
                std::thread::spawn(move || {
                    let _ = stream.write_all(b"220 workload ready\r\n");
                    let mut line = [0u8; 64];
                    if let Ok(n) = stream.read(&mut line) {
                        let _ = stream.write_all(&line[..n]);
                    }
                });
            }
        });
    });
    let uid = nix::unistd::getuid().as_raw();
    let mut b = Daemon::builder()
        .netns(&host.netns)
        .config(&format!(
            "[proxy]\ninbound_plaintext = \"accept\"\n[policy]\ndefault = \"all-unauthenticated\"\n\
             [redirect]\noutbound_cidrs = []\ninbound_ports = [{PORT}]\nproxy_user = \"{uid}\"\n"
        ))
        .env("MESHKEEP_PROXY_INBOUND_LISTEN", "0.0.0.0:4143")
        .spawn();
    let config = b.config_path().expect("a config file").display().to_string();
    lab.within(host, || {
        b.wait_ready();
        let installed = meshkeep(b.path(), &["-c", &config, "redirect", "install"], &[]);
        assert!(installed.status.success(), "{}", String::from_utf8_lossy(&installed.stderr));
    });

    // A client on another host: it connects and waits for the server's greeting.
    let mut client = TcpStream::connect((host.uplink_ip, PORT)).expect("connect through the redirect");
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut banner = [0u8; 20];
    let heard = client.read_exact(&mut banner);
    assert!(heard.is_ok(), "no greeting through box B ({heard:?})\n{}", b.log());
    assert_eq!(&banner, b"220 workload ready\r\n");
    client.write_all(b"hello\n").unwrap();
    let mut echoed = [0u8; 6];
    client.read_exact(&mut echoed).expect("the echo");
    assert_eq!(&echoed, b"hello\n");
    // The workload listens on loopback only: the connection can have come through box B alone.
    lab.within(host, || {
        let through = metric(&b, "tcp_open_total{direction=\"inbound\",tls=\"no_identity\"");
        assert!(through >= 1.0, "box B did not count the plaintext connection");
    });
}
