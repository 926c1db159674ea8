//! The retry budget (Linkerd's): per service, retries may add `ratio` of the requests plus
//! `min_per_second` over a sliding window, so a full outage cannot multiply the load on the
//! backends by the retry count.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use crate::config::TrafficConfig;

const SLOTS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    epoch: u64,
    requests: u64,
    retries: u64,
}

#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    min_per_second: f64,
    window: Duration,
    start: Instant,
    services: Mutex<HashMap<String, [Slot; SLOTS]>>,
}

impl Budget {
    pub fn new(config: &TrafficConfig) -> Self {
        Self {
            ratio: config.retry_budget_ratio.0,
            min_per_second: f64::from(config.retry_budget_min_per_second),
            window: config.retry_budget_window.get().max(Duration::from_millis(SLOTS as u64)),
            start: Instant::now(),
            services: Mutex::default(),
        }
    }

    /// The slot `now` falls in (`now` is the caller's reading of the clock, taken anyway).
    fn epoch(&self, now: Instant) -> u64 {
        let slot = self.window.as_nanos() / SLOTS as u128;
        (now.saturating_duration_since(self.start).as_nanos() / slot.max(1)) as u64
    }

    /// Counts an original request (not a retry) that arrived at `now`.
    pub fn deposit(&self, service: &str, now: Instant) {
        let epoch = self.epoch(now);
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        // Borrowed: the service's name is copied only the first time.
        let slots = services.entry_ref(service).or_default();
        current(slots, epoch).requests += 1;
    }

    /// Takes one retry from the budget at `now`, or says there is none left.
    pub fn withdraw(&self, service: &str, now: Instant) -> bool {
        let epoch = self.epoch(now);
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let slots = services.entry_ref(service).or_default();
        let live = slots.iter().filter(|s| epoch.saturating_sub(s.epoch) < SLOTS as u64);
        let (requests, retries) = live.fold((0u64, 0u64), |(q, r), s| (q + s.requests, r + s.retries));
        let allowed = self.min_per_second * self.window.as_secs_f64() + self.ratio * requests as f64;
        if (retries as f64) < allowed.floor() {
            current(slots, epoch).retries += 1;
            true
        } else {
            false
        }
    }
}

fn current(slots: &mut [Slot; SLOTS], epoch: u64) -> &mut Slot {
    let slot = &mut slots[(epoch % SLOTS as u64) as usize];
    if slot.epoch != epoch {
        *slot = Slot { epoch, ..Slot::default() };
    }
    slot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_by_ratio_plus_minimum() {
        let mut config = TrafficConfig::default();
        config.retry_budget_min_per_second = 1;
        config.retry_budget_window = crate::config::Duration::from_secs(10);
        let budget = Budget::new(&config);
        for _ in 0..100 {
            budget.deposit("api", Instant::now());
        }
        // 1/s over 10 s, plus 20 % of 100 requests: 30 retries.
        let granted = (0..100).filter(|_| budget.withdraw("api", Instant::now())).count();
        assert_eq!(granted, 30);
        assert!(budget.withdraw("other", Instant::now()), "budgets are per service (the minimum applies)");
    }
}
