//! DNS for mesh names over UDP and TCP, answered from the store's snapshot, so it keeps
//! answering while the uplink is cut and after a reboot without it. Other names go to the
//! configured upstream resolvers, or are refused when there are none.
//!
//! Messages are parsed and built with hickory-proto; the sockets, limits and decisions are ours.
//! A malformed message gets FORMERR when it has an ID to answer to, and is dropped otherwise.

pub mod answer;
pub mod forward;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::config::DnsConfig;
use crate::drain;
use crate::store::Snapshots;
use answer::{Decision, Zone};
use forward::{Forwarder, Outcome};

/// The UDP payload we offer with EDNS (the DNS flag day 2020 recommendation).
const EDNS_PAYLOAD: u16 = 1232;
/// Concurrent TCP connections; more are closed at once.
const TCP_CONNECTIONS: usize = 256;
/// A TCP client silent for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// UDP queries being answered at once (forwarded ones wait on upstreams); beyond this, new
/// queries are dropped as a busy resolver would, and the client retries.
const UDP_IN_FLIGHT: usize = 1024;

/// The DNS server's shared state.
#[derive(Debug)]
pub struct Server {
    zone: Zone,
    snapshots: Snapshots,
    forwarder: Forwarder,
    metrics: DnsMetrics,
}

/// How a query arrived: UDP answers are truncated to what the client takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

impl Server {
    pub fn new(config: &DnsConfig, settings: crate::discovery::Settings, snapshots: Snapshots) -> Self {
        let ttl = u32::try_from(config.ttl.get().as_secs()).unwrap_or(u32::MAX);
        Self {
            zone: Zone { settings, ttl, short_names: config.short_names },
            snapshots,
            forwarder: Forwarder::new(config.upstreams.clone(), config.upstream_timeout.get(), config.cache_entries),
            metrics: DnsMetrics::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    /// The answer to one message, or `None` when there is nothing to answer to.
    pub(crate) async fn handle(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let started = Instant::now();
        let message = match Message::from_vec(query) {
            Ok(message) => message,
            Err(_) if query.len() >= 2 => {
                let id = u16::from_be_bytes([query[0], query[1]]);
                self.metrics.count("none", ResponseCode::FormErr, "local", started);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok();
            }
            Err(_) => return None,
        };
        if message.metadata.message_type != MessageType::Query {
            return None;
        }
        let (wire, qtype, code, by) = self.respond(query, &message, transport).await;
        self.metrics.count(type_label(qtype), code, by, started);
        wire
    }

    async fn respond(
        &self,
        query: &[u8],
        message: &Message,
        transport: Transport,
    ) -> (Option<Vec<u8>>, Option<RecordType>, ResponseCode, &'static str) {
        let mut response = Message::response(message.metadata.id, message.metadata.op_code);
        response.metadata = Metadata::response_from_request(&message.metadata);
        response.metadata.recursion_available = self.forwarder.is_configured();
        if message.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.set_edns(edns);
        }
        let refuse = |mut response: Message, code: ResponseCode| {
            response.metadata.response_code = code;
            response
        };
        let question = match message.queries.as_slice() {
            [question] => question.clone(),
            _ => return (refuse(response, ResponseCode::FormErr).to_vec().ok(), None, ResponseCode::FormErr, "local"),
        };
        let qtype = question.query_type();
        response.add_query(question.clone());
        if message.metadata.op_code != OpCode::Query {
            return (refuse(response, ResponseCode::NotImp).to_vec().ok(), Some(qtype), ResponseCode::NotImp, "local");
        }
        if message.edns.as_ref().is_some_and(|e| e.version() > 0) {
            let code = ResponseCode::BADVERS;
            return (refuse(response, code).to_vec().ok(), Some(qtype), code, "local");
        }
        let decision = if question.query_class() == DNSClass::IN {
            let snapshot = self.snapshots.borrow().clone();
            self.zone.decide(&snapshot, question.name(), qtype)
        } else {
            Decision::Forward
        };
        match decision {
            Decision::Answer(answer) => {
                let answer = *answer;
                response.metadata.authoritative = true;
                response.metadata.response_code = answer.code;
                response.add_answers(answer.answers);
                response.add_additionals(answer.additionals);
                if let Some(soa) = answer.authority {
                    response.add_authority(*soa);
                }
                let code = response.metadata.response_code;
                (fit(response, message, transport), Some(qtype), code, "mesh")
            }
            Decision::Forward if self.forwarder.is_configured() => {
                let (answer, outcome) = self.forwarder.forward(query, message).await;
                self.metrics.forwarded.get_or_create(&ForwardLabels { result: outcome.label() }).inc();
                match answer {
                    Some(wire) if transport == Transport::Tcp || wire.len() <= udp_limit(message) => {
                        let code = Message::from_vec(&wire).map_or(ResponseCode::NoError, |m| m.metadata.response_code);
                        (Some(wire), Some(qtype), code, "forward")
                    }
                    // Too large for this client over UDP: it retries over TCP.
                    Some(_) => (fit_truncated(response), Some(qtype), ResponseCode::NoError, "forward"),
                    None => {
                        let code = ResponseCode::ServFail;
                        (refuse(response, code).to_vec().ok(), Some(qtype), code, "forward")
                    }
                }
            }
            Decision::Forward => {
                let code = ResponseCode::Refused;
                (refuse(response, code).to_vec().ok(), Some(qtype), code, "local")
            }
        }
    }
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Answered => "answered",
            Outcome::Failed => "failed",
        }
    }
}

/// The largest UDP answer this client takes: 512 bytes without EDNS, else its advertised size
/// up to ours.
fn udp_limit(query: &Message) -> usize {
    usize::from(query.max_payload().min(EDNS_PAYLOAD))
}

/// Encodes `response`; over UDP an answer larger than the client takes is truncated (TC set,
/// records dropped) so the client asks again over TCP.
fn fit(response: Message, query: &Message, transport: Transport) -> Option<Vec<u8>> {
    let wire = response.to_vec().ok()?;
    if transport == Transport::Udp && wire.len() > udp_limit(query) {
        return fit_truncated(response);
    }
    Some(wire)
}

fn fit_truncated(response: Message) -> Option<Vec<u8>> {
    response.truncate().to_vec().ok()
}

/// Binds UDP and TCP on `addr`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(addr).await?;
    let tcp = TcpListener::bind(addr).await?;
    Ok((udp, tcp))
}

/// Serves until the drain starts.
pub async fn serve(server: Arc<Server>, (udp, tcp): (UdpSocket, TcpListener), drain: drain::Watch) {
    let udp = Arc::new(udp);
    let udp_task = tokio::spawn(serve_udp(Arc::clone(&server), Arc::clone(&udp)));
    let tcp_task = tokio::spawn(serve_tcp(server, tcp));
    drain.signaled().await;
    udp_task.abort();
    tcp_task.abort();
}

async fn serve_udp(server: Arc<Server>, socket: Arc<UdpSocket>) {
    let slots = Arc::new(Semaphore::new(UDP_IN_FLIGHT));
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                // ICMP errors from earlier sends surface here; they concern one client only.
                tracing::debug!(error = %e, "dns: UDP receive failed");
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "dns: too many UDP queries in flight; dropping one");
            continue;
        };
        let query = buf[..n].to_vec();
        let server = Arc::clone(&server);
        let socket = Arc::clone(&socket);
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(answer) = server.handle(&query, Transport::Udp).await {
                let _ = socket.send_to(&answer, peer).await;
            }
        });
    }
}

async fn serve_tcp(server: Arc<Server>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(TCP_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else { continue };
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_tcp_connection(&server, stream).await {
                tracing::debug!(error = %e, "dns: TCP connection ended");
            }
        });
    }
}

/// Length-prefixed messages, answered in order, until the client closes or goes quiet.
async fn serve_tcp_connection(server: &Server, mut stream: TcpStream) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "query body"))??;
        let Some(answer) = server.handle(&query, Transport::Tcp).await else { return Ok(()) };
        let len = u16::try_from(answer.len()).map_err(std::io::Error::other)?;
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(&answer).await?;
    }
}

// ---- metrics ----

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    r#type: &'static str,
    rcode: &'static str,
    /// `mesh` (answered from the snapshot), `forward` (upstream) or `local` (refused, errors).
    answered_by: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabels {
    result: &'static str,
}

#[derive(Debug, Clone)]
struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    forwarded: Family<ForwardLabels, Counter>,
    latency: Histogram,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        const BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 1000.0];
        Self { queries: Family::default(), forwarded: Family::default(), latency: Histogram::new(BUCKETS) }
    }
}

impl DnsMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "meshkeep_dns_queries",
            "DNS queries by type, answer code and answerer",
            self.queries.clone(),
        );
        registry.register(
            "meshkeep_dns_forwarded",
            "DNS queries for other names sent upstream, by result",
            self.forwarded.clone(),
        );
        registry.register(
            "meshkeep_dns_latency_ms",
            "Time to answer a DNS query, in milliseconds",
            self.latency.clone(),
        );
    }

    fn count(&self, qtype: &'static str, code: ResponseCode, answered_by: &'static str, started: Instant) {
        let labels = QueryLabels { r#type: qtype, rcode: rcode_label(code), answered_by };
        self.queries.get_or_create(&labels).inc();
        self.latency.observe(started.elapsed().as_secs_f64() * 1000.0);
    }
}

/// A bounded label for a query type.
fn type_label(qtype: Option<RecordType>) -> &'static str {
    match qtype {
        Some(RecordType::A) => "A",
        Some(RecordType::AAAA) => "AAAA",
        Some(RecordType::SRV) => "SRV",
        Some(RecordType::PTR) => "PTR",
        Some(RecordType::SOA) => "SOA",
        Some(RecordType::TXT) => "TXT",
        Some(RecordType::ANY) => "ANY",
        Some(RecordType::CNAME) => "CNAME",
        Some(RecordType::NS) => "NS",
        Some(_) => "other",
        None => "none",
    }
}

fn rcode_label(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}
