//! Outbound: local clients to the mesh, from the transparent port or an explicit listener.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use super::detect::Protocol;
use super::metrics::{ConnectionLabels, OpenConnection};
use super::tcp::{Counted, splice};
use super::transport::Header;
use super::{Error, Proxy, connect, orig_dst};
use crate::discovery::{self, Lookup, Resolved};
use crate::drain;
use crate::model::TargetPort;

/// What an outbound listener serves.
#[derive(Debug, Clone)]
pub enum Target {
    /// Connections redirected by the kernel: the destination is their original address.
    Transparent,
    /// An explicit listener for one service and port (boxes that cannot redirect).
    Service { name: String, port: u16 },
}

/// How a connection will be carried.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    /// To a meshed endpoint: mTLS to its inbound port, then the header naming `target_port`.
    Meshed { peer: SocketAddr, identity: String, target_port: u16, authority: String },
    /// To an endpoint without identity: plain TCP.
    Plain { addr: SocketAddr, authority: String },
    /// An unknown destination: forwarded to where it was going.
    Passthrough { addr: SocketAddr },
}

impl Plan {
    /// Metric labels of a connection carried this way.
    fn labels(&self, direction: &'static str) -> ConnectionLabels {
        let (tls, target, identity) = match self {
            Plan::Meshed { identity, authority, .. } => ("true", authority.clone(), identity.clone()),
            Plan::Plain { authority, .. } => ("no_identity", authority.clone(), String::new()),
            Plan::Passthrough { .. } => ("passthrough", "unknown".to_owned(), String::new()),
        };
        ConnectionLabels { direction, tls, target, identity }
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
                return carry(&proxy, client, Plan::Passthrough { addr: original }).await;
            }
            (Destination::Addr(original), original.port())
        }
        Target::Service { name, port } => (Destination::Name { name, port }, port),
    };
    let protocol = if proxy.opaque_ports.contains(&port) {
        Protocol::Opaque
    } else {
        super::detect_protocol(&client, proxy.detect_timeout).await
    };
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            // The connection's metrics are labelled with its destination as first resolved; each
            // request is routed on its own.
            let labels = match plan(&proxy, &destination) {
                Ok(plan) => plan.labels("outbound"),
                Err(_) => ConnectionLabels {
                    direction: "outbound",
                    tls: "no_identity",
                    target: destination.to_string(),
                    identity: String::new(),
                },
            };
            let open = OpenConnection::new(&proxy.metrics, labels);
            let client = Counted::new(client, open.read_counter(), open.write_counter());
            let route = move |proxy: &Proxy| route(proxy, &destination);
            super::http::serve_outbound(Arc::clone(&proxy), client, route, drain).await
        }
        Protocol::Opaque | Protocol::Tls => {
            let plan = plan(&proxy, &destination)?;
            carry(&proxy, client, plan).await
        }
    }
}

fn plan(proxy: &Proxy, destination: &Destination) -> Result<Plan, Error> {
    match destination {
        Destination::Addr(addr) => plan_for_addr(proxy, *addr),
        Destination::Name { name, port } => plan_for_name(proxy, name, *port),
    }
}

/// The destination of one HTTP request (chosen per request, so requests are balanced).
fn route(proxy: &Proxy, destination: &Destination) -> Result<super::http::Route, Error> {
    Ok(match plan(proxy, destination)? {
        Plan::Meshed { peer, identity, target_port, authority } => {
            super::http::Route::Meshed { peer, identity, target_port, authority }
        }
        Plan::Plain { addr, authority } => super::http::Route::Plain { addr, authority },
        Plan::Passthrough { addr } => super::http::Route::Plain { addr, authority: "unknown".into() },
    })
}

/// The plan for a connection to an address: a service's cluster IP, an endpoint IP, or unknown.
fn plan_for_addr(proxy: &Proxy, addr: SocketAddr) -> Result<Plan, Error> {
    let snapshot = proxy.snapshots.borrow().clone();
    match discovery::resolve_addr(&snapshot, &proxy.settings, addr) {
        Lookup::Found(resolved) => plan_for(proxy, &resolved, addr.port()),
        // Not a mesh destination (or not known yet): go where the client was going.
        Lookup::NotFound | Lookup::Unknown { .. } => Ok(Plan::Passthrough { addr }),
    }
}

fn plan_for_name(proxy: &Proxy, name: &str, port: u16) -> Result<Plan, Error> {
    let snapshot = proxy.snapshots.borrow().clone();
    match discovery::resolve_name(&snapshot, &proxy.settings, name) {
        Lookup::Found(resolved) => plan_for(proxy, &resolved, port),
        Lookup::NotFound => Err(Error::Unresolved { name: name.to_owned(), reason: "no such service".into() }),
        Lookup::Unknown { reason } => Err(Error::Unresolved { name: name.to_owned(), reason }),
    }
}

/// Picks a ready endpoint (round robin) and the port on it that `service_port` maps to.
fn plan_for(proxy: &Proxy, resolved: &Resolved, service_port: u16) -> Result<Plan, Error> {
    let authority = format!("{}:{service_port}", resolved.fqdn);
    let endpoints = resolved.endpoints.as_ref().ok_or_else(|| Error::EndpointsUnknown(authority.clone()))?;
    let ready: Vec<_> = endpoints.iter().filter(|e| e.ready && !e.addresses.is_empty()).collect();
    if ready.is_empty() {
        return Err(Error::NoEndpoint(authority));
    }
    let endpoint = ready[proxy.next_index(ready.len())];
    let target_port = match resolved.ports.iter().find(|p| p.port == service_port).map(|p| &p.target_port) {
        Some(TargetPort::Number(n)) => *n,
        Some(TargetPort::Name(name)) => endpoint
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.port)
            .ok_or_else(|| Error::NoEndpoint(format!("{authority} (no endpoint port named {name})")))?,
        // A connection straight to an endpoint address, or a port the service does not list.
        None => service_port,
    };
    let ip = endpoint.addresses[0];
    Ok(match &endpoint.identity {
        Some(identity) => Plan::Meshed {
            peer: SocketAddr::new(ip, proxy.peer_inbound_port),
            identity: identity.clone(),
            target_port,
            authority,
        },
        None => Plan::Plain { addr: SocketAddr::new(ip, target_port), authority },
    })
}

async fn carry(proxy: &Proxy, client: TcpStream, plan: Plan) -> Result<(), Error> {
    let open = OpenConnection::new(&proxy.metrics, plan.labels("outbound"));
    let mut client = Counted::new(client, open.read_counter(), open.write_counter());
    match plan {
        Plan::Passthrough { addr } | Plan::Plain { addr, .. } => {
            let mut server = connect(addr, proxy.connect_timeout).await?;
            splice(&mut client, &mut server, proxy.tcp_idle_timeout).await?;
        }
        Plan::Meshed { peer, identity, target_port, authority } => {
            let tls = proxy.current_tls().ok_or(Error::NoCertificate)?;
            let server_name = ServerName::try_from(identity.clone())
                .map_err(|e| Error::Tls { peer: identity.clone(), reason: e.to_string() })?;
            let tcp = connect(peer, proxy.connect_timeout).await?;
            let handshake = TlsConnector::from(Arc::clone(&tls.client)).connect(server_name, tcp);
            let mut server = tokio::time::timeout(proxy.connect_timeout, handshake)
                .await
                .map_err(|_| Error::Timeout("TLS handshake with the peer"))?
                .map_err(|e| Error::Tls { peer: format!("{identity} at {peer}"), reason: e.to_string() })?;
            let header = Header { target_port, protocol: Protocol::Opaque, authority: Some(authority) };
            server.write_all(&header.encode()).await?;
            splice(&mut client, &mut server, proxy.tcp_idle_timeout).await?;
        }
    }
    drop(open);
    Ok(())
}
