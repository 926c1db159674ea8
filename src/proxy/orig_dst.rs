//! The address a redirected connection was originally sent to (SO_ORIGINAL_DST, set by
//! iptables/nftables REDIRECT or DNAT).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// The original destination, or `None` when the connection was not redirected.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let original = match local {
        SocketAddr::V4(_) => {
            let addr = getsockopt(stream, sockopt::OriginalDst).ok()?;
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                u16::from_be(addr.sin_port),
            ))
        }
        SocketAddr::V6(_) => {
            let addr = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
                addr.sin6_flowinfo,
                addr.sin6_scope_id,
            ))
        }
    };
    // Without NAT the kernel answers with the socket's own address (or not at all).
    (original != local).then_some(original)
}
