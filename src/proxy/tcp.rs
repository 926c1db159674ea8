//! Byte plumbing: streams that count what passes through them, and the bidirectional copy with
//! half-close that carries opaque TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Copy buffer per direction: bounded, so a connection costs at most twice this.
pub const BUFFER_BYTES: usize = 16 * 1024;

/// A stream whose reads and writes add to counters as they happen.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
}

impl<S> Counted<S> {
    pub fn new(inner: S, read: Counter, written: Counter) -> Self {
        Self { inner, read, written }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &result {
            self.written.inc_by(*n as u64);
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
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER_BYTES, BUFFER_BYTES).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn splice_carries_both_directions_and_half_close() {
        let (mut client, mut proxy_front) = tokio::io::duplex(1024);
        let (mut proxy_back, mut server) = tokio::io::duplex(1024);
        let copy = tokio::spawn(async move { splice(&mut proxy_front, &mut proxy_back).await });
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
}
