//! Plain HTTP to the local workload and to unmeshed destinations: HTTP/1.1 over kept-alive
//! connections pooled by address, HTTP/2 over one multiplexed connection per address.
//!
//! This is the hot path of every request a box receives from a peer, so it is kept to what that
//! needs. HTTP/1.1: a list of connections per address, each taken by the first request that
//! finds it ready; a connection is ready again once its response has been read to the end, and
//! until then a request that finds none ready opens another. HTTP/2: every request shares the
//! address's connection, opened by the first request that finds none.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::http::Body;

/// A pooled connection unused for this long is closed (hyper-util's pool uses the same).
const IDLE: Duration = Duration::from_secs(90);
/// How often the whole pool is swept of closed and idle connections, while it holds any.
const SWEEP: Duration = Duration::from_secs(10);
/// Pooled connections a request tries before it opens its own, when each one it tries turns out
/// to have closed before taking the request.
const STALE_TRIES: usize = 3;

pub struct PlainClients {
    pool: Arc<Mutex<Pool>>,
    connect_timeout: Duration,
}

#[derive(Default)]
struct Pool {
    http1: HashMap<SocketAddr, Vec<Pooled<http1::SendRequest<Body>>>>,
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

impl Conn for http1::SendRequest<Body> {
    fn is_closed(&self) -> bool {
        http1::SendRequest::is_closed(self)
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
    ) -> Result<Response<Incoming>, String> {
        if version == Version::HTTP_2 {
            return self.send_http2(addr, request).await;
        }
        if !request.headers().contains_key(http::header::HOST)
            && let Ok(host) = HeaderValue::try_from(addr.to_string())
        {
            request.headers_mut().insert(http::header::HOST, host);
        }
        self.send_http1(addr, request).await
    }

    async fn send_http1(&self, addr: SocketAddr, mut request: Request<Body>) -> Result<Response<Incoming>, String> {
        for _ in 0..STALE_TRIES {
            let sent = {
                let mut pool = self.lock();
                match pool.ready(addr) {
                    Some(sender) => sender.try_send_request(request),
                    None => break,
                }
            };
            match outcome(sent.await) {
                Sent::Answered(result) => return result,
                Sent::HandedBack(returned) => request = returned,
            }
        }
        // Boxed, as opening HTTP/2 is: rare, and large next to the rest of a request's future.
        let mut sender = Box::pin(self.open_http1(addr)).await?;
        let sent = sender.send_request(request);
        {
            let mut pool = self.lock();
            pool.http1.entry(addr).or_default().push(Pooled { conn: sender, used: Instant::now() });
            self.keep_swept(&mut pool);
        }
        sent.await.map_err(|e| e.to_string())
    }

    async fn open_http1(&self, addr: SocketAddr) -> Result<http1::SendRequest<Body>, String> {
        let stream = super::connect(addr, self.connect_timeout).await.map_err(|e| e.to_string())?;
        let (sender, connection) =
            http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "plain HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }

    /// HTTP/2 requests carry the address as their authority (`:authority`, `:scheme` http).
    async fn send_http2(&self, addr: SocketAddr, mut request: Request<Body>) -> Result<Response<Incoming>, String> {
        let path = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        // A pooled connection that closed before taking the request hands it back: once more,
        // on a new one.
        for fresh in [false, true] {
            let pooled = self.lock().ready_http2(addr);
            let Http2 { mut sender, authority } = match pooled {
                Some(conn) => conn,
                // Boxed: see `send_http1`.
                None => Box::pin(self.open_http2(addr)).await?,
            };
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(authority);
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
                    self.keep_swept(&mut pool);
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

    /// Starts the sweeping task if the pool has none.
    fn keep_swept(&self, pool: &mut Pool) {
        if !pool.sweeping {
            pool.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(&self.pool)));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        lock(&self.pool)
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
    /// A ready HTTP/1.1 connection to `addr`, marked used. Connections that closed or sat idle
    /// too long are dropped as they are passed over (and all of them by `sweep`); the scan stops
    /// at the first ready connection, so a pool grown by a burst is not walked whole every time,
    /// and its connections at the back sit idle until they are dropped. (Taking the least
    /// recently used would keep them all alive, and hand out the one a backend's own keep-alive
    /// timeout is likeliest to be closing.)
    fn ready(&mut self, addr: SocketAddr) -> Option<&mut http1::SendRequest<Body>> {
        let now = Instant::now();
        let conns = self.http1.get_mut(&addr)?;
        let mut i = 0;
        let found = loop {
            let conn = conns.get(i)?;
            if !conn.alive(now) {
                conns.swap_remove(i);
            } else if conn.conn.is_ready() {
                break i;
            } else {
                i += 1;
            }
        };
        let conn = &mut conns[found];
        conn.used = now;
        Some(&mut conn.conn)
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
