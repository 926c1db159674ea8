//! The HTTP/2 connection from box A to a peer box, on the h2 crate itself.
//!
//! hyper's HTTP/2 client passes every request through a channel to its connection task and
//! spawns one more task per request to wait for the response and hand it back (BENCHMARKS.md,
//! "Straight to h2"). Here the request's own task opens the stream and awaits the response;
//! the connection task only drives the connection, and a request body is piped by a task of
//! its own only when it is not all in hand at once. Settings, keep-alive PINGs and the rules
//! for connection-specific headers are hyper's (1.12, `proto/h2`), so the peer sees the same
//! connection as before.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::header::{CONTENT_LENGTH, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, oneshot};

use super::http::{Body, KEEP_ALIVE, boxed};

/// Windows, limits and send buffer as hyper's client sets them: 5 MiB for the connection, 2 MiB
/// per stream, 16 KiB header lists, 1 MiB buffered per stream, and at most 100 streams until
/// the peer's SETTINGS say how many it takes (h2 would open any number, and a burst queued
/// while the connection was being opened would get REFUSED_STREAM past the peer's limit).
const CONNECTION_WINDOW: u32 = 5 << 20;
const STREAM_WINDOW: u32 = 2 << 20;
const MAX_HEADER_LIST: u32 = 16 << 10;
const SEND_BUFFER: usize = 1 << 20;
const STREAMS_BEFORE_SETTINGS: usize = 100;
/// A PING unanswered this long gives the connection up (hyper's keep-alive timeout).
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Headers HTTP/2 forbids besides `Connection` and the ones it names (RFC 9113, 8.2.2), which
/// the caller removes; `TE` is allowed only as `trailers`.
const KEEP_ALIVE_HEADER: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What a connection's handles and its tasks share.
struct Shared {
    /// Set once the connection has ended or been given up (by its task), or could not take a
    /// new stream (by a request): the pool then opens another.
    closed: AtomicBool,
    /// Streams whose request or response is still under way: PINGs are sent only while some are.
    open: AtomicUsize,
    /// Tells the connection task to give the connection up.
    stop: Notify,
}

/// Counts a stream as open while alive.
struct Open(Arc<Shared>);

impl Open {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(shared))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A multiplexed HTTP/2 connection to a peer; clones share it. The pool keeps one clone, so in
/// practice it ends when the peer closes it (idle timeout, GOAWAY), on an error, or when a PING
/// goes unanswered; it would also end with its last clone and stream (h2 wakes the connection
/// for that; a test holds it to it).
#[derive(Clone)]
pub(super) struct PeerConnection {
    sender: SendRequest<Bytes>,
    shared: Arc<Shared>,
    /// The target port the connection's transport header named: the peer's default for
    /// requests that do not name one.
    default_port: u16,
}

impl std::fmt::Debug for PeerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConnection").field("closed", &self.is_closed()).finish_non_exhaustive()
    }
}

impl PeerConnection {
    /// The HTTP/2 handshake on an established (mTLS) stream; spawns the task that drives the
    /// connection and the one that PINGs the peer while streams are open.
    pub(super) async fn handshake<T>(io: T, default_port: u16) -> Result<Self, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_max_send_streams(STREAMS_BEFORE_SETTINGS)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let shared =
            Arc::new(Shared { closed: AtomicBool::new(false), open: AtomicUsize::new(0), stop: Notify::new() });
        if let Some(ping) = connection.ping_pong() {
            tokio::spawn(keep_alive(ping, Arc::downgrade(&shared)));
        }
        let task = Arc::clone(&shared);
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(e) = ended {
                    tracing::debug!(error = %e, "peer HTTP/2 connection ended");
                },
                () = task.stop.notified() => tracing::debug!("peer HTTP/2 connection given up"),
            }
            task.closed.store(true, Ordering::Release);
        });
        Ok(Self { sender, shared, default_port })
    }

    /// The target port of requests that do not name one.
    pub(super) fn default_port(&self) -> u16 {
        self.default_port
    }

    /// Whether the connection can take no more requests.
    pub(super) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Sends a request (absolute URI, no connection-specific headers but the ones
    /// [`strip_connection_specific`] removes) and waits for the response's head.
    pub(super) async fn send(&self, request: Request<Body>) -> Result<Response<Body>, String> {
        let (mut parts, body) = request.into_parts();
        strip_connection_specific(&mut parts.headers);
        // A body of known length says so, as hyper's client does (a buffered chunked body, or
        // an empty POST: some servers want the length), as one number: an HTTP/1.1 client's
        // `5, 5` is a length there, a malformed request in HTTP/2.
        if let Some(length) = body.size_hint().exact()
            && (length != 0 || !matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT))
        {
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        let end = body.is_end_stream();
        let mut sender = self.sender.clone().ready().await.map_err(|e| {
            // Gone away or broken: the pool opens a new connection for the next request.
            self.shared.closed.store(true, Ordering::Release);
            e.to_string()
        })?;
        let (response, stream) = sender.send_request(Request::from_parts(parts, ()), end).map_err(|e| {
            if e.is_go_away() || e.is_io() {
                self.shared.closed.store(true, Ordering::Release);
            }
            e.to_string()
        })?;
        let open = Open::new(&self.shared);
        // Dropped unanswered (a timeout), it resets the stream its body is still being sent on.
        let mut cancel = None;
        if !end {
            let mut pipe = Box::pin(pipe(body, stream, Open::new(&self.shared)));
            // A body in hand (a replayed one) is sent now; only one still to come gets a task.
            if futures::FutureExt::now_or_never(&mut pipe).is_none() {
                let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
                cancel = Some(Cancel(Some(cancel_tx)));
                // Cancelled, the pipe is dropped with the stream's last handle, and h2 resets
                // the stream (CANCEL).
                tokio::spawn(async move {
                    tokio::select! {
                        () = &mut pipe => {}
                        Ok(()) = cancel_rx => {}
                    }
                });
            }
        }
        let response = response.await;
        if let Some(mut cancel) = cancel {
            cancel.disarm();
        }
        let response = response.map_err(|e| e.to_string())?;
        let (head, recv) = response.into_parts();
        let body = PeerBody::new(recv, open).with_length(&head.headers);
        Ok(Response::from_parts(head, boxed(body)))
    }
}

/// Resets the stream of an unanswered request when dropped, unless disarmed.
struct Cancel(Option<oneshot::Sender<()>>);

impl Cancel {
    /// The response came, or sending failed: a body still being sent goes on (or has stopped).
    fn disarm(&mut self) {
        self.0.take();
    }
}

impl Drop for Cancel {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            let _ = cancel.send(());
        }
    }
}

/// Sends a request body on its stream as it comes, as much as the peer's window allows: a
/// frame is read only once the previous one is handed to h2, which holds it until the window
/// opens (at most [`SEND_BUFFER`] per stream). Stops when the peer resets the stream.
async fn pipe(mut body: Body, mut stream: SendStream<Bytes>, _open: Open) {
    if let Err((reason, error)) = send_body(&mut body, &mut stream).await {
        tracing::debug!(%error, "request body to the peer not sent in full");
        stream.send_reset(reason);
    }
}

/// Sends the body; on failure, the reason to reset the stream with (the client's own, when it
/// reset its HTTP/2 stream to box A) and what went wrong.
async fn send_body(body: &mut Body, stream: &mut SendStream<Bytes>) -> Result<(), (Reason, String)> {
    let failed = |e: h2::Error| (Reason::INTERNAL_ERROR, e.to_string());
    loop {
        let frame = poll_fn(|cx| {
            if let Poll::Ready(reset) = stream.poll_reset(cx) {
                let error = reset.map_or_else(|e| e.to_string(), |r| format!("reset by the peer: {r:?}"));
                return Poll::Ready(Err((Reason::INTERNAL_ERROR, error)));
            }
            Pin::new(&mut *body).poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => return stream.send_data(Bytes::new(), true).map_err(failed),
            Some(Err(e)) => return Err((reason_of(&*e), format!("reading the request body: {e}"))),
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.reserve_capacity(0);
                    return stream.send_trailers(trailers).map_err(failed);
                }
                continue;
            }
        };
        let end = body.is_end_stream();
        if !frame.is_empty() {
            // A claim of one byte, not the chunk's length: h2 raises it to what is buffered,
            // and a large claim held while waiting starves the connection's other streams.
            stream.reserve_capacity(1);
            while stream.capacity() == 0 {
                let granted = poll_fn(|cx| {
                    if let Poll::Ready(reset) = stream.poll_reset(cx) {
                        return Poll::Ready(Some(Err(reset.map_or_else(|e| e, h2::Error::from))));
                    }
                    stream.poll_capacity(cx)
                })
                .await;
                match granted {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(failed(e)),
                    None => {
                        return Err((
                            Reason::INTERNAL_ERROR,
                            "the stream closed while its body was being sent".to_owned(),
                        ));
                    }
                }
            }
        }
        stream.send_data(frame, end).map_err(failed)?;
        if end {
            return Ok(());
        }
    }
}

/// The HTTP/2 reason in an error's chain (a client's reset, passed on), else INTERNAL_ERROR.
fn reason_of(error: &(dyn std::error::Error + 'static)) -> Reason {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(reason) = error.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        next = error.source();
    }
    Reason::INTERNAL_ERROR
}

/// HTTP/2 forbids connection-specific headers; h2 refuses a request that has any. The caller
/// has removed `Connection` and the headers it names.
fn strip_connection_specific(headers: &mut HeaderMap) {
    // Mostly none of them is there: one pass over the names costs less than five lookups that
    // find nothing.
    let connection_specific = |name: &HeaderName| {
        matches!(name.as_str(), "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade" | "te")
    };
    if !headers.keys().any(connection_specific) {
        return;
    }
    for name in [KEEP_ALIVE_HEADER, PROXY_CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

/// PINGs the peer every [`KEEP_ALIVE`] while streams are open, and gives the connection up
/// when one goes unanswered for [`PING_TIMEOUT`].
async fn keep_alive(mut ping: PingPong, shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(KEEP_ALIVE).await;
        let Some(shared) = shared.upgrade() else { return };
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        if shared.open.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::debug!("peer did not answer a PING within {PING_TIMEOUT:?}; giving the connection up");
                shared.stop.notify_one();
                return;
            }
        }
    }
}

/// A response body arriving from the peer; the window is given back as data is taken.
struct PeerBody {
    recv: RecvStream,
    data_done: bool,
    /// What is left of the announced length, for the size hint.
    left: Option<u64>,
    _open: Open,
}

impl PeerBody {
    fn new(recv: RecvStream, open: Open) -> Self {
        Self { recv, data_done: false, left: None, _open: open }
    }

    fn with_length(mut self, headers: &HeaderMap) -> Self {
        self.left = if self.recv.is_end_stream() { Some(0) } else { content_length(headers) };
        self
    }
}

/// A single valid `Content-Length`.
pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()?.parse().ok()
}

impl hyper::body::Body for PeerBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = this.left.as_mut() {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RST_STREAM with NO_ERROR: the peer answered early and wants no more of the
                // request; the response is complete (RFC 9113, 8.1).
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if e.reason() == Some(Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.left.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use futures::{SinkExt, StreamExt};
    use h2::server::SendResponse;
    use http::HeaderValue;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::io::DuplexStream;

    use super::*;

    type Server = h2::server::Connection<DuplexStream, Bytes>;

    /// A connection to an in-process h2 server over an in-memory pipe; the test drives the server.
    async fn pair() -> (PeerConnection, Server) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (client, server) = tokio::join!(PeerConnection::handshake(client, 80), h2::server::handshake(server));
        (client.expect("client handshake"), server.expect("server handshake"))
    }

    /// Accepts streams until the client goes, each handled by `handle` on a task of its own.
    fn serve<F, Fut>(mut server: Server, handle: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Request<RecvStream>, SendResponse<Bytes>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(async move {
            while let Some(Ok((request, respond))) = server.accept().await {
                tokio::spawn(handle(request, respond));
            }
        })
    }

    fn get(body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.uri_mut() = "http://peer.test/path".parse().expect("uri");
        request
    }

    const LARGE: usize = 8 << 20;

    #[tokio::test]
    async fn a_response_larger_than_the_windows_arrives_with_its_trailers() {
        let (connection, server) = pair().await;
        serve(server, |_, mut respond| async move {
            let head = Response::builder().header(CONTENT_LENGTH, LARGE).body(()).expect("response");
            let mut body = respond.send_response(head, false).expect("send response");
            for _ in 0..LARGE / (64 << 10) {
                body.send_data(Bytes::from(vec![7u8; 64 << 10]), false).expect("send data");
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            body.send_trailers(trailers).expect("send trailers");
        });
        let response = tokio::time::timeout(Duration::from_secs(10), connection.send(get(boxed(Empty::new()))))
            .await
            .expect("response in time")
            .expect("response");
        assert_eq!(response.body().size_hint().exact(), Some(LARGE as u64));
        // 8 MiB against 2 MiB per stream and 5 MiB per connection: it arrives only if the body
        // gives the window back as it is read.
        let collected = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
            .await
            .expect("body in time")
            .expect("body");
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes().len(), LARGE);
        assert_eq!(trailers.and_then(|t| t.get("grpc-status").cloned()), Some(HeaderValue::from_static("0")));
    }

    #[tokio::test]
    async fn connection_specific_headers_are_dropped_and_te_trailers_kept() {
        let (connection, server) = pair().await;
        let (seen_tx, seen_rx) = oneshot::channel();
        let seen_tx = std::sync::Mutex::new(Some(seen_tx));
        serve(server, move |request, mut respond| {
            if let Some(tx) = seen_tx.lock().expect("lock").take() {
                let _ = tx.send(request.headers().clone());
            }
            async move {
                let _ = respond.send_response(Response::new(()), true);
            }
        });
        let mut request = get(boxed(Empty::new()));
        for (name, value) in
            [("keep-alive", "timeout=5"), ("proxy-connection", "keep-alive"), ("upgrade", "h2c"), ("te", "trailers")]
        {
            request.headers_mut().insert(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        request.headers_mut().insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let response = connection.send(request).await.expect("h2 takes the request once stripped");
        assert_eq!(response.status(), 200);
        let seen = seen_rx.await.expect("headers seen");
        for name in ["keep-alive", "proxy-connection", "upgrade", "transfer-encoding"] {
            assert!(!seen.contains_key(name), "{name} reached the peer");
        }
        assert_eq!(seen.get(TE), Some(&HeaderValue::from_static("trailers")));
    }

    #[tokio::test]
    async fn a_request_given_up_while_its_body_is_still_coming_resets_its_stream() {
        let (connection, server) = pair().await;
        let (reset_tx, reset_rx) = oneshot::channel();
        let reset_tx = std::sync::Mutex::new(Some(reset_tx));
        serve(server, move |request, _respond| {
            let reset_tx = reset_tx.lock().expect("lock").take();
            async move {
                let mut body = request.into_body();
                let first = body.data().await;
                assert!(matches!(first, Some(Ok(_))), "first chunk: {first:?}");
                // No response: the client gives up. The next read ends only if the stream is reset.
                let next = body.data().await;
                if let Some(tx) = reset_tx {
                    let _ = tx.send(next.map(|r| r.map_err(|e| e.reason())));
                }
            }
        });
        let (mut chunks, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        chunks.send(Ok(Frame::data(Bytes::from_static(b"first")))).await.expect("queue chunk");
        let body = boxed(StreamBody::new(rx));
        let gave_up = tokio::time::timeout(Duration::from_millis(300), connection.send(get(body))).await;
        assert!(gave_up.is_err(), "no response expected");
        let next = tokio::time::timeout(Duration::from_secs(5), reset_rx)
            .await
            .expect("the stream is reset (the body's sender is still open)")
            .expect("reported");
        assert!(matches!(next, Some(Err(Some(Reason::CANCEL)))), "{next:?}");
        drop(chunks);
    }

    #[tokio::test]
    async fn a_body_of_known_length_says_so() {
        let (connection, server) = pair().await;
        let (seen_tx, mut seen_rx) = futures::channel::mpsc::unbounded();
        serve(server, move |request, mut respond| {
            let length = request.headers().get(CONTENT_LENGTH).cloned();
            let _ = seen_tx.unbounded_send((request.method().clone(), length));
            async move {
                let _ = respond.send_response(Response::new(()), true);
            }
        });
        let cases = [
            (Method::POST, boxed(Full::new(Bytes::from_static(b"abc"))), Some("3")),
            (Method::POST, boxed(Empty::new()), Some("0")),
            (Method::GET, boxed(Empty::new()), None),
        ];
        for (method, body, expected) in cases {
            let mut request = get(body);
            *request.method_mut() = method.clone();
            connection.send(request).await.expect("response");
            let (seen_method, length) = seen_rx.next().await.expect("seen");
            assert_eq!(seen_method, method);
            assert_eq!(length.as_ref().map(|v| v.to_str().expect("ascii")), expected, "{method}");
        }
    }

    #[tokio::test]
    async fn a_burst_sent_before_the_peers_settings_stays_within_its_stream_limit() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let connection = PeerConnection::handshake(client, 80).await.expect("client handshake");
        // 250 requests leave before the peer has said anything (as when requests queued while
        // the connection was being opened); the peer takes 200 streams at a time.
        let sends: Vec<_> = (0..250)
            .map(|_| {
                let connection = connection.clone();
                tokio::spawn(async move { connection.send(get(boxed(Empty::new()))).await.map(|r| r.status()) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let server = h2::server::Builder::new().max_concurrent_streams(200).handshake(server).await.expect("server");
        serve(server, |_, mut respond| async move {
            let _ = respond.send_response(Response::new(()), true);
        });
        for send in sends {
            let status = tokio::time::timeout(Duration::from_secs(10), send).await.expect("in time").expect("task");
            assert_eq!(status.expect("not refused"), 200);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_is_given_up() {
        let (connection, mut server) = pair().await;
        let sender = connection.clone();
        let waiting = tokio::spawn(async move { sender.send(get(boxed(Empty::new()))).await });
        // The request arrives; then the server stops reading its connection altogether.
        let (_request, _respond) = server.accept().await.expect("a stream").expect("accepted");
        let outcome = tokio::time::timeout(KEEP_ALIVE + PING_TIMEOUT + Duration::from_secs(5), waiting)
            .await
            .expect("the unanswered PING ends the connection")
            .expect("task");
        assert!(outcome.is_err(), "{outcome:?}");
        assert!(connection.is_closed());
        drop(server);
    }

    #[tokio::test]
    async fn the_connection_ends_when_its_last_handle_is_dropped() {
        let (connection, server) = pair().await;
        let serving = serve(server, |_, mut respond| async move {
            let _ = respond.send_response(Response::new(()), true);
        });
        let response = connection.send(get(boxed(Empty::new()))).await.expect("response");
        drop(response);
        drop(connection);
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the server sees the client go")
            .expect("server task");
    }
}
