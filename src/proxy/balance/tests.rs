use super::*;
use crate::config::TrafficConfig;

fn candidate(last: u8, node: &'static str, zone: &'static str) -> Candidate<'static> {
    Candidate {
        addr: SocketAddr::from(([10, 0, 0, last], 8080)),
        node: Some(node),
        zone: Some(zone),
        hints: &[],
        identity: None,
    }
}

fn balancer() -> Arc<Balancer> {
    Arc::new(Balancer::new(&TrafficConfig::default()))
}

/// A first ejection of exactly 50 ms (no jitter), doubling from there.
fn balancer_ejecting_for_50ms() -> Arc<Balancer> {
    let mut config = TrafficConfig::default();
    config.ejection_backoff_min = crate::config::Duration::from_millis(50);
    config.ejection_jitter = crate::config::Ratio(0.0);
    Arc::new(Balancer::new(&config))
}

#[test]
fn topology_prefers_the_node_then_the_zone_then_anything_usable() {
    let candidates = [candidate(1, "n1", "z1"), candidate(2, "n2", "z1"), candidate(3, "n3", "z2")];
    let here = Locality { node: Some("n1".into()), zone: Some("z1".into()) };
    let addrs = |tier: Vec<&Candidate>| tier.iter().map(|c| c.addr.ip().to_string()).collect::<Vec<_>>();
    assert_eq!(addrs(preferred(&candidates, &here, |_| true)), vec!["10.0.0.1"]);
    let not_one = |c: &Candidate| c.addr.ip().to_string() != "10.0.0.1";
    assert_eq!(
        addrs(preferred(&candidates, &here, not_one)),
        vec!["10.0.0.1", "10.0.0.2"],
        "same zone when the node's is unusable"
    );
    let elsewhere = Locality { node: Some("n9".into()), zone: Some("z9".into()) };
    assert_eq!(addrs(preferred(&candidates, &elsewhere, |_| true)).len(), 3, "no preference: all");
    let (z1, z2) = (["z1".to_owned()], ["z2".to_owned()]);
    let mut hinted = candidates.clone();
    hinted[2].hints = &z1;
    hinted[1].hints = &z2;
    let zone_only = Locality { node: None, zone: Some("z1".into()) };
    assert_eq!(
        addrs(preferred(&hinted, &zone_only, |_| true)),
        vec!["10.0.0.1", "10.0.0.3"],
        "hints decide over zones"
    );
}

#[test]
fn two_choices_favour_the_faster_endpoint() {
    let balancer = balancer();
    let candidates = [candidate(1, "n", "z"), candidate(2, "n", "z")];
    let mut picks = [0u32; 2];
    for i in 0..400u64 {
        let mut pick = balancer.pick("svc", &candidates, None, i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).unwrap();
        let slow = pick.addr() == candidates[1].addr;
        picks[usize::from(slow)] += 1;
        // Resolve the pick as if the endpoint answered in 1 ms or 50 ms.
        pick.started = Instant::now() - Duration::from_millis(if slow { 50 } else { 1 });
        pick.finish(Outcome::Success);
    }
    assert!(picks[1] < 60, "the slow endpoint got {} of 400", picks[1]);
}

#[test]
fn a_slower_sample_is_taken_whole_and_a_faster_one_weighs_by_the_time_since_the_last() {
    let balancer = balancer();
    let only = [candidate(1, "n", "z")];
    drop(balancer.pick("svc", &only, None, 1));
    let ewma_ms = || balancer.report("svc")[0].ewma_ms;
    let (start, decay) = (Instant::now(), TrafficConfig::default().ewma_decay.get());
    balancer.observe("svc", only[0].addr, Duration::from_millis(100), Outcome::Success, false, start);
    assert_eq!(ewma_ms(), 100.0, "a peak replaces the estimate");
    // One decay time later the old estimate keeps e^-1 of its weight: 100 e^-1 + 20 (1 - e^-1).
    balancer.observe("svc", only[0].addr, Duration::from_millis(20), Outcome::Success, false, start + decay);
    let expected = 100.0 * (-1f64).exp() + 20.0 * (1.0 - (-1f64).exp());
    assert!((ewma_ms() - expected).abs() < 1e-6, "{} against {expected}", ewma_ms());
}

#[test]
fn consecutive_failures_eject_and_a_probe_brings_an_endpoint_back() {
    let balancer = balancer_ejecting_for_50ms();
    let only = [candidate(1, "n", "z")];
    for _ in 0..6 {
        balancer.pick("svc", &only, None, 1).unwrap().finish(Outcome::Failure);
    }
    assert!(balancer.report("svc")[0].state == "active", "six failures are not enough");
    balancer.pick("svc", &only, None, 1).unwrap().finish(Outcome::Failure);
    assert!(balancer.report("svc")[0].state.starts_with("ejected"), "{:?}", balancer.report("svc"));
    assert!(balancer.pick("svc", &only, None, 1).is_none(), "no pick while ejected");
    std::thread::sleep(Duration::from_millis(70));
    let probe = balancer.pick("svc", &only, None, 1).expect("a probe is allowed after the backoff");
    assert!(balancer.pick("svc", &only, None, 1).is_none(), "only one probe at a time");
    probe.finish(Outcome::Failure);
    assert!(balancer.report("svc")[0].state.starts_with("ejected"), "a failed probe ejects again");
    std::thread::sleep(Duration::from_millis(130)); // the backoff doubled to 100 ms
    balancer.pick("svc", &only, None, 1).expect("probe").finish(Outcome::Success);
    assert_eq!(balancer.report("svc")[0].state, "active", "a successful probe restores it");
}

#[test]
fn failures_of_requests_picked_before_an_ejection_do_not_stretch_it() {
    let balancer = balancer_ejecting_for_50ms();
    let only = [candidate(1, "n", "z")];
    let ejected_ms = || {
        let report = &balancer.report("svc")[0];
        report.state.strip_prefix("ejected for ").and_then(|s| s.strip_suffix("ms")?.parse::<u64>().ok())
    };
    // Thirty requests in flight; the connection under them breaks, and they all fail.
    let in_flight: Vec<InFlight> = (0..30).map(|_| balancer.pick("svc", &only, None, 1).unwrap()).collect();
    for request in in_flight {
        request.finish(Outcome::Failure);
    }
    assert_eq!(balancer.report("svc")[0].failures, 30, "every failure is counted");
    let first = ejected_ms().expect("seven failures in a row eject it");
    assert!(first <= 50, "one ejection, at the shortest backoff: {first} ms");
    // Its probe fails: ejected again, for twice as long.
    std::thread::sleep(Duration::from_millis(60));
    let probe = balancer.pick("svc", &only, None, 1).expect("the probe");
    assert!(balancer.pick("svc", &only, None, 1).is_none(), "one probe at a time");
    probe.finish(Outcome::Failure);
    let second = ejected_ms().expect("the failed probe ejects it again");
    assert!((51..=100).contains(&second), "the backoff doubled: {second} ms");
}

#[test]
fn an_ejection_outside_the_preferred_tier_is_remembered() {
    let balancer = Arc::new(Balancer::new(&TrafficConfig::default()));
    let ready = [candidate(1, "n1", "here"), candidate(2, "n2", "elsewhere")];
    let (near, far) = (vec![&ready[0]], vec![&ready[1]]);
    // While the preferred zone had no ready endpoint, the far one failed and was ejected.
    for _ in 0..7 {
        balancer.pick("svc", &ready, Some(&far), 1).unwrap().finish(Outcome::Failure);
    }
    for _ in 0..5 {
        balancer.pick("svc", &ready, Some(&near), 1).unwrap().finish(Outcome::Success);
    }
    assert!(!balancer.usable("svc", ready[1].addr), "still ejected: {:?}", balancer.report("svc"));
    assert!(balancer.pick("svc", &ready, Some(&far), 1).is_none(), "not picked before its backoff ends");
}

#[test]
fn backoff_doubles_up_to_the_maximum_with_jitter_around_it() {
    let balancer = Balancer::new(&TrafficConfig::default());
    assert_eq!(balancer.backoff(0, 0.5), Duration::from_secs(1));
    assert_eq!(balancer.backoff(3, 0.5), Duration::from_secs(8));
    assert_eq!(balancer.backoff(20, 0.5), Duration::from_secs(60));
    assert_eq!(balancer.backoff(0, 0.0), Duration::from_millis(500), "jitter 0.5 takes up to half off");
    assert!(balancer.backoff(0, 0.999) < Duration::from_millis(1500));
}

#[test]
fn rolls_spread_evenly_in_their_low_and_high_bits() {
    let mut low = [0u32; 10];
    let mut high = [0u32; 16];
    for _ in 0..20_000 {
        let roll = roll();
        low[(roll as u32 % 10) as usize] += 1;
        high[(roll >> 60) as usize] += 1;
    }
    // Expected 2,000 and 1,250 per bucket; the bounds are more than six standard deviations out.
    assert!(low.iter().all(|&n| (1_730..=2_270).contains(&n)), "{low:?}");
    assert!(high.iter().all(|&n| (1_040..=1_460).contains(&n)), "{high:?}");
    // Threads do not share a stream: two new ones start in different places.
    let first_rolls = || std::thread::spawn(|| (0..4).map(|_| roll()).collect::<Vec<u64>>()).join().unwrap();
    assert_ne!(first_rolls(), first_rolls());
}

#[test]
fn two_choices_are_drawn_in_order_from_the_available_endpoints_only() {
    let balancer = balancer();
    let ready = [candidate(1, "n", "z"), candidate(2, "n", "z"), candidate(3, "n", "z"), candidate(4, "n", "z")];
    for _ in 0..7 {
        balancer.pick("svc", &ready, Some(&[&ready[1]]), 1).unwrap().finish(Outcome::Failure);
    }
    let available = [ready[0].addr, ready[2].addr, ready[3].addr];
    // At equal cost the first choice wins: the roll's low bits pick it among the available.
    for roll in 0..30u64 {
        let pick = balancer.pick("svc", &ready, None, roll).unwrap();
        assert_eq!(pick.addr(), available[(roll % 3) as usize], "roll {roll}");
    }
    // With the first choice busy, the second wins: the high bits pick it among the others.
    let _busy = balancer.pick("svc", &ready, None, 0).unwrap();
    for (high, expected) in [(0u64, available[1]), (1, available[2]), (2, available[1])] {
        // The low bits chosen so that the first choice stays the busy endpoint.
        let roll = (high << 32) + (3 - (high << 32) % 3) % 3;
        let pick = balancer.pick("svc", &ready, None, roll).unwrap();
        assert_eq!(pick.addr(), expected, "second choice {high}");
    }
}
