//! A fake Kubernetes API server that speaks the real HTTP list/watch protocol to kube-rs.
//!
//! It serves Services, Pods, Secrets, ConfigMaps, Namespaces, EndpointSlices and the SMI and
//! Gateway API custom resources meshkeep reads. Lists paginate with consistent snapshots and
//! continue tokens; watches replay the event log from a resourceVersion and then stream live
//! events, one JSON event per line. Tests drive it synchronously: the server runs on its own
//! tokio runtime on a background thread, and every method locks one shared state.
//!
//! Beyond plain serving it can forget history (`compact`, which makes old resourceVersions
//! and continue tokens answer 410), hide a resource type like a missing CRD (`set_served`),
//! take the link down and up on the same port (`down`/`up`), inject faults into the next
//! matching requests (`fault`, `fault_lists`; `FOREVER` until `clear_faults`), and break open
//! watch streams mid-stream (`malformed_event`, `oversized_event`).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Sleep;

/// The bearer token the fake accepts; `write_kubeconfig` configures clients with it.
pub const TOKEN: &str = "test-token";

/// The value of the global resourceVersion counter before the first write.
const INITIAL_RESOURCE_VERSION: u64 = 1000;

/// How long a watch lasts when the client sends no `timeoutSeconds` (the apiserver's minimum
/// request timeout).
const DEFAULT_WATCH_TIMEOUT_SECS: u64 = 1800;

/// Upper bound on a client-requested watch timeout, so a silly value cannot overflow a timer.
const MAX_WATCH_TIMEOUT_SECS: u64 = 86_400;

/// How much a truncated response's Content-Length overstates the bytes actually sent.
const TRUNCATED_SHORTFALL: usize = 4096;

/// How long a truncated response waits after its partial body before closing, so the partial
/// bytes are flushed to the client first.
const TRUNCATE_PAUSE: Duration = Duration::from_millis(100);

/// The apiserver's message for a 404 on a path or resource type it does not serve.
const NOT_FOUND_MESSAGE: &str = "the server could not find the requested resource";

/// The apiserver's message for a continue token from before a compaction.
const EXPIRED_CONTINUE_MESSAGE: &str = "The provided continue parameter is too old to display a consistent list \
                                        result. You can start a new list without the continue parameter.";

/// The body of a `Fault::Malformed` response: starts like a list, then stops being JSON.
const MALFORMED_BODY: &[u8] =
    b"{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{\"metadata\":{\"name\":,,}} <html>\n";

/// A watch event line that starts like an event, then stops being JSON.
const MALFORMED_EVENT: &[u8] = b"{\"type\":\"MODIFIED\",\"object\":{\"metadata\":{\"name\":,,}} <html>\n";

/// `times` for a fault that never wears off (until `clear_faults`).
pub const FOREVER: usize = usize::MAX;

/// How many bytes of its body a `Fault::Trickle` response sends at a time.
const TRICKLE_BYTES: usize = 8;

/// The padding of a `Fault::Enormous` response, streamed this much at a time.
static PADDING: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// Decoded query parameters of a request.
type Query = BTreeMap<String, String>;

/// One resource type the fake serves.
#[derive(Debug)]
struct ResourceType {
    /// API group; empty for the core group.
    group: &'static str,
    /// API version within the group.
    version: &'static str,
    /// Object kind, e.g. `Service`.
    kind: &'static str,
    /// Lower-case plural used in paths, e.g. `services`.
    plural: &'static str,
    /// Whether objects live in namespaces.
    namespaced: bool,
}

impl ResourceType {
    /// Builds a table entry.
    const fn new(
        group: &'static str,
        version: &'static str,
        kind: &'static str,
        plural: &'static str,
        namespaced: bool,
    ) -> Self {
        ResourceType { group, version, kind, plural, namespaced }
    }

    /// `v1` for the core group, `group/version` otherwise.
    fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }

    /// The name the apiserver uses in messages: `services` or `trafficsplits.split.smi-spec.io`.
    fn resource_name(&self) -> String {
        if self.group.is_empty() { self.plural.to_owned() } else { format!("{}.{}", self.plural, self.group) }
    }
}

/// Every resource type the fake serves.
static TYPES: &[ResourceType] = &[
    ResourceType::new("", "v1", "Service", "services", true),
    ResourceType::new("", "v1", "Pod", "pods", true),
    ResourceType::new("", "v1", "Secret", "secrets", true),
    ResourceType::new("", "v1", "ConfigMap", "configmaps", true),
    ResourceType::new("", "v1", "Namespace", "namespaces", false),
    ResourceType::new("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true),
    ResourceType::new("split.smi-spec.io", "v1alpha4", "TrafficSplit", "trafficsplits", true),
    ResourceType::new("access.smi-spec.io", "v1alpha3", "TrafficTarget", "traffictargets", true),
    ResourceType::new("specs.smi-spec.io", "v1alpha4", "HTTPRouteGroup", "httproutegroups", true),
    ResourceType::new("specs.smi-spec.io", "v1alpha4", "TCPRoute", "tcproutes", true),
    ResourceType::new("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes", true),
];

/// Finds a served type by `apiVersion` and `kind`.
fn find_type(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    TYPES.iter().find(|rt| rt.group == group && rt.version == version && rt.kind == kind)
}

/// A fault injected into the next matching requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and a proper metav1 Status body (401, 403, 500, 503, 410...).
    Status(u16),
    /// Accept and send headers of a 200 JSON response but never send a body (hang) until the client gives up.
    Hang,
    /// Answer normally, but send the body `TRICKLE_BYTES` at a time, one piece per this long
    /// (the Content-Length is the whole body's). Watch streams are not slowed.
    Trickle(Duration),
    /// Send a 200 with Content-Length larger than the body, then close: a truncated response.
    Truncate,
    /// Send 200 with a body that is not valid JSON.
    Malformed,
    /// Delay the answer (status line and headers included) by this long, then answer normally.
    Slow(Duration),
    /// A 200 JSON list response whose body is `n` bytes of padding inside a huge string field (enormous response):
    /// the real list (when the path names a collection) plus the padding, streamed with chunked
    /// encoding (no Content-Length), generated as it is sent.
    Enormous(usize),
}

/// A request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Percent-decoded query parameters (the last value wins for repeated keys).
    pub query: BTreeMap<String, String>,
    /// When the request arrived.
    pub at: std::time::Instant,
}

impl Request {
    /// Whether this was a watch request (`watch=true` or `watch=1`).
    pub fn is_watch(&self) -> bool {
        is_watch(&self.query)
    }
}

/// A fake Kubernetes API server on a loopback port; dropping it stops the server.
pub struct FakeKube {
    /// Everything the server knows, shared with the serving tasks.
    state: Arc<Mutex<State>>,
    /// The address served, kept across `down`/`up`.
    addr: SocketAddr,
    /// Handle to the runtime on the background thread.
    runtime: tokio::runtime::Handle,
    /// The running accept loop; `None` while the link is down.
    server: Mutex<Option<Server>>,
    /// Tells the background thread to shut its runtime down.
    shutdown: Option<oneshot::Sender<()>>,
    /// The background thread running the runtime.
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Control of one running accept loop.
struct Server {
    /// Asks the accept loop to close the listener and drop every connection.
    stop: oneshot::Sender<()>,
    /// Signalled once the listener and all connections are gone.
    done: std::sync::mpsc::Receiver<()>,
}

impl FakeKube {
    /// Binds 127.0.0.1:0 and serves on a background thread.
    pub fn start() -> FakeKube {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Binds a free port on `ip` (0.0.0.0 for every address of this network namespace).
    pub fn start_on(ip: std::net::IpAddr) -> FakeKube {
        let listener = std::net::TcpListener::bind((ip, 0)).expect("bind the fake API server");
        let addr = listener.local_addr().expect("fake API server address");
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-kube".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build the fake API server runtime");
                let _ = handle_tx.send(runtime.handle().clone());
                runtime.block_on(async {
                    let _ = shutdown_rx.await;
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("spawn the fake API server thread");
        let runtime = handle_rx.recv().expect("fake API server runtime handle");
        let kube = FakeKube {
            state: Arc::new(Mutex::new(State::new(addr))),
            addr,
            runtime,
            server: Mutex::new(None),
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        };
        let server = kube.spawn_server(listener);
        *kube.lock_server() = Some(server);
        kube
    }

    /// The address the server is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `fake-kube.kubeconfig` into `dir`: cluster server `url()`, bearer token `test-token`,
    /// current context set. Returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("fake-kube.kubeconfig");
        let url = self.url();
        let text = format!(
            r#"apiVersion: v1
kind: Config
clusters:
  - name: fake-kube
    cluster:
      server: {url}
users:
  - name: fake-kube-user
    user:
      token: {TOKEN}
contexts:
  - name: fake-kube
    context:
      cluster: fake-kube
      user: fake-kube-user
      namespace: default
current-context: fake-kube
"#
        );
        std::fs::write(&path, text).expect("write the fake API server kubeconfig");
        path
    }

    /// Create or update an object given as full JSON (apiVersion, kind, metadata.name, and
    /// metadata.namespace for namespaced kinds, defaulting to `default`). Assigns
    /// metadata.resourceVersion, a uid stable for the object's lifetime, creationTimestamp on
    /// create, and a generation bumped when anything outside metadata and status changes.
    /// Emits ADDED or MODIFIED to watchers (every call is a write, even if nothing changed).
    /// Returns the assigned resourceVersion.
    pub fn apply(&self, object: Value) -> u64 {
        let api_version =
            object.get("apiVersion").and_then(Value::as_str).expect("apply: the object needs an apiVersion");
        let kind = object.get("kind").and_then(Value::as_str).expect("apply: the object needs a kind");
        let rt = find_type(api_version, kind)
            .unwrap_or_else(|| panic!("apply: the fake API server does not serve {api_version} {kind}"));
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .expect("apply: the object needs metadata.name")
            .to_owned();
        let namespace = if rt.namespaced {
            object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        self.lock().apply(rt, namespace, name, object)
    }

    /// Delete; emits DELETED (the last state with a new resourceVersion). No-op returning None
    /// if absent. `namespace` is ignored for cluster-scoped kinds.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<u64> {
        let rt = find_type(api_version, kind)
            .unwrap_or_else(|| panic!("delete: the fake API server does not serve {api_version} {kind}"));
        self.lock().delete(rt, namespace, name)
    }

    /// Forget watch history. The resourceVersion moves on by one and becomes the compaction
    /// point: any watch from an older resourceVersion gets a 410 Gone ERROR event, and continue
    /// tokens issued before now answer HTTP 410. Also ends open watch streams, so clients must
    /// re-watch, see 410 and relist.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.resource_version += 1;
        state.compacted = state.resource_version;
        state.events.clear();
        state.snapshots.clear();
        state.watches.clear();
    }

    /// Whether a resource type (by plural, e.g. "trafficsplits") is served; unserved types
    /// answer 404 like a missing CRD and are left out of discovery, and their open watches end.
    /// Stored objects are kept. All types are served by default.
    pub fn set_served(&self, plural: &str, served: bool) {
        let rt = TYPES
            .iter()
            .find(|rt| rt.plural == plural)
            .unwrap_or_else(|| panic!("set_served: the fake API server has no resource type {plural:?}"));
        let mut state = self.lock();
        if served {
            state.unserved.remove(rt.plural);
        } else {
            state.unserved.insert(rt.plural);
            state.watches.retain(|_, watch| watch.rt.plural != rt.plural);
        }
    }

    /// Simulates the link being down: closes the listener (connections are refused) and drops
    /// every open connection and watch stream without an HTTP-level goodbye. Returns once they
    /// are gone. No-op if already down.
    pub fn down(&self) {
        let server = self.lock_server().take();
        if let Some(server) = server {
            let _ = server.stop.send(());
            let _ = server.done.recv_timeout(Duration::from_secs(10));
        }
        self.lock().watches.clear();
    }

    /// Brings the link back up on the SAME port. No-op if already up.
    pub fn up(&self) {
        let mut server = self.lock_server();
        if server.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("rebind the fake API server on {}: {e}", self.addr),
            }
        };
        *server = Some(self.spawn_server(listener));
    }

    /// Queue a fault for the next `times` requests whose path-and-query (raw, as sent) contains
    /// `path_contains` ("" matches any). Queued faults apply in the order they were added.
    /// `FOREVER` keeps the fault until `clear_faults`.
    pub fn fault(&self, path_contains: &str, fault: Fault, times: usize) {
        self.queue_fault(path_contains, fault, times, false);
    }

    /// Like `fault`, but only for requests that are not watches (lists, gets, discovery).
    pub fn fault_lists(&self, path_contains: &str, fault: Fault, times: usize) {
        self.queue_fault(path_contains, fault, times, true);
    }

    /// Drops every queued fault, `FOREVER` ones included. Requests already being answered
    /// (a `Slow` or `Hang` in progress) carry on.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Queues a fault (see `fault`).
    fn queue_fault(&self, path_contains: &str, fault: Fault, times: usize, lists_only: bool) {
        if times == 0 {
            return;
        }
        self.lock().faults.push(QueuedFault { pattern: path_contains.to_owned(), fault, remaining: times, lists_only });
    }

    /// Sends a line that is not JSON to every open watch of `plural` (e.g. "services"), in the
    /// middle of its stream, which then carries on. Returns how many watches got it.
    pub fn malformed_event(&self, plural: &str) -> usize {
        self.send_raw_line(plural, Bytes::from_static(MALFORMED_EVENT))
    }

    /// Sends one well-formed BOOKMARK event of more than `size` bytes (a padded annotation) to
    /// every open watch of `plural`, whether or not it asked for bookmarks. Returns how many
    /// watches got it.
    pub fn oversized_event(&self, plural: &str, size: usize) -> usize {
        let rt = TYPES
            .iter()
            .find(|rt| rt.plural == plural)
            .unwrap_or_else(|| panic!("oversized_event: the fake API server has no resource type {plural:?}"));
        let rv = self.lock().resource_version;
        let metadata = json!({"resourceVersion": rv.to_string(), "annotations": {"padding": "x".repeat(size)}});
        let object = json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata});
        self.send_raw_line(plural, event_line("BOOKMARK", &object))
    }

    /// Sends a raw line to every open watch of `plural`; returns how many got it.
    fn send_raw_line(&self, plural: &str, line: Bytes) -> usize {
        let mut state = self.lock();
        let mut sent = 0;
        state.watches.retain(|_, watch| {
            if watch.rt.plural != plural {
                return true;
            }
            let open = watch.tx.send(line.clone()).is_ok();
            sent += usize::from(open);
            open
        });
        sent
    }

    /// Sends a BOOKMARK event (current resourceVersion) to every open watch that asked for bookmarks.
    pub fn bookmark(&self) {
        let mut state = self.lock();
        let rv = state.resource_version;
        state.watches.retain(|_, watch| !watch.bookmarks || watch.tx.send(bookmark_line(watch.rt, rv, false)).is_ok());
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Number of currently open watch streams.
    pub fn open_watches(&self) -> usize {
        self.lock().watches.len()
    }

    /// The shared state, tolerating a poisoned lock.
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The accept-loop control, tolerating a poisoned lock.
    fn lock_server(&self) -> MutexGuard<'_, Option<Server>> {
        self.server.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts an accept loop on `listener` in the background runtime.
    fn spawn_server(&self, listener: std::net::TcpListener) -> Server {
        listener.set_nonblocking(true).expect("make the fake API server listener non-blocking");
        let listener = {
            let _entered = self.runtime.enter();
            TcpListener::from_std(listener).expect("register the fake API server listener")
        };
        let (stop, stop_rx) = oneshot::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        self.runtime.spawn(accept_loop(listener, Arc::clone(&self.state), stop_rx, done_tx));
        Server { stop, done }
    }
}

impl Drop for FakeKube {
    /// Stops the runtime (dropping the listener and every connection) and joins its thread.
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Locks the shared state, tolerating a poisoned lock.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accepts connections until told to stop, then closes the listener and drops every connection.
async fn accept_loop(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    mut stop: oneshot::Receiver<()>,
    done: std::sync::mpsc::Sender<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&state)));
                }
                // Out of file descriptors or an aborted handshake: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
    let _ = done.send(());
}

/// Serves HTTP/1.1 (or HTTP/2 with prior knowledge) on one connection.
async fn serve_connection(stream: TcpStream, state: Arc<Mutex<State>>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(answer(state, request).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
}

/// Answers one request: records it, applies any queued fault, checks the token, then routes.
async fn answer(state: Arc<Mutex<State>>, request: hyper::Request<Incoming>) -> Response<Payload> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let raw_query = request.uri().query().unwrap_or_default().to_owned();
    let expected = format!("Bearer {TOKEN}");
    let authorized = request.headers().get(AUTHORIZATION).is_some_and(|value| value.as_bytes() == expected.as_bytes());
    drop(request);
    let query = parse_query(&raw_query);
    let target = if raw_query.is_empty() { path.clone() } else { format!("{path}?{raw_query}") };
    let record =
        Request { method: method.clone(), path: path.clone(), query: query.clone(), at: std::time::Instant::now() };
    let mut trickle = None;
    match begin(&state, record, &target) {
        Some(Fault::Slow(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::Trickle(interval)) => trickle = Some(interval),
        Some(fault) => return respond_fault(&state, fault, &path, &query),
        None => {}
    }
    let response = if !authorized {
        status_response(401, "Unauthorized", "Unauthorized")
    } else if method != "GET" {
        status_response(
            405,
            "MethodNotAllowed",
            &format!("the server does not allow this method on the requested resource: {method}"),
        )
    } else {
        route(&state, &path, &query)
    };
    match trickle {
        Some(interval) => trickled(response, interval),
        None => response,
    }
}

/// Records a request and takes the first queued fault that matches it.
fn begin(state: &Mutex<State>, record: Request, target: &str) -> Option<Fault> {
    let watch = record.is_watch();
    let mut state = lock(state);
    state.requests.push(record);
    state.take_fault(target, watch)
}

/// The same response with a complete body sent a few bytes at a time (streams are left alone).
fn trickled(response: Response<Payload>, interval: Duration) -> Response<Payload> {
    let (parts, payload) = response.into_parts();
    let payload = match payload {
        Payload::Full(Some(data)) => {
            Payload::Trickle { data, interval, next: Box::pin(tokio::time::sleep(Duration::ZERO)) }
        }
        other => other,
    };
    Response::from_parts(parts, payload)
}

/// Builds the response for an injected fault.
fn respond_fault(state: &Mutex<State>, fault: Fault, path: &str, query: &Query) -> Response<Payload> {
    lock(state).fault_response(fault, path, query)
}

/// Routes an authorised GET; watch streams get their guard here, outside the lock.
fn route(state: &Arc<Mutex<State>>, path: &str, query: &Query) -> Response<Payload> {
    let outcome = lock(state).serve(path, query);
    match outcome {
        Outcome::Done(response) => response,
        Outcome::Watch { id, rx, timeout } => respond(
            200,
            Payload::Watch {
                rx,
                deadline: Some(Box::pin(tokio::time::sleep(timeout))),
                _guard: Some(WatchGuard { state: Arc::clone(state), id }),
            },
        ),
    }
}

/// What routing produced.
enum Outcome {
    /// A complete response.
    Done(Response<Payload>),
    /// A registered watch whose stream still needs its body.
    Watch {
        /// Registration id in `State::watches`.
        id: u64,
        /// Event lines for the stream.
        rx: mpsc::UnboundedReceiver<Bytes>,
        /// When the server ends the stream.
        timeout: Duration,
    },
}

/// Where a path leads.
enum Route<'a> {
    /// `/version`
    Version,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/{group}`
    Group(&'a str),
    /// `/api/v1` or `/apis/{group}/{version}`
    Resources {
        /// API group, empty for core.
        group: &'a str,
        /// API version.
        version: &'a str,
    },
    /// A list or watch, across namespaces when `namespace` is `None`.
    Collection {
        /// The resource type.
        rt: &'static ResourceType,
        /// Namespace from the path.
        namespace: Option<&'a str>,
    },
    /// A single object.
    Object {
        /// The resource type.
        rt: &'static ResourceType,
        /// Namespace from the path, `None` for cluster-scoped kinds.
        namespace: Option<&'a str>,
        /// Object name.
        name: &'a str,
    },
    /// Nothing here.
    NotFound,
}

/// Parses a request path into a route (ignoring whether the type is served).
fn resolve(path: &str) -> Route<'_> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segments.as_slice() {
        ["version"] => return Route::Version,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["apis", group] => return Route::Group(group),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Route::NotFound,
    };
    let find = |plural: &str| TYPES.iter().find(|rt| rt.group == group && rt.version == version && rt.plural == plural);
    match rest {
        [] => Route::Resources { group, version },
        [plural] => match find(plural) {
            Some(rt) => Route::Collection { rt, namespace: None },
            None => Route::NotFound,
        },
        ["namespaces", namespace, plural] => match find(plural) {
            Some(rt) if rt.namespaced => Route::Collection { rt, namespace: Some(*namespace) },
            _ => Route::NotFound,
        },
        ["namespaces", namespace, plural, name] => match find(plural) {
            Some(rt) if rt.namespaced => Route::Object { rt, namespace: Some(*namespace), name },
            _ => Route::NotFound,
        },
        [plural, name] => match find(plural) {
            Some(rt) if !rt.namespaced => Route::Object { rt, namespace: None, name },
            _ => Route::NotFound,
        },
        _ => Route::NotFound,
    }
}

/// Whether the query asks for a watch.
fn is_watch(query: &Query) -> bool {
    matches!(query.get("watch").map(String::as_str), Some("true" | "1"))
}

/// Everything the fake server knows.
struct State {
    /// The served address, for `/api`.
    addr: SocketAddr,
    /// The global resourceVersion counter: the version of the latest write.
    resource_version: u64,
    /// The resourceVersion of the last `compact()`; older versions are gone.
    compacted: u64,
    /// Counter for object uids.
    next_uid: u64,
    /// Stored objects by plural, then by (namespace, name); cluster-scoped objects use "".
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    /// Every write since the last compaction, in resourceVersion order.
    events: Vec<LoggedEvent>,
    /// Plurals currently answering 404.
    unserved: BTreeSet<&'static str>,
    /// Faults waiting for matching requests.
    faults: Vec<QueuedFault>,
    /// Every request received.
    requests: Vec<Request>,
    /// Open watch streams by id.
    watches: BTreeMap<u64, WatchRegistration>,
    /// Next watch id.
    next_watch: u64,
    /// Paginated list snapshots by id, kept until their last page is served.
    snapshots: BTreeMap<u64, Snapshot>,
    /// Next snapshot id.
    next_snapshot: u64,
}

/// A fault waiting in the queue.
struct QueuedFault {
    /// Substring of the path-and-query to match.
    pattern: String,
    /// What to do.
    fault: Fault,
    /// How many more requests it applies to (`FOREVER`: every one).
    remaining: usize,
    /// Only requests that are not watches.
    lists_only: bool,
}

/// An open watch stream.
struct WatchRegistration {
    /// The watched resource type.
    rt: &'static ResourceType,
    /// Namespace and selectors of the watch.
    filter: Filter,
    /// Whether the client asked for bookmarks.
    bookmarks: bool,
    /// Event lines to the stream; dropping it ends the stream.
    tx: mpsc::UnboundedSender<Bytes>,
}

/// The consistent item set of a paginated list.
struct Snapshot {
    /// The listed type.
    plural: &'static str,
    /// The listed namespace.
    namespace: Option<String>,
    /// The resourceVersion the list is pinned to.
    rv: u64,
    /// Every matching item, sorted by namespace and name.
    items: Arc<Vec<Value>>,
}

/// Type of a recorded write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Deleted.
    Deleted,
}

/// A recorded write, replayed to watches that start from an older resourceVersion.
struct LoggedEvent {
    /// The resourceVersion of the write.
    rv: u64,
    /// The type written.
    rt: &'static ResourceType,
    /// What happened.
    kind: EventKind,
    /// The object after the write (for a delete: its last state with the new resourceVersion).
    object: Value,
    /// The object before an update, to turn selector transitions into ADDED/DELETED.
    previous: Option<Value>,
}

impl LoggedEvent {
    /// The watch line this event means for a watch with `filter`, if any.
    fn line_for(&self, filter: &Filter) -> Option<Bytes> {
        let matches_now = filter.matches(&self.object);
        match self.kind {
            EventKind::Added => matches_now.then(|| event_line("ADDED", &self.object)),
            EventKind::Deleted => matches_now.then(|| event_line("DELETED", &self.object)),
            EventKind::Modified => {
                let matched_before = self.previous.as_ref().is_some_and(|previous| filter.matches(previous));
                match (matched_before, matches_now) {
                    (true, true) => Some(event_line("MODIFIED", &self.object)),
                    (false, true) => Some(event_line("ADDED", &self.object)),
                    (true, false) => {
                        // Like the apiserver: the object left the selection, so it is deleted
                        // from the watcher's point of view, as its old state at the new version.
                        let mut old = self.previous.clone().unwrap_or(Value::Null);
                        set_resource_version(&mut old, self.rv);
                        Some(event_line("DELETED", &old))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

impl State {
    /// Empty state serving `addr`.
    fn new(addr: SocketAddr) -> Self {
        State {
            addr,
            resource_version: INITIAL_RESOURCE_VERSION,
            compacted: 0,
            next_uid: 0,
            objects: BTreeMap::new(),
            events: Vec::new(),
            unserved: BTreeSet::new(),
            faults: Vec::new(),
            requests: Vec::new(),
            watches: BTreeMap::new(),
            next_watch: 0,
            snapshots: BTreeMap::new(),
            next_snapshot: 0,
        }
    }

    /// Stores an object, assigning server-side metadata, and publishes ADDED or MODIFIED.
    fn apply(&mut self, rt: &'static ResourceType, namespace: String, name: String, mut object: Value) -> u64 {
        self.resource_version += 1;
        let rv = self.resource_version;
        let key = (namespace, name);
        let previous = self.objects.get(rt.plural).and_then(|objects| objects.get(&key)).cloned();
        let (uid, created, generation) = match &previous {
            Some(previous) => {
                let uid = previous.pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
                let created = previous.pointer("/metadata/creationTimestamp").cloned().unwrap_or(Value::Null);
                let generation = previous.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(1);
                let changed = without_metadata(previous) != without_metadata(&object);
                (uid, created, if changed { generation + 1 } else { generation })
            }
            None => {
                self.next_uid += 1;
                let uid = format!("fa4e0000-0000-4000-8000-{:012x}", self.next_uid);
                (Value::String(uid), Value::String(rfc3339_now()), 1)
            }
        };
        if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
            metadata.insert("uid".to_owned(), uid);
            metadata.insert("creationTimestamp".to_owned(), created);
            metadata.insert("generation".to_owned(), Value::from(generation));
            if rt.namespaced {
                metadata.insert("namespace".to_owned(), Value::String(key.0.clone()));
            } else {
                metadata.remove("namespace");
            }
        }
        self.objects.entry(rt.plural).or_default().insert(key, object.clone());
        let kind = if previous.is_some() { EventKind::Modified } else { EventKind::Added };
        self.publish(LoggedEvent { rv, rt, kind, object, previous });
        rv
    }

    /// Removes an object and publishes DELETED; `None` if it was absent.
    fn delete(&mut self, rt: &'static ResourceType, namespace: &str, name: &str) -> Option<u64> {
        let namespace = if rt.namespaced { namespace } else { "" };
        let mut object = self.objects.get_mut(rt.plural)?.remove(&(namespace.to_owned(), name.to_owned()))?;
        self.resource_version += 1;
        let rv = self.resource_version;
        set_resource_version(&mut object, rv);
        self.publish(LoggedEvent { rv, rt, kind: EventKind::Deleted, object, previous: None });
        Some(rv)
    }

    /// Sends an event to the matching open watches and records it for replay.
    fn publish(&mut self, event: LoggedEvent) {
        self.watches.retain(|_, watch| {
            if watch.rt.plural != event.rt.plural {
                return true;
            }
            match event.line_for(&watch.filter) {
                Some(line) => watch.tx.send(line).is_ok(),
                None => true,
            }
        });
        self.events.push(event);
    }

    /// Takes the first queued fault whose pattern occurs in `target` (and that applies to a
    /// watch, when `watch`).
    fn take_fault(&mut self, target: &str, watch: bool) -> Option<Fault> {
        let index = self
            .faults
            .iter()
            .position(|queued| !(watch && queued.lists_only) && target.contains(queued.pattern.as_str()))?;
        let queued = &mut self.faults[index];
        let fault = queued.fault;
        if queued.remaining != FOREVER {
            queued.remaining = queued.remaining.saturating_sub(1);
        }
        if queued.remaining == 0 {
            self.faults.remove(index);
        }
        Some(fault)
    }

    /// Whether a type is currently served.
    fn is_served(&self, rt: &ResourceType) -> bool {
        !self.unserved.contains(rt.plural)
    }

    /// The currently served types.
    fn served_types(&self) -> impl Iterator<Item = &'static ResourceType> {
        TYPES.iter().filter(|rt| !self.unserved.contains(rt.plural))
    }

    /// Stored objects of a type that match `filter`, sorted by namespace and name.
    fn matching(&self, rt: &ResourceType, filter: &Filter) -> Vec<Value> {
        self.objects
            .get(rt.plural)
            .map(|objects| objects.values().filter(|object| filter.matches(object)).cloned().collect())
            .unwrap_or_default()
    }

    /// Answers an authorised GET.
    fn serve(&mut self, path: &str, query: &Query) -> Outcome {
        let response = match resolve(path) {
            Route::Version => json_response(200, &version_value()),
            Route::CoreVersions => json_response(
                200,
                &json!({
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.addr.to_string()}],
                }),
            ),
            Route::Groups => json_response(200, &self.groups_value()),
            Route::Group(group) => match self.group_value(group) {
                Some(value) => json_response(200, &value),
                None => not_found(),
            },
            Route::Resources { group, version } => match self.resources_value(group, version) {
                Some(value) => json_response(200, &value),
                None => not_found(),
            },
            Route::Collection { rt, namespace } if self.is_served(rt) => {
                if is_watch(query) {
                    return self.watch(rt, namespace, query);
                }
                self.list(rt, namespace, query)
            }
            Route::Object { rt, namespace, name } if self.is_served(rt) => self.get_object(rt, namespace, name),
            Route::Collection { .. } | Route::Object { .. } | Route::NotFound => not_found(),
        };
        Outcome::Done(response)
    }

    /// GET of a single object.
    fn get_object(&self, rt: &ResourceType, namespace: Option<&str>, name: &str) -> Response<Payload> {
        let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
        match self.objects.get(rt.plural).and_then(|objects| objects.get(&key)) {
            Some(object) => json_response(200, object),
            None => json_response(
                404,
                &json!({
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": format!("{} \"{name}\" not found", rt.resource_name()),
                    "reason": "NotFound",
                    "details": {"name": name, "group": rt.group, "kind": rt.plural},
                    "code": 404,
                }),
            ),
        }
    }

    /// A list, paginated with `limit`/`continue` over a snapshot taken at the first page.
    fn list(&mut self, rt: &'static ResourceType, namespace: Option<&str>, query: &Query) -> Response<Payload> {
        let limit = query.get("limit").and_then(|limit| limit.parse::<usize>().ok()).filter(|&limit| limit > 0);
        let continue_token = query.get("continue").filter(|token| !token.is_empty());
        let (list_rv, id, offset, items) = if let Some(token) = continue_token {
            let Some((token_rv, id, offset)) = parse_continue(token) else {
                return status_response(400, "BadRequest", &format!("continue key is not valid: {token}"));
            };
            let Some(snapshot) = self.snapshots.get(&id) else {
                return status_response(410, "Expired", EXPIRED_CONTINUE_MESSAGE);
            };
            if snapshot.rv != token_rv || snapshot.plural != rt.plural || snapshot.namespace.as_deref() != namespace {
                return status_response(
                    400,
                    "BadRequest",
                    &format!("continue key is not valid for this list: {token}"),
                );
            }
            (snapshot.rv, id, offset, Arc::clone(&snapshot.items))
        } else {
            let exact = query.get("resourceVersionMatch").is_some_and(|m| m == "Exact");
            let requested = query.get("resourceVersion").and_then(|rv| rv.parse::<u64>().ok());
            if let Some(requested) = requested.filter(|&requested| exact && requested < self.compacted) {
                let message = format!("too old resource version: {requested} ({})", self.compacted);
                return status_response(410, "Expired", &message);
            }
            let filter = match Filter::parse(namespace, query) {
                Ok(filter) => filter,
                Err(message) => return status_response(400, "BadRequest", &message),
            };
            let items = Arc::new(self.matching(rt, &filter));
            let id = self.next_snapshot;
            self.next_snapshot += 1;
            (self.resource_version, id, 0, items)
        };
        let total = items.len();
        let start = offset.min(total);
        let end = limit.map_or(total, |limit| start.saturating_add(limit).min(total));
        let page = items[start..end].to_vec();
        let (next, remaining) = if end < total {
            self.snapshots.entry(id).or_insert_with(|| Snapshot {
                plural: rt.plural,
                namespace: namespace.map(str::to_owned),
                rv: list_rv,
                items: Arc::clone(&items),
            });
            (Some(format!("{list_rv}-{id}-{end}")), Some(total - end))
        } else {
            self.snapshots.remove(&id);
            (None, None)
        };
        json_response(200, &list_value(rt.api_version(), format!("{}List", rt.kind), list_rv, page, next, remaining))
    }

    /// Starts a watch: queues the replayed (or initial) events and registers for live ones.
    fn watch(&mut self, rt: &'static ResourceType, namespace: Option<&str>, query: &Query) -> Outcome {
        let filter = match Filter::parse(namespace, query) {
            Ok(filter) => filter,
            Err(message) => return Outcome::Done(status_response(400, "BadRequest", &message)),
        };
        let bookmarks = query.get("allowWatchBookmarks").is_some_and(|value| value == "true");
        let initial_events = query.get("sendInitialEvents").is_some_and(|value| value == "true");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|value| value.parse::<u64>().ok())
            .filter(|&seconds| seconds > 0)
            .unwrap_or(DEFAULT_WATCH_TIMEOUT_SECS)
            .min(MAX_WATCH_TIMEOUT_SECS);
        let requested = query.get("resourceVersion").map(String::as_str).unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        if initial_events || requested.is_empty() || requested == "0" {
            // Start at the most recent state: synthetic ADDED events for what exists now.
            for object in self.matching(rt, &filter) {
                let _ = tx.send(event_line("ADDED", &object));
            }
            if initial_events {
                let _ = tx.send(bookmark_line(rt, self.resource_version, true));
            }
        } else {
            let Ok(from) = requested.parse::<u64>() else {
                let message = format!("invalid resource version: {requested:?}");
                return Outcome::Done(status_response(400, "BadRequest", &message));
            };
            if from < self.compacted {
                let message = format!("too old resource version: {from} ({})", self.compacted);
                let _ = tx.send(event_line("ERROR", &status_value(410, "Expired", &message)));
                drop(tx);
                return Outcome::Done(respond(200, Payload::Watch { rx, deadline: None, _guard: None }));
            }
            for event in self.events.iter().filter(|event| event.rv > from && event.rt.plural == rt.plural) {
                if let Some(line) = event.line_for(&filter) {
                    let _ = tx.send(line);
                }
            }
        }
        let id = self.next_watch;
        self.next_watch += 1;
        self.watches.insert(id, WatchRegistration { rt, filter, bookmarks, tx });
        Outcome::Watch { id, rx, timeout: Duration::from_secs(timeout) }
    }

    /// Served API groups other than core, with their served versions.
    fn group_versions(&self) -> BTreeMap<&'static str, Vec<&'static str>> {
        let mut groups: BTreeMap<&'static str, Vec<&'static str>> = BTreeMap::new();
        for rt in self.served_types().filter(|rt| !rt.group.is_empty()) {
            let versions = groups.entry(rt.group).or_default();
            if !versions.contains(&rt.version) {
                versions.push(rt.version);
            }
        }
        groups
    }

    /// The `/apis` APIGroupList.
    fn groups_value(&self) -> Value {
        let groups: Vec<Value> =
            self.group_versions().iter().map(|(group, versions)| group_entry(group, versions)).collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// The `/apis/{group}` APIGroup, if the group has served types.
    fn group_value(&self, group: &str) -> Option<Value> {
        let groups = self.group_versions();
        let mut entry = group_entry(group, groups.get(group)?);
        if let Value::Object(map) = &mut entry {
            map.insert("kind".to_owned(), Value::from("APIGroup"));
            map.insert("apiVersion".to_owned(), Value::from("v1"));
        }
        Some(entry)
    }

    /// The APIResourceList of a group version, if it has served types.
    fn resources_value(&self, group: &str, version: &str) -> Option<Value> {
        let resources: Vec<Value> = self
            .served_types()
            .filter(|rt| rt.group == group && rt.version == version)
            .map(|rt| {
                json!({
                    "name": rt.plural,
                    "singularName": rt.kind.to_lowercase(),
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": ["get", "list", "watch"],
                })
            })
            .collect();
        if resources.is_empty() {
            return None;
        }
        let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }))
    }

    /// The response an injected fault calls for (`Slow` is handled before this).
    fn fault_response(&self, fault: Fault, path: &str, query: &Query) -> Response<Payload> {
        match fault {
            Fault::Status(code) => {
                let (reason, message) = self.fault_status(code, path, query);
                status_response(code, reason, &message)
            }
            Fault::Hang => respond(200, Payload::Hang),
            Fault::Truncate => {
                let body = format!(
                    "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"metadata\":{{\"resourceVersion\":\"{}\"}},\
                     \"items\":[{{\"apiVersion\":\"v1\",\"kind\":",
                    self.resource_version
                );
                let claimed = body.len() + TRUNCATED_SHORTFALL;
                let pause = Box::pin(tokio::time::sleep(TRUNCATE_PAUSE));
                let mut response = respond(200, Payload::Truncated { data: Some(Bytes::from(body)), pause });
                response.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(claimed));
                response
            }
            Fault::Malformed => respond(200, Payload::Full(Some(Bytes::from_static(MALFORMED_BODY)))),
            Fault::Enormous(size) => self.enormous(path, query, size),
            Fault::Slow(_) | Fault::Trickle(_) => {
                status_response(500, "InternalError", "a Slow or Trickle fault reached the fault responder")
            }
        }
    }

    /// Reason and message of an injected `Fault::Status`.
    fn fault_status(&self, code: u16, path: &str, query: &Query) -> (&'static str, String) {
        let what = match resolve(path) {
            Route::Collection { rt, .. } | Route::Object { rt, .. } => rt.resource_name(),
            _ => "the requested resource".to_owned(),
        };
        match code {
            400 => ("BadRequest", "the server rejected our request for an unknown reason".to_owned()),
            401 => ("Unauthorized", "Unauthorized".to_owned()),
            403 => ("Forbidden", format!("{what} is forbidden: User \"fake-kube-user\" cannot access {what}")),
            404 => ("NotFound", NOT_FOUND_MESSAGE.to_owned()),
            410 if is_watch(query) => {
                let from = query.get("resourceVersion").map(String::as_str).unwrap_or("0");
                ("Expired", format!("too old resource version: {from} ({})", self.resource_version))
            }
            410 => ("Expired", EXPIRED_CONTINUE_MESSAGE.to_owned()),
            429 => ("TooManyRequests", "Too many requests, please try again later.".to_owned()),
            500 => ("InternalError", "Internal error occurred: injected fault".to_owned()),
            503 => ("ServiceUnavailable", "the server is currently unable to handle the request".to_owned()),
            504 => ("Timeout", "the server was unable to return a response in the time allotted".to_owned()),
            code if code >= 500 => ("InternalError", format!("injected fault {code}")),
            code => ("BadRequest", format!("injected fault {code}")),
        }
    }

    /// A valid list (the current items when the path names a collection) padded with a huge
    /// string field of `size` bytes, generated as it is streamed.
    fn enormous(&self, path: &str, query: &Query, size: usize) -> Response<Payload> {
        let rv = self.resource_version;
        let list = match resolve(path) {
            Route::Collection { rt, namespace } => {
                let filter = Filter::parse(namespace, query)
                    .unwrap_or_else(|_| Filter { namespace: namespace.map(str::to_owned), ..Filter::default() });
                list_value(rt.api_version(), format!("{}List", rt.kind), rv, self.matching(rt, &filter), None, None)
            }
            _ => list_value("v1".to_owned(), "List".to_owned(), rv, Vec::new(), None, None),
        };
        let mut head = list.to_string();
        head.pop(); // the closing brace of the list object
        head.push_str(",\"padding\":\"");
        let tail = Some(Bytes::from_static(b"\"}"));
        respond(200, Payload::Padded { head: Some(Bytes::from(head)), padding: size, tail })
    }
}

/// Removes a watch registration when its response body goes away.
struct WatchGuard {
    /// The shared state holding the registration.
    state: Arc<Mutex<State>>,
    /// Registration id.
    id: u64,
}

impl Drop for WatchGuard {
    /// Unregisters the watch.
    fn drop(&mut self) {
        lock(&self.state).watches.remove(&self.id);
    }
}

/// Response bodies.
enum Payload {
    /// A complete body, taken on the first poll.
    Full(Option<Bytes>),
    /// A partial body, then a pause (so it is flushed), then an early end of stream that makes
    /// hyper close the connection short of the declared Content-Length.
    Truncated {
        /// The partial body, taken on the first poll.
        data: Option<Bytes>,
        /// The pause before ending.
        pause: Pin<Box<Sleep>>,
    },
    /// Never produces anything.
    Hang,
    /// A complete body sent `TRICKLE_BYTES` at a time, one piece per `interval` (the first at
    /// once), framed by its whole length.
    Trickle {
        /// What is left to send.
        data: Bytes,
        /// The pause between pieces.
        interval: Duration,
        /// When the next piece goes.
        next: Pin<Box<Sleep>>,
    },
    /// `head`, then `padding` bytes of `x`, then `tail`, streamed without a declared length.
    Padded {
        /// Sent first, taken on the first poll.
        head: Option<Bytes>,
        /// Padding bytes still to send.
        padding: usize,
        /// Sent last.
        tail: Option<Bytes>,
    },
    /// A chunked watch stream of event lines.
    Watch {
        /// Event lines; the stream ends when every sender is gone.
        rx: mpsc::UnboundedReceiver<Bytes>,
        /// When the server ends the stream (`timeoutSeconds`).
        deadline: Option<Pin<Box<Sleep>>>,
        /// Unregisters the watch when the body is dropped.
        _guard: Option<WatchGuard>,
    },
}

impl Body for Payload {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Payload::Full(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
            Payload::Truncated { data, pause } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                pause.as_mut().poll(cx).map(|()| None)
            }
            Payload::Hang => Poll::Pending,
            Payload::Trickle { data, interval, next } => {
                if data.is_empty() {
                    return Poll::Ready(None);
                }
                if next.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let piece = data.split_to(TRICKLE_BYTES.min(data.len()));
                next.as_mut().reset(tokio::time::Instant::now() + *interval);
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
            Payload::Padded { head, padding, tail } => {
                if let Some(head) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                if *padding > 0 {
                    let n = (*padding).min(PADDING.len());
                    *padding -= n;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PADDING[..n])))));
                }
                Poll::Ready(tail.take().map(|tail| Ok(Frame::data(tail))))
            }
            Payload::Watch { rx, deadline, .. } => {
                if let Poll::Ready(line) = rx.poll_recv(cx) {
                    return Poll::Ready(line.map(|line| Ok(Frame::data(line))));
                }
                match deadline {
                    Some(deadline) => deadline.as_mut().poll(cx).map(|()| None),
                    None => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Payload::Full(None) => true,
            Payload::Trickle { data, .. } => data.is_empty(),
            Payload::Padded { head, padding, tail } => head.is_none() && *padding == 0 && tail.is_none(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Payload::Full(Some(data)) | Payload::Trickle { data, .. } => SizeHint::with_exact(data.len() as u64),
            Payload::Full(None) => SizeHint::with_exact(0),
            // Unknown: streamed with chunked encoding, or framed by an explicit Content-Length.
            _ => SizeHint::default(),
        }
    }
}

/// A JSON response with this status (invalid or informational codes become 500).
fn respond(status: u16, payload: Payload) -> Response<Payload> {
    let mut response = Response::new(payload);
    *response.status_mut() =
        StatusCode::from_u16(status).ok().filter(|s| s.as_u16() >= 200).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A complete JSON response.
fn json_response(status: u16, value: &Value) -> Response<Payload> {
    respond(status, Payload::Full(Some(Bytes::from(value.to_string()))))
}

/// A metav1 Status error response.
fn status_response(code: u16, reason: &str, message: &str) -> Response<Payload> {
    json_response(code, &status_value(code, reason, message))
}

/// The generic 404.
fn not_found() -> Response<Payload> {
    status_response(404, "NotFound", NOT_FOUND_MESSAGE)
}

/// A metav1 Status failure object.
fn status_value(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// A list object; built by hand so the items are moved rather than re-serialised.
fn list_value(
    api_version: String,
    kind: String,
    rv: u64,
    items: Vec<Value>,
    next: Option<String>,
    remaining: Option<usize>,
) -> Value {
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
    if let Some(next) = next {
        metadata.insert("continue".to_owned(), Value::String(next));
    }
    if let Some(remaining) = remaining {
        metadata.insert("remainingItemCount".to_owned(), Value::from(remaining));
    }
    let mut list = Map::new();
    list.insert("apiVersion".to_owned(), Value::String(api_version));
    list.insert("kind".to_owned(), Value::String(kind));
    list.insert("metadata".to_owned(), Value::Object(metadata));
    list.insert("items".to_owned(), Value::Array(items));
    Value::Object(list)
}

/// The `/version` document.
fn version_value() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0",
        "gitCommit": "60a317eadfcb839692a5551a6f0b3e1fdd7b2e3d",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T13:05:48Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// One APIGroup entry with its versions, the first preferred.
fn group_entry(group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|version| json!({"groupVersion": format!("{group}/{version}"), "version": version}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": versions, "preferredVersion": preferred})
}

/// One watch event line.
fn event_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{{\"type\":\"{kind}\",\"object\":{object}}}\n"))
}

/// A BOOKMARK line at `rv`, marking the end of initial events when `initial_end`.
fn bookmark_line(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let metadata = if initial_end {
        json!({"resourceVersion": rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}})
    } else {
        json!({"resourceVersion": rv.to_string()})
    };
    event_line("BOOKMARK", &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata}))
}

/// Sets `metadata.resourceVersion` if the object has metadata.
fn set_resource_version(object: &mut Value, rv: u64) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
    }
}

/// The object without metadata and status: what a generation bump reacts to.
fn without_metadata(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

/// Parses a continue token `rv-snapshot-offset`.
fn parse_continue(token: &str) -> Option<(u64, u64, usize)> {
    let mut parts = token.split('-');
    let rv = parts.next()?.parse().ok()?;
    let id = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((rv, id, offset))
}

/// Namespace and selector restrictions of a list or watch.
#[derive(Debug, Default)]
struct Filter {
    /// Only objects in this namespace.
    namespace: Option<String>,
    /// Label requirements, all of which must hold.
    labels: Vec<LabelRequirement>,
    /// Field requirements, all of which must hold.
    fields: Vec<FieldRequirement>,
}

impl Filter {
    /// Builds a filter from the path's namespace and the `labelSelector`/`fieldSelector` parameters.
    fn parse(namespace: Option<&str>, query: &Query) -> Result<Filter, String> {
        let labels = match query.get("labelSelector") {
            Some(selector) => parse_label_selector(selector)?,
            None => Vec::new(),
        };
        let fields = match query.get("fieldSelector") {
            Some(selector) => parse_field_selector(selector)?,
            None => Vec::new(),
        };
        Ok(Filter { namespace: namespace.map(str::to_owned), labels, fields })
    }

    /// Whether an object passes.
    fn matches(&self, object: &Value) -> bool {
        if let Some(namespace) = &self.namespace {
            let actual = object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default();
            if actual != namespace {
                return false;
            }
        }
        let labels = object.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |key: &str| labels.and_then(|labels| labels.get(key)).and_then(Value::as_str);
        self.labels.iter().all(|requirement| requirement.matches(label(requirement.key.as_str())))
            && self.fields.iter().all(|requirement| requirement.matches(object))
    }
}

/// One label selector term.
#[derive(Debug)]
struct LabelRequirement {
    /// Label key.
    key: String,
    /// What the label must satisfy.
    op: LabelOp,
}

/// Label selector operators.
#[derive(Debug)]
enum LabelOp {
    /// `key=value` or `key==value`.
    Eq(String),
    /// `key!=value` (also true when the label is absent).
    NotEq(String),
    /// `key`
    Exists,
    /// `!key`
    NotExists,
    /// `key in (a,b)`
    In(Vec<String>),
    /// `key notin (a,b)` (also true when the label is absent).
    NotIn(Vec<String>),
}

impl LabelRequirement {
    /// Whether a label value (`None` when absent) satisfies the term.
    fn matches(&self, value: Option<&str>) -> bool {
        let in_set = |values: &[String]| value.is_some_and(|value| values.iter().any(|v| v == value));
        match &self.op {
            LabelOp::Eq(expected) => value == Some(expected.as_str()),
            LabelOp::NotEq(expected) => value != Some(expected.as_str()),
            LabelOp::Exists => value.is_some(),
            LabelOp::NotExists => value.is_none(),
            LabelOp::In(values) => in_set(values.as_slice()),
            LabelOp::NotIn(values) => !in_set(values.as_slice()),
        }
    }
}

/// Parses a label selector: comma-separated `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (..)`, `k notin (..)`.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut requirements = Vec::new();
    for term in split_top_level(selector) {
        let term = term.trim();
        if term.is_empty() {
            continue;
        }
        let invalid = || format!("unable to parse requirement: invalid label selector term {term:?}");
        let (key, op) = if let Some(key) = term.strip_prefix('!') {
            (key, LabelOp::NotExists)
        } else if let Some((key, value)) = term.split_once("!=") {
            (key, LabelOp::NotEq(value.trim().to_owned()))
        } else if let Some((key, value)) = term.split_once("==") {
            (key, LabelOp::Eq(value.trim().to_owned()))
        } else if let Some((key, value)) = term.split_once('=') {
            (key, LabelOp::Eq(value.trim().to_owned()))
        } else if let Some((head, rest)) = term.split_once('(') {
            let values = rest.strip_suffix(')').ok_or_else(invalid)?;
            let values: Vec<String> =
                values.split(',').map(str::trim).filter(|value| !value.is_empty()).map(str::to_owned).collect();
            let (key, operator) = head.trim().rsplit_once(char::is_whitespace).ok_or_else(invalid)?;
            match operator {
                "in" => (key, LabelOp::In(values)),
                "notin" => (key, LabelOp::NotIn(values)),
                _ => return Err(invalid()),
            }
        } else {
            (term, LabelOp::Exists)
        };
        let key = key.trim();
        if key.is_empty() || key.contains(|c: char| c.is_whitespace() || "()<>=!,".contains(c)) {
            return Err(invalid());
        }
        requirements.push(LabelRequirement { key: key.to_owned(), op });
    }
    Ok(requirements)
}

/// Splits on commas outside parentheses.
fn split_top_level(selector: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&selector[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    parts
}

/// One field selector term.
#[derive(Debug)]
struct FieldRequirement {
    /// Dotted path into the object, e.g. `metadata.name`.
    path: String,
    /// Value to compare with.
    value: String,
    /// `!=` rather than `=`.
    negate: bool,
}

impl FieldRequirement {
    /// Whether an object satisfies the term (a missing field reads as "").
    fn matches(&self, object: &Value) -> bool {
        let mut current = object;
        for part in self.path.split('.') {
            match current.get(part) {
                Some(next) => current = next,
                None => return self.value.is_empty() != self.negate,
            }
        }
        let actual = match current {
            Value::String(text) => text.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        (actual == self.value) != self.negate
    }
}

/// Parses a field selector: comma-separated `path=value`, `path==value`, `path!=value`.
fn parse_field_selector(selector: &str) -> Result<Vec<FieldRequirement>, String> {
    let mut requirements = Vec::new();
    for term in selector.split(',') {
        let term = term.trim();
        if term.is_empty() {
            continue;
        }
        let (path, value, negate) = if let Some((path, value)) = term.split_once("!=") {
            (path, value, true)
        } else if let Some((path, value)) = term.split_once("==") {
            (path, value, false)
        } else if let Some((path, value)) = term.split_once('=') {
            (path, value, false)
        } else {
            return Err(format!("invalid selector: '{selector}'; can't understand '{term}'"));
        };
        let path = path.trim();
        if path.is_empty() {
            return Err(format!("invalid selector: '{selector}'; empty field in '{term}'"));
        }
        requirements.push(FieldRequirement { path: path.to_owned(), value: value.trim().to_owned(), negate });
    }
    Ok(requirements)
}

/// Splits and percent-decodes a raw query string.
fn parse_query(raw: &str) -> Query {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

/// Decodes `%XX` escapes and `+` (form encoding's space); malformed escapes stay as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => {
                out.push(b' ');
                index += 1;
            }
            b'%' if index + 2 < bytes.len() => match (hex_value(bytes[index + 1]), hex_value(bytes[index + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    index += 3;
                }
                _ => {
                    out.push(b'%');
                    index += 1;
                }
            },
            byte => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of one hex digit.
fn hex_value(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).and_then(|digit| u8::try_from(digit).ok())
}

/// The current UTC time as RFC 3339 with second precision.
fn rfc3339_now() -> String {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let days = i64::try_from(seconds / 86_400).unwrap_or_default();
    let of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", of_day / 3600, of_day % 3600 / 60, of_day % 60)
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
