//! HTTP through the proxy: requests are balanced one by one, and between two boxes every
//! request (HTTP/1 or HTTP/2 from the client) rides one pooled HTTP/2 connection over mTLS,
//! marked with its original version (unless HTTP/1.1) and its target port (unless it is the one
//! the connection was opened for) so the peer can restore both. An HTTP/1 client's Host header
//! travels as :authority only; the peer gives it back to the workload.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::balance::{InFlight, Outcome};
use super::detect::Protocol;
use super::head::HeadClock;
use super::http1;
use super::peer::PeerConnection;
use super::tcp::{Activity, Counted};
use super::transport::Header;
use super::{Error, Proxy, ServicePolicy};
use crate::drain;
use crate::model::RouteRetry;
use crate::policy::RequestInfo;

/// Request header naming the port on the peer a request is for; without it, the request is for
/// the port the connection's transport header named. (Names made at compile time: a name given
/// as a string is parsed and checked on every use.)
pub const TARGET_PORT_HEADER: HeaderName = HeaderName::from_static("meshkeep-target-port");
/// Request header carrying, across the HTTP/2 hop, the HTTP version box B speaks to the
/// workload in: the client's, unless the service port's `appProtocol` names another ([`Speaks`]).
/// Without it, the version is HTTP/1.1 (the most common, so it goes without).
pub const ORIGINAL_VERSION_HEADER: HeaderName = HeaderName::from_static("meshkeep-original-version");
/// HTTP/2 PING interval on connections to peers (src/proxy/peer.rs) and to HTTP/2 backends while
/// requests are in flight: a peer that stops answering is found out and dropped (after 20 s
/// without an answer, hyper's keep-alive timeout). Servers send no pings: an idle connection is
/// closed by the idle timeout instead.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Response header saying why the proxy answered itself.
pub const ERROR_HEADER: &str = "meshkeep-error";
/// Streams a peer may reset before box B has accepted them, before it ends the connection.
const PEER_RESETS_PENDING: usize = 1024;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub(super) fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    body.map_err(Into::into).boxed()
}

fn empty_with(status: StatusCode, reason: &str) -> Response<Body> {
    let mut response = Response::new(boxed(Full::new(Bytes::from(format!("{reason}\n")))));
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(reason) {
        response.headers_mut().insert(ERROR_HEADER, value);
    }
    response
}

/// Labels of HTTP metrics (Linkerd's names).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub authority: String,
    pub tls: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: &'static str,
    pub authority: String,
    pub tls: &'static str,
    pub status_code: u16,
    /// `success` or `failure` (5xx and proxy errors).
    pub classification: &'static str,
}

/// request_total, response_total, response_latency_ms; and the last minute's golden metrics.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: Family<RequestLabels, Histogram>,
    retries: Family<RetryLabels, Counter>,
    pub golden: Arc<super::stats::Golden>,
    /// Each service's metrics, found by borrowed labels: a request allocates nothing to count.
    services: Arc<std::sync::Mutex<hashbrown::HashMap<RequestLabels, Arc<ServiceMetrics>>>>,
}

/// `RequestLabels` borrowed from a request; hashes as the labels it equals (fields in order).
#[derive(Hash)]
struct LabelsRef<'a>(&'static str, &'a str, &'static str);

impl hashbrown::Equivalent<RequestLabels> for LabelsRef<'_> {
    fn equivalent(&self, labels: &RequestLabels) -> bool {
        self.0 == labels.direction && self.1 == labels.authority && self.2 == labels.tls
    }
}

/// One service's metrics in one direction, found once per request. The counters are the
/// families' own (shared), so the response is recorded without another lookup.
#[derive(Debug)]
pub struct ServiceMetrics {
    labels: RequestLabels,
    requests: Counter,
    latency: Histogram,
    /// Response counters by status code, as they are first seen (a handful per service).
    responses: std::sync::Mutex<Vec<(u16, Counter)>>,
    family: Family<ResponseLabels, Counter>,
    golden: Arc<super::stats::Golden>,
}

impl ServiceMetrics {
    /// The service the request was counted under.
    pub fn authority(&self) -> &str {
        &self.labels.authority
    }

    /// Records a response to a request that arrived at `started`, answered at `answered`.
    fn record(&self, route: (&Method, &str), status: StatusCode, started: Instant, answered: Instant) {
        let code = status.as_u16();
        let failure = status.is_server_error();
        {
            let mut responses = self.responses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let counter = match responses.iter().position(|(c, _)| *c == code) {
                Some(i) => &responses[i].1,
                None => {
                    let labels = ResponseLabels {
                        direction: self.labels.direction,
                        authority: self.labels.authority.clone(),
                        tls: self.labels.tls,
                        status_code: code,
                        classification: if failure { "failure" } else { "success" },
                    };
                    let counter = self.family.get_or_create(&labels).clone();
                    responses.push((code, counter));
                    &responses[responses.len() - 1].1
                }
            };
            counter.inc();
        }
        let elapsed = answered.saturating_duration_since(started);
        self.latency.observe(elapsed.as_secs_f64() * 1000.0);
        let labels = &self.labels;
        let route = (route.0.as_str(), route.1);
        self.golden.record(labels.direction, &labels.authority, route, failure, elapsed, answered);
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub authority: String,
    /// `retried`, or `budget_exhausted` when a retry was wanted but the budget said no.
    pub result: &'static str,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        // Linkerd's latency buckets, in milliseconds.
        const BUCKETS: [f64; 25] = [
            1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 1000.0, 2000.0,
            3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
        ];
        Self {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
            retries: Family::default(),
            golden: Arc::default(),
            services: Arc::default(),
        }
    }
}

impl HttpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("request", "HTTP requests received", self.requests.clone());
        registry.register("response", "HTTP responses sent", self.responses.clone());
        registry.register("response_latency_ms", "Time to response headers, in milliseconds", self.latency.clone());
        registry.register("meshkeep_retries", "Requests retried, or not for want of budget", self.retries.clone());
    }

    fn retried(&self, authority: &str, result: &'static str) {
        self.retries.get_or_create(&RetryLabels { authority: authority.to_owned(), result }).inc();
    }

    /// Counts a request for `authority`; its response is recorded on what this returns.
    fn request(&self, direction: &'static str, authority: &str, tls: &'static str) -> Arc<ServiceMetrics> {
        let service = self.service(direction, authority, tls);
        service.requests.inc();
        service
    }

    /// The metrics of `authority` in `direction`, made on first use. They are never dropped:
    /// a caller may keep them.
    fn service(&self, direction: &'static str, authority: &str, tls: &'static str) -> Arc<ServiceMetrics> {
        let mut services = self.services.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(service) = services.get(&LabelsRef(direction, authority, tls)) {
            return Arc::clone(service);
        }
        let labels = RequestLabels { direction, authority: authority.to_owned(), tls };
        let service = Arc::new(ServiceMetrics {
            requests: self.requests.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            labels: labels.clone(),
            responses: std::sync::Mutex::default(),
            family: self.responses.clone(),
            golden: Arc::clone(&self.golden),
        });
        services.insert(labels, Arc::clone(&service));
        service
    }
}

/// Pooled HTTP/2 connections to peers, by peer address and identity.
#[derive(Default)]
pub struct PeerPool {
    /// One slot per peer and identity: opening a connection (TCP, mTLS) holds only its own
    /// peer's slot, so a slow peer never holds up requests to the others.
    peers: std::sync::Mutex<hashbrown::HashMap<(SocketAddr, Box<str>), PeerSlot>>,
}

/// A peer's key borrowed from a request's route: found without copying the identity.
#[derive(Hash)]
struct PeerKey<'a>(SocketAddr, &'a str);

impl hashbrown::Equivalent<(SocketAddr, Box<str>)> for PeerKey<'_> {
    fn equivalent(&self, (addr, identity): &(SocketAddr, Box<str>)) -> bool {
        self.0 == *addr && self.1 == &**identity
    }
}

impl From<&PeerKey<'_>> for (SocketAddr, Box<str>) {
    fn from(key: &PeerKey<'_>) -> Self {
        (key.0, key.1.into())
    }
}

/// One peer's connection, and the lock its opening holds.
#[derive(Default)]
struct PeerSlot {
    /// Taken under the pool's lock: a request to a peer already connected waits for nothing else.
    connection: Option<PeerConnection>,
    /// Held while a connection is being opened (TCP, mTLS, HTTP/2), by one request; the peer's
    /// other requests wait for it, and no other peer's.
    opening: Arc<Mutex<()>>,
}

impl PeerPool {
    /// The open connection to a peer; else the lock to hold while opening one.
    fn connection(&self, peer: SocketAddr, identity: &str) -> Result<PeerConnection, Arc<Mutex<()>>> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let slot = peers.entry_ref(&PeerKey(peer, identity)).or_default();
        match slot.connection.as_ref().filter(|c| !c.is_closed()) {
            Some(connection) => Ok(connection.clone()),
            None => Err(Arc::clone(&slot.opening)),
        }
    }

    fn opened(&self, peer: SocketAddr, identity: &str, connection: PeerConnection) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.entry_ref(&PeerKey(peer, identity)).or_default().connection = Some(connection);
    }
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool").finish_non_exhaustive()
    }
}

/// The HTTP a service port's `appProtocol` says its endpoints speak, where it names one. A port
/// that names none (or another protocol) is spoken to in the client's version, as the client
/// would have spoken to it without the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// HTTP/1.x (`http`): a request that came over HTTP/2 goes on as HTTP/1.1, as HAProxy
    /// sends its requests to a backend (and nginx with `proxy_http_version 1.1`).
    Http1,
    /// HTTP/2 without TLS (`kubernetes.io/h2c`, the standard name in Kubernetes; also `h2c`,
    /// `http2` and `grpc`): every request goes over HTTP/2, whatever the client spoke.
    Http2,
}

impl Speaks {
    pub fn from_app_protocol(name: &str) -> Option<Self> {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        if is("http") {
            Some(Speaks::Http1)
        } else if ["kubernetes.io/h2c", "h2c", "http2", "grpc"].into_iter().any(is) {
            Some(Speaks::Http2)
        } else {
            None
        }
    }

    /// The version a request from a `client` of this version goes to the endpoint in.
    fn version(speaks: Option<Self>, client: Version) -> Version {
        match speaks {
            Some(Speaks::Http2) => Version::HTTP_2,
            Some(Speaks::Http1) if client == Version::HTTP_2 => Version::HTTP_11,
            Some(Speaks::Http1) | None => client,
        }
    }
}

/// Where an outbound HTTP request goes, decided per request.
pub enum Route {
    Meshed { peer: SocketAddr, identity: String, target_port: u16, authority: Arc<str> },
    Plain { addr: SocketAddr, authority: Arc<str> },
}

/// Runs an HTTP server connection to its end. It is closed gracefully (requests in flight
/// finish, then the connection closes) once nothing has moved on it for `idle`, or when the
/// drain starts; if nothing moves for `idle` again after that (a client that stopped reading,
/// a response that never comes), it is cut.
async fn drive<C, E>(
    connection: C,
    shutdown: impl Fn(Pin<&mut C>),
    activity: Activity,
    idle: Duration,
    head: Option<(&HeadClock, Duration)>,
    drain: drain::Watch,
) -> Result<(), Error>
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    let head_overdue = async {
        match head {
            Some((clock, limit)) => clock.overdue(limit).await,
            None => std::future::pending().await,
        }
    };
    let mut head_overdue = std::pin::pin!(head_overdue);
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => {
                return result.map_err(|e| Error::Io(std::io::Error::other(e.to_string())));
            }
            () = head_overdue.as_mut() => {
                // A client that starts a request head and never finishes it: cut, not drained.
                let limit = head.map_or(Duration::ZERO, |(_, limit)| limit);
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("request head not complete within {limit:?}"),
                )));
            }
            () = activity.idle_for(idle) => {
                if closing {
                    return Err(Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("nothing moved for {idle:?} while closing"),
                    )));
                }
                closing = true;
                shutdown(connection.as_mut());
                // Its second idle period starts now.
                activity.touch();
            }
            () = drain.signaled(), if !closing => {
                closing = true;
                shutdown(connection.as_mut());
                activity.touch();
            }
        }
    }
}

/// Why a request could not be routed, and the service it was for when that is known.
pub struct Refused {
    pub error: Error,
    pub authority: Option<String>,
}

/// Where one attempt of an outbound request goes, and what it is counted under.
pub struct Routed {
    pub route: Route,
    /// The balancer's record of the attempt; its outcome is reported when the answer comes.
    pub in_flight: Option<InFlight>,
    /// The route's timeout for the whole request, retries included, if it sets one.
    pub timeout: Option<Duration>,
    /// The route's timeout for each try, if it sets one.
    pub try_timeout: Option<Duration>,
    /// The route's retry policy, if it marks its requests retryable (or, with no attempts,
    /// not retryable at all).
    pub retry: Option<RouteRetry>,
    /// The HTTP the backend's port says it speaks; `None`: the client's.
    pub speaks: Option<Speaks>,
    /// The service asked for (`name.ns.svc.<domain>:port`), before any split: the metrics label.
    pub authority: Arc<str>,
}

impl Route {
    fn tls(&self) -> &'static str {
        match self {
            Route::Meshed { .. } => "true",
            Route::Plain { .. } => "no_identity",
        }
    }
}

/// Serves HTTP/1 and HTTP/2 from a local client; `route` picks a destination for each attempt
/// of each request.
pub async fn serve_outbound<R>(
    proxy: Arc<Proxy>,
    client: Counted<tokio::net::TcpStream>,
    protocol: Protocol,
    route: R,
    drain: drain::Watch,
) -> Result<(), Error>
where
    R: Fn(&Proxy, &RequestInfo<'_>) -> Result<Routed, Refused> + Send + Sync + 'static,
{
    let (activity, idle) = (client.activity(), proxy.http_idle_timeout);
    if protocol == Protocol::Http1 {
        // HTTP/1 heads have their own deadline; HTTP/2 connections only the idle timeout.
        let (clock, stop) = (HeadClock::new(), http1::server::Stop::default());
        let connection =
            http1::server::serve(client, &clock, &stop, |request| outbound_request(&proxy, &route, request));
        let head = Some((&clock, proxy.header_read_timeout));
        return drive(connection, |_| stop.ask(), activity, idle, head, drain).await;
    }
    let route = Arc::new(route);
    let service = service_fn(move |request: Request<Incoming>| {
        let proxy = Arc::clone(&proxy);
        let route = Arc::clone(&route);
        async move { Ok::<_, Infallible>(outbound_request(&proxy, &*route, request).await) }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_header_list_size(64 * 1024)
        .serve_connection(TokioIo::new(client), service);
    drive(connection, |c| c.graceful_shutdown(), activity, idle, None, drain).await
}

/// Methods a retry cannot harm (RFC 9110 idempotent methods).
pub(super) fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// When a request may be tried again: the route's `retry` when it has one (any method, its
/// statuses, attempts and backoff), else the service's policy (idempotent methods, 5xx).
struct RetryPlan {
    /// Retries on top of the first try; 0 when the request is not retryable.
    max: u32,
    /// Statuses worth another try; empty means every 5xx.
    codes: Vec<u16>,
    backoff: Duration,
}

impl RetryPlan {
    fn new(policy: &ServicePolicy, route: Option<&RouteRetry>, method: &Method) -> Self {
        match route {
            Some(retry) => Self {
                max: retry.attempts.unwrap_or(policy.max_retries),
                codes: retry.codes.clone(),
                backoff: Duration::from_millis(retry.backoff_ms.unwrap_or(0)),
            },
            None => {
                let wanted = policy.retries && (policy.retry_all_methods || idempotent(method));
                Self { max: if wanted { policy.max_retries } else { 0 }, codes: Vec::new(), backoff: Duration::ZERO }
            }
        }
    }

    /// Whether this outcome of a try is worth another: connection errors and timeouts always.
    fn retries(&self, result: &Result<Response<Body>, (StatusCode, String)>) -> bool {
        match result {
            Err(_) => true,
            Ok(response) if self.codes.is_empty() => response.status().is_server_error(),
            Ok(response) => self.codes.contains(&response.status().as_u16()),
        }
    }
}

/// A request body: kept in memory when it may be replayed, else streamed once.
enum RequestBody {
    /// The whole body and its trailers, small enough to send again.
    Replayable {
        data: Bytes,
        trailers: Option<http::HeaderMap>,
    },
    Once(Option<Body>),
}

impl RequestBody {
    /// Reads a body of unknown length up to `limit` bytes: one that ends within them can be
    /// replayed; a longer one is sent once, what was read first and then the rest as it comes.
    async fn buffer<B>(mut body: B, limit: usize) -> Result<Self, B::Error>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let mut data = BytesMut::new();
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if data.len() > limit {
                        let read = futures::stream::iter([Ok(Frame::data(data.freeze()))]);
                        let rest = read.chain(http_body_util::BodyStream::new(body));
                        return Ok(Self::Once(Some(boxed(http_body_util::StreamBody::new(rest)))));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Ok(Self::Replayable { data: data.freeze(), trailers: Some(trailers) });
                    }
                }
            }
        }
        Ok(Self::Replayable { data: data.freeze(), trailers: None })
    }

    fn take(&mut self) -> Body {
        match self {
            RequestBody::Replayable { data, trailers: None } => boxed(Full::new(data.clone())),
            RequestBody::Replayable { data, trailers: Some(trailers) } => {
                let frames = [Frame::data(data.clone()), Frame::trailers(trailers.clone())];
                boxed(http_body_util::StreamBody::new(futures::stream::iter(frames.map(Ok::<_, Infallible>))))
            }
            RequestBody::Once(body) => body.take().unwrap_or_else(|| boxed(Full::new(Bytes::new()))),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable { .. })
    }
}

fn route_error(proxy: &Proxy, e: &Error) -> Response<Body> {
    proxy.metrics.error("outbound", e.reason());
    let status = match e {
        Error::NoEndpoint(_) | Error::EndpointsUnknown(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::NoRoute { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::NOT_FOUND),
        _ => StatusCode::BAD_GATEWAY,
    };
    empty_with(status, &e.to_string())
}

async fn outbound_request<R, B>(proxy: &Proxy, route: &R, request: Request<B>) -> Response<Body>
where
    R: Fn(&Proxy, &RequestInfo<'_>) -> Result<Routed, Refused>,
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let info = RequestInfo::of(&parts);
    let mut routed = match route(proxy, &info) {
        Ok(routed) => routed,
        Err(refused) => {
            // Counted like any answer: under the service when it was known, else `unknown`.
            let authority = refused.authority.unwrap_or_else(|| "unknown".to_owned());
            let metrics = proxy.http.request("outbound", &authority, "no_identity");
            let response = route_error(proxy, &refused.error);
            metrics.record((&parts.method, parts.uri.path()), response.status(), started, Instant::now());
            return response;
        }
    };
    let metrics = proxy.http.request("outbound", &routed.authority, routed.route.tls());
    let policy = proxy.traffic_for(&routed.authority);
    // Until the response headers, over all tries. The clock is read once per try, not at every
    // step (a read is about 1 % of a request's work on this side).
    let mut try_started = tokio::time::Instant::from_std(started);
    let deadline = try_started + routed.timeout.unwrap_or(policy.response_timeout);
    let version = parts.version;
    let host_header = parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
    let host =
        host_header.or_else(|| parts.uri.authority().map(Authority::as_str)).unwrap_or_else(|| metrics.authority());
    let path = path_of(&parts.uri);
    let retry = RetryPlan::new(&policy, routed.retry.as_ref(), &parts.method);
    // A retryable request's body is kept for replay up to the limit (a body announced as longer
    // is streamed at once); a client that trickles its body is held to the response deadline.
    let announced = hyper::body::Body::size_hint(&body).exact();
    let mut body = if retry.max > 0 && announced.is_none_or(|size| size <= policy.retry_body_limit as u64) {
        match tokio::time::timeout_at(deadline, RequestBody::buffer(body, policy.retry_body_limit)).await {
            Ok(Ok(body)) => {
                // A body that had to be waited for is not part of the first try's time.
                if announced != Some(0) {
                    try_started = tokio::time::Instant::now();
                }
                body
            }
            Ok(Err(e)) => return empty_with(StatusCode::BAD_REQUEST, &format!("reading the request body: {e}")),
            Err(_) => return empty_with(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time"),
        }
    } else {
        RequestBody::Once(Some(boxed(body)))
    };
    proxy.budget.deposit(&routed.authority, started);
    let mut retries = 0;
    let (response, answered) = loop {
        let try_deadline = routed.try_timeout.map_or(deadline, |t| deadline.min(try_started + t));
        // What the endpoint is spoken to in (box B speaks it for a meshed one).
        let to_endpoint = Speaks::version(routed.speaks, version);
        let mut headers = parts.headers.clone();
        // Set when another try could not do better.
        let mut final_answer = false;
        let attempt = match &routed.route {
            Route::Meshed { .. } if proxy.current_tls().is_none() => {
                // This box has no certificate yet: that says nothing about the endpoint, and
                // the client hears so at once.
                drop(routed.in_flight.take());
                final_answer = true;
                proxy.metrics.error("outbound", Error::NoCertificate.reason());
                Ok(Err(Error::NoCertificate.to_string()))
            }
            Route::Meshed { peer, identity, target_port, authority } => {
                // Connection and the headers it names go before the markers are added, so a
                // client cannot name them away; the peer connection drops the other
                // connection-specific headers (Keep-Alive, Proxy-Connection, Transfer-Encoding,
                // Upgrade, TE other than `trailers`). A client's own markers would be taken for
                // the proxy's.
                remove_connection_headers(&mut headers);
                take_client_markers(&mut headers);
                if to_endpoint != Version::HTTP_11 {
                    headers.insert(ORIGINAL_VERSION_HEADER, HeaderValue::from_static(version_name(to_endpoint)));
                }
                let uri = absolute(host, &path);
                // From an HTTP/1 client, :authority carries the Host header's value: one header
                // less to compress and decompress on every request. Box B gives it back to an
                // HTTP/1 workload; an HTTP/2 workload has it as :authority (RFC 9113, 8.3.1),
                // and an HTTP/2 client's own Host header goes as it came.
                if version != Version::HTTP_2
                    && host_header.is_some()
                    && uri.authority().is_some_and(|a| a.as_str() == host)
                {
                    headers.remove(http::header::HOST);
                }
                let request = build(&parts.method, uri, Version::HTTP_2, headers, body.take());
                let sent = send_to_peer(proxy, *peer, identity, *target_port, authority, request);
                tokio::time::timeout_at(try_deadline, sent).await
            }
            Route::Plain { addr, .. } => {
                let uri = if to_endpoint == Version::HTTP_2 {
                    // The authority goes as :authority, which a Host header from an HTTP/1
                    // client must not contradict (RFC 9113, 8.3.1).
                    if version != Version::HTTP_2 {
                        headers.remove(http::header::HOST);
                    }
                    absolute(host, &path)
                } else {
                    if !headers.contains_key(http::header::HOST)
                        && let Ok(value) = HeaderValue::from_str(host)
                    {
                        headers.insert(http::header::HOST, value);
                    }
                    Uri::from(path.clone())
                };
                let request = build(&parts.method, uri, to_endpoint, headers, body.take());
                tokio::time::timeout_at(try_deadline, proxy.plain.send(*addr, to_endpoint, request)).await
            }
        };
        let result = match attempt {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(reason)) => Err((StatusCode::BAD_GATEWAY, reason)),
            Err(_) => {
                let waited = try_deadline.saturating_duration_since(try_started);
                Err((StatusCode::GATEWAY_TIMEOUT, format!("no response within {}ms", waited.as_millis())))
            }
        };
        let failed = result.as_ref().map_or(true, |r| r.status().is_server_error());
        let mut answered = Instant::now();
        if let Some(in_flight) = routed.in_flight.take() {
            in_flight.finish_at(if failed { Outcome::Failure } else { Outcome::Success }, answered);
        }
        // A retry happens before anything of the response reaches the client, and not sooner
        // than the route's backoff.
        let time_left = || deadline > tokio::time::Instant::now() + retry.backoff;
        if !final_answer && retry.retries(&result) && body.replayable() && retries < retry.max && time_left() {
            if proxy.budget.withdraw(metrics.authority(), Instant::now()) {
                tokio::time::sleep(retry.backoff).await;
                try_started = tokio::time::Instant::now();
                answered = try_started.into_std();
                if let Ok(next) = route(proxy, &info) {
                    retries += 1;
                    proxy.http.retried(metrics.authority(), "retried");
                    routed = next;
                    continue;
                }
            } else {
                proxy.http.retried(metrics.authority(), "budget_exhausted");
            }
        }
        let response = match result {
            Ok(response) => response,
            Err((status, reason)) => {
                proxy.metrics.error("outbound", if status == StatusCode::GATEWAY_TIMEOUT { "timeout" } else { "http" });
                empty_with(status, &reason)
            }
        };
        break (response, answered);
    };
    metrics.record((&parts.method, path.as_str()), response.status(), started, answered);
    response
}

/// Removes every `Connection` header and the headers its values name.
pub(super) fn remove_connection_headers(headers: &mut http::HeaderMap) {
    if !headers.contains_key(http::header::CONNECTION) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    headers.remove(http::header::CONNECTION);
    for name in named {
        headers.remove(name);
    }
}

fn build(method: &Method, uri: Uri, version: Version, headers: http::HeaderMap, body: Body) -> Request<Body> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    request
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

/// The request's path and query as received (`/` when it has none).
fn path_of(uri: &Uri) -> PathAndQuery {
    uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// `path` at `authority` over plain HTTP. The path is shared, not parsed again.
fn absolute(authority: &str, path: &PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Authority::try_from(authority).ok();
    parts.path_and_query = Some(path.clone());
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("http://invalid/"))
}

/// Sends over the pooled HTTP/2 connection to a peer, opening it (mTLS + header) if needed.
async fn send_to_peer(
    proxy: &Proxy,
    peer: SocketAddr,
    identity: &str,
    target_port: u16,
    authority: &str,
    request: Request<Body>,
) -> Result<Response<Body>, String> {
    let connection = match proxy.peers.connection(peer, identity) {
        Ok(connection) => connection,
        Err(opening) => {
            let _opening = opening.lock().await;
            // The request that held the lock before may have opened it.
            match proxy.peers.connection(peer, identity) {
                Ok(connection) => connection,
                Err(_) => {
                    // Boxed: opening is rare, and its large state would otherwise be part of,
                    // and copied with, every request's future.
                    let opening = Box::pin(open_peer(proxy, peer, identity, target_port, authority));
                    let connection = opening.await.map_err(|e| {
                        proxy.metrics.error("outbound", e.reason());
                        e.to_string()
                    })?;
                    proxy.peers.opened(peer, identity, connection.clone());
                    connection
                }
            }
        }
    };
    // The peer takes requests without a port marker to the port its connection was opened for.
    let mut request = request;
    if connection.default_port() != target_port {
        request.headers_mut().insert(TARGET_PORT_HEADER, HeaderValue::from(target_port));
    }
    connection.send(request).await
}

async fn open_peer(
    proxy: &Proxy,
    peer: SocketAddr,
    identity: &str,
    target_port: u16,
    authority: &str,
) -> Result<PeerConnection, Error> {
    let mut stream = proxy.connect_peer(peer, identity).await?;
    let header =
        Header { target_port, protocol: super::detect::Protocol::Http2, authority: Some(authority.to_owned()) };
    stream.write_all(&header.encode()).await?;
    PeerConnection::handshake(stream, target_port)
        .await
        .map_err(|e| Error::Tls { peer: format!("{identity} at {peer}"), reason: format!("HTTP/2: {e}") })
}

/// Serves the HTTP/2 side of a peer connection: each request goes to its target port on
/// `proxy.inbound_target`, in the version box A chose (the client's unless the service port's
/// `appProtocol` names one; HTTP/1.x goes as HTTP/1.1).
/// `authority` (from the transport header) labels the metrics, so a client's Host header cannot
/// grow their cardinality.
pub async fn serve_inbound<S>(
    proxy: Arc<Proxy>,
    session: Counted<S>,
    peer: InboundPeer,
    drain: drain::Watch,
) -> Result<(), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (activity, idle) = (session.activity(), proxy.http_idle_timeout);
    let peer = Arc::new(peer);
    let service = service_fn(move |request: Request<Incoming>| {
        let proxy = Arc::clone(&proxy);
        let peer = Arc::clone(&peer);
        // Boxed: hyper spawns a task per stream with this future in it, and a future of this
        // size costs more to move into place (several copies) than to allocate.
        Box::pin(async move { Ok::<_, Infallible>(inbound_request(&proxy, request, &peer).await) })
    });
    // A peer cancels the requests its clients gave up on, and a client that goes away with
    // hundreds in flight makes it cancel them at once. h2's guard against rapid resets (20
    // reset streams waiting to be accepted) would take that for an attack and end the
    // connection under every other client's requests; a peer is authenticated, and the
    // queue stays bounded.
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(PEER_RESETS_PENDING)
        .serve_connection(TokioIo::new(session), service);
    drive(connection, |c| c.graceful_shutdown(), activity, idle, None, drain).await
}

/// What an inbound HTTP/2 connection from a peer knows of that peer.
#[derive(Debug)]
pub struct InboundPeer {
    /// The port named in the transport header (requests may name another).
    pub default_port: u16,
    /// The service the peer asked for (from the transport header): the metrics label, so a
    /// client's Host header cannot grow the metrics' cardinality.
    pub authority: String,
    /// Its metrics, found at the first request.
    pub metrics: std::sync::OnceLock<Arc<ServiceMetrics>>,
    /// The peer's mesh identity, proven by its certificate.
    pub identity: Option<String>,
    /// The connection's last verdict that holds for all of its requests to one port, while
    /// the snapshot it came from is current.
    pub admission: super::inbound::Admission,
}

/// Whether a request carries either marker. They are mostly absent (HTTP/1.1 to the port the
/// connection was opened for): a pass over the names costs less than lookups that find nothing.
fn has_markers(headers: &http::HeaderMap) -> bool {
    headers.keys().any(|name| name == TARGET_PORT_HEADER || name == ORIGINAL_VERSION_HEADER)
}

/// Removes markers a client sent itself, which the peer would take for this proxy's.
fn take_client_markers(headers: &mut http::HeaderMap) {
    if has_markers(headers) {
        headers.remove(TARGET_PORT_HEADER);
        headers.remove(ORIGINAL_VERSION_HEADER);
    }
}

/// Takes the markers the peer's proxy added off a request's headers: the target port (else
/// `default_port`, from the transport header) and the HTTP version box A chose for the workload.
pub(crate) fn take_markers(headers: &mut http::HeaderMap, default_port: u16) -> (u16, Version) {
    if !has_markers(headers) {
        return (default_port, Version::HTTP_11);
    }
    let port = headers
        .remove(TARGET_PORT_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .unwrap_or(default_port);
    let version = match headers.remove(ORIGINAL_VERSION_HEADER).as_ref().and_then(|v| v.to_str().ok()) {
        Some("HTTP/2") => Version::HTTP_2,
        Some("HTTP/1.0") => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    (port, version)
}

async fn inbound_request(proxy: &Proxy, mut request: Request<Incoming>, peer: &InboundPeer) -> Response<Body> {
    let started = Instant::now();
    let (port, version) = take_markers(request.headers_mut(), peer.default_port);
    // An HTTP/1 workload gets its Host header back from :authority (box A leaves it out when
    // they are the same), before authorization looks at the headers.
    if version != Version::HTTP_2
        && let Some(authority) = request.uri().authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
        && let http::header::Entry::Vacant(host) = request.headers_mut().entry(http::header::HOST)
    {
        host.insert(value);
    }
    let metrics = peer.metrics.get_or_init(|| proxy.http.service("inbound", &peer.authority, "true"));
    metrics.requests.inc();
    let info = RequestInfo {
        method: request.method().as_str(),
        path: request.uri().path(),
        headers: request.headers(),
        host: request.uri().authority().map(|a| a.as_str()),
    };
    if let Err(reason) = peer.admission.check(proxy, port, peer.identity.as_deref(), &info) {
        let response = empty_with(StatusCode::FORBIDDEN, &format!("forbidden: {reason}"));
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        metrics.record((&method, &path), response.status(), started, Instant::now());
        return response;
    }
    let (mut parts, body) = request.into_parts();
    let path = path_of(&parts.uri);
    let method = parts.method.clone();
    let target = SocketAddr::new(proxy.inbound_target, port);
    // An HTTP/2 workload is told the authority in :authority; an HTTP/1 one has it as Host.
    if version != Version::HTTP_2 {
        parts.uri = Uri::from(path.clone());
    }
    parts.version = if version == Version::HTTP_2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let response = match proxy.plain.send(target, version, Request::from_parts(parts, boxed(body))).await {
        Ok(response) => response,
        Err(reason) => {
            proxy.metrics.error("inbound", "http");
            empty_with(StatusCode::BAD_GATEWAY, &reason)
        }
    };
    metrics.record((&method, path.as_str()), response.status(), started, Instant::now());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_protocol_names_the_http_spoken_to_the_endpoint() {
        let speaks = |name| Speaks::from_app_protocol(name);
        assert_eq!(speaks("http"), Some(Speaks::Http1));
        for name in ["kubernetes.io/h2c", "H2C", "http2", "grpc"] {
            assert_eq!(speaks(name), Some(Speaks::Http2), "{name}");
        }
        for name in ["https", "kubernetes.io/ws", "tcp", "", "http/1.1x"] {
            assert_eq!(speaks(name), None, "{name}");
        }
        let cases = [
            (None, Version::HTTP_2, Version::HTTP_2),
            (None, Version::HTTP_10, Version::HTTP_10),
            (Some(Speaks::Http1), Version::HTTP_2, Version::HTTP_11),
            (Some(Speaks::Http1), Version::HTTP_10, Version::HTTP_10),
            (Some(Speaks::Http2), Version::HTTP_11, Version::HTTP_2),
            (Some(Speaks::Http2), Version::HTTP_10, Version::HTTP_2),
        ];
        for (port_speaks, client, spoken) in cases {
            assert_eq!(Speaks::version(port_speaks, client), spoken, "{port_speaks:?} {client:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_asked_to_close_is_cut_only_after_a_second_idle_period() {
        let (_signal, watch) = drain::channel();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let idle = Duration::from_millis(300);
        let started = Instant::now();
        let never = std::future::pending::<Result<(), std::io::Error>>();
        let ask = |_: Pin<&mut _>| {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        };
        let cut = drive(never, ask, Activity::new(), idle, None, watch).await;
        let took = started.elapsed();
        assert!(matches!(cut, Err(Error::Io(ref e)) if e.kind() == std::io::ErrorKind::TimedOut), "{cut:?}");
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1, "asked to close once");
        let early = idle * 2 - Duration::from_millis(30);
        assert!(took >= early && took < idle * 2 + Duration::from_secs(1), "cut after {took:?}");
    }

    /// Every key in one bucket: a lookup can only tell keys apart by comparing them.
    #[derive(Default)]
    struct Collide;

    impl std::hash::Hasher for Collide {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn a_borrowed_peer_key_finds_the_owned_one() {
        let (addr, identity) = (SocketAddr::from(([127, 0, 0, 2], 4143)), "echo.shop.serviceaccount");
        // It hashes as the owned key does.
        let mut peers: hashbrown::HashMap<(SocketAddr, Box<str>), u8> = hashbrown::HashMap::default();
        peers.insert((addr, identity.into()), 1);
        assert_eq!(peers.get(&PeerKey(addr, identity)), Some(&1));
        // And it equals only that key.
        type Colliding = hashbrown::HashMap<(SocketAddr, Box<str>), u8, std::hash::BuildHasherDefault<Collide>>;
        let mut peers = Colliding::default();
        peers.insert((addr, identity.into()), 1);
        peers.insert((addr, "echo.shop".into()), 2);
        peers.insert((SocketAddr::from(([127, 0, 0, 2], 4144)), identity.into()), 3);
        assert_eq!(peers.get(&PeerKey(addr, identity)), Some(&1));
        assert_eq!(peers.get(&PeerKey(addr, "echo.shop")), Some(&2));
        assert_eq!(peers.get(&PeerKey(SocketAddr::from(([127, 0, 0, 2], 4144)), identity)), Some(&3));
        assert_eq!(peers.get(&PeerKey(SocketAddr::from(([127, 0, 0, 3], 4143)), identity)), None);
    }

    #[test]
    fn connection_headers_and_the_headers_they_name_are_removed() {
        let mut headers = http::HeaderMap::new();
        headers.append(http::header::CONNECTION, HeaderValue::from_static("keep-alive, x-hop"));
        headers.append(http::header::CONNECTION, HeaderValue::from_static("meshkeep-target-port"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(TARGET_PORT_HEADER, HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_connection_headers(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"], "every Connection line and what each names is gone");
    }

    #[test]
    fn a_request_is_counted_on_the_same_handle_as_the_last_one_for_its_service() {
        let metrics = HttpMetrics::default();
        let first = metrics.request("outbound", "web.shop.svc.cluster.local:80", "true");
        let again = metrics.request("outbound", "web.shop.svc.cluster.local:80", "true");
        // Found by the borrowed labels (they hash as `RequestLabels` does), not built again.
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &metrics.request("inbound", "web.shop.svc.cluster.local:80", "true")));
        assert!(!Arc::ptr_eq(&first, &metrics.request("outbound", "web.shop.svc.cluster.local:80", "no_identity")));
        let now = Instant::now();
        first.record((&Method::GET, "/"), StatusCode::OK, now, now);
        again.record((&Method::GET, "/"), StatusCode::BAD_GATEWAY, now, now);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let labels = "direction=\"outbound\",authority=\"web.shop.svc.cluster.local:80\",tls=\"true\"";
        assert!(text.contains(&format!("request_total{{{labels}}} 2\n")), "{text}");
        for (code, class) in [(200, "success"), (502, "failure")] {
            let line = format!("response_total{{{labels},status_code=\"{code}\",classification=\"{class}\"}} 1\n");
            assert!(text.contains(&line), "{line}{text}");
        }
    }
}
