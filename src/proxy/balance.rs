//! Endpoint choice per service: topology preference (same node, then same zone, then any),
//! then power of two choices over peak-EWMA latency weighted by requests in flight (Linkerd's
//! balancer), with failure accrual: consecutive failures eject an endpoint for an exponential,
//! jittered backoff, after which one probe request decides whether it comes back.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;
use serde::Serialize;

use crate::config::TrafficConfig;

/// A ready endpoint the balancer may pick, borrowed from the resolution (made per request).
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// Where requests go (the endpoint, or the peer proxy in front of it): the balancer's key.
    pub addr: SocketAddr,
    pub node: Option<&'a str>,
    pub zone: Option<&'a str>,
    /// EndpointSlice hints: zones that should consume this endpoint.
    pub hints: &'a [String],
    /// The workload's identity when it is meshed: not the balancer's concern, carried for the
    /// caller to plan the connection to the endpoint it picked.
    pub identity: Option<&'a str>,
}

/// The box's place in the topology.
#[derive(Debug, Clone, Default)]
pub struct Locality {
    pub node: Option<String>,
    pub zone: Option<String>,
}

/// The tier of candidates topology prefers: same node if any, else same zone (its own or
/// hinted for this zone), else all. A tier whose endpoints are all ejected is skipped.
pub fn preferred<'a, 'b>(
    candidates: &'a [Candidate<'b>],
    locality: &Locality,
    usable: impl Fn(&Candidate<'b>) -> bool,
) -> Vec<&'a Candidate<'b>> {
    let node = |c: &&Candidate| locality.node.is_some() && c.node == locality.node.as_deref();
    let zone = |c: &&Candidate| {
        locality
            .zone
            .as_deref()
            .is_some_and(|z| if c.hints.is_empty() { c.zone == Some(z) } else { c.hints.iter().any(|hint| hint == z) })
    };
    for tier in [candidates.iter().filter(node).collect::<Vec<_>>(), candidates.iter().filter(zone).collect::<Vec<_>>()]
    {
        if tier.iter().any(|c| usable(c)) {
            return tier;
        }
    }
    candidates.iter().collect()
}

/// How a request (or connection attempt) to an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx answer, a refused or failed connection, a timeout.
    Failure,
}

/// What the balancer knows of one endpoint.
#[derive(Debug, Clone)]
struct Endpoint {
    /// Peak-EWMA of response latency, in seconds.
    ewma: f64,
    updated: Instant,
    pending: u32,
    consecutive_failures: u32,
    /// Ejections in a row (the backoff doubles with each).
    ejections: u32,
    ejected_until: Option<Instant>,
    /// One probe is allowed after an ejection; its outcome decides.
    probing: bool,
    requests: u64,
    failures: u64,
}

/// One endpoint's state for `meshkeep endpoints`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EndpointReport {
    pub addr: String,
    pub ewma_ms: f64,
    pub pending: u32,
    pub state: String,
    pub consecutive_failures: u32,
    pub requests: u64,
    pub failures: u64,
}

/// All services' endpoint state.
#[derive(Debug)]
pub struct Balancer {
    settings: Settings,
    /// By service name; the name is shared with the requests in flight to it.
    services: Mutex<HashMap<Arc<str>, HashMap<SocketAddr, Endpoint>>>,
}

#[derive(Debug, Clone)]
struct Settings {
    default_rtt: f64,
    decay: f64,
    failure_accrual: u32,
    backoff_min: Duration,
    backoff_max: Duration,
    jitter: f64,
}

/// Counts a request in flight until dropped; [`Balancer::finish`] records its outcome.
#[derive(Debug)]
pub struct InFlight {
    balancer: Arc<Balancer>,
    service: Arc<str>,
    addr: SocketAddr,
    started: Instant,
    /// The one request let through to an ejected endpoint: its outcome decides.
    probe: bool,
    done: bool,
}

impl InFlight {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Records the outcome and the latency since the pick.
    pub fn finish(self, outcome: Outcome) {
        self.finish_at(outcome, Instant::now());
    }

    /// Records the outcome, seen at `now` (a reading of the clock the caller has anyway).
    pub fn finish_at(mut self, outcome: Outcome, now: Instant) {
        self.done = true;
        let rtt = now.saturating_duration_since(self.started);
        self.balancer.observe(&self.service, self.addr, rtt, outcome, self.probe, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned (the client went away): no outcome, just no longer in flight.
            self.balancer.release(&self.service, self.addr, self.probe);
        }
    }
}

impl Balancer {
    pub fn new(config: &TrafficConfig) -> Self {
        Self {
            settings: Settings {
                default_rtt: config.ewma_default_rtt.get().as_secs_f64(),
                decay: config.ewma_decay.get().as_secs_f64().max(0.001),
                failure_accrual: config.failure_accrual.max(1),
                backoff_min: config.ejection_backoff_min.get(),
                backoff_max: config.ejection_backoff_max.get(),
                jitter: config.ejection_jitter.0,
            },
            services: Mutex::default(),
        }
    }

    /// Picks in `tier` (the topology's preferred part of the service's `ready` endpoints; all of
    /// them when `None`), or `None` when all of them are ejected and none is due for a probe. The
    /// state of ready endpoints outside the tier (ejections, latency) is kept for when they are
    /// preferred again. `roll` is a random number.
    pub fn pick(
        self: &Arc<Self>,
        service: &str,
        ready: &[Candidate],
        tier: Option<&[&Candidate]>,
        roll: u64,
    ) -> Option<InFlight> {
        let now = Instant::now();
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let entry = match services.entry_ref(service) {
            EntryRef::Occupied(entry) => entry,
            EntryRef::Vacant(entry) => entry.insert_entry(HashMap::default()),
        };
        let service = Arc::clone(entry.key());
        let endpoints = entry.into_mut();
        // Forget endpoints that left the service once nothing is in flight to them.
        if endpoints.len() > ready.len() {
            endpoints.retain(|addr, e| e.pending > 0 || ready.iter().any(|c| c.addr == *addr));
        }
        let settings = &self.settings;
        let considered = || {
            let (tier, all) = match tier {
                Some(tier) => (tier, &[][..]),
                None => (&[][..], ready),
            };
            tier.iter().copied().chain(all).map(|candidate| candidate.addr)
        };
        // The available endpoints, in candidate order, are counted rather than collected. An
        // endpoint whose ejection has run out gets the next request: the probe that decides
        // whether it comes back.
        let (mut count, mut last, mut probe) = (0, None, None);
        for addr in considered() {
            let endpoint = endpoints.entry(addr).or_insert_with(|| Endpoint::new(settings.default_rtt, now));
            if endpoint.available(now) {
                count += 1;
                last = Some(addr);
                if probe.is_none() && endpoint.ejected_until.is_some() {
                    probe = Some(addr);
                }
            }
        }
        let chosen = match (probe, count) {
            (Some(probe), _) => probe,
            (None, 1) => last?,
            (None, 0) => return None,
            (None, n) => {
                let first = (roll % n as u64) as usize;
                let second = (first + 1 + ((roll >> 32) % (n as u64 - 1)) as usize) % n;
                let mut available = considered().filter(|addr| endpoints.get(addr).is_some_and(|e| e.available(now)));
                let (low, high) = (first.min(second), first.max(second));
                let at_low = available.nth(low)?;
                let at_high = available.nth(high - low - 1)?;
                let (a, b) = if first < second { (at_low, at_high) } else { (at_high, at_low) };
                let cost = |addr: &SocketAddr| endpoints.get(addr).map_or(f64::MAX, |e| e.cost(settings, now));
                if cost(&a) <= cost(&b) { a } else { b }
            }
        };
        let endpoint = endpoints.get_mut(&chosen)?;
        let probe = endpoint.ejected_until.is_some();
        endpoint.probing |= probe;
        endpoint.pending += 1;
        endpoint.requests += 1;
        Some(InFlight { balancer: Arc::clone(self), service, addr: chosen, started: now, probe, done: false })
    }

    /// Whether the endpoint could be picked now (not ejected, or due for its probe).
    pub fn usable(&self, service: &str, addr: SocketAddr) -> bool {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.get(service).and_then(|s| s.get(&addr)).is_none_or(|e| e.available(Instant::now()))
    }

    fn release(&self, service: &str, addr: SocketAddr, probe: bool) {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = services.get_mut(service).and_then(|s| s.get_mut(&addr)) {
            e.pending = e.pending.saturating_sub(1);
            // An abandoned probe decided nothing: the next request probes again.
            e.probing &= !probe;
        }
    }

    /// Records an outcome seen at `now`, `rtt` after the pick. While an endpoint is ejected,
    /// only its probe's failure ejects it again (for longer): requests picked before the
    /// ejection, failing together (a connection that broke under them all), count as failures
    /// but do not stretch it.
    fn observe(&self, service: &str, addr: SocketAddr, rtt: Duration, outcome: Outcome, probe: bool, now: Instant) {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = services.get_mut(service).and_then(|s| s.get_mut(&addr)) else { return };
        e.pending = e.pending.saturating_sub(1);
        e.probing &= !probe;
        let rtt = rtt.as_secs_f64();
        // Peak: slowness shows at once. Otherwise the sample weighs by the time since the last
        // one (the estimate keeps `w`, the share the decay leaves of it).
        let w = e.decay_weight(&self.settings, now);
        e.ewma = if rtt > e.ewma { rtt } else { e.ewma * w + rtt * (1.0 - w) };
        e.updated = now;
        match outcome {
            Outcome::Success => {
                e.consecutive_failures = 0;
                e.ejections = 0;
                e.ejected_until = None;
            }
            Outcome::Failure => {
                e.failures += 1;
                if e.ejected_until.is_some() && !probe {
                    return;
                }
                e.consecutive_failures += 1;
                if probe || e.consecutive_failures >= self.settings.failure_accrual {
                    let backoff = self.backoff(e.ejections, unit_random());
                    e.ejected_until = Some(now + backoff);
                    e.ejections = e.ejections.saturating_add(1);
                    e.consecutive_failures = 0;
                    tracing::info!(%service, %addr, backoff_ms = backoff.as_millis() as u64, "balancer: endpoint ejected after failures");
                }
            }
        }
    }

    /// `min * 2^ejections`, capped at `max`; then up to `jitter` of it is added or removed,
    /// by `unit` (a random number in [0, 1)).
    fn backoff(&self, ejections: u32, unit: f64) -> Duration {
        let base = self.settings.backoff_min.as_secs_f64() * 2f64.powi(ejections.min(30) as i32);
        let base = base.min(self.settings.backoff_max.as_secs_f64());
        let factor = 1.0 + self.settings.jitter * (unit * 2.0 - 1.0);
        Duration::from_secs_f64((base * factor).max(0.0))
    }

    /// The state of a service's endpoints.
    pub fn report(&self, service: &str) -> Vec<EndpointReport> {
        let now = Instant::now();
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<EndpointReport> = services
            .get(service)
            .map(|endpoints| {
                endpoints
                    .iter()
                    .map(|(addr, e)| EndpointReport {
                        addr: addr.to_string(),
                        ewma_ms: e.ewma * 1000.0,
                        pending: e.pending,
                        state: match e.ejected_until {
                            Some(until) if until > now => format!("ejected for {}ms", (until - now).as_millis()),
                            Some(_) => "probing".to_owned(),
                            None => "active".to_owned(),
                        },
                        consecutive_failures: e.consecutive_failures,
                        requests: e.requests,
                        failures: e.failures,
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.sort_by(|a, b| a.addr.cmp(&b.addr));
        rows
    }

    /// Services the balancer has state for.
    pub fn services(&self) -> Vec<String> {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = services.keys().map(|name| name.to_string()).collect();
        names.sort();
        names
    }
}

impl Endpoint {
    fn new(default_rtt: f64, now: Instant) -> Self {
        Self {
            ewma: default_rtt,
            updated: now,
            pending: 0,
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
            probing: false,
            requests: 0,
            failures: 0,
        }
    }

    /// Not ejected, or due for its single probe.
    fn available(&self, now: Instant) -> bool {
        match self.ejected_until {
            None => true,
            Some(until) => until <= now && !self.probing,
        }
    }

    /// Peak-EWMA cost: the latency estimate, decayed toward zero since the last observation
    /// (so an endpoint that was slow is tried again once it has rested), times the requests
    /// it would have in flight.
    fn cost(&self, settings: &Settings, now: Instant) -> f64 {
        f64::from(self.pending + 1) * self.decayed(settings, now)
    }

    fn decayed(&self, settings: &Settings, now: Instant) -> f64 {
        self.ewma * self.decay_weight(settings, now)
    }

    /// How much of the estimate is left after the time since the last observation.
    fn decay_weight(&self, settings: &Settings, now: Instant) -> f64 {
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        (-elapsed / settings.decay).exp()
    }
}

/// A random number in [0, 1), for jitter.
fn unit_random() -> f64 {
    (roll() >> 11) as f64 / (1u64 << 53) as f64
}

/// A random number for picks (not for anything secret): wyrand, one stream per thread, each
/// seeded from the standard library's random hash keys.
pub fn roll() -> u64 {
    use std::cell::Cell;
    use std::hash::BuildHasher;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(std::collections::hash_map::RandomState::new().hash_one(0u64));
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(next);
        let product = u128::from(next) * u128::from(next ^ 0xe703_7ed1_a0b4_28db);
        (product as u64) ^ ((product >> 64) as u64)
    })
}

#[cfg(test)]
mod tests;
