//! Names that are not the mesh's go to upstream resolvers, tried in order, each with a timeout,
//! under a fresh random query ID; answers are cached by name and type for at most their TTL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Forwarded answers are never kept longer than this, whatever their TTL says.
const MAX_CACHE_TTL: Duration = Duration::from_secs(300);

/// Cache key: lowercase name, type, class.
type Key = (String, u16, u16);

#[derive(Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    capacity: usize,
    cache: Mutex<HashMap<Key, Cached>>,
}

#[derive(Debug, Clone)]
struct Cached {
    expires: Instant,
    /// The upstream's answer, ID and all; the ID is replaced per client.
    wire: Vec<u8>,
}

/// Where a forwarded answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Cached,
    Answered,
    /// Every upstream failed or timed out.
    Failed,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration, capacity: usize) -> Self {
        Self { upstreams, timeout, capacity, cache: Mutex::new(HashMap::new()) }
    }

    pub fn is_configured(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// The answer to `query` (wire bytes, parsed as `message`) with the client's ID, or `None`
    /// when no upstream answered.
    pub async fn forward(&self, query: &[u8], message: &Message) -> (Option<Vec<u8>>, Outcome) {
        let key = message
            .queries
            .first()
            .map(|q| (q.name().to_lowercase().to_ascii(), u16::from(q.query_type()), u16::from(q.query_class())));
        let client_id = message.metadata.id;
        if let Some(key) = &key
            && let Some(mut wire) = self.cached(key)
        {
            wire[..2].copy_from_slice(&client_id.to_be_bytes());
            return (Some(wire), Outcome::Cached);
        }
        let mut outgoing = query.to_vec();
        for upstream in &self.upstreams {
            let id = random_id();
            outgoing[..2].copy_from_slice(&id.to_be_bytes());
            let answer = match tokio::time::timeout(self.timeout, exchange(*upstream, &outgoing, id)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    tracing::debug!(%upstream, error = %e, "dns: upstream failed");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(%upstream, "dns: upstream timed out");
                    continue;
                }
            };
            let Ok(parsed) = Message::from_vec(&answer) else { continue };
            if parsed.metadata.response_code == ResponseCode::ServFail {
                continue;
            }
            if let Some(key) = key {
                self.remember(key, &parsed, &answer);
            }
            let mut answer = answer;
            answer[..2].copy_from_slice(&client_id.to_be_bytes());
            return (Some(answer), Outcome::Answered);
        }
        (None, Outcome::Failed)
    }

    fn cached(&self, key: &Key) -> Option<Vec<u8>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).filter(|c| c.expires > Instant::now()).map(|c| c.wire.clone())
    }

    fn remember(&self, key: Key, parsed: &Message, wire: &[u8]) {
        if parsed.metadata.truncation || self.capacity == 0 {
            return;
        }
        // The smallest TTL of the answer; a negative answer's from its SOA.
        let ttl = parsed
            .answers
            .iter()
            .map(|r| r.ttl)
            .min()
            .or_else(|| parsed.authorities.iter().find(|r| r.record_type() == RecordType::SOA).map(|r| r.ttl))
            .unwrap_or(0);
        let ttl = Duration::from_secs(u64::from(ttl)).min(MAX_CACHE_TTL);
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.capacity {
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= self.capacity {
                // Still full of live entries: drop the one closest to expiry.
                if let Some(oldest) = cache.iter().min_by_key(|(_, c)| c.expires).map(|(k, _)| k.clone()) {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert(key, Cached { expires: now + ttl, wire: wire.to_vec() });
    }
}

/// One query to one upstream over UDP, falling back to TCP when the answer is truncated.
async fn exchange(upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr =
        if upstream.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.map_err(std::io::Error::other)?;
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Anything but the answer to our ID (late or spoofed) is ignored.
        if n < 12 || buf[..2] != id.to_be_bytes() {
            continue;
        }
        let truncated = buf[2] & 0x02 != 0;
        if !truncated {
            return Ok(buf[..n].to_vec());
        }
        return exchange_tcp(upstream, query).await;
    }
}

async fn exchange_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(query).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

fn random_id() -> u16 {
    let mut bytes = [0u8; 2];
    // SystemRandom only fails when the OS has no randomness at all; a fixed ID still works.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    u16::from_be_bytes(bytes)
}
