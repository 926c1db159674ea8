//! The certificate authority: parsing issuer material, issuing leaf certificates, and creating
//! a standalone root and intermediate when no issuer is provided.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa,
    KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::{Error, IdentityName};

/// A parsed certificate's validity window and whether it may sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub subject: String,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, Error> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::BadMaterial { what: "certificate", reason: e.to_string() })?;
        let time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 { UNIX_EPOCH + Duration::from_secs(secs as u64) } else { UNIX_EPOCH }
        };
        Ok(Self {
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            is_ca: cert.is_ca(),
            subject: cert.subject().to_string(),
        })
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// Every certificate in a PEM text, in order.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::BadMaterial { what: "PEM certificates", reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(Error::BadMaterial { what: "PEM certificates", reason: "no CERTIFICATE block".into() });
    }
    Ok(certs)
}

/// PEM text for DER certificates.
pub fn pem_of(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))).collect()
}

/// An issuer that can sign leaf certificates: its key, its certificate chain (issuer first, up
/// to but excluding the trust anchor), and the trust anchors.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    /// The issuer's certificate followed by any intermediates above it.
    pub chain: Vec<CertificateDer<'static>>,
    pub trust_anchors: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("info", &self.info).field("chain", &self.chain.len()).finish_non_exhaustive()
    }
}

/// The PEM texts an issuer is made of (what is cached on disk and carried by sources).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuerPem {
    /// The issuer certificate, optionally followed by intermediates.
    pub certificate: String,
    pub private_key: String,
    pub trust_anchors: String,
}

impl std::fmt::Debug for IssuerPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerPem").field("private_key", &"<redacted>").finish_non_exhaustive()
    }
}

impl Issuer {
    /// Parses and checks issuer material: the key must match the certificate, the certificate
    /// must be a CA, and the trust anchors must be present.
    pub fn from_pem(material: &IssuerPem) -> Result<Self, Error> {
        let chain = certificates_from_pem(&material.certificate)?;
        let trust_anchors = certificates_from_pem(&material.trust_anchors)?;
        let key = KeyPair::from_pem(&material.private_key)
            .map_err(|e| Error::BadMaterial { what: "issuer key", reason: e.to_string() })?;
        let info = CertInfo::parse(&chain[0])?;
        if !info.is_ca {
            return Err(Error::BadMaterial { what: "issuer certificate", reason: "not a CA certificate".into() });
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| Error::BadMaterial { what: "issuer certificate", reason: e.to_string() })?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::BadMaterial {
                what: "issuer key",
                reason: "does not match the issuer certificate".into(),
            });
        }
        let signer = rcgen::Issuer::from_ca_cert_der(&chain[0], key)
            .map_err(|e| Error::BadMaterial { what: "issuer certificate", reason: e.to_string() })?;
        Ok(Self { signer, chain, trust_anchors, info })
    }

    /// Issues a leaf certificate for `name` with a fresh P-256 key.
    pub fn issue(
        &self,
        name: &IdentityName,
        now: SystemTime,
        lifetime: Duration,
        skew: Duration,
    ) -> Result<Leaf, Error> {
        if !self.info.is_valid_at(now) {
            return Err(Error::IssuerNotValid { not_before: self.info.not_before, not_after: self.info.not_after });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| Error::Crypto(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.dns_name());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::DnsName(name.dns_name().try_into().map_err(|e: rcgen::Error| Error::Crypto(e.to_string()))?),
            SanType::URI(name.spiffe_id().try_into().map_err(|e: rcgen::Error| Error::Crypto(e.to_string()))?),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        // Never outlive the issuer: a leaf past its issuer's expiry would not verify anyway.
        let not_after = (now + lifetime).min(self.info.not_after);
        params.not_before = to_offset(now.checked_sub(skew).unwrap_or(UNIX_EPOCH).max(self.info.not_before));
        params.not_after = to_offset(not_after);
        let cert = params.signed_by(&key, &self.signer).map_err(|e| Error::Crypto(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let info = CertInfo::parse(&chain[0])?;
        Ok(Leaf {
            name: name.clone(),
            key_pem: key.serialize_pem(),
            chain,
            trust_anchors: self.trust_anchors.clone(),
            info,
        })
    }
}

/// An issued certificate with its key, chain (leaf first) and trust anchors.
#[derive(Clone)]
pub struct Leaf {
    pub name: IdentityName,
    pub key_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub trust_anchors: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf").field("name", &self.name).field("info", &self.info).finish_non_exhaustive()
    }
}

impl Leaf {
    pub fn chain_pem(&self) -> String {
        pem_of(&self.chain)
    }

    pub fn trust_anchors_pem(&self) -> String {
        pem_of(&self.trust_anchors)
    }

    /// When this certificate should be replaced: `fraction` of the way through its lifetime.
    pub fn renew_at(&self, fraction: f64) -> SystemTime {
        let life = self.info.not_after.duration_since(self.info.not_before).unwrap_or_default();
        self.info.not_before + life.mul_f64(fraction.clamp(0.0, 1.0))
    }
}

/// Creates a self-signed root and a name-constrained intermediate (pathLen 0) for a box that is
/// its own trust domain. Both last `lifetime` from `now`.
pub fn standalone(trust_domain: &str, now: SystemTime, lifetime: Duration) -> Result<IssuerPem, Error> {
    let crypto = |e: rcgen::Error| Error::Crypto(e.to_string());
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
    let mut root = CertificateParams::default();
    root.distinguished_name.push(DnType::CommonName, format!("meshkeep standalone root for {trust_domain}"));
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root.not_before = to_offset(now.checked_sub(Duration::from_secs(300)).unwrap_or(UNIX_EPOCH));
    root.not_after = to_offset(now + lifetime);
    root.serial_number = Some(random_serial()?);
    let root_cert = root.self_signed(&root_key).map_err(crypto)?;
    let root_issuer = rcgen::Issuer::new(root.clone(), root_key);

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
    let mut intermediate = CertificateParams::default();
    intermediate.distinguished_name.push(DnType::CommonName, format!("meshkeep issuer for {trust_domain}"));
    intermediate.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    intermediate.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    intermediate.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(trust_domain.to_owned())],
        excluded_subtrees: vec![],
    });
    intermediate.use_authority_key_identifier_extension = true;
    intermediate.not_before = root.not_before;
    intermediate.not_after = root.not_after;
    intermediate.serial_number = Some(random_serial()?);
    let intermediate_cert = intermediate.signed_by(&key, &root_issuer).map_err(crypto)?;
    Ok(IssuerPem {
        certificate: intermediate_cert.pem(),
        private_key: key.serialize_pem(),
        trust_anchors: root_cert.pem(),
    })
}

fn to_offset(time: SystemTime) -> time::OffsetDateTime {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A positive random 16-byte serial number.
fn random_serial() -> Result<SerialNumber, Error> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| Error::Crypto("no randomness".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> IdentityName {
        IdentityName::new("shop", "web", "cluster.local", "linkerd")
    }

    #[test]
    fn standalone_issuer_signs_leaves_with_both_names() {
        let now = SystemTime::now();
        let material = standalone("cluster.local", now, Duration::from_secs(365 * 86400)).expect("standalone");
        let issuer = Issuer::from_pem(&material).expect("issuer parses");
        let leaf = issuer.issue(&name(), now, Duration::from_secs(86400), Duration::from_secs(60)).expect("issue");
        assert_eq!(leaf.chain.len(), 2, "leaf then issuer");
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.chain[0]).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(sans.iter().any(|s| s.contains("web.shop.serviceaccount.identity.linkerd.cluster.local")), "{sans:?}");
        assert!(sans.iter().any(|s| s.contains("spiffe://cluster.local/ns/shop/sa/web")), "{sans:?}");
        assert!(!cert.is_ca());
        let lifetime = leaf.info.not_after.duration_since(leaf.info.not_before).unwrap();
        assert_eq!(lifetime.as_secs(), 86400 + 60, "backdated by the skew allowance");
    }

    #[test]
    fn leaves_never_outlive_their_issuer_and_expired_issuers_refuse() {
        let now = SystemTime::now();
        let material = standalone("cluster.local", now, Duration::from_secs(3600)).unwrap();
        let issuer = Issuer::from_pem(&material).unwrap();
        let leaf = issuer.issue(&name(), now, Duration::from_secs(86400), Duration::ZERO).unwrap();
        assert!(leaf.info.not_after <= issuer.info.not_after);
        let later = now + Duration::from_secs(7200);
        assert!(matches!(
            issuer.issue(&name(), later, Duration::from_secs(60), Duration::ZERO),
            Err(Error::IssuerNotValid { .. })
        ));
    }

    #[test]
    fn mismatched_key_and_non_ca_certificates_are_refused() {
        let now = SystemTime::now();
        let a = standalone("cluster.local", now, Duration::from_secs(3600)).unwrap();
        let b = standalone("cluster.local", now, Duration::from_secs(3600)).unwrap();
        let mixed = IssuerPem { private_key: b.private_key.clone(), ..a.clone() };
        assert!(Issuer::from_pem(&mixed).unwrap_err().to_string().contains("does not match"));
        let issuer = Issuer::from_pem(&a).unwrap();
        let leaf = issuer.issue(&name(), now, Duration::from_secs(60), Duration::ZERO).unwrap();
        let leaf_as_issuer = IssuerPem {
            certificate: pem_of(&leaf.chain[..1]),
            private_key: leaf.key_pem,
            trust_anchors: a.trust_anchors,
        };
        assert!(Issuer::from_pem(&leaf_as_issuer).unwrap_err().to_string().contains("not a CA"));
    }

    #[test]
    fn renewal_is_due_at_the_configured_fraction() {
        let now = SystemTime::now();
        let issuer =
            Issuer::from_pem(&standalone("cluster.local", now, Duration::from_secs(86400 * 30)).unwrap()).unwrap();
        let leaf = issuer.issue(&name(), now, Duration::from_secs(1000), Duration::ZERO).unwrap();
        let due = leaf.renew_at(0.7).duration_since(leaf.info.not_before).unwrap().as_secs();
        assert_eq!(due, 700);
    }
}
