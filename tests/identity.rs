//! Identity end to end: the daemon's local CA, checked with openssl, over the Unix socket, and
//! through kill -9 during rotation.

mod support;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use support::{Daemon, free_addr, meshkeep, require_tool};

fn openssl(args: &[&str]) -> (bool, String) {
    let output = Command::new(require_tool("openssl")).args(args).stdin(Stdio::null()).output().expect("run openssl");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// Issues `ns/sa` with the CLI from a daemon's state directory into `out`.
fn issue(daemon: &Daemon, ns: &str, sa: &str, out: &Path) {
    let config = daemon.config_path().expect("config").display().to_string();
    let output = meshkeep(
        daemon.path(),
        &["-c", &config, "identity", "issue", "-n", ns, "--service-account", sa, "--out", out.to_str().unwrap()],
        &[],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

fn wait_for_proxy_certificate(daemon: &Daemon) {
    daemon.wait_for("proxy certificate", Duration::from_secs(60), |d| {
        d.status()["identity"]["certificates"].as_array().is_some_and(|c| !c.is_empty())
    });
}

#[test]
fn issued_certificates_verify_with_openssl_and_follow_the_svid_rules() {
    let daemon = Daemon::start("");
    wait_for_proxy_certificate(&daemon);
    let out = daemon.path().join("web");
    issue(&daemon, "shop", "web", &out);
    let (crt, ca) = (out.join("tls.crt"), out.join("ca.crt"));

    // The chain file holds the leaf then the issuer; ca.crt holds the root.
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().unwrap(),
        "-untrusted",
        crt.to_str().unwrap(),
        crt.to_str().unwrap(),
    ]);
    assert!(ok && text.contains(": OK"), "{text}");

    let (ok, text) = openssl(&["x509", "-in", crt.to_str().unwrap(), "-noout", "-text"]);
    assert!(ok, "{text}");
    assert!(text.contains("DNS:web.shop.serviceaccount.identity.linkerd.cluster.local"), "{text}");
    assert!(text.contains("URI:spiffe://cluster.local/ns/shop/sa/web"), "{text}");
    assert!(text.contains("X509v3 Key Usage: critical") && text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("ASN1 OID: prime256v1"), "{text}");

    let key_mode = std::fs::metadata(out.join("tls.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
}

/// Runs `openssl s_server` with `server` and `openssl s_client` with `client`, each trusting its
/// own ca.crt; true when the mutual TLS handshake completes with both sides verified.
fn mtls(server: &Path, client: &Path, server_name: &str) -> (bool, String) {
    let addr = free_addr();
    let path = |dir: &Path, file: &str| dir.join(file).display().to_string();
    let mut s_server = Command::new(require_tool("openssl"))
        .args([
            "s_server",
            "-accept",
            &addr.port().to_string(),
            "-naccept",
            "1",
            "-tls1_3",
            "-Verify",
            "1",
            "-verify_return_error",
        ])
        .args([
            "-cert",
            &path(server, "tls.crt"),
            "-cert_chain",
            &path(server, "tls.crt"),
            "-key",
            &path(server, "tls.key"),
        ])
        .args(["-CAfile", &path(server, "ca.crt")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("s_server");
    std::thread::sleep(Duration::from_millis(300));
    let client_out = Command::new(require_tool("openssl"))
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-tls1_3",
            "-verify_return_error",
            "-verify_hostname",
            server_name,
        ])
        .args([
            "-cert",
            &path(client, "tls.crt"),
            "-cert_chain",
            &path(client, "tls.crt"),
            "-key",
            &path(client, "tls.key"),
        ])
        .args(["-CAfile", &path(client, "ca.crt")])
        .stdin(Stdio::null())
        .output()
        .expect("s_client");
    let _ = s_server.kill();
    let mut server_text = String::new();
    if let Some(mut out) = s_server.stdout.take() {
        let _ = out.read_to_string(&mut server_text);
    }
    let _ = s_server.wait();
    let client_text =
        format!("{}{}", String::from_utf8_lossy(&client_out.stdout), String::from_utf8_lossy(&client_out.stderr));
    let ok = client_out.status.success() && client_text.contains("Verification: OK") && !client_text.contains("alert");
    (ok, format!("client:\n{client_text}\nserver:\n{server_text}"))
}

#[test]
fn two_issued_identities_complete_mutual_tls_and_another_root_is_refused() {
    let daemon = Daemon::start("");
    wait_for_proxy_certificate(&daemon);
    let (web, api) = (daemon.path().join("web"), daemon.path().join("api"));
    issue(&daemon, "shop", "web", &web);
    issue(&daemon, "shop", "api", &api);
    let (ok, text) = mtls(&api, &web, "api.shop.serviceaccount.identity.linkerd.cluster.local");
    assert!(ok, "{text}");

    let stranger = Daemon::start("");
    wait_for_proxy_certificate(&stranger);
    let foreign = stranger.path().join("web");
    issue(&stranger, "shop", "web", &foreign);
    let (ok, text) = mtls(&api, &foreign, "api.shop.serviceaccount.identity.linkerd.cluster.local");
    assert!(!ok, "a client certificate from another root must be refused\n{text}");
}

fn socket_request(path: &Path) -> serde_json::Value {
    let mut stream = UnixStream::connect(path).expect("connect identity socket");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read reply");
    serde_json::from_str(&reply).expect("json reply")
}

#[test]
fn the_socket_serves_mapped_uids_and_refuses_the_rest() {
    let uid = nix::unistd::getuid().as_raw();
    let socket = tempfile::tempdir().unwrap();
    let path = socket.path().join("identity.sock");
    let config = format!(
        "[identity]\nsocket = {:?}\n[identity.workloads.web]\nuid = {uid}\nnamespace = \"shop\"\nservice_account = \"web\"\n",
        path.display().to_string()
    );
    let daemon = Daemon::start(&config);
    wait_for_proxy_certificate(&daemon);
    let reply = socket_request(&path);
    assert_eq!(reply["identity"], "web.shop.serviceaccount.identity.linkerd.cluster.local", "{reply}");
    let out = daemon.path().join("from-socket");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("tls.crt"), reply["certificate_chain_pem"].as_str().unwrap()).unwrap();
    std::fs::write(out.join("ca.crt"), reply["trust_bundle_pem"].as_str().unwrap()).unwrap();
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        out.join("ca.crt").to_str().unwrap(),
        "-untrusted",
        out.join("tls.crt").to_str().unwrap(),
        out.join("tls.crt").to_str().unwrap(),
    ]);
    assert!(ok, "{text}");

    let other = tempfile::tempdir().unwrap();
    let other_path = other.path().join("identity.sock");
    let config = format!(
        "[identity]\nsocket = {:?}\n[identity.workloads.api]\nuid = {}\nnamespace = \"shop\"\nservice_account = \"api\"\n",
        other_path.display().to_string(),
        uid + 4242
    );
    let refusing = Daemon::start(&config);
    let reply = socket_request(&other_path);
    assert!(reply["error"].as_str().is_some_and(|e| e.contains("not mapped")), "{reply}");
    assert!(reply.get("private_key_pem").is_none());
    drop(refusing);
}

#[test]
fn workload_directories_rotate_and_survive_kill_9() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().join("web");
    let uid = nix::unistd::getuid().as_raw() + 1000;
    let config = format!(
        "[identity]\ncertificate_lifetime = \"3s\"\nclock_skew = \"0s\"\n[identity.workloads.web]\nuid = {uid}\nnamespace = \"shop\"\nservice_account = \"web\"\ndirectory = {:?}\n",
        dir.display().to_string()
    );
    let mut daemon = Daemon::start(&config);
    daemon.wait_for("workload files", Duration::from_secs(60), |_| dir.join("tls.crt").exists());
    let first = std::fs::read_to_string(dir.join("tls.crt")).unwrap();
    daemon.wait_for("rotation", Duration::from_secs(60), |_| {
        std::fs::read_to_string(dir.join("tls.crt")).is_ok_and(|c| c != first)
    });

    let rounds: u64 = std::env::var("MESHKEEP_KILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let config_path = daemon.config_path().unwrap().display().to_string();
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(200 + (round * 331) % 2500));
        daemon.kill9();
        // The key and certificate in the directory always belong together.
        let (ok_key, key_pub) = openssl(&["pkey", "-in", dir.join("tls.key").to_str().unwrap(), "-pubout"]);
        let (ok_crt, crt_pub) = openssl(&["x509", "-in", dir.join("tls.crt").to_str().unwrap(), "-noout", "-pubkey"]);
        assert!(ok_key && ok_crt, "round {round}: unreadable files\n{key_pub}\n{crt_pub}");
        assert_eq!(key_pub.trim(), crt_pub.trim(), "round {round}: key and certificate from different generations");
        // The cached identity material always opens.
        let output = meshkeep(
            daemon.path(),
            &["-c", &config_path, "identity", "show", "-o", "json"],
            &[("MESHKEEP_ADMIN_LISTEN", "127.0.0.1:1")],
        );
        assert!(output.status.success(), "round {round}: {}", String::from_utf8_lossy(&output.stderr));
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(status["issuer_subject"].is_string(), "round {round}: issuer lost: {status}");
        daemon.respawn();
        daemon.wait_ready();
    }
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn status_and_metrics_report_identity_expiry() {
    let daemon = Daemon::start("");
    wait_for_proxy_certificate(&daemon);
    let (_, metrics) = daemon.get("/metrics");
    assert!(metrics.contains("identity_cert_expiration_timestamp_seconds "), "{metrics}");
    assert!(metrics.contains("meshkeep_identity_issuer_expiration_timestamp_seconds "), "{metrics}");
    assert!(metrics.contains("meshkeep_identity_clock_ok 1"), "{metrics}");
    let status = daemon.status();
    assert_eq!(status["identity"]["issuer_origin"]["kind"], "standalone", "{status}");
    assert!(daemon.log().contains("its own trust domain"), "the standalone warning is logged");
}
