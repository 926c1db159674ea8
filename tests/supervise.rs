//! Living under systemd: the watchdog is fed while the daemon is healthy and STATUS= says how
//! it is; SIGHUP re-reads the configuration and rescans the manifests without dropping
//! connections, and a broken configuration is refused without harm; link secrets come from
//! `LoadCredential=`.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::fake_kube::FakeKube;
use support::objects::service;
use support::{Daemon, free_addr, meshkeep};

/// Every message the fake systemd receives within `within`.
fn messages(socket: &UnixDatagram, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    let mut all = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => all.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    all
}

#[test]
fn the_watchdog_is_fed_while_healthy_and_status_says_how_the_box_is() {
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    let site = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/site");
    let mut daemon = Daemon::builder()
        .config(&format!("[upstream.local]\npath = {:?}\n", site.display().to_string()))
        .env("NOTIFY_SOCKET", path.display().to_string())
        .env("WATCHDOG_USEC", "600000")
        .spawn();
    daemon.wait_ready();
    let seen = messages(&systemd, Duration::from_secs(3));
    let pings = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 5, "a ping every 300 ms: {pings} in 3 s\n{seen:?}");
    let status = seen.iter().rev().find(|m| m.starts_with("STATUS=")).expect("a STATUS= line");
    assert!(status.contains("1/1 sources connected") && status.contains("objects"), "{status}");
}

/// A TCP echo server on 127.0.0.2 (an unmeshed endpoint).
fn echo_on_b() -> u16 {
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

fn echo_service(name: &str, ip: &str, port: u16) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: {ip}, ports: [{{name: tcp, port: 80, targetPort: {port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: tcp, port: {port}}}]\nendpoints:\n  - addresses: [127.0.0.2]\n"
    )
}

#[test]
fn sighup_reloads_and_rescans_without_dropping_connections() {
    let port = echo_on_b();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("m");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("echo.yaml"), echo_service("echo", "10.96.2.1", port)).unwrap();
    let listener = free_addr();
    // A poll interval of an hour: only the reload can make the new manifest appear quickly.
    let base = format!(
        "[upstream.local]\npath = {:?}\npoll_interval = \"1h\"\n[[proxy.listeners]]\nlisten = \"{listener}\"\nservice = \"echo.shop\"\nport = 80\n",
        manifests.display().to_string()
    );
    let daemon = Daemon::start(&base);
    daemon.wait_for("echo.shop known", Duration::from_secs(30), |d| d.resolve("echo.shop")["result"] == "found");
    let mut held = TcpStream::connect(listener).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let echo = |stream: &mut TcpStream, text: &[u8]| {
        stream.write_all(text).unwrap();
        let mut back = vec![0u8; text.len()];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, text);
    };
    echo(&mut held, b"before the reload");

    std::fs::write(manifests.join("more.yaml"), echo_service("more", "10.96.2.2", port)).unwrap();
    let config = daemon.config_path().unwrap().to_owned();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}[dns]\nshort_names = false\n[log]\nfilter = \"info\"\n")).unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for("the new manifest", Duration::from_secs(10), |d| d.resolve("more.shop")["result"] == "found");
    daemon.wait_for("the restart notice", Duration::from_secs(10), |d| d.log().contains("apply at the next restart"));
    assert!(daemon.log().contains("sections=dns"), "names what needs a restart\n{}", daemon.log());
    echo(&mut held, b"after the reload, same connection");

    // A broken configuration is refused and the daemon keeps serving.
    std::fs::write(&config, format!("{text}[dns]\nshort_names = \"maybe\"\n")).unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for("the refusal", Duration::from_secs(10), |d| d.log().contains("keeping the running one"));
    assert_eq!(daemon.get("/ready").0, 200);
    echo(&mut held, b"still here");
}

#[test]
fn link_secrets_come_from_load_credential() {
    let kube = FakeKube::start();
    kube.apply(service("shop", "api", "10.96.0.11", 80));
    let credentials = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(credentials.path());
    std::fs::rename(&kubeconfig, credentials.path().join("east-kubeconfig")).unwrap();
    let link = "[upstream.links.east]\nkubeconfig = \"credential:east-kubeconfig\"\n";

    // Without systemd's CREDENTIALS_DIRECTORY the daemon refuses to start and says what is
    // missing; operator commands, which never read link secrets, still work and warn.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), link).unwrap();
    let refused = meshkeep(dir.path(), &["-c", "config.toml", "run"], &[]);
    assert_eq!(refused.status.code(), Some(78));
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("upstream.links.east.kubeconfig") && error.contains("LoadCredential"), "{error}");
    let checked = meshkeep(dir.path(), &["-c", "config.toml", "config", "check"], &[]);
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
    let warning = String::from_utf8_lossy(&checked.stdout);
    assert!(warning.contains("warning: upstream.links.east.kubeconfig"), "{warning}");

    let mut daemon =
        Daemon::builder().config(link).env("CREDENTIALS_DIRECTORY", credentials.path().display().to_string()).spawn();
    daemon.wait_ready();
    daemon.wait_for("api.shop synced through the credential", Duration::from_secs(30), |d| {
        d.resolve("api.shop")["result"] == "found"
    });
}
