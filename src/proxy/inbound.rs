//! Inbound: peers to local workloads. mTLS from meshkeep peers carries a transport header naming
//! the local port; plaintext (redirected) connections are accepted or refused by policy.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::memo::Memo;
use super::metrics::AuthzLabels;
use super::metrics::{ConnectionLabels, OpenConnection};
use super::tcp::{Counted, splice};
use super::transport::{ALPN, Header};
use super::{Error, Proxy, connect, orig_dst};
use crate::config::PlaintextPolicy;
use crate::drain;
use crate::identity::tls::peer_identity;
use crate::policy::RequestInfo;
use crate::policy::authz::{self, Destination, Verdict};
use crate::store::Snapshot;

/// Accepts until the drain starts.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, drain: drain::Watch) {
    let slots = Arc::clone(&proxy.inbound_slots);
    super::accept_loop(listener, proxy, "inbound", slots, drain, |proxy, stream, drain| async move {
        handle(proxy, stream, drain).await
    })
    .await;
}

async fn handle(proxy: Arc<Proxy>, stream: TcpStream, drain: drain::Watch) -> Result<(), Error> {
    let _ = stream.set_nodelay(true);
    // Peers send their ClientHello at once. A client still silent at the detect timeout is
    // plaintext whose server speaks first (redirected MySQL, SMTP), as on the outbound side.
    let mut first = [0u8; 1];
    match tokio::time::timeout(proxy.detect_timeout, stream.peek(&mut first)).await {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(_)) if first[0] == 0x16 => mutual_tls(proxy, stream, drain).await,
        Ok(Ok(_)) | Err(_) => plaintext(&proxy, stream).await,
        Ok(Err(e)) => Err(e.into()),
    }
}

async fn mutual_tls(proxy: Arc<Proxy>, stream: TcpStream, drain: drain::Watch) -> Result<(), Error> {
    let tls = proxy.current_tls().ok_or(Error::NoCertificate)?;
    let accept = TlsAcceptor::from(Arc::clone(&tls.server)).accept(stream);
    let mut session = tokio::time::timeout(proxy.detect_timeout * 5, accept)
        .await
        .map_err(|_| Error::Timeout("TLS handshake"))?
        .map_err(|e| Error::Tls { peer: "client".into(), reason: e.to_string() })?;
    let (_, connection) = session.get_ref();
    if connection.alpn_protocol() != Some(ALPN) {
        return Err(Error::Refused("TLS without the meshkeep protocol"));
    }
    let client_identity = peer_identity(connection.peer_certificates());
    let header = tokio::time::timeout(proxy.detect_timeout * 5, Header::read(&mut session))
        .await
        .map_err(|_| Error::Timeout("transport header"))??;
    let labels = ConnectionLabels {
        direction: "inbound",
        tls: "true",
        target: header.target_port.to_string(),
        identity: client_identity.clone().unwrap_or_default(),
    };
    if header.protocol == super::detect::Protocol::Http2 {
        let open = OpenConnection::new(&proxy.metrics, labels);
        let session = Counted::new(session, open.read_counter(), open.write_counter());
        let authority = header.authority.clone().unwrap_or_else(|| header.target_port.to_string());
        tracing::debug!(%authority, "inbound: HTTP/2 from a peer");
        let peer = super::http::InboundPeer {
            default_port: header.target_port,
            authority,
            metrics: std::sync::OnceLock::new(),
            identity: client_identity,
            admission: Admission::default(),
        };
        return super::http::serve_inbound(Arc::clone(&proxy), session, peer, drain).await;
    }
    authorize_connection(&proxy, header.target_port, client_identity.as_deref())?;
    let open = OpenConnection::new(&proxy.metrics, labels);
    let session = Counted::new(session, open.read_counter(), open.write_counter());
    let target = SocketAddr::new(proxy.inbound_target, header.target_port);
    let mut local = connect(target, proxy.connect_timeout).await?;
    let mut session = session;
    splice(&mut session, &mut local, proxy.tcp_idle_timeout).await?;
    drop(open);
    Ok(())
}

async fn plaintext(proxy: &Proxy, stream: TcpStream) -> Result<(), Error> {
    if proxy.inbound_plaintext == PlaintextPolicy::Refuse {
        return Err(Error::Refused("plaintext to the inbound port"));
    }
    // Plaintext reaches the inbound port only by redirect: forward to the port it was sent to.
    let original = orig_dst::original_dst(&stream).ok_or(Error::NotRedirected)?;
    authorize_connection(proxy, original.port(), None)?;
    let labels = ConnectionLabels {
        direction: "inbound",
        tls: "no_identity",
        target: original.port().to_string(),
        identity: String::new(),
    };
    let open = OpenConnection::new(&proxy.metrics, labels);
    let mut local = connect(SocketAddr::new(proxy.inbound_target, original.port()), proxy.connect_timeout).await?;
    let mut client = Counted::new(stream, open.read_counter(), open.write_counter());
    splice(&mut client, &mut local, proxy.tcp_idle_timeout).await?;
    drop(open);
    Ok(())
}

/// Authorizes an opaque connection to a local port; a denial closes it.
fn authorize_connection(proxy: &Proxy, port: u16, client: Option<&str>) -> Result<(), Error> {
    let snapshot = proxy.snapshots.borrow().clone();
    let verdict = authorize(proxy, &snapshot, port, client, None);
    let labels = AuthzLabels { target_port: port, authz: verdict.by.clone() };
    if verdict.allowed {
        proxy.authz.tcp_allow.get_or_create(&labels).inc();
        return Ok(());
    }
    proxy.authz.tcp_deny.get_or_create(&labels).inc();
    let reason = verdict.reason.unwrap_or_else(|| "denied".into());
    tracing::debug!(port, client = client.unwrap_or("(no identity)"), %reason, "inbound: connection denied");
    Err(Error::Forbidden(reason))
}

/// The authorization decision for the workload this box serves.
fn authorize(
    proxy: &Proxy,
    snapshot: &Snapshot,
    port: u16,
    client: Option<&str>,
    request: Option<&RequestInfo<'_>>,
) -> Verdict {
    let (namespace, service_account) = &proxy.local_workload;
    let destination = Destination { namespace, service_account, port };
    let verdict = authz::authorize(snapshot, &proxy.settings, destination, client, request, proxy.policy.default);
    if let (true, Some(reason)) = (verdict.allowed, &verdict.reason) {
        // Audit: let through, but say what a stricter policy would have refused.
        tracing::info!(port, client = client.unwrap_or("(no identity)"), %reason, "inbound: audit");
    }
    verdict
}

/// The HTTP requests of one peer connection come from one client identity. Under the default
/// policy (no TrafficTarget selects the workload) they all get the same verdict, so the last
/// one that no request decided is kept, with its counter, while the snapshot and the port stay
/// the same.
#[derive(Debug, Default)]
pub struct Admission {
    /// The target port and the counter of a verdict no request decided (the default policy's).
    kept: Memo<u16, Counter>,
}

impl Admission {
    /// Authorizes one request from `client` to the local `port`, and counts the verdict: the
    /// reason for a denial.
    pub(super) fn check(
        &self,
        proxy: &Proxy,
        port: u16,
        client: Option<&str>,
        request: &RequestInfo<'_>,
    ) -> Result<(), String> {
        let snapshot = {
            let current = proxy.snapshots.borrow();
            if self.kept.get(&current, |kept| *kept == port, Counter::inc).is_some() {
                return Ok(());
            }
            Arc::clone(&current)
        };
        // Decided without the lock: the connection's other requests do not wait for it.
        let verdict = authorize(proxy, &snapshot, port, client, Some(request));
        let labels = AuthzLabels { target_port: port, authz: verdict.by };
        if !verdict.allowed {
            proxy.authz.http_deny.get_or_create(&labels).inc();
            return Err(verdict.reason.unwrap_or_else(|| "denied".into()));
        }
        let allowed = proxy.authz.http_allow.get_or_create(&labels).clone();
        allowed.inc();
        // An audited request is logged each time; a verdict a TrafficTarget decided holds for
        // its request alone. The counter stays valid: the families never drop a series.
        self.kept.keep(&snapshot, (!verdict.per_request && verdict.reason.is_none()).then_some((port, allowed)));
        Ok(())
    }
}
