//! A bound on what an API server's answers may bring into memory.
//!
//! kube-rs reads a list page (and any other answer that is not a watch stream) whole before it
//! decodes it, so a server that sends an enormous answer would have it held in memory in full.
//! [`ResponseLimitLayer`] wraps the kube client's HTTP service: such a body fails as soon as it
//! passes `max_response_size` (or at once, when its Content-Length already says so), with an
//! error that names the limit and becomes the link's last error.
//!
//! Watch streams are long-lived, so their total is not capped; each event line is (kube-rs
//! buffers a line until its newline). A watch answered with an error status is read whole by
//! kube-rs, so it is capped like a list.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, SizeHint};
use tower::{BoxError, Layer, Service};

use crate::config::ByteSize;

/// Puts [`ResponseLimit`] around a service (`kube::client::ClientBuilder::with_layer`).
#[derive(Debug, Clone, Copy)]
pub struct ResponseLimitLayer {
    limit: ByteSize,
}

impl ResponseLimitLayer {
    pub fn new(limit: ByteSize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for ResponseLimitLayer {
    type Service = ResponseLimit<S>;

    fn layer(&self, inner: S) -> ResponseLimit<S> {
        ResponseLimit { inner, limit: self.limit }
    }
}

/// An HTTP client service whose response bodies are bounded by [`LimitedBody`].
#[derive(Debug, Clone)]
pub struct ResponseLimit<S> {
    inner: S,
    limit: ByteSize,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ResponseLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<LimitedBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let watch = is_watch(request.uri());
        ResponseFuture { inner: Box::pin(self.inner.call(request)), limit: self.limit, watch }
    }
}

/// The answer of a [`ResponseLimit`]: the inner service's response, its body limited.
pub struct ResponseFuture<F> {
    inner: Pin<Box<F>>,
    limit: ByteSize,
    /// The request asked for a watch stream.
    watch: bool,
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<LimitedBody<B>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.inner.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
            Poll::Ready(Ok(response)) => response,
        };
        let cap = if self.watch && response.status().is_success() { Cap::EachLine } else { Cap::Whole };
        let limit = self.limit;
        Poll::Ready(Ok(response.map(|body| LimitedBody::new(body, limit, cap))))
    }
}

/// Whether a request asks for a watch stream (`watch=true`, or `watch=1`).
fn is_watch(uri: &Uri) -> bool {
    uri.query().is_some_and(|query| query.split('&').any(|pair| pair == "watch=true" || pair == "watch=1"))
}

/// What a [`LimitedBody`] counts against its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cap {
    /// The whole body (lists and every other answer that is read whole).
    Whole,
    /// Each newline-terminated line (the events of a watch stream).
    EachLine,
}

/// A response body that fails once it passes its limit, and then ends.
#[derive(Debug)]
pub struct LimitedBody<B> {
    inner: B,
    limit: ByteSize,
    cap: Cap,
    /// Bytes counted so far: of the whole body, or of the line not yet ended.
    counted: u64,
    /// The limit was passed: the error has been returned and the body is over.
    exceeded: bool,
}

impl<B> LimitedBody<B> {
    fn new(inner: B, limit: ByteSize, cap: Cap) -> Self {
        Self { inner, limit, cap, counted: 0, exceeded: false }
    }

    /// Counts a chunk of data; false once the limit is passed.
    fn admit(&mut self, data: &[u8]) -> bool {
        let limit = self.limit.get();
        match self.cap {
            Cap::Whole => {
                self.counted = self.counted.saturating_add(len(data));
                self.counted <= limit
            }
            Cap::EachLine => {
                let mut rest = data;
                while let Some(end) = rest.iter().position(|&byte| byte == b'\n') {
                    if self.counted.saturating_add(len(&rest[..end])) > limit {
                        return false;
                    }
                    self.counted = 0;
                    rest = &rest[end + 1..];
                }
                self.counted = self.counted.saturating_add(len(rest));
                self.counted <= limit
            }
        }
    }

    /// Marks the body over and builds the error that names the limit.
    fn exceed(&mut self) -> BoxError {
        self.exceeded = true;
        Box::new(match self.cap {
            Cap::Whole => TooLarge::Response(self.limit),
            Cap::EachLine => TooLarge::Event(self.limit),
        })
    }
}

fn len(data: &[u8]) -> u64 {
    u64::try_from(data.len()).unwrap_or(u64::MAX)
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.exceeded {
            return Poll::Ready(None);
        }
        // A Content-Length over the limit fails before any of the body is read.
        if this.cap == Cap::Whole && this.counted.saturating_add(this.inner.size_hint().lower()) > this.limit.get() {
            return Poll::Ready(Some(Err(this.exceed())));
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref()
            && !this.admit(data)
        {
            return Poll::Ready(Some(Err(this.exceed())));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.exceeded || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.exceeded { SizeHint::with_exact(0) } else { self.inner.size_hint() }
    }
}

/// A response (or watch event) over `max_response_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    #[error("response larger than {0} (max_response_size)")]
    Response(ByteSize),
    #[error("watch event larger than {0} (max_response_size)")]
    Event(ByteSize),
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    type Chunks = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    /// A body of these chunks with no length announced, like a chunked response.
    fn chunked(chunks: &[&'static str]) -> Chunks {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> =
            chunks.iter().map(|&chunk| Ok(Frame::data(Bytes::from_static(chunk.as_bytes())))).collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    async fn read<B>(body: LimitedBody<B>) -> Result<Bytes, String>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        body.collect().await.map(|collected| collected.to_bytes()).map_err(|error| error.to_string())
    }

    #[tokio::test]
    async fn a_whole_body_fails_past_the_limit_and_names_it() {
        let limit = ByteSize::from_bytes(10);
        let fits = LimitedBody::new(chunked(&["01234", "56789"]), limit, Cap::Whole);
        assert_eq!(read(fits).await.as_deref(), Ok(&b"0123456789"[..]));
        let over = LimitedBody::new(chunked(&["01234", "56789", "x"]), limit, Cap::Whole);
        assert_eq!(read(over).await, Err("response larger than 10 B (max_response_size)".to_owned()));
        let limit = ByteSize::from_mib(1);
        let mut full = LimitedBody::new(chunked(&["x"]), limit, Cap::Whole);
        full.counted = limit.get();
        assert_eq!(read(full).await, Err("response larger than 1 MiB (max_response_size)".to_owned()));
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_fails_before_reading() {
        let declared = Full::new(Bytes::from_static(b"0123456789"));
        let mut body = LimitedBody::new(declared, ByteSize::from_bytes(4), Cap::Whole);
        let first = body.frame().await.expect("an outcome").map(|_| ()).map_err(|error| error.to_string());
        assert_eq!(first, Err("response larger than 4 B (max_response_size)".to_owned()));
        assert!(body.frame().await.is_none(), "the body ends after the error");
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn watch_lines_are_capped_one_by_one_not_in_total() {
        let limit = ByteSize::from_bytes(8);
        // Short lines, far more than the limit in total, split anywhere.
        let short = chunked(&["{\"a\":1}\n{\"b", "\":2}\n", "{\"c\":3}\n{}\n"]);
        assert!(read(LimitedBody::new(short, limit, Cap::EachLine)).await.is_ok());
        // One line over the limit, spread over chunks.
        let long = chunked(&["ok\n{\"a\":", "\"0123", "4567\"}\n"]);
        assert_eq!(
            read(LimitedBody::new(long, limit, Cap::EachLine)).await,
            Err("watch event larger than 8 B (max_response_size)".to_owned())
        );
        // One line over the limit inside a single chunk, between short ones.
        let inside = chunked(&["a\n0123456789\nb\n"]);
        assert!(read(LimitedBody::new(inside, limit, Cap::EachLine)).await.is_err());
        // A line of exactly the limit fits.
        let exact = chunked(&["01234567\n01234567"]);
        assert!(read(LimitedBody::new(exact, limit, Cap::EachLine)).await.is_ok());
    }

    /// Answers every request with the same status and body.
    struct Fixed(http::StatusCode, &'static str);

    impl Service<Request<()>> for Fixed {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            let body: &'static str = self.1;
            let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *response.status_mut() = self.0;
            std::future::ready(Ok(response))
        }
    }

    #[tokio::test]
    async fn only_successful_watches_are_capped_per_line() {
        let lines = "{\"type\":\"ADDED\"}\n{\"type\":\"ADDED\"}\n{\"type\":\"ADDED\"}\n";
        let layer = ResponseLimitLayer::new(ByteSize::from_bytes(20));
        let get = |uri: &str| Request::get(uri).body(()).expect("request");
        let mut ok = layer.layer(Fixed(http::StatusCode::OK, lines));
        let watch = ok.call(get("/api/v1/services?allowWatchBookmarks=true&watch=true")).await.expect("answer");
        assert!(read(watch.into_body()).await.is_ok(), "each line is under the limit");
        let list = ok.call(get("/api/v1/services?limit=500")).await.expect("answer");
        assert!(read(list.into_body()).await.is_err(), "a list is capped whole");
        let named = ok.call(get("/api/v1/services?fieldSelector=metadata.name%3Dwatch%3Dtrue")).await.expect("answer");
        assert!(read(named.into_body()).await.is_err(), "only the watch parameter makes a watch");
        let mut gone = layer.layer(Fixed(http::StatusCode::GONE, lines));
        let refused = gone.call(get("/api/v1/services?watch=true")).await.expect("answer");
        assert!(read(refused.into_body()).await.is_err(), "an error answer is read whole, so it is capped whole");
    }
}
