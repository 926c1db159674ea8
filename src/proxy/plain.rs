//! Plain HTTP to the local workload and to unmeshed destinations: HTTP/1.1 over kept-alive
//! connections pooled by address, HTTP/2 over one multiplexed connection per address.
//!
//! This is the hot path of every request a box receives from a peer, so it is kept to what that
//! needs. HTTP/1.1 (src/proxy/http1.rs): the idle connections of each address, taken by one
//! request at a time, the most recently used first, and put back once their response has been
//! read to its end; a request that finds none idle opens another. HTTP/2: every request shares
//! the address's connection, opened by the first request that finds none.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::Empty;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::{TrySendError, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::http::{Body, boxed};
use super::http1;

/// A pooled connection unused for this long is closed (hyper-util's pool uses the same).
const IDLE: Duration = Duration::from_secs(90);
/// How often the whole pool is swept of closed and idle connections, while it holds any.
const SWEEP: Duration = Duration::from_secs(10);

pub struct PlainClients {
    pool: Arc<Mutex<Pool>>,
    connect_timeout: Duration,
}

#[derive(Default)]
struct Pool {
    /// Idle HTTP/1.1 connections, the most recently used last.
    http1: HashMap<SocketAddr, Vec<Pooled<http1::Connection>>>,
    http2: HashMap<SocketAddr, Pooled<Http2>>,
    /// Addresses whose HTTP/2 connection is being opened.
    http2_opening: HashMap<SocketAddr, Arc<Opening>>,
    /// Whether a task is sweeping the pool (there is one while it holds connections).
    sweeping: bool,
}

/// Held while a connection is opened; the last failure to open one, and when it happened.
type Opening = tokio::sync::Mutex<Option<(Instant, String)>>;

struct Pooled<C> {
    conn: C,
    /// When it last took a request (HTTP/2) or was put back (HTTP/1.1).
    used: Instant,
}

/// An HTTP/2 connection and the authority its requests carry (the address, made once).
#[derive(Clone)]
struct Http2 {
    sender: http2::SendRequest<Body>,
    authority: Authority,
}

/// What the pool needs to know of a connection.
trait Conn {
    fn is_closed(&self) -> bool;
}

impl Conn for http1::Connection {
    fn is_closed(&self) -> bool {
        !self.is_usable()
    }
}

impl Conn for Http2 {
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

impl<C: Conn> Pooled<C> {
    fn alive(&self, now: Instant) -> bool {
        !self.conn.is_closed() && now.duration_since(self.used) < IDLE
    }
}

impl std::fmt::Debug for PlainClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainClients").finish_non_exhaustive()
    }
}

impl PlainClients {
    pub fn new(connect_timeout: Duration) -> Self {
        Self { pool: Arc::default(), connect_timeout }
    }

    /// Sends `request` to `addr` in `version` (HTTP/2, else HTTP/1.x). `request`'s URI is its
    /// path (origin form, as HTTP/1 sends it); a request without a Host header gets `addr` as its
    /// host.
    pub async fn send(
        &self,
        addr: SocketAddr,
        version: Version,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, String> {
        if version == Version::HTTP_2 {
            return self.send_http2(addr, request).await.map(|response| response.map(boxed));
        }
        if !request.headers().contains_key(http::header::HOST)
            && let Ok(host) = HeaderValue::try_from(addr.to_string())
        {
            request.headers_mut().insert(http::header::HOST, host);
        }
        self.send_http1(addr, request).await
    }

    async fn send_http1(&self, addr: SocketAddr, request: Request<Body>) -> Result<Response<Body>, String> {
        let (parts, body) = request.into_parts();
        // A pooled connection the backend closed just as the request went out fails with nothing
        // received; a request it cannot have acted on goes once more, on a new connection.
        let replayable = body.is_end_stream() && super::http::idempotent(&parts.method);
        let pooled = self.lock().take_http1(addr);
        let body = match pooled {
            Some(conn) => match conn.send(&parts, body, self.home(addr)).await {
                Ok(response) => return Ok(response.map(boxed)),
                Err(failure) if failure.nothing_received && replayable => boxed(Empty::new()),
                Err(failure) => return Err(failure.reason),
            },
            None => body,
        };
        // Boxed, as opening HTTP/2 is: rare, and large next to the rest of a request's future.
        let stream = Box::pin(super::connect(addr, self.connect_timeout)).await.map_err(|e| e.to_string())?;
        let sent = http1::Connection::new(stream).send(&parts, body, self.home(addr)).await;
        sent.map(|response| response.map(boxed)).map_err(|failure| failure.reason)
    }

    /// Where an HTTP/1.1 connection to `addr` goes back once its response has been read.
    fn home(&self, addr: SocketAddr) -> Home {
        Home { pool: Arc::downgrade(&self.pool), addr }
    }

    /// HTTP/2 requests keep the authority they came with as `:authority` (the address when
    /// they have none), with `:scheme` http.
    async fn send_http2(&self, addr: SocketAddr, mut request: Request<Body>) -> Result<Response<Incoming>, String> {
        let path = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let named = request.uri().authority().cloned();
        // A pooled connection that closed before taking the request hands it back: once more,
        // on a new one.
        for fresh in [false, true] {
            let pooled = self.lock().ready_http2(addr);
            let Http2 { mut sender, authority } = match pooled {
                Some(conn) => conn,
                // Boxed: rare, and large next to the rest of a request's future.
                None => Box::pin(self.open_http2(addr)).await?,
            };
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(named.clone().unwrap_or(authority));
            parts.path_and_query = Some(path.clone());
            *request.uri_mut() = Uri::from_parts(parts).map_err(|e| e.to_string())?;
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(e.to_string());
                }
                continue;
            }
            match outcome(sender.try_send_request(request).await) {
                Sent::Answered(result) => return result,
                Sent::HandedBack(returned) => request = returned,
            }
        }
        Err("the backend's HTTP/2 connections closed before taking the request".to_owned())
    }

    /// Opens the address's HTTP/2 connection and pools it. One request opens it; the others that
    /// found none meanwhile wait for it, and share its failure if it fails.
    async fn open_http2(&self, addr: SocketAddr) -> Result<Http2, String> {
        let asked = Instant::now();
        let gate = Arc::clone(self.lock().http2_opening.entry(addr).or_default());
        let mut last_failure = gate.lock().await;
        let pooled = self.lock().ready_http2(addr);
        let opened = match (pooled, last_failure.as_ref()) {
            (Some(conn), _) => Ok(conn),
            (None, Some((failed, reason))) if *failed >= asked => Err(reason.clone()),
            (None, _) => match self.connect_http2(addr).await {
                Ok(conn) => {
                    let mut pool = self.lock();
                    pool.http2.insert(addr, Pooled { conn: conn.clone(), used: Instant::now() });
                    keep_swept(&self.pool, &mut pool);
                    Ok(conn)
                }
                Err(reason) => {
                    *last_failure = Some((Instant::now(), reason.clone()));
                    Err(reason)
                }
            },
        };
        let mut pool = self.lock();
        // The gate goes once no other request holds it (they take it under the pool's lock).
        if Arc::strong_count(&gate) == 2 {
            pool.http2_opening.remove(&addr);
        }
        opened
    }

    async fn connect_http2(&self, addr: SocketAddr) -> Result<Http2, String> {
        let authority = Authority::try_from(addr.to_string()).map_err(|e| e.to_string())?;
        let stream = super::connect(addr, self.connect_timeout).await.map_err(|e| e.to_string())?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // A backend that stops answering is found out while requests wait on it.
            .keep_alive_interval(super::http::KEEP_ALIVE)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "plain HTTP/2 connection ended");
            }
        });
        Ok(Http2 { sender, authority })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        lock(&self.pool)
    }
}

/// Starts the sweeping task if the pool has none.
fn keep_swept(shared: &Arc<Mutex<Pool>>, pool: &mut Pool) {
    if !pool.sweeping {
        pool.sweeping = true;
        tokio::spawn(sweep(Arc::downgrade(shared)));
    }
}

/// Where an HTTP/1.1 connection goes back: its address's idle list.
struct Home {
    pool: Weak<Mutex<Pool>>,
    addr: SocketAddr,
}

impl http1::Release for Home {
    fn release(self, conn: http1::Connection) {
        let Some(shared) = self.pool.upgrade() else { return };
        let mut pool = lock(&shared);
        pool.http1.entry(self.addr).or_default().push(Pooled { conn, used: Instant::now() });
        keep_swept(&shared, &mut pool);
    }
}

/// What became of a request given to a pooled connection.
enum Sent {
    /// A response, or an error after the request was (or may have been) written.
    Answered(Result<Response<Incoming>, String>),
    /// The connection closed before taking the request: it can go elsewhere.
    HandedBack(Request<Body>),
}

fn outcome(sent: Result<Response<Incoming>, TrySendError<Request<Body>>>) -> Sent {
    match sent {
        Ok(response) => Sent::Answered(Ok(response)),
        Err(mut e) => match e.take_message() {
            Some(request) => Sent::HandedBack(request),
            None => Sent::Answered(Err(e.into_error().to_string())),
        },
    }
}

fn lock(pool: &Mutex<Pool>) -> std::sync::MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Closes pooled connections that closed or sat idle too long, every `SWEEP`, until the pool is
/// empty or gone; an idle box keeps no connection to a backend longer than `IDLE` and a sweep.
async fn sweep(pool: Weak<Mutex<Pool>>) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut pool = lock(&pool);
        let now = Instant::now();
        pool.http1.retain(|_, conns| {
            conns.retain(|c| c.alive(now));
            !conns.is_empty()
        });
        pool.http2.retain(|_, conn| conn.alive(now));
        // Gates left by requests that were cancelled while opening.
        pool.http2_opening.retain(|_, gate| Arc::strong_count(gate) > 1);
        if pool.http1.is_empty() && pool.http2.is_empty() {
            pool.sweeping = false;
            return;
        }
    }
}

impl Pool {
    /// An idle HTTP/1.1 connection to `addr`, the most recently used one that is still open.
    /// Those passed over are dropped; the least recently used sit at the front until a sweep
    /// finds them idle too long, so a pool grown by a burst shrinks again. (Taking the least
    /// recently used instead would keep them all alive, and hand out the one a backend's own
    /// keep-alive timeout is likeliest to be closing.)
    fn take_http1(&mut self, addr: SocketAddr) -> Option<http1::Connection> {
        let now = Instant::now();
        let idle = self.http1.get_mut(&addr)?;
        while let Some(pooled) = idle.pop() {
            if pooled.alive(now) {
                return Some(pooled.conn);
            }
        }
        None
    }

    /// The HTTP/2 connection to `addr`, marked used, unless it closed or sat idle too long.
    fn ready_http2(&mut self, addr: SocketAddr) -> Option<Http2> {
        let now = Instant::now();
        let pooled = self.http2.get_mut(&addr)?;
        if !pooled.alive(now) {
            self.http2.remove(&addr);
            return None;
        }
        pooled.used = now;
        Some(pooled.conn.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use futures::channel::mpsc;
    use http::{Method, StatusCode};
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A backend on loopback that answers each request on its `n`th connection with the next of
    /// `answer(n)` (raw bytes; `None` closes the connection instead of answering), and closes the
    /// connection after the last. Reports each request it read (head and body, raw), and counts
    /// the connections it accepted.
    struct Backend {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        requests: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    }

    async fn backend(answer: fn(usize) -> Vec<Option<&'static [u8]>>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, requests) = tokio::sync::mpsc::unbounded_channel();
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut stream = stream;
                    for reply in answer(n) {
                        let Some(request) = read_request(&mut stream).await else { return };
                        let _ = tx.send(request);
                        match reply {
                            Some(bytes) => stream.write_all(bytes).await.unwrap(),
                            None => return,
                        }
                    }
                });
            }
        });
        Backend { addr, accepted, requests }
    }

    /// One request off the connection: the head, and a body framed by Content-Length or chunked
    /// coding (read to its last chunk). `None` when the client closed.
    async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        let mut byte = [0; 1];
        while !got.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            got.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
        if let Some(line) = head.lines().find(|l| l.starts_with("content-length:")) {
            let length: usize = line["content-length:".len()..].trim().parse().unwrap();
            let mut body = vec![0; length];
            stream.read_exact(&mut body).await.ok()?;
            got.extend(body);
        } else if head.lines().any(|l| l.starts_with("transfer-encoding:") && l.ends_with("chunked")) {
            while !got.ends_with(b"\r\n0\r\n\r\n") {
                if stream.read(&mut byte).await.ok()? == 0 {
                    return None;
                }
                got.push(byte[0]);
            }
        }
        Some(got)
    }

    fn get(method: Method) -> Request<Body> {
        Request::builder().method(method).uri("/path?q=1").body(boxed(Empty::<Bytes>::new())).unwrap()
    }

    async fn collect(response: Response<Body>) -> (StatusCode, Bytes, Option<http::HeaderMap>) {
        let status = response.status();
        let collected = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect());
        let collected = collected.await.expect("the body ends").unwrap();
        let trailers = collected.trailers().cloned();
        (status, collected.to_bytes(), trailers)
    }

    fn clients() -> PlainClients {
        PlainClients::new(Duration::from_secs(5))
    }

    /// `clients.send`, failing the test after 10 s instead of hanging it.
    async fn send(clients: &PlainClients, addr: SocketAddr, request: Request<Body>) -> Result<Response<Body>, String> {
        let sent = tokio::time::timeout(Duration::from_secs(10), clients.send(addr, Version::HTTP_11, request));
        sent.await.expect("an answer or an error within 10 s")
    }

    fn post(body: &'static [u8]) -> Request<Body> {
        Request::post("/up").body(boxed(Full::new(Bytes::from_static(body)))).unwrap()
    }

    const OK_HELLO: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    #[tokio::test]
    async fn a_connection_read_to_its_end_carries_the_next_request() {
        let mut backend = backend(|_| vec![Some(OK_HELLO); 3]).await;
        let clients = clients();
        for _ in 0..3 {
            let response = send(&clients, backend.addr, get(Method::GET)).await.unwrap();
            assert_eq!(collect(response).await.1, "hello");
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1, "one connection for all three");
        let request = String::from_utf8(backend.requests.recv().await.unwrap()).unwrap();
        let host = format!("GET /path?q=1 HTTP/1.1\r\nhost: {}\r\n\r\n", backend.addr);
        assert_eq!(request, host, "origin form, the address as Host, no body framing");
    }

    #[tokio::test]
    async fn chunked_responses_are_read_with_their_trailers_and_keep_the_connection() {
        const CHUNKED: &[u8] =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n";
        let backend = backend(|_| vec![Some(CHUNKED); 2]).await;
        let clients = clients();
        for _ in 0..2 {
            let response = send(&clients, backend.addr, get(Method::GET)).await.unwrap();
            let (status, body, trailers) = collect(response).await;
            assert_eq!((status, body.as_ref()), (StatusCode::OK, b"hello world".as_ref()));
            assert_eq!(trailers.unwrap()["x-sum"], "42");
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bodiless_answers_and_interim_responses() {
        const ANSWERS: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        ];
        let backend = backend(|_| ANSWERS.iter().map(|a| Some(*a)).collect()).await;
        let clients = clients();
        let mut got = Vec::new();
        for method in [Method::HEAD, Method::GET, Method::GET, Method::GET] {
            let response = send(&clients, backend.addr, get(method)).await.unwrap();
            let (status, body, _) = collect(response).await;
            got.push((status.as_u16(), body));
        }
        assert_eq!(got, [(200, "".into()), (204, "".into()), (304, "".into()), (201, "ok".into())]);
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1, "none of them ends the connection");
    }

    #[tokio::test]
    async fn a_response_delimited_by_close_is_read_to_the_end_and_not_pooled() {
        let backend = backend(|_| vec![Some(b"HTTP/1.1 200 OK\r\n\r\nuntil close".as_ref())]).await;
        let clients = clients();
        for _ in 0..2 {
            let response = send(&clients, backend.addr, get(Method::GET)).await.unwrap();
            let body = tokio::time::timeout(Duration::from_secs(5), collect(response)).await;
            assert_eq!(body.expect("the body ends with the connection").1, "until close");
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn request_bodies_go_with_a_length_or_chunked() {
        let mut backend = backend(|_| vec![Some(OK_HELLO); 2]).await;
        let clients = clients();
        send(&clients, backend.addr, post(b"0123456789")).await.unwrap();
        let (tx, rx) = mpsc::unbounded::<Result<Frame<Bytes>, std::convert::Infallible>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"abc")))).unwrap();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"defghijklmnopq")))).unwrap();
        drop(tx);
        let streamed = Request::post("/up").body(boxed(StreamBody::new(rx))).unwrap();
        let response = send(&clients, backend.addr, streamed).await.unwrap();
        assert_eq!(collect(response).await.1, "hello");
        let first = String::from_utf8(backend.requests.recv().await.unwrap()).unwrap();
        assert!(first.ends_with("content-length: 10\r\n\r\n0123456789"), "{first}");
        let second = String::from_utf8(backend.requests.recv().await.unwrap()).unwrap();
        assert!(
            second.ends_with("transfer-encoding: chunked\r\n\r\n3\r\nabc\r\ne\r\ndefghijklmnopq\r\n0\r\n\r\n"),
            "{second}"
        );
    }

    #[tokio::test]
    async fn a_pooled_connection_the_backend_closed_is_not_used() {
        // Each connection answers one request, then closes without saying so. (POSTs with a
        // body, which are never sent twice: each must find its connection closed beforehand.)
        let backend = backend(|_| vec![Some(OK_HELLO)]).await;
        let clients = clients();
        for _ in 0..3 {
            let response = send(&clients, backend.addr, post(b"once")).await.unwrap();
            assert_eq!(collect(response).await.1, "hello");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_request_the_backend_closed_on_unanswered_goes_again_only_if_it_can() {
        // Each connection answers one request, then closes on the next without answering.
        let backend = backend(|_| vec![Some(OK_HELLO), None]).await;
        let clients = clients();
        for _ in 0..2 {
            let response = send(&clients, backend.addr, get(Method::GET)).await.unwrap();
            assert_eq!(collect(response).await.1, "hello");
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2, "the second GET went again on a new connection");
        let failed = send(&clients, backend.addr, post(b"once")).await.unwrap_err();
        assert!(failed.contains("closed the connection before responding"), "{failed}");
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2, "a POST with a body is not sent twice");
    }

    #[tokio::test]
    async fn an_early_answer_ends_an_upload_the_backend_will_not_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    stream.write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n").await.unwrap();
                    // Reads on (the rest of the body, a next request) without answering.
                    while stream.read(&mut [0; 4096]).await.unwrap_or(0) > 0 {}
                });
            }
        });
        // A body that never ends.
        let (tx, rx) = mpsc::unbounded::<Result<Frame<Bytes>, std::convert::Infallible>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from(vec![b'x'; 1 << 20])))).unwrap();
        let request = Request::post("/up").body(boxed(StreamBody::new(rx))).unwrap();
        let clients = clients();
        let response = send(&clients, addr, request).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        drop(tx);
        // That connection is out of step (the body was cut short): the next request opens another.
        let response = send(&clients, addr, get(Method::GET)).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn answers_that_end_their_connection_leave_it_out_of_the_pool() {
        const ENDING: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ];
        // Connections come in pairs: the first gives an ending answer and would answer a second
        // request too, the second answers plainly.
        let backend =
            backend(|n| if n % 2 == 0 { vec![Some(ENDING[n / 2]), Some(OK_HELLO)] } else { vec![Some(OK_HELLO); 2] })
                .await;
        let clients = clients();
        for (i, _) in ENDING.iter().enumerate() {
            let response = send(&clients, backend.addr, get(Method::GET)).await.unwrap();
            assert_eq!(collect(response).await.1, "hello", "answer {i}");
            let response = send(&clients, backend.addr, get(Method::GET)).await.unwrap();
            assert_eq!(collect(response).await.1, "hello", "answer {i}");
            assert_eq!(backend.accepted.load(Ordering::SeqCst), 2 * (i + 1), "answer {i} left its connection pooled");
            // The second connection is pooled and clean; dropped, so the next pair starts afresh.
            assert_eq!(clients.lock().http1.get(&backend.addr).map(Vec::len), Some(1));
            clients.lock().http1.clear();
        }
    }

    #[tokio::test]
    async fn a_request_body_that_breaks_off_fails_the_request_at_once() {
        let backend = backend(|_| vec![Some(OK_HELLO)]).await;
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
            vec![Ok(Frame::data(Bytes::from_static(b"part"))), Err(std::io::Error::other("client went away"))];
        let request = Request::post("/up").body(boxed(StreamBody::new(futures::stream::iter(frames)))).unwrap();
        let failed = send(&clients(), backend.addr, request).await.unwrap_err();
        assert!(failed.contains("client went away"), "{failed}");
    }

    #[tokio::test]
    async fn a_reason_phrase_and_a_transfer_coding_are_carried() {
        let mut backend =
            backend(|_| vec![Some(b"HTTP/1.1 200 Fine Thanks\r\ncontent-length: 0\r\n\r\n".as_ref())]).await;
        let mut request = post(b"gzipped");
        request.headers_mut().insert(http::header::TRANSFER_ENCODING, HeaderValue::from_static("gzip, chunked"));
        let response = send(&clients(), backend.addr, request).await.unwrap();
        let reason = response.extensions().get::<hyper::ext::ReasonPhrase>().expect("a reason phrase");
        assert_eq!(reason.as_bytes(), b"Fine Thanks");
        let sent = String::from_utf8(backend.requests.recv().await.unwrap()).unwrap();
        assert!(sent.ends_with("transfer-encoding: gzip, chunked\r\n\r\n7\r\ngzipped\r\n0\r\n\r\n"), "{sent}");
    }

    #[tokio::test]
    async fn bad_responses_are_errors_not_panics() {
        const BAD: [&[u8]; 6] = [
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
            b"HTTP/1.1 200 OK\r\ncontent-length: -3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ];
        let clients = clients();
        for (i, bad) in BAD.iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                read_request(&mut stream).await;
                stream.write_all(bad).await.unwrap();
                let _ = stream.read(&mut [0; 1]).await;
            });
            let outcome = match send(&clients, addr, get(Method::GET)).await {
                Ok(response) => response.into_body().collect().await.map(|_| ()).map_err(|e| e.to_string()),
                Err(reason) => Err(reason),
            };
            assert!(outcome.is_err(), "answer {i} was taken as a response");
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_a_huge_head_is_refused() {
        let backend = backend(|n| {
            if n == 0 {
                vec![Some(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".as_ref())]
            } else {
                vec![Some(HUGE.as_ref())]
            }
        })
        .await;
        static HUGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..50 {
                head.extend(format!("x-filler-{i}: {}\r\n", "v".repeat(2000)).bytes());
            }
            head.extend(b"\r\n");
            head
        });
        let clients = clients();
        let response = send(&clients, backend.addr, get(Method::GET)).await.unwrap();
        let cut = response.into_body().collect().await;
        assert!(cut.unwrap_err().to_string().contains("middle of the response body"));
        let huge = send(&clients, backend.addr, get(Method::GET)).await;
        assert!(huge.unwrap_err().contains("over 65536 bytes"));
    }
}
