//! Outbound: local clients to the mesh, from the transparent port or an explicit listener.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::balance::{self, Candidate, InFlight, Outcome};
use super::detect::Protocol;
use super::http::{Refused, Route, Routed, Speaks};
use super::memo::Memo;
use super::metrics::{ConnectionLabels, OpenConnection};
use super::tcp::{Counted, splice};
use super::transport::Header;
use super::{Error, Proxy, connect, orig_dst};
use crate::discovery::{self, Lookup, Resolved, ResolvedEndpoint};
use crate::drain;
use crate::model::{RouteRetry, TargetPort};
use crate::policy::RequestInfo;
use crate::policy::routes;
use crate::store::Snapshot;

/// The response deadline of HTTP requests to destinations the mesh does not know: none, in
/// effect.
const NO_DEADLINE: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

/// What an outbound listener serves.
#[derive(Debug, Clone)]
pub enum Target {
    /// Connections redirected by the kernel: the destination is their original address.
    Transparent,
    /// An explicit listener for one service and port (boxes that cannot redirect); without a
    /// port, the service's only one.
    Service { name: String, port: Option<u16> },
}

/// How a connection will be carried.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    /// To a meshed endpoint: mTLS to its inbound port, then the header naming `target_port`.
    Meshed { peer: SocketAddr, identity: String, target_port: u16, authority: Arc<str> },
    /// To an endpoint without identity: plain TCP.
    Plain { addr: SocketAddr, authority: Arc<str> },
    /// An unknown destination: forwarded to where it was going.
    Passthrough { addr: SocketAddr },
}

impl Plan {
    /// Metric labels of a connection carried this way.
    fn labels(&self, direction: &'static str) -> ConnectionLabels {
        let (tls, target, identity) = match self {
            Plan::Meshed { identity, authority, .. } => ("true", authority.to_string(), identity.clone()),
            Plan::Plain { authority, .. } => ("no_identity", authority.to_string(), String::new()),
            Plan::Passthrough { .. } => ("passthrough", "unknown".to_owned(), String::new()),
        };
        ConnectionLabels { direction, tls, target, identity }
    }
}

impl From<Plan> for Route {
    fn from(plan: Plan) -> Self {
        match plan {
            Plan::Meshed { peer, identity, target_port, authority } => {
                Route::Meshed { peer, identity, target_port, authority }
            }
            Plan::Plain { addr, authority } => Route::Plain { addr, authority },
            Plan::Passthrough { addr } => Route::Plain { addr, authority: "unknown".into() },
        }
    }
}

/// Accepts until the drain starts.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, target: Target, drain: drain::Watch) {
    let slots = Arc::clone(&proxy.outbound_slots);
    super::accept_loop(listener, proxy, "outbound", slots, drain, move |proxy, stream, drain| {
        let target = target.clone();
        async move { handle(proxy, stream, target, drain).await }
    })
    .await;
}

/// Where a connection is going, before an endpoint is chosen.
#[derive(Debug, Clone)]
enum Destination {
    Addr(SocketAddr),
    Name { name: String, port: u16 },
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // An address nothing knows is not a bounded label: it is reported as unknown.
            Destination::Addr(_) => f.write_str("unknown"),
            Destination::Name { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

async fn handle(proxy: Arc<Proxy>, client: TcpStream, target: Target, drain: drain::Watch) -> Result<(), Error> {
    let _ = client.set_nodelay(true);
    let (destination, port) = match target {
        Target::Transparent => {
            let original = orig_dst::original_dst(&client).ok_or(Error::NotRedirected)?;
            if original == proxy.outbound_listen {
                return Err(Error::NotRedirected);
            }
            if proxy.skip_ports.contains(&original.port()) {
                return carry(&proxy, client, Plan::Passthrough { addr: original }, None).await;
            }
            (Destination::Addr(original), original.port())
        }
        Target::Service { name, port } => {
            let port = match port {
                Some(port) => port,
                None => only_port(&proxy, &name)?,
            };
            (Destination::Name { name, port }, port)
        }
    };
    let protocol = if proxy.opaque_ports.contains(&port) {
        Protocol::Opaque
    } else {
        super::detect_protocol(&client, proxy.detect_timeout).await
    };
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            // The connection's metrics are labelled with its destination; each request is
            // routed and balanced on its own.
            let labels = match resolve(&proxy, &destination) {
                Ok(Resolution::Service { resolved, port }) => ConnectionLabels {
                    direction: "outbound",
                    tls: if resolved.endpoints.iter().flatten().any(|e| e.identity.is_some()) {
                        "true"
                    } else {
                        "no_identity"
                    },
                    target: resolved.authority(port),
                    identity: String::new(),
                },
                Ok(Resolution::Passthrough(addr)) => Plan::Passthrough { addr }.labels("outbound"),
                Err(_) => ConnectionLabels {
                    direction: "outbound",
                    tls: "no_identity",
                    target: destination.to_string(),
                    identity: String::new(),
                },
            };
            let open = OpenConnection::new(&proxy.metrics, labels);
            let client = Counted::new(client, open.read_counter(), open.write_counter());
            let resolver = RequestResolver::new(destination);
            let route = move |proxy: &Proxy, request: &RequestInfo<'_>| route(proxy, &resolver, request);
            super::http::serve_outbound(Arc::clone(&proxy), client, protocol, route, drain).await
        }
        Protocol::Opaque | Protocol::Tls => {
            let (plan, in_flight) = match resolve(&proxy, &destination)? {
                Resolution::Service { resolved, port } => {
                    let authority = resolved.authority(port).into();
                    plan_for(&proxy, &resolved, port, authority)?
                }
                Resolution::Passthrough(addr) => (Plan::Passthrough { addr }, None),
            };
            carry(&proxy, client, plan, in_flight).await
        }
    }
}

/// The only port of a service, for an explicit listener that names none.
fn only_port(proxy: &Proxy, name: &str) -> Result<u16, Error> {
    let snapshot = proxy.snapshots.borrow().clone();
    let unresolved = |reason: String| Error::Unresolved { name: name.to_owned(), reason };
    match discovery::resolve_name(&snapshot, &proxy.settings, name) {
        Lookup::Found(resolved) => match resolved.ports.as_slice() {
            [only] => Ok(only.port),
            ports => Err(unresolved(format!("{} ports and the listener names none: set `port`", ports.len()))),
        },
        Lookup::NotFound => Err(unresolved("no such service".into())),
        Lookup::Unknown { reason } => Err(unresolved(reason)),
    }
}

/// What a destination is: a mesh service on a port, or somewhere the mesh does not know.
enum Resolution {
    Service { resolved: Resolved, port: u16 },
    Passthrough(SocketAddr),
}

fn resolve(proxy: &Proxy, destination: &Destination) -> Result<Resolution, Error> {
    let snapshot = proxy.snapshots.borrow().clone();
    resolve_in(proxy, &snapshot, destination)
}

fn resolve_in(proxy: &Proxy, snapshot: &Snapshot, destination: &Destination) -> Result<Resolution, Error> {
    match destination {
        Destination::Addr(addr) => Ok(match discovery::resolve_addr(snapshot, &proxy.settings, *addr) {
            Lookup::Found(resolved) => Resolution::Service { resolved, port: addr.port() },
            // Not a mesh destination (or not known yet): go where the client was going.
            Lookup::NotFound | Lookup::Unknown { .. } => Resolution::Passthrough(*addr),
        }),
        Destination::Name { name, port } => match discovery::resolve_name(snapshot, &proxy.settings, name) {
            Lookup::Found(resolved) => Ok(Resolution::Service { resolved, port: *port }),
            Lookup::NotFound => Err(Error::Unresolved { name: name.clone(), reason: "no such service".into() }),
            Lookup::Unknown { reason } => Err(Error::Unresolved { name: name.clone(), reason }),
        },
    }
}

/// Where the HTTP requests of one connection go: to the connection's destination (its explicit
/// listener's service, or the service its original address belongs to); when that address is
/// not one the mesh knows, to the mesh service the request's Host (or `:authority`) names, if
/// any. The last answer is reused while the snapshot and the host stay the same: a keep-alive
/// connection usually talks to one service.
struct RequestResolver {
    destination: Destination,
    /// The last request's Host header (for transparent connections) and its destination.
    last: Memo<Option<String>, Destined>,
}

/// Where a request is going, as one snapshot says.
#[derive(Clone)]
struct Destined {
    resolution: Arc<Resolution>,
    /// `name.ns.svc.<domain>:port`: the metrics label and the balancer's key.
    authority: Arc<str>,
    /// Whether an HTTPRoute or a TrafficSplit names the service: when none does, every request
    /// goes to the service itself and [`routes::choose`] is skipped.
    routed: bool,
}

impl RequestResolver {
    fn new(destination: Destination) -> Self {
        Self { destination, last: Memo::default() }
    }

    /// The snapshot it resolved against, and the destination.
    fn resolve(&self, proxy: &Proxy, request: &RequestInfo<'_>) -> Result<(Arc<Snapshot>, Destined), Error> {
        let snapshot = proxy.snapshots.borrow().clone();
        // Only transparent connections are routed by host: an explicit listener names its service.
        let host = match self.destination {
            Destination::Addr(_) => request.host,
            Destination::Name { .. } => None,
        };
        if let Some(destined) = self.last.get(&snapshot, |kept| kept.as_deref() == host, Destined::clone) {
            return Ok((snapshot, destined));
        }
        let mut resolution = resolve_in(proxy, &snapshot, &self.destination)?;
        if matches!(resolution, Resolution::Passthrough(_))
            && let Some(found) = host.and_then(|h| self.by_host(proxy, &snapshot, h))
        {
            resolution = found;
        }
        let (authority, routed): (Arc<str>, bool) = match &resolution {
            Resolution::Service { resolved, port } => {
                (resolved.authority(*port).into(), routes::any_for(&snapshot, &resolved.namespace, &resolved.name))
            }
            Resolution::Passthrough(_) => ("unknown".into(), false),
        };
        let destined = Destined { resolution: Arc::new(resolution), authority, routed };
        self.last.keep(&snapshot, Some((host.map(str::to_owned), destined.clone())));
        Ok((snapshot, destined))
    }

    /// The mesh service a Host header names, on its port (else the original port); `None` for
    /// an address literal or a name the mesh does not know.
    fn by_host(&self, proxy: &Proxy, snapshot: &Snapshot, host: &str) -> Option<Resolution> {
        let Destination::Addr(original) = self.destination else { return None };
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => (name, port.parse().ok()?),
            _ => (host, original.port()),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.starts_with('[') || name.parse::<std::net::IpAddr>().is_ok() {
            return None;
        }
        match discovery::resolve_name(snapshot, &proxy.settings, name) {
            Lookup::Found(resolved) => Some(Resolution::Service { resolved, port }),
            Lookup::NotFound | Lookup::Unknown { .. } => None,
        }
    }
}

/// The destination of one HTTP request attempt: the route (HTTPRoute, TrafficSplit) picks a
/// backend service, the balancer an endpoint of it.
fn route(proxy: &Proxy, resolver: &RequestResolver, request: &RequestInfo<'_>) -> Result<Routed, Refused> {
    let (snapshot, destined) = resolver.resolve(proxy, request).map_err(|error| Refused { error, authority: None })?;
    let authority = destined.authority;
    match &*destined.resolution {
        Resolution::Service { resolved, port } => {
            let routes = destined.routed.then_some((&*snapshot, request));
            route_to(proxy, resolved, *port, Arc::clone(&authority), routes)
                .map_err(|error| Refused { error, authority: Some(authority.to_string()) })
        }
        Resolution::Passthrough(addr) => {
            let route = Route::Plain { addr: *addr, authority: Arc::clone(&authority) };
            Ok(Routed {
                route,
                in_flight: None,
                // Forwarded as it is: no response deadline of the mesh's (only the idle
                // timeout applies) and no retries.
                timeout: Some(NO_DEADLINE),
                try_timeout: None,
                retry: Some(RouteRetry { attempts: Some(0), ..RouteRetry::default() }),
                speaks: None,
                authority,
            })
        }
    }
}

/// Routes a request for `resolved` on `port`: by the HTTPRoutes and TrafficSplits of `routes`'s
/// snapshot, or, when `routes` is `None` (none names the service), to the service itself.
fn route_to(
    proxy: &Proxy,
    resolved: &Resolved,
    port: u16,
    authority: Arc<str>,
    routes: Option<(&Snapshot, &RequestInfo<'_>)>,
) -> Result<Routed, Error> {
    let Some((snapshot, request)) = routes else {
        let (plan, in_flight) = plan_for(proxy, resolved, port, Arc::clone(&authority))?;
        let speaks = speaks(resolved, port);
        return Ok(Routed {
            route: plan.into(),
            in_flight,
            timeout: None,
            try_timeout: None,
            retry: None,
            speaks,
            authority,
        });
    };
    // Only a backend the cache knows is absent is dropped; one whose source has not synced is
    // kept, and answers "unknown" (503) if picked, never "no such backend".
    let exists = |namespace: &str, service: &str| {
        let name = format!("{service}.{namespace}");
        !matches!(discovery::resolve_name(snapshot, &proxy.settings, &name), Lookup::NotFound)
    };
    let choice = routes::choose(snapshot, &resolved.namespace, &resolved.name, port, request, exists);
    if let Some(status) = choice.refusal {
        return Err(Error::NoRoute { status, by: choice.by });
    }
    let backend = choice.pick(balance::roll() as u32).ok_or_else(|| Error::NoEndpoint(authority.to_string()))?;
    let backend_port = backend.port.unwrap_or(port);
    let ((plan, in_flight), speaks) = if backend.service == resolved.name && backend.namespace == resolved.namespace {
        let backend_authority =
            if backend_port == port { Arc::clone(&authority) } else { resolved.authority(backend_port).into() };
        (plan_for(proxy, resolved, backend_port, backend_authority)?, speaks(resolved, backend_port))
    } else {
        let name = format!("{}.{}", backend.service, backend.namespace);
        match discovery::resolve_name(snapshot, &proxy.settings, &name) {
            Lookup::Found(backend) => {
                let authority = backend.authority(backend_port).into();
                (plan_for(proxy, &backend, backend_port, authority)?, speaks(&backend, backend_port))
            }
            Lookup::Unknown { .. } => return Err(Error::EndpointsUnknown(format!("{name}:{backend_port}"))),
            Lookup::NotFound => return Err(Error::NoEndpoint(format!("{name}:{backend_port} (split backend)"))),
        }
    };
    Ok(Routed {
        route: plan.into(),
        in_flight,
        timeout: choice.request_timeout,
        try_timeout: choice.backend_timeout,
        retry: choice.retry,
        speaks,
        authority,
    })
}

/// What the `appProtocol` of the service's `port` says its endpoints speak.
fn speaks(resolved: &Resolved, port: u16) -> Option<Speaks> {
    let app_protocol = resolved.ports.iter().find(|p| p.port == port)?.app_protocol.as_deref()?;
    Speaks::from_app_protocol(app_protocol)
}

/// Picks a ready endpoint (topology first, then the balancer) and the port on it that
/// `service_port` maps to. `authority` is the service's `name.ns.svc.<domain>:port`.
fn plan_for(
    proxy: &Proxy,
    resolved: &Resolved,
    service_port: u16,
    authority: Arc<str>,
) -> Result<(Plan, Option<InFlight>), Error> {
    let Some(endpoints) = resolved.endpoints.as_ref() else {
        return Err(Error::EndpointsUnknown(authority.to_string()));
    };
    let service_port_entry = resolved.ports.iter().find(|p| p.port == service_port);
    let target_port = |endpoint: &ResolvedEndpoint| match service_port_entry {
        Some(port) => match &port.target_port {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => {
                endpoint.ports.iter().find(|p| p.name.as_deref() == Some(name.as_str())).map(|p| p.port)
            }
        },
        // A connection straight to an endpoint address, or a port the service does not list.
        None => Some(service_port),
    };
    let candidates: Vec<Candidate> = endpoints
        .iter()
        .filter(|e| e.ready && !e.addresses.is_empty())
        .filter_map(|e| {
            Some(Candidate {
                addr: SocketAddr::new(e.addresses[0], target_port(e)?),
                node: e.node.as_deref(),
                zone: e.zone.as_deref(),
                hints: &e.hints_for_zones,
                identity: e.identity.as_deref(),
            })
        })
        .collect();
    if candidates.is_empty() {
        return Err(Error::NoEndpoint(authority.to_string()));
    }
    let tier = proxy
        .traffic_for(&authority)
        .topology
        .then(|| balance::preferred(&candidates, &proxy.locality, |c| proxy.balancer.usable(&authority, c.addr)));
    let in_flight = proxy
        .balancer
        .pick(&authority, &candidates, tier.as_deref(), balance::roll())
        .ok_or_else(|| Error::NoEndpoint(format!("{authority} (every endpoint is ejected after failures)")))?;
    let picked = candidates
        .iter()
        .find(|c| c.addr == in_flight.addr())
        .ok_or_else(|| Error::NoEndpoint(authority.to_string()))?;
    let plan = match picked.identity {
        Some(identity) => Plan::Meshed {
            peer: SocketAddr::new(picked.addr.ip(), proxy.peer_inbound_port),
            identity: identity.to_owned(),
            target_port: picked.addr.port(),
            authority,
        },
        None => Plan::Plain { addr: picked.addr, authority },
    };
    Ok((plan, Some(in_flight)))
}

/// Carries an opaque connection; the balancer hears whether connecting worked.
async fn carry(proxy: &Proxy, client: TcpStream, plan: Plan, in_flight: Option<InFlight>) -> Result<(), Error> {
    let open = OpenConnection::new(&proxy.metrics, plan.labels("outbound"));
    let mut client = Counted::new(client, open.read_counter(), open.write_counter());
    let report = |in_flight: Option<InFlight>, ok: bool| {
        if let Some(in_flight) = in_flight {
            in_flight.finish(if ok { Outcome::Success } else { Outcome::Failure });
        }
    };
    match plan {
        Plan::Passthrough { addr } | Plan::Plain { addr, .. } => {
            let connected = connect(addr, proxy.connect_timeout).await;
            report(in_flight, connected.is_ok());
            let mut server = connected?;
            splice(&mut client, &mut server, proxy.tcp_idle_timeout).await?;
        }
        Plan::Meshed { peer, identity, target_port, authority } => {
            let connected = proxy.connect_peer(peer, &identity).await;
            // A box still without its certificate says nothing about the endpoint.
            if !matches!(connected, Err(Error::NoCertificate)) {
                report(in_flight, connected.is_ok());
            }
            let mut server = connected?;
            let header = Header { target_port, protocol: Protocol::Opaque, authority: Some(authority.to_string()) };
            server.write_all(&header.encode()).await?;
            splice(&mut client, &mut server, proxy.tcp_idle_timeout).await?;
        }
    }
    drop(open);
    Ok(())
}
