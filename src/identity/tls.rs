//! rustls configurations built from the current certificate: mutual TLS 1.3 where each side
//! proves a mesh identity, with cipher suites ordered by what the CPU accelerates.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::Error;
use super::ca::Leaf;

/// Whether the CPU has AES instructions. Without them (Raspberry Pi 3 and 4, most armv7),
/// ChaCha20-Poly1305 is several times faster than AES-GCM.
pub fn has_aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The ring provider with TLS 1.3 suites only, ChaCha20 first unless AES is accelerated.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let cipher_suites = if has_aes_hardware() {
        vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256]
    } else {
        vec![TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384]
    };
    Arc::new(CryptoProvider { cipher_suites, ..rustls::crypto::ring::default_provider() })
}

fn roots(leaf: &Leaf) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for anchor in &leaf.trust_anchors {
        roots.add(anchor.clone()).map_err(|e| Error::BadMaterial { what: "trust anchor", reason: e.to_string() })?;
    }
    Ok(Arc::new(roots))
}

fn key(leaf: &Leaf) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
        .map_err(|e| Error::BadMaterial { what: "private key", reason: e.to_string() })
}

/// The inbound side: presents `leaf` and requires a client certificate from the same trust
/// anchors (peers without one are handled by the caller, before TLS).
pub fn server_config(leaf: &Leaf, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(leaf)?, Arc::clone(&provider))
        .build()
        .map_err(|e| Error::BadMaterial { what: "client verifier", reason: e.to_string() })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Crypto(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(leaf.chain.clone(), key(leaf)?)
        .map_err(|e| Error::BadMaterial { what: "certificate and key", reason: e.to_string() })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The outbound side: presents `leaf` and verifies that the server's certificate chains to the
/// trust anchors and names the identity the connection is made for (the TLS server name).
pub fn client_config(leaf: &Leaf, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Crypto(e.to_string()))?
        .with_root_certificates(roots(leaf)?)
        .with_client_auth_cert(leaf.chain.clone(), key(leaf)?)
        .map_err(|e| Error::BadMaterial { what: "certificate and key", reason: e.to_string() })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The mesh identity (DNS SAN) in a peer's verified end-entity certificate.
pub fn peer_identity(certificates: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let der = certificates?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let sans = cert.subject_alternative_name().ok()??;
    sans.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection};

    use super::*;
    use crate::identity::IdentityName;
    use crate::identity::ca::{Issuer, standalone};

    fn leaf(issuer: &Issuer, sa: &str) -> Leaf {
        let name = IdentityName::new("shop", sa, "cluster.local", "linkerd");
        issuer.issue(&name, SystemTime::now(), Duration::from_secs(3600), Duration::from_secs(60)).unwrap()
    }

    /// Shuttles handshake bytes between the two sides in memory.
    fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), rustls::Error> {
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    fn connect(
        client_leaf: &Leaf,
        server_leaf: &Leaf,
        server_name: &str,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let client_config = client_config(client_leaf, &[]).unwrap();
        let server_config = server_config(server_leaf, &[]).unwrap();
        let mut client = ClientConnection::new(client_config, ServerName::try_from(server_name.to_owned()).unwrap())?;
        let mut server = ServerConnection::new(server_config)?;
        handshake(&mut client, &mut server)?;
        Ok((client, server))
    }

    #[test]
    fn two_identities_from_one_issuer_complete_mutual_tls_and_see_each_other() {
        let issuer =
            Issuer::from_pem(&standalone("cluster.local", SystemTime::now(), Duration::from_secs(86400)).unwrap())
                .unwrap();
        let (web, api) = (leaf(&issuer, "web"), leaf(&issuer, "api"));
        let (client, server) = connect(&web, &api, &api.name.dns_name()).expect("mTLS handshake");
        assert_eq!(peer_identity(server.peer_certificates()).as_deref(), Some(web.name.dns_name().as_str()));
        assert_eq!(peer_identity(client.peer_certificates()).as_deref(), Some(api.name.dns_name().as_str()));
    }

    #[test]
    fn the_wrong_identity_or_another_root_is_refused() {
        let now = SystemTime::now();
        let issuer = Issuer::from_pem(&standalone("cluster.local", now, Duration::from_secs(86400)).unwrap()).unwrap();
        let other = Issuer::from_pem(&standalone("cluster.local", now, Duration::from_secs(86400)).unwrap()).unwrap();
        let (web, api) = (leaf(&issuer, "web"), leaf(&issuer, "api"));
        assert!(connect(&web, &api, &web.name.dns_name()).is_err(), "server must present the identity asked for");
        let stranger = leaf(&other, "api");
        assert!(connect(&web, &stranger, &stranger.name.dns_name()).is_err(), "server from another root");
        assert!(connect(&stranger, &api, &api.name.dns_name()).is_err(), "client from another root");
    }

    #[test]
    fn cipher_suites_follow_the_cpu() {
        let first = provider().cipher_suites[0].suite();
        if has_aes_hardware() {
            assert_eq!(first, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        } else {
            assert_eq!(first, rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
        }
    }
}
