//! Golden metrics over the last minute, per service and per route: success rate, requests per
//! second and latency percentiles. The dashboard, `meshkeep stat` and `meshkeep top` read them
//! from the admin endpoint; Prometheus gets the cumulative counters from `http.rs`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hashbrown::{Equivalent, HashMap};
use serde::{Deserialize, Serialize};

/// The window is this many slots of `SLOT` each.
const SLOTS: usize = 6;
const SLOT: Duration = Duration::from_secs(10);
/// Upper bounds of the latency buckets, in milliseconds (Linkerd's, then overflow).
const BOUNDS_MS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 1000.0, 2000.0, 3000.0,
    4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
];
/// Services and routes kept; the least recently seen one makes room for a new one.
const MAX_ROUTES: usize = 1000;
/// Paths are cut to this length.
const MAX_PATH: usize = 120;

/// One row of `stat` or `top`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub direction: String,
    pub authority: String,
    /// `METHOD /path` for `top`; absent for per-service rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Requests in the window.
    pub requests: u64,
    pub requests_per_second: f64,
    /// Share of responses that are not failures (5xx or proxy errors); `None` without requests.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// How many seconds the window covers (less than a minute just after start).
    pub window_seconds: u64,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    /// Which SLOT-long interval since `start` this slot holds.
    epoch: u64,
    requests: u64,
    failures: u64,
    buckets: [u64; BOUNDS_MS.len() + 1],
}

#[derive(Debug, Clone, Default)]
struct Window {
    slots: [Slot; SLOTS],
    last_seen: u64,
}

/// One response, as a window counts it: placed once, recorded for its service and its route.
#[derive(Debug, Clone, Copy)]
struct Sample {
    epoch: u64,
    failure: bool,
    /// Index of the latency's bucket in `Slot::buckets`.
    bucket: usize,
}

impl Sample {
    fn new(epoch: u64, failure: bool, latency_ms: f64) -> Self {
        let bucket = BOUNDS_MS.iter().position(|b| latency_ms <= *b).unwrap_or(BOUNDS_MS.len());
        Self { epoch, failure, bucket }
    }
}

impl Window {
    fn record(&mut self, Sample { epoch, failure, bucket }: Sample) {
        let slot = &mut self.slots[(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            *slot = Slot { epoch, ..Slot::default() };
        }
        slot.requests += 1;
        slot.failures += u64::from(failure);
        slot.buckets[bucket] += 1;
        self.last_seen = epoch;
    }

    /// Totals over the slots still inside the window ending at `epoch`.
    fn totals(&self, epoch: u64) -> Slot {
        let mut total = Slot::default();
        for slot in self.slots.iter().filter(|s| s.requests > 0 && epoch.saturating_sub(s.epoch) < SLOTS as u64) {
            total.requests += slot.requests;
            total.failures += slot.failures;
            for (sum, count) in total.buckets.iter_mut().zip(slot.buckets.iter()) {
                *sum += count;
            }
        }
        total
    }
}

/// Where `quantile` of the recorded latencies falls, interpolated inside its bucket.
fn percentile(buckets: &[u64], quantile: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = quantile * total as f64;
    let mut seen = 0.0;
    for (i, count) in buckets.iter().enumerate() {
        let count = *count as f64;
        if count > 0.0 && seen + count >= rank {
            let lower = if i == 0 { 0.0 } else { BOUNDS_MS[i - 1] };
            let upper = BOUNDS_MS.get(i).copied().unwrap_or(lower * 2.0);
            return Some(lower + (upper - lower) * ((rank - seen) / count).clamp(0.0, 1.0));
        }
        seen += count;
    }
    BOUNDS_MS.last().copied()
}

/// Direction, authority, and for a route its method and path.
type Key = (&'static str, String, Option<(String, String)>);

/// A `Key` borrowed from a request, to look one up without allocating. It hashes as the `Key`
/// it equals does: tuples, options and strings hash their parts in order.
#[derive(Hash)]
struct Lookup<'a>(&'static str, &'a str, Option<(&'a str, &'a str)>);

impl Equivalent<Key> for Lookup<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.0 == key.0
            && self.1 == key.1
            && match (self.2, &key.2) {
                (None, None) => true,
                (Some((method, path)), Some((m, p))) => method == m && path == p,
                _ => false,
            }
    }
}

impl Lookup<'_> {
    fn to_key(&self) -> Key {
        (self.0, self.1.to_owned(), self.2.map(|(method, path)| (method.to_owned(), path.to_owned())))
    }
}

/// Records into `map`, which keeps at most `MAX_ROUTES` keys: the least recently seen one
/// makes room (inbound authorities come from peers, so no map may grow without bound).
fn record_bounded(map: &mut HashMap<Key, Window>, key: Lookup<'_>, sample: Sample) {
    if let Some(window) = map.get_mut(&key) {
        window.record(sample);
        return;
    }
    if map.len() >= MAX_ROUTES
        && let Some(oldest) = map.iter().min_by_key(|(_, w)| w.last_seen).map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
    map.entry(key.to_key()).or_default().record(sample);
}

/// The sliding windows of every service and route.
#[derive(Debug)]
pub struct Golden {
    start: Instant,
    /// Under one lock: a response is recorded in both.
    windows: Mutex<Windows>,
}

#[derive(Debug, Default)]
struct Windows {
    services: HashMap<Key, Window>,
    routes: HashMap<Key, Window>,
}

impl Default for Golden {
    fn default() -> Self {
        Self { start: Instant::now(), windows: Mutex::default() }
    }
}

impl Golden {
    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs() / SLOT.as_secs()
    }

    /// Records one response, answered at `now` after `latency`. `authority` is bounded (a
    /// service name), the route (method and path) is kept for at most `MAX_ROUTES` distinct pairs.
    pub fn record(
        &self,
        direction: &'static str,
        authority: &str,
        (method, path): (&str, &str),
        failure: bool,
        latency: Duration,
        now: Instant,
    ) {
        let sample = Sample::new(self.epoch(now), failure, latency.as_secs_f64() * 1000.0);
        let path = path.split('?').next().unwrap_or("/");
        let path = match path.char_indices().nth(MAX_PATH) {
            Some((cut, _)) => &path[..cut],
            None => path,
        };
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        record_bounded(&mut windows.services, Lookup(direction, authority, None), sample);
        record_bounded(&mut windows.routes, Lookup(direction, authority, Some((method, path))), sample);
    }

    /// Per-service rows, busiest first.
    pub fn services(&self) -> Vec<Row> {
        self.rows(|windows| &windows.services)
    }

    /// Per-route rows, busiest first.
    pub fn routes(&self) -> Vec<Row> {
        self.rows(|windows| &windows.routes)
    }

    fn rows(&self, which: impl Fn(&Windows) -> &HashMap<Key, Window>) -> Vec<Row> {
        let epoch = self.epoch(Instant::now());
        // The current slot is partly filled: the window covers the full slots before it and
        // the elapsed part of this one.
        let elapsed = self.start.elapsed();
        let into_slot = elapsed.as_secs_f64() - (epoch * SLOT.as_secs()) as f64;
        let covered = ((SLOTS as u64 - 1) * SLOT.as_secs()) as f64 + into_slot;
        let covered = covered.min(elapsed.as_secs_f64()).max(1.0);
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<Row> = which(&windows)
            .iter()
            .filter_map(|((direction, authority, route), window)| {
                let total = window.totals(epoch);
                (total.requests > 0).then(|| Row {
                    direction: (*direction).to_owned(),
                    authority: authority.clone(),
                    route: route.as_ref().map(|(method, path)| format!("{method} {path}")),
                    requests: total.requests,
                    requests_per_second: total.requests as f64 / covered,
                    success_rate: Some(1.0 - total.failures as f64 / total.requests as f64),
                    p50_ms: percentile(&total.buckets, 0.50),
                    p95_ms: percentile(&total.buckets, 0.95),
                    p99_ms: percentile(&total.buckets, 0.99),
                    window_seconds: covered.round() as u64,
                })
            })
            .collect();
        rows.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.authority.cmp(&b.authority)));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_rate_rate_and_percentiles_follow_what_was_recorded() {
        let golden = Golden::default();
        for i in 0..100u64 {
            let failure = i % 10 == 0;
            let latency = Duration::from_millis(i % 50 + 1);
            golden.record("outbound", "web.shop:80", ("GET", "/a?x=1"), failure, latency, Instant::now());
        }
        golden.record("outbound", "db.shop:80", ("POST", "/b"), false, Duration::from_millis(3), Instant::now());
        let services = golden.services();
        assert_eq!(services.len(), 2);
        let web = &services[0];
        assert_eq!((web.authority.as_str(), web.requests), ("web.shop:80", 100), "busiest first");
        assert!((web.success_rate.unwrap() - 0.9).abs() < 1e-9);
        let (p50, p99) = (web.p50_ms.unwrap(), web.p99_ms.unwrap());
        assert!((20.0..=30.0).contains(&p50), "p50 {p50}");
        assert!((40.0..=50.0).contains(&p99), "p99 {p99}");
        assert!(web.requests_per_second >= 100.0 * 0.9, "covers at least a second: {}", web.requests_per_second);
        let routes = golden.routes();
        assert_eq!(routes[0].route.as_deref(), Some("GET /a"), "query strings are not part of a route");
    }

    #[test]
    fn old_slots_leave_the_window_and_routes_are_bounded() {
        let mut window = Window::default();
        window.record(Sample::new(0, false, 1.0));
        window.record(Sample::new(3, true, 1.0));
        assert_eq!(window.totals(5).requests, 2);
        assert_eq!(window.totals(6).requests, 1, "epoch 0 is a minute old at epoch 6");
        assert_eq!(window.totals(9).requests, 0);

        let golden = Golden::default();
        for i in 0..(MAX_ROUTES + 50) {
            let path = format!("/item/{i}");
            golden.record("inbound", "api", ("GET", &path), false, Duration::from_millis(1), Instant::now());
        }
        assert_eq!(golden.routes().len(), MAX_ROUTES);
        assert_eq!(golden.services().len(), 1);
    }

    #[test]
    fn a_borrowed_lookup_finds_its_key() {
        let mut map: HashMap<Key, Window> = HashMap::new();
        for lookup in [Lookup("outbound", "web.shop:80", None), Lookup("outbound", "web.shop:80", Some(("GET", "/a")))]
        {
            map.insert(lookup.to_key(), Window::default());
            assert!(map.get(&lookup).is_some(), "found without allocating");
        }
        assert!(map.get(&Lookup("inbound", "web.shop:80", None)).is_none());
        assert!(map.get(&Lookup("outbound", "web.shop:80", Some(("GET", "/b")))).is_none());
    }

    #[test]
    fn percentiles_of_nothing_are_none() {
        assert_eq!(percentile(&[0; 26], 0.5), None);
    }
}
