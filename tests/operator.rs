//! The operator's tools on a running daemon: `status`, `check`, `stat` and `top` in text and
//! JSON, `check` failing for each broken precondition, `/config`, and the dashboard rendered
//! by headless Chromium with real data.

mod support;

use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::mesh::*;
use support::{Daemon, free_addr, meshkeep};

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(output)))
}

/// A box serving the example manifests with a standalone identity.
fn healthy_box() -> Daemon {
    let site = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/site");
    let daemon = Daemon::start(&format!(
        "[node]\nname = \"edge-7\"\n[upstream.local]\npath = {:?}\n",
        site.display().to_string()
    ));
    daemon.wait_for("identity issued", Duration::from_secs(60), |d| {
        d.status()["identity"]["certificates"].as_array().is_some_and(|c| !c.is_empty())
    });
    daemon
}

#[test]
fn status_and_check_on_a_healthy_box() {
    let daemon = healthy_box();
    let status = daemon.cli(&["status"]);
    assert!(status.status.success(), "{}", text(&status));
    let out = text(&status);
    assert!(out.starts_with("HEALTHY"), "{out}");
    assert!(out.contains("edge-7") && out.contains("local"), "{out}");
    let report = json(&daemon.cli(&["status", "-o", "json"]));
    assert_eq!(report["healthy"], true);
    assert_eq!(report["status"]["node"], "edge-7");

    let check = daemon.cli(&["check"]);
    let out = text(&check);
    assert!(check.status.success(), "{out}");
    for line in ["PASS config", "PASS state directory", "PASS system clock", "PASS listeners", "PASS issuer"] {
        assert!(
            out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ").starts_with(line)),
            "{line}\n{out}"
        );
    }
    assert!(!out.contains("\x1b["), "no colour when stdout is not a terminal");
    let findings = json(&daemon.cli(&["check", "-o", "json"]));
    assert!(findings.as_array().unwrap().iter().all(|f| f["level"] != "fail"), "{findings}");

    let (code, config) = daemon.get("/config");
    assert_eq!(code, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["node"]["name"], "edge-7", "the effective configuration");
}

fn failing_check(daemon_or_dir: &Output, check: &str) {
    let out = text(daemon_or_dir);
    assert_eq!(daemon_or_dir.status.code(), Some(1), "check must fail\n{out}");
    assert!(out.lines().any(|l| l.starts_with("FAIL") && l.contains(check)), "expected FAIL {check}\n{out}");
    assert!(out.contains("->"), "a failure comes with a hint\n{out}");
}

#[test]
fn check_fails_for_each_broken_precondition() {
    // No daemon at all.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!("[store]\nstate_dir = {:?}\n", dir.path().join("state").display().to_string()),
    )
    .unwrap();
    let nobody = free_addr().to_string();
    let output = meshkeep(dir.path(), &["-c", "config.toml", "check"], &[("MESHKEEP_ADMIN_LISTEN", &nobody)]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("FAIL daemon") && text(&output).contains("not running"), "{}", text(&output));

    // The state directory is a file.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, "not a directory").unwrap();
    std::fs::write(dir.path().join("bad.toml"), format!("[store]\nstate_dir = {:?}\n", blocked.display().to_string()))
        .unwrap();
    let output = meshkeep(dir.path(), &["-c", "bad.toml", "check"], &[("MESHKEEP_ADMIN_LISTEN", &nobody)]);
    failing_check(&output, "state directory");

    // A link whose API server is unreachable.
    let kube_dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube_dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://{}\"}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
            free_addr()
        ),
    )
    .unwrap();
    let daemon =
        Daemon::start(&format!("[upstream.links.east]\nkubeconfig = {:?}\n", kubeconfig.display().to_string()));
    daemon.wait_for("the link failed once", Duration::from_secs(30), |d| {
        d.status()["sources"].as_array().is_some_and(|s| s.iter().any(|s| !s["last_error"].is_null()))
    });
    failing_check(&daemon.cli(&["check"]), "source link/east");
    let status = daemon.cli(&["status"]);
    assert_eq!(status.status.code(), Some(1));
    assert!(text(&status).starts_with("UNHEALTHY"), "{}", text(&status));

    // A clock behind the time floor (as after a reboot with a dead RTC).
    let mut daemon = Daemon::builder().config("").spawn();
    let floor = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 10 * 365 * 86400;
    daemon.kill9();
    std::fs::create_dir_all(daemon.state_dir().join("identity")).unwrap();
    std::fs::write(daemon.state_dir().join("identity/time-floor"), format!("{floor}\n")).unwrap();
    daemon.respawn();
    daemon.wait_ready();
    daemon.wait_for("clock state known", Duration::from_secs(30), |d| d.status()["identity"]["clock_ok"] == false);
    failing_check(&daemon.cli(&["check"]), "clock");
}

#[test]
fn stat_and_top_show_the_traffic_that_flowed() {
    let boxes = two_boxes_to(http_backend(), Some("echo"));
    for i in 0..20 {
        let path = if i % 10 == 0 { "/status/503" } else { "/hello?i=1" };
        curl(&["--http1.1", &format!("http://{}{path}", boxes.listener)]);
    }
    let rows = json(&boxes.a.cli(&["stat", "-o", "json"]));
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["direction"] == "outbound" && r["authority"] == "echo.shop.svc.cluster.local:80")
        .unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(row["requests"], 20);
    assert!((row["success_rate"].as_f64().unwrap() - 0.9).abs() < 1e-9, "{row}");
    assert!(row["p50_ms"].as_f64().is_some_and(|p| p > 0.0), "{row}");

    let stat = text(&boxes.a.cli(&["stat", "echo.shop"]));
    assert!(stat.starts_with("DIRECTION  SERVICE"), "{stat}");
    assert!(stat.contains("90.00%"), "{stat}");
    let inbound = text(&boxes.b.cli(&["stat"]));
    assert!(inbound.contains("inbound"), "box B saw them arrive\n{inbound}");

    let top = text(&boxes.a.cli(&["top", "--once"]));
    assert!(top.contains("GET /hello") && top.contains("GET /status/503"), "{top}");
    let top_lines: Vec<&str> = top.lines().collect();
    assert!(top_lines[1].contains("GET /hello"), "the busiest route first\n{top}");
}

/// Chromium, when installed (the test command installs it): `None` otherwise.
fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .map(str::to_owned)
        .find(|name| Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success()))
}

fn render(browser: &str, url: &str, language: &str, screenshot: Option<&std::path::Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = Command::new(browser);
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--virtual-time-budget=8000"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--lang={language}"))
        .env("LANGUAGE", language)
        .args(["--window-size=1280,1100"]);
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let output = command.arg(url).output().expect("run chromium");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_dashboard_renders_real_data_in_english_and_spanish() {
    let Some(browser) = chromium() else {
        support::skip("chromium is not installed; the dashboard was not rendered");
        return;
    };
    let boxes = two_boxes_to(http_backend(), Some("echo"));
    for _ in 0..10 {
        curl(&["--http1.1", &format!("http://{}/hello", boxes.listener)]);
    }
    let url = format!("http://{}/", boxes.a.admin);
    let english = render(&browser, &url, "en-US", None);
    assert!(english.contains("echo.shop.svc.cluster.local:80"), "the service row\n{english}");
    assert!(english.contains("Healthy") && english.contains("Requests/s"), "{english}");
    assert!(english.contains("100.0%"), "success rate of the real requests\n{english}");
    assert!(english.contains("web.shop.serviceaccount.identity.linkerd.cluster.local"), "the proxy's certificate");
    let spanish = render(&browser, &url, "es", None);
    assert!(spanish.contains("Servicios") && spanish.contains("Sano"), "{spanish}");
    assert!(spanish.contains("echo.shop.svc.cluster.local:80"), "{spanish}");

    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("dashboard.png");
    render(&browser, &url, "en-US", Some(&png));
    let image = std::fs::read(&png).expect("a screenshot was written");
    assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(image.len() > 20_000, "a page with content, not a blank one ({} bytes)", image.len());
    // Keep it where CI can pick it up.
    let _ = std::fs::copy(&png, std::env::temp_dir().join("meshkeep-dashboard.png"));
}
