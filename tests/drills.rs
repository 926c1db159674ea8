//! Partition drills in network namespaces (see `support::netns`): the fake API server upstream,
//! two boxes at a site with a LAN between them, and a backhoe that cuts the site's uplinks.
//! RELIABILITY.md lists what each drill proves and how often it ran. Needs root.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use meshkeep::identity::ca::{CertInfo, certificates_from_pem, standalone};
use nix::sys::signal::Signal;
use support::Daemon;
use support::fake_kube::FakeKube;
use support::netns::{Cut, Host, Lab};
use support::objects::{endpoint_slice, issuer_secret, pod, service, trust_roots};

/// The port box B's workload listens on (the EndpointSlices' port).
const APP_PORT: u16 = 8080;
const INBOUND_PORT: u16 = 4143;
const LISTENER: &str = "127.0.0.1:9001";

/// What the traffic loop saw: each request's start and whether it succeeded.
#[derive(Default)]
struct Traffic {
    outcomes: Vec<(Instant, Result<(), String>)>,
}

impl Traffic {
    /// Failures among requests that started inside `window`.
    fn failures_within(&self, from: Instant, to: Instant) -> Vec<String> {
        self.outcomes
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .filter_map(|(_, r)| r.as_ref().err().cloned())
            .collect()
    }

    fn successes_within(&self, from: Instant, to: Instant) -> usize {
        self.outcomes.iter().filter(|(at, r)| *at >= from && *at <= to && r.is_ok()).count()
    }
}

/// The site: box A (the client side) and box B (in front of the workload), both synced from
/// one upstream cluster whose issuer they cache.
struct Site {
    lab: Lab,
    kube: FakeKube,
    a: Daemon,
    b: Daemon,
}

impl Site {
    fn box_a(&self) -> &Host {
        &self.lab.hosts[0]
    }

    fn box_b(&self) -> &Host {
        &self.lab.hosts[1]
    }
}

/// A link to the API server as `host` reaches it, with the fake's bearer token.
fn link(host: &Host, kube: &FakeKube) -> String {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let token = dir.join("token");
    std::fs::write(&token, support::fake_kube::TOKEN).expect("write the token");
    format!(
        "[upstream.links.east]\nserver = \"http://{}:{}\"\ntoken_file = {:?}\nmode = \"federated\"\n",
        host.upstream_ip(),
        kube.addr().port(),
        token.display().to_string()
    )
}

/// Certificates of four seconds stand in for an accelerated clock: a day of rotations in a drill.
const FAST_ROTATION: &str = "[identity]\ncertificate_lifetime = \"4s\"\nclock_skew = \"0s\"\n";

fn site() -> Site {
    let lab = Lab::create(2);
    let kube = FakeKube::start_on(Ipv4Addr::UNSPECIFIED.into());
    let issuer = standalone("cluster.local", SystemTime::now(), Duration::from_secs(86400)).expect("issuer");
    kube.apply(issuer_secret(&issuer.certificate, &issuer.private_key, &issuer.trust_anchors));
    kube.apply(trust_roots(&issuer.trust_anchors));
    let b_ip = lab.hosts[1].lan_ip.to_string();
    kube.apply(service("shop", "api", "10.96.0.11", 80));
    kube.apply(pod("shop", "api-1", &b_ip, "api"));
    kube.apply(endpoint_slice("shop", "api", "a", &[(&b_ip, "api-1")]));
    kube.apply(service("shop", "old", "10.96.0.12", 80));

    let (host_a, host_b) = (&lab.hosts[0], &lab.hosts[1]);
    // The workload behind box B: a real HTTP server on B's loopback.
    lab.within(host_b, || support::mesh::http_backend_on(SocketAddr::from(([127, 0, 0, 1], APP_PORT))));
    let b = Daemon::builder()
        .netns(&host_b.netns)
        .config(&format!(
            "{}{FAST_ROTATION}[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"api\"\n",
            link(host_b, &kube)
        ))
        .env("MESHKEEP_PROXY_INBOUND_LISTEN", SocketAddr::from((host_b.lan_ip, INBOUND_PORT)).to_string())
        .spawn();
    let a = Daemon::builder()
        .netns(&host_a.netns)
        .config(&format!(
            "{}{FAST_ROTATION}[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"web\"\n\
             [proxy]\npeer_inbound_port = {INBOUND_PORT}\n\
             [[proxy.listeners]]\nlisten = \"{LISTENER}\"\nservice = \"api.shop\"\nport = 80\n",
            link(host_a, &kube)
        ))
        .spawn();
    let mut site = Site { lab, kube, a, b };
    let Site { lab, a, b, .. } = &mut site;
    for (daemon, host) in [(a, &lab.hosts[0]), (b, &lab.hosts[1])] {
        lab.within(host, || {
            daemon.wait_ready();
            daemon.wait_for("synced with the identity, and a proxy certificate", Duration::from_secs(60), |d| {
                d.resolve("api.shop")["endpoints"][0]["identity"]
                    == "api.shop.serviceaccount.identity.linkerd.cluster.local"
                    && d.log().contains("proxy: TLS identity in use")
            });
        });
    }
    site
}

/// Requests through box A's listener, one every 20 ms, until `stop`.
fn traffic(lab: &Lab, host: &Host, stop: &AtomicBool, seen: &Mutex<Traffic>) {
    lab.within(host, || {
        let listener: SocketAddr = LISTENER.parse().expect("listener address");
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let outcome = match support::http_get(listener, "/drill") {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!("HTTP {status}: {body}")),
                Err(e) => Err(e.to_string()),
            };
            seen.lock().expect("traffic log").outcomes.push((started, outcome));
            std::thread::sleep(Duration::from_millis(20).saturating_sub(started.elapsed()));
        }
    });
}

/// The proxy certificate's expiry as box `daemon` reports it.
fn proxy_cert_not_after(daemon: &Daemon) -> Option<u64> {
    let status = daemon.status();
    status["identity"]["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["proxy"] == true)
        .and_then(|c| c["not_after"].as_u64())
}

/// `dig` inside the host against the box's DNS server: the addresses it answers.
fn dig(site: &Site, host: &Host, daemon: &Daemon, name: &str) -> String {
    let output = site
        .lab
        .command(host, "dig")
        .args([
            &format!("@{}", daemon.dns.ip()),
            "-p",
            &daemon.dns.port().to_string(),
            "+short",
            "+time=2",
            "+tries=1",
            name,
        ])
        .output()
        .expect("dig");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Watches both boxes through a cut of `hold`: DNS answers, the identity keeps rotating,
/// discovery stays; returns the distinct proxy certificate expiries seen on each box.
fn ride_out(site: &Site, hold: Duration) -> (Vec<u64>, Vec<u64>) {
    let deadline = Instant::now() + hold;
    let (mut a_certs, mut b_certs) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        assert_eq!(dig(site, site.box_a(), &site.a, "api.shop.svc.cluster.local"), "10.96.0.11", "DNS during the cut");
        for (daemon, host, certs) in [(&site.a, site.box_a(), &mut a_certs), (&site.b, site.box_b(), &mut b_certs)] {
            let not_after = site.lab.within(host, || {
                assert_eq!(support::endpoint_ips(&daemon.resolve("api.shop")).map(|ips| ips.len()), Some(1));
                proxy_cert_not_after(daemon)
            });
            if let Some(not_after) = not_after.filter(|n| !certs.contains(n)) {
                certs.push(not_after);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    (a_certs, b_certs)
}

#[test]
fn backhoe_cuts_the_uplink_and_the_site_keeps_working() {
    if !Lab::available("the backhoe drill") {
        return;
    }
    support::require_tool("dig");
    let site = site();
    let stop = AtomicBool::new(false);
    let seen = Mutex::new(Traffic::default());
    std::thread::scope(|scope| {
        scope.spawn(|| traffic(&site.lab, site.box_a(), &stop, &seen));
        let report = |what: &str, from: Instant| {
            let to = Instant::now();
            let traffic = seen.lock().expect("traffic log");
            let failures = traffic.failures_within(from, to);
            let successes = traffic.successes_within(from, to);
            eprintln!("drill: {what}: {successes} requests succeeded, {} failed", failures.len());
            assert!(failures.is_empty(), "{what}: requests failed: {:?}", &failures[..failures.len().min(5)]);
            assert!(successes > 20, "{what}: too few requests went through ({successes})");
        };

        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        report("before the cut", started);

        for how in [Cut::LinkDown, Cut::SilentDrop] {
            let from = Instant::now();
            for host in [site.box_a(), site.box_b()] {
                site.lab.cut(host, how);
            }
            // Upstream changes while the site is cut off; they arrive after the mend.
            let added = format!("added-{how:?}").to_lowercase();
            site.kube.apply(service("shop", &added, "10.96.1.1", 80));
            let (a_certs, b_certs) = ride_out(&site, Duration::from_secs(14));
            assert!(a_certs.len() >= 3, "{how:?}: box A's certificate did not keep rotating: {a_certs:?}");
            assert!(b_certs.len() >= 3, "{how:?}: box B's certificate did not keep rotating: {b_certs:?}");
            report(&format!("{how:?}"), from);
            for host in [site.box_a(), site.box_b()] {
                site.lab.mend(host, how);
            }
            let (lab, a) = (&site.lab, &site.a);
            lab.within(site.box_a(), || {
                a.wait_for(&format!("{added} synced after the {how:?} mend"), Duration::from_secs(120), |d| {
                    d.resolve(&format!("{added}.shop"))["result"] == "found"
                });
            });
        }
        stop.store(true, Ordering::Relaxed);
    });
}

#[test]
fn reboot_while_cut_off_then_reconnect_applies_every_change() {
    if !Lab::available("the reboot-while-cut-off drill") {
        return;
    }
    let mut site = site();
    for host in [site.box_a(), site.box_b()] {
        site.lab.cut(host, Cut::SilentDrop);
    }
    // Changes upstream during the partition: one added, one changed, one deleted.
    site.kube.apply(service("shop", "new", "10.96.2.1", 80));
    site.kube.apply(service("shop", "api", "10.96.0.21", 80));
    site.kube.delete("v1", "Service", "shop", "old");

    // Box A reboots while cut off: ready from its cache, traffic resumes.
    site.a.signal(Signal::SIGTERM);
    assert!(site.a.wait_exit(Duration::from_secs(20)).success(), "box A stops cleanly");
    let rebooted = Instant::now();
    site.a.respawn();
    let Site { lab, a, .. } = &mut site;
    let ready_after = lab.within(&lab.hosts[0], || {
        a.wait_ready();
        rebooted.elapsed()
    });
    eprintln!("drill: box A ready from its cache {} ms after start, while cut off", ready_after.as_millis());
    assert!(ready_after < Duration::from_secs(5), "ready from the cache took {ready_after:?}");
    let listener: SocketAddr = LISTENER.parse().expect("listener address");
    let first_success = lab.within(&lab.hosts[0], || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = support::http_get(listener, "/after-reboot") {
                return rebooted.elapsed();
            }
            assert!(Instant::now() < deadline, "traffic did not resume after the reboot\n{}", a.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    eprintln!("drill: traffic through box A resumed {} ms after its start", first_success.as_millis());
    lab.within(&lab.hosts[0], || {
        assert_eq!(a.resolve("api.shop")["cluster_ips"][0], "10.96.0.11", "the cache, not the cut-off cluster");
        assert_eq!(a.resolve("old.shop")["result"], "found");
    });

    for host in [site.box_a(), site.box_b()] {
        site.lab.mend(host, Cut::SilentDrop);
    }
    let Site { lab, a, b, .. } = &site;
    for (daemon, host) in [(a, &lab.hosts[0]), (b, &lab.hosts[1])] {
        lab.within(host, || {
            daemon.wait_for("every change made during the partition", Duration::from_secs(120), |d| {
                d.resolve("new.shop")["result"] == "found"
                    && d.resolve("api.shop")["cluster_ips"][0] == "10.96.0.21"
                    && d.resolve("old.shop")["result"] == "not_found"
            });
        });
    }
}

#[test]
fn many_boxes_reconnecting_at_once_spread_their_requests() {
    use support::cluster::{ips, link_config, shop_cluster};
    const BOXES: usize = 8;
    let kube = shop_cluster();
    let mut boxes: Vec<Daemon> =
        (0..BOXES).map(|_| Daemon::builder().config(&link_config("east", &kube, "federated")).spawn()).collect();
    for daemon in &mut boxes {
        daemon.wait_ready();
        daemon.wait_for("synced", Duration::from_secs(60), |d| ips(d, "api.shop").is_some());
    }

    // The API server goes away for everyone at the same moment, long enough for the backoff to
    // grow; a change waits for them upstream.
    kube.down();
    for daemon in &boxes {
        daemon.wait_for("link reported down", Duration::from_secs(60), |d| {
            d.status()["sources"][0]["state"] == "disconnected"
        });
    }
    std::thread::sleep(Duration::from_secs(15));
    kube.apply(service("shop", "after", "10.96.3.1", 80));
    let up_at = Instant::now();
    kube.up();
    for daemon in &boxes {
        daemon.wait_for("the change after the outage", Duration::from_secs(120), |d| {
            d.resolve("after.shop")["result"] == "found"
        });
    }

    // When did the boxes come back (watches resumed from their resourceVersion, or lists)?
    // Without jitter every box's retry timer, started by the same outage, would fire together.
    let mut arrivals: Vec<Duration> =
        kube.requests().iter().filter(|r| r.at >= up_at).map(|r| r.at.duration_since(up_at)).collect();
    arrivals.sort();
    const WINDOW: Duration = Duration::from_millis(250);
    let busiest = (0..arrivals.len())
        .map(|i| arrivals[i..].iter().take_while(|t| **t < arrivals[i] + WINDOW).count())
        .max()
        .unwrap_or(0);
    let spread =
        arrivals.last().copied().unwrap_or_default().saturating_sub(arrivals.first().copied().unwrap_or_default());
    eprintln!(
        "drill: {BOXES} boxes reconnected with {} requests spread over {spread:?}; the busiest {WINDOW:?} held {busiest}",
        arrivals.len()
    );
    assert!(arrivals.len() >= BOXES, "every box came back: {arrivals:?}");
    assert!(
        busiest * 3 <= arrivals.len(),
        "a thundering herd: {busiest} of {} requests within {WINDOW:?}",
        arrivals.len()
    );
}

#[test]
fn power_cut_during_issuer_replacement_never_tears_the_identity() {
    use support::cluster::{link_config, shop_cluster};
    let kube = shop_cluster();
    // Each generation of the issuer expires at a different second, which names it.
    let generation = |round: u64| {
        let issuer =
            standalone("cluster.local", SystemTime::now(), Duration::from_secs(86400 + round * 60)).expect("issuer");
        kube.apply(issuer_secret(&issuer.certificate, &issuer.private_key, &issuer.trust_anchors));
        let der = certificates_from_pem(&issuer.certificate).expect("issuer PEM");
        let info = CertInfo::parse(&der[0]).expect("issuer certificate");
        info.not_after.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs()
    };
    let mut published = vec![generation(0)];
    let config = format!(
        "{}[identity]\ncertificate_lifetime = \"4s\"\nclock_skew = \"0s\"\n\
         [identity.proxy]\nnamespace = \"shop\"\nservice_account = \"web\"\n",
        link_config("east", &kube, "federated")
    );
    let mut daemon = Daemon::builder().config(&config).spawn();
    daemon.wait_ready();
    daemon.wait_for("the first issuer adopted", Duration::from_secs(60), |d| {
        d.status()["identity"]["issuer_not_after"] == published[0]
    });
    let config_path = daemon.config_path().expect("config").display().to_string();
    let rounds: u64 = std::env::var("MESHKEEP_KILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut adopted_at_cut = 0;
    for round in 1..=rounds {
        published.push(generation(round));
        // Half the cuts come within 120 ms of publishing (while the issuer is being adopted).
        let pause = if round % 2 == 0 { (round * 37) % 120 } else { 50 + (round * 331) % 1500 };
        std::thread::sleep(Duration::from_millis(pause));
        daemon.kill9();
        let output = support::meshkeep(
            daemon.path(),
            &["-c", &config_path, "identity", "show", "-o", "json"],
            &[("MESHKEEP_ADMIN_LISTEN", "127.0.0.1:1")],
        );
        assert!(output.status.success(), "round {round}: {}", String::from_utf8_lossy(&output.stderr));
        let cached: serde_json::Value = serde_json::from_slice(&output.stdout).expect("identity JSON");
        let issuer = cached["issuer_not_after"].as_u64();
        assert!(
            issuer.is_some_and(|n| published.contains(&n)),
            "round {round}: the cached issuer is not one that was published: {cached}"
        );
        assert!(cached["certificates"].as_array().is_some_and(|c| !c.is_empty()), "round {round}: {cached}");
        adopted_at_cut += usize::from(issuer == published.last().copied());
        daemon.respawn();
        daemon.wait_ready();
    }
    eprintln!(
        "drill: {rounds} power cuts during issuer replacement; the newest issuer was already cached at {adopted_at_cut}"
    );
    let newest = *published.last().expect("published");
    daemon.wait_for("the newest issuer adopted after the last cut", Duration::from_secs(60), |d| {
        d.status()["identity"]["issuer_not_after"] == newest
    });
}
