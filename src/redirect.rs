//! Transparent mode: the nftables rules that send local clients' TCP to the outbound port and
//! chosen inbound ports to the inbound proxy, never touching the proxy's own traffic.
//!
//! Everything lives in one table, `inet meshkeep`, replaced in one `nft -f` transaction, so
//! installing twice is harmless and removing leaves nothing behind. Run as root (the systemd
//! unit does it in `ExecStartPre=+`); the daemon itself needs no network privileges.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::config::{ProxyConfig, RedirectConfig};

/// The nftables table meshkeep owns.
pub const TABLE: &str = "meshkeep";

/// A redirect error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The proxy's user does not exist on this system.
    #[error("user {0:?} does not exist")]
    UnknownUser(String),
    /// A CIDR in the configuration is malformed.
    #[error("{0:?} is not an address or CIDR")]
    BadCidr(String),
    /// `nft` could not be run or refused the rules.
    #[error("nft: {0}")]
    Nft(String),
}

/// An address block, split by family for nftables' `ip` and `ip6` matches.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Self, Error> {
        let bad = || Error::BadCidr(text.to_owned());
        let (addr, prefix) = text.split_once('/').map_or((text, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn set<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Checks that a string is an address or CIDR (configuration validation).
pub fn check_cidr(text: &str) -> Result<(), Error> {
    Cidr::parse(text).map(|_| ())
}

/// The complete ruleset for `nft -f`: replaces the meshkeep table atomically.
pub fn ruleset(redirect: &RedirectConfig, proxy: &ProxyConfig, proxy_uid: u32) -> Result<String, Error> {
    let include = redirect.outbound_cidrs.iter().map(|c| Cidr::parse(c)).collect::<Result<Vec<_>, _>>()?;
    let exclude = redirect.exclude_cidrs.iter().map(|c| Cidr::parse(c)).collect::<Result<Vec<_>, _>>()?;
    let (v4, v6): (Vec<&Cidr>, Vec<&Cidr>) = include.iter().partition(|c| c.addr.is_ipv4());
    let (skip4, skip6): (Vec<&Cidr>, Vec<&Cidr>) = exclude.iter().partition(|c| c.addr.is_ipv4());
    let outbound_port = proxy.outbound_listen.port();
    let inbound_port = proxy.inbound_listen.port();

    let mut out = String::new();
    out.push_str(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"));
    out.push_str(&format!("table inet {TABLE} {{\n"));
    out.push_str("  chain output {\n    type nat hook output priority -100; policy accept;\n");
    out.push_str("    meta l4proto != tcp return\n");
    // The proxy's own connections (to endpoints and peers) must never come back to it.
    out.push_str(&format!("    meta skuid {proxy_uid} return\n"));
    if !skip4.is_empty() {
        out.push_str(&format!("    ip daddr {} return\n", set(&skip4)));
    }
    if !skip6.is_empty() {
        out.push_str(&format!("    ip6 daddr {} return\n", set(&skip6)));
    }
    let mut skip_ports: Vec<u16> = redirect.skip_outbound_ports.clone();
    skip_ports.extend(&proxy.skip_ports);
    skip_ports.sort_unstable();
    skip_ports.dedup();
    if !skip_ports.is_empty() {
        out.push_str(&format!("    tcp dport {} return\n", set(&skip_ports)));
    }
    if !v4.is_empty() {
        out.push_str(&format!("    ip daddr {} meta l4proto tcp redirect to :{outbound_port}\n", set(&v4)));
    }
    if !v6.is_empty() {
        out.push_str(&format!("    ip6 daddr {} meta l4proto tcp redirect to :{outbound_port}\n", set(&v6)));
    }
    out.push_str("  }\n");
    if !redirect.inbound_ports.is_empty() {
        out.push_str("  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n");
        out.push_str(&format!("    tcp dport {} redirect to :{inbound_port}\n", set(&redirect.inbound_ports)));
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    Ok(out)
}

/// The uid the proxy runs as.
pub fn proxy_uid(redirect: &RedirectConfig) -> Result<u32, Error> {
    if let Ok(uid) = redirect.proxy_user.parse::<u32>() {
        return Ok(uid);
    }
    nix::unistd::User::from_name(&redirect.proxy_user)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
        .ok_or_else(|| Error::UnknownUser(redirect.proxy_user.clone()))
}

/// Installs (or replaces) the rules.
pub fn install(redirect: &RedirectConfig, proxy: &ProxyConfig) -> Result<String, Error> {
    let rules = ruleset(redirect, proxy, proxy_uid(redirect)?)?;
    nft(&rules)?;
    Ok(rules)
}

/// Removes the rules; removing what is not there is not an error.
pub fn remove() -> Result<(), Error> {
    nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

fn nft(script: &str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Nft(format!("cannot run nft (package nftables): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| Error::Nft(e.to_string()))?;
    }
    let output = child.wait_with_output().map_err(|e| Error::Nft(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Nft(String::from_utf8_lossy(&output.stderr).trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_excludes_the_proxy_and_redirects_the_chosen_traffic() {
        let redirect = RedirectConfig {
            outbound_cidrs: vec!["10.96.0.0/12".into(), "fd00::/8".into()],
            exclude_cidrs: vec!["127.0.0.0/8".into()],
            skip_outbound_ports: vec![22],
            inbound_ports: vec![8080],
            proxy_user: "999".into(),
        };
        let rules = ruleset(&redirect, &ProxyConfig::default(), 999).unwrap();
        assert!(rules.starts_with("table inet meshkeep\ndelete table inet meshkeep\n"), "{rules}");
        let skuid = rules.find("meta skuid 999 return").expect("proxy excluded");
        let redirect_at =
            rules.find("ip daddr { 10.96.0.0/12 } meta l4proto tcp redirect to :4140").expect("v4 redirect");
        assert!(skuid < redirect_at, "the exclusion must come first\n{rules}");
        assert!(rules.contains("ip6 daddr { fd00::/8 } meta l4proto tcp redirect to :4140"), "{rules}");
        assert!(rules.contains("ip daddr { 127.0.0.0/8 } return"), "{rules}");
        assert!(rules.contains("tcp dport { 22 } return"), "{rules}");
        assert!(rules.contains("tcp dport { 8080 } redirect to :4143"), "{rules}");
    }

    #[test]
    fn malformed_cidrs_are_refused() {
        for bad in ["10.0.0.0/33", "nope", "fd00::/129", "1.2.3.4/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Cidr::parse("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
    }
}
