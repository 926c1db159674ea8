//! Byte plumbing: streams that count what passes through them, and the bidirectional copy with
//! half-close that carries opaque TCP.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Copy buffer per direction: bounded, so a connection costs at most twice this.
pub const BUFFER_BYTES: usize = 16 * 1024;

/// When bytes last moved on a connection, for idle timeouts. Cheap to touch on every read and
/// write (a coarse clock and one relaxed store); clones share the same clock.
#[derive(Debug, Clone)]
pub struct Activity {
    /// [`coarse_ms`] at the last read or write.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    pub fn new() -> Self {
        Self { last_ms: Arc::new(AtomicU64::new(coarse_ms())) }
    }

    /// Marks that something moved now.
    pub(super) fn touch(&self) {
        self.last_ms.store(coarse_ms(), Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle` (give or take a clock tick).
    pub async fn idle_for(&self, idle: Duration) {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        loop {
            let quiet_ms = coarse_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed));
            if quiet_ms >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_ms - quiet_ms)).await;
        }
    }
}

/// Milliseconds on the kernel's coarse monotonic clock. It moves once per scheduler tick (at
/// most a few milliseconds behind the precise clock), which is plenty for idle timeouts, and it
/// is read without the CPU's time-stamp counter: a connection marks every read and write with
/// it, several times per request.
fn coarse_ms() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE)
        .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1000 + u64::try_from(now.tv_nsec()).unwrap_or(0) / 1_000_000
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// A stream whose reads and writes add to counters as they happen and mark its activity.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
    activity: Activity,
}

impl<S> Counted<S> {
    pub fn new(inner: S, read: Counter, written: Counter) -> Self {
        Self { inner, read, written, activity: Activity::new() }
    }

    /// The activity clock of this stream (shared with its clones).
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl Counted<OwnedWriteHalf> {
    /// Ends the connection with a reset rather than a FIN (once the reading half is gone too):
    /// the peer must not take what it got for all there was.
    pub fn reset(self) {
        let _ = self.inner.as_ref().set_zero_linger();
        self.inner.forget();
    }
}

impl Counted<tokio::net::TcpStream> {
    /// The reading and the writing half, each counted as the whole was, with one activity clock.
    pub fn into_split(self) -> (Counted<OwnedReadHalf>, Counted<OwnedWriteHalf>) {
        let (read, write) = self.inner.into_split();
        let reading = Counted {
            inner: read,
            read: self.read.clone(),
            written: self.written.clone(),
            activity: self.activity.clone(),
        };
        (reading, Counted { inner: write, read: self.read, written: self.written, activity: self.activity })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &result {
            self.written.inc_by(*n as u64);
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both sides have finished. When one side ends its stream, the other
/// side's write half is shut down (half-close) and the opposite direction keeps flowing.
/// Nothing moving through `a` for `idle` ends the copy with a `TimedOut` error.
pub async fn splice<S, B>(a: &mut Counted<S>, b: &mut B, idle: Duration) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let activity = a.activity();
    tokio::select! {
        copied = tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER_BYTES, BUFFER_BYTES) => copied,
        () = activity.idle_for(idle) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {}s", idle.as_secs())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn splice_carries_both_directions_and_half_close() {
        let (mut client, mut proxy_front) = tokio::io::duplex(1024);
        let (mut proxy_back, mut server) = tokio::io::duplex(1024);
        let copy = tokio::spawn(async move {
            let mut front = Counted::new(&mut proxy_front, Counter::default(), Counter::default());
            splice(&mut front, &mut proxy_back, Duration::from_secs(60)).await
        });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "the server sees the client's EOF");
        server.write_all(b"response after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response after half-close");
        assert_eq!(copy.await.unwrap().unwrap(), (7, 25));
    }

    #[tokio::test]
    async fn counted_streams_count_as_bytes_pass() {
        let (a, mut b) = tokio::io::duplex(64);
        let (read, written) = (Counter::default(), Counter::default());
        let mut counted = Counted::new(a, read.clone(), written.clone());
        counted.write_all(b"hello").await.unwrap();
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        counted.read_exact(&mut buf).await.unwrap();
        assert_eq!((read.get(), written.get()), (2, 5));
    }

    #[tokio::test]
    async fn an_idle_splice_ends_but_a_busy_one_does_not() {
        let idle = Duration::from_millis(400);
        let (mut client, proxy_front) = tokio::io::duplex(1024);
        let (mut proxy_back, mut server) = tokio::io::duplex(1024);
        let copy = tokio::spawn(async move {
            let mut front = Counted::new(proxy_front, Counter::default(), Counter::default());
            splice(&mut front, &mut proxy_back, idle).await
        });
        // Traffic every 150 ms keeps the connection well past the idle timeout.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            server.read_exact(&mut byte).await.unwrap();
        }
        assert!(!copy.is_finished(), "a busy connection was cut");
        let ended = tokio::time::timeout(Duration::from_secs(5), copy).await.expect("an idle connection ends");
        assert_eq!(ended.unwrap().expect_err("idle is an error").kind(), io::ErrorKind::TimedOut);
    }
}
