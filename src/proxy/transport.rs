//! The header one meshkeep proxy sends another right after their mTLS handshake (ALPN
//! `meshkeep/1`): which local port on the peer the connection is for, and what it carries.
//!
//! Layout: magic `MK1`, protocol byte, target port (u16 BE), authority length (u8), authority.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::detect::Protocol;

/// ALPN protocol id of proxy-to-proxy connections.
pub const ALPN: &[u8] = b"meshkeep/1";
const MAGIC: &[u8; 3] = b"MK1";

/// Where a proxied connection goes on the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub target_port: u16,
    pub protocol: Protocol,
    /// The service name the client asked for, if known (for the peer's metrics and policy).
    pub authority: Option<String>,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("not a meshkeep transport header")]
    BadMagic,
    #[error("unknown protocol {0}")]
    BadProtocol(u8),
    #[error("target port 0")]
    BadPort,
    #[error("authority is not UTF-8")]
    BadAuthority,
    #[error("reading the transport header: {0}")]
    Io(#[from] std::io::Error),
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let authority = self.authority.as_deref().unwrap_or_default().as_bytes();
        let authority = &authority[..authority.len().min(255)];
        let mut out = Vec::with_capacity(7 + authority.len());
        out.extend_from_slice(MAGIC);
        out.push(match self.protocol {
            Protocol::Opaque => 0,
            Protocol::Http1 => 1,
            Protocol::Http2 => 2,
            Protocol::Tls => 3,
        });
        out.extend_from_slice(&self.target_port.to_be_bytes());
        out.push(authority.len() as u8);
        out.extend_from_slice(authority);
        out
    }

    /// Reads one header; at most 262 bytes are read, so a peer cannot make it allocate more.
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, HeaderError> {
        let mut fixed = [0u8; 7];
        reader.read_exact(&mut fixed).await?;
        if &fixed[..3] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let protocol = match fixed[3] {
            0 => Protocol::Opaque,
            1 => Protocol::Http1,
            2 => Protocol::Http2,
            3 => Protocol::Tls,
            other => return Err(HeaderError::BadProtocol(other)),
        };
        let target_port = u16::from_be_bytes([fixed[4], fixed[5]]);
        if target_port == 0 {
            return Err(HeaderError::BadPort);
        }
        let mut authority = vec![0u8; usize::from(fixed[6])];
        reader.read_exact(&mut authority).await?;
        let authority = String::from_utf8(authority).map_err(|_| HeaderError::BadAuthority)?;
        Ok(Self { target_port, protocol, authority: (!authority.is_empty()).then_some(authority) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_round_trip_and_garbage_is_refused() {
        let header = Header {
            target_port: 8080,
            protocol: Protocol::Http1,
            authority: Some("api.shop.svc.cluster.local".into()),
        };
        let bytes = header.encode();
        assert_eq!(Header::read(&mut bytes.as_slice()).await.unwrap(), header);
        assert!(matches!(Header::read(&mut &b"GET / HTTP/1.1\r\n"[..]).await, Err(HeaderError::BadMagic)));
        assert!(matches!(Header::read(&mut &b"MK1\x09\x00\x50\x00"[..]).await, Err(HeaderError::BadProtocol(9))));
        assert!(matches!(Header::read(&mut &b"MK1\x00\x00\x00\x00"[..]).await, Err(HeaderError::BadPort)));
        assert!(matches!(Header::read(&mut &b"MK1\x00\x00\x50\x05ab"[..]).await, Err(HeaderError::Io(_))));
    }
}
