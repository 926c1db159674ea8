//! Clock drills on the real daemon: its wall clock is moved with libfaketime (a preloaded
//! library that answers clock_gettime for that one process; the monotonic clock is left alone),
//! so it boots at 1970 and sees its clock jump forward and back while it runs. The machine's
//! own clock is never touched. The static aarch64 binary cannot preload a library, so under
//! qemu-user these drills say so and do not run; the native run covers them.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use support::Daemon;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn libfaketime(drill: &str) -> Option<PathBuf> {
    if std::env::var_os("MESHKEEP_UNDER_QEMU_USER").is_some() || cfg!(not(target_arch = "x86_64")) {
        support::skip(&format!("{drill}: libfaketime cannot be preloaded into the static binary run here"));
        return None;
    }
    let path = PathBuf::from(LIBFAKETIME);
    assert!(path.is_file(), "{LIBFAKETIME} is missing: the README's test command installs Debian's faketime");
    Some(path)
}

/// A daemon whose wall clock reads what `clock` says: "+0" real time, "+2d" two days ahead,
/// "@1970-01-01 00:00:00" a fixed start from which time runs on.
struct Clocked {
    daemon: Daemon,
    clock: PathBuf,
}

impl Clocked {
    fn start(lib: &Path, initial: &str) -> Clocked {
        let clock_dir = tempfile::tempdir().expect("tempdir").keep();
        let clock = clock_dir.join("clock");
        std::fs::write(&clock, format!("{initial}\n")).expect("write the clock");
        let mut daemon = Daemon::builder()
            .config("[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"web\"\n")
            .env("LD_PRELOAD", lib.display().to_string())
            .env("FAKETIME_TIMESTAMP_FILE", clock.display().to_string())
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .spawn();
        daemon.wait_ready();
        Clocked { daemon, clock }
    }

    fn set(&self, clock: &str) {
        std::fs::write(&self.clock, format!("{clock}\n")).expect("move the clock");
    }
}

fn proxy_certificate(daemon: &Daemon) -> Option<serde_json::Value> {
    daemon.status()["identity"]["certificates"].as_array()?.iter().find(|c| c["proxy"] == true).cloned()
}

fn now_secs(offset: i64) -> u64 {
    (SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as i64 + offset) as u64
}

const DAY: i64 = 86400;

#[test]
fn boot_at_1970_serves_the_cache_and_issues_once_the_clock_is_set() {
    let Some(lib) = libfaketime("the 1970 boot drill") else { return };
    let mut box_ = Clocked::start(&lib, "+0");
    box_.daemon.wait_for("a proxy certificate", Duration::from_secs(30), |d| proxy_certificate(d).is_some());
    let issued = proxy_certificate(&box_.daemon).expect("certificate");
    let before = box_.daemon.resolve("web.demo");

    // Power comes back without an RTC: the clock reads 1970.
    box_.daemon.signal(Signal::SIGTERM);
    assert!(box_.daemon.wait_exit(Duration::from_secs(20)).success());
    box_.set("@1970-01-01 00:00:00");
    box_.daemon.respawn();
    box_.daemon.wait_ready();
    let daemon = &box_.daemon;
    daemon.wait_for("the clock reported behind", Duration::from_secs(30), |d| {
        d.status()["identity"]["clock_ok"] == false
    });
    assert_eq!(daemon.resolve("web.demo"), before, "discovery serves the cache whatever the clock says");
    let held = proxy_certificate(daemon).expect("the cached certificate is kept");
    assert_eq!(held["not_after"], issued["not_after"], "nothing is issued at 1970");
    let metrics = daemon.get("/metrics").1;
    assert!(metrics.contains("meshkeep_identity_clock_ok 0"), "clock state in the metrics");

    // NTP sets the clock: issuing resumes without a restart.
    box_.set("+0");
    daemon.wait_for("the clock is sane again", Duration::from_secs(60), |d| d.status()["identity"]["clock_ok"] == true);
    daemon.wait_for("a certificate valid now", Duration::from_secs(60), |d| {
        proxy_certificate(d).is_some_and(|c| c["not_after"].as_u64().is_some_and(|t| t > now_secs(0)))
    });
}

#[test]
fn a_clock_jumping_forward_renews_and_a_step_back_pauses_issuing_but_not_serving() {
    let Some(lib) = libfaketime("the clock jump drill") else { return };
    let box_ = Clocked::start(&lib, "+0");
    let daemon = &box_.daemon;
    daemon.wait_for("a proxy certificate", Duration::from_secs(30), |d| proxy_certificate(d).is_some());

    // Two days ahead: the day-long certificate is expired by this clock, so it is renewed.
    box_.set("+2d");
    daemon.wait_for("renewed for the new time", Duration::from_secs(60), |d| {
        proxy_certificate(d).is_some_and(|c| c["not_after"].as_u64().is_some_and(|t| t > now_secs(2 * DAY)))
    });
    let renewed = proxy_certificate(daemon).expect("certificate");

    // Back to a day ahead: behind the highest time seen, so nothing is issued, and the box keeps
    // serving with the certificate it has and says why.
    box_.set("+1d");
    daemon.wait_for("the step back reported", Duration::from_secs(60), |d| d.status()["identity"]["clock_ok"] == false);
    assert_eq!(daemon.get("/ready").0, 200, "still ready");
    assert_eq!(proxy_certificate(daemon).expect("kept")["not_after"], renewed["not_after"]);
    let check = daemon.cli(&["check"]);
    assert!(!check.status.success(), "meshkeep check flags the clock");
    assert!(String::from_utf8_lossy(&check.stdout).contains("clock"), "{}", String::from_utf8_lossy(&check.stdout));

    // Forward again past the highest time seen: issuing resumes by itself.
    box_.set("+3d");
    daemon.wait_for("issuing resumes", Duration::from_secs(60), |d| {
        d.status()["identity"]["clock_ok"] == true
            && proxy_certificate(d).is_some_and(|c| c["not_after"].as_u64().is_some_and(|t| t > now_secs(3 * DAY)))
    });
}
