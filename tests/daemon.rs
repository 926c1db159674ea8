//! The daemon as a real process: embedded default, admin endpoint, shutdown, systemd notify.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::{Daemon, meshkeep, require_tool};

#[test]
fn embedded_default_serves_admin_with_no_config_file() {
    if std::path::Path::new("/etc/meshkeep/config.toml").exists() {
        support::skip("/etc/meshkeep/config.toml exists on this machine, so the embedded default is not in force");
        return;
    }
    let mut daemon = Daemon::builder().spawn();
    daemon.wait_ready();
    assert!(daemon.path().join(".meshkeep").is_dir(), "state directory ./.meshkeep was not created");
    assert_eq!(daemon.get("/live"), (200, "live\n".to_owned()));
    let (status, metrics) = daemon.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("meshkeep_build_info{version="), "{metrics}");
    assert!(metrics.contains("process_resident_memory_bytes"), "{metrics}");
    assert!(daemon.log().contains("built-in default"), "{}", daemon.log());
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn sigterm_closes_idle_keepalive_connections_and_exits_zero() {
    let mut daemon = Daemon::start("[runtime]\ndrain_timeout = \"20s\"\n");
    let mut idle = TcpStream::connect(daemon.admin).expect("connect");
    write!(idle, "GET /live HTTP/1.1\r\nHost: admin\r\n\r\n").expect("send");
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).expect("response");
    assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("HTTP/1.1 200"));

    daemon.signal(Signal::SIGTERM);
    // The drain deadline is 20 s: exiting well before it shows the idle connection was closed
    // gracefully rather than waited out.
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}\n{}", daemon.log());
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0, "the idle connection should be closed");
    assert!(TcpStream::connect(daemon.admin).is_err(), "the admin port still accepts after shutdown");
}

#[test]
fn sigint_shuts_down_like_sigterm() {
    let mut daemon = Daemon::start("");
    daemon.signal(Signal::SIGINT);
    assert!(daemon.wait_exit(Duration::from_secs(15)).success(), "{}", daemon.log());
    assert!(daemon.log().contains("SIGINT"), "{}", daemon.log());
}

#[test]
fn sighup_does_not_kill_the_daemon() {
    let mut daemon = Daemon::start("");
    daemon.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemon.get("/live").0, 200, "{}", daemon.log());
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn runtime_uses_the_configured_number_of_workers() {
    let daemon = Daemon::start("[runtime]\nworkers = 3\n");
    let (_, metrics) = daemon.get("/metrics");
    assert!(metrics.contains("meshkeep_runtime_workers 3\n"), "{metrics}");
    // The worker threads exist as OS threads (the blocking pool shares their name, so at least).
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).expect("task dir");
    let named = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "meshkeep-worker")
        .count();
    assert!(named >= 3, "{named} worker threads\n{}", daemon.log());
    drop(daemon);

    // One worker: a current-thread runtime, which reports one worker.
    let daemon = Daemon::start("[runtime]\nworkers = 1\n");
    let (status, metrics) = daemon.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("meshkeep_runtime_workers 1\n"), "{metrics}");
}

#[test]
fn admin_answers_real_curl_over_http1_and_http2() {
    let curl = require_tool("curl");
    let daemon = Daemon::start("");
    for flags in [&["--http1.1"][..], &["--http2-prior-knowledge"][..]] {
        let output = Command::new(&curl)
            .args(flags)
            .args(["-sS", "-o", "-", "-w", "\n%{http_code} %{http_version}", &format!("http://{}/ready", daemon.admin)])
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&output.stdout);
        let expected_version = if flags[0] == "--http1.1" { "1.1" } else { "2" };
        assert!(text.ends_with(&format!("200 {expected_version}")), "curl {flags:?}: {text}");
    }
}

#[test]
fn bad_config_exits_78_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 2\n").unwrap();
    for command in [&["-c", "bad.toml", "run"][..], &["-c", "bad.toml", "config", "check"][..]] {
        let output = meshkeep(dir.path(), command, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{command:?}: {stderr}");
        assert!(stderr.contains("bad.toml:3:1:") && stderr.contains("admin.lisen"), "{command:?}: {stderr}");
    }
}

#[test]
fn config_show_merges_file_drop_ins_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config.d")).unwrap();
    std::fs::write(dir.path().join("config.toml"), "[node]\nname = \"box-1\"\nzone = \"north\"\n").unwrap();
    std::fs::write(dir.path().join("config.d/10-zone.toml"), "[node]\nzone = \"south\"\n").unwrap();
    let output =
        meshkeep(dir.path(), &["-c", "config.toml", "config", "show", "-o", "json"], &[("MESHKEEP_WORKERS", "5")]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(shown["node"]["name"], "box-1");
    assert_eq!(shown["node"]["zone"], "south");
    assert_eq!(shown["runtime"]["workers"], 5);
}

#[test]
fn busy_admin_port_fails_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut daemon = Daemon::builder().config("").env("MESHKEEP_ADMIN_LISTEN", addr.to_string()).spawn();
    let status = daemon.wait_exit(support::STARTUP_TIMEOUT);
    assert!(!status.success());
    assert!(daemon.log().contains(&format!("cannot listen on {addr}")), "{}", daemon.log());
}

#[test]
fn systemd_hears_ready_only_once_serving_and_stopping_on_sigterm() {
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&path).expect("bind notify socket");
    systemd.set_read_timeout(Some(support::STARTUP_TIMEOUT)).unwrap();
    let mut daemon = Daemon::builder().config("").env("NOTIFY_SOCKET", path.display().to_string()).spawn();

    let mut buf = [0u8; 1024];
    let n = systemd.recv(&mut buf).expect("READY notification");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.starts_with("READY=1\nSTATUS="), "{ready}");
    // READY=1 promises that the admin endpoint already answers.
    assert_eq!(daemon.get("/ready").0, 200);

    daemon.signal(Signal::SIGTERM);
    // STATUS= updates may come first; STOPPING=1 must follow.
    let stopping = (0..20).find_map(|_| {
        let n = systemd.recv(&mut buf).expect("STOPPING notification");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        message.starts_with("STOPPING=1").then_some(message)
    });
    assert!(stopping.is_some(), "no STOPPING=1");
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn version_flag_prints_the_package_version() {
    let output = meshkeep(std::env::temp_dir().as_path(), &["--version"], &[]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), format!("meshkeep {}", env!("CARGO_PKG_VERSION")));
}
