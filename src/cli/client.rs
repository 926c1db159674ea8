//! A small HTTP/1.1 client for the local admin endpoint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Why the admin endpoint could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: the daemon is not running.
    #[error("admin endpoint {addr} is not reachable: {source}")]
    Unreachable { addr: SocketAddr, source: std::io::Error },
    /// Something answered, but not like the admin endpoint.
    #[error("admin endpoint {addr}: {message}")]
    Protocol { addr: SocketAddr, message: String },
}

/// Response bodies larger than this are refused.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

/// GET `path`, returning status and body.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), ClientError> {
    let unreachable = |source| ClientError::Unreachable { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(unreachable)?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(unreachable)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: meshkeep-cli\r\n\r\n")
        .map_err(unreachable)?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw).map_err(unreachable)?;
    let protocol = |message: &str| ClientError::Protocol { addr, message: message.to_owned() };
    let text = String::from_utf8(raw).map_err(|_| protocol("response is not UTF-8"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| protocol("incomplete response"))?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| protocol("no status line"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked { dechunk(body).ok_or_else(|| protocol("bad chunked body"))? } else { body.to_owned() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

/// Percent-encodes a query value.
pub fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
