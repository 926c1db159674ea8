//! HTTP through the proxy: requests are balanced one by one, and between two boxes every
//! request (HTTP/1 or HTTP/2 from the client) rides one pooled HTTP/2 connection over mTLS,
//! marked with its original version and target port so the peer can restore both.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use super::tcp::{Activity, Counted};
use super::transport::Header;
use super::{Error, Proxy, connect};
use crate::drain;

/// Request header naming the port on the peer a request is for.
pub const TARGET_PORT_HEADER: &str = "meshkeep-target-port";
/// Request header carrying the client's HTTP version across the HTTP/2 hop.
pub const ORIGINAL_VERSION_HEADER: &str = "meshkeep-original-version";
/// HTTP/2 PING interval on connections to peers while requests are in flight: a peer that stops
/// answering is found out and dropped (hyper's keep-alive timeout of 20 s applies). Servers send
/// no pings: an idle connection is closed by the idle timeout instead.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Response header saying why the proxy answered itself.
pub const ERROR_HEADER: &str = "meshkeep-error";

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn boxed<B>(body: B) -> Body
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
    pub golden: Arc<super::stats::Golden>,
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
            golden: Arc::default(),
        }
    }
}

impl HttpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("request", "HTTP requests received", self.requests.clone());
        registry.register("response", "HTTP responses sent", self.responses.clone());
        registry.register("response_latency_ms", "Time to response headers, in milliseconds", self.latency.clone());
    }

    fn record(&self, labels: &RequestLabels, route: (&Method, &str), status: StatusCode, started: Instant) {
        let failure = status.is_server_error();
        let classification = if failure { "failure" } else { "success" };
        self.responses
            .get_or_create(&ResponseLabels {
                direction: labels.direction,
                authority: labels.authority.clone(),
                tls: labels.tls,
                status_code: status.as_u16(),
                classification,
            })
            .inc();
        let elapsed = started.elapsed();
        self.latency.get_or_create(labels).observe(elapsed.as_secs_f64() * 1000.0);
        self.golden.record(labels.direction, &labels.authority, route.0.as_str(), route.1, failure, elapsed);
    }
}

/// Pooled HTTP/2 connections to peers, by peer address and identity.
#[derive(Default)]
pub struct PeerPool {
    peers: Mutex<HashMap<(SocketAddr, String), SendRequest<Body>>>,
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool").finish_non_exhaustive()
    }
}

/// Plain HTTP clients for unmeshed and unknown destinations.
#[derive(Debug, Clone)]
pub struct PlainClients {
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
}

impl PlainClients {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(3)));
        let http1 = Client::builder(TokioExecutor::new()).pool_timer(TokioTimer::new()).build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new()).http2_only(true).build(connector);
        Self { http1, http2 }
    }

    async fn send(&self, version: Version, request: Request<Body>) -> Result<Response<Incoming>, String> {
        let client = if version == Version::HTTP_2 { &self.http2 } else { &self.http1 };
        client.request(request).await.map_err(|e| e.to_string())
    }
}

impl Default for PlainClients {
    fn default() -> Self {
        Self::new()
    }
}

/// Where an outbound HTTP request goes, decided per request.
pub enum Route {
    Meshed { peer: SocketAddr, identity: String, target_port: u16, authority: String },
    Plain { addr: SocketAddr, authority: String },
}

/// Runs an HTTP server connection to its end. It is closed gracefully (requests in flight
/// finish, then the connection closes) once nothing has moved on it for `idle`, or when the
/// drain starts.
async fn drive<C, E>(
    connection: C,
    shutdown: impl Fn(Pin<&mut C>),
    activity: Activity,
    idle: Duration,
    drain: drain::Watch,
) -> Result<(), Error>
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                return result.map_err(|e| Error::Io(std::io::Error::other(e.to_string())));
            }
            () = activity.idle_for(idle), if !closing => {
                closing = true;
                shutdown(connection.as_mut());
            }
            () = drain.signaled(), if !closing => {
                closing = true;
                shutdown(connection.as_mut());
            }
        }
    }
}

/// Serves HTTP/1 and HTTP/2 from a local client; `route` picks a destination for each request.
pub async fn serve_outbound<R>(
    proxy: Arc<Proxy>,
    client: Counted<tokio::net::TcpStream>,
    route: R,
    drain: drain::Watch,
) -> Result<(), Error>
where
    R: Fn(&Proxy) -> Result<Route, Error> + Send + Sync + 'static,
{
    let (activity, idle, header_timeout) = (client.activity(), proxy.http_idle_timeout, proxy.header_read_timeout);
    let route = Arc::new(route);
    let service = service_fn(move |request: Request<Incoming>| {
        let proxy = Arc::clone(&proxy);
        let route = Arc::clone(&route);
        async move { Ok::<_, Infallible>(outbound_request(&proxy, route(&proxy), request).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(64 * 1024);
    builder.http2().max_header_list_size(64 * 1024);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    drive(connection, |c| c.graceful_shutdown(), activity, idle, drain).await
}

async fn outbound_request(
    proxy: &Proxy,
    route: Result<Route, Error>,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let route = match route {
        Ok(route) => route,
        Err(e) => {
            proxy.metrics.error("outbound", e.reason());
            let status = if matches!(e, Error::NoEndpoint(_) | Error::EndpointsUnknown(_)) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_GATEWAY
            };
            return empty_with(status, &e.to_string());
        }
    };
    let (tls, authority) = match &route {
        Route::Meshed { authority, .. } => ("true", authority.clone()),
        Route::Plain { authority, .. } => ("no_identity", authority.clone()),
    };
    let labels = RequestLabels { direction: "outbound", authority, tls };
    proxy.http.requests.get_or_create(&labels).inc();
    let version = request.version();
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(ToString::to_string))
        .unwrap_or_else(|| labels.authority.clone());
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let method = request.method().clone();
    let result = match route {
        Route::Meshed { peer, identity, target_port, authority } => {
            let headers = request.headers_mut();
            headers.insert(TARGET_PORT_HEADER, HeaderValue::from(target_port));
            headers.insert(ORIGINAL_VERSION_HEADER, HeaderValue::from_static(version_name(version)));
            // Connection-specific headers have no place in HTTP/2.
            for name in ["connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"] {
                headers.remove(name);
            }
            if headers.get(http::header::TE).is_some_and(|te| te != "trailers") {
                headers.remove(http::header::TE);
            }
            let (mut parts, body) = request.into_parts();
            parts.version = Version::HTTP_2;
            parts.uri = absolute(&host, &path);
            let request = Request::from_parts(parts, boxed(body));
            send_to_peer(proxy, peer, &identity, target_port, &authority, request).await
        }
        Route::Plain { addr, .. } => {
            let (mut parts, body) = request.into_parts();
            parts.uri = absolute(&addr.to_string(), &path);
            if !parts.headers.contains_key(http::header::HOST)
                && version != Version::HTTP_2
                && let Ok(value) = HeaderValue::from_str(&host)
            {
                parts.headers.insert(http::header::HOST, value);
            }
            proxy.plain.send(version, Request::from_parts(parts, boxed(body))).await
        }
    };
    let response = match result {
        Ok(response) => response.map(boxed),
        Err(reason) => {
            proxy.metrics.error("outbound", "http");
            empty_with(StatusCode::BAD_GATEWAY, &reason)
        }
    };
    proxy.http.record(&labels, (&method, &path), response.status(), started);
    response
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

fn absolute(authority: &str, path: &str) -> Uri {
    format!("http://{authority}{path}").parse().unwrap_or_else(|_| Uri::from_static("http://invalid/"))
}

/// Sends over the pooled HTTP/2 connection to a peer, opening it (mTLS + header) if needed.
async fn send_to_peer(
    proxy: &Proxy,
    peer: SocketAddr,
    identity: &str,
    target_port: u16,
    authority: &str,
    request: Request<Body>,
) -> Result<Response<Incoming>, String> {
    let key = (peer, identity.to_owned());
    let mut sender = {
        let mut peers = proxy.peers.peers.lock().await;
        match peers.get(&key).filter(|s| !s.is_closed()) {
            Some(sender) => sender.clone(),
            None => {
                let sender = open_peer(proxy, peer, identity, target_port, authority).await.map_err(|e| {
                    proxy.metrics.error("outbound", e.reason());
                    e.to_string()
                })?;
                peers.insert(key, sender.clone());
                sender
            }
        }
    };
    sender.ready().await.map_err(|e| e.to_string())?;
    sender.send_request(request).await.map_err(|e| e.to_string())
}

async fn open_peer(
    proxy: &Proxy,
    peer: SocketAddr,
    identity: &str,
    target_port: u16,
    authority: &str,
) -> Result<SendRequest<Body>, Error> {
    let tls = proxy.current_tls().ok_or(Error::NoCertificate)?;
    let server_name = ServerName::try_from(identity.to_owned())
        .map_err(|e| Error::Tls { peer: identity.to_owned(), reason: e.to_string() })?;
    let tcp = connect(peer, proxy.connect_timeout).await?;
    let mut stream = tokio::time::timeout(
        proxy.connect_timeout,
        TlsConnector::from(Arc::clone(&tls.client)).connect(server_name, tcp),
    )
    .await
    .map_err(|_| Error::Timeout("TLS handshake with the peer"))?
    .map_err(|e| Error::Tls { peer: format!("{identity} at {peer}"), reason: e.to_string() })?;
    let header =
        Header { target_port, protocol: super::detect::Protocol::Http2, authority: Some(authority.to_owned()) };
    stream.write_all(&header.encode()).await?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Tls { peer: format!("{identity} at {peer}"), reason: format!("HTTP/2: {e}") })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "peer HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

/// Serves the HTTP/2 side of a peer connection: each request goes to its target port on
/// `proxy.inbound_target`, in the version the original client used.
/// `authority` (from the transport header) labels the metrics, so a client's Host header cannot
/// grow their cardinality.
pub async fn serve_inbound<S>(
    proxy: Arc<Proxy>,
    session: Counted<S>,
    default_port: u16,
    authority: String,
    drain: drain::Watch,
) -> Result<(), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (activity, idle) = (session.activity(), proxy.http_idle_timeout);
    let service = service_fn(move |request: Request<Incoming>| {
        let proxy = Arc::clone(&proxy);
        let authority = authority.clone();
        async move { Ok::<_, Infallible>(inbound_request(&proxy, request, default_port, &authority).await) }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024)
        .serve_connection(TokioIo::new(session), service);
    drive(connection, |c| c.graceful_shutdown(), activity, idle, drain).await
}

async fn inbound_request(
    proxy: &Proxy,
    mut request: Request<Incoming>,
    default_port: u16,
    label: &str,
) -> Response<Body> {
    let started = Instant::now();
    let headers = request.headers_mut();
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
    let authority = request.uri().authority().map(ToString::to_string).unwrap_or_default();
    let labels = RequestLabels { direction: "inbound", authority: label.to_owned(), tls: "true" };
    proxy.http.requests.get_or_create(&labels).inc();
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let method = parts.method.clone();
    let target = SocketAddr::new(proxy.inbound_target, port);
    parts.uri = absolute(&target.to_string(), &path);
    if version != Version::HTTP_2
        && !parts.headers.contains_key(http::header::HOST)
        && !authority.is_empty()
        && let Ok(value) = HeaderValue::from_str(&authority)
    {
        parts.headers.insert(http::header::HOST, value);
    }
    parts.version = if version == Version::HTTP_2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let response = match proxy.plain.send(version, Request::from_parts(parts, boxed(body))).await {
        Ok(response) => response.map(boxed),
        Err(reason) => {
            proxy.metrics.error("inbound", "http");
            empty_with(StatusCode::BAD_GATEWAY, &reason)
        }
    };
    proxy.http.record(&labels, (&method, &path), response.status(), started);
    response
}
