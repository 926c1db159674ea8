//! Proxy metrics with Linkerd's names: tcp_open_total, tcp_close_total, tcp_open_connections,
//! tcp_read_bytes_total, tcp_write_bytes_total. Labels are bounded: a target is a service name
//! or a port, never a client address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a proxied connection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `true` (mTLS between proxies), `no_identity` (plain TCP to an unmeshed destination) or
    /// `passthrough` (an unknown destination, forwarded unchanged).
    pub tls: &'static str,
    /// The service (outbound) or local port (inbound) the connection is for.
    pub target: String,
    /// The peer's mesh identity (inbound) or the destination's (outbound); empty without TLS.
    pub identity: String,
}

/// Why a connection was refused or failed before it could be proxied.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct ProxyMetrics {
    pub open: Family<ConnectionLabels, Counter>,
    pub close: Family<ConnectionLabels, Counter>,
    pub open_connections: Family<ConnectionLabels, Gauge>,
    pub read_bytes: Family<ConnectionLabels, Counter>,
    pub write_bytes: Family<ConnectionLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
}

impl ProxyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("tcp_open", "Connections opened", self.open.clone());
        registry.register("tcp_close", "Connections closed", self.close.clone());
        registry.register("tcp_open_connections", "Connections currently open", self.open_connections.clone());
        registry.register("tcp_read_bytes", "Bytes read from clients (inbound: from peers)", self.read_bytes.clone());
        registry.register("tcp_write_bytes", "Bytes written to clients", self.write_bytes.clone());
        registry.register(
            "meshkeep_proxy_errors",
            "Connections refused or failed before proxying",
            self.errors.clone(),
        );
    }

    pub fn error(&self, direction: &'static str, reason: &'static str) {
        self.errors.get_or_create(&ErrorLabels { direction, reason }).inc();
    }
}

/// Counts a connection as open until dropped.
#[derive(Debug)]
pub struct OpenConnection {
    metrics: ProxyMetrics,
    labels: ConnectionLabels,
}

impl OpenConnection {
    pub fn new(metrics: &ProxyMetrics, labels: ConnectionLabels) -> Self {
        metrics.open.get_or_create(&labels).inc();
        metrics.open_connections.get_or_create(&labels).inc();
        Self { metrics: metrics.clone(), labels }
    }

    pub fn read_counter(&self) -> Counter {
        self.metrics.read_bytes.get_or_create(&self.labels).clone()
    }

    pub fn write_counter(&self) -> Counter {
        self.metrics.write_bytes.get_or_create(&self.labels).clone()
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.open_connections.get_or_create(&self.labels).dec();
        self.metrics.close.get_or_create(&self.labels).inc();
    }
}

/// Labels of authorization decisions (Linkerd's `inbound_*_authz_*_total`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// The local port the client asked for.
    pub target_port: u16,
    /// What decided: `TrafficTarget ns/name` or `default:<policy>`.
    pub authz: String,
}

/// inbound_http_authz_allow_total, inbound_http_authz_deny_total and the TCP equivalents.
#[derive(Debug, Clone, Default)]
pub struct AuthzMetrics {
    pub http_allow: Family<AuthzLabels, Counter>,
    pub http_deny: Family<AuthzLabels, Counter>,
    pub tcp_allow: Family<AuthzLabels, Counter>,
    pub tcp_deny: Family<AuthzLabels, Counter>,
}

impl AuthzMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("inbound_http_authz_allow", "HTTP requests authorized", self.http_allow.clone());
        registry.register("inbound_http_authz_deny", "HTTP requests denied", self.http_deny.clone());
        registry.register("inbound_tcp_authz_allow", "Connections authorized", self.tcp_allow.clone());
        registry.register("inbound_tcp_authz_deny", "Connections denied", self.tcp_deny.clone());
    }
}
