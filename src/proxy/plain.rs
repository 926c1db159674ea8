//! Plain HTTP to the local workload and to unmeshed destinations: HTTP/1.1 over kept-alive
//! connections pooled by address, HTTP/2 over hyper-util's pooled client.
//!
//! The HTTP/1.1 pool is the hot path of every request a box receives from a peer, so it is kept
//! to what that needs: a list of connections per address, each taken by the first request that
//! finds it ready. A connection is ready again once its response has been read to the end;
//! until then a request that finds none ready opens another.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
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
    http1: Arc<Mutex<Http1Pool>>,
    http2: Client<HttpConnector, Body>,
    connect_timeout: Duration,
}

#[derive(Default)]
struct Http1Pool {
    by_addr: HashMap<SocketAddr, Vec<Pooled>>,
    /// Whether a task is sweeping the pool (there is one while it holds connections).
    sweeping: bool,
}

struct Pooled {
    sender: http1::SendRequest<Body>,
    used: Instant,
}

impl Pooled {
    fn alive(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.duration_since(self.used) < IDLE
    }
}

impl std::fmt::Debug for PlainClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainClients").finish_non_exhaustive()
    }
}

impl PlainClients {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let http2 = Client::builder(TokioExecutor::new()).http2_only(true).timer(TokioTimer::new()).build(connector);
        Self { http1: Arc::default(), http2, connect_timeout }
    }

    /// Sends `request` to `addr` in `version` (HTTP/2, else HTTP/1.x). `request`'s URI need only
    /// carry the path; a request without a Host header gets `addr` as its host.
    pub async fn send(
        &self,
        addr: SocketAddr,
        version: Version,
        mut request: Request<Body>,
    ) -> Result<Response<Incoming>, String> {
        if version == Version::HTTP_2 {
            let path = request.uri().path_and_query().cloned();
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = http::uri::Authority::try_from(addr.to_string()).ok();
            parts.path_and_query = path.or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
            *request.uri_mut() = Uri::from_parts(parts).map_err(|e| e.to_string())?;
            return self.http2.request(request).await.map_err(|e| e.to_string());
        }
        // HTTP/1 is sent in origin form.
        if request.uri().scheme().is_some() || request.uri().path_and_query().is_none() {
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
            *request.uri_mut() = Uri::try_from(path).map_err(|e| e.to_string())?;
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
            match sent.await {
                Ok(response) => return Ok(response),
                // The connection closed before the request was written: it can go elsewhere.
                Err(mut e) => match e.take_message() {
                    Some(returned) => request = returned,
                    None => return Err(e.into_error().to_string()),
                },
            }
        }
        let stream = super::connect(addr, self.connect_timeout).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "plain HTTP/1 connection ended");
            }
        });
        let sent = sender.send_request(request);
        {
            let mut pool = self.lock();
            pool.by_addr.entry(addr).or_default().push(Pooled { sender, used: Instant::now() });
            if !pool.sweeping {
                pool.sweeping = true;
                tokio::spawn(sweep(Arc::downgrade(&self.http1)));
            }
        }
        sent.await.map_err(|e| e.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Http1Pool> {
        lock(&self.http1)
    }
}

fn lock(pool: &Mutex<Http1Pool>) -> std::sync::MutexGuard<'_, Http1Pool> {
    pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Closes pooled connections that closed or sat idle too long, every `SWEEP`, until the pool is
/// empty or gone; an idle box keeps no connection to a backend longer than `IDLE` and a sweep.
async fn sweep(pool: Weak<Mutex<Http1Pool>>) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut pool = lock(&pool);
        let now = Instant::now();
        pool.by_addr.retain(|_, conns| {
            conns.retain(|c| c.alive(now));
            !conns.is_empty()
        });
        if pool.by_addr.is_empty() {
            pool.sweeping = false;
            return;
        }
    }
}

impl Http1Pool {
    /// A ready connection to `addr`, marked used. Connections that closed or sat idle too long
    /// are dropped as they are passed over (and all of them by `sweep`); the scan stops at the
    /// first ready connection, so a pool grown by a burst is not walked whole on every request.
    fn ready(&mut self, addr: SocketAddr) -> Option<&mut http1::SendRequest<Body>> {
        let now = Instant::now();
        let conns = self.by_addr.get_mut(&addr)?;
        let mut i = 0;
        let found = loop {
            let conn = conns.get(i)?;
            if !conn.alive(now) {
                conns.swap_remove(i);
            } else if conn.sender.is_ready() {
                break i;
            } else {
                i += 1;
            }
        };
        let conn = &mut conns[found];
        conn.used = now;
        Some(&mut conn.sender)
    }
}
