//! The admin HTTP endpoint: /live, /ready, /metrics, /status, /config, /resolve and the golden
//! metrics (/api/stat, /api/top) for operators, orchestrators and the CLI; and the dashboard
//! at /, one page with no external assets.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::discovery::{self, Lookup};
use crate::drain;
use crate::readiness::Readiness;
use crate::status::{self, ProcessInfo};
use crate::store::Snapshots;

/// At most this many admin connections are served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request heads larger than this are refused.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The dashboard: HTML, CSS and script in one file, nothing fetched from elsewhere.
const DASHBOARD: &str = include_str!("admin/dashboard.html");

/// What the admin endpoint reports on.
#[derive(Debug)]
pub struct Admin {
    readiness: Arc<Readiness>,
    registry: Registry,
    state: Option<State>,
}

/// The serving state behind /status and /resolve.
#[derive(Debug)]
pub struct State {
    pub snapshots: Snapshots,
    pub settings: discovery::Settings,
    /// The static parts of the status report; readiness and store size are filled per request.
    pub process: ProcessInfo,
    pub identity: Option<tokio::sync::watch::Receiver<crate::identity::manager::IdentityStatus>>,
    /// The effective configuration as JSON. It holds paths to secrets, never their contents.
    pub config_json: String,
    /// The proxy's golden metrics, when the proxy runs.
    pub golden: Option<Arc<crate::proxy::stats::Golden>>,
    /// The proxy's balancer, when the proxy runs.
    pub balancer: Option<Arc<crate::proxy::balance::Balancer>>,
}

impl Admin {
    pub fn new(readiness: Arc<Readiness>, registry: Registry, state: Option<State>) -> Self {
        Self { readiness, registry, state }
    }

    /// Answers one request. Only GET and HEAD are served.
    pub fn handle<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD are served\n");
            response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match request.uri().path() {
            "/" => {
                let mut response = text(StatusCode::OK, DASHBOARD);
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
                response
            }
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => {
                let pending = self.readiness.pending();
                if pending.is_empty() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: waiting for {}\n", pending.join(", ")))
                }
            }
            "/metrics" => {
                let mut response = text(StatusCode::OK, crate::metrics::encode(&self.registry));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
                response
            }
            "/status" => match &self.state {
                Some(state) => {
                    let mut process = state.process.clone();
                    process.pending = self.readiness.pending().iter().map(|p| (*p).to_owned()).collect();
                    process.ready = process.pending.is_empty();
                    process.store_size_bytes = std::fs::metadata(&process.store_path).map_or(0, |m| m.len());
                    let snapshot = state.snapshots.borrow().clone();
                    let mut report = status::report(&snapshot, process, std::time::SystemTime::now());
                    report.identity = state.identity.as_ref().map(|rx| rx.borrow().clone());
                    json(&report)
                }
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no state yet\n"),
            },
            "/resolve" => match &self.state {
                Some(state) => resolve(state, request.uri().query().unwrap_or_default()),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no state yet\n"),
            },
            "/config" => match &self.state {
                Some(state) => {
                    let mut response = text(StatusCode::OK, state.config_json.clone());
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
                    response
                }
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no state yet\n"),
            },
            "/api/endpoints" => match &self.state {
                Some(state) => endpoints(state, request.uri().query().unwrap_or_default()),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no state yet\n"),
            },
            "/api/stat" | "/api/top" => {
                let golden = self.state.as_ref().and_then(|s| s.golden.as_ref());
                let rows = match golden {
                    Some(golden) if request.uri().path() == "/api/stat" => golden.services(),
                    Some(golden) => golden.routes(),
                    None => Vec::new(),
                };
                json(&rows)
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /, /live, /ready, /metrics, /status, /config, /api/stat, /api/top or /resolve?name=\n",
            ),
        }
    }
}

/// `/resolve?name=api.shop` or `/resolve?addr=10.0.0.1:80`.
fn resolve(state: &State, query: &str) -> Response<Full<Bytes>> {
    let snapshot = state.snapshots.borrow().clone();
    let param =
        |key: &str| query.split('&').find_map(|pair| pair.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')));
    let lookup: Lookup = if let Some(name) = param("name") {
        discovery::resolve_name(&snapshot, &state.settings, &percent_decode(name))
    } else if let Some(addr) = param("addr") {
        match percent_decode(addr).parse() {
            Ok(addr) => discovery::resolve_addr(&snapshot, &state.settings, addr),
            Err(_) => return text(StatusCode::BAD_REQUEST, "addr must be IP:PORT\n"),
        }
    } else {
        return text(StatusCode::BAD_REQUEST, "use /resolve?name=NAME or /resolve?addr=IP:PORT\n");
    };
    json(&lookup)
}

/// One endpoint of a service as `meshkeep endpoints` shows it: discovery's view and the
/// balancer's.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct EndpointRow {
    pub authority: String,
    pub addr: String,
    pub ready: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub identity: Option<String>,
    /// Share of the service's requests this endpoint received.
    pub weight: f64,
    pub ewma_ms: Option<f64>,
    pub pending: u32,
    /// `active`, `ejected for Nms`, `probing`, or `unused` (no request yet).
    pub state: String,
    pub requests: u64,
    pub failures: u64,
}

/// `/api/endpoints?service=api.shop`: each endpoint of each port of the service.
fn endpoints(state: &State, query: &str) -> Response<Full<Bytes>> {
    let Some(name) = query.split('&').find_map(|p| p.strip_prefix("service=")).map(percent_decode) else {
        return text(StatusCode::BAD_REQUEST, "use /api/endpoints?service=NAME\n");
    };
    let snapshot = state.snapshots.borrow().clone();
    let resolved = match discovery::resolve_name(&snapshot, &state.settings, &name) {
        Lookup::Found(resolved) => resolved,
        other => return json(&other),
    };
    let mut rows = Vec::new();
    for port in &resolved.ports {
        let authority = format!("{}:{}", resolved.fqdn, port.port);
        let reports = state.balancer.as_ref().map(|b| b.report(&authority)).unwrap_or_default();
        let total: u64 = reports.iter().map(|r| r.requests).sum();
        for endpoint in resolved.endpoints.iter().flatten() {
            let Some(ip) = endpoint.addresses.first() else { continue };
            let report = reports.iter().find(|r| r.addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip() == *ip));
            rows.push(EndpointRow {
                authority: authority.clone(),
                addr: report.map_or_else(|| ip.to_string(), |r| r.addr.clone()),
                ready: endpoint.ready,
                node: endpoint.node.clone(),
                zone: endpoint.zone.clone(),
                identity: endpoint.identity.clone(),
                weight: report.map_or(0.0, |r| if total == 0 { 0.0 } else { r.requests as f64 / total as f64 }),
                ewma_ms: report.map(|r| r.ewma_ms),
                pending: report.map_or(0, |r| r.pending),
                state: report.map_or_else(|| "unused".to_owned(), |r| r.state.clone()),
                requests: report.map_or(0, |r| r.requests),
                failures: report.map_or(0, |r| r.failures),
            });
        }
    }
    json(&rows)
}

/// Decodes %XX escapes; malformed escapes are kept as they are.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot render: {e}\n")),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Serves the admin endpoint until the drain starts, then lets open connections finish.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, drain: drain::Watch) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = drain.signaled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::debug!("admin: connection limit reached, closing a new connection");
            continue;
        };
        let admin = Arc::clone(&admin);
        let drain = drain.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: Request<Incoming>| {
                let response = admin.handle(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES);
            builder.http2().max_header_list_size(MAX_HEAD_BYTES as u32).max_concurrent_streams(16);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = drain.signaled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin: connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn get(admin: &Admin, method: Method, path: &str) -> (StatusCode, String) {
        let request = Request::builder().method(method).uri(path).body(()).expect("request");
        let response = admin.handle(&request);
        let status = response.status();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8(body.to_vec()).expect("utf-8"))
    }

    #[tokio::test]
    async fn ready_reports_pending_gates_until_they_open() {
        let readiness = Readiness::new();
        let gate = readiness.gate("listeners");
        let admin = Admin::new(Arc::clone(&readiness), Registry::default(), None);
        let (status, body) = get(&admin, Method::GET, "/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("listeners"), "{body}");
        gate.open();
        assert_eq!(get(&admin, Method::GET, "/ready").await.0, StatusCode::OK);
        assert_eq!(get(&admin, Method::GET, "/live").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_are_refused() {
        let admin = Admin::new(Readiness::new(), Registry::default(), None);
        assert_eq!(get(&admin, Method::GET, "/nope").await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(&admin, Method::POST, "/live").await.0, StatusCode::METHOD_NOT_ALLOWED);
    }
}
