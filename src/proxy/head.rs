//! The request-head deadline of an HTTP/1 connection, kept apart from its idle timeout.
//!
//! A deadline from the end of one response to the end of the next request head (hyper's
//! `header_read_timeout`) would also close keep-alive connections that merely sit idle between
//! requests (a client pool's connections, a browser's spare ones) long before
//! `http_idle_timeout`. Here a head's clock starts with its first byte (or with the connection,
//! for the first request) and stops when the head is complete; idle time between requests is
//! the idle timeout's business. A slowloris client, which never completes a head, is cut after
//! `header_read_timeout`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// No head is pending.
const NONE: u64 = u64::MAX;

/// Where the connection stands between request heads.
#[derive(Debug)]
pub struct HeadClock {
    start: Instant,
    /// Milliseconds after `start` when the pending head's first byte arrived, or [`NONE`].
    pending_since_ms: AtomicU64,
    /// A request is being served (its body may still be arriving): bytes read now are not a new
    /// head.
    busy: AtomicBool,
}

impl HeadClock {
    /// A clock for a new connection: its first head is pending from now.
    pub fn new() -> Self {
        Self { start: Instant::now(), pending_since_ms: AtomicU64::new(0), busy: AtomicBool::new(false) }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Bytes arrived from the client.
    pub(super) fn arrived(&self) {
        if !self.busy.load(Ordering::Acquire) {
            let _ = self.pending_since_ms.compare_exchange(NONE, self.now_ms(), Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// A request head was parsed: the request is served from now on.
    pub fn head_complete(&self) {
        self.busy.store(true, Ordering::Release);
        self.pending_since_ms.store(NONE, Ordering::Release);
    }

    /// The response to the current request has been sent: the next bytes start a new head.
    pub(super) fn request_done(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// Resolves once a head has been pending for longer than `limit`.
    pub async fn overdue(&self, limit: Duration) {
        loop {
            let since = self.pending_since_ms.load(Ordering::Acquire);
            if since == NONE {
                // Nothing pending: look again later (a head that starts meanwhile is caught by
                // then at the latest, within twice the limit).
                tokio::time::sleep(limit).await;
                continue;
            }
            let deadline = self.start + Duration::from_millis(since) + limit;
            tokio::time::sleep_until(deadline).await;
            if self.pending_since_ms.load(Ordering::Acquire) == since {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_a_pending_head_runs_the_clock() {
        let clock = HeadClock::new();
        let limit = Duration::from_secs(10);
        // The first head is pending from the start.
        let overdue = tokio::time::timeout(Duration::from_secs(11), clock.overdue(limit)).await;
        assert!(overdue.is_ok(), "a connection that never sends a head is overdue");

        let clock = HeadClock::new();
        clock.arrived();
        clock.head_complete();
        // While the request is served, bytes (its body) do not start a head.
        clock.arrived();
        assert!(tokio::time::timeout(Duration::from_secs(60), clock.overdue(limit)).await.is_err());
        clock.request_done();
        // Idle between requests: no clock, however long.
        assert!(tokio::time::timeout(Duration::from_secs(600), clock.overdue(limit)).await.is_err());
        // The next head's first byte starts it.
        clock.arrived();
        assert!(tokio::time::timeout(Duration::from_secs(11), clock.overdue(limit)).await.is_ok());
    }
}
