//! The proxy: outbound (local clients to the mesh) and inbound (peers to local workloads).
//! Every connection between two meshkeep boxes is mutual TLS, whatever it carries.
//!
//! Outbound finds the destination by explicit listener or by the connection's original
//! destination (transparent redirect), picks a ready endpoint, and connects to the peer's
//! inbound port over mTLS with the endpoint's identity as server name, then sends the transport
//! header naming the target port. An unmeshed endpoint is reached directly; an unknown
//! destination is forwarded unchanged. Inbound terminates mTLS, reads the header and forwards
//! to the local target port.

pub mod balance;
pub mod detect;
mod head;
pub mod http;
pub(crate) mod http1;
mod inbound;
mod memo;
pub mod metrics;
mod orig_dst;
mod outbound;
mod peer;
mod plain;
pub mod retry;
pub mod stats;
pub mod tcp;
pub mod transport;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub use inbound::serve as serve_inbound;
pub use outbound::{Target as OutboundTarget, serve as serve_outbound};

use crate::config::{Config, PlaintextPolicy, PolicyConfig, ServiceTraffic, TrafficConfig};
use crate::discovery;
use crate::identity::ca::Leaf;
use crate::store::Snapshots;

/// The TLS material of the moment; replaced on rotation, read at each accept/connect, so
/// established connections keep theirs.
#[derive(Debug)]
pub struct TlsConfigs {
    pub identity: String,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl TlsConfigs {
    /// Configs for proxy-to-proxy connections from the proxy's certificate.
    pub fn from_leaf(leaf: &Leaf) -> Result<Self, crate::identity::Error> {
        Ok(Self {
            identity: leaf.name.dns_name(),
            server: crate::identity::tls::server_config(leaf, &[transport::ALPN])?,
            client: crate::identity::tls::client_config(leaf, &[transport::ALPN])?,
        })
    }
}

/// Everything a proxied connection needs, shared by all of them.
#[derive(Debug)]
pub struct Proxy {
    pub snapshots: Snapshots,
    pub settings: discovery::Settings,
    pub tls: watch::Receiver<Option<Arc<TlsConfigs>>>,
    pub metrics: metrics::ProxyMetrics,
    pub peer_inbound_port: u16,
    pub inbound_target: IpAddr,
    pub inbound_plaintext: PlaintextPolicy,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub header_read_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    pub http_idle_timeout: Duration,
    pub skip_ports: Vec<u16>,
    pub outbound_listen: SocketAddr,
    /// Bounds open connections per direction; a connection over the limit is closed at once.
    pub outbound_slots: Arc<Semaphore>,
    pub inbound_slots: Arc<Semaphore>,
    handshakes: HandshakeTurns,
    pub opaque_ports: Vec<u16>,
    pub http: http::HttpMetrics,
    pub balancer: Arc<balance::Balancer>,
    pub budget: retry::Budget,
    pub locality: balance::Locality,
    traffic: TrafficConfig,
    /// Inbound authorization: the default policy and the workload this box serves.
    pub policy: PolicyConfig,
    pub local_workload: (String, String),
    pub authz: metrics::AuthzMetrics,
    peers: http::PeerPool,
    plain: plain::PlainClients,
}

/// The traffic settings for one service: `[traffic]` with its per-service overrides applied.
#[derive(Debug, Clone)]
pub struct ServicePolicy {
    pub response_timeout: Duration,
    pub retries: bool,
    pub retry_all_methods: bool,
    pub max_retries: u32,
    pub retry_body_limit: usize,
    pub topology: bool,
}

impl Proxy {
    pub fn new(
        full: &Config,
        snapshots: Snapshots,
        settings: discovery::Settings,
        tls: watch::Receiver<Option<Arc<TlsConfigs>>>,
        metrics: metrics::ProxyMetrics,
    ) -> Self {
        let config = &full.proxy;
        Self {
            snapshots,
            settings,
            tls,
            metrics,
            peer_inbound_port: config.peer_inbound_port,
            inbound_target: config.inbound_target,
            inbound_plaintext: config.inbound_plaintext,
            detect_timeout: config.detect_timeout.get(),
            connect_timeout: config.connect_timeout.get(),
            header_read_timeout: config.header_read_timeout.get(),
            tcp_idle_timeout: config.tcp_idle_timeout.get(),
            http_idle_timeout: config.http_idle_timeout.get(),
            skip_ports: config.skip_ports.clone(),
            outbound_listen: config.outbound_listen,
            outbound_slots: Arc::new(Semaphore::new(config.max_connections)),
            inbound_slots: Arc::new(Semaphore::new(config.max_connections)),
            handshakes: HandshakeTurns::default(),
            opaque_ports: config.opaque_ports.clone(),
            http: http::HttpMetrics::default(),
            balancer: Arc::new(balance::Balancer::new(&full.traffic)),
            budget: retry::Budget::new(&full.traffic),
            locality: balance::Locality {
                node: full.node.name.as_ref().map(ToString::to_string),
                zone: full.node.zone.as_ref().map(ToString::to_string),
            },
            traffic: full.traffic.clone(),
            policy: full.policy.clone(),
            local_workload: (full.identity.proxy.namespace.clone(), full.identity.proxy.service_account.clone()),
            authz: metrics::AuthzMetrics::default(),
            peers: http::PeerPool::default(),
            plain: plain::PlainClients::new(config.connect_timeout.get()),
        }
    }

    /// The traffic settings for a service, by its authority (`name.ns.svc.<domain>:port`);
    /// overrides are keyed by the short name (`name.ns`).
    pub fn traffic_for(&self, authority: &str) -> ServicePolicy {
        let overrides = if self.traffic.services.is_empty() {
            ServiceTraffic::default()
        } else {
            let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
            let short = host
                .strip_suffix(self.settings.cluster_domain.as_str())
                .and_then(|rest| rest.strip_suffix(".svc."))
                .unwrap_or(host);
            self.traffic.services.get(short).cloned().unwrap_or_default()
        };
        ServicePolicy {
            response_timeout: overrides.response_timeout.unwrap_or(self.traffic.response_timeout).get(),
            retries: overrides.retries.unwrap_or(self.traffic.retries),
            retry_all_methods: overrides.retry_all_methods.unwrap_or(false),
            max_retries: self.traffic.max_retries,
            retry_body_limit: self.traffic.retry_body_limit,
            topology: overrides.topology.unwrap_or(self.traffic.topology),
        }
    }

    fn current_tls(&self) -> Option<Arc<TlsConfigs>> {
        self.tls.borrow().clone()
    }

    /// An mTLS connection to the peer proxy at `peer`, whose certificate must name `identity`.
    /// It waits for a turn before connecting, so the peer sees the ClientHello right after the
    /// connection opens and the deadlines run only while the handshake can make progress.
    async fn connect_peer(&self, peer: SocketAddr, identity: &str) -> Result<TlsStream<TcpStream>, Error> {
        let tls = self.current_tls().ok_or(Error::NoCertificate)?;
        let server_name = ServerName::try_from(identity.to_owned())
            .map_err(|e| Error::Tls { peer: identity.to_owned(), reason: e.to_string() })?;
        let _turn = self.handshakes.take(peer).await;
        let tcp = connect(peer, self.connect_timeout).await?;
        tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(Arc::clone(&tls.client)).connect(server_name, tcp),
        )
        .await
        .map_err(|_| Error::Timeout("TLS handshake with the peer"))?
        .map_err(|e| Error::Tls { peer: format!("{identity} at {peer}"), reason: e.to_string() })
    }
}

/// mTLS handshakes in flight at once with one peer. Each costs the CPU a few hundred
/// microseconds (milliseconds in a debug build); thousands started together - opaque connections
/// of many clients to one service arriving in a burst, or coming back after a partition - would
/// share the CPU until every one of them missed its deadline, and the peer's wait for the first
/// bytes. Queued, they finish in order at the rate the CPU allows. 64 keeps a round of them
/// well under the peer's first-bytes wait on a slow ARM core (256 did not under qemu-user)
/// while still allowing hundreds of new connections a second to a peer a WAN round trip away.
/// The cap is per peer, not for the box: one for the box would let peers that swallow
/// connections (a partition cuts off many at once) hold every turn for the connect timeout; a
/// burst spread over many peers is bounded only peer by peer.
const HANDSHAKES_IN_FLIGHT: usize = 64;

/// Turns to connect to each peer. Kept per peer, so a peer that swallows connections (each
/// holding its turn until the connect timeout) delays only the connections going to it.
#[derive(Debug, Default)]
struct HandshakeTurns {
    peers: std::sync::Mutex<TurnsByPeer>,
}

#[derive(Debug, Default)]
struct TurnsByPeer {
    /// Alive while a connection to the peer waits for or holds a turn.
    turns: HashMap<SocketAddr, Weak<Semaphore>>,
    /// The size at which entries no one uses any more are swept out.
    sweep_at: usize,
}

impl HandshakeTurns {
    /// Waits for a turn to connect to `peer`; the turn ends when the permit is dropped.
    async fn take(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        let turns = {
            let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match peers.turns.get(&peer).and_then(Weak::upgrade) {
                Some(turns) => turns,
                None => {
                    if peers.turns.len() >= peers.sweep_at {
                        peers.turns.retain(|_, turns| turns.strong_count() > 0);
                        peers.sweep_at = (peers.turns.len() * 2).max(64);
                    }
                    let turns = Arc::new(Semaphore::new(HANDSHAKES_IN_FLIGHT));
                    peers.turns.insert(peer, Arc::downgrade(&turns));
                    turns
                }
            }
        };
        // Never closed: an error cannot happen, and would only mean going without a turn.
        turns.acquire_owned().await.ok()
    }
}

/// Errors that end a proxied connection. Each is counted and logged at debug level; peers never
/// see more than a closed connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection was not redirected and came to the outbound port directly.
    #[error("connection was not redirected (no original destination)")]
    NotRedirected,
    /// The destination service has no ready endpoint.
    #[error("{0} has no ready endpoint")]
    NoEndpoint(String),
    /// The destination's endpoints have never been listed: unknown, not empty.
    #[error("the endpoints of {0} are unknown (not synced yet)")]
    EndpointsUnknown(String),
    /// The destination is known to exist but cannot be resolved (explicit listener target).
    #[error("{name}: {reason}")]
    Unresolved { name: String, reason: String },
    /// No certificate yet (identity not issued): meshed destinations cannot be reached.
    #[error("no proxy certificate yet")]
    NoCertificate,
    /// Connecting to the endpoint or peer failed or timed out.
    #[error("connect {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The TLS handshake failed (wrong identity, unknown root, protocol error).
    #[error("TLS with {peer}: {reason}")]
    Tls { peer: String, reason: String },
    /// A peer's transport header was missing or malformed.
    #[error("transport header: {0}")]
    Header(#[from] transport::HeaderError),
    /// The inbound side refused the connection by policy.
    #[error("refused: {0}")]
    Refused(&'static str),
    /// Authorization denied the client.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// An HTTPRoute applies and refuses the request (no rule matches, or no backend exists).
    #[error("{by}: no route ({status})")]
    NoRoute { status: u16, by: std::borrow::Cow<'static, str> },
    /// Reading the first bytes or the handshake took too long.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A short label for metrics.
    fn reason(&self) -> &'static str {
        match self {
            Error::NotRedirected => "not_redirected",
            Error::NoEndpoint(_) => "no_endpoint",
            Error::EndpointsUnknown(_) => "endpoints_unknown",
            Error::Unresolved { .. } => "unresolved",
            Error::NoCertificate => "no_certificate",
            Error::Connect { .. } => "connect",
            Error::Tls { .. } => "tls",
            Error::Header(_) => "header",
            Error::Refused(_) => "refused",
            Error::Forbidden(_) => "forbidden",
            Error::NoRoute { .. } => "no_route",
            Error::Timeout(_) => "timeout",
            Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => "idle",
            Error::Io(_) => "io",
        }
    }
}

/// A proxy listener whose accept queue holds up to `max_connections` (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default), as HAProxy sizes its backlog by maxconn. Tokio's
/// listeners get 128 (mio's, after the standard library): a burst of clients arriving faster
/// than the accept loop runs overflows that, and the kernel drops what does not fit - the
/// clients' SYNs wait for a retransmission, and a client whose handshake completed as the queue
/// filled may believe it is connected while the proxy never sees it.
pub fn listen(addr: SocketAddr, max_connections: usize) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(max_connections).unwrap_or(u32::MAX))
}

/// Accepts until the drain starts, bounding open connections with `slots`, and runs `handle`
/// for each connection on its own task. Failures are counted under `direction`.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    proxy: Arc<Proxy>,
    direction: &'static str,
    slots: Arc<Semaphore>,
    drain: crate::drain::Watch,
    handle: F,
) where
    F: Fn(Arc<Proxy>, tokio::net::TcpStream, crate::drain::Watch) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    let handle = Arc::new(handle);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, direction, "proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            proxy.metrics.error(direction, "connection_limit");
            continue;
        };
        let proxy = Arc::clone(&proxy);
        let handle = Arc::clone(&handle);
        let drain = drain.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let metrics = proxy.metrics.clone();
            // The connection holds `drain` until it ends: shutdown waits for it (HTTP connections
            // close gracefully when the drain starts; opaque ones run until the deadline).
            if let Err(e) = handle(proxy, stream, drain).await {
                metrics.error(direction, e.reason());
                tracing::debug!(error = %e, direction, "connection ended");
            }
        });
    }
}

/// Reads (without consuming) the first bytes until the protocol is clear or the detect timeout
/// passes (then it is opaque: server-speaks-first protocols send nothing). An HTTP/1 request
/// asking for an Upgrade (WebSocket) is carried as opaque TCP, untouched.
async fn detect_protocol(stream: &tokio::net::TcpStream, timeout: Duration) -> detect::Protocol {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 8192];
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return detect::Protocol::Opaque,
        };
        let prefix = &buf[..peeked];
        if let Some(protocol) = detect::detect(prefix) {
            if protocol == detect::Protocol::Http1 {
                let head_end = prefix.windows(4).position(|w| w == b"\r\n\r\n");
                if head_end.is_none() && peeked < buf.len() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                let head = String::from_utf8_lossy(&prefix[..head_end.unwrap_or(peeked)]).to_ascii_lowercase();
                if head.contains("\nupgrade:") {
                    return detect::Protocol::Opaque;
                }
            }
            return protocol;
        }
        if peeked == 0 || tokio::time::Instant::now() >= deadline {
            return detect::Protocol::Opaque;
        }
        // More bytes are on their way; peek does not wait for new ones.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Connects with the proxy's connect timeout.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<tokio::net::TcpStream, Error> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Connect { addr, reason: format!("no answer within {}ms", timeout.as_millis()) })?
        .map_err(|e| Error::Connect { addr, reason: e.to_string() })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
