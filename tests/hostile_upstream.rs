//! The hostile-upstream drill: an API server that answers late, trickles, goes silent after its
//! headers, truncates, sends garbage or enormous answers, breaks its watch streams, or answers
//! 410 Gone forever. Whatever it does, the daemon stays up (process alive, /live and /ready
//! 200), keeps answering from its cache, reports the error in /status (the link's `last_error`,
//! and `state` disconnected wherever the failure lasts long enough to be seen), and recovers once
//! the server behaves: a service added upstream meanwhile appears and the link is connected.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::Daemon;
use support::cluster::{ips, link_config, shop_cluster};
use support::fake_kube::{FOREVER, FakeKube, Fault};
use support::objects::service;

/// How long a change may take to reach a daemon from a server that behaves.
const SYNC: Duration = Duration::from_secs(30);
/// The link gives up on a list that has not answered for this long and starts it again
/// (`LIST_IDLE_TIMEOUT` in src/upstream/link.rs); kube-rs sets no read timeout of its own.
const LIST_IDLE: Duration = Duration::from_secs(60);
/// How long a fault that only the list timeout ends may take to be reported.
const PAST_LIST_IDLE: Duration = Duration::from_secs(120);
/// How long recovery may take once the server behaves: the watcher's backoff (at most 30 s)
/// and a relist.
const RECOVERY: Duration = Duration::from_secs(90);
/// The collection the faults hit (the link watches all namespaces).
const SERVICES: &str = "/api/v1/services";
/// The link's `max_response_size` in the drills that need a small one.
const SMALL_LIMIT: &str = "max_response_size = \"1 MiB\"\n";
/// How big the enormous answer is, were it read whole.
const ENORMOUS: usize = 256 << 20;

/// A daemon synced with the shop cluster, and that cluster's server.
struct Drill {
    kube: FakeKube,
    daemon: Daemon,
}

impl Drill {
    /// The shop cluster and a daemon synced with it; `link_keys` go into the link's table.
    fn synced(link_keys: &str) -> Drill {
        let kube = shop_cluster();
        let daemon = Daemon::start(&format!("{}{link_keys}", link_config("east", &kube, "federated")));
        daemon.wait_for("api.shop synced", SYNC, |d| ips(d, "api.shop").is_some());
        Drill { kube, daemon }
    }

    /// Stops the daemon, lets `hostile` set the server up, and starts the daemon again: it
    /// serves from its store while its link meets the hostile server.
    fn restart_into(&mut self, hostile: impl FnOnce(&FakeKube)) {
        self.daemon.signal(Signal::SIGTERM);
        assert!(self.daemon.wait_exit(Duration::from_secs(15)).success(), "{}", self.daemon.log());
        hostile(&self.kube);
        self.daemon.respawn();
        self.daemon.wait_ready();
        assert_serving(&self.daemon, "right after the restart");
    }

    /// Adds `later.shop` upstream: it must appear once the server behaves again.
    fn add_later_service(&self) {
        self.kube.apply(service("shop", "later", "10.96.0.20", 80));
    }

    /// Sends a line to the open services watch, waiting for it to be open.
    fn send_when_watched(&self, what: &str, send: impl Fn(&FakeKube) -> usize) {
        self.daemon.wait_for(&format!("{what} sent to an open services watch"), SYNC, |_| send(&self.kube) > 0);
    }
}

/// A field of the daemon's /proc/PID/status (`State`, `VmHWM`...), if the process exists.
fn proc_status(daemon: &Daemon, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid().as_raw())).ok()?;
    status.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':').map(|value| value.trim().to_owned()))
}

/// Whether the daemon's process is running (neither gone nor a zombie).
fn alive(daemon: &Daemon) -> bool {
    proc_status(daemon, "State").is_some_and(|state| !state.starts_with('Z') && !state.starts_with('X'))
}

/// The daemon's peak resident set size (VmHWM), in KiB.
fn peak_rss_kib(daemon: &Daemon) -> u64 {
    let value = proc_status(daemon, "VmHWM").unwrap_or_else(|| panic!("no VmHWM for meshkeep\n{}", daemon.log()));
    value.trim_end_matches("kB").trim().parse().unwrap_or_else(|_| panic!("VmHWM {value:?}"))
}

/// The link's entry in /status.
fn link_status(daemon: &Daemon) -> Value {
    let status = daemon.status();
    let link = status["sources"].as_array().and_then(|sources| sources.iter().find(|s| s["source"] == "link/east"));
    link.cloned().unwrap_or(Value::Null)
}

/// The daemon is up and answers from its cache: process alive, /live and /ready 200, and
/// api.shop resolving to its endpoint.
fn assert_serving(daemon: &Daemon, when: &str) {
    assert!(alive(daemon), "meshkeep is not running {when}\n{}", daemon.log());
    assert_eq!(daemon.get("/live").0, 200, "/live {when}");
    assert_eq!(daemon.get("/ready").0, 200, "/ready {when}");
    assert_eq!(ips(daemon, "api.shop"), Some(vec!["10.1.0.1".to_owned()]), "api.shop from the cache {when}");
}

/// Waits, checking all along that the daemon keeps serving, until the link's `last_error`
/// mentions `error` (at a moment its state is `disconnected`, when `see_disconnected`).
fn wait_reported(daemon: &Daemon, error: &str, timeout: Duration, see_disconnected: bool) {
    let what = format!("the link to report {error:?}{}", if see_disconnected { " while disconnected" } else { "" });
    daemon.wait_for(&what, timeout, |d| {
        assert_serving(d, "while the upstream is hostile");
        let link = link_status(d);
        link["last_error"].as_str().is_some_and(|e| e.contains(error))
            && link["last_error_at"].is_u64()
            && (!see_disconnected || link["state"] == "disconnected")
    });
}

/// Waits, checking all along that the daemon keeps serving, until the service added upstream
/// meanwhile resolves and the link is connected again.
fn wait_recovered(daemon: &Daemon) {
    daemon.wait_for("recovery: later.shop synced and the link connected", RECOVERY, |d| {
        assert_serving(d, "while recovering");
        d.resolve("later.shop")["result"] == "found" && link_status(d)["state"] == "connected"
    });
}

/// Restarts a synced daemon into a server that meets its services lists with `fault`, `times`
/// times; the error must be reported (mentioning `error`) within `within`, then the link recovers.
fn restart_drill(fault: Fault, times: usize, error: &str, within: Duration, see_disconnected: bool) {
    let mut drill = Drill::synced("");
    drill.restart_into(|kube| kube.fault_lists(SERVICES, fault, times));
    drill.add_later_service();
    wait_reported(&drill.daemon, error, within, see_disconnected);
    wait_recovered(&drill.daemon);
}

#[test]
fn headers_later_than_the_list_timeout() {
    // Nothing is seen until the link gives up; it then lists again at once, so the
    // disconnected state lasts only a moment.
    restart_drill(Fault::Slow(LIST_IDLE + Duration::from_secs(30)), 1, "no answer for", PAST_LIST_IDLE, false);
}

#[test]
fn a_body_trickling_for_longer_than_the_list_timeout() {
    // Eight bytes every two seconds: a list of one or two services takes well over a minute.
    restart_drill(Fault::Trickle(Duration::from_secs(2)), 1, "no answer for", PAST_LIST_IDLE, false);
}

#[test]
fn headers_then_silence() {
    restart_drill(Fault::Hang, 1, "no answer for", PAST_LIST_IDLE, false);
}

#[test]
fn truncated_lists() {
    restart_drill(Fault::Truncate, 3, "failed to perform initial object list", SYNC, true);
}

#[test]
fn malformed_lists() {
    restart_drill(Fault::Malformed, 3, "Error deserializing response", SYNC, true);
}

#[test]
fn a_malformed_event_in_the_middle_of_a_watch() {
    let drill = Drill::synced("");
    drill.send_when_watched("a malformed event", |kube| kube.malformed_event("services"));
    wait_reported(&drill.daemon, "Error deserializing response", SYNC, true);
    // The stream carries on: the next event arrives and the link is connected again.
    drill.add_later_service();
    wait_recovered(&drill.daemon);
}

#[test]
fn a_watch_event_over_max_response_size() {
    let drill = Drill::synced(SMALL_LIMIT);
    drill.send_when_watched("a 2 MiB event", |kube| kube.oversized_event("services", 2 << 20));
    wait_reported(&drill.daemon, "watch event larger than 1 MiB (max_response_size)", SYNC, true);
    drill.add_later_service();
    wait_recovered(&drill.daemon);
}

#[test]
fn an_enormous_list_stops_at_max_response_size_and_memory_stays_bounded() {
    let drill = Drill::synced(SMALL_LIMIT);
    let before = peak_rss_kib(&drill.daemon);
    drill.kube.fault_lists(SERVICES, Fault::Enormous(ENORMOUS), 3);
    // Forgetting history ends the watches; watching again meets 410 Gone, so every kind relists.
    drill.kube.compact();
    wait_reported(&drill.daemon, "response larger than 1 MiB (max_response_size)", SYNC, true);
    drill.add_later_service();
    wait_recovered(&drill.daemon);
    // Measured as growth, so the bound also holds under qemu-user, whose own footprint counts.
    let after = peak_rss_kib(&drill.daemon);
    let enormous_kib = (ENORMOUS / 1024) as u64;
    assert!(
        after.saturating_sub(before) < enormous_kib / 4,
        "peak RSS went from {before} KiB to {after} KiB against {enormous_kib} KiB answers"
    );
}

#[test]
fn gone_forever_keeps_serving_and_backs_off() {
    let lists = |kube: &FakeKube| -> Vec<Instant> {
        kube.requests().iter().filter(|r| r.path == SERVICES && !r.is_watch()).map(|r| r.at).collect()
    };
    let mut drill = Drill::synced("");
    let at_restart = lists(&drill.kube).len();
    drill.restart_into(|kube| kube.fault_lists(SERVICES, Fault::Status(410), FOREVER));
    drill.add_later_service();
    wait_reported(&drill.daemon, "Expired", SYNC, true);

    // Each failed list waits longer before the next: 0.4-0.8 s, then 0.8-1.6, 1.6-3.2, 3.2-6.4...
    // So within 14 s of the first failure at most 6 lists, and one wait of 3 s or more (a retry
    // about once a second, as kube-runtime's own backoff did, has neither).
    let first = lists(&drill.kube)[at_restart];
    while first.elapsed() < Duration::from_secs(14) {
        assert_serving(&drill.daemon, "while every services list answers 410");
        std::thread::sleep(Duration::from_millis(250));
    }
    let tries: Vec<Instant> =
        lists(&drill.kube)[at_restart..].iter().copied().filter(|at| *at - first < Duration::from_secs(14)).collect();
    let waits: Vec<Duration> = tries.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(tries.len() >= 3, "{} services lists in 14 s: the link must keep trying", tries.len());
    assert!(tries.len() <= 6, "{} services lists in 14 s, waits {waits:?}: the link does not back off", tries.len());
    assert!(waits.iter().any(|w| *w >= Duration::from_secs(3)), "the waits do not grow: {waits:?}");
    assert_eq!(link_status(&drill.daemon)["state"], "disconnected");
    // Said by the store when the source turns unreachable (again after another kind's list
    // made contact at the start), not once per attempt.
    let log = drill.daemon.log();
    let said = log.matches("source unreachable").count();
    assert!(said < tries.len(), "said {said} times in {} attempts:\n{log}", tries.len());

    drill.kube.clear_faults();
    wait_recovered(&drill.daemon);
}
