//! The request-head deadline of an HTTP/1 connection, kept apart from its idle timeout.
//!
//! hyper's own `header_read_timeout` runs from the end of one response to the end of the next
//! request head, so it also closes keep-alive connections that merely sit idle between requests
//! (a client pool's connections, a browser's spare ones) long before `http_idle_timeout`. Here a
//! head's clock starts with its first byte (or with the connection, for the first request) and
//! stops when the head is complete; idle time between requests is the idle timeout's business.
//! A slowloris client, which never completes a head, is cut after `header_read_timeout`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// No head is pending.
const NONE: u64 = u64::MAX;

/// Where the connection stands between request heads.
#[derive(Debug)]
pub struct HeadClock {
    start: Instant,
    /// Milliseconds after `start` when the pending head's first byte arrived, or [`NONE`].
    pending_since_ms: AtomicU64,
    /// A request is being served (its body may still be arriving), or the connection was
    /// upgraded to another protocol: bytes read now are not a new head.
    busy: AtomicBool,
}

impl HeadClock {
    /// A clock for a new connection: its first head is pending from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { start: Instant::now(), pending_since_ms: AtomicU64::new(0), busy: AtomicBool::new(false) })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Bytes arrived from the client.
    fn arrived(&self) {
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
    fn request_done(&self) {
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

    /// Wraps a response body so the clock learns when the response is over. A 101 response
    /// hands the connection to another protocol, so the clock stays busy for good.
    pub fn track<B>(self: &Arc<Self>, response: http::Response<B>) -> http::Response<Done<B>> {
        let upgraded = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        let clock = (!upgraded).then(|| Arc::clone(self));
        response.map(|inner| Done { inner, clock })
    }
}

/// A response body that tells its [`HeadClock`] when it is finished (dropped).
pub struct Done<B> {
    inner: B,
    clock: Option<Arc<HeadClock>>,
}

impl<B> Drop for Done<B> {
    fn drop(&mut self) {
        if let Some(clock) = &self.clock {
            clock.request_done();
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Done<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection whose reads are reported to a [`HeadClock`].
pub struct Watched<T> {
    inner: T,
    clock: Arc<HeadClock>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, clock: Arc<HeadClock>) -> Self {
        Self { inner, clock }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.arrived();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
        let response = clock.track(http::Response::new(http_body_util::Empty::<Bytes>::new()));
        assert!(tokio::time::timeout(Duration::from_secs(60), clock.overdue(limit)).await.is_err());
        drop(response);
        // Idle between requests: no clock, however long.
        assert!(tokio::time::timeout(Duration::from_secs(600), clock.overdue(limit)).await.is_err());
        // The next head's first byte starts it.
        clock.arrived();
        assert!(tokio::time::timeout(Duration::from_secs(11), clock.overdue(limit)).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_has_no_head_deadline() {
        let clock = HeadClock::new();
        clock.head_complete();
        let mut switching = http::Response::new(http_body_util::Empty::<Bytes>::new());
        *switching.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        drop(clock.track(switching));
        clock.arrived();
        assert!(tokio::time::timeout(Duration::from_secs(600), clock.overdue(Duration::from_secs(10))).await.is_err());
    }
}
